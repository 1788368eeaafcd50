"""tools/baselines.py on synthetic phantoms: the SDM B-spline improves on the pre-alignment; transforms and CSV."""
import pathlib
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from label_reg import datasets
from label_reg.preprocess import PreprocessConfig, preprocess_pair
from tool_scripts import load_tool

REPO = pathlib.Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "baselines.py"
CONFIG = PreprocessConfig(spacing_mm=4.0, shape=(24, 24, 24))  # small: the B-spline fit takes a few seconds

baselines = load_tool("baselines.py", "label_reg_baselines")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from label_reg.synthetic import write_phantoms
    root = tmp_path_factory.mktemp("baseline_phantoms")
    write_phantoms(root, num_pairs=2, seed=3)
    return datasets.discover_pairs(root)


def test_identity_transform_reproduces_the_coarse_scores(phantoms):
    import SimpleITK as sitk
    pre = preprocess_pair(phantoms[0], CONFIG)
    reference = baselines.to_sitk(pre.fixed_image, CONFIG.spacing_mm)
    warped = baselines.warp_labels(pre.moving_label, sitk.Transform(3, sitk.sitkIdentity), reference)
    np.testing.assert_array_equal(warped, pre.moving_label)
    assert np.all(baselines.displacement_voxels(sitk.Transform(3, sitk.sitkIdentity), reference) == 0)
    # A 1-voxel translation along x is a displacement of 1 voxel in channel 0, array axis 0.
    shift = sitk.TranslationTransform(3, (CONFIG.spacing_mm, 0.0, 0.0))
    ddf = baselines.displacement_voxels(shift, reference)
    np.testing.assert_allclose(ddf[..., 0], 1.0)
    np.testing.assert_allclose(ddf[..., 1:], 0.0)
    moved = baselines.warp_labels(pre.moving_label, shift, reference)
    np.testing.assert_array_equal(moved[:-1, ..., 0], pre.moving_label[1:, ..., 0])


def test_sdm_bspline_beats_the_prealignment_and_compare_reads_the_csv(phantoms, tmp_path, capsys):
    from label_reg.compare import load_results
    root = phantoms[0].moving_image.parents[1]
    output = tmp_path / "baselines.csv"
    assert baselines.main(["--data_dir", str(root), "--spacing_mm", "4", "--shape", "24", "24", "24",
                           "--num_folds", "2", "--fold", "1", "--methods", "sdm", "--output", str(output)]) == 0
    per_case = load_results([output])
    assert {"case", "method", "dsc", "tre_mm", "seconds"} <= set(per_case.columns)
    assert per_case["case"].nunique() == 1
    coarse = per_case[per_case["method"] == baselines.COARSE].iloc[0]
    sdm = per_case[per_case["method"] == baselines.METHODS["sdm"]].iloc[0]
    assert sdm["dsc"] > coarse["dsc"] + 0.05 and sdm["dsc"] > 0.9, per_case[["method", "dsc"]]
    assert sdm["seconds"] > 0 and coarse["seconds"] == 0
    assert np.isfinite(sdm["tre_mm"]) and np.isfinite(sdm["jacobian_gradient"])
    assert np.isnan(coarse["jacobian_gradient"])
    printed = capsys.readouterr().out
    assert baselines.METHODS["sdm"] in printed and "TRUS gland mask" in printed


def test_network_rows_beside_the_baselines_match_evaluate(trained_model, phantom_dir, tmp_path):
    """--model scores the trained network on the same pairs, as label-reg evaluate does, with its seconds."""
    from label_reg.evaluate import evaluate
    model_dir, summary = trained_model
    output = tmp_path / "net.csv"
    assert baselines.main(["--data_dir", str(phantom_dir), "--spacing_mm", "3", "--shape", "32", "32", "32",
                           "--methods", "", "--model", str(model_dir), "--output", str(output)]) == 0
    rows = pd.read_csv(output)
    net = rows[rows["method"] != baselines.COARSE].set_index("case")
    assert len(net) == 4 and (net["seconds"] > 0).all() and net["method"].str.endswith("(label_reg)").all()
    reference = evaluate(model_dir, tmp_path / "eval").per_case
    reference = reference[reference["method"] != "Coarse"].set_index("case")
    np.testing.assert_allclose(net.loc[reference.index, "dsc"], reference["dsc"], atol=1e-6)
    assert net["dsc"].median() > rows[rows["method"] == baselines.COARSE]["dsc"].median()


def test_a_model_for_another_grid_is_one_line_and_no_csv(trained_model, phantom_dir, tmp_path):
    output = tmp_path / "net.csv"
    run = subprocess.run([sys.executable, str(TOOL), "--data_dir", str(phantom_dir), "--methods", "",
                          "--model", str(trained_model[0]), "--output", str(output)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith(f"baselines.py: error: {trained_model[0]}: was trained on")
    assert not output.exists()


def test_a_found_gland_model_puts_every_row_on_the_found_gland(gland_model, phantom_dir, tmp_path):
    """A trus_gland model: the pairs are pre-aligned on the gland its segmenter finds, as evaluate scores them."""
    from label_reg.evaluate import COARSE_FOUND, evaluate
    output = tmp_path / "gland.csv"
    assert baselines.main(["--data_dir", str(phantom_dir), "--spacing_mm", "3", "--shape", "32", "32", "32",
                           "--methods", "", "--model", str(gland_model), "--output", str(output)]) == 0
    rows = pd.read_csv(output)
    network = "MIX+ (found gland)"
    assert set(rows["method"]) == {COARSE_FOUND, f"{network} (label_reg)"}
    reference = evaluate(gland_model, tmp_path / "eval").per_case
    for ours, theirs in ((COARSE_FOUND, COARSE_FOUND), (f"{network} (label_reg)", network)):
        got = rows[rows["method"] == ours].set_index("case")["dsc"]
        want = reference[reference["method"] == theirs].set_index("case")["dsc"]
        np.testing.assert_allclose(got.loc[want.index], want, atol=1e-6)


def test_the_baselines_tool_and_case_loading_start_without_tensorflow():
    """Only a --model run needs TensorFlow; the iterative baselines and the cached pre-processing do not load it."""
    code = (f"import runpy, sys\nimport label_reg.cases\nsys.argv = ['baselines.py', '--help']\n"
            f"try:\n    runpy.run_path({str(TOOL)!r}, run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('tensorflow' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "False", res.stdout
