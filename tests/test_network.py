"""The U-Net: shapes, parameter counts, identity at initialisation, and that it learns."""
import numpy as np
import pytest
import tensorflow as tf

from label_reg import losses, network
from label_reg.layers import warp

SHAPE = (32, 32, 32)


@pytest.fixture(scope="module")
def mixplus():
    return network.build_model(SHAPE, moving_label_input=True)


def test_inputs_outputs_and_identity_at_initialisation(mixplus):
    assert sorted(mixplus.input) == ["fixed_image", "moving_image", "moving_label"]
    rng = np.random.default_rng(0)
    inputs = {k: rng.random((2,) + SHAPE + (1,)).astype(np.float32) for k in mixplus.input}
    ddf = mixplus(inputs, training=False).numpy()
    assert ddf.shape == (2,) + SHAPE + (3,)
    assert np.all(ddf == 0.0)


def test_parameter_counts_follow_the_architecture():
    two = network.build_model(SHAPE, moving_label_input=False)
    three = network.build_model(SHAPE, moving_label_input=True)
    assert sorted(two.input) == ["fixed_image", "moving_image"]
    # Only the first convolution sees the extra input channel: 4x4x4 taps x 4 filters more.
    assert three.count_params() - two.count_params() == 4 * 4 * 4 * 4
    assert two.count_params() == 433691  # the paper's filters 4..64; changes only if the architecture does
    first = two.get_layer("down0_conv")
    assert first.kernel.shape == (4, 4, 4, 2, 4)
    assert two.get_layer("bottom_conv").kernel.shape == (4, 4, 4, 32, 64)
    assert two.get_layer("up0_res_conv1").kernel.shape == (3, 3, 3, 4, 4)
    heads = [l for l in two.layers if l.name.startswith("ddf_level")]
    assert len(heads) == 5 and all(l.filters == 3 for l in heads)


def test_shapes_that_are_not_multiples_of_16_work():
    model = network.build_model((48, 48, 40), moving_label_input=False, base_filters=2)
    inputs = {k: np.zeros((1, 48, 48, 40, 1), np.float32) for k in model.input}
    assert model(inputs).shape == (1, 48, 48, 40, 3)
    # Also inside a traced graph (where TF's oneDNN rewrite once broke a padded model).
    assert tf.function(lambda x: model(x, training=False))(inputs).shape == (1, 48, 48, 40, 3)
    with pytest.raises(ValueError, match="at least 16"):
        network.build_model((8, 32, 32))


def _sphere(centre, radius=6):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1)
    return (np.linalg.norm(grid - np.asarray(centre), axis=-1) <= radius).astype(np.float32)[None, ..., None]


def test_a_few_steps_on_shifted_spheres_lower_the_loss():
    tf.keras.utils.set_random_seed(0)  # before building: the initial weights must not depend on test order
    model = network.build_model(SHAPE, moving_label_input=True)
    fixed, moving = _sphere((14, 16, 16)), _sphere((18, 16, 16))
    inputs = {"moving_image": moving, "fixed_image": fixed, "moving_label": moving}
    optimizer = tf.keras.optimizers.Adam(3e-3)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            ddf = model(inputs, training=True)
            loss = losses.registration_loss(0.5, 0.0, fixed, warp(moving, ddf, "zero"), None, None, ddf)["total"]
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return tf.reduce_mean(loss)

    history = [float(step()) for _ in range(15)]
    assert max(history[-3:]) < 0.8 * history[0], history
