"""Re-centring passes: register again on the TRUS gland centre the network itself found.

A found-gland model (``prealign == "trus_gland"``) puts the MR gland's centre of mass on the TRUS gland centre its
segmenter finds and crops the TRUS image around it; the network then corrects what is left. The segmenter misses the
true centre by a few millimetres, and the network corrects only part of such an offset. After a registration the
warped MR gland (label channel 0 warped by the DDF, on the crop grid, in TRUS space) lies where the network put the
gland, so its centre of mass is a second estimate of the TRUS gland centre. A **re-centring pass** pre-processes the
pair again with that estimate as the anchor (crop and MR gland centre on it) and registers it again. With ``passes``
N, the registration is the one of pass N + 1, on the anchor pass N found; ``passes`` 0 is the found-gland pipeline
as trained. On demo folds 1 and 0 the estimate was no closer to the true centre than the segmenter's and one pass
did not lower the TRE (README, "Re-centring on the network's own gland estimate"), so callers default to 0.

:func:`recentre` runs the loop for any caller that can pre-process the pair on a given anchor (``label-reg evaluate``
and ``label-reg register``); :func:`warped_gland_centre_mm` is the estimate.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from label_reg.errors import InputError

__all__ = ["warped_gland_centre_mm", "recentre", "Recentred", "check_passes", "MIN_GLAND_VOXELS"]

MIN_GLAND_VOXELS = 1.0  # a warped gland holding less than this many voxels' worth has left the crop: no estimate


def check_passes(passes, prealign, model_dir) -> int:
    """``passes`` as an int; InputError naming ``--recentre_passes`` when it is not a whole number >= 0, or when it
    is positive for a model whose ``prealign`` is not ``trus_gland`` (re-centring refines the found-gland anchor)."""
    if isinstance(passes, bool) or not isinstance(passes, (int, np.integer)) or passes < 0:
        raise InputError("--recentre_passes", f"must be a whole number >= 0, got {passes!r}")
    if passes and prealign != "trus_gland":
        raise InputError("--recentre_passes", f"{model_dir} pre-aligns on the TRUS volume centre (prealign "
                                              f"{prealign}); re-centring refines a found-gland (trus_gland) model's "
                                              "anchor")
    return int(passes)


def warped_gland_centre_mm(warped_gland, grid):
    """Centre of mass (3,) in world mm of a warped gland on its crop grid, or None when it is (nearly) empty.

    warped_gland: (X, Y, Z) values in [0, 1] on ``grid`` (:class:`label_reg.io.Geometry`, ITK index order), the
    trilinear partial volumes of the warped mask (not thresholded, so sub-voxel moves count); weights below 0 are
    taken as 0. None when their sum is below :data:`MIN_GLAND_VOXELS`."""
    weights = np.clip(np.asarray(warped_gland, np.float64), 0.0, None)
    if weights.ndim != 3 or tuple(weights.shape) != tuple(grid.size):
        raise ValueError(f"warped gland of shape {weights.shape}, expected the crop grid's {tuple(grid.size)}")
    total = weights.sum()
    if not total >= MIN_GLAND_VOXELS:
        return None
    centre_index = np.array([(weights.sum(axis=tuple(a for a in range(3) if a != axis)) * np.arange(n)).sum()
                             for axis, n in enumerate(weights.shape)]) / total
    return grid.index_to_world(centre_index)


@dataclasses.dataclass
class Recentred:
    """What :func:`recentre` ends with: the pair as the last pass pre-processed it (``pre``), that pass's DDF (X, Y,
    Z, 3) crop voxels and affine stage ((3, 4) or None), and the anchor (crop centre, world mm) of every pass, the
    given one first. ``stopped``: why fewer passes ran than asked (the warped gland left the crop), else None."""

    pre: object
    ddf: np.ndarray
    affine: np.ndarray | None
    anchors_mm: list
    stopped: str | None = None

    @property
    def shift_mm(self) -> float:
        """How far the re-centring moved the anchor, first to last pass (mm)."""
        return float(np.linalg.norm(np.asarray(self.anchors_mm[-1]) - np.asarray(self.anchors_mm[0])))


def recentre(predictor, pre, reprocess, passes):
    """Register ``pre`` and re-centre ``passes`` times (module docstring); a :class:`Recentred`.

    predictor: a registration :class:`label_reg.predictor.Predictor`. pre: the pair pre-processed on the first
    anchor (:class:`label_reg.preprocess.Preprocessed`, moving label channel 0 the gland). reprocess: callable,
    anchor (3,) world mm -> the same pair pre-processed on that anchor. passes: int >= 0."""
    passes = int(passes)
    if passes < 0:
        raise ValueError(f"passes must be >= 0, got {passes}")
    ddf, affine = predictor.predict_stages(pre)
    anchors = [np.asarray(pre.grid.center_world, np.float64)]
    for _ in range(passes):
        gland = predictor.warp(pre.moving_label[..., 0], ddf, "zero")
        anchor = warped_gland_centre_mm(gland, pre.grid)
        if anchor is None:
            return Recentred(pre, ddf, affine, anchors, f"the warped MR gland left the crop after pass "
                                                        f"{len(anchors)}; kept that pass")
        pre = reprocess(anchor)
        ddf, affine = predictor.predict_stages(pre)
        anchors.append(np.asarray(pre.grid.center_world, np.float64))
    return Recentred(pre, ddf, affine, anchors)
