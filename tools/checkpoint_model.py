"""A model directory with the weights of a training checkpoint instead of the ones validation selected.

    python tools/checkpoint_model.py --model_dir runs/mixplus_landmarks_gland_cpu_fold0 \
        --output_dir runs/last/mixplus_landmarks_gland_cpu_fold0 [--step N] [--overwrite]

``label-reg train`` keeps the model with the best validation score (``model.weights.h5``, ``best_step`` in
``label_reg.json``), its last two checkpoints (``checkpoints/ckpt-N``) and, with ``--keep_checkpoint_every=K``,
those of every K-th step (``checkpoints/kept/ckpt-N``). This writes ``--output_dir`` as a copy of
the model directory's description (``label_reg.json``, a carried segmenter) with the weights of checkpoint ``N``
(default: the newest, the model as training ended), ready for ``register``, ``evaluate`` and ``export``. Its
``label_reg.json`` has ``best_step`` N, no ``validation`` record (that step may not have been validated) and
``checkpoint`` {source, step}. Used to measure what model selection gains (README "Landmark supervision on the demo
data"). Works for registration and segmenter model directories; the output appears whole or not at all.
"""
import argparse
import json
import pathlib
import re
import shutil
import sys

CHECKPOINT = re.compile(r"^ckpt-(\d+)\.index$")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", required=True, help="a model directory written by label-reg train")
    parser.add_argument("--output_dir", required=True, help="the new model directory")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest checkpoint)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output_dir")
    return parser.parse_args(argv)


def checkpoint_prefixes(model_dir):
    """{step: checkpoint prefix} of the checkpoints in ``model_dir/checkpoints`` (the last two of the run) and in
    ``model_dir/checkpoints/kept`` (those ``--keep_checkpoint_every`` kept); a step in both is the same checkpoint."""
    from label_reg import model_dir as md

    folder = pathlib.Path(model_dir) / md.CHECKPOINTS_DIR
    prefixes = {}
    for place in (folder / md.KEPT_CHECKPOINTS_DIR, folder):
        if place.is_dir():
            for match in filter(None, (CHECKPOINT.match(path.name) for path in place.iterdir())):
                prefixes[int(match.group(1))] = place / f"ckpt-{match.group(1)}"
    return prefixes


def write_checkpoint_model(model_dir, output_dir, step=None, overwrite=False):
    """Write ``output_dir`` (see the module doc) from checkpoint ``step`` of ``model_dir`` (None: the newest).
    Returns the step. InputError for a model directory without that checkpoint or whose checkpoint does not fit its
    network, or an ``output_dir`` that holds files without ``overwrite``."""
    import tensorflow as tf

    from label_reg import model_dir as md
    from label_reg.errors import InputError
    from label_reg.io import atomic_dir

    model_dir, output_dir = pathlib.Path(model_dir), pathlib.Path(output_dir)
    info, _ = md.read_info(model_dir)
    prefixes = checkpoint_prefixes(model_dir)
    steps = sorted(prefixes)
    if not steps:
        raise InputError(model_dir / md.CHECKPOINTS_DIR, "holds no checkpoint (ckpt-N.index)")
    step = steps[-1] if step is None else int(step)
    if step not in steps:
        raise InputError(model_dir / md.CHECKPOINTS_DIR, f"has no checkpoint of step {step} (it has "
                                                    f"{', '.join(map(str, steps))})")
    if output_dir.resolve() == model_dir.resolve():
        raise InputError(output_dir, "is --model_dir itself; choose another --output_dir")
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise InputError(output_dir, "is not empty; pass --overwrite or choose another --output_dir")
    kind = md.network_kind(info, model_dir / md.INFO_FILE)
    registration = info.get("network", md.REGISTRATION) == md.REGISTRATION
    segmenter = md.segmenter_path(model_dir, info) if registration else None

    model = kind.build(**info["build"])
    source = prefixes[step]
    try:
        tf.train.Checkpoint(model=model).restore(str(source)).expect_partial().assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as err:
        raise InputError(source, f"does not fit the network label_reg.json describes "
                                 f"({str(err).splitlines()[0][:200]})") from None

    info = {key: value for key, value in info.items() if key != "validation"}
    info.update(best_step=step, checkpoint={"source": str(model_dir.resolve()), "step": step})
    with atomic_dir(output_dir, replace=True) as staging:
        model.save_weights(str(staging / md.WEIGHTS_FILE))
        (staging / md.INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        if segmenter is not None:
            shutil.copytree(segmenter, staging / md.SEGMENTER_DIR)
    return step


def main(argv=None):
    args = parse_args(argv)
    from label_reg.errors import InputError
    try:
        step = write_checkpoint_model(args.model_dir, args.output_dir, args.step, args.overwrite)
    except InputError as err:
        print(f"checkpoint_model: {err}", file=sys.stderr)
        return 2
    print(f"{args.output_dir}: the weights of checkpoint {step} of {args.model_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
