"""Export a model directory as a TF Serving SavedModel.

``export(model_dir, output_dir, version=1)`` writes ``output_dir/<version>/`` (TF Serving's version folder):

* ``saved_model.pb`` + ``variables/``: a ``tf.Module`` saved with ``tf.saved_model.save``. Its ``serving_default``
  signature takes float32 tensors (None, X, Y, Z, 1), dynamic batch, named ``moving_image``, ``fixed_image`` and,
  for MIX+ models, ``moving_label``, and returns ``ddf`` (None, X, Y, Z, 3) in crop-grid voxels,
  ``warped_moving_image`` (trilinear, edge voxels repeated beyond the border) and ``warped_moving_label``
  (trilinear, zero beyond the border, then >= 0.5). Two-input models' ``serving_default`` returns ``ddf`` and
  ``warped_moving_image``; their extra signature ``register_with_label`` also takes ``moving_label`` and returns
  ``warped_moving_label`` too.
* ``label_reg.json``: a copy of the model's description (the pre-processing the client must apply: spacing,
  crop shape, intensity clipping; see :mod:`label_reg.preprocess`).

The inputs are *pre-processed* volumes (what :func:`label_reg.preprocess.preprocess_images` returns): resampled to
the model's spacing, pre-aligned (MR gland centre of mass onto the TRUS centre), cropped around the TRUS centre,
intensities clipped at the 99th percentile and scaled to [0, 1], masks 0/1; arrays in ITK index order (x, y, z).

The model is rebuilt from code and only weight arrays are read (:func:`label_reg.model_dir.load`): nothing
executable is loaded from the model directory (Keras ``safe_mode`` semantics). The exported graph is the
batch-norm-folded network (:func:`label_reg.inference.fold_batchnorm`), which gives the trained model's inference DDF
to float32 rounding. The version folder is written into a temporary folder and renamed into place, so a failed
export leaves no partial version behind.
"""
import contextlib
import os
import pathlib
import shutil
import uuid

from label_reg.errors import InputError

__all__ = ["export", "build_serving_module", "SIGNATURE", "LABEL_SIGNATURE"]

SIGNATURE = "serving_default"
LABEL_SIGNATURE = "register_with_label"


def build_serving_module(model, moving_label_input, image_shape):
    """A ``tf.Module`` holding ``model`` with the serving functions as attributes; returns (module, signatures)."""
    import tensorflow as tf

    from label_reg.layers import warp

    shape = (None,) + tuple(int(n) for n in image_shape) + (1,)

    def spec(name):
        return tf.TensorSpec(shape, tf.float32, name=name)

    def run(moving_image, fixed_image, moving_label=None):
        inputs = {"moving_image": moving_image, "fixed_image": fixed_image}
        if moving_label_input:
            inputs["moving_label"] = moving_label
        ddf = model(inputs, training=False)
        out = {"ddf": ddf, "warped_moving_image": warp(moving_image, ddf, "replicate")}
        if moving_label is not None:
            soft = warp(moving_label, ddf, "zero")
            out["warped_moving_label"] = tf.cast(soft >= 0.5, tf.float32)
        return out

    module = tf.Module()
    module.model = model
    module.model_variables = list(model.variables)  # tracked explicitly, whatever Keras' own tracking does
    if moving_label_input:
        serve = tf.function(lambda moving_image, fixed_image, moving_label: run(moving_image, fixed_image,
                                                                                moving_label),
                            input_signature=[spec("moving_image"), spec("fixed_image"), spec("moving_label")])
        module.serve = serve
        signatures = {SIGNATURE: serve.get_concrete_function()}
    else:
        serve = tf.function(lambda moving_image, fixed_image: run(moving_image, fixed_image),
                            input_signature=[spec("moving_image"), spec("fixed_image")])
        serve_label = tf.function(lambda moving_image, fixed_image, moving_label: run(moving_image, fixed_image,
                                                                                      moving_label),
                                  input_signature=[spec("moving_image"), spec("fixed_image"), spec("moving_label")])
        module.serve = serve
        module.serve_with_label = serve_label
        signatures = {SIGNATURE: serve.get_concrete_function(),
                      LABEL_SIGNATURE: serve_label.get_concrete_function()}
    return module, signatures


def export(model_dir, output_dir, version=1):
    """Write the SavedModel of ``model_dir`` into ``output_dir/<version>/`` (replacing an existing version folder
    only once the new one is complete). Returns the version folder's path."""
    import tensorflow as tf

    from label_reg import model_dir as md

    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise InputError("--version", f"must be a non-negative integer (TF Serving version folder), got {version!r}")
    out = pathlib.Path(output_dir)
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a directory")
    model_dir = pathlib.Path(model_dir)
    model, info, _config = md.load(model_dir, inference=True)
    build = info["build"]
    module, signatures = build_serving_module(model, build["moving_label_input"], build["image_shape"])

    out.mkdir(parents=True, exist_ok=True)
    target = out / str(version)
    staging = out / f".{version}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        tf.saved_model.save(module, str(staging), signatures=signatures)
        shutil.copyfile(model_dir / md.INFO_FILE, staging / md.INFO_FILE)
        _swap_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _swap_into_place(staging, target):
    """Rename ``staging`` to ``target``; an existing ``target`` is moved aside first and removed afterwards."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
        os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        if old is not None:
            with contextlib.suppress(OSError):
                os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
