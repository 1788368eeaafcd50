"""Re-centring passes (label_reg.recentre): the gland-centre estimate, and the loop on real pre-processed phantoms
with a network whose displacement is known (a Keras model that outputs one constant DDF)."""
import dataclasses

import keras
import numpy as np
import pytest

from conftest import TINY_SHAPE, TINY_SPACING_MM
from label_reg import datasets
from label_reg import io as lio
from label_reg.predictor import Predictor
from label_reg.preprocess import PreprocessConfig, gland_centre_of_mass, preprocess_pair
from label_reg.recentre import MIN_GLAND_VOXELS, recentre, warped_gland_centre_mm

OBLIQUE = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # x along world +y, y along world -x


def test_the_centre_is_the_world_position_of_the_weighted_centre_of_mass():
    grid = lio.Geometry((20, 16, 12), (1.5, 2.0, 2.5), (10.0, -4.0, 7.0), OBLIQUE)
    gland = np.zeros(grid.size, np.float32)
    gland[4:9, 3:6, 2:10] = 1.0  # index centre (6, 4, 5.5)
    gland[9, 3:6, 2:10] = 0.5  # a partial-volume face pulls the centre +x by a known amount
    full, half = 5 * 3 * 8, 0.5 * 3 * 8
    expected_x = (6.0 * full + 9.0 * half) / (full + half)
    np.testing.assert_allclose(warped_gland_centre_mm(gland, grid), grid.index_to_world([expected_x, 4.0, 5.5]),
                               atol=1e-9)
    # Negative values (a cubic overshoot) do not count; the result is in world mm, not voxels.
    with_noise = gland.copy()
    with_noise[0, 0, 0] = -3.0
    np.testing.assert_allclose(warped_gland_centre_mm(with_noise, grid), warped_gland_centre_mm(gland, grid))


def test_a_gland_that_left_the_crop_gives_no_centre_and_a_wrong_shape_is_refused():
    grid = lio.Geometry((8, 8, 8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3).ravel())
    gland = np.zeros(grid.size)
    assert warped_gland_centre_mm(gland, grid) is None
    gland[0, 0, 0] = 0.9 * MIN_GLAND_VOXELS
    assert warped_gland_centre_mm(gland, grid) is None
    with pytest.raises(ValueError, match=r"expected the crop grid's \(8, 8, 8\)"):
        warped_gland_centre_mm(np.zeros((8, 8, 7)), grid)


def _constant_ddf_predictor(displacement_voxels):
    """A registration network (dict inputs as build_model's MIX+) whose DDF is the same vector at every voxel."""
    inputs = {name: keras.Input(TINY_SHAPE + (1,), name=name) for name in ("moving_image", "fixed_image",
                                                                         "moving_label")}
    ddf = keras.ops.zeros_like(keras.ops.concatenate([inputs["fixed_image"]] * 3, axis=-1))
    ddf = ddf + keras.ops.convert_to_tensor(np.asarray(displacement_voxels, np.float32))
    return Predictor(keras.Model(inputs, ddf, name="constant_ddf"))


@pytest.fixture(scope="module")
def phantom_case(phantom_dir):
    """(pair, found-gland config, anchor) of one phantom pair: the anchor is the TRUS gland centre of mass."""
    pair = datasets.discover_pairs(phantom_dir)[0]
    config = dataclasses.replace(PreprocessConfig(), spacing_mm=TINY_SPACING_MM, shape=TINY_SHAPE,
                                 prealign="trus_gland")
    anchor = gland_centre_of_mass(lio.read_label(pair.fixed_label)[0])
    return pair, config, anchor


def test_each_pass_moves_the_anchor_by_the_displacement_the_network_predicts(phantom_case):
    pair, config, anchor = phantom_case
    d = np.array([1.0, -0.5, 0.75])  # crop voxels; warped(x) = gland(x + d), so the gland moves by -d
    predictor = _constant_ddf_predictor(d)
    seen = []

    def reprocess(centre):
        seen.append(np.asarray(centre))
        return preprocess_pair(pair, config, centre)

    first = preprocess_pair(pair, config, anchor)
    step_mm = first.grid.direction_matrix @ (d * TINY_SPACING_MM)
    # The pre-aligned MR gland's centre on the crop lies within a fraction of a voxel of the anchor (resampling).
    start = warped_gland_centre_mm(first.moving_label[..., 0], first.grid)
    assert np.linalg.norm(start - anchor) < 0.3 * TINY_SPACING_MM

    none = recentre(predictor, first, reprocess, 0)
    assert seen == [] and len(none.anchors_mm) == 1 and none.stopped is None and none.shift_mm == 0.0
    np.testing.assert_allclose(none.ddf, predictor.predict(first))
    assert none.pre is first and none.affine is None

    two = recentre(predictor, first, reprocess, 2)
    assert len(seen) == 2 and len(two.anchors_mm) == 3 and two.stopped is None
    np.testing.assert_allclose(two.anchors_mm[0], anchor, atol=1e-9)
    for k in (1, 2):  # each pass re-centres on where the network put the gland: the last anchor minus d
        np.testing.assert_allclose(two.anchors_mm[k], two.anchors_mm[k - 1] - step_mm, atol=0.3 * TINY_SPACING_MM)
        np.testing.assert_allclose(two.anchors_mm[k], seen[k - 1], atol=1e-6)
    np.testing.assert_allclose(two.pre.grid.center_world, two.anchors_mm[-1], atol=1e-6)
    assert two.shift_mm == pytest.approx(2 * np.linalg.norm(step_mm), abs=0.5 * TINY_SPACING_MM)


def test_a_pass_whose_gland_leaves_the_crop_stops_and_keeps_the_pass_before(phantom_case):
    pair, config, anchor = phantom_case
    predictor = _constant_ddf_predictor([100.0, 0.0, 0.0])  # far beyond the 32-voxel crop: the warped gland is empty
    first = preprocess_pair(pair, config, anchor)
    result = recentre(predictor, first, lambda c: pytest.fail("re-processed after the gland left the crop"), 3)
    assert result.pre is first and len(result.anchors_mm) == 1
    assert "left the crop after pass 1" in result.stopped
    with pytest.raises(ValueError, match="passes must be >= 0"):
        recentre(predictor, first, lambda c: first, -1)
