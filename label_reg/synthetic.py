"""Synthetic MR-like / TRUS-like phantom pairs related by a known smooth deformation.

The project's embedded default data (demo and tests). Everything is defined analytically in millimetres:

* **Anatomy** lives in MR world coordinates: an irregular ellipsoid-like gland (radius modulated by low-order
  smooth terms, 35-55 mm across) with a darker central zone, 2-5 landmark blobs (radius 2-3 mm, "cysts" and
  "calcifications") inside it, a rectum behind it (world -y), a bladder above it (world +z), two lateral muscles
  and smooth tissue texture.
* **MR-like image** on its own grid (default 69x69x64 at 1.5 mm, identity direction): T2-like contrast, texture,
  a mild multiplicative bias field, Gaussian noise and a slight blur.
* **TRUS-like image** on a different grid (default 60x80x60 at 1.25 mm, direction diag(-1, -1, 1), another
  origin): echogenicity model, bright capsule, anechoic cysts and bladder, depth attenuation, a fan-shaped field of
  view, a dark probe/rectum region at the high-y edge of the grid and multiplicative Rayleigh speckle.
* **Deformation**: for a TRUS world point p, the corresponding MR world point is
  ``T(p) = p + offset + u(p)`` with ``u`` a sum of a few Gaussian bumps (amplitude a few mm, Jacobian norm bounded
  below 0.5, so ``T`` is invertible). TRUS labels and images at p are the anatomy evaluated at ``T(p)``, exactly.
  The offset puts the TRUS gland 4-10 mm away from the TRUS volume centre, so the coarse pre-alignment (MR gland
  centre of mass onto the TRUS centre) leaves a real error.
* **Rotation** (optional, ``max_rotation_deg`` / ``rotation_deg``): the TRUS side sees the anatomy rotated about
  the TRUS gland centre g, ``T(p) = c + Q (p - g) + u(p) - u(g)`` with ``c`` the MR gland centre and ``Q`` a rotation
  by up to N degrees about a random axis (without rotation, ``Q = I``, this is the unrotated ``T`` exactly). The
  rotation is drawn from its own random stream, so a rotated pair has the anatomy, deformation and images of the
  unrotated pair of the same seed, only turned.
* **Ground truth** is an ITK displacement field on the TRUS grid, ``disp(p) = T(p) - p`` in mm (the ITK
  convention: the transform maps a TRUS point p to the MR point p + disp(p)).

Arrays follow the package convention, ITK index order (x, y, z); label channels last, channel 0 = gland.
"""
import os

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from label_reg import io as lio

__all__ = ["make_pair", "write_phantoms", "LAYOUT_DIRS", "GROUND_TRUTH_DIR"]

LAYOUT_DIRS = ("moving_images", "moving_labels", "fixed_images", "fixed_labels")
GROUND_TRUTH_DIR = "ground_truth"

_MR_SIZE = (69, 69, 64)
_MR_SPACING = 1.5
_US_SIZE = (60, 80, 60)
_US_SPACING = 1.25
_US_DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


# ------------------------------------------------------------------------------------------------ helpers
def _geometry(size, spacing, centre, direction):
    """Geometry whose continuous centre index (size-1)/2 sits at world point ``centre``."""
    size = tuple(int(s) for s in size)
    spacing = (float(spacing),) * 3 if np.isscalar(spacing) else tuple(float(s) for s in spacing)
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    half = (np.asarray(size, float) - 1.0) / 2.0 * np.asarray(spacing)
    origin = np.asarray(centre, float) - d @ half
    return lio.Geometry(size=size, spacing=spacing, origin=tuple(origin.tolist()),
                        direction=tuple(d.ravel().tolist()))


def _grid_points(geometry):
    """World coordinates (N, 3) float64 of every voxel, in C order of an (X, Y, Z) array."""
    idx = np.indices(geometry.size, dtype=np.float64).reshape(3, -1)
    return np.ascontiguousarray((geometry.matrix @ idx).T + np.asarray(geometry.origin))


def _rotation(rng, max_deg):
    """Random rotation matrix, angle up to ``max_deg`` about a random axis (Rodrigues)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(-max_deg, max_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def _waves(rng, n, wavelength_mm):
    """Random plane waves (wave vectors (n, 3) in rad/mm, phases, amplitudes) for smooth analytic texture."""
    k = rng.normal(size=(n, 3))
    k /= np.linalg.norm(k, axis=1, keepdims=True)
    k *= 2 * np.pi / rng.uniform(*wavelength_mm, size=(n, 1))
    return k, rng.uniform(0, 2 * np.pi, n), rng.uniform(0.5, 1.0, n) / n


def _eval_waves(waves, q):
    k, phase, amp = (w.astype(q.dtype) for w in waves)
    return np.cos(q @ k.T + phase) @ amp


def _ellipsoid(q, centre, axes):
    return np.sum(((q - centre) / axes) ** 2, axis=1) < 1.0


# ------------------------------------------------------------------------------------------------ anatomy
class _Anatomy:
    """Analytic prostate-region anatomy in MR world coordinates (mm)."""

    def __init__(self, rng, centre, num_landmarks):
        self.centre = np.asarray(centre, float)
        self.rotation = _rotation(rng, 12.0)
        self.axes = np.array([rng.uniform(20, 26), rng.uniform(17, 22), rng.uniform(18, 24)])
        # Radius modulation 1 + f(u): dipole, quadrupole and a few cross terms of the unit direction u.
        self.coeffs = rng.normal(0, [0.05, 0.05, 0.05, 0.06, 0.04, 0.04, 0.05, 0.05])
        self.coeffs = np.clip(self.coeffs, -0.1, 0.1)
        # Landmarks: well inside the gland, at least 8 mm apart.
        centres = []
        while len(centres) < num_landmarks:
            v = rng.normal(size=3)
            v *= rng.uniform(0.15, 0.7) / np.linalg.norm(v)
            c = self.centre + self.rotation @ (v * self.axes)
            if all(np.linalg.norm(c - o) >= 8.0 for o in centres):
                centres.append(c)
        self.landmarks = np.array(centres).reshape(-1, 3)
        self.landmark_radii = rng.uniform(2.0, 3.0, num_landmarks)
        self.landmark_cyst = rng.random(num_landmarks) < 0.5  # else a calcification
        # Surroundings (world axes: -y posterior, +z superior).
        ay, az = self.axes[1], self.axes[2]
        self.rectum = (self.centre + [rng.uniform(-3, 3), -(ay + rng.uniform(9, 12)), 0.0],
                       np.array([rng.uniform(10, 13), rng.uniform(7, 9), 60.0]))
        self.bladder = (self.centre + [rng.uniform(-4, 4), rng.uniform(0, 6), az + rng.uniform(12, 16)],
                        np.array([rng.uniform(22, 30), rng.uniform(18, 24), rng.uniform(14, 18)]))
        self.muscles = [(self.centre + [s * rng.uniform(38, 44), rng.uniform(-5, 5), 0.0],
                         np.array([rng.uniform(9, 12), rng.uniform(20, 26), 70.0])) for s in (-1, 1)]
        self.tissue_waves = _waves(rng, 6, (15, 40))
        self.gland_waves = _waves(rng, 8, (4, 10))
        self.echo_waves = _waves(rng, 8, (5, 15))

    def gland_radius(self, q):
        """Normalised radius s(q): s < 1 inside the gland, s = 1 on its surface."""
        v = ((q - self.centre) @ self.rotation) / self.axes
        rho = np.linalg.norm(v, axis=1)
        u = v / np.maximum(rho, 1e-9)[:, None]
        x, y, z = u.T
        terms = np.stack([x, y, z, x * y, y * z, x * z, x * x - y * y, 3 * z * z - 1], axis=1)
        return rho / (1.0 + terms @ self.coeffs)

    def regions(self, q):
        """Normalised gland radius s (N,) and landmark masks (list of (N,) bool) at float64 points q."""
        s = self.gland_radius(q)
        lm = [np.sum((q - c) ** 2, axis=1) < r * r for c, r in zip(self.landmarks, self.landmark_radii)]
        return s, lm

    @staticmethod
    def labels(regions):
        """(N, K) uint8 from :meth:`regions`: channel 0 gland, channels 1.. landmark blobs."""
        s, lm = regions
        return np.stack([s < 1.0] + lm, axis=1).astype(np.uint8)

    def mr_intensity(self, q, regions):
        """T2-like contrast (arbitrary units, ~0-1). Textures are evaluated in float32 (fast cos)."""
        s, lm = regions
        q = q.astype(np.float32)
        img = 0.42 + 0.08 * _eval_waves(self.tissue_waves, q)
        for c, a in self.muscles:
            img = np.where(_ellipsoid(q, c, a), 0.22, img)
        img = np.where(_ellipsoid(q, *self.bladder), 0.92, img)
        rc, ra = self.rectum
        img = np.where(_ellipsoid(q, rc, ra), 0.15, img)
        img = np.where(_ellipsoid(q, rc, ra * 0.6), 0.05, img)
        gland = 0.68 + 0.10 * _eval_waves(self.gland_waves, q)          # bright peripheral zone
        gland = np.where(s < 0.62, 0.48 + 0.08 * _eval_waves(self.gland_waves, 1.7 * q), gland)  # central zone
        img = np.where(s < 1.0, gland, img)
        for m, cyst in zip(lm, self.landmark_cyst):
            img = np.where(m, 0.95 if cyst else 0.12, img)
        return img

    def us_echogenicity(self, q, regions):
        """Echogenicity (before depth attenuation and speckle, ~0-1)."""
        s, lm = regions
        q = q.astype(np.float32)
        img = 0.55 + 0.15 * _eval_waves(self.echo_waves, q)
        for c, a in self.muscles:
            img = np.where(_ellipsoid(q, c, a), 0.4, img)
        img = np.where(_ellipsoid(q, *self.bladder), 0.04, img)
        gland = 0.32 + 0.10 * _eval_waves(self.echo_waves, 1.5 * q)     # hypoechoic gland
        img = np.where(s < 1.0, gland, img)
        img = np.where(np.abs(s - 1.0) < 0.05, 0.85, img)              # bright capsule
        for m, cyst in zip(lm, self.landmark_cyst):
            img = np.where(m, 0.05 if cyst else 1.0, img)
        return img


# ------------------------------------------------------------------------------------------------ deformation
class _Deformation:
    """u(p) = sum_i a_i exp(-|p - c_i|^2 / (2 s_i^2)) on TRUS world points; sum_i |a_i|/s_i e^-1/2 <= 0.45."""

    def __init__(self, rng, near, num_bumps=4):
        self.centres = near + rng.normal(0, 12.0, size=(num_bumps, 3))
        self.sigmas = rng.uniform(12.0, 20.0, num_bumps)
        dirs = rng.normal(size=(num_bumps, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        self.amps = dirs * rng.uniform(2.0, 5.0, size=(num_bumps, 1))
        bound = np.sum(np.linalg.norm(self.amps, axis=1) / self.sigmas) * np.exp(-0.5)
        if bound > 0.45:
            self.amps *= 0.45 / bound

    def __call__(self, p):
        d2 = np.sum((p[:, None, :] - self.centres[None]) ** 2, axis=2)
        w = np.exp(-d2 / (2 * self.sigmas ** 2))
        return w @ self.amps


# ------------------------------------------------------------------------------------------------ public API
def make_pair(rng, *, mr_size=_MR_SIZE, mr_spacing=_MR_SPACING, mr_direction=None,
              us_size=_US_SIZE, us_spacing=_US_SPACING, us_direction=_US_DIRECTION,
              num_landmarks=None, max_rotation_deg=0.0, rotation_deg=None):
    """One MR-like / TRUS-like phantom pair.

    ``rng`` is a ``numpy.random.Generator`` (or a seed). Directions are row-major 9-tuples (None = identity).
    ``max_rotation_deg``: rotate the TRUS side's view of the anatomy about the TRUS gland centre by an angle drawn
    uniformly in [-N, N] degrees about a random axis (0: no rotation, the pair of earlier versions exactly);
    ``rotation_deg``: exactly this angle (degrees) about a random axis instead. The linear part of the TRUS -> MR map
    is returned as ``rotation`` (3x3, identity without rotation) and its angle as ``rotation_deg``.
    Returns a dict: ``moving_image`` / ``fixed_image`` (float32 sitk images), ``moving_label`` / ``fixed_label``
    (lists of K uint8 sitk channels, 0 = gland), ``displacement`` (sitk vector image of float64 on the TRUS grid,
    mm, ITK convention: TRUS point p corresponds to MR point p + disp(p)), and, for tests, ``landmarks_mm``
    ((K-1, 3) blob centres in MR world), ``gland_centre_mm`` (MR world) and ``fixed_gland_centre_mm``
    (TRUS world point that maps onto the MR gland centre).
    """
    rng = np.random.default_rng(rng)
    rotation, angle = _trus_rotation(rng, max_rotation_deg, rotation_deg)
    identity = (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)
    num_landmarks = int(rng.integers(2, 6)) if num_landmarks is None else int(num_landmarks)

    mr_geo = _geometry(mr_size, mr_spacing, rng.uniform(-20, 20, 3), mr_direction or identity)
    anatomy = _Anatomy(rng, mr_geo.center_world + rng.uniform(-8, 8, 3), num_landmarks)

    us_geo = _geometry(us_size, us_spacing, rng.uniform(-60, 60, 3), us_direction or identity)
    us_centre = us_geo.center_world
    us_points = _grid_points(us_geo)

    # Where the TRUS gland centre sits relative to the TRUS volume centre: 4-10 mm, shrunk until it fits.
    shift = rng.normal(size=3)
    shift *= rng.uniform(4.0, 10.0) / np.linalg.norm(shift)
    bump_seed = int(rng.integers(2 ** 63))
    for _ in range(12):
        gland_us = us_centre + shift
        deformation = _Deformation(np.random.default_rng(bump_seed), gland_us)
        offset = anatomy.centre - gland_us - deformation(gland_us[None])[0]
        # Quantised to 2^-10 mm (exact in float64): the stored ground truth is exactly the field used, and the
        # zero low mantissa bits let the file compress ~5x.
        disp = offset + deformation(us_points)
        if rotation is not None:
            relative = us_points - gland_us
            disp += relative @ rotation.T - relative
        disp = np.round(disp * 1024.0) / 1024.0
        us_q = us_points + disp
        us_regions = anatomy.regions(us_q)
        us_labels = anatomy.labels(us_regions).reshape(*us_geo.size, -1)
        if _fits(us_labels):
            break
        shift *= 0.6
    else:  # pragma: no cover - the defaults always fit
        raise RuntimeError("phantom gland does not fit in the TRUS field of view; enlarge us_size")

    # MR side.
    mr_points = _grid_points(mr_geo)
    mr_regions = anatomy.regions(mr_points)
    mr_labels = anatomy.labels(mr_regions).reshape(*mr_geo.size, -1)
    mr = anatomy.mr_intensity(mr_points, mr_regions).reshape(mr_geo.size)
    mr = ndimage.gaussian_filter(mr, 0.6)
    bias = _eval_waves(_waves(rng, 3, (150, 300)), mr_points.astype(np.float32)).reshape(mr_geo.size)
    mr = mr * (1.0 + 0.25 * bias) + rng.normal(0, 0.025, mr.shape)
    mr = np.round(np.clip(mr, 0, None) * 800.0)                 # integer-valued, stored as int16

    # TRUS side: anatomy at T(p), then probe, fan, attenuation and speckle in TRUS grid space.
    us = anatomy.us_echogenicity(us_q, us_regions).reshape(us_geo.size)
    us = ndimage.gaussian_filter(us, 0.5)
    us *= _probe_and_fan(us_geo, rng)
    speckle = ndimage.gaussian_filter(rng.rayleigh(np.sqrt(2 / np.pi), us.shape), 0.5)
    us = np.round(np.clip(us * speckle / speckle.mean() * 200.0, 0, 255))  # integer-valued, stored as uint8

    disp_img = sitk.GetImageFromArray(disp.reshape(*us_geo.size, 3).transpose(2, 1, 0, 3), isVector=True)
    us_geo.apply_to(disp_img)
    return {
        "moving_image": lio.from_array(mr.astype(np.float32), mr_geo),
        "moving_label": lio.labels_from_array(mr_labels, mr_geo),
        "fixed_image": lio.from_array(us.astype(np.float32), us_geo),
        "fixed_label": lio.labels_from_array(us_labels, us_geo),
        "displacement": disp_img,
        "landmarks_mm": anatomy.landmarks.copy(),
        "gland_centre_mm": anatomy.centre.copy(),
        "fixed_gland_centre_mm": gland_us,
        "rotation": np.eye(3) if rotation is None else rotation,
        "rotation_deg": angle,
    }


def write_phantoms(output_dir, num_pairs, seed=0, max_rotation_deg=0.0, rotation_deg=None):
    """Write ``num_pairs`` phantom pairs in the paired layout; returns the written pair names.

    ``output_dir/{moving_images,moving_labels,fixed_images,fixed_labels,ground_truth}/phantomNNN.nii.gz``;
    ``ground_truth`` holds the ITK displacement fields (TRUS grid, mm). Pair i depends only on (seed, i) (and
    ``max_rotation_deg``: each TRUS side rotated by a random angle up to it; ``rotation_deg``: by exactly this angle
    about a random axis; see :func:`make_pair`).
    """
    num_pairs = int(num_pairs)
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
    check_angle("max_rotation_deg", max_rotation_deg)
    for sub in LAYOUT_DIRS + (GROUND_TRUTH_DIR,):
        os.makedirs(os.path.join(output_dir, sub), exist_ok=True)
    width = max(3, len(str(num_pairs - 1)))
    names = []
    for i, child in enumerate(np.random.SeedSequence(int(seed)).spawn(num_pairs)):
        name = f"phantom{i:0{width}d}"
        pair = make_pair(np.random.default_rng(child), max_rotation_deg=max_rotation_deg, rotation_deg=rotation_deg)
        fname = name + ".nii.gz"
        lio.write_image(os.path.join(output_dir, "moving_images", fname),
                        sitk.Cast(pair["moving_image"], sitk.sitkInt16))
        lio.write_label(os.path.join(output_dir, "moving_labels", fname), _uint8(pair["moving_label"]))
        lio.write_image(os.path.join(output_dir, "fixed_images", fname),
                        sitk.Cast(pair["fixed_image"], sitk.sitkUInt8))
        lio.write_label(os.path.join(output_dir, "fixed_labels", fname), _uint8(pair["fixed_label"]))
        disp = pair["displacement"]
        lio.write_displacement_field(os.path.join(output_dir, GROUND_TRUTH_DIR, fname),
                                     sitk.GetArrayFromImage(disp).transpose(2, 1, 0, 3),
                                     lio.Geometry.from_image(disp))
        names.append(name)
    return names


# ------------------------------------------------------------------------------------------------ internals
def check_angle(name, value):
    """``value`` as a float angle in degrees, or ValueError (naming ``name``) unless it is finite and in [0, 180]."""
    value = float(value)
    if not (np.isfinite(value) and 0.0 <= value <= 180.0):
        raise ValueError(f"{name} must be between 0 and 180 degrees, got {value}")
    return value


def _trus_rotation(rng, max_rotation_deg, rotation_deg):
    """(Q (3, 3) or None, angle in degrees) of the TRUS-side rotation (see :func:`make_pair`). Drawn from a stream
    spawned off ``rng``'s seed sequence, so that ``rng``'s own draws (the rest of the pair) are unchanged."""
    max_rotation_deg = check_angle("max_rotation_deg", max_rotation_deg)
    if rotation_deg is None and max_rotation_deg == 0.0:
        return None, 0.0
    seed_seq = getattr(rng.bit_generator, "seed_seq", None)
    own = np.random.default_rng(seed_seq.spawn(1)[0]) if seed_seq is not None else rng
    axis = own.normal(size=3)
    axis /= np.linalg.norm(axis)
    if rotation_deg is None:
        angle = float(own.uniform(-max_rotation_deg, max_rotation_deg))
    else:
        angle = float(rotation_deg)
        if not np.isfinite(angle):
            raise ValueError(f"rotation_deg must be finite, got {rotation_deg}")
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    theta = np.deg2rad(angle)
    return np.eye(3) + np.sin(theta) * k + (1 - np.cos(theta)) * (k @ k), angle


def _uint8(channels):
    return [sitk.Cast(c, sitk.sitkUInt8) for c in channels]


def _fits(labels):
    """Gland clear of every face by 2 voxels and every landmark present."""
    gland = labels[..., 0]
    inner = np.zeros_like(gland)
    inner[2:-2, 2:-2, 2:-2] = 1
    return gland.any() and not np.any(gland & (1 - inner)) and all(labels[..., k].any()
                                                                  for k in range(1, labels.shape[-1]))


def _probe_and_fan(geo, rng):
    """Multiplicative map on the TRUS grid: 0 inside the probe (a cylinder along z beyond the high-y edge)
    and outside a fan of half-angle ~65 deg, exp(-alpha * depth) attenuation inside the fan."""
    sp = np.asarray(geo.spacing)
    x, y = np.meshgrid(np.arange(geo.size[0]) * sp[0], np.arange(geo.size[1]) * sp[1], indexing="ij")
    radius = rng.uniform(9.0, 12.0)
    cx = (geo.size[0] - 1) / 2 * sp[0] + rng.uniform(-3, 3)
    cy = (geo.size[1] - 1) * sp[1] + radius * rng.uniform(0.3, 0.6)
    dx, dy = x - cx, cy - y                                  # dy > 0 towards the anterior (low y index)
    r = np.hypot(dx, dy)
    angle = np.degrees(np.arctan2(np.abs(dx), dy))
    depth = np.clip(r - radius, 0, None)
    gain = np.exp(-0.012 * depth) * (1.0 + 0.6 * np.exp(-depth / 3.0))  # bright near field, then decay
    gain = np.where(r < radius, 0.02, gain)
    gain = np.where(angle > rng.uniform(60, 70), 0.0, gain)
    return gain[:, :, None]
