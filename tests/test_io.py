"""label_reg.io: geometry-preserving NIfTI I/O, label axis order, input errors, atomic writes, DDF files."""
import gzip
import json
import os
import pathlib

import numpy as np
import pytest
import SimpleITK as sitk

from label_reg import io
from label_reg.errors import InputError, OutputError

REPO = pathlib.Path(__file__).resolve().parents[1]


def _rotation(ax, ay, az):
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


OBLIQUE = io.Geometry(size=(7, 9, 5), spacing=(0.8, 1.1, 1.7), origin=(-12.5, 30.25, 7.0),
                      direction=tuple(_rotation(0.3, -0.6, 0.9).ravel()))


def _image(arr_xyz, geometry=OBLIQUE, dtype=np.float32):
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(arr_xyz, dtype=dtype).T))
    return geometry.apply_to(img)


def _write(path, img):
    sitk.WriteImage(img, str(path))
    return path


def _blob_labels(geometry=OBLIQUE, k=3):
    """(X, Y, Z, K) binary stack: a gland box and small distinct landmark blobs."""
    arr = np.zeros(geometry.size + (k,), np.float32)
    arr[1:6, 2:8, 1:4, 0] = 1
    for c in range(1, k):
        arr[c, c + 1, c % geometry.size[2], c] = 1
    return arr


def _assert_names(err, path):
    msg = str(err.value)
    assert str(path) in msg
    assert "\n" not in msg


# -- Geometry ----------------------------------------------------------------------------------------------
def test_geometry_round_trip_oblique(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.normal(size=OBLIQUE.size).astype(np.float32)
    path = tmp_path / "sub" / "img.nii.gz"
    io.write_image(path, io.from_array(arr, OBLIQUE))
    img = io.read_image(path)
    geo = io.Geometry.from_image(img)
    assert geo.size == OBLIQUE.size
    np.testing.assert_allclose(geo.spacing, OBLIQUE.spacing, atol=1e-6)
    np.testing.assert_allclose(geo.origin, OBLIQUE.origin, atol=1e-5)
    np.testing.assert_allclose(geo.direction, OBLIQUE.direction, atol=1e-6)
    assert geo.allclose(OBLIQUE) and OBLIQUE.allclose(geo)
    np.testing.assert_array_equal(io.to_array(img), arr)
    assert img.GetPixelID() == sitk.sitkFloat32


def test_geometry_index_world_matches_simpleitk():
    img = OBLIQUE.reference_image()
    assert io.Geometry.from_image(img) == OBLIQUE
    rng = np.random.default_rng(1)
    idx = rng.uniform(-2, 10, size=(20, 3))
    world = OBLIQUE.index_to_world(idx)
    expected = np.array([img.TransformContinuousIndexToPhysicalPoint(tuple(map(float, i))) for i in idx])
    np.testing.assert_allclose(world, expected, atol=1e-9)
    back = np.array([img.TransformPhysicalPointToContinuousIndex(tuple(map(float, p))) for p in world])
    np.testing.assert_allclose(OBLIQUE.world_to_index(world), back, atol=1e-9)
    np.testing.assert_allclose(OBLIQUE.world_to_index(world), idx, atol=1e-9)
    np.testing.assert_allclose(OBLIQUE.matrix, np.reshape(OBLIQUE.direction, (3, 3)) @ np.diag(OBLIQUE.spacing))
    # a single point works too
    np.testing.assert_allclose(OBLIQUE.index_to_world([0, 0, 0]), OBLIQUE.origin)


def test_geometry_dict_round_trip_and_validation():
    d = json.loads(json.dumps(OBLIQUE.to_dict()))
    assert io.Geometry.from_dict(d) == OBLIQUE
    assert not OBLIQUE.allclose(io.Geometry.from_dict({**d, "origin": [-12.5, 30.25, 8.0]}))
    assert not OBLIQUE.allclose(io.Geometry.from_dict({**d, "size": [7, 9, 6]}))
    bad = [
        {**d, "size": ["7", 9, 5]},
        {**d, "size": [7.0, 9, 5]},
        {**d, "spacing": [1, True, 1]},
        {**d, "origin": "__import__('os')"},
        {**d, "direction": [1, 0, 0]},
        {**d, "spacing": [1, -1, 1]},
        {k: v for k, v in d.items() if k != "origin"},
        {**d, "extra": 1},
    ]
    for b in bad:
        with pytest.raises(InputError) as err:
            io.Geometry.from_dict(b, source="model/config.json")
        assert "model/config.json" in str(err.value)


def test_array_axis_order():
    arr = np.arange(np.prod(OBLIQUE.size), dtype=np.float32).reshape(OBLIQUE.size)
    img = io.from_array(arr, OBLIQUE)
    assert img.GetSize() == OBLIQUE.size
    for x, y, z in [(0, 0, 0), (6, 1, 2), (3, 8, 4)]:
        assert img.GetPixel(x, y, z) == arr[x, y, z]
    np.testing.assert_array_equal(io.to_array(img), arr)
    with pytest.raises(ValueError):
        io.from_array(arr[:-1], OBLIQUE)


# -- labels ------------------------------------------------------------------------------------------------
def test_write_read_label_4d_and_3d(tmp_path):
    labels = _blob_labels(k=3)
    path = tmp_path / "lab.nii.gz"
    io.write_label(path, io.labels_from_array(labels, OBLIQUE))
    raw = sitk.ReadImage(str(path))
    assert raw.GetDimension() == 4 and raw.GetSize() == OBLIQUE.size + (3,)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(raw).transpose(3, 2, 1, 0), labels)
    channels = io.read_label(path, reference=OBLIQUE)
    assert len(channels) == 3
    np.testing.assert_array_equal(io.labels_to_array(channels), labels)
    for ch in channels:
        assert io.Geometry.from_image(ch).allclose(OBLIQUE)
        assert ch.GetPixelID() == sitk.sitkFloat32

    path1 = tmp_path / "gland.nii"
    io.write_label(path1, io.labels_from_array(labels[..., :1], OBLIQUE))
    assert sitk.ReadImage(str(path1)).GetDimension() == 3
    one = io.read_label(path1)
    assert len(one) == 1
    np.testing.assert_array_equal(io.to_array(one[0]), labels[..., 0])


def test_demo_label_axis_order_matches_sitk_extract(demo_data_dir):
    for folder in ("moving_labels", "fixed_labels"):
        path = demo_data_dir / folder / "obs000.nii.gz"
        img4 = sitk.ReadImage(str(path))
        assert img4.GetDimension() == 4
        channels = io.read_label(path, reference=io.read_image(demo_data_dir / folder.replace("labels", "images")
                                                               / "obs000.nii.gz"))
        size = list(img4.GetSize())
        assert len(channels) == size[3] >= 2
        stack = io.labels_to_array(channels)
        for k, ch in enumerate(channels):
            ref = sitk.Extract(img4, size[:3] + [0], [0, 0, 0, k])
            np.testing.assert_array_equal(sitk.GetArrayFromImage(ch), sitk.GetArrayFromImage(ref))
            np.testing.assert_array_equal(stack[..., k], sitk.GetArrayFromImage(ref).T)
            assert io.Geometry.from_image(ch).allclose(io.Geometry.from_image(ref), tol=1e-9)
        # channels are distinct: the gland is much larger than every landmark blob
        sums = stack.reshape(-1, stack.shape[-1]).sum(0)
        assert sums[0] > 10 * sums[1:].max()


# -- bad inputs --------------------------------------------------------------------------------------------
def _bad_image_cases(tmp_path):
    good = _image(np.ones(OBLIQUE.size))
    cases = {}
    cases["missing"] = (tmp_path / "nope.nii.gz", "not found")
    p = tmp_path / "garbage.nii.gz"
    p.write_bytes(b"this is not an image" * 50)
    cases["corrupt"] = (p, "")
    full = tmp_path / "full.nii.gz"
    _write(full, _image(np.random.default_rng(0).normal(size=OBLIQUE.size)))
    p = tmp_path / "truncated.nii.gz"
    p.write_bytes(full.read_bytes()[:-40])
    cases["truncated_gz"] = (p, "truncated")
    fulln = tmp_path / "full.nii"
    _write(fulln, good)
    p = tmp_path / "truncated.nii"
    p.write_bytes(fulln.read_bytes()[:400])
    cases["truncated_nii"] = (p, "truncated")
    p = tmp_path / "empty.nii.gz"
    p.write_bytes(b"")
    cases["empty_file"] = (p, "empty")
    cases["2d"] = (_write(tmp_path / "flat.nii.gz", sitk.Image([8, 9], sitk.sitkFloat32)), "2-D")
    cases["4d"] = (_write(tmp_path / "four.nii.gz", sitk.JoinSeries([good, good])), "4-D")
    nan = np.ones(OBLIQUE.size)
    nan[2, 3, 1] = np.nan
    cases["nan"] = (_write(tmp_path / "nan.nii.gz", _image(nan)), "NaN")
    inf = np.ones(OBLIQUE.size)
    inf[0, 0, 0] = np.inf
    cases["inf"] = (_write(tmp_path / "inf.nii.gz", _image(inf)), "Inf")
    return cases


@pytest.mark.parametrize("case", ["missing", "corrupt", "truncated_gz", "truncated_nii", "empty_file", "2d", "4d",
                                  "nan", "inf"])
def test_read_image_errors(tmp_path, case):
    path, words = _bad_image_cases(tmp_path)[case]
    with pytest.raises(InputError) as err:
        io.read_image(path)
    _assert_names(err, path)
    assert words in str(err.value)


def test_read_image_accepts_4d_with_one_volume(tmp_path):
    arr = np.random.default_rng(2).normal(size=OBLIQUE.size)
    path = _write(tmp_path / "one.nii.gz", sitk.JoinSeries([_image(arr)]))
    img = io.read_image(path)
    assert img.GetDimension() == 3
    np.testing.assert_allclose(io.to_array(img), arr.astype(np.float32))


def _bad_label_cases(tmp_path):
    labels = _blob_labels(k=3)
    cases = {}
    cases["missing"] = (tmp_path / "nope.nii.gz", "not found", None)
    p = tmp_path / "garbage.nii"
    p.write_bytes(os.urandom(600))
    cases["corrupt"] = (p, "", None)
    cases["2d"] = (_write(tmp_path / "flat.nii.gz", sitk.Image([8, 9], sitk.sitkUInt8)), "2-D", None)
    nonbin = labels.copy()
    nonbin[1, 1, 1, 2] = 0.5
    cases["nonbinary"] = (_write(tmp_path / "soft.nii.gz", sitk.JoinSeries(io.labels_from_array(nonbin, OBLIQUE))),
                          "not binary", None)
    big = labels.copy()
    big[0, 0, 0, 0] = 255
    cases["nonbinary255"] = (_write(tmp_path / "u8.nii.gz", _image(big[..., 0], dtype=np.uint8)), "not binary", None)
    nan = labels.copy()
    nan[0, 0, 0, 1] = np.nan
    cases["nan"] = (_write(tmp_path / "nan.nii.gz", sitk.JoinSeries(io.labels_from_array(nan, OBLIQUE))), "NaN", None)
    empty = labels.copy()
    empty[..., 0] = 0
    cases["empty_gland"] = (_write(tmp_path / "empty.nii.gz", sitk.JoinSeries(io.labels_from_array(empty, OBLIQUE))),
                            "empty", None)
    good = _write(tmp_path / "good.nii.gz", sitk.JoinSeries(io.labels_from_array(labels, OBLIQUE)))
    ref_path = tmp_path / "image_shifted.nii.gz"
    shifted = io.Geometry(OBLIQUE.size, OBLIQUE.spacing, (100.0, 30.25, 7.0), OBLIQUE.direction)
    _write(ref_path, shifted.reference_image())
    cases["outside_image"] = (good, "label geometry does not match image", ref_path)
    ref_path2 = tmp_path / "image_bigger.nii.gz"
    bigger = io.Geometry((8, 9, 5), OBLIQUE.spacing, OBLIQUE.origin, OBLIQUE.direction)
    _write(ref_path2, bigger.reference_image())
    cases["size_mismatch"] = (good, "label geometry does not match image", ref_path2)
    ref_path3 = tmp_path / "image_axial.nii.gz"
    axial = io.Geometry(OBLIQUE.size, OBLIQUE.spacing, OBLIQUE.origin, (1, 0, 0, 0, 1, 0, 0, 0, 1))
    _write(ref_path3, axial.reference_image())
    cases["direction_mismatch"] = (good, "direction", ref_path3)
    return cases


@pytest.mark.parametrize("case", ["missing", "corrupt", "2d", "nonbinary", "nonbinary255", "nan", "empty_gland",
                                  "outside_image", "size_mismatch", "direction_mismatch"])
def test_read_label_errors(tmp_path, case):
    path, words, ref_path = _bad_label_cases(tmp_path)[case]
    reference = io.read_image(ref_path) if ref_path is not None else None
    with pytest.raises(InputError) as err:
        io.read_label(path, reference=reference)
    _assert_names(err, path)
    assert words in str(err.value)
    if ref_path is not None:
        assert str(ref_path) in str(err.value)
        # the same file is fine against its own grid
        assert len(io.read_label(path, reference=OBLIQUE)) == 3


# -- atomic writes -----------------------------------------------------------------------------------------
def test_atomic_path_suffix_and_cleanup(tmp_path):
    target = tmp_path / "out" / "warped.nii.gz"
    with io.atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith(".nii.gz") and tmp != target
        tmp.write_bytes(b"x")
        assert not target.exists()
    assert target.read_bytes() == b"x"
    assert os.listdir(target.parent) == ["warped.nii.gz"]

    with pytest.raises(KeyError):
        with io.atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise KeyError("boom")
    assert target.read_bytes() == b"x"
    assert os.listdir(target.parent) == ["warped.nii.gz"]


def test_atomic_dir_merges_replaces_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out"
    with io.atomic_dir(target) as staging:  # a new folder: one rename
        assert staging.parent == tmp_path and staging.name.startswith(".out.tmp-")
        (staging / "a.txt").write_text("a1")
        (staging / "sub").mkdir()
        (staging / "sub" / "x.png").write_text("x1")
        assert not target.exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]
    (target / "user.txt").write_text("not ours")
    (target / "b.txt").write_text("b0")

    # Merge: staged entries replace their namesakes, sub-folders merge, owned names not produced go, others stay.
    with io.atomic_dir(target, owned=("a.txt", "b.txt")) as staging:
        (staging / "a.txt").write_text("a2")
        (staging / "sub").mkdir()
        (staging / "sub" / "y.png").write_text("y2")
    assert sorted(os.listdir(target)) == ["a.txt", "sub", "user.txt"]
    assert (target / "a.txt").read_text() == "a2" and sorted(os.listdir(target / "sub")) == ["x.png", "y.png"]

    with pytest.raises(KeyError):  # a failure leaves the folder as it was and no staging folder
        with io.atomic_dir(target, owned=("a.txt",)) as staging:
            (staging / "a.txt").write_text("partial")
            raise KeyError("boom")
    assert (target / "a.txt").read_text() == "a2" and sorted(os.listdir(tmp_path)) == ["out"]

    with io.atomic_dir(target, replace=True) as staging:  # replace: the whole folder swapped
        (staging / "only.txt").write_text("new")
    assert os.listdir(target) == ["only.txt"] and sorted(os.listdir(tmp_path)) == ["out"]

    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="not a directory"):
        with io.atomic_dir(tmp_path / "file"):
            pass


def test_failed_image_write_leaves_no_file(tmp_path, monkeypatch):
    img = _image(np.ones(OBLIQUE.size))
    target = tmp_path / "out.nii.gz"

    def failing_write(image, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise RuntimeError("Exception thrown in SimpleITK ImageFileWriter_Execute:\nITK ERROR: disk full")

    monkeypatch.setattr(sitk, "WriteImage", failing_write)
    with pytest.raises(InputError) as err:
        io.write_image(target, img)
    assert str(target) in str(err.value)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()

    with pytest.raises(InputError):
        io.write_image(tmp_path / "out.unknownformat", img)
    assert os.listdir(tmp_path) == []


# -- displacement fields -----------------------------------------------------------------------------------
def test_displacement_field_round_trip_and_sitk_transform(tmp_path):
    rng = np.random.default_rng(3)
    disp = rng.normal(scale=2.0, size=OBLIQUE.size + (3,))
    path = tmp_path / "ddf.nii.gz"
    io.write_displacement_field(path, disp, OBLIQUE)

    back, geo = io.read_displacement_field(path)
    assert geo.allclose(OBLIQUE)
    np.testing.assert_array_equal(back, disp)

    field = sitk.ReadImage(str(path), sitk.sitkVectorFloat64)
    transform = sitk.DisplacementFieldTransform(field)
    for idx in [(0, 0, 0), (3, 4, 2), (6, 8, 4), (2, 7, 1)]:
        p = OBLIQUE.index_to_world(idx)
        moved = np.array(transform.TransformPoint(tuple(map(float, p))))
        np.testing.assert_allclose(moved, p + disp[idx], atol=1e-6)
    # between voxel centres the transform interpolates the stored vectors linearly
    p = OBLIQUE.index_to_world((3.5, 4.0, 2.0))
    moved = np.array(transform.TransformPoint(tuple(map(float, p))))
    np.testing.assert_allclose(moved, p + 0.5 * (disp[3, 4, 2] + disp[4, 4, 2]), atol=1e-6)


def test_read_displacement_field_rejects_scalar_image(tmp_path):
    path = _write(tmp_path / "scalar.nii.gz", _image(np.zeros(OBLIQUE.size)))
    with pytest.raises(InputError) as err:
        io.read_displacement_field(path)
    _assert_names(err, path)


def test_read_label_vector_image_channels(tmp_path):
    labels = _blob_labels(k=2)
    vec = sitk.Compose(io.labels_from_array(labels, OBLIQUE))
    path = _write(tmp_path / "vec.nii.gz", vec)
    channels = io.read_label(path, reference=OBLIQUE)
    np.testing.assert_array_equal(io.labels_to_array(channels), labels)


# -- header sanity (SPEC section 7) ------------------------------------------------------------------------
def _patched_header(tmp_path, name, patch, img=None):
    """Write ``img`` (default: ones on OBLIQUE) as a NIfTI through ITK, change its header with ``patch(bytearray)``
    and store it gzipped as ``name``."""
    plain = tmp_path / f"{name}.plain.nii"
    _write(plain, img if img is not None else _image(np.ones(OBLIQUE.size)))
    data = bytearray(plain.read_bytes())
    plain.unlink()
    patch(data)
    path = tmp_path / name
    path.write_bytes(gzip.compress(bytes(data)))
    return path


@pytest.mark.parametrize("value", [0.0, -1.5, float("nan"), float("inf")])
def test_header_voxel_size_must_be_finite_and_positive(tmp_path, value):
    """ITK silently reads a zero or NaN pixdim as 1 mm; the header check refuses it, naming the file."""
    import struct

    def patch(data):
        data[80:84] = struct.pack("<f", value)  # pixdim[1]: the x voxel size

    path = _patched_header(tmp_path, "bad_spacing.nii.gz", patch)
    with pytest.raises(InputError) as err:
        io.read_image(path)
    _assert_names(err, path)
    assert "pixdim[1]" in str(err.value) and "finite and positive" in str(err.value)
    with pytest.raises(InputError, match="pixdim"):
        io.read_label(_patched_header(tmp_path, "bad_label.nii.gz", patch, _image(_blob_labels(k=1)[..., 0])))


def test_qform_and_sform_must_agree(tmp_path):
    import struct

    def shifted(mm):
        def patch(data):
            offset = struct.unpack("<f", data[292:296])[0]  # srow_x[3]: the sform's x offset
            data[292:296] = struct.pack("<f", offset + mm)
        return patch

    bad = _patched_header(tmp_path, "disagree.nii.gz", shifted(5.0))
    with pytest.raises(InputError) as err:
        io.read_image(bad)
    _assert_names(err, bad)
    assert "qform and sform disagree" in str(err.value) and "5" in str(err.value)
    ok = _patched_header(tmp_path, "rounding.nii.gz", shifted(1e-4))  # float rounding: accepted
    assert io.Geometry.from_image(io.read_image(ok)).allclose(OBLIQUE)


def test_images_above_the_voxel_limit_are_refused_from_the_header(tmp_path):
    """A header declaring 1024^3 voxels (above io.MAX_VOXELS) is refused before any voxel data is read: the error is
    the size, not the (missing) data."""
    import struct

    def patch(data):
        dim = list(struct.unpack("<8h", data[40:56]))
        dim[1:4] = [1024, 1024, 1024]
        data[40:56] = struct.pack("<8h", *dim)

    path = _patched_header(tmp_path, "huge.nii.gz", patch)
    assert 1024 ** 3 > io.MAX_VOXELS
    with pytest.raises(InputError) as err:
        io.read_image(path)
    _assert_names(err, path)
    assert "limit" in str(err.value) and "1024x1024x1024" in str(err.value)


# -- slab-by-slab writing and verified writes ----------------------------------------------------------------
def test_slab_writer_writes_what_itk_would(tmp_path):
    """Scalar, label-stack and displacement volumes written in uneven slabs (one of a single slice) read back through
    ITK with ITK's own geometry and every voxel; the field carries intent 1006 with RAS vectors on disk."""
    import struct

    rng = np.random.default_rng(5)
    z = OBLIQUE.size[2]
    cuts = [0, 2, 3, z]
    image = rng.normal(size=(z, OBLIQUE.size[1], OBLIQUE.size[0])).astype(np.float32)  # (Z, Y, X)
    labels = (rng.random((3,) + image.shape) > 0.5).astype(np.uint8)
    disp = rng.normal(size=image.shape + (3,))
    with io.NiftiSlabWriter(tmp_path / "image.nii.gz", OBLIQUE, np.float32) as w_img, \
            io.NiftiSlabWriter(tmp_path / "labels.nii.gz", OBLIQUE, np.uint8, kind="stack", channels=3) as w_lab, \
            io.NiftiSlabWriter(tmp_path / "ddf.nii.gz", OBLIQUE, np.float64, kind="displacement") as w_ddf:
        for a, b in zip(cuts[:-1], cuts[1:]):
            w_img.write(image[a:b])
            w_lab.write(labels[:, a:b])
            w_ddf.write(disp[a:b])
    assert sorted(os.listdir(tmp_path)) == ["ddf.nii.gz", "image.nii.gz", "labels.nii.gz"]  # no members left

    itk_path = _write(tmp_path / "itk.nii.gz", _image(image.T))
    ours = sitk.ReadImage(str(tmp_path / "image.nii.gz"))
    assert io.Geometry.from_image(ours) == io.Geometry.from_image(sitk.ReadImage(str(itk_path)))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ours), image)
    channels = io.read_label(tmp_path / "labels.nii.gz", reference=OBLIQUE)
    np.testing.assert_array_equal(np.stack([sitk.GetArrayFromImage(c) for c in channels]), labels)
    back, geo = io.read_displacement_field(tmp_path / "ddf.nii.gz")
    assert geo.allclose(OBLIQUE, tol=1e-6)
    np.testing.assert_array_equal(back, disp.transpose(2, 1, 0, 3))

    raw = gzip.decompress((tmp_path / "ddf.nii.gz").read_bytes())
    assert struct.unpack("<h", raw[68:70])[0] == io.NIFTI_INTENT_DISPVECT == 1006
    offset = int(struct.unpack("<f", raw[108:112])[0])
    on_disk = np.frombuffer(raw, "<f8", offset=offset).reshape(3, *image.shape)  # components outermost
    np.testing.assert_array_equal(on_disk[0], -disp[..., 0])
    np.testing.assert_array_equal(on_disk[1], -disp[..., 1])
    np.testing.assert_array_equal(on_disk[2], disp[..., 2])

    with pytest.raises(ValueError, match="slices"):
        with io.NiftiSlabWriter(tmp_path / "short.nii.gz", OBLIQUE, np.float32) as w:
            w.write(image[:2])
    assert not (tmp_path / "short.nii.gz").exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


_WRITE_UNDER_LIMIT = """
import resource, sys, numpy as np
from label_reg import io
from label_reg.errors import OutputError
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
geo = io.Geometry((40, 40, 40), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3).ravel())
rng = np.random.default_rng(0)
what = sys.argv[1]
try:
    if what == "image":
        io.write_image(sys.argv[2], io.from_array(rng.normal(size=geo.size), geo))
    elif what == "field":
        io.write_displacement_field(sys.argv[2], rng.normal(size=geo.size + (3,)), geo)
    else:
        io.write_text(sys.argv[2], "x" * 50000)
except OutputError as err:
    print("OutputError:", err)
"""


@pytest.mark.parametrize("what", ["image", "field", "text"])
def test_a_write_cut_short_is_an_output_error_and_leaves_nothing(tmp_path, what):
    """Under a file-size limit ITK's writer leaves a truncated file and reports nothing; the verified write raises
    OutputError naming the file, and no file (final or temporary) is left."""
    import subprocess
    import sys

    target = tmp_path / ("out.txt" if what == "text" else "out.nii.gz")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO)] + sys.path))
    run = subprocess.run([sys.executable, "-c", _WRITE_UNDER_LIMIT, what, str(target)], capture_output=True,
                         text=True, timeout=120, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("OutputError:")]
    assert len(lines) == 1 and str(target) in lines[0], run.stdout + run.stderr
    assert os.listdir(tmp_path) == []


def test_output_folder_checks(tmp_path, readonly_dir):
    out = io.check_output_folder(tmp_path / "new" / "out", expected_bytes=1000)
    assert out == tmp_path / "new" / "out" and not (tmp_path / "new").exists()
    assert os.listdir(tmp_path) == ["readonly"]  # no probe file left
    with pytest.raises(InputError, match="required"):
        io.check_output_folder("")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        io.check_output_folder(tmp_path / "file")
    for target in (readonly_dir, readonly_dir / "out"):
        with pytest.raises(OutputError) as err:
            io.check_output_folder(target)
        assert str(target) in str(err.value) and "cannot write" in str(err.value)
    with pytest.raises(OutputError, match="free disk space"):
        io.check_output_folder(tmp_path / "out", expected_bytes=10 ** 18)


def test_output_folder_on_a_full_disk(small_disk):
    with pytest.raises(OutputError) as err:
        io.check_output_folder(small_disk / "out", expected_bytes=10 ** 6)
    assert str(small_disk / "out") in str(err.value) and "MB free" in str(err.value)
    io.check_output_folder(small_disk / "out", expected_bytes=10 ** 4)
