"""Registration metrics: Dice (whole gland and thirds), landmark TRE, Hausdorff-95, Jacobian statistics.

Conventions (the package's): volumes are numpy arrays in ITK index order (x, y, z); label arrays are
(X, Y, Z, K) with channel 0 = prostate gland and channels 1.. = paired landmark blobs; a DDF is (X, Y, Z, 3) in
voxels, component c = displacement along array axis c, and the warp is ``output(x) = moving(x + ddf(x))``.
``spacing`` is the voxel size in mm along (x, y, z). Masks are binarised with ``value >= 0.5`` everywhere
(warped labels come from trilinear resampling and are soft).

Pure numpy / scipy, no TensorFlow.
"""
import numpy as np
from scipy import ndimage

from label_reg.errors import InputError

THRESHOLD = 0.5

__all__ = [
    "dice", "dice_thirds", "centroid_mm", "tre_mm", "jacobian_determinant", "jacobian_gradient",
    "folding_fraction", "hausdorff95_mm", "case_metrics",
]


# --------------------------------------------------------------------------------------------- helpers
def _binary(mask, source="mask"):
    arr = np.asarray(mask)
    if arr.dtype == bool:
        return arr
    if not np.issubdtype(arr.dtype, np.number):
        raise InputError(source, f"expected a numeric mask, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        raise InputError(source, "mask contains NaN or Inf")
    return arr >= THRESHOLD


def _same_shape(a, b, what):
    if a.shape != b.shape:
        raise InputError(what, f"shapes differ: {a.shape} vs {b.shape}")


def _spacing(spacing):
    try:
        sp = np.asarray(spacing, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise InputError("spacing", f"expected three numbers in mm, got {spacing!r}") from None
    if sp.size != 3 or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise InputError("spacing", f"expected three positive finite numbers in mm, got {spacing!r}")
    return sp


def _ddf(ddf):
    arr = np.asarray(ddf, dtype=np.float64)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise InputError("ddf", f"expected shape (X, Y, Z, 3), got {arr.shape}")
    if min(arr.shape[:3]) < 2:
        raise InputError("ddf", f"need at least 2 voxels along each axis for finite differences, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise InputError("ddf", "DDF contains NaN or Inf")
    return arr


def _labels(labels, source):
    arr = np.asarray(labels)
    if arr.ndim == 3:
        arr = arr[..., np.newaxis]
    if arr.ndim != 4 or arr.shape[-1] < 1:
        raise InputError(source, f"expected labels of shape (X, Y, Z, K) or (X, Y, Z), got {arr.shape}")
    return arr


# ----------------------------------------------------------------------------------------------- Dice
def _dice_bool(a, b):
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / total


def dice(a, b):
    """Binary Dice similarity coefficient 2|A∩B| / (|A| + |B|) of two masks of the same shape.

    Both masks are binarised with ``>= 0.5``. By convention the result is 1.0 when both masks are empty (two
    empty sets agree perfectly); it is 0.0 when exactly one is empty.
    """
    a = _binary(a, "dice: first mask")
    b = _binary(b, "dice: second mask")
    _same_shape(a, b, "dice")
    return _dice_bool(a, b)


def dice_thirds(fixed, warped, axis=2):
    """DSC within the base, mid and apex thirds of the fixed gland, split along ``axis`` (default: slice axis z).

    The fixed gland's extent along ``axis`` (first to last index holding any gland voxel, ``n`` slices) is cut
    at ``first + round(k * n / 3)``, k = 0..3, into three slabs of (as nearly as integers allow) equal
    thickness. In each slab, Dice is computed between the fixed and the warped mask restricted to that slab;
    warped voxels outside the fixed gland's extent count in no third.

    Naming: the slab at the LOWER indices is called ``base`` and the one at the higher indices ``apex``. This
    is an assumption about orientation (base of the gland toward low slice index), not something the arrays
    tell; with the opposite orientation swap ``base`` and ``apex``.

    Returns ``dict(base=, mid=, apex=)``; all three are NaN when the fixed gland is empty, and a slab that
    gets no slice (gland fewer than 3 slices thick) is NaN.
    """
    f = _binary(fixed, "dice_thirds: fixed mask")
    w = _binary(warped, "dice_thirds: warped mask")
    _same_shape(f, w, "dice_thirds")
    if not -f.ndim <= axis < f.ndim:
        raise InputError("dice_thirds", f"axis {axis} out of range for a {f.ndim}-D mask")
    axis = axis % f.ndim
    other = tuple(i for i in range(f.ndim) if i != axis)
    occupied = np.flatnonzero(f.any(axis=other))
    names = ("base", "mid", "apex")
    if occupied.size == 0:
        return {name: float("nan") for name in names}
    first, last = int(occupied[0]), int(occupied[-1])
    n = last - first + 1
    edges = [first + int(round(k * n / 3.0)) for k in range(4)]
    out = {}
    for name, lo, hi in zip(names, edges[:-1], edges[1:]):
        if hi <= lo:
            out[name] = float("nan")
            continue
        index = [slice(None)] * f.ndim
        index[axis] = slice(lo, hi)
        index = tuple(index)
        out[name] = _dice_bool(f[index], w[index])
    return out


# ------------------------------------------------------------------------------------------------ TRE
def centroid_mm(mask, spacing):
    """Centroid of the voxels with value >= 0.5, in mm: mean voxel index times ``spacing``, per axis (x, y, z).

    Measured from the centre of voxel (0, 0, 0) along the array axes (no origin or direction applied), which is
    all a distance between two masks on the same grid needs. Returns NaNs for an empty mask.
    """
    sp = _spacing(spacing)
    m = _binary(mask, "centroid_mm: mask")
    if m.ndim != 3:
        raise InputError("centroid_mm", f"expected a 3-D mask, got shape {m.shape}")
    idx = np.argwhere(m)
    if idx.shape[0] == 0:
        return np.full(3, np.nan)
    return idx.mean(axis=0) * sp


def tre_mm(fixed_labels, warped_labels, spacing):
    """Target registration error: distance in mm between fixed and warped landmark centroids.

    ``fixed_labels`` and ``warped_labels`` are (X, Y, Z, K); channels 1..K-1 are paired landmarks (channel 0,
    the gland, is not used). Distances honour anisotropic ``spacing``.

    Rule for missing landmarks: if a landmark channel is empty (no voxel >= 0.5) on either side - typically
    the warped landmark pushed out of the field of view, or a landmark absent in the fixed labels - that
    landmark's TRE is NaN. The mean is taken over the finite values only, and is NaN if none is finite; count
    the NaNs in the per-landmark array to see how many were lost.

    Returns ``(mean_tre, per_landmark)`` with ``per_landmark`` a float array of length K - 1.
    Raises InputError if the labels have no landmark channel.
    """
    sp = _spacing(spacing)
    f = _labels(fixed_labels, "tre_mm: fixed labels")
    w = _labels(warped_labels, "tre_mm: warped labels")
    _same_shape(f, w, "tre_mm: labels")
    if f.shape[-1] < 2:
        raise InputError("tre_mm", f"labels have {f.shape[-1]} channel(s); landmarks are channels >= 1")
    per = np.empty(f.shape[-1] - 1)
    for k in range(1, f.shape[-1]):
        cf = centroid_mm(f[..., k], sp)
        cw = centroid_mm(w[..., k], sp)
        per[k - 1] = float(np.sqrt(np.sum((cf - cw) ** 2)))  # NaN if either is empty
    finite = per[np.isfinite(per)]
    mean = float(finite.mean()) if finite.size else float("nan")
    return mean, per


# ------------------------------------------------------------------------------------------- Jacobian
def jacobian_determinant(ddf, dtype=np.float64):
    """Determinant of the Jacobian of x -> x + u(x) per voxel, for a DDF ``u`` of shape (X, Y, Z, 3) in voxels.

    J_ij = delta_ij + d u_i / d x_j, with derivatives by ``np.gradient`` (central differences inside,
    one-sided at the borders), in ``dtype`` (``register`` reports it in float32, faster). The 3x3 determinant is
    expanded along the first row. Returns an (X, Y, Z) array of ``dtype``.

    The determinant does not depend on whether it is measured in voxels or mm for any axis-aligned spacing
    S = diag(s): in mm the Jacobian is S J S^-1, whose determinant equals det J.
    """
    u = _ddf(ddf).astype(dtype, copy=False)
    j = [list(np.gradient(u[..., i], axis=(0, 1, 2))) for i in range(3)]  # j[i][k] = d u_i / d x_k
    for i in range(3):
        j[i][i] = j[i][i] + 1.0
    return (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
            - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
            + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))


def jacobian_gradient(ddf):
    """∇|J|: mean over voxels of |grad det J|, the magnitude of the spatial gradient of the Jacobian determinant.

    The gradient is taken per voxel (np.gradient with unit spacing), so the value depends on the grid (the
    paper's is 0.88 mm). Returns the raw value; the paper's Table 1 reports it multiplied by 100 ("×10⁻²"),
    e.g. 0.30 here is "30" there. Zero for any affine DDF.
    """
    return _mean_gradient_magnitude(jacobian_determinant(ddf))


def _mean_gradient_magnitude(det):
    g = np.gradient(det)
    return float(np.mean(np.sqrt(g[0] ** 2 + g[1] ** 2 + g[2] ** 2)))


def folding_fraction(ddf):
    """Fraction (0..1) of voxels where det J <= 0, i.e. where the transformation folds or collapses."""
    return float(np.mean(jacobian_determinant(ddf) <= 0.0))


# ---------------------------------------------------------------------------------------- Hausdorff 95
def _surface(mask):
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    eroded = ndimage.binary_erosion(mask, structure=structure, border_value=0)
    return mask & ~eroded


def hausdorff95_mm(a, b, spacing):
    """95th-percentile symmetric Hausdorff distance between the surfaces of two 3-D masks, in mm.

    Surface voxels are mask voxels with a 6-neighbour outside the mask (the array border counts as outside).
    Directed distances from every surface voxel of one mask to the nearest surface voxel of the other come
    from ``scipy.ndimage.distance_transform_edt(..., sampling=spacing)``; the result is the larger of the two
    directed 95th percentiles (as in MedPy's ``hd95``).

    Empty masks: both empty -> NaN (nothing to measure); exactly one empty -> inf (a registration that lost
    the gland is infinitely wrong, and shows up as such in the mean).
    """
    sp = _spacing(spacing)
    a = _binary(a, "hausdorff95_mm: first mask")
    b = _binary(b, "hausdorff95_mm: second mask")
    _same_shape(a, b, "hausdorff95_mm")
    if a.ndim != 3:
        raise InputError("hausdorff95_mm", f"expected 3-D masks, got shape {a.shape}")
    has_a, has_b = bool(a.any()), bool(b.any())
    if not has_a and not has_b:
        return float("nan")
    if has_a != has_b:
        return float("inf")
    sa, sb = _surface(a), _surface(b)
    dist_to_b = ndimage.distance_transform_edt(~sb, sampling=sp)
    dist_to_a = ndimage.distance_transform_edt(~sa, sampling=sp)
    d_ab = dist_to_b[sa]
    d_ba = dist_to_a[sb]
    return float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)))


# ------------------------------------------------------------------------------------------ per case
def case_metrics(fixed_labels, warped_labels, ddf, spacing):
    """All metrics for one registered pair, as a flat dict of floats.

    ``fixed_labels``/``warped_labels``: (X, Y, Z, K) (or (X, Y, Z) for gland only); ``ddf``: (X, Y, Z, 3) in
    voxels, or None (e.g. the Coarse row, which has no network DDF) -> NaN for the DDF metrics.

    Keys: ``dsc``, ``dsc_base``, ``dsc_mid``, ``dsc_apex`` (gland, channel 0; fractions 0..1), ``tre_mm``
    (mean over the finite landmark TREs; NaN if there are no landmark channels), ``hd95_mm``,
    ``jacobian_gradient`` (raw, not ×100), ``folding_fraction`` (0..1), and ``landmarks_missing`` (number of
    landmarks whose TRE is NaN because a side is empty; 0 when there are no landmark channels).
    """
    sp = _spacing(spacing)
    f = _labels(fixed_labels, "case_metrics: fixed labels")
    w = _labels(warped_labels, "case_metrics: warped labels")
    _same_shape(f, w, "case_metrics: labels")
    gf, gw = f[..., 0], w[..., 0]
    thirds = dice_thirds(gf, gw, axis=2)
    out = {
        "dsc": dice(gf, gw),
        "dsc_base": thirds["base"],
        "dsc_mid": thirds["mid"],
        "dsc_apex": thirds["apex"],
    }
    if f.shape[-1] >= 2:
        mean_tre, per = tre_mm(f, w, sp)
        out["tre_mm"] = mean_tre
        missing = int(np.sum(~np.isfinite(per)))
    else:
        out["tre_mm"] = float("nan")
        missing = 0
    out["hd95_mm"] = hausdorff95_mm(gf, gw, sp)
    if ddf is None:
        out["jacobian_gradient"] = float("nan")
        out["folding_fraction"] = float("nan")
    else:
        u = _ddf(ddf)
        if u.shape[:3] != f.shape[:3]:
            raise InputError("case_metrics: ddf", f"spatial shape {u.shape[:3]} differs from labels {f.shape[:3]}")
        det = jacobian_determinant(u)
        out["jacobian_gradient"] = _mean_gradient_magnitude(det)
        out["folding_fraction"] = float(np.mean(det <= 0.0))
    out["landmarks_missing"] = missing
    return out
