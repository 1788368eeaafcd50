"""From a network DDF on the crop grid to world-space transforms (mm) between the original MR and TRUS images.

The chain, for a crop-grid voxel index x (see :mod:`label_reg.preprocess`):

    warped(x) = moving(x + u(x)) = MR( W_c(x + u(x)) + t )

with ``W_c`` the crop grid's index->world map (TRUS world space), ``u`` the predicted DDF in crop voxels and ``t``
the pre-alignment translation. So a TRUS world point p (crop index x = W_c^-1(p)) corresponds to the MR world point

    T(p) = p + M_c u(x) + t,        M_c = direction * diag(spacing) of the crop grid.

``T(p) - p`` sampled on any grid (normally the original TRUS image's) is the total transform written as an ITK
displacement field: ``sitk.DisplacementFieldTransform`` maps a TRUS point to its MR point, which is what
``sitk.Resample(mr, trus, transform)`` needs. Beyond the crop grid the DDF is extended by its edge values, so the
field stays continuous. Mapping MR points (biopsy targets) into TRUS space needs the inverse, found per point by
fixed-point iteration.
"""
import numpy as np
from scipy import ndimage

from label_reg.io import Geometry


def _index_grid(size):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in size], indexing="ij"), axis=-1)


def sample_field(field, index, mode="nearest"):
    """Trilinear sample of a vector field (X, Y, Z, C) at continuous indices (..., 3); (..., C)."""
    coords = np.moveaxis(np.asarray(index, np.float64), -1, 0)
    return np.stack([ndimage.map_coordinates(field[..., c], coords, order=1, mode=mode)
                     for c in range(field.shape[-1])], axis=-1)


def total_displacement_mm(ddf, crop_grid, translation_mm, target):
    """Displacement field (X, Y, Z, 3) in world mm on ``target`` (a Geometry): TRUS point p -> MR point p + d(p).

    ddf: (Xc, Yc, Zc, 3) network output in crop-grid voxels; crop_grid: the Geometry it lives on; translation_mm:
    the pre-alignment ``t``. Pass ``ddf=None`` for the pre-alignment alone.
    """
    crop_grid, target = _geometry(crop_grid), _geometry(target)
    points = target.index_to_world(_index_grid(target.size))
    disp = np.broadcast_to(np.asarray(translation_mm, np.float64), points.shape).copy()
    if ddf is not None:
        ddf = np.asarray(ddf, np.float64)
        if tuple(ddf.shape[:3]) != tuple(crop_grid.size) or ddf.shape[-1] != 3:
            raise ValueError(f"ddf shape {ddf.shape} does not match the crop grid {crop_grid.size} + (3,)")
        voxels = sample_field(ddf, crop_grid.world_to_index(points))
        disp += voxels @ np.asarray(crop_grid.matrix, np.float64).T
    return disp


def transform_points(points, disp_mm, grid):
    """Apply a displacement field (forward): p -> p + d(p), d interpolated trilinearly (as ITK does inside)."""
    grid = _geometry(grid)
    points = np.asarray(points, np.float64).reshape(-1, 3)
    return points + sample_field(disp_mm, grid.world_to_index(points))


def invert_points(targets, disp_mm, grid, iterations=100, tol_mm=1e-4):
    """Points p with p + d(p) = q for each target q (MR point -> TRUS point), by fixed-point iteration.

    Returns (points (N, 3), residual_mm (N,)): the residual |p + d(p) - q| tells whether a point converged (it does
    when the field's Jacobian stays away from folding, as a smooth registration field does).
    """
    grid = _geometry(grid)
    targets = np.asarray(targets, np.float64).reshape(-1, 3)
    points = targets - sample_field(disp_mm, grid.world_to_index(targets))
    for _ in range(iterations):
        step = targets - transform_points(points, disp_mm, grid)
        points = points + step
        if np.all(np.linalg.norm(step, axis=1) < tol_mm):
            break
    residual = np.linalg.norm(transform_points(points, disp_mm, grid) - targets, axis=1)
    return points, residual


def _geometry(value):
    if isinstance(value, Geometry):
        return value
    return Geometry.from_image(value)
