"""``label-reg train``: train a registration network. Experiment presets are absl flagfiles under experiments/.

Example: ``label-reg train --flagfile=experiments/mixplus.flags --flagfile=experiments/cpu.flags
--data_dir=DATA --model_dir=runs/mixplus_fold0 --fold=0``.

The flags are generated from the fields of :class:`label_reg.train.TrainConfig` (names, defaults, help), so every
config field is a flag and nothing else is. ``--model`` is an alias of ``--model_dir``.
"""
import json
import pathlib

from absl import flags

from label_reg.commands import config_from_flags, define_config_flags, reject_positional
from label_reg.train import TrainConfig

define_config_flags(TrainConfig)
flags.DEFINE_alias("model", "model_dir")

FLAGS = flags.FLAGS


def config_from_command_line():
    """The :class:`TrainConfig` of the parsed flags; ``--cache_dir`` defaults to MODEL_DIR/../.label_reg_cache."""
    cache_dir = FLAGS.cache_dir or str(pathlib.Path(FLAGS.model_dir).resolve().parent / ".label_reg_cache")
    return config_from_flags(TrainConfig, cache_dir=cache_dir)


def main(argv):
    reject_positional(argv)
    from label_reg.train import registration_task, train
    config = config_from_command_line()
    summary = train(config)
    best = f"best_{registration_task(config).select}"
    report = {k: summary[k] for k in ("steps", "seconds", "samples_per_second", "coarse", "last_validation", best,
                                      "interrupted")}
    print(json.dumps(report, indent=2))
    return 0
