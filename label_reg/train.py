"""Training the registration network: its configuration, loss, validation and model directory, as a
:class:`label_reg.trainer.Task` (:data:`REGISTRATION`) that :class:`label_reg.trainer.Trainer` runs.

* Loss (:func:`loss_terms`): the network's DDF warps the moving gland mask (zero boundary) and, when ``beta > 0``,
  the moving SDM (replicate); :func:`label_reg.losses.registration_loss` weighs multiscale Dice (``alpha``), SDM
  MSLE (``beta``) and bending energy (``1 - alpha - beta``; ``bending_voxels`` picks its discretisation). With
  ``landmark_weight > 0`` (landmark supervision, Hu et al. 2018; 0 is the paper) the landmark channels of both
  label files, paired by index, are warped too and :func:`label_reg.losses.landmark_dice` adds ``landmark_weight``
  times their multiscale Dice loss; with ``landmark_centroid_weight > 0``
  :func:`label_reg.losses.landmark_centroid_distance` adds that weight times the mean distance in mm between the
  paired landmarks' centroids (the TRE itself). With ``label_loss_in_view`` the gland Dice and SDM terms see only
  the voxels where the TRUS image says anything (:func:`label_reg.losses.fixed_view_mask`). With ``global_affine`` and
  ``affine_label_weight > 0`` the same label losses are scored again on the affine stage's field alone
  (:func:`affine_label_loss`) and added with that weight, so the stage has to do the global alignment itself.
* Validation (:func:`validate`) every ``validate_every`` steps on the held-out cases: median gland DSC and median
  landmark TRE in mm at the working resolution. The weights with the best validation DSC (or, with
  ``select_by="tre"``, the lowest median TRE; with ``select_by="last"``, the weights of the last validation) are
  written to the model directory with everything ``register`` needs (:mod:`label_reg.model_dir`).

See :mod:`label_reg.trainer` for the strategy, determinism, resuming and logging.
"""
import dataclasses

import numpy as np
import tensorflow as tf

from label_reg import metrics, model_dir
from label_reg.data import LANDMARK_KEYS, TRAINING_KEYS, landmark_count
from label_reg.trainer import RunConfig, Task, Trainer, load_cases, load_split, make_strategy, option  # noqa: F401

__all__ = ["TrainConfig", "REGISTRATION", "registration_task", "loss_terms", "validate", "train", "Trainer",
           "load_split", "load_cases", "make_strategy"]


# --select_by value -> the key of the validation result that picks the model kept ("step": the trainer adds the
# step to every result, so the last validation always wins)
SELECT_BY = {"dsc": "dsc", "tre": "tre_mm", "last": "step"}


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
    affine_pooling: str = option("average", "With --global_affine, how the affine head reduces the coarsest "
                                            "features: average (global average pooling, one value per channel) or "
                                            "flatten (every coarsest voxel's features: the head sees positions).")
    train_centres: str = option("true", "With --prealign=trus_gland, the TRUS gland centres the training pairs are "
                                        "pre-aligned on: true (from the TRUS masks) or found (the segmenter's). "
                                        "Validation always uses the found ones, as register does.")
    landmark_weight: float = option(0.0, "Weight of the landmark loss: the landmark label channels (1..) of both "
                                         "label files, paired by index, as an extra multiscale Dice term "
                                         "(0 = the paper: gland masks only).")
    landmark_centroid_weight: float = option(0.0, "Weight of the landmark centroid loss: the mean distance in mm "
                                                  "between the centroids of the paired landmark channels (the "
                                                  "TRE itself, differentiable), beside or instead of the landmark "
                                                  "Dice of --landmark_weight (0 = off).")
    landmark_terms: str = option("pairs", "Landmark loss: pairs (mean of each landmark pair's multiscale Dice) or "
                                          "one (one multiscale Dice over all landmark channels together).")
    bending_voxels: str = option("interior", "Bending energy's discretisation: interior (label-reg / NiftyNet: wide "
                                             "central differences, voxels two in from every face) or all (compact "
                                             "second differences reaching every voxel, the crop's faces included).")
    label_loss_in_view: bool = option(False, "Leave the crop's voxels outside the TRUS image (fixed image 0 there "
                                             "and 2 voxels around) out of the gland Dice and SDM losses: a TRUS "
                                             "mask cut by the TRUS volume's face is unknown beyond it, not "
                                             "background (False = the paper: the whole crop).")
    affine_label_weight: float = option(0.0, "With --global_affine, weight of the label losses (gland Dice and "
                                             "SDM with --alpha/--beta, landmarks with --landmark_weight) scored "
                                             "again on the affine stage's field alone, so that the stage makes the "
                                             "global part of the alignment itself rather than leaving it to the "
                                             "local DDF (0 = off: the stage learns through the total field only).")
    select_by: str = option("dsc", "Validation score that picks the model kept: dsc (highest median gland DSC, "
                                   "the paper), tre (lowest median landmark TRE) or last (the final weights: no "
                                   "choice made on the validation pairs, so their scores stay unbiased).")

    def __post_init__(self):
        super().__post_init__()
        from label_reg.errors import InputError
        from label_reg.losses import BENDING_VOXELS, LANDMARK_TERMS
        from label_reg.network import AFFINE_POOLING
        from label_reg.preprocess import PREALIGN_MODES
        if not float(self.landmark_weight) >= 0:
            raise InputError("--landmark_weight", f"must be >= 0, got {self.landmark_weight!r}")
        if not float(self.landmark_centroid_weight) >= 0:
            raise InputError("--landmark_centroid_weight", f"must be >= 0, got {self.landmark_centroid_weight!r}")
        if self.landmark_terms not in LANDMARK_TERMS:
            raise InputError("--landmark_terms", f"must be one of {', '.join(LANDMARK_TERMS)}, "
                                                 f"got {self.landmark_terms!r}")
        if not float(self.affine_label_weight) >= 0:
            raise InputError("--affine_label_weight", f"must be >= 0, got {self.affine_label_weight!r}")
        if self.affine_label_weight > 0 and not self.global_affine:
            raise InputError("--affine_label_weight", "needs --global_affine (it scores the affine stage alone)")
        if self.bending_voxels not in BENDING_VOXELS:
            raise InputError("--bending_voxels", f"must be one of {', '.join(BENDING_VOXELS)}, "
                                                 f"got {self.bending_voxels!r}")
        if self.affine_pooling not in AFFINE_POOLING:
            raise InputError("--affine_pooling", f"must be one of {', '.join(AFFINE_POOLING)}, "
                                                 f"got {self.affine_pooling!r}")
        if self.select_by not in SELECT_BY:
            raise InputError("--select_by", f"must be one of {', '.join(SELECT_BY)}, got {self.select_by!r}")
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
                "global_affine": bool(self.global_affine),
                **({"affine_pooling": self.affine_pooling} if self.global_affine else {})}


# ------------------------------------------------------------------------------------------------ the task
def build_model(config):
    from label_reg.network import build_model as build
    return build(**config.build_args())


def _label_views(batch, ddf, config):
    """The batch's gland labels as the gland losses see them under ``ddf``: (fixed gland, warped moving gland as
    scored, warped moving SDM as scored or None when ``beta == 0``, warped moving gland), all (B, X, Y, Z, 1); with
    ``label_loss_in_view`` both glands are cut to the TRUS view and the SDMs agree outside it."""
    from label_reg.layers import warp
    from label_reg.losses import fixed_view_mask
    warped_label = warp(batch["moving_label"], ddf, "zero")
    warped_sdm = warp(batch["moving_sdm"], ddf, "replicate") if config.beta > 0 else None
    fixed_label, scored_label = batch["fixed_label"], warped_label
    if config.label_loss_in_view:  # outside the TRUS image both masks are cut and the SDMs agree: no pull there
        view = fixed_view_mask(batch["fixed_image"])
        fixed_label, scored_label = fixed_label * view, warped_label * view
        if warped_sdm is not None:
            warped_sdm = view * warped_sdm + (1.0 - view) * batch["fixed_sdm"]
    return fixed_label, scored_label, warped_sdm, warped_label


def uses_landmarks(config):
    """Whether training scores the landmark channels (``landmark_weight`` or ``landmark_centroid_weight`` > 0)."""
    return float(config.landmark_weight) > 0 or float(config.landmark_centroid_weight) > 0


def _landmark_losses(batch, ddf, config):
    """The landmark terms of the batch under ``ddf``, per sample (B,): ``landmark_dice``
    (:func:`label_reg.losses.landmark_dice`) with ``landmark_weight > 0``, ``landmark_centroid_mm``
    (:func:`label_reg.losses.landmark_centroid_distance`) with ``landmark_centroid_weight > 0``, and ``weighted``,
    their weighted sum. The moving landmarks are warped once (zero boundary); a pair counts when both its channels
    are non-empty."""
    from label_reg.layers import warp
    from label_reg.losses import landmark_centroid_distance, landmark_dice
    moving, fixed = batch["moving_landmarks"], batch["fixed_landmarks"]
    present = tf.logical_and(tf.reduce_sum(moving, axis=[1, 2, 3]) > 0, tf.reduce_sum(fixed, axis=[1, 2, 3]) > 0)
    warped = warp(moving, ddf, "zero")
    terms, weighted = {}, tf.zeros(tf.shape(ddf)[:1], ddf.dtype)
    if config.landmark_weight > 0:
        terms["landmark_dice"] = landmark_dice(fixed, warped, present, config.landmark_terms)
        weighted += float(config.landmark_weight) * terms["landmark_dice"]
    if config.landmark_centroid_weight > 0:
        terms["landmark_centroid_mm"] = landmark_centroid_distance(fixed, warped, present, float(config.spacing_mm))
        weighted += float(config.landmark_centroid_weight) * terms["landmark_centroid_mm"]
    terms["weighted"] = weighted
    return terms


def affine_label_loss(batch, theta, spatial_shape, config):
    """The label part of the training loss scored on the global affine stage's field alone (no bending: an affine
    field has none), per sample (B,): ``alpha`` mDSC + ``beta`` SDM MSLE + the weighted landmark terms, under
    the DDF of the affine head's parameters theta (B, 12) (:func:`label_reg.layers.affine_ddf` on the static
    ``spatial_shape`` (X, Y, Z)). When the affine alone aligns the labels it scores what an aligned pair scores
    (not 0: the smoothed Dice of identical masks is below 1)."""
    from label_reg.layers import affine_ddf
    from label_reg.losses import loss_weights, multiscale_dice, sdm_msle
    ddf = affine_ddf(theta, [int(n) for n in spatial_shape])
    fixed_label, scored_label, warped_sdm, _ = _label_views(batch, ddf, config)
    alpha, beta, _ = loss_weights(config.alpha, config.beta)
    loss = tf.zeros(tf.shape(ddf)[:1], ddf.dtype)
    if alpha > 0:
        loss += alpha * multiscale_dice(fixed_label, scored_label)
    if beta > 0:
        loss += beta * sdm_msle(batch["fixed_sdm"], warped_sdm)
    if uses_landmarks(config):
        loss += _landmark_losses(batch, ddf, config)["weighted"]
    return loss


def loss_terms(batch, output, config):
    """The training loss of a batch dict and the network's output: per-sample (B,) terms of
    :func:`label_reg.losses.registration_loss` (``total`` and each weighted term; with ``landmark_weight > 0`` also
    ``landmark_dice``, with ``landmark_centroid_weight > 0`` ``landmark_centroid_mm``, both from the batch's
    ``moving_landmarks`` / ``fixed_landmarks`` (B, X, Y, Z, L), a pair counting when both its channels are
    non-empty), plus ``dsc``, the hard gland Dice of the warped moving mask (>= 0.5), for
    monitoring only.

    output: the DDF (B, X, Y, Z, 3), or with ``affine_label_weight > 0`` the dict ``{"ddf", "affine_theta" (B, 12)}``
    of :func:`label_reg.network.affine_parameters_model`, which adds ``affine_labels``
    (:func:`affine_label_loss`), weighted by ``affine_label_weight`` in ``total``."""
    from label_reg.losses import registration_loss, soft_dice
    ddf, theta = (output["ddf"], output.get("affine_theta")) if isinstance(output, dict) else (output, None)
    fixed_label, scored_label, warped_sdm, warped_label = _label_views(batch, ddf, config)
    terms = registration_loss(config.alpha, config.beta, fixed_label, scored_label, batch["fixed_sdm"],
                              warped_sdm, ddf, bending_voxels=config.bending_voxels)
    if uses_landmarks(config):
        landmarks = _landmark_losses(batch, ddf, config)
        terms["total"] = terms["total"] + landmarks.pop("weighted")
        terms.update(landmarks)
    if config.affine_label_weight > 0:
        if theta is None:
            raise ValueError("affine_label_weight > 0 needs the output dict {'ddf', 'affine_theta'} "
                             "(label_reg.network.affine_parameters_model), got the DDF alone")
        terms["affine_labels"] = affine_label_loss(batch, theta, ddf.shape[1:4], config)
        terms["total"] = terms["total"] + float(config.affine_label_weight) * terms["affine_labels"]
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
    validation_names={"dsc": ("val_dsc", "val/dsc_median"), "tre_mm": ("val_tre", "val/tre_mm_median")},
    minimise=("tre_mm",))


def registration_task(config, train_cases=(), val_cases=()):
    """:data:`REGISTRATION` as ``config`` asks for it: the landmark volumes in the batches with
    ``landmark_weight`` or ``landmark_centroid_weight`` > 0, the affine head's parameters in the training output
    with ``affine_label_weight > 0``, and the model kept by ``select_by``. Refuses (``InputError``) landmark training
    without landmark pairs in ``train_cases`` and TRE selection without them in ``val_cases``."""
    from label_reg.errors import InputError
    task = REGISTRATION
    if uses_landmarks(config):
        flag = "--landmark_weight" if config.landmark_weight > 0 else "--landmark_centroid_weight"
        if train_cases and not any(landmark_count(c) for c in train_cases):
            raise InputError(config.data_dir, f"{flag} > 0 but no training pair has landmarks (label "
                                              "channels beyond the gland in both label files)")
        shown = ("dsc",) + (("landmark_dice",) if config.landmark_weight > 0 else ()) + (
            ("landmark_centroid_mm",) if config.landmark_centroid_weight > 0 else ())
        task = dataclasses.replace(task, keys=TRAINING_KEYS + LANDMARK_KEYS, shown=shown)
    if config.affine_label_weight > 0:
        from label_reg.network import affine_parameters_model
        task = dataclasses.replace(task, forward=lambda model, _config: affine_parameters_model(model),
                                   shown=task.shown + ("affine_labels",))
    if config.select_by == "tre" and val_cases and not any(landmark_count(c) for c in val_cases):
        raise InputError(config.data_dir, "--select_by=tre but no validation pair has landmarks")
    task = dataclasses.replace(task, select=SELECT_BY[config.select_by])
    return task


def train(config):
    """Load the data split, pre-process it (cached), and train the registration network for a
    :class:`TrainConfig`. Returns the summary dict of :meth:`label_reg.trainer.Trainer.run`.

    With ``prealign == "trus_gland"`` the validation pairs are pre-aligned on the TRUS gland centre the segmenter
    (``segmenter_dir``) finds, as ``register`` will do, and the training pairs on the true centres (from the TRUS
    masks) or the found ones (``train_centres``); the segmenter is copied into the model directory."""
    train_pairs, val_pairs = load_split(config)
    grid = config.preprocess_config()
    finder = None
    if config.prealign == "trus_gland":
        from label_reg.segmenter import GlandFinder
        finder = GlandFinder.from_model_dir(config.segmenter_dir)
    train_cases = load_cases(train_pairs, grid, config.cache_dir, config.progress,
                             finder if config.train_centres == "found" else None)
    val_cases = load_cases(val_pairs, grid, config.cache_dir, config.progress, finder)
    return Trainer(registration_task(config, train_cases, val_cases), config, train_cases, val_cases).run()
