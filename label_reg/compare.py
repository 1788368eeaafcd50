"""Cross-validation tables: our per-case results beside the paper's Table 1, paired tests, legacy NiftyNet outputs.

* :func:`load_results` concatenates per-case CSVs written by ``label-reg evaluate`` (one per fold and method). The
  pre-alignment rows of a case (``Coarse``, ``Coarse (found gland)``, ``Coarse (true gland)``) are the same whichever
  model was evaluated, so only the first is kept; ``Coarse (found gland)`` depends on the segmenter, so its copies
  must agree (else an error naming both files: they were found by different segmenters). Any other repeated
  (method, case) is an error naming both files.
* :func:`score_niftynet` scores a folder of legacy NiftyNet / label-reg outputs, ``<subject>_niftynet_out.nii.gz``:
  the moving (MR) labels resampled into the fixed (TRUS) space on the TRUS image grid, 3-D (gland only) or 4-D
  (gland and landmarks, channels last, as the fixed labels). They are scored against ``DATA/fixed_labels/<subject>``
  with :func:`label_reg.metrics.case_metrics` on the TRUS grid (soft values are binarised at 0.5). There is no DDF,
  so ∇|J| and folding are NaN; the TRE is measured on the TRUS grid, i.e. in TRUS world space, so it also fills
  ``tre_world_mm``.
* :func:`select_methods` keeps the methods asked for (``--methods``) and the pre-alignment rows.
* :func:`compare` puts it together: our summary (mean (median) ± SD), :func:`label_reg.report.side_by_side` with
  the paper's Table 1 and Hu et al. 2018, the TRUS gland segmenter's scores when the CSVs hold them, what a global
  affine stage did (:func:`label_reg.evaluate.affine_note`, for methods whose rows carry the affine columns), and paired
  Wilcoxon signed-rank p-values between every two of our methods (legacy row included; e.g. ``MIX+ (found gland)``
  against the paper pipeline's ``MIX+``) and between the pre-alignments, on the cases they share.

No TensorFlow here.
"""
from __future__ import annotations

import dataclasses
import itertools
import pathlib

import numpy as np
import pandas as pd
import SimpleITK as sitk

from label_reg import io as lio
from label_reg import metrics, report
from label_reg.errors import InputError
from label_reg.evaluate import (COARSE, COARSE_FOUND, COARSE_TRUE, FOUND_SUFFIX, METRIC_COLUMNS, PREALIGNMENT_NOTE,
                                PREALIGNMENT_ROWS, RESULT_COLUMNS, SEGMENTER_COLUMNS, SEGMENTER_NOTE, TABLE_NOTE,
                                TRUE_SUFFIX, affine_note, read_per_case, segmenter_table, summary_table)

__all__ = ["LEGACY_METHOD", "LEGACY_SUFFIX", "load_results", "legacy_outputs", "read_legacy_labels",
           "score_niftynet", "method_pairs", "select_methods", "compare", "Comparison"]

LEGACY_METHOD = "NiftyNet (legacy)"
LEGACY_SUFFIX = "_niftynet_out.nii.gz"
WILCOXON_METRICS = ("dsc", "tre_mm", "tre_world_mm")


# ------------------------------------------------------------------------------------------- our results
AGREE_ATOL = 1e-3  # two copies of a case's Coarse (found gland) row agree to this (DSC fraction, mm, voxels)


def load_results(paths) -> pd.DataFrame:
    """Concatenate per-case CSVs; pre-alignment rows deduplicated by case (first kept; the copies of a
    ``Coarse (found gland)`` row must agree); a ``source`` column names the file."""
    paths = [pathlib.Path(p) for p in paths]
    if not paths:
        raise InputError("--results", "no per-case CSV given")
    frames, seen = [], {}
    for path in paths:
        df = read_per_case(path)
        df["source"] = str(path)
        keep = []
        for i, (case, method) in enumerate(zip(df["case"], df["method"])):
            key = (method, case)
            if key in seen:
                if method in PREALIGNMENT_ROWS:
                    if method == COARSE_FOUND:
                        _check_agreement(seen[key], path, df.iloc[i], method, case)
                    keep.append(False)
                    continue
                raise InputError(path, f"method '{method}' case '{case}' is already in {seen[key][0]}; each method "
                                       "may score a case once (give each run its own --method name)")
            seen[key] = (path, df.iloc[i])
            keep.append(True)
        frames.append(df[np.asarray(keep, dtype=bool)])
    out = pd.concat(frames, ignore_index=True)
    columns = [c for c in RESULT_COLUMNS if c in out.columns] + [c for c in out.columns if c not in RESULT_COLUMNS]
    return out[columns]


def _check_agreement(first, path, row, method, case):
    """InputError when a repeated pre-alignment row differs from its first copy ``first`` = (path, row)."""
    first_path, first_row = first
    columns = [c for c in METRIC_COLUMNS + SEGMENTER_COLUMNS if c in row.index and c in first_row.index]
    a = pd.to_numeric(first_row[columns], errors="coerce").to_numpy(np.float64)
    b = pd.to_numeric(row[columns], errors="coerce").to_numpy(np.float64)
    if not np.allclose(a, b, rtol=0.0, atol=AGREE_ATOL, equal_nan=True):
        differ = [c for c, x, y in zip(columns, a, b)
                  if not np.isclose(x, y, rtol=0.0, atol=AGREE_ATOL, equal_nan=True)]
        raise InputError(path, f"'{method}' of case '{case}' differs from {first_path} ({', '.join(differ)}): the "
                               "two evaluations found the TRUS gland with different segmenters or grids; compare "
                               "runs of one segmenter")


# ------------------------------------------------------------------------------------------- legacy NiftyNet
def legacy_outputs(niftynet_dir) -> dict:
    """{subject: path} of the ``<subject>_niftynet_out.nii.gz`` files in a folder."""
    folder = pathlib.Path(niftynet_dir)
    if not folder.is_dir():
        raise InputError(folder, "NiftyNet output folder not found")
    found = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.name.endswith(LEGACY_SUFFIX):
            subject = path.name[:-len(LEGACY_SUFFIX)]
            if subject:
                found[subject] = path
    return found


def read_legacy_labels(path):
    """A legacy output as (labels (X, Y, Z, K) float32, Geometry): 3-D file -> K = 1; 4-D file (channels on the
    4th axis) or a 3-D vector image -> K channels. Values are kept as they are (soft masks allowed)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise InputError(path, "legacy NiftyNet output not found")
    p, img = lio._read_any(path)  # existence, empty/truncated/corrupt files and NaN voxels, all one-line errors
    dim, ncomp = img.GetDimension(), img.GetNumberOfComponentsPerPixel()
    if dim == 3 and ncomp == 1:
        arr = sitk.GetArrayFromImage(img)[None]                     # (1, Z, Y, X)
    elif dim == 3:
        arr = np.moveaxis(sitk.GetArrayFromImage(img), -1, 0)       # (K, Z, Y, X)
    elif dim == 4 and ncomp == 1:
        d4 = np.reshape(img.GetDirection(), (4, 4))
        if np.abs(d4[3, :3]).max() > 1e-6 or np.abs(d4[:3, 3]).max() > 1e-6:
            raise InputError(p, "4-D direction mixes the channel axis with space")
        arr = sitk.GetArrayFromImage(img)                           # (K, Z, Y, X)
    else:
        raise InputError(p, f"is {dim}-D with {ncomp} component(s); expected a 3-D mask or a 4-D stack of masks")
    arr = np.asarray(arr, dtype=np.float32)
    if not np.all(np.isfinite(arr)):
        raise InputError(p, "contains NaN/Inf voxels")
    return np.ascontiguousarray(np.transpose(arr, (3, 2, 1, 0))), lio.Geometry.from_image(img)


def _fixed_label_path(data_dir, subject):
    folder = pathlib.Path(data_dir) / "fixed_labels"
    for ext in (".nii.gz", ".nii"):
        path = folder / f"{subject}{ext}"
        if path.is_file():
            return path
    return None


def score_niftynet(niftynet_dir, data_dir, cases=None, method=LEGACY_METHOD) -> pd.DataFrame:
    """Per-case metrics of legacy outputs against ``DATA/fixed_labels``, one row per scored subject.

    ``cases``: the subjects to score (normally the cases of our results, so the comparison is paired); each must
    have an output file, else InputError naming the missing file. None scores every output in the folder. Every
    output must have a fixed label in DATA and lie on its grid, else InputError naming the output.
    """
    data_dir = pathlib.Path(data_dir)
    if not (data_dir / "fixed_labels").is_dir():
        raise InputError(data_dir / "fixed_labels", "folder not found (the legacy outputs are scored against it)")
    outputs = legacy_outputs(niftynet_dir)
    for subject, path in outputs.items():
        if _fixed_label_path(data_dir, subject) is None:
            raise InputError(path, f"no fixed label for subject '{subject}' in {data_dir / 'fixed_labels'}")
    if cases is None:
        subjects = sorted(outputs)
        if not subjects:
            raise InputError(niftynet_dir, f"no *{LEGACY_SUFFIX} files")
    else:
        subjects = list(dict.fromkeys(str(c) for c in cases))
        for subject in subjects:
            if subject not in outputs:
                raise InputError(pathlib.Path(niftynet_dir) / f"{subject}{LEGACY_SUFFIX}",
                                 f"legacy NiftyNet output for case '{subject}' not found")
    rows = []
    for subject in subjects:
        path = outputs[subject]
        fixed_path = _fixed_label_path(data_dir, subject)
        if fixed_path is None:
            raise InputError(data_dir / "fixed_labels" / f"{subject}.nii.gz", "fixed label not found")
        fixed_channels = lio.read_label(fixed_path)
        fixed = lio.labels_to_array(fixed_channels)
        fixed_geo = lio.Geometry.from_image(fixed_channels[0])
        warped, geo = read_legacy_labels(path)
        if not geo.allclose(fixed_geo):
            raise InputError(path, f"not on the TRUS grid of {fixed_path}: {geo.describe_difference(fixed_geo)} "
                                   "(output vs fixed label)")
        k = warped.shape[-1]
        if k == 1:
            fixed = fixed[..., :1]  # gland only: TRE is NaN
        elif k != fixed.shape[-1]:
            raise InputError(path, f"holds {k} label channels but {fixed_path} holds {fixed.shape[-1]}")
        row = {"case": subject, "method": method, "fold": pd.NA}
        row.update(metrics.case_metrics(fixed, warped, None, fixed_geo.spacing))
        row["tre_world_mm"] = row["tre_mm"]
        row["source"] = str(path)
        rows.append(row)
    return pd.DataFrame(rows, columns=list(RESULT_COLUMNS) + ["source"])


# ------------------------------------------------------------------------------------------- tables
def method_pairs(per_case, min_shared=1):
    """(a, b) for every two pre-alignment rows (``Coarse (found gland)`` vs ``Coarse``, ``Coarse (true gland)`` vs
    both); then each network against the pre-alignment it starts from (``MIX+ (found gland)`` vs ``Coarse (found
    gland)``: what the network adds) and, if that is another one, against the paper's ``Coarse`` (what the whole
    pipeline adds); then every two other methods, ordered so that ``a`` comes later in the paper's order (MIX+ vs MIX,
    as in the paper's test; ``MIX+ (found gland)`` vs ``MIX+``); the legacy NiftyNet row is always ``b`` (ours vs
    legacy). Only pairs scoring at least ``min_shared`` common cases."""
    present = set(per_case["method"].unique())
    coarse = [m for m in PREALIGNMENT_ROWS if m in present]
    methods = sorted((m for m in present if m not in PREALIGNMENT_ROWS),
                     key=lambda m: (m != LEGACY_METHOD, report.method_sort_key(m)))
    cases = {m: set(per_case.loc[per_case["method"] == m, "case"]) for m in coarse + methods}
    own = [(m, c) for m in methods if m != LEGACY_METHOD
           for c in dict.fromkeys((_starts_from(m), COARSE)) if c in present]
    pairs = [(b, a) for a, b in itertools.combinations(coarse, 2)] + own
    pairs += [(b, a) for a, b in itertools.combinations(methods, 2)]
    return [(a, b) for a, b in pairs if len(cases[a] & cases[b]) >= min_shared]


def _starts_from(method):
    """The pre-alignment row a method's network starts from, by its name's suffix."""
    if method.endswith(FOUND_SUFFIX):
        return COARSE_FOUND
    if method.endswith(TRUE_SUFFIX):
        return COARSE_TRUE
    return COARSE


def _pvalue_table(pvalues):
    if pvalues.empty:
        return "(no two of our methods share cases: no paired test)"
    rows = []
    for _, r in pvalues.iterrows():
        scale = 100.0 if r["metric"] == "dsc" else 1.0
        unit = " %" if r["metric"] == "dsc" else " mm"
        diff = "–" if not np.isfinite(r["median_diff"]) else f"{scale * r['median_diff']:+.2f}{unit}"
        p = "–" if not np.isfinite(r["p_value"]) else f"{r['p_value']:.3g}"
        rows.append({"A": r["method_a"], "B": r["method_b"], "metric": r["metric"], "n": int(r["n"]),
                     "median A − B": diff, "p (Wilcoxon)": p})
    return report.to_markdown(pd.DataFrame(rows), index=False)


@dataclasses.dataclass
class Comparison:
    per_case: pd.DataFrame
    summary: pd.DataFrame
    pvalues: pd.DataFrame
    text: str
    segmenter: pd.DataFrame | None = None


def select_methods(per_case, methods) -> pd.DataFrame:
    """The rows of the named methods (exact names, as in the ``method`` column) and the pre-alignment rows, which
    every network is tested against. An unknown name is an error listing the methods the results hold."""
    present = set(per_case["method"])
    unknown = [m for m in methods if m not in present]
    if unknown:
        raise InputError("--methods", f"no method {', '.join(repr(m) for m in unknown)} in the results; they hold "
                                      + ", ".join(repr(m) for m in sorted(present, key=report.method_sort_key)))
    keep = set(methods) | set(PREALIGNMENT_ROWS)
    return per_case[per_case["method"].isin(keep)].reset_index(drop=True)


def compare(results, niftynet_dir=None, data_dir=None, paper=None, methods=None) -> Comparison:
    """Concatenate per-case CSVs (and legacy outputs), and build the markdown report (returned as ``.text``).
    ``methods`` (names) keeps only those methods and the pre-alignment rows (:func:`select_methods`); None keeps
    all."""
    per_case = load_results(results)
    if niftynet_dir:
        if not data_dir:
            raise InputError("--data_dir", "needed with --niftynet_dir (the fixed labels to score against)")
        cases = sorted(per_case["case"].unique())
        legacy = score_niftynet(niftynet_dir, data_dir, cases)
        per_case = pd.concat([per_case, legacy], ignore_index=True)
    elif data_dir:
        raise InputError("--data_dir", "only used with --niftynet_dir")
    if methods:
        per_case = select_methods(per_case, methods)
    summary = summary_table(per_case)
    pairs = method_pairs(per_case)
    metric_names = [m for m in WILCOXON_METRICS if m in per_case.columns]
    pvalues = report.wilcoxon_pvalues(per_case.drop(columns=["source"], errors="ignore"), pairs=pairs,
                                      metrics=metric_names)
    if not pvalues.empty:
        pvalues = pvalues[pvalues["n"] > 0].reset_index(drop=True)
    paper = report.paper_table1() if paper is None else paper

    folds = sorted({int(f) for f in pd.to_numeric(per_case.get("fold", pd.Series(dtype=float)),
                                                  errors="coerce").dropna()})
    counts = ", ".join(f"{m} {int((per_case['method'] == m).sum())}"
                       for m in sorted(per_case["method"].unique(), key=report.method_sort_key))
    notes = [TABLE_NOTE, ""]
    if len(set(per_case["method"]) & set(PREALIGNMENT_ROWS)) > 1:
        notes += [PREALIGNMENT_NOTE, ""]
    for method in sorted(per_case["method"].unique(), key=report.method_sort_key):
        note = affine_note(per_case, method)
        if note is not None:
            notes += [note, ""]
    segmenter = segmenter_table(per_case)
    if segmenter is not None:
        notes += ["# TRUS gland segmenter", "", report.to_markdown(segmenter), "", SEGMENTER_NOTE, ""]
    text = "\n".join([
        "# Our results",
        "",
        f"cases per method: {counts}" + (f"; folds: {', '.join(map(str, folds))}" if folds else ""),
        "",
        report.to_markdown(summary),
        "",
        *notes,
        "# Beside the paper's Table 1 and Hu et al. 2018",
        "",
        report.side_by_side(summary, paper),
        "",
        "# Paired Wilcoxon signed-rank tests (two-sided, on shared cases)",
        "",
        _pvalue_table(pvalues),
        "",
    ])
    return Comparison(per_case, summary, pvalues, text, segmenter)
