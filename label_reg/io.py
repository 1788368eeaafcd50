"""NIfTI input/output through SimpleITK that keeps the physical geometry.

Conventions (see the package docstring):

* A 3-D volume as a numpy array is in ITK index order (x, y, z), i.e. ``sitk.GetArrayFromImage(img).T``.
* Label stacks are (X, Y, Z, K), channels last; channel 0 is the prostate gland, channels 1.. are paired
  landmark blobs. On disk a stack of K > 1 masks is a 4-D NIfTI with the channels on the 4th axis (SimpleITK
  reads it as a 4-D scalar image whose array is (K, Z, Y, X)).
* World coordinates are ITK/LPS millimetres as SimpleITK reports them; ``Geometry.matrix`` maps a continuous
  index (x, y, z) to world: ``p = origin + matrix @ idx``.
* Displacement fields on disk are ITK displacement fields: 3-component float64 vectors in world millimetres,
  and the transform maps a point p of the field's grid to ``p + disp(p)``.

Every problem with a user's file raises :class:`label_reg.errors.InputError` naming that file. Writes go
through :func:`atomic_path` (one file) or :func:`atomic_dir` (a folder of outputs), so a failed write never leaves a
partial output behind.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gzip
import math
import os
import pathlib
import shutil
import struct
import uuid
import zlib
from typing import Iterator, Sequence

import numpy as np
import SimpleITK as sitk

from label_reg.errors import InputError

__all__ = [
    "Geometry",
    "read_image",
    "read_label",
    "to_array",
    "labels_to_array",
    "from_array",
    "labels_from_array",
    "atomic_path",
    "atomic_dir",
    "write_image",
    "write_label",
    "write_displacement_field",
    "read_displacement_field",
]

# Metadata key under which read_image records the file an image came from (used in error messages only).
SOURCE_KEY = "label_reg:source"

_COMPOUND_SUFFIXES = (".nii.gz", ".tar.gz", ".hdr.gz", ".img.gz", ".weights.h5")


# ----------------------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Geometry:
    """The physical grid of a 3-D image: ``size`` (x, y, z) voxels, ``spacing`` (mm), ``origin`` (mm, world
    position of voxel (0, 0, 0)'s centre) and ``direction`` (3x3 direction cosines, row-major, 9 floats, as
    SimpleITK gives them)."""

    size: tuple
    spacing: tuple
    origin: tuple
    direction: tuple

    def __post_init__(self):
        size = tuple(int(v) for v in self.size)
        spacing = tuple(float(v) for v in self.spacing)
        origin = tuple(float(v) for v in self.origin)
        direction = tuple(float(v) for v in np.asarray(self.direction, dtype=float).ravel())
        if len(size) != 3 or len(spacing) != 3 or len(origin) != 3 or len(direction) != 9:
            raise ValueError(
                f"Geometry needs 3 sizes, 3 spacings, 3 origin values and 9 direction values, got "
                f"{len(size)}, {len(spacing)}, {len(origin)}, {len(direction)}")
        if any(v < 1 for v in size):
            raise ValueError(f"Geometry size must be positive, got {size}")
        if not all(math.isfinite(v) and v > 0 for v in spacing):
            raise ValueError(f"Geometry spacing must be finite and positive, got {spacing}")
        if not all(math.isfinite(v) for v in origin + direction):
            raise ValueError("Geometry origin and direction must be finite")
        if abs(np.linalg.det(np.reshape(direction, (3, 3)))) < 1e-6:
            raise ValueError(f"Geometry direction is singular: {direction}")
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "direction", direction)

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_image(cls, img: sitk.Image) -> "Geometry":
        """The geometry of a 3-D SimpleITK image; of a 4-D image, its first three (spatial) axes."""
        dim = img.GetDimension()
        if dim == 3:
            return cls(img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection())
        if dim == 4:
            d4 = np.reshape(img.GetDirection(), (4, 4))
            return cls(img.GetSize()[:3], img.GetSpacing()[:3], img.GetOrigin()[:3], d4[:3, :3])
        raise ValueError(f"Geometry.from_image needs a 3-D or 4-D image, got {dim}-D")

    def reference_image(self, pixel_type=sitk.sitkFloat32) -> sitk.Image:
        """A blank (all-zero) image on this grid."""
        img = sitk.Image(list(self.size), pixel_type)
        self.apply_to(img)
        return img

    def apply_to(self, img: sitk.Image) -> sitk.Image:
        """Set this geometry on ``img`` (in place; also returned). The image's size must equal ``size``."""
        if tuple(img.GetSize()) != self.size:
            raise ValueError(f"image size {img.GetSize()} does not match geometry size {self.size}")
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(self.direction)
        return img

    # -- index <-> world ------------------------------------------------------------------------------------
    @property
    def direction_matrix(self) -> np.ndarray:
        return np.reshape(np.asarray(self.direction, dtype=np.float64), (3, 3))

    @property
    def matrix(self) -> np.ndarray:
        """The linear part of index -> world: ``direction @ diag(spacing)`` (3x3, float64)."""
        return self.direction_matrix @ np.diag(self.spacing)

    def index_to_world(self, idx) -> np.ndarray:
        """Continuous (x, y, z) indices, shape (..., 3), to world points in mm, same shape."""
        idx = np.asarray(idx, dtype=np.float64)
        return idx @ self.matrix.T + np.asarray(self.origin)

    def world_to_index(self, pts) -> np.ndarray:
        """World points in mm, shape (..., 3), to continuous (x, y, z) indices, same shape."""
        pts = np.asarray(pts, dtype=np.float64)
        return (pts - np.asarray(self.origin)) @ np.linalg.inv(self.matrix).T

    @property
    def center_world(self) -> np.ndarray:
        """World position of the centre of the grid (halfway between the first and last voxel centres)."""
        return self.index_to_world((np.asarray(self.size, dtype=np.float64) - 1.0) / 2.0)

    # -- serialisation --------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain JSON-able dict: lists of ints/floats."""
        return {"size": list(self.size), "spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction)}

    @classmethod
    def from_dict(cls, d, source="geometry") -> "Geometry":
        """Inverse of :meth:`to_dict`. Validates types and lengths (never evaluates anything); problems raise
        InputError(source, ...)."""
        if not isinstance(d, dict):
            raise InputError(source, f"geometry must be a mapping, got {type(d).__name__}")
        expected = {"size": 3, "spacing": 3, "origin": 3, "direction": 9}
        missing = sorted(set(expected) - set(d))
        extra = sorted(set(d) - set(expected))
        if missing or extra:
            raise InputError(source, f"geometry keys must be {sorted(expected)} (missing {missing}, unknown {extra})")
        values = {}
        for key, n in expected.items():
            v = d[key]
            if not isinstance(v, (list, tuple)) or len(v) != n:
                raise InputError(source, f"geometry '{key}' must be a list of {n} numbers")
            for x in v:
                if isinstance(x, bool) or not isinstance(x, (int, float)):
                    raise InputError(source, f"geometry '{key}' holds a non-number: {x!r}")
                if key == "size" and not isinstance(x, int):
                    raise InputError(source, f"geometry 'size' must hold integers, got {x!r}")
            values[key] = v
        try:
            return cls(**values)
        except ValueError as err:
            raise InputError(source, str(err)) from None

    def allclose(self, other: "Geometry", tol: float = 1e-4) -> bool:
        """Same size exactly; spacing and origin equal within ``tol`` times the largest voxel spacing (mm);
        direction cosines equal within ``tol``. The default tolerates float32 rounding in NIfTI headers."""
        if self.size != other.size:
            return False
        scale = max(max(self.spacing), max(other.spacing))
        return (np.allclose(self.spacing, other.spacing, rtol=0, atol=tol * scale)
                and np.allclose(self.origin, other.origin, rtol=0, atol=tol * scale)
                and np.allclose(self.direction, other.direction, rtol=0, atol=tol))

    def describe_difference(self, other: "Geometry", tol: float = 1e-4) -> str:
        """A short human-readable statement of how two geometries differ ('' if they are allclose)."""
        scale = max(max(self.spacing), max(other.spacing))
        parts = []
        if self.size != other.size:
            parts.append(f"size {_fmt(self.size)} vs {_fmt(other.size)}")
        if not np.allclose(self.spacing, other.spacing, rtol=0, atol=tol * scale):
            parts.append(f"spacing {_fmt(self.spacing)} vs {_fmt(other.spacing)}")
        if not np.allclose(self.origin, other.origin, rtol=0, atol=tol * scale):
            parts.append(f"origin {_fmt(self.origin)} vs {_fmt(other.origin)}")
        if not np.allclose(self.direction, other.direction, rtol=0, atol=tol):
            parts.append(f"direction {_fmt(self.direction)} vs {_fmt(other.direction)}")
        return "; ".join(parts)


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values) + ")"


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------
def _short_itk_message(err: Exception) -> str:
    """One line out of a multi-line SimpleITK/ITK exception message."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in lines:
        for marker in ("sitk::ERROR:", "ITK ERROR:"):
            if marker in ln:
                msg = ln.split(marker, 1)[1].strip()
                # "ImageFileReader(0x1234): message" -> "message"
                if msg.split(":", 1)[0].endswith(")") and ":" in msg:
                    msg = msg.split(":", 1)[1].strip()
                return msg
    return lines[-1] if lines else type(err).__name__


def _nifti_header_layout(head: bytes):
    """(endian, version) of a NIfTI-1/2 header, or None if ``head`` is not one."""
    if len(head) < 4:
        return None
    for endian in ("<", ">"):
        n = struct.unpack(endian + "i", head[:4])[0]
        if n == 348:
            return endian, 1
        if n == 540:
            return endian, 2
    return None


_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float32 / float64


def _nifti_header_fields(head: bytes):
    """(endian, datatype, dims, bitpix, vox_offset) of a NIfTI-1/2 header, or None if not determinable."""
    layout = _nifti_header_layout(head)
    if layout is None:
        return None
    endian, version = layout
    if version == 1:
        if len(head) < 348:
            return None
        dim = struct.unpack(endian + "8h", head[40:56])
        datatype, bitpix = struct.unpack(endian + "2h", head[70:74])
        vox_offset = struct.unpack(endian + "f", head[108:112])[0]
    else:
        if len(head) < 540:
            return None
        datatype, bitpix = struct.unpack(endian + "2h", head[12:16])
        dim = struct.unpack(endian + "8q", head[16:80])
        vox_offset = struct.unpack(endian + "q", head[168:176])[0]
    ndim = dim[0]
    if not 1 <= ndim <= 7 or bitpix <= 0 or not math.isfinite(vox_offset):
        return None
    return endian, datatype, [max(int(n), 1) for n in dim[1:ndim + 1]], bitpix, int(vox_offset)


def _check_nifti(path: pathlib.Path) -> None:
    """Checks SimpleITK does not make on a single-file NIfTI: it silently fills a truncated file with garbage
    and silently turns NaN voxels into 0. Raises InputError for a broken gzip stream, a bad header, a file
    shorter than its header declares, or NaN/Inf voxels."""
    name = path.name.lower()
    with open(path, "rb") as f:
        is_gzip = f.read(2) == b"\x1f\x8b"
    if name.endswith(".nii.gz") and is_gzip:
        try:
            with gzip.open(path, "rb") as f:
                data = f.read()
        except (EOFError, OSError, zlib.error) as err:
            raise InputError(path, f"corrupt or truncated gzip file ({err})") from None
    elif name.endswith((".nii", ".nii.gz")):  # ITK also reads an uncompressed file named .nii.gz
        data = path.read_bytes()
    else:
        return
    if _nifti_header_layout(data[:540]) is None:
        raise InputError(path, "not a NIfTI file (bad header)")
    fields = _nifti_header_fields(data[:540])
    if fields is None:
        return
    endian, datatype, dims, bitpix, vox_offset = fields
    count = int(np.prod(dims))
    expected = vox_offset + count * bitpix // 8
    if len(data) < expected:
        raise InputError(path, f"truncated NIfTI file: {len(data)} bytes of the {expected} its header declares")
    if datatype in _NIFTI_FLOAT_TYPES:
        values = np.frombuffer(data, dtype=endian + _NIFTI_FLOAT_TYPES[datatype], count=count, offset=vox_offset)
        bad = count - int(np.count_nonzero(np.isfinite(values)))
        if bad:
            raise InputError(path, f"contains {bad} NaN/Inf voxel(s)")


def _read_any(path) -> tuple[pathlib.Path, sitk.Image]:
    p = pathlib.Path(path)
    if not p.exists():
        raise InputError(p, "file not found")
    if p.is_dir():
        raise InputError(p, "is a directory, expected an image file")
    if p.stat().st_size == 0:
        raise InputError(p, "file is empty")
    _check_nifti(p)
    try:
        img = sitk.ReadImage(str(p))
    except RuntimeError as err:
        raise InputError(p, f"cannot read image ({_short_itk_message(err)})") from None
    return p, img


def _check_finite(path, arr: np.ndarray, what: str = "voxel") -> None:
    if np.issubdtype(arr.dtype, np.floating):
        bad = ~np.isfinite(arr)
        if bad.any():
            raise InputError(path, f"contains {int(bad.sum())} NaN/Inf {what}(s)")


def _size_text(img: sitk.Image) -> str:
    return "x".join(str(s) for s in img.GetSize())


def read_image(path) -> sitk.Image:
    """Read a 3-D scalar image as float32, keeping its geometry.

    A 4-D file whose 4th axis has length 1 is accepted as 3-D. Raises InputError naming the file when it is
    missing, unreadable or truncated, not 3-D, multi-component, or holds NaN/Inf voxels.
    """
    p, img = _read_any(path)
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(p, f"has {img.GetNumberOfComponentsPerPixel()} components per voxel; "
                            "expected a scalar 3-D image")
    dim = img.GetDimension()
    if dim == 4 and img.GetSize()[3] == 1:
        img = _extract_channel(img, 0)
        dim = 3
    if dim != 3:
        hint = " (is this a label file?)" if dim == 4 else ""
        raise InputError(p, f"is {dim}-D (size {_size_text(img)}); expected a 3-D image{hint}")
    img = sitk.Cast(img, sitk.sitkFloat32)
    _check_finite(p, sitk.GetArrayViewFromImage(img))
    img.SetMetaData(SOURCE_KEY, str(p))
    return img


def _extract_channel(img4: sitk.Image, k: int) -> sitk.Image:
    size = list(img4.GetSize())
    return sitk.Extract(img4, size[:3] + [0], [0, 0, 0, k])


def read_label(path, reference=None, reference_name=None) -> list[sitk.Image]:
    """Read a label file as a list of K 3-D float32 channel images with the file's geometry.

    Accepts a 3-D file (one channel), a 4-D file with the channels on the 4th axis, or a 3-D vector image
    (channels as components). Every channel must be binary (only 0 and 1) and channel 0 (the gland) must be
    non-empty. If ``reference`` (a sitk.Image or a Geometry) is given, the label grid must match it; the error
    names ``reference_name``, else the file ``read_image`` read the reference from.
    """
    p, img = _read_any(path)
    dim = img.GetDimension()
    ncomp = img.GetNumberOfComponentsPerPixel()
    if dim == 4 and ncomp == 1:
        d4 = np.reshape(img.GetDirection(), (4, 4))
        if np.abs(d4[3, :3]).max() > 1e-6 or np.abs(d4[:3, 3]).max() > 1e-6:
            raise InputError(p, "4-D label direction mixes the channel axis with space")
        geometry = Geometry.from_image(img)
        arr = sitk.GetArrayViewFromImage(img)  # (K, Z, Y, X)
    elif dim == 3 and ncomp == 1:
        geometry = Geometry.from_image(img)
        arr = sitk.GetArrayViewFromImage(img)[None]  # (1, Z, Y, X)
    elif dim == 3 and ncomp > 1:
        geometry = Geometry.from_image(img)
        arr = np.moveaxis(sitk.GetArrayViewFromImage(img), -1, 0)  # (Z, Y, X, K) -> (K, Z, Y, X)
    else:
        comp = f" with {ncomp} components" if ncomp > 1 else ""
        raise InputError(p, f"is {dim}-D{comp} (size {_size_text(img)}); expected a 3-D mask or a 4-D "
                            "stack of masks with the channels last")
    if arr.shape[0] < 1:
        raise InputError(p, "holds no label channels")
    _check_finite(p, arr)
    for k in range(arr.shape[0]):
        ch = arr[k]
        nonbinary = (ch != 0) & (ch != 1)
        if nonbinary.any():
            example = ch[nonbinary].flat[0]
            raise InputError(p, f"channel {k} is not binary (e.g. value {example:g}); masks must hold only 0 and 1")
    if not arr[0].any():
        raise InputError(p, "channel 0 (prostate gland) is empty")
    if reference is not None:
        ref_geo = reference if isinstance(reference, Geometry) else Geometry.from_image(reference)
        if not geometry.allclose(ref_geo):
            if reference_name is None and isinstance(reference, sitk.Image) and reference.HasMetaDataKey(SOURCE_KEY):
                reference_name = reference.GetMetaData(SOURCE_KEY)
            ref_text = reference_name if reference_name is not None else "(reference image)"
            raise InputError(p, f"label geometry does not match image {ref_text}: "
                                f"{geometry.describe_difference(ref_geo)} (label vs image)")
    channels = []
    for k in range(arr.shape[0]):
        ch = sitk.GetImageFromArray(np.asarray(arr[k], dtype=np.float32))
        geometry.apply_to(ch)
        channels.append(ch)
    return channels


# ----------------------------------------------------------------------------------------------------------
# Arrays
# ----------------------------------------------------------------------------------------------------------
def to_array(img: sitk.Image) -> np.ndarray:
    """A 3-D scalar image as a contiguous float32 array in (x, y, z) order."""
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("to_array needs a 3-D scalar image")
    return np.ascontiguousarray(sitk.GetArrayViewFromImage(img).T, dtype=np.float32)


def labels_to_array(channels: Sequence[sitk.Image]) -> np.ndarray:
    """K channel images (same size) as one float32 array (X, Y, Z, K)."""
    if len(channels) == 0:
        raise ValueError("labels_to_array needs at least one channel")
    sizes = {tuple(c.GetSize()) for c in channels}
    if len(sizes) != 1:
        raise ValueError(f"label channels differ in size: {sorted(sizes)}")
    return np.stack([to_array(c) for c in channels], axis=-1)


def from_array(arr_xyz, geometry: Geometry, dtype=np.float32) -> sitk.Image:
    """An (x, y, z) array on ``geometry`` as a SimpleITK image (cast to ``dtype``; None keeps the dtype)."""
    arr = np.asarray(arr_xyz)
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    if arr.ndim != 3 or tuple(arr.shape) != geometry.size:
        raise ValueError(f"array shape {arr.shape} does not match geometry size {geometry.size}")
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.T))
    return geometry.apply_to(img)


def labels_from_array(arr_xyzk, geometry: Geometry) -> list[sitk.Image]:
    """An (X, Y, Z, K) array on ``geometry`` as K float32 channel images."""
    arr = np.asarray(arr_xyzk)
    if arr.ndim != 4:
        raise ValueError(f"labels_from_array needs an (X, Y, Z, K) array, got shape {arr.shape}")
    return [from_array(arr[..., k], geometry) for k in range(arr.shape[-1])]


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------
def _split_suffix(name: str) -> tuple[str, str]:
    low = name.lower()
    for suffix in _COMPOUND_SUFFIXES:
        if low.endswith(suffix) and len(name) > len(suffix):
            return name[:-len(suffix)], name[-len(suffix):]
    stem, ext = os.path.splitext(name)
    return stem, ext


@contextlib.contextmanager
def atomic_path(path) -> Iterator[pathlib.Path]:
    """Yield a temporary path beside ``path`` with the same suffix (``.nii.gz`` stays ``.nii.gz``); on success
    it replaces ``path`` atomically (``os.replace``), on an exception it is removed and ``path`` is untouched.
    Parent directories are created."""
    target = pathlib.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    stem, suffix = _split_suffix(target.name)
    tmp = target.with_name(f".{stem}.tmp-{uuid.uuid4().hex[:12]}{suffix}")
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"atomic write of {target} produced no file")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(target, replace=False, owned=()) -> Iterator[pathlib.Path]:
    """Yield a fresh hidden staging folder beside the folder ``target``; on success its contents are published
    into ``target``, on an exception it is removed and ``target`` is untouched (no partial output).

    Publishing: when ``target`` does not exist, one atomic rename. Otherwise, with ``replace=True``, the whole
    folder is swapped (the old one is renamed aside, the staging folder renamed into place, the old one removed);
    with ``replace=False`` the staged entries are merged in, each file by an atomic ``os.replace`` (sub-folders
    merged the same way), other entries of ``target`` are kept, except names in ``owned`` that this run did not
    produce, which are removed (a run's own outputs of an earlier run). Parent folders are created.
    """
    target = pathlib.Path(target)
    if target.exists() and not target.is_dir():
        raise InputError(target, "exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        yield staging
        if replace:
            _swap_into_place(staging, target)
        else:
            _merge_into_place(staging, target, owned)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _swap_into_place(staging: pathlib.Path, target: pathlib.Path) -> None:
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
        os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        if old is not None:
            with contextlib.suppress(OSError):
                os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _merge_into_place(staging: pathlib.Path, target: pathlib.Path, owned=()) -> None:
    try:
        os.rename(staging, target)
        return
    except OSError:
        if not target.is_dir():
            raise
    produced = {entry.name for entry in staging.iterdir()}
    for entry in staging.iterdir():
        if entry.is_dir() and (target / entry.name).is_dir():
            _merge_into_place(entry, target / entry.name)
        else:
            os.replace(entry, target / entry.name)
    for name in set(owned) - produced:
        with contextlib.suppress(FileNotFoundError):
            (target / name).unlink()
    staging.rmdir()


def _write(img: sitk.Image, path) -> None:
    target = pathlib.Path(path)
    try:
        with atomic_path(target) as tmp:
            sitk.WriteImage(img, str(tmp), useCompression=True)
    except RuntimeError as err:
        if "SimpleITK" in str(err) or "ITK" in str(err):
            raise InputError(target, f"cannot write image ({_short_itk_message(err)})") from None
        raise


def write_image(path, img: sitk.Image) -> None:
    """Write an image atomically (format from the suffix, e.g. ``.nii.gz``)."""
    _write(img, path)


def write_label(path, channels: Sequence[sitk.Image]) -> None:
    """Write K label channels atomically: K == 1 as a 3-D file, K > 1 as a 4-D file with the channels last
    (what :func:`read_label` reads back). All channels must share one geometry."""
    if isinstance(channels, sitk.Image):
        channels = [channels]
    channels = list(channels)
    if not channels:
        raise ValueError("write_label needs at least one channel")
    geo = Geometry.from_image(channels[0])
    for k, ch in enumerate(channels[1:], start=1):
        if not Geometry.from_image(ch).allclose(geo, tol=1e-6):
            raise ValueError(f"label channel {k} has a different geometry from channel 0")
    pixel_type = channels[0].GetPixelID()
    channels = [ch if ch.GetPixelID() == pixel_type else sitk.Cast(ch, pixel_type) for ch in channels]
    img = channels[0] if len(channels) == 1 else sitk.JoinSeries(channels)
    _write(img, path)


def write_displacement_field(path, disp_mm, geometry: Geometry) -> None:
    """Write an ITK displacement field: ``disp_mm`` (X, Y, Z, 3) world-space vectors in mm on ``geometry``,
    stored as float64 3-vectors. ``sitk.DisplacementFieldTransform`` of the file maps p to p + disp(p)."""
    disp = np.asarray(disp_mm, dtype=np.float64)
    if disp.ndim != 4 or disp.shape[-1] != 3 or tuple(disp.shape[:3]) != geometry.size:
        raise ValueError(f"displacement field shape {disp.shape} does not match (X, Y, Z, 3) with size "
                         f"{geometry.size}")
    if not np.isfinite(disp).all():
        raise ValueError("displacement field holds NaN/Inf")
    img = sitk.GetImageFromArray(np.ascontiguousarray(disp.transpose(2, 1, 0, 3)), isVector=True)
    geometry.apply_to(img)
    _write(img, path)


def read_displacement_field(path) -> tuple[np.ndarray, Geometry]:
    """Read an ITK displacement field: (disp_mm (X, Y, Z, 3) float64, Geometry)."""
    p, img = _read_any(path)
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 3:
        raise InputError(p, f"is {img.GetDimension()}-D with {img.GetNumberOfComponentsPerPixel()} components "
                            "per voxel; expected a 3-D field of 3-vectors")
    img = sitk.Cast(img, sitk.sitkVectorFloat64)
    arr = np.ascontiguousarray(sitk.GetArrayFromImage(img).transpose(2, 1, 0, 3))
    _check_finite(p, arr, "vector component")
    return arr, Geometry.from_image(img)
