"""Pre-processed cases for training, validation and evaluation, computed once per pair and cached on disk.

:func:`load_cases` pre-processes registration pairs (pre-alignment on the TRUS mask centre, or on the gland a
segmenter finds); :func:`cached_cases` runs any per-pair computation through :class:`label_reg.cache.CaseCache`.
Kept free of TensorFlow so that tools which only pre-process (``tools/baselines.py``) start without it.
"""
import sys

from label_reg.cache import CaseCache, file_sha256
from label_reg.preprocess import preprocess_pair

__all__ = ["load_cases", "cached_cases", "found_centre"]


def load_cases(pairs, preprocess_config, cache_dir="", progress=True, finder=None):
    """Pre-process each pair once (cached on disk when ``cache_dir`` is set); list of dicts of numpy arrays.

    ``finder`` (a :class:`label_reg.segmenter.GlandFinder`, for ``prealign == "trus_gland"``): pre-align on the
    TRUS gland centre it finds in each TRUS image, as ``register`` will, instead of the centre of the TRUS mask;
    such cases are cached under the segmenter's weights. A volume in which it finds no gland falls back to the
    TRUS volume centre (with a warning naming the file).
    """
    settings = preprocess_config.to_dict()
    if finder is not None:
        settings["fixed_centre_from"] = file_sha256(finder.model_dir / "model.weights.h5")

    def compute(pair):
        centre = None if finder is None else found_centre(finder, pair.fixed_image)
        return preprocess_pair(pair, preprocess_config, fixed_centre_mm=centre).to_arrays()

    return cached_cases(pairs, compute, settings, cache_dir, progress, "pre-processing")


def cached_cases(pairs, compute, settings, cache_dir="", progress=True, what="pre-processing"):
    """``compute(pair)`` (a dict of arrays) for each pair, through a :class:`label_reg.cache.CaseCache` keyed by
    ``settings`` when ``cache_dir`` is set; a one-line progress count on stderr (``what i/n cases``)."""
    cache = CaseCache(cache_dir, settings) if cache_dir else None
    cases = []
    for i, pair in enumerate(pairs):
        cases.append(compute(pair) if cache is None else cache.get_or_compute(pair, compute))
        if progress and (sys.stderr.isatty() or i + 1 == len(pairs)):
            end = "\n" if i + 1 == len(pairs) else ""
            print(f"\r{what} {i + 1}/{len(pairs)} cases", end=end, file=sys.stderr, flush=True)
    return cases


def found_centre(finder, fixed_image_path):
    """The TRUS gland centre (world mm) ``finder`` finds in a TRUS file; the volume centre, with a warning on
    stderr, when it finds none."""
    from label_reg import io as lio
    image = lio.read_image(fixed_image_path)
    estimate = finder.find(image, str(fixed_image_path))
    if estimate.found:
        return estimate.centre_mm
    print(f"warning: {fixed_image_path}: the segmenter found no gland; pre-aligning on the TRUS volume centre",
          file=sys.stderr)
    return lio.Geometry.from_image(image).center_world
