"""Registration (and segmenter) losses. Each returns a per-sample tensor of shape (B,); lower is better.

* :func:`multiscale_dice` - 1 minus the mean soft Dice over Gaussian scales (label similarity, the paper's L_mDSC).
* :func:`sdm_msle` - mean squared logarithmic error between signed distance maps (the paper's L_SDM).
* :func:`bending_energy` - second-order smoothness of a DDF (the paper's T).
* :func:`segmentation_loss` - soft Dice + cross-entropy of the TRUS gland segmenter (:mod:`label_reg.segmenter`).
* :func:`landmark_dice` - multiscale Dice over paired landmark channels (landmark-supervised training, Hu et al.
  2018), absent pairs skipped.
* :func:`landmark_centroid_distance` - mm between the centroids of paired landmark channels: the TRE itself, as a
  loss (beyond Hu et al. 2018).
* :func:`fixed_view_mask` - where the TRUS image says anything, to keep the label losses there.

:func:`registration_loss` combines them as L = alpha * mDSC + beta * SDM + (1 - alpha - beta) * bending.
Every loss is registered by name in :data:`LOSSES` so a flag can pick it (:func:`get_loss`).
"""
import keras
import tensorflow as tf

from label_reg.layers import gaussian_smooth

DEFAULT_SIGMAS = (0.0, 1.0, 2.0, 4.0, 8.0)
_EPS = 1e-6


def _with_channel(x):
    x = tf.convert_to_tensor(x)
    return x[..., None] if x.shape.rank == 4 else x


def soft_dice(fixed, warped):
    """Per-sample soft Dice 2*sum(p*g) / (sum(p) + sum(g)) (not squared), over all voxels and channels."""
    fixed, warped = _with_channel(fixed), _with_channel(warped)
    axes = [1, 2, 3, 4]
    overlap = tf.reduce_sum(fixed * warped, axis=axes)
    total = tf.reduce_sum(fixed, axis=axes) + tf.reduce_sum(warped, axis=axes)
    return 2.0 * overlap / (total + _EPS)


def multiscale_dice(fixed, warped, sigmas=DEFAULT_SIGMAS):
    """1 - mean over sigma of the soft Dice of the Gaussian-smoothed masks (sigma in voxels; 0 = no smoothing).

    fixed, warped: (B, D0, D1, D2[, C]) masks in [0, 1]. Smoothing is separable, truncated at 3 sigma, sum 1
    (:func:`label_reg.layers.gaussian_smooth`). Returns (B,). With ``sigmas=(0,)`` it is plain soft Dice loss,
    zero for identical binary masks; with larger sigmas identical masks do not score zero (blurred maps are not
    binary), but the gradient reaches masks that do not yet overlap.
    """
    fixed, warped = _with_channel(fixed), _with_channel(warped)
    if not sigmas:
        raise ValueError("multiscale_dice needs at least one sigma")
    scores = [soft_dice(gaussian_smooth(fixed, s), gaussian_smooth(warped, s)) for s in sigmas]
    return 1.0 - tf.add_n(scores) / float(len(scores))


def sdm_msle(fixed_sdm, warped_sdm):
    """Mean squared logarithmic error between SDMs, per sample (B,), Keras MSLE semantics.

    Values are clipped at Keras' epsilon before ``log(1 + x)``, so the negative (inside) part of the maps does not
    count: only the positive, outside distances drive the loss. Zero for identical maps.
    """
    fixed_sdm, warped_sdm = _with_channel(fixed_sdm), _with_channel(warped_sdm)
    batch = tf.shape(fixed_sdm)[0]
    return keras.losses.mean_squared_logarithmic_error(
        tf.reshape(fixed_sdm, [batch, -1]), tf.reshape(warped_sdm, [batch, -1]))


BENDING_VOXELS = ("interior", "all")


def _central_diff_wrapped(x, axis):
    """Central difference (x[i+1] - x[i-1]) / 2 along spatial ``axis`` (1..3), same length, wrapping at the ends.

    The wrapped values reach at most two voxels in from each end after two differences, and
    :func:`bending_energy` crops those away. ``tf.roll`` keeps the backward pass cheap: with ``tf.gather`` or
    strided slices per difference, the bending energy's gradient cost 4-18x more on CPU.
    """
    return (tf.roll(x, -1, axis) - tf.roll(x, 1, axis)) / 2.0


def _axis_mask(x, axis, first, last):
    """(1, ..) float mask of ``x``'s dtype, broadcastable to ``x``: 1 where index ``first`` <= i < n - ``last`` along
    spatial ``axis`` (1..3), else 0 (the positions a wrapped difference made wrong)."""
    n = tf.shape(x)[axis]
    index = tf.range(n)
    inside = tf.cast(tf.logical_and(index >= first, index < n - last), x.dtype)
    shape = [1, 1, 1, 1, 1]
    shape[axis] = -1
    return tf.reshape(inside, shape)


def _masked_mean(values, mask):
    """Per-sample mean of ``values`` (B, X, Y, Z, C) over the voxels where ``mask`` is 1 (and every component).
    ``mask`` is a product of per-axis masks, so its own mean is the fraction of voxels it keeps."""
    return tf.reduce_mean(values * mask, axis=[1, 2, 3, 4]) / tf.reduce_mean(mask)


def _check_ddf(ddf, minimum, voxels):
    shape = ddf.shape
    if shape.rank is not None and (shape.rank != 5 or shape[-1] != 3):
        raise ValueError(f"bending energy needs a DDF of shape (B, X, Y, Z, 3), got {tuple(shape)}")
    small = [n for n in shape[1:4] if n is not None and n < minimum]
    if small:
        raise ValueError(f"bending energy (voxels={voxels!r}) needs at least {minimum} voxels per spatial axis, "
                         f"got {tuple(shape[1:4])}")


def bending_energy(ddf, voxels="interior"):
    """Bending energy of a DDF (B, X, Y, Z, 3) in voxels, per sample (B,).

    The mean over voxels and the three displacement components of
    u_xx^2 + u_yy^2 + u_zz^2 + 2 (u_xy^2 + u_xz^2 + u_yz^2), second derivatives in voxel units. Exactly zero for any
    affine DDF (its second differences vanish) with either ``voxels``:

    * ``"interior"`` (label-reg / NiftyNet, the default): each second derivative is two central differences
      (stencil [1, 0, -2, 0, 1] / 4), averaged over the voxels two in from every face. The outer two layers enter
      only through their neighbours' stencils, the edges and corners of that band not at all, and a field that
      alternates from voxel to voxel costs nothing. Needs at least 5 voxels per axis.
    * ``"all"``: compact second differences that reach every voxel: u_ii from [1, -2, 1] at the voxels one in from
      the two faces along i, u_ij from the 2 x 2 cross difference at every cell corner; each term averaged over the
      positions where it is defined. Same value as ``"interior"`` for smooth fields (both exact for quadratics), more
      for high frequencies and at the faces. Needs at least 3 voxels per axis.
    """
    if voxels not in BENDING_VOXELS:
        raise ValueError(f"bending energy voxels must be one of {BENDING_VOXELS}, got {voxels!r}")
    ddf = tf.convert_to_tensor(ddf)
    if voxels == "all":
        _check_ddf(ddf, 3, voxels)
        return _bending_energy_all(ddf)
    _check_ddf(ddf, 5, voxels)
    first = [_central_diff_wrapped(ddf, axis) for axis in (1, 2, 3)]
    terms = []
    for i in range(3):
        for j in range(i, 3):
            second = _central_diff_wrapped(first[i], j + 1)
            terms.append(second ** 2 if i == j else 2.0 * second ** 2)
    interior = tf.add_n(terms)[:, 2:-2, 2:-2, 2:-2, :]
    return tf.reduce_mean(interior, axis=[1, 2, 3, 4])


def _bending_energy_all(ddf):
    """:func:`bending_energy` with ``voxels="all"``: wrapped differences (``tf.roll``, cheap to differentiate)
    whose wrapped positions a mask leaves out of each term's mean."""
    energy = 0.0
    forward = {}
    for axis in (1, 2, 3):
        second = tf.roll(ddf, -1, axis) - 2.0 * ddf + tf.roll(ddf, 1, axis)  # right at 1 .. n-2
        energy += _masked_mean(second ** 2, _axis_mask(ddf, axis, 1, 1))
        forward[axis] = tf.roll(ddf, -1, axis) - ddf  # u[i+1] - u[i], right at 0 .. n-2
    for i, j in ((1, 2), (1, 3), (2, 3)):
        cross = tf.roll(forward[i], -1, j) - forward[i]  # right at 0 .. n-2 along i and j
        mask = _axis_mask(ddf, i, 0, 1) * _axis_mask(ddf, j, 0, 1)
        energy += 2.0 * _masked_mean(cross ** 2, mask)
    return energy


def fixed_view_mask(fixed_image, margin=2):
    """Where the TRUS image says anything: (B, X, Y, Z, 1) float 0/1, 1 within ``margin`` voxels of a voxel whose
    fixed image is above 0 (the pre-processed image is 0 outside the TRUS volume and at its minimum; the margin
    keeps isolated minimum voxels inside the image in). ``fixed_image`` (B, X, Y, Z, 1)."""
    fixed_image = tf.convert_to_tensor(fixed_image)
    if fixed_image.shape.rank is not None and (fixed_image.shape.rank != 5 or fixed_image.shape[-1] != 1):
        raise ValueError(f"fixed_view_mask needs a fixed image of shape (B, X, Y, Z, 1), "
                         f"got {tuple(fixed_image.shape)}")
    inside = tf.cast(fixed_image > 0, fixed_image.dtype)
    size = 2 * int(margin) + 1
    return tf.nn.max_pool3d(inside, size, 1, "SAME") if margin > 0 else inside


def segmentation_loss(label, probability):
    """Gland segmentation loss of the TRUS segmenter, per sample (B,): (1 - soft Dice) + mean binary cross-entropy.

    label: (B, D0, D1, D2[, 1]) 0/1 (or soft) mask; probability: same shape, sigmoid output in [0, 1] (clipped to
    [1e-7, 1 - 1e-7] for the logarithms). Dice keeps a small gland from being drowned by the background;
    cross-entropy gives a gradient on every voxel from the first step. Near zero for a confident perfect prediction.
    """
    label, probability = _with_channel(label), _with_channel(probability)
    p = tf.clip_by_value(probability, 1e-7, 1.0 - 1e-7)
    cross_entropy = -tf.reduce_mean(label * tf.math.log(p) + (1.0 - label) * tf.math.log(1.0 - p), axis=[1, 2, 3, 4])
    return 1.0 - soft_dice(label, probability) + cross_entropy


LANDMARK_TERMS = ("pairs", "one")


def landmark_dice(fixed, warped, present, terms="pairs", sigmas=DEFAULT_SIGMAS):
    """Multiscale Dice loss over paired landmark channels, per sample (B,).

    fixed, warped: (B, D0, D1, D2, L) landmark masks in [0, 1], channel k of one paired with channel k of the other
    (the fixed landmarks and the warped moving ones). present: (B, L) 0/1, which pairs exist (a pair missing on
    either side, or a padded channel, is 0); only present pairs count and their mask channels are zeroed otherwise.
    ``terms="pairs"``: the mean over present pairs of each pair's :func:`multiscale_dice`, so a small landmark weighs
    as much as a large one. ``terms="one"``: one multiscale Dice over all present channels together (sums over
    voxels and channels), so landmarks weigh by their size. A sample without any present pair scores 0 (no
    gradient). With ``sigmas=(0,)`` identical binary landmarks score 0.
    """
    fixed, warped = tf.convert_to_tensor(fixed), tf.convert_to_tensor(warped)
    if fixed.shape.rank != 5 or warped.shape.rank != 5:
        raise ValueError(f"landmark_dice expects (B, D0, D1, D2, L) masks, got {fixed.shape} and {warped.shape}")
    if terms not in LANDMARK_TERMS:
        raise ValueError(f"landmark terms must be one of {LANDMARK_TERMS}, got {terms!r}")
    present = tf.cast(present, fixed.dtype)
    any_present = tf.cast(tf.reduce_sum(present, axis=1) > 0, fixed.dtype)
    mask = present[:, None, None, None, :]
    fixed, warped = fixed * mask, warped * mask
    if terms == "one":
        return multiscale_dice(fixed, warped, sigmas) * any_present
    if not sigmas:
        raise ValueError("landmark_dice needs at least one sigma")
    axes = [1, 2, 3]
    scores = []
    for sigma in sigmas:  # smoothing is per channel, so each channel's Dice is its pair's
        f, w = gaussian_smooth(fixed, sigma), gaussian_smooth(warped, sigma)
        overlap = tf.reduce_sum(f * w, axis=axes)
        scores.append(2.0 * overlap / (tf.reduce_sum(f, axis=axes) + tf.reduce_sum(w, axis=axes) + _EPS))
    losses = 1.0 - tf.add_n(scores) / float(len(scores))  # (B, L)
    return tf.reduce_sum(losses * present, axis=1) / tf.maximum(tf.reduce_sum(present, axis=1), 1.0)


def landmark_centroid_distance(fixed, warped, present, spacing_mm, smooth_mm=0.1):
    """Distance in mm between the centroids of paired landmark channels, mean over present pairs, per sample (B,).

    fixed, warped: (B, D0, D1, D2, L) landmark masks in [0, 1] on one grid (the fixed landmarks and the warped
    moving ones), channel k paired with channel k. present: (B, L) 0/1, which pairs exist. spacing_mm: the grid's
    voxel size, a number or one per axis (D0, D1, D2); distances are measured along the array axes, which is all a
    distance between two masks on the same grid needs (as :func:`label_reg.metrics.tre_mm`). Each centroid is the
    mask-weighted mean voxel position, so a warped (partial-volume) mask moves it smoothly. A pair's term is
    sqrt(d^2 + smooth_mm^2) - smooth_mm: d itself beyond a few ``smooth_mm``, 0 for coinciding centroids, with a
    gradient that stays finite there (``smooth_mm=0`` gives d itself, whose gradient is undefined at 0). A pair counts when it is present and both its masks hold at least half a
    voxel (a landmark warped out of the grid has no centroid); a sample without such a pair scores 0 with no
    gradient. This is the landmark TRE (the evaluation's, which thresholds at 0.5) made differentiable.
    """
    fixed, warped = tf.convert_to_tensor(fixed), tf.convert_to_tensor(warped)
    if fixed.shape.rank != 5 or warped.shape.rank != 5:
        raise ValueError(f"landmark_centroid_distance expects (B, D0, D1, D2, L) masks, got {fixed.shape} and "
                         f"{warped.shape}")
    spacing = tf.cast(tf.broadcast_to(tf.constant(spacing_mm, tf.float64), [3]), fixed.dtype)
    axes = [1, 2, 3]
    fixed_mass, warped_mass = tf.reduce_sum(fixed, axis=axes), tf.reduce_sum(warped, axis=axes)  # (B, L)
    counted = tf.cast(present, fixed.dtype) * tf.cast(fixed_mass >= 0.5, fixed.dtype) * tf.cast(
        warped_mass >= 0.5, fixed.dtype)
    squared = 0.0
    for axis in range(3):
        n = tf.shape(fixed)[axis + 1]
        shape = [1, 1, 1, 1, 1]
        shape[axis + 1] = -1
        position = tf.reshape(tf.cast(tf.range(n), fixed.dtype) * spacing[axis], shape)
        fixed_centre = tf.reduce_sum(fixed * position, axis=axes) / tf.maximum(fixed_mass, _EPS)
        warped_centre = tf.reduce_sum(warped * position, axis=axes) / tf.maximum(warped_mass, _EPS)
        squared += tf.square(fixed_centre - warped_centre)
    squared = tf.where(counted > 0, squared, tf.zeros_like(squared))  # no gradient through absent pairs
    distance = tf.sqrt(squared + smooth_mm ** 2) - smooth_mm  # (B, L)
    return tf.reduce_sum(distance * counted, axis=1) / tf.maximum(tf.reduce_sum(counted, axis=1), 1.0)


LOSSES = {
    "multiscale_dice": multiscale_dice,
    "landmark_dice": landmark_dice,
    "landmark_centroid_distance": landmark_centroid_distance,
    "sdm_msle": sdm_msle,
    "bending_energy": bending_energy,
    "segmentation": segmentation_loss,
}


def get_loss(name):
    """The loss function registered under ``name`` (see :data:`LOSSES`)."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; known: {sorted(LOSSES)}") from None


def loss_weights(alpha, beta):
    """(alpha, beta, gamma) with gamma = 1 - alpha - beta, validated to be non-negative."""
    alpha, beta = float(alpha), float(beta)
    gamma = 1.0 - alpha - beta
    if min(alpha, beta) < 0 or gamma < -1e-9:
        raise ValueError(f"need alpha >= 0, beta >= 0 and alpha + beta <= 1, got alpha={alpha}, beta={beta}")
    return alpha, beta, max(gamma, 0.0)


def registration_loss(alpha, beta, fixed_label, warped_label, fixed_sdm, warped_sdm, ddf,
                      sigmas=DEFAULT_SIGMAS, bending_voxels="interior"):
    """The paper's L = alpha * mDSC + beta * SDM + gamma * bending, gamma = 1 - alpha - beta.

    ``bending_voxels`` picks the bending energy's discretisation (:func:`bending_energy`'s ``voxels``).

    Returns a dict of per-sample (B,) tensors: ``total`` and each term that has a non-zero weight (unweighted).
    Terms with zero weight are not computed.
    """
    alpha, beta, gamma = loss_weights(alpha, beta)
    terms = {}
    total = 0.0
    if alpha > 0:
        terms["multiscale_dice"] = multiscale_dice(fixed_label, warped_label, sigmas)
        total += alpha * terms["multiscale_dice"]
    if beta > 0:
        terms["sdm_msle"] = sdm_msle(fixed_sdm, warped_sdm)
        total += beta * terms["sdm_msle"]
    if gamma > 0:
        terms["bending_energy"] = bending_energy(ddf, bending_voxels)
        total += gamma * terms["bending_energy"]
    terms["total"] = total + tf.zeros(tf.shape(ddf)[:1], ddf.dtype)
    return terms
