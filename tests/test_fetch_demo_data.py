"""Tests for tools/fetch_demo_data.py: safe unpacking of a small synthetic archive, and a clean network failure."""
import pathlib
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import SimpleITK as sitk

from tool_scripts import load_tool

REPO = pathlib.Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "fetch_demo_data.py"
FOLDERS = ("moving_images", "moving_labels", "fixed_images", "fixed_labels")
NUM_CASES = 13  # > 11, so part09 and part10 each hold one case (indices 9 and 10)
TOP = "example-data-mrus"
UNREACHABLE = "http://127.0.0.1:9/x.zip"  # discard port, closed: connection refused

fdd = load_tool("fetch_demo_data.py", "fetch_demo_data")


def _names(n=NUM_CASES):
    return [f"obs{i:03d}.nii.gz" for i in range(n)]


@pytest.fixture(scope="module")
def nifti_bytes(tmp_path_factory):
    """The bytes of a tiny 4x4x4 image and a tiny label, written once with SimpleITK."""
    root = tmp_path_factory.mktemp("nifti")
    image = sitk.GetImageFromArray(np.arange(64, dtype=np.uint8).reshape(4, 4, 4))
    image.SetSpacing((1.5, 1.5, 1.5))
    label = sitk.GetImageFromArray((np.arange(64).reshape(4, 4, 4) > 31).astype(np.float32))
    sitk.WriteImage(image, str(root / "image.nii.gz"))
    sitk.WriteImage(label, str(root / "label.nii.gz"))
    return {"image": (root / "image.nii.gz").read_bytes(), "label": (root / "label.nii.gz").read_bytes()}


def _make_zip(path, nifti_bytes, names=None, extra=None, drop=None):
    """An archive like the upstream one: TOP/<folder>/<name> for the four folders, plus stray files.

    `names` maps folder -> list of names (default: the same NUM_CASES names everywhere);
    `extra` maps member name -> bytes; `drop` is a (folder, name) to leave out.
    """
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{TOP}/", b"")
        zf.writestr(f"{TOP}/README.md", b"Hosting example and tutorial data\n")  # stray file
        for folder in FOLDERS:
            zf.writestr(f"{TOP}/{folder}/", b"")
            kind = "label" if folder.endswith("labels") else "image"
            for name in (names or {}).get(folder, _names()):
                if drop == (folder, name):
                    continue
                zf.writestr(f"{TOP}/{folder}/{name}", nifti_bytes[kind])
        zf.writestr(f"{TOP}/moving_images/notes.txt", b"not an image\n")  # stray file in a data folder
        for member, data in (extra or {}).items():
            zf.writestr(member, data)
    return path


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in pathlib.Path(root).rglob("*"))


def _no_partial_output(parent, out):
    assert not out.exists()
    leftovers = [p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert leftovers == []


def test_unpack_layout(tmp_path, nifti_bytes):
    archive = _make_zip(tmp_path / "mrus.zip", nifti_bytes)
    out = tmp_path / "data"
    summary = fdd.unpack(archive, out)
    assert summary.num_pairs == NUM_CASES and summary.num_dropped == 0
    assert summary.num_ignored == 2  # README.md and moving_images/notes.txt
    assert sorted(p.name for p in out.iterdir()) == sorted(FOLDERS + ("SOURCE.md",))
    for folder in FOLDERS:
        assert sorted(p.name for p in (out / folder).iterdir()) == _names()
    assert (out / "moving_images" / "obs000.nii.gz").read_bytes() == nifti_bytes["image"]
    assert (out / "fixed_labels" / "obs012.nii.gz").read_bytes() == nifti_bytes["label"]
    image = sitk.ReadImage(str(out / "fixed_images" / "obs005.nii.gz"))
    assert image.GetSize() == (4, 4, 4)
    source = (out / "SOURCE.md").read_text()
    for text in (fdd.DEFAULT_URL, "no licence file", "dummy", "Medical Image Analysis 49 (2018)", "DeepReg", "JOSS) 5(55) 2020"):
        assert text in source
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary directory left beside it


def test_exclude_test_drops_part09_and_part10(tmp_path, nifti_bytes):
    archive = _make_zip(tmp_path / "mrus.zip", nifti_bytes)
    out = tmp_path / "data"
    summary = fdd.unpack(archive, out, exclude_test=True)
    names = _names()
    dropped = [n for i, n in enumerate(names) if i % 11 in (9, 10)]
    assert dropped == ["obs009.nii.gz", "obs010.nii.gz"]
    assert summary.num_pairs == NUM_CASES - 2 and summary.num_dropped == 2
    for folder in FOLDERS:
        assert sorted(p.name for p in (out / folder).iterdir()) == [n for n in names if n not in dropped]
    # 108 upstream cases leave the 90 train/val cases of the shared copy
    assert len(fdd.held_out_names(_names(108))) == 18


def test_folders_found_under_any_top_level(tmp_path, nifti_bytes):
    archive = tmp_path / "flat.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for folder in FOLDERS:
            for name in _names(3):
                zf.writestr(f"a/b/{folder}/{name}", nifti_bytes["image"])
    assert fdd.unpack(archive, tmp_path / "data").num_pairs == 3


@pytest.mark.parametrize("member", [f"{TOP}/moving_images/../../../evil.nii.gz", "/tmp/evil.nii.gz", f"{TOP}/../evil.txt"])
def test_zip_slip_rejected(tmp_path, nifti_bytes, member):
    archive = _make_zip(tmp_path / "mrus.zip", nifti_bytes, extra={member: b"evil"})
    out = tmp_path / "data"
    with pytest.raises(fdd.FetchError, match="unsafe archive"):
        fdd.unpack(archive, out)
    _no_partial_output(tmp_path, out)
    assert not (tmp_path.parent / "evil.nii.gz").exists()


def test_mismatched_names_fail(tmp_path, nifti_bytes):
    archive = _make_zip(tmp_path / "mrus.zip", nifti_bytes, drop=("fixed_labels", "obs004.nii.gz"))
    out = tmp_path / "data"
    with pytest.raises(fdd.FetchError, match="same file names.*obs004") as info:
        fdd.unpack(archive, out)
    assert "\n" not in str(info.value)
    _no_partial_output(tmp_path, out)


def test_existing_output_refused(tmp_path, nifti_bytes):
    archive = _make_zip(tmp_path / "mrus.zip", nifti_bytes)
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(fdd.FetchError, match="not empty.*--overwrite"):
        fdd.unpack(archive, out)
    assert _listing(out) == ["keep.txt"]
    summary = fdd.unpack(archive, out, overwrite=True)
    assert summary.num_pairs == NUM_CASES and not (out / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".data.")] == []
    empty = tmp_path / "empty"
    empty.mkdir()
    assert fdd.unpack(archive, empty).num_pairs == NUM_CASES  # an empty directory is fine


def test_cli_unpacks_zip(tmp_path, nifti_bytes):
    archive = _make_zip(tmp_path / "mrus.zip", nifti_bytes)
    out = tmp_path / "demo"
    run = subprocess.run(
        [sys.executable, str(TOOL), "--zip", str(archive), "--output_dir", str(out), "--exclude_test"],
        capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert f"{NUM_CASES - 2} MR/TRUS pairs" in run.stdout
    assert f"make train-mixplus DATA={out} PRESET=cpu" in run.stdout
    assert len(list((out / "fixed_images").iterdir())) == NUM_CASES - 2
    # a second run refuses the now non-empty output directory
    again = subprocess.run(
        [sys.executable, str(TOOL), "--zip", str(archive), "--output_dir", str(out)],
        capture_output=True, text=True, timeout=60,
    )
    assert again.returncode != 0 and "--overwrite" in again.stderr


def test_download_unreachable_fails_cleanly(tmp_path):
    with pytest.raises(fdd.FetchError) as info:
        fdd.download(UNREACHABLE, tmp_path / "x.zip", timeout=5, progress=None)
    message = str(info.value)
    assert message.startswith(f"cannot download {UNREACHABLE}: ")
    assert message.endswith("; download it by hand and pass --zip FILE")
    assert list(tmp_path.iterdir()) == []

    out = tmp_path / "data"
    run = subprocess.run(
        [sys.executable, str(TOOL), "--url", UNREACHABLE, "--output_dir", str(out), "--timeout", "5"],
        capture_output=True, text=True, timeout=60,
    )
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot download {UNREACHABLE}: " in lines[0]
    assert lines[0].endswith("download it by hand and pass --zip FILE")
    assert not out.exists() and list(tmp_path.iterdir()) == []
