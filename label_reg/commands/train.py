"""``label-reg train``: train a registration network. Experiment presets are absl flagfiles under experiments/.

Example: ``label-reg train --flagfile=experiments/mixplus.flags --flagfile=experiments/cpu.flags
--data_dir=DATA --model_dir=runs/mixplus_fold0 --fold=0``.
"""
import json

from absl import flags

from label_reg.train import TrainConfig

_DEFAULTS = TrainConfig(data_dir="", model_dir="")

flags.DEFINE_string("data_dir", None, "Paired dataset folder (moving_images/, moving_labels/, fixed_images/, "
                                      "fixed_labels/).")
flags.DEFINE_string("model_dir", None, "Output model directory (weights, settings, checkpoints, TensorBoard logs).")
flags.DEFINE_float("alpha", _DEFAULTS.alpha, "Weight of the multiscale Dice loss.")
flags.DEFINE_float("beta", _DEFAULTS.beta, "Weight of the SDM MSLE loss; bending energy gets 1 - alpha - beta.")
flags.DEFINE_boolean("moving_label_input", _DEFAULTS.moving_label_input,
                     "Give the network the MR gland mask as a third input (MIX+).")
flags.DEFINE_float("learning_rate", _DEFAULTS.learning_rate, "Adam learning rate.")
flags.DEFINE_integer("batch_size", _DEFAULTS.batch_size, "Global batch size (split over replicas).")
flags.DEFINE_integer("num_steps", _DEFAULTS.num_steps, "Training iterations.")
flags.DEFINE_float("spacing_mm", _DEFAULTS.spacing_mm, "Isotropic working voxel size in mm.")
flags.DEFINE_list("shape", [str(n) for n in _DEFAULTS.shape], "Crop shape x,y,z in voxels around the TRUS centre.")
flags.DEFINE_integer("base_filters", _DEFAULTS.base_filters, "Filters at the first U-Net level (doubled per level).")
flags.DEFINE_float("augment_scale", _DEFAULTS.augment_scale, "Affine augmentation corner scale (0 = off).")
flags.DEFINE_integer("num_folds", _DEFAULTS.num_folds, "Cross-validation folds.")
flags.DEFINE_integer("fold", _DEFAULTS.fold, "Fold held out for validation.")
flags.DEFINE_integer("split_seed", _DEFAULTS.split_seed, "Seed of the fold assignment.")
flags.DEFINE_string("cases_csv", "", "CSV with columns case,split (train/val) instead of k-fold.")
flags.DEFINE_integer("seed", _DEFAULTS.seed, "Seed of initialisation, data order and augmentation.")
flags.DEFINE_integer("validate_every", _DEFAULTS.validate_every, "Validate (and keep the best model) every N steps.")
flags.DEFINE_integer("checkpoint_every", _DEFAULTS.checkpoint_every, "Checkpoint every N steps.")
flags.DEFINE_boolean("resume", False, "Continue from the last checkpoint in --model_dir.")
flags.DEFINE_string("cache_dir", "", "Folder for pre-processed cases (default: MODEL_DIR/../.label_reg_cache).")
flags.DEFINE_integer("cpu_replicas", 0, "Split the CPU into this many logical devices under MirroredStrategy.")
flags.DEFINE_integer("log_every", _DEFAULTS.log_every, "TensorBoard scalars every N steps.")
flags.DEFINE_boolean("progress", True, "Show a progress bar.")
flags.mark_flags_as_required(["data_dir", "model_dir"])

FLAGS = flags.FLAGS


def config_from_flags():
    import pathlib
    shape = tuple(int(n) for n in FLAGS.shape)
    cache_dir = FLAGS.cache_dir or str(pathlib.Path(FLAGS.model_dir).resolve().parent / ".label_reg_cache")
    return TrainConfig(
        data_dir=FLAGS.data_dir, model_dir=FLAGS.model_dir, alpha=FLAGS.alpha, beta=FLAGS.beta,
        moving_label_input=FLAGS.moving_label_input, learning_rate=FLAGS.learning_rate,
        batch_size=FLAGS.batch_size, num_steps=FLAGS.num_steps, spacing_mm=FLAGS.spacing_mm, shape=shape,
        base_filters=FLAGS.base_filters, augment_scale=FLAGS.augment_scale, num_folds=FLAGS.num_folds,
        fold=FLAGS.fold, split_seed=FLAGS.split_seed, cases_csv=FLAGS.cases_csv, seed=FLAGS.seed,
        validate_every=FLAGS.validate_every, checkpoint_every=FLAGS.checkpoint_every, resume=FLAGS.resume,
        cache_dir=cache_dir, cpu_replicas=FLAGS.cpu_replicas, log_every=FLAGS.log_every, progress=FLAGS.progress)


def main(argv):
    if len(argv) > 1:
        raise SystemExit(f"label-reg train: unexpected arguments {argv[1:]}")
    from label_reg.train import train
    summary = train(config_from_flags())
    report = {k: summary[k] for k in ("steps", "seconds", "samples_per_second", "coarse", "last_validation",
                                      "best_dsc", "interrupted")}
    print(json.dumps(report, indent=2))
    return 0
