"""Synthetic phantoms: geometry, known deformation, determinism, and the ``label-reg phantoms`` command."""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from label_reg import datasets, io, synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]


def _world_centroid(mask, geometry):
    return geometry.index_to_world(np.argwhere(mask >= 0.5).mean(axis=0))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    names = synthetic.write_phantoms(root, 3, seed=11)
    return root, names


def test_pair_geometry_and_labels():
    pair = synthetic.make_pair(np.random.default_rng(5))
    mr_geo = io.Geometry.from_image(pair["moving_image"])
    us_geo = io.Geometry.from_image(pair["fixed_image"])
    assert mr_geo.size == (69, 69, 64) and us_geo.size == (60, 80, 60)
    assert mr_geo.spacing != us_geo.spacing
    assert np.allclose(us_geo.direction_matrix, np.diag([-1.0, -1.0, 1.0]))
    assert not np.allclose(mr_geo.origin, us_geo.origin)
    mr_lab, us_lab = io.labels_to_array(pair["moving_label"]), io.labels_to_array(pair["fixed_label"])
    assert mr_lab.shape[-1] == us_lab.shape[-1] and 3 <= mr_lab.shape[-1] <= 6
    assert set(np.unique(mr_lab)) == {0.0, 1.0} and set(np.unique(us_lab)) == {0.0, 1.0}
    # Gland 35-55 mm across (world extent of the MR mask), landmark blobs small and non-empty in both.
    pts = mr_geo.index_to_world(np.argwhere(mr_lab[..., 0] > 0))
    extent = np.ptp(pts, axis=0) + 1.5
    assert np.all(extent > 30) and np.all(extent < 60), extent
    for k in range(1, mr_lab.shape[-1]):
        vol_mm3 = mr_lab[..., k].sum() * 1.5 ** 3
        assert 4 / 3 * np.pi * 1.5 ** 3 < vol_mm3 < 4 / 3 * np.pi * 3.6 ** 3
        assert us_lab[..., k].sum() > 0
    # The TRUS gland is not at the TRUS centre (the coarse pre-alignment must leave an error), but inside.
    off = np.linalg.norm(_world_centroid(us_lab[..., 0], us_geo) - us_geo.center_world)
    assert 2.0 < off < 12.0
    assert not us_lab[[0, -1], :, :, 0].any() and not us_lab[:, [0, -1], :, 0].any()


def test_intensity_models_differ():
    pair = synthetic.make_pair(np.random.default_rng(2))
    mr, us = io.to_array(pair["moving_image"]), io.to_array(pair["fixed_image"])
    mr_gland = io.to_array(pair["moving_label"][0]) > 0
    us_gland = io.to_array(pair["fixed_label"][0]) > 0

    def ratio(img, gland):
        ring = ndimage.binary_dilation(gland, iterations=4) & ~ndimage.binary_dilation(gland, iterations=1)
        return img[gland].mean() / img[ring].mean()

    assert ratio(mr, mr_gland) > 1.1      # T2-like: gland brighter than its surroundings
    assert ratio(us, us_gland) < 0.9      # TRUS-like: hypoechoic gland
    # Speckle: strong voxel-to-voxel variation inside the gland on TRUS, far less on MR.
    inner_us, inner_mr = ndimage.binary_erosion(us_gland, iterations=3), ndimage.binary_erosion(mr_gland, iterations=3)
    cv_us = np.abs(np.diff(us, axis=2))[inner_us[:, :, 1:]].mean() / us[inner_us].mean()
    cv_mr = np.abs(np.diff(mr, axis=2))[inner_mr[:, :, 1:]].mean() / mr[inner_mr].mean()
    assert cv_us > 2 * cv_mr
    # Dark probe region at the high-y edge of the TRUS grid, centre columns.
    cx = us.shape[0] // 2
    assert us[cx - 3:cx + 4, -2:, :].mean() < 0.2 * us.mean()


def test_deterministic_per_seed():
    a, b = synthetic.make_pair(np.random.default_rng(7)), synthetic.make_pair(np.random.default_rng(7))
    c = synthetic.make_pair(np.random.default_rng(8))
    for key in ("moving_image", "fixed_image"):
        assert np.array_equal(io.to_array(a[key]), io.to_array(b[key]))
    assert np.array_equal(sitk.GetArrayFromImage(a["displacement"]), sitk.GetArrayFromImage(b["displacement"]))
    assert not np.array_equal(io.to_array(a["fixed_image"])[:5], io.to_array(c["fixed_image"])[:5])


def test_deformation_is_smooth_and_invertible():
    pair = synthetic.make_pair(np.random.default_rng(3))
    disp = sitk.GetArrayFromImage(pair["displacement"]).transpose(2, 1, 0, 3)  # (X, Y, Z, 3) mm
    geo = io.Geometry.from_image(pair["displacement"])
    grads = np.stack(np.gradient(disp, axis=(0, 1, 2)), axis=-1)               # d disp_i / d idx_j
    jac = np.eye(3) + grads @ np.linalg.inv(geo.matrix)                         # d T_i / d p_j
    det = np.linalg.det(jac)
    assert det.min() > 0.4 and det.max() < 1.6
    nonrigid = disp - disp.reshape(-1, 3).mean(axis=0)
    assert 0.5 < np.abs(nonrigid).max() < 15.0        # a real, few-mm deformation beyond the offset


def test_ground_truth_maps_trus_landmarks_onto_mr_landmarks(written):
    """Read back from disk: for every landmark, TRUS centroid + disp(centroid) = MR centroid (world mm)."""
    root, names = written
    assert names == ["phantom000", "phantom001", "phantom002"]
    errors = []
    for name in names:
        f = f"{name}.nii.gz"
        mr = io.read_image(root / "moving_images" / f)
        us = io.read_image(root / "fixed_images" / f)
        mr_lab = io.labels_to_array(io.read_label(root / "moving_labels" / f, reference=mr))
        us_lab = io.labels_to_array(io.read_label(root / "fixed_labels" / f, reference=us))
        disp, disp_geo = io.read_displacement_field(root / "ground_truth" / f)
        assert disp_geo.allclose(io.Geometry.from_image(us))
        field = sitk.GetImageFromArray(disp.transpose(2, 1, 0, 3), isVector=True)
        disp_geo.apply_to(field)
        transform = sitk.DisplacementFieldTransform(field)
        mr_geo, us_geo = io.Geometry.from_image(mr), io.Geometry.from_image(us)
        before = []
        for k in range(1, mr_lab.shape[-1]):
            c_us = _world_centroid(us_lab[..., k], us_geo)
            c_mr = _world_centroid(mr_lab[..., k], mr_geo)
            errors.append(np.linalg.norm(np.array(transform.TransformPoint(c_us.tolist())) - c_mr))
            before.append(np.linalg.norm(c_us - c_mr))
        assert min(before) > 5.0  # without the ground truth the points are far apart
    assert max(errors) < 1.25, errors  # within one TRUS voxel (1.25 mm)


def test_written_images_are_scanner_like(written):
    root, names = written
    mr = sitk.ReadImage(str(root / "moving_images" / f"{names[0]}.nii.gz"))
    us = sitk.ReadImage(str(root / "fixed_images" / f"{names[0]}.nii.gz"))
    assert mr.GetPixelID() == sitk.sitkInt16 and us.GetPixelID() == sitk.sitkUInt8
    lab = sitk.ReadImage(str(root / "fixed_labels" / f"{names[0]}.nii.gz"))
    assert lab.GetDimension() == 4 and lab.GetSize()[:3] == us.GetSize()


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "label_reg.cli", "phantoms", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_phantoms_cli_writes_a_discoverable_dataset(tmp_path):
    out = tmp_path / "ph"
    res = _cli("--num_pairs", "2", "--output_dir", str(out), "--seed", "4")
    assert res.returncode == 0, res.stderr
    assert str(out) in res.stdout
    pairs = datasets.discover_pairs(out)
    assert [p.name for p in pairs] == ["phantom000", "phantom001"]
    assert sorted(os.listdir(out / "ground_truth")) == ["phantom000.nii.gz", "phantom001.nii.gz"]
    first = io.to_array(io.read_image(pairs[0].fixed_image))

    # An existing dataset is refused (one line on stderr, exit 2, nothing changed) ...
    res = _cli("--num_pairs", "1", "--output_dir", str(out), "--seed", "5")
    assert res.returncode == 2 and "--overwrite" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert len(datasets.discover_pairs(out)) == 2
    # ... unless --overwrite: then it is replaced, not merged.
    res = _cli("--num_pairs", "1", "--output_dir", str(out), "--seed", "5", "--overwrite")
    assert res.returncode == 0, res.stderr
    pairs = datasets.discover_pairs(out)
    assert [p.name for p in pairs] == ["phantom000"]
    assert not np.array_equal(io.to_array(io.read_image(pairs[0].fixed_image)), first)


def test_rotated_trus_side_is_the_same_anatomy_turned_and_the_ground_truth_follows():
    """``rotation_deg``: the MR side and the deformation are those of the unrotated pair of the same seed; the TRUS
    side sees the anatomy rotated about the TRUS gland centre, and the ground truth still maps TRUS landmarks onto
    MR landmarks. The field's best-fitting linear part is the rotation (25 degrees about the drawn axis)."""
    plain = synthetic.make_pair(np.random.default_rng(4))
    turned = synthetic.make_pair(np.random.default_rng(4), rotation_deg=25.0)
    assert plain["rotation_deg"] == 0.0 and np.array_equal(plain["rotation"], np.eye(3))
    assert np.array_equal(io.to_array(plain["moving_image"]), io.to_array(turned["moving_image"]))
    assert not np.array_equal(io.to_array(plain["fixed_image"]), io.to_array(turned["fixed_image"]))
    rotation = turned["rotation"]
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-12)
    assert np.degrees(np.arccos((np.trace(rotation) - 1) / 2)) == pytest.approx(25.0)
    disp = sitk.GetArrayFromImage(turned["displacement"]).transpose(2, 1, 0, 3).reshape(-1, 3)
    geo = io.Geometry.from_image(turned["displacement"])
    points = geo.index_to_world(np.indices(geo.size).reshape(3, -1).T)
    fit = np.linalg.lstsq(np.c_[points, np.ones(len(points))], points + disp, rcond=None)[0][:3].T
    u, _, vt = np.linalg.svd(fit)
    residual = (u @ vt) @ rotation.T
    assert np.degrees(np.arccos(np.clip((np.trace(residual) - 1) / 2, -1, 1))) < 3.0  # the bumps add a little
    # T(g) = MR gland centre still, and every TRUS landmark maps onto its MR landmark.
    transform = sitk.DisplacementFieldTransform(sitk.Cast(turned["displacement"], sitk.sitkVectorFloat64))
    np.testing.assert_allclose(transform.TransformPoint(turned["fixed_gland_centre_mm"].tolist()),
                               turned["gland_centre_mm"], atol=0.01)
    us_lab = io.labels_to_array(turned["fixed_label"])
    us_geo = io.Geometry.from_image(turned["fixed_image"])
    errors = [np.linalg.norm(np.array(transform.TransformPoint(_world_centroid(us_lab[..., k], us_geo).tolist()))
                             - turned["landmarks_mm"][k - 1]) for k in range(1, us_lab.shape[-1])]
    assert max(errors) < 1.25, errors


def test_write_phantoms_rotates_up_to_the_limit(tmp_path):
    names = synthetic.write_phantoms(tmp_path, 1, seed=3, max_rotation_deg=30.0)
    child = np.random.SeedSequence(3).spawn(1)[0]
    expected = synthetic.make_pair(np.random.default_rng(child), max_rotation_deg=30.0)
    assert 0.0 < abs(expected["rotation_deg"]) <= 30.0
    disp, _ = io.read_displacement_field(tmp_path / "ground_truth" / f"{names[0]}.nii.gz")
    np.testing.assert_array_equal(disp, sitk.GetArrayFromImage(expected["displacement"]).transpose(2, 1, 0, 3))
    with pytest.raises(ValueError, match="max_rotation_deg"):
        synthetic.write_phantoms(tmp_path, 1, max_rotation_deg=-5)


def test_phantoms_cli_writes_rotated_pairs_and_refuses_a_bad_angle(tmp_path):
    res = _cli("--num_pairs", "1", "--output_dir", str(tmp_path / "ph"), "--seed", "3", "--max_rotation_deg", "30")
    assert res.returncode == 0 and "rotated up to 30 degrees" in res.stdout, res.stderr
    disp, _ = io.read_displacement_field(tmp_path / "ph" / "ground_truth" / "phantom000.nii.gz")
    expected = synthetic.make_pair(np.random.default_rng(np.random.SeedSequence(3).spawn(1)[0]), max_rotation_deg=30.0)
    np.testing.assert_array_equal(disp, sitk.GetArrayFromImage(expected["displacement"]).transpose(2, 1, 0, 3))
    for angle in ("200", "nan"):
        res = _cli("--num_pairs", "1", "--output_dir", str(tmp_path / "bad"), "--max_rotation_deg", angle)
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
        assert "--max_rotation_deg: must be between 0 and 180 degrees" in res.stderr
        assert not (tmp_path / "bad").exists()


def test_phantoms_cli_writes_pairs_turned_by_an_exact_angle(tmp_path):
    res = _cli("--num_pairs", "1", "--output_dir", str(tmp_path / "ph"), "--seed", "3", "--rotation_deg", "25")
    assert res.returncode == 0 and "rotated by 25 degrees" in res.stdout, res.stderr
    disp, _ = io.read_displacement_field(tmp_path / "ph" / "ground_truth" / "phantom000.nii.gz")
    child = np.random.SeedSequence(3).spawn(1)[0]
    expected = synthetic.make_pair(np.random.default_rng(child), rotation_deg=25.0)
    assert expected["rotation_deg"] == 25.0
    np.testing.assert_array_equal(disp, sitk.GetArrayFromImage(expected["displacement"]).transpose(2, 1, 0, 3))
    # the same seed turned by a random angle up to 30 degrees instead writes another field
    other = synthetic.make_pair(np.random.default_rng(child), max_rotation_deg=30.0)
    assert other["rotation_deg"] != 25.0
    assert not np.allclose(disp, sitk.GetArrayFromImage(other["displacement"]).transpose(2, 1, 0, 3))
    for args, message in ((("--rotation_deg", "181"), "--rotation_deg: must be between 0 and 180 degrees"),
                          (("--rotation_deg", "25", "--max_rotation_deg", "30"), "exclude each other")):
        res = _cli("--num_pairs", "1", "--output_dir", str(tmp_path / "bad"), *args)
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and message in res.stderr, res.stderr
        assert not (tmp_path / "bad").exists()
