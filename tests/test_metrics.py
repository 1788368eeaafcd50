"""Metrics against cases with known answers."""
import math

import numpy as np
import pytest

from label_reg import metrics
from label_reg.errors import InputError


def box(shape, lo, hi):
    m = np.zeros(shape, dtype=np.float32)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 1.0
    return m


def sphere(shape, centre_mm, radius_mm, spacing):
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    r2 = sum((g - c) ** 2 for g, c in zip(grids, centre_mm))
    return (r2 <= radius_mm ** 2).astype(np.float32)


# ----------------------------------------------------------------------------------------------- Dice
def test_dice_of_two_overlapping_boxes():
    a = box((20, 20, 20), (2, 2, 2), (12, 12, 12))   # 10x10x10 = 1000
    b = box((20, 20, 20), (7, 2, 2), (17, 12, 7))    # 10x10x5 = 500; overlap 5x10x5 = 250
    assert metrics.dice(a, b) == pytest.approx(2 * 250 / 1500)
    assert metrics.dice(a, a) == 1.0
    assert metrics.dice(a, np.zeros_like(a)) == 0.0


def test_dice_thresholds_soft_masks_and_empty_convention():
    a = np.zeros((4, 4, 4))
    b = np.zeros((4, 4, 4))
    assert metrics.dice(a, b) == 1.0  # both empty
    a[0, 0, :2] = 0.6                 # counts as inside
    b[0, 0, :2] = 0.4                 # counts as outside
    b[0, 0, 0] = 0.5                  # the threshold itself is inside
    assert metrics.dice(a, b) == pytest.approx(2 * 1 / 3)


def test_dice_shape_mismatch_is_input_error():
    with pytest.raises(InputError):
        metrics.dice(np.zeros((3, 3, 3)), np.zeros((3, 3, 4)))


def test_dice_thirds_on_box_gland():
    shape = (10, 10, 20)
    fixed = box(shape, (2, 2, 5), (8, 8, 14))          # gland spans z = 5..13, 9 slices -> 3 per third
    warped = np.zeros(shape, dtype=np.float32)
    warped[2:8, 2:8, 5:8] = 1.0                         # base third identical
    warped[2:8, 2:5, 8:11] = 1.0                        # mid third: half the area
    out = metrics.dice_thirds(fixed, warped)            # apex third empty in warped
    assert out["base"] == pytest.approx(1.0)
    assert out["mid"] == pytest.approx(2 * 0.5 / 1.5)
    assert out["apex"] == pytest.approx(0.0)
    # reversing the slice axis swaps base and apex
    flipped = metrics.dice_thirds(fixed[:, :, ::-1], warped[:, :, ::-1])
    assert flipped["base"] == pytest.approx(0.0) and flipped["apex"] == pytest.approx(1.0)
    # voxels outside the fixed gland's slab range count in no third
    extra = warped.copy()
    extra[:, :, 15:] = 1.0
    assert metrics.dice_thirds(fixed, extra) == out


def test_dice_thirds_uneven_extent_and_empty_fixed():
    shape = (6, 6, 12)
    fixed = box(shape, (1, 1, 1), (5, 5, 11))           # 10 slices -> 3 / 4 / 3
    warped = np.zeros(shape, dtype=np.float32)
    warped[1:5, 1:5, 4:8] = 1.0                         # exactly the mid slab
    out = metrics.dice_thirds(fixed, warped)
    assert out["mid"] == pytest.approx(1.0) and out["base"] == 0.0 and out["apex"] == 0.0
    empty = metrics.dice_thirds(np.zeros(shape), warped)
    assert all(math.isnan(v) for v in empty.values())


# ------------------------------------------------------------------------------------------------ TRE
def test_tre_of_known_shift_with_anisotropic_spacing():
    spacing = (0.5, 1.0, 2.0)
    shape = (24, 24, 24, 3)
    fixed = np.zeros(shape, dtype=np.float32)
    fixed[..., 0] = box(shape[:3], (4, 4, 4), (20, 20, 20))
    fixed[..., 1] = box(shape[:3], (5, 6, 7), (8, 9, 9))
    fixed[..., 2] = box(shape[:3], (12, 12, 12), (14, 15, 13))
    warped = fixed.copy()
    warped[..., 1] = np.roll(fixed[..., 1], shift=(2, 1, 3), axis=(0, 1, 2))
    warped[..., 2] = np.roll(fixed[..., 2], shift=(0, -4, 0), axis=(0, 1, 2))
    mean, per = metrics.tre_mm(fixed, warped, spacing)
    expected = np.array([math.sqrt(1.0 ** 2 + 1.0 ** 2 + 6.0 ** 2), 4.0])
    np.testing.assert_allclose(per, expected, rtol=1e-12)
    assert mean == pytest.approx(expected.mean())


def test_tre_empty_warped_landmark_is_nan_and_mean_over_finite():
    shape = (10, 10, 10, 3)
    fixed = np.zeros(shape)
    fixed[2:4, 2:4, 2:4, 1] = 1
    fixed[6:8, 6:8, 6:8, 2] = 1
    warped = np.zeros(shape)
    warped[2:4, 2:4, 3:5, 1] = 1       # 1 voxel shift along z
    mean, per = metrics.tre_mm(fixed, warped, (1.0, 1.0, 3.0))
    assert per[0] == pytest.approx(3.0) and math.isnan(per[1])
    assert mean == pytest.approx(3.0)


def test_tre_without_landmarks_is_input_error():
    with pytest.raises(InputError):
        metrics.tre_mm(np.zeros((4, 4, 4, 1)), np.zeros((4, 4, 4, 1)), (1, 1, 1))
    with pytest.raises(InputError):
        metrics.tre_mm(np.zeros((4, 4, 4, 2)), np.zeros((4, 4, 4, 2)), (1, 1))


def test_centroid_mm_honours_spacing():
    m = np.zeros((5, 5, 5))
    m[1, 2, 3] = 1
    m[3, 2, 3] = 1
    np.testing.assert_allclose(metrics.centroid_mm(m, (0.5, 2.0, 3.0)), [1.0, 4.0, 9.0])
    assert np.all(np.isnan(metrics.centroid_mm(np.zeros((5, 5, 5)), (1, 1, 1))))


# ------------------------------------------------------------------------------------------- Jacobian
def grid(shape):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)


def test_jacobian_of_translation_is_one():
    ddf = np.zeros((8, 9, 10, 3))
    ddf[...] = (3.5, -2.0, 0.25)
    np.testing.assert_allclose(metrics.jacobian_determinant(ddf), 1.0, atol=1e-12)
    assert metrics.folding_fraction(ddf) == 0.0


def test_jacobian_of_scaling_is_product_of_scales():
    x = grid((8, 9, 10))
    scales = np.array([1.2, 0.5, 1.5])
    ddf = x * (scales - 1.0)                      # x + u = scales * x
    det = metrics.jacobian_determinant(ddf)
    np.testing.assert_allclose(det[1:-1, 1:-1, 1:-1], np.prod(scales), rtol=1e-12)


def test_jacobian_of_sine_matches_analytic_in_interior():
    x = grid((40, 6, 6))
    a, k = 0.5, 2 * np.pi / 40
    ddf = np.zeros_like(x)
    ddf[..., 0] = a * np.sin(k * x[..., 0])
    det = metrics.jacobian_determinant(ddf)
    exact = 1.0 + a * k * np.cos(k * x[..., 0])
    np.testing.assert_allclose(det[1:-1], exact[1:-1], atol=2e-3)   # central-difference error ~ (a k^3)/6


def test_jacobian_gradient_is_zero_for_affine_and_positive_otherwise():
    x = grid((10, 11, 12))
    A = np.array([[0.1, 0.3, -0.2], [0.05, -0.2, 0.1], [0.2, 0.0, 0.15]])
    ddf = x @ A.T + np.array([1.0, -3.0, 2.0])
    assert metrics.jacobian_gradient(ddf) == pytest.approx(0.0, abs=1e-10)
    det = metrics.jacobian_determinant(ddf)
    np.testing.assert_allclose(det, np.linalg.det(np.eye(3) + A), rtol=1e-10)
    wavy = np.zeros_like(x)
    wavy[..., 2] = 0.8 * np.sin(2 * np.pi * x[..., 0] / 10)
    wavy[..., 0] = 0.8 * np.sin(2 * np.pi * x[..., 0] / 10)
    assert metrics.jacobian_gradient(wavy) > 0.05


def test_folding_fraction_detects_fold():
    x = grid((40, 5, 5))
    ddf = np.zeros_like(x)
    k = 2 * np.pi / 20
    ddf[..., 0] = 5.0 * np.sin(k * x[..., 0])   # 1 + 5k cos(kx) < 0 where cos(kx) < -1/(5k) ~ -0.64
    frac = metrics.folding_fraction(ddf)
    assert 0.0 < frac < 0.5
    ddf[..., 0] *= 0.1                           # gentle version does not fold
    assert metrics.folding_fraction(ddf) == 0.0
    mirror = np.zeros_like(x)
    mirror[..., 0] = -2.0 * x[..., 0]            # x -> -x everywhere
    assert metrics.folding_fraction(mirror) == 1.0


def test_ddf_shape_is_checked():
    with pytest.raises(InputError):
        metrics.jacobian_determinant(np.zeros((4, 4, 4, 2)))


# ---------------------------------------------------------------------------------------- Hausdorff 95
@pytest.mark.parametrize("spacing", [(0.5, 0.5, 0.5), (0.5, 1.0, 1.5)])
def test_hd95_of_concentric_spheres_is_radius_difference(spacing):
    extent_mm = 26.0
    shape = tuple(int(extent_mm / s) + 1 for s in spacing)
    centre = (13.0, 13.0, 13.0)
    a = sphere(shape, centre, 10.0, spacing)
    b = sphere(shape, centre, 6.0, spacing)
    hd = metrics.hausdorff95_mm(a, b, spacing)
    assert abs(hd - 4.0) <= max(spacing)
    assert metrics.hausdorff95_mm(a, a, spacing) == 0.0


def test_hd95_empty_rules():
    a = box((6, 6, 6), (1, 1, 1), (4, 4, 4))
    z = np.zeros_like(a)
    assert math.isinf(metrics.hausdorff95_mm(a, z, (1, 1, 1)))
    assert math.isnan(metrics.hausdorff95_mm(z, z, (1, 1, 1)))


# ------------------------------------------------------------------------------------------ per case
def test_case_metrics_bundle():
    shape = (12, 12, 12)
    fixed = np.zeros(shape + (2,), dtype=np.float32)
    fixed[..., 0] = box(shape, (2, 2, 2), (10, 10, 10))
    fixed[3:5, 3:5, 3:5, 1] = 1
    warped = fixed.copy()
    warped[..., 1] = np.roll(fixed[..., 1], 2, axis=2)
    out = metrics.case_metrics(fixed, warped, np.zeros(shape + (3,)), (1.0, 1.0, 2.0))
    assert out["dsc"] == 1.0 and out["dsc_base"] == out["dsc_mid"] == out["dsc_apex"] == 1.0
    assert out["tre_mm"] == pytest.approx(4.0)
    assert out["hd95_mm"] == 0.0
    assert out["jacobian_gradient"] == 0.0 and out["folding_fraction"] == 0.0
    assert out["landmarks_missing"] == 0
    coarse = metrics.case_metrics(fixed, warped, None, (1.0, 1.0, 2.0))
    assert math.isnan(coarse["jacobian_gradient"]) and math.isnan(coarse["folding_fraction"])
    with pytest.raises(InputError):
        metrics.case_metrics(fixed, warped, np.zeros((5, 5, 5, 3)), (1, 1, 1))
