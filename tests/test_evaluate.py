"""``label-reg evaluate`` on the shared trained fixture (MIX+, fold 0 of 5: 4 held-out phantom pairs)."""
import io
import json
import pathlib
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from label_reg import datasets
from label_reg.errors import InputError

LABEL_REG = pathlib.Path(sys.executable).with_name("label-reg")


def _val_names(phantom_dir):
    names = [p.name for p in datasets.discover_pairs(phantom_dir)]
    return datasets.kfold_split(names, 5, 0, 0)[1]


@pytest.fixture(scope="module")
def evaluated(trained_model, tiny_train_config, tmp_path_factory):
    """The CLI with its defaults (the run's own validation fold and data dir), figures on."""
    model_dir, _ = trained_model
    out = tmp_path_factory.mktemp("evaluate") / "out"
    proc = subprocess.run([str(LABEL_REG), "evaluate", "--model_dir", str(model_dir), "--output_dir", str(out),
                           "--cache_dir", tiny_train_config.cache_dir, "--figures"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.fixture(scope="module")
def evaluated_other(trained_model, tiny_train_config, phantom_dir, tmp_path_factory):
    """The same model through the Python API under another method name."""
    from label_reg.evaluate import Evaluator, evaluate

    model_dir, _ = trained_model
    evaluator = Evaluator.from_model_dir(model_dir)
    out = tmp_path_factory.mktemp("evaluate_other") / "out"
    result = evaluate(model_dir, out, data_dir=phantom_dir, fold=0, method="OTHER",
                      cache_dir=tiny_train_config.cache_dir, progress=False, evaluator=evaluator,
                      stream=io.StringIO())
    return result, evaluator


def test_per_case_rows_and_summary(evaluated, phantom_dir):
    out, proc = evaluated
    df = pd.read_csv(out / "per_case.csv")
    assert list(df.columns[:3]) == ["case", "method", "fold"]
    for column in ("dsc", "dsc_base", "dsc_mid", "dsc_apex", "tre_mm", "tre_world_mm", "hd95_mm",
                   "jacobian_gradient", "folding_fraction"):
        assert column in df.columns
    val = _val_names(phantom_dir)
    assert len(val) == 4
    for method in ("Coarse", "MIX+"):
        assert sorted(df.loc[df["method"] == method, "case"]) == val
    assert len(df) == 8 and set(df["fold"]) == {0}
    assert df.loc[df["method"] == "Coarse", "jacobian_gradient"].isna().all()
    assert np.isfinite(df.loc[df["method"] == "MIX+", "jacobian_gradient"]).all()
    assert df["dsc"].between(0, 1).all() and np.isfinite(df["tre_world_mm"]).all()
    assert df[["affine_rotation_deg", "affine_shift_mm"]].isna().all().all()  # no global affine stage

    summary = (out / "summary.md").read_text()
    assert "Global affine stage" not in summary
    lines = [ln for ln in summary.splitlines() if ln.startswith("| ")]
    assert lines[0].startswith("| method | DSC whole % |") and "TRE world mm" in lines[0]
    assert lines[1].startswith("| Coarse | ") and lines[2].startswith("| MIX+ | ")
    assert lines[1] in proc.stdout and lines[2] in proc.stdout  # the table is printed
    assert sum(ln.startswith(f"[{i}/4] ") for ln in proc.stderr.splitlines() for i in range(1, 5)) == 4


def test_scores_agree_with_the_training_validation(evaluated, trained_model):
    """The training loop kept these weights for their median validation DSC / TRE on the same 4 cases."""
    out, _ = evaluated
    model_dir, _ = trained_model
    info = json.loads((model_dir / "label_reg.json").read_text())
    df = pd.read_csv(out / "per_case.csv")
    ours = df[df["method"] == "MIX+"]
    assert np.median(ours["dsc"]) == pytest.approx(info["validation"]["dsc"], abs=1e-6)
    assert np.nanmedian(ours["tre_mm"]) == pytest.approx(info["validation"]["tre_mm"], abs=1e-6)


def _world_centroids(path):
    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img)  # (K, Z, Y, X)
    out = []
    for k in range(arr.shape[0]):
        idx = np.argwhere(arr[k] > 0.5)[:, ::-1].mean(axis=0)
        out.append(img.TransformContinuousIndexToPhysicalPoint(list(idx) + [0.0])[:3])
    return np.asarray(out)


def test_coarse_world_tre_matches_independent_computation(evaluated, phantom_dir):
    """Coarse: TRUS landmark centroid + t vs MR landmark centroid, with t = MR gland centroid - TRUS volume centre,
    computed here from the raw files; and, independently of the MR labels, against the ground-truth correspondence."""
    out, _ = evaluated
    df = pd.read_csv(out / "per_case.csv")
    coarse = df[df["method"] == "Coarse"].set_index("case")
    for case in coarse.index:
        mr = _world_centroids(phantom_dir / "moving_labels" / f"{case}.nii.gz")
        us = _world_centroids(phantom_dir / "fixed_labels" / f"{case}.nii.gz")
        trus = sitk.ReadImage(str(phantom_dir / "fixed_images" / f"{case}.nii.gz"))
        centre = np.asarray(trus.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in trus.GetSize()]))
        t = mr[0] - centre
        direct = np.linalg.norm(mr[1:] - (us[1:] + t), axis=1).mean()
        assert coarse.loc[case, "tre_world_mm"] == pytest.approx(direct, abs=1e-3)
        field = sitk.ReadImage(str(phantom_dir / "ground_truth" / f"{case}.nii.gz"), sitk.sitkVectorFloat64)
        truth = sitk.DisplacementFieldTransform(field)
        true_mr = np.asarray([truth.TransformPoint(tuple(float(v) for v in p)) for p in us[1:]])
        from_truth = np.linalg.norm(true_mr - (us[1:] + t), axis=1).mean()
        assert coarse.loc[case, "tre_world_mm"] == pytest.approx(from_truth, abs=0.5)
        assert direct > 1.0  # the pre-alignment leaves a real error, so the checks above mean something


def test_world_tre_through_a_ddf_follows_the_ground_truth(phantom_dir):
    """Feed world_tre_mm the ground-truth deformation as a crop-grid DDF: the TRE collapses from the Coarse value to
    the blob-centroid discretisation error. Catches sign, axis or direction mistakes in the DDF -> world chain."""
    from label_reg import io as lio
    from label_reg.evaluate import landmark_centroids_world, world_tre_mm
    from label_reg.preprocess import PreprocessConfig, preprocess_pair

    pair = datasets.discover_pairs(phantom_dir)[3]
    pre = preprocess_pair(pair, PreprocessConfig(spacing_mm=3.0, shape=(32, 32, 32)))
    fixed = landmark_centroids_world(lio.read_label(pair.fixed_label))
    moving = landmark_centroids_world(lio.read_label(pair.moving_label))
    coarse, _ = world_tre_mm(fixed, moving, None, pre.grid, pre.translation_mm)

    field = sitk.ReadImage(str(phantom_dir / "ground_truth" / f"{pair.name}.nii.gz"), sitk.sitkVectorFloat64)
    on_crop = sitk.Resample(field, pre.grid.reference_image(), sitk.Transform(), sitk.sitkLinear, 0.0,
                            sitk.sitkVectorFloat64)
    disp = sitk.GetArrayFromImage(on_crop).transpose(2, 1, 0, 3)                      # (X, Y, Z, 3) world mm
    ddf = (disp - pre.translation_mm) @ np.linalg.inv(pre.grid.matrix).T              # crop voxels
    registered, per = world_tre_mm(fixed, moving, ddf, pre.grid, pre.translation_mm)
    assert coarse > 2.0 and registered < 0.6 and np.all(np.isfinite(per))

    # A constant DDF d shifts every mapped point by M_c d exactly.
    d = np.array([1.5, -2.0, 0.5])
    shifted, _ = world_tre_mm(fixed, moving, np.broadcast_to(d, (32, 32, 32, 3)), pre.grid, pre.translation_mm)
    expected = np.linalg.norm(moving - (fixed + pre.translation_mm + pre.grid.matrix @ d), axis=1).mean()
    assert shifted == pytest.approx(expected, abs=1e-9)


def test_figures_of_best_median_worst(evaluated):
    import matplotlib.image as mpimg

    out, _ = evaluated
    files = sorted((out / "figures").glob("*.png"))
    labels = {f.name.split("_")[0] for f in files}
    assert labels <= {"best", "median", "worst"} and {"best", "worst"} <= labels
    assert any(f.name.endswith("_slices.png") for f in files) and any(f.name.endswith("_jacobian.png") for f in files)
    for f in files:
        img = mpimg.imread(f)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and img[..., :3].std() > 0.01
    assert not list((out / "figures").glob(".*"))  # no temporary files left


def test_api_other_method_name_and_single_trace(evaluated, evaluated_other):
    out, _ = evaluated
    result, evaluator = evaluated_other
    assert result.method == "OTHER" and result.fold == 0
    assert set(result.per_case["method"]) == {"Coarse", "OTHER"}
    assert evaluator.predictor.forward.experimental_get_tracing_count() == 1  # 4 cases, one trace
    cli = pd.read_csv(out / "per_case.csv")
    ours = result.per_case[result.per_case["method"] == "OTHER"].set_index("case")
    mixplus = cli[cli["method"] == "MIX+"].set_index("case").loc[ours.index]
    np.testing.assert_allclose(ours["dsc"].to_numpy(float), mixplus["dsc"].to_numpy(float), atol=1e-9)
    assert (result.output_dir / "per_case.csv").is_file() and (result.output_dir / "summary.md").is_file()


def test_compare_on_two_evaluations(evaluated, evaluated_other):
    from label_reg.compare import compare

    out, _ = evaluated
    result, _ = evaluated_other
    comparison = compare([out / "per_case.csv", result.output_dir / "per_case.csv"])
    assert (comparison.per_case["method"] == "Coarse").sum() == 4  # deduplicated across the two files
    assert "| ours | MIX+ |" in comparison.text and "| paper | MIX+ |" in comparison.text
    rows = comparison.pvalues
    dsc = rows[(rows["method_a"] == "OTHER") & (rows["method_b"] == "MIX+") & (rows["metric"] == "dsc")]
    assert len(dsc) == 1 and int(dsc["n"].iloc[0]) == 4 and dsc["median_diff"].iloc[0] == 0.0


def test_method_names():
    from label_reg.evaluate import method_name

    def info(alpha, beta, label):
        return {"alpha": alpha, "beta": beta, "build": {"moving_label_input": label}}

    assert method_name(info(0.3, 0.0, False)) == "mDSC"
    assert method_name(info(0.0, 0.8, False)) == "SDM"
    assert method_name(info(0.05, 0.45, False)) == "MIX"
    assert method_name(info(0.05, 0.45, True)) == "MIX+"
    gland = {**info(0.05, 0.45, True), "preprocess": {"prealign": "trus_gland"}}
    assert method_name(gland) == "MIX+ (found gland)"
    assert method_name({**info(0.3, 0.0, False), "preprocess": {"prealign": "trus_centre"}}) == "mDSC"
    both = {**gland, "build": {"moving_label_input": True, "global_affine": True}, "training": {"landmark_weight": 0.3}}
    assert method_name(both) == "MIX+ affine landmarks (found gland)"
    supervised = {**both, "training": {"landmark_weight": 0.3, "affine_label_weight": 0.5}}
    assert method_name(supervised) == "MIX+ supervised affine landmarks (found gland)"
    assert method_name({**info(0.05, 0.45, True), "training": {"landmark_weight": 0.0}}) == "MIX+"


def test_case_selection(phantom_dir, tmp_path):
    from label_reg.evaluate import resolve_cases

    info = {"training": {"data_dir": str(phantom_dir), "num_folds": 5, "fold": 2, "split_seed": 0,
                         "cases_csv": ""}}
    names = [p.name for p in datasets.discover_pairs(phantom_dir)]
    _, pairs, fold = resolve_cases(info)
    assert fold == 2 and [p.name for p in pairs] == datasets.kfold_split(names, 5, 2, 0)[1]
    _, pairs, fold = resolve_cases(info, fold=4)
    assert fold == 4 and [p.name for p in pairs] == datasets.kfold_split(names, 5, 4, 0)[1]
    csv = tmp_path / "cases.csv"
    csv.write_text(f"case,split\n{names[0]},train\n{names[5]},val\n{names[7]},val\n")
    _, pairs, fold = resolve_cases(info, cases_csv=csv)
    assert fold is None and [p.name for p in pairs] == [names[5], names[7]]
    with pytest.raises(InputError, match="fold"):
        resolve_cases(info, fold=5)
    with pytest.raises(InputError, match="--fold"):
        resolve_cases(info, cases_csv=csv, fold=1)
    with pytest.raises(InputError, match="data_dir"):
        resolve_cases({"training": {}})


def test_missing_model_is_an_input_error(tmp_path):
    """(The CLI turns InputError into one line and exit 2: covered for ``compare`` in test_compare.py.)"""
    from label_reg.evaluate import evaluate

    with pytest.raises(InputError) as err:
        evaluate(tmp_path / "nope", tmp_path / "out", progress=False)
    assert "nope" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- found TRUS gland
GLAND_METHODS = ["Coarse", "Coarse (found gland)", "Coarse (true gland)", "MIX+ (found gland)", "MIX+ (true gland)"]


@pytest.fixture(scope="module")
def evaluated_gland(gland_model, tmp_path_factory):
    """The CLI on the trus_gland model (it carries the tiny segmenter), with the network on the true centre too."""
    out = tmp_path_factory.mktemp("evaluate_gland") / "out"
    proc = subprocess.run([str(LABEL_REG), "evaluate", "--model_dir", str(gland_model), "--output_dir", str(out),
                           "--true_gland_model_row", "--figures"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.fixture(scope="module")
def evaluated_paper_with_segmenter(trained_model, trained_segmenter, evaluated_other, phantom_dir,
                                   tmp_path_factory):
    """The paper-pipeline (trus_centre) model with --segmenter_dir: its found-gland and true-gland Coarse rows."""
    from label_reg.evaluate import evaluate

    model_dir, _ = trained_model
    out = tmp_path_factory.mktemp("evaluate_paper_seg") / "out"
    return evaluate(model_dir, out, data_dir=phantom_dir, fold=0, segmenter_dir=trained_segmenter[0],
                    progress=False, evaluator=evaluated_other[1], stream=io.StringIO())


def _by(df, method):
    return df[df["method"] == method].set_index("case").sort_index()


def test_gland_model_rows_columns_and_summary(evaluated_gland, phantom_dir):
    out, proc = evaluated_gland
    df = pd.read_csv(out / "per_case.csv")
    val = _val_names(phantom_dir)
    assert sorted(df["method"].unique()) == sorted(GLAND_METHODS) and len(df) == 5 * len(val)
    for method in GLAND_METHODS:
        assert sorted(df.loc[df["method"] == method, "case"]) == val
    found_rows = df["method"].isin(["Coarse (found gland)", "MIX+ (found gland)"])
    for column in ("segmenter_dsc", "segmenter_centre_error_mm"):
        assert np.isfinite(df.loc[found_rows, column]).all() and df.loc[~found_rows, column].isna().all()
    assert df.loc[found_rows, "segmenter_dsc"].between(0.3, 1.0).all()
    np.testing.assert_array_equal(_by(df, "Coarse (found gland)")["segmenter_dsc"],
                                  _by(df, "MIX+ (found gland)")["segmenter_dsc"])
    assert np.isfinite(df["tre_world_mm"]).all()
    assert df.loc[df["method"].str.startswith("Coarse"), "jacobian_gradient"].isna().all()

    summary = (out / "summary.md").read_text()
    table = [ln.split(" | ")[0][2:] for ln in summary.splitlines() if ln.startswith("| ")]
    assert table[1:6] == GLAND_METHODS  # Coarse rows first, then the model on the found and the true centre
    assert "| TRUS gland segmenter | 4 | " in summary and "the TRUS gland centre found by the segmenter" in summary
    assert "| TRUS gland segmenter | 4 | " in proc.stdout
    progress = [ln for ln in proc.stderr.splitlines() if ln.startswith("[")]
    assert len(progress) == 4 and all("segmenter DSC" in ln for ln in progress)
    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert figures and all(name.split("_")[0] in ("best", "median", "worst") for name in figures)


def test_a_given_method_name_is_suffixed_on_a_gland_model_like_the_default(gland_model, evaluated_gland, phantom_dir,
                                                                            tmp_path):
    """--method on a trus_gland model: the rows read 'NAME (found gland)' and 'NAME (true gland)' (not a bare NAME
    beside a suffixed true-gland row), with the scores of the default-named run; a name that claims the true gland
    is refused before anything is written."""
    from label_reg.errors import InputError
    from label_reg.evaluate import evaluate

    default = pd.read_csv(evaluated_gland[0] / "per_case.csv")
    result = evaluate(gland_model, tmp_path / "named", data_dir=phantom_dir, method="MINE", progress=False,
                      true_gland_model_row=True, stream=io.StringIO(), cache_dir=tmp_path / "cache")
    df = result.per_case
    assert set(df["method"]) - set(GLAND_METHODS) == {"MINE (found gland)", "MINE (true gland)"}
    for row in ("found gland", "true gland"):
        np.testing.assert_allclose(_by(df, f"MINE ({row})")["tre_world_mm"],
                                   _by(default, f"MIX+ ({row})")["tre_world_mm"], rtol=1e-6)
    with pytest.raises(InputError, match="--method"):
        evaluate(gland_model, tmp_path / "refused", data_dir=phantom_dir, method="MINE (true gland)", progress=False,
                 stream=io.StringIO())
    assert not (tmp_path / "refused").exists()


def test_recentred_rows_are_scored_after_the_passes_and_say_how_far_the_anchor_moved(gland_model, evaluated_gland,
                                                                                      trained_model, phantom_dir,
                                                                                      tmp_path):
    """recentre_passes=1: the model row is named '... recentred (found gland)' and its recentre_shift_mm is the
    distance from the found centre to the centre of the gland the found-gland registration warped; a case the anchor
    did not move would score as the plain row. Every other row is as without re-centring. A trus_centre model is
    refused before anything is written."""
    from label_reg import io as lio
    from label_reg.errors import InputError
    from label_reg.evaluate import Evaluator, _Cases, evaluate
    from label_reg.preprocess import gland_centre_of_mass
    from label_reg.recentre import warped_gland_centre_mm
    from label_reg.segmenter import GlandFinder

    default = pd.read_csv(evaluated_gland[0] / "per_case.csv")
    evaluator = Evaluator.from_model_dir(gland_model)
    result = evaluate(gland_model, tmp_path / "recentred", data_dir=phantom_dir, progress=False, recentre_passes=1,
                      stream=io.StringIO(), cache_dir=tmp_path / "cache", evaluator=evaluator)
    df = result.per_case
    assert result.method == "MIX+ recentred (found gland)"
    assert set(df["method"]) == {"Coarse", "Coarse (found gland)", "Coarse (true gland)", result.method}
    rows = _by(df, result.method)
    assert df.loc[df["method"] != result.method, "recentre_shift_mm"].isna().all()
    for method in ("Coarse", "Coarse (found gland)", "Coarse (true gland)"):
        np.testing.assert_allclose(_by(df, method)["tre_world_mm"], _by(default, method)["tre_world_mm"])
    cases = _Cases(evaluator.preprocess_config, tmp_path / "cache", GlandFinder.from_model_dir(gland_model /
                                                                                              "segmenter"))
    pairs = {p.name: p for p in datasets.discover_pairs(phantom_dir)}
    for case, row in rows.iterrows():
        found = cases.found(pairs[case])[0]
        _, warped = evaluator(found)
        anchor = warped_gland_centre_mm(warped[..., 0], found.grid)
        true_centre = gland_centre_of_mass(lio.read_label(pairs[case].fixed_label)[0])
        assert row["recentre_shift_mm"] == pytest.approx(np.linalg.norm(anchor - found.grid.center_world), abs=1e-6)
        assert row["recentre_centre_error_mm"] == pytest.approx(np.linalg.norm(anchor - true_centre), abs=1e-6)
    assert (rows["recentre_shift_mm"] > 0.1).any()
    changed = np.abs(rows["tre_world_mm"] - _by(default, "MIX+ (found gland)")["tre_world_mm"])
    assert (changed > 1e-3).any()  # the row is the second registration's, not the first's
    assert "after 1 re-centring pass(es)" in result.text and "from the TRUS mask's centre" in result.text
    with pytest.raises(InputError, match="--recentre_passes.*trus_centre"):
        evaluate(trained_model[0], tmp_path / "refused", data_dir=phantom_dir, progress=False,
                 recentre_passes=1, stream=io.StringIO())
    assert not (tmp_path / "refused").exists()


def test_found_gland_prealignment_beats_the_volume_centre(evaluated_gland):
    """On the phantoms the TRUS gland is 4-10 mm off the TRUS volume centre: pre-aligning on the gland the
    segmenter finds brings the landmarks closer, and on the true gland centre closest (the ceiling)."""
    out, _ = evaluated_gland
    df = pd.read_csv(out / "per_case.csv")
    tre = {m: _by(df, m)["tre_world_mm"] for m in ("Coarse", "Coarse (found gland)", "Coarse (true gland)")}
    dsc = {m: _by(df, m)["dsc"] for m in tre}
    assert tre["Coarse (found gland)"].mean() < tre["Coarse"].mean() - 1.0
    assert tre["Coarse (true gland)"].mean() <= tre["Coarse (found gland)"].mean() + 0.1
    assert dsc["Coarse (found gland)"].mean() > dsc["Coarse"].mean()
    assert dsc["Coarse (true gland)"].mean() >= dsc["Coarse (found gland)"].mean() - 0.01


def test_gland_model_row_is_scored_on_the_found_centre(evaluated_gland, gland_model, phantom_dir):
    """Recompute each case independently: the segmenter's centre (GlandFinder on the raw TRUS file), the pair
    pre-processed there and on the TRUS mask's centre, the network on both. The model row must be the found-centre
    result and the "(true gland)" row the true-centre one; the two differ, so a model row computed on the true
    centre fails here. The segmenter columns are recomputed on the segmenter grid too."""
    from label_reg import io as lio
    from label_reg import metrics
    from label_reg.evaluate import Evaluator, landmark_centroids_world, world_tre_mm
    from label_reg.preprocess import gland_centre_of_mass, preprocess_pair
    from label_reg.segmenter import GlandFinder, gland_error, segmenter_inputs

    out, _ = evaluated_gland
    df = pd.read_csv(out / "per_case.csv")
    evaluator = Evaluator.from_model_dir(gland_model)
    finder = GlandFinder.from_model_dir(gland_model / "segmenter")
    pairs = {p.name: p for p in datasets.discover_pairs(phantom_dir)}
    found_row, true_row = _by(df, "MIX+ (found gland)"), _by(df, "MIX+ (true gland)")
    differences = []
    for case in found_row.index:
        pair = pairs[case]
        us = lio.read_image(pair.fixed_image)
        labels = lio.read_label(pair.fixed_label)
        estimate = finder.find(us)
        true_centre = gland_centre_of_mass(labels[0])
        assert np.linalg.norm(estimate.centre_mm - true_centre) > 0.1  # the two anchors are distinct points
        centroids = (landmark_centroids_world(labels), landmark_centroids_world(lio.read_label(pair.moving_label)))
        scores = {}
        for name, pre in (("found", preprocess_pair(pair, evaluator.preprocess_config, estimate.centre_mm)),
                          ("true", preprocess_pair(pair, evaluator.preprocess_config))):
            ddf, warped = evaluator(pre)
            scores[name] = (metrics.case_metrics(pre.fixed_label, warped, ddf, pre.grid.spacing)["dsc"],
                            world_tre_mm(*centroids, ddf, pre.grid, pre.translation_mm)[0])
        np.testing.assert_allclose(pre.grid.center_world, true_centre, atol=1e-6)
        assert found_row.loc[case, "dsc"] == pytest.approx(scores["found"][0], abs=1e-6)
        assert found_row.loc[case, "tre_world_mm"] == pytest.approx(scores["found"][1], abs=1e-4)
        assert true_row.loc[case, "tre_world_mm"] == pytest.approx(scores["true"][1], abs=1e-4)
        differences.append(abs(scores["found"][1] - scores["true"][1]))
        truth = segmenter_inputs(us, labels[:1], finder.grid_config)["fixed_label"][..., 0]
        dsc, error = gland_error(estimate, truth, true_centre)
        assert found_row.loc[case, "segmenter_dsc"] == pytest.approx(dsc, abs=1e-6)
        assert found_row.loc[case, "segmenter_centre_error_mm"] == pytest.approx(error, abs=1e-6)
    assert max(differences) > 0.05


def test_paper_model_with_a_segmenter_dir(evaluated_paper_with_segmenter, evaluated, evaluated_gland):
    """--segmenter_dir adds the found- and true-gland Coarse rows to a trus_centre model; its MIX+ row stays on the
    TRUS volume centre (the same numbers as without), and the found-gland rows equal the gland model's (same
    segmenter weights, same grid)."""
    result = evaluated_paper_with_segmenter
    df = result.per_case
    assert list(dict.fromkeys(df["method"])) == ["Coarse", "Coarse (found gland)", "Coarse (true gland)", "MIX+"]
    plain = pd.read_csv(evaluated[0] / "per_case.csv")
    for method in ("Coarse", "MIX+"):
        np.testing.assert_allclose(_by(df, method)["tre_world_mm"].to_numpy(float),
                                   _by(plain, method)["tre_world_mm"].to_numpy(float), atol=1e-9)
    assert _by(df, "MIX+")["segmenter_dsc"].isna().all()
    gland = pd.read_csv(evaluated_gland[0] / "per_case.csv")
    for method in ("Coarse (found gland)", "Coarse (true gland)"):
        ours, theirs = _by(df, method), _by(gland, method)
        for column in ("dsc", "tre_mm", "tre_world_mm", "segmenter_dsc", "segmenter_centre_error_mm"):
            np.testing.assert_allclose(ours[column].to_numpy(float), theirs[column].to_numpy(float), atol=1e-6,
                                       equal_nan=True)
    assert result.segmenter is not None and int(result.segmenter["cases"].iloc[0]) == 4


def test_compare_paper_and_found_gland_pipelines(evaluated_paper_with_segmenter, evaluated_gland):
    from label_reg.compare import compare

    comparison = compare([evaluated_paper_with_segmenter.output_dir / "per_case.csv",
                          evaluated_gland[0] / "per_case.csv"])
    assert list(comparison.summary.index) == ["Coarse", "Coarse (found gland)", "Coarse (true gland)", "MIX+",
                                              "MIX+ (found gland)", "MIX+ (true gland)"]
    assert (comparison.per_case["method"] == "Coarse (found gland)").sum() == 4  # deduplicated, and they agree
    rows = comparison.pvalues
    tre = rows[(rows["method_a"] == "MIX+ (found gland)") & (rows["method_b"] == "MIX+")
               & (rows["metric"] == "tre_world_mm")]
    assert len(tre) == 1 and int(tre["n"].iloc[0]) == 4
    assert ((rows["method_a"] == "Coarse (found gland)") & (rows["method_b"] == "Coarse")).any()
    assert "| ours | MIX+ (found gland) |" in comparison.text and "# TRUS gland segmenter" in comparison.text


def test_found_centre_cases_are_keyed_by_the_segmenter_weights(trained_segmenter, phantom_dir, tmp_path):
    """The three versions of a pair never share a cache entry, and other segmenter weights give other entries."""
    import shutil

    from label_reg import model_dir as md
    from label_reg.evaluate import _Cases
    from label_reg.preprocess import PreprocessConfig
    from label_reg.segmenter import GlandFinder

    config = PreprocessConfig(spacing_mm=3.0, shape=(32, 32, 32), prealign="trus_gland")
    pair = datasets.discover_pairs(phantom_dir)[0]
    cases = _Cases(config, tmp_path / "cache", GlandFinder.from_model_dir(trained_segmenter[0]))
    keys = {name: cache.key(pair) for name, cache in cases.caches.items()}
    assert len(set(keys.values())) == 3

    other = tmp_path / "other_segmenter"
    shutil.copytree(trained_segmenter[0], other)
    model, _, _ = md.load(other)
    kernel = model.get_layer("head").kernel
    kernel.assign(kernel * 1.5)
    model.save_weights(str(other / md.WEIGHTS_FILE))
    retrained = _Cases(config, tmp_path / "cache", GlandFinder.from_model_dir(other))
    assert retrained.caches["found"].key(pair) != keys["found"]
    assert retrained.caches["true"].key(pair) == keys["true"]
    assert retrained.caches["centre"].key(pair) == keys["centre"]


def test_segmenter_options_are_checked(gland_model, trained_model, evaluated_other, tmp_path):
    from label_reg.evaluate import evaluate

    with pytest.raises(InputError, match="--segmenter_dir.*carries"):
        evaluate(gland_model, tmp_path / "a", segmenter_dir=gland_model / "segmenter", progress=False)
    with pytest.raises(InputError, match="is not a TRUS gland segmenter"):
        evaluate(trained_model[0], tmp_path / "b", segmenter_dir=trained_model[0], progress=False,
                 evaluator=evaluated_other[1])
    with pytest.raises(InputError, match="reserved"):
        evaluate(trained_model[0], tmp_path / "c", method="Coarse (found gland)", progress=False,
                 evaluator=evaluated_other[1])
    assert not any((tmp_path / name).exists() for name in "abc")


def test_all_inputs_are_checked_before_any_case_is_scored(trained_model, phantom_dir, tmp_path, capsys):
    """A corrupt label file in the last case stops the run before the first case is scored, and the run leaves
    nothing behind: no output folder, no pre-processing cache inside it."""
    import os

    from label_reg.evaluate import evaluate

    names = [p.name for p in datasets.discover_pairs(phantom_dir)][:3]
    data = tmp_path / "data"
    for folder in datasets.FOLDERS:
        (data / folder).mkdir(parents=True)
        for name in names:
            os.symlink(phantom_dir / folder / f"{name}.nii.gz", data / folder / f"{name}.nii.gz")
    bad = data / "fixed_labels" / f"{names[-1]}.nii.gz"
    bad.unlink()
    bad.write_bytes(b"\x1f\x8b" + b"not really gzip" * 20)
    csv = tmp_path / "cases.csv"
    csv.write_text("case,split\n" + "".join(f"{n},val\n" for n in names))
    out = tmp_path / "out"
    with pytest.raises(InputError) as err:
        evaluate(trained_model[0], out, data_dir=data, cases_csv=csv, stream=io.StringIO())
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    assert "[1/3]" not in capsys.readouterr().err  # no case was scored
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cases.csv", "data"]  # no out/, no out/.cache
