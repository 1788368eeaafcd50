"""The TRUS gland segmenter's parts: grid, network, loss, mask clean-up, centre, and the gland pre-alignment."""
import numpy as np
import pytest
import SimpleITK as sitk
import tensorflow as tf

from label_reg import io, losses, preprocess, segmenter, synthetic
from label_reg.errors import InputError
from label_reg.preprocess import PreprocessConfig

GRID = PreprocessConfig(spacing_mm=3.0, shape=(32, 32, 24))


@pytest.fixture(scope="module")
def phantom():
    return synthetic.make_pair(np.random.default_rng(5))


def _ball(shape, centre, radius):
    idx = np.indices(shape).reshape(3, -1).T
    return (np.linalg.norm(idx - np.asarray(centre), axis=1) <= radius).reshape(shape)


def test_segmenter_inputs_cover_the_trus_volume_centred(phantom):
    view = segmenter.segmenter_inputs(phantom["fixed_image"], phantom["fixed_label"], GRID)
    us_geo = io.Geometry.from_image(phantom["fixed_image"])
    assert view["fixed_image"].shape == GRID.shape and view["fixed_label"].shape == GRID.shape + (1,)
    np.testing.assert_allclose(view["grid"].center_world, us_geo.center_world, atol=1e-9)
    assert view["grid"].direction == us_geo.direction
    assert 0.0 <= view["fixed_image"].min() and view["fixed_image"].max() <= 1.0
    # the resampled gland sits where the phantom put it (TRUS world mm), to within a voxel
    found = segmenter.estimate_gland(view["fixed_label"][..., 0], view["grid"])
    truth = preprocess.gland_centre_of_mass(phantom["fixed_label"][0])
    assert np.linalg.norm(found.centre_mm - truth) < GRID.spacing_mm
    assert np.linalg.norm(truth - us_geo.center_world) > 3.0  # the phantom gland is off the volume centre


def test_largest_component_keeps_only_the_biggest_blob():
    prob = np.zeros((20, 20, 20), np.float32)
    prob[_ball(prob.shape, (6, 6, 6), 4)] = 0.9
    prob[_ball(prob.shape, (16, 16, 16), 2)] = 0.8
    prob[0, 19, 0] = 0.7
    mask = segmenter.largest_component(prob)
    np.testing.assert_array_equal(mask, _ball(prob.shape, (6, 6, 6), 4))
    assert not segmenter.largest_component(np.full((4, 4, 4), 0.49)).any()


def test_estimate_gland_centre_in_world_mm_and_border_contact():
    geo = io.Geometry((20, 24, 16), (2.0, 2.0, 2.0), (10.0, -5.0, 3.0), (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    prob = np.zeros(geo.size, np.float32)
    prob[_ball(geo.size, (8, 10, 7), 3)] = 1.0
    est = segmenter.estimate_gland(prob, geo)
    np.testing.assert_allclose(est.centre_mm, geo.index_to_world(np.array([8.0, 10.0, 7.0])), atol=1e-9)
    assert not est.touches_border and est.found
    assert est.volume_ml == pytest.approx(_ball(geo.size, (8, 10, 7), 3).sum() * 8.0 / 1000.0)
    prob[:, :, 0] = 1.0  # a slab on the first z slice, connected to nothing: the ball stays the largest
    prob[_ball(geo.size, (8, 10, 2), 3)] = 1.0  # now a second ball reaching the border joins the slab
    est = segmenter.estimate_gland(prob, geo)
    assert est.touches_border
    empty = segmenter.estimate_gland(np.zeros(geo.size, np.float32), geo)
    assert not empty.found and empty.centre_mm is None
    with pytest.raises(InputError, match="us.nii.gz: the TRUS gland segmenter found no prostate gland"):
        segmenter.check_found(empty, "us.nii.gz")


def test_mask_on_image_round_trip(phantom):
    """A mask on the segmenter grid resampled onto the TRUS grid keeps its world centre (within a TRUS voxel)."""
    view = segmenter.segmenter_inputs(phantom["fixed_image"], phantom["fixed_label"], GRID)
    est = segmenter.estimate_gland(view["fixed_label"][..., 0], view["grid"])
    us_geo = io.Geometry.from_image(phantom["fixed_image"])
    on_image = segmenter.mask_on_image(est, us_geo)
    assert io.Geometry.from_image(on_image).allclose(us_geo)
    assert on_image.GetPixelID() == sitk.sitkUInt8
    centre = preprocess.gland_centre_of_mass(on_image)
    np.testing.assert_allclose(centre, est.centre_mm, atol=1.0)
    dsc, distance = segmenter.gland_error(est, view["fixed_label"][..., 0], est.centre_mm)
    assert dsc == pytest.approx(1.0) and distance == pytest.approx(0.0)


def test_segmenter_network_shapes_and_range():
    model = segmenter.build_segmenter((20, 16, 12), base_filters=2)  # not multiples of 8: padded inside
    x = tf.random.uniform((2, 20, 16, 12, 1), seed=1)
    p = model({"fixed_image": x}, training=False).numpy()
    assert p.shape == (2, 20, 16, 12, 1)
    assert (p > 0).all() and (p < 1).all()
    with pytest.raises(ValueError, match="at least 8"):
        segmenter.build_segmenter((4, 16, 16))


def test_segmentation_loss_is_low_when_right_and_high_when_wrong():
    label = np.zeros((2, 12, 12, 12, 1), np.float32)
    label[0][_ball((12, 12, 12), (6, 6, 6), 3)] = 1.0
    label[1][_ball((12, 12, 12), (4, 5, 6), 2)] = 1.0
    perfect = losses.segmentation_loss(label, label).numpy()
    wrong = losses.segmentation_loss(label, 1.0 - label).numpy()
    half = losses.segmentation_loss(label, np.full_like(label, 0.5)).numpy()
    assert perfect.shape == (2,) and np.all(perfect < 1e-5)
    assert np.all(wrong > half) and np.all(half > perfect + 0.5)
    assert losses.get_loss("segmentation") is losses.segmentation_loss


def test_gland_prealignment_puts_the_mr_gland_on_the_trus_gland(phantom):
    p = phantom
    centre_cfg = PreprocessConfig(spacing_mm=2.0, shape=(40, 40, 32))
    gland_cfg = PreprocessConfig(spacing_mm=2.0, shape=(40, 40, 32), prealign="trus_gland")
    by_centre = preprocess.preprocess_images(p["moving_image"], p["moving_label"], p["fixed_image"],
                                             p["fixed_label"], centre_cfg)
    by_gland = preprocess.preprocess_images(p["moving_image"], p["moving_label"], p["fixed_image"],
                                            p["fixed_label"], gland_cfg)
    us_gland = preprocess.gland_centre_of_mass(p["fixed_label"][0])
    mr_gland = preprocess.gland_centre_of_mass(p["moving_label"][0])
    np.testing.assert_allclose(by_gland.grid.center_world, us_gland, atol=1e-9)
    np.testing.assert_allclose(by_gland.translation_mm, mr_gland - us_gland, atol=1e-9)

    def com_error(pre):  # distance between the two glands' centres of mass on the crop grid, mm
        com = [pre.grid.index_to_world(np.argwhere(lab[..., 0] >= 0.5).mean(axis=0))
               for lab in (pre.moving_label, pre.fixed_label)]
        return np.linalg.norm(com[0] - com[1])

    assert com_error(by_gland) < 1.0 < com_error(by_centre)
    # an explicit centre (the segmenter's estimate at test time) wins over the mask, and needs no mask
    shifted = us_gland + np.array([3.0, -2.0, 1.0])
    given = preprocess.preprocess_images(p["moving_image"], p["moving_label"], p["fixed_image"], None, gland_cfg,
                                         sdm=False, fixed_centre_mm=shifted)
    np.testing.assert_allclose(given.grid.center_world, shifted, atol=1e-9)
    with pytest.raises(ValueError, match="needs fixed_centre_mm"):
        preprocess.preprocess_images(p["moving_image"], p["moving_label"], p["fixed_image"], None, gland_cfg)
    with pytest.raises(ValueError, match="only used with prealign 'trus_gland'"):
        preprocess.preprocess_images(p["moving_image"], p["moving_label"], p["fixed_image"], None, centre_cfg,
                                     fixed_centre_mm=shifted)


def test_prealign_setting_round_trips_and_old_configs_default_to_the_paper():
    cfg = PreprocessConfig(spacing_mm=1.76, shape=(48, 48, 40), prealign="trus_gland")
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    assert PreprocessConfig.from_dict({"spacing_mm": 1.76, "shape": [48, 48, 40]}).prealign == "trus_centre"
    with pytest.raises(ValueError, match="prealign must be one of"):
        PreprocessConfig(prealign="gland")
    with pytest.raises(InputError, match="'prealign' must be a string"):
        PreprocessConfig.from_dict({"prealign": 3})


# ------------------------------------------------------------------------------------------------ training
def test_segmenter_training_finds_the_gland_better_than_the_volume_centre(trained_segmenter):
    path, summary = trained_segmenter
    coarse, best = summary["coarse"], summary["last_validation"]
    assert summary["steps"] == 60 and summary["train_step_traces"] == 1
    assert summary["loss_history"][-1] < summary["loss_history"][0]
    # the paper's anchor (TRUS volume centre) is 4-10 mm off on the phantoms; the found gland is much closer
    assert best["centre_error_mm"] < 0.6 * coarse["centre_error_mm"]
    assert summary["best_dsc"] > 0.5 and best["not_found"] == 0
    finder = segmenter.GlandFinder.from_model_dir(path)
    assert finder.predictor.input_names == ("fixed_image",) and finder.predictor.output_channels == 1


def test_gland_finder_on_a_raw_trus_file(trained_segmenter, phantom_dir):
    finder = segmenter.GlandFinder.from_model_dir(trained_segmenter[0])
    name = sorted((phantom_dir / "fixed_images").iterdir())[0]
    image = io.read_image(name)
    truth = preprocess.gland_centre_of_mass(io.read_label(phantom_dir / "fixed_labels" / name.name)[0])
    estimate = finder.find(image, str(name))
    assert estimate.found and estimate.mask.shape == tuple(finder.grid_config.shape)
    centre_error = np.linalg.norm(estimate.centre_mm - truth)
    assert centre_error < np.linalg.norm(io.Geometry.from_image(image).center_world - truth)
    assert estimate.to_dict()["centre_mm"] == [float(v) for v in estimate.centre_mm]


def test_gland_prealigned_training_validates_on_found_centres(trained_segmenter, phantom_dir, tmp_path):
    """--prealign=trus_gland: validation cases are centred on the segmenter's estimate (what register will see),
    training cases on the true centres; the model directory carries the segmenter and records the mode."""
    from label_reg import model_dir as md
    from label_reg.errors import InputError as Err
    from label_reg.train import TrainConfig
    from label_reg.trainer import found_centre, load_cases, load_split

    config = TrainConfig(data_dir=str(phantom_dir), model_dir=str(tmp_path / "m"), spacing_mm=3.0,
                         shape=(32, 32, 32), prealign="trus_gland", segmenter_dir=str(trained_segmenter[0]))
    finder = segmenter.GlandFinder.from_model_dir(trained_segmenter[0])
    _, val_pairs = load_split(config)
    pair = val_pairs[0]
    found = load_cases([pair], config.preprocess_config(), str(tmp_path / "cache"), False, finder)[0]
    true = load_cases([pair], config.preprocess_config(), str(tmp_path / "cache"), False)[0]
    grid_centre = lambda case: preprocess.Preprocessed.from_arrays(case).grid.center_world  # noqa: E731
    np.testing.assert_allclose(grid_centre(found), found_centre(finder, pair.fixed_image), atol=1e-6)
    np.testing.assert_allclose(grid_centre(true), preprocess.gland_centre_of_mass(
        io.read_label(pair.fixed_label)[0]), atol=1e-6)
    assert np.linalg.norm(grid_centre(found) - grid_centre(true)) > 1e-3
    with pytest.raises(Err, match="--segmenter_dir: is required"):
        TrainConfig(data_dir="d", model_dir="m", prealign="trus_gland")
    with pytest.raises(Err, match="is not a segmenter model directory"):
        md.copy_segmenter(tmp_path / "nothing", tmp_path / "x") if False else md.copy_segmenter(
            _registration_dir(tmp_path), tmp_path / "x")


def _registration_dir(tmp_path):
    from label_reg import model_dir as md
    from label_reg.network import build_model
    path = tmp_path / "registration"
    md.save(path, build_model((16, 16, 16), False, 1), {"image_shape": (16, 16, 16), "moving_label_input": False,
                                                        "base_filters": 1}, PreprocessConfig(shape=(16, 16, 16)))
    return path


def test_gland_model_fixture_carries_its_segmenter(gland_model):
    from label_reg import model_dir as md
    info, config = md.read_info(gland_model)
    assert config.prealign == "trus_gland"
    path = md.segmenter_path(gland_model, info)
    assert (path / md.WEIGHTS_FILE).is_file() and md.read_info(path)[0]["network"] == md.SEGMENTER
