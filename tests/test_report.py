"""Report tables: formatting, ordering, Wilcoxon pairing, the paper's Table 1."""
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from label_reg import report


def test_format_stat_known_sample():
    # mean 4, median 3, sample SD sqrt(50 / 4) = 3.5355
    assert report.format_stat([1, 2, 3, 4, 10]) == "4.0 (3.0) ± 3.5"
    assert report.format_stat([0.5, np.nan, 0.7, 0.9], scale=100) == "70.0 (70.0) ± 20.0"
    assert report.format_stat([0.30, 0.31, 0.29], scale=100, decimals=0) == "30 (30) ± 1"
    assert report.format_stat([np.nan, np.nan]) == "–"
    assert report.format_stat([]) == "–"
    assert report.format_stat([2.0]) == "2.0 (2.0) ± –"


def per_case_frame():
    rows = []
    for method in ["zeta", "MIX+", "alpha", "Coarse", "SDM", "MIX", "mDSC"]:
        for i in range(5):
            rows.append({"method": method, "case": f"case{i:02d}", "dsc": 0.8 + 0.02 * i,
                         "dsc_base": 0.7, "dsc_mid": 0.9, "dsc_apex": 0.6, "tre_mm": 3.0 + i,
                         "hd95_mm": 2.0, "jacobian_gradient": np.nan if method == "Coarse" else 0.3,
                         "folding_fraction": 0.01 * (i % 2) if method != "Coarse" else np.nan})
    return pd.DataFrame(rows)


def test_summary_table_order_columns_and_cells():
    table = report.summary_table(per_case_frame())
    assert list(table.index) == ["Coarse", "mDSC", "SDM", "MIX", "MIX+", "alpha", "zeta"]
    assert list(table.columns) == ["DSC whole %", "DSC base %", "DSC mid %", "DSC apex %", "TRE mm", "HD95 mm",
                                   "∇|J| ×10⁻²", "folding %"]
    # dsc = 0.80, 0.82, ..., 0.88 -> 84.0 (84.0) ± 3.2 (SD of 0.02 * [0..4] * 100 = 2 * 1.5811)
    assert table.loc["MIX", "DSC whole %"] == "84.0 (84.0) ± 3.2"
    assert table.loc["MIX", "TRE mm"] == "5.0 (5.0) ± 1.6"
    assert table.loc["MIX", "∇|J| ×10⁻²"] == "30.0 (30.0) ± 0.0"
    assert table.loc["Coarse", "∇|J| ×10⁻²"] == "–"
    assert table.loc["MIX", "folding %"] == "0.40 (0.00) ± 0.55"   # 0, 1, 0, 1, 0 %


def test_wilcoxon_matches_scipy_and_pairs_by_case():
    a = np.array([0.81, 0.85, 0.79, 0.90, 0.88, 0.84, 0.86, 0.80, 0.83, 0.87])
    b = np.array([0.78, 0.86, 0.75, 0.85, 0.84, 0.80, 0.86, 0.79, 0.79, 0.82]) - 0.001 * np.arange(10)
    cases = [f"c{i}" for i in range(10)]
    rows = [{"method": "MIX+", "case": c, "dsc": v, "tre_mm": 5 - v} for c, v in zip(cases, a)]
    order = np.random.default_rng(1).permutation(10)                   # shuffle the second method's rows
    rows += [{"method": "MIX", "case": cases[i], "dsc": b[i], "tre_mm": 5 - b[i]} for i in order]
    rows += [{"method": "MIX", "case": "only_in_mix", "dsc": 0.1, "tre_mm": 9.0}]  # unpaired: ignored
    out = report.wilcoxon_pvalues(pd.DataFrame(rows), pairs=[("MIX+", "MIX"), ("MIX+", "SDM")])
    assert len(out) == 2                                                # the SDM pair is skipped
    expected = stats.wilcoxon(a, b, alternative="two-sided").pvalue
    dsc_row = out[out["metric"] == "dsc"].iloc[0]
    assert dsc_row["n"] == 10
    assert dsc_row["p_value"] == pytest.approx(expected, rel=1e-12)
    unpaired = stats.wilcoxon(a, b[order]).pvalue
    assert abs(unpaired - expected) > 1e-6                              # pairing by row order would differ


def test_paper_table1_loads():
    paper = report.paper_table1()
    assert len(paper) == 6
    assert list(paper["method"][:5]) == ["Coarse", "mDSC", "SDM", "MIX", "MIX+"]
    mixplus = paper.set_index("method").loc["MIX+"]
    assert (mixplus["dsc_whole_pct_mean"], mixplus["tre_mm_median"], mixplus["jacobian_gradient_e2_sd"]) == \
        (88.3, 4.3, 5)
    hu = paper.iloc[5]
    assert hu["tre_mm_median"] == 3.6 and hu["dsc_whole_pct_median"] == 87.5
    assert "Medical Image Analysis 49" in hu["source"] and hu["note"]


def test_side_by_side_and_markdown():
    text = report.side_by_side(report.summary_table(per_case_frame()), report.paper_table1())
    lines = text.splitlines()
    assert lines[0].startswith("| from | method | DSC whole % | TRE mm | ∇\\|J\\| ×10⁻² |")
    assert "| paper | MIX+ | 88.3 (89.6) ± 3.8 | 4.7 (4.3) ± 1.9 | 36 (36) ± 5 |" in lines
    assert "| ours | MIX | 84.0 (84.0) ± 3.2 | 5.0 (5.0) ± 1.6 | 30.0 (30.0) ± 0.0 |" in lines
    md = report.to_markdown(pd.DataFrame({"a": [1, np.nan], "b|c": ["x", "y"]}))
    assert md.splitlines() == ["| a | b\\|c |", "|---|---|", "| 1.0 | x |", "| – | y |"]
