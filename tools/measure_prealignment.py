"""Measure the pre-processing speed and the coarse pre-alignment's accuracy on a paired data directory.

    .venv/bin/python tools/measure_prealignment.py DATA_DIR [--spacing_mm 0.88] [--shape 96 96 80] [--limit N]

For every pair: seconds for ``preprocess_pair`` (reading included), then on the crop grid the gland DSC between
the pre-aligned MR gland and the TRUS gland, and the landmark TRE (mm): centroid distance of each channel >= 1,
averaged over the landmarks of the case (landmarks cut off by the crop are left out and counted). Figures are
printed as mean (median) +- SD over cases. Not a test; nothing is written.
"""
import argparse
import os
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from label_reg import datasets, metrics, preprocess  # noqa: E402


def _summary(values, scale=1.0, fmt="{:.1f}"):
    v = np.asarray(values, dtype=float) * scale
    return f"{fmt.format(v.mean())} ({fmt.format(np.median(v))}) ± {fmt.format(v.std(ddof=1) if v.size > 1 else 0.0)}"


def main(argv=None):
    default_dir = os.environ.get("LABEL_REG_DEMO_DATA", "/work/shared/data/mrus-prostate-demo")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", nargs="?", default=default_dir)
    parser.add_argument("--spacing_mm", type=float, default=preprocess.PreprocessConfig.spacing_mm)
    parser.add_argument("--shape", type=int, nargs=3, default=list(preprocess.PreprocessConfig().shape))
    parser.add_argument("--limit", type=int, default=0, help="only the first N pairs (0 = all)")
    args = parser.parse_args(argv)

    config = preprocess.PreprocessConfig(spacing_mm=args.spacing_mm, shape=tuple(args.shape))
    pairs = datasets.discover_pairs(args.data_dir)
    if args.limit:
        pairs = pairs[:args.limit]
    spacing = (config.spacing_mm,) * 3
    dscs, tres, seconds, shifts = [], [], [], []
    lost = total = 0
    start = time.perf_counter()
    for pair in pairs:
        t0 = time.perf_counter()
        r = preprocess.preprocess_pair(pair, config)
        seconds.append(time.perf_counter() - t0)
        dscs.append(metrics.dice(r.fixed_label[..., 0], r.moving_label[..., 0]))
        shifts.append(float(np.linalg.norm(r.translation_mm)))
        if r.fixed_label.shape[-1] > 1:
            mean, per = metrics.tre_mm(r.fixed_label, r.moving_label, spacing)
            total += per.size
            lost += int(np.sum(~np.isfinite(per)))
            if np.isfinite(mean):
                tres.append(mean)
    wall = time.perf_counter() - start

    print(f"data: {args.data_dir}  ({len(pairs)} pairs)")
    print(f"config: {config.spacing_mm:g} mm, crop {'x'.join(map(str, config.shape))}, "
          f"clip at percentile {config.clip_percentile:g}")
    print(f"pre-processing: {wall:.1f} s for {len(pairs)} pairs, {np.mean(seconds):.2f} s/pair "
          f"(reading included, single process)")
    print(f"coarse pre-alignment gland DSC %: {_summary(dscs, 100.0)}")
    print(f"coarse pre-alignment landmark TRE mm: {_summary(tres)}  "
          f"({len(tres)} cases with landmarks; {lost} of {total} landmarks cut off by the crop)")
    print(f"pre-alignment translation |t| mm: {_summary(shifts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
