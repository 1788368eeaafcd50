"""`make rotation-study`: does the global affine stage make a *trained* network register rotated pairs?

Writes phantoms whose TRUS side is turned about the TRUS gland centre by a random angle up to ``--max_rotation_deg``
(training and validation) and held-out phantoms turned by exactly ``--test_rotation_deg`` about a random axis; trains
the demo's TRUS gland segmenter once, then the demo's MIX+ twice with the same seed and data, without and with
``--global_affine`` (pre-aligned on the found gland, as the product does); registers the held-out pairs with label-reg's
Registrar and scores them against the known deformation (exact landmark TRE, gland DSC, mean gland error, folding).
Prints a table, the rotation the affine stage found, and paired Wilcoxon tests on the landmark TRE:

    python tools/rotation_study.py --output_dir runs/rotation_study [--num_pairs 40] [--num_heldout 40]
        [--max_rotation_deg 30] [--test_rotation_deg 25] [--num_steps 1500] [--segmenter_steps 300]
        [--landmark_weight 0] [--affine_pooling flatten] [--affine_label_weight 0] [--augment_rotation_deg 0]
        [--reuse_from DIR]

Everything lands in ``--output_dir`` (phantoms, segmenter, ``model`` and ``model_affine``, registrations,
``rotation_results.csv`` / ``.md``, ``rotation_summary.json``). ``--reuse_from`` a finished study with the same
phantom, segmenter and MIX+ settings copies its phantoms, segmenter and plain MIX+ instead of making them again and
trains only the affine model: half the cost of trying another affine setting (``--affine_pooling``,
``--affine_label_weight``).
"""
import argparse
import json
import pathlib
import shutil
import sys
import time


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import demo  # noqa: E402  (tools/demo.py: the demo's trainings and held-out scoring)

PLAIN, AFFINE = "MIX+ (found TRUS gland)", "MIX+ affine (found TRUS gland)"
COARSE_FOUND = "Coarse (found TRUS gland)"
# Settings that make the phantoms, the segmenter and the plain MIX+: a study reused by --reuse_from must share them.
SHARED_SETTINGS = ("num_pairs", "num_heldout", "max_rotation_deg", "test_rotation_deg", "num_steps", "segmenter_steps",
                   "landmark_weight", "augment_rotation_deg", "spacing_mm", "shape", "seed")
REUSED = ("phantoms", "heldout", "segmenter", "model")  # what --reuse_from copies
# Settings added after the first studies were made, with the value a study that does not record one was made with.
IMPLIED_BEFORE_RECORDED = {"augment_rotation_deg": 0.0}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="runs/rotation_study", help="everything the study writes goes here")
    parser.add_argument("--num_pairs", type=int, default=40, help="rotated training + validation phantom pairs")
    parser.add_argument("--num_heldout", type=int, default=40,
                        help="held-out phantom pairs to register (the studies A-D in the README used 8: too few "
                             "to tell the models apart)")
    parser.add_argument("--max_rotation_deg", type=float, default=30.0,
                        help="training pairs: TRUS side turned by a random angle in [-N, N] degrees")
    parser.add_argument("--test_rotation_deg", type=float, default=25.0,
                        help="held-out pairs: TRUS side turned by exactly this angle (random axis)")
    parser.add_argument("--num_steps", type=int, default=1500, help="registration training iterations per model")
    parser.add_argument("--segmenter_steps", type=int, default=300, help="segmenter training iterations")
    parser.add_argument("--landmark_weight", type=float, default=0.0,
                        help="landmark supervision weight for both models (0: gland masks only)")
    parser.add_argument("--augment_rotation_deg", type=float, default=0.0,
                        help="both MIX+ models: also turn each training TRUS side by up to this many degrees "
                             "(label-reg train --augment_rotation_deg)")
    parser.add_argument("--affine_pooling", choices=("average", "flatten"), default="flatten",
                        help="how the affine model's head reduces the coarsest features (label-reg train "
                             "--affine_pooling)")
    parser.add_argument("--affine_label_weight", type=float, default=0.0,
                        help="the affine model only: also score the label losses on its affine stage alone, with "
                             "this weight (label-reg train --affine_label_weight; 0: off)")
    parser.add_argument("--spacing_mm", type=float, default=1.76, help="working resolution (the CPU preset)")
    parser.add_argument("--shape", default="48,48,40", help="crop shape x,y,z (the CPU preset)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output_dir")
    parser.add_argument("--reuse_from", default=None,
                        help="a finished study directory with the same settings (all but --affine_pooling and "
                             "--affine_label_weight): copy "
                             "its phantoms, segmenter and plain MIX+ and train only the affine model")
    args = parser.parse_args(argv)
    from label_reg.synthetic import check_angle
    for name in ("max_rotation_deg", "test_rotation_deg", "augment_rotation_deg"):
        try:
            check_angle(f"--{name}", getattr(args, name))
        except ValueError as err:
            parser.error(str(err))
    if not args.affine_label_weight >= 0:
        parser.error(f"--affine_label_weight must be >= 0, got {args.affine_label_weight}")
    for name in ("num_pairs", "num_heldout", "num_steps", "segmenter_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.num_pairs < 5:
        parser.error(f"--num_pairs must be at least 5 (five folds; fold 0 validates), got {args.num_pairs}")
    if args.reuse_from is not None:
        try:
            args.reused_summary = reusable_study(args.reuse_from, args)
        except ValueError as err:
            parser.error(str(err))
    return args


def reusable_study(directory, args):
    """The ``rotation_summary.json`` of the finished study in ``directory`` if it made its phantoms, segmenter and
    plain MIX+ with ``args``' settings (:data:`SHARED_SETTINGS`; one it does not record because it predates it has
    its :data:`IMPLIED_BEFORE_RECORDED` value) and holds them; ValueError naming what differs."""
    directory = pathlib.Path(directory)
    summary_file = directory / "rotation_summary.json"
    if not summary_file.is_file():
        raise ValueError(f"--reuse_from {directory}: no rotation_summary.json (not a finished rotation study)")
    try:
        summary = json.loads(summary_file.read_text())
        earlier = summary["args"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"--reuse_from {summary_file}: unreadable ({err})") from None
    earlier = {**IMPLIED_BEFORE_RECORDED, **earlier}
    differ = [f"--{name} {earlier.get(name)!r} there, {getattr(args, name)!r} here" for name in SHARED_SETTINGS
              if earlier.get(name) != getattr(args, name)]
    if differ:
        raise ValueError(f"--reuse_from {directory}: made with other settings ({'; '.join(differ)})")
    missing = [name for name in REUSED if not (directory / name).is_dir()]
    if missing:
        raise ValueError(f"--reuse_from {directory}: {', '.join(missing)} missing")
    if pathlib.Path(args.output_dir).resolve() == directory.resolve():
        raise ValueError(f"--reuse_from {directory} is --output_dir itself; choose another --output_dir")
    return summary


def main(argv=None):
    args = parse_args(argv)
    out = pathlib.Path(args.output_dir)
    if not demo.prepare_output(out, args.overwrite, tool="rotation_study"):
        return 2
    started = time.perf_counter()

    reused = getattr(args, "reused_summary", None)
    if reused is not None:
        print(f"[1/4] copying the phantoms, segmenter and plain MIX+ of {args.reuse_from}", flush=True)
        for name in REUSED:
            shutil.copytree(pathlib.Path(args.reuse_from) / name, out / name)
        segmenter_summary = {"last_validation": reused.get("segmenter_validation")}
        seconds = {name: reused["seconds"][name] for name in ("segmenter", "model")}
        summaries = {"model": {"best_dsc": reused["best_validation"]["model"]}}
        print(f"[2/4] training MIX+ with the global affine stage ({args.num_steps} steps)", flush=True)
    else:
        from label_reg.synthetic import write_phantoms
        print(f"[1/4] writing {args.num_pairs} phantoms turned up to {args.max_rotation_deg:g} degrees and "
              f"{args.num_heldout} held-out phantoms turned by {args.test_rotation_deg:g} degrees", flush=True)
        write_phantoms(out / "phantoms", args.num_pairs, seed=args.seed, max_rotation_deg=args.max_rotation_deg)
        write_phantoms(out / "heldout", args.num_heldout, seed=args.seed + 1000, rotation_deg=args.test_rotation_deg)
        print(f"[2/4] training the segmenter ({args.segmenter_steps} steps), then MIX+ without and with the global "
              f"affine stage ({args.num_steps} steps each)", flush=True)
        segmenter_summary, segmenter_seconds = demo.train_segmenter_on(out / "phantoms", out, args)
        seconds = {"segmenter": segmenter_seconds}
        summaries = {}
    for name, affine in (("model", False), ("model_affine", True)):
        if name in summaries:
            continue
        stage = {"affine_pooling": args.affine_pooling,
                 "affine_label_weight": args.affine_label_weight} if affine else {}
        summaries[name], seconds[name] = demo.train_mixplus_on(out / "phantoms", out, args, name, global_affine=affine,
                                                               landmark_weight=args.landmark_weight,
                                                               augment_rotation_deg=args.augment_rotation_deg, **stage)

    print(f"[3/4] registering the {args.num_heldout} held-out pairs with each model", flush=True)
    rows = demo.score_heldout(out / "model", out / "heldout", out / "registered", PLAIN)
    rows += demo.score_heldout(out / "model_affine", out / "heldout", out / "registered_affine", AFFINE,
                               coarse_rows=False, figure_dir=out / "figures")

    print(f"[4/4] results on the held-out phantoms turned by {args.test_rotation_deg:g} degrees", flush=True)
    import pandas as pd
    frame = pd.DataFrame(rows)
    frame.to_csv(out / "rotation_results.csv", index=False)
    text = demo.results_table(frame)
    found = frame.loc[frame["method"] == AFFINE, "affine_rotation_deg"].astype(float)
    folding = frame.groupby("method", sort=False)["folding_pct"].max().dropna()
    from label_reg.report import wilcoxon_pvalues
    tests = wilcoxon_pvalues(frame, pairs=[(AFFINE, COARSE_FOUND), (AFFINE, PLAIN), (PLAIN, COARSE_FOUND)],
                             metrics=("tre_mm",)).to_dict("records")
    lines = [text, "",
             f"rotation found by the affine stage: median {found.median():.1f} degrees (range {found.min():.1f}-"
             f"{found.max():.1f}); the pairs are turned by {args.test_rotation_deg:g}",
             "largest folding fraction: " + ", ".join(f"{m} {v:.3f} %" for m, v in folding.items())]
    lines += [f"Wilcoxon TRE {t['method_a']} - {t['method_b']}: median {t['median_diff']:+.2f} mm, "
              f"p = {t['p_value']:.3g} "
              f"(n = {t['n']})" for t in tests]
    (out / "rotation_results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"segmenter {seconds['segmenter']:.0f} s, MIX+ {seconds['model']:.0f} s"
          f"{' (reused)' if reused is not None else ''}, MIX+ affine {seconds['model_affine']:.0f} s; whole study "
          f"{time.perf_counter() - started:.0f} s")
    settings = {key: value for key, value in vars(args).items() if key != "reused_summary"}
    (out / "rotation_summary.json").write_text(json.dumps(
        {"args": settings, "seconds": seconds, "wilcoxon_tre": tests,
         "segmenter_validation": segmenter_summary["last_validation"],
         "best_validation": {name: s["best_dsc"] for name, s in summaries.items()},
         "affine_rotation_deg": found.tolist()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
