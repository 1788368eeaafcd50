"""Keras layers for registration: trilinear warping, 3-D resizing, Gaussian smoothing and affine augmentation.

Conventions shared by every layer here:

* Tensors are channels-last, ``(B, D0, D1, D2, C)``; the three spatial axes are the volume's array axes in ITK
  index order (x, y, z), see :mod:`label_reg`.
* A dense displacement field (DDF) has 3 channels; channel ``c`` is the displacement along spatial axis ``c``,
  measured in voxels of the grid it lives on.
* Warping samples the moving volume at displaced positions: ``out(x) = image(x + ddf(x))`` (a "pull" warp), with
  trilinear interpolation. ``boundary`` says what lies beyond the edge: ``"replicate"`` repeats the edge voxel
  (``scipy.ndimage.map_coordinates(order=1, mode="nearest")``), ``"zero"`` is zero beyond the edge and interpolates
  towards it (``mode="grid-constant", cval=0``).
"""
import math

import keras
import numpy as np
import tensorflow as tf

BOUNDARIES = ("replicate", "zero")


def _check_boundary(boundary):
    if boundary not in BOUNDARIES:
        raise ValueError(f"boundary must be one of {BOUNDARIES}, got {boundary!r}")
    return boundary


def identity_grid(spatial_shape, dtype=tf.float32):
    """Voxel coordinates of a grid: tensor (D0, D1, D2, 3) with value (i, j, k) at index (i, j, k)."""
    axes = [tf.range(n, dtype=dtype) for n in tf.unstack(tf.convert_to_tensor(spatial_shape))]
    return tf.stack(tf.meshgrid(*axes, indexing="ij"), axis=-1)


def sample_trilinear(image, coords, boundary="replicate"):
    """Trilinear sampling of ``image`` (B, D0, D1, D2, C) at voxel ``coords`` (B, P0, P1, P2, 3).

    Returns (B, P0, P1, P2, C). Differentiable with respect to ``image`` and ``coords``. A coordinate that is an
    exact integer inside the volume returns that voxel exactly (the other corners get weight 0).

    The eight corner values are gathered once and interpolated as nested linear interpolations (axis 2, then 1,
    then 0). The gradient is written by hand from those same corner values: with respect to the coordinates it is
    the interpolated difference of the corners along each axis (zero where ``replicate`` clipped the coordinate,
    as ``tf.clip_by_value``'s gradient is); with respect to the image it is the upstream gradient scattered to the
    corners with their weights (a graph that does not need it prunes it). Letting autodiff differentiate the
    weight products made the backward pass of a training-size warp twice as slow as the forward.
    """
    _check_boundary(boundary)
    image = tf.convert_to_tensor(image)
    coords = tf.cast(coords, image.dtype)

    @tf.custom_gradient
    def sample(image, coords):
        dtype = image.dtype
        in_shape = tf.shape(image)
        batch, channels, sizes = in_shape[0], in_shape[4], in_shape[1:4]
        points = tf.reshape(coords, [batch, -1, 3])
        upper = tf.cast(sizes - 1, dtype)
        inside = None
        if boundary == "replicate":
            inside = tf.cast((points >= 0) & (points <= upper), dtype)
            points = tf.clip_by_value(points, tf.zeros_like(upper), upper)
        lower_f = tf.floor(points)
        frac = points - lower_f
        lower = tf.cast(lower_f, tf.int32)
        if boundary == "replicate":
            corner_index, corner_valid = (lower, tf.minimum(lower + 1, sizes - 1)), None  # upper: weight 0 there
        else:
            corner_index = tuple(tf.clip_by_value(i, 0, sizes - 1) for i in (lower, lower + 1))
            corner_valid = tuple(tf.cast((i >= 0) & (i <= sizes - 1), dtype) for i in (lower, lower + 1))

        flat = tf.reshape(image, [-1, channels])
        batch_offset = tf.range(batch)[:, None] * (sizes[0] * sizes[1] * sizes[2])
        corners = [(c0, c1, c2) for c0 in (0, 1) for c1 in (0, 1) for c2 in (0, 1)]
        linear, value, valid = {}, {}, {}
        for c in corners:
            i0, i1, i2 = (corner_index[c[axis]][..., axis] for axis in range(3))
            linear[c] = batch_offset + (i0 * sizes[1] + i1) * sizes[2] + i2
            value[c] = tf.gather(flat, linear[c])  # (B, N, C)
            if corner_valid is not None:
                valid[c] = corner_valid[c[0]][..., 0:1] * corner_valid[c[1]][..., 1:2] * corner_valid[c[2]][..., 2:3]
                value[c] = value[c] * valid[c]
        f0, f1, f2 = frac[..., 0:1], frac[..., 1:2], frac[..., 2:3]
        along2 = {(c0, c1): value[c0, c1, 0] + (value[c0, c1, 1] - value[c0, c1, 0]) * f2
                  for c0 in (0, 1) for c1 in (0, 1)}
        along1 = {c0: along2[c0, 0] + (along2[c0, 1] - along2[c0, 0]) * f1 for c0 in (0, 1)}
        out = along1[0] + (along1[1] - along1[0]) * f0

        def gradient(upstream):
            up = tf.reshape(upstream, [batch, -1, channels])
            step2 = {k: value[k[0], k[1], 1] - value[k[0], k[1], 0] for k in along2}
            step2_1 = {c0: step2[c0, 0] + (step2[c0, 1] - step2[c0, 0]) * f1 for c0 in (0, 1)}
            d_frac = (along1[1] - along1[0],
                      (along2[0, 1] - along2[0, 0]) * (1.0 - f0) + (along2[1, 1] - along2[1, 0]) * f0,
                      step2_1[0] + (step2_1[1] - step2_1[0]) * f0)
            d_points = tf.concat([tf.reduce_sum(up * d, axis=-1, keepdims=True) for d in d_frac], axis=-1)
            if inside is not None:
                d_points = d_points * inside
            weights = ((1.0 - f0, f0), (1.0 - f1, f1), (1.0 - f2, f2))
            d_flat = tf.zeros_like(flat)
            for c in corners:
                weight = weights[0][c[0]] * weights[1][c[1]] * weights[2][c[2]]
                if valid:
                    weight = weight * valid[c]
                d_flat += tf.math.unsorted_segment_sum(tf.reshape(up * weight, [-1, channels]),
                                                       tf.reshape(linear[c], [-1]), tf.shape(flat)[0])
            return tf.reshape(d_flat, tf.shape(image)), tf.reshape(d_points, tf.shape(coords))

        out_shape = tf.concat([tf.shape(coords)[:4], [channels]], axis=0)
        return tf.reshape(out, out_shape), gradient

    return sample(image, coords)


def warp(image, ddf, boundary="replicate"):
    """``out(x) = image(x + ddf(x))``; image (B, D0, D1, D2, C), ddf (B, P0, P1, P2, 3) in voxels."""
    ddf = tf.convert_to_tensor(ddf)
    grid = identity_grid(tf.shape(ddf)[1:4], ddf.dtype)
    return sample_trilinear(image, grid[None] + ddf, boundary)


@keras.saving.register_keras_serializable(package="label_reg")
class Warp(keras.layers.Layer):
    """Warp a moving volume with a dense displacement field: ``Warp()([image, ddf])``.

    image: (B, D0, D1, D2, C); ddf: (B, D0, D1, D2, 3), displacement in voxels along the image's array axes.
    Output (B, D0, D1, D2, C) with ``output(x) = image(x + ddf(x))``, trilinear. ``boundary="replicate"`` repeats
    edge voxels (equals ``scipy.ndimage.map_coordinates(order=1, mode="nearest")``); ``"zero"`` treats the outside
    as zeros (``mode="grid-constant", cval=0``). An all-zero DDF returns the image exactly, edges included.
    """

    def __init__(self, boundary="replicate", **kwargs):
        super().__init__(**kwargs)
        self.boundary = _check_boundary(boundary)

    def call(self, inputs):
        image, ddf = inputs
        return warp(image, ddf, self.boundary)

    def compute_output_shape(self, input_shape):
        image_shape, ddf_shape = input_shape
        return tuple(ddf_shape[:4]) + (image_shape[-1],)

    def get_config(self):
        return {**super().get_config(), "boundary": self.boundary}


def resize3d(volume, size):
    """Trilinear resize of (B, D0, D1, D2, C) to spatial ``size`` (half-voxel aligned, as ``tf.image.resize``).

    Values are interpolated, not rescaled: a DDF keeps its units. Done as two bilinear passes (axes 1-2, then 0-1).
    """
    volume = tf.convert_to_tensor(volume)
    shape = tf.shape(volume)
    b, d0, d1, d2, c = shape[0], shape[1], shape[2], shape[3], shape[4]
    size = [int(s) for s in size]
    x = tf.reshape(volume, [b * d0, d1, d2, c])
    x = tf.image.resize(x, size[1:3], method="bilinear")
    x = tf.reshape(x, [b, d0, size[1] * size[2], c])
    x = tf.image.resize(x, [size[0], size[1] * size[2]], method="bilinear")
    # The second pass interpolated along axis 0 only: the flattened axis kept its length, so no mixing across it.
    return tf.cast(tf.reshape(x, [b, size[0], size[1], size[2], c]), volume.dtype)


@keras.saving.register_keras_serializable(package="label_reg")
class Resize3D(keras.layers.Layer):
    """Trilinear resize of a channels-last 5-D tensor to a fixed spatial ``size`` (D0, D1, D2); units unchanged."""

    def __init__(self, size, **kwargs):
        super().__init__(**kwargs)
        self.size = tuple(int(s) for s in size)

    def call(self, inputs):
        return resize3d(inputs, self.size)

    def compute_output_shape(self, input_shape):
        return (input_shape[0],) + self.size + (input_shape[-1],)

    def get_config(self):
        return {**super().get_config(), "size": list(self.size)}


def pad_end(volume, amounts):
    """Zero-pad (B, D0, D1, D2, C) at the far end of each spatial axis by ``amounts`` voxels.

    Built from concatenation rather than ``tf.pad``: TensorFlow 2.21's oneDNN graph rewrite mis-handles a Pad feeding
    this network's convolutions in a ``tf.function`` (wrong shapes at run time).
    """
    volume = tf.convert_to_tensor(volume)
    for axis, amount in enumerate(amounts, start=1):
        if amount:
            shape = tf.tensor_scatter_nd_update(tf.shape(volume), [[axis]], [int(amount)])
            volume = tf.concat([volume, tf.zeros(shape, volume.dtype)], axis=axis)
    return volume


@keras.saving.register_keras_serializable(package="label_reg")
class PadEnd(keras.layers.Layer):
    """Zero padding at the far end of each spatial axis, ``amounts`` = (p0, p1, p2) voxels."""

    def __init__(self, amounts, **kwargs):
        super().__init__(**kwargs)
        self.amounts = tuple(int(a) for a in amounts)

    def call(self, inputs):
        return pad_end(inputs, self.amounts)

    def compute_output_shape(self, input_shape):
        spatial = tuple(None if n is None else n + a for n, a in zip(input_shape[1:4], self.amounts))
        return (input_shape[0],) + spatial + (input_shape[-1],)

    def get_config(self):
        return {**super().get_config(), "amounts": list(self.amounts)}


def gaussian_kernel1d(sigma):
    """Normalised 1-D Gaussian taps, truncated at 3 sigma (radius ceil(3 sigma)); sigma 0 gives the tap [1]."""
    sigma = float(sigma)
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return np.ones(1, np.float32)
    radius = int(math.ceil(3.0 * sigma))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (x / sigma) ** 2)
    return (taps / taps.sum()).astype(np.float32)


def gaussian_band_matrix(size, sigma):
    """(size, size) float32 matrix M with ``M @ v`` = the 1-D Gaussian smoothing of ``v`` (zeros beyond the edge)."""
    taps = gaussian_kernel1d(sigma)
    radius = taps.size // 2
    offset = np.arange(size)[None, :] - np.arange(size)[:, None]  # column - row
    inside = np.abs(offset) <= radius
    return np.where(inside, taps[np.clip(offset + radius, 0, taps.size - 1)], 0.0).astype(np.float32)


# einsum patterns applying a (size, size) matrix along spatial axis 0, 1, 2 of (B, D0, D1, D2, C)
_ALONG_AXIS = ("ia,bajkc->bijkc", "ja,biakc->bijkc", "ka,bijac->bijkc")


def gaussian_smooth(volume, sigma):
    """Separable Gaussian smoothing of (B, D0, D1, D2, C), each channel alone, zeros beyond the edge.

    sigma in voxels; kernel truncated at 3 sigma and normalised to sum 1; sigma 0 returns the input unchanged.
    With static spatial sizes (as in training) each 1-D pass is a matrix product with a banded matrix
    (:func:`gaussian_band_matrix`): the same sums as the zero-padded convolution, but 4x faster on CPU than
    single-channel ``conv3d``, forward and backward. Unknown sizes fall back to three 1-D ``conv3d`` passes.
    """
    volume = tf.convert_to_tensor(volume)
    taps = gaussian_kernel1d(sigma)
    if taps.size == 1:
        return volume
    sizes = volume.shape[1:4]
    if all(n is not None for n in sizes):
        x = volume
        for axis, size in enumerate(sizes):
            x = tf.einsum(_ALONG_AXIS[axis], tf.constant(gaussian_band_matrix(size, sigma), volume.dtype), x)
        return x
    shape = tf.shape(volume)
    # Fold channels into the batch so that a single-channel kernel serves every channel.
    x = tf.transpose(volume, [0, 4, 1, 2, 3])
    x = tf.reshape(x, tf.concat([[-1], shape[1:4], [1]], axis=0))
    kernel = tf.constant(taps, dtype=volume.dtype)
    for axis in range(3):
        kshape = [1, 1, 1, 1, 1]
        kshape[axis] = taps.size
        x = tf.nn.conv3d(x, tf.reshape(kernel, kshape), strides=[1] * 5, padding="SAME")
    x = tf.reshape(x, tf.stack([shape[0], shape[4], shape[1], shape[2], shape[3]]))
    return tf.transpose(x, [0, 2, 3, 4, 1])


@keras.saving.register_keras_serializable(package="label_reg")
class GaussianSmooth(keras.layers.Layer):
    """Separable Gaussian smoothing (sigma in voxels, truncated at 3 sigma, sum 1, zero boundary)."""

    def __init__(self, sigma, **kwargs):
        super().__init__(**kwargs)
        self.sigma = float(sigma)
        gaussian_kernel1d(self.sigma)  # validates

    def call(self, inputs):
        return gaussian_smooth(inputs, self.sigma)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "sigma": self.sigma}


# ---------------------------------------------------------------------------------------------------------------
# Affine augmentation (NiftyNet semantics)
# ---------------------------------------------------------------------------------------------------------------

# Corners of the normalised cube [-1, 1]^3 with a homogeneous 1: (8, 4). Its columns are orthogonal and
# CORNERS^T CORNERS = 8 I, so the least-squares affine that sends these corners to any 8 points Y is CORNERS^T Y / 8.
_CORNERS = np.array([[a, b, c, 1.0] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)], np.float32)


def random_affine(batch_size, scale, seed):
    """Draw ``batch_size`` random affines, NiftyNet-style, from a stateless ``seed`` (int tensor of shape [2]).

    Each coordinate of each corner of the normalised cube is multiplied by U(1 - scale, 1), moving the corner inward;
    the affine that best maps the cube's corners onto the moved corners (least squares) is returned as (B, 4, 3):
    ``source = [x, 1] @ A`` in normalised coordinates. Zoom-ins and mild shears only, no flips; scale 0 is identity.
    """
    factors = tf.random.stateless_uniform([batch_size, 8, 3], seed=seed, minval=1.0 - scale, maxval=1.0)
    return affine_from_corners(tf.constant(_CORNERS[:, :3])[None] * factors)


def _half_extent(spatial_shape):
    """``h = (shape - 1) / 2`` per axis as float32 (at least 1e-6): the voxel half extent that the normalised
    coordinates of :func:`apply_affine` divide by."""
    return tf.maximum((tf.cast(tf.convert_to_tensor(spatial_shape), tf.float32) - 1.0) / 2.0, 1e-6)


def random_rotation(batch_size, max_deg, seed, spatial_shape):
    """Draw ``batch_size`` rigid rotations about the volume centre as (B, 4, 3) affines in the normalised coordinates
    of :func:`apply_affine` (``source = [x, 1] @ A``), from a stateless ``seed`` (int tensor of shape [2]).

    Angle U(-max_deg, max_deg) degrees about an axis uniform on the sphere (Rodrigues). Rigid in voxel units, so in mm
    for the isotropic grids pre-processing makes: with ``h = (shape - 1) / 2`` the normalised rotation is
    ``diag(h) Q^T diag(h)^-1`` (row vectors). ``max_deg`` 0 gives the identity.
    """
    axis = tf.random.stateless_normal([batch_size, 3], seed=tf.random.experimental.stateless_fold_in(seed, 0))
    axis = axis / tf.maximum(tf.norm(axis, axis=-1, keepdims=True), 1e-12)
    angle = tf.random.stateless_uniform([batch_size], seed=tf.random.experimental.stateless_fold_in(seed, 1),
                                        minval=-1.0, maxval=1.0) * (float(max_deg) * np.pi / 180.0)
    x, y, z = tf.unstack(axis, axis=-1)
    zero = tf.zeros_like(x)
    k = tf.reshape(tf.stack([zero, -z, y, z, zero, -x, -y, x, zero], axis=-1), [-1, 3, 3])
    sin, cos = tf.sin(angle)[:, None, None], tf.cos(angle)[:, None, None]
    q = tf.eye(3, batch_shape=[batch_size]) + sin * k + (1.0 - cos) * tf.matmul(k, k)
    half = _half_extent(spatial_shape)
    linear = half[None, :, None] * tf.transpose(q, [0, 2, 1]) / half[None, None, :]
    return tf.concat([linear, tf.zeros([batch_size, 1, 3])], axis=1)


def random_shift(batch_size, sd_voxels, seed, spatial_shape):
    """Draw ``batch_size`` pure translations as (B, 4, 3) affines in the normalised coordinates of
    :func:`apply_affine` (``source = [x, 1] @ A``), from a stateless ``seed`` (int tensor of shape [2]).

    Each voxel axis is shifted by N(0, ``sd_voxels``) voxels (one draw per sample and axis, the same everywhere in
    the volume: ``source = x + t``), stored as ``t / h`` with ``h = (shape - 1) / 2``. ``sd_voxels`` 0 gives the
    identity. On an isotropic grid of spacing s, ``sd_voxels = sd_mm / s``.
    """
    half = _half_extent(spatial_shape)
    shift = tf.random.stateless_normal([batch_size, 3], seed=seed) * float(sd_voxels)
    linear = tf.eye(3, batch_shape=[batch_size])
    return tf.concat([linear, (shift / half[None, :])[:, None, :]], axis=1)


def compose_affines(first, then):
    """The (B, 4, 3) affine of ``first`` then ``then`` (both (B, 4, 3), row vectors: ``[[x, 1] @ first, 1] @ then``)."""
    first, then = tf.convert_to_tensor(first, tf.float32), tf.convert_to_tensor(then, tf.float32)
    linear = tf.matmul(first, then[:, :3])
    return linear + tf.pad(then[:, 3:], [[0, 0], [3, 0], [0, 0]])


def affine_from_corners(moved):
    """Least-squares affine (B, 4, 3) sending the corners of [-1, 1]^3 (in :data:`_CORNERS` order) to ``moved``."""
    return tf.einsum("nk,bnj->bkj", tf.constant(_CORNERS), tf.convert_to_tensor(moved, tf.float32)) / 8.0


def affine_coords(transforms, spatial_shape):
    """Voxel source coordinates (B, D0, D1, D2, 3) for affines in normalised coordinates about the volume centre."""
    transforms = tf.convert_to_tensor(transforms, tf.float32)
    grid = identity_grid(spatial_shape)
    half = (tf.cast(tf.convert_to_tensor(spatial_shape), tf.float32) - 1.0) / 2.0
    half_safe = tf.maximum(half, 1e-6)
    normalised = (grid - half) / half_safe
    homogeneous = tf.concat([normalised, tf.ones_like(normalised[..., :1])], axis=-1)
    source = tf.einsum("xyzk,bkj->bxyzj", homogeneous, transforms)
    return source * half_safe + half


def apply_affine(volume, transforms, boundary="replicate"):
    """Resample (B, D0, D1, D2, C) with per-sample affines (B, 4, 3) from :func:`random_affine`, trilinear."""
    volume = tf.convert_to_tensor(volume)
    coords = affine_coords(transforms, tf.shape(volume)[1:4])
    return sample_trilinear(volume, tf.cast(coords, volume.dtype), boundary)


@keras.saving.register_keras_serializable(package="label_reg")
class AffineAugmentation(keras.layers.Layer):
    """Random affine augmentation, one draw per sample on every training call (NiftyNet semantics).

    ``scale``: corners of the normalised cube [-1, 1]^3 move inward by a factor drawn from U(1 - scale, 1) per
    coordinate; the affine is the least-squares fit of corners to moved corners, about the volume centre. No flips.
    Call with a tensor, or with a list of tensors of the same spatial shape (e.g. an image, its label maps and its
    SDM) to apply the *same* draw to all of them. Identity when not training. Trilinear, replicate boundary.
    For reproducible pipelines use :func:`random_affine` and :func:`apply_affine` with a stateless seed.
    """

    def __init__(self, scale=0.1, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= float(scale) < 1.0:
            raise ValueError(f"scale must be in [0, 1), got {scale}")
        self.scale = float(scale)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=None):
        tensors = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        if not training or self.scale == 0.0:
            out = tensors
        else:
            batch = tf.shape(tensors[0])[0]
            seed = keras.random.randint([2], 0, 2**31 - 1, seed=self.seed_generator, dtype="int32")
            transforms = random_affine(batch, self.scale, seed)
            out = [apply_affine(t, transforms) for t in tensors]
        return out if isinstance(inputs, (list, tuple)) else out[0]

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "seed": self.seed}


# ---------------------------------------------------------------------------------------------------------------
# Global affine stage (label_reg.network.build_model(global_affine=True))
# ---------------------------------------------------------------------------------------------------------------
AFFINE_PARAMETERS = 12


def affine_parts(theta, spatial_shape):
    """Split the affine head's 12 parameters into the voxel-space affine about the volume centre.

    theta: (B, 12); spatial_shape: the DDF grid (D0, D1, D2) in voxels. The affine maps a grid index x to the source
    index ``y = c + (I + R)(x - c) + t`` with ``c = (n - 1) / 2`` the grid centre (voxels, per axis):

    * ``R = theta[:, :9]`` reshaped to (3, 3) row-major: the linear part's residual from the identity, voxel
      coordinates (dimensionless);
    * ``t = theta[:, 9:] * h``: the translation in voxels, the parameters being in units of the half extent
      ``h = max((n - 1) / 2, 1)`` of each axis (so a unit of translation moves about as far as a unit of ``R`` moves
      the volume's faces, and the head learns both at a similar pace).

    theta = 0 is exactly the identity. Returns (R (B, 3, 3), t (B, 3) voxels, c (3,) numpy float32).
    """
    theta = tf.convert_to_tensor(theta)
    centre = (np.asarray(spatial_shape, np.float32) - 1.0) / 2.0
    half = np.maximum(centre, 1.0).astype(np.float32)
    residual = tf.reshape(theta[:, :9], [-1, 3, 3])
    translation = theta[:, 9:] * tf.constant(half, theta.dtype)
    return residual, translation, centre


def affine_matrix(theta, spatial_shape):
    """The affine of :func:`affine_parts` as (B, 3, 4) in grid indices: ``y = M[:, :3] x + M[:, 3]``
    (``M[:, :3] = I + R``, ``M[:, 3] = t - R c``), mapping a DDF-grid index to the moving (source) index."""
    residual, translation, centre = affine_parts(theta, spatial_shape)
    linear = residual + tf.eye(3, dtype=residual.dtype)[None]
    offset = translation - tf.einsum("bij,j->bi", residual, tf.constant(centre, residual.dtype))
    return tf.concat([linear, offset[..., None]], axis=-1)


def affine_ddf(theta, spatial_shape):
    """The dense displacement field (B, D0, D1, D2, 3), voxels, of the affine of :func:`affine_parts`:
    ``a(x) = R (x - c) + t`` (the warp convention of :func:`warp`: ``moving(x + a(x))``)."""
    return compose_affine(None, theta, spatial_shape)


def compose_affine(local, theta, spatial_shape):
    """The total DDF of the global affine followed by the local deformation.

    The affine is applied to the moving image first, ``m1(y) = moving(A(y))`` with ``A(y) = y + a(y)``, and the local
    DDF ``l`` (B, D0, D1, D2, 3) refines on the affine-aligned image: ``warped(x) = m1(x + l(x)) =
    moving(A(x + l(x)))``. So ``total(x) = l(x) + a(x + l(x))``, which for an affine ``a`` is exactly

        total(x) = a(x) + (I + R) l(x) = l(x) + R (x - c + l(x)) + t      (voxels, no resampling of ``l``)

    With ``l = 0`` it is the affine field ``a``; with ``theta = 0`` it is ``l``, bit for bit. ``local=None`` means
    ``l = 0``. theta: (B, 12) (:func:`affine_parts`); spatial_shape: static (D0, D1, D2).
    """
    theta = tf.convert_to_tensor(theta)
    residual, translation, centre = affine_parts(theta, spatial_shape)
    grid = identity_grid([int(n) for n in spatial_shape], theta.dtype) - tf.constant(centre, theta.dtype)
    if local is None:
        return tf.einsum("bij,xyzj->bxyzi", residual, grid) + translation[:, None, None, None, :]
    local = tf.convert_to_tensor(local, theta.dtype)
    return (local + tf.einsum("bij,bxyzj->bxyzi", residual, grid[None] + local)
            + translation[:, None, None, None, :])


class _OnAffineGrid(keras.layers.Layer):
    """A layer of the global affine stage, built for a static DDF grid ``spatial_shape`` (D0, D1, D2) voxels."""

    def __init__(self, spatial_shape, **kwargs):
        super().__init__(**kwargs)
        self.spatial_shape = tuple(int(n) for n in spatial_shape)

    def get_config(self):
        return {**super().get_config(), "spatial_shape": list(self.spatial_shape)}


@keras.saving.register_keras_serializable(package="label_reg")
class ComposeAffine(_OnAffineGrid):
    """``ComposeAffine(spatial_shape)([local_ddf, theta])``: the total DDF (B, D0, D1, D2, 3), voxels, of the
    global affine (theta (B, 12), :func:`affine_parts`) followed by the local DDF (:func:`compose_affine`)."""

    def call(self, inputs):
        local, theta = inputs
        return compose_affine(local, theta, self.spatial_shape)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])


@keras.saving.register_keras_serializable(package="label_reg")
class AffineMatrix(_OnAffineGrid):
    """theta (B, 12) -> the affine (B, 3, 4) in DDF-grid indices (:func:`affine_matrix`)."""

    def call(self, inputs):
        return affine_matrix(inputs, self.spatial_shape)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 3, 4)
