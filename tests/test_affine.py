"""The global affine stage (``global_affine``): composition with the local DDF, identity at initialisation, bending
energy, model directories, the ITK affine file ``register`` writes, and a 25-degree rotated phantom."""
import dataclasses
import json

import keras
import numpy as np
import pytest
import SimpleITK as sitk
import tensorflow as tf
from scipy import ndimage

from label_reg import io, layers, losses, metrics, model_dir, network, synthetic
from label_reg.errors import InputError
from label_reg.preprocess import PreprocessConfig, preprocess_images
from label_reg.transform import affine_summary, world_affine

SHAPE = (20, 18, 16)
TINY = PreprocessConfig(spacing_mm=3.0, shape=(32, 32, 32))


def _rotation(axis, degrees):
    axis = np.asarray(axis, np.float64) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    angle = np.deg2rad(degrees)
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def _theta(linear, translation_half_units):
    """The 12 head parameters of an affine with linear part ``linear`` (voxels) and a translation in half extents."""
    return np.concatenate([(np.asarray(linear) - np.eye(3)).ravel(), translation_half_units]).astype(np.float32)


def _grid(shape):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)


def _smooth_field(rng, shape, amplitude):
    field = ndimage.gaussian_filter(rng.normal(size=(1,) + tuple(shape) + (3,)), (0, 2, 2, 2, 0))
    return (field / np.abs(field).max() * amplitude).astype(np.float32)


# ------------------------------------------------------------------------------------------------ composition
def test_affine_parameters_are_the_voxel_affine_about_the_centre():
    linear = _rotation((1, 2, 3), 25.0) * [[1.1], [0.95], [1.0]]
    theta = _theta(linear, [0.1, -0.2, 0.05])[None]
    matrix = layers.affine_matrix(theta, SHAPE).numpy()[0]
    centre = (np.asarray(SHAPE) - 1) / 2
    np.testing.assert_allclose(matrix[:, :3], linear, atol=1e-6)
    # y = c + L (x - c) + t, t in voxels = parameters x half extent
    translation = np.array([0.1, -0.2, 0.05]) * centre
    np.testing.assert_allclose(matrix[:, 3], centre + translation - linear @ centre, atol=1e-5)
    x = _grid(SHAPE)
    field = layers.affine_ddf(theta, SHAPE).numpy()[0]
    np.testing.assert_allclose(field, x @ matrix[:, :3].T + matrix[:, 3] - x, atol=2e-5)
    assert np.array_equal(layers.affine_ddf(np.zeros((2, 12), np.float32), SHAPE).numpy(), np.zeros((2,) + SHAPE + (3,)))


def test_composition_is_the_affine_first_then_the_local_deformation():
    """total(x) = l(x) + a(x + l(x)): warping with the total equals warping the affine-aligned image with l."""
    rng = np.random.default_rng(0)
    theta = _theta(_rotation((0, 1, 1), 15.0) * 1.05, [0.05, 0.1, -0.08])[None]
    local = _smooth_field(rng, SHAPE, 2.0)
    total = layers.compose_affine(local, theta, SHAPE).numpy()
    matrix = layers.affine_matrix(theta, SHAPE).numpy()[0]
    moved = _grid(SHAPE) + local[0]  # x + l(x)
    expected = local[0] + (moved @ matrix[:, :3].T + matrix[:, 3] - moved)  # l(x) + a(x + l(x))
    np.testing.assert_allclose(total[0], expected, atol=2e-5)
    # The other order, a(x) + l(x + a(x)) (local deformation first), is a different transform.
    grid = _grid(SHAPE)
    affine_field = grid @ matrix[:, :3].T + matrix[:, 3] - grid
    coords = np.moveaxis(grid + affine_field, -1, 0)
    other = affine_field + np.stack([ndimage.map_coordinates(local[0, ..., c], coords, order=1, mode="nearest")
                                     for c in range(3)], -1)
    assert np.abs(total[0] - other).max() > 0.5
    # Warping: moving(x + total(x)) = m1(x + l(x)) with m1(y) = moving(y + a(y)) (a linear image: no
    # interpolation error, so the two warps agree to rounding).
    image = (_grid(SHAPE) @ np.array([0.3, -0.2, 0.5]) + 1.0)[None, ..., None].astype(np.float32)
    affine_only = layers.affine_ddf(theta, SHAPE)
    inner = layers.warp(image, affine_only, "replicate").numpy()
    x = _grid(SHAPE)
    inside = np.all((x + total[0] >= 0) & (x + total[0] <= np.asarray(SHAPE) - 1), axis=-1)
    inside &= np.all((x + affine_only.numpy()[0] >= 0) & (x + affine_only.numpy()[0] <= np.asarray(SHAPE) - 1),
                     axis=-1)
    two_steps = layers.warp(inner, local, "replicate").numpy()[0, ..., 0]
    one_step = layers.warp(image, total, "replicate").numpy()[0, ..., 0]
    core = inside & ndimage.binary_erosion(inside, iterations=3)
    assert core.sum() > 500
    np.testing.assert_allclose(one_step[core], two_steps[core], atol=1e-3)


def test_identity_affine_leaves_the_local_field_and_zero_local_leaves_the_affine_bit_for_bit():
    rng = np.random.default_rng(1)
    local = _smooth_field(rng, SHAPE, 3.0)
    assert np.array_equal(layers.compose_affine(local, np.zeros((1, 12), np.float32), SHAPE).numpy(), local)
    theta = _theta(_rotation((1, 0, 0), 20.0), [0.1, 0.0, -0.1])[None]
    np.testing.assert_array_equal(layers.compose_affine(np.zeros_like(local), theta, SHAPE).numpy(),
                                  layers.affine_ddf(theta, SHAPE).numpy())


def test_bending_energy_does_not_count_the_affine_part():
    rng = np.random.default_rng(2)
    rotation = _rotation((1, 1, 0), 25.0)
    theta = _theta(rotation, [0.2, -0.1, 0.1])[None]
    affine = layers.affine_ddf(theta, SHAPE)
    assert np.abs(affine.numpy()).max() > 3.0  # a real affine, several voxels
    local = _smooth_field(rng, SHAPE, 2.0)
    local_energy = float(losses.bending_energy(local)[0])
    assert local_energy > 1e-3
    assert float(losses.bending_energy(affine)[0]) < 1e-10  # ~0: float32 rounding only (about 1e-14 here)
    # Total = a + (I + R) l: a rigid affine leaves the bending energy of l unchanged ...
    total = layers.compose_affine(local, theta, SHAPE)
    assert float(losses.bending_energy(total)[0]) == pytest.approx(local_energy, rel=1e-4)
    # ... a scaling one scales it by the square of the scale (no term of the affine itself).
    scaled = layers.compose_affine(local, _theta(1.2 * rotation, [0.2, -0.1, 0.1])[None], SHAPE)
    assert float(losses.bending_energy(scaled)[0]) == pytest.approx(1.44 * local_energy, rel=1e-4)


# ------------------------------------------------------------------------------------------------ the network
@pytest.fixture(scope="module")
def affine_net():
    return network.build_model((32, 32, 24), moving_label_input=True, base_filters=2, global_affine=True)


def _inputs(model, rng, batch=2):
    return {k: rng.random((batch,) + tuple(model.input[k].shape[1:]), dtype=np.float32) for k in model.input}


def test_untrained_global_affine_model_is_the_identity(affine_net):
    rng = np.random.default_rng(3)
    x = _inputs(affine_net, rng)
    assert np.all(affine_net(x, training=False).numpy() == 0.0)
    assert np.all(affine_net(x, training=True).numpy() == 0.0)
    stages = network.stage_model(affine_net)(x)
    np.testing.assert_array_equal(stages["affine"].numpy(), np.broadcast_to(np.eye(3, 4), (2, 3, 4)))
    assert network.has_global_affine(affine_net)
    plain = network.build_model((32, 32, 24), moving_label_input=True, base_filters=2)
    assert not network.has_global_affine(plain) and network.stage_model(plain) is None
    # The head: 12 outputs from the 1/16 features (2 x 16 channels), zero-initialised.
    head = affine_net.get_layer(network.AFFINE_HEAD)
    assert head.kernel.shape == (32, 12) and not np.any(head.kernel.numpy()) and not np.any(head.bias.numpy())
    assert affine_net.count_params() - plain.count_params() == 32 * 12 + 12


def test_a_flattened_affine_head_reads_every_bottom_voxel_and_starts_at_the_identity():
    rng = np.random.default_rng(5)
    model = network.build_model((48, 32, 24), moving_label_input=True, base_filters=2, global_affine=True,
                                affine_pooling="flatten")
    assert network.affine_pooling_of(model) == "flatten"
    head = model.get_layer(network.AFFINE_HEAD)
    assert head.kernel.shape == (3 * 2 * 2 * 32, 12)  # padded to 48x32x32: a 3x2x2 bottom of 32 channels
    x = _inputs(model, rng)
    assert np.all(model(x, training=False).numpy() == 0.0)
    # Where a feature is now matters: the same bottom features moved to another voxel give another affine.
    kernel = np.zeros(head.kernel.shape, np.float32)
    kernel[:32, 0] = 1.0  # parameter 0 reads only the first bottom voxel's channels
    head.set_weights([kernel, np.zeros(12, np.float32)])
    bottom = keras.Model(model.input, [model.get_layer("bottom_bn").output, head.output])
    features, theta = (t.numpy() for t in bottom(x, training=False))
    # ... divided by the 12 bottom voxels: the head learns at the average-pooled head's pace under Adam.
    np.testing.assert_allclose(theta[:, 0], features[:, 0, 0, 0, :].sum(axis=1) / 12.0, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="affine_pooling must be one of average, flatten"):
        network.build_model((32, 32, 32), global_affine=True, affine_pooling="max")


def test_one_adam_step_moves_the_flattened_head_no_faster_than_the_averaged_one():
    """Adam moves each weight by about the learning rate, so a head's first step grows with its inputs: the
    flattened head's division by its voxels keeps it at the average-pooled head's pace (without it: 12x here)."""
    rng = np.random.default_rng(6)
    steps = {}
    for pooling in ("average", "flatten"):
        keras.utils.set_random_seed(0)
        model = network.build_model((48, 32, 24), moving_label_input=True, base_filters=2, global_affine=True,
                                    affine_pooling=pooling)
        head = model.get_layer(network.AFFINE_HEAD)
        theta_of = keras.Model(model.input, head.output)
        x = _inputs(model, np.random.default_rng(7))
        optimizer = keras.optimizers.Adam(1e-3)
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(theta_of(x, training=False))
        optimizer.apply_gradients(zip(tape.gradient(loss, head.trainable_weights), head.trainable_weights))
        steps[pooling] = float(np.abs(theta_of(x, training=False).numpy()).max())
    assert steps["average"] > 0
    assert steps["flatten"] < 2.0 * steps["average"], steps


def test_the_model_output_is_the_affine_composed_with_the_local_ddf(affine_net):
    rng = np.random.default_rng(4)
    model = network.build_model((32, 32, 24), moving_label_input=False, base_filters=2, global_affine=True)
    for layer in model.layers:  # random convolutions, DDF heads and affine head (batch norms as initialised)
        if getattr(layer, "kernel", None) is not None:
            layer.set_weights([rng.normal(0, 0.05, w.shape).astype(np.float32) for w in layer.get_weights()])
    x = _inputs(model, rng)
    out = network.stage_model(model)(x, training=False)
    ddf, local, matrix = out["ddf"].numpy(), out["ddf_local"].numpy(), out["affine"].numpy()
    assert np.abs(local).max() > 0.1 and np.abs(matrix[:, :, :3] - np.eye(3)).max() > 0.01
    np.testing.assert_allclose(model(x, training=False).numpy(), ddf, atol=1e-6)
    grid = _grid((32, 32, 24))
    for b in range(2):
        moved = grid + local[b]
        expected = local[b] + moved @ matrix[b, :, :3].T + matrix[b, :, 3] - moved
        np.testing.assert_allclose(ddf[b], expected, atol=1e-4)


# ------------------------------------------------------------------------------------------------ model dirs
def test_model_directories_record_the_stage_and_old_ones_load_without_it(tmp_path):
    shape = (16, 16, 16)
    config = PreprocessConfig(spacing_mm=4.0, shape=shape)
    model = network.build_model(shape, False, 2, global_affine=True)
    head = model.get_layer(network.AFFINE_HEAD)
    head.set_weights([head.kernel.numpy(), np.arange(12, dtype=np.float32) / 100.0])
    build = {"image_shape": shape, "moving_label_input": False, "base_filters": 2, "global_affine": True}
    model_dir.save(tmp_path / "affine", model, build, config)
    info, _ = model_dir.read_info(tmp_path / "affine")
    assert info["build"]["global_affine"] is True
    for inference in (False, True):
        loaded, _, _ = model_dir.load(tmp_path / "affine", inference=inference)
        assert network.has_global_affine(loaded)
        np.testing.assert_allclose(loaded.get_layer(network.AFFINE_HEAD).get_weights()[1], np.arange(12) / 100.0,
                                   atol=1e-7)
    # A directory written before the stage existed (no key) loads as a network without it.
    plain = network.build_model(shape, False, 2)
    model_dir.save(tmp_path / "old", plain, {k: v for k, v in build.items() if k != "global_affine"}, config)
    old = json.loads((tmp_path / "old" / model_dir.INFO_FILE).read_text())
    old["build"].pop("global_affine")
    (tmp_path / "old" / model_dir.INFO_FILE).write_text(json.dumps(old))
    loaded, info, _ = model_dir.load(tmp_path / "old", inference=True)
    assert not network.has_global_affine(loaded) and "global_affine" not in info["build"]
    # Wrong type, and settings that do not match the weights: one clear line each.
    bad = json.loads((tmp_path / "affine" / model_dir.INFO_FILE).read_text())
    bad["build"]["global_affine"] = "yes"
    (tmp_path / "affine" / model_dir.INFO_FILE).write_text(json.dumps(bad))
    with pytest.raises(InputError, match="global_affine must be true or false"):
        model_dir.read_info(tmp_path / "affine")
    old["build"]["global_affine"] = True
    (tmp_path / "old" / model_dir.INFO_FILE).write_text(json.dumps(old))
    with pytest.raises(InputError, match="with the global affine stage") as err:
        model_dir.load(tmp_path / "old")
    assert "\n" not in str(err.value)


def test_model_directories_record_the_affine_pooling_and_old_ones_read_as_average(tmp_path):
    shape = (32, 16, 16)  # a 2x1x1 bottom: the flattened head has twice the average-pooled one's inputs
    config = PreprocessConfig(spacing_mm=4.0, shape=shape)
    build = {"image_shape": shape, "moving_label_input": False, "base_filters": 2, "global_affine": True}
    flat = network.build_model(shape, False, 2, global_affine=True, affine_pooling="flatten")
    model_dir.save(tmp_path / "flat", flat, {**build, "affine_pooling": "flatten"}, config)
    assert model_dir.read_info(tmp_path / "flat")[0]["build"]["affine_pooling"] == "flatten"
    for inference in (False, True):
        loaded, _, _ = model_dir.load(tmp_path / "flat", inference=inference)
        assert network.affine_pooling_of(loaded) == "flatten"
    # Written before the choice existed: no key, an average-pooled head.
    model_dir.save(tmp_path / "old", network.build_model(shape, False, 2, global_affine=True), build, config)
    info = json.loads((tmp_path / "old" / model_dir.INFO_FILE).read_text())
    assert info["build"].pop("affine_pooling") == "average"
    (tmp_path / "old" / model_dir.INFO_FILE).write_text(json.dumps(info))
    assert network.affine_pooling_of(model_dir.load(tmp_path / "old")[0]) == "average"
    # A wrong value, and a head that does not match the weights: one clear line each.
    info["build"]["affine_pooling"] = "max"
    (tmp_path / "old" / model_dir.INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(InputError, match="affine_pooling must be one of average, flatten, got 'max'"):
        model_dir.read_info(tmp_path / "old")
    info["build"]["affine_pooling"] = "flatten"
    (tmp_path / "old" / model_dir.INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(InputError, match=r"global affine stage \(flatten head\)") as err:
        model_dir.load(tmp_path / "old")
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------ register
@pytest.fixture(scope="module")
def rotated_pair_files(tmp_path_factory):
    """One phantom pair whose TRUS side is rotated by 25 degrees, written as files; and the pair dict."""
    root = tmp_path_factory.mktemp("rotated_pair")
    pair = synthetic.make_pair(np.random.default_rng(8), rotation_deg=25.0)
    files = {k: root / f"{k}.nii.gz" for k in ("moving_image", "fixed_image", "moving_label", "fixed_label")}
    io.write_image(files["moving_image"], pair["moving_image"])
    io.write_image(files["fixed_image"], pair["fixed_image"])
    io.write_label(files["moving_label"], pair["moving_label"])
    io.write_label(files["fixed_label"], pair["fixed_label"])
    return files, pair


KNOWN_LINEAR = _rotation((0.2, -0.3, 1.0), 20.0) * 1.05
KNOWN_TRANSLATION = np.array([0.1, -0.06, 0.08])  # half extents: about 1.5 voxels (4.6 mm) per axis


@pytest.fixture(scope="module")
def known_affine_dir(tmp_path_factory):
    """A global-affine MIX+ model whose local DDF is zero (untrained heads) and whose affine is a known 20-degree
    rotation, 5 % scaling and translation (affine head bias)."""
    path = tmp_path_factory.mktemp("known_affine") / "model"
    model = network.build_model(TINY.shape, True, 4, global_affine=True)
    head = model.get_layer(network.AFFINE_HEAD)
    head.set_weights([head.kernel.numpy(), _theta(KNOWN_LINEAR, KNOWN_TRANSLATION)])
    model_dir.save(path, model, {"image_shape": TINY.shape, "moving_label_input": True, "base_filters": 4,
                                 "global_affine": True}, TINY)
    return path


@pytest.fixture(scope="module")
def known_affine_result(known_affine_dir, rotated_pair_files, tmp_path_factory):
    from label_reg.register import Registrar
    files, pair = rotated_pair_files
    root = tmp_path_factory.mktemp("known_affine_out")
    mr = io.read_image(files["moving_image"])
    pre = preprocess_images(mr, io.read_label(files["moving_label"], reference=mr), io.read_image(files["fixed_image"]),
                            None, TINY, sdm=False)
    crop = pre.grid
    rng = np.random.default_rng(0)
    fixed_points = crop.index_to_world(rng.uniform(4, np.asarray(crop.size) - 5, size=(12, 3)))
    expected_moving = _expected_affine(crop, pre.translation_mm, fixed_points)
    csv = root / "points.csv"
    csv.write_text("x,y,z\n" + "".join(f"{p[0]:.9f},{p[1]:.9f},{p[2]:.9f}\n" for p in expected_moving))
    result = Registrar(known_affine_dir).register(files["moving_image"], files["fixed_image"], files["moving_label"],
                                                  csv, root / "out")
    assert io.Geometry.from_dict(result.report["crop_grid"]).allclose(crop, tol=1e-9)
    return result, fixed_points, expected_moving, crop


def _expected_affine(crop, translation_mm, points):
    """TRUS world points -> MR world points through the known affine, computed here from its definition: crop index
    x, y = c + L (x - c) + t_vox, MR point = crop_world(y) + pre-alignment translation."""
    centre = (np.asarray(crop.size) - 1) / 2
    x = crop.world_to_index(points)
    y = centre + (x - centre) @ KNOWN_LINEAR.T + KNOWN_TRANSLATION * centre
    return crop.index_to_world(y) + np.asarray(translation_mm)


def test_evaluate_reports_what_the_affine_stage_did(known_affine_dir, phantom_dir, tmp_path):
    """evaluate's affine columns give the known affine in world terms: a 20-degree rotation, scales 1.05, and the
    crop centre moved by the head's translation (0.1, -0.06, 0.08 half extents of 15.5 voxels at 3 mm)."""
    import io as text_io

    import pandas as pd

    from label_reg.compare import compare
    from label_reg.evaluate import evaluate
    stream = text_io.StringIO()
    result = evaluate(known_affine_dir, tmp_path / "eval", data_dir=phantom_dir, fold=0, method="KNOWN",
                      cache_dir=tmp_path / "cache", progress=False, stream=stream)
    df = pd.read_csv(tmp_path / "eval" / "per_case.csv")
    ours, coarse = df[df["method"] == "KNOWN"], df[df["method"] == "Coarse"]
    assert len(ours) == 4 and coarse[["affine_rotation_deg", "affine_shift_mm"]].isna().all().all()
    np.testing.assert_allclose(ours["affine_rotation_deg"], 20.0, atol=1e-3)
    np.testing.assert_allclose(ours[["affine_scale_min", "affine_scale_max"]], 1.05, atol=1e-5)
    np.testing.assert_allclose(ours["affine_shift_mm"], np.linalg.norm(KNOWN_TRANSLATION * 15.5 * 3.0), atol=1e-3)
    note = ("Global affine stage of KNOWN, the affine alone over 4 case(s), median (range): rotation 20.0 "
            "(20.0–20.0) degrees, shift of the crop centre 6.6 (6.6–6.6) mm, scales 1.050–1.050.")
    assert note in result.text and note in stream.getvalue()
    assert note in compare([tmp_path / "eval" / "per_case.csv"]).text


def test_register_writes_the_affine_as_an_itk_transform_that_maps_points_like_the_field(known_affine_result):
    result, fixed_points, expected_moving, crop = known_affine_result
    assert result.files["transform_affine"].name == "transform_affine.tfm"
    assert result.report["outputs"]["transform_affine"] == "transform_affine.tfm"
    assert result.report["model"]["global_affine"] is True
    written = json.loads(result.files["registration"].read_text())
    assert written["global_affine"]["rotation_deg"] == pytest.approx(20.0, abs=0.01)
    assert written["global_affine"]["scales"] == pytest.approx([1.05] * 3, abs=1e-4)
    transform = sitk.ReadTransform(str(result.files["transform_affine"]))
    assert transform.GetName() == "AffineTransform"
    mapped = np.array([transform.TransformPoint(tuple(map(float, p))) for p in fixed_points])
    np.testing.assert_allclose(mapped, expected_moving, atol=1e-3)  # float32 affine head, mm
    # The displacement field (the total transform) holds the affine: with a zero local DDF they agree in the crop.
    field = sitk.DisplacementFieldTransform(sitk.ReadImage(str(result.files["transform_ddf"]), sitk.sitkVectorFloat64))
    via_field = np.array([field.TransformPoint(tuple(map(float, p))) for p in fixed_points])
    np.testing.assert_allclose(via_field, expected_moving, atol=1e-3)
    assert np.linalg.norm(expected_moving - fixed_points - np.asarray(result.report["translation_mm"]),
                          axis=1).min() > 2.0  # the affine moves every point beyond the pre-alignment
    # Mapped MR points come back to the TRUS points they came from.
    assert result.point_status == ["ok"] * len(fixed_points)
    np.testing.assert_allclose(result.points_fixed, fixed_points, atol=1e-3)


def test_warped_labels_follow_the_affine(known_affine_result, rotated_pair_files):
    result, _, _, crop = known_affine_result
    files, _ = rotated_pair_files
    transform = sitk.ReadTransform(str(result.files["transform_affine"]))
    mr_gland = sitk.Cast(io.read_label(files["moving_label"])[0], sitk.sitkFloat32)
    warped = sitk.GetArrayFromImage(io.read_label(result.files["warped_moving_label"])[0]).transpose(2, 1, 0) > 0
    us = io.read_image(files["fixed_image"])
    by_affine = sitk.GetArrayFromImage(sitk.Resample(mr_gland, us, transform, sitk.sitkLinear, 0.0)) >= 0.5
    by_affine = by_affine.transpose(2, 1, 0)
    geo = io.Geometry.from_image(us)
    index = np.indices(geo.size).reshape(3, -1).T
    in_crop = np.all((crop.world_to_index(geo.index_to_world(index)) >= 1)
                     & (crop.world_to_index(geo.index_to_world(index)) <= np.asarray(crop.size) - 2), axis=1)
    in_crop = in_crop.reshape(geo.size)
    assert warped[in_crop].sum() > 1000
    assert metrics.dice(warped & in_crop, by_affine & in_crop) > 0.995


def test_slicer_loads_the_affine_file_and_maps_points_as_simpleitk(known_affine_result):
    slicer_core = pytest.importorskip("slicer_core")
    result, fixed_points, expected_moving, _ = known_affine_result
    scene = slicer_core.vtkMRMLScene()
    node, storage = slicer_core.vtkMRMLTransformNode(), slicer_core.vtkMRMLTransformStorageNode()
    scene.AddNode(node)
    scene.AddNode(storage)
    storage.SetFileName(str(result.files["transform_affine"]))
    assert storage.ReadData(node) == 1
    lps_ras = np.array([-1.0, -1.0, 1.0])
    for p, q in zip(fixed_points, expected_moving):
        got = np.array(node.GetTransformFromParent().TransformPoint(tuple(p * lps_ras))) * lps_ras
        np.testing.assert_allclose(got, q, atol=1e-3)


def test_a_model_without_the_stage_writes_no_affine_file_and_removes_a_stale_one(known_affine_result,
                                                                                  rotated_pair_files, tmp_path):
    from label_reg.register import Registrar
    files, _ = rotated_pair_files
    path = tmp_path / "plain"
    model_dir.save(path, network.build_model(TINY.shape, True, 4),
                   {"image_shape": TINY.shape, "moving_label_input": True, "base_filters": 4}, TINY)
    out = tmp_path / "out"
    out.mkdir()
    (out / "transform_affine.tfm").write_text(known_affine_result[0].files["transform_affine"].read_text())
    result = Registrar(path).register(files["moving_image"], files["fixed_image"], files["moving_label"], None, out)
    assert "transform_affine" not in result.files and not (out / "transform_affine.tfm").exists()
    assert result.report["global_affine"] is None and result.report["model"]["global_affine"] is False
    assert "transform_affine.tfm" in result.replaced


def test_the_savedmodel_serves_the_total_ddf_of_a_global_affine_model(known_affine_dir, tmp_path):
    from label_reg import export
    version = export.export(known_affine_dir, tmp_path / "serving")
    served = tf.saved_model.load(str(version)).signatures[export.SIGNATURE]
    model, _, _ = model_dir.load(known_affine_dir)
    rng = np.random.default_rng(5)
    x = {k: rng.random((1,) + TINY.shape + (1,), dtype=np.float32) for k in model.input}
    ddf = served(**{k: tf.constant(v) for k, v in x.items()})["ddf"].numpy()
    expected = network.stage_model(model)(x, training=False)
    assert np.abs(expected["ddf"].numpy()).max() > 3.0 and not np.any(expected["ddf_local"].numpy())
    np.testing.assert_allclose(ddf, expected["ddf"].numpy(), atol=1e-5)


# ------------------------------------------------------------------------------------------------ rotation
def test_the_affine_stage_registers_a_25_degree_rotated_pair_better_than_the_pre_alignment(rotated_pair_files):
    """A direct test of the affine path (a full training to predict rotations is far beyond a test's budget): on one
    phantom pair whose TRUS side is rotated by 25 degrees, only the affine head of an untrained global-affine network
    is optimised (Adam, 100 steps, multiscale Dice of the gland and each landmark channel, through the composition,
    the warp and the network's total DDF). Its affine, converted to world mm as ``register`` does, must beat the
    pre-alignment (a translation) in gland DSC and in landmark TRE against the phantom's analytic MR landmarks, and
    its rotation must be the phantom's (axis and angle: a translation alone is 25 degrees off)."""
    _, pair = rotated_pair_files
    pre = preprocess_images(pair["moving_image"], pair["moving_label"], pair["fixed_image"], pair["fixed_label"],
                            TINY, sdm=False)
    fixed, moving = pre.fixed_label[None], pre.moving_label[None]
    channels = fixed.shape[-1]
    tf.keras.utils.set_random_seed(0)
    model = network.build_model(TINY.shape, True, 4, global_affine=True)
    stages = network.stage_model(model)
    inputs = {"moving_image": pre.moving_image[None, ..., None], "fixed_image": pre.fixed_image[None, ..., None],
              "moving_label": moving[..., :1]}
    head = model.get_layer(network.AFFINE_HEAD)
    optimizer = tf.keras.optimizers.Adam(1e-2)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            warped = layers.warp(moving, model(inputs, training=False), "zero")
            loss = tf.add_n([losses.multiscale_dice(fixed[..., k:k + 1], warped[..., k:k + 1])
                             for k in range(channels)]) / channels
        optimizer.apply_gradients(zip(tape.gradient(loss, head.trainable_variables), head.trainable_variables))
        return loss

    for _ in range(100):
        step()
    out = stages(inputs, training=False)
    dsc = metrics.dice(fixed[0, ..., 0], layers.warp(moving, out["ddf"], "zero").numpy()[0, ..., 0])
    dsc_prealigned = metrics.dice(fixed[0, ..., 0], moving[0, ..., 0])
    matrix, offset = world_affine(out["affine"].numpy()[0], pre.grid, pre.translation_mm)

    us_labels = io.labels_to_array(pair["fixed_label"])
    geo = io.Geometry.from_image(pair["fixed_label"][0])
    trus_landmarks = np.array([geo.index_to_world(np.argwhere(us_labels[..., k] >= 0.5).mean(axis=0))
                               for k in range(1, us_labels.shape[-1])])
    tre_prealigned = np.linalg.norm(trus_landmarks + pre.translation_mm - pair["landmarks_mm"], axis=1).mean()
    tre = np.linalg.norm(trus_landmarks @ matrix.T + offset - pair["landmarks_mm"], axis=1).mean()
    summary = affine_summary(matrix, offset, pre.grid.center_world)
    found = (dsc, tre, dsc_prealigned, tre_prealigned, summary["rotation_deg"])
    assert dsc > dsc_prealigned + 0.05, found
    assert tre < 0.4 * tre_prealigned and tre < 3.0, found  # mm
    assert 15.0 < summary["rotation_deg"] < 35.0, found
    u, _, vt = np.linalg.svd(matrix)
    residual = (u @ vt) @ pair["rotation"].T  # the rotation found, relative to the phantom's
    assert np.degrees(np.arccos(np.clip((np.trace(residual) - 1.0) / 2.0, -1.0, 1.0))) < 12.0, found


# ------------------------------------------------------------------------------------------------ training
def _shifted_gland_batch(shift):
    """A batch of one: a TRUS gland (ellipsoid) and landmark, and the MR ones shifted by ``shift`` voxels (so the
    warp ``moving(x + d)`` aligns them for d = ``shift``), with their SDMs, on the TINY grid."""
    from label_reg.preprocess import signed_distance_map
    x = _grid(TINY.shape)
    centre, blob = np.array([15.5, 15.5, 15.5]), np.array([12.0, 17.0, 15.0])

    def volumes(offset):
        gland = (np.linalg.norm((x - centre - offset) / [8, 6, 7], axis=-1) <= 1).astype(np.float32)
        landmark = (np.linalg.norm(x - blob - offset, axis=-1) <= 2.5).astype(np.float32)
        sdm = signed_distance_map(gland > 0.5, (1.0, 1.0, 1.0)).astype(np.float32)
        return gland[None, ..., None], landmark[None, ..., None], sdm[None, ..., None]

    fixed, moving = volumes(np.zeros(3)), volumes(np.asarray(shift, np.float64))
    image = np.full((1,) + TINY.shape + (1,), 0.5, np.float32)
    return {"fixed_label": fixed[0], "fixed_landmarks": fixed[1], "fixed_sdm": fixed[2], "moving_label": moving[0],
            "moving_landmarks": moving[1], "moving_sdm": moving[2], "fixed_image": image, "moving_image": image}


def test_the_affine_label_loss_scores_the_affine_stage_alone(tiny_train_config):
    """``--affine_label_weight``: the extra term is the label part of the training loss (gland Dice and SDM with
    alpha/beta, landmarks with their weight, no bending) under the affine head's field alone, whatever the local
    DDF; an affine that undoes a known shift brings it down to the score of a pair with nothing to undo; ``total``
    carries it with its weight."""
    from label_reg.train import TrainConfig, affine_label_loss, loss_terms
    shift = np.array([3.0, -2.0, 1.0])
    batch = _shifted_gland_batch(shift)
    config = dataclasses.replace(tiny_train_config, shape=TINY.shape, landmark_weight=0.3, global_affine=True,
                                 affine_label_weight=0.5)
    half = (np.asarray(TINY.shape) - 1) / 2
    undo = _theta(np.eye(3), shift / half)[None]
    identity = np.zeros((1, 12), np.float32)
    for theta in (identity, undo, _theta(_rotation((0, 0, 1), 10.0), [0.05, 0.0, 0.0])[None]):
        field = layers.affine_ddf(theta, TINY.shape)
        plain = loss_terms(batch, field, dataclasses.replace(config, affine_label_weight=0.0))
        expected = 0.05 * plain["multiscale_dice"] + 0.45 * plain["sdm_msle"] + 0.3 * plain["landmark_dice"]
        got = affine_label_loss(batch, theta, TINY.shape, config)
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5)
        # In the training loss the term sees the affine alone, not the total field the local DDF adds to.
        local = _smooth_field(np.random.default_rng(1), TINY.shape, 2.0)
        terms = loss_terms(batch, {"ddf": field + local, "affine_theta": theta}, config)
        np.testing.assert_allclose(terms["affine_labels"].numpy(), got.numpy(), rtol=1e-5)
        without = loss_terms(batch, field + local, dataclasses.replace(config, affine_label_weight=0.0))
        np.testing.assert_allclose(terms["total"].numpy(), (without["total"] + 0.5 * got).numpy(), rtol=1e-5)
    # An integer shift undone exactly scores what a pair with nothing to undo scores (smoothed Dice is not 0 there;
    # the warped SDM differs only in the layers the shift brings in from the edge, replicated).
    aligned, off = (float(affine_label_loss(batch, t, TINY.shape, config)[0]) for t in (undo, identity))
    floor = float(affine_label_loss(_shifted_gland_batch(np.zeros(3)), identity, TINY.shape, config)[0])
    assert aligned == pytest.approx(floor, abs=3e-3) and aligned < off - 0.1, (aligned, floor, off)
    with pytest.raises(ValueError, match="affine_theta"):
        loss_terms(batch, layers.affine_ddf(undo, TINY.shape), config)
    for bad, message in (({"affine_label_weight": -0.1}, "must be >= 0"),
                         ({"affine_label_weight": 0.5}, "needs --global_affine")):
        with pytest.raises(InputError, match=f"--affine_label_weight: {message}"):
            TrainConfig(data_dir="", model_dir="", **bad)


def test_training_with_the_stage_saves_it_and_register_writes_the_affine(tiny_train_config, phantom_dir, tmp_path):
    """A few training steps with ``global_affine`` and ``affine_label_weight``: the trainer feeds the loss the total
    DDF and the affine head's parameters (logged as ``train/affine_labels``), the model directory records the stage
    and keeps the plain one-output model, and ``register`` writes the affine the network predicts."""
    from tensorboard.backend.event_processing import event_accumulator

    from label_reg.register import Registrar
    from label_reg.train import train

    config = dataclasses.replace(tiny_train_config, model_dir=str(tmp_path / "model"), global_affine=True,
                                 affine_pooling="flatten", num_steps=6, validate_every=6, checkpoint_every=6,
                                 keep_checkpoint_every=0, learning_rate=3e-3, affine_label_weight=0.5, log_every=2)
    summary = train(config)
    assert summary["steps"] == 6 and np.isfinite(summary["loss_history"]).all()
    info, _ = model_dir.read_info(config.model_dir)
    assert info["build"]["global_affine"] is True and info["training"]["global_affine"] is True
    assert info["build"]["affine_pooling"] == "flatten" and info["training"]["affine_pooling"] == "flatten"
    assert info["training"]["affine_label_weight"] == 0.5
    logs = event_accumulator.EventAccumulator(str(tmp_path / "model" / "logs"),
                                              size_guidance={event_accumulator.TENSORS: 0})
    logs.Reload()
    affine_terms = [float(tf.make_ndarray(e.tensor_proto)) for e in logs.Tensors("train/affine_labels")]
    assert len(affine_terms) == 3 and all(t > 0 for t in affine_terms)
    with pytest.raises(InputError, match="--affine_pooling: must be one of average, flatten"):
        dataclasses.replace(config, affine_pooling="max")
    name = "phantom012"
    files = {k: phantom_dir / f"{k}s" / f"{name}.nii.gz" for k in ("moving_image", "fixed_image", "moving_label")}
    registrar = Registrar(config.model_dir)
    result = registrar.register(files["moving_image"], files["fixed_image"], files["moving_label"], None,
                                tmp_path / "out")
    head = model_dir.load(config.model_dir)[0].get_layer(network.AFFINE_HEAD)
    assert np.abs(head.get_weights()[1]).max() > 0  # the head trained
    pre_ddf, affine = registrar.predict_stages(_preprocessed(registrar, files))
    matrix, offset = world_affine(affine, io.Geometry.from_dict(result.report["crop_grid"]),
                                  result.report["translation_mm"])
    transform = sitk.AffineTransform(sitk.ReadTransform(str(result.files["transform_affine"])))
    np.testing.assert_allclose(np.reshape(transform.GetMatrix(), (3, 3)), matrix, atol=1e-9)
    p = np.array([1.0, -2.0, 3.0]) + np.asarray(result.report["prealignment"]["anchor_mm"])
    np.testing.assert_allclose(transform.TransformPoint(tuple(p)), matrix @ p + offset, atol=1e-6)
    assert np.isfinite(pre_ddf).all()


def _preprocessed(registrar, files):
    mr = io.read_image(files["moving_image"])
    return preprocess_images(mr, io.read_label(files["moving_label"], reference=mr), io.read_image(files["fixed_image"]),
                             None, registrar.config, sdm=False)
