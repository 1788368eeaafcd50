"""The training loop, for any kind of network: a :class:`Trainer` runs a :class:`Task` with a :class:`RunConfig`.

The trainer owns what every network's training shares:

* Strategy: ``MultiWorkerMirroredStrategy`` when ``TF_CONFIG`` names more than one worker, else
  ``MirroredStrategy`` over the local GPUs (or the CPU). ``cpu_replicas > 1`` splits the CPU into that many logical
  devices so the multi-replica path runs without a GPU. The global batch is split evenly over replicas and the loss
  is averaged over the *global* batch (``tf.nn.compute_average_loss``), so gradients do not depend on the split.
* The pipeline (:func:`label_reg.data.training_dataset`, with the keys the task trains on), Adam, one traced
  training step.
* Determinism: with a fixed seed on CPU the same run gives the same numbers (op determinism is on), and a run killed
  at any moment and restarted with ``resume=True`` ends with the same weights as an uninterrupted one: checkpoints
  hold the model, the optimizer, the step and the best score, and the data pipeline restarts exactly at that step.
* SIGINT/SIGTERM (checkpoint, then stop), the progress bar, TensorBoard logs (``MODEL_DIR/logs``), validation every
  ``validate_every`` steps through a :class:`label_reg.predictor.Predictor` of the model being trained, and keeping
  the model with the best validation score (the task saves it).

What a kind of network brings is a :class:`Task`: its model builder, its loss as a plain function
``loss(batch, output, config) -> {name: (B,) tensor}`` with ``"total"`` (the one minimised), its validation
``validate(predictor, cases, config) -> {name: float}`` with the :attr:`Task.select` score, and
how the best model is saved. The registration network's task is :data:`label_reg.train.REGISTRATION`.
"""
import dataclasses
import json
import math
import os
import pathlib
import signal
import sys
import tempfile
import time
from typing import Callable, Optional

import tensorflow as tf

from label_reg import data as data_lib
from label_reg import datasets
from label_reg import model_dir as model_dir_lib
from label_reg.cases import cached_cases, found_centre, load_cases  # noqa: F401 (re-exported)
from label_reg.errors import InputError
from label_reg.predictor import Predictor
from label_reg.preprocess import PreprocessConfig

_GRID = PreprocessConfig()  # the default working grid (the paper's 0.88 mm, 96x96x80) lives in PreprocessConfig


def option(default=dataclasses.MISSING, help=""):
    """A configuration dataclass field with its default (none: a required field) and the help text of its flag
    (:func:`label_reg.commands.define_config_flags` makes one flag per field)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class RunConfig:
    """What every training run depends on, whatever the network. Field names are the ``label-reg train`` flag
    names. A kind of network subclasses it with its own fields (:class:`label_reg.train.TrainConfig`)."""
    data_dir: str = option(help="Paired dataset folder (moving_images/, moving_labels/, fixed_images/, "
                                 "fixed_labels/).")
    model_dir: str = option(help="Output model directory (weights, settings, checkpoints, TensorBoard logs).")
    learning_rate: float = option(2e-4, "Adam learning rate.")
    batch_size: int = option(5, "Global batch size (split over replicas).")
    num_steps: int = option(33000, "Training iterations.")
    spacing_mm: float = option(_GRID.spacing_mm, "Isotropic working voxel size in mm.")
    shape: tuple = option(_GRID.shape, "Crop shape x,y,z in voxels around the TRUS centre.")
    base_filters: int = option(4, "Filters at the first U-Net level (doubled per level).")
    augment_scale: float = option(0.1, "Affine augmentation corner scale (0 = off).")
    augment_rotation_deg: float = option(0.0, "Also turn the TRUS side of each training sample rigidly about the "
                                              "crop centre by a random angle up to this many degrees about a random "
                                              "axis (0 = off, the paper).")
    augment_shift_mm: float = option(0.0, "Also shift the MR side of each training sample by a random translation, "
                                          "N(0, this many mm) per axis, as if the pre-alignment had missed by that "
                                          "much (0 = off, the paper; a network without the MR side ignores it).")
    num_folds: int = option(5, "Cross-validation folds.")
    fold: int = option(0, "Fold held out for validation.")
    split_seed: int = option(0, "Seed of the fold assignment.")
    cases_csv: str = option("", "CSV with columns case,split (train/val) instead of k-fold.")
    seed: int = option(0, "Seed of initialisation, data order and augmentation.")
    validate_every: int = option(500, "Validate (and keep the best model) every N steps.")
    checkpoint_every: int = option(100, "Checkpoint every N steps.")
    keep_checkpoint_every: int = option(0, "Also keep the checkpoints of the steps that are multiples of N (a "
                                           "multiple of --checkpoint_every), in MODEL_DIR/checkpoints/kept/; "
                                           "otherwise only the last two are kept (0 = no others). "
                                           "tools/checkpoint_model.py --step turns one into a model directory.")
    resume: bool = option(False, "Continue from the last checkpoint in --model_dir.")
    cache_dir: str = option("", "Folder for pre-processed cases (default: MODEL_DIR/../.label_reg_cache).")
    cpu_replicas: int = option(0, "Split the CPU into this many logical devices under MirroredStrategy.")
    log_every: int = option(10, "TensorBoard scalars every N steps.")
    progress: bool = option(True, "Show a progress bar.")

    def __post_init__(self):
        from label_reg.errors import InputError
        from label_reg.synthetic import check_angle
        try:
            check_angle("augment_rotation_deg", self.augment_rotation_deg)
        except ValueError as err:
            raise InputError("--augment_rotation_deg", str(err).removeprefix("augment_rotation_deg ")) from None
        shift = float(self.augment_shift_mm)
        if not (math.isfinite(shift) and shift >= 0.0):
            raise InputError("--augment_shift_mm", f"must be a finite number of mm, 0 or more, got {shift}")
        keep, every = int(self.keep_checkpoint_every), int(self.checkpoint_every)
        if keep < 0 or (keep and (every <= 0 or keep % every)):
            raise InputError("--keep_checkpoint_every", f"must be 0 or a positive multiple of --checkpoint_every "
                                                        f"({every}), got {keep}")

    def preprocess_config(self):
        return PreprocessConfig(spacing_mm=float(self.spacing_mm), shape=tuple(int(n) for n in self.shape))

    def to_json(self):
        """The config as plain JSON types (tuples as lists), for the model directory's description."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclasses.dataclass(frozen=True)
class Task:
    """What one kind of network brings to the :class:`Trainer`.

    build_model: ``(config) -> keras.Model`` with dict inputs (its input names pick the batch keys it is fed).
    keys: the case keys the training pipeline delivers (:func:`label_reg.data.training_dataset`).
    loss: ``(batch, output, config) -> {name: (B,) tensor}``; ``"total"`` is minimised, every entry is averaged over
    the global batch and logged as ``train/<name>`` (a task may add monitoring entries, e.g. a batch Dice).
    validate: ``(predictor, cases, config) -> {name: float}`` on the validation cases (a
    :class:`label_reg.predictor.Predictor` of the model being trained).
    select: the key of ``validate``'s result that picks the model kept (larger is better, unless it is in
    ``minimise``); ``"step"``, which the trainer adds to every result, keeps the last validated weights.
    save: ``(model_dir, model, config, step, result) -> None``: write the model directory (chief only).
    baseline: optional ``(cases, config) -> dict``, the validation scores without the network, reported as
    ``coarse`` in the summary.
    preview: optional ``(predictor, case) -> {TensorBoard tag: (H, W, 3) float32 image}`` at every validation.
    shown: training terms shown in the progress bar besides ``loss`` (= ``total``).
    validation_names: {result key: (progress-bar name, TensorBoard tag)}; other keys are not shown or logged.
    minimise: keys of ``validate``'s result where smaller is better (e.g. a registration error in mm).
    forward: optional ``(model, config) -> keras.Model`` over the same inputs and weights whose output is what
    ``loss`` receives in training (e.g. a dict with an inner layer's output too); default: the model itself.
    Validation and the saved model use the model itself.
    """

    build_model: Callable
    keys: tuple
    loss: Callable
    validate: Callable
    select: str
    save: Callable
    baseline: Optional[Callable] = None
    preview: Optional[Callable] = None
    shown: tuple = ()
    validation_names: dict = dataclasses.field(default_factory=dict)
    minimise: tuple = ()
    forward: Optional[Callable] = None

    def score(self, result):
        """The selection score of a validation result, larger is better (NaN never wins)."""
        value = float(result[self.select])
        return -value if self.select in self.minimise else value


# ------------------------------------------------------------------------------------------------ set-up
def make_strategy(cpu_replicas=0):
    """MultiWorkerMirroredStrategy from TF_CONFIG, else MirroredStrategy (GPUs, or ``cpu_replicas`` logical CPUs)."""
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


def keep_checkpoint(prefix, folder):
    """Copy the files of the checkpoint ``prefix`` (``.../ckpt-N``: ``ckpt-N.index`` and ``ckpt-N.data-*``) into
    ``folder``, where ``tf.train.CheckpointManager`` does not delete them. Each file is written under a temporary name
    and renamed, the index last, so a copy cut short (full disk) leaves no ``ckpt-N.index`` and is not listed as a
    checkpoint; the error is raised."""
    import shutil

    prefix, folder = pathlib.Path(prefix), pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = sorted(prefix.parent.glob(prefix.name + ".*"), key=lambda path: path.suffix == ".index")
    if not any(path.suffix == ".index" for path in files):
        raise FileNotFoundError(f"{prefix}.index: no checkpoint to keep")
    for path in files:
        partial = folder / (path.name + ".partial")
        try:
            shutil.copyfile(path, partial)
            os.replace(partial, folder / path.name)
        finally:
            partial.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ trainer
class Trainer:
    """Strategy, model, optimizer, checkpoints, pipeline and training step of ``task`` for ``config``
    (a :class:`RunConfig`); :meth:`run` trains, :meth:`iterate` runs bare training steps (``tools/bench.py``)."""

    def __init__(self, task, config, train_cases, val_cases):
        self.task, self.config = task, config
        self.strategy = make_strategy(config.cpu_replicas)
        tf.keras.utils.set_random_seed(int(config.seed))
        tf.config.experimental.enable_op_determinism()
        self.chief = _is_chief(self.strategy)
        self.train_cases, self.val_cases = train_cases, val_cases
        self.global_batch = int(config.batch_size)
        self.replicas = self.strategy.num_replicas_in_sync
        if self.global_batch % self.replicas:
            raise InputError("--batch_size", f"{self.global_batch} does not split evenly over {self.replicas} "
                                              "replicas; use a multiple of the replica count")
        with self.strategy.scope():
            self.model = task.build_model(config)
            self.optimizer = tf.keras.optimizers.Adam(float(config.learning_rate))
            self.optimizer.build(self.model.trainable_variables)
            self.forward = task.forward(self.model, config) if task.forward else self.model
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            # The best Task.score so far; checkpointed as "best_dsc" so older checkpoints resume.
            self.best = tf.Variable(float("-inf"), dtype=tf.float64, trainable=False, name="best_dsc")
        self.model_dir = pathlib.Path(config.model_dir)
        ckpt_dir = self.model_dir / model_dir_lib.CHECKPOINTS_DIR
        if not self.chief:  # every worker must save (collectives), only the chief's copy is kept
            ckpt_dir = pathlib.Path(tempfile.mkdtemp(prefix="label_reg_worker_ckpt_"))
        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer, step=self.step,
                                              best_dsc=self.best)
        self.manager = tf.train.CheckpointManager(self.checkpoint, str(ckpt_dir), max_to_keep=2)
        self.predictor = Predictor(self.model)
        self.train_step = self._make_train_step()
        self.writer = tf.summary.create_file_writer(str(self.model_dir / "logs")) if self.chief else None
        self._stop = False

    # -- steps -----------------------------------------------------------------------------------------------
    def _make_train_step(self):
        strategy, config, task, global_batch = self.strategy, self.config, self.task, self.global_batch

        def replica_step(batch):
            with tf.GradientTape() as tape:
                output = self.forward(self.predictor.feed(batch), training=True)
                terms = task.loss(batch, output, config)
                loss = tf.nn.compute_average_loss(terms["total"], global_batch_size=global_batch)
            grads = tape.gradient(loss, self.model.trainable_variables)
            self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
            return {name: tf.nn.compute_average_loss(value, global_batch_size=global_batch)
                    for name, value in terms.items()}

        @tf.function
        def train_step(iterator):
            per_replica = strategy.run(replica_step, args=(next(iterator),))
            self.step.assign_add(1)
            return {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in per_replica.items()}

        return train_step

    def _dataset(self, start_step):
        config = self.config

        def dataset_fn(context):
            local = self.replicas // context.num_input_pipelines
            return data_lib.training_dataset(
                self.train_cases, self.global_batch, int(config.num_steps), int(config.seed), start_step,
                float(config.augment_scale), num_replicas=self.replicas,
                replica_offset=context.input_pipeline_id * local, replicas_here=local, keys=self.task.keys,
                augment_rotation_deg=float(config.augment_rotation_deg),
                augment_shift_voxels=float(config.augment_shift_mm) / float(config.spacing_mm))

        return self.strategy.distribute_datasets_from_function(dataset_fn)

    def iterate(self, start_step=0):
        """Run training steps ``start_step .. num_steps - 1`` one per ``next()``, yielding each step's loss terms
        (averaged over the global batch) as floats. The pipeline starts at the first ``next()``."""
        iterator = iter(self._dataset(start_step))
        for _ in range(start_step, int(self.config.num_steps)):
            yield {k: float(v) for k, v in self.train_step(iterator).items()}

    def validate(self):
        """The task's validation scores of the model as it is now."""
        return self.task.validate(self.predictor, self.val_cases, self.config)

    # -- the loop --------------------------------------------------------------------------------------------
    def run(self):
        """Train to ``num_steps`` (or until SIGINT/SIGTERM, which checkpoints first). Returns a summary dict."""
        config, task = self.config, self.task
        start = self._restore()
        total = int(config.num_steps)
        history, validations, last_val = [], [], None
        coarse = task.baseline(self.val_cases, config) if (self.val_cases and task.baseline) else None
        bar = tf.keras.utils.Progbar(
            total, stateful_metrics=["loss", *task.shown, *(bar for bar, _ in task.validation_names.values())],
            interval=0.5 if sys.stderr.isatty() else 15.0, verbose=1 if config.progress else 0)
        bar.update(start)
        started = time.perf_counter()
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, self._on_signal)
        try:
            steps, step = self.iterate(start), start
            while step < total and not self._stop:
                values = next(steps)
                step += 1
                history.append(values["total"])
                shown = [("loss", values["total"])] + [(name, values[name]) for name in task.shown]
                if self.writer is not None and (step % config.log_every == 0 or step == total):
                    self._log_scalars(step, values, (step - start) / (time.perf_counter() - started))
                if step % config.validate_every == 0 or step == total:
                    result = self._validate_and_keep(step)
                    if result is not None:
                        last_val = result
                        validations.append({"step": step, **result})
                        shown += [(bar, result[key]) for key, (bar, _) in task.validation_names.items()]
                if step % config.checkpoint_every == 0 or step == total:
                    saved = self.manager.save(checkpoint_number=step)
                    keep = config.keep_checkpoint_every
                    if self.chief and keep and step % keep == 0:
                        keep_checkpoint(saved, self.model_dir / model_dir_lib.CHECKPOINTS_DIR
                                        / model_dir_lib.KEPT_CHECKPOINTS_DIR)
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
        best = float(self.best.numpy())  # the best Task.score: back to the value of task.select
        best = -best if task.select in task.minimise else best
        return {"steps": done, "seconds": elapsed, "replicas": int(self.replicas),
                "samples_per_second": done * self.global_batch / elapsed if done else float("nan"),
                "loss_history": history, "validation_history": validations, "coarse": coarse, "last_validation": last_val,
                f"best_{task.select}": best, "interrupted": self._stop,
                "train_step_traces": int(self.train_step.experimental_get_tracing_count())}

    def _restore(self):
        """Resume from the last checkpoint (``resume``), or refuse to overwrite one; returns the step to start at."""
        if self.config.resume and self.manager.latest_checkpoint:
            self.checkpoint.restore(self.manager.latest_checkpoint).assert_existing_objects_matched()
        elif not self.config.resume and self.chief and self.manager.latest_checkpoint:
            raise InputError(self.model_dir, "already holds checkpoints: pass --resume to continue, or use a new "
                                             "--model_dir")
        return int(self.step.numpy())

    def _on_signal(self, signum, frame):
        self._stop = True

    def _validate_and_keep(self, step):
        """Validate, log, and have the task save the model when it is the best so far (without validation cases,
        every validation step saves). Returns the validation result (None without validation cases)."""
        if not self.val_cases:
            if self.chief:
                self.task.save(self.model_dir, self.model, self.config, step, {})
            return None
        result = self.validate()
        self._log_validation(step, result)
        score = self.task.score({**result, "step": float(step)})
        if score > float(self.best.numpy()):
            self.best.assign(score)
            if self.chief:
                self.task.save(self.model_dir, self.model, self.config, step, result)
        return result

    def _log_scalars(self, step, values, steps_per_second):
        with self.writer.as_default(step=step):
            for name, value in values.items():
                tf.summary.scalar(f"train/{name}", value)
            tf.summary.scalar("train/learning_rate", float(self.config.learning_rate))
            tf.summary.scalar("train/steps_per_second", steps_per_second)

    def _log_validation(self, step, result):
        if self.writer is None:
            return
        with self.writer.as_default(step=step):
            for key, (_, tag) in self.task.validation_names.items():
                tf.summary.scalar(tag, result[key])
            if self.task.preview is not None:
                for tag, image in self.task.preview(self.predictor, self.val_cases[0]).items():
                    tf.summary.image(tag, image[None])


def run_training(task, config):
    """Load the data split, pre-process it (cached), and train ``task``. Returns :meth:`Trainer.run`'s summary."""
    train_pairs, val_pairs = load_split(config)
    preprocess_config = config.preprocess_config()
    train_cases = load_cases(train_pairs, preprocess_config, config.cache_dir, config.progress)
    val_cases = load_cases(val_pairs, preprocess_config, config.cache_dir, config.progress)
    return Trainer(task, config, train_cases, val_cases).run()
