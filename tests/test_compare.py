"""``label-reg compare``: concatenating per-case CSVs, tables beside the paper, Wilcoxon tests, legacy NiftyNet outputs.
No model needed: per-case tables are constructed here, legacy outputs are written from the phantoms' fixed labels."""
import pathlib
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from label_reg import io as lio
from label_reg.compare import LEGACY_METHOD, compare, load_results, score_niftynet
from label_reg.errors import InputError

LABEL_REG = pathlib.Path(sys.executable).with_name("label-reg")


def _rows(method, cases, fold, rng, dsc, tre):
    return pd.DataFrame({
        "case": cases, "method": method, "fold": fold,
        "dsc": np.clip(dsc + rng.normal(0, 0.03, len(cases)), 0, 1), "dsc_base": 0.8, "dsc_mid": 0.9,
        "dsc_apex": 0.8, "tre_mm": tre + rng.normal(0, 1.0, len(cases)),
        "tre_world_mm": tre + rng.normal(0, 1.0, len(cases)), "hd95_mm": 4.0,
        "jacobian_gradient": np.nan if method == "Coarse" else 0.3, "folding_fraction":
            np.nan if method == "Coarse" else 0.0, "landmarks_missing": 0})


@pytest.fixture
def cv_results(tmp_path):
    """Two folds of MIX+ and one file of MIX over the same 10 cases, each with its own Coarse rows."""
    rng = np.random.default_rng(1)
    cases = [f"case{i:02d}" for i in range(10)]
    coarse = _rows("Coarse", cases, 0, rng, 0.75, 7.0)
    paths = []
    for fold, part in enumerate((cases[:5], cases[5:])):
        df = pd.concat([coarse[coarse["case"].isin(part)].assign(fold=fold),
                        _rows("MIX+", part, fold, rng, 0.88, 4.5)])
        paths.append(tmp_path / f"mixplus_fold{fold}.csv")
        df.to_csv(paths[-1], index=False)
    mix = pd.concat([coarse, _rows("MIX", cases, 0, rng, 0.85, 5.5)])
    paths.append(tmp_path / "mix.csv")
    mix.to_csv(paths[-1], index=False)
    return paths


def test_tables_and_wilcoxon(cv_results):
    result = compare(cv_results)
    counts = result.per_case["method"].value_counts()
    assert counts["Coarse"] == 10 and counts["MIX+"] == 10 and counts["MIX"] == 10
    assert list(result.summary.index) == ["Coarse", "MIX", "MIX+"]
    text = result.text
    for needle in ("| ours | Coarse |", "| ours | MIX+ |", "| paper | MIX+ | 88.3 (89.6) ± 3.8",
                   "Hu et al. 2018", "Wilcoxon"):
        assert needle in text
    row = result.pvalues[(result.pvalues["method_a"] == "MIX+") & (result.pvalues["method_b"] == "MIX")
                         & (result.pvalues["metric"] == "dsc")]
    assert len(row) == 1 and int(row["n"].iloc[0]) == 10
    df = result.per_case.set_index(["method", "case"])
    cases = sorted(result.per_case["case"].unique())
    expected = stats.wilcoxon(df.loc["MIX+"].loc[cases, "dsc"], df.loc["MIX"].loc[cases, "dsc"]).pvalue
    assert row["p_value"].iloc[0] == pytest.approx(expected)
    assert "| MIX+ | MIX | dsc | 10 |" in text


def test_duplicate_method_case_is_an_error(cv_results):
    with pytest.raises(InputError) as err:
        load_results([cv_results[0], cv_results[0]])
    assert str(cv_results[0]) in str(err.value) and "MIX+" in str(err.value)


def test_missing_results_file(tmp_path):
    with pytest.raises(InputError, match="nope.csv"):
        load_results([tmp_path / "nope.csv"])


# -------------------------------------------------------------------------------------------- legacy NiftyNet
@pytest.fixture
def legacy(phantom_dir, tmp_path):
    """Legacy outputs for 3 phantoms: A = the fixed labels as soft 0.8 masks (4-D), B = the fixed labels shifted by
    2 voxels along x (4-D), C = the fixed gland only (3-D); plus a results CSV listing A, B, C."""
    names = sorted(p.name[:-len(".nii.gz")] for p in (phantom_dir / "fixed_labels").glob("*.nii.gz"))[:3]
    folder = tmp_path / "niftynet"
    shift_mm = None
    for name, kind in zip(names, ("exact", "shifted", "gland")):
        channels = lio.read_label(phantom_dir / "fixed_labels" / f"{name}.nii.gz")
        geo = lio.Geometry.from_image(channels[0])
        arr = lio.labels_to_array(channels)
        if kind == "exact":
            arr = arr * 0.8
        elif kind == "shifted":
            assert not arr[:2].any() and not arr[-2:].any()  # the roll moves only empty slabs across the border
            arr = np.roll(arr, 2, axis=0)
            shift_mm = 2 * geo.spacing[0]
        else:
            arr = arr[..., :1]
        lio.write_label(folder / f"{name}_niftynet_out.nii.gz", lio.labels_from_array(arr, geo))
    results = tmp_path / "per_case.csv"
    rng = np.random.default_rng(0)
    pd.concat([_rows("Coarse", names, 0, rng, 0.75, 7.0), _rows("MIX+", names, 0, rng, 0.88, 4.5)]).to_csv(
        results, index=False)
    return names, folder, results, shift_mm


def test_legacy_scores(legacy, phantom_dir):
    names, folder, _, shift_mm = legacy
    df = score_niftynet(folder, phantom_dir, names).set_index("case")
    exact, shifted, gland = (df.loc[n] for n in names)
    assert exact["dsc"] == 1.0 and exact["tre_mm"] == pytest.approx(0.0, abs=1e-9) and exact["hd95_mm"] == 0.0
    assert exact["landmarks_missing"] == 0
    assert shifted["tre_mm"] == pytest.approx(shift_mm, abs=1e-6) and shift_mm == pytest.approx(2.5)
    assert shifted["tre_world_mm"] == pytest.approx(shift_mm, abs=1e-6)
    assert 0.5 < shifted["dsc"] < 0.99
    assert gland["dsc"] == 1.0 and np.isnan(gland["tre_mm"])
    assert df["jacobian_gradient"].isna().all() and df["folding_fraction"].isna().all()


def test_compare_with_legacy_row(legacy, phantom_dir):
    names, folder, results, _ = legacy
    result = compare([results], niftynet_dir=folder, data_dir=phantom_dir)
    assert f"| ours | {LEGACY_METHOD} |" in result.text
    pairs = set(zip(result.pvalues["method_a"], result.pvalues["method_b"]))
    assert pairs == {("MIX+", "Coarse"), ("MIX+", LEGACY_METHOD)}  # the network against its pre-alignment, and legacy


def test_missing_legacy_file_names_it(legacy, phantom_dir):
    names, folder, _, _ = legacy
    (folder / f"{names[1]}_niftynet_out.nii.gz").unlink()
    with pytest.raises(InputError) as err:
        score_niftynet(folder, phantom_dir, names)
    assert f"{names[1]}_niftynet_out.nii.gz" in str(err.value) and "\n" not in str(err.value)


def test_legacy_geometry_mismatch_and_unknown_subject(legacy, phantom_dir):
    names, folder, _, _ = legacy
    path = folder / f"{names[1]}_niftynet_out.nii.gz"
    channels = lio.read_label(path)
    for ch in channels:
        ch.SetOrigin(tuple(v + 5.0 for v in ch.GetOrigin()))
    lio.write_label(path, channels)
    with pytest.raises(InputError, match=f"{names[1]}_niftynet_out.nii.gz.*origin"):
        score_niftynet(folder, phantom_dir, names)
    lio.write_label(folder / "ghost_niftynet_out.nii.gz", lio.read_label(path))
    path.unlink()
    with pytest.raises(InputError, match="ghost_niftynet_out"):
        score_niftynet(folder, phantom_dir, [names[0], names[2]])


def test_cli(legacy, phantom_dir, cv_results, tmp_path):
    names, folder, results, _ = legacy
    report = tmp_path / "report.md"
    proc = subprocess.run([str(LABEL_REG), "compare", "--results", str(results), "--niftynet_dir", str(folder),
                           "--data_dir", str(phantom_dir), "--output", str(report)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"| ours | {LEGACY_METHOD} |" in proc.stdout and "| paper | Coarse" in proc.stdout
    assert report.read_text() == proc.stdout

    # several CSVs after one --results flag; and a missing legacy file -> exit 2, one line naming it
    proc = subprocess.run([str(LABEL_REG), "compare", "--results", *map(str, cv_results)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "| MIX+ | MIX | dsc | 10 |" in proc.stdout
    (folder / f"{names[2]}_niftynet_out.nii.gz").unlink()
    proc = subprocess.run([str(LABEL_REG), "compare", "--results", str(results), "--niftynet_dir", str(folder),
                           "--data_dir", str(phantom_dir)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    errors = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and f"{names[2]}_niftynet_out.nii.gz" in errors[0]


# -------------------------------------------------------------------------------------------- found TRUS gland
@pytest.fixture
def gland_results(tmp_path):
    """One fold evaluated twice, as `evaluate` writes it: the paper pipeline's MIX+ with --segmenter_dir, and the
    found-gland MIX+ (prealign trus_gland) with the same segmenter, so both files hold the same three pre-alignment
    rows per case; segmenter columns on the found-gland rows only."""
    rng = np.random.default_rng(2)
    cases = [f"case{i:02d}" for i in range(10)]
    seg = {"segmenter_dsc": rng.uniform(0.8, 0.9, 10), "segmenter_centre_error_mm": rng.uniform(0.5, 3.0, 10)}
    coarse = _rows("Coarse", cases, 0, rng, 0.70, 10.0)
    found = _rows("Coarse (found gland)", cases, 0, rng, 0.80, 6.5).assign(**seg)
    true = _rows("Coarse (true gland)", cases, 0, rng, 0.82, 6.0)
    paper = pd.concat([coarse, found, true, _rows("MIX+", cases, 0, rng, 0.80, 8.5)])
    gland = pd.concat([coarse, found, true, _rows("MIX+ (found gland)", cases, 0, rng, 0.87, 5.0).assign(**seg)])
    paths = [tmp_path / "mixplus_fold0.csv", tmp_path / "mixplus_gland_fold0.csv"]
    paper.to_csv(paths[0], index=False)
    gland.to_csv(paths[1], index=False)
    return paths


def test_found_gland_rows_beside_the_paper_pipeline(gland_results):
    result = compare(gland_results)
    assert list(result.summary.index) == ["Coarse", "Coarse (found gland)", "Coarse (true gland)", "MIX+",
                                          "MIX+ (found gland)"]
    counts = result.per_case["method"].value_counts()
    assert (counts == 10).all() and len(counts) == 5  # the pre-alignment rows of the two files deduplicated
    for needle in ("| ours | Coarse (found gland) |", "| ours | MIX+ (found gland) |", "| paper | MIX+ |",
                   "# TRUS gland segmenter", "| TRUS gland segmenter | 10 | ", "Coarse (true gland): on the TRUS"):
        assert needle in result.text
    pv = result.pvalues
    pairs = list(dict.fromkeys(zip(pv["method_a"], pv["method_b"])))
    assert pairs == [("Coarse (found gland)", "Coarse"), ("Coarse (true gland)", "Coarse"),
                     ("Coarse (true gland)", "Coarse (found gland)"),
                     ("MIX+", "Coarse"), ("MIX+ (found gland)", "Coarse (found gland)"), ("MIX+ (found gland)", "Coarse"),
                     ("MIX+ (found gland)", "MIX+")]
    row = pv[(pv["method_a"] == "MIX+ (found gland)") & (pv["method_b"] == "MIX+") & (pv["metric"] == "tre_mm")]
    df = result.per_case.set_index(["method", "case"])
    cases = sorted(result.per_case["case"].unique())
    a, b = df.loc["MIX+ (found gland)"].loc[cases, "tre_mm"], df.loc["MIX+"].loc[cases, "tre_mm"]
    assert int(row["n"].iloc[0]) == 10 and row["p_value"].iloc[0] == pytest.approx(stats.wilcoxon(a, b).pvalue)
    assert row["median_diff"].iloc[0] == pytest.approx(np.median(a - b)) and row["median_diff"].iloc[0] < 0
    seg = result.segmenter
    assert int(seg["cases"].iloc[0]) == 10 and int(seg["not found"].iloc[0]) == 0
    found = result.per_case[result.per_case["method"] == "Coarse (found gland)"]
    assert seg["gland DSC %"].iloc[0].startswith(f"{100 * found['segmenter_dsc'].mean():.1f} (")


def test_methods_keeps_only_the_named_methods_and_the_prealignment(gland_results):
    result = compare(gland_results, methods=["MIX+ (found gland)"])
    assert list(result.summary.index) == ["Coarse", "Coarse (found gland)", "Coarse (true gland)",
                                          "MIX+ (found gland)"]
    pairs = set(zip(result.pvalues["method_a"], result.pvalues["method_b"]))
    assert ("MIX+ (found gland)", "Coarse (found gland)") in pairs
    assert not any("MIX+" in (a, b) for a, b in pairs)  # the paper pipeline's MIX+ is left out
    # the p-values of the pairs kept are those of the full comparison
    full = compare(gland_results).pvalues.set_index(["method_a", "method_b", "metric"])["p_value"]
    kept = result.pvalues.set_index(["method_a", "method_b", "metric"])["p_value"]
    assert np.allclose(kept, full.loc[kept.index])
    with pytest.raises(InputError) as err:
        compare(gland_results, methods=["MIX+ (found gland)", "MIX++"])
    message = str(err.value)
    assert "--methods" in message and "'MIX++'" in message and "'MIX+ (found gland)'" in message
    # the command line: comma-separated names
    proc = subprocess.run([str(LABEL_REG), "compare", "--methods", "MIX+,Coarse", "--results",
                           *map(str, gland_results)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| MIX+ | Coarse | dsc | 10 |" in proc.stdout and "| ours | MIX+ |" in proc.stdout
    assert "MIX+ (found gland)" not in proc.stdout


def test_found_gland_rows_of_different_segmenters_are_an_error(gland_results):
    other = pd.read_csv(gland_results[1])
    where = (other["method"] == "Coarse (found gland)") & (other["case"] == "case03")
    other.loc[where, "tre_world_mm"] += 0.5
    other.to_csv(gland_results[1], index=False)
    with pytest.raises(InputError) as err:
        load_results(gland_results)
    message = str(err.value)
    assert str(gland_results[0]) in message and str(gland_results[1]) in message and "case03" in message
    assert "tre_world_mm" in message and "different segmenters" in message and "\n" not in message
    # the volume-centre Coarse rows are kept first as before (not checked): only the segmenter-dependent rows are
    other.loc[where, "tre_world_mm"] -= 0.5
    other.loc[other["method"] == "Coarse", "tre_mm"] += 0.5
    other.to_csv(gland_results[1], index=False)
    assert len(load_results(gland_results)) == 50


def test_method_order_puts_the_coarse_rows_first():
    from label_reg.report import method_sort_key

    names = ["MIX+ (true gland)", "NiftyNet (legacy)", "MIX+", "Coarse (true gland)", "SDM (found gland)",
             "MIX+ (found gland)", "Coarse", "mDSC", "Coarse (found gland)", "SDM"]
    assert sorted(names, key=method_sort_key) == [
        "Coarse", "Coarse (found gland)", "Coarse (true gland)", "mDSC", "SDM", "SDM (found gland)", "MIX+",
        "MIX+ (found gland)", "MIX+ (true gland)", "NiftyNet (legacy)"]
