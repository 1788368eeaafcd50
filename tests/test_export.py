"""SavedModel export for TF Serving: named signature, dynamic batch, same DDF as the Keras model, atomic writes."""
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from label_reg import datasets, model_dir, network, preprocess
from label_reg.errors import InputError
from label_reg.export import LABEL_SIGNATURE, SEGMENT_SIGNATURE, SIGNATURE, export

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")


@pytest.fixture(scope="module")
def exported(trained_model, tmp_path_factory):
    """The trained MIX+ model exported through the command line."""
    sm = tmp_path_factory.mktemp("export") / "sm"
    run = subprocess.run([sys.executable, "-m", "label_reg.cli", "export", "--model", str(trained_model[0]),
                          "--output_dir", str(sm)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "serving_default inputs: moving_image, fixed_image, moving_label" in run.stdout
    return sm


@pytest.fixture(scope="module")
def heldout_inputs(trained_model, phantom_dir):
    """Pre-processed held-out phantoms as model inputs, batch 2, (2, X, Y, Z, 1) float32."""
    _, _, config = model_dir.load(trained_model[0])
    pairs = datasets.discover_pairs(phantom_dir)
    heldout = set(datasets.kfold_split([p.name for p in pairs], 5, 0, 0)[1])
    cases = [preprocess.preprocess_pair(p, config) for p in pairs if p.name in heldout][:2]
    return {"moving_image": np.stack([c.moving_image[..., None] for c in cases]),
            "fixed_image": np.stack([c.fixed_image[..., None] for c in cases]),
            "moving_label": np.stack([c.moving_label[..., :1] for c in cases])}


def test_version_folder_layout(exported, trained_model):
    assert sorted(p.name for p in exported.iterdir()) == ["1"]  # no temporary folders left
    version = exported / "1"
    assert (version / "saved_model.pb").is_file() and (version / "variables").is_dir()
    assert (version / "label_reg.json").read_bytes() == (trained_model[0] / "label_reg.json").read_bytes()
    info = json.loads((version / "label_reg.json").read_text())
    assert info["preprocess"]["shape"] == [32, 32, 32] and info["build"]["moving_label_input"] is True


def test_savedmodel_gives_the_keras_ddf_for_batch_1_and_2(exported, trained_model, heldout_inputs):
    import tensorflow as tf

    from label_reg.layers import warp

    keras_model, _, _ = model_dir.load(trained_model[0])
    serve = tf.saved_model.load(str(exported / "1")).signatures[SIGNATURE]
    assert set(serve.structured_input_signature[1]) == {"moving_image", "fixed_image", "moving_label"}
    for batch in (1, 2):
        inputs = {k: tf.constant(v[:batch]) for k, v in heldout_inputs.items()}
        out = serve(**inputs)
        assert set(out) == {"ddf", "warped_moving_image", "warped_moving_label"}
        expected = keras_model(inputs, training=False).numpy()
        assert out["ddf"].shape == (batch, 32, 32, 32, 3) and np.abs(expected).max() > 0.1
        np.testing.assert_allclose(out["ddf"].numpy(), expected, atol=1e-5)
        np.testing.assert_allclose(out["warped_moving_image"].numpy(),
                                   warp(inputs["moving_image"], expected, "replicate").numpy(), atol=1e-4)
        label = (warp(inputs["moving_label"], expected, "zero").numpy() >= 0.5).astype(np.float32)
        assert np.mean(out["warped_moving_label"].numpy() != label) < 1e-3  # thresholded, same up to ties


def test_saved_model_cli_lists_the_named_inputs(exported):
    cli = pathlib.Path(sys.executable).parent / "saved_model_cli"
    run = subprocess.run([str(cli), "show", "--dir", str(exported / "1"), "--tag_set", "serve",
                          "--signature_def", "serving_default"], env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    for name in ("moving_image", "fixed_image", "moving_label"):
        assert f"inputs['{name}']" in run.stdout
    for name in ("ddf", "warped_moving_image", "warped_moving_label"):
        assert f"outputs['{name}']" in run.stdout
    # inputs: spatial sizes checked in the graph (so a wrong one meets the check); outputs: the model's sizes
    assert run.stdout.count("shape: (-1, -1, -1, -1, 1)") == 3
    assert run.stdout.count("shape: (-1, 32, 32, 32, 1)") == 2 and "shape: (-1, 32, 32, 32, 3)" in run.stdout


def test_two_input_model_and_replacing_a_version(tmp_path):
    import tensorflow as tf

    shape = (16, 16, 16)
    source = tmp_path / "model"
    model = network.build_model(shape, moving_label_input=False, base_filters=2)
    model_dir.save(source, model, {"image_shape": shape, "moving_label_input": False, "base_filters": 2},
                   preprocess.PreprocessConfig(spacing_mm=4.0, shape=shape))
    sm = tmp_path / "sm"
    (sm / "1").mkdir(parents=True)
    (sm / "1" / "old.txt").write_text("previous export")
    path = export(source, sm, version=1)
    assert path == sm / "1" and not (path / "old.txt").exists()
    assert sorted(p.name for p in sm.iterdir()) == ["1"]  # the old version moved aside, then removed
    loaded = tf.saved_model.load(str(path))
    serve, with_label = loaded.signatures[SIGNATURE], loaded.signatures[LABEL_SIGNATURE]
    assert set(serve.structured_input_signature[1]) == {"moving_image", "fixed_image"}
    assert set(with_label.structured_input_signature[1]) == {"moving_image", "fixed_image", "moving_label"}
    volume = tf.random.uniform((3,) + shape + (1,), seed=1)
    out = serve(moving_image=volume, fixed_image=volume)
    assert set(out) == {"ddf", "warped_moving_image"} and out["ddf"].shape == (3,) + shape + (3,)
    labelled = with_label(moving_image=volume, fixed_image=volume, moving_label=tf.cast(volume > 0.5, tf.float32))
    np.testing.assert_array_equal(labelled["warped_moving_label"].numpy(), (volume.numpy() > 0.5))  # zero DDF


def test_export_of_a_non_model_writes_nothing(tmp_path):
    (tmp_path / "not_a_model").mkdir()
    with pytest.raises(InputError, match="not_a_model"):
        export(tmp_path / "not_a_model", tmp_path / "sm")
    assert not (tmp_path / "sm").exists()


# ------------------------------------------------------------------------------------------------ segmenter
@pytest.fixture(scope="module")
def gland_exported(gland_model, tmp_path_factory):
    """The trus_gland model (carrying the tiny segmenter) exported through the command line."""
    sm = tmp_path_factory.mktemp("gland_export") / "sm"
    run = subprocess.run([sys.executable, "-m", "label_reg.cli", "export", "--model_dir", str(gland_model),
                          "--output_dir", str(sm)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "segment_gland input: fixed_image float32 (batch, 32, 32, 32, 1), the whole TRUS at 3 mm" in run.stdout
    return sm / "1"


def test_model_without_segmenter_has_no_segment_gland_signature(exported):
    import tensorflow as tf

    loaded = tf.saved_model.load(str(exported / "1"))
    assert set(loaded.signatures) == {SIGNATURE}
    assert "segmenter" not in json.loads((exported / "1" / "label_reg.json").read_text())


def test_export_describes_the_segmenter_grid_and_mask_rule(gland_exported, gland_model, trained_segmenter):
    info = json.loads((gland_exported / "label_reg.json").read_text())
    source = json.loads((gland_model / "label_reg.json").read_text())
    seg_source = json.loads((trained_segmenter[0] / "label_reg.json").read_text())
    assert info["preprocess"] == source["preprocess"] and info["preprocess"]["prealign"] == "trus_gland"
    assert info["build"] == source["build"]  # the registration description is kept as it is
    seg = info["segmenter"]
    assert (seg["signature"], seg["input"], seg["output"]) == (SEGMENT_SIGNATURE, "fixed_image", "gland_probability")
    grid = seg_source["preprocess"]
    assert {k: seg["preprocess"][k] for k in ("spacing_mm", "shape", "clip_percentile")} == \
        {k: grid[k] for k in ("spacing_mm", "shape", "clip_percentile")}
    assert seg["preprocess"]["shape"] == [32, 32, 32] and seg["preprocess"]["spacing_mm"] == 3.0
    assert seg["mask"]["threshold"] == preprocess.THRESHOLD and seg["mask"]["connectivity"] == 26
    assert seg["build"] == seg_source["build"] and seg["best_step"] == seg_source["best_step"]
    assert seg["source"] == source["segmenter"]["source"] and "dir" not in seg  # no segmenter folder in the export


def test_segment_gland_matches_the_gland_finder_and_the_chain_matches_the_predictor(gland_exported, gland_model,
                                                                                   phantom_dir):
    """The README's client sequence, with the SavedModel in place of the Python predictors: segment_gland gives
    GlandFinder's probability; the centre found from it pre-aligns the pair; serving_default then gives the
    registration predictor's DDF."""
    import tensorflow as tf

    from label_reg import io as lio
    from label_reg import segmenter
    from label_reg.predictor import Predictor

    loaded = tf.saved_model.load(str(gland_exported))
    assert set(loaded.signatures) == {SIGNATURE, SEGMENT_SIGNATURE}
    segment, serve = loaded.signatures[SEGMENT_SIGNATURE], loaded.signatures[SIGNATURE]
    assert set(segment.structured_input_signature[1]) == {"fixed_image"}
    assert set(segment.structured_outputs) == {"gland_probability"}
    info = json.loads((gland_exported / "label_reg.json").read_text())
    seg_grid = preprocess.PreprocessConfig(**{k: info["segmenter"]["preprocess"][k]
                                              for k in ("spacing_mm", "shape", "clip_percentile")})
    carried = model_dir.segmenter_path(gland_model, model_dir.read_info(gland_model)[0])
    assert carried is not None
    finder = segmenter.GlandFinder.from_model_dir(carried)
    predictor = Predictor.from_model_dir(gland_model)
    pairs = datasets.discover_pairs(phantom_dir)
    heldout = set(datasets.kfold_split([p.name for p in pairs], 5, 0, 0)[1])
    pairs = [p for p in pairs if p.name in heldout][:2]
    us = [lio.read_image(p.fixed_image) for p in pairs]
    # (1) the TRUS on the segmenter grid, (2) segment_gland, batch of 2
    views = [segmenter.segmenter_inputs(image, None, seg_grid, "trus") for image in us]
    out = segment(fixed_image=tf.constant(np.stack([v["fixed_image"][..., None] for v in views])))
    probability = out["gland_probability"].numpy()
    assert probability.shape == (2, 32, 32, 32, 1)
    for i, (pair, image, view) in enumerate(zip(pairs, us, views)):
        expected, grid = finder.probability(image)
        assert grid == view["grid"] and expected.max() > 0.5 > expected.min()
        np.testing.assert_allclose(probability[i, ..., 0], expected, atol=1e-5)
        # (3) largest component >= 0.5 and its world centre
        found = segmenter.estimate_gland(probability[i, ..., 0], view["grid"], lio.Geometry.from_image(image))
        reference = finder.find(image)
        assert found.found and np.array_equal(found.mask, reference.mask)
        np.testing.assert_allclose(found.centre_mm, reference.centre_mm, atol=1e-6)
        # (4) pre-processed on the found centre, (5) serving_default gives the registration predictor's DDF
        case = preprocess.preprocess_pair(dataclasses.replace(pair, fixed_label=None), predictor.preprocess_config,
                                          fixed_centre_mm=found.centre_mm)
        inputs = {name: tf.constant(value) for name, value in predictor.case_inputs(case).items()}
        ddf = serve(**inputs)["ddf"].numpy()[0]
        expected_ddf = predictor.predict(case)
        assert np.abs(expected_ddf).max() > 0.1
        np.testing.assert_allclose(ddf, expected_ddf, atol=1e-5)


BAD_REQUESTS = {  # case: (change to a good batch-2 request, what the error says after "label_reg input check: ")
    "zero_batch": (lambda g: {k: v[:0] for k, v in g.items()}, "moving_image holds an empty batch (0 samples)"),
    "wrong_size": (lambda g: {**g, "fixed_image": g["fixed_image"][:, :16]},
                   "fixed_image must have shape (batch, 32, 32, 32, 1); it has shape] [2 16 32 32 1]"),
    "wrong_rank": (lambda g: {**g, "moving_image": g["moving_image"][..., 0]},
                   "moving_image must have shape (batch, 32, 32, 32, 1); it has shape] [2 32 32 32]"),
    "batch_differs": (lambda g: {**g, "moving_label": g["moving_label"][:1]},
                      "moving_label has batch size] [1] [but moving_image has] [2]"),
    "nan": (lambda g: {**g, "fixed_image": g["fixed_image"] * float("nan")}, "fixed_image holds NaN or Inf voxels"),
    "inf": (lambda g: {**g, "moving_label": g["moving_label"] / 0.0}, "moving_label holds NaN or Inf voxels"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_the_serving_signature_checks_its_inputs(exported, heldout_inputs, case):
    """Bad requests fail with a message saying what is wrong, not with an error from deep inside the graph ("Must
    provide as many biases...", "Incompatible shapes...", a GatherV2 index of -2147483648)."""
    import tensorflow as tf

    serve = tf.saved_model.load(str(exported / "1")).signatures[SIGNATURE]
    change, words = BAD_REQUESTS[case]
    good = {k: tf.constant(v) for k, v in heldout_inputs.items()}  # batch 2
    with pytest.raises(tf.errors.InvalidArgumentError) as err:
        serve(**change(good))
    assert f"label_reg input check: {words}" in err.value.message, err.value.message


def test_export_to_an_unwritable_folder_fails_before_the_model_loads(trained_model, tmp_path, readonly_dir):
    import shutil

    broken = tmp_path / "broken_model"
    shutil.copytree(trained_model[0], broken, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    (broken / "model.weights.h5").write_bytes(b"garbage")
    run = subprocess.run([sys.executable, "-m", "label_reg.cli", "export", "--model", str(broken), "--output_dir",
                          str(readonly_dir / "sm")], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [
        line for line in run.stderr.strip().splitlines() if line.startswith(f"label-reg export: error: "
                                                                          f"{readonly_dir / 'sm'}: cannot write")]
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_replacing_a_version_is_reported(exported, trained_model, tmp_path):
    import shutil

    sm = tmp_path / "sm"
    shutil.copytree(exported, sm)  # version 1 exported before
    run = subprocess.run([sys.executable, "-m", "label_reg.cli", "export", "--model", str(trained_model[0]),
                          "--output_dir", str(sm)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stderr.strip() == f"label-reg export: replaced the earlier version folder {sm / '1'}"
    assert sorted(p.name for p in sm.iterdir()) == ["1"]
