"""Inference-only copy of a trained network with its batch normalisation folded away, and its FLOP count.

:func:`fold_batchnorm` builds the :func:`label_reg.network.build_model` network again, with :class:`FoldedBlocks`
making its layers from the trained model's weights (so the topology is written once, in :mod:`label_reg.network`),
and removes every ``BatchNormalization`` layer whose inference-mode affine ``y = a * x + c`` (``a = gamma / sqrt(var + eps)``,
``c = beta - a * mean``, per channel) can be absorbed exactly. Which folds are exact, BN by BN:

* **Residual blocks, conv -> BN** (``up*_res_bn1``, ``up*_res_bn2``): the BN is folded into the convolution that
  feeds it, ``W' = a W``, ``b' = a b + c``. Exact for any sign of ``a``.
* **Encoder, decoder up-sampling and bottom, conv -> LeakyReLU -> BN** (``down*_bn``, ``up*_bn``, ``bottom_bn``):
  LeakyReLU is positively homogeneous, ``leaky(a x) = a leaky(x)`` for ``a >= 0``, so the scale goes into the
  convolution *before* the activation and only the shift ``c`` is left, applied after it. The shift is then
  carried forward, never into a following convolution: a 'same' convolution zero-pads its input, and the padded
  zeros would have had to be ``-c`` (folding ``c`` into the next bias is wrong at the volume's border, by up to the
  border taps' share of ``W c``). Instead the shift rides along as long as that is exact and is added once, where
  it is needed:

  - through ``MaxPooling3D`` (``max(x + c) = max(x) + c``), so an encoder level adds its shift on the pooled tensor,
    8 times smaller than the full-resolution one it was computed on;
  - through the decoder's skip ``Add``: the encoder shift and the up-sampling shift are summed into one per-channel
    constant added with the skip (one full-resolution pass instead of the two BNs' four).

  A BN with a negative ``a`` in any channel (LeakyReLU is not homogeneous for negative factors and max-pooling does
  not commute with a sign flip) is kept as a per-channel affine layer ``x * a + c`` right where it was.

The folded model gives the DDF of ``model(x, training=False)`` up to float32 rounding (~1e-6 relative), has the
same dict inputs and output, and is for inference only (it has no BN layers to train). Convolutions are written with
``tf.nn`` ops and ``BiasAdd`` so TensorFlow's graph rewrite can fuse convolution, bias and LeakyReLU into one kernel;
the LeakyReLU that closes a residual block is written as ``max(s, 0.1 s)`` because TF 2.21's oneDNN rewrite fuses
Conv3D + BiasAdd + Add + LeakyRelu into a kernel that ignores ``alpha`` (see :class:`AddLeakyReLU`).

The fixed-signature forward pass that runs either model is :class:`label_reg.predictor.Predictor`.
"""
import keras
import numpy as np
import tensorflow as tf

from label_reg import network
from label_reg.layers import Resize3D

__all__ = ["fold_batchnorm", "FoldedBlocks", "FusedConv3D", "ChannelShift", "ChannelAffine", "AddShift",
           "AddLeakyReLU", "bn_affine", "count_forward_flops"]

NEGATIVE_SLOPE = network.NEGATIVE_SLOPE


# ------------------------------------------------------------------------------------------------ layers
@keras.saving.register_keras_serializable(package="label_reg")
class FusedConv3D(keras.layers.Layer):
    """3-D convolution (or transposed convolution) + bias (+ LeakyReLU), 'same' padding, channels last.

    Weights as the Keras layers they replace: ``kernel`` (k, k, k, in, out) for a convolution and (k, k, k, out, in)
    for a transposed one (``transpose=True``, output size = input size x ``strides``); ``bias`` (out,).
    ``negative_slope=None`` means no activation.
    """

    def __init__(self, filters, kernel_size, strides=1, transpose=False, negative_slope=None, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.kernel_size = int(kernel_size)
        self.strides = int(strides)
        self.transpose = bool(transpose)
        self.negative_slope = None if negative_slope is None else float(negative_slope)

    def build(self, input_shape):
        channels = int(input_shape[-1])
        k = (self.kernel_size,) * 3
        shape = k + ((self.filters, channels) if self.transpose else (channels, self.filters))
        self.kernel = self.add_weight(name="kernel", shape=shape, initializer="zeros", trainable=False)
        self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer="zeros", trainable=False)

    def call(self, inputs):
        strides = [1, self.strides, self.strides, self.strides, 1]
        if self.transpose:
            shape = tf.shape(inputs)
            out_shape = tf.stack([shape[0], shape[1] * self.strides, shape[2] * self.strides,
                                  shape[3] * self.strides, self.filters])
            x = tf.nn.conv3d_transpose(inputs, self.kernel, out_shape, strides, padding="SAME")
        else:
            x = tf.nn.conv3d(inputs, self.kernel, strides, padding="SAME")
        x = tf.nn.bias_add(x, self.bias)
        if self.negative_slope is not None:
            x = tf.nn.leaky_relu(x, alpha=self.negative_slope)
        return x

    def compute_output_shape(self, input_shape):
        factor = self.strides if self.transpose else 1
        divide = 1 if self.transpose else self.strides
        spatial = tuple(None if n is None else (n * factor if self.transpose else -(-n // divide))
                        for n in input_shape[1:4])
        return (input_shape[0],) + spatial + (self.filters,)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size,
                "strides": self.strides, "transpose": self.transpose, "negative_slope": self.negative_slope}


class _PerChannel(keras.layers.Layer):
    """Base of the folded model's per-channel constant layers: ``channels`` values per vector, not trained."""

    def __init__(self, channels, **kwargs):
        super().__init__(**kwargs)
        self.channels = int(channels)

    def _vector(self, name, initializer):
        return self.add_weight(name=name, shape=(self.channels,), initializer=initializer, trainable=False)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "channels": self.channels}


@keras.saving.register_keras_serializable(package="label_reg")
class ChannelShift(_PerChannel):
    """``x + shift``, one constant per channel (last axis)."""

    def build(self, input_shape):
        self.shift = self._vector("shift", "zeros")

    def call(self, inputs):
        return tf.nn.bias_add(inputs, self.shift)


@keras.saving.register_keras_serializable(package="label_reg")
class ChannelAffine(_PerChannel):
    """``x * scale + shift``, one pair per channel (last axis): an inference-mode batch norm that could not fold."""

    def build(self, input_shape):
        self.scale = self._vector("scale", "ones")
        self.shift = self._vector("shift", "zeros")

    def call(self, inputs):
        return tf.nn.bias_add(inputs * self.scale, self.shift)


@keras.saving.register_keras_serializable(package="label_reg")
class AddShift(_PerChannel):
    """``sum(inputs) + shift``, one constant per channel: a skip connection with the shifts it carries."""

    def build(self, input_shape):
        self.shift = self._vector("shift", "zeros")

    def call(self, inputs):
        return tf.nn.bias_add(tf.add_n(list(inputs)), self.shift)

    def compute_output_shape(self, input_shape):
        return input_shape[0]


@keras.saving.register_keras_serializable(package="label_reg")
class AddLeakyReLU(keras.layers.Layer):
    """``leaky(a + b)`` written as ``max(s, slope * s)``: the end of a residual block.

    Not ``tf.nn.leaky_relu``: TensorFlow 2.21's oneDNN graph rewrite fuses Conv3D + BiasAdd + Add + LeakyRelu into one
    kernel that ignores ``alpha`` (it applies 0.2), so a folded residual block would be wrong inside a
    ``tf.function`` while right eagerly. ``max`` is the same function (slope < 1) and is left alone by the rewrite.
    """

    def __init__(self, negative_slope=NEGATIVE_SLOPE, **kwargs):
        super().__init__(**kwargs)
        self.negative_slope = float(negative_slope)

    def call(self, inputs):
        total = inputs[0] + inputs[1]
        return tf.maximum(total, self.negative_slope * total)

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        return {**super().get_config(), "negative_slope": self.negative_slope}


# ------------------------------------------------------------------------------------------------ folding
def bn_affine(layer):
    """Inference-mode affine of a Keras ``BatchNormalization`` layer: (a, c) float64 with ``bn(x) = a x + c``."""
    mean = np.asarray(layer.moving_mean.numpy(), np.float64)
    var = np.asarray(layer.moving_variance.numpy(), np.float64)
    gamma = np.asarray(layer.gamma.numpy(), np.float64) if layer.scale else np.ones_like(mean)
    beta = np.asarray(layer.beta.numpy(), np.float64) if layer.center else np.zeros_like(mean)
    a = gamma / np.sqrt(var + float(layer.epsilon))
    return a, beta - a * mean


def _conv_weights(layer):
    kernel = np.asarray(layer.kernel.numpy(), np.float64)
    bias = np.asarray(layer.bias.numpy(), np.float64) if layer.use_bias else np.zeros(layer.filters)
    return kernel, bias


class FoldedBlocks(network.Blocks):
    """:class:`label_reg.network.Blocks` that make the folded inference layers from a trained ``model``'s weights
    (found by the layer names the blocks use). A block's output may carry a per-channel shift that has not been
    added yet (see the module docstring): it is added where a convolution first reads the tensor
    (:meth:`_settle`), or summed into the skip connection that takes it."""

    def __init__(self, model):
        self.src = model
        self.weights = []  # (layer, [arrays]) set once the model is built
        self.report = {}  # BN layer name -> what became of it
        self._pending = {}  # id(tensor) -> [tensor, shift, name of the layer that adds it, that layer's output]

    def layer(self, name):
        try:
            return self.src.get_layer(name)
        except ValueError:
            raise ValueError(f"fold_batchnorm: layer {name!r} not found; the model must come from "
                             "label_reg.network.build_model") from None

    def _place(self, layer, arrays):
        self.weights.append((layer, [np.asarray(a, np.float32) for a in arrays]))
        return layer

    def _carry(self, x, shift, name):
        if shift is not None:
            self._pending[id(x)] = [x, shift, name, None]
        return x

    def _settle(self, x):
        """``x`` with its pending shift added (one layer, however many convolutions read it)."""
        entry = self._pending.get(id(x))
        if entry is None:
            return x
        if entry[3] is None:
            entry[3] = self._place(ChannelShift(len(entry[1]), name=entry[2]), [entry[1]])(x)
        return entry[3]

    def _conv_act_bn(self, x, conv_name, bn_name, transpose=False):
        """conv -> LeakyReLU -> BN: returns (tensor, pending shift or None)."""
        conv, bn = self.layer(conv_name), self.layer(bn_name)
        kernel, bias = _conv_weights(conv)
        a, c = bn_affine(bn)
        fold = bool(np.all(a >= 0))
        if fold:
            kernel = kernel * (a[:, None] if transpose else a)  # transposed kernels are (k, k, k, out, in)
            bias = bias * a
        fused = self._place(FusedConv3D(conv.filters, conv.kernel_size[0], strides=int(conv.strides[0]),
                                        transpose=transpose, negative_slope=NEGATIVE_SLOPE, name=conv_name),
                            [kernel, bias])
        y = fused(self._settle(x))
        if fold:
            self.report[bn_name] = "scale into the preceding convolution, shift carried forward"
            return y, c
        self.report[bn_name] = "kept as a per-channel affine (negative scale)"
        return self._place(ChannelAffine(len(a), name=bn_name), [a, c])(y), None

    def _conv_bn(self, x, conv_name, bn_name, negative_slope=None):
        """conv -> BN (-> LeakyReLU): BN folded into the convolution."""
        conv, bn = self.layer(conv_name), self.layer(bn_name)
        kernel, bias = _conv_weights(conv)
        a, c = bn_affine(bn)
        self.report[bn_name] = "folded into the preceding convolution"
        fused = FusedConv3D(conv.filters, conv.kernel_size[0], negative_slope=negative_slope, name=conv_name)
        return self._place(fused, [kernel * a, bias * a + c])(self._settle(x))

    # -- the blocks of label_reg.network.build_model -------------------------------------------------------
    def conv_block(self, x, filters, name):
        y, shift = self._conv_act_bn(x, f"{name}_conv", f"{name}_bn")
        return self._carry(y, shift, f"{name}_shift")

    def pool(self, x, name):
        """max(x + c) = max(x) + c: a pending shift moves past the pooling, to be added 8x cheaper."""
        y = keras.layers.MaxPooling3D(2, name=f"{name}_pool")(x)
        entry = self._pending.get(id(x))
        return y if entry is None else self._carry(y, entry[1], entry[2])

    def up_block(self, x, filters, name):
        y, shift = self._conv_act_bn(x, f"{name}_tconv", f"{name}_bn", transpose=True)
        return self._carry(y, shift, f"{name}_shift")

    def skip(self, up, skip, name):
        """The pending shifts of both inputs are added once, with their sum."""
        shifts = [self._pending[id(t)][1] for t in (up, skip) if id(t) in self._pending]
        if not shifts:
            return keras.layers.Add(name=name)([up, skip])
        total = np.sum(shifts, axis=0)
        return self._place(AddShift(len(total), name=name), [total])([up, skip])

    def residual_block(self, x, filters, name):
        x = self._settle(x)
        y = self._conv_bn(x, f"{name}_conv1", f"{name}_bn1", negative_slope=NEGATIVE_SLOPE)
        y = self._conv_bn(y, f"{name}_conv2", f"{name}_bn2")
        return AddLeakyReLU(NEGATIVE_SLOPE, name=f"{name}_act2")([x, y])

    def ddf_head(self, x, name):
        conv = self.layer(name)
        return self._place(FusedConv3D(conv.filters, conv.kernel_size[0], name=name),
                           _conv_weights(conv))(self._settle(x))

    def affine_head(self, x, name, pooling="average"):
        """The global affine head, its Dense weights copied. A pending per-channel shift ``c`` of the features passes
        the reduction and is folded into the Dense bias: average pooling gives ``mean(x + c) = mean(x) + c``, so
        ``b' = b + c W``; the flattened head (channels last, divided by the V voxels) gives
        ``(flat(x) + tile(c, V)) / V``, so ``b' = b + tile(c, V) W / V``."""
        dense = self.layer(name)
        kernel = np.asarray(dense.kernel.numpy(), np.float64)
        bias = np.asarray(dense.bias.numpy(), np.float64)
        entry = self._pending.get(id(x))
        voxels = network.spatial_voxels(x) if pooling == "flatten" else 1
        if entry is not None:
            shift = np.asarray(entry[1], np.float64)
            bias = bias + np.tile(shift, kernel.shape[0] // len(shift)) @ kernel / voxels
        if pooling == "flatten":
            reduced = keras.layers.Flatten(name=f"{name}_flatten")(x)
            reduced = keras.layers.Rescaling(1.0 / voxels, name=f"{name}_per_voxel")(reduced)
        else:
            reduced = keras.layers.GlobalAveragePooling3D(name=f"{name}_pool")(x)
        return self._place(keras.layers.Dense(dense.units, name=name), [kernel, bias])(reduced)


def fold_batchnorm(model):
    """Inference-only copy of a :func:`label_reg.network.build_model` network with its batch norms folded.

    See the module docstring for which folds are made and why they are exact. Returns a ``keras.Model`` with the
    same dict inputs and DDF output as ``model`` (and, for a global-affine network, the same affine head, so
    :func:`label_reg.network.stage_model` works on it too); ``model(x, training=False)`` and the result agree to float32
    rounding. The returned model has a ``fold_report`` attribute: {BN layer name: what became of it}.
    """
    blocks = FoldedBlocks(model)
    base_filters = int(blocks.layer("down0_conv").filters)
    names = list(model.input)
    image_shape = tuple(int(n) for n in model.input[names[0]].shape[1:4])
    folded = network.build_model(image_shape, "moving_label" in names, base_filters, name=f"{model.name}_folded",
                                 blocks=blocks, global_affine=network.has_global_affine(model),
                                 affine_pooling=network.affine_pooling_of(model) or "average")
    for layer, arrays in blocks.weights:
        layer.set_weights(arrays)
    bns = sorted(l.name for l in model.layers if isinstance(l, keras.layers.BatchNormalization))
    missing = sorted(set(bns) - set(blocks.report))
    if missing:
        raise ValueError(f"fold_batchnorm: batch norms not handled: {missing}")
    folded.fold_report = dict(sorted(blocks.report.items()))
    folded.base_filters = base_filters
    return folded


# ------------------------------------------------------------------------------------------------ FLOPs
def count_forward_flops(model, batch_size=1):
    """Analytic forward FLOPs of a registration model (original or folded) for one batch.

    Convolutions count 2 x multiply-accumulates (a transposed convolution: 2 x input voxels x k^3 x in x out, the
    scatter form); bias adds, activations, batch norms (2 per element), adds, pooling (1 per input element),
    resizes (~ 7 x 3 per output element, two bilinear passes) and per-channel affines count 1-2 per element.
    Returns {"conv": ..., "other": ..., "total": ...}.
    """
    conv = other = 0.0
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        out_shape = layer.output.shape
        out_elems = float(np.prod([int(n) for n in out_shape[1:]]))
        in_shape = layer.input.shape if not isinstance(layer.input, (list, tuple)) else layer.input[0].shape
        in_elems = float(np.prod([int(n) for n in in_shape[1:]]))
        kernel = getattr(layer, "kernel", None)
        if kernel is not None and len(kernel.shape) == 5:
            k = float(np.prod(kernel.shape[:3]))
            transpose = isinstance(layer, keras.layers.Conv3DTranspose) or getattr(layer, "transpose", False)
            if transpose:
                cout, cin = int(kernel.shape[3]), int(kernel.shape[4])
                conv += 2.0 * (in_elems / cin) * k * cin * cout
            else:
                cin, cout = int(kernel.shape[3]), int(kernel.shape[4])
                conv += 2.0 * (out_elems / cout) * k * cin * cout
            other += out_elems  # bias
            if getattr(layer, "negative_slope", None) is not None:
                other += out_elems
        elif isinstance(layer, keras.layers.BatchNormalization):
            other += 2.0 * out_elems
        elif isinstance(layer, (ChannelAffine, AddShift, AddLeakyReLU)):
            other += 2.0 * out_elems
        elif isinstance(layer, (ChannelShift, keras.layers.LeakyReLU, keras.layers.Add)):
            other += out_elems
        elif isinstance(layer, keras.layers.MaxPooling3D):
            other += in_elems
        elif isinstance(layer, Resize3D):
            other += 21.0 * out_elems
    return {"conv": conv * batch_size, "other": other * batch_size, "total": (conv + other) * batch_size}
