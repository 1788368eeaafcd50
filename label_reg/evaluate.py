"""Score a trained model on a dataset: per-case metrics, a summary table in the paper's format, world-space TRE.

For every case the pair is pre-processed exactly as in training (:mod:`label_reg.preprocess`, cached on disk), the
network predicts the DDF on the crop grid, every label channel of the pre-aligned MR is warped with it (trilinear,
zero boundary; masks are binarised at 0.5 by :mod:`label_reg.metrics`) and :func:`label_reg.metrics.case_metrics`
scores it against the TRUS labels at the working resolution in the fixed (TRUS) crop space. A ``Coarse`` row scores
the pre-alignment alone (no DDF, so the DDF metrics are NaN).

Pre-alignment rows (each pair pre-processed once per anchor, each version cached under its own key):

* ``Coarse``: the paper's, MR gland centre of mass on the TRUS volume centre (always).
* ``Coarse (found gland)``: on the TRUS gland centre a segmenter FINDS in the TRUS image
  (:meth:`label_reg.segmenter.GlandFinder.find`, as ``register`` does; the TRUS volume centre, with a warning, when it
  finds nothing); cached under the segmenter's weights, as :func:`label_reg.cases.load_cases` does.
* ``Coarse (true gland)``: on the centre of mass of the TRUS gland mask: the ceiling of the found-gland
  pre-alignment, only possible where the TRUS mask is known.

The last two (and the segmenter columns) appear when a segmenter is at hand: the one a ``prealign == "trus_gland"``
model directory carries, or ``segmenter_dir`` for a paper-pipeline model. The model row is scored on the model's own
pre-alignment: the found gland centre for a ``trus_gland`` model (named e.g. ``MIX+ (found gland)``), the TRUS volume
centre for a ``trus_centre`` one (``MIX+``). ``true_gland_model_row`` adds the network on the true gland centre
(``MIX+ (true gland)``), the ceiling of the found-gland pipeline. On the ``Coarse (found gland)`` row, and on the model
row of a ``trus_gland`` model, ``segmenter_dsc`` is the Dice of the found gland (largest component of p >= 0.5)
against the TRUS gland mask on the segmenter grid and ``segmenter_centre_error_mm`` the distance between their
centres of mass (the true one from the original TRUS label file), :func:`label_reg.segmenter.gland_error`; NaN on the
other rows.

``tre_world_mm`` is the landmark TRE measured in the ORIGINAL image spaces, independent of the crop grid's
resolution: the centroid (world mm) of each TRUS landmark in the original TRUS label file is mapped through the total
transform of :mod:`label_reg.transform` (pre-alignment translation plus the DDF, or the translation alone for
``Coarse``) into MR world space and compared with the centroid (world mm) of the paired landmark in the original MR
label file; the per-patient value is the mean over landmarks whose two centroids exist. Each row uses its own
translation and crop grid.

For a model with the global affine stage (``build.global_affine``) its rows also say what the affine alone did
(:func:`affine_columns`, in world mm on the crop grid, the pre-alignment translation left out):
``affine_rotation_deg`` (angle of the rotation of its polar decomposition), ``affine_shift_mm`` (how far it moves the
crop centre), ``affine_scale_min`` / ``affine_scale_max`` (its smallest and largest singular values), and the summary
gives their median and range; NaN on the other rows.

With ``recentre_passes`` N > 0 (a ``trus_gland`` model) the model row is the registration after N re-centring passes
(:mod:`label_reg.recentre`, as ``register --recentre_passes`` runs it), named e.g. ``MIX+ recentred (found gland)``,
with ``recentre_shift_mm`` (how far the passes moved the anchor from the found centre) and
``recentre_centre_error_mm`` (how far the last anchor is from the TRUS mask's gland centre; the found centre's is
``segmenter_centre_error_mm``), and a line under the table with their medians; NaN on the other rows.

TensorFlow is imported only when a model is evaluated, so the table helpers here are cheap to import.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import pathlib
import shutil
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
from label_reg.recentre import check_passes, recentre

__all__ = [
    "COARSE", "COARSE_FOUND", "COARSE_TRUE", "PREALIGNMENT_ROWS", "FOUND_SUFFIX", "TRUE_SUFFIX", "METRIC_COLUMNS",
    "SEGMENTER_COLUMNS", "AFFINE_COLUMNS", "RECENTRE_COLUMNS", "RESULT_COLUMNS", "RECENTRED_SUFFIX", "affine_columns",
    "affine_note", "method_name", "resolve_cases", "Evaluator", "landmark_centroids_world", "world_tre_mm",
    "summary_table", "summary_markdown", "segmenter_table", "read_per_case", "evaluate", "EvaluationResult",
]

COARSE = "Coarse"
FOUND_SUFFIX = " (found gland)"
TRUE_SUFFIX = " (true gland)"
COARSE_FOUND = COARSE + FOUND_SUFFIX
COARSE_TRUE = COARSE + TRUE_SUFFIX
PREALIGNMENT_ROWS = (COARSE, COARSE_FOUND, COARSE_TRUE)
METRIC_COLUMNS = ("dsc", "dsc_base", "dsc_mid", "dsc_apex", "tre_mm", "tre_world_mm", "hd95_mm",
                  "jacobian_gradient", "folding_fraction", "landmarks_missing")
SEGMENTER_COLUMNS = ("segmenter_dsc", "segmenter_centre_error_mm")
AFFINE_COLUMNS = ("affine_rotation_deg", "affine_shift_mm", "affine_scale_min", "affine_scale_max")
RECENTRE_COLUMNS = ("recentre_shift_mm", "recentre_centre_error_mm")
RESULT_COLUMNS = ("case", "method", "fold") + METRIC_COLUMNS + SEGMENTER_COLUMNS + AFFINE_COLUMNS + RECENTRE_COLUMNS
WORLD_TRE_HEADER = "TRE world mm"


# ------------------------------------------------------------------------------------------- naming
LANDMARK_SUFFIX = " landmarks"
AFFINE_SUFFIX = " affine"
SUPERVISED_AFFINE_SUFFIX = " supervised affine"  # the stage also trained alone (training.affine_label_weight > 0)
RECENTRED_SUFFIX = " recentred"  # the model row of a found-gland model scored after re-centring passes


def method_name(info) -> str:
    """The paper's name of a trained model from its loss weights and build: alpha>0, beta=0 -> mDSC;
    alpha=0, beta>0 -> SDM; both > 0 -> MIX, or MIX+ when the network takes the MR mask as a third input.
    Anything else (e.g. bending energy alone) gets a descriptive name. A model pre-aligned on the found TRUS gland
    (``preprocess.prealign == "trus_gland"``) gets " (found gland)" appended (``MIX+ (found gland)``), so it is told
    apart from the paper pipeline's ``MIX+`` in ``compare``; one trained with landmark supervision
    (``training.landmark_weight`` or ``training.landmark_centroid_weight`` > 0) gets " landmarks" after the loss
    name (``MIX+ landmarks (found gland)``), and one with the global affine stage (``build.global_affine``)
    " affine" (``MIX+ affine landmarks``), or " supervised affine" when the stage was also trained alone
    (``training.affine_label_weight > 0``)."""
    name = _loss_name(info)
    training = info.get("training") or {}
    if bool((info.get("build") or {}).get("global_affine", False)):
        supervised = float(training.get("affine_label_weight", 0) or 0) > 0
        name += SUPERVISED_AFFINE_SUFFIX if supervised else AFFINE_SUFFIX
    if any(float(training.get(key, 0) or 0) > 0 for key in ("landmark_weight", "landmark_centroid_weight")):
        name += LANDMARK_SUFFIX
    prealign = (info.get("preprocess") or {}).get("prealign", "trus_centre")
    return name + FOUND_SUFFIX if prealign == "trus_gland" else name


def _loss_name(info) -> str:
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
        return self.run(pre)[:2]

    def run(self, pre: Preprocessed):
        """(ddf, warped moving labels, affine): :meth:`__call__` plus the global affine stage alone, (3, 4) crop
        voxels (:meth:`label_reg.predictor.Predictor.predict_stages`), or None for a network without it."""
        ddf, affine = self.predictor.predict_stages(pre)
        return ddf, self.predictor.warp(pre.moving_label, ddf, "zero"), affine


def _preprocessed(pair, config, cache, fixed_centre_mm=None):
    if getattr(pair, "fixed_label", None) is None:
        raise InputError(pair.fixed_image, "no fixed (TRUS) labels to evaluate against")
    arrays = cache.get_or_compute(pair, lambda p: preprocess_pair(p, config, fixed_centre_mm).to_arrays())
    pre = Preprocessed.from_arrays(arrays, source=f"pre-processed case {pair.name}")
    if pre.fixed_label is None:
        raise InputError(pair.fixed_image, "no fixed (TRUS) labels to evaluate against")
    if pre.fixed_label.shape[-1] != pre.moving_label.shape[-1]:
        raise InputError(pair.fixed_label, f"holds {pre.fixed_label.shape[-1]} label channel(s) but "
                                           f"{pair.moving_label} holds {pre.moving_label.shape[-1]}; landmarks "
                                           "must be paired")
    return pre


class _Cases:
    """The versions of a pair the rows are scored on, each pre-processed with the model's working grid and cached
    under its own key: ``centre`` (the paper's TRUS volume centre; config with ``prealign`` trus_centre), ``true``
    (the TRUS mask's gland centre; trus_gland without a given centre) and, with a ``finder``, ``found`` (the centre
    the segmenter finds; trus_gland keyed also by the segmenter's weights, the key
    :func:`label_reg.cases.load_cases` uses, so a training run's cached validation cases are reused)."""

    def __init__(self, config, cache_dir, finder=None):
        from label_reg.cache import file_sha256
        from label_reg.model_dir import WEIGHTS_FILE

        self.finder = finder
        self.configs = {"centre": dataclasses.replace(config, prealign="trus_centre"),
                        "true": dataclasses.replace(config, prealign="trus_gland")}
        self.caches = {name: CaseCache(cache_dir, c.to_dict()) for name, c in self.configs.items()}
        if finder is not None:
            self.configs["found"] = self.configs["true"]
            settings = self.configs["found"].to_dict()
            settings["fixed_centre_from"] = file_sha256(pathlib.Path(finder.model_dir) / WEIGHTS_FILE)
            self.caches["found"] = CaseCache(cache_dir, settings)

    def centre(self, pair):
        return _preprocessed(pair, self.configs["centre"], self.caches["centre"])

    def true(self, pair):
        return _preprocessed(pair, self.configs["true"], self.caches["true"])

    def found(self, pair):
        """(pre-processed on the found centre, {segmenter column: value}) for one pair."""
        from label_reg.preprocess import gland_centre_of_mass, resample_labels
        from label_reg.segmenter import gland_error

        if getattr(pair, "fixed_label", None) is None:
            raise InputError(pair.fixed_image, "no fixed (TRUS) labels to evaluate against")
        image = lio.read_image(pair.fixed_image)
        estimate = self.finder.find(image, str(pair.fixed_image))
        if estimate.found:
            centre = estimate.centre_mm
        else:
            print(f"warning: {pair.fixed_image}: the segmenter found no gland; pre-aligning on the TRUS volume centre",
                  file=sys.stderr)
            centre = lio.Geometry.from_image(image).center_world
        labels = lio.read_label(pair.fixed_label, reference=image, reference_name=str(pair.fixed_image))
        dsc, error = gland_error(estimate, resample_labels(labels[:1], estimate.grid)[..., 0],
                                 gland_centre_of_mass(labels[0], str(pair.fixed_label)))
        pre = _preprocessed(pair, self.configs["found"], self.caches["found"], centre)
        if not np.allclose(pre.grid.center_world, centre, rtol=0.0, atol=1e-6):
            # Same weights, another centre (e.g. the segmenter's grid settings changed): never use the stale entry.
            pre = Preprocessed.from_arrays(preprocess_pair(pair, self.configs["found"], centre).to_arrays())
        return pre, {"segmenter_dsc": dsc, "segmenter_centre_error_mm": error}


def _score(pair, pre, labels, ddf, method, fold, centroids, extra=None):
    """One per-case row: the metrics of ``labels`` (the warped or pre-aligned MR labels on ``pre``'s crop grid)
    against the TRUS labels, and the world TRE through ``pre``'s own translation and crop grid (and ``ddf``)."""
    row = {"case": pair.name, "method": method, "fold": fold}
    row.update(metrics.case_metrics(pre.fixed_label, labels, ddf, pre.grid.spacing))
    row["tre_world_mm"] = world_tre_mm(*centroids, ddf, pre.grid, pre.translation_mm)[0]
    row.update(extra or {})
    return row


def affine_columns(affine, grid):
    """The per-case columns :data:`AFFINE_COLUMNS` of a global affine stage ``affine`` (3, 4), crop index x ->
    moving crop index ``affine[:, :3] x + affine[:, 3]``, on the crop ``grid``: in world mm without the
    pre-alignment translation (:func:`label_reg.transform.world_affine`, :func:`label_reg.transform.affine_summary`
    about the crop centre); {} for None."""
    if affine is None:
        return {}
    summary = transform.affine_summary(*transform.world_affine(affine, grid, np.zeros(3)), grid.center_world)
    return {"affine_rotation_deg": summary["rotation_deg"],
            "affine_shift_mm": float(np.linalg.norm(summary["translation_mm"])),
            "affine_scale_min": min(summary["scales"]), "affine_scale_max": max(summary["scales"])}


def affine_note(per_case, method):
    """One line on what the global affine stage did on ``method``'s rows (median and range of
    :data:`AFFINE_COLUMNS`), or None when those rows have no affine columns."""
    if not set(AFFINE_COLUMNS) <= set(per_case.columns):
        return None
    rows = per_case.loc[per_case["method"] == method, list(AFFINE_COLUMNS)].apply(pd.to_numeric, errors="coerce")
    rows = rows.dropna()
    if rows.empty:
        return None

    def spread(values, digits):
        return f"{values.median():.{digits}f} ({values.min():.{digits}f}–{values.max():.{digits}f})"

    return (f"Global affine stage of {method}, the affine alone over {len(rows)} case(s), median (range): rotation "
            f"{spread(rows['affine_rotation_deg'], 1)} degrees, shift of the crop centre "
            f"{spread(rows['affine_shift_mm'], 1)} mm, scales {rows['affine_scale_min'].min():.3f}–"
            f"{rows['affine_scale_max'].max():.3f}.")


def _centroids(pair):
    """World landmark centroids (TRUS, MR) of a pair's original label files."""
    return (landmark_centroids_world(lio.read_label(pair.fixed_label)),
            landmark_centroids_world(lio.read_label(pair.moving_label)))


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


def segmenter_table(per_case):
    """The TRUS gland segmenter's scores, one row, or None when ``per_case`` holds none: cases, gland DSC % and
    centre-of-mass error in mm (mean (median) ± SD), and how many cases it found no gland in. Taken from the
    ``Coarse (found gland)`` rows (one per case), else from any rows with a segmenter DSC, one per case."""
    if not set(SEGMENTER_COLUMNS) <= set(per_case.columns):
        return None
    scored = per_case[np.isfinite(pd.to_numeric(per_case["segmenter_dsc"], errors="coerce"))]
    if (scored["method"] == COARSE_FOUND).any():
        scored = scored[scored["method"] == COARSE_FOUND]
    scored = scored.drop_duplicates(subset="case")
    if scored.empty:
        return None
    error = pd.to_numeric(scored["segmenter_centre_error_mm"], errors="coerce")
    row = {"cases": len(scored),
           "gland DSC %": report.format_stat(pd.to_numeric(scored["segmenter_dsc"], errors="coerce"), 100.0, 1),
           "centre error mm": report.format_stat(error, 1.0, 1),
           "not found": int(error.isna().sum())}
    return pd.DataFrame([row], index=pd.Index(["TRUS gland segmenter"], name="network"))


TABLE_NOTE = ("mean (median) ± SD over cases. DSC in %; TRE mm: landmark centroids at the working resolution in the "
              "TRUS crop; TRE world mm: in the original image spaces through the total transform; HD95 of the gland; "
              "∇|J| ×10⁻² per voxel of the working grid; folding: voxels with det J ≤ 0.")
PREALIGNMENT_NOTE = ("Coarse: MR gland centre of mass on the TRUS volume centre (the paper); Coarse (found gland): on "
                     "the TRUS gland centre the segmenter finds in the TRUS image; Coarse (true gland): on the TRUS "
                     "mask's centre (needs the mask: the ceiling of the found-gland pre-alignment). A method named "
                     "\"… (found gland)\" is scored on the found centre, \"… (true gland)\" on the true one.")
SEGMENTER_NOTE = ("Segmenter: Dice of the found gland (largest component of p ≥ 0.5) with the TRUS gland mask on the "
                  "segmenter grid, and the distance between their centres of mass; a case with no gland found "
                  "scores Dice 0 and no centre error.")


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
    segmenter: pd.DataFrame | None = None


@contextlib.contextmanager
def _removed_on_error(folders):
    """Remove ``folders`` (those this run creates: the output folder, the cache) if the body raises."""
    try:
        yield
    except BaseException:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def _fmt_metric(value, scale=1.0, decimals=1):
    return "–" if value is None or not math.isfinite(value) else f"{value * scale:.{decimals}f}"


def _segmenter_source(model_dir, info, config, segmenter_dir):
    """The segmenter directory evaluation finds TRUS glands with: the one a ``trus_gland`` model carries (no other
    may be given), else ``segmenter_dir`` (None: no found-gland rows). InputError when it is missing or not a
    segmenter."""
    from label_reg import model_dir as md

    carried = md.segmenter_path(model_dir, info)
    if config.prealign == "trus_gland":
        if segmenter_dir:
            raise InputError("--segmenter_dir", f"{model_dir} pre-aligns on the TRUS gland with the segmenter it "
                                                "carries; evaluating it with another would not score this model")
        if carried is None:
            raise InputError(pathlib.Path(model_dir) / md.INFO_FILE, "pre-aligns on the TRUS gland (prealign "
                                                                     "trus_gland) but names no segmenter")
        source = carried
    elif segmenter_dir:
        source = pathlib.Path(segmenter_dir)
    else:
        return None
    if md.read_info(source)[0].get("network") != md.SEGMENTER:
        raise InputError(source, "is not a TRUS gland segmenter model directory")
    return source


def evaluate(model_dir, output_dir, data_dir=None, cases_csv=None, split="val", fold=None, method=None,
             cache_dir=None, figures=False, progress=True, evaluator=None, stream=None, segmenter_dir=None,
             true_gland_model_row=False, finder=None, recentre_passes=0) -> EvaluationResult:
    """Evaluate a model directory and write ``OUT/per_case.csv`` and ``OUT/summary.md`` (and, with ``figures``,
    PNGs of the best, median and worst case by gland DSC into ``OUT/figures/``). Prints the summary to ``stream``
    (default stdout) and a progress line per case to stderr. ``evaluator`` reuses a loaded :class:`Evaluator`.

    Rows (module docstring): ``Coarse``; with a segmenter (carried by a ``trus_gland`` model, or ``segmenter_dir``
    for a ``trus_centre`` one) ``Coarse (found gland)`` and ``Coarse (true gland)`` and the segmenter columns; the
    model row on the model's own pre-alignment, named ``method`` (default :func:`method_name`; on a ``trus_gland``
    model a given name gets " (found gland)" appended, as the default has it); with ``true_gland_model_row`` the
    network on the true gland centre too (``<name> (true gland)``; ``Coarse (true gland)`` is then always present).
    ``finder`` reuses a loaded :class:`label_reg.segmenter.GlandFinder` of that segmenter.
    ``recentre_passes`` N > 0 (found-gland models only): the model row is the registration after N re-centring
    passes (:mod:`label_reg.recentre`), as ``label-reg register --recentre_passes=N`` does it; its default name gets
    " recentred" before " (found gland)"; its ``recentre_shift_mm`` column says how far the anchor moved from the
    found centre and ``recentre_centre_error_mm`` how far the last anchor is from the TRUS mask's gland centre (NaN
    on the other rows). The true-gland row is never re-centred.

    The output folder is checked writable before the model loads; every case's inputs are read and checked before
    any case is scored; a run that fails leaves no output folder or cache it created behind."""
    output_dir = lio.check_output_folder(output_dir)  # writable, before the model loads
    cache_root = pathlib.Path(cache_dir) if cache_dir else output_dir / ".cache"
    created = [folder for folder in (output_dir, cache_root) if not folder.exists()]
    with _removed_on_error(created):
        return _evaluate(model_dir, output_dir, data_dir, cases_csv, split, fold, method, cache_dir, figures, progress,
                         evaluator, stream, segmenter_dir, true_gland_model_row, finder, recentre_passes)


def _evaluate(model_dir, output_dir, data_dir, cases_csv, split, fold, method, cache_dir, figures, progress,
              evaluator, stream, segmenter_dir, true_gland_model_row, finder, recentre_passes):
    """:func:`evaluate` once the output folder is checked."""
    stream = sys.stdout if stream is None else stream
    if evaluator is None:
        evaluator = Evaluator.from_model_dir(model_dir)
    info, config = evaluator.info, evaluator.preprocess_config
    gland = config.prealign == "trus_gland"
    recentre_passes = check_passes(recentre_passes, config.prealign, model_dir)
    if method and gland:
        if method.endswith(TRUE_SUFFIX):
            raise InputError("--method", f"'{method}': this model's row is scored on the found gland; name it "
                                         f"without '{TRUE_SUFFIX}' (the true-gland row gets that suffix)")
        if not method.endswith(FOUND_SUFFIX):
            method += FOUND_SUFFIX  # told apart from its true-gland row, as the default name is
    method = method or _recentred_name(method_name(info), recentre_passes)
    if method in PREALIGNMENT_ROWS:
        raise InputError("--method", f"'{method}' is reserved for the pre-alignment rows")
    segmenter = _segmenter_source(model_dir, info, config, segmenter_dir)
    data_dir, pairs, chosen_fold = resolve_cases(info, data_dir, cases_csv, split, fold)
    if segmenter is not None and finder is None:
        from label_reg.segmenter import GlandFinder
        finder = GlandFinder.from_model_dir(segmenter)
    cases = _Cases(config, cache_dir or output_dir / ".cache", finder if segmenter is not None else None)
    base = method[:-len(FOUND_SUFFIX)] if method.endswith(FOUND_SUFFIX) else method
    true_method = base + TRUE_SUFFIX
    # Every case's inputs are read, checked and pre-processed (into the cache) before any is scored: a bad file
    # stops the run at once, not after the cases before it.
    for pair in pairs:
        cases.centre(pair)
    rows = []
    for i, pair in enumerate(pairs, 1):
        started = time.perf_counter()
        centroids = _centroids(pair)
        pre = cases.centre(pair)
        coarse_row = _score(pair, pre, pre.moving_label, None, COARSE, chosen_fold, centroids)
        rows.append(coarse_row)
        found_scores = {}
        if segmenter is not None:
            found, found_scores = cases.found(pair)
            rows.append(_score(pair, found, found.moving_label, None, COARSE_FOUND, chosen_fold, centroids,
                               found_scores))
            if gland:
                pre, coarse_row = found, rows[-1]
        if segmenter is not None or true_gland_model_row:
            true = cases.true(pair)
            rows.append(_score(pair, true, true.moving_label, None, COARSE_TRUE, chosen_fold, centroids))
        recentred = {}
        if recentre_passes:  # a trus_gland model: its segmenter gave `true`, the pair on the TRUS mask's centre
            passes = _recentred(evaluator, pair, config, pre, recentre_passes)
            pre, ddf, affine = passes.pre, passes.ddf, passes.affine
            warped = evaluator.predictor.warp(pre.moving_label, ddf, "zero")
            recentred = {"recentre_shift_mm": passes.shift_mm, "recentre_centre_error_mm": float(
                np.linalg.norm(passes.anchors_mm[-1] - true.grid.center_world))}
        else:
            ddf, warped, affine = evaluator.run(pre)
        model_row = _score(pair, pre, warped, ddf, method, chosen_fold, centroids,
                           {**(found_scores if gland else {}), **affine_columns(affine, pre.grid), **recentred})
        rows.append(model_row)
        if true_gland_model_row:
            true_ddf, true_warped, true_affine = evaluator.run(true)
            rows.append(_score(pair, true, true_warped, true_ddf, true_method, chosen_fold, centroids,
                               affine_columns(true_affine, true.grid)))
        if progress:
            found_text = ("" if not found_scores else
                          f", segmenter DSC {_fmt_metric(found_scores['segmenter_dsc'], 100)} %, centre error "
                          f"{_fmt_metric(found_scores['segmenter_centre_error_mm'])} mm")
            print(f"[{i}/{len(pairs)}] {pair.name}: DSC {_fmt_metric(coarse_row['dsc'], 100)} -> "
                  f"{_fmt_metric(model_row['dsc'], 100)} %, TRE {_fmt_metric(coarse_row['tre_mm'])} -> "
                  f"{_fmt_metric(model_row['tre_mm'])} mm (world {_fmt_metric(coarse_row['tre_world_mm'])} -> "
                  f"{_fmt_metric(model_row['tre_world_mm'])} mm){found_text}, {time.perf_counter() - started:.1f} s",
                  file=sys.stderr, flush=True)
    per_case = pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
    per_case["fold"] = per_case["fold"].astype("Int64")
    summary = summary_table(per_case)
    segmenter_summary = segmenter_table(per_case)

    where = f"fold {chosen_fold}" if chosen_fold is not None else f"cases from {cases_csv or 'the training case list'}"
    anchor = (f"the TRUS gland centre found by the segmenter in {segmenter}" if gland else
              "the TRUS volume centre (the paper)")
    parts = [f"# {method}: {len(pairs)} case(s), {where}\n\n"
             f"model: {pathlib.Path(model_dir)}  \ndata: {data_dir}  \nworking grid: "
             f"{'x'.join(map(str, config.shape))} voxels at {config.spacing_mm:g} mm  \n"
             f"pre-alignment of the model: {anchor}\n\n"
             f"{report.to_markdown(summary)}\n\n{TABLE_NOTE}"]
    if len(set(per_case["method"]) & set(PREALIGNMENT_ROWS)) > 1:
        parts.append(PREALIGNMENT_NOTE)
    for name in (method, true_method):
        note = affine_note(per_case, name)
        if note is not None:
            parts.append(note)
    if recentre_passes:
        parts.append(recentre_note(per_case, method, recentre_passes))
    if segmenter_summary is not None:
        parts.append(f"## TRUS gland segmenter ({segmenter})\n\n{report.to_markdown(segmenter_summary)}\n\n"
                     f"{SEGMENTER_NOTE}")
    text = "\n\n".join(parts) + "\n"

    def model_case(pair):
        if not gland:
            return cases.centre(pair)
        found = cases.found(pair)[0]
        return _recentred(evaluator, pair, config, found, recentre_passes).pre if recentre_passes else found

    written = []
    replaced = lio.existing_files(output_dir, ("per_case.csv", "summary.md"))
    with lio.atomic_dir(output_dir) as staging:
        if figures:
            written = _write_figures(evaluator, per_case, method, {p.name: p for p in pairs}, model_case,
                                     staging / "figures")
        lio.write_text(staging / "per_case.csv", per_case.to_csv(index=False))
        lio.write_text(staging / "summary.md", text)
    written = [output_dir / "figures" / path.name for path in written]
    if replaced:
        print(f"replaced {', '.join(replaced)} of an earlier run in {output_dir}", file=sys.stderr)
    print(text, file=stream, end="")
    return EvaluationResult(per_case, summary, text, method, chosen_fold, output_dir, written, segmenter_summary)


def _recentred_name(name, passes):
    """``name`` with " recentred" before its " (found gland)" when ``passes`` > 0."""
    if not passes:
        return name
    base = name[:-len(FOUND_SUFFIX)] if name.endswith(FOUND_SUFFIX) else name
    return base + RECENTRED_SUFFIX + FOUND_SUFFIX


def _recentred(evaluator, pair, config, found, passes):
    """The :class:`label_reg.recentre.Recentred` of ``pair`` registered from its found-gland version ``found`` with
    ``passes`` re-centring passes (:func:`label_reg.recentre.recentre`; each pass pre-processes the pair again on the
    new anchor, not cached: the anchors are the network's own). A pass whose warped gland left the crop ends the
    passes, with a warning."""
    result = recentre(evaluator.predictor, found, lambda anchor: preprocess_pair(pair, config, anchor), passes)
    if result.stopped:
        print(f"warning: {pair.fixed_image}: {result.stopped}", file=sys.stderr)
    return result


def recentre_note(per_case, method, passes):
    """One line on how far the re-centring passes moved ``method``'s anchor and how far it ended from the TRUS gland
    mask's centre, against the found centre's distance (medians and ranges over its cases)."""
    rows = per_case.loc[per_case["method"] == method]

    def spread(column):
        values = pd.to_numeric(rows[column], errors="coerce").dropna()
        return f"{values.median():.1f} mm ({values.min():.1f}–{values.max():.1f})" if len(values) else "–"

    return (f"{method}: registered after {passes} re-centring pass(es) on the centre of the warped MR gland. "
            f"Median (range) over {len(rows)} case(s): the anchor moved {spread('recentre_shift_mm')} from the found "
            f"gland centre and ended {spread('recentre_centre_error_mm')} from the TRUS mask's centre, where the "
            f"found centre was {spread('segmenter_centre_error_mm')}.")


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


def _write_figures(evaluator, per_case, method, pairs, model_case, folder):
    """``model_case(pair)``: the pair pre-processed as the model row was scored."""
    from label_reg import figures

    written = []
    for label, case in _pick_cases(per_case, method):
        pre = model_case(pairs[case])
        ddf, warped = evaluator(pre)
        title = f"{case} ({label} by DSC)"
        written.append(figures.registration_figure(
            folder / f"{label}_{case}_slices.png", pre.fixed_image, pre.fixed_label,
            [("Pre-aligned", pre.moving_label), (method, warped)], spacing=pre.grid.spacing, title=title))
        written.append(figures.jacobian_figure(folder / f"{label}_{case}_jacobian.png", [(method, ddf)],
                                               reference_mask=pre.fixed_label, title=title))
    return written
