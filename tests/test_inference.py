"""The batch-norm-folded inference model equals the Keras model in inference mode, eagerly and inside the
predictor's traced forward."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from label_reg import inference, network
from label_reg.predictor import Predictor


def _randomise(model, rng, negative_gamma=False):
    """Random kernels (DDF heads included, which start at zero) and non-trivial batch-norm statistics."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            gamma = rng.uniform(0.5, 1.5, n)
            if negative_gamma:
                gamma[::3] *= -1.0
            layer.set_weights([gamma, rng.normal(0, 0.3, n), rng.normal(0, 0.5, n), rng.uniform(0.5, 2.0, n)])
        elif isinstance(layer, keras.layers.Dense):  # the global affine head
            layer.set_weights([rng.normal(0, 0.1, layer.kernel.shape), rng.normal(0, 0.05, layer.bias.shape)])
        elif getattr(layer, "kernel", None) is not None:
            shape = layer.kernel.shape
            fan_in = np.prod(shape[:3]) * (shape[4] if isinstance(layer, keras.layers.Conv3DTranspose) else shape[3])
            layer.set_weights([rng.normal(0, 1 / np.sqrt(fan_in), shape), rng.normal(0, 0.1, layer.bias.shape)])


def _inputs(model, rng, batch=2):
    return {k: rng.random((batch,) + tuple(model.input[k].shape[1:]), dtype=np.float32) for k in model.input}


@pytest.mark.parametrize("shape, three_inputs, negative_gamma, global_affine", [
    ((32, 32, 32), True, False, False),
    ((32, 32, 32), False, False, False),
    ((32, 32, 24), True, True, False),  # padded inside the model; BNs with a negative scale stay as affines
    ((32, 32, 24), True, False, "average"),  # the global affine stage: its head reads the bottom BN's carried shift
    ((32, 32, 32), False, True, "average"),
    ((48, 32, 32), True, False, "flatten"),  # flattened head: the shift is tiled over the 3x2x2 bottom voxels
])
def test_folded_model_gives_the_same_ddf(shape, three_inputs, negative_gamma, global_affine):
    rng = np.random.default_rng(1)
    model = network.build_model(shape, moving_label_input=three_inputs, global_affine=bool(global_affine),
                                affine_pooling=global_affine or "average")
    _randomise(model, rng, negative_gamma)
    folded = inference.fold_batchnorm(model)
    assert sorted(folded.input) == sorted(model.input)
    assert not any(isinstance(l, keras.layers.BatchNormalization) for l in folded.layers)
    bns = [l.name for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert sorted(folded.fold_report) == sorted(bns)
    kept = [n for n, how in folded.fold_report.items() if "kept" in how]
    assert bool(kept) == negative_gamma
    assert all("_res_bn" not in n for n in kept)  # conv -> BN always folds

    x = _inputs(model, rng)
    reference = model(x, training=False).numpy()
    assert np.abs(reference).max() > 0.5  # a DDF worth comparing
    tol = 1e-5 * max(1.0, float(np.abs(reference).max()))
    np.testing.assert_allclose(folded(x).numpy(), reference, rtol=0, atol=tol)
    # Traced: TF's graph rewrite fuses ops here (it once broke the residual blocks), so compare graph mode too.
    forward = Predictor(folded).forward
    np.testing.assert_allclose(forward(x).numpy(), reference, rtol=0, atol=tol)
    np.testing.assert_allclose(Predictor(model).forward(x).numpy(), reference, rtol=0, atol=tol)
    assert network.has_global_affine(folded) == bool(global_affine)
    assert network.affine_pooling_of(folded) == network.affine_pooling_of(model) == (global_affine or None)
    if global_affine:
        stages, folded_stages = network.stage_model(model)(x, training=False), network.stage_model(folded)(x)
        assert np.abs(stages["affine"].numpy() - np.eye(3, 4)).max() > 0.05  # a real affine
        affine_tol = 1e-5 * max(1.0, float(np.abs(stages["affine"].numpy()).max()))
        np.testing.assert_allclose(folded_stages["affine"].numpy(), stages["affine"].numpy(), rtol=0, atol=affine_tol)
        np.testing.assert_allclose(folded_stages["ddf_local"].numpy(), stages["ddf_local"].numpy(), rtol=0, atol=tol)


def test_predictor_forward_takes_any_batch_with_one_trace():
    rng = np.random.default_rng(2)
    model = network.build_model((32, 32, 32), moving_label_input=False, base_filters=2)
    predictor = Predictor(model)
    spec = predictor.signature()
    assert all(s.dtype == tf.float32 and s.shape[0] is None for s in spec.values())
    assert predictor.input_names == ("moving_image", "fixed_image") and predictor.output_channels == 3
    forward = predictor.forward
    assert forward(_inputs(model, rng, 1)).shape == (1, 32, 32, 32, 3)
    assert forward(_inputs(model, rng, 3)).shape == (3, 32, 32, 32, 3)
    assert forward.experimental_get_tracing_count() == 1
    with pytest.raises((TypeError, ValueError)):
        forward({"moving_image": np.zeros((1, 16, 16, 16, 1), np.float32),
                 "fixed_image": np.zeros((1, 16, 16, 16, 1), np.float32)})


def test_flop_count_matches_the_layers():
    model = network.build_model((32, 32, 32), moving_label_input=True)
    flops = inference.count_forward_flops(model)
    first = 2 * 32 ** 3 * 4 ** 3 * 3 * 4  # down0_conv: 2 x voxels x taps x in x out
    assert flops["conv"] > first
    assert inference.count_forward_flops(model, batch_size=5)["conv"] == pytest.approx(5 * flops["conv"])
    folded = inference.fold_batchnorm(model)
    assert inference.count_forward_flops(folded)["conv"] == pytest.approx(flops["conv"])
    assert inference.count_forward_flops(folded)["other"] < flops["other"]


def test_rejects_a_model_that_is_not_the_registration_network():
    inputs = {"moving_image": keras.Input((16, 16, 16, 1), name="moving_image"),
              "fixed_image": keras.Input((16, 16, 16, 1), name="fixed_image")}
    out = keras.layers.Conv3D(3, 3, padding="same")(keras.layers.Concatenate()(list(inputs.values())))
    with pytest.raises(ValueError, match="build_model"):
        inference.fold_batchnorm(keras.Model(inputs, out))

