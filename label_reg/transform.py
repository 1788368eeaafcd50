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

**Global affine stage.** A network with ``global_affine`` predicts ``u(x) = a(x) + (I + R) l(x)`` with ``a`` an
affine in crop voxels (:func:`label_reg.layers.compose_affine`), so the field above already holds the affine. The
affine alone, ``x -> M x + b`` in crop indices (:func:`label_reg.network.stage_model`), maps TRUS world points to MR
world points as

    T_a(p) = W_c(M W_c^-1(p) + b) + t = A p + o,        A = M_c M M_c^-1,  o = o_c + M_c b + t - A o_c

(:func:`world_affine`; ``o_c`` the crop grid's origin), which ``register`` writes as an ITK affine transform. Inside
the crop grid ``T`` and ``T_a`` agree when the local DDF is zero; beyond it ``T`` holds the DDF's edge values
while ``T_a`` is the affine everywhere.

Memory: :class:`TotalDisplacement` computes that field on demand, slab by slab or at given points, and
:func:`write_warped` resamples the MR through it and writes the outputs slab by slab, so a TRUS grid of any size costs
about ``100 bytes x SLAB_VOXELS`` beyond the inputs, never a field of the whole grid (24 bytes a voxel, several
copies).
"""
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from label_reg.io import Geometry, NiftiSlabWriter

SLAB_VOXELS = 1 << 22  # voxels per slab (about 400 MB of temporaries) in TotalDisplacement.slab / write_warped


def sample_field(field, index, mode="nearest"):
    """Trilinear sample of a vector field (X, Y, Z, C) at continuous indices (..., 3); (..., C)."""
    coords = np.moveaxis(np.asarray(index, np.float64), -1, 0)
    return np.stack([ndimage.map_coordinates(field[..., c], coords, order=1, mode=mode)
                     for c in range(field.shape[-1])], axis=-1)


class TotalDisplacement:
    """The total transform's displacement ``d(p) = M_c u(W_c^-1 p) + t`` (world mm) on a ``target`` grid (normally
    the TRUS image's), computed on demand instead of held whole.

    ddf: (Xc, Yc, Zc, 3) network output in crop-grid voxels, or None for the pre-alignment alone; crop_grid: the
    Geometry it lives on; translation_mm: the pre-alignment ``t``; target: the Geometry to sample on.
    :meth:`slab` gives the field on z-slices [z0, z1) of ``target`` (what the whole-grid field holds there);
    :meth:`sample` interpolates it trilinearly between ``target``'s nodes at any world points, edge values beyond
    the grid, exactly as ITK interpolates the written field, so mapped points agree with the file.
    """

    def __init__(self, ddf, crop_grid, translation_mm, target):
        self.crop_grid, self.target = _geometry(crop_grid), _geometry(target)
        self.translation = np.asarray(translation_mm, np.float64).reshape(3)
        if ddf is not None:
            ddf = np.asarray(ddf, np.float64)
            if tuple(ddf.shape[:3]) != tuple(self.crop_grid.size) or ddf.shape[-1] != 3:
                raise ValueError(f"ddf shape {ddf.shape} does not match the crop grid {self.crop_grid.size} + (3,)")
        self.ddf = ddf
        crop_inverse = np.linalg.inv(self.crop_grid.matrix)
        # crop index of target index x: c0 + C x
        self._c0 = crop_inverse @ (np.asarray(self.target.origin) - np.asarray(self.crop_grid.origin))
        self._c = crop_inverse @ self.target.matrix

    def _displacement(self, coords):
        """d at crop-grid coordinates ``coords`` (3, ...): (..., 3) float64."""
        shape = coords.shape[1:]
        disp = np.empty(shape + (3,), np.float64)
        disp[...] = self.translation
        if self.ddf is not None:
            matrix = self.crop_grid.matrix
            for c in range(3):
                u = ndimage.map_coordinates(self.ddf[..., c], coords, order=1, mode="nearest")
                for r in range(3):
                    disp[..., r] += matrix[r, c] * u
        return disp

    def slab(self, z0=0, z1=None):
        """The field (X, Y, z1 - z0, 3), mm, on z-slices [z0, z1) of the target grid."""
        X, Y, Z = self.target.size
        z1 = Z if z1 is None else z1
        i = np.arange(X, dtype=np.float64)[:, None, None]
        j = np.arange(Y, dtype=np.float64)[None, :, None]
        k = np.arange(z0, z1, dtype=np.float64)[None, None, :]
        coords = np.empty((3, X, Y, z1 - z0), np.float64)
        for d in range(3):
            coords[d] = self._c0[d] + self._c[d, 0] * i + self._c[d, 1] * j + self._c[d, 2] * k
        return self._displacement(coords)

    def at_nodes(self, index):
        """The field at target-grid indices ``index`` (..., 3)."""
        index = np.asarray(index, np.float64)
        coords = np.moveaxis(index @ self._c.T + self._c0, -1, 0)
        return self._displacement(coords)

    def sample(self, points):
        """Trilinear interpolation between target-grid nodes at world points (N, 3); (N, 3) mm."""
        points = np.asarray(points, np.float64).reshape(-1, 3)
        size = np.asarray(self.target.size)
        q = np.clip(self.target.world_to_index(points), 0, size - 1)
        base = np.clip(np.floor(q), 0, np.maximum(size - 2, 0))
        frac = q - base
        out = np.zeros_like(points)
        for corner in np.ndindex(2, 2, 2):
            offset = np.asarray(corner, np.float64)
            node = np.minimum(base + offset, size - 1)
            weight = np.prod(np.where(offset == 1, frac, 1.0 - frac), axis=1)
            out += weight[:, None] * self.at_nodes(node)
        return out


def total_displacement_mm(ddf, crop_grid, translation_mm, target):
    """Displacement field (X, Y, Z, 3) in world mm on ``target`` (a Geometry): TRUS point p -> MR point p + d(p).

    ddf: (Xc, Yc, Zc, 3) network output in crop-grid voxels; crop_grid: the Geometry it lives on; translation_mm:
    the pre-alignment ``t``. Pass ``ddf=None`` for the pre-alignment alone. (The whole field at once: for large
    grids use :class:`TotalDisplacement` slab by slab.)
    """
    return TotalDisplacement(ddf, crop_grid, translation_mm, target).slab()


def _displacement_at(points, disp_mm, grid):
    if isinstance(disp_mm, TotalDisplacement):
        return disp_mm.sample(points)
    return sample_field(disp_mm, _geometry(grid).world_to_index(points))


def transform_points(points, disp_mm, grid=None):
    """Apply a displacement field (forward): p -> p + d(p), d interpolated trilinearly (as ITK does inside).
    ``disp_mm``: an (X, Y, Z, 3) array on ``grid``, or a :class:`TotalDisplacement` (``grid`` unused)."""
    points = np.asarray(points, np.float64).reshape(-1, 3)
    return points + _displacement_at(points, disp_mm, grid)


def invert_points(targets, disp_mm, grid=None, iterations=100, tol_mm=1e-4):
    """Points p with p + d(p) = q for each target q (MR point -> TRUS point), by fixed-point iteration.
    ``disp_mm``: an (X, Y, Z, 3) array on ``grid``, or a :class:`TotalDisplacement` (``grid`` unused).

    Returns (points (N, 3), residual_mm (N,)): the residual |p + d(p) - q| tells whether a point converged (it does
    when the field's Jacobian stays away from folding, as a smooth registration field does).
    """
    targets = np.asarray(targets, np.float64).reshape(-1, 3)
    points = targets - _displacement_at(targets, disp_mm, grid)
    for _ in range(iterations):
        step = targets - transform_points(points, disp_mm, grid)
        points = points + step
        if np.all(np.linalg.norm(step, axis=1) < tol_mm):
            break
    residual = np.linalg.norm(transform_points(points, disp_mm, grid) - targets, axis=1)
    return points, residual


def write_warped(field, mr, mr_labels, image_path, label_path, ddf_path, slab_voxels=None, keep_gland=False):
    """Resample the MR onto ``field.target`` through the total transform and write it, its labels and the transform,
    slab by slab (:class:`label_reg.io.NiftiSlabWriter`; each file verified and renamed into place when complete).

    field: a :class:`TotalDisplacement`; mr: the MR image (sitk, float32); mr_labels: its K label channels (sitk).
    Writes ``image_path`` (cubic B-spline, clamped to the MR's range, the MR minimum outside its field of view,
    float32), ``label_path`` (each channel linear then >= 0.5, uint8; 4-D with the channels last when K > 1) and
    ``ddf_path`` (the ITK displacement field, float64 mm; gzip level 1: float64 vectors barely compress, level 6
    only costs time). Each slab of at most ``slab_voxels`` voxels (default
    :data:`SLAB_VOXELS`; whole z-slices, at least one) is resampled through its own piece of the field: the same
    values as one pass over the whole grid, without holding any of it.

    Returns, with ``keep_gland``, the warped label channel 0 (the gland) as a uint8 sitk image on the grid (one
    byte a voxel, e.g. for :func:`label_reg.register.quality_check`), else None.
    """
    geo = field.target
    X, Y, Z = geo.size
    depth = max(1, min(Z, int(SLAB_VOXELS if slab_voxels is None else slab_voxels) // (X * Y)))
    view = sitk.GetArrayViewFromImage(mr)
    lo, hi = float(view.min()), float(view.max())
    del view
    channels = [sitk.Cast(ch, sitk.sitkFloat32) for ch in mr_labels]
    stack = len(channels) > 1
    gland = np.empty((Z, Y, X), np.uint8) if keep_gland else None
    with NiftiSlabWriter(image_path, geo, np.float32) as image_out, \
            NiftiSlabWriter(label_path, geo, np.uint8, kind="stack" if stack else "scalar",
                            channels=len(channels)) as label_out, \
            NiftiSlabWriter(ddf_path, geo, np.float64, kind="displacement", compresslevel=1) as ddf_out:
        for z0 in range(0, Z, depth):
            z1 = min(Z, z0 + depth)
            slab_geo = Geometry((X, Y, z1 - z0), geo.spacing, tuple(geo.index_to_world((0.0, 0.0, float(z0)))),
                                geo.direction)
            disp = np.ascontiguousarray(field.slab(z0, z1).transpose(2, 1, 0, 3))  # (nz, Y, X, 3)
            ddf_out.write(disp)
            disp_img = sitk.GetImageFromArray(disp, isVector=True)
            del disp
            slab_geo.apply_to(disp_img)
            transform = sitk.DisplacementFieldTransform(disp_img)  # takes the image over
            reference = slab_geo.reference_image()
            warped = sitk.Clamp(sitk.Resample(mr, reference, transform, sitk.sitkBSpline, lo, sitk.sitkFloat32),
                                sitk.sitkFloat32, lo, hi)
            image_out.write(sitk.GetArrayViewFromImage(warped))  # a view: ``warped`` must stay alive meanwhile
            del warped
            planes = []
            for ch in channels:
                res = sitk.Resample(ch, reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
                planes.append(sitk.GetArrayFromImage(sitk.BinaryThreshold(res, 0.5, 1e30, 1, 0)))
            label_out.write(np.stack(planes) if stack else planes[0])
            if gland is not None:
                gland[z0:z1] = planes[0]
    if gland is None:
        return None
    gland_img = sitk.GetImageFromArray(gland)
    del gland
    return geo.apply_to(gland_img)


def world_affine(affine, crop_grid, translation_mm):
    """The network's affine on the crop grid in world mm: (A (3, 3), o (3,)) with TRUS point p -> MR point A p + o.

    affine: (3, 4) crop-grid index x -> moving index ``affine[:, :3] x + affine[:, 3]`` (voxels); crop_grid: its
    Geometry; translation_mm: the pre-alignment ``t`` (moving crop point + t = MR point). See the module docstring.
    """
    affine = np.asarray(affine, np.float64)
    if affine.shape != (3, 4):
        raise ValueError(f"affine must be (3, 4), got {affine.shape}")
    grid = _geometry(crop_grid)
    to_world = grid.matrix
    origin = np.asarray(grid.origin, np.float64)
    matrix = to_world @ affine[:, :3] @ np.linalg.inv(to_world)
    offset = origin + to_world @ affine[:, 3] + np.asarray(translation_mm, np.float64).reshape(3) - matrix @ origin
    return matrix, offset


def affine_summary(matrix, offset, center_mm):
    """A JSON-ready description of the world affine p -> A p + o (mm): ``matrix`` (row-major 3x3),
    ``translation_mm`` (ITK's translation about ``center_mm``: the displacement of the centre point),
    ``center_mm``, ``rotation_deg`` (angle of the rotation of its polar decomposition A = U P), ``scales``
    (singular values of A) and ``determinant``."""
    matrix = np.asarray(matrix, np.float64)
    center = np.asarray(center_mm, np.float64).reshape(3)
    u, scales, vt = np.linalg.svd(matrix)
    rotation = u @ vt
    if np.linalg.det(rotation) < 0:  # a reflection: report the rotation part of -U P
        rotation = -rotation
    angle = float(np.degrees(np.arccos(np.clip((np.trace(rotation) - 1.0) / 2.0, -1.0, 1.0))))
    translation = matrix @ center + np.asarray(offset, np.float64).reshape(3) - center
    return {"matrix": [[float(v) for v in row] for row in matrix],
            "translation_mm": [float(v) for v in translation], "center_mm": [float(v) for v in center],
            "rotation_deg": angle, "scales": [float(v) for v in scales],
            "determinant": float(np.linalg.det(matrix))}


def _geometry(value):
    if isinstance(value, Geometry):
        return value
    return Geometry.from_image(value)
