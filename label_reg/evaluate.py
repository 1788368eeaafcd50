"""Score a trained model on a dataset: per-case metrics, a summary table in the paper's format, world-space TRE.

For every case the pair is pre-processed exactly as in training (:mod:`label_reg.preprocess`, cached on disk), the
network predicts the DDF on the crop grid, every label channel of the pre-aligned MR is warped with it (trilinear,
zero boundary; masks are binarised at 0.5 by :mod:`label_reg.metrics`) and :func:`label_reg.metrics.case_metrics`
scores it against the TRUS labels at the working resolution in the fixed (TRUS) crop space. A ``Coarse`` row scores
the pre-alignment alone (no DDF, so the DDF metrics are NaN).

``tre_world_mm`` is the landmark TRE measured in the ORIGINAL image spaces, independent of the crop grid's
resolution: the centroid (world mm) of each TRUS landmark in the original TRUS label file is mapped through the total
transform of :mod:`label_reg.transform` (pre-alignment translation plus the DDF, or the translation alone for
``Coarse``) into MR world space and compared with the centroid (world mm) of the paired landmark in the original MR
label file; the per-patient value is the mean over landmarks whose two centroids exist.

TensorFlow is imported only when a model is evaluated, so the table helpers here are cheap to import.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
import sys
import time

import numpy as np
import pandas as pd

from label_reg import datasets, metrics, report
from label_reg import io as lio
from label_reg import transform
from label_reg.cache import CaseCache
from label_reg.errors import InputError
from label_reg.preprocess import Preprocessed, preprocess_pair

__all__ = [
    "COARSE", "METRIC_COLUMNS", "RESULT_COLUMNS", "method_name", "resolve_cases", "Evaluator",
    "landmark_centroids_world", "world_tre_mm", "summary_table", "summary_markdown", "read_per_case",
    "evaluate", "EvaluationResult",
]

COARSE = "Coarse"
METRIC_COLUMNS = ("dsc", "dsc_base", "dsc_mid", "dsc_apex", "tre_mm", "tre_world_mm", "hd95_mm",
                  "jacobian_gradient", "folding_fraction", "landmarks_missing")
RESULT_COLUMNS = ("case", "method", "fold") + METRIC_COLUMNS
WORLD_TRE_HEADER = "TRE world mm"


# ------------------------------------------------------------------------------------------- naming
def method_name(info) -> str:
    """The paper's name of a trained model from its loss weights and build: alpha>0, beta=0 -> mDSC;
    alpha=0, beta>0 -> SDM; both > 0 -> MIX, or MIX+ when the network takes the MR mask as a third input.
    Anything else (e.g. bending energy alone) gets a descriptive name."""
    alpha, beta = float(info.get("alpha", float("nan"))), float(info.get("beta", float("nan")))
    with_label = bool(info.get("build", {}).get("moving_label_input", False))
    if alpha > 0 and beta == 0:
        name = "mDSC"
    elif alpha == 0 and beta > 0:
        name = "SDM"
    elif alpha > 0 and beta > 0:
        return "MIX+" if with_label else "MIX"
    else:
        name = f"alpha={alpha:g},beta={beta:g}"
    return name + ("+label" if with_label else "")


# ------------------------------------------------------------------------------------------- cases
def resolve_cases(info, data_dir=None, cases_csv=None, split="val", fold=None):
    """(data_dir, pairs, fold) of the cases to evaluate.

    * ``cases_csv``: the cases whose ``split`` column equals ``split`` (all listed cases if the CSV has no
      ``split`` column); fold is None.
    * ``fold`` K: validation fold K of the k-fold split recorded in the model's training section
      (``num_folds``, ``split_seed``).
    * neither: what the training run held out for validation (its ``cases_csv`` val split or its fold), so
      evaluating a run scores its own validation cases.

    ``data_dir`` defaults to the training run's data directory.
    """
    training = info.get("training") or {}
    if not data_dir:
        data_dir = training.get("data_dir")
        if not data_dir:
            raise InputError("--data_dir", "not given and the model directory records no training data_dir")
    pairs = datasets.discover_pairs(data_dir)
    by_name = {p.name: p for p in pairs}
    if cases_csv and fold is not None:
        raise InputError("--fold", "give either --cases_csv or --fold, not both")
    chosen_fold = None
    if not cases_csv and fold is None and training.get("cases_csv"):
        cases_csv, split = training["cases_csv"], "val"
    if cases_csv:
        if split and _has_column(cases_csv, "split"):
            names = datasets.select_split(cases_csv, split, known=by_name)
        else:
            names = datasets.read_case_list(cases_csv, known=by_name)
    else:
        num_folds = int(training.get("num_folds", 5))
        split_seed = int(training.get("split_seed", 0))
        chosen_fold = int(training.get("fold", 0)) if fold is None else fold
        _, names = datasets.kfold_split(sorted(by_name), num_folds, chosen_fold, split_seed)
    if not names:
        raise InputError(cases_csv or data_dir, "no cases to evaluate")
    return pathlib.Path(data_dir), [by_name[n] for n in names], chosen_fold


def _has_column(csv_path, column):
    """Whether the CSV's header names ``column`` (True when unreadable: the case-list reader reports why)."""
    try:
        return column in [str(c).strip() for c in pd.read_csv(csv_path, nrows=0).columns]
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        return True


# ------------------------------------------------------------------------------------------- world TRE
def landmark_centroids_world(channels) -> np.ndarray:
    """World positions (mm) of the centroids (voxels >= 0.5) of label channels 1.. of a list of 3-D sitk channel
    images (as :func:`label_reg.io.read_label` returns); (K - 1, 3), NaN rows for empty channels."""
    out = np.full((max(len(channels) - 1, 0), 3), np.nan)
    for k, channel in enumerate(channels[1:]):
        arr = lio.to_array(channel)
        idx = np.argwhere(arr >= metrics.THRESHOLD)
        if idx.size:
            out[k] = lio.Geometry.from_image(channel).index_to_world(idx.mean(axis=0))
    return out


def world_tre_mm(fixed_centroids, moving_centroids, ddf, crop_grid, translation_mm):
    """(mean, per-landmark) TRE in mm between MR landmark centroids and TRUS landmark centroids mapped into MR world
    space by the total transform (:func:`label_reg.transform.total_displacement_mm`): ``T(p) = p + t`` for the
    pre-alignment alone (``ddf=None``), ``T(p) = p + t + M_c u(W_c^-1 p)`` with the DDF ``u`` (crop voxels)."""
    fixed_centroids = np.asarray(fixed_centroids, np.float64).reshape(-1, 3)
    moving_centroids = np.asarray(moving_centroids, np.float64).reshape(-1, 3)
    if fixed_centroids.shape != moving_centroids.shape:
        raise ValueError(f"{len(fixed_centroids)} fixed vs {len(moving_centroids)} moving landmarks")
    if fixed_centroids.shape[0] == 0:
        return float("nan"), np.zeros(0)
    disp = transform.total_displacement_mm(ddf, crop_grid, translation_mm, crop_grid)
    mapped = np.full_like(fixed_centroids, np.nan)
    ok = np.all(np.isfinite(fixed_centroids), axis=1)
    if ok.any():
        mapped[ok] = transform.transform_points(fixed_centroids[ok], disp, crop_grid)
    per = np.linalg.norm(mapped - moving_centroids, axis=1)  # NaN where either side is missing
    finite = per[np.isfinite(per)]
    return (float(finite.mean()) if finite.size else float("nan")), per


# ------------------------------------------------------------------------------------------- model
class Evaluator:
    """A loaded model that predicts the DDF of a pre-processed pair and warps all its moving label channels with it
    (trilinear, zero boundary), through one :class:`label_reg.predictor.Predictor` (one traced forward, one traced
    warp)."""

    def __init__(self, predictor):
        self.predictor = predictor
        self.info, self.preprocess_config = predictor.info, predictor.preprocess_config

    @classmethod
    def from_model_dir(cls, path):
        from label_reg.predictor import Predictor

        return cls(Predictor.from_model_dir(path, batch_size=1))

    def __call__(self, pre: Preprocessed):
        """(ddf (X, Y, Z, 3) voxels, warped moving labels (X, Y, Z, K)) as float32 numpy arrays."""
        ddf = self.predictor.predict(pre)
        return ddf, self.predictor.warp(pre.moving_label, ddf, "zero")


def _preprocessed(pair, config, cache):
    arrays = cache.get_or_compute(pair, lambda p: preprocess_pair(p, config).to_arrays())
    pre = Preprocessed.from_arrays(arrays, source=f"pre-processed case {pair.name}")
    if pre.fixed_label is None:
        raise InputError(pair.fixed_image, "no fixed (TRUS) labels to evaluate against")
    if pre.fixed_label.shape[-1] != pre.moving_label.shape[-1]:
        raise InputError(pair.fixed_label, f"holds {pre.fixed_label.shape[-1]} label channel(s) but "
                                           f"{pair.moving_label} holds {pre.moving_label.shape[-1]}; landmarks "
                                           "must be paired")
    return pre


def _case_rows(pair, pre, ddf, warped, method, fold):
    spacing = pre.grid.spacing
    fixed_channels = lio.read_label(pair.fixed_label)
    moving_channels = lio.read_label(pair.moving_label)
    fixed_c = landmark_centroids_world(fixed_channels)
    moving_c = landmark_centroids_world(moving_channels)
    rows = []
    for name, labels, field in ((COARSE, pre.moving_label, None), (method, warped, ddf)):
        row = {"case": pair.name, "method": name, "fold": fold}
        row.update(metrics.case_metrics(pre.fixed_label, labels, field, spacing))
        row["tre_world_mm"] = world_tre_mm(fixed_c, moving_c, field, pre.grid, pre.translation_mm)[0]
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------- tables
def summary_table(per_case, methods_column="method"):
    """:func:`label_reg.report.summary_table` plus a "TRE world mm" column (from ``tre_world_mm``) after "TRE mm"."""
    table = report.summary_table(per_case, methods_column)
    world = []
    for method in table.index:
        if "tre_world_mm" in per_case.columns:
            values = pd.to_numeric(per_case.loc[per_case[methods_column] == method, "tre_world_mm"], errors="coerce")
            world.append(report.format_stat(values, 1.0, 1))
        else:
            world.append(report.DASH)
    position = list(table.columns).index("TRE mm") + 1 if "TRE mm" in table.columns else len(table.columns)
    table.insert(position, WORLD_TRE_HEADER, world)
    return table


def summary_markdown(per_case):
    """The summary table as markdown (Coarse first, then the paper's order)."""
    return report.to_markdown(summary_table(per_case))


TABLE_NOTE = ("mean (median) ± SD over cases. DSC in %; TRE mm: landmark centroids at the working resolution in the "
              "TRUS crop; TRE world mm: in the original image spaces through the total transform; HD95 of the gland; "
              "∇|J| ×10⁻² per voxel of the working grid; folding: voxels with det J ≤ 0.")


def read_per_case(path) -> pd.DataFrame:
    """A per-case CSV written by :func:`evaluate` (checks the ``case`` and ``method`` columns)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise InputError(path, "per-case results CSV not found")
    try:
        df = pd.read_csv(path, keep_default_na=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise InputError(path, f"cannot parse CSV ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    missing = [c for c in ("case", "method") if c not in df.columns]
    if missing:
        raise InputError(path, f"no {', '.join(repr(c) for c in missing)} column(s) (columns: {', '.join(map(str, df.columns))})")
    if df.empty:
        raise InputError(path, "holds no rows")
    df["case"] = df["case"].astype(str)
    df["method"] = df["method"].astype(str)
    return df


# ------------------------------------------------------------------------------------------- main entry
@dataclasses.dataclass
class EvaluationResult:
    per_case: pd.DataFrame
    summary: pd.DataFrame
    text: str
    method: str
    fold: int | None
    output_dir: pathlib.Path
    figures: list


def _fmt_metric(value, scale=1.0, decimals=1):
    return "–" if value is None or not math.isfinite(value) else f"{value * scale:.{decimals}f}"


def evaluate(model_dir, output_dir, data_dir=None, cases_csv=None, split="val", fold=None, method=None,
             cache_dir=None, figures=False, progress=True, evaluator=None, stream=None) -> EvaluationResult:
    """Evaluate a model directory and write ``OUT/per_case.csv`` and ``OUT/summary.md`` (and, with ``figures``,
    PNGs of the best, median and worst case by gland DSC into ``OUT/figures/``). Prints the summary to ``stream``
    (default stdout) and a progress line per case to stderr. ``evaluator`` reuses a loaded :class:`Evaluator`."""
    stream = sys.stdout if stream is None else stream
    output_dir = pathlib.Path(output_dir)
    if evaluator is None:
        evaluator = Evaluator.from_model_dir(model_dir)
    info, config = evaluator.info, evaluator.preprocess_config
    method = method or method_name(info)
    if method == COARSE:
        raise InputError("--method", f"'{COARSE}' is reserved for the pre-alignment rows")
    data_dir, pairs, chosen_fold = resolve_cases(info, data_dir, cases_csv, split, fold)
    cache = CaseCache(cache_dir or output_dir / ".cache", config.to_dict())

    rows = []
    for i, pair in enumerate(pairs, 1):
        started = time.perf_counter()
        pre = _preprocessed(pair, config, cache)
        ddf, warped = evaluator(pre)
        coarse_row, model_row = _case_rows(pair, pre, ddf, warped, method, chosen_fold)
        rows += [coarse_row, model_row]
        if progress:
            print(f"[{i}/{len(pairs)}] {pair.name}: DSC {_fmt_metric(coarse_row['dsc'], 100)} -> "
                  f"{_fmt_metric(model_row['dsc'], 100)} %, TRE {_fmt_metric(coarse_row['tre_mm'])} -> "
                  f"{_fmt_metric(model_row['tre_mm'])} mm (world {_fmt_metric(coarse_row['tre_world_mm'])} -> "
                  f"{_fmt_metric(model_row['tre_world_mm'])} mm), {time.perf_counter() - started:.1f} s",
                  file=sys.stderr, flush=True)
    per_case = pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
    per_case["fold"] = per_case["fold"].astype("Int64")
    summary = summary_table(per_case)

    where = f"fold {chosen_fold}" if chosen_fold is not None else f"cases from {cases_csv or 'the training case list'}"
    text = (f"# {method}: {len(pairs)} case(s), {where}\n\n"
            f"model: {pathlib.Path(model_dir)}  \ndata: {data_dir}  \nworking grid: "
            f"{'x'.join(map(str, config.shape))} voxels at {config.spacing_mm:g} mm\n\n"
            f"{report.to_markdown(summary)}\n\n{TABLE_NOTE}\n")

    written = []
    with lio.atomic_dir(output_dir) as staging:
        if figures:
            written = _write_figures(evaluator, per_case, method, {p.name: p for p in pairs}, config, cache,
                                     staging / "figures")
        per_case.to_csv(staging / "per_case.csv", index=False)
        (staging / "summary.md").write_text(text, encoding="utf-8")
    written = [output_dir / "figures" / path.name for path in written]
    print(text, file=stream, end="")
    return EvaluationResult(per_case, summary, text, method, chosen_fold, output_dir, written)


def _pick_cases(per_case, method):
    """(label, case) for the best, median and worst case by the model's gland DSC (each case once)."""
    scored = per_case[per_case["method"] == method][["case", "dsc"]].dropna().sort_values(["dsc", "case"])
    cases = scored["case"].tolist()
    if not cases:
        return []
    picks = [("best", cases[-1]), ("median", cases[(len(cases) - 1) // 2]), ("worst", cases[0])]
    out, seen = [], set()
    for label, case in picks:
        if case not in seen:
            seen.add(case)
            out.append((label, case))
    return out


def _write_figures(evaluator, per_case, method, pairs, config, cache, folder):
    from label_reg import figures

    written = []
    for label, case in _pick_cases(per_case, method):
        pre = _preprocessed(pairs[case], config, cache)
        ddf, warped = evaluator(pre)
        title = f"{case} ({label} by DSC)"
        written.append(figures.registration_figure(
            folder / f"{label}_{case}_slices.png", pre.fixed_image, pre.fixed_label,
            [("Pre-aligned", pre.moving_label), (method, warped)], spacing=pre.grid.spacing, title=title))
        written.append(figures.jacobian_figure(folder / f"{label}_{case}_jacobian.png", [(method, ddf)],
                                               reference_mask=pre.fixed_label, title=title))
    return written
