"""Losses: exact zeros where the definition gives them, the right ordering, and gradients where they must exist."""
import numpy as np
import pytest
import tensorflow as tf

from label_reg import losses
from label_reg.layers import warp


def _sphere(shape, centre, radius):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    return (np.linalg.norm(grid - np.asarray(centre), axis=-1) <= radius).astype(np.float32)


SHAPE = (24, 24, 24)


def test_plain_dice_is_zero_on_identical_binary_masks():
    mask = _sphere(SHAPE, (12, 12, 12), 5)[None, ..., None]
    loss = losses.multiscale_dice(mask, mask, sigmas=(0,)).numpy()
    assert loss.shape == (1,) and abs(loss[0]) < 1e-6


def test_multiscale_dice_prefers_identical_masks_to_a_one_voxel_shift():
    mask = _sphere(SHAPE, (12, 12, 12), 5)
    shifted = np.roll(mask, 1, axis=0)
    same = losses.multiscale_dice(mask[None], mask[None]).numpy()[0]
    off = losses.multiscale_dice(mask[None], shifted[None]).numpy()[0]
    assert 0 < same < off


def _dice_gradient(sigmas):
    fixed = _sphere(SHAPE, (6, 12, 12), 3)[None, ..., None]
    moving = _sphere(SHAPE, (17, 12, 12), 3)[None, ..., None]  # 5 voxels of gap between the two surfaces
    ddf = tf.Variable(np.zeros((1,) + SHAPE + (3,), np.float32))
    with tf.GradientTape() as tape:
        loss = losses.multiscale_dice(fixed, warp(moving, ddf, "zero"), sigmas)
    return tape.gradient(loss, ddf).numpy()


def test_multiscale_dice_reaches_disjoint_masks_and_plain_dice_does_not():
    assert np.abs(_dice_gradient(losses.DEFAULT_SIGMAS)).max() > 1e-6
    assert np.abs(_dice_gradient((0,))).max() == 0.0


def test_sdm_msle_zero_on_identical_maps_and_only_outside_counts():
    rng = np.random.default_rng(0)
    sdm = rng.normal(scale=5, size=(2,) + SHAPE).astype(np.float32)
    np.testing.assert_allclose(losses.sdm_msle(sdm, sdm).numpy(), 0.0, atol=1e-7)
    inside_changed = np.where(sdm < 0, sdm * 3, sdm)
    np.testing.assert_allclose(losses.sdm_msle(sdm, inside_changed).numpy(), 0.0, atol=1e-7)
    outside_changed = np.where(sdm > 0, sdm * 3, sdm)
    assert np.all(losses.sdm_msle(sdm, outside_changed).numpy() > 0.1)


def test_bending_energy_zero_for_affine_and_positive_for_a_bump():
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in SHAPE], indexing="ij"), -1)
    rng = np.random.default_rng(2)
    matrix, offset = rng.normal(size=(3, 3)), rng.normal(size=3) * 5
    affine = (grid @ matrix.T + offset).astype(np.float32)[None]
    assert abs(losses.bending_energy(affine).numpy()[0]) < 1e-6
    bump = np.exp(-np.sum((grid - 12) ** 2, -1) / 18.0)[..., None] * np.array([2.0, 0, 1.0])
    assert losses.bending_energy(bump.astype(np.float32)[None]).numpy()[0] > 1e-4


def test_bending_energy_equals_a_numpy_reference_and_its_gradient_is_finite():
    import tensorflow as tf
    ddf = np.random.default_rng(4).normal(size=(2, 9, 8, 7, 3))

    def diff(x, axis):  # central difference along array axis 1..3, two shorter
        n = x.shape[axis]
        return (np.take(x, range(2, n), axis) - np.take(x, range(0, n - 2), axis)) / 2

    def interior(x, shortened):  # crop to the common interior (every axis 4 shorter than the input)
        for axis in (1, 2, 3):
            trim = (4 - shortened.count(axis) * 2) // 2
            x = np.take(x, range(trim, x.shape[axis] - trim), axis)
        return x

    total = 0
    for i in (1, 2, 3):
        for j in range(i, 4):
            second = interior(diff(diff(ddf, i), j), [i, j])
            total = total + (1 if i == j else 2) * second ** 2
    expected = total.mean(axis=(1, 2, 3, 4))
    np.testing.assert_allclose(losses.bending_energy(ddf.astype(np.float32)).numpy(), expected, rtol=1e-5)
    variable = tf.Variable(ddf.astype(np.float32))
    with tf.GradientTape() as tape:
        energy = tf.reduce_sum(losses.bending_energy(variable))
    grad = tape.gradient(energy, variable).numpy()
    assert grad.shape == ddf.shape and np.isfinite(grad).all() and np.abs(grad).max() > 0


def _bending_all_reference(ddf):
    """numpy reference of bending_energy(voxels="all"): compact second differences, each term's own valid region."""
    total = 0
    for i in (1, 2, 3):
        second = np.diff(ddf, n=2, axis=i)
        total = total + (second ** 2).mean(axis=(1, 2, 3, 4))
        for j in range(i + 1, 4):
            cross = np.diff(np.diff(ddf, axis=i), axis=j)
            total = total + 2 * (cross ** 2).mean(axis=(1, 2, 3, 4))
    return total


def test_bending_energy_all_voxels_equals_a_numpy_reference_and_its_gradient_reaches_the_faces():
    ddf = np.random.default_rng(5).normal(size=(2, 9, 8, 7, 3))
    np.testing.assert_allclose(losses.bending_energy(ddf.astype(np.float32), "all").numpy(),
                               _bending_all_reference(ddf), rtol=1e-5)
    variable = tf.Variable(ddf.astype(np.float32))
    with tf.GradientTape() as tape:
        energy = tf.reduce_sum(losses.bending_energy(variable, "all"))
    grad = tape.gradient(energy, variable).numpy()
    assert np.isfinite(grad).all() and (np.abs(grad[:, 0, 0, 0]) > 0).all()  # even a corner voxel is penalised
    with tf.GradientTape() as tape:
        energy = tf.reduce_sum(losses.bending_energy(variable))
    assert (tape.gradient(energy, variable).numpy()[:, 0, 0, 0] == 0).all()  # the interior stencil never sees it


def test_bending_energy_both_discretisations_agree_on_smooth_fields_and_only_all_sees_the_faces():
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in SHAPE], indexing="ij"), -1)
    rng = np.random.default_rng(6)
    affine = (grid @ rng.normal(size=(3, 3)).T + rng.normal(size=3) * 5).astype(np.float32)[None]
    quadratic = np.zeros((1,) + SHAPE + (3,), np.float32)
    quadratic[0, ..., 0] = 0.01 * grid[..., 1] ** 2  # u_x = a y^2: u_x,yy = 2a everywhere, every other term 0
    for voxels in losses.BENDING_VOXELS:
        assert abs(losses.bending_energy(affine, voxels).numpy()[0]) < 1e-6
        # mean over the three components of (2a)^2 (both stencils are exact on quadratics)
        assert losses.bending_energy(quadratic, voxels).numpy()[0] == pytest.approx(0.02 ** 2 / 3, rel=1e-4)
    # A fold confined to the crop's outer layer (where the network folded on the demo pairs) and a voxel-to-voxel
    # alternation: the label-reg stencil does not see either, the compact one does.
    edge = np.zeros((1,) + SHAPE + (3,), np.float32)
    edge[0, 0, 0, :, 0] = 3.0
    alternating = np.broadcast_to((-1.0) ** grid.sum(-1)[..., None], SHAPE + (3,)).astype(np.float32)[None]
    for field in (edge, alternating):
        assert abs(losses.bending_energy(field).numpy()[0]) < 1e-6
        assert losses.bending_energy(field, "all").numpy()[0] > 1e-3


def test_bending_energy_checks_its_input():
    for bad, expected in ((np.zeros((1, 8, 8, 8, 2), np.float32), "shape"),
                          (np.zeros((1, 8, 4, 8, 3), np.float32), "at least 5"),
                          (np.zeros((1, 8, 8, 8, 3), np.float32), "voxels must be")):
        with pytest.raises(ValueError, match=expected):
            losses.bending_energy(bad, "sometimes" if expected == "voxels must be" else "interior")
    assert losses.bending_energy(np.zeros((1, 3, 3, 3, 3), np.float32), "all").numpy()[0] == 0


def test_fixed_view_mask_covers_the_image_and_its_margin_only():
    image = np.full((1,) + SHAPE + (1,), 0.4, np.float32)
    image[:, :, :, 18:] = 0.0  # past the TRUS volume's face
    image[:, 5, 5, 5] = 0.0  # an isolated minimum voxel inside the image
    view = losses.fixed_view_mask(image).numpy()
    assert view.shape == image.shape and set(np.unique(view)) == {0.0, 1.0}
    assert view[:, :, :, :20].min() == 1.0 and view[:, :, :, 20:].max() == 0.0  # 2 voxels of margin past the face
    assert np.array_equal(losses.fixed_view_mask(image, margin=0).numpy(), (image > 0).astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        losses.fixed_view_mask(image[..., 0])


def test_registration_loss_weights_and_registry():
    fixed = _sphere(SHAPE, (12, 12, 12), 5)[None, ..., None]
    sdm = np.zeros_like(fixed)
    ddf = np.zeros((1,) + SHAPE + (3,), np.float32)
    terms = losses.registration_loss(0.3, 0.0, fixed, fixed, sdm, sdm, ddf)
    assert set(terms) == {"multiscale_dice", "bending_energy", "total"}
    np.testing.assert_allclose(terms["total"].numpy(), 0.3 * terms["multiscale_dice"].numpy(), rtol=1e-6)
    assert losses.get_loss("sdm_msle") is losses.sdm_msle
    for bad in ((0.7, 0.5), (-0.1, 0.5)):
        try:
            losses.loss_weights(*bad)
        except ValueError:
            continue
        raise AssertionError(f"weights {bad} accepted")


def _landmarks(centres, radius=2, shape=SHAPE):
    """(1, X, Y, Z, L) landmark masks, one small sphere per channel (None: an empty channel)."""
    channels = [np.zeros(shape, np.float32) if c is None else _sphere(shape, c, radius) for c in centres]
    return np.stack(channels, -1)[None]


def test_landmark_dice_counts_present_pairs_only_and_keeps_pairing_by_index():
    fixed = _landmarks([(6, 6, 6), (16, 16, 16), (6, 16, 6)])
    same = losses.landmark_dice(fixed, fixed, [[1, 1, 1]], sigmas=(0,)).numpy()
    assert same.shape == (1,) and abs(same[0]) < 1e-6
    # Channels swapped: every landmark lands on another one's place, so the pairs do not match.
    swapped = fixed[..., [1, 0, 2]]
    assert losses.landmark_dice(fixed, swapped, [[1, 1, 1]], sigmas=(0,)).numpy()[0] > 0.6
    # A pair marked absent does not count, whatever its masks hold; "pairs" is the mean over present pairs.
    one_wrong = fixed.copy()
    one_wrong[..., 2] = _landmarks([(18, 6, 18)])[..., 0]
    pairs = losses.landmark_dice(fixed, one_wrong, [[1, 1, 1]], sigmas=(0,)).numpy()[0]
    np.testing.assert_allclose(pairs, 1.0 / 3.0, atol=1e-5)
    assert abs(losses.landmark_dice(fixed, one_wrong, [[1, 1, 0]], sigmas=(0,)).numpy()[0]) < 1e-6
    # "one": a single Dice over all present channels.
    one = losses.landmark_dice(fixed, one_wrong, [[1, 1, 1]], terms="one", sigmas=(0,)).numpy()[0]
    np.testing.assert_allclose(one, 1.0 / 3.0, atol=1e-5)  # equal-sized landmarks: same as the mean of pairs
    # A sample without landmark pairs scores 0 with a finite (zero) gradient; a batch mixes both kinds.
    fixed2 = np.concatenate([fixed, np.zeros_like(fixed)])
    ddf = tf.Variable(np.zeros((2,) + SHAPE + (3,), np.float32))
    with tf.GradientTape() as tape:
        loss = losses.landmark_dice(fixed2, warp(np.roll(fixed2, 2, axis=1), ddf, "zero"), [[1, 1, 1], [0, 0, 0]])
    grad = tape.gradient(loss, ddf).numpy()
    assert loss.numpy()[1] == 0.0 and loss.numpy()[0] > 0
    assert np.isfinite(grad).all() and np.abs(grad[0]).max() > 0 and np.abs(grad[1]).max() == 0


def test_landmark_dice_falls_as_the_landmarks_come_together_and_checks_its_input():
    fixed = _landmarks([(8, 12, 12), (16, 12, 12)])
    values = [losses.landmark_dice(fixed, np.roll(fixed, shift, axis=1), [[1, 1]]).numpy()[0]
              for shift in (6, 4, 2, 1, 0)]
    assert all(a > b for a, b in zip(values, values[1:]))
    import pytest
    with pytest.raises(ValueError, match="terms"):
        losses.landmark_dice(fixed, fixed, [[1, 1]], terms="each")
    with pytest.raises(ValueError, match=r"\(B, D0, D1, D2, L\)"):
        losses.landmark_dice(fixed[0], fixed[0], [[1, 1]])


def test_landmark_centroid_distance_is_the_centroid_distance_in_mm_over_present_pairs():
    fixed = _landmarks([(6, 6, 6), (16, 16, 16), (6, 16, 6)])
    same = losses.landmark_centroid_distance(fixed, fixed, [[1, 1, 1]], 2.0).numpy()
    assert same.shape == (1,) and abs(same[0]) < 1e-6
    # Landmark 1 moved 3 voxels along y, landmark 2 by (2, 0, 1) voxels; anisotropic spacing (1, 2, 3) mm.
    warped = fixed.copy()
    warped[..., 1] = np.roll(fixed[..., 1], 3, axis=2)
    warped[..., 2] = np.roll(np.roll(fixed[..., 2], 2, axis=1), 1, axis=3)
    spacing = (1.0, 2.0, 3.0)
    expected = [0.0, 6.0, np.hypot(2.0, 3.0)]
    smooth = lambda d: np.sqrt(d ** 2 + 0.1 ** 2) - 0.1  # noqa: E731
    value = losses.landmark_centroid_distance(fixed, warped, [[1, 1, 1]], spacing).numpy()[0]
    np.testing.assert_allclose(value, np.mean([smooth(d) for d in expected]), rtol=1e-5)
    # Absent pairs do not count, whatever their masks hold.
    value = losses.landmark_centroid_distance(fixed, warped, [[1, 1, 0]], spacing).numpy()[0]
    np.testing.assert_allclose(value, np.mean([smooth(d) for d in expected[:2]]), rtol=1e-5)
    # Partial volumes weigh the centroid: half a voxel's mass at a distance moves it by that mass's share.
    soft = fixed[..., :1].copy()
    soft[0, 6, 6, 9, 0] = 0.5  # one voxel 3 past the sphere's centre along z, half weight
    shift = 0.5 * 3.0 / (fixed[..., 0].sum() + 0.5)
    np.testing.assert_allclose(losses.landmark_centroid_distance(fixed[..., :1], soft, [[1]], 1.0, smooth_mm=0.0),
                               [shift], rtol=1e-4)


def test_landmark_centroid_distance_gradient_pulls_the_landmark_back_and_skips_lost_pairs():
    fixed = _landmarks([(12, 12, 12), (6, 6, 6)])
    moving = np.concatenate([np.roll(fixed[..., :1], 2, axis=1), fixed[..., 1:]], -1)  # landmark 0: 2 voxels +x
    # Sample 1: landmark 0 is missing on its moving side (marked absent) and landmark 1 coincides: it scores 0.
    moving = np.concatenate([moving, moving])
    fixed2 = np.concatenate([fixed, fixed])
    moving[1, ..., 0] = 0.0
    ddf = tf.Variable(np.zeros((2,) + SHAPE + (3,), np.float32))
    present = [[1, 1], [0, 1]]
    with tf.GradientTape() as tape:
        loss = losses.landmark_centroid_distance(fixed2, warp(moving, ddf, "zero"), present, 1.5)
    grad = tape.gradient(loss, ddf).numpy()
    np.testing.assert_allclose(loss.numpy()[0], (np.sqrt(3.0 ** 2 + 0.01) - 0.1) / 2, rtol=1e-4)
    assert abs(loss.numpy()[1]) < 1e-6 and np.isfinite(grad).all()
    # Sample 0: the warp samples the moving mask at x + u, so moving the landmark back (towards -x) needs u_x > 0:
    # the loss falls along +u_x where the landmark is.
    assert grad[0, 12:16, 10:15, 10:15, 0].sum() < 0
    # A present pair whose warped landmark is empty (warped out of the grid) does not count: 0, zero gradient.
    with tf.GradientTape() as tape:
        lost = losses.landmark_centroid_distance(fixed[..., :1], warp(np.zeros_like(fixed[..., :1]), ddf[:1], "zero"),
                                                 [[1]], 1.0)
    grad = tape.gradient(lost, ddf).numpy()
    assert lost.numpy()[0] == 0.0 and np.isfinite(grad).all() and np.abs(grad).max() == 0
    with pytest.raises(ValueError, match=r"\(B, D0, D1, D2, L\)"):
        losses.landmark_centroid_distance(fixed[0], fixed[0], [[1, 1]], 1.0)
