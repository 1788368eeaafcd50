"""Iterative registration baselines on the pre-processed pairs the network sees (SPEC section 6).

    .venv/bin/python tools/baselines.py [--data_dir DIR] [--spacing_mm 1.76] [--shape 48 48 40] [--fold 0]
        [--num_folds 5] [--methods sdm,mi] [--model_dir MODEL_DIR] [--output baselines.csv] [--limit N]
        [--cache_dir DIR]

For every validation case of the chosen fold (the same k-fold split as ``label-reg train``), pre-processed exactly as
for the network (crop grid at ``--spacing_mm`` / ``--shape``, coarse pre-alignment included), this runs the
registrations a user would otherwise run, with SimpleITK, on the crop grid:

* ``B-spline SDM``: free-form B-spline registration of the moving (MR) gland SDM to the fixed (TRUS) gland SDM,
  mean squares (every voxel), L-BFGS (30 iterations per level), three resolutions (shrink 4, 2, 1; smoothing 2,
  1, 0 voxels) with the control grid refined at each (mesh 3 -> 6 -> 12 spans along the longest axis). It needs
  the TRUS gland mask at registration time, which the network does not: an upper bound on what gland-surface
  matching gives, not a deployable competitor.
* ``B-spline MI``: the same B-spline schedule on the images themselves (MR -> TRUS), Mattes mutual information
  (32 bins, regular 25 % sampling), regular-step gradient descent (at most one voxel per step, 25 iterations per
  level), control grid refined to 6 spans only (Mattes' derivative costs bins^2 x parameters; 12 spans took
  30 s per pair and did no better). Needs no segmentation of the TRUS. Tried and dropped on the demo data: L-BFGS
  (diverges), gradient descent with learning-rate estimation (diverges, slow), an affine MI stage first (drifts
  further), a mask of the TRUS field of view (no better).
* with ``--model_dir`` (alias ``--model``): the network (a ``label-reg train`` model directory) on the same
  pre-processed pairs, as ``label-reg evaluate`` runs it (its :class:`label_reg.evaluate.Evaluator`: the
  batch-norm-folded model through one :class:`label_reg.predictor.Predictor`), so all rows share one table.
  Its pre-processing settings must match ``--spacing_mm`` / ``--shape``. A model pre-aligned on the found TRUS
  gland (``prealign: trus_gland``) puts every row on that pre-alignment: each pair is pre-aligned on the gland its
  segmenter finds in the TRUS (as ``register`` does), so the baselines start where the network starts and the
  pre-alignment row is named ``Coarse (found gland)``.

Each case is scored as the network is (:func:`label_reg.metrics.case_metrics`): gland DSC (and thirds), landmark
TRE in mm (label channels >= 1 warped by the resulting transform, linear then >= 0.5, like the pre-processing),
HD95, and ∇|J| / folding of the transform's displacement field; plus the registration's wall-clock ``seconds``
(pre-processing excluded; for the network: the forward pass and the label warp, after one warm-up call that traces
the graph). The ``Coarse`` rows (pre-alignment only) are the same as ``label-reg evaluate``'s, so the
per-case CSV (columns ``case``, ``method``, ``fold``, the metric names, ``seconds``) can be passed to
``label-reg compare --results`` beside the network's. A table, mean (median) ± SD, is printed.
"""
import argparse
import math
import os
import pathlib
import sys
import time

import numpy as np
import pandas as pd
import SimpleITK as sitk

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from label_reg import datasets, metrics, report  # noqa: E402
from label_reg.preprocess import PreprocessConfig  # noqa: E402

COARSE = "Coarse"
METHODS = {
    "sdm": "B-spline SDM (SimpleITK)",
    "mi": "B-spline MI (SimpleITK)",
}
DEFAULT_DATA = os.environ.get("LABEL_REG_DEMO_DATA", "/work/shared/data/mrus-prostate-demo")
CPU_PRESET = {"spacing_mm": 1.76, "shape": (48, 48, 40)}
SHRINK = (4, 2, 1)
SMOOTH_VOXELS = (2.0, 1.0, 0.0)
COARSE_MESH_SPANS = 3  # control-grid spans along the longest axis at the coarsest level; doubled at every level


# ------------------------------------------------------------------------------------------------ images
def to_sitk(array_xyz, spacing_mm):
    """A float32 SimpleITK image of an (x, y, z) array on the crop grid, origin 0, identity direction, mm spacing."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array_xyz, np.float32).transpose(2, 1, 0)))
    image.SetSpacing([float(spacing_mm)] * 3)
    return image


def from_sitk(image):
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0)


def warp_labels(labels_xyzk, transform, reference):
    """Resample every label channel through ``transform`` (fixed point -> moving point): linear, then >= 0.5."""
    channels = []
    for k in range(labels_xyzk.shape[-1]):
        moving = to_sitk(labels_xyzk[..., k], reference.GetSpacing()[0])
        warped = sitk.Resample(moving, reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        channels.append(from_sitk(warped) >= 0.5)
    return np.stack(channels, -1).astype(np.float32)


def displacement_voxels(transform, reference):
    """The transform's displacement field on the reference grid, (X, Y, Z, 3) in voxels along the array axes."""
    field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, reference.GetSize(),
                                              reference.GetOrigin(), reference.GetSpacing(),
                                              reference.GetDirection())
    disp = sitk.GetArrayFromImage(field).transpose(2, 1, 0, 3)  # mm, identity direction: axes = array axes
    return (disp / np.asarray(reference.GetSpacing())).astype(np.float32)


# ------------------------------------------------------------------------------------------------ registration
def bspline_registration(fixed, moving, metric):
    """Multi-resolution B-spline registration of ``moving`` onto ``fixed`` (SimpleITK images on the same grid).

    ``metric``: ``"mean_squares"`` (L-BFGS, 30 iterations per level, every voxel, control grid 3 -> 6 -> 12 spans)
    or ``"mattes"`` (regular-step gradient descent, steps of at most one voxel, 25 iterations per level, regular 25 %
    sampling, control grid 3 -> 6 -> 6 spans). Returns the optimised ``sitk.BSplineTransform`` (fixed point ->
    moving point).
    """
    size = np.asarray(fixed.GetSize(), float)
    mesh = [max(1, int(round(COARSE_MESH_SPANS * n / size.max()))) for n in size]
    transform = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
    method = sitk.ImageRegistrationMethod()
    if metric == "mean_squares":
        refine = [1, 2, 4]
        # Every voxel: ITK's sampled subsets (RANDOM or REGULAR, fixed seed) differ from run to run with threading and
        # move the landmark TRE by millimetres; all voxels give the same numbers every time.
        method.SetMetricAsMeanSquares()
        # L-BFGS (unbounded; ITK's L-BFGS-B keeps the first level's parameter count when the grid is refined).
        method.SetOptimizerAsLBFGS2(solutionAccuracy=1e-5, numberOfIterations=30, hessianApproximateAccuracy=5,
                                    deltaConvergenceDistance=0, deltaConvergenceTolerance=1e-5,
                                    lineSearchMaximumEvaluations=40)
    elif metric == "mattes":
        method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        method.SetMetricSamplingStrategy(method.REGULAR)
        method.SetMetricSamplingPercentage(0.25, seed=0)
        # L-BFGS diverges on MI here (displacements of 40-100 mm); bounded steps keep the transform sane. Every
        # B-spline parameter is a displacement in mm, so unit scales (estimating them costs more than the fit).
        method.SetOptimizerAsRegularStepGradientDescent(learningRate=float(fixed.GetSpacing()[0]), minStep=0.01,
                                                        numberOfIterations=25, relaxationFactor=0.7,
                                                        gradientMagnitudeTolerance=1e-6)
        # Mattes MI's derivative costs bins^2 x parameters per thread: stop refining at 6 spans.
        refine = [1, 2, 2]
    else:
        raise ValueError(f"unknown metric {metric!r}")
    method.SetInterpolator(sitk.sitkLinear)
    method.SetShrinkFactorsPerLevel(list(SHRINK))
    method.SetSmoothingSigmasPerLevel(list(SMOOTH_VOXELS))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    method.SetInitialTransformAsBSpline(transform, inPlace=True, scaleFactors=refine)
    return method.Execute(fixed, moving)


def register_case(pre, method):
    """Run one baseline on a pre-processed pair; returns (transform, seconds)."""
    spacing = float(pre.grid.spacing[0])
    start = time.perf_counter()
    if method == "sdm":
        fixed, moving = to_sitk(pre.fixed_sdm, spacing), to_sitk(pre.moving_sdm, spacing)
        transform = bspline_registration(fixed, moving, "mean_squares")
    elif method == "mi":
        fixed, moving = to_sitk(pre.fixed_image, spacing), to_sitk(pre.moving_image, spacing)
        transform = bspline_registration(fixed, moving, "mattes")
    else:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
    return transform, time.perf_counter() - start


def _row(pre, method, fold, warped, ddf, seconds):
    """One per-case row: ``method``'s metrics against the fixed labels (``ddf`` None: no transform) and seconds.
    ``case`` is filled in by :func:`run`."""
    spacing = tuple(float(s) for s in pre.grid.spacing)
    row = {"case": None, "method": method, "fold": fold}
    row.update(metrics.case_metrics(pre.fixed_label, warped, ddf, spacing))
    row["seconds"] = seconds
    return row


def score_case(pre, method, fold=None):
    """Rows (dicts) for one case: the baseline ``method`` (``"sdm"``/``"mi"``), metrics and seconds."""
    transform, seconds = register_case(pre, method)
    reference = to_sitk(pre.fixed_image, float(pre.grid.spacing[0]))
    warped = warp_labels(pre.moving_label, transform, reference)
    return _row(pre, METHODS[method], fold, warped, displacement_voxels(transform, reference), seconds)


class NetworkMethod:
    """A trained model directory scored like a baseline: (ddf, warped labels, seconds) per pre-processed pair.

    ``config``: the pre-processing the other rows use (``--spacing_mm``, ``--shape``); it must be the model's grid.
    ``preprocess_config`` is the model's own (with its pre-alignment mode) and ``finder`` its TRUS gland segmenter
    (None for the paper's TRUS-centre pre-alignment)."""

    def __init__(self, model_dir, config):
        from label_reg import model_dir as md
        from label_reg.errors import InputError
        from label_reg.evaluate import Evaluator, method_name
        self.evaluator = Evaluator.from_model_dir(model_dir)
        own = self.preprocess_config = self.evaluator.preprocess_config
        if (tuple(own.shape), float(own.spacing_mm)) != (tuple(config.shape), float(config.spacing_mm)):
            raise InputError(model_dir, f"was trained on {'x'.join(map(str, own.shape))} at {own.spacing_mm:g} mm; "
                                        f"pass --spacing_mm {own.spacing_mm:g} --shape {' '.join(map(str, own.shape))}")
        self.name = f"{method_name(self.evaluator.info)} (label_reg)"
        self.finder = None
        if own.prealign == "trus_gland":
            from label_reg.segmenter import GlandFinder
            self.finder = GlandFinder.from_model_dir(md.segmenter_path(model_dir, self.evaluator.info))

    def row(self, pre, fold=None):
        if not self.evaluator.predictor.forward.experimental_get_tracing_count():  # trace once, outside the timing
            self.evaluator(pre)
        start = time.perf_counter()
        ddf, warped = self.evaluator(pre)
        seconds = time.perf_counter() - start
        return _row(pre, self.name, fold, (warped >= 0.5).astype(np.float32), ddf, seconds)


def coarse_row(pre, fold=None, name=COARSE):
    return _row(pre, name, fold, pre.moving_label, None, 0.0)


# ------------------------------------------------------------------------------------------------ tables
def summary(per_case):
    """The paper's columns (mean (median) ± SD) plus seconds per pair, one row per method."""
    table = report.summary_table(per_case)
    keep = [c for c in ("DSC whole %", "TRE mm", "HD95 mm", "∇|J| ×10⁻²", "folding %") if c in table.columns]
    table = table[keep].copy()
    table["seconds"] = [report.format_stat(per_case.loc[per_case["method"] == m, "seconds"], 1.0, 2)
                        for m in table.index]
    return table


def run(pairs, config, methods, fold=None, progress=True, cache_dir="", network=None):
    """Per-case DataFrame for ``pairs`` (datasets.Pair with fixed labels), the chosen ``methods`` and optionally a
    :class:`NetworkMethod` (whose segmenter, if it has one, pre-aligns every pair on the found TRUS gland)."""
    from label_reg.evaluate import COARSE_FOUND
    from label_reg.preprocess import Preprocessed
    from label_reg.cases import load_cases
    finder = None if network is None else network.finder
    if finder is not None:
        config = network.preprocess_config
    rows = []
    for i, pair in enumerate(pairs, 1):
        arrays, = load_cases([pair], config, cache_dir, progress=False, finder=finder)
        pre = Preprocessed.from_arrays(arrays)
        coarse = coarse_row(pre, fold, COARSE if finder is None else COARSE_FOUND)
        case_rows = [coarse] + [score_case(pre, m, fold) for m in methods]
        if network is not None:
            case_rows.append(network.row(pre, fold))
        for row in case_rows:
            row["case"] = pair.name
        rows.extend(case_rows)
        if progress:
            text = ", ".join(f"{r['method'].split(' (')[0]} DSC {r['dsc']:.3f} TRE {r['tre_mm']:.1f} mm "
                             f"{r['seconds']:.2f} s" for r in case_rows)
            print(f"[{i}/{len(pairs)}] {pair.name}: {text}", file=sys.stderr, flush=True)
    return pd.DataFrame(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=DEFAULT_DATA)
    parser.add_argument("--spacing_mm", type=float, default=CPU_PRESET["spacing_mm"])
    parser.add_argument("--shape", type=int, nargs=3, default=list(CPU_PRESET["shape"]))
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--num_folds", type=int, default=5)
    parser.add_argument("--split_seed", type=int, default=0)
    parser.add_argument("--methods", default="sdm,mi", help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--model_dir", "--model", dest="model_dir", default="",
                        help="also score this label-reg model directory on the same pairs")
    parser.add_argument("--output", default="baselines.csv", help="per-case CSV (label-reg compare --results)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N validation cases (0 = all)")
    parser.add_argument("--cache_dir", default="", help="pre-processing cache (as label-reg train --cache_dir)")
    args = parser.parse_args(argv)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    config = PreprocessConfig(spacing_mm=args.spacing_mm, shape=tuple(args.shape))
    pairs = datasets.discover_pairs(args.data_dir)
    _, val = datasets.kfold_split([p.name for p in pairs], args.num_folds, args.fold, args.split_seed)
    chosen = [p for p in pairs if p.name in set(val)]
    if args.limit:
        chosen = chosen[:args.limit]
    print(f"{len(chosen)} validation case(s) of fold {args.fold}/{args.num_folds} in {args.data_dir}, crop "
          f"{'x'.join(map(str, config.shape))} at {config.spacing_mm:g} mm; SimpleITK {sitk.Version.VersionString()}, "
          f"{sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()} thread(s)", file=sys.stderr)
    network = NetworkMethod(args.model_dir, config) if args.model_dir else None
    per_case = run(chosen, config, methods, fold=args.fold, cache_dir=args.cache_dir, network=network)
    output = pathlib.Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    per_case.to_csv(tmp, index=False)
    os.replace(tmp, output)

    print(f"\nIterative baselines, fold {args.fold} ({len(chosen)} cases), "
          f"{'x'.join(map(str, config.shape))} at {config.spacing_mm:g} mm; mean (median) ± SD")
    print(report.to_markdown(summary(per_case)))
    if "sdm" in methods:
        print(f"\n{METHODS['sdm']} uses the TRUS gland mask at registration time (the network does not).")
    print(f"seconds: registration only, per pair (pre-processing excluded). Per-case rows: {output}")
    finite = per_case["tre_mm"].map(lambda v: isinstance(v, float) and math.isfinite(v))
    if not finite.all():
        print(f"{int((~finite).sum())} row(s) without a finite TRE (landmark lost)")
    return 0


if __name__ == "__main__":
    from label_reg.errors import InputError
    try:
        sys.exit(main())
    except InputError as err:  # one line, exit 2, and the CSV is only written at the end
        print(f"baselines.py: error: {err}", file=sys.stderr)
        sys.exit(2)
