"""Validation curves of training runs, read from their TensorBoard logs, as one table per score.

    python tools/training_curves.py RUN [RUN ...] [--tags val/tre_mm_median,val/dsc_median] [--smooth 4]
        [--output FILE]

Each RUN is a model directory of ``label-reg train`` (or ``train-segmenter``); its ``RUN/logs`` event files hold the
validation scores of every ``--validate_every`` step (a resumed run adds a file; a later file wins for a step logged
twice). For each tag the table has a row per validated step, a column per run and, with several runs, their median
at that step (over the runs that reached it, with how many when not all did). Below it, per run: the step whose
weights the model directory keeps (``best_step`` in ``label_reg.json``), the steps with the best value of each
tag (highest for a DSC, lowest for a TRE or error) and the mean of its last ``--smooth`` validations (default 4): on
18 validation pairs the median TRE moves by up to 0.6 mm from one validation to the next, so a single step, best or
last, says less about where a run ended than that mean. ``--output`` writes the tables (``.md``) or the long table
``run,step,tag,value`` (``.csv``) as well as printing them.

This is how to see whether a run had stopped improving (e.g. the landmark models' validation TRE still falling at
step 3,000 while their DSC is flat) without opening TensorBoard.
"""
import argparse
import json
import os
import pathlib
import sys

import numpy as np
import pandas as pd

from label_reg import io as lio
from label_reg.errors import InputError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # tensorboard's event reader imports TensorFlow

DEFAULT_TAGS = ("val/tre_mm_median", "val/dsc_median")


class CurveError(Exception):
    """A run folder or tag that cannot be read: the message names it."""


def lower_is_better(tag):
    """True for tags where a smaller value is better (TRE, errors, losses); DSC-like scores are higher-better."""
    name = tag.lower()
    return any(word in name for word in ("tre", "error", "loss", "distance"))


def read_scalars(run, tags):
    """Long DataFrame ``run, step, tag, value`` of ``tags`` from every event file under ``run/logs`` (later files
    override earlier ones at the same step, as a resumed run writes a new file)."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    run = pathlib.Path(run)
    logs = run / "logs"
    files = sorted(logs.glob("events.out.tfevents.*"), key=lambda p: (p.stat().st_mtime, p.name))
    if not files:
        raise CurveError(f"{logs}: no TensorBoard event files (is {run} a label-reg training run?)")
    values, seen = {}, set()
    for path in files:
        accumulator = event_accumulator.EventAccumulator(str(path), size_guidance={event_accumulator.TENSORS: 0})
        accumulator.Reload()
        available = set(accumulator.Tags().get("tensors", []))
        seen |= {tag for tag in available  # scalars only (not the image previews)
                 if tensor_util.make_ndarray(accumulator.Tensors(tag)[0].tensor_proto).ndim == 0}
        for tag in tags:
            if tag in available:
                for event in accumulator.Tensors(tag):
                    values[(event.step, tag)] = float(tensor_util.make_ndarray(event.tensor_proto))
    missing = [tag for tag in tags if tag not in {t for _, t in values}]
    if missing:
        known = ", ".join(sorted(t for t in seen if not t.startswith("train/"))) or "none"
        raise CurveError(f"{logs}: no scalar {', '.join(missing)} (validation tags there: {known})")
    rows = [{"run": run.name, "step": step, "tag": tag, "value": value}
            for (step, tag), value in sorted(values.items())]
    return pd.DataFrame(rows, columns=["run", "step", "tag", "value"])


def kept_step(run):
    """The step whose weights ``run`` keeps (``best_step`` of its ``label_reg.json``), or None if not recorded."""
    path = pathlib.Path(run) / "label_reg.json"
    try:
        return json.loads(path.read_text()).get("best_step")
    except (OSError, ValueError):
        return None


def curve_table(long, tag):
    """Wide table of one tag: index step, a column per run (in the order given) and, with several runs,
    ``median`` (over the runs that reached the step) and ``runs`` (how many did)."""
    runs = list(dict.fromkeys(long["run"]))
    wide = long[long["tag"] == tag].pivot(index="step", columns="run", values="value").reindex(columns=runs)
    if len(runs) > 1:
        wide["median"] = wide[runs].median(axis=1, skipna=True)
        wide["runs"] = wide[runs].notna().sum(axis=1)
    return wide


def short_names(runs):
    """{run: column heading}: the run names without the prefix they all share, cut back to its last ``_`` (e.g.
    ``fold0`` .. ``fold4`` for ``mixplus_landmarks_gland_cpu_fold0`` .. ``_fold4``), and that prefix."""
    prefix = os.path.commonprefix(list(runs)) if len(runs) > 1 else ""
    prefix = prefix[:prefix.rfind("_") + 1]
    return {run: run[len(prefix):] for run in runs}, prefix


def last_mean(series, count):
    """(mean, first step, last step) of the last ``count`` values of ``series`` (indexed by step, ascending)."""
    tail = series.iloc[-count:]
    return float(tail.mean()), tail.index[0], tail.index[-1]


def markdown(long, tags, kept, smooth=4):
    """The printed report: a table per tag, then per run the kept step, the best step of each tag and the mean of
    its last ``smooth`` validations."""
    runs = list(dict.fromkeys(long["run"]))
    names, prefix = short_names(runs)
    lines = [f"# Validation curves of {len(runs)} run(s)" + (f": {prefix}…" if prefix else ""), ""]
    for tag in tags:
        wide = curve_table(long, tag)
        columns = runs + (["median"] if len(runs) > 1 else [])
        headings = [names.get(c, c) for c in columns]
        lines += [f"## {tag} ({'lower' if lower_is_better(tag) else 'higher'} is better)", "",
                  "| step | " + " | ".join(headings) + " |", "|---" * (len(columns) + 1) + "|"]
        for step, row in wide.iterrows():
            cells = ["–" if np.isnan(row[c]) else f"{row[c]:.3f}" for c in columns]
            if len(runs) > 1 and row["runs"] < len(runs):
                cells[-1] += f" ({int(row['runs'])} of {len(runs)})"
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("| run | step kept | " + " | ".join(f"best {tag}" for tag in tags) + " |")
    lines.append("|---" * (len(tags) + 2) + "|")
    for run in runs:
        cells = []
        for tag in tags:
            series = long[(long["run"] == run) & (long["tag"] == tag)].set_index("step")["value"]
            step = series.idxmin() if lower_is_better(tag) else series.idxmax()
            mean, first, last = last_mean(series, smooth)
            cells.append(f"{series[step]:.3f} at {step} (last {series.iloc[-1]:.3f} at {series.index[-1]}; "
                         f"mean {mean:.3f} over steps {first}–{last})")
        lines.append(f"| {run} | {'–' if kept.get(run) is None else kept[run]} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="model directories of label-reg train runs (each with logs/)")
    parser.add_argument("--tags", default=",".join(DEFAULT_TAGS),
                        help="comma-separated TensorBoard scalar tags (default: %(default)s)")
    parser.add_argument("--smooth", type=int, default=4,
                        help="also report the mean of each run's last N validations (default: %(default)s)")
    parser.add_argument("--output", help="also write the report: FILE.md (the tables) or FILE.csv (run,step,tag,value)")
    args = parser.parse_args(argv)
    args.tags = [t.strip() for t in args.tags.split(",") if t.strip()]
    if not args.tags:
        parser.error("--tags: give at least one tag")
    if args.smooth < 1:
        parser.error(f"--smooth {args.smooth}: must be at least 1")
    names = [pathlib.Path(r).name for r in args.runs]
    if len(set(names)) != len(names):
        parser.error("runs: two folders share a name, the columns would collide: " + ", ".join(args.runs))
    problem = args.output and lio.report_file_problem(args.output)
    if problem:
        parser.error(f"--output {args.output}: {problem}")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        long = pd.concat([read_scalars(run, args.tags) for run in args.runs], ignore_index=True)
    except CurveError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    kept = {pathlib.Path(run).name: kept_step(run) for run in args.runs}
    text = markdown(long, args.tags, kept, args.smooth)
    if args.output:
        output = pathlib.Path(args.output)
        try:
            lio.write_text(output, long.to_csv(index=False) if output.suffix == ".csv" else text)
        except InputError as error:  # OutputError: full disk, read-only folder, size limit
            print(f"error: {error}", file=sys.stderr)
            return 1
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
