"""Training: a custom loop under a ``tf.distribute`` strategy, fed by :mod:`label_reg.data`.

* Strategy: ``MultiWorkerMirroredStrategy`` when ``TF_CONFIG`` names more than one worker, else
  ``MirroredStrategy`` over the local GPUs (or the CPU). ``cpu_replicas > 1`` splits the CPU into that many logical
  devices so the multi-replica path runs without a GPU. The global batch is split evenly over replicas and the loss
  is averaged over the *global* batch (``tf.nn.compute_average_loss``), so gradients do not depend on the split.
* Determinism: with a fixed seed on CPU the same run gives the same numbers (op determinism is on), and a run killed
  at any moment and restarted with ``resume=True`` ends with the same weights as an uninterrupted one: checkpoints
  hold the model, the optimizer and the step, and the data pipeline restarts exactly at that step.
* Validation every ``validate_every`` steps on the held-out cases (gland DSC, landmark TRE in mm at the working
  resolution); the weights with the best validation DSC are written to the model directory with everything
  ``register`` needs (:mod:`label_reg.model_dir`).
"""
import dataclasses
import json
import os
import pathlib
import signal
import sys
import tempfile
import time

import numpy as np

from label_reg import data as data_lib
from label_reg import datasets, metrics, model_dir
from label_reg.cache import CaseCache
from label_reg.errors import InputError
from label_reg.preprocess import PreprocessConfig, preprocess_pair


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on. Field names are the ``label-reg train`` flag names."""
    data_dir: str
    model_dir: str
    alpha: float = 0.05
    beta: float = 0.45
    moving_label_input: bool = True
    learning_rate: float = 2e-4
    batch_size: int = 5
    num_steps: int = 33000
    spacing_mm: float = 0.88
    shape: tuple = (96, 96, 80)
    base_filters: int = 4
    augment_scale: float = 0.1
    num_folds: int = 5
    fold: int = 0
    split_seed: int = 0
    cases_csv: str = ""
    seed: int = 0
    validate_every: int = 500
    checkpoint_every: int = 100
    resume: bool = False
    cache_dir: str = ""
    cpu_replicas: int = 0
    log_every: int = 10
    progress: bool = True

    def preprocess_config(self):
        return PreprocessConfig(spacing_mm=float(self.spacing_mm), shape=tuple(int(n) for n in self.shape))

    def build_args(self):
        return {"image_shape": tuple(int(n) for n in self.shape),
                "moving_label_input": bool(self.moving_label_input), "base_filters": int(self.base_filters)}


def _tf():
    import tensorflow as tf  # imported late: the CPU must be split before TensorFlow initialises its devices
    return tf


def make_strategy(cpu_replicas=0):
    """MultiWorkerMirroredStrategy from TF_CONFIG, else MirroredStrategy (GPUs, or ``cpu_replicas`` logical CPUs)."""
    tf = _tf()
    cluster = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}").get("cluster", {})
    if len(cluster.get("worker", [])) + len(cluster.get("chief", [])) > 1:
        return tf.distribute.MultiWorkerMirroredStrategy()
    if cpu_replicas and cpu_replicas > 1 and not tf.config.list_physical_devices("GPU"):
        cpu = tf.config.list_physical_devices("CPU")[0]
        wanted = [tf.config.LogicalDeviceConfiguration()] * int(cpu_replicas)
        if tf.config.get_logical_device_configuration(cpu) != wanted:
            tf.config.set_logical_device_configuration(cpu, wanted)
        return tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
    return tf.distribute.MirroredStrategy()


def _is_chief(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    return resolver.task_type == "chief" or (resolver.task_type == "worker" and resolver.task_id == 0
                                             and "chief" not in resolver.cluster_spec().as_dict())


def load_split(config):
    """(train pairs, validation pairs) from ``cases_csv`` (a ``split`` column: train/val) or k-fold on the folder."""
    pairs = datasets.discover_pairs(config.data_dir)
    by_name = {p.name: p for p in pairs}
    if config.cases_csv:
        train = datasets.select_split(config.cases_csv, "train", known=by_name)
        val = datasets.select_split(config.cases_csv, "val", known=by_name)
    else:
        train, val = datasets.kfold_split(sorted(by_name), config.num_folds, config.fold, config.split_seed)
    if not train:
        raise InputError(config.data_dir, "no training cases in this split")
    return [by_name[n] for n in train], [by_name[n] for n in val]


def load_cases(pairs, preprocess_config, cache_dir="", progress=True):
    """Pre-process each pair once (cached on disk when ``cache_dir`` is set); list of dicts of numpy arrays."""
    cache = CaseCache(cache_dir, preprocess_config.to_dict()) if cache_dir else None
    cases = []
    for i, pair in enumerate(pairs):
        if cache is None:
            arrays = preprocess_pair(pair, preprocess_config).to_arrays()
        else:
            arrays = cache.get_or_compute(pair, lambda p: preprocess_pair(p, preprocess_config).to_arrays())
        cases.append(arrays)
        if progress and (sys.stderr.isatty() or i + 1 == len(pairs)):
            end = "\n" if i + 1 == len(pairs) else ""
            print(f"\rpre-processing {i + 1}/{len(pairs)} cases", end=end, file=sys.stderr, flush=True)
    return cases


def loss_terms(config, batch, ddf):
    """The training loss for a batch dict and the network's DDF: warps the moving gland mask (zero boundary) and,
    when ``config.beta > 0``, the moving SDM (replicate), then :func:`label_reg.losses.registration_loss`.
    Returns (per-sample terms dict, warped moving label)."""
    from label_reg.layers import warp
    from label_reg.losses import registration_loss
    warped_label = warp(batch["moving_label"], ddf, "zero")
    warped_sdm = warp(batch["moving_sdm"], ddf, "replicate") if config.beta > 0 else None
    terms = registration_loss(config.alpha, config.beta, batch["fixed_label"], warped_label, batch["fixed_sdm"],
                              warped_sdm, ddf)
    return terms, warped_label


class Trainer:
    """Builds the strategy, model, optimizer, checkpoints and pipeline for a :class:`TrainConfig`; :meth:`run` trains."""

    def __init__(self, config, train_cases, val_cases, val_names=()):
        self.config = config
        self.tf = tf = _tf()
        self.strategy = make_strategy(config.cpu_replicas)
        tf.keras.utils.set_random_seed(int(config.seed))
        tf.config.experimental.enable_op_determinism()
        self.chief = _is_chief(self.strategy)
        self.train_cases, self.val_cases, self.val_names = train_cases, val_cases, list(val_names)
        self.global_batch = int(config.batch_size)
        self.replicas = self.strategy.num_replicas_in_sync
        if self.global_batch % self.replicas:
            raise InputError("--batch_size", f"{self.global_batch} does not split evenly over {self.replicas} "
                                              "replicas; use a multiple of the replica count")
        from label_reg.network import build_model
        with self.strategy.scope():
            self.model = build_model(**config.build_args())
            self.optimizer = tf.keras.optimizers.Adam(float(config.learning_rate))
            self.optimizer.build(self.model.trainable_variables)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            self.best_dsc = tf.Variable(-1.0, dtype=tf.float64, trainable=False, name="best_dsc")
        self.model_dir = pathlib.Path(config.model_dir)
        ckpt_dir = self.model_dir / "checkpoints"
        if not self.chief:  # every worker must save (collectives), only the chief's copy is kept
            ckpt_dir = pathlib.Path(tempfile.mkdtemp(prefix="label_reg_worker_ckpt_"))
        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer, step=self.step,
                                              best_dsc=self.best_dsc)
        self.manager = tf.train.CheckpointManager(self.checkpoint, str(ckpt_dir), max_to_keep=2)
        self._train_step = self._make_train_step()
        self._predict = tf.function(lambda inputs: self.model(inputs, training=False), reduce_retracing=True)
        self.writer = tf.summary.create_file_writer(str(self.model_dir / "logs")) if self.chief else None
        self._stop = False

    # -- steps -----------------------------------------------------------------------------------------------
    def _model_inputs(self, batch):
        names = ["moving_image", "fixed_image"] + (["moving_label"] if self.config.moving_label_input else [])
        return {n: batch[n] for n in names}

    def _make_train_step(self):
        tf, strategy, config = self.tf, self.strategy, self.config
        from label_reg.losses import soft_dice

        def replica_step(batch):
            with tf.GradientTape() as tape:
                ddf = self.model(self._model_inputs(batch), training=True)
                terms, warped_label = loss_terms(config, batch, ddf)
                loss = tf.nn.compute_average_loss(terms["total"], global_batch_size=self.global_batch)
            grads = tape.gradient(loss, self.model.trainable_variables)
            self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
            dsc = soft_dice(batch["fixed_label"], tf.cast(warped_label >= 0.5, warped_label.dtype))
            out = {name: tf.nn.compute_average_loss(value, global_batch_size=self.global_batch)
                   for name, value in terms.items()}
            out["dsc"] = tf.nn.compute_average_loss(dsc, global_batch_size=self.global_batch)
            return out

        @tf.function
        def train_step(iterator):
            per_replica = strategy.run(replica_step, args=(next(iterator),))
            self.step.assign_add(1)
            return {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in per_replica.items()}

        return train_step

    def _dataset(self, start_step):
        config, strategy = self.config, self.strategy

        def dataset_fn(context):
            local = self.replicas // context.num_input_pipelines
            return data_lib.training_dataset(
                self.train_cases, self.global_batch, int(config.num_steps), int(config.seed), start_step,
                float(config.augment_scale), num_replicas=self.replicas,
                replica_offset=context.input_pipeline_id * local, replicas_here=local)

        return strategy.distribute_datasets_from_function(dataset_fn)

    # -- validation ------------------------------------------------------------------------------------------
    def validate(self, identity=False):
        """Median gland DSC and median landmark TRE (mm) over the validation cases (identity: pre-alignment only)."""
        from label_reg.layers import warp
        tf = self.tf
        spacing = (float(self.config.spacing_mm),) * 3
        dscs, tres = [], []
        for case in self.val_cases:
            arrays = data_lib.training_arrays(case)
            labels = np.asarray(case["moving_label"], np.float32)
            if identity:
                warped = labels
            else:
                ddf = self._predict({k: v[None] for k, v in self._model_inputs(arrays).items()})
                channels = np.moveaxis(labels, -1, 0)[..., None]
                warped = warp(channels, tf.repeat(ddf, channels.shape[0], axis=0), "zero").numpy()
                warped = np.moveaxis(warped[..., 0], 0, -1)
            fixed = np.asarray(case["fixed_label"], np.float32)
            dscs.append(metrics.dice(fixed[..., 0], warped[..., 0]))
            if fixed.shape[-1] > 1:
                tres.append(metrics.tre_mm(fixed, warped, spacing)[0])
        return {"dsc": float(np.median(dscs)) if dscs else float("nan"),
                "tre_mm": float(np.nanmedian(tres)) if tres else float("nan")}

    def _save_best(self, step, result):
        extra = {"alpha": float(self.config.alpha), "beta": float(self.config.beta), "best_step": int(step),
                 "validation": result, "training": _jsonable(dataclasses.asdict(self.config))}
        model_dir.save(self.model_dir, self.model, self.config.build_args(), self.config.preprocess_config(), extra)

    # -- loop ------------------------------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        self._stop = True

    def run(self):
        """Train to ``num_steps`` (or until SIGINT/SIGTERM, which checkpoints first). Returns a summary dict."""
        tf, config = self.tf, self.config
        if config.resume and self.manager.latest_checkpoint:
            self.checkpoint.restore(self.manager.latest_checkpoint).assert_existing_objects_matched()
        elif not config.resume and self.chief and self.manager.latest_checkpoint:
            raise InputError(self.model_dir, "already holds checkpoints: pass --resume to continue, or use a new "
                                             "--model_dir")
        start = int(self.step.numpy())
        total = int(config.num_steps)
        previous = {signal.SIGINT: signal.getsignal(signal.SIGINT), signal.SIGTERM: signal.getsignal(signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, self._on_signal)
        history, validations = [], []
        coarse = self.validate(identity=True) if self.val_cases else None
        bar = tf.keras.utils.Progbar(total, stateful_metrics=["loss", "dsc", "val_dsc", "val_tre"],
                                     interval=0.5 if sys.stderr.isatty() else 15.0,
                                     verbose=1 if config.progress else 0)
        bar.update(start)
        started, last_val = time.perf_counter(), None
        try:
            if start < total:
                iterator = iter(self._dataset(start))
            step = start
            while step < total and not self._stop:
                values = {k: float(v) for k, v in self._train_step(iterator).items()}
                step += 1
                history.append(values["total"])
                shown = [("loss", values["total"]), ("dsc", values["dsc"])]
                if self.writer is not None and (step % config.log_every == 0 or step == total):
                    self._log_scalars(step, values, (step - start) / (time.perf_counter() - started))
                if self.val_cases and (step % config.validate_every == 0 or step == total):
                    last_val = self.validate()
                    validations.append({"step": step, **last_val})
                    shown += [("val_dsc", last_val["dsc"]), ("val_tre", last_val["tre_mm"])]
                    self._log_validation(step, last_val)
                    if last_val["dsc"] > float(self.best_dsc.numpy()):
                        self.best_dsc.assign(last_val["dsc"])
                        if self.chief:
                            self._save_best(step, last_val)
                elif not self.val_cases and (step % config.validate_every == 0 or step == total) and self.chief:
                    self._save_best(step, {})
                if step % config.checkpoint_every == 0 or step == total:
                    self.manager.save(checkpoint_number=step)
                bar.update(step, shown)
            if self._stop and step < total:
                self.manager.save(checkpoint_number=step)
                print(f"\ninterrupted at step {step}; checkpoint saved, continue with --resume", file=sys.stderr)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.writer is not None:
                self.writer.flush()
        elapsed = time.perf_counter() - started
        done = int(self.step.numpy()) - start
        return {"steps": done, "seconds": elapsed,
                "samples_per_second": done * self.global_batch / elapsed if done else float("nan"),
                "loss_history": history, "validation_history": validations, "coarse": coarse, "last_validation": last_val,
                "best_dsc": float(self.best_dsc.numpy()), "interrupted": self._stop,
                "train_step_traces": int(self._train_step.experimental_get_tracing_count())}

    def _log_scalars(self, step, values, steps_per_second):
        tf = self.tf
        with self.writer.as_default(step=step):
            for name, value in values.items():
                tf.summary.scalar(f"train/{name}", value)
            tf.summary.scalar("train/learning_rate", float(self.config.learning_rate))
            tf.summary.scalar("train/steps_per_second", steps_per_second)

    def _log_validation(self, step, result):
        if self.writer is None:
            return
        tf = self.tf
        with self.writer.as_default(step=step):
            tf.summary.scalar("val/dsc_median", result["dsc"])
            tf.summary.scalar("val/tre_mm_median", result["tre_mm"])
            if self.val_cases:
                tf.summary.image("val/fixed_moving_warped", self._middle_slices(self.val_cases[0])[None])

    def _middle_slices(self, case):
        """Middle axial slices of fixed, moving and warped moving side by side, gland outlines in red."""
        from scipy import ndimage

        from label_reg.layers import warp
        arrays = data_lib.training_arrays(case)
        ddf = self._predict({k: v[None] for k, v in self._model_inputs(arrays).items()})
        warped_image = warp(arrays["moving_image"][None], ddf).numpy()[0]
        warped_label = warp(arrays["moving_label"][None], ddf, "zero").numpy()[0]
        z = arrays["fixed_image"].shape[2] // 2
        tiles = []
        for image, label in ((arrays["fixed_image"], arrays["fixed_label"]),
                             (arrays["moving_image"], arrays["moving_label"]), (warped_image, warped_label)):
            rgb = np.repeat(np.clip(image[:, :, z, :], 0, 1), 3, axis=-1)
            mask = label[:, :, z, 0] >= 0.5
            outline = mask & ~ndimage.binary_erosion(mask)
            rgb[outline] = (1.0, 0.0, 0.0)
            tiles.append(np.transpose(rgb, (1, 0, 2)))  # rows = y, columns = x
        return np.concatenate(tiles, axis=1).astype(np.float32)


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def train(config):
    """Load the data split, pre-process it (cached), and train. Returns the summary dict of :meth:`Trainer.run`."""
    train_pairs, val_pairs = load_split(config)
    preprocess_config = config.preprocess_config()
    train_cases = load_cases(train_pairs, preprocess_config, config.cache_dir, config.progress)
    val_cases = load_cases(val_pairs, preprocess_config, config.cache_dir, config.progress)
    trainer = Trainer(config, train_cases, val_cases, [p.name for p in val_pairs])
    return trainer.run()
