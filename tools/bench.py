"""Speed and memory of label_reg on this machine, every figure measured in one run (SPEC section 6).

    .venv/bin/python tools/bench.py --output bench.csv [--quick] [--only NAME[,NAME]] [--repeats N]
        [--model_dir DIR] [--data_dir DIR] [--intra_op_threads N] [--inter_op_threads N] [--disable_remapper]
        [--jit_compile]

Prints ONE table and writes it as CSV. Each measurement runs in its own Python subprocess, so its peak resident
memory (``ru_maxrss``; for the cold CLI, of the ``label-reg`` child processes) is its own, and nothing it traced or
cached helps the next one. Timings are medians over repeats inside that subprocess, after warm-up calls (tracing
excluded and reported separately as ``first_call_s``), with the min-max range as the spread.

Measurements (``--only`` takes these names):

* ``matmul``: ``tf.linalg.matmul`` of two 2048x2048 float32 matrices, 2 n^3 FLOPs: the machine's single-precision
  reference rate.
* ``forward_keras_b1``, ``forward_keras_b5``, ``forward_folded_b1``, ``forward_folded_b5``: the MIX+ network at
  96x96x80, batch 1 and 5, as ``model(x, training=False)`` in a fixed-signature ``tf.function`` and as the
  batch-norm-folded inference model (:mod:`label_reg.inference`), each through the forward pass of a
  :class:`label_reg.predictor.Predictor`; FLOPs counted from the layers (2 x MACs for the
  convolutions), cross-checked against TensorFlow's profiler (which counts Conv3D but not the transposed
  convolutions), rate as a fraction of ``matmul``. ``forward_folded_cpu_b1``: the folded model at the CPU preset.
* ``train_full``, ``train_cpu``: training samples/s, batch 5, through the real ``Trainer`` steps
  (:meth:`label_reg.trainer.Trainer.iterate`: its tf.data pipeline, MirroredStrategy, loss, optimizer) on synthetic ellipsoid phantoms made in memory, at 96x96x80 and at the
  CPU preset (48x48x40, 1.76 mm; experiments/cpu.flags); the first steps (tracing) are left out.
* ``loss_full``, ``loss_cpu``: seconds per batch of the loss side of that step alone (``label_reg.train.loss_terms``:
  both warps, the loss, and its gradient to the DDF), so the step splits into network and loss. ``warp_cpu``, ``bending_cpu``,
  ``smoothing_cpu``: its three costly pieces alone, forward and backward, batch 5 at the CPU preset (one warp with
  the zero boundary; the bending energy; Gaussian smoothing at the four non-zero scales of the multi-scale Dice).
* ``pipeline_full``, ``pipeline_cpu``: samples/s of ``data.training_dataset`` alone (augmentation on), same data.
* ``register_cold``: wall-clock seconds of one ``label-reg register`` process per pair (start-up, model load,
  tracing, registration, writing). ``register_warm``: seconds per pair with the model loaded once (what batch
  mode, ``label-reg register --data_dir``, does), with the stage medians in the note. Pairs from ``--data_dir``
  (default $LABEL_REG_DEMO_DATA or /work/shared/data/mrus-prostate-demo, else synthetic phantoms); the model from
  ``--model_dir``, else an untrained 96x96x80 MIX+ model (speed does not depend on the weights). Skipped with a note
  when ``label_reg.register`` is missing.

Nothing here is a test, and nothing is written besides the CSV (temporary folders are removed).
"""
import argparse
import csv
import json
import math
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from label_reg.preprocess import PreprocessConfig  # noqa: E402  (no TensorFlow: the driver stays light)

FULL = {"shape": PreprocessConfig().shape, "spacing_mm": PreprocessConfig().spacing_mm}  # the paper's grid
CPU = {"shape": (48, 48, 40), "spacing_mm": 1.76}
RESULT_TAG = "BENCH_RESULT "
DEFAULT_DATA = os.environ.get("LABEL_REG_DEMO_DATA", "/work/shared/data/mrus-prostate-demo")

# name -> (worker function name, kwargs)
MEASUREMENTS = {
    "matmul": ("matmul", {"n": 2048}),
    "forward_keras_b1": ("forward", {"folded": False, "batch": 1, **FULL}),
    "forward_keras_b5": ("forward", {"folded": False, "batch": 5, **FULL}),
    "forward_folded_b1": ("forward", {"folded": True, "batch": 1, **FULL}),
    "forward_folded_b5": ("forward", {"folded": True, "batch": 5, **FULL}),
    "forward_folded_cpu_b1": ("forward", {"folded": True, "batch": 1, **CPU}),
    "train_full": ("train", {"batch": 5, **FULL}),
    "train_cpu": ("train", {"batch": 5, **CPU}),
    "loss_full": ("loss", {"batch": 5, **FULL}),
    "loss_cpu": ("loss", {"batch": 5, **CPU}),
    "warp_cpu": ("loss_part", {"part": "warp", "batch": 5, **CPU}),
    "bending_cpu": ("loss_part", {"part": "bending", "batch": 5, **CPU}),
    "smoothing_cpu": ("loss_part", {"part": "smoothing", "batch": 5, **CPU}),
    "pipeline_full": ("pipeline", {"batch": 5, **FULL}),
    "pipeline_cpu": ("pipeline", {"batch": 5, **CPU}),
    "register_cold": ("register", {"cold": True}),
    "register_warm": ("register", {"cold": False}),
}

COLUMNS = ("name", "quantity", "unit", "median", "low", "high", "repeats", "gflop", "gflop_per_s",
           "fraction_of_matmul", "peak_rss_mb", "first_call_s", "note")


# ================================================================================================ workers
def _tf(options):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    if options.get("intra_op_threads"):
        tf.config.threading.set_intra_op_parallelism_threads(int(options["intra_op_threads"]))
    if options.get("inter_op_threads"):
        tf.config.threading.set_inter_op_parallelism_threads(int(options["inter_op_threads"]))
    if options.get("disable_remapper"):
        tf.config.optimizer.set_experimental_options({"remapping": False})
    return tf


def _stats(values):
    import numpy as np
    v = np.asarray(values, dtype=float)
    return {"median": float(np.median(v)), "low": float(v.min()), "high": float(v.max()), "repeats": int(v.size)}


def _timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def work_matmul(options, n):
    tf = _tf(options)
    a = tf.random.normal((n, n), seed=1)
    b = tf.random.normal((n, n), seed=2)

    @tf.function
    def mm(x, y):
        return tf.reduce_sum(tf.linalg.matmul(x, y))  # the sum forces the product; n^2 FLOPs, negligible

    mm(a, b).numpy()
    times = _timed(lambda: mm(a, b).numpy(), max(3, options["repeats"] * 2))
    flop = 2.0 * n ** 3
    rates = [flop / t / 1e9 for t in times]
    return {"quantity": f"matmul {n}x{n} float32", "unit": "GFLOP/s", **_stats(rates), "gflop": flop / 1e9,
            "gflop_per_s": float(sorted(rates)[len(rates) // 2]), "note": f"{len(times)} products, 2n^3 FLOPs each"}


def _profiler_conv3d_flops(tf, function):
    """FLOPs TensorFlow's profiler finds in the traced graph (it counts Conv3D, not Conv3DBackpropInput)."""
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2
    graph = convert_variables_to_constants_v2(function.get_concrete_function()).graph
    opts = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    opts["output"] = "none"
    return float(tf.compat.v1.profiler.profile(graph, options=opts).total_float_ops)


def work_forward(options, folded, batch, shape, spacing_mm):
    tf = _tf(options)
    import keras
    import numpy as np

    from label_reg import inference, network
    from label_reg.predictor import Predictor
    model = network.build_model(tuple(shape), moving_label_input=True)
    if folded:
        model = inference.fold_batchnorm(model)
    rng = np.random.default_rng(0)
    inputs = {k: tf.constant(rng.random((batch,) + tuple(shape) + (1,), dtype=np.float32)) for k in model.input}
    forward = Predictor(model, jit_compile=options.get("jit_compile", False)).forward
    start = time.perf_counter()
    forward(inputs).numpy()
    first = time.perf_counter() - start
    forward(inputs).numpy()
    times = _timed(lambda: forward(inputs).numpy(), options["repeats"])
    flops = inference.count_forward_flops(model, batch)
    note = [f"{flops['conv'] / 1e9:.2f} GFLOP in convolutions, {flops['other'] / 1e9:.2f} elsewhere"]
    try:
        profiled = _profiler_conv3d_flops(tf, Predictor(model, batch_size=batch).forward)
        conv3d = 0.0
        for layer in model.layers:
            kernel = getattr(layer, "kernel", None)
            transpose = isinstance(layer, keras.layers.Conv3DTranspose) or getattr(layer, "transpose", False)
            if kernel is not None and len(kernel.shape) == 5 and not transpose:
                conv3d += 2.0 * float(np.prod(layer.output.shape[1:4])) * float(np.prod(kernel.shape)) * batch
        note.append(f"TF profiler: Conv3D {profiled / 1e9:.3f} GFLOP vs {conv3d / 1e9:.3f} counted "
                    f"({100.0 * (profiled / conv3d - 1):+.1f}%)")
    except Exception as err:  # the profiler is a cross-check only
        note.append(f"TF profiler unavailable ({type(err).__name__})")
    rate = flops["total"] / float(np.median(times)) / 1e9
    kind = "folded" if folded else "keras"
    return {"quantity": f"forward {kind} {'x'.join(map(str, shape))} batch {batch}", "unit": "s/batch",
            **_stats(times), "gflop": flops["total"] / 1e9, "gflop_per_s": rate, "first_call_s": first,
            "note": "; ".join(note)}


def _phantom_cases(shape, spacing_mm, count, seed=0):
    """In-memory pre-processed cases: ellipsoid glands with 2 landmark blobs, images = masks + texture + noise."""
    import numpy as np

    from label_reg.preprocess import signed_distance_map
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), -1)
    centre = (np.asarray(shape, np.float32) - 1) / 2

    def side():
        c = centre + rng.uniform(-0.1, 0.1, 3) * np.asarray(shape)
        axes = np.asarray(shape) * rng.uniform(0.18, 0.28, 3)
        gland = (np.sum(((grid - c) / axes) ** 2, -1) <= 1).astype(np.float32)
        labels = [gland]
        for _ in range(2):
            p = c + rng.uniform(-0.4, 0.4, 3) * axes
            labels.append((np.sum((grid - p) ** 2, -1) <= (0.04 * min(shape)) ** 2 + 1).astype(np.float32))
        image = 0.3 + 0.4 * gland + 0.1 * rng.standard_normal(shape).astype(np.float32)
        sdm = signed_distance_map(gland, (spacing_mm,) * 3)
        return np.clip(image, 0, 1).astype(np.float32), np.stack(labels, -1), sdm

    cases = []
    for _ in range(count):
        mi, ml, ms = side()
        fi, fl, fs = side()
        cases.append({"moving_image": mi, "fixed_image": fi, "moving_label": ml, "fixed_label": fl,
                      "moving_sdm": ms, "fixed_sdm": fs})
    return cases


def work_train(options, batch, shape, spacing_mm):
    _tf(options)
    from label_reg.train import REGISTRATION, Trainer, TrainConfig
    # 5 warm-up steps: with 3, one 96x96x80 run of 5 repeats spread over 1.44-2.13 samples/s (others: +-3 %)
    warmup, repeats = (2, max(2, options["repeats"] // 2)) if options["quick"] else (5, options["repeats"])
    cases = _phantom_cases(shape, spacing_mm, 10)
    with tempfile.TemporaryDirectory(prefix="label_reg_bench_") as tmp:
        config = TrainConfig(data_dir=tmp, model_dir=os.path.join(tmp, "model"), batch_size=batch,
                             num_steps=warmup + repeats + 1, spacing_mm=spacing_mm, shape=tuple(shape),
                             validate_every=10 ** 9, checkpoint_every=10 ** 9, progress=False)
        steps = Trainer(REGISTRATION, config, cases, []).iterate(0)
        step = lambda: next(steps)  # noqa: E731
        start = time.perf_counter()
        step()
        first = time.perf_counter() - start
        for _ in range(warmup - 1):
            step()
        times = _timed(step, repeats)
    rates = [batch / t for t in times]
    return {"quantity": f"training {'x'.join(map(str, shape))} @ {spacing_mm} mm, batch {batch}",
            "unit": "samples/s", **_stats(rates), "first_call_s": first,
            "note": f"median step {sorted(times)[len(times) // 2]:.2f} s; real Trainer step (MIX+ loss, Adam, "
                    f"tf.data augmentation); {warmup} warm-up steps left out"}


def work_loss(options, batch, shape, spacing_mm):
    """The training step's loss side alone: both warps (label: zero boundary, SDM: replicate) and the MIX+ loss,
    forward and backward to the DDF, on the phantom batch the pipeline delivers."""
    tf = _tf(options)
    from label_reg import data
    from label_reg.train import TrainConfig, loss_terms
    config = TrainConfig(data_dir="", model_dir="")  # the experiment's loss weights (MIX+ by default)
    cases = _phantom_cases(shape, spacing_mm, 10)
    batch_arrays = next(iter(data.training_dataset(cases, batch, 2, seed=0, augment_scale=0.1)))
    rng = tf.random.Generator.from_seed(0)
    ddf = tf.Variable(rng.normal([batch] + list(shape) + [3]) * 2.0)

    @tf.function
    def loss_step():
        with tf.GradientTape() as tape:
            total = tf.reduce_mean(loss_terms(batch_arrays, ddf, config)["total"])
        return tape.gradient(total, ddf)

    start = time.perf_counter()
    loss_step().numpy()
    first = time.perf_counter() - start
    for _ in range(2):
        loss_step().numpy()
    times = _timed(lambda: loss_step().numpy(), options["repeats"])
    return {"quantity": f"loss fwd+bwd {'x'.join(map(str, shape))}, batch {batch}", "unit": "s/batch",
            **_stats(times), "first_call_s": first,
            "note": f"2 warps + loss (alpha {config.alpha:g}, beta {config.beta:g}) and its gradient to the DDF; "
                    "compare with the training step's median step time"}


def work_loss_part(options, part, batch, shape, spacing_mm):
    """One piece of the loss, forward and backward, on random data of the training batch's shape."""
    tf = _tf(options)
    from label_reg import layers, losses
    rng = tf.random.Generator.from_seed(0)
    volume = list(shape)
    ddf = tf.Variable(rng.normal([batch] + volume + [3]) * 2.0)
    mask = tf.Variable(tf.cast(rng.uniform([batch] + volume + [1]) > 0.5, tf.float32))
    if part == "warp":
        target, piece = ddf, lambda: layers.warp(mask, ddf, "zero")
    elif part == "bending":
        target, piece = ddf, lambda: losses.bending_energy(ddf)
    elif part == "smoothing":
        sigmas = [s for s in losses.DEFAULT_SIGMAS if s > 0]
        target, piece = mask, lambda: tf.add_n([tf.reduce_sum(layers.gaussian_smooth(mask, s)) for s in sigmas])
    else:
        raise ValueError(f"unknown loss part {part!r}")

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            value = tf.reduce_sum(tf.square(piece()))
        return tape.gradient(value, target)

    step().numpy()
    for _ in range(2):
        step().numpy()
    times = _timed(lambda: step().numpy(), options["repeats"])
    return {"quantity": f"{part} fwd+bwd {'x'.join(map(str, shape))}, batch {batch}", "unit": "s/batch",
            **_stats(times), "note": "one piece of the training loss with its gradient"}


def work_pipeline(options, batch, shape, spacing_mm):
    _tf(options)
    from label_reg import data
    warmup, chunk, groups = 3, 4, options["repeats"]
    cases = _phantom_cases(shape, spacing_mm, 10)
    dataset = data.training_dataset(cases, batch, warmup + groups * chunk + 1, seed=0, augment_scale=0.1)
    iterator = iter(dataset)
    start = time.perf_counter()
    next(iterator)
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        next(iterator)
    # Per-batch times of a prefetching pipeline are bursty: each repeat is the mean over a group of batches.
    times = []
    for _ in range(groups):
        start = time.perf_counter()
        for _ in range(chunk):
            next(iterator)
        times.append((time.perf_counter() - start) / chunk)
    rates = [batch / t for t in times]
    return {"quantity": f"input pipeline {'x'.join(map(str, shape))}, batch {batch}, augmented",
            "unit": "samples/s", **_stats(rates), "first_call_s": first,
            "note": f"data.training_dataset alone (all cores to itself), groups of {chunk} batches"}


def _register_inputs(options, tmp, count):
    """(pairs, model_dir, notes): real pairs from --data_dir (or phantoms) and a model directory."""
    from label_reg import datasets
    notes = []
    data_dir = options.get("data_dir") or DEFAULT_DATA
    try:
        pairs = datasets.discover_pairs(data_dir, require_labels=False)[:count]
        notes.append(f"{len(pairs)} pair(s) of {pathlib.Path(data_dir).name}")
    except Exception:
        from label_reg.synthetic import write_phantoms
        phantoms = os.path.join(tmp, "phantoms")
        write_phantoms(phantoms, count, seed=0)
        pairs = datasets.discover_pairs(phantoms, require_labels=False)
        notes.append(f"{len(pairs)} synthetic phantom pair(s)")
    model_dir = options.get("model_dir")
    if model_dir:
        notes.append(f"model {model_dir}")
    else:
        from label_reg import model_dir as md
        from label_reg.network import build_model
        model_dir = os.path.join(tmp, "model")
        build = {"image_shape": FULL["shape"], "moving_label_input": True, "base_filters": 4}
        md.save(model_dir, build_model(**build), build, PreprocessConfig(FULL["spacing_mm"], FULL["shape"]))
        notes.append("untrained 96x96x80 MIX+ model")
    return pairs, model_dir, notes


def _label_reg_command():
    script = pathlib.Path(sys.executable).with_name("label-reg")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from label_reg.cli import main; sys.exit(main())"]


def work_register(options, cold):
    try:
        import label_reg.register  # noqa: F401
    except ImportError:
        return {"quantity": f"label-reg register ({'cold CLI' if cold else 'warm'})", "unit": "s/pair",
                "skipped": True, "note": "label_reg.register not available in this tree"}
    count = 2 if options["quick"] else max(3, options["repeats"] // 2)
    with tempfile.TemporaryDirectory(prefix="label_reg_bench_") as tmp:
        pairs, model_dir, notes = _register_inputs(options, tmp, count + (0 if cold else 1))
        times, first, stages = [], None, {}
        if cold:
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
            for i, pair in enumerate(pairs):
                out = os.path.join(tmp, f"out{i}")
                cmd = _label_reg_command() + [
                    "register", f"--moving_image={pair.moving_image}", f"--fixed_image={pair.fixed_image}",
                    f"--moving_label={pair.moving_label}", f"--model_dir={model_dir}", f"--output_dir={out}"]
                start = time.perf_counter()
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                times.append(time.perf_counter() - start)
                if done.returncode:
                    raise RuntimeError(f"label-reg register failed: {done.stderr.strip().splitlines()[-1:]}")
            peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
            notes.insert(0, "new process per pair: start-up + model load + tracing + registration + writing")
        else:
            _tf(options)
            from label_reg.register import Registrar
            start = time.perf_counter()
            registrar = Registrar(model_dir)
            load = time.perf_counter() - start
            for i, pair in enumerate(pairs):
                start = time.perf_counter()
                result = registrar.register(pair.moving_image, pair.fixed_image, pair.moving_label, None,
                                            os.path.join(tmp, f"out{i}"))
                elapsed = time.perf_counter() - start
                if i == 0:
                    first = elapsed + load
                    continue
                times.append(elapsed)
                for key, value in result.report.get("timings_s", {}).items():
                    stages.setdefault(key, []).append(value)
            peak_mb = None
            stage_text = ", ".join(f"{k[:-2]} {sorted(v)[len(v) // 2]:.2f}" for k, v in stages.items()
                                   if k != "total_s")
            notes.insert(0, f"model loaded once ({load:.1f} s) and first pair (tracing) left out; stages s: "
                            f"{stage_text}")
    result = {"quantity": f"label-reg register ({'cold CLI' if cold else 'warm, batch mode'})", "unit": "s/pair",
              **_stats(times), "note": "; ".join(notes)}
    if first is not None:
        result["first_call_s"] = first
    if peak_mb is not None:
        result["peak_rss_mb"] = peak_mb
    return result


WORKERS = {"matmul": work_matmul, "forward": work_forward, "train": work_train, "loss": work_loss,
           "loss_part": work_loss_part, "pipeline": work_pipeline, "register": work_register}


def run_worker(name, options):
    kind, kwargs = MEASUREMENTS[name]
    result = WORKERS[kind](options, **kwargs)
    result.setdefault("peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
    result["name"] = name
    print(RESULT_TAG + json.dumps(result), flush=True)


# ================================================================================================ driver
def _measure(name, options, timeout):
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--_worker", name, "--_options", json.dumps(options)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO))
    except subprocess.TimeoutExpired:
        return {"name": name, "note": f"timed out after {timeout} s"}
    wall = time.perf_counter() - start
    lines = [l for l in done.stdout.splitlines() if l.startswith(RESULT_TAG)]
    if done.returncode or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"name": name, "note": f"failed (exit {done.returncode}): {tail[:200]}"}
    result = json.loads(lines[-1][len(RESULT_TAG):])
    remapper = sum("remapper" in l.lower() for l in done.stderr.splitlines())
    if remapper:
        result["note"] = (result.get("note", "") + f"; TF printed {remapper} remapper error line(s)").lstrip("; ")
    result["process_s"] = wall
    return result


def _fmt(value, digits=3):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, int):
        return str(value)
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.{digits}g}"


def print_table(rows, stream=sys.stdout):
    headers = ("measurement", "median", "min–max", "unit", "GFLOP", "GFLOP/s", "of matmul", "peak MB",
               "first call s", "n")
    body = []
    for r in rows:
        spread = f"{_fmt(r.get('low'))}–{_fmt(r.get('high'))}" if r.get("low") is not None else ""
        fraction = r.get("fraction_of_matmul")
        body.append((r.get("quantity") or r["name"], _fmt(r.get("median")), spread, r.get("unit", ""),
                     _fmt(r.get("gflop")), _fmt(r.get("gflop_per_s")),
                     f"{100 * fraction:.1f}%" if fraction is not None else "", _fmt(r.get("peak_rss_mb")),
                     _fmt(r.get("first_call_s")), _fmt(r.get("repeats"))))
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    print(line(headers), file=stream)
    print("  ".join("-" * w for w in widths), file=stream)
    for row in body:
        print(line(row), file=stream)
    print(file=stream)
    for r in rows:
        if r.get("note"):
            print(f"  {r['name']}: {r['note']}", file=stream)


def write_csv(rows, path):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="bench.csv", help="CSV file to write (default bench.csv)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats: a smoke test, not a measurement")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(MEASUREMENTS)}")
    parser.add_argument("--repeats", type=int, default=0, help="timed repeats per measurement (default 10, quick 3)")
    parser.add_argument("--model_dir", default="", help="trained model for the register rows (default: untrained)")
    parser.add_argument("--data_dir", default="", help=f"pairs for the register rows (default {DEFAULT_DATA})")
    parser.add_argument("--intra_op_threads", type=int, default=0, help="tf.config.threading (0 = TF default)")
    parser.add_argument("--inter_op_threads", type=int, default=0, help="tf.config.threading (0 = TF default)")
    parser.add_argument("--disable_remapper", action="store_true",
                        help="turn off Grappler's remapper (op fusion) in every measurement, to see what it buys")
    parser.add_argument("--jit_compile", action="store_true", help="compile the forward rows with XLA")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per measurement")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    parser.add_argument("--_options", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._worker:
        run_worker(args._worker, json.loads(args._options))
        return 0

    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(MEASUREMENTS)
    unknown = [n for n in names if n not in MEASUREMENTS]
    if unknown:
        parser.error(f"unknown measurement(s) {unknown}; choose from {', '.join(MEASUREMENTS)}")
    options = {"quick": bool(args.quick), "repeats": args.repeats or (3 if args.quick else 10),
               "model_dir": args.model_dir, "data_dir": args.data_dir,
               "intra_op_threads": args.intra_op_threads, "inter_op_threads": args.inter_op_threads,
               "disable_remapper": bool(args.disable_remapper), "jit_compile": bool(args.jit_compile)}
    rows = []
    started = time.perf_counter()
    for name in names:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        rows.append(_measure(name, options, args.timeout))
        print(f"[bench] {name}: {_fmt(rows[-1].get('median'))} {rows[-1].get('unit', '')} "
              f"({rows[-1].get('process_s', 0):.0f} s)", file=sys.stderr, flush=True)
    reference = next((r.get("median") for r in rows if r["name"] == "matmul" and r.get("median")), None)
    for r in rows:
        if reference and r.get("gflop_per_s") and r["name"] != "matmul":
            r["fraction_of_matmul"] = r["gflop_per_s"] / reference
    threads = (f"intra_op {args.intra_op_threads or 'default'}, inter_op {args.inter_op_threads or 'default'}"
               + (", remapper off" if args.disable_remapper else "") + (", XLA forward" if args.jit_compile else ""))
    print(f"\nlabel_reg bench: {os.cpu_count()} CPU(s), {threads}, {time.perf_counter() - started:.0f} s"
          + (" (--quick: smoke test, not a measurement)" if args.quick else ""))
    print_table(rows)
    write_csv(rows, args.output)
    print(f"\nwritten {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
