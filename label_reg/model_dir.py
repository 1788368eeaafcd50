"""The model directory: everything ``register``, ``evaluate`` and ``export`` need from a training run.

Layout::

    MODEL_DIR/
      label_reg.json        build arguments, pre-processing settings, loss weights, training flags, best metrics
      model.weights.h5      weights of the best-validation model (Keras weights file: arrays only)
      checkpoints/          tf.train checkpoints for --resume (model, optimizer, step, data position)
      logs/                 TensorBoard event files

Loading never runs code from the directory: the JSON is parsed and checked field by field (no eval, no pickles),
the network is rebuilt from its known builder and only weight arrays are read from the ``.h5`` file.
"""
import json
import pathlib

from label_reg.errors import InputError
from label_reg.io import atomic_path
from label_reg.network import build_model
from label_reg.preprocess import PreprocessConfig

INFO_FILE = "label_reg.json"
WEIGHTS_FILE = "model.weights.h5"
FORMAT_VERSION = 1


def save(model_dir, model, build_args, preprocess_config, extra=None):
    """Write the weights and the JSON description atomically (weights first, so the JSON never names missing ones)."""
    model_dir = pathlib.Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(model_dir / WEIGHTS_FILE) as tmp:
        model.save_weights(str(tmp))
    info = {
        "format_version": FORMAT_VERSION,
        "build": {"image_shape": [int(n) for n in build_args["image_shape"]],
                  "moving_label_input": bool(build_args["moving_label_input"]),
                  "base_filters": int(build_args["base_filters"])},
        "preprocess": preprocess_config.to_dict(),
        **(extra or {}),
    }
    with atomic_path(model_dir / INFO_FILE) as tmp:
        tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


def read_info(model_dir):
    """Parse and check ``label_reg.json``; returns (info dict, PreprocessConfig)."""
    model_dir = pathlib.Path(model_dir)
    path = model_dir / INFO_FILE
    if not path.is_file():
        raise InputError(model_dir, f"not a label_reg model directory (no {INFO_FILE})")
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(path, f"unreadable model description ({err})") from None
    if not isinstance(info, dict) or info.get("format_version") != FORMAT_VERSION:
        raise InputError(path, f"unsupported model description (format_version must be {FORMAT_VERSION})")
    build = info.get("build")
    try:
        shape = [int(n) for n in build["image_shape"]]
        if len(shape) != 3 or not isinstance(build["moving_label_input"], bool):
            raise ValueError
        int(build["base_filters"])
    except (TypeError, KeyError, ValueError):
        raise InputError(path, "malformed 'build' section") from None
    try:
        config = PreprocessConfig.from_dict(info.get("preprocess"))
    except InputError:
        raise
    except (TypeError, KeyError, ValueError) as err:
        raise InputError(path, f"malformed 'preprocess' section ({err})") from None
    return info, config


def load(model_dir, inference=False):
    """Rebuild the network and load its best weights; returns (keras.Model, info dict, PreprocessConfig).

    ``inference=True`` returns the batch-norm-folded copy (:func:`label_reg.inference.fold_batchnorm`): the same DDF
    as ``model(x, training=False)`` to float32 rounding, faster, and not trainable. ``register``, ``evaluate`` and
    ``export`` use it.
    """
    model_dir = pathlib.Path(model_dir)
    info, config = read_info(model_dir)
    weights = model_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise InputError(model_dir, f"no {WEIGHTS_FILE} (has training validated at least once?)")
    build = info["build"]
    model = build_model(tuple(build["image_shape"]), build["moving_label_input"], build["base_filters"])
    try:
        model.load_weights(str(weights))
    except (OSError, ValueError) as err:
        raise InputError(weights, f"cannot load weights ({str(err).splitlines()[0]})") from None
    if inference:
        from label_reg.inference import fold_batchnorm
        model = fold_batchnorm(model)
    return model, info, config
