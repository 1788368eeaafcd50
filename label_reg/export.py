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

The model is loaded as a :class:`label_reg.predictor.Predictor` (rebuilt from code, only weight arrays read:
nothing executable is loaded from the model directory, Keras ``safe_mode`` semantics); the serving functions call
its traced forward pass and warping helpers, so the exported graph is the batch-norm-folded network
(:func:`label_reg.inference.fold_batchnorm`), which gives the trained model's inference DDF to float32 rounding. The
version folder is written into a temporary folder and renamed into place (:func:`label_reg.io.atomic_dir`), so a
failed export leaves no partial version behind.
"""
import pathlib
import shutil

from label_reg import io as lio
from label_reg.errors import InputError

__all__ = ["export", "build_serving_module", "SIGNATURE", "LABEL_SIGNATURE"]

SIGNATURE = "serving_default"
LABEL_SIGNATURE = "register_with_label"


def build_serving_module(predictor):
    """A ``tf.Module`` holding a registration :class:`~label_reg.predictor.Predictor`'s model, with the serving
    functions as attributes; returns (module, signatures)."""
    import tensorflow as tf

    spec = predictor.signature()
    takes_label = "moving_label" in predictor.input_names
    three = [spec["moving_image"], spec["fixed_image"],
             tf.TensorSpec(spec["moving_image"].shape, tf.float32, name="moving_label")]

    def run(moving_image, fixed_image, moving_label=None):
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


def export(model_dir, output_dir, version=1, predictor=None):
    """Write the SavedModel of ``model_dir`` into ``output_dir/<version>/`` (replacing an existing version folder
    only once the new one is complete). ``predictor``: that model directory already loaded
    (``Predictor.from_model_dir(model_dir)``). Returns the version folder's path."""
    import tensorflow as tf

    from label_reg import model_dir as md
    from label_reg.predictor import Predictor

    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise InputError("--version", f"must be a non-negative integer (TF Serving version folder), got {version!r}")
    out = pathlib.Path(output_dir)
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a directory")
    model_dir = pathlib.Path(model_dir)
    predictor = predictor or Predictor.from_model_dir(model_dir)
    module, signatures = build_serving_module(predictor)
    target = out / str(version)
    with lio.atomic_dir(target, replace=True) as staging:
        tf.saved_model.save(module, str(staging), signatures=signatures)
        shutil.copyfile(model_dir / md.INFO_FILE, staging / md.INFO_FILE)
    return target
