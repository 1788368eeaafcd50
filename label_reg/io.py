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
* Affine transforms on disk (:func:`write_affine_transform`) are ITK ``AffineTransform_double_3_3`` text files
  (``.tfm``) in world millimetres, mapping a point p to ``matrix (p - center) + center + translation``.

Every problem with a user's file raises :class:`label_reg.errors.InputError` naming that file. Reading checks the
NIfTI header first (:func:`check_nifti_header`: voxel sizes finite and positive, qform and sform describing the same
geometry, at most :data:`MAX_VOXELS` voxels) and streams the voxel data once to find truncation and NaN/Inf, without
holding a decompressed copy. Writes go through :func:`atomic_path` (one file) or :func:`atomic_dir` (a folder of
outputs), so a failed write never leaves a partial output behind, and every write is verified before it is renamed
into place (:func:`verify_nifti`, or the size on disk); a failed or truncated write raises
:class:`label_reg.errors.OutputError`. :func:`check_output_folder` checks, before any work is done, that an output
folder can be written and has room. :class:`NiftiSlabWriter` writes a volume slab by slab, so that outputs far larger
than the working grid are never held in memory whole.
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
import tempfile
import uuid
import zlib
from typing import Iterator, Sequence

import numpy as np
import SimpleITK as sitk

from label_reg.errors import InputError, OutputError

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
    "write_text",
    "verify_nifti",
    "check_nifti_header",
    "check_output_folder",
    "existing_files",
    "NiftiSlabWriter",
    "MAX_VOXELS",
    "NIFTI_INTENT_DISPVECT",
]

# Metadata key under which read_image records the file an image came from (used in error messages only).
SOURCE_KEY = "label_reg:source"

_COMPOUND_SUFFIXES = (".nii.gz", ".tar.gz", ".hdr.gz", ".img.gz", ".weights.h5")

# The largest image read (voxels x components or channels): 2**28, e.g. 645^3 or 1024 x 512 x 512. Above it an image is
# refused from its header alone, before any voxel is read: as float32 it takes 1 GB, and resampling it with a cubic
# B-spline (ITK computes float64 coefficients of the whole image) 2 GB more.
MAX_VOXELS = 2 ** 28
NIFTI_INTENT_DISPVECT = 1006  # NIfTI intent code of a displacement vector field (what 3D Slicer expects)
_CHUNK_BYTES = 1 << 22  # voxel data is streamed in pieces of this size (4 MB)


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


def _nifti_geometry_fields(head: bytes):
    """(ndim, pixdim (8,), qform_code, quatern (b, c, d), qoffset (3,), sform_code, srow (3, 4)) of a NIfTI-1/2
    header (None if it is not one), all as read, nothing interpreted."""
    layout = _nifti_header_layout(head)
    if layout is None:
        return None
    endian, version = layout
    if version == 1:
        if len(head) < 348:
            return None
        ndim = struct.unpack(endian + "h", head[40:42])[0]
        pixdim = struct.unpack(endian + "8f", head[76:108])
        qform_code, sform_code = struct.unpack(endian + "2h", head[252:256])
        quatern = struct.unpack(endian + "3f", head[256:268])
        qoffset = struct.unpack(endian + "3f", head[268:280])
        srow = struct.unpack(endian + "12f", head[280:328])
    else:
        if len(head) < 540:
            return None
        ndim = struct.unpack(endian + "q", head[16:24])[0]
        pixdim = struct.unpack(endian + "8d", head[104:168])
        qform_code, sform_code = struct.unpack(endian + "2i", head[344:352])
        quatern = struct.unpack(endian + "3d", head[352:376])
        qoffset = struct.unpack(endian + "3d", head[376:400])
        srow = struct.unpack(endian + "12d", head[400:496])
    return (int(ndim), np.asarray(pixdim, np.float64), int(qform_code), np.asarray(quatern, np.float64),
            np.asarray(qoffset, np.float64), int(sform_code), np.reshape(np.asarray(srow, np.float64), (3, 4)))


def _qform_matrix(quatern, qoffset, pixdim) -> np.ndarray:
    """The NIfTI qform as a 3x4 index -> world (RAS mm) matrix (the NIfTI-1 standard's quaternion formula)."""
    b, c, d = (float(v) for v in quatern)
    a = 1.0 - (b * b + c * c + d * d)
    if a < 1e-7:  # a 180-degree rotation: renormalise (b, c, d), a = 0
        norm = math.sqrt(b * b + c * c + d * d)
        b, c, d, a = b / norm, c / norm, d / norm, 0.0
    else:
        a = math.sqrt(a)
    rotation = np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                         [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                         [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b]])
    qfac = -1.0 if pixdim[0] < 0 else 1.0
    linear = rotation @ np.diag([pixdim[1], pixdim[2], qfac * pixdim[3]])
    return np.concatenate([linear, np.reshape(qoffset, (3, 1))], axis=1)


def check_nifti_header(path, head: bytes, limit: bool = True) -> None:
    """Header sanity that ITK does not check (it silently uses 1 mm for a zero or NaN voxel size, and picks one of
    two disagreeing orientations): the spatial voxel sizes ``pixdim[1..3]`` must be finite and positive, qform and
    sform (when both are set) must be finite and place the image's corners within a tenth of a voxel (at least
    0.001 mm) of each other, and (``limit``) the image may hold at most :data:`MAX_VOXELS` voxels. Raises InputError
    naming ``path``; does nothing for a header it cannot parse (the caller reports that)."""
    fields = _nifti_geometry_fields(head)
    sizes = _nifti_header_fields(head)
    if fields is None or sizes is None:
        return
    ndim, pixdim, qform_code, quatern, qoffset, sform_code, srow = fields
    dims = sizes[2]
    count = int(np.prod(dims, dtype=np.int64))
    if limit and count > MAX_VOXELS:
        raise InputError(path, f"is {'x'.join(map(str, dims))} = {count:,} voxels, above the {MAX_VOXELS:,}-voxel "
                               "limit (label_reg.io.MAX_VOXELS); crop or downsample it first")
    spatial = min(max(ndim, 1), 3)
    for i in range(1, spatial + 1):
        if not (math.isfinite(pixdim[i]) and pixdim[i] > 0):
            raise InputError(path, f"header voxel size pixdim[{i}] is {pixdim[i]:g}; voxel sizes must be finite and "
                                   "positive (ITK would silently use 1 mm)")
    if qform_code > 0 and not (np.isfinite(quatern).all() and np.isfinite(qoffset).all()):
        raise InputError(path, "header qform holds NaN/Inf")
    if sform_code > 0 and not np.isfinite(srow).all():
        raise InputError(path, "header sform holds NaN/Inf")
    if qform_code > 0 and sform_code > 0:
        pix = np.ones(4)
        pix[:spatial + 1] = pixdim[:spatial + 1]
        pix[0] = pixdim[0]
        qform = _qform_matrix(quatern, qoffset, pix)
        extent = [max(n - 1, 0) for n in (list(dims[:3]) + [1, 1, 1])[:3]]
        corners = np.array([[i, j, k, 1.0] for i in (0, extent[0]) for j in (0, extent[1]) for k in (0, extent[2])])
        gap = float(np.max(np.linalg.norm(corners @ qform.T - corners @ srow.T, axis=1)))
        tolerance = max(1e-3, 0.1 * float(np.min(pix[1:spatial + 1])))
        if not gap <= tolerance:
            raise InputError(path, f"header qform and sform disagree: the image corners differ by {gap:.3g} mm "
                                   f"(tolerance {tolerance:.3g} mm); which orientation is right is unclear")


def _read_exactly(f, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        part = f.read(n - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _scan_nifti(path: pathlib.Path, check_values: bool = True, limit: bool = True) -> None:
    """Read a single-file NIfTI once, in pieces of ``_CHUNK_BYTES`` (never whole): header sanity
    (:func:`check_nifti_header`), a gzip stream that is complete and passes its CRC, at least as many voxel bytes as
    the header declares, and (``check_values``) no NaN/Inf voxels. ``limit``: apply :data:`MAX_VOXELS` (to inputs,
    not to outputs being verified). Raises InputError naming the file."""
    name = path.name.lower()
    with open(path, "rb") as f:
        is_gzip = f.read(2) == b"\x1f\x8b"
    if name.endswith(".nii.gz") and is_gzip:
        opener = gzip.open
    elif name.endswith((".nii", ".nii.gz")):  # ITK also reads an uncompressed file named .nii.gz
        opener = open
    else:
        return
    bad = 0
    try:
        with opener(path, "rb") as f:
            head = _read_exactly(f, 540)
            if _nifti_header_layout(head) is None:
                raise InputError(path, "not a NIfTI file (bad header)")
            check_nifti_header(path, head, limit)
            fields = _nifti_header_fields(head)
            if fields is None:
                return
            endian, datatype, dims, bitpix, vox_offset = fields
            count = int(np.prod(dims, dtype=np.int64))
            expected = vox_offset + count * bitpix // 8
            total = len(head)
            dtype = None
            if check_values and datatype in _NIFTI_FLOAT_TYPES:
                dtype = np.dtype(endian + _NIFTI_FLOAT_TYPES[datatype])
            remaining = count  # voxel values not checked yet

            def consume(data):
                """Check the whole values at the start of ``data``; return the bytes of an incomplete last one."""
                nonlocal bad, remaining
                usable = min(len(data) // dtype.itemsize, remaining)
                if usable:
                    values = np.frombuffer(data, dtype=dtype, count=usable)
                    bad += usable - int(np.count_nonzero(np.isfinite(values)))
                    remaining -= usable
                return data[usable * dtype.itemsize:] if remaining > 0 else b""

            pending = consume(head[vox_offset:]) if dtype is not None and vox_offset < len(head) else b""
            skip = max(vox_offset - len(head), 0)
            while True:
                chunk = f.read(_CHUNK_BYTES)
                if not chunk:
                    break
                total += len(chunk)
                if dtype is not None and remaining > 0:
                    if skip:
                        cut = min(skip, len(chunk))
                        chunk, skip = chunk[cut:], skip - cut
                    pending = consume(pending + chunk if pending else chunk)
    except (EOFError, zlib.error, OSError) as err:
        if opener is open:
            raise InputError(path, f"cannot read file ({err})") from None
        raise InputError(path, f"corrupt or truncated gzip file ({err})") from None
    if total < expected:
        raise InputError(path, f"truncated NIfTI file: {total} bytes of the {expected} its header declares")
    if bad:
        raise InputError(path, f"contains {bad} NaN/Inf voxel(s)")


def _check_nifti(path: pathlib.Path) -> None:
    """Checks SimpleITK does not make on a single-file NIfTI (see :func:`_scan_nifti`)."""
    _scan_nifti(path, check_values=True)


def _read_any(path) -> tuple[pathlib.Path, sitk.Image]:
    p = pathlib.Path(path)
    if not p.exists():
        raise InputError(p, "file not found")
    if p.is_dir():
        raise InputError(p, "is a directory, expected an image file")
    if p.stat().st_size == 0:
        raise InputError(p, "file is empty")
    _check_nifti(p)
    if not p.name.lower().endswith((".nii", ".nii.gz")):
        _check_size_from_header(p)
    try:
        img = sitk.ReadImage(str(p))
    except RuntimeError as err:
        raise InputError(p, f"cannot read image ({_short_itk_message(err)})") from None
    return p, img


def _check_size_from_header(p: pathlib.Path) -> None:
    """:data:`MAX_VOXELS` for formats other than NIfTI, from ITK's reading of the header alone."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise InputError(p, f"cannot read image ({_short_itk_message(err)})") from None
    size = tuple(reader.GetSize())
    count = int(np.prod(size, dtype=np.int64)) * int(reader.GetNumberOfComponents())
    if count > MAX_VOXELS:
        raise InputError(p, f"is {'x'.join(map(str, size))} = {count:,} voxels, above the {MAX_VOXELS:,}-voxel limit "
                            "(label_reg.io.MAX_VOXELS); crop or downsample it first")


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
    float_source = img.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64)
    img = sitk.Cast(img, sitk.sitkFloat32)
    if float_source and not p.name.lower().endswith((".nii", ".nii.gz")):  # NIfTI voxels were checked on reading
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


def _os_problem(err: OSError) -> str:
    return err.strerror or str(err) or type(err).__name__


@contextlib.contextmanager
def atomic_path(path) -> Iterator[pathlib.Path]:
    """Yield a temporary path beside ``path`` with the same suffix (``.nii.gz`` stays ``.nii.gz``); on success
    it replaces ``path`` atomically (``os.replace``), on an exception it is removed and ``path`` is untouched.
    Parent directories are created. An operating-system error on the way (read-only or full disk, file-size limit)
    becomes an :class:`OutputError` naming ``path``."""
    target = pathlib.Path(path)
    stem, suffix = _split_suffix(target.name)
    tmp = target.with_name(f".{stem}.tmp-{uuid.uuid4().hex[:12]}{suffix}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"atomic write of {target} produced no file")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OutputError(target, f"cannot write ({_os_problem(err)})") from None
    except BaseException:
        with contextlib.suppress(OSError):
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

    Errors: an :class:`OutputError` about a file in the staging folder is re-raised naming the same file in
    ``target`` (the place the user asked for; the staging folder is gone by then), and an operating-system error on
    the way (creating, publishing) becomes an OutputError naming ``target``.
    """
    target = pathlib.Path(target)
    if target.exists() and not target.is_dir():
        raise InputError(target, "exists and is not a directory")
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as err:
        raise OutputError(target, f"cannot write ({_os_problem(err)})") from None
    try:
        yield staging
        if replace:
            _swap_into_place(staging, target)
        else:
            _merge_into_place(staging, target, owned)
    except OutputError as err:
        shutil.rmtree(staging, ignore_errors=True)
        source = pathlib.Path(err.source)
        if staging in source.parents:
            raise OutputError(target / source.relative_to(staging), err.problem) from None
        raise
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise OutputError(target, f"cannot write ({_os_problem(err)})") from None
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


def verify_nifti(path, target=None) -> None:
    """Check a NIfTI file just written: ITK parses its header and, read once in pieces, it holds every voxel byte
    its header declares in an intact gzip stream. ITK's writer only prints "wrote only 0 of N bytes" on a full disk
    and leaves a file cut short at a file-size limit, both of which read back without complaint. Raises
    :class:`OutputError` naming ``target`` (default ``path``)."""
    path = pathlib.Path(path)
    target = path if target is None else target
    try:
        _scan_nifti(path, check_values=False, limit=False)
    except InputError as err:
        raise OutputError(target, f"write failed: {err.problem}") from None
    except OSError as err:
        raise OutputError(target, f"write failed ({_os_problem(err)})") from None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise OutputError(target, f"write failed: the file reads back as {_short_itk_message(err)}") from None


def _write(img: sitk.Image, path) -> None:
    target = pathlib.Path(path)
    try:
        with atomic_path(target) as tmp:
            sitk.WriteImage(img, str(tmp), useCompression=True)
            if tmp.name.lower().endswith((".nii", ".nii.gz")):
                verify_nifti(tmp, target)
            else:
                reader = sitk.ImageFileReader()
                reader.SetFileName(str(tmp))
                reader.ReadImageInformation()
                if tuple(reader.GetSize()) != tuple(img.GetSize()):
                    raise OutputError(target, "write failed: the file reads back with another size")
    except RuntimeError as err:
        if "SimpleITK" in str(err) or "ITK" in str(err):
            raise OutputError(target, f"cannot write image ({_short_itk_message(err)})") from None
        raise


def write_text(path, text: str) -> None:
    """Write UTF-8 text atomically; verified by its size on disk (a short write is an :class:`OutputError`)."""
    data = text.encode("utf-8")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        size = tmp.stat().st_size
        if size != len(data):
            raise OutputError(path, f"write failed: {size} of {len(data)} bytes on disk")


def report_file_problem(path, suffixes=(".md", ".csv")) -> str | None:
    """Why ``path`` cannot take a report a script writes at its end (its suffix is none of ``suffixes``, its folder
    does not exist or accepts no new file), or None: checked before the slow work, for an argparse one-line
    error."""
    path = pathlib.Path(path)
    if path.suffix not in suffixes:
        return f"must end in {' or '.join(suffixes)}"
    folder = path.resolve().parent
    if not folder.is_dir():
        return f"folder {path.parent} does not exist"
    try:
        _probe_writable(folder, path)
    except OutputError as err:
        return err.problem
    return None


def _nearest_existing(path: pathlib.Path) -> pathlib.Path:
    path = path.absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _probe_writable(folder: pathlib.Path, name) -> None:
    try:
        fd, probe = tempfile.mkstemp(prefix=".label_reg-write-check-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        where = "" if folder == pathlib.Path(name).absolute() else f" (in {folder})"
        raise OutputError(name, f"cannot write here{where}: {_os_problem(err)}") from None


def check_output_folder(folder, expected_bytes: int = 0, flag: str = "--output_dir") -> pathlib.Path:
    """Check, before any real work, that outputs can be written into ``folder`` (created later if missing): it is
    not a file, it (when it exists) and the folder its staging copy goes into (its parent, or the nearest existing
    ancestor) accept a new file, and that disk has at least ``expected_bytes`` free. Returns ``folder`` as a Path.
    Raises InputError for a missing name or a file in the way, :class:`OutputError` otherwise."""
    if folder is None or str(folder) == "":
        raise InputError(flag, "is required")
    out = pathlib.Path(folder)
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a directory")
    staging_parent = _nearest_existing(out.parent)
    if not staging_parent.is_dir():
        raise OutputError(out, f"cannot be created: {staging_parent} is not a directory")
    for place in ([out] if out.is_dir() else []) + [staging_parent]:
        _probe_writable(place.absolute(), out)
    if expected_bytes:
        free = shutil.disk_usage(staging_parent).free
        if free < expected_bytes:
            raise OutputError(out, f"not enough free disk space: {free / 1e6:.1f} MB free, the outputs need up to "
                                   f"{expected_bytes / 1e6:.1f} MB")
    return out


def existing_files(folder, names) -> list[str]:
    """Which of ``names`` already exist in ``folder`` (sorted): outputs of an earlier run a new one replaces."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        return []
    return sorted(name for name in names if (folder / name).exists())


def write_image(path, img: sitk.Image) -> None:
    """Write an image atomically (format from the suffix, e.g. ``.nii.gz``), verified before it is renamed."""
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


# ----------------------------------------------------------------------------------------------------------
# Writing slab by slab
# ----------------------------------------------------------------------------------------------------------
_SLAB_KINDS = ("scalar", "stack", "displacement")
_SITK_TYPES = {np.dtype(np.uint8): sitk.sitkUInt8, np.dtype(np.float32): sitk.sitkFloat32,
               np.dtype(np.float64): sitk.sitkFloat64}


class NiftiSlabWriter:
    """Write a ``.nii.gz`` on ``geometry`` slab by slab along z, never holding the whole volume.

    ``kind``:

    * ``"scalar"``: a 3-D image; :meth:`write` takes blocks (nz, Y, X) (``sitk.GetArrayViewFromImage`` order).
    * ``"stack"``: ``channels`` masks as a 4-D file with the channels on the 4th axis (what :func:`read_label`
      reads); blocks (channels, nz, Y, X).
    * ``"displacement"``: an ITK displacement field, world (LPS) mm vectors; blocks (nz, Y, X, 3). The file carries
      NIfTI intent code 1006 (NIFTI_INTENT_DISPVECT) and, as that intent prescribes and ITK and 3D Slicer expect,
      the vectors in RAS: x and y negated on disk, restored by ITK on reading. ``sitk.DisplacementFieldTransform``
      of the file read back maps p to p + disp(p).

    Slabs must come in z order and cover the grid. The header is the one ITK writes for a 1-voxel image with this
    geometry and pixel type (so origin, spacing and direction are stored exactly as ITK stores them), with the sizes
    filled in. NIfTI keeps every channel (or vector component) of a volume contiguous, so each one is compressed as
    its own gzip member and the members are joined at :meth:`close` (a multi-member gzip file, which gzip, zlib and
    ITK read as one stream). The file is written beside ``path``, verified (:func:`verify_nifti`) and only then
    renamed into place; an error leaves nothing behind. Use it as a context manager.
    """

    def __init__(self, path, geometry: Geometry, dtype, kind="scalar", channels=1, compresslevel=6):
        if kind not in _SLAB_KINDS:
            raise ValueError(f"kind must be one of {_SLAB_KINDS}, got {kind!r}")
        self.path = pathlib.Path(path)
        self.geometry = geometry
        self.dtype = np.dtype(dtype).newbyteorder("<")
        if np.dtype(dtype).newbyteorder("=") not in _SITK_TYPES:
            raise ValueError(f"unsupported voxel type {dtype}")
        self.kind = kind
        self.channels = 3 if kind == "displacement" else (int(channels) if kind == "stack" else 1)
        if kind == "stack" and self.channels < 2:
            raise ValueError("a stack needs at least 2 channels (write 1 as kind='scalar')")
        if max(geometry.size) > 32767:
            raise ValueError(f"NIfTI-1 sizes are at most 32767, got {geometry.size}")
        self.compresslevel = int(compresslevel)
        self.z = 0
        self._atomic = None
        self._streams = []
        self._members = []

    # -- context ---------------------------------------------------------------------------------------------
    def __enter__(self):
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        try:
            header = self._header()
            self._members = [self._tmp] + [self._tmp.with_name(f"{self._tmp.name}.part{c}")
                                           for c in range(1, self.channels)]
            self._streams = [gzip.open(m, "wb", compresslevel=self.compresslevel) for m in self._members]
            self._streams[0].write(header)
        except BaseException as err:
            self._abort(err)
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self.close()
            except BaseException as err:
                self._abort(err)
                raise
            return False
        self._abort(exc)
        return False

    def _abort(self, exc):
        for stream in self._streams:
            with contextlib.suppress(Exception):
                stream.close()
        self._streams = []
        for member in self._members[1:]:
            with contextlib.suppress(OSError):
                member.unlink()
        if self._atomic is not None:
            atomic, self._atomic = self._atomic, None
            try:
                atomic.__exit__(type(exc), exc, None)
            except BaseException:
                pass  # the caller re-raises the original (or converted) error

    # -- header ----------------------------------------------------------------------------------------------
    def _header(self) -> bytes:
        """The NIfTI-1 header (and empty extension) of this volume, through ITK."""
        pixel = _SITK_TYPES[np.dtype(self.dtype).newbyteorder("=")]
        if self.kind == "displacement":
            tiny = sitk.Image([1, 1, 1], sitk.sitkVectorFloat64 if pixel == sitk.sitkFloat64 else
                              sitk.sitkVectorFloat32, 3)
        else:
            tiny = sitk.Image([1, 1, 1], pixel)
        tiny.SetSpacing(self.geometry.spacing)
        tiny.SetOrigin(self.geometry.origin)
        tiny.SetDirection(self.geometry.direction)
        if self.kind == "stack":
            tiny = sitk.JoinSeries([tiny] * self.channels)
        probe = self._tmp.with_name(f"{self._tmp.name}.header.nii")
        try:
            sitk.WriteImage(tiny, str(probe), useCompression=False)
            data = probe.read_bytes()
        except RuntimeError as err:
            raise OutputError(self.path, f"cannot write image ({_short_itk_message(err)})") from None
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()
        if len(data) < 352 or struct.unpack("<i", data[:4])[0] != 348:
            raise OutputError(self.path, "cannot write image (unexpected NIfTI header from ITK)")
        header = bytearray(data[:int(struct.unpack("<f", data[108:112])[0])])
        dim = list(struct.unpack("<8h", header[40:56]))
        dim[1:4] = self.geometry.size
        header[40:56] = struct.pack("<8h", *dim)
        if self.kind == "displacement":
            header[68:70] = struct.pack("<h", NIFTI_INTENT_DISPVECT)
        return bytes(header)

    # -- data ------------------------------------------------------------------------------------------------
    def write(self, block) -> None:
        """Append the next slab: (nz, Y, X) for ``scalar``, (channels, nz, Y, X) for ``stack``, (nz, Y, X, 3) in
        LPS mm for ``displacement``."""
        block = np.asarray(block)
        X, Y, Z = self.geometry.size
        if self.kind == "scalar":
            planes = [block]
        elif self.kind == "stack":
            planes = list(block)
        else:
            planes = [-block[..., 0], -block[..., 1], block[..., 2]]  # LPS -> RAS for the DISPVECT intent
        if len(planes) != self.channels or any(p.ndim != 3 or p.shape[1:] != (Y, X) for p in planes):
            raise ValueError(f"slab shape {block.shape} does not fit a {self.kind} on a {self.geometry.size} grid")
        nz = planes[0].shape[0]
        if self.z + nz > Z:
            raise ValueError(f"slabs cover {self.z + nz} slices, the grid has {Z}")
        try:
            for stream, plane in zip(self._streams, planes):
                stream.write(np.ascontiguousarray(plane, dtype=self.dtype).tobytes())
        except OSError as err:
            raise OutputError(self.path, f"cannot write ({_os_problem(err)})") from None
        self.z += nz

    def close(self) -> None:
        """Join the members, verify the file and rename it into place."""
        if self._atomic is None:
            return
        if self.z != self.geometry.size[2]:
            raise ValueError(f"slabs cover {self.z} of {self.geometry.size[2]} slices")
        try:
            for stream in self._streams:
                stream.close()
            self._streams = []
            with open(self._tmp, "ab") as out:
                for member in self._members[1:]:
                    with open(member, "rb") as part:
                        shutil.copyfileobj(part, out, _CHUNK_BYTES)
                    member.unlink()
        except OSError as err:
            raise OutputError(self.path, f"cannot write ({_os_problem(err)})") from None
        verify_nifti(self._tmp, self.path)
        atomic, self._atomic = self._atomic, None
        atomic.__exit__(None, None, None)


def write_displacement_field(path, disp_mm, geometry: Geometry) -> None:
    """Write an ITK displacement field: ``disp_mm`` (X, Y, Z, 3) world-space vectors in mm on ``geometry``,
    stored as float64 3-vectors with NIfTI intent code 1006 (see :class:`NiftiSlabWriter`).
    ``sitk.DisplacementFieldTransform`` of the file maps p to p + disp(p)."""
    disp = np.asarray(disp_mm, dtype=np.float64)
    if disp.ndim != 4 or disp.shape[-1] != 3 or tuple(disp.shape[:3]) != geometry.size:
        raise ValueError(f"displacement field shape {disp.shape} does not match (X, Y, Z, 3) with size "
                         f"{geometry.size}")
    if not np.isfinite(disp).all():
        raise ValueError("displacement field holds NaN/Inf")
    with NiftiSlabWriter(path, geometry, np.float64, kind="displacement") as writer:
        writer.write(disp.transpose(2, 1, 0, 3))


def write_affine_transform(path, matrix, translation_mm, center_mm=(0.0, 0.0, 0.0)) -> None:
    """Write an ITK affine transform file (``.tfm``, text, full float64 precision), atomically and verified by
    reading it back: ``sitk.ReadTransform`` of it maps a world point p (mm) to
    ``matrix @ (p - center_mm) + center_mm + translation_mm``. matrix: (3, 3); translation_mm, center_mm: (3,)."""
    matrix = np.asarray(matrix, np.float64)
    translation = np.asarray(translation_mm, np.float64).reshape(-1)
    center = np.asarray(center_mm, np.float64).reshape(-1)
    if matrix.shape != (3, 3) or translation.shape != (3,) or center.shape != (3,):
        raise ValueError(f"affine transform needs a (3, 3) matrix and 3-vectors, got {matrix.shape}, "
                         f"{translation.shape}, {center.shape}")
    if not (np.isfinite(matrix).all() and np.isfinite(translation).all() and np.isfinite(center).all()):
        raise ValueError("affine transform holds NaN/Inf")
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple(float(v) for v in matrix.ravel()))
    transform.SetCenter(tuple(float(v) for v in center))
    transform.SetTranslation(tuple(float(v) for v in translation))
    target = pathlib.Path(path)
    with atomic_path(target) as tmp:
        try:
            sitk.WriteTransform(transform, str(tmp))
            back = sitk.ReadTransform(str(tmp))
        except RuntimeError as err:
            raise OutputError(target, f"cannot write transform ({_short_itk_message(err)})") from None
        same = (np.allclose(back.GetParameters(), transform.GetParameters(), rtol=1e-12, atol=1e-12)
                and np.allclose(back.GetFixedParameters(), transform.GetFixedParameters(), rtol=1e-12, atol=1e-12))
        if back.GetName() != "AffineTransform" or not same:
            raise OutputError(target, "write failed: the transform reads back different")


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
