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

**Global affine stage** (``global_affine=True``, ``label-reg train --global_affine``): the bottom (1/16) features
also feed an affine head, ``Dense(12)`` (``affine_head``, zero kernel and zero bias) over the features reduced by
``affine_pooling``: ``"average"`` (global average pooling, layer ``affine_head_pool``: one mean per channel, blind to
where in the volume a feature is) or ``"flatten"`` (layer ``affine_head_flatten``: every bottom voxel's features, as
label-reg's and DeepReg's affine heads do, so the head sees where things are; 27x more inputs at the CPU preset;
scaled by 1 / voxels so that it learns at the average-pooled head's pace, see :meth:`Blocks.affine_head`),
whose 12 parameters are the affine's residual from the identity in voxel coordinates about the volume centre
(:func:`label_reg.layers.affine_parts`: a 3x3 linear residual ``R`` and a translation in units of half the volume
extent). The U-Net's DDF becomes the *local* DDF ``l`` (layer ``ddf_local``) and the output is still one total DDF,
the affine applied to the moving image first and ``l`` refining on the affine-aligned image
(:func:`label_reg.layers.compose_affine`):

    ddf(x) = l(x) + a(x + l(x)) = a(x) + (I + R) l(x),      a(x) = R (x - c) + t,  c = (n - 1) / 2

so ``moving(x + ddf(x)) = moving(A(x + l(x)))``. Untrained, both the affine and ``l`` are zero and so is the output.
:func:`stage_model` exposes the stages (the affine as a (B, 3, 4) matrix in grid indices, and ``l``) for
``register``, which writes the affine alone as an ITK transform. The bending energy of the total DDF has no affine
term (second differences of ``a`` vanish); it sees ``(I + R) l``, which for a rigid affine has the bending energy of
``l`` exactly (a rotation keeps the norm of every second-derivative vector).

The topology is written once, in :func:`build_model`; the layers of each block come from a :class:`Blocks` object.
``Blocks`` makes the trainable Keras layers; :class:`label_reg.inference.FoldedBlocks` makes the batch-norm-folded
inference layers from a trained model's weights, so the inference copy is the same network by construction.

Spatial shapes that are not multiples of 16 are zero-padded at the far end of each axis inside the model and the
DDF is cropped back, so any shape of at least 16 voxels per axis works.
"""
import keras

from label_reg.layers import AFFINE_PARAMETERS, AffineMatrix, ComposeAffine, PadEnd, Resize3D

LEVELS = 5  # resolutions 1, 1/2, 1/4, 1/8, 1/16
# Moving-average decay of batch-norm statistics: NiftyNet's BN layer default (0.9). Keras' 0.99 leaves the
# inference-mode statistics far behind the weights for the first thousand steps.
BN_MOMENTUM = 0.9
INPUT_NAMES = ("moving_image", "fixed_image", "moving_label")
BASE_FILTERS = 4  # the paper's filters at full resolution (4, doubled per level to 64)
NEGATIVE_SLOPE = 0.1  # LeakyReLU
AFFINE_HEAD = "affine_head"  # the Dense layer of the global affine stage: its output is the 12 parameters
# How the affine head reduces the bottom features (build_model's affine_pooling). Model directories written before
# the choice existed have "average".
AFFINE_POOLING = ("average", "flatten")
LOCAL_DDF = "ddf_local"  # the U-Net's own (local) DDF in a global-affine network


def padded_shape(shape):
    """The spatial shape rounded up to a multiple of 16 (the model pads to it inside and crops the DDF back)."""
    factor = 2 ** (LEVELS - 1)
    return tuple(-(-int(n) // factor) * factor for n in shape)


def spatial_voxels(x):
    """Voxels D0*D1*D2 of a (B, D0, D1, D2, C) tensor of static shape (what the flattened affine head divides by)."""
    return int(x.shape[1]) * int(x.shape[2]) * int(x.shape[3])


class Blocks:
    """The blocks :func:`build_model` assembles, as trainable Keras layers. Each method takes and returns
    symbolic tensors (B, D0, D1, D2, C) and names its layers ``{name}_...`` (the names the weights files and
    :class:`label_reg.inference.FoldedBlocks` rely on)."""

    def conv_block(self, x, filters, name):
        """Encoder level / bottom: Conv3D 4x4x4 (``{name}_conv``) -> LeakyReLU -> BatchNorm (``{name}_bn``)."""
        x = keras.layers.Conv3D(filters, 4, padding="same", name=f"{name}_conv")(x)
        x = keras.layers.LeakyReLU(negative_slope=NEGATIVE_SLOPE, name=f"{name}_act")(x)
        return keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(x)

    def pool(self, x, name):
        """MaxPool3D stride 2 (``{name}_pool``): half the resolution."""
        return keras.layers.MaxPooling3D(2, name=f"{name}_pool")(x)

    def up_block(self, x, filters, name):
        """Decoder up-sampling: Conv3DTranspose 4x4x4 stride 2 (``{name}_tconv``) -> LeakyReLU -> BatchNorm."""
        x = keras.layers.Conv3DTranspose(filters, 4, strides=2, padding="same", name=f"{name}_tconv")(x)
        x = keras.layers.LeakyReLU(negative_slope=NEGATIVE_SLOPE, name=f"{name}_act")(x)
        return keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(x)

    def skip(self, up, skip, name):
        """The decoder's skip connection: ``up + skip``."""
        return keras.layers.Add(name=name)([up, skip])

    def residual_block(self, x, filters, name):
        """Two 3x3x3 convolutions with batch norms, added to the input, then LeakyReLU."""
        y = keras.layers.Conv3D(filters, 3, padding="same", name=f"{name}_conv1")(x)
        y = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn1")(y)
        y = keras.layers.LeakyReLU(negative_slope=NEGATIVE_SLOPE, name=f"{name}_act1")(y)
        y = keras.layers.Conv3D(filters, 3, padding="same", name=f"{name}_conv2")(y)
        y = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn2")(y)
        y = keras.layers.Add(name=f"{name}_add")([x, y])
        return keras.layers.LeakyReLU(negative_slope=NEGATIVE_SLOPE, name=f"{name}_act2")(y)

    def ddf_head(self, x, name):
        """Conv3D 3x3x3 to the 3 DDF channels, zero-initialised (the untrained model is the identity)."""
        return keras.layers.Conv3D(3, 3, padding="same", kernel_initializer="zeros", bias_initializer="zeros",
                                   name=name)(x)

    def affine_head(self, x, name, pooling="average"):
        """Global affine parameters (B, 12) from features (B, D0, D1, D2, C): ``pooling`` "average" (global average
        pooling, ``{name}_pool``) or "flatten" (``{name}_flatten``, D0*D1*D2*C values in channels-last order, divided
        by the D0*D1*D2 voxels, ``{name}_per_voxel``), then Dense(12) (``{name}``), zero kernel and zero bias (the
        identity affine). The division makes the flattened head a per-voxel-weighted *mean*: Adam moves every
        weight by about the learning rate per step whatever its input's scale, so without it the head's output
        would move V times faster than the average-pooled head's (measured: a 1,728-input head at learning rate
        1e-3 jumped to a reflection within the first steps)."""
        if pooling == "flatten":
            voxels = spatial_voxels(x)
            x = keras.layers.Flatten(name=f"{name}_flatten")(x)
            x = keras.layers.Rescaling(1.0 / voxels, name=f"{name}_per_voxel")(x)
        else:
            x = keras.layers.GlobalAveragePooling3D(name=f"{name}_pool")(x)
        return keras.layers.Dense(AFFINE_PARAMETERS, kernel_initializer="zeros", bias_initializer="zeros",
                                  name=name)(x)


def build_model(image_shape=None, moving_label_input=True, base_filters=BASE_FILTERS, name=None, blocks=None,
                global_affine=False, affine_pooling="average"):
    """Build the registration U-Net (see the module docstring). Returns an uncompiled ``keras.Model``.

    image_shape: spatial shape (D0, D1, D2) in voxels, each at least 16 (default: the pre-processing crop,
    :class:`label_reg.preprocess.PreprocessConfig`). moving_label_input: add the MR gland mask as a third input
    (MIX+). base_filters: filters at full resolution (the paper: 4). blocks: the :class:`Blocks` that make the
    layers (default: trainable Keras layers). global_affine: add the global affine stage (module docstring); the
    output stays one total DDF. affine_pooling: how its head reduces the bottom features, one of
    :data:`AFFINE_POOLING` (ignored without the stage).
    """
    if image_shape is None:
        from label_reg.preprocess import PreprocessConfig
        image_shape = PreprocessConfig().shape
    image_shape = tuple(int(n) for n in image_shape)
    if len(image_shape) != 3 or min(image_shape) < 2 ** (LEVELS - 1):
        raise ValueError(f"image_shape must be 3 sizes of at least {2 ** (LEVELS - 1)} voxels, got {image_shape}")
    if int(base_filters) < 1:
        raise ValueError(f"base_filters must be >= 1, got {base_filters}")
    if not isinstance(global_affine, bool):
        raise ValueError(f"global_affine must be True or False, got {global_affine!r}")
    if affine_pooling not in AFFINE_POOLING:
        raise ValueError(f"affine_pooling must be one of {', '.join(AFFINE_POOLING)}, got {affine_pooling!r}")
    blocks = Blocks() if blocks is None else blocks
    names = INPUT_NAMES if moving_label_input else INPUT_NAMES[:2]
    inputs = {n: keras.Input(shape=image_shape + (1,), name=n) for n in names}
    x = keras.layers.Concatenate(name="input_stack")([inputs[n] for n in names])

    padded = padded_shape(image_shape)
    padding = tuple((0, p - n) for n, p in zip(image_shape, padded))
    if padded != image_shape:
        x = PadEnd([after for _, after in padding], name="pad_to_16")(x)

    filters = [int(base_filters) * 2 ** level for level in range(LEVELS)]
    skips = []
    for level in range(LEVELS - 1):
        x = blocks.conv_block(x, filters[level], f"down{level}")
        skips.append(x)
        x = blocks.pool(x, f"down{level}")
    x = blocks.conv_block(x, filters[-1], "bottom")

    ddf = blocks.ddf_head(x, f"ddf_level{LEVELS - 1}")
    theta = blocks.affine_head(x, AFFINE_HEAD, affine_pooling) if global_affine else None
    for level in reversed(range(LEVELS - 1)):
        shape = tuple(n // 2 ** level for n in padded)
        x = blocks.up_block(x, filters[level], f"up{level}")
        x = blocks.skip(x, skips[level], f"up{level}_skip")
        x = blocks.residual_block(x, filters[level], f"up{level}_res")
        ddf = keras.layers.Add(name=f"ddf_sum{level}")(
            [Resize3D(shape, name=f"ddf_resize{level}")(ddf), blocks.ddf_head(x, f"ddf_level{level}")])

    if padded != image_shape:
        ddf = keras.layers.Cropping3D(padding, name="crop_from_16")(ddf)
    if global_affine:
        ddf = keras.layers.Identity(name=LOCAL_DDF)(ddf)
        ddf = ComposeAffine(image_shape, name="ddf_compose")([ddf, theta])
    ddf = keras.layers.Identity(name="ddf")(ddf)
    default_name = "label_reg_mixplus" if moving_label_input else "label_reg"
    return keras.Model(inputs=inputs, outputs=ddf, name=name or default_name)


def has_global_affine(model):
    """Whether a :func:`build_model` network (or its folded copy) has the global affine stage."""
    return any(layer.name == AFFINE_HEAD for layer in model.layers)


def affine_pooling_of(model):
    """The ``affine_pooling`` a global-affine :func:`build_model` network (or its folded copy) was built with; None
    without the stage."""
    if not has_global_affine(model):
        return None
    return "flatten" if any(layer.name == f"{AFFINE_HEAD}_flatten" for layer in model.layers) else "average"


def affine_parameters_model(model):
    """A ``keras.Model`` with ``model``'s dict inputs (sharing its layers and weights) whose outputs are the dict
    ``{"ddf": total DDF (B, D0, D1, D2, 3), "affine_theta": (B, 12)}``, the affine head's parameters
    (:func:`label_reg.layers.affine_parts`), for a loss that also scores the affine stage alone (``label-reg train
    --affine_label_weight``). Refuses (ValueError) a network without the stage."""
    if not has_global_affine(model):
        raise ValueError(f"model {model.name!r} has no global affine stage (build it with global_affine=True)")
    return keras.Model(model.input, {"ddf": model.output, "affine_theta": model.get_layer(AFFINE_HEAD).output},
                       name=f"{model.name}_with_affine")


def stage_model(model):
    """A ``keras.Model`` with ``model``'s dict inputs (sharing its layers and weights) whose outputs are the dict
    ``{"ddf": total DDF (B, D0, D1, D2, 3), "ddf_local": local DDF (B, D0, D1, D2, 3), "affine": (B, 3, 4)}`` for a
    global-affine network, trained or batch-norm-folded (:func:`label_reg.layers.affine_matrix`: DDF-grid index x ->
    moving index ``affine[:, :3] x + affine[:, 3]``; voxels). None for a network without the stage."""
    if not has_global_affine(model):
        return None
    shape = tuple(int(n) for n in model.output.shape[1:4])
    affine = AffineMatrix(shape, name="affine")(model.get_layer(AFFINE_HEAD).output)
    return keras.Model(model.input, {"ddf": model.output, "ddf_local": model.get_layer(LOCAL_DDF).output,
                                     "affine": affine}, name=f"{model.name}_stages")
