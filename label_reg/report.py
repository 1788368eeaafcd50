"""Result tables in the paper's format (mean (median) ± SD per method), paired Wilcoxon tests, Table 1 of the paper.

A per-case DataFrame has one row per (method, case) with the keys of ``label_reg.metrics.case_metrics`` as
columns (``dsc``, ``dsc_base``, ``dsc_mid``, ``dsc_apex``, ``tre_mm``, ``hd95_mm``, ``jacobian_gradient``,
``folding_fraction``), a method column (default ``"method"``) and a case column (default ``"case"``).

Pure numpy / scipy / pandas; no ``tabulate`` dependency.
"""
import math
import pathlib

import numpy as np
import pandas as pd
from scipy import stats

from label_reg.errors import InputError

DASH = "–"

METHOD_ORDER = ("Coarse", "mDSC", "SDM", "MIX", "MIX+")

# (table column, per-case column, scale, decimals)
SUMMARY_COLUMNS = (
    ("DSC whole %", "dsc", 100.0, 1),
    ("DSC base %", "dsc_base", 100.0, 1),
    ("DSC mid %", "dsc_mid", 100.0, 1),
    ("DSC apex %", "dsc_apex", 100.0, 1),
    ("TRE mm", "tre_mm", 1.0, 1),
    ("HD95 mm", "hd95_mm", 1.0, 1),
    ("∇|J| ×10⁻²", "jacobian_gradient", 100.0, 1),
    ("folding %", "folding_fraction", 100.0, 2),
)

DEFAULT_PAIRS = (
    ("MIX+", "MIX"),
    ("MIX+", "SDM"),
    ("MIX+", "mDSC"),
    ("MIX", "SDM"),
    ("MIX", "mDSC"),
    ("SDM", "mDSC"),
)

PAPER_TABLE1_CSV = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "paper_table1.csv"

# side-by-side columns: (header, summary-table column, paper-csv column prefix, decimals for paper numbers)
_SIDE_COLUMNS = (
    ("DSC whole %", "DSC whole %", "dsc_whole_pct", 1),
    ("TRE mm", "TRE mm", "tre_mm", 1),
    ("∇|J| ×10⁻²", "∇|J| ×10⁻²", "jacobian_gradient_e2", 0),
)


def _fmt(x, decimals):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return DASH
    text = f"{float(x) + 0.0:.{decimals}f}"  # + 0.0 turns -0.0 into 0.0
    if text.startswith("-") and float(text) == 0.0:
        text = text[1:]
    return text


def format_stat(values, scale=1.0, decimals=1):
    """``"mean (median) ± SD"`` of ``values * scale``, e.g. ``"74.3 (76.0) ± 10.6"``.

    NaNs are ignored; SD is the sample SD (ddof=1), shown as "–" for a single value. Returns "–" when no value
    is left. Infinite values are kept, so a case scored ``inf`` (e.g. HD95 of a lost gland) makes the mean
    ``inf`` rather than disappearing.
    """
    arr = np.asarray(values, dtype=np.float64).reshape(-1) * float(scale)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return DASH
    mean = float(np.mean(arr))
    median = float(np.median(arr))
    sd = float(np.std(arr, ddof=1)) if arr.size > 1 else float("nan")
    return f"{_fmt(mean, decimals)} ({_fmt(median, decimals)}) ± {_fmt(sd, decimals)}"


# pre-alignment variants of a method name (label_reg.evaluate): "MIX+ (found gland)", "Coarse (true gland)"
VARIANT_SUFFIXES = (" (found gland)", " (true gland)")


def method_sort_key(name):
    """Coarse, mDSC, SDM, MIX, MIX+ first (the paper's order), then any other method alphabetically; each name is
    followed by its pre-alignment variants, "(found gland)" then "(true gland)" (so the Coarse rows come first)."""
    name, variant = str(name), 0
    for i, suffix in enumerate(VARIANT_SUFFIXES, 1):
        if name.endswith(suffix) and len(name) > len(suffix):
            name, variant = name[:-len(suffix)], i
            break
    if name in METHOD_ORDER:
        return (0, METHOD_ORDER.index(name), "", variant)
    return (1, 0, name, variant)


def _methods(per_case, methods_column):
    if not isinstance(per_case, pd.DataFrame):
        raise InputError("per-case table", f"expected a pandas DataFrame, got {type(per_case).__name__}")
    if methods_column not in per_case.columns:
        raise InputError("per-case table", f"no {methods_column!r} column (columns: {list(per_case.columns)})")
    return sorted(per_case[methods_column].dropna().unique(), key=method_sort_key)


def summary_table(per_case, methods_column="method"):
    """One row per method (index named ``methods_column``), columns of :data:`SUMMARY_COLUMNS`, formatted cells.

    DSC and folding are shown in %, ∇|J| ×100 (the paper's "×10⁻²"), TRE and HD95 in mm. A metric missing from
    ``per_case`` (or all NaN for a method, e.g. ∇|J| of Coarse) shows "–". Rows: Coarse, mDSC, SDM, MIX, MIX+,
    then other methods alphabetically.
    """
    methods = _methods(per_case, methods_column)
    rows = []
    for method in methods:
        sub = per_case[per_case[methods_column] == method]
        row = {}
        for header, column, scale, decimals in SUMMARY_COLUMNS:
            if column in sub.columns:
                row[header] = format_stat(pd.to_numeric(sub[column], errors="coerce"), scale, decimals)
            else:
                row[header] = DASH
        rows.append(row)
    index = pd.Index(methods, name=methods_column)
    return pd.DataFrame(rows, index=index, columns=[c[0] for c in SUMMARY_COLUMNS])


def wilcoxon_pvalues(per_case, pairs=DEFAULT_PAIRS, metrics=("dsc", "tre_mm"), methods_column="method",
                     case_column="case"):
    """Two-sided paired Wilcoxon signed-rank tests (``scipy.stats.wilcoxon``) between methods, paired by case.

    For each ``(a, b)`` in ``pairs`` and each metric, cases scored by both methods with finite values on both
    sides are paired by ``case_column``. Pairs naming a method absent from ``per_case`` are skipped. The
    p-value is NaN when scipy cannot compute one (no pairs, or all differences zero).

    Returns a DataFrame with columns method_a, method_b, metric, n, median_diff (median of a - b),
    statistic, p_value.
    """
    present = set(_methods(per_case, methods_column))
    if case_column not in per_case.columns:
        raise InputError("per-case table", f"no {case_column!r} column (columns: {list(per_case.columns)})")
    dup = per_case.duplicated(subset=[methods_column, case_column])
    if dup.any():
        first = per_case.loc[dup, [methods_column, case_column]].iloc[0].tolist()
        raise InputError("per-case table", f"duplicate rows for method/case {first}")
    rows = []
    for a, b in pairs:
        if a not in present or b not in present:
            continue
        for metric in metrics:
            if metric not in per_case.columns:
                raise InputError("per-case table", f"no {metric!r} column")
            va = per_case.loc[per_case[methods_column] == a].set_index(case_column)[metric]
            vb = per_case.loc[per_case[methods_column] == b].set_index(case_column)[metric]
            joined = pd.concat([pd.to_numeric(va, errors="coerce").rename("a"),
                                pd.to_numeric(vb, errors="coerce").rename("b")], axis=1, join="inner")
            joined = joined[np.isfinite(joined["a"]) & np.isfinite(joined["b"])]
            n = int(len(joined))
            statistic, p_value, median_diff = float("nan"), float("nan"), float("nan")
            if n > 0:
                x, y = joined["a"].to_numpy(), joined["b"].to_numpy()
                median_diff = float(np.median(x - y))
                if np.any(x != y):
                    try:
                        res = stats.wilcoxon(x, y, alternative="two-sided")
                        statistic, p_value = float(res.statistic), float(res.pvalue)
                    except ValueError:
                        pass
            rows.append({"method_a": a, "method_b": b, "metric": metric, "n": n, "median_diff": median_diff,
                         "statistic": statistic, "p_value": p_value})
    return pd.DataFrame(rows, columns=["method_a", "method_b", "metric", "n", "median_diff", "statistic",
                                       "p_value"])


def paper_table1(path=None):
    """The paper's Table 1 (and Hu et al. 2018's medians) from ``experiments/paper_table1.csv``.

    Columns: method, ``{dsc_whole_pct, tre_mm, jacobian_gradient_e2}_{mean, median, sd}`` (DSC in %, TRE in
    mm, ∇|J| ×10⁻² as printed in the paper; empty = not reported), n_pairs, note, source.
    """
    path = pathlib.Path(path) if path is not None else PAPER_TABLE1_CSV
    if not path.is_file():
        raise InputError(path, "paper Table 1 CSV not found")
    df = pd.read_csv(path)
    if "method" not in df.columns:
        raise InputError(path, "no 'method' column")
    df["note"] = df["note"].fillna("").astype(str) if "note" in df.columns else ""
    return df


def _paper_cell(row, prefix, decimals):
    parts = [row.get(f"{prefix}_{stat}", float("nan")) for stat in ("mean", "median", "sd")]
    parts = [float("nan") if p is None or pd.isna(p) else float(p) for p in parts]
    if all(math.isnan(p) for p in parts):
        return DASH
    mean, median, sd = (_fmt(p, decimals) for p in parts)
    return f"{mean} ({median}) ± {sd}"


def side_by_side(ours, paper):
    """Markdown table: our rows ("ours") then the paper's rows ("paper") for DSC whole, TRE and ∇|J|.

    ``ours`` is a :func:`summary_table` result (a per-case table with a ``dsc`` column is summarised first);
    ``paper`` is :func:`paper_table1`. Notes from the paper table follow the table as footnotes.
    """
    if isinstance(ours, pd.DataFrame) and "dsc" in ours.columns and "DSC whole %" not in ours.columns:
        ours = summary_table(ours)
    rows = []
    for method, row in ours.iterrows():
        rows.append(["ours", str(method)] + [str(row.get(col, DASH)) for _, col, _, _ in _SIDE_COLUMNS])
    notes = []
    for _, row in paper.iterrows():
        name = str(row["method"])
        note = str(row.get("note", "") or "").strip()
        if note and note.lower() != "nan":
            notes.append(f"{name}: {note}")
            name = f"{name} [{len(notes)}]"
        rows.append(["paper", name] + [_paper_cell(row, prefix, dec) for _, _, prefix, dec in _SIDE_COLUMNS])
    table = pd.DataFrame(rows, columns=["from", "method"] + [h for h, _, _, _ in _SIDE_COLUMNS])
    text = to_markdown(table, index=False)
    if notes:
        text += "\n\n" + "\n".join(f"[{i}] {n}" for i, n in enumerate(notes, 1))
    return text


def _cell(value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    return str(value).replace("|", "\\|").replace("\n", " ")


def to_markdown(df, index=None):
    """A simple markdown pipe table of ``df``; NaN cells show "–" and "|" inside cells is escaped.

    ``index``: include the index as the first column; by default only when it is not a plain RangeIndex.
    """
    if index is None:
        index = not (isinstance(df.index, pd.RangeIndex) and df.index.name is None)
    headers = [_cell(c) for c in df.columns]
    body = [[_cell(v) for v in row] for row in df.itertuples(index=False, name=None)]
    if index:
        headers = [_cell(df.index.name if df.index.name is not None else "")] + headers
        body = [[_cell(i)] + r for i, r in zip(df.index, body)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)
