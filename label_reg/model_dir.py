"""The model directory: everything ``register``, ``evaluate`` and ``export`` need from a training run.

Layout::

    MODEL_DIR/
      label_reg.json        build arguments, pre-processing settings, loss weights, training flags, best metrics
      model.weights.h5      weights of the best-validation model (Keras weights file: arrays only)
      checkpoints/          tf.train checkpoints for --resume (model, optimizer, step, data position): the last two
        kept/               those of every --keep_checkpoint_every-th step, if asked for
      logs/                 TensorBoard event files

Loading never runs code from the directory: the JSON is parsed and checked field by field (no eval, no pickles),
the network is rebuilt from its known builder and only weight arrays are read from the ``.h5`` file.

Which builder: ``label_reg.json`` may name a network kind (``"network"``); without it (every directory written by
the registration trainer) it is ``registration``, :func:`label_reg.network.build_model`. Another kind of network
plugs in with :func:`register_network` (its builder, a checker of its ``build`` section, and optionally an
inference copy such as the batch-norm-folded one) and is saved with ``save(..., network=NAME)``.

Before the weights are loaded, every weight array's shape is checked against the network the JSON describes
(:func:`check_weights`), so settings that do not match the weights are one clear error, not Keras warnings; the
``build`` values must be of their types (integers as JSON integers, not strings or floats). Paths in the
``training`` section (``data_dir``, ``cases_csv``, ``cache_dir``) are stored absolute, so ``evaluate`` finds the data
from any working folder.
"""
import collections
import dataclasses
import json
import numbers
import pathlib
from typing import Callable, Optional

from label_reg.errors import InputError
from label_reg.io import atomic_path
from label_reg.preprocess import PreprocessConfig

INFO_FILE = "label_reg.json"
WEIGHTS_FILE = "model.weights.h5"
FORMAT_VERSION = 1
REGISTRATION = "registration"
SEGMENTER = "segmenter"
CHECKPOINTS_DIR = "checkpoints"
KEPT_CHECKPOINTS_DIR = "kept"  # inside CHECKPOINTS_DIR
SEGMENTER_DIR = "segmenter"  # a registration model directory's copy of the TRUS gland segmenter it pre-aligns with


@dataclasses.dataclass(frozen=True)
class NetworkKind:
    """How one kind of network is described and rebuilt.

    build: ``build(**build_section) -> keras.Model``. check_build: ``check_build(build_section) -> dict``, the
    section as written to JSON (plain types), raising TypeError/KeyError/ValueError when malformed. inference:
    ``inference(model) -> keras.Model``, the copy ``load(..., inference=True)`` returns (None: the model itself).
    """

    build: Callable
    check_build: Callable
    inference: Optional[Callable] = None


def _build_registration(**build):
    from label_reg.network import build_model
    return build_model(tuple(build["image_shape"]), build["moving_label_input"], build["base_filters"],
                       global_affine=build.get("global_affine", False),
                       affine_pooling=build.get("affine_pooling", "average"))


def _check_registration(build):
    """The registration ``build`` section as written; ``global_affine`` (the global affine stage) is False when
    absent (model directories written before it existed); ``affine_pooling`` (how the stage's head reduces the
    features) is written with the stage only, "average" when absent (directories written before the choice)."""
    from label_reg.network import AFFINE_POOLING
    shape = [int(n) for n in build["image_shape"]]
    global_affine = build.get("global_affine", False)
    if len(shape) != 3 or not isinstance(build["moving_label_input"], bool) or not isinstance(global_affine, bool):
        raise ValueError("image_shape must be 3 sizes and moving_label_input and global_affine booleans")
    checked = {"image_shape": shape, "moving_label_input": build["moving_label_input"],
               "base_filters": int(build["base_filters"]), "global_affine": global_affine}
    if global_affine:
        pooling = build.get("affine_pooling", "average")
        if pooling not in AFFINE_POOLING:
            raise ValueError(f"affine_pooling must be one of {', '.join(AFFINE_POOLING)}, got {pooling!r}")
        checked["affine_pooling"] = pooling
    return checked


def _fold_registration(model):
    from label_reg.inference import fold_batchnorm
    return fold_batchnorm(model)


def _build_segmenter(**build):
    from label_reg.segmenter import build_segmenter
    return build_segmenter(tuple(build["image_shape"]), build["base_filters"])


def _check_segmenter(build):
    shape = [int(n) for n in build["image_shape"]]
    if len(shape) != 3 or set(build) != {"image_shape", "base_filters"}:
        raise ValueError("image_shape must be 3 sizes, and base_filters the only other key")
    return {"image_shape": shape, "base_filters": int(build["base_filters"])}


NETWORKS = {REGISTRATION: NetworkKind(_build_registration, _check_registration, _fold_registration),
            SEGMENTER: NetworkKind(_build_segmenter, _check_segmenter)}


def register_network(name, build, check_build, inference=None):
    """Make network kind ``name`` loadable (see :class:`NetworkKind`); returns it."""
    NETWORKS[name] = NetworkKind(build, check_build, inference)
    return NETWORKS[name]


def save(model_dir, model, build_args, preprocess_config, extra=None, network=REGISTRATION):
    """Write the weights and the JSON description atomically (weights first, so the JSON never names missing ones).
    ``build_args`` are what the ``network`` kind's builder takes."""
    model_dir = pathlib.Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    build = NETWORKS[network].check_build(dict(build_args))
    with atomic_path(model_dir / WEIGHTS_FILE) as tmp:
        model.save_weights(str(tmp))
    info = {"format_version": FORMAT_VERSION, **({} if network == REGISTRATION else {"network": network}),
            "build": build, "preprocess": preprocess_config.to_dict(), **(extra or {})}
    if isinstance(info.get("training"), dict):
        info["training"] = _absolute_paths(info["training"])
    with atomic_path(model_dir / INFO_FILE) as tmp:
        tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


ABSOLUTE_PATH_KEYS = ("data_dir", "cases_csv", "cache_dir")


def _absolute_paths(training):
    """A copy of a ``training`` section with its data paths (:data:`ABSOLUTE_PATH_KEYS`) made absolute."""
    out = dict(training)
    for key in ABSOLUTE_PATH_KEYS:
        if isinstance(out.get(key), str) and out[key]:
            out[key] = str(pathlib.Path(out[key]).resolve())
    return out


def _positive_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def _check_build_types(build, path):
    """The ``build`` values the network kinds share must be of their types, as JSON gives them (when present; a
    kind's own checker says which it needs): ``image_shape`` 3 positive integers, ``base_filters`` a positive
    integer, ``moving_label_input`` and ``global_affine`` true or false. (The kinds' checkers convert; a "32" or
    32.5 must not pass.)"""
    if not isinstance(build, dict):
        raise InputError(path, "malformed 'build' section (expected a mapping)")
    shape = build.get("image_shape")
    if "image_shape" in build and not (isinstance(shape, list) and len(shape) == 3
                                       and all(_positive_int(n) for n in shape)):
        raise InputError(path, f"'build' image_shape must be a list of 3 positive integers, got {shape!r}")
    if "moving_label_input" in build and not isinstance(build["moving_label_input"], bool):
        raise InputError(path, f"'build' moving_label_input must be true or false, got "
                               f"{build['moving_label_input']!r}")
    if "global_affine" in build and not isinstance(build["global_affine"], bool):
        raise InputError(path, f"'build' global_affine must be true or false, got {build['global_affine']!r}")
    if "base_filters" in build and not _positive_int(build["base_filters"]):
        raise InputError(path, f"'build' base_filters must be a positive integer, got {build['base_filters']!r}")


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
    kind = network_kind(info, path)
    _check_build_types(info.get("build"), path)
    try:
        kind.check_build(info.get("build"))
    except KeyError as err:
        raise InputError(path, f"malformed 'build' section (no {err})") from None
    except (TypeError, ValueError) as err:
        raise InputError(path, f"malformed 'build' section ({err})") from None
    try:
        config = PreprocessConfig.from_dict(info.get("preprocess"), source=f"{path} ('preprocess' section)")
    except InputError:
        raise
    except (TypeError, KeyError, ValueError) as err:
        raise InputError(path, f"malformed 'preprocess' section ({err})") from None
    return info, config


def network_kind(info, source=INFO_FILE):
    """The :class:`NetworkKind` a parsed ``label_reg.json`` names (registration when it names none)."""
    name = info.get("network", REGISTRATION)
    if not isinstance(name, str) or name not in NETWORKS:
        raise InputError(source, f"unknown network {name!r} (known: {', '.join(sorted(NETWORKS))})")
    return NETWORKS[name]


def _weight_shapes(path):
    """{dataset path: shape} of every array in a Keras ``.weights.h5`` file."""
    import h5py

    shapes = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: shapes.__setitem__(name, tuple(obj.shape))
                     if isinstance(obj, h5py.Dataset) else None)
    return shapes


def check_weights(weights, model, build, network=REGISTRATION):
    """Check that ``weights`` (a ``.weights.h5`` file) holds the arrays of ``model``, the network built from
    ``build`` (the JSON's build section), before Keras loads it: Keras would print a warning per mismatched layer and
    fail with a message cut off mid-sentence. Compares the shapes of the file's arrays with those of the network's
    weights (as multisets: the file names layers by their type and order, not by their names). Raises InputError
    naming ``weights``: what the JSON describes and, for a registration network whose first convolution's kernel
    tells (it is (4, 4, 4, inputs, base_filters)), what the weights are of."""
    try:
        found = _weight_shapes(weights)
    except (OSError, ValueError) as err:
        raise InputError(weights, f"not a readable Keras weights file ({str(err).splitlines()[0]})") from None
    expected = collections.Counter(tuple(int(n) for n in v.shape) for v in model.weights)
    present = collections.Counter(found.values())
    if present == expected:
        return
    weights_are = ""
    if network == REGISTRATION:
        inputs = 3 if build["moving_label_input"] else 2
        said = (f"{INFO_FILE} describes a network with base_filters {build['base_filters']} and {inputs} inputs "
                f"({'MIX+' if inputs == 3 else 'two-input'})"
                + (f", with the global affine stage ({build.get('affine_pooling', 'average')} head)"
                   if build.get("global_affine", False) else ""))
        first_kernel = found.get("layers/conv3d/vars/0")  # Keras' name for the first Conv3D's kernel
        if (first_kernel is not None and len(first_kernel) == 5
                and first_kernel[3:] != (inputs, build["base_filters"])):
            weights_are = (f"; the weights are of one with base_filters {first_kernel[4]} and {first_kernel[3]} "
                           "inputs")
    else:
        said = f"{INFO_FILE} describes a {network} network with {json.dumps(build, sort_keys=True)}"
    unexpected = sorted((present - expected).elements())
    missing = sorted((expected - present).elements())
    detail = (f"{sum(present.values())} arrays in the file, {sum(expected.values())} in the network; "
              f"{len(unexpected)} of the file's shapes do not fit"
              + (f", e.g. {unexpected[0]}" if unexpected else f" and {len(missing)} are missing, e.g. {missing[0]}"))
    raise InputError(weights, f"does not fit the model's settings: {said}{weights_are} ({detail})")


def load(model_dir, inference=False):
    """Rebuild the network and load its best weights; returns (keras.Model, info dict, PreprocessConfig).

    ``inference=True`` returns the network kind's inference copy: for registration the batch-norm-folded network
    (:func:`label_reg.inference.fold_batchnorm`), the same DDF as ``model(x, training=False)`` to float32 rounding,
    faster, and not trainable. :class:`label_reg.predictor.Predictor` loads it this way for ``register``,
    ``evaluate`` and ``export``.
    """
    model_dir = pathlib.Path(model_dir)
    info, config = read_info(model_dir)
    weights = model_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise InputError(model_dir, f"no {WEIGHTS_FILE} (has training validated at least once?)")
    kind = network_kind(info)
    model = kind.build(**info["build"])
    check_weights(weights, model, info["build"], info.get("network", REGISTRATION))
    try:
        model.load_weights(str(weights))
    except (OSError, ValueError) as err:
        raise InputError(weights, f"cannot load weights ({str(err).splitlines()[0]})") from None
    if inference and kind.inference is not None:
        model = kind.inference(model)
    return model, info, config


def copy_segmenter(source, model_dir):
    """Copy a segmenter model directory's description and weights into ``model_dir/segmenter/`` (atomically, file
    by file) so a registration model directory carries the segmenter it pre-aligns with. Returns the record for
    ``label_reg.json``: ``{"dir": "segmenter", "source": absolute source path}``. InputError if ``source`` is not a
    segmenter model directory."""
    import shutil
    source = pathlib.Path(source)
    info, _ = read_info(source)
    if info.get("network") != SEGMENTER:
        raise InputError(source, f"is not a segmenter model directory (network {info.get('network', REGISTRATION)!r})")
    if not (source / WEIGHTS_FILE).is_file():
        raise InputError(source, f"no {WEIGHTS_FILE} (has segmenter training validated at least once?)")
    target = pathlib.Path(model_dir) / SEGMENTER_DIR
    target.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS_FILE, INFO_FILE):
        with atomic_path(target / name) as tmp:
            shutil.copyfile(source / name, tmp)
    return {"dir": SEGMENTER_DIR, "source": str(source.resolve())}


def segmenter_path(model_dir, info):
    """The segmenter directory a registration model directory carries (``info["segmenter"]``), or None when it
    carries none. InputError when a ``trus_gland`` model carries none, or its segmenter folder is incomplete: such a
    model cannot pre-align."""
    record = info.get("segmenter")
    description = pathlib.Path(model_dir) / INFO_FILE
    if record is None:
        if (info.get("preprocess") or {}).get("prealign") == "trus_gland":
            raise InputError(description, "pre-aligns on the TRUS gland (prealign trus_gland) but carries no "
                                          f"segmenter (no 'segmenter' record, no {SEGMENTER_DIR}/ folder)")
        return None
    if not isinstance(record, dict) or record.get("dir") != SEGMENTER_DIR:
        raise InputError(description, f"malformed 'segmenter' record {record!r}")
    path = pathlib.Path(model_dir) / SEGMENTER_DIR
    for name in (INFO_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise InputError(path, f"the carried segmenter is incomplete (no {name})")
    return path


def takes_moving_label(model_dir):
    """Whether a model directory's registration network takes the MR mask as a third input (MIX+), from its JSON
    alone, without TensorFlow; None when unreadable (:func:`read_info` reports why when the model is loaded)."""
    try:
        info = json.loads((pathlib.Path(model_dir) / INFO_FILE).read_text())
        value = info["build"]["moving_label_input"]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return value if isinstance(value, bool) else None
