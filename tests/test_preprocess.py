"""Pre-processing: crop grid, coarse pre-alignment, resampling, intensities, SDMs, geometry, storage."""
import numpy as np
import pytest
import SimpleITK as sitk

from label_reg import datasets, io, preprocess, synthetic
from label_reg.errors import InputError
from label_reg.preprocess import PreprocessConfig

SMALL = PreprocessConfig(spacing_mm=1.76, shape=(48, 48, 40))


def _rotation(axis, degrees):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    a = np.deg2rad(degrees)
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def _world_com(mask, geometry):
    return geometry.index_to_world(np.argwhere(mask >= 0.5).mean(axis=0))


def _sphere_image(geometry, centre, radius):
    pts = geometry.index_to_world(np.indices(geometry.size).reshape(3, -1).T)
    inside = np.linalg.norm(pts - centre, axis=1) < radius
    return io.from_array(inside.reshape(geometry.size), geometry)


@pytest.fixture(scope="module")
def phantom():
    return synthetic.make_pair(np.random.default_rng(21))


@pytest.fixture(scope="module")
def phantom_result(phantom):
    p = phantom
    return preprocess.preprocess_images(p["moving_image"], p["moving_label"], p["fixed_image"], p["fixed_label"],
                                        SMALL)


def test_config_round_trip_and_validation():
    cfg = PreprocessConfig(spacing_mm=1.76, shape=(48, 48, 40), clip_percentile=98.0)
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    assert PreprocessConfig() == PreprocessConfig.from_dict({})
    assert PreprocessConfig().shape == (96, 96, 80) and PreprocessConfig().spacing_mm == 0.88
    for bad in ({"shape": [96, 96]}, {"shape": "96,96,80"}, {"spacing_mm": "0.88"}, {"spacing_mm": -1.0},
                {"clip_percentile": 0}, {"spacing": 0.88}, {"shape": [96, 96, True]}):
        with pytest.raises(InputError):
            PreprocessConfig.from_dict(bad)


def test_crop_grid_is_centred_on_trus_with_its_direction(phantom, phantom_result):
    us_geo = io.Geometry.from_image(phantom["fixed_image"])
    grid = phantom_result.grid
    assert grid.size == SMALL.shape and np.allclose(grid.spacing, 1.76)
    assert np.allclose(grid.direction, us_geo.direction)
    assert np.allclose(grid.center_world, us_geo.center_world, atol=1e-9)


def test_prealignment_puts_mr_gland_com_at_crop_centre(phantom, phantom_result):
    r = phantom_result
    com_idx = np.argwhere(r.moving_label[..., 0] > 0).mean(axis=0)
    centre = (np.asarray(SMALL.shape) - 1) / 2
    assert np.linalg.norm(com_idx - centre) < 1.0
    mr_com = _world_com(io.to_array(phantom["moving_label"][0]), io.Geometry.from_image(phantom["moving_image"]))
    assert np.allclose(r.translation_mm, mr_com - r.grid.center_world)
    # The phantom's TRUS gland is off-centre, so the coarse step leaves a real error.
    fixed_com = np.argwhere(r.fixed_label[..., 0] > 0).mean(axis=0)
    assert np.linalg.norm((fixed_com - centre) * SMALL.spacing_mm) > 2.0


def test_translation_sign_and_bspline_values():
    """Value at crop point p is MR(p + t): resample a smooth analytic image and compare."""
    geo = io.Geometry((40, 36, 30), (1.5, 1.5, 1.5), (-20.0, 10.0, 5.0), _rotation([1, 2, 3], 25).ravel())
    pts = geo.index_to_world(np.indices(geo.size).reshape(3, -1).T)
    c = geo.center_world

    def f(p):
        return 100.0 * np.exp(-np.sum((p - c) ** 2, axis=-1) / (2 * 8.0 ** 2)) + 10.0

    img = io.from_array(f(pts).reshape(geo.size), geo)
    grid = io.Geometry((20, 20, 16), (0.88,) * 3, tuple(c - 8.0), np.eye(3).ravel())
    t = np.array([3.0, -2.0, 1.5])
    out = preprocess.resample_image(img, grid, t)
    gpts = grid.index_to_world(np.indices(grid.size).reshape(3, -1).T)
    expected = f(gpts + t).reshape(grid.size)
    assert np.abs(out - expected).max() < 0.3
    assert np.abs(out - f(gpts - t).reshape(grid.size)).max() > 5.0


def test_resampling_keeps_sphere_volume():
    geo = io.Geometry((40, 40, 40), (1.5, 1.5, 1.5), (12.0, -30.0, 7.0), _rotation([0, 1, 1], 40).ravel())
    radius = 14.0
    centre = geo.center_world + [2.0, -1.0, 1.0]
    sphere = _sphere_image(geo, centre, radius)
    grid = io.Geometry((64, 64, 64), (0.88,) * 3, tuple(geo.center_world - 0.88 * 31.5),
                       _rotation([1, 0, 0], -15).ravel())
    out = preprocess.resample_labels([sphere, sphere], grid, translation_mm=(1.0, 2.0, -1.0))
    assert out.shape == (64, 64, 64, 2) and set(np.unique(out)) == {0.0, 1.0}
    vol = out[..., 0].sum() * 0.88 ** 3
    analytic = 4 / 3 * np.pi * radius ** 3
    source = io.to_array(sphere).sum() * 1.5 ** 3
    assert abs(vol - analytic) / analytic < 0.02 and abs(vol - source) / source < 0.02
    # The resampled sphere sits at centre - t.
    assert np.linalg.norm(_world_com(out[..., 0], grid) - (centre - [1.0, 2.0, -1.0])) < 0.88


def test_sdm_of_sphere_matches_analytic_distance():
    geo = io.Geometry((50, 46, 40), (0.88,) * 3, (0.0, 0.0, 0.0), np.eye(3).ravel())
    centre, radius = geo.center_world + [0.3, -0.2, 0.1], 9.0
    mask = io.to_array(_sphere_image(geo, centre, radius))
    sdm = preprocess.signed_distance_map(mask, geo.spacing)
    pts = geo.index_to_world(np.indices(geo.size).reshape(3, -1).T)
    analytic = (np.linalg.norm(pts - centre, axis=1) - radius).reshape(geo.size)
    assert np.abs(sdm - analytic).max() <= 0.88
    assert np.all(sdm[mask > 0] < 0) and np.all(sdm[mask == 0] > 0)
    with pytest.raises(ValueError):
        preprocess.signed_distance_map(np.zeros((4, 4, 4)), (1.0, 1.0, 1.0))


def test_pipeline_sdms_and_intensities(phantom_result):
    r = phantom_result
    for img in (r.moving_image, r.fixed_image):
        assert img.dtype == np.float32 and img.min() >= 0.0 and img.max() <= 1.0
        assert img.max() == 1.0  # clipped at the 99th percentile, so some voxels saturate
    # The TRUS (75 mm wide) is narrower than the crop (84 mm): zero padding at the x faces.
    assert np.all(r.fixed_image[:2] == 0) and np.all(r.fixed_image[-2:] == 0)
    assert r.fixed_image[20:28].mean() > 0.1
    for lab, sdm in ((r.moving_label, r.moving_sdm), (r.fixed_label, r.fixed_sdm)):
        assert lab.dtype == np.float32 and set(np.unique(lab)) == {0.0, 1.0}
        assert np.array_equal(sdm < 0, lab[..., 0] > 0)


def test_without_sdms_everything_else_is_identical(phantom, phantom_result):
    p = phantom
    lean = preprocess.preprocess_images(p["moving_image"], p["moving_label"], p["fixed_image"], p["fixed_label"],
                                        SMALL, sdm=False)
    assert lean.moving_sdm is None and lean.fixed_sdm is None
    for key in ("moving_image", "fixed_image", "moving_label", "fixed_label"):
        assert np.array_equal(getattr(lean, key), getattr(phantom_result, key)), key
    assert np.array_equal(lean.translation_mm, phantom_result.translation_mm) and lean.grid == phantom_result.grid


def test_non_identity_direction_and_origin():
    rot = _rotation([1, -2, 0.5], 30)
    pair = synthetic.make_pair(np.random.default_rng(4), us_direction=tuple(rot.ravel()),
                               mr_direction=tuple((np.diag([-1.0, 1.0, -1.0]) @ _rotation([0, 0, 1], 10)).ravel()))
    r = preprocess.preprocess_images(pair["moving_image"], pair["moving_label"], pair["fixed_image"],
                                     pair["fixed_label"], SMALL)
    assert np.allclose(np.reshape(r.grid.direction, (3, 3)), rot)
    us_geo, mr_geo = io.Geometry.from_image(pair["fixed_image"]), io.Geometry.from_image(pair["moving_image"])
    # Geometry kept: the TRUS gland stays where it was in world space ...
    us_com = _world_com(io.to_array(pair["fixed_label"][0]), us_geo)
    assert np.linalg.norm(_world_com(r.fixed_label[..., 0], r.grid) - us_com) < SMALL.spacing_mm
    # ... and the MR gland moved by exactly -t onto the TRUS centre.
    mr_com = _world_com(io.to_array(pair["moving_label"][0]), mr_geo)
    assert np.linalg.norm(_world_com(r.moving_label[..., 0], r.grid) + r.translation_mm - mr_com) < SMALL.spacing_mm
    assert np.linalg.norm(_world_com(r.moving_label[..., 0], r.grid) - us_geo.center_world) < SMALL.spacing_mm


def test_registration_time_without_fixed_labels_and_npz_round_trip(phantom, tmp_path):
    p = phantom
    r = preprocess.preprocess_images(p["moving_image"], p["moving_label"], p["fixed_image"], None, SMALL)
    assert r.fixed_label is None and r.fixed_sdm is None
    np.savez(tmp_path / "case.npz", **r.to_arrays())
    with np.load(tmp_path / "case.npz", allow_pickle=False) as d:
        back = preprocess.Preprocessed.from_arrays(d)
    assert back.grid == r.grid and back.fixed_label is None
    assert np.array_equal(back.moving_image, r.moving_image) and np.array_equal(back.moving_sdm, r.moving_sdm)
    assert np.array_equal(back.translation_mm, r.translation_mm)
    with pytest.raises(InputError, match="moving_sdm"):
        preprocess.Preprocessed.from_arrays({k: v for k, v in r.to_arrays().items() if k != "moving_sdm"})


def test_empty_mr_gland_is_an_input_error_naming_the_file(phantom):
    p = phantom
    empty = [sitk.Image(c) * 0 for c in p["moving_label"]]
    with pytest.raises(InputError, match="mr_seg.nii.gz"):
        preprocess.preprocess_images(p["moving_image"], empty, p["fixed_image"], p["fixed_label"], SMALL,
                                     names={"moving_label": "mr_seg.nii.gz"})
    with pytest.raises(InputError, match="mr_seg.nii.gz"):
        preprocess.preprocess_images(p["moving_image"], None, p["fixed_image"], None, SMALL,
                                     names={"moving_label": "mr_seg.nii.gz"})


def test_preprocess_pair_reads_files_and_names_bad_ones(tmp_path):
    synthetic.write_phantoms(tmp_path, 1, seed=3)
    pair = datasets.discover_pairs(tmp_path)[0]
    r = preprocess.preprocess_pair(pair, SMALL)
    assert r.moving_label.shape[:3] == SMALL.shape and r.fixed_sdm is not None
    bad = io.labels_to_array(io.read_label(pair.moving_label))
    bad[..., 0] = 0
    io.write_label(pair.moving_label, io.labels_from_array(bad, io.Geometry.from_image(io.read_image(pair.moving_image))))
    with pytest.raises(InputError, match=str(pair.moving_label.name)):
        preprocess.preprocess_pair(pair, SMALL)


def test_demo_pairs_preprocess_with_geometry_kept(demo_data_dir):
    pairs = datasets.discover_pairs(demo_data_dir)[:2]
    for pair in pairs:
        r = preprocess.preprocess_pair(pair, SMALL)
        us = io.read_image(pair.fixed_image)
        us_geo = io.Geometry.from_image(us)
        assert np.allclose(r.grid.direction, us_geo.direction)
        assert np.allclose(r.grid.center_world, us_geo.center_world)
        centre = (np.asarray(SMALL.shape) - 1) / 2
        assert np.linalg.norm(np.argwhere(r.moving_label[..., 0] > 0).mean(axis=0) - centre) < 1.0
        us_lab = io.labels_to_array(io.read_label(pair.fixed_label))
        assert r.fixed_label.shape == SMALL.shape + (us_lab.shape[-1],)
        # Where the crop holds the whole TRUS gland, its world position and volume are kept.
        if not (r.fixed_label[[0, -1], :, :, 0].any() or r.fixed_label[:, [0, -1], :, 0].any()
                or r.fixed_label[:, :, [0, -1], 0].any()):
            assert np.linalg.norm(_world_com(r.fixed_label[..., 0], r.grid)
                                  - _world_com(us_lab[..., 0], us_geo)) < SMALL.spacing_mm
            vol = r.fixed_label[..., 0].sum() * SMALL.spacing_mm ** 3
            assert abs(vol / (us_lab[..., 0].sum() * 1.5 ** 3) - 1) < 0.05
        for img in (r.moving_image, r.fixed_image):
            assert 0.0 <= img.min() and img.max() <= 1.0 and img.std() > 0.05
