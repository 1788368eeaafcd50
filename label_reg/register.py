"""Register raw MR/TRUS NIfTI volumes with a trained model; every output lives in the original TRUS image's world space.

``Registrar(model_dir)`` loads the network once (weights only, see :mod:`label_reg.model_dir`) as a
:class:`label_reg.predictor.Predictor` (one traced forward pass of fixed input signature), then
:meth:`Registrar.register` does, per pair:

1. read and validate the files (:mod:`label_reg.io`); the MR gland mask is required (pre-alignment, and the third
   input of MIX+ models);
2. pre-process exactly as in training with the model's recorded :class:`~label_reg.preprocess.PreprocessConfig`
   (pre-alignment translation ``t``, crop grid around the TRUS centre, intensity normalisation);
3. predict the DDF ``u`` on the crop grid (for a ``global_affine`` model also its affine stage alone);
4. compose the total transform ``T(p) = p + M_c u(W_c^-1 p) + t`` (:mod:`label_reg.transform`) sampled on the TRUS
   image grid, and resample the MR image (cubic B-spline) and every MR label channel (linear, then >= 0.5) through it;
5. map MR points (biopsy targets) into TRUS space by inverting ``T`` per point;
6. write everything into a staging folder beside ``output_dir`` and move it into place
   (:func:`label_reg.io.atomic_dir`), so that an error never leaves a partial output. The images are resampled and
   written slab by slab (:func:`label_reg.transform.write_warped`), so memory stays bounded whatever the TRUS grid's
   size, and every file is verified before it counts as written. The output folder is checked writable, with room
   for the outputs, before the model loads (:func:`check_output_dir`).

Outputs (``output_dir``):

* ``warped_moving_image.nii.gz``  MR resampled onto the TRUS grid (float32).
* ``warped_moving_label.nii.gz``  every MR label channel warped onto the TRUS grid (uint8; 4-D, channels last,
  when K > 1).
* ``transform_ddf.nii.gz``        the total transform as an ITK displacement field in mm on the TRUS grid: TRUS point
  p maps to MR point p + d(p) (``sitk.DisplacementFieldTransform``; 3D Slicer loads it as a transform).
* ``transform_affine.tfm``        (``global_affine`` models only) the network's global affine stage alone, with the
  pre-alignment translation, as an ITK affine transform in world (LPS) mm mapping a TRUS point to its MR point like
  the displacement field does (:func:`label_reg.transform.world_affine`); SimpleITK and 3D Slicer load it. The
  displacement field already holds it (the total transform); inside the crop grid the two agree where the local
  deformation is zero.
* ``moving_points_in_fixed.csv`` / ``moving_points_in_fixed.mrk.json`` with ``moving_points``: the points in TRUS
  world (LPS) mm, with a ``status`` of ``ok``, ``outside_fixed_image`` or ``not_inverted`` (residual > 0.01 mm).
* ``registration.json``           model, inputs, timings, pre-alignment (mode, anchor, translation), DDF statistics,
  the world affine (``global_affine``: matrix, translation, centre, rotation angle, scales; null without the stage),
  the self-check (``quality_check``, null without a segmenter) and pre-alignment ``warnings``.
* ``fixed_label_predicted.nii.gz`` (``trus_gland`` models only) the TRUS gland the segmenter found, on the TRUS
  grid (uint8 0/1).

**The found-gland chain.** A model directory whose pre-processing has ``prealign == "trus_gland"`` carries its
TRUS gland segmenter (``MODEL_DIR/segmenter/``, :func:`label_reg.model_dir.segmenter_path`), loaded once as a
:class:`label_reg.segmenter.GlandFinder`. Per pair, before step 2, the segmenter finds the gland in the raw TRUS
image (an InputError naming the TRUS file when it finds none) and the pre-alignment puts the MR gland centre of mass
on the found centre (``fixed_centre_mm``), the crop centred there. After step 4 a **self-check** compares the warped
MR gland (label channel 0 on the TRUS grid) with the found TRUS gland (both on the TRUS grid) and fails when
DSC < :data:`QC_MIN_DSC`, or their centres of mass (world mm) are more than :data:`QC_MAX_CENTRE_MM` apart, or the
found gland touches the border of the segmenter grid (it may be cut off, its centre biased; contact with the TRUS
image border is recorded only).
A failed check prints one warning line on stderr; the outputs are written all the same. ``trus_centre`` models
(the paper's pre-alignment, no segmenter) have no self-check.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import sys
import time

import numpy as np
import pandas as pd
import SimpleITK as sitk

from label_reg import io as lio
from label_reg import metrics
from label_reg.errors import InputError
from label_reg.recentre import check_passes, recentre

__all__ = ["Registrar", "RegistrationResult", "Inputs", "read_inputs", "check_output_dir",
           "register_folder", "read_points_csv", "quality_check", "OUTPUT_FILES", "POINT_TOLERANCE_MM",
           "QC_MIN_DSC", "QC_MAX_CENTRE_MM"]

OUTPUT_FILES = {
    "warped_moving_image": "warped_moving_image.nii.gz",
    "warped_moving_label": "warped_moving_label.nii.gz",
    "transform_ddf": "transform_ddf.nii.gz",
    "transform_affine": "transform_affine.tfm",
    "moving_points_in_fixed_csv": "moving_points_in_fixed.csv",
    "moving_points_in_fixed_mrk": "moving_points_in_fixed.mrk.json",
    "registration": "registration.json",
    "fixed_label_predicted": "fixed_label_predicted.nii.gz",
}
POINT_TOLERANCE_MM = 0.01  # a mapped point whose inverse residual exceeds this is flagged "not_inverted"
# Self-check of a found-gland registration (warped MR gland vs the segmenter's TRUS gland, both on the TRUS grid).
# On the 18 fold-0 validation pairs of the demo data (CPU preset networks) the check measured DSC 0.83-0.94 (median
# 0.89) and centre distances 0.2-3.1 mm (median 0.9); the paper's coarse step alone has a median DSC of 0.67-0.75.
QC_MIN_DSC = 0.70  # fails below
QC_MAX_CENTRE_MM = 5.0  # fails above: distance between the two glands' centres of mass, world mm
POINTS_FOLDER = "moving_points"  # batch mode: optional <data_dir>/moving_points/<name>.csv
_MARKUPS_SCHEMA = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/"
                   "Schema/markups-schema-v1.0.3.json#")


@dataclasses.dataclass
class RegistrationResult:
    """What :meth:`Registrar.register` wrote and computed. ``points_fixed`` (N, 3) TRUS world mm and
    ``point_status`` (N,) are None without moving points."""

    output_dir: pathlib.Path
    files: dict
    report: dict
    translation_mm: np.ndarray
    points_fixed: np.ndarray | None = None
    point_status: list | None = None
    warnings: list = dataclasses.field(default_factory=list)  # one line each (see preprocess.prealignment_warnings)
    replaced: list = dataclasses.field(default_factory=list)  # our output files of an earlier run that were replaced


# ------------------------------------------------------------------------------------------------ points CSV
def read_points_csv(path):
    """Read MR points (world/LPS mm): a CSV with columns ``x, y, z`` (any case) and optionally ``name`` (or
    ``label``), or a header-less CSV of three numeric columns. Returns (names list, (N, 3) float64)."""
    p = pathlib.Path(path)
    if not p.exists():
        raise InputError(p, "file not found")
    if not p.is_file():
        raise InputError(p, "is not a file, expected a CSV of points")
    try:
        raw = pd.read_csv(p, header=None, dtype=str, keep_default_na=False, skip_blank_lines=True,
                          skipinitialspace=True, comment="#")
    except pd.errors.EmptyDataError:
        raise InputError(p, "holds no points (expected a CSV with columns x,y,z in mm)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(p, f"cannot parse CSV ({first})") from None
    raw = raw.apply(lambda col: col.str.strip())
    header = [c.lower() for c in raw.iloc[0].tolist()] if len(raw) else []
    if {"x", "y", "z"} <= set(header):
        body = raw.iloc[1:]
        cols = {name: header.index(name) for name in ("x", "y", "z")}
        name_col = next((header.index(n) for n in ("name", "label") if n in header), None)
        first_line = 2
    elif len(raw) and raw.shape[1] == 3 and all(_is_number(v) for v in raw.iloc[0]):
        body = raw
        cols = {"x": 0, "y": 1, "z": 2}
        name_col = None
        first_line = 1
    else:
        raise InputError(p, "expected a header with columns x,y,z (and optionally name), or three numeric "
                            "columns x,y,z in mm")
    if len(body) == 0:
        raise InputError(p, "holds no points (only a header)")
    points = np.empty((len(body), 3), np.float64)
    for row in range(len(body)):
        for axis, key in enumerate("xyz"):
            value = body.iloc[row, cols[key]]
            if not _is_number(value) or not math.isfinite(float(value)):
                raise InputError(p, f"line {first_line + row}: {key} = {value!r} is not a finite number (mm)")
            points[row, axis] = float(value)
    if name_col is not None:
        names = [body.iloc[row, name_col] or f"P-{row + 1}" for row in range(len(body))]
    else:
        names = [f"P-{row + 1}" for row in range(len(body))]
    return names, points


def _is_number(value):
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


# ------------------------------------------------------------------------------------------------ outputs
def check_output_dir(output_dir, inputs=None):
    """The output folder as a Path, checked writable (:func:`label_reg.io.check_output_folder`) and, given the
    :class:`Inputs`, with room for the outputs: their uncompressed size, an upper bound (float32 image, uint8 per
    label channel, float64 3-vector field per TRUS voxel, plus 1 MB for the rest)."""
    expected = 0
    if inputs is not None:
        voxels = int(np.prod(inputs.fixed_image.GetSize(), dtype=np.int64))
        expected = voxels * (4 + len(inputs.moving_label) + 24) + (1 << 20)
    return lio.check_output_folder(output_dir, expected)


# ------------------------------------------------------------------------------------------------ inputs
@dataclasses.dataclass
class Inputs:
    """One pair read and validated from disk (no TensorFlow needed): see :func:`read_inputs`."""

    moving_image: sitk.Image
    moving_label: list
    fixed_image: sitk.Image
    points: tuple | None  # (names, (N, 3) MR world mm) or None
    paths: dict
    read_seconds: float = 0.0


def read_inputs(moving_image, fixed_image, moving_label=None, moving_points=None, mixplus=None):
    """Read and validate the files of one pair (InputError naming the file on any problem). ``mixplus`` only
    words the error when the MR gland mask is missing: it is always required (pre-alignment)."""
    start = time.perf_counter()
    if moving_label is None or str(moving_label) == "":
        why = "for the pre-alignment" + (" and as the third input of this MIX+ model" if mixplus else "")
        raise InputError(moving_image, f"no MR gland mask given (--moving_label): it is required {why}")
    mr = lio.read_image(moving_image)
    mr_labels = lio.read_label(moving_label, reference=mr, reference_name=str(moving_image))
    us = lio.read_image(fixed_image)
    points = read_points_csv(moving_points) if moving_points else None
    paths = {"moving_image": moving_image, "fixed_image": fixed_image, "moving_label": moving_label,
             "moving_points": moving_points or None}
    return Inputs(mr, mr_labels, us, points, paths, time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------ registrar
class Registrar:
    """A loaded model ready to register pairs of raw NIfTI files (see the module docstring). ``min_dsc`` and
    ``max_centre_mm``: the self-check thresholds (defaults :data:`QC_MIN_DSC`, :data:`QC_MAX_CENTRE_MM`).
    ``recentre_passes``: re-centring passes after the first registration (found-gland models only; 0 = none,
    :mod:`label_reg.recentre`)."""

    def __init__(self, model_dir, min_dsc=QC_MIN_DSC, max_centre_mm=QC_MAX_CENTRE_MM, recentre_passes=0):
        start = time.perf_counter()
        self.check_thresholds = {"min_dsc": float(min_dsc), "max_centre_distance_mm": float(max_centre_mm)}
        from label_reg.predictor import Predictor
        self.model_dir = pathlib.Path(model_dir)
        self.predictor = Predictor.from_model_dir(self.model_dir, batch_size=1)
        self.info, self.config = self.predictor.info, self.predictor.preprocess_config
        self.recentre_passes = check_passes(recentre_passes, self.config.prealign, self.model_dir)
        self.moving_label_input = "moving_label" in self.predictor.input_names
        self.image_shape = self.predictor.image_shape
        self.global_affine = self.predictor.has_global_affine
        self.finder = self._load_segmenter() if self.config.prealign == "trus_gland" else None
        self.load_seconds = time.perf_counter() - start

    def _load_segmenter(self):
        """The :class:`~label_reg.segmenter.GlandFinder` a ``trus_gland`` model directory carries (InputError when
        it carries none, an incomplete one, or not a segmenter: :func:`label_reg.model_dir.segmenter_path`)."""
        from label_reg import model_dir as md
        from label_reg.segmenter import GlandFinder
        path = md.segmenter_path(self.model_dir, self.info)
        if path is None:  # segmenter_path already refuses a trus_gland model without one
            raise InputError(self.model_dir / md.INFO_FILE, "pre-aligns on the TRUS gland but carries no segmenter")
        finder = GlandFinder.from_model_dir(path)
        if (finder.predictor.info or {}).get("network") != md.SEGMENTER:
            raise InputError(path, "is not a segmenter model directory")
        return finder

    # -- pieces ----------------------------------------------------------------------------------------------
    def predict(self, pre):
        """The network DDF (X, Y, Z, 3) in crop voxels for a :class:`~label_reg.preprocess.Preprocessed` pair."""
        return self.predict_stages(pre)[0]

    def predict_stages(self, pre):
        """(DDF (X, Y, Z, 3) float32 crop voxels, affine (3, 4) float64 or None): the total DDF and, for a
        ``global_affine`` model, its affine stage alone (crop index x -> moving crop index ``A[:, :3] x + A[:, 3]``,
        :func:`label_reg.network.stage_model`), from one forward pass (:meth:`Predictor.predict_stages`)."""
        return self.predictor.predict_stages(pre)

    # -- the whole thing -------------------------------------------------------------------------------------
    def register(self, moving_image, fixed_image, moving_label=None, moving_points=None, output_dir=None):
        """Register one pair of raw NIfTI files and write the outputs into ``output_dir`` (see the module
        docstring). Returns a :class:`RegistrationResult`. Raises InputError (and writes nothing) on bad input."""
        out = check_output_dir(output_dir)
        inputs = read_inputs(moving_image, fixed_image, moving_label, moving_points, self.moving_label_input)
        return self.register_inputs(inputs, out)

    def register_inputs(self, inputs, output_dir):
        """:meth:`register` for a pair already read by :func:`read_inputs`."""
        from label_reg.preprocess import prealignment_warnings, preprocess_images
        from label_reg.transform import TotalDisplacement, invert_points, write_warped

        t0 = time.perf_counter() - inputs.read_seconds
        timings = {"read_s": inputs.read_seconds}
        out = check_output_dir(output_dir, inputs)
        mr, mr_labels, us, points = inputs.moving_image, inputs.moving_label, inputs.fixed_image, inputs.points
        moving_image, fixed_image = inputs.paths["moving_image"], inputs.paths["fixed_image"]
        moving_label, moving_points = inputs.paths["moving_label"], inputs.paths["moving_points"]

        estimate = None
        if self.finder is not None:
            from label_reg.segmenter import check_found
            t = time.perf_counter()
            estimate = check_found(self.finder.find(us, str(fixed_image)), fixed_image)
            timings["segment_s"] = time.perf_counter() - t

        t = time.perf_counter()
        names = {"moving_image": str(moving_image), "fixed_image": str(fixed_image),
                 "moving_label": str(moving_label)}
        pre = preprocess_images(mr, mr_labels, us, None, self.config, names=names, sdm=False,
                                fixed_centre_mm=None if estimate is None else estimate.centre_mm)
        warnings = prealignment_warnings(mr_labels[0], pre.translation_mm, us, names["moving_label"])
        timings["preprocess_s"] = time.perf_counter() - t

        t = time.perf_counter()
        recentred = None
        if self.recentre_passes:
            recentred = recentre(self.predictor, pre, lambda anchor: preprocess_images(
                mr, mr_labels, us, None, self.config, names=names, sdm=False, fixed_centre_mm=anchor),
                self.recentre_passes)
            pre, ddf, affine = recentred.pre, recentred.ddf, recentred.affine
            warnings = prealignment_warnings(mr_labels[0], pre.translation_mm, us, names["moving_label"])
            if recentred.stopped:
                warnings.append(f"{fixed_image}: {recentred.stopped}")
        else:
            ddf, affine = self.predict_stages(pre)
        timings["predict_s"] = time.perf_counter() - t  # with re-centring: every pass, its pre-processing included
        if not np.isfinite(ddf).all() or (affine is not None and not np.isfinite(affine).all()):
            raise RuntimeError("the network predicted a non-finite DDF or affine")
        world = affine_report = None
        if affine is not None:
            from label_reg.transform import affine_summary, world_affine
            world = world_affine(affine, pre.grid, pre.translation_mm)
            affine_report = {**affine_summary(*world, pre.grid.center_world),
                             "voxel_matrix": [[float(v) for v in row] for row in affine]}

        us_geo = lio.Geometry.from_image(us)
        field = TotalDisplacement(ddf, pre.grid, pre.translation_mm, us_geo)

        predicted = check = None
        if estimate is not None:
            from label_reg.segmenter import mask_on_image
            t = time.perf_counter()
            predicted = mask_on_image(estimate, us_geo)  # checked against the warped MR gland once it exists
            timings["check_s"] = time.perf_counter() - t

        point_rows = None
        points_fixed = status = None
        if points is not None:
            t = time.perf_counter()
            point_names, moving_pts = points
            points_fixed, residual = invert_points(moving_pts, field, iterations=200, tol_mm=1e-5)
            inside = _inside(us_geo, points_fixed)
            status = ["not_inverted" if not (r <= POINT_TOLERANCE_MM) else ("ok" if ok else "outside_fixed_image")
                      for r, ok in zip(residual, inside)]
            point_rows = (point_names, moving_pts, points_fixed, residual, status)
            timings["points_s"] = time.perf_counter() - t

        ddf_mm = ddf.astype(np.float64) @ pre.grid.matrix.T
        magnitude = np.linalg.norm(ddf_mm, axis=-1)
        det = metrics.jacobian_determinant(ddf, dtype=np.float32)
        report = {
            "model_dir": str(self.model_dir.resolve()),
            "model": {"moving_label_input": self.moving_label_input, "image_shape": list(self.image_shape),
                      "global_affine": self.global_affine, "preprocess": self.config.to_dict()},
            "inputs": {"moving_image": _abs(moving_image), "fixed_image": _abs(fixed_image),
                       "moving_label": _abs(moving_label), "moving_points": _abs(moving_points)},
            "fixed_geometry": us_geo.to_dict(),
            "crop_grid": pre.grid.to_dict(),
            "translation_mm": [float(v) for v in pre.translation_mm],
            "prealignment": {"mode": self.config.prealign,
                             "anchor_mm": [float(v) for v in pre.grid.center_world],
                             "gland_estimate": None if estimate is None else estimate.to_dict(),
                             "recentre": None if recentred is None else {
                                 "passes": self.recentre_passes, "passes_run": len(recentred.anchors_mm) - 1,
                                 "anchors_mm": [[float(v) for v in a] for a in recentred.anchors_mm],
                                 "shift_mm": recentred.shift_mm, "stopped": recentred.stopped},
                             "segmenter_dir": None if self.finder is None else
                             str(pathlib.Path(self.finder.model_dir).resolve())},
            "quality_check": check,
            "global_affine": affine_report,
            "ddf_mm": {"max": float(magnitude.max()), "mean": float(magnitude.mean()),
                       "p95": float(np.percentile(magnitude, 95)),
                       "folding_fraction": float(np.mean(det <= 0.0)),
                       "jacobian_determinant_min": float(det.min())},
            "label_channels": len(mr_labels),
            "warnings": warnings,
        }
        if status is not None:
            report["points"] = {"count": len(status), "ok": status.count("ok"),
                                "outside_fixed_image": status.count("outside_fixed_image"),
                                "not_inverted": status.count("not_inverted"),
                                "tolerance_mm": POINT_TOLERANCE_MM}

        files = {}
        with lio.atomic_dir(out, owned=OUTPUT_FILES.values()) as staging:
            t = time.perf_counter()
            warped_gland = write_warped(field, mr, mr_labels, *(staging / OUTPUT_FILES[k] for k in (
                "warped_moving_image", "warped_moving_label", "transform_ddf")), keep_gland=predicted is not None)
            timings["warp_s"] = time.perf_counter() - t  # resampling and writing the three images, slab by slab
            if predicted is not None:
                t = time.perf_counter()
                check = report["quality_check"] = quality_check(warped_gland, predicted, estimate,
                                                                **self.check_thresholds)
                timings["check_s"] += time.perf_counter() - t
            t = time.perf_counter()
            files.update({k: out / OUTPUT_FILES[k] for k in ("warped_moving_image", "warped_moving_label",
                                                               "transform_ddf")})
            if world is not None:
                lio.write_affine_transform(staging / OUTPUT_FILES["transform_affine"], world[0],
                                           affine_report["translation_mm"], affine_report["center_mm"])
                files["transform_affine"] = out / OUTPUT_FILES["transform_affine"]
            if predicted is not None:
                lio.write_label(staging / OUTPUT_FILES["fixed_label_predicted"], [predicted])
                files["fixed_label_predicted"] = out / OUTPUT_FILES["fixed_label_predicted"]
            if point_rows is not None:
                _write_points_csv(staging / OUTPUT_FILES["moving_points_in_fixed_csv"], *point_rows)
                _write_markups(staging / OUTPUT_FILES["moving_points_in_fixed_mrk"], *point_rows)
                files["moving_points_in_fixed_csv"] = out / OUTPUT_FILES["moving_points_in_fixed_csv"]
                files["moving_points_in_fixed_mrk"] = out / OUTPUT_FILES["moving_points_in_fixed_mrk"]
            files["registration"] = out / OUTPUT_FILES["registration"]
            timings["write_s"] = time.perf_counter() - t
            timings["total_s"] = time.perf_counter() - t0
            report["timings_s"] = {k: round(v, 4) for k, v in timings.items()}
            report["model_load_s"] = round(self.load_seconds, 4)
            report["outputs"] = {k: v.name for k, v in files.items()}
            _write_json(staging / OUTPUT_FILES["registration"], report)
            replaced = lio.existing_files(out, OUTPUT_FILES.values())  # published when the block ends
        if check is not None and not check["passed"]:
            print(f"warning: {fixed_image}: registration self-check failed ({'; '.join(check['failed'])}); "
                  f"outputs written to {out}, review them", file=sys.stderr, flush=True)
        return RegistrationResult(output_dir=out, files=files, report=report,
                                  translation_mm=np.asarray(pre.translation_mm, np.float64),
                                  points_fixed=points_fixed, point_status=status, warnings=warnings,
                                  replaced=replaced)


# ------------------------------------------------------------------------------------------------ self-check
def quality_check(warped_gland: sitk.Image, predicted_gland: sitk.Image, estimate, min_dsc=QC_MIN_DSC,
                  max_centre_distance_mm=QC_MAX_CENTRE_MM):
    """The self-check of a found-gland registration (module docstring).

    warped_gland: the warped MR gland (label channel 0), uint8 0/1 on the TRUS grid; predicted_gland: the
    segmenter's TRUS gland on the same grid (:func:`label_reg.segmenter.mask_on_image`); estimate: the
    :class:`~label_reg.segmenter.GlandEstimate` it came from (border contact, field of view); min_dsc,
    max_centre_distance_mm: the thresholds (fails when DSC < min_dsc or the distance > max_centre_distance_mm).
    Returns a JSON-ready dict: ``dsc``, ``centre_distance_mm`` (None when either gland is empty on the TRUS grid),
    ``warped_centre_mm`` / ``predicted_centre_mm`` (world LPS mm or None), ``touches_segmenter_border``,
    ``touches_fixed_border`` (the found gland reaches the first or last voxel of the TRUS image along some axis:
    recorded, not a failure, since tight TRUS sweeps often end at the gland; 3 of 18 true glands of the demo's fold-0
    validation pairs do), ``fov_cropped`` (the TRUS field of view is larger than the segmenter grid: recorded, not a
    failure by itself),
    ``thresholds``, ``failed`` (list of human-readable failed criteria) and ``passed``."""
    geo = lio.Geometry.from_image(predicted_gland)
    warped = sitk.GetArrayViewFromImage(warped_gland).transpose(2, 1, 0) > 0  # (x, y, z)
    predicted = sitk.GetArrayViewFromImage(predicted_gland).transpose(2, 1, 0) > 0
    total = int(warped.sum()) + int(predicted.sum())
    dsc = 2.0 * float(np.sum(warped & predicted)) / total if total else 0.0
    centres = [geo.index_to_world(np.argwhere(m).mean(axis=0)) if m.any() else None for m in (warped, predicted)]
    distance = None if any(c is None for c in centres) else float(np.linalg.norm(centres[0] - centres[1]))
    touches_fixed = False
    if predicted.any():
        index = np.argwhere(predicted)
        touches_fixed = bool(np.any(index.min(axis=0) == 0) or np.any(index.max(axis=0) == np.asarray(geo.size) - 1))
    failed = []
    if not dsc >= min_dsc:
        failed.append(f"DSC {dsc:.3f} < {min_dsc:g} between the warped MR gland and the found TRUS gland")
    if distance is None or not distance <= max_centre_distance_mm:
        shown = "undefined (a gland is empty on the TRUS grid)" if distance is None else f"{distance:.1f} mm"
        failed.append(f"gland centre distance {shown} > {max_centre_distance_mm:g} mm")
    if estimate.touches_border:
        failed.append("the found TRUS gland touches the segmenter grid border")
    return {"dsc": round(dsc, 4), "centre_distance_mm": None if distance is None else round(distance, 3),
            "warped_centre_mm": None if centres[0] is None else [float(v) for v in centres[0]],
            "predicted_centre_mm": None if centres[1] is None else [float(v) for v in centres[1]],
            "touches_segmenter_border": bool(estimate.touches_border), "touches_fixed_border": touches_fixed,
            "fov_cropped": bool(estimate.fov_cropped),
            "thresholds": {"min_dsc": float(min_dsc), "max_centre_distance_mm": float(max_centre_distance_mm),
                           "border_contact": "fails"},
            "failed": failed, "passed": not failed}


# ------------------------------------------------------------------------------------------------ helpers
def _abs(path):
    return None if path is None or str(path) == "" else str(pathlib.Path(path).resolve())




def _inside(geometry, points):
    """Whether world points lie inside the image's extent (voxel centres +- half a voxel)."""
    idx = geometry.world_to_index(points)
    upper = np.asarray(geometry.size, np.float64) - 0.5
    return np.all((idx >= -0.5) & (idx <= upper), axis=1)


def _write_points_csv(path, names, moving, fixed, residual, status):
    frame = pd.DataFrame({
        "name": names, "x": fixed[:, 0], "y": fixed[:, 1], "z": fixed[:, 2], "status": status,
        "residual_mm": residual, "moving_x": moving[:, 0], "moving_y": moving[:, 1], "moving_z": moving[:, 2]})
    lio.write_text(path, frame.to_csv(index=False, float_format="%.6f"))


def _write_markups(path, names, moving, fixed, residual, status):
    """3D Slicer fiducial markups (LPS, mm). Points that failed to invert are "undefined" (not drawn)."""
    control_points = []
    for i, (name, p, r, s) in enumerate(zip(names, fixed, residual, status)):
        description = s if s != "not_inverted" else f"not_inverted (residual {r:.3g} mm)"
        control_points.append({
            "id": str(i + 1), "label": str(name), "description": description, "associatedNodeID": "",
            "position": [float(v) for v in p], "orientation": [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0],
            "selected": True, "locked": True, "visibility": s != "not_inverted",
            "positionStatus": "undefined" if s == "not_inverted" else "defined"})
    doc = {"@schema": _MARKUPS_SCHEMA,
           "markups": [{"type": "Fiducial", "coordinateSystem": "LPS", "coordinateUnits": "mm", "locked": True,
                        "fixedNumberOfControlPoints": False, "labelFormat": "%N-%d",
                        "lastUsedControlPointNumber": len(control_points), "controlPoints": control_points,
                        "measurements": []}]}
    _write_json(path, doc)


def _write_json(path, doc):
    lio.write_text(path, json.dumps(doc, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------ batch mode
def register_folder(data_dir, output_dir, model_dir=None, registrar=None, progress=True, stream=None):
    """Register every pair of a paired data folder (:func:`label_reg.datasets.discover_pairs`; fixed labels are
    not needed) into ``output_dir/<case>/``, loading the model once. ``<data_dir>/moving_points/<case>.csv`` is
    used when present. A case with bad input is reported and skipped (nothing written for it); returns a list of
    dicts ``{name, ok, seconds, output_dir, error, check_passed}`` (``check_passed``: the self-check's verdict,
    None without a segmenter or on error; and ``warnings``, ``replaced`` for registered cases)."""
    from label_reg.datasets import MOVING_LABELS, discover_pairs
    stream = stream or sys.stdout
    out = check_output_dir(output_dir)
    root = pathlib.Path(data_dir)
    pairs = discover_pairs(root, require_labels=False)
    if not (root / MOVING_LABELS).is_dir():
        raise InputError(root / MOVING_LABELS, "folder not found: the MR gland masks are required for the "
                                               "pre-alignment")
    if registrar is None:
        if model_dir is None:
            raise ValueError("register_folder needs model_dir or registrar")
        registrar = Registrar(model_dir)
    results = []
    width = len(str(len(pairs)))
    for i, pair in enumerate(pairs, start=1):
        start = time.perf_counter()
        points = root / POINTS_FOLDER / f"{pair.name}.csv"
        case_out = out / pair.name
        try:
            result = registrar.register(pair.moving_image, pair.fixed_image, pair.moving_label,
                                        points if points.is_file() else None, case_out)
            check = result.report["quality_check"]
            row = {"name": pair.name, "ok": True, "error": None,
                   "check_passed": None if check is None else check["passed"], "warnings": result.warnings,
                   "replaced": result.replaced}
        except InputError as err:
            row = {"name": pair.name, "ok": False, "error": str(err), "check_passed": None}
        row["seconds"] = time.perf_counter() - start
        row["output_dir"] = str(case_out) if row["ok"] else None
        results.append(row)
        if progress:
            state = f"{row['seconds']:.2f} s -> {case_out}" if row["ok"] else f"FAILED: {row['error']}"
            if row.get("replaced"):
                state += f" (replaced {len(row['replaced'])} earlier output file(s))"
            if row.get("warnings"):
                state += f"; warning: {' / '.join(row['warnings'])}"
            print(f"[{i:>{width}}/{len(pairs)}] {pair.name}: {state}", file=stream, flush=True)
    return results
