"""label_reg.model_dir: the JSON is checked field by field, weights against the settings, data paths stored absolute."""
import json
import os
import shutil

import pytest

from label_reg import model_dir, network
from label_reg.errors import InputError
from label_reg.preprocess import PreprocessConfig

SHAPE = (16, 16, 16)
CONFIG = PreprocessConfig(spacing_mm=4.0, shape=SHAPE)


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory):
    """A two-input model with 2 base filters, saved with a relative data folder in its training section."""
    root = tmp_path_factory.mktemp("model_dir")
    model = network.build_model(SHAPE, moving_label_input=False, base_filters=2)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        model_dir.save("model", model, {"image_shape": SHAPE, "moving_label_input": False, "base_filters": 2}, CONFIG,
                       {"training": {"data_dir": "data/phantoms", "cases_csv": "", "cache_dir": "cache",
                                     "model_dir": "model"}})
    finally:
        os.chdir(cwd)
    return root / "model"


def _edited(src, tmp_path, edit):
    dst = tmp_path / "edited"
    shutil.copytree(src, dst)
    info = json.loads((dst / model_dir.INFO_FILE).read_text())
    edit(info)
    (dst / model_dir.INFO_FILE).write_text(json.dumps(info))
    return dst


def test_training_data_paths_are_stored_absolute(small_model_dir):
    info, _ = model_dir.read_info(small_model_dir)
    root = small_model_dir.parent.resolve()
    assert info["training"]["data_dir"] == str(root / "data" / "phantoms")
    assert info["training"]["cache_dir"] == str(root / "cache")
    assert info["training"]["cases_csv"] == ""  # not set: stays empty


@pytest.mark.parametrize("field, value", [("image_shape", ["16", "16", "16"]), ("image_shape", [16.0, 16, 16]),
                                          ("image_shape", [16, 16]), ("base_filters", "2"), ("base_filters", 2.5),
                                          ("moving_label_input", "false")])
def test_build_values_must_have_their_types(small_model_dir, tmp_path, field, value):
    path = _edited(small_model_dir, tmp_path, lambda info: info["build"].__setitem__(field, value))
    with pytest.raises(InputError) as err:
        model_dir.read_info(path)
    assert str(path / model_dir.INFO_FILE) in str(err.value) and field in str(err.value)


def test_preprocess_errors_name_the_file(small_model_dir, tmp_path):
    path = _edited(small_model_dir, tmp_path, lambda info: info["preprocess"].__setitem__("spacing_mm", -1))
    with pytest.raises(InputError) as err:
        model_dir.read_info(path)
    assert str(path / model_dir.INFO_FILE) in str(err.value) and "spacing_mm" in str(err.value)


@pytest.mark.parametrize("edit, said", [
    (lambda b: b.__setitem__("base_filters", 4), "base_filters 4 and 2 inputs"),
    (lambda b: b.__setitem__("moving_label_input", True), "base_filters 2 and 3 inputs"),
])
def test_settings_that_do_not_match_the_weights_are_one_clear_error(small_model_dir, tmp_path, recwarn, edit, said):
    """Keras would warn once per layer and fail with a message cut off mid-sentence."""
    path = _edited(small_model_dir, tmp_path, lambda info: edit(info["build"]))
    with pytest.raises(InputError) as err:
        model_dir.load(path)
    msg = str(err.value)
    assert msg.startswith(str(path / model_dir.WEIGHTS_FILE)) and "\n" not in msg
    assert f"describes a network with {said}" in msg and "the weights are of one with base_filters 2" in msg
    assert not [w for w in recwarn if "keras" in str(w.filename)], [str(w.message) for w in recwarn]


def test_unreadable_weights_are_one_clear_error(small_model_dir, tmp_path):
    path = _edited(small_model_dir, tmp_path, lambda info: None)
    (path / model_dir.WEIGHTS_FILE).write_bytes(b"not an h5 file")
    with pytest.raises(InputError) as err:
        model_dir.load(path)
    assert str(path / model_dir.WEIGHTS_FILE) in str(err.value) and "\n" not in str(err.value)
    model, info, config = model_dir.load(small_model_dir)  # the untouched directory loads
    assert info["build"]["base_filters"] == 2 and config == CONFIG
