"""Does `register`'s self-check see the bad registrations? Registers a found-gland model's held-out pairs as the
product does and sets each self-check beside the registration's landmark error.

    python tools/self_check_study.py --model_dir RUN [RUN ...] [--data_dir DATA] [--fold K]
        [--min_dsc 0.7,0.75,0.8,0.82,0.85] [--output FILE.md|FILE.csv] [--noprogress]

Each RUN is a ``label-reg train --prealign=trus_gland`` model directory (it carries its segmenter); several runs (e.g.
the folds of a cross-validation) are pooled into one table with a ``run`` column. The cases of a run are the ones
``label-reg evaluate`` would score: its held-out fold (or ``--fold K``) of its data directory (or ``--data_dir``).
Each pair goes through ``label_reg.register.Registrar`` with its default thresholds, into a temporary folder, so the
check is exactly the one ``register`` prints. Per case:

* ``check_dsc``, ``check_centre_mm``, ``check_passed``: the self-check (``registration.json``'s ``quality_check``);
* ``segmenter_centre_error_mm``: the found TRUS gland centre the pre-alignment used against the centre of mass of
  the TRUS gland mask (world mm);
* ``tre_world_mm``: the mean over the pair's landmarks (label channels 1.., paired by index) of the distance between
  the MR landmark centroid and the TRUS landmark centroid mapped by the written ``transform_ddf.nii.gz`` (TRUS point
  p -> MR point p + d(p), read back with SimpleITK). NaN for a pair without landmarks.

Below the table: Spearman's rank correlation of ``check_dsc`` and ``check_centre_mm`` with the TRE, and for each DSC
threshold of ``--min_dsc``, the cases a check at that threshold would flag (DSC below it) with their TRE. A
threshold for ``register --check_min_dsc`` should flag the worst registrations and little else on every fold; one
fold is 18 pairs, so pool the folds.
"""
import argparse
import os
import pathlib
import sys
import tempfile

import numpy as np
import pandas as pd

from label_reg import io as lio

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DEFAULT_THRESHOLDS = (0.70, 0.75, 0.80, 0.82, 0.85)
COLUMNS = ["run", "case", "check_dsc", "check_centre_mm", "check_passed", "segmenter_centre_error_mm", "tre_world_mm"]


def case_row(registrar, pair, folder):
    """One pair registered by ``registrar`` into ``folder``: a dict of :data:`COLUMNS`."""
    import SimpleITK as sitk

    from label_reg.evaluate import landmark_centroids_world
    from label_reg.preprocess import gland_centre_of_mass

    result = registrar.register(pair.moving_image, pair.fixed_image, pair.moving_label, output_dir=folder)
    check = result.report["quality_check"]
    fixed_labels = lio.read_label(pair.fixed_label, reference=lio.read_image(pair.fixed_image),
                                  reference_name=str(pair.fixed_image))
    found = np.asarray(result.report["prealignment"]["gland_estimate"]["centre_mm"], np.float64)
    true_centre = gland_centre_of_mass(fixed_labels[0], str(pair.fixed_label))
    moving_landmarks = landmark_centroids_world(lio.read_label(pair.moving_label))
    fixed_landmarks = landmark_centroids_world(fixed_labels)
    count = min(len(moving_landmarks), len(fixed_landmarks))
    field = sitk.DisplacementFieldTransform(sitk.ReadImage(str(result.files["transform_ddf"]),
                                                           sitk.sitkVectorFloat64))
    distances = [np.linalg.norm(np.asarray(field.TransformPoint([float(v) for v in fixed_landmarks[k]]))
                                - moving_landmarks[k])
                 for k in range(count)
                 if np.all(np.isfinite(fixed_landmarks[k])) and np.all(np.isfinite(moving_landmarks[k]))]
    return {"run": pathlib.Path(registrar.model_dir).name, "case": pair.name, "check_dsc": check["dsc"],
            "check_centre_mm": check["centre_distance_mm"], "check_passed": check["passed"],
            "segmenter_centre_error_mm": float(np.linalg.norm(found - true_centre)),
            "tre_world_mm": float(np.mean(distances)) if distances else float("nan")}


def study(model_dir, data_dir=None, fold=None, progress=True):
    """DataFrame of :data:`COLUMNS`, one row per held-out pair of ``model_dir`` (module docstring)."""
    from label_reg import model_dir as md
    from label_reg.errors import InputError
    from label_reg.evaluate import resolve_cases
    from label_reg.register import Registrar

    info, config = md.read_info(model_dir)
    if config.prealign != "trus_gland":
        raise InputError(model_dir, "pre-aligns on the TRUS volume centre: the self-check needs a found-gland model "
                                    "(label-reg train --prealign=trus_gland)")
    _, pairs, _ = resolve_cases(info, data_dir, fold=fold)
    missing = [p.name for p in pairs if p.fixed_label is None or p.moving_label is None]
    if missing:
        raise InputError(data_dir or model_dir, f"no label files for {', '.join(missing)}: the study needs both")
    registrar = Registrar(model_dir)
    rows = []
    with tempfile.TemporaryDirectory(prefix="self_check_study_") as tmp:
        for i, pair in enumerate(pairs, start=1):
            rows.append(case_row(registrar, pair, pathlib.Path(tmp) / pair.name))
            if progress:
                row = rows[-1]
                print(f"[{i}/{len(pairs)}] {pair.name}: check DSC {row['check_dsc']:.3f}, TRE "
                      f"{row['tre_world_mm']:.2f} mm", file=sys.stderr, flush=True)
    return pd.DataFrame(rows, columns=COLUMNS)


def thresholds_table(table, thresholds):
    """Per DSC threshold: how many cases a check at it flags, which, and the median TRE flagged vs not."""
    lines = ["| min DSC | flagged | flagged cases (TRE mm) | median TRE flagged | median TRE not flagged |",
             "|---|---|---|---|---|"]
    for threshold in thresholds:
        flagged = table[table["check_dsc"] < threshold]
        kept = table[~(table["check_dsc"] < threshold)]
        several = table["run"].nunique() > 1
        names = ", ".join(f"{r.case}{f' of {r.run}' if several else ''} ({r.tre_world_mm:.1f})"
                          for r in flagged.sort_values("check_dsc").itertuples())
        median = [f"{frame['tre_world_mm'].median():.2f}" if len(frame) else "–" for frame in (flagged, kept)]
        lines.append(f"| {threshold:g} | {len(flagged)} of {len(table)} | {names or '–'} | {median[0]} | "
                     f"{median[1]} |")
    return "\n".join(lines)


def markdown(table, thresholds, title):
    from scipy import stats

    from label_reg.report import to_markdown
    shown = table.sort_values("check_dsc").round(3)
    lines = [f"# Self-check against registration error: {title}", "", to_markdown(shown, index=False), ""]
    scored = table.dropna(subset=["tre_world_mm"])
    for column in ("check_dsc", "check_centre_mm"):
        valid = scored.dropna(subset=[column])
        if len(valid) >= 3:
            rho, p = stats.spearmanr(valid[column], valid["tre_world_mm"])
            lines.append(f"- Spearman {column} vs TRE: rho = {rho:.2f} (p = {p:.2g}, {len(valid)} pairs)")
    lines += [f"- failed at the defaults: {int((~table['check_passed']).sum())} of {len(table)}", "",
              thresholds_table(scored, thresholds), ""]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True, nargs="+",
                        help="--prealign=trus_gland model directories (several: pooled)")
    parser.add_argument("--data_dir", help="paired data folder (default: the one the model trained on)")
    parser.add_argument("--fold", type=int, help="validation fold K (default: the one the model held out)")
    parser.add_argument("--min_dsc", default=",".join(f"{t:g}" for t in DEFAULT_THRESHOLDS),
                        help="comma-separated DSC thresholds to tabulate (default: %(default)s)")
    parser.add_argument("--output", help="also write the report: FILE.md or the per-case table FILE.csv")
    parser.add_argument("--noprogress", dest="progress", action="store_false", help="no line per case on stderr")
    args = parser.parse_args(argv)
    try:
        args.min_dsc = [float(t) for t in args.min_dsc.split(",") if t.strip()]
    except ValueError:
        parser.error(f"--min_dsc {args.min_dsc}: comma-separated numbers expected")
    if not args.min_dsc or not all(0.0 < t <= 1.0 for t in args.min_dsc):
        parser.error(f"--min_dsc {args.min_dsc}: thresholds must lie in (0, 1]")
    names = [pathlib.Path(run).name for run in args.model_dir]
    if len(set(names)) != len(names):
        parser.error("--model_dir: two folders share a name, their rows would not be told apart: "
                     + ", ".join(args.model_dir))
    if args.fold is not None and args.fold < 0:
        parser.error(f"--fold {args.fold}: must be a non-negative integer")
    problem = args.output and lio.report_file_problem(args.output)
    if problem:
        parser.error(f"--output {args.output}: {problem}")
    return args


def main(argv=None):
    args = parse_args(argv)
    from label_reg.errors import InputError
    try:
        table = pd.concat([study(run, args.data_dir, args.fold, args.progress) for run in args.model_dir],
                          ignore_index=True)
        text = markdown(table, args.min_dsc, ", ".join(pathlib.Path(run).name for run in args.model_dir))
        if args.output:
            output = pathlib.Path(args.output)
            lio.write_text(output, table.to_csv(index=False) if output.suffix == ".csv" else text)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
