"""``label-reg export``: write a TF Serving SavedModel from a model directory.

    label-reg export --model_dir MODEL_DIR --output_dir SM [--version 1]

writes ``SM/1/`` (saved_model.pb, variables/, and a copy of label_reg.json with the pre-processing the client must
apply). Serve it with ``tensorflow_model_server --rest_api_port=8501 --model_name=label_reg --model_base_path=$PWD/SM``.
A model pre-aligned on the TRUS gland also gets a ``segment_gland`` signature (its segmenter) and the segmenter
grid in label_reg.json.
See :mod:`label_reg.export` for the signature. ``--model`` is an alias of ``--model_dir``.
"""
import json
import pathlib
import sys

from absl import flags
from absl import logging

from label_reg.commands import define_model_dir_flag, reject_positional
from label_reg.errors import InputError

define_model_dir_flag()
flags.DEFINE_string("output_dir", None, "SavedModel base folder; the model goes into OUTPUT_DIR/<version>/.")
flags.DEFINE_integer("version", 1, "TF Serving version number (the subfolder name).")

FLAGS = flags.FLAGS


def main(argv):
    reject_positional(argv)
    if not FLAGS.model_dir:
        raise InputError("--model_dir", "is required (a model directory from `label-reg train`)")
    if not FLAGS.output_dir:
        raise InputError("--output_dir", "is required")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # TensorFlow's SavedModel writer is chatty at INFO
    from label_reg.export import export
    from label_reg.io import check_output_folder
    from label_reg.predictor import Predictor
    check_output_folder(FLAGS.output_dir)  # writable, before the model loads
    earlier = (pathlib.Path(FLAGS.output_dir) / str(FLAGS.version)).is_dir()
    predictor = Predictor.from_model_dir(FLAGS.model_dir)
    path = export(FLAGS.model_dir, FLAGS.output_dir, FLAGS.version, predictor=predictor)
    if earlier:
        print(f"label-reg export: replaced the earlier version folder {path}", file=sys.stderr)
    shape = ", ".join(str(n) for n in predictor.image_shape)
    print(f"wrote SavedModel {path}")
    print(f"  serving_default inputs: {', '.join(predictor.input_names)} float32 (batch, {shape}, 1), "
          f"pre-processed at {predictor.preprocess_config.spacing_mm:g} mm")
    print("  outputs: ddf, warped_moving_image"
          + (", warped_moving_label" if "moving_label" in predictor.input_names else ""))
    segmenter = json.loads((path / "label_reg.json").read_text()).get("segmenter")
    if segmenter:
        grid = segmenter["preprocess"]
        print(f"  {segmenter['signature']} input: {segmenter['input']} float32 (batch, "
              f"{', '.join(str(n) for n in grid['shape'])}, 1), the whole TRUS at {grid['spacing_mm']:g} mm around "
              f"its volume centre; output: {segmenter['output']}")
    return 0
