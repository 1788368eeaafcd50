"""The paper's pre-processing (section 2.3.2 and the coarse pre-alignment of 2.1), keeping physical geometry.

Given an MR (moving) and a TRUS (fixed) volume with their masks:

1. **Anchor.** The TRUS point the MR gland is put on, by ``config.prealign``: ``trus_centre`` (the paper) is the
   TRUS volume centre (the world point of continuous index (size - 1) / 2); ``trus_gland`` is the centre of mass of
   the TRUS gland, given by the caller as ``fixed_centre_mm`` (at test time the segmenter's estimate,
   :mod:`label_reg.segmenter`) or, when not given, computed from the TRUS gland mask (training, with masks).
2. **Crop grid.** ``config.shape`` voxels at ``config.spacing_mm`` isotropic, with the TRUS image's direction,
   centred on the anchor. This grid lives in TRUS world space, so every output can be written back there.
3. **Coarse pre-alignment.** The MR is translated (no rotation) so that the centre of mass of its gland mask
   (channel 0, world mm) lands on the anchor: ``t = com_MR - anchor`` and the MR value at crop-grid world point p
   is ``MR(p + t)``.
4. **Resampling**, once, from each original grid straight onto the crop grid (equivalent to "resample to
   0.88 mm, translate, resample onto the TRUS grid, crop", without interpolating twice): images with cubic
   B-spline, masks with linear interpolation then ``>= 0.5``. Outside a source's field of view the output is
   0 (zero padding where the TRUS is smaller than the crop).
5. **Intensities.** Each image is clipped to [its minimum, its ``clip_percentile`` percentile] (both computed over
   its original voxels; B-spline ringing below the minimum is clamped too) and scaled linearly to [0, 1].
6. **Signed distance maps** of the gland masks on the crop grid: Euclidean, mm, positive outside, negative
   inside. Boundary convention: the surface lies halfway between an inside and an outside voxel centre, i.e. an
   outside voxel holds (distance to the nearest inside voxel centre) - s/2 and an inside voxel holds
   -((distance to the nearest outside voxel centre) - s/2), s the (smallest) grid spacing. No voxel is exactly 0.

Arrays are float32 in ITK index order (x, y, z), labels (X, Y, Z, K) channels last, channel 0 = gland.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from label_reg import io as lio
from label_reg.errors import InputError

__all__ = [
    "PreprocessConfig", "Preprocessed", "preprocess_images", "preprocess_pair", "crop_grid",
    "gland_centre_of_mass", "resample_image", "resample_labels", "intensity_range", "normalise_intensity",
    "signed_distance_map", "prealignment_warnings",
]

THRESHOLD = 0.5
PREALIGN_MODES = ("trus_centre", "trus_gland")


# ------------------------------------------------------------------------------------------------ config
@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """``spacing_mm``: isotropic voxel size of the crop grid; ``shape``: crop size (x, y, z) in voxels;
    ``clip_percentile``: upper intensity clip, percent of each image's original voxels; ``prealign``: the TRUS
    anchor of the coarse pre-alignment, ``trus_centre`` (the paper) or ``trus_gland`` (see the module docstring)."""

    spacing_mm: float = 0.88
    shape: tuple = (96, 96, 80)
    clip_percentile: float = 99.0
    prealign: str = "trus_centre"

    def __post_init__(self):
        spacing = float(self.spacing_mm)
        if not (math.isfinite(spacing) and spacing > 0):
            raise ValueError(f"spacing_mm must be finite and positive, got {self.spacing_mm!r}")
        shape = tuple(int(v) for v in self.shape)
        if len(shape) != 3 or any(v < 1 for v in shape) or any(int(v) != v for v in self.shape):
            raise ValueError(f"shape must be 3 positive integers, got {self.shape!r}")
        pct = float(self.clip_percentile)
        if not (0.0 < pct <= 100.0):
            raise ValueError(f"clip_percentile must be in (0, 100], got {self.clip_percentile!r}")
        object.__setattr__(self, "spacing_mm", spacing)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "clip_percentile", pct)
        if self.prealign not in PREALIGN_MODES:
            raise ValueError(f"prealign must be one of {', '.join(PREALIGN_MODES)}, got {self.prealign!r}")

    def to_dict(self) -> dict:
        return {"spacing_mm": self.spacing_mm, "shape": list(self.shape), "clip_percentile": self.clip_percentile,
                "prealign": self.prealign}

    @classmethod
    def from_dict(cls, d, source="preprocess config") -> "PreprocessConfig":
        """Inverse of :meth:`to_dict`; checks keys and types (never evaluates anything). Missing keys take
        their defaults; problems raise InputError(source, ...)."""
        if not isinstance(d, dict):
            raise InputError(source, f"preprocess config must be a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(source, f"unknown preprocess config key(s) {unknown}; expected {sorted(known)}")

        def number(key):
            v = d[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise InputError(source, f"preprocess '{key}' must be a number, got {v!r}")
            return v

        kwargs = {}
        for key in ("spacing_mm", "clip_percentile"):
            if key in d:
                kwargs[key] = number(key)
        if "prealign" in d:  # absent in model directories written before it existed: the paper's trus_centre
            if not isinstance(d["prealign"], str):
                raise InputError(source, f"preprocess 'prealign' must be a string, got {d['prealign']!r}")
            kwargs["prealign"] = d["prealign"]
        if "shape" in d:
            v = d["shape"]
            if (not isinstance(v, (list, tuple)) or len(v) != 3
                    or any(isinstance(x, bool) or not isinstance(x, int) for x in v)):
                raise InputError(source, f"preprocess 'shape' must be a list of 3 integers, got {v!r}")
            kwargs["shape"] = tuple(v)
        try:
            return cls(**kwargs)
        except ValueError as err:
            raise InputError(source, str(err)) from None


# ------------------------------------------------------------------------------------------------ result
_ARRAY_FIELDS = ("moving_image", "fixed_image", "moving_label", "fixed_label", "moving_sdm", "fixed_sdm")
_OPTIONAL = ("fixed_label", "fixed_sdm")


@dataclasses.dataclass
class Preprocessed:
    """Pre-processed pair on the crop grid. Arrays float32, (x, y, z) or (X, Y, Z, K); ``grid`` is the crop grid
    in TRUS world space; ``translation_mm`` (3,) the pre-alignment t (MR point = crop-grid point + t)."""

    moving_image: np.ndarray
    fixed_image: np.ndarray
    moving_label: np.ndarray
    fixed_label: np.ndarray | None
    moving_sdm: np.ndarray | None  # None only from preprocess_images(..., sdm=False)
    fixed_sdm: np.ndarray | None
    grid: lio.Geometry
    translation_mm: np.ndarray

    def to_arrays(self) -> dict:
        """Plain numpy arrays only (``np.savez`` stores them without pickles); None fields are left out."""
        out = {k: getattr(self, k) for k in _ARRAY_FIELDS if getattr(self, k) is not None}
        out.update({
            "grid_size": np.asarray(self.grid.size, dtype=np.int64),
            "grid_spacing": np.asarray(self.grid.spacing, dtype=np.float64),
            "grid_origin": np.asarray(self.grid.origin, dtype=np.float64),
            "grid_direction": np.asarray(self.grid.direction, dtype=np.float64),
            "translation_mm": np.asarray(self.translation_mm, dtype=np.float64),
        })
        return out

    @classmethod
    def from_arrays(cls, d, source="pre-processed arrays") -> "Preprocessed":
        """Inverse of :meth:`to_arrays` (accepts a dict or an ``np.load`` result); checks shapes."""
        def get(key, required=True):
            if key not in d:
                if required:
                    raise InputError(source, f"missing array '{key}'")
                return None
            return np.asarray(d[key])

        try:
            grid = lio.Geometry(tuple(int(v) for v in get("grid_size")), get("grid_spacing"),
                                get("grid_origin"), get("grid_direction"))
        except (ValueError, TypeError) as err:
            raise InputError(source, f"bad crop grid: {err}") from None
        arrays = {}
        for key in _ARRAY_FIELDS:
            arr = get(key, required=key not in _OPTIONAL)
            if arr is not None:
                ndim = 4 if key.endswith("label") else 3
                if arr.ndim != ndim or tuple(arr.shape[:3]) != grid.size:
                    raise InputError(source, f"array '{key}' has shape {arr.shape}, expected {grid.size}"
                                             + (" + (K,)" if ndim == 4 else ""))
                arr = arr.astype(np.float32, copy=False)
            arrays[key] = arr
        t = get("translation_mm").astype(np.float64)
        if t.shape != (3,):
            raise InputError(source, f"translation_mm has shape {t.shape}, expected (3,)")
        return cls(grid=grid, translation_mm=t, **arrays)


# ------------------------------------------------------------------------------------------------ steps
def crop_grid(fixed, config: PreprocessConfig = PreprocessConfig(), centre_mm=None) -> lio.Geometry:
    """The crop grid for a TRUS image (or its Geometry): ``config.shape`` voxels at ``config.spacing_mm``,
    the TRUS direction, centred on ``centre_mm`` (world mm, (3,); default the TRUS volume centre)."""
    geo = fixed if isinstance(fixed, lio.Geometry) else lio.Geometry.from_image(fixed)
    spacing = (config.spacing_mm,) * 3
    half = (np.asarray(config.shape, dtype=np.float64) - 1.0) / 2.0 * config.spacing_mm
    centre = geo.center_world if centre_mm is None else np.asarray(centre_mm, dtype=np.float64).reshape(3)
    origin = centre - geo.direction_matrix @ half
    return lio.Geometry(config.shape, spacing, tuple(origin.tolist()), geo.direction)


def gland_centre_of_mass(mask: sitk.Image, source="moving label") -> np.ndarray:
    """World position (mm, (3,)) of the centre of mass of a binary mask (voxels >= 0.5)."""
    arr = sitk.GetArrayViewFromImage(mask)  # (z, y, x)
    idx_zyx = np.argwhere(arr >= THRESHOLD)
    if idx_zyx.size == 0:
        raise InputError(source, "prostate gland mask (channel 0) is empty")
    return lio.Geometry.from_image(mask).index_to_world(idx_zyx[:, ::-1].mean(axis=0))


def _resample(img, grid, translation_mm, interpolator, default, pixel_type):
    transform = sitk.TranslationTransform(3, [float(v) for v in translation_mm])
    return sitk.Resample(img, list(grid.size), transform, interpolator, list(grid.origin), list(grid.spacing),
                         list(grid.direction), float(default), pixel_type)


def resample_image(img: sitk.Image, grid: lio.Geometry, translation_mm=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Cubic B-spline resampling of ``img`` onto ``grid`` (value at grid point p = img(p + t)), float32 (x, y, z).
    Points outside the source's field of view get the image minimum (0 after :func:`normalise_intensity`),
    and ringing below the minimum is clamped to it."""
    if img.GetPixelID() != sitk.sitkFloat32:
        img = sitk.Cast(img, sitk.sitkFloat32)  # (a Cast copies even to the same type: 4 bytes a voxel saved)
    lo = float(np.min(sitk.GetArrayViewFromImage(img)))
    out = _resample(img, grid, translation_mm, sitk.sitkBSpline, lo, sitk.sitkFloat32)
    return np.maximum(lio.to_array(out), lo)


def resample_labels(channels, grid: lio.Geometry, translation_mm=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Linear resampling of K mask channels onto ``grid`` then ``>= 0.5``: float32 0/1 array (X, Y, Z, K).
    Zero outside the source's field of view."""
    channels = [sitk.Cast(c, sitk.sitkFloat32) for c in channels]
    vec = channels[0] if len(channels) == 1 else sitk.Compose(channels)
    out = _resample(vec, grid, translation_mm, sitk.sitkLinear, 0.0,
                    sitk.sitkFloat32 if len(channels) == 1 else sitk.sitkVectorFloat32)
    arr = sitk.GetArrayViewFromImage(out)  # (z, y, x) or (z, y, x, K)
    arr = arr[..., None] if len(channels) == 1 else arr
    return np.ascontiguousarray((arr >= THRESHOLD).transpose(2, 1, 0, 3), dtype=np.float32)


def intensity_range(img: sitk.Image, percentile: float = 99.0, source="image") -> tuple[float, float]:
    """(minimum, ``percentile`` percentile) of the image's voxels; InputError if the image is constant."""
    arr = sitk.GetArrayViewFromImage(img)
    lo = float(arr.min())
    hi = float(np.percentile(arr, percentile))
    if not hi > lo:
        hi = float(arr.max())
        if not hi > lo:
            raise InputError(source, f"image is constant (all voxels {lo:g}); cannot normalise intensities")
    return lo, hi


def normalise_intensity(arr, lo: float, hi: float) -> np.ndarray:
    """Clip to [lo, hi] and scale linearly to [0, 1] (float32)."""
    out = (np.clip(np.asarray(arr, dtype=np.float32), lo, hi) - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def signed_distance_map(mask, spacing) -> np.ndarray:
    """Euclidean signed distance (mm, float32) of a binary mask (X, Y, Z): positive outside, negative inside.

    The surface is taken halfway between inside and outside voxel centres: outside voxels hold the distance to
    the nearest inside voxel centre minus s/2, inside voxels minus (the distance to the nearest outside voxel
    centre minus s/2), with s = min(spacing). A mask that fills the whole grid measures inside distances to
    the grid's border (everything beyond the grid counts as outside). An empty mask raises ValueError.
    """
    mask = np.asarray(mask) >= THRESHOLD
    if not mask.any():
        raise ValueError("signed_distance_map: the mask is empty")
    spacing = tuple(float(s) for s in spacing)
    half = 0.5 * min(spacing)
    d_out = ndimage.distance_transform_edt(~mask, sampling=spacing)
    if mask.all():
        d_in = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    else:
        d_in = ndimage.distance_transform_edt(mask, sampling=spacing)
    return np.where(mask, half - d_in, d_out - half).astype(np.float32)


# ------------------------------------------------------------------------------------------------ pipeline
def _source(img, names, key):
    if names and names.get(key):
        return str(names[key])
    if isinstance(img, sitk.Image) and img.HasMetaDataKey(lio.SOURCE_KEY):
        return img.GetMetaData(lio.SOURCE_KEY)
    return key.replace("_", " ")


def _as_channels(labels):
    return [labels] if isinstance(labels, sitk.Image) else list(labels)


def _check_labels(channels, image, label_name, image_name):
    if not channels:
        raise InputError(label_name, "holds no label channels; channel 0 must be the prostate gland")
    geo = lio.Geometry.from_image(image)
    for k, ch in enumerate(channels):
        if ch.GetDimension() != 3:
            raise InputError(label_name, f"label channel {k} is {ch.GetDimension()}-D; expected 3-D")
        ch_geo = lio.Geometry.from_image(ch)
        if not ch_geo.allclose(geo):
            raise InputError(label_name, f"label geometry does not match image {image_name}: "
                                         f"{ch_geo.describe_difference(geo)} (label vs image)")


def preprocess_images(mr_image: sitk.Image, mr_labels, us_image: sitk.Image, us_labels=None,
                      config: PreprocessConfig = PreprocessConfig(), *, names=None, sdm=True,
                      fixed_centre_mm=None) -> Preprocessed:
    """Pre-process one MR/TRUS pair given as SimpleITK images.

    ``mr_labels`` / ``us_labels``: list of K 3-D channel images (channel 0 = gland) on their image's grid, or one
    image; ``us_labels`` may be None (registration time). ``names`` optionally maps ``moving_image``,
    ``moving_label``, ``fixed_image``, ``fixed_label`` to file names for error messages. ``sdm=False`` skips the
    signed distance maps (``moving_sdm``/``fixed_sdm`` are None): registration needs none, and each costs about
    0.1 s at 96x96x80; such a result is for inference only (training and the cache need the maps).
    ``fixed_centre_mm`` (3,) world mm: the TRUS gland centre for ``config.prealign == "trus_gland"`` (e.g. the
    segmenter's estimate); without it that mode takes the centre of mass of ``us_labels`` channel 0. It is an
    error to pass it in ``trus_centre`` mode.
    """
    mr_name, us_name = _source(mr_image, names, "moving_image"), _source(us_image, names, "fixed_image")
    mr_label_name, us_label_name = _source(None, names, "moving_label"), _source(None, names, "fixed_label")
    for img, name in ((mr_image, mr_name), (us_image, us_name)):
        if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(name, f"expected a 3-D scalar image, got {img.GetDimension()}-D with "
                                   f"{img.GetNumberOfComponentsPerPixel()} component(s)")
    mr_channels = _as_channels(mr_labels) if mr_labels is not None else []
    _check_labels(mr_channels, mr_image, mr_label_name, mr_name)
    us_channels = None
    if us_labels is not None:
        us_channels = _as_channels(us_labels)
        _check_labels(us_channels, us_image, us_label_name, us_name)

    if config.prealign == "trus_gland":
        if fixed_centre_mm is None:
            if us_channels is None:
                raise ValueError("prealign 'trus_gland' needs fixed_centre_mm (the segmenter's estimate) or the "
                                 "TRUS gland mask")
            fixed_centre_mm = gland_centre_of_mass(us_channels[0], us_label_name)
        anchor = np.asarray(fixed_centre_mm, dtype=np.float64).reshape(3)
        if not np.isfinite(anchor).all():
            raise ValueError(f"fixed_centre_mm must be finite, got {fixed_centre_mm!r}")
    elif fixed_centre_mm is not None:
        raise ValueError("fixed_centre_mm is only used with prealign 'trus_gland'")
    else:
        anchor = None
    grid = crop_grid(us_image, config, anchor)
    com = gland_centre_of_mass(mr_channels[0], mr_label_name)
    translation = com - grid.center_world
    anchor_name = "TRUS centre" if anchor is None else "TRUS gland centre"
    spacing = grid.spacing

    mr_range = intensity_range(mr_image, config.clip_percentile, mr_name)
    us_range = intensity_range(us_image, config.clip_percentile, us_name)
    moving_image = normalise_intensity(resample_image(mr_image, grid, translation), *mr_range)
    fixed_image = normalise_intensity(resample_image(us_image, grid), *us_range)

    moving_label = resample_labels(mr_channels, grid, translation)
    if not moving_label[..., 0].any():
        raise InputError(mr_label_name, "prostate gland mask is empty after resampling onto the crop grid "
                                        "(is it a few isolated voxels?)")
    moving_sdm = signed_distance_map(moving_label[..., 0], spacing) if sdm else None
    fixed_label = fixed_sdm = None
    if us_channels is not None:
        fixed_label = resample_labels(us_channels, grid)
        if not fixed_label[..., 0].any():
            raise InputError(us_label_name, f"prostate gland mask lies outside the crop around the {anchor_name} "
                                            f"({'x'.join(map(str, config.shape))} voxels at {config.spacing_mm:g} mm)")
        fixed_sdm = signed_distance_map(fixed_label[..., 0], spacing) if sdm else None
    return Preprocessed(moving_image=moving_image, fixed_image=fixed_image, moving_label=moving_label,
                        fixed_label=fixed_label, moving_sdm=moving_sdm, fixed_sdm=fixed_sdm, grid=grid,
                        translation_mm=np.asarray(translation, dtype=np.float64))


def prealignment_warnings(mr_gland: sitk.Image, translation_mm, us_image, source="moving label") -> list[str]:
    """One-line warnings about a pre-alignment that is probably wrong (the run goes on; ``register`` prints them and
    records them in ``registration.json``):

    * the MR gland mask (``mr_gland``, channel 0) touches the MR image's border: the gland is probably cut off (or
      the mask is a stray blob), which moves its centre of mass and with it the pre-alignment;
    * the pre-alignment shift ``|t|`` (mm) is larger than the TRUS field of view (its largest extent in mm,
      ``us_image`` a sitk image or Geometry): the MR gland centre lands on the TRUS centre only after a move the
      TRUS volume could not even contain.
    """
    warnings = []
    arr = sitk.GetArrayViewFromImage(mr_gland)  # (z, y, x)
    faces = (arr[0], arr[-1], arr[:, 0], arr[:, -1], arr[:, :, 0], arr[:, :, -1])
    if any(bool((face >= THRESHOLD).any()) for face in faces):
        warnings.append(f"{source}: the gland mask touches the MR image border; the gland may be cut off (or the "
                        "mask misplaced), which shifts its centre of mass and the pre-alignment")
    geo = us_image if isinstance(us_image, lio.Geometry) else lio.Geometry.from_image(us_image)
    fov = float(np.max(np.asarray(geo.size, np.float64) * np.asarray(geo.spacing)))
    shift = float(np.linalg.norm(translation_mm))
    if shift > fov:
        warnings.append(f"{source}: the pre-alignment shift ({shift:.0f} mm) is larger than the TRUS field of view "
                        f"({fov:.0f} mm); check that the MR gland mask and the two images belong together")
    return warnings


def preprocess_pair(pair, config: PreprocessConfig = PreprocessConfig(), fixed_centre_mm=None) -> Preprocessed:
    """Read a :class:`label_reg.datasets.Pair` through :mod:`label_reg.io` and pre-process it.
    ``pair.fixed_label`` may be None; ``fixed_centre_mm`` as in :func:`preprocess_images`."""
    mr = lio.read_image(pair.moving_image)
    mr_labels = lio.read_label(pair.moving_label, reference=mr)
    us = lio.read_image(pair.fixed_image)
    us_labels = None
    if getattr(pair, "fixed_label", None) is not None:
        us_labels = lio.read_label(pair.fixed_label, reference=us)
    names = {"moving_image": pair.moving_image, "moving_label": pair.moving_label,
             "fixed_image": pair.fixed_image, "fixed_label": getattr(pair, "fixed_label", None)}
    return preprocess_images(mr, mr_labels, us, us_labels, config, names=names, fixed_centre_mm=fixed_centre_mm)
