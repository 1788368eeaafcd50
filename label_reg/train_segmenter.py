"""Training the TRUS gland segmenter (:mod:`label_reg.segmenter`) as a :class:`label_reg.trainer.Task`
(:data:`SEGMENTER`), with the same pipeline, augmentation, strategy, checkpoints, resume, best-model selection,
TensorBoard logs and progress bar as registration training (:class:`label_reg.trainer.Trainer`).

* Data: the fixed (TRUS) image and its gland mask (label channel 0) of every training pair, resampled onto the
  segmenter grid around the TRUS volume centre (:func:`label_reg.segmenter.segmenter_inputs`), cached on disk like
  registration cases. No new annotation: every registration training pair has the TRUS gland mask.
* Loss: :func:`label_reg.losses.segmentation_loss` (soft Dice + cross-entropy) of the predicted probability map.
* Validation every ``validate_every`` steps: median Dice of the cleaned-up mask (largest component of p >= 0.5)
  against the true gland on the segmenter grid, and the median and largest distance (mm) between its centre of mass
  and the true gland's (computed on the original TRUS label file). The best validation Dice is kept. The baseline
  (``coarse`` in the summary) is the distance from the TRUS volume centre (the paper's anchor) to the true gland.
"""
import dataclasses

import numpy as np

from label_reg import io as lio
from label_reg import model_dir, segmenter
from label_reg.preprocess import PreprocessConfig, gland_centre_of_mass
from label_reg.trainer import RunConfig, Task, Trainer, cached_cases, load_split, option

__all__ = ["SegmenterConfig", "SEGMENTER", "segmenter_case", "load_segmenter_cases", "train_segmenter"]

KEYS = ("fixed_image", "fixed_label")
_GRID = segmenter.DEFAULT_GRID


@dataclasses.dataclass
class SegmenterConfig(RunConfig):
    """Everything a segmenter training run depends on (field names are the ``label-reg train-segmenter`` flags).
    The grid fields describe the segmenter's view of the whole TRUS volume, not a registration crop."""
    learning_rate: float = option(1e-3, "Adam learning rate.")
    batch_size: int = option(4, "Global batch size (split over replicas).")
    num_steps: int = option(3000, "Training iterations.")
    spacing_mm: float = option(_GRID.spacing_mm, "Isotropic voxel size of the segmenter grid in mm.")
    shape: tuple = option(_GRID.shape, "Segmenter grid x,y,z in voxels, centred on the TRUS volume centre; make "
                                       "it cover the whole TRUS field of view.")
    base_filters: int = option(8, "Filters at the first U-Net level (doubled per level).")
    validate_every: int = option(250, "Validate (and keep the best model) every N steps.")
    checkpoint_every: int = option(250, "Checkpoint every N steps.")

    def build_args(self):
        return {"image_shape": tuple(int(n) for n in self.shape), "base_filters": int(self.base_filters)}


# ------------------------------------------------------------------------------------------------ cases
def segmenter_case(pair, grid_config: PreprocessConfig):
    """One pair's TRUS side on the segmenter grid, as plain arrays (cacheable): ``fixed_image`` (X, Y, Z),
    ``fixed_label`` (X, Y, Z, 1), ``grid_*`` (the grid's geometry) and ``fixed_centre_mm`` (3,), the true gland's
    centre of mass in TRUS world mm from the original label file."""
    us = lio.read_image(pair.fixed_image)
    labels = lio.read_label(pair.fixed_label, reference=us, reference_name=str(pair.fixed_image))
    view = segmenter.segmenter_inputs(us, labels[:1], grid_config, str(pair.fixed_image))
    grid = view["grid"]
    return {"fixed_image": view["fixed_image"], "fixed_label": view["fixed_label"],
            "grid_size": np.asarray(grid.size, np.int64), "grid_spacing": np.asarray(grid.spacing, np.float64),
            "grid_origin": np.asarray(grid.origin, np.float64),
            "grid_direction": np.asarray(grid.direction, np.float64),
            "fixed_centre_mm": gland_centre_of_mass(labels[0], str(pair.fixed_label)),
            "volume_centre_mm": lio.Geometry.from_image(us).center_world}


def case_grid(case):
    return lio.Geometry(tuple(int(v) for v in case["grid_size"]), case["grid_spacing"], case["grid_origin"],
                        case["grid_direction"])


def load_segmenter_cases(pairs, grid_config, cache_dir="", progress=True):
    """:func:`segmenter_case` for each pair, cached on disk when ``cache_dir`` is set (its own keys: the segmenter
    grid settings, never confused with registration cases)."""
    return cached_cases(pairs, lambda pair: segmenter_case(pair, grid_config),
                        {"kind": "segmenter", **grid_config.to_dict()}, cache_dir, progress, "segmenter grid")


# ------------------------------------------------------------------------------------------------ the task
def build_model(config):
    return segmenter.build_segmenter(**config.build_args())


def loss_terms(batch, probability, config):
    """Per-sample (B,) ``total`` (:func:`label_reg.losses.segmentation_loss`) and ``dsc`` (hard Dice at 0.5,
    monitoring only) of the probability map (B, X, Y, Z, 1) against the batch's ``fixed_label``."""
    import tensorflow as tf

    from label_reg.losses import segmentation_loss, soft_dice
    label = batch["fixed_label"]
    return {"total": segmentation_loss(label, probability),
            "dsc": soft_dice(label, tf.cast(probability >= 0.5, probability.dtype))}


def validate(predictor, cases, config):
    """Median Dice of the cleaned-up mask and median / largest centre error (mm) over ``cases``; ``predictor=None``
    scores the TRUS volume centre as the gland centre (the paper's anchor; Dice NaN)."""
    dscs, errors = [], []
    for case in cases:
        if predictor is None:
            dscs.append(float("nan"))
            errors.append(float(np.linalg.norm(np.asarray(case["volume_centre_mm"]) - case["fixed_centre_mm"])))
            continue
        estimate = segmenter.estimate_gland(predictor.predict(case)[..., 0], case_grid(case))
        dsc, error = segmenter.gland_error(estimate, np.asarray(case["fixed_label"])[..., 0], case["fixed_centre_mm"])
        dscs.append(dsc)
        errors.append(error)
    errors = np.asarray(errors, np.float64)
    finite = errors[np.isfinite(errors)]
    return {"dsc": float(np.nanmedian(dscs)) if np.isfinite(dscs).any() else float("nan"),
            "centre_error_mm": float(np.median(finite)) if finite.size else float("nan"),
            "centre_error_max_mm": float(finite.max()) if finite.size else float("nan"),
            "not_found": int(np.sum(~np.isfinite(errors)))}


def save_best(path, model, config, step, result):
    """The segmenter's model directory (:func:`label_reg.model_dir.save`, kind ``segmenter``)."""
    grid = PreprocessConfig(spacing_mm=float(config.spacing_mm), shape=tuple(int(n) for n in config.shape))
    extra = {"best_step": int(step), "validation": result, "training": config.to_json()}
    model_dir.save(path, model, config.build_args(), grid, extra, network=model_dir.SEGMENTER)


def preview(predictor, case):
    """Middle axial slice of the TRUS with the true gland outline (red) and the found gland's (green)."""
    from scipy import ndimage
    image = np.asarray(case["fixed_image"], np.float32)
    truth = np.asarray(case["fixed_label"], np.float32)[..., 0] >= 0.5
    found = segmenter.estimate_gland(predictor.predict(case)[..., 0], case_grid(case)).mask
    z = image.shape[2] // 2
    rgb = np.repeat(np.clip(image[:, :, z, None], 0, 1), 3, axis=-1)
    for mask, colour in ((truth, (1.0, 0.0, 0.0)), (found, (0.0, 1.0, 0.0))):
        m = mask[:, :, z]
        rgb[m & ~ndimage.binary_erosion(m)] = colour
    return {"val/trus_true_red_found_green": np.transpose(rgb, (1, 0, 2)).astype(np.float32)}


SEGMENTER = Task(
    build_model=build_model, keys=KEYS, loss=loss_terms, validate=validate, select="dsc", save=save_best,
    baseline=lambda cases, config: validate(None, cases, config), preview=preview, shown=("dsc",),
    validation_names={"dsc": ("val_dsc", "val/dsc_median"),
                      "centre_error_mm": ("val_centre_mm", "val/centre_error_mm_median")})


def train_segmenter(config):
    """Load the split, put each TRUS volume on the segmenter grid (cached) and train. Returns the summary dict of
    :meth:`label_reg.trainer.Trainer.run`."""
    train_pairs, val_pairs = load_split(config)
    grid = config.preprocess_config()
    train_cases = load_segmenter_cases(train_pairs, grid, config.cache_dir, config.progress)
    val_cases = load_segmenter_cases(val_pairs, grid, config.cache_dir, config.progress)
    return Trainer(SEGMENTER, config, train_cases, val_cases).run()
