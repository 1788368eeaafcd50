"""Warp, resize, smoothing and affine augmentation against independent references (scipy) and exact properties."""
import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from label_reg import layers

SCIPY_MODE = {"replicate": "nearest", "zero": "grid-constant"}


def _scipy_warp(image, ddf, boundary):
    """Reference pull warp with scipy: out(x) = image(x + ddf(x)), per sample and channel."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in ddf.shape[1:4]], indexing="ij"), -1)
    out = np.empty(ddf.shape[:4] + image.shape[-1:], np.float64)
    for b in range(image.shape[0]):
        coords = np.moveaxis(grid + ddf[b], -1, 0)
        for c in range(image.shape[-1]):
            out[b, ..., c] = ndimage.map_coordinates(image[b, ..., c].astype(np.float64), coords, order=1,
                                                     mode=SCIPY_MODE[boundary], cval=0.0)
    return out


@pytest.fixture(scope="module")
def volume():
    rng = np.random.default_rng(0)
    return rng.random((2, 11, 9, 7, 2)).astype(np.float32)


@pytest.mark.parametrize("boundary", ["replicate", "zero"])
def test_zero_ddf_returns_image_bit_for_bit(volume, boundary):
    out = layers.Warp(boundary)([volume, np.zeros(volume.shape[:4] + (3,), np.float32)]).numpy()
    assert np.array_equal(out, volume)  # last slice included


@pytest.mark.parametrize("boundary", ["replicate", "zero"])
def test_smooth_random_ddf_matches_scipy(volume, boundary):
    rng = np.random.default_rng(1)
    ddf = ndimage.gaussian_filter(rng.normal(size=volume.shape[:4] + (3,)), (0, 2, 2, 2, 0))
    ddf = (ddf / np.abs(ddf).max() * 4.0).astype(np.float32)  # up to 4 voxels: reaches past the edges
    out = layers.Warp(boundary)([volume, ddf]).numpy()
    np.testing.assert_allclose(out, _scipy_warp(volume, ddf, boundary), atol=1e-5)


def test_integer_shift_moves_volume_exactly(volume):
    ddf = np.zeros(volume.shape[:4] + (3,), np.float32)
    ddf[..., 0], ddf[..., 2] = 2.0, -1.0
    out = layers.Warp("zero")([volume, ddf]).numpy()
    np.testing.assert_array_equal(out[:, :-2, :, 1:], volume[:, 2:, :, :-1])
    assert np.all(out[:, -2:] == 0) and np.all(out[:, :, :, 0] == 0)


@pytest.mark.parametrize("boundary", ["replicate", "zero"])
def test_hand_written_gradients_match_finite_differences(boundary):
    """sample_trilinear's custom gradient, for the image and the coordinates, against central differences (float64),
    with points inside, near and outside the edges."""
    import tensorflow as tf
    rng = np.random.default_rng(11)
    image = tf.constant(rng.normal(size=(2, 4, 5, 3, 2)))
    coords = rng.uniform(-1.5, 5.5, size=(2, 3, 2, 2, 3))
    coords = np.where(np.abs(coords - np.round(coords)) < 0.05, coords + 0.1, coords)  # away from the kinks
    theoretical, numerical = tf.test.compute_gradient(lambda im, xyz: layers.sample_trilinear(im, xyz, boundary),
                                                      [image, tf.constant(coords)], delta=1e-4)
    for t, n in zip(theoretical, numerical):
        np.testing.assert_allclose(t, n, atol=1e-6)
    assert np.abs(theoretical[1]).max() > 0.1


def test_warp_gradient_wrt_ddf_is_finite_and_nonzero(volume):
    ddf = tf.Variable(np.full(volume.shape[:4] + (3,), 0.3, np.float32))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layers.Warp()([tf.constant(volume), ddf]) ** 2)
    grad = tape.gradient(loss, ddf).numpy()
    assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 1e-3


def test_warp_config_roundtrip():
    layer = layers.Warp("zero", name="w")
    assert layers.Warp.from_config(layer.get_config()).boundary == "zero"
    with pytest.raises(ValueError):
        layers.Warp("wrap")


def test_resize3d_keeps_a_linear_ramp_linear():
    ramp = np.broadcast_to(np.arange(8, dtype=np.float32)[:, None, None], (8, 6, 4))[None, ..., None]
    up = layers.Resize3D((16, 12, 8))(ramp).numpy()[0, ..., 0]
    # Half-voxel aligned: fine voxel i sits at coarse position (i + 0.5) / 2 - 0.5 (clamped at the edges).
    expected = np.clip((np.arange(16) + 0.5) / 2 - 0.5, 0, 7)
    np.testing.assert_allclose(up[:, 3, 2], expected, atol=1e-5)
    np.testing.assert_allclose(up, np.broadcast_to(up[:, :1, :1], up.shape), atol=1e-6)


def test_gaussian_kernel_truncated_and_normalised():
    taps = layers.gaussian_kernel1d(2.0)
    assert taps.size == 2 * 6 + 1 and abs(taps.sum() - 1) < 1e-6 and taps.argmax() == 6
    assert layers.gaussian_kernel1d(0).tolist() == [1.0]


def test_gaussian_smoothing_matches_scipy_and_sigma_zero_is_identity(volume):
    sigma = 1.5
    out = layers.GaussianSmooth(sigma)(volume).numpy()
    taps = layers.gaussian_kernel1d(sigma).astype(np.float64)
    ref = volume.astype(np.float64)
    for axis in (1, 2, 3):
        ref = ndimage.convolve1d(ref, taps, axis=axis, mode="constant", cval=0.0)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert np.array_equal(layers.gaussian_smooth(volume, 0.0).numpy(), volume)


@pytest.mark.parametrize("sigma", [1.0, 8.0])  # 8: the kernel (49 taps) is wider than the volume
def test_banded_matrix_and_convolution_paths_agree_with_scipy(volume, sigma):
    import tensorflow as tf
    ref = volume.astype(np.float64)
    for axis in (1, 2, 3):
        ref = ndimage.convolve1d(ref, layers.gaussian_kernel1d(sigma).astype(np.float64), axis=axis,
                                 mode="constant", cval=0.0)
    static = layers.gaussian_smooth(tf.constant(volume), sigma).numpy()  # known sizes: banded matrix products
    dynamic = tf.function(lambda v: layers.gaussian_smooth(v, sigma),  # unknown sizes: conv3d passes
                          input_signature=[tf.TensorSpec([None] * 4 + [volume.shape[-1]], tf.float32)])
    np.testing.assert_allclose(static, ref, atol=1e-5)
    np.testing.assert_allclose(dynamic(tf.constant(volume)).numpy(), ref, atol=1e-5)
    matrix = layers.gaussian_band_matrix(5, 1.0)
    np.testing.assert_allclose(matrix[2], layers.gaussian_kernel1d(1.0)[1:6], atol=0)  # a row is the kernel


def test_affine_from_corners_is_the_least_squares_fit():
    rng = np.random.default_rng(5)
    moved = rng.normal(size=(3, 8, 3)).astype(np.float32)
    fitted = layers.affine_from_corners(moved).numpy()
    for b in range(3):
        reference = np.linalg.lstsq(layers._CORNERS.astype(np.float64), moved[b].astype(np.float64), rcond=None)[0]
        np.testing.assert_allclose(fitted[b], reference, atol=1e-5)


def test_random_affine_zooms_in_without_flips():
    scale = 0.2
    transforms = layers.random_affine(256, scale, seed=tf.constant([3, 4])).numpy()
    diagonal = np.diagonal(transforms[:, :3], axis1=1, axis2=2)
    # Each diagonal entry is the mean of the corner factors drawn from U(1 - scale, 1); the translation is half
    # the mean difference between opposite faces, so at most scale / 2.
    assert np.all((diagonal >= 1 - scale) & (diagonal <= 1))
    assert np.all(np.abs(transforms[:, 3]) <= scale / 2 + 1e-6)
    assert np.all(np.linalg.det(transforms[:, :3]) > 0)
    assert np.std(transforms[:, 3]) > 0.01  # really random, per sample
    identity = layers.random_affine(2, 0.0, seed=tf.constant([3, 4])).numpy()
    np.testing.assert_allclose(identity[:, :3], np.broadcast_to(np.eye(3), (2, 3, 3)), atol=1e-7)
    np.testing.assert_allclose(identity[:, 3], 0, atol=1e-7)


def test_random_rotation_is_rigid_in_voxels_and_bounded_by_its_angle():
    shape = (40, 32, 24)
    transforms = layers.random_rotation(256, 30.0, tf.constant([5, 6]), shape).numpy().astype(np.float64)
    assert transforms.shape == (256, 4, 3) and np.all(transforms[:, 3] == 0)  # about the centre
    half = (np.array(shape) - 1) / 2.0
    q = np.transpose(transforms[:, :3] * half[None, None, :] / half[None, :, None], (0, 2, 1))  # back to voxels
    np.testing.assert_allclose(q @ np.transpose(q, (0, 2, 1)), np.broadcast_to(np.eye(3), q.shape), atol=1e-5)
    np.testing.assert_allclose(np.linalg.det(q), 1.0, atol=1e-5)  # a rotation, no flip
    angles = np.degrees(np.arccos(np.clip((np.trace(q, axis1=1, axis2=2) - 1) / 2, -1, 1)))
    assert angles.max() <= 30.0 + 1e-3 and angles.max() > 25.0 and np.median(angles) > 10.0
    axes = np.stack([q[:, 2, 1] - q[:, 1, 2], q[:, 0, 2] - q[:, 2, 0], q[:, 1, 0] - q[:, 0, 1]], axis=1)
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    assert np.abs(axes.mean(axis=0)).max() < 0.2  # axes spread over the sphere
    still = layers.random_rotation(2, 0.0, tf.constant([5, 6]), shape).numpy()
    np.testing.assert_allclose(still, np.broadcast_to(np.eye(4, 3), (2, 4, 3)), atol=1e-7)
    # Applied to a volume: a blob 6 voxels off the centre of a cube stays 6 voxels off it and keeps its size.
    cube = (33, 33, 33)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in cube], indexing="ij"), -1)
    blob = (np.sum((grid - [22.0, 16.0, 16.0]) ** 2, -1) < 16).astype(np.float32)[None, ..., None]
    turned = layers.apply_affine(blob, layers.random_rotation(1, 90.0, tf.constant([1, 2]), cube)).numpy()[0, ..., 0]
    centroid = (grid * turned[..., None]).sum((0, 1, 2)) / turned.sum()
    assert np.linalg.norm(centroid - 16.0) == pytest.approx(6.0, abs=0.1)
    assert np.linalg.norm(centroid - [22.0, 16.0, 16.0]) > 1.0 and turned.sum() == pytest.approx(blob.sum(), rel=0.02)


def test_random_shift_is_a_translation_of_the_asked_spread_in_voxels():
    shape = (40, 32, 24)
    transforms = layers.random_shift(2000, 2.5, tf.constant([5, 6]), shape).numpy()
    coords = layers.affine_coords(transforms[:3], shape).numpy()
    offsets = coords - layers.identity_grid(shape).numpy()[None]
    # The same offset at every voxel (a translation, no turn or zoom), different per sample.
    np.testing.assert_allclose(offsets, np.broadcast_to(offsets[:, :1, :1, :1], offsets.shape), atol=1e-4)
    assert np.abs(offsets[0, 0, 0, 0] - offsets[1, 0, 0, 0]).max() > 0.1
    voxels = transforms[:, 3] * (np.array(shape) - 1) / 2.0
    np.testing.assert_allclose(voxels.std(axis=0), 2.5, rtol=0.08)  # N(0, 2.5) voxels on each axis
    np.testing.assert_allclose(voxels.mean(axis=0), 0.0, atol=0.2)
    np.testing.assert_allclose(transforms[:, :3], np.broadcast_to(np.eye(3), (2000, 3, 3)))
    still = layers.random_shift(2, 0.0, tf.constant([5, 6]), shape).numpy()
    np.testing.assert_array_equal(still, np.broadcast_to(np.eye(4, 3), (2, 4, 3)))
    # Applied to a volume: a blob moves by minus the offset (source = x + t) and keeps its size.
    cube = (33, 33, 33)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in cube], indexing="ij"), -1)
    blob = (np.sum((grid - 16.0) ** 2, -1) < 25).astype(np.float32)[None, ..., None]
    shift = layers.random_shift(1, 3.0, tf.constant([1, 2]), cube)
    moved = layers.apply_affine(blob, shift).numpy()[0, ..., 0]
    centroid = (grid * moved[..., None]).sum((0, 1, 2)) / moved.sum()
    expected = 16.0 - shift.numpy()[0, 3] * 16.0
    np.testing.assert_allclose(centroid, expected, atol=0.05)
    assert np.linalg.norm(centroid - 16.0) > 1.0 and moved.sum() == pytest.approx(blob.sum(), rel=0.01)


def test_compose_affines_applies_the_first_then_the_second():
    rng = np.random.default_rng(0)
    first, then = rng.normal(size=(2, 4, 3)), rng.normal(size=(2, 4, 3))
    x = rng.normal(size=(5, 3))
    combined = layers.compose_affines(first, then).numpy()
    for b in range(2):
        y = np.c_[x, np.ones(5)] @ first[b]
        np.testing.assert_allclose(np.c_[x, np.ones(5)] @ combined[b], np.c_[y, np.ones(5)] @ then[b], atol=1e-5)


def test_affine_coordinates_scale_about_the_centre():
    transform = np.zeros((1, 4, 3), np.float32)
    transform[0, :3] = np.diag([0.5, 1.0, 1.0])
    coords = layers.affine_coords(transform, (9, 5, 5)).numpy()[0]
    # A zoom by 2 about the centre voxel 4 along axis 0: voxel i samples 4 + (i - 4) / 2.
    np.testing.assert_allclose(coords[:, 2, 2, 0], 4 + (np.arange(9) - 4) / 2, atol=1e-5)
    np.testing.assert_allclose(coords[3, :, 1, 1], np.arange(5), atol=1e-5)


def test_affine_augmentation_layer_draws_per_sample_and_call_and_shares_a_draw():
    layer = layers.AffineAugmentation(scale=0.2, seed=7)
    image = np.broadcast_to(np.arange(12, dtype=np.float32)[:, None, None], (12, 10, 8))
    batch = np.stack([image, image])[..., None]
    label = (batch > 5).astype(np.float32)
    out_image, out_label = layer([batch, label], training=True)
    out_image, out_label = out_image.numpy(), out_label.numpy()
    assert not np.allclose(out_image[0], out_image[1])  # a fresh draw per sample
    # One draw moves the image and its label together: the label is the warped ramp thresholded, up to the
    # interpolated rim where the label is fractional.
    crisp = (out_label == 0) | (out_label == 1)
    assert crisp.mean() > 0.8
    np.testing.assert_array_equal(out_label[crisp], (out_image[crisp] > 5).astype(np.float32))
    again = layer(batch, training=True).numpy()
    assert not np.allclose(again, out_image)  # a new draw every call
    assert np.array_equal(layer(batch, training=False).numpy(), batch)
    clone = layers.AffineAugmentation.from_config(layer.get_config())
    assert clone.scale == 0.2
