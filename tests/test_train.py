"""Training: it learns, keeps the best-validation model, resumes bit-exactly, and runs multi-replica/multi-worker.

The multi-device tests run training in subprocesses: splitting the CPU into logical devices and starting a
MultiWorkerMirroredStrategy must happen before TensorFlow initialises, which the test process already did.
"""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from label_reg import data as data_lib
from label_reg import model_dir as model_dir_lib

TIMEOUT = 240  # seconds; a hang fails the test instead of stalling CI

RUN_SNIPPET = """
import json, sys
from label_reg.train import TrainConfig, train
config = TrainConfig(**json.loads(sys.argv[1]))
summary = train(config)
print("SUMMARY " + json.dumps({k: summary[k] for k in ("steps", "loss_history", "interrupted", "replicas")}))
"""


def _config(phantom_dir, root, **overrides):
    base = dict(data_dir=str(phantom_dir), model_dir=str(root / "model"), alpha=0.05, beta=0.45,
                moving_label_input=True, learning_rate=1e-3, batch_size=2, num_steps=12, spacing_mm=3.0,
                shape=[32, 32, 32], num_folds=5, fold=0, seed=3, validate_every=1000, checkpoint_every=4,
                cache_dir=str(root.parent / "shared_cache"), progress=False)
    base.update(overrides)
    return base


def _start(config, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-c", RUN_SNIPPET, json.dumps(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _finish(proc):
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"training subprocess hung for {TIMEOUT} s:\n{err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    line = [l for l in out.splitlines() if l.startswith("SUMMARY ")][-1]
    return json.loads(line[len("SUMMARY "):])


def _checkpoint_arrays(model_dir):
    import tensorflow as tf
    reader = tf.train.load_checkpoint(str(model_dir / "checkpoints"))
    # Weights, batch-norm statistics and Adam moments (the object graph files trainable weights under optimizer/).
    names = [n for n in reader.get_variable_to_shape_map() if n.split("/")[0] in ("model", "optimizer", "step")]
    assert len(names) > 200
    return {n: reader.get_tensor(n) for n in names}


def test_training_lowers_the_loss_and_beats_the_prealignment(trained_model):
    _, summary = trained_model
    history = summary["loss_history"]
    assert len(history) == 200
    assert np.mean(history[-20:]) < 0.8 * np.mean(history[:20])
    assert summary["best_dsc"] > summary["coarse"]["dsc"]
    assert summary["train_step_traces"] == 1  # 200 steps and several validations, one traced training step


def test_the_best_validation_model_is_the_one_kept(trained_model, tiny_train_config):
    path, summary = trained_model
    validations = summary["validation_history"]
    assert [v["step"] for v in validations] == [50, 100, 150, 200]
    best = max(validations, key=lambda v: v["dsc"])
    info, _ = model_dir_lib.read_info(path)
    assert info["best_step"] == best["step"] and info["validation"]["dsc"] == pytest.approx(best["dsc"])
    # The weights on disk really are that model: re-scoring them reproduces its validation DSC.
    from label_reg.predictor import Predictor
    from label_reg.train import load_cases, load_split, validate
    _, val_pairs = load_split(tiny_train_config)
    config = tiny_train_config.preprocess_config()
    val_cases = load_cases(val_pairs, config, tiny_train_config.cache_dir, progress=False)
    model, _, _ = model_dir_lib.load(path)
    assert validate(Predictor(model), val_cases, tiny_train_config)["dsc"] == pytest.approx(best["dsc"], abs=1e-6)


def test_pipeline_steps_are_reproducible_and_augmentation_differs_between_steps(trained_model, tiny_train_config):
    from label_reg.train import load_cases, load_split
    train_pairs, _ = load_split(tiny_train_config)
    cases = load_cases(train_pairs[:4], tiny_train_config.preprocess_config(), tiny_train_config.cache_dir, False)
    first = list(data_lib.training_dataset(cases, 2, 4, seed=1, augment_scale=0.1).as_numpy_iterator())
    again = list(data_lib.training_dataset(cases, 2, 4, seed=1, augment_scale=0.1).as_numpy_iterator())
    resumed = list(data_lib.training_dataset(cases, 2, 4, seed=1, start_step=2, augment_scale=0.1)
                   .as_numpy_iterator())
    for a, b in zip(first, again):
        assert all(np.array_equal(a[k], b[k]) for k in data_lib.TRAINING_KEYS)
    for a, b in zip(first[2:], resumed):
        assert all(np.array_equal(a[k], b[k]) for k in data_lib.TRAINING_KEYS)
    # Steps 0 and 2 hold the same 4 cases over the first two epochs; their augmentations must differ.
    plain = list(data_lib.training_dataset(cases, 2, 4, seed=1, augment_scale=0.0).as_numpy_iterator())
    assert not np.allclose(first[0]["moving_image"], plain[0]["moving_image"])
    assert not np.allclose(first[0]["fixed_image"] - plain[0]["fixed_image"],
                           first[0]["moving_image"] - plain[0]["moving_image"])  # MR and TRUS drawn apart
    val = [b["fixed_image"] for b in data_lib.validation_dataset(cases).as_numpy_iterator()]
    val_again = [b["fixed_image"] for b in data_lib.validation_dataset(cases).as_numpy_iterator()]
    assert all(np.array_equal(a, b) for a, b in zip(val, val_again))
    assert np.array_equal(val[0][0], data_lib.training_arrays(cases[0])["fixed_image"])
    # A network trained on the TRUS side only (a segmenter) gets that side, augmented with the same draws.
    keys = ("fixed_image", "fixed_label")
    fixed_only = list(data_lib.training_dataset(cases, 2, 4, seed=1, augment_scale=0.1, keys=keys)
                      .as_numpy_iterator())
    assert len(fixed_only) == 4 and all(sorted(b) == list(keys) for b in fixed_only)
    for a, b in zip(first, fixed_only):
        for key in keys:
            np.testing.assert_allclose(b[key], a[key], atol=1e-6)
    assert not np.allclose(fixed_only[0]["fixed_image"], plain[0]["fixed_image"])
    # Rotation augmentation turns the TRUS side only, rigidly (the gland keeps its volume), from its own stream.
    turned = list(data_lib.training_dataset(cases, 2, 4, seed=1, augment_scale=0.0, augment_rotation_deg=30.0)
                  .as_numpy_iterator())
    for a, b in zip(plain, turned):
        for key in ("moving_image", "moving_label"):
            np.testing.assert_array_equal(b[key], a[key])
        assert not np.allclose(b["fixed_label"], a["fixed_label"], atol=0.2)
        np.testing.assert_allclose(b["fixed_label"].sum((1, 2, 3, 4)), a["fixed_label"].sum((1, 2, 3, 4)), rtol=0.03)
    both = list(data_lib.training_dataset(cases, 2, 4, seed=1, augment_scale=0.1, augment_rotation_deg=30.0)
                .as_numpy_iterator())
    np.testing.assert_array_equal(both[0]["moving_image"], first[0]["moving_image"])  # the MR draw is unchanged
    # Shift augmentation translates the MR side only, from its own stream: the MR gland moves and keeps its size.
    shifted = list(data_lib.training_dataset(cases, 2, 4, seed=1, augment_scale=0.0, augment_shift_voxels=2.0)
                   .as_numpy_iterator())
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in plain[0]["moving_label"].shape[1:4]], indexing="ij"), -1)

    def centroids(labels):
        return np.einsum("bxyz,xyzk->bk", labels[..., 0], grid) / labels[..., 0].sum((1, 2, 3))[:, None]

    moves = []
    for a, b in zip(plain, shifted):
        for key in ("fixed_image", "fixed_label"):
            np.testing.assert_array_equal(b[key], a[key])
        np.testing.assert_allclose(b["moving_label"].sum((1, 2, 3, 4)), a["moving_label"].sum((1, 2, 3, 4)),
                                   rtol=0.03)
        moves.append(centroids(b["moving_label"]) - centroids(a["moving_label"]))
        assert not np.allclose(b["moving_image"], a["moving_image"], atol=1e-3)
    moves = np.concatenate(moves)  # 8 samples x 3 axes, voxels
    assert 1.0 < np.sqrt(np.mean(moves ** 2)) < 3.5 and np.ptp(moves, axis=0).min() > 1.0
    both = list(data_lib.training_dataset(cases, 2, 4, seed=1, augment_scale=0.1, augment_shift_voxels=2.0)
                .as_numpy_iterator())
    np.testing.assert_array_equal(both[0]["fixed_image"], first[0]["fixed_image"])  # the TRUS draw is unchanged


def test_train_flags_are_the_config_fields_and_the_presets_parse():
    import dataclasses

    from absl import flags

    from label_reg.commands import config_from_flags, define_config_flags
    from label_reg.errors import InputError
    from label_reg.preprocess import PreprocessConfig
    from label_reg.train import TrainConfig
    flag_values = flags.FlagValues()
    define_config_flags(TrainConfig, flag_values)
    assert set(flag_values.flag_values_dict()) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert all(flag_values[f.name].help != f.name for f in dataclasses.fields(TrainConfig))  # every flag has help
    experiments = pathlib.Path(__file__).resolve().parents[1] / "experiments"
    flag_values(["train", f"--flagfile={experiments / 'mdsc.flags'}", f"--flagfile={experiments / 'cpu.flags'}",
                 "--data_dir=DATA", "--model_dir=RUN", "--seed=7"])
    config = config_from_flags(TrainConfig, flag_values)
    assert (config.alpha, config.beta, config.moving_label_input, config.seed) == (0.3, 0.0, False, 7)
    assert config.preprocess_config() == PreprocessConfig(spacing_mm=1.76, shape=(48, 48, 40))
    assert (config.data_dir, config.model_dir, config.cache_dir) == ("DATA", "RUN", "")
    # The default working grid is PreprocessConfig's, the one place it is written.
    default = TrainConfig(data_dir="", model_dir="").preprocess_config()
    assert (default.spacing_mm, default.shape) == (PreprocessConfig().spacing_mm, PreprocessConfig().shape)
    flag_values["shape"].parse("48,x,40")
    with pytest.raises(InputError, match="--shape"):
        config_from_flags(TrainConfig, flag_values)
    for angle in (-1.0, 181.0, float("nan")):
        with pytest.raises(InputError, match="--augment_rotation_deg: must be between 0 and 180 degrees"):
            dataclasses.replace(config, augment_rotation_deg=angle)
    for shift in (-0.5, float("inf"), float("nan")):
        with pytest.raises(InputError, match="--augment_shift_mm: must be a finite number of mm, 0 or more"):
            dataclasses.replace(config, augment_shift_mm=shift)
    for keep in (-250, 100, 375):  # the CPU preset checkpoints every 250 steps
        with pytest.raises(InputError, match=rf"--keep_checkpoint_every: must be 0 or a positive multiple of "
                                             rf"--checkpoint_every \(250\), got {keep}"):
            dataclasses.replace(config, keep_checkpoint_every=keep)
    assert dataclasses.replace(config, keep_checkpoint_every=1000).keep_checkpoint_every == 1000


def test_every_experiment_flagfile_is_a_valid_training_config():
    from absl import flags

    from label_reg.commands import config_from_flags, define_config_flags
    from label_reg.train import TrainConfig
    experiments = pathlib.Path(__file__).resolve().parents[1] / "experiments"
    configs = {}
    for path in sorted(experiments.glob("*.flags")):
        if path.stem in ("cpu", "segmenter", "segmenter_cpu"):  # a preset and the segmenter's own flags
            continue
        flag_values = flags.FlagValues()
        define_config_flags(TrainConfig, flag_values)
        flag_values(["train", f"--flagfile={path}", f"--flagfile={experiments / 'cpu.flags'}",
                     "--data_dir=DATA", "--model_dir=RUN"])
        configs[path.stem] = config_from_flags(TrainConfig, flag_values)
    assert {"mdsc", "sdm", "mix", "mixplus", "mixplus_landmarks", "mixplus_affine",
            "mixplus_landmarks_affine"} <= set(configs)
    # Each beyond-the-paper experiment is MIX+ with one or both additions, and nothing else changed.
    plain = configs["mixplus"]
    for name, landmarks, affine in (("mixplus_landmarks", True, False), ("mixplus_affine", False, True),
                                    ("mixplus_landmarks_affine", True, True)):
        config = configs[name]
        assert (config.landmark_weight > 0, config.global_affine) == (landmarks, affine), name
        assert config.build_args() == dict(plain.build_args(), global_affine=affine,
                                           **({"affine_pooling": "flatten"} if affine else {})), name
        assert (config.alpha, config.beta, config.learning_rate, config.num_steps) == (
            plain.alpha, plain.beta, plain.learning_rate, plain.num_steps), name
        # the combination keeps its label losses inside the TRUS view; the others score the whole crop (the paper)
        assert config.label_loss_in_view == (name == "mixplus_landmarks_affine"), name
    assert not plain.label_loss_in_view


def test_killed_and_resumed_run_ends_with_the_same_weights(phantom_dir, tmp_path):
    straight = _config(phantom_dir, tmp_path / "straight")
    _finish(_start(straight))

    broken = _config(phantom_dir, tmp_path / "broken")
    proc = _start(broken)
    checkpoints = tmp_path / "broken" / "model" / "checkpoints"
    deadline = time.time() + TIMEOUT
    state = checkpoints / "checkpoint"  # written last, once a checkpoint is complete
    while not (state.exists() and "ckpt-4" in state.read_text()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert not (checkpoints / "ckpt-12.index").exists()

    resumed = _finish(_start(dict(broken, resume=True)))
    assert 0 < resumed["steps"] < 12
    a = _checkpoint_arrays(tmp_path / "straight" / "model")
    b = _checkpoint_arrays(tmp_path / "broken" / "model")
    assert a.keys() == b.keys()
    different = [n for n in a if not np.array_equal(a[n], b[n])]
    assert not different, different[:5]


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_two_workers_on_loopback_train_in_lockstep(phantom_dir, tmp_path):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index in range(2):
        config = _config(phantom_dir, tmp_path / f"worker{index}", num_steps=4, checkpoint_every=2,
                         model_dir=str(tmp_path / "mw_model"))
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        procs.append(_start(config, {"TF_CONFIG": tf_config}))
    summaries = [_finish(p) for p in procs]
    losses = [s["loss_history"] for s in summaries]
    assert len(losses[0]) == 4 and all(np.isfinite(losses[0]))
    assert losses[0] == losses[1]  # the all-reduced loss is the same number on both workers
    assert (tmp_path / "mw_model" / "model.weights.h5").exists()  # only the chief writes the model directory


def test_mirrored_strategy_over_two_logical_cpus(phantom_dir, tmp_path):
    summary = _finish(_start(_config(phantom_dir, tmp_path / "mirrored", num_steps=4, cpu_replicas=2)))
    assert summary["replicas"] == 2  # the run itself was split over two logical CPUs
    assert len(summary["loss_history"]) == 4 and all(np.isfinite(summary["loss_history"]))


def test_landmark_volumes_are_paired_padded_and_augmented_with_their_side(trained_model, tiny_train_config):
    from label_reg.train import load_cases, load_split
    train_pairs, _ = load_split(tiny_train_config)
    cases = load_cases(train_pairs[:3], tiny_train_config.preprocess_config(), tiny_train_config.cache_dir, False)
    counts = [data_lib.landmark_count(c) for c in cases]
    assert min(counts) > 0
    # Channel 1 of both sides replaced by the gland mask: after augmentation, landmark channel 0 must still be
    # exactly the augmented gland of its own side (one draw per side). The last case loses all but one landmark.
    cases = [dict(c) for c in cases]
    for c in cases:
        for side in ("moving_label", "fixed_label"):
            labels = np.array(c[side], np.float32)
            labels[..., 1] = labels[..., 0]
            c[side] = labels
    cases[-1]["fixed_label"] = cases[-1]["fixed_label"][..., :2]
    keys = data_lib.TRAINING_KEYS + data_lib.LANDMARK_KEYS
    batches = list(data_lib.training_dataset(cases, 3, 2, seed=4, augment_scale=0.1, keys=keys).as_numpy_iterator())
    most = max(data_lib.landmark_count(c) for c in cases)
    for batch in batches:
        assert batch["moving_landmarks"].shape == (3,) + tuple(tiny_train_config.shape) + (most,)
        for side in ("moving", "fixed"):
            np.testing.assert_allclose(batch[f"{side}_landmarks"][..., 0], batch[f"{side}_label"][..., 0], atol=1e-6)
    plain = data_lib.training_arrays(cases[-1], keys, num_landmarks=most)
    assert plain["fixed_landmarks"][..., 1:].max() == 0 and plain["moving_landmarks"][..., 1:].max() == 0
    assert plain["moving_landmarks"].shape[-1] == most


def test_landmark_training_keeps_the_lowest_tre_model(trained_model, tiny_train_config, tmp_path):
    import dataclasses

    from label_reg.evaluate import method_name
    from label_reg.train import TrainConfig, registration_task, train
    config = dataclasses.replace(tiny_train_config, model_dir=str(tmp_path / "model"), landmark_weight=1.0,
                                 select_by="tre", num_steps=30, validate_every=10, checkpoint_every=30,
                                 keep_checkpoint_every=0)
    task = registration_task(config)
    assert task.select == "tre_mm" and set(data_lib.LANDMARK_KEYS) <= set(task.keys)
    summary = train(config)
    tres = {v["step"]: v["tre_mm"] for v in summary["validation_history"]}
    best_step = min(tres, key=tres.get)
    info, _ = model_dir_lib.read_info(tmp_path / "model")
    assert info["best_step"] == best_step and summary["best_tre_mm"] == pytest.approx(tres[best_step])
    assert info["training"]["landmark_weight"] == 1.0 and method_name(info) == "MIX+ landmarks"
    assert all(np.isfinite(summary["loss_history"]))
    for bad, flag in (({"landmark_weight": -1.0}, "--landmark_weight"), ({"select_by": "loss"}, "--select_by"),
                      ({"landmark_terms": "all"}, "--landmark_terms")):
        from label_reg.errors import InputError
        with pytest.raises(InputError, match=flag):
            TrainConfig(data_dir="", model_dir="", **bad)


def test_select_by_last_keeps_the_final_weights(tiny_train_config, tmp_path):
    """--select_by=last: every validation saves, so the model directory holds the last validated step whatever
    the scores did, and its validation record is that step's."""
    import dataclasses

    from label_reg.train import registration_task, train
    config = dataclasses.replace(tiny_train_config, model_dir=str(tmp_path / "model"), select_by="last",
                                 num_steps=20, validate_every=8, checkpoint_every=20, keep_checkpoint_every=0)
    assert registration_task(config).select == "step"
    summary = train(config)
    assert [v["step"] for v in summary["validation_history"]] == [8, 16, 20]
    info, _ = model_dir_lib.read_info(tmp_path / "model")
    last = summary["validation_history"][-1]
    assert info["best_step"] == 20 and summary["best_step"] == 20
    assert info["validation"]["dsc"] == pytest.approx(last["dsc"])


def test_bending_voxels_reaches_the_training_loss(tiny_train_config):
    import dataclasses

    from label_reg.errors import InputError
    from label_reg.train import TrainConfig, loss_terms
    shape = (1,) + tuple(tiny_train_config.shape)
    mask = np.zeros(shape + (1,), np.float32)
    mask[0, 8:16, 8:16, 8:16] = 1.0
    batch = {"moving_label": mask, "fixed_label": mask, "moving_sdm": mask, "fixed_sdm": mask}
    ddf = np.zeros(shape + (3,), np.float32)
    ddf[0, 0, 0, :, 0] = 3.0  # displaced along one edge of the crop only
    energy = {}
    for voxels in ("interior", "all"):
        config = dataclasses.replace(tiny_train_config, bending_voxels=voxels)
        energy[voxels] = float(loss_terms(batch, ddf, config)["bending_energy"][0])
    assert energy["interior"] == 0.0 and energy["all"] > 1e-3
    with pytest.raises(InputError, match="--bending_voxels"):
        TrainConfig(data_dir="", model_dir="", bending_voxels="edges")


def test_label_loss_in_view_ignores_the_gland_beyond_the_trus_volume(tiny_train_config):
    """A TRUS gland mask cut by the TRUS volume's face, an MR gland that goes on past it: with label_loss_in_view
    the gland losses are those of the MR gland cut at the same place (what lies past the face does not count), and
    without it they are not."""
    import dataclasses

    from label_reg.preprocess import signed_distance_map
    from label_reg.train import loss_terms
    shape = tuple(tiny_train_config.shape)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    gland = (np.linalg.norm((grid - [16, 16, 20]) / [7, 7, 10], axis=-1) <= 1).astype(np.float32)
    image = np.full(shape, 0.5, np.float32)
    image[:, :, 24:] = 0.0  # the TRUS volume ends at z = 24
    cut = gland.copy()
    cut[:, :, 24:] = 0.0
    inside_view = cut.copy()
    inside_view[:, :, 24:26] = gland[:, :, 24:26]  # the view's 2-voxel margin past the face

    def batch(moving):
        sdm = lambda m: signed_distance_map(m > 0.5, (1.0, 1.0, 1.0))[None, ..., None]  # noqa: E731
        return {"moving_label": moving[None, ..., None], "fixed_label": cut[None, ..., None],
                "moving_sdm": sdm(moving), "fixed_sdm": sdm(cut), "fixed_image": image[None, ..., None],
                "moving_image": image[None, ..., None]}

    ddf = np.zeros((1,) + shape + (3,), np.float32)
    on = dataclasses.replace(tiny_train_config, label_loss_in_view=True)
    whole, trimmed = loss_terms(batch(gland), ddf, on), loss_terms(batch(inside_view), ddf, on)
    for term in ("multiscale_dice", "sdm_msle"):
        assert float(whole[term][0]) == pytest.approx(float(trimmed[term][0]), abs=1e-6)
    plain = loss_terms(batch(gland), ddf, tiny_train_config)
    assert float(plain["multiscale_dice"][0]) > float(whole["multiscale_dice"][0]) + 1e-3
    assert float(plain["sdm_msle"][0]) > float(whole["sdm_msle"][0])


def test_landmark_centroid_weight_adds_the_centroid_distance_to_the_training_loss(tiny_train_config):
    """--landmark_centroid_weight: the batch's landmark centroid distance in mm, weighted, joins the total beside
    the landmark Dice; the task loads the landmark volumes and shows the term; the model is named a landmark one."""
    import dataclasses

    from label_reg.errors import InputError
    from label_reg.evaluate import method_name
    from label_reg.losses import landmark_centroid_distance
    from label_reg.train import TrainConfig, loss_terms, registration_task
    shape = (1,) + tuple(tiny_train_config.shape)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape[1:]], indexing="ij"), -1)
    gland = (np.linalg.norm(grid - 16, axis=-1) <= 8).astype(np.float32)[None, ..., None]
    landmark = (np.linalg.norm(grid - [14, 16, 16], axis=-1) <= 2).astype(np.float32)[None, ..., None]
    batch = {"moving_label": gland, "fixed_label": gland, "moving_sdm": gland, "fixed_sdm": gland,
             "fixed_landmarks": landmark, "moving_landmarks": np.roll(landmark, 2, axis=1)}
    ddf = np.zeros(shape + (3,), np.float32)
    base = dataclasses.replace(tiny_train_config, landmark_weight=0.3)
    both = dataclasses.replace(base, landmark_centroid_weight=0.05)
    plain, with_centroid = loss_terms(batch, ddf, base), loss_terms(batch, ddf, both)
    assert "landmark_centroid_mm" not in plain
    distance = float(with_centroid["landmark_centroid_mm"][0])
    expected = float(landmark_centroid_distance(batch["fixed_landmarks"], batch["moving_landmarks"], [[1]],
                                                tiny_train_config.spacing_mm)[0])
    assert distance == pytest.approx(expected, rel=1e-5) and distance == pytest.approx(
        2 * tiny_train_config.spacing_mm, abs=0.1)
    assert float(with_centroid["total"][0]) == pytest.approx(float(plain["total"][0]) + 0.05 * distance, rel=1e-5)
    # The centroid term alone (no landmark Dice) still makes a landmark-supervised task and model name.
    alone = dataclasses.replace(tiny_train_config, landmark_centroid_weight=0.05)
    assert "landmark_dice" not in loss_terms(batch, ddf, alone)
    task = registration_task(alone)
    assert set(data_lib.LANDMARK_KEYS) <= set(task.keys) and task.shown == ("dsc", "landmark_centroid_mm")
    info = {"alpha": 0.05, "beta": 0.45, "build": {"moving_label_input": True}, "training": alone.to_json()}
    assert method_name(info) == "MIX+ landmarks"
    with pytest.raises(InputError, match="--landmark_centroid_weight"):
        TrainConfig(data_dir="", model_dir="", landmark_centroid_weight=-0.1)
