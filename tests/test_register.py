"""Registration of raw NIfTI pairs: world-space accuracy, ITK round trips, oblique geometry, atomic outputs, errors."""
import json
import os
import pathlib
import resource
import shutil
import struct
import subprocess
import sys
import tracemalloc

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from label_reg import datasets, io, synthetic
from label_reg.errors import InputError
from label_reg.preprocess import PreprocessConfig, gland_centre_of_mass
from label_reg.register import QC_MAX_CENTRE_MM, QC_MIN_DSC, Registrar, read_inputs, read_points_csv, register_folder
from label_reg.transform import invert_points, transform_points

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = PreprocessConfig(spacing_mm=3.0, shape=(32, 32, 32))


def _files(root, name):
    return {k: root / k_dir / f"{name}.nii.gz" for k, k_dir in
            (("moving_image", "moving_images"), ("fixed_image", "fixed_images"), ("moving_label", "moving_labels"),
             ("fixed_label", "fixed_labels"))}


def _centroids_world(path):
    """World centroids (K-1, 3) of landmark channels 1.. of a label file."""
    channels = io.read_label(path)
    geo = io.Geometry.from_image(channels[0])
    arr = io.labels_to_array(channels)
    return np.array([geo.index_to_world(np.argwhere(arr[..., k] >= 0.5).mean(axis=0))
                     for k in range(1, arr.shape[-1])])


def _itk_transform(path):
    return sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkVectorFloat64))


def _dice(a, b):
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return 2.0 * np.sum(a & b) / (np.sum(a) + np.sum(b))


def _gland(path):
    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img)
    return (arr[0] if img.GetDimension() == 4 else arr) > 0  # (z, y, x)


@pytest.fixture(scope="module")
def registrar(trained_model):
    return Registrar(trained_model[0])


@pytest.fixture(scope="module")
def untrained_dir(tmp_path_factory):
    """A MIX+ model straight from build_model: its DDF is exactly zero."""
    from label_reg import model_dir, network
    path = tmp_path_factory.mktemp("untrained") / "model"
    model = network.build_model(TINY.shape, True, 4)
    model_dir.save(path, model, {"image_shape": TINY.shape, "moving_label_input": True, "base_filters": 4}, TINY)
    return path


@pytest.fixture(scope="module")
def untrained(untrained_dir):
    return Registrar(untrained_dir)


def _heldout_names(phantom_dir):
    """The phantom pairs fold 0 holds out (those the tiny models never trained on)."""
    names = [p.name for p in datasets.discover_pairs(phantom_dir)]
    return datasets.kfold_split(names, 5, 0, 0)[1]


@pytest.fixture(scope="module")
def heldout_results(registrar, phantom_dir, tmp_path_factory):
    """Register every held-out phantom with its MR landmark centroids as moving points."""
    heldout = _heldout_names(phantom_dir)
    out_root = tmp_path_factory.mktemp("registered")
    results = {}
    for name in heldout:
        files = _files(phantom_dir, name)
        mr_points = _centroids_world(files["moving_label"])
        csv = out_root / f"{name}_points.csv"
        pd.DataFrame({"name": [f"L{k + 1}" for k in range(len(mr_points))], "x": mr_points[:, 0],
                      "y": mr_points[:, 1], "z": mr_points[:, 2]}).to_csv(csv, index=False)
        res = registrar.register(files["moving_image"], files["fixed_image"], files["moving_label"], csv,
                                 out_root / name)
        results[name] = (res, mr_points, files)
    return results


def test_mapped_points_beat_prealignment_and_match_the_written_itk_field(heldout_results, phantom_dir):
    ours, coarse, forward_ours, forward_coarse = [], [], [], []
    for name, (res, mr_points, files) in heldout_results.items():
        gt, gt_geo = io.read_displacement_field(phantom_dir / synthetic.GROUND_TRUTH_DIR / f"{name}.nii.gz")
        truth, residual = invert_points(mr_points, gt, gt_geo)
        assert residual.max() < 1e-4
        assert res.point_status == ["ok"] * len(mr_points)
        ours += list(np.linalg.norm(res.points_fixed - truth, axis=1))
        coarse += list(np.linalg.norm(mr_points - res.translation_mm - truth, axis=1))
        # The written field, loaded by ITK, sends each mapped TRUS point back onto its MR input (1e-3 mm).
        itk = _itk_transform(res.files["transform_ddf"])
        back = np.array([itk.TransformPoint(tuple(float(v) for v in p)) for p in res.points_fixed])
        np.testing.assert_allclose(back, mr_points, atol=1e-3)
        # Forward direction: TRUS landmark centroids -> MR, against the ground truth p + gt(p).
        us_points = _centroids_world(files["fixed_label"])
        gt_mr = transform_points(us_points, gt, gt_geo)
        ours_mr = np.array([itk.TransformPoint(tuple(float(v) for v in p)) for p in us_points])
        forward_ours += list(np.linalg.norm(ours_mr - gt_mr, axis=1))
        forward_coarse += list(np.linalg.norm(us_points + res.translation_mm - gt_mr, axis=1))
        # The CSV and the Slicer markups hold the same points, in TRUS world (LPS) mm.
        table = pd.read_csv(res.files["moving_points_in_fixed_csv"])
        np.testing.assert_allclose(table[["x", "y", "z"]].to_numpy(), res.points_fixed, atol=1e-5)
        np.testing.assert_allclose(table[["moving_x", "moving_y", "moving_z"]].to_numpy(), mr_points, atol=1e-5)
        markups = json.loads(res.files["moving_points_in_fixed_mrk"].read_text())["markups"][0]
        assert markups["type"] == "Fiducial" and markups["coordinateSystem"] == "LPS"
        np.testing.assert_allclose([cp["position"] for cp in markups["controlPoints"]], res.points_fixed, atol=1e-9)
        assert [cp["label"] for cp in markups["controlPoints"]] == list(table["name"])
    assert len(ours) >= 8
    assert np.median(ours) < np.median(coarse), (np.median(ours), np.median(coarse))
    assert np.median(forward_ours) < np.median(forward_coarse), (np.median(forward_ours), np.median(forward_coarse))


def test_outputs_are_on_the_trus_grid_and_described(heldout_results):
    res, _, files = next(iter(heldout_results.values()))
    us_geo = io.Geometry.from_image(io.read_image(files["fixed_image"]))
    assert sorted(p.name for p in res.output_dir.iterdir()) == sorted(
        ["warped_moving_image.nii.gz", "warped_moving_label.nii.gz", "transform_ddf.nii.gz", "registration.json",
         "moving_points_in_fixed.csv", "moving_points_in_fixed.mrk.json"])
    warped = sitk.ReadImage(str(res.files["warped_moving_image"]))
    labels = io.read_label(res.files["warped_moving_label"])
    field = sitk.ReadImage(str(res.files["transform_ddf"]))
    assert field.GetNumberOfComponentsPerPixel() == 3 and field.GetDimension() == 3
    for img in [warped, field] + labels:
        assert io.Geometry.from_image(img).allclose(us_geo, tol=1e-6)
    assert len(labels) == len(io.read_label(files["moving_label"]))
    report = json.loads(res.files["registration"].read_text())
    assert report["translation_mm"] == pytest.approx(list(res.translation_mm))
    # The paper's pre-alignment: no segmenter, anchor on the TRUS volume centre, no self-check.
    assert report["prealignment"]["mode"] == "trus_centre" and report["prealignment"]["gland_estimate"] is None
    assert report["prealignment"]["anchor_mm"] == pytest.approx(list(us_geo.center_world))
    assert report["quality_check"] is None and "segment_s" not in report["timings_s"]
    assert report["inputs"]["moving_image"] == str(files["moving_image"].resolve())
    assert report["ddf_mm"]["max"] > 0 and report["timings_s"]["total_s"] > 0


def _rotation(axis, degrees):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    a = np.deg2rad(degrees)
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def _moved(img, rotation, offset):
    """The same image placed elsewhere in the world: world point p becomes rotation @ p + offset."""
    out = sitk.Image(img)
    out.SetDirection(tuple((rotation @ np.reshape(img.GetDirection(), (3, 3))).ravel()))
    out.SetOrigin(tuple(rotation @ np.asarray(img.GetOrigin()) + offset))
    return out


def _flipped_x(img):
    """Same world image, stored with the x axis reversed (direction column 0 negated, origin at the old last x)."""
    geo = io.Geometry.from_image(img)
    out = sitk.GetImageFromArray(sitk.GetArrayFromImage(img)[:, :, ::-1].copy())
    out.SetSpacing(img.GetSpacing())
    out.SetDirection(tuple((geo.direction_matrix @ np.diag([-1.0, 1.0, 1.0])).ravel()))
    out.SetOrigin(tuple(geo.index_to_world((geo.size[0] - 1, 0, 0))))
    return out


def _padded(img):
    """One zero voxel more at the far x and z ends: the phantom's TRUS grid (60 x 1.25 mm) and the tiny crop grid
    (32 x 3 mm, same centre) otherwise share exact edge positions, where inside/outside is decided by rounding."""
    return sitk.ConstantPad(img, [0, 0, 0], [1, 0, 1], 0.0)


def _write_case(files, root, place):
    out = {}
    for key in ("moving_image", "fixed_image"):
        img = io.read_image(files[key])
        out[key] = root / f"{key}.nii.gz"
        io.write_image(out[key], place(_padded(img) if key == "fixed_image" else img, key))
    for key in ("moving_label", "fixed_label"):
        channels = io.read_label(files[key])
        out[key] = root / f"{key}.nii.gz"
        io.write_label(out[key], [place(_padded(c) if key == "fixed_label" else c, key) for c in channels])
    return out


def test_oblique_trus_round_trips_in_world_space(registrar, heldout_results, tmp_path):
    """Move every held-out pair rigidly in the world (oblique TRUS direction, far origin) and store its MR with the x
    axis reversed: the network sees the same arrays, so the outputs must be the original ones rotated, on the new
    TRUS grid, and the warped gland must still overlap the TRUS gland better than the pre-alignment does."""
    rotation = _rotation((1.0, 0.5, 0.3), 35.0)
    offset = np.array([40.0, -25.0, 60.0])

    def oblique(img, key):
        img = _moved(img, rotation, offset)
        return _flipped_x(img) if key.startswith("moving") else img

    ours, coarse = [], []
    for name, (_, _, files) in heldout_results.items():
        plain = _write_case(files, tmp_path / name / "plain", lambda img, key: img)
        moved = _write_case(files, tmp_path / name / "oblique", oblique)
        us = io.read_image(moved["fixed_image"])
        us_geo = io.Geometry.from_image(us)
        direction = np.abs(us_geo.direction_matrix)
        assert np.linalg.norm(us_geo.origin) > 50 and np.abs(direction - np.round(direction)).max() > 0.2  # oblique
        res0 = registrar.register(plain["moving_image"], plain["fixed_image"], plain["moving_label"], None,
                                  tmp_path / name / "plain_out")
        res = registrar.register(moved["moving_image"], moved["fixed_image"], moved["moving_label"], None,
                                 tmp_path / name / "oblique_out")
        for key in ("warped_moving_image", "warped_moving_label", "transform_ddf"):
            assert io.Geometry.from_image(sitk.ReadImage(str(res.files[key]))).allclose(us_geo, tol=1e-6), key
        np.testing.assert_allclose(res.translation_mm, rotation @ res0.translation_mm, atol=1e-4)  # float32 headers
        disp0, _ = io.read_displacement_field(res0.files["transform_ddf"])
        disp, _ = io.read_displacement_field(res.files["transform_ddf"])
        np.testing.assert_allclose(disp, disp0 @ rotation.T, atol=1e-2)
        fixed_gland = _gland(moved["fixed_label"])
        warped_gland = _gland(res.files["warped_moving_label"])
        assert _dice(warped_gland, _gland(res0.files["warped_moving_label"])) > 0.99
        mr_gland = sitk.Cast(io.read_label(moved["moving_label"])[0], sitk.sitkFloat32)
        shift = sitk.TranslationTransform(3, [float(v) for v in res.translation_mm])
        coarse.append(_dice(sitk.GetArrayFromImage(sitk.Resample(mr_gland, us, shift, sitk.sitkLinear)) >= 0.5,
                            fixed_gland))
        ours.append(_dice(warped_gland, fixed_gland))
        # The warped MR image is the MR resampled through the written field (cubic B-spline, clamped to its range).
        mr = io.read_image(moved["moving_image"])
        lo, hi = (float(f(sitk.GetArrayViewFromImage(mr))) for f in (np.min, np.max))
        expected = sitk.Resample(mr, us, _itk_transform(res.files["transform_ddf"]), sitk.sitkBSpline, lo)
        got = sitk.GetArrayFromImage(sitk.ReadImage(str(res.files["warped_moving_image"])))
        np.testing.assert_allclose(got, np.clip(sitk.GetArrayFromImage(expected), lo, hi), atol=1e-2)
    assert np.median(ours) > np.median(coarse), (ours, coarse)


def test_zero_ddf_gives_the_pure_prealignment(untrained, phantom_dir, tmp_path):
    registrar = untrained
    files = _files(phantom_dir, "phantom000")
    points = np.array([[1.0, 2.0, 3.0], [-10.0, 5.0, 20.0]])
    csv = tmp_path / "points.csv"
    csv.write_text("".join(f"{x},{y},{z}\n" for x, y, z in points))  # header-less x,y,z
    res = registrar.register(files["moving_image"], files["fixed_image"], files["moving_label"], csv,
                             tmp_path / "out")
    disp, geo = io.read_displacement_field(res.files["transform_ddf"])
    assert geo.allclose(io.Geometry.from_image(io.read_image(files["fixed_image"])), tol=1e-6)
    np.testing.assert_array_equal(disp, np.broadcast_to(res.translation_mm, disp.shape))
    np.testing.assert_allclose(res.points_fixed, points - res.translation_mm, atol=1e-9)
    us = io.read_image(files["fixed_image"])
    shift = sitk.TranslationTransform(3, [float(v) for v in res.translation_mm])
    for k, channel in enumerate(io.read_label(files["moving_label"])):
        expected = sitk.GetArrayFromImage(sitk.Resample(channel, us, shift, sitk.sitkLinear, 0.0)) >= 0.5
        got = sitk.GetArrayFromImage(sitk.ReadImage(str(res.files["warped_moving_label"])))[k]
        np.testing.assert_array_equal(got, expected.astype(np.uint8))
    mr = io.read_image(files["moving_image"])
    expected = sitk.GetArrayFromImage(sitk.Resample(mr, us, shift, sitk.sitkBSpline, float(
        sitk.GetArrayViewFromImage(mr).min())))
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(res.files["warped_moving_image"])))
    lo, hi = sitk.GetArrayViewFromImage(mr).min(), sitk.GetArrayViewFromImage(mr).max()
    np.testing.assert_allclose(got, np.clip(expected, lo, hi), atol=1e-3)


def test_points_outside_or_not_invertible_are_flagged(untrained, phantom_dir, tmp_path):
    registrar = untrained
    files = _files(phantom_dir, "phantom001")
    csv = tmp_path / "points.csv"
    csv.write_text("X,Y,Z,name\n0,0,0,inside?\n1000,0,0,far\n")
    res = registrar.register(files["moving_image"], files["fixed_image"], files["moving_label"], csv,
                             tmp_path / "out")
    table = pd.read_csv(res.files["moving_points_in_fixed_csv"])
    assert list(table["name"]) == ["inside?", "far"] and table["status"][1] == "outside_fixed_image"
    us_geo = io.Geometry.from_image(io.read_image(files["fixed_image"]))
    idx = us_geo.world_to_index(res.points_fixed[0])
    inside = bool(np.all((idx >= -0.5) & (idx <= np.asarray(us_geo.size) - 0.5)))
    assert table["status"][0] == ("ok" if inside else "outside_fixed_image")
    marks = json.loads(res.files["moving_points_in_fixed_mrk"].read_text())["markups"][0]["controlPoints"]
    assert marks[1]["description"] == "outside_fixed_image"


def test_points_csv_validation(tmp_path):
    good = tmp_path / "good.csv"
    good.write_text("name, x, y, z\nA, 1, 2, 3\n,4,5,6\n")
    names, pts = read_points_csv(good)
    assert names == ["A", "P-2"] and pts.tolist() == [[1, 2, 3], [4, 5, 6]]
    for text in ("", "x,y,z\n", "a,b\n1,2\n", "x,y,z\n1,2,nan\n", "x,y,z\n1,two,3\n"):
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        with pytest.raises(InputError, match="bad.csv"):
            read_points_csv(bad)


def test_batch_mode_loads_once_and_never_retraces(untrained_dir, phantom_dir, tmp_path):
    data = tmp_path / "data"
    for folder in ("moving_images", "moving_labels", "fixed_images"):  # no fixed labels: not needed
        (data / folder).mkdir(parents=True)
        for name in ("phantom002", "phantom003", "phantom004"):
            os.symlink(phantom_dir / folder / f"{name}.nii.gz", data / folder / f"{name}.nii.gz")
    (data / "moving_points").mkdir()
    (data / "moving_points" / "phantom003.csv").write_text("x,y,z\n0,0,0\n")
    registrar = Registrar(untrained_dir)
    lines = []

    class Stream:
        def write(self, text):
            lines.append(text)

        def flush(self):
            pass

    results = register_folder(data, tmp_path / "out", registrar=registrar, stream=Stream())
    assert [r["name"] for r in results] == ["phantom002", "phantom003", "phantom004"] and all(r["ok"] for r in results)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["phantom002", "phantom003", "phantom004"]
    assert (tmp_path / "out" / "phantom003" / "moving_points_in_fixed.csv").is_file()
    assert not (tmp_path / "out" / "phantom002" / "moving_points_in_fixed.csv").exists()
    assert sum("[" in line and "/3]" in line for line in lines) == 3
    assert registrar.predictor.forward.experimental_get_tracing_count() == 1


# ------------------------------------------------------------------------------------------------ CLI
def _cli(*args, file_size_limit=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")

    def limit():  # like `ulimit -f`: writes beyond this many bytes fail (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run([sys.executable, "-m", "label_reg.cli", "register", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=limit if file_size_limit else None)


def test_cli_registers_into_an_existing_folder_replacing_only_its_own_outputs(untrained_dir, phantom_dir, tmp_path):
    files = _files(phantom_dir, "phantom005")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "moving_points_in_fixed.csv").write_text("stale")  # from an earlier run with --moving_points
    run = _cli("--moving_image", files["moving_image"], "--fixed_image", files["fixed_image"], "--moving_label",
               files["moving_label"], "--model", untrained_dir, "--output_dir", out)
    assert run.returncode == 0, run.stderr
    assert "registered" in run.stdout
    assert run.stderr.strip() == (f"label-reg register: replaced 1 output file(s) of an earlier run in {out}: "
                                  "moving_points_in_fixed.csv")  # reported, in one line (and nothing else)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["notes.txt", "registration.json", "transform_ddf.nii.gz", "warped_moving_image.nii.gz",
         "warped_moving_label.nii.gz"])
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind
    report = json.loads((out / "registration.json").read_text())
    disp, _ = io.read_displacement_field(out / "transform_ddf.nii.gz")
    np.testing.assert_array_equal(disp[0, 0, 0], report["translation_mm"])


def _error_lines(stderr):
    return [ln for ln in stderr.splitlines() if ln.startswith("label-reg register: error:")]


@pytest.fixture(scope="module")
def bad_inputs(phantom_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    files = _files(phantom_dir, "phantom000")
    two_d = root / "two_d.nii.gz"
    sitk.WriteImage(sitk.Image([20, 20], sitk.sitkFloat32), str(two_d))
    nan = root / "nan.nii.gz"
    arr = sitk.GetArrayFromImage(io.read_image(files["fixed_image"]))
    arr[5, 5, 5] = np.nan
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(io.read_image(files["fixed_image"]))
    sitk.WriteImage(img, str(nan))
    shifted = root / "shifted_label.nii.gz"
    channels = io.read_label(files["moving_label"])
    for ch in channels:
        ch.SetOrigin([v + 5.0 for v in ch.GetOrigin()])
    io.write_label(shifted, channels)
    zero_spacing = root / "zero_spacing.nii"  # NIfTI pixdim[2] = 0: ITK would silently read 1 mm
    sitk.WriteImage(io.read_image(files["fixed_image"]), str(zero_spacing))
    header = bytearray(zero_spacing.read_bytes())
    header[84:88] = struct.pack("<f", 0.0)
    zero_spacing.write_bytes(bytes(header))
    return {"files": files, "two_d": two_d, "nan": nan, "shifted": shifted, "zero_spacing": zero_spacing,
            "root": root}


@pytest.mark.parametrize("case", ["missing_mask", "two_d", "nan", "label_geometry", "zero_spacing"])
def test_bad_inputs_exit_2_with_one_line_and_no_output(case, bad_inputs, trained_model, tmp_path):
    files = bad_inputs["files"]
    mr, us, seg = files["moving_image"], files["fixed_image"], files["moving_label"]
    named = {"missing_mask": mr, "two_d": bad_inputs["two_d"], "nan": bad_inputs["nan"],
             "label_geometry": bad_inputs["shifted"], "zero_spacing": bad_inputs["zero_spacing"]}[case]
    if case == "missing_mask":
        args = ["--moving_image", mr, "--fixed_image", us]
    elif case == "two_d":
        args = ["--moving_image", mr, "--fixed_image", bad_inputs["two_d"], "--moving_label", seg]
    elif case in ("nan", "zero_spacing"):
        args = ["--moving_image", mr, "--fixed_image", bad_inputs[case], "--moving_label", seg]
    else:
        args = ["--moving_image", mr, "--fixed_image", us, "--moving_label", bad_inputs["shifted"]]
    parent = tmp_path / "results"
    parent.mkdir()
    run = _cli(*args, "--model", trained_model[0], "--output_dir", parent / "out")
    assert run.returncode == 2, run.stderr
    errors = _error_lines(run.stderr)
    assert len(errors) == 1 and str(named) in errors[0], run.stderr
    if case == "missing_mask":
        assert "gland mask" in errors[0] and "MIX+" in errors[0]
    if case == "zero_spacing":
        assert "pixdim[2]" in errors[0]
    assert list(parent.iterdir()) == []


# ------------------------------------------------------------------------------------------------ found-gland chain
# The tiny fixture segmenter (60 steps at 3 mm) finds the phantom glands with DSC 0.65-0.78 only, so the self-check
# is exercised with thresholds fitted to it (measured on the 20 phantoms: good pairs DSC 0.63-0.74, centre distance
# 2.8-6.7 mm; an MR mask eroded to a quarter of the gland: DSC 0.20-0.28). The documented defaults are for trained
# networks (test_self_check_criteria_and_defaults).
TINY_MIN_DSC, TINY_MAX_CENTRE_MM = 0.5, 8.0


@pytest.fixture(scope="module")
def gland_registrar(gland_model):
    return Registrar(gland_model, min_dsc=TINY_MIN_DSC, max_centre_mm=TINY_MAX_CENTRE_MM)


@pytest.fixture(scope="module")
def gland_results(gland_registrar, phantom_dir, tmp_path_factory):
    """The held-out phantoms of fold 0 registered through the whole chain (segmenter on the raw TRUS, found-gland
    pre-alignment, network, self-check)."""
    heldout = _heldout_names(phantom_dir)
    out_root = tmp_path_factory.mktemp("gland_registered")
    results = {}
    for name in heldout:
        files = _files(phantom_dir, name)
        results[name] = (gland_registrar.register(files["moving_image"], files["fixed_image"], files["moving_label"],
                                                  None, out_root / name), files)
    return results


@pytest.fixture(scope="module")
def gland_finder(gland_model):
    """The segmenter the gland model carries, loaded on its own (independent of the Registrar)."""
    from label_reg import model_dir
    from label_reg.segmenter import GlandFinder
    return GlandFinder.from_model_dir(model_dir.segmenter_path(gland_model, json.loads(
        (gland_model / model_dir.INFO_FILE).read_text())))


def test_found_gland_is_written_on_the_trus_grid_in_world_space(gland_results, gland_finder):
    truth_dsc = []
    for name, (res, files) in gland_results.items():
        assert sorted(p.name for p in res.output_dir.iterdir()) == sorted(
            ["warped_moving_image.nii.gz", "warped_moving_label.nii.gz", "transform_ddf.nii.gz", "registration.json",
             "fixed_label_predicted.nii.gz"])
        us = io.read_image(files["fixed_image"])
        us_geo = io.Geometry.from_image(us)
        written = sitk.ReadImage(str(res.files["fixed_label_predicted"]))
        assert written.GetDimension() == 3 and written.GetPixelID() == sitk.sitkUInt8
        geo = io.Geometry.from_image(written)
        assert geo.allclose(us_geo, tol=1e-6)
        mask = sitk.GetArrayFromImage(written).transpose(2, 1, 0)  # (x, y, z)
        assert set(np.unique(mask)) == {0, 1}
        # World-space agreement with the segmenter's own mask on its grid, mapped voxel by voxel through the written
        # header (nearest neighbour): a mask stored with its axes swapped or flipped, or with the segmenter grid's
        # header, disagrees (measured DSC 0.5-0.7 for swapped/flipped axes on these phantoms).
        estimate = gland_finder.find(us, str(files["fixed_image"]))
        points = geo.index_to_world(np.indices(mask.shape).reshape(3, -1).T.astype(np.float64))
        seg_idx = np.rint(estimate.grid.world_to_index(points)).astype(int)
        inside = np.all((seg_idx >= 0) & (seg_idx < np.asarray(estimate.grid.size)), axis=1)
        mapped = np.zeros(len(points), bool)
        mapped[inside] = estimate.mask[tuple(seg_idx[inside].T)]
        assert _dice(mask.ravel(), mapped) > 0.9, name
        # ... and it overlaps the true TRUS gland.
        truth_dsc.append(_dice(_gland(res.files["fixed_label_predicted"]), _gland(files["fixed_label"])))
    assert min(truth_dsc) > 0.55 and np.mean(truth_dsc) > 0.6, truth_dsc


def test_prealignment_puts_the_mr_gland_on_the_found_centre(gland_results, gland_finder):
    found_error, centre_error = [], []
    for name, (res, files) in gland_results.items():
        report = json.loads(res.files["registration"].read_text())
        pre = report["prealignment"]
        assert pre["mode"] == "trus_gland" and pre["gland_estimate"]["found"]
        found = np.asarray(pre["gland_estimate"]["centre_mm"])
        # The segmenter carried by the model, run on the raw TRUS file, finds that centre.
        us = io.read_image(files["fixed_image"])
        np.testing.assert_allclose(gland_finder.find(us, str(files["fixed_image"])).centre_mm, found, atol=1e-3)
        mr_centre = gland_centre_of_mass(io.read_label(files["moving_label"])[0])
        np.testing.assert_allclose(report["translation_mm"], mr_centre - found, atol=1e-6)
        np.testing.assert_allclose(pre["anchor_mm"], found, atol=1e-6)
        np.testing.assert_allclose(res.translation_mm, mr_centre - found, atol=1e-6)
        volume_centre = io.Geometry.from_image(us).center_world
        assert np.linalg.norm(found - volume_centre) > 2.0, name  # not the paper's TRUS volume centre
        true_centre = gland_centre_of_mass(io.read_label(files["fixed_label"])[0])
        found_error.append(np.linalg.norm(found - true_centre))
        centre_error.append(np.linalg.norm(volume_centre - true_centre))
        assert report["timings_s"]["segment_s"] > 0
    assert np.median(found_error) < np.median(centre_error), (found_error, centre_error)


def _recheck(res):
    """DSC and centre distance (world mm) of the written warped MR gland and found TRUS gland, from the files."""
    warped = _gland(res.files["warped_moving_label"])
    found = _gland(res.files["fixed_label_predicted"])
    geo = io.Geometry.from_image(sitk.ReadImage(str(res.files["fixed_label_predicted"])))
    assert io.Geometry.from_image(io.read_label(res.files["warped_moving_label"])[0]).allclose(geo, tol=1e-6)
    centres = [geo.index_to_world(np.argwhere(m)[:, ::-1].mean(axis=0)) for m in (warped, found)]
    return _dice(warped, found), float(np.linalg.norm(centres[0] - centres[1]))


def test_self_check_passes_on_good_pairs_and_matches_the_written_files(gland_results):
    for name, (res, _) in gland_results.items():
        check = json.loads(res.files["registration"].read_text())["quality_check"]
        assert check["passed"] and check["failed"] == [], (name, check)
        assert check["thresholds"] == {"min_dsc": TINY_MIN_DSC, "max_centre_distance_mm": TINY_MAX_CENTRE_MM,
                                       "border_contact": "fails"}
        dsc, distance = _recheck(res)
        assert check["dsc"] == pytest.approx(dsc, abs=1e-4) and dsc >= TINY_MIN_DSC
        assert check["centre_distance_mm"] == pytest.approx(distance, abs=1e-3)
        assert not check["touches_segmenter_border"]


def test_recentring_registers_again_on_the_centre_of_the_gland_the_first_pass_warped(gland_model, gland_results,
                                                                                    tmp_path):
    """--recentre_passes=1: pass 1 is the plain found-gland registration (the same anchor), pass 2 is pre-aligned
    on the centre of the MR gland pass 1 warped (read back from pass 1's written warped label, on the TRUS grid:
    within a voxel of the crop grid's soft estimate), and every output is that second registration's."""
    registrar = Registrar(gland_model, min_dsc=TINY_MIN_DSC, max_centre_mm=TINY_MAX_CENTRE_MM, recentre_passes=1)
    moved = []
    for name, (first, files) in sorted(gland_results.items()):
        res = registrar.register(files["moving_image"], files["fixed_image"], files["moving_label"], None,
                                 tmp_path / name)
        report, before = (json.loads(r.files["registration"].read_text()) for r in (res, first))
        assert before["prealignment"]["recentre"] is None
        recentred = report["prealignment"]["recentre"]
        assert recentred["passes"] == recentred["passes_run"] == 1 and recentred["stopped"] is None
        anchors = np.asarray(recentred["anchors_mm"])
        np.testing.assert_allclose(anchors[0], before["prealignment"]["anchor_mm"], atol=1e-9)
        warped = _gland(first.files["warped_moving_label"])  # (z, y, x) on the TRUS grid
        geo = io.Geometry.from_image(io.read_image(files["fixed_image"]))
        warped_centre = geo.index_to_world(np.argwhere(warped)[:, ::-1].mean(axis=0))
        assert np.linalg.norm(anchors[1] - warped_centre) < TINY.spacing_mm, name
        np.testing.assert_allclose(report["prealignment"]["anchor_mm"], anchors[1], atol=1e-9)
        mr_centre = gland_centre_of_mass(io.read_label(files["moving_label"])[0])
        np.testing.assert_allclose(report["translation_mm"], mr_centre - anchors[1], atol=1e-6)
        assert recentred["shift_mm"] == pytest.approx(np.linalg.norm(anchors[1] - anchors[0]))
        disp, _ = io.read_displacement_field(res.files["transform_ddf"])
        assert np.abs(disp - io.read_displacement_field(first.files["transform_ddf"])[0]).max() > 0.1
        assert report["quality_check"] is not None
        moved.append(recentred["shift_mm"])
    assert max(moved) > 0.1, moved  # the tiny network moves the glands: the passes are not a no-op


def test_recentring_a_volume_centre_model_is_a_one_line_error(untrained_dir, phantom_dir, tmp_path):
    files = _files(phantom_dir, "phantom000")
    parent = tmp_path / "results"
    parent.mkdir()
    run = _cli("--moving_image", files["moving_image"], "--fixed_image", files["fixed_image"], "--moving_label",
               files["moving_label"], "--model", untrained_dir, "--output_dir", parent / "out", "--recentre_passes=1")
    assert run.returncode == 2, run.stderr
    errors = _error_lines(run.stderr)
    assert len(errors) == 1 and "--recentre_passes" in errors[0] and "trus_centre" in errors[0], run.stderr
    assert list(parent.iterdir()) == []


def _eroded_mask(path, out, iterations=6):
    """The MR gland mask eroded by ``iterations`` voxels (9 mm on the phantom MR grid): a quarter of the gland."""
    from scipy import ndimage
    gland = io.read_label(path)[0]
    arr = ndimage.binary_erosion(sitk.GetArrayFromImage(gland) > 0, iterations=iterations).astype(np.uint8)
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(gland)
    io.write_label(out, [img])
    return out


def test_self_check_fails_with_one_warning_on_a_wrong_mr_mask(gland_registrar, registrar, gland_results, tmp_path,
                                                              capsys):
    name, (good, files) = next(iter(gland_results.items()))
    good_check = good.report["quality_check"]
    out = tmp_path / "out"
    res = gland_registrar.register(files["moving_image"], files["fixed_image"], files["moving_label"], None, out)
    assert "warning" not in capsys.readouterr().err
    assert res.report["quality_check"]["dsc"] == pytest.approx(good_check["dsc"])  # deterministic
    wrong = _eroded_mask(files["moving_label"], tmp_path / "eroded.nii.gz")
    bad_out = tmp_path / "bad_out"
    bad = gland_registrar.register(files["moving_image"], files["fixed_image"], wrong, None, bad_out)
    check = json.loads(bad.files["registration"].read_text())["quality_check"]
    assert check["passed"] is False and check["dsc"] < TINY_MIN_DSC and check["dsc"] < good_check["dsc"] - 0.2
    assert any(reason.startswith("DSC") for reason in check["failed"])
    assert check["dsc"] == pytest.approx(_recheck(bad)[0], abs=1e-4)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(warnings) == 1 and warnings[0].startswith("warning:"), warnings
    assert str(files["fixed_image"]) in warnings[0] and "DSC" in warnings[0] and str(bad_out) in warnings[0]
    assert (bad_out / "fixed_label_predicted.nii.gz").is_file() and (bad_out / "transform_ddf.nii.gz").is_file()
    # A TRUS-centre model registering into the same folder replaces the found gland it no longer produces.
    again = registrar.register(files["moving_image"], files["fixed_image"], files["moving_label"], None, bad_out)
    assert again.report["quality_check"] is None and not (bad_out / "fixed_label_predicted.nii.gz").exists()


def test_self_check_criteria_and_defaults():
    from label_reg.register import quality_check
    from label_reg.segmenter import GlandEstimate
    geo = io.Geometry(size=(40, 40, 40), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                      direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))

    def box(x0):
        arr = np.zeros(geo.size, np.uint8)
        arr[x0:x0 + 20, 10:30, 10:30] = 1
        return io.from_array(arr, geo, np.uint8)

    def estimate(touches=False):
        return GlandEstimate(np.zeros((4, 4, 4), bool), geo, np.zeros(3), 1.0, touches)

    good = quality_check(box(10), box(11), estimate())  # DSC 19/20, centres 1 mm apart (along x)
    assert good["passed"] and good["dsc"] == pytest.approx(0.95) and good["centre_distance_mm"] == pytest.approx(1.0)
    assert good["thresholds"]["min_dsc"] == QC_MIN_DSC == 0.70 and QC_MAX_CENTRE_MM == 5.0
    far = quality_check(box(10), box(16), estimate())  # DSC 14/20 = 0.70 (passes), 6 mm apart (fails)
    assert far["dsc"] == pytest.approx(0.70) and far["failed"] == ["gland centre distance 6.0 mm > 5 mm"]
    lower = quality_check(box(10), box(16), estimate(), min_dsc=0.75, max_centre_distance_mm=6.5)
    assert len(lower["failed"]) == 1 and lower["failed"][0].startswith("DSC 0.700 < 0.75")
    border = quality_check(box(10), box(10), estimate(touches=True))
    assert border["dsc"] == 1.0 and border["failed"] == ["the found TRUS gland touches the segmenter grid border"]
    edge = quality_check(box(0), box(0), estimate())  # the TRUS image border: recorded, not a failure
    assert edge["touches_fixed_border"] and edge["passed"]
    empty = quality_check(io.from_array(np.zeros(geo.size, np.uint8), geo, np.uint8), box(10), estimate())
    assert empty["centre_distance_mm"] is None and not empty["passed"] and len(empty["failed"]) == 2


def test_gland_model_without_its_segmenter_is_a_one_line_error(gland_model, phantom_dir, tmp_path):
    from label_reg import model_dir
    broken = tmp_path / "model"
    broken.mkdir()
    for name in (model_dir.INFO_FILE, model_dir.WEIGHTS_FILE):
        (broken / name).write_bytes((gland_model / name).read_bytes())
    with pytest.raises(InputError, match="segmenter") as err:
        Registrar(broken)
    assert "\n" not in str(err.value) and str(broken / model_dir.SEGMENTER_DIR) in str(err.value)
    unnamed = tmp_path / "unnamed"
    unnamed.mkdir()
    info = json.loads((gland_model / model_dir.INFO_FILE).read_text())
    del info["segmenter"]
    (unnamed / model_dir.INFO_FILE).write_text(json.dumps(info))
    (unnamed / model_dir.WEIGHTS_FILE).write_bytes((gland_model / model_dir.WEIGHTS_FILE).read_bytes())
    with pytest.raises(InputError, match="segmenter") as err:
        Registrar(unnamed)
    assert "\n" not in str(err.value) and str(unnamed / model_dir.INFO_FILE) in str(err.value)
    files = _files(phantom_dir, "phantom000")
    parent = tmp_path / "results"
    parent.mkdir()
    run = _cli("--moving_image", files["moving_image"], "--fixed_image", files["fixed_image"], "--moving_label",
               files["moving_label"], "--model_dir", broken, "--output_dir", parent / "out")
    assert run.returncode == 2, run.stderr
    errors = _error_lines(run.stderr)
    assert len(errors) == 1 and str(broken / model_dir.SEGMENTER_DIR) in errors[0] and "segmenter" in errors[0]
    assert list(parent.iterdir()) == []


# ------------------------------------------------------------------------------------------------ outputs that never lie
def _pair_args(files):
    return ["--moving_image", files["moving_image"], "--fixed_image", files["fixed_image"], "--moving_label",
            files["moving_label"]]


def test_a_write_cut_short_fails_with_one_line_and_no_output(untrained_dir, phantom_dir, tmp_path):
    """Under a file-size limit (``ulimit -f``) ITK leaves truncated images and reports nothing: today's register said
    "registered" and exited 0. Every write is verified: exit 2, one line naming the output, nothing left."""
    parent = tmp_path / "results"
    parent.mkdir()
    run = _cli(*_pair_args(_files(phantom_dir, "phantom007")), "--model", untrained_dir, "--output_dir",
               parent / "out", file_size_limit=100_000)
    assert run.returncode == 2, run.stdout + run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "registered" not in run.stdout, run.stderr
    assert _error_lines(run.stderr)[0].startswith(f"label-reg register: error: {parent / 'out'}/")
    assert "File too large" in run.stderr
    assert list(parent.iterdir()) == []


def test_an_unwritable_output_folder_fails_before_the_model_loads(untrained_dir, phantom_dir, tmp_path, readonly_dir):
    """Read-only output folder: one line naming it, exit 2, before the model is even looked at (this model's weights
    are garbage, and the error is about the folder, not the weights)."""
    broken = tmp_path / "broken_model"
    shutil.copytree(untrained_dir, broken)
    (broken / "model.weights.h5").write_bytes(b"garbage")
    run = _cli(*_pair_args(_files(phantom_dir, "phantom008")), "--model", broken, "--output_dir", readonly_dir / "out")
    assert run.returncode == 2, run.stderr
    errors = _error_lines(run.stderr)
    assert len(run.stderr.strip().splitlines()) == 1 and errors, run.stderr
    assert errors[0].startswith(f"label-reg register: error: {readonly_dir / 'out'}: cannot write") and "weights" \
        not in errors[0]


def test_model_settings_that_do_not_fit_the_weights_are_one_line(untrained_dir, phantom_dir, tmp_path):
    """base_filters 8 in label_reg.json over 4-filter weights: one line on stderr (no Keras warnings, no TensorFlow
    start-up lines) that says so."""
    edited = tmp_path / "model"
    shutil.copytree(untrained_dir, edited)
    info = json.loads((edited / "label_reg.json").read_text())
    info["build"]["base_filters"] = 8
    (edited / "label_reg.json").write_text(json.dumps(info))
    run = _cli(*_pair_args(_files(phantom_dir, "phantom009")), "--model", edited, "--output_dir", tmp_path / "out")
    assert run.returncode == 2
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "base_filters 8" in run.stderr and "the weights are of one with base_filters 4" in run.stderr
    assert not (tmp_path / "out").exists()


def test_register_memory_is_bounded_by_the_slab_not_the_trus_grid(untrained, phantom_dir, tmp_path, monkeypatch):
    """The TRUS-grid outputs are computed and written slab by slab: with small slabs, the memory numpy allocates while
    registering onto a finer TRUS grid stays below half of ONE float64 displacement field of that grid (today's
    register builds several). Outputs stay identical to one-slab processing."""
    from label_reg import transform

    files = _files(phantom_dir, "phantom006")
    us = io.read_image(files["fixed_image"])
    geo = io.Geometry.from_image(us)
    fine_geo = io.Geometry(tuple(2 * n for n in geo.size), tuple(s / 2 for s in geo.spacing),
                           geo.index_to_world((-0.25, -0.25, -0.25)), geo.direction)
    fine = sitk.Resample(us, fine_geo.reference_image(), sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    io.write_image(tmp_path / "fine_trus.nii.gz", fine)
    inputs = read_inputs(files["moving_image"], tmp_path / "fine_trus.nii.gz", files["moving_label"])
    whole = untrained.register_inputs(inputs, tmp_path / "whole")  # one slab (and the network traced)
    monkeypatch.setattr(transform, "SLAB_VOXELS", 1 << 15, raising=False)
    tracemalloc.start()
    try:
        sliced = untrained.register_inputs(inputs, tmp_path / "sliced")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    voxels = int(np.prod(fine_geo.size))
    assert voxels > 50 * (1 << 15)  # many slabs
    print(f"peak {peak / 1e6:.1f} MB traced; one field {24 * voxels / 1e6:.1f} MB")
    assert peak < 24 * voxels / 2, (peak / 1e6, 24 * voxels / 1e6)
    for name in ("warped_moving_image", "warped_moving_label", "transform_ddf"):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(whole.files[name])))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(sliced.files[name])))
        np.testing.assert_allclose(b, a, atol=1e-4, err_msg=name)


def test_a_suspicious_prealignment_is_warned_about(untrained, phantom_dir, tmp_path):
    """A 3x3x3 'gland' in the MR image's corner, and an MR placed 300 mm away: each registers, with a warning."""
    files = _files(phantom_dir, "phantom010")
    mr = io.read_image(files["moving_image"])
    corner = np.zeros(io.Geometry.from_image(mr).size, np.float32)
    corner[:3, :3, :3] = 1
    io.write_label(tmp_path / "corner.nii.gz", [io.from_array(corner, io.Geometry.from_image(mr))])
    res = untrained.register(files["moving_image"], files["fixed_image"], tmp_path / "corner.nii.gz", None,
                             tmp_path / "out_corner")
    assert len(res.warnings) == 1 and "touches the MR image border" in res.warnings[0], res.warnings
    assert str(tmp_path / "corner.nii.gz") in res.warnings[0]
    assert json.loads(res.files["registration"].read_text())["warnings"] == res.warnings

    far = {}
    for key in ("moving_image", "moving_label"):
        img = sitk.ReadImage(str(files[key]))
        img.SetOrigin([v + 300.0 for v in img.GetOrigin()])
        far[key] = tmp_path / f"far_{key}.nii.gz"
        sitk.WriteImage(img, str(far[key]))
    res = untrained.register(far["moving_image"], files["fixed_image"], far["moving_label"], None, tmp_path / "out_far")
    assert len(res.warnings) == 1 and "larger than the TRUS field of view" in res.warnings[0], res.warnings
    ok = untrained.register(files["moving_image"], files["fixed_image"], files["moving_label"], None, tmp_path / "ok")
    assert ok.warnings == []
