"""``label-reg export``: write a TF Serving SavedModel from a model directory.

    label-reg export --model MODEL_DIR --output_dir SM [--version 1]

writes ``SM/1/`` (saved_model.pb, variables/, and a copy of label_reg.json with the pre-processing the client must
apply). Serve it with ``tensorflow_model_server --rest_api_port=8501 --model_name=label_reg --model_base_path=$PWD/SM``.
See :mod:`label_reg.export` for the signature.
"""
from absl import flags
from absl import logging

from label_reg.errors import InputError

flags.DEFINE_string("model", None, "Model directory written by `label-reg train`.")
flags.DEFINE_string("output_dir", None, "SavedModel base folder; the model goes into OUTPUT_DIR/<version>/.")
flags.DEFINE_integer("version", 1, "TF Serving version number (the subfolder name).")

FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise InputError(" ".join(argv[1:]), "unexpected positional argument(s); all options are --flags")
    if not FLAGS.model:
        raise InputError("--model", "is required (a model directory from `label-reg train`)")
    if not FLAGS.output_dir:
        raise InputError("--output_dir", "is required")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # TensorFlow's SavedModel writer is chatty at INFO
    from label_reg.export import export
    from label_reg.model_dir import read_info
    path = export(FLAGS.model, FLAGS.output_dir, FLAGS.version)
    info, config = read_info(FLAGS.model)
    shape = "x".join(str(n) for n in info["build"]["image_shape"])
    inputs = ["moving_image", "fixed_image"] + (["moving_label"] if info["build"]["moving_label_input"] else [])
    print(f"wrote SavedModel {path}")
    print(f"  serving_default inputs: {', '.join(inputs)} float32 (batch, {shape.replace('x', ', ')}, 1), "
          f"pre-processed at {config.spacing_mm:g} mm")
    print("  outputs: ddf, warped_moving_image" + (", warped_moving_label" if len(inputs) == 3 else ""))
    return 0
