"""The registration network: a 3-D U-Net that predicts a dense displacement field (DDF) from an MR-TRUS pair.

Architecture (the paper, section 2.3; SPEC section 2):

* Encoder, one level per resolution 1, 1/2, 1/4, 1/8: Conv3D 4x4x4 (stride 1, same) -> LeakyReLU(0.1) ->
  BatchNorm -> MaxPool3D (stride 2). ``base_filters`` (4) filters at full resolution, doubled at every level down;
  the bottom level (1/16) has the same conv block without pooling.
* Decoder, back up to full resolution: Conv3DTranspose 4x4x4 stride 2 -> LeakyReLU -> BatchNorm, added to the
  encoder's skip connection of that level, then a residual block of two 3x3x3 convolutions.
* A DDF head (Conv3D 3x3x3, 3 channels, zero-initialised) at 1/16, 1/8, 1/4, 1/2 and 1. Each coarser DDF is resized
  trilinearly to the next finer level and added, giving the full-resolution DDF. Every head predicts displacements
  in full-resolution voxels (no rescaling between levels), and because every head starts at zero an untrained model
  returns the identity (an all-zero DDF).
* Inputs (dict): ``moving_image`` (MR) and ``fixed_image`` (TRUS), each (B, D0, D1, D2, 1), plus ``moving_label`` (the
  MR gland mask) when ``moving_label_input=True`` (MIX+). The three-input switch is fixed at build time.
* Output: the DDF (B, D0, D1, D2, 3) in voxels, used as ``moving(x + ddf(x))`` (see :class:`label_reg.layers.Warp`).

Spatial shapes that are not multiples of 16 are zero-padded at the far end of each axis inside the model and the
DDF is cropped back, so any shape of at least 16 voxels per axis works.
"""
import keras

from label_reg.layers import PadEnd, Resize3D

LEVELS = 5  # resolutions 1, 1/2, 1/4, 1/8, 1/16
# Moving-average decay of batch-norm statistics: NiftyNet's BN layer default (0.9). Keras' 0.99 leaves the
# inference-mode statistics far behind the weights for the first thousand steps.
BN_MOMENTUM = 0.9
INPUT_NAMES = ("moving_image", "fixed_image", "moving_label")


def _padded(shape):
    factor = 2 ** (LEVELS - 1)
    return tuple(-(-int(n) // factor) * factor for n in shape)


def _conv_block(x, filters, kernel, name):
    x = keras.layers.Conv3D(filters, kernel, padding="same", name=f"{name}_conv")(x)
    x = keras.layers.LeakyReLU(negative_slope=0.1, name=f"{name}_act")(x)
    return keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(x)


def _residual_block(x, filters, name):
    y = keras.layers.Conv3D(filters, 3, padding="same", name=f"{name}_conv1")(x)
    y = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn1")(y)
    y = keras.layers.LeakyReLU(negative_slope=0.1, name=f"{name}_act1")(y)
    y = keras.layers.Conv3D(filters, 3, padding="same", name=f"{name}_conv2")(y)
    y = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn2")(y)
    y = keras.layers.Add(name=f"{name}_add")([x, y])
    return keras.layers.LeakyReLU(negative_slope=0.1, name=f"{name}_act2")(y)


def _ddf_head(x, name):
    return keras.layers.Conv3D(3, 3, padding="same", kernel_initializer="zeros", bias_initializer="zeros",
                               name=name)(x)


def build_model(image_shape=(96, 96, 80), moving_label_input=True, base_filters=4, name=None):
    """Build the registration U-Net (see the module docstring). Returns an uncompiled ``keras.Model``.

    image_shape: spatial shape (D0, D1, D2) in voxels, each at least 16. moving_label_input: add the MR gland mask
    as a third input (MIX+). base_filters: filters at full resolution (the paper: 4).
    """
    image_shape = tuple(int(n) for n in image_shape)
    if len(image_shape) != 3 or min(image_shape) < 2 ** (LEVELS - 1):
        raise ValueError(f"image_shape must be 3 sizes of at least {2 ** (LEVELS - 1)} voxels, got {image_shape}")
    if int(base_filters) < 1:
        raise ValueError(f"base_filters must be >= 1, got {base_filters}")
    names = INPUT_NAMES if moving_label_input else INPUT_NAMES[:2]
    inputs = {n: keras.Input(shape=image_shape + (1,), name=n) for n in names}
    x = keras.layers.Concatenate(name="input_stack")([inputs[n] for n in names])

    padded = _padded(image_shape)
    padding = tuple((0, p - n) for n, p in zip(image_shape, padded))
    if padded != image_shape:
        x = PadEnd([after for _, after in padding], name="pad_to_16")(x)

    filters = [int(base_filters) * 2 ** level for level in range(LEVELS)]
    skips = []
    for level in range(LEVELS - 1):
        x = _conv_block(x, filters[level], 4, f"down{level}")
        skips.append(x)
        x = keras.layers.MaxPooling3D(2, name=f"down{level}_pool")(x)
    x = _conv_block(x, filters[-1], 4, "bottom")

    ddf = _ddf_head(x, f"ddf_level{LEVELS - 1}")
    for level in reversed(range(LEVELS - 1)):
        shape = tuple(n // 2 ** level for n in padded)
        x = keras.layers.Conv3DTranspose(filters[level], 4, strides=2, padding="same", name=f"up{level}_tconv")(x)
        x = keras.layers.LeakyReLU(negative_slope=0.1, name=f"up{level}_act")(x)
        x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"up{level}_bn")(x)
        x = keras.layers.Add(name=f"up{level}_skip")([x, skips[level]])
        x = _residual_block(x, filters[level], f"up{level}_res")
        ddf = keras.layers.Add(name=f"ddf_sum{level}")(
            [Resize3D(shape, name=f"ddf_resize{level}")(ddf), _ddf_head(x, f"ddf_level{level}")])

    if padded != image_shape:
        ddf = keras.layers.Cropping3D(padding, name="crop_from_16")(ddf)
    ddf = keras.layers.Identity(name="ddf")(ddf)
    default_name = "label_reg_mixplus" if moving_label_input else "label_reg"
    return keras.Model(inputs=inputs, outputs=ddf, name=name or default_name)
