"""The one inference path: a Keras network with dict inputs, ready to run on pre-processed volumes.

Every consumer of a network's forward pass goes through a :class:`Predictor`: validation during training
(:mod:`label_reg.train`), ``label-reg register`` (:class:`label_reg.register.Registrar`), ``label-reg evaluate``
(:class:`label_reg.evaluate.Evaluator`), the TF Serving SavedModel (:mod:`label_reg.export`), ``tools/bench.py``
and ``tools/baselines.py``. It owns:

* **Loading** a model directory (:meth:`Predictor.from_model_dir`, through :func:`label_reg.model_dir.load`: only
  weight arrays are read), either the batch-norm-folded inference copy (``folded=True``, the default; see
  :mod:`label_reg.inference`) or the network as trained. A predictor can also wrap a model in memory
  (``Predictor(model)``), e.g. the one being trained.
* **The input names**, read from the model itself (``model.input`` is a dict): ``moving_image``, ``fixed_image``
  and, for MIX+, ``moving_label`` for the registration network; whatever another network declares (a segmenter:
  ``fixed_image`` alone). :meth:`Predictor.feed` picks them from a batch dict, :meth:`Predictor.case_inputs` from
  one pre-processed case.
* **One traced forward** of fixed signature, :attr:`Predictor.forward`: a ``tf.function`` (``training=False``) whose
  input signature is ``{name: float32 (batch_size, X, Y, Z, 1)}`` (``batch_size`` None: any batch, still one trace).
  It returns the network's output tensor (B, X, Y, Z, C): the DDF (C = 3, voxels) of a registration network, a
  probability map (C = 1) of a segmenter.
* **Warping helpers** for registration networks (output C = 3, a ``moving_image`` input): :meth:`Predictor.warp`
  (numpy, every channel of a volume, one trace per boundary) and :meth:`Predictor.register_tensors` (inside a
  ``tf.function``: what the SavedModel serves).

API (arrays are float32 in ITK index order (x, y, z), channels last)::

    Predictor(model, batch_size=None, jit_compile=False, info=None, preprocess_config=None, model_dir=None)
    Predictor.from_model_dir(path, folded=True, batch_size=None) -> Predictor   # InputError on a bad directory
    .model, .info, .preprocess_config, .model_dir     # info/config/model_dir: None for a model in memory
    .input_names       # tuple of str, the model's dict input names in build order
    .image_shape       # (X, Y, Z) of the inputs
    .output_channels   # C
    .is_registration   # C == 3 and a moving_image input
    .signature(batch_size=None) -> {name: tf.TensorSpec((batch_size, X, Y, Z, 1), float32)}
    .forward(inputs)   # traced; dict of (B, X, Y, Z, 1) tensors -> (B, X, Y, Z, C) tensor
    .feed(batch)       # {name: batch[name]} for the input names (tensors as they are)
    .case_inputs(case) # {name: (1, X, Y, Z, 1) float32} from a case dict or Preprocessed
    .predict(case)     # (X, Y, Z, C) numpy output for one case
    .has_global_affine # a registration network with the global affine stage (label_reg.network.stage_model)
    .predict_stages(case)  # (DDF (X, Y, Z, 3) float32, affine (3, 4) float64 or None) from one forward
    .warp(volume, ddf, boundary="zero")           # (X, Y, Z[, K]) warped by a (X, Y, Z, 3) DDF, numpy
    .register_tensors(inputs, moving_label=None)  # {ddf, warped_moving_image[, warped_moving_label]} tensors
"""
from __future__ import annotations

import pathlib
from collections.abc import Mapping

import numpy as np
import tensorflow as tf

from label_reg.errors import InputError

__all__ = ["Predictor"]

DDF_CHANNELS = 3


class Predictor:
    """A network ready for inference (see the module docstring for the whole API).

    model: a ``keras.Model`` with dict inputs, each (B, X, Y, Z, 1). batch_size: the batch dimension of
    :attr:`forward`'s signature (None: any). jit_compile: compile :attr:`forward` with XLA. info,
    preprocess_config, model_dir: what :meth:`from_model_dir` read (kept for the callers' reports).
    """

    def __init__(self, model, batch_size=None, jit_compile=False, info=None, preprocess_config=None,
                 model_dir=None):
        if not isinstance(model.input, dict):
            raise ValueError("Predictor needs a model with dict inputs (keras.Model(inputs={name: ...}))")
        self.model = model
        self.info, self.preprocess_config = info, preprocess_config
        self.model_dir = None if model_dir is None else pathlib.Path(model_dir)
        self.input_names = tuple(model.input)
        first = model.input[self.input_names[0]]
        self.image_shape = tuple(int(n) for n in first.shape[1:4])
        self.output_channels = int(model.output.shape[-1])
        self.is_registration = self.output_channels == DDF_CHANNELS and "moving_image" in self.input_names
        self.batch_size = batch_size
        self.forward = tf.function(lambda inputs: model(inputs, training=False),
                                   input_signature=[self.signature(batch_size)], jit_compile=bool(jit_compile),
                                   reduce_retracing=False)
        self._warps = {}
        from label_reg import network
        self.has_global_affine = self.is_registration and network.has_global_affine(model)
        self._stages = None  # the traced stage model, made at the first predict_stages of a global-affine network

    @classmethod
    def from_model_dir(cls, path, folded=True, batch_size=None):
        """Load a model directory (:func:`label_reg.model_dir.load`). ``folded``: the batch-norm-folded inference
        copy (same output to float32 rounding, faster) instead of the network as trained. Raises InputError when
        the directory is not a usable model, or when its pre-processing crop differs from the network's input."""
        from label_reg import model_dir as md

        path = pathlib.Path(path)
        model, info, config = md.load(path, inference=folded)
        predictor = cls(model, batch_size=batch_size, info=info, preprocess_config=config, model_dir=path)
        if tuple(config.shape) != predictor.image_shape:
            raise InputError(path / md.INFO_FILE, f"pre-processing shape {tuple(config.shape)} differs from the "
                                                  f"network input shape {predictor.image_shape}")
        return predictor

    # -- inputs ----------------------------------------------------------------------------------------------
    def signature(self, batch_size=None):
        """{input name: tf.TensorSpec((batch_size, X, Y, Z, channels), float32, name)} of the model's inputs."""
        return {name: tf.TensorSpec((batch_size,) + tuple(int(n) for n in tensor.shape[1:]), tf.float32, name=name)
                for name, tensor in self.model.input.items()}

    def feed(self, batch):
        """The model's inputs picked from a batch dict (tensors or arrays (B, X, Y, Z, 1), passed as they are)."""
        return {name: batch[name] for name in self.input_names}

    def case_inputs(self, case):
        """The model's inputs for one pre-processed case, batch of 1: {name: (1, X, Y, Z, 1) float32 array}.

        case: a dict (a cached case, :func:`label_reg.data.training_arrays`) or a
        :class:`~label_reg.preprocess.Preprocessed`; each input's array is (X, Y, Z), or (X, Y, Z, K) of which
        channel 0 is taken (the gland, for label inputs).
        """
        out = {}
        for name in self.input_names:
            value = np.asarray(case[name] if isinstance(case, Mapping) else getattr(case, name), np.float32)
            if value.ndim == 4:
                value = value[..., :1]
            elif value.ndim == 3:
                value = value[..., None]
            else:
                raise ValueError(f"input {name!r} must be (X, Y, Z) or (X, Y, Z, K), got shape {value.shape}")
            out[name] = value[None]
        return out

    # -- running ---------------------------------------------------------------------------------------------
    def predict(self, case):
        """The network's output for one case (see :meth:`case_inputs`): (X, Y, Z, C) float32 numpy."""
        inputs = {name: tf.constant(value) for name, value in self.case_inputs(case).items()}
        return np.asarray(self.forward(inputs)[0].numpy(), np.float32)

    def predict_stages(self, case):
        """(DDF (X, Y, Z, 3) float32 voxels, affine (3, 4) float64 or None) for one case: the total DDF and, for a
        network with the global affine stage, the affine alone (crop index x -> moving crop index
        ``A[:, :3] x + A[:, 3]``, :func:`label_reg.network.stage_model`), from one forward pass (traced once)."""
        self._require_registration()
        if not self.has_global_affine:
            return self.predict(case), None
        if self._stages is None:
            from label_reg import network
            stages = network.stage_model(self.model)
            self._stages = tf.function(lambda inputs: stages(inputs, training=False),
                                       input_signature=[self.signature(1)])
        out = self._stages({name: tf.constant(value) for name, value in self.case_inputs(case).items()})
        return (np.asarray(out["ddf"][0].numpy(), np.float32), np.asarray(out["affine"][0].numpy(), np.float64))

    def _require_registration(self):
        if not self.is_registration:
            raise ValueError(f"{self.model.name} is not a registration network (no DDF output)")

    def warp(self, volume, ddf, boundary="zero"):
        """Every channel of ``volume`` (X, Y, Z) or (X, Y, Z, K) warped by ``ddf`` (X, Y, Z, 3) voxels,
        ``out(x) = volume(x + ddf(x))``, trilinear (:func:`label_reg.layers.warp`; ``boundary`` "zero" or
        "replicate"). Returns float32 numpy of the volume's shape. Traced once per boundary."""
        from label_reg.layers import warp

        self._require_registration()
        if boundary not in self._warps:
            shape = (None,) + self.image_shape
            self._warps[boundary] = tf.function(
                lambda volume, ddf: warp(volume, ddf, boundary),
                input_signature=[tf.TensorSpec(shape + (None,), tf.float32),
                                 tf.TensorSpec(shape + (DDF_CHANNELS,), tf.float32)])
        volume = np.asarray(volume, np.float32)
        channels = volume[..., None] if volume.ndim == 3 else volume
        warped = self._warps[boundary](channels[None], np.asarray(ddf, np.float32)[None])[0].numpy()
        return warped[..., 0] if volume.ndim == 3 else warped

    def register_tensors(self, inputs, moving_label=None):
        """Inside a ``tf.function``: {``ddf`` (B, X, Y, Z, 3), ``warped_moving_image`` (edge voxels repeated beyond
        the border)} for a dict of input tensors, plus ``warped_moving_label`` (zero beyond the border, then
        >= 0.5) when ``moving_label`` (B, X, Y, Z, 1) is given. The DDF comes from :attr:`forward`."""
        from label_reg.layers import warp

        self._require_registration()
        ddf = self.forward(inputs)
        out = {"ddf": ddf, "warped_moving_image": warp(inputs["moving_image"], ddf, "replicate")}
        if moving_label is not None:
            out["warped_moving_label"] = tf.cast(warp(moving_label, ddf, "zero") >= 0.5, tf.float32)
        return out
