"""The TRUS gland segmenter: finds the prostate gland in a whole TRUS volume, so the pre-alignment can put the MR
gland on the *TRUS gland* instead of the TRUS volume centre (SPEC section 2b).

* **Grid.** The segmenter sees the whole TRUS volume: the TRUS image is resampled (cubic B-spline, then the same
  99th-percentile normalisation as registration) onto a grid of ``config.shape`` voxels at ``config.spacing_mm``
  isotropic, with the TRUS direction, centred on the TRUS volume centre (:func:`segmenter_inputs`). The default,
  48x48x40 at 2 mm, covers 96x96x80 mm: the demo TRUS volumes (70x95x66 mm) and the usual clinical sweeps fit in it.
  A TRUS volume larger than the grid is segmented in its central part only (:attr:`GlandEstimate.fov_cropped`).
* **Network** (:func:`build_segmenter`): a 3-D U-Net with three poolings. Encoder level: two Conv3D 3x3x3 ->
  LeakyReLU(0.1) -> BatchNorm; decoder: Conv3DTranspose stride 2, concatenation with the encoder level, one
  conv block; a 1x1x1 sigmoid head. Input ``fixed_image`` (B, X, Y, Z, 1) in [0, 1]; output
  ``gland_probability`` (B, X, Y, Z, 1). Shapes that are not multiples of 8 are padded inside the model.
* **Loss** (:func:`label_reg.losses.segmentation_loss`): soft Dice + binary cross-entropy, per sample.
* **Mask and centre** (:func:`estimate_gland`): the largest connected component (:data:`CONNECTIVITY`, 26) of
  ``p >= 0.5``; its centre of mass in TRUS world mm (LPS) is the point the registration pre-alignment uses.

Arrays are float32 in ITK index order (x, y, z); world coordinates are ITK's LPS millimetres.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from label_reg import io as lio
from label_reg.errors import InputError
from label_reg.preprocess import (THRESHOLD, PreprocessConfig, crop_grid, intensity_range, normalise_intensity,
                                  resample_image, resample_labels)

DEFAULT_GRID = PreprocessConfig(spacing_mm=2.0, shape=(48, 48, 40))
LEVELS = 4  # resolutions 1, 1/2, 1/4, 1/8
INPUT_NAME = "fixed_image"
OUTPUT_NAME = "gland_probability"
CONNECTIVITY = 26  # voxel neighbourhood of the mask clean-up: faces, edges and corners


# ------------------------------------------------------------------------------------------------ inputs
def segmenter_inputs(us_image: sitk.Image, us_labels=None, config: PreprocessConfig = DEFAULT_GRID, source=None):
    """The segmenter's view of one TRUS volume.

    us_image: 3-D TRUS image; us_labels: optional list of label channels (channel 0 = gland) on its grid.
    Returns a dict: ``fixed_image`` (X, Y, Z) float32 in [0, 1], ``fixed_label`` (X, Y, Z, 1) float32 0/1 or
    absent, ``grid`` the :class:`label_reg.io.Geometry` of the segmenter grid in TRUS world space.
    """
    source = source or "fixed image"
    grid = crop_grid(us_image, config)
    lo, hi = intensity_range(us_image, config.clip_percentile, source)
    out = {"fixed_image": normalise_intensity(resample_image(us_image, grid), lo, hi), "grid": grid}
    if us_labels is not None:
        channels = [us_labels] if isinstance(us_labels, sitk.Image) else list(us_labels)
        out["fixed_label"] = resample_labels(channels[:1], grid)
    return out


# ------------------------------------------------------------------------------------------------ network
def _conv(x, filters, kernel, name):
    import keras
    x = keras.layers.Conv3D(filters, kernel, padding="same", name=f"{name}_conv")(x)
    x = keras.layers.LeakyReLU(negative_slope=0.1, name=f"{name}_act")(x)
    from label_reg.network import BN_MOMENTUM
    return keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(x)


def build_segmenter(image_shape=DEFAULT_GRID.shape, base_filters=8, name="label_reg_segmenter"):
    """The segmentation U-Net (module docstring). image_shape: (X, Y, Z) voxels, each >= 8; base_filters: filters
    at full resolution, doubled per level. Returns an uncompiled ``keras.Model`` with one input ``fixed_image``
    (B, X, Y, Z, 1) and one output, the gland probability (B, X, Y, Z, 1); a dict input ``{"fixed_image": x}``
    works too."""
    import keras

    from label_reg.layers import PadEnd
    image_shape = tuple(int(n) for n in image_shape)
    factor = 2 ** (LEVELS - 1)
    if len(image_shape) != 3 or min(image_shape) < factor:
        raise ValueError(f"image_shape must be 3 sizes of at least {factor} voxels, got {image_shape}")
    if int(base_filters) < 1:
        raise ValueError(f"base_filters must be >= 1, got {base_filters}")
    inputs = {INPUT_NAME: keras.Input(shape=image_shape + (1,), name=INPUT_NAME)}
    x = inputs[INPUT_NAME]
    padded = tuple(-(-n // factor) * factor for n in image_shape)
    if padded != image_shape:
        x = PadEnd([p - n for n, p in zip(image_shape, padded)], name="pad_to_8")(x)
    filters = [int(base_filters) * 2 ** level for level in range(LEVELS)]
    skips = []
    for level in range(LEVELS - 1):
        x = _conv(_conv(x, filters[level], 3, f"down{level}a"), filters[level], 3, f"down{level}b")
        skips.append(x)
        x = keras.layers.MaxPooling3D(2, name=f"down{level}_pool")(x)
    x = _conv(x, filters[-1], 3, "bottom")
    for level in reversed(range(LEVELS - 1)):
        x = keras.layers.Conv3DTranspose(filters[level], 4, strides=2, padding="same", name=f"up{level}_tconv")(x)
        x = keras.layers.LeakyReLU(negative_slope=0.1, name=f"up{level}_act")(x)
        x = keras.layers.Concatenate(name=f"up{level}_skip")([x, skips[level]])
        x = _conv(x, filters[level], 3, f"up{level}_merge")
    x = keras.layers.Conv3D(1, 1, activation="sigmoid", name="head")(x)
    if padded != image_shape:
        x = keras.layers.Cropping3D(tuple((0, p - n) for n, p in zip(image_shape, padded)), name="crop_from_8")(x)
    x = keras.layers.Identity(name=OUTPUT_NAME)(x)
    return keras.Model(inputs=inputs, outputs=x, name=name)


# ------------------------------------------------------------------------------------------------ mask, centre
@dataclasses.dataclass
class GlandEstimate:
    """The gland found in one TRUS volume. ``mask`` (X, Y, Z) bool on ``grid`` (the segmenter grid, TRUS world
    space); ``centre_mm`` (3,) its centre of mass, world LPS mm, or None when nothing reached p >= 0.5;
    ``volume_ml``; ``touches_border``: the mask reaches the first or last voxel of the grid along some axis (the
    gland may be cut off, its centre biased); ``fov_cropped``: the TRUS field of view is larger than the grid."""

    mask: np.ndarray
    grid: lio.Geometry
    centre_mm: np.ndarray | None
    volume_ml: float
    touches_border: bool
    fov_cropped: bool = False

    @property
    def found(self):
        return self.centre_mm is not None

    def to_dict(self):
        return {"found": self.found, "centre_mm": None if self.centre_mm is None else [float(v) for v in self.centre_mm],
                "volume_ml": round(float(self.volume_ml), 3), "touches_border": bool(self.touches_border),
                "fov_cropped": bool(self.fov_cropped)}


def largest_component(probability, threshold=THRESHOLD):
    """Boolean mask of the largest :data:`CONNECTIVITY`-connected component of ``probability >= threshold``
    (all False if none)."""
    binary = np.asarray(probability) >= threshold
    labels, count = ndimage.label(binary, structure=ndimage.generate_binary_structure(3, 3))
    if count <= 1:
        return binary
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(np.argmax(sizes))


def estimate_gland(probability, grid: lio.Geometry, fixed_geometry: lio.Geometry | None = None):
    """:class:`GlandEstimate` from a probability map (X, Y, Z) on ``grid``; ``fixed_geometry`` (the TRUS image's)
    only decides ``fov_cropped``."""
    probability = np.asarray(probability, np.float32)
    if probability.shape != tuple(grid.size):
        raise ValueError(f"probability map has shape {probability.shape}, the grid {tuple(grid.size)}")
    mask = largest_component(probability)
    voxel_ml = float(np.prod(grid.spacing)) / 1000.0
    fov_cropped = False
    if fixed_geometry is not None:
        extent = np.asarray(fixed_geometry.size) * np.asarray(fixed_geometry.spacing)
        fov_cropped = bool(np.any(extent > np.asarray(grid.size) * np.asarray(grid.spacing) + 1e-6))
    if not mask.any():
        return GlandEstimate(mask, grid, None, 0.0, False, fov_cropped)
    index = np.argwhere(mask)
    touches = bool(np.any(index.min(axis=0) == 0) or np.any(index.max(axis=0) == np.asarray(mask.shape) - 1))
    return GlandEstimate(mask, grid, grid.index_to_world(index.mean(axis=0)), float(mask.sum()) * voxel_ml,
                         touches, fov_cropped)


def mask_on_image(estimate: GlandEstimate, geometry: lio.Geometry) -> sitk.Image:
    """The estimated gland resampled onto an image grid (linear interpolation of the 0/1 mask, then >= 0.5):
    a uint8 0/1 SimpleITK image with ``geometry``."""
    mask = lio.from_array(estimate.mask.astype(np.float32), estimate.grid)
    out = sitk.Resample(mask, geometry.reference_image(), sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.BinaryThreshold(out, THRESHOLD, 1e30, 1, 0)


def gland_error(estimate: GlandEstimate, true_mask_on_grid, true_centre_mm):
    """(DSC on the segmenter grid, centre-of-mass distance in mm) of an estimate against the true TRUS gland
    (``true_mask_on_grid`` (X, Y, Z) 0/1 on the estimate's grid, ``true_centre_mm`` (3,) world mm). A gland not
    found scores DSC 0 and distance NaN."""
    from label_reg.metrics import dice
    truth = np.asarray(true_mask_on_grid) >= THRESHOLD
    if truth.shape != estimate.mask.shape:
        raise ValueError(f"true mask has shape {truth.shape}, the estimate {estimate.mask.shape}")
    score = float(dice(truth.astype(np.float32), estimate.mask.astype(np.float32)))
    if not estimate.found:
        return score, float("nan")
    return score, float(np.linalg.norm(np.asarray(estimate.centre_mm) - np.asarray(true_centre_mm, np.float64)))


def check_found(estimate: GlandEstimate, source):
    """InputError naming ``source`` (the TRUS file) when the segmenter found no gland at all."""
    if not estimate.found:
        raise InputError(source, "the TRUS gland segmenter found no prostate gland in this volume (no voxel with "
                                 "probability >= 0.5); cannot pre-align on it")
    return estimate


# ------------------------------------------------------------------------------------------------ inference
class GlandFinder:
    """A trained segmenter ready to find the gland in raw TRUS volumes (any size, spacing, orientation).

    ``GlandFinder.from_model_dir(path)`` loads a segmenter model directory (:mod:`label_reg.model_dir`, kind
    ``segmenter``; batch norm folded) through the one inference path (:class:`label_reg.predictor.Predictor`);
    :meth:`find` returns a :class:`GlandEstimate`, :meth:`probability` the raw probability map and its grid.
    """

    def __init__(self, predictor):
        self.predictor = predictor
        self.grid_config = predictor.preprocess_config or PreprocessConfig(spacing_mm=DEFAULT_GRID.spacing_mm,
                                                                           shape=predictor.image_shape)
        if tuple(self.grid_config.shape) != tuple(predictor.image_shape):
            raise ValueError(f"segmenter grid {self.grid_config.shape} differs from its input {predictor.image_shape}")

    @classmethod
    def from_model_dir(cls, path):
        from label_reg.predictor import Predictor
        return cls(Predictor.from_model_dir(path, folded=True, batch_size=1))

    @property
    def model_dir(self):
        return self.predictor.model_dir

    def probability(self, us_image: sitk.Image, source=None):
        """(probability (X, Y, Z) float32 on the segmenter grid, the grid's Geometry) for a TRUS image."""
        view = segmenter_inputs(us_image, None, self.grid_config, source)
        return self.predictor.predict(view)[..., 0], view["grid"]

    def find(self, us_image: sitk.Image, source=None) -> GlandEstimate:
        """The gland in a TRUS image: largest component of p >= 0.5, its world centre, border contact."""
        probability, grid = self.probability(us_image, source)
        return estimate_gland(probability, grid, lio.Geometry.from_image(us_image))
