"""``label-reg train-segmenter``: train the TRUS gland segmenter (beyond the paper; :mod:`label_reg.segmenter`).

Example: ``label-reg train-segmenter --flagfile=experiments/segmenter.flags --flagfile=experiments/segmenter_cpu.flags
--data_dir=DATA --model_dir=runs/segmenter_cpu_fold0 --fold=0``. It trains on the fixed (TRUS) images and their gland
masks of the training split; a registration model trained with ``--prealign=trus_gland --segmenter_dir=...`` of
the same fold carries a copy of it.

The flags are generated from the fields of :class:`label_reg.train_segmenter.SegmenterConfig`.
"""
import json
import pathlib

from absl import flags

from label_reg.commands import config_from_flags, define_config_flags, reject_positional
from label_reg.train_segmenter import SegmenterConfig

define_config_flags(SegmenterConfig)
flags.DEFINE_alias("model", "model_dir")

FLAGS = flags.FLAGS


def main(argv):
    reject_positional(argv)
    from label_reg.train_segmenter import SEGMENTER, train_segmenter
    cache_dir = FLAGS.cache_dir or str(pathlib.Path(FLAGS.model_dir).resolve().parent / ".label_reg_cache")
    summary = train_segmenter(config_from_flags(SegmenterConfig, cache_dir=cache_dir))
    report = {k: summary[k] for k in ("steps", "seconds", "samples_per_second", "coarse", "last_validation",
                                      f"best_{SEGMENTER.select}", "interrupted")}
    print(json.dumps(report, indent=2))
    return 0
