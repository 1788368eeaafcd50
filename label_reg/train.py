"""Training the registration network: its configuration, loss, validation and model directory, as a
:class:`label_reg.trainer.Task` (:data:`REGISTRATION`) that :class:`label_reg.trainer.Trainer` runs.

* Loss (:func:`loss_terms`): the network's DDF warps the moving gland mask (zero boundary) and, when ``beta > 0``,
  the moving SDM (replicate); :func:`label_reg.losses.registration_loss` weighs multiscale Dice (``alpha``), SDM
  MSLE (``beta``) and bending energy (``1 - alpha - beta``).
* Validation (:func:`validate`) every ``validate_every`` steps on the held-out cases: median gland DSC and median
  landmark TRE in mm at the working resolution. The weights with the best validation DSC are written to the model
  directory with everything ``register`` needs (:mod:`label_reg.model_dir`).

See :mod:`label_reg.trainer` for the strategy, determinism, resuming and logging.
"""
import dataclasses

import numpy as np
import tensorflow as tf

from label_reg import metrics, model_dir
from label_reg.data import TRAINING_KEYS
from label_reg.trainer import (RunConfig, Task, Trainer, load_cases, load_split, make_strategy,  # noqa: F401
                               option, run_training)

__all__ = ["TrainConfig", "REGISTRATION", "loss_terms", "validate", "train", "Trainer", "load_split", "load_cases",
           "make_strategy"]


@dataclasses.dataclass
class TrainConfig(RunConfig):
    """Everything a registration training run depends on: :class:`label_reg.trainer.RunConfig` plus the loss
    weights and the MIX+ switch. Field names are the ``label-reg train`` flag names."""
    alpha: float = option(0.05, "Weight of the multiscale Dice loss.")
    beta: float = option(0.45, "Weight of the SDM MSLE loss; bending energy gets 1 - alpha - beta.")
    moving_label_input: bool = option(True, "Give the network the MR gland mask as a third input (MIX+).")
    prealign: str = option("trus_centre", "Coarse pre-alignment: trus_centre (the paper: MR gland centre onto the "
                                          "TRUS volume centre) or trus_gland (onto the TRUS gland centre the "
                                          "--segmenter_dir segmenter finds; the crop is centred there too).")
    segmenter_dir: str = option("", "TRUS gland segmenter model directory (label-reg train-segmenter, trained on "
                                    "the same split) for --prealign=trus_gland; copied into MODEL_DIR/segmenter.")
    global_affine: bool = option(False, "Add a global affine stage: a 12-parameter affine predicted from the "
                                        "coarsest features, composed with the local DDF (one total DDF).")
    train_centres: str = option("true", "With --prealign=trus_gland, the TRUS gland centres the training pairs are "
                                        "pre-aligned on: true (from the TRUS masks) or found (the segmenter's). "
                                        "Validation always uses the found ones, as register does.")

    def __post_init__(self):
        from label_reg.errors import InputError
        from label_reg.preprocess import PREALIGN_MODES
        if self.prealign not in PREALIGN_MODES:
            raise InputError("--prealign", f"must be one of {', '.join(PREALIGN_MODES)}, got {self.prealign!r}")
        if self.train_centres not in ("true", "found"):
            raise InputError("--train_centres", f"must be true or found, got {self.train_centres!r}")
        if self.prealign == "trus_gland" and not self.segmenter_dir:
            raise InputError("--segmenter_dir", "is required with --prealign=trus_gland (train one with "
                                                "label-reg train-segmenter on the same split)")

    def preprocess_config(self):
        from label_reg.preprocess import PreprocessConfig
        return PreprocessConfig(spacing_mm=float(self.spacing_mm), shape=tuple(int(n) for n in self.shape),
                                prealign=self.prealign)

    def build_args(self):
        return {"image_shape": tuple(int(n) for n in self.shape),
                "moving_label_input": bool(self.moving_label_input), "base_filters": int(self.base_filters),
                "global_affine": bool(self.global_affine)}


# ------------------------------------------------------------------------------------------------ the task
def build_model(config):
    from label_reg.network import build_model as build
    return build(**config.build_args())


def loss_terms(batch, ddf, config):
    """The training loss of a batch dict and the network's DDF (B, X, Y, Z, 3): per-sample (B,) terms of
    :func:`label_reg.losses.registration_loss` (``total`` and each weighted term), plus ``dsc``, the hard gland
    Dice of the warped moving mask (>= 0.5), for monitoring only."""
    from label_reg.layers import warp
    from label_reg.losses import registration_loss, soft_dice
    warped_label = warp(batch["moving_label"], ddf, "zero")
    warped_sdm = warp(batch["moving_sdm"], ddf, "replicate") if config.beta > 0 else None
    terms = registration_loss(config.alpha, config.beta, batch["fixed_label"], warped_label, batch["fixed_sdm"],
                              warped_sdm, ddf)
    terms["dsc"] = soft_dice(batch["fixed_label"], tf.cast(warped_label >= 0.5, warped_label.dtype))
    return terms


def validate(predictor, cases, config):
    """Median gland DSC and median landmark TRE (mm) over pre-processed ``cases``, every moving label channel warped
    (zero boundary) by the DDF ``predictor`` gives; ``predictor=None`` scores the pre-alignment alone."""
    spacing = (float(config.spacing_mm),) * 3
    dscs, tres = [], []
    for case in cases:
        warped = np.asarray(case["moving_label"], np.float32)
        if predictor is not None:
            warped = predictor.warp(warped, predictor.predict(case), "zero")
        fixed = np.asarray(case["fixed_label"], np.float32)
        dscs.append(metrics.dice(fixed[..., 0], warped[..., 0]))
        if fixed.shape[-1] > 1:
            tres.append(metrics.tre_mm(fixed, warped, spacing)[0])
    return {"dsc": float(np.median(dscs)) if dscs else float("nan"),
            "tre_mm": float(np.nanmedian(tres)) if tres else float("nan")}


def save_best(path, model, config, step, result):
    """The model directory of the best model so far (:func:`label_reg.model_dir.save`)."""
    extra = {"alpha": float(config.alpha), "beta": float(config.beta), "best_step": int(step), "validation": result,
             "training": config.to_json()}
    if config.prealign == "trus_gland":
        extra["segmenter"] = model_dir.copy_segmenter(config.segmenter_dir, path)
    model_dir.save(path, model, config.build_args(), config.preprocess_config(), extra)


def middle_slices(predictor, case):
    """Middle axial slices of fixed, moving and warped moving side by side, gland outlines in red:
    {"val/fixed_moving_warped": (Y, 3 X, 3) float32}."""
    from scipy import ndimage

    ddf = predictor.predict(case)
    fixed_image, moving_image = (np.asarray(case[k], np.float32) for k in ("fixed_image", "moving_image"))
    fixed_label, moving_label = (np.asarray(case[k], np.float32)[..., 0] for k in ("fixed_label", "moving_label"))
    warped_image = predictor.warp(moving_image, ddf, "replicate")
    warped_label = predictor.warp(moving_label, ddf, "zero")
    z = fixed_image.shape[2] // 2
    tiles = []
    for image, label in ((fixed_image, fixed_label), (moving_image, moving_label), (warped_image, warped_label)):
        rgb = np.repeat(np.clip(image[:, :, z, None], 0, 1), 3, axis=-1)
        mask = label[:, :, z] >= 0.5
        outline = mask & ~ndimage.binary_erosion(mask)
        rgb[outline] = (1.0, 0.0, 0.0)
        tiles.append(np.transpose(rgb, (1, 0, 2)))  # rows = y, columns = x
    return {"val/fixed_moving_warped": np.concatenate(tiles, axis=1).astype(np.float32)}


REGISTRATION = Task(
    build_model=build_model, keys=TRAINING_KEYS, loss=loss_terms, validate=validate, select="dsc", save=save_best,
    baseline=lambda cases, config: validate(None, cases, config), preview=middle_slices, shown=("dsc",),
    validation_names={"dsc": ("val_dsc", "val/dsc_median"), "tre_mm": ("val_tre", "val/tre_mm_median")})


def train(config):
    """Load the data split, pre-process it (cached), and train the registration network for a
    :class:`TrainConfig`. Returns the summary dict of :meth:`label_reg.trainer.Trainer.run`.

    With ``prealign == "trus_gland"`` the validation pairs are pre-aligned on the TRUS gland centre the segmenter
    (``segmenter_dir``) finds, as ``register`` will do, and the training pairs on the true centres (from the TRUS
    masks) or the found ones (``train_centres``); the segmenter is copied into the model directory."""
    if config.prealign != "trus_gland":
        return run_training(REGISTRATION, config)
    from label_reg.segmenter import GlandFinder
    finder = GlandFinder.from_model_dir(config.segmenter_dir)
    train_pairs, val_pairs = load_split(config)
    grid = config.preprocess_config()
    train_cases = load_cases(train_pairs, grid, config.cache_dir, config.progress,
                             finder if config.train_centres == "found" else None)
    val_cases = load_cases(val_pairs, grid, config.cache_dir, config.progress, finder)
    return Trainer(REGISTRATION, config, train_cases, val_cases).run()
