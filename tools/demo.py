"""`make demo`: phantoms -> TRUS gland segmenter and MIX+ trainings on CPU -> registration of held-out pairs -> table.

Everything comes from the project itself (the synthetic phantom generator), so it runs on a fresh machine with no
data. The demo follows the product's default pipeline (SPEC section 2b): a TRUS gland segmenter is trained on the
TRUS images and gland masks, then MIX+ with the pre-alignment on the TRUS gland the segmenter finds
(``prealign=trus_gland``), and ``label-reg register``'s Registrar runs the whole chain on the held-out pairs. The
held-out phantoms have a known deformation, so the TRE is exact: for a TRUS point p the true MR point is p + g(p)
(the ground-truth displacement field), the registered one p + d(p) (the written transform). The table compares the
paper's coarse pre-alignment (MR gland centre onto the TRUS volume centre, p + t0), the pre-alignment on the found
TRUS gland (p + t), and the trained MIX+ model.

    python tools/demo.py --output_dir demo_out [--num_pairs 30] [--num_steps 500] [--segmenter_steps 300]
"""
import argparse
import json
import pathlib
import shutil
import sys
import time

import numpy as np
import SimpleITK as sitk

from label_reg import io as lio
from label_reg import metrics
from label_reg.report import format_stat, to_markdown


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="demo_out", help="everything the demo writes goes here")
    parser.add_argument("--num_pairs", type=int, default=30, help="training + validation phantom pairs")
    parser.add_argument("--num_heldout", type=int, default=4, help="held-out phantom pairs to register")
    parser.add_argument("--num_steps", type=int, default=500, help="registration training iterations (batch 5)")
    parser.add_argument("--segmenter_steps", type=int, default=300, help="segmenter training iterations (batch 4)")
    parser.add_argument("--spacing_mm", type=float, default=1.76, help="working resolution (the CPU preset)")
    parser.add_argument("--shape", default="48,48,40", help="crop shape x,y,z (the CPU preset)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output_dir")
    return parser.parse_args(argv)


def _landmark_centroids(channels):
    """World centroids (K-1, 3) of landmark channels 1.. of a list of sitk channel images."""
    out = []
    for channel in channels[1:]:
        idx = np.argwhere(lio.to_array(channel) >= 0.5)
        out.append(lio.Geometry.from_image(channel).index_to_world(idx.mean(axis=0)) if idx.size
                   else np.full(3, np.nan))
    return np.asarray(out).reshape(-1, 3)


def _point_errors(points, truth_field, truth_geometry, disp_or_translation, geometry=None):
    """|T_true(p) - T(p)| in mm for TRUS points p; T is a displacement field on ``geometry`` or a translation."""
    from label_reg.transform import transform_points
    true_mr = transform_points(points, truth_field, truth_geometry)
    if geometry is None:
        ours = points + np.asarray(disp_or_translation)
    else:
        ours = transform_points(points, disp_or_translation, geometry)
    return np.linalg.norm(true_mr - ours, axis=1)


def _coarse_labels(moving_label_path, fixed_image_path, translation):
    """MR labels moved by the pre-alignment translation alone, on the TRUS grid (linear, threshold 0.5)."""
    fixed = lio.read_image(fixed_image_path)
    transform = sitk.TranslationTransform(3, [float(v) for v in translation])
    out = []
    for channel in lio.read_label(moving_label_path):
        warped = sitk.Resample(channel, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        out.append(lio.to_array(warped) >= 0.5)
    return np.stack(out, axis=-1)


def _paper_translation(moving_label_path, fixed_image_path):
    """The paper's pre-alignment translation: MR gland centre of mass minus the TRUS volume centre (world mm)."""
    from label_reg.preprocess import gland_centre_of_mass
    mr_gland = gland_centre_of_mass(lio.read_label(moving_label_path)[0])
    return mr_gland - lio.Geometry.from_image(lio.read_image(fixed_image_path)).center_world


def train_segmenter_on(data_dir, out, args):
    """The TRUS gland segmenter of the demo (``out/segmenter``) on ``data_dir``; (summary, seconds)."""
    from label_reg.train_segmenter import SegmenterConfig, train_segmenter
    config = SegmenterConfig(
        data_dir=str(data_dir), model_dir=str(out / "segmenter"), num_steps=args.segmenter_steps,
        num_folds=5, fold=0, seed=args.seed, validate_every=max(args.segmenter_steps // 3, 1),
        checkpoint_every=max(args.segmenter_steps // 3, 1), cache_dir=str(out / "cache"))
    started = time.perf_counter()
    return train_segmenter(config), time.perf_counter() - started


def train_mixplus_on(data_dir, out, args, name="model", **extra):
    """MIX+ at the demo's settings (``out/name``), pre-aligned on the gland ``out/segmenter`` finds; ``extra``
    TrainConfig fields (e.g. ``global_affine=True``). (summary, seconds)."""
    from label_reg.train import TrainConfig, train
    config = TrainConfig(data_dir=str(data_dir), model_dir=str(out / name), alpha=0.05, beta=0.45,
                         moving_label_input=True, learning_rate=1e-3, batch_size=5, num_steps=args.num_steps,
                         spacing_mm=args.spacing_mm, shape=tuple(int(n) for n in args.shape.split(",")),
                         num_folds=5, fold=0, seed=args.seed, validate_every=max(args.num_steps // 5, 1),
                         checkpoint_every=max(args.num_steps // 5, 1), cache_dir=str(out / "cache"),
                         prealign="trus_gland", segmenter_dir=str(out / "segmenter"), **extra)
    started = time.perf_counter()
    return train(config), time.perf_counter() - started


def score_heldout(model_dir, heldout_dir, registered_dir, method, coarse_rows=True, figure_dir=None):
    """Register every pair of ``heldout_dir`` with label-reg's Registrar (outputs in ``registered_dir/<pair>``) and
    score it against the known deformation: one row per pair for ``method`` (DSC, landmark TRE, gland mean error,
    seconds, folding fraction, the rotation of a global affine stage) and, with ``coarse_rows``, the two coarse
    pre-alignments before it. ``figure_dir``: a registration figure of the first pair."""
    from label_reg.datasets import discover_pairs
    from label_reg.register import Registrar
    registrar = Registrar(model_dir)
    rows = []
    for pair in discover_pairs(heldout_dir):
        t = time.perf_counter()
        result = registrar.register(pair.moving_image, pair.fixed_image, pair.moving_label,
                                    output_dir=pathlib.Path(registered_dir) / pair.name)
        seconds = time.perf_counter() - t
        truth, truth_geo = lio.read_displacement_field(pathlib.Path(heldout_dir) / "ground_truth" / f"{pair.name}.nii.gz")
        disp, disp_geo = lio.read_displacement_field(result.files["transform_ddf"])
        fixed_channels = lio.read_label(pair.fixed_label)
        fixed = lio.labels_to_array(fixed_channels) >= 0.5
        warped = lio.labels_to_array(lio.read_label(result.files["warped_moving_label"])) >= 0.5
        coarse = _coarse_labels(pair.moving_label, pair.fixed_image, result.translation_mm)
        points = _landmark_centroids(fixed_channels)
        gland_points = disp_geo.index_to_world(np.argwhere(fixed[..., 0]).astype(np.float64))
        methods = [(method, warped, disp, None)]
        if coarse_rows:
            centre_translation = _paper_translation(pair.moving_label, pair.fixed_image)
            paper = _coarse_labels(pair.moving_label, pair.fixed_image, centre_translation)
            methods = [("Coarse (TRUS centre, the paper)", paper, None, centre_translation),
                       ("Coarse (found TRUS gland)", coarse, None, result.translation_mm)] + methods
        for name, labels, field, translation in methods:
            kwargs = (translation,) if field is None else (field, disp_geo)
            rows.append({
                "case": pair.name, "method": name,
                "dsc": metrics.dice(fixed[..., 0], labels[..., 0]),
                "tre_mm": float(np.nanmean(_point_errors(points, truth, truth_geo, *kwargs))),
                "gland_error_mm": float(np.mean(_point_errors(gland_points, truth, truth_geo, *kwargs))),
                "seconds": 0.0 if field is None else seconds})
        affine = result.report.get("global_affine") or {}
        check = result.report.get("quality_check") or {}
        rows[-1].update(self_check_passed=check.get("passed"),
                        folding_pct=100.0 * result.report["ddf_mm"]["folding_fraction"],
                        affine_rotation_deg=affine.get("rotation_deg"))
        if figure_dir is not None:
            from label_reg.figures import registration_figure
            registration_figure(pathlib.Path(figure_dir) / f"{pair.name}_registration.png",
                                lio.to_array(lio.read_image(pair.fixed_image)), fixed,
                                [("Pre-aligned (found gland)", coarse), (method.split(" (")[0], warped)],
                                spacing=disp_geo.spacing,
                                title=f"{pair.name}: MR gland (cyan), TRUS gland (orange), overlap (yellow)")
            figure_dir = None
    return rows


def results_table(frame):
    """Markdown table of mean (median) ± SD per method, in the order the methods first appear."""
    import pandas as pd
    table = pd.DataFrame({
        method: {"DSC %": format_stat(group["dsc"], scale=100),
                 "landmark TRE mm": format_stat(group["tre_mm"]),
                 "gland mean error mm": format_stat(group["gland_error_mm"]),
                 "register s/pair": format_stat(group["seconds"], decimals=2) if group["seconds"].any() else "–"}
        for method, group in frame.groupby("method", sort=False)}).T
    table.index.name = "method"
    return to_markdown(table)


def prepare_output(out, overwrite, tool="demo"):
    """An empty ``out`` (created); False, with a one-line message, if it holds files and ``overwrite`` is off."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            print(f"{tool}: {out} is not empty; pass --overwrite or choose another --output_dir", file=sys.stderr)
            return False
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return True


def main(argv=None):
    args = parse_args(argv)
    out = pathlib.Path(args.output_dir)
    if not prepare_output(out, args.overwrite):
        return 2
    started = time.perf_counter()

    from label_reg.synthetic import write_phantoms
    print(f"[1/4] writing {args.num_pairs} training phantoms and {args.num_heldout} held-out phantoms", flush=True)
    write_phantoms(out / "phantoms", args.num_pairs, seed=args.seed)
    write_phantoms(out / "heldout", args.num_heldout, seed=args.seed + 1000)

    print(f"[2/4] training the TRUS gland segmenter for {args.segmenter_steps} steps, then MIX+ for "
          f"{args.num_steps} steps at {args.spacing_mm} mm pre-aligned on the gland it finds", flush=True)
    segmenter_summary, segmenter_seconds = train_segmenter_on(out / "phantoms", out, args)
    summary, train_seconds = train_mixplus_on(out / "phantoms", out, args)

    print(f"[3/4] registering the {args.num_heldout} held-out pairs with label-reg's Registrar", flush=True)
    rows = score_heldout(out / "model", out / "heldout", out / "registered", "MIX+ (found TRUS gland)",
                         figure_dir=out / "figures")

    print("[4/4] results on the held-out phantoms (TRE against the known deformation)", flush=True)
    import pandas as pd
    frame = pd.DataFrame(rows)
    frame.to_csv(out / "demo_results.csv", index=False)
    text = results_table(frame)
    (out / "demo_results.md").write_text(text + "\n")
    print(text)
    seg = segmenter_summary["last_validation"] or {}
    print(f"\nsegmenter: {segmenter_summary['steps']} steps in {segmenter_seconds:.0f} s, validation gland DSC "
          f"{seg.get('dsc', float('nan')) * 100:.1f} %, centre error {seg.get('centre_error_mm', float('nan')):.1f} mm "
          f"(TRUS volume centre: {segmenter_summary['coarse']['centre_error_mm']:.1f} mm)")
    print(f"registration training: {summary['steps']} steps in {train_seconds:.0f} s "
          f"({summary['samples_per_second']:.1f} samples/s); whole demo {time.perf_counter() - started:.0f} s")
    print(f"outputs: model {out / 'model'}, registrations {out / 'registered'}, figures {out / 'figures'}, "
          f"table {out / 'demo_results.md'}")
    (out / "demo_summary.json").write_text(json.dumps(
        {"segmenter_seconds": segmenter_seconds, "segmenter_validation": segmenter_summary["last_validation"],
         "segmenter_coarse": segmenter_summary["coarse"],
         "train_seconds": train_seconds, "samples_per_second": summary["samples_per_second"],
         "best_validation_dsc": summary["best_dsc"], "coarse_validation": summary["coarse"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
