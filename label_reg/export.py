"""Export a model directory as a TF Serving SavedModel.

``export(model_dir, output_dir, version=1)`` writes ``output_dir/<version>/`` (TF Serving's version folder):

* ``saved_model.pb`` + ``variables/``: a ``tf.Module`` saved with ``tf.saved_model.save``. Its ``serving_default``
  signature takes float32 tensors (B, X, Y, Z, 1), named ``moving_image``, ``fixed_image`` and, for MIX+ models,
  ``moving_label``, and returns ``ddf`` (B, X, Y, Z, 3) in crop-grid voxels,
  ``warped_moving_image`` (trilinear, edge voxels repeated beyond the border) and ``warped_moving_label``
  (trilinear, zero beyond the border, then >= 0.5). Two-input models' ``serving_default`` returns ``ddf`` and
  ``warped_moving_image``; their extra signature ``register_with_label`` also takes ``moving_label`` and returns
  ``warped_moving_label`` too. Every input is checked inside the graph before the network runs
  (:func:`check_serving_inputs`): shape (B, X, Y, Z, 1) with the model's X, Y, Z, a batch of at least one, the same
  B for every input, no NaN/Inf voxels. A failed check is an ``InvalidArgumentError`` whose message starts with
  ``label_reg input check:`` and says what is wrong. (The signature declares the spatial sizes as ``-1`` so that
  the check, not a graph error deep inside the network, is what a client with a wrong size meets; the outputs
  declare them.)
* ``label_reg.json``: a copy of the model's description (the pre-processing the client must apply: spacing,
  crop shape, intensity clipping; see :mod:`label_reg.preprocess`).

A model that pre-aligns on the TRUS gland (``preprocess.prealign == "trus_gland"``) carries its TRUS gland segmenter
(:func:`label_reg.model_dir.segmenter_path`); its export has a third signature, ``segment_gland``
(:func:`add_segmenter`): input ``fixed_image`` float32 (B, Xs, Ys, Zs, 1), the whole TRUS on the *segmenter* grid
(:func:`label_reg.segmenter.segmenter_inputs`), output ``gland_probability`` (B, Xs, Ys, Zs, 1). Its
``label_reg.json`` is then the model's description with the ``segmenter`` record (a folder of the model directory)
replaced by what a client needs to use that signature (:func:`serving_description`): the segmenter grid
(``spacing_mm``, ``shape``, ``clip_percentile``, where it is placed) and the rule that turns the probability into
the gland and its centre. Models without a segmenter export as before (two signatures at most, the JSON copied byte
for byte). The README ("Serving with TF Serving") gives the client's request sequence.

The inputs are *pre-processed* volumes (what :func:`label_reg.preprocess.preprocess_images` returns): resampled to
the model's spacing, pre-aligned (MR gland centre of mass onto the TRUS centre), cropped around the TRUS centre,
intensities clipped at the 99th percentile and scaled to [0, 1], masks 0/1; arrays in ITK index order (x, y, z).

The model (and its segmenter) is loaded as a :class:`label_reg.predictor.Predictor` (rebuilt from code, only weight
arrays read: nothing executable is loaded from the model directory, Keras ``safe_mode`` semantics); the serving
functions call its traced forward pass and warping helpers, so the exported graph is the batch-norm-folded network
(:func:`label_reg.inference.fold_batchnorm`), which gives the trained model's inference DDF to float32 rounding. The
output folder is checked writable before the model loads; the version folder is written into a temporary folder,
verified by loading it back (:func:`verify_saved_model`) and renamed into place (:func:`label_reg.io.atomic_dir`), so
a failed or truncated export is an error (``OutputError``) and leaves no partial version behind.
"""
import json
import pathlib
import re
import shutil

from label_reg import io as lio
from label_reg.errors import InputError, OutputError

__all__ = ["export", "build_serving_module", "check_serving_inputs", "verify_saved_model", "carried_segmenter",
           "add_segmenter", "serving_description", "SIGNATURE", "LABEL_SIGNATURE", "SEGMENT_SIGNATURE", "INPUT_CHECK"]

SIGNATURE = "serving_default"
LABEL_SIGNATURE = "register_with_label"
SEGMENT_SIGNATURE = "segment_gland"
INPUT_CHECK = "label_reg input check:"  # how every message of check_serving_inputs starts
SERVING_INPUT_SHAPE = (None, None, None, None, 1)  # spatial sizes checked in the graph (check_serving_inputs)


def check_serving_inputs(inputs, image_shape):
    """In-graph checks of the serving inputs, run before the network: returns the inputs, each gated on every check
    and with its static shape (None, X, Y, Z, 1) restored for the network.

    inputs: {name: float32 tensor}, any shape at graph level; image_shape: the model's (X, Y, Z). Checked with
    ``tf.debugging`` asserts, each message starting with :data:`INPUT_CHECK`: rank 5 and shape (B, X, Y, Z, 1), a
    batch of at least one sample, the same B for every input (that of the first), and finite voxels (NaN/Inf would
    otherwise become a gather index of -2**31 deep in the warp).
    """
    import tensorflow as tf

    size = [int(n) for n in image_shape]
    wanted = tf.constant(size + [1], tf.int32)
    names = list(inputs)
    first_batch = None
    checks, finite = [], {}
    for name in names:
        x = inputs[name]
        shape = tf.shape(x, out_type=tf.int32)
        padded = tf.concat([shape, tf.zeros([5], tf.int32)], axis=0)[:5]
        shape_ok = tf.logical_and(tf.equal(tf.size(shape), 5), tf.reduce_all(tf.equal(padded[1:], wanted)))
        checks.append(tf.debugging.Assert(shape_ok, [f"{INPUT_CHECK} {name} must have shape (batch, "
                                                     f"{', '.join(map(str, size))}, 1); it has shape", shape],
                                          name=f"check_{name}_shape", summarize=8))
        batch = padded[0]
        checks.append(tf.debugging.Assert(batch > 0, [f"{INPUT_CHECK} {name} holds an empty batch (0 samples)"],
                                          name=f"check_{name}_batch"))
        if first_batch is None:
            first_batch = batch
        else:
            checks.append(tf.debugging.Assert(tf.equal(batch, first_batch), [
                f"{INPUT_CHECK} {name} has batch size", batch, f"but {names[0]} has", first_batch],
                name=f"check_{name}_same_batch"))
        finite[name] = tf.debugging.check_numerics(x, f"{INPUT_CHECK} {name} holds NaN or Inf voxels")
    out = {}
    for name in names:
        with tf.control_dependencies(checks):
            out[name] = tf.ensure_shape(tf.identity(finite[name]), [None] + size + [1])
    return out


def build_serving_module(predictor):
    """A ``tf.Module`` holding a registration :class:`~label_reg.predictor.Predictor`'s model, with the serving
    functions as attributes; returns (module, signatures)."""
    import tensorflow as tf

    takes_label = "moving_label" in predictor.input_names
    three = [tf.TensorSpec(SERVING_INPUT_SHAPE, tf.float32, name=name)
             for name in ("moving_image", "fixed_image", "moving_label")]

    def run(moving_image, fixed_image, moving_label=None):
        given = {"moving_image": moving_image, "fixed_image": fixed_image}
        if moving_label is not None:
            given["moving_label"] = moving_label
        checked = check_serving_inputs(given, predictor.image_shape)
        moving_image, fixed_image = checked["moving_image"], checked["fixed_image"]
        moving_label = checked.get("moving_label")
        inputs = {"moving_image": moving_image, "fixed_image": fixed_image}
        if takes_label:
            inputs["moving_label"] = moving_label
        return predictor.register_tensors(inputs, moving_label)

    with_label = tf.function(lambda moving_image, fixed_image, moving_label: run(moving_image, fixed_image,
                                                                                 moving_label),
                             input_signature=three)
    module = tf.Module()
    module.model = predictor.model
    module.model_variables = list(predictor.model.variables)  # tracked explicitly, whatever Keras' own tracking does
    if takes_label:
        module.serve = with_label
        return module, {SIGNATURE: with_label.get_concrete_function()}
    module.serve = tf.function(lambda moving_image, fixed_image: run(moving_image, fixed_image),
                               input_signature=three[:2])
    module.serve_with_label = with_label
    return module, {SIGNATURE: module.serve.get_concrete_function(),
                    LABEL_SIGNATURE: with_label.get_concrete_function()}


def verify_saved_model(path, target, signature_names):
    """Check a SavedModel just written by loading it back: its signatures must be there and its variables read
    (TensorFlow checks every variable's checksum while restoring). Raises :class:`OutputError` naming ``target``."""
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(str(path))
        missing = sorted(set(signature_names) - set(loaded.signatures))
    except (OSError, ValueError, tf.errors.OpError) as err:
        raise OutputError(target, f"write failed: the SavedModel does not load back "
                                  f"({_first_line(err)})") from None
    if missing:
        raise OutputError(target, f"write failed: the SavedModel lacks signature(s) {missing}")


def _first_line(err):
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", getattr(err, "message", None) or str(err))
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), type(err).__name__)


def export(model_dir, output_dir, version=1, predictor=None):
    """Write the SavedModel of ``model_dir`` into ``output_dir/<version>/`` (replacing an existing version folder
    only once the new one is complete and verified). ``predictor``: that model directory already loaded
    (``Predictor.from_model_dir(model_dir)``). Returns the version folder's path."""
    import tensorflow as tf

    from label_reg import model_dir as md
    from label_reg.predictor import Predictor

    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise InputError("--version", f"must be a non-negative integer (TF Serving version folder), got {version!r}")
    model_dir = pathlib.Path(model_dir)
    weights = model_dir / md.WEIGHTS_FILE
    expected = 4 * weights.stat().st_size + (1 << 22) if weights.is_file() else 0  # SavedModel + its staging copy
    out = lio.check_output_folder(output_dir, expected)  # before the model loads
    predictor = predictor or Predictor.from_model_dir(model_dir)
    module, signatures = build_serving_module(predictor)
    info, _ = md.read_info(model_dir)
    finder = carried_segmenter(model_dir, info)
    if finder is not None:
        signatures = add_segmenter(module, signatures, finder)
    target = out / str(version)
    with lio.atomic_dir(target, replace=True) as staging:
        try:
            tf.saved_model.save(module, str(staging), signatures=signatures)
        except tf.errors.OpError as err:
            raise OutputError(target, f"cannot write the SavedModel ({_first_line(err)})") from None
        if finder is None:
            shutil.copyfile(model_dir / md.INFO_FILE, staging / md.INFO_FILE)
        else:
            lio.write_text(staging / md.INFO_FILE, json.dumps(serving_description(info, finder), indent=2,
                                                              sort_keys=True) + "\n")
        verify_saved_model(staging, target, signatures)
    return target


def carried_segmenter(model_dir, info):
    """The segmenter a registration model directory carries (:func:`label_reg.model_dir.segmenter_path`) as a
    :class:`label_reg.segmenter.GlandFinder` whose predictor takes any batch, or None when it carries none.
    InputError when the carried folder is not a segmenter model directory."""
    from label_reg import model_dir as md
    from label_reg.predictor import Predictor
    from label_reg.segmenter import GlandFinder

    path = md.segmenter_path(model_dir, info)
    if path is None:
        return None
    seg_info, _ = md.read_info(path)
    if seg_info.get("network") != md.SEGMENTER:
        raise InputError(path, f"is not a segmenter model directory (network "
                               f"{seg_info.get('network', md.REGISTRATION)!r})")
    return GlandFinder(Predictor.from_model_dir(path, folded=True, batch_size=None))


def add_segmenter(module, signatures, finder):
    """Add a TRUS gland segmenter to a serving module (:func:`build_serving_module`): the ``segment_gland``
    function and the segmenter's variables as attributes; returns ``signatures`` plus ``segment_gland``.

    finder: a :class:`label_reg.segmenter.GlandFinder` whose predictor takes any batch (``batch_size`` None). The
    signature takes ``fixed_image`` float32 (B, Xs, Ys, Zs, 1) on the segmenter grid (Xs, Ys, Zs: the segmenter's
    ``shape``) and returns ``gland_probability`` (B, Xs, Ys, Zs, 1) in [0, 1], the predictor's traced forward pass
    (the same as :meth:`~label_reg.segmenter.GlandFinder.probability`). Its input is checked as the registration
    signatures' are (:func:`check_serving_inputs`).
    """
    import tensorflow as tf

    from label_reg.segmenter import INPUT_NAME, OUTPUT_NAME

    predictor = finder.predictor
    if predictor.batch_size is not None:
        raise ValueError("the segmenter's predictor must take any batch (Predictor(..., batch_size=None))")
    if tuple(predictor.input_names) != (INPUT_NAME,) or predictor.output_channels != 1:
        raise ValueError(f"{predictor.model.name} is not a segmenter (one input {INPUT_NAME!r}, one output channel)")
    module.segment = tf.function(
        lambda fixed_image: {OUTPUT_NAME: predictor.forward(check_serving_inputs({INPUT_NAME: fixed_image},
                                                                                 predictor.image_shape))},
        input_signature=[tf.TensorSpec(SERVING_INPUT_SHAPE, tf.float32, name=INPUT_NAME)])
    module.segmenter_model = predictor.model
    module.segmenter_variables = list(predictor.model.variables)
    return {**signatures, SEGMENT_SIGNATURE: module.segment.get_concrete_function()}


def serving_description(info, finder):
    """The export folder's ``label_reg.json`` for a model carrying a segmenter: ``info`` (the model's parsed
    description) with its ``segmenter`` record replaced by the section a TF Serving client needs for
    ``segment_gland``: the signature's names; ``preprocess``, the segmenter grid (``spacing_mm``, ``shape`` (x, y, z)
    voxels, ``clip_percentile``, and how the grid is placed on the TRUS); ``mask``, how the probability becomes the
    gland and its centre (:func:`label_reg.segmenter.estimate_gland`); the segmenter's ``build``, ``best_step`` and
    ``validation`` and the folder it was copied from (``source``)."""
    from label_reg.preprocess import THRESHOLD
    from label_reg.segmenter import CONNECTIVITY, INPUT_NAME, OUTPUT_NAME

    grid = finder.grid_config
    seg_info = finder.predictor.info or {}
    section = {
        "signature": SEGMENT_SIGNATURE, "input": INPUT_NAME, "output": OUTPUT_NAME,
        "preprocess": {"spacing_mm": grid.spacing_mm, "shape": list(grid.shape),
                       "clip_percentile": grid.clip_percentile,
                       "placement": "TRUS direction, centred on the TRUS volume centre (the world point of continuous "
                                    "index (size - 1) / 2): origin = centre - direction @ ((shape - 1) / 2 * "
                                    "spacing_mm); TRUS resampled with cubic B-spline (its minimum outside its field of "
                                    "view), clipped to [minimum, clip_percentile percentile] of its original voxels "
                                    "and scaled to [0, 1]"},
        "mask": {"threshold": THRESHOLD, "connectivity": CONNECTIVITY,  # label_reg.segmenter.largest_component
                 "rule": "largest 26-connected component of gland_probability >= threshold; none: no gland found",
                 "centre": "mean index of that component's voxels, mapped to TRUS world LPS mm through the grid: "
                           "the point the MR gland centre of mass is put on (preprocess.prealign trus_gland)"},
        "build": seg_info.get("build"), "best_step": seg_info.get("best_step"),
        "validation": seg_info.get("validation"), "source": (info.get("segmenter") or {}).get("source"),
    }
    return {**info, "segmenter": section}
