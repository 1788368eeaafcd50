"""Figures in the style of the paper (matplotlib, Agg, PNG; written atomically).

* :func:`registration_figure` (Fig. 3): a row of axial (z) slices of the fixed TRUS image, one panel for the
  pre-aligned state and one per method, with the MR (warped moving) gland in cyan, the TRUS gland in orange and their
  overlap in yellow (filled, with solid outlines).
* :func:`jacobian_figure` (Fig. 4): the magnitude of the spatial gradient of the Jacobian determinant of
  x -> x + u(x), |∇ det J|, on an axial slice, one panel per method, with a colour bar (×10⁻², the unit of
  Table 1's ∇|J| column, whose value is this map's mean over the volume).

Arrays follow the package convention: volumes (X, Y, Z) in ITK index order, labels (X, Y, Z, K) with channel 0 the
gland (only the gland is drawn), DDFs (X, Y, Z, 3) in voxels. Slices are shown with y down the rows and x along the
columns (as the voxel grid is stored; no flip for the direction cosines). Figures are built on
``matplotlib.figure.Figure`` directly (no pyplot state) and rendered by the Agg canvas.
"""
from __future__ import annotations

import pathlib

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import ndimage

from label_reg import metrics
from label_reg.io import atomic_path

__all__ = ["MR_COLOUR", "TRUS_COLOUR", "OVERLAP_COLOUR", "middle_slice", "overlay_rgb", "jacobian_gradient_map",
           "registration_figure", "jacobian_figure"]

MR_COLOUR = (0.0, 1.0, 1.0)        # cyan
TRUS_COLOUR = (1.0, 0.55, 0.0)     # orange
OVERLAP_COLOUR = (1.0, 1.0, 0.0)   # yellow
FILL_ALPHA = 0.45
THRESHOLD = metrics.THRESHOLD


def _gland(labels):
    arr = np.asarray(labels)
    if arr.ndim == 4:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise ValueError(f"expected a 3-D mask or (X, Y, Z, K) labels, got shape {arr.shape}")
    return arr >= THRESHOLD


def middle_slice(mask=None, depth=None):
    """The middle axial (z) index of a mask's z-extent, or of ``depth`` slices when the mask is None or empty."""
    if mask is not None:
        m = _gland(mask)
        occupied = np.flatnonzero(m.any(axis=(0, 1)))
        if occupied.size:
            return int((occupied[0] + occupied[-1]) // 2)
        depth = m.shape[2]
    if depth is None:
        raise ValueError("middle_slice needs a mask or a depth")
    return int(depth) // 2


def _outline(mask2d):
    return mask2d & ~ndimage.binary_erosion(mask2d, border_value=0)


def overlay_rgb(image2d, mr_mask2d, trus_mask2d, alpha=FILL_ALPHA, outlines=True):
    """RGB (H, W, 3) float array in [0, 1]: a grey-scale slice (shown as given: rows = first axis) with MR-only voxels
    tinted cyan, TRUS-only orange and their overlap yellow (``alpha`` blend); mask outlines drawn opaque."""
    image = np.asarray(image2d, np.float64)
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D slice, got shape {image.shape}")
    lo, hi = float(np.min(image)), float(np.max(image))
    grey = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    mr = np.asarray(mr_mask2d) >= THRESHOLD
    us = np.asarray(trus_mask2d) >= THRESHOLD
    if mr.shape != image.shape or us.shape != image.shape:
        raise ValueError(f"mask shapes {mr.shape}, {us.shape} differ from the slice {image.shape}")
    for region, colour in ((mr & ~us, MR_COLOUR), (us & ~mr, TRUS_COLOUR), (mr & us, OVERLAP_COLOUR)):
        rgb[region] = (1.0 - alpha) * rgb[region] + alpha * np.asarray(colour)
    if outlines:
        mr_edge, us_edge = _outline(mr), _outline(us)
        rgb[us_edge] = TRUS_COLOUR
        rgb[mr_edge] = MR_COLOUR
        rgb[mr_edge & us_edge] = OVERLAP_COLOUR
    return np.clip(rgb, 0.0, 1.0)


def jacobian_gradient_map(ddf):
    """|∇ det J| per voxel (X, Y, Z) for a DDF (X, Y, Z, 3) in voxels; its mean is
    :func:`label_reg.metrics.jacobian_gradient`."""
    det = metrics.jacobian_determinant(ddf)
    g = np.gradient(det)
    return np.sqrt(g[0] ** 2 + g[1] ** 2 + g[2] ** 2)


def _save(fig, path):
    path = pathlib.Path(path)
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi)
    return path


def _aspect(spacing):
    if spacing is None:
        return 1.0
    sx, sy = float(spacing[0]), float(spacing[1])
    return sy / sx  # rows are y, columns are x


def registration_figure(path, fixed_image, fixed_labels, panels, z=None, spacing=None, title=None, dpi=100):
    """Write a Fig. 3-style PNG: one axial slice ``z`` (default: the middle of the fixed gland's z-extent) of the fixed
    image per panel, overlaid with the fixed gland (orange) and that panel's moving gland (cyan); overlap yellow.

    ``panels``: sequence of ``(title, moving labels)``, e.g. ``[("Pre-aligned", moving), ("MIX+", warped)]``; labels
    (X, Y, Z) or (X, Y, Z, K) on the fixed grid. Each panel's title shows its gland DSC on the slice's volume.
    Returns the path.
    """
    fixed_image = np.asarray(fixed_image)
    if fixed_image.ndim == 4 and fixed_image.shape[-1] == 1:
        fixed_image = fixed_image[..., 0]
    if fixed_image.ndim != 3:
        raise ValueError(f"expected a 3-D fixed image, got shape {fixed_image.shape}")
    panels = list(panels)
    if not panels:
        raise ValueError("registration_figure needs at least one panel")
    fixed_gland = _gland(fixed_labels)
    z = middle_slice(fixed_gland) if z is None else int(z)
    aspect = _aspect(spacing)
    n = len(panels)
    fig = Figure(figsize=(3.2 * n, 3.7 if title else 3.3), dpi=dpi, layout="constrained")
    for i, (name, moving) in enumerate(panels):
        moving_gland = _gland(moving)
        if moving_gland.shape != fixed_gland.shape:
            raise ValueError(f"panel {name!r}: mask shape {moving_gland.shape} differs from {fixed_gland.shape}")
        rgb = overlay_rgb(fixed_image[:, :, z].T, moving_gland[:, :, z].T, fixed_gland[:, :, z].T)
        ax = fig.add_subplot(1, n, i + 1)
        ax.imshow(rgb, interpolation="nearest", aspect=aspect)
        ax.set_title(f"{name}\nDSC {100 * metrics.dice(fixed_gland, moving_gland):.1f} %", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(f"{title} (axial slice z={z})", fontsize=10)
    return _save(fig, path)


def jacobian_figure(path, ddfs, z=None, reference_mask=None, title=None, vmax=None, dpi=100):
    """Write a Fig. 4-style PNG: |∇ det J| ×10⁻² on an axial slice for each ``(title, ddf)`` in ``ddfs``, one shared
    colour scale (``vmax`` in the same ×10⁻² unit, default the 99th percentile over the shown slices) and a
    colour bar. ``reference_mask`` (the fixed labels) is outlined in white and its z-extent's middle is the default
``z`` (else the volume's middle slice). Returns the path.
    """
    ddfs = list(ddfs)
    if not ddfs:
        raise ValueError("jacobian_figure needs at least one DDF")
    maps = [(name, 100.0 * jacobian_gradient_map(ddf)) for name, ddf in ddfs]
    depth = maps[0][1].shape[2]
    if z is None:
        z = middle_slice(reference_mask, depth) if reference_mask is not None else depth // 2
    z = int(z)
    slices = [(name, m[:, :, z].T, float(np.mean(m))) for name, m in maps]
    if vmax is None:
        vmax = float(np.percentile(np.concatenate([s.ravel() for _, s, _ in slices]), 99))
        vmax = vmax if vmax > 0 else 1.0
    n = len(slices)
    outline = None
    if reference_mask is not None:
        outline = _outline(_gland(reference_mask)[:, :, z].T)
    fig = Figure(figsize=(3.2 * n + 0.9, 3.7 if title else 3.3), dpi=dpi, layout="constrained")
    axes = [fig.add_subplot(1, n, i + 1) for i in range(n)]
    image = None
    for ax, (name, s, mean) in zip(axes, slices):
        image = ax.imshow(s, cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        if outline is not None and outline.shape == s.shape:
            ax.imshow(np.ma.masked_where(~outline, outline.astype(float)), cmap="gray", vmin=0.0, vmax=1.0,
                      interpolation="nearest")
        ax.set_title(f"{name}\n∇|J| mean {mean:.1f} ×10⁻²", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    bar = fig.colorbar(image, ax=axes, shrink=0.85)
    bar.set_label("|∇ det J| ×10⁻²", fontsize=8)
    if title:
        fig.suptitle(f"{title} (axial slice z={z})", fontsize=10)
    return _save(fig, path)
