"""The one inference path: a Predictor runs any network with dict inputs, from memory or from a model directory of
any registered network kind, with warping helpers for registration networks."""
import json

import keras
import numpy as np
import pytest

from label_reg import model_dir, network
from label_reg.errors import InputError
from label_reg.predictor import Predictor
from label_reg.preprocess import PreprocessConfig

SHAPE = (16, 16, 16)
GRID = PreprocessConfig(spacing_mm=4.0, shape=SHAPE)


def _probability_model(image_shape):
    """A second kind of network, as a segmenter is: ``fixed_image`` in, a 1-channel probability map out."""
    x = keras.Input(tuple(image_shape) + (1,), name="fixed_image")
    y = keras.layers.Conv3D(1, 3, padding="same", activation="sigmoid", name="head")(x)
    return keras.Model({"fixed_image": x}, y, name="probability")


@pytest.fixture()
def probability_kind():
    kind = model_dir.register_network("probability_test", lambda image_shape: _probability_model(image_shape),
                                      lambda build: {"image_shape": [int(n) for n in build["image_shape"]]})
    yield kind
    model_dir.NETWORKS.pop("probability_test")


def test_a_second_kind_of_network_loads_and_runs(probability_kind, tmp_path):
    keras.utils.set_random_seed(0)
    model = _probability_model(SHAPE)
    path = tmp_path / "model"
    model_dir.save(path, model, {"image_shape": SHAPE}, GRID, network="probability_test")
    assert json.loads((path / model_dir.INFO_FILE).read_text())["network"] == "probability_test"

    predictor = Predictor.from_model_dir(path, batch_size=1)
    assert predictor.input_names == ("fixed_image",) and predictor.output_channels == 1
    assert not predictor.is_registration and predictor.preprocess_config == GRID
    rng = np.random.default_rng(0)
    for _ in range(2):
        case = {"fixed_image": rng.random(SHAPE, dtype=np.float32), "moving_image": np.zeros(SHAPE, np.float32)}
        out = predictor.predict(case)
        assert out.shape == SHAPE + (1,)
        expected = model({"fixed_image": case["fixed_image"][None, ..., None]}).numpy()[0]
        np.testing.assert_allclose(out, expected, atol=1e-6)
    assert predictor.forward.experimental_get_tracing_count() == 1
    with pytest.raises(ValueError, match="not a registration network"):
        predictor.warp(case["fixed_image"], np.zeros(SHAPE + (3,), np.float32))

    info = json.loads((path / model_dir.INFO_FILE).read_text())
    (path / model_dir.INFO_FILE).write_text(json.dumps(dict(info, network="no_such_network")))
    with pytest.raises(InputError, match="unknown network 'no_such_network'"):
        Predictor.from_model_dir(path)


def test_registration_inputs_warps_and_grid_check(tmp_path):
    model = network.build_model(SHAPE, moving_label_input=True, base_filters=2)
    predictor = Predictor(model)
    assert predictor.input_names == network.INPUT_NAMES and predictor.is_registration
    rng = np.random.default_rng(1)
    labels = (rng.random(SHAPE + (2,)) > 0.5).astype(np.float32)
    case = {"moving_image": rng.random(SHAPE), "fixed_image": rng.random(SHAPE), "moving_label": labels}
    inputs = predictor.case_inputs(case)
    assert {k: v.shape for k, v in inputs.items()} == {k: (1,) + SHAPE + (1,) for k in network.INPUT_NAMES}
    np.testing.assert_array_equal(inputs["moving_label"][0, ..., 0], labels[..., 0])  # label inputs: the gland
    assert np.all(predictor.predict(case) == 0.0)  # untrained: the identity

    shift = np.zeros(SHAPE + (3,), np.float32)
    shift[..., 0] = 1.0  # out(x) = volume(x + 1) along the first axis
    warped = predictor.warp(labels, shift, "zero")
    np.testing.assert_allclose(warped[:-1], labels[1:], atol=1e-6)
    assert np.all(warped[-1] == 0.0)  # beyond the border: zero
    volume = labels[..., 1]
    np.testing.assert_allclose(predictor.warp(volume, shift, "replicate")[-1], volume[-1], atol=1e-6)

    path = tmp_path / "model"
    model_dir.save(path, model, {"image_shape": SHAPE, "moving_label_input": True, "base_filters": 2},
                   PreprocessConfig(spacing_mm=4.0, shape=(16, 16, 20)))
    with pytest.raises(InputError, match="differs from the network input shape"):
        Predictor.from_model_dir(path)
