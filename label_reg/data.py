"""The ``tf.data`` input pipeline: pre-processed cases in memory -> shuffled, augmented, batched training steps.

A training step ``s`` is fully determined by ``(seed, s)``: which cases it holds (per-epoch permutations drawn from
``seed``) and its augmentation (stateless draws seeded by ``(seed, s, replica)``). So a run resumed at step ``s``
sees exactly the batches an uninterrupted run would, and the pipeline can start at any step without replaying.

Every element is a dict of float32 tensors, each (b, X, Y, Z, 1), with the ``keys`` asked for (default
:data:`TRAINING_KEYS`, what registration trains on): ``moving_image`` (MR), ``fixed_image`` (TRUS),
``moving_label`` and ``fixed_label`` (gland masks, label channel 0 only: landmarks never drive training),
``moving_sdm`` and ``fixed_sdm`` (gland signed distance maps in mm). A network trained on one side only asks for
its keys (a TRUS segmenter: ``("fixed_image", "fixed_label")``). Landmark-supervised training adds
:data:`LANDMARK_KEYS`, ``moving_landmarks`` and ``fixed_landmarks``, each (b, X, Y, Z, L): label channels 1.. of each
side, channel k of one paired with channel k of the other, zero channels where a pair has fewer than L landmark
pairs (:func:`landmark_count`). MR and TRUS are augmented independently, each side that is present with one affine
draw shared by its image, masks, landmarks and SDM (:func:`augment_batch`).
"""
import numpy as np
import tensorflow as tf

from label_reg import layers

GLAND = 0
TRAINING_KEYS = ("moving_image", "fixed_image", "moving_label", "fixed_label", "moving_sdm", "fixed_sdm")
LANDMARK_KEYS = ("moving_landmarks", "fixed_landmarks")
_SIDES = {"moving": ("moving_image", "moving_label", "moving_landmarks", "moving_sdm"),
          "fixed": ("fixed_image", "fixed_label", "fixed_landmarks", "fixed_sdm")}


def landmark_count(case):
    """Landmark pairs of a pre-processed case: label channels beyond the gland present on both sides, paired by
    index (0 when the TRUS labels are missing)."""
    if case.get("fixed_label") is None or case.get("moving_label") is None:
        return 0
    return max(0, min(np.shape(case["moving_label"])[-1], np.shape(case["fixed_label"])[-1]) - 1)


def training_arrays(case, keys=TRAINING_KEYS, num_landmarks=0):
    """The training volumes ``keys`` of one pre-processed case (a dict from :mod:`label_reg.preprocess`), each
    (X, Y, Z, 1), except the :data:`LANDMARK_KEYS`, (X, Y, Z, num_landmarks): the case's first ``num_landmarks``
    landmark pairs, zero channels beyond its own :func:`landmark_count`."""
    unknown = sorted(set(keys) - set(TRAINING_KEYS) - set(LANDMARK_KEYS))
    if unknown:
        raise ValueError(f"unknown training keys {unknown}; choose from {TRAINING_KEYS + LANDMARK_KEYS}")
    out = {}
    for key in keys:
        if key in LANDMARK_KEYS:
            labels = np.asarray(case[key.replace("_landmarks", "_label")], np.float32)
            value = np.zeros(labels.shape[:3] + (int(num_landmarks),), np.float32)
            count = min(landmark_count(case), int(num_landmarks))
            value[..., :count] = labels[..., 1:1 + count]
            out[key] = value
            continue
        value = np.asarray(case[key], np.float32)
        if key.endswith("_label"):
            value = value[..., GLAND]
        out[key] = value[..., None]
    return out


def batch_schedule(num_cases, batch_size, num_steps, seed):
    """Case indices (num_steps, batch_size): consecutive epochs, each a fresh permutation drawn from ``seed``."""
    if num_cases < 1:
        raise ValueError("no training cases")
    needed = num_steps * batch_size
    epochs = -(-needed // num_cases)
    order = np.concatenate([np.random.default_rng([seed, epoch]).permutation(num_cases) for epoch in range(epochs)])
    return order[:needed].reshape(num_steps, batch_size)


def augment_batch(batch, seed, scale, rotation_deg=0.0, shift_voxels=0.0):
    """Random affine augmentation of a batch dict, MR and TRUS drawn independently (stateless, seed shape [2]).

    The image, gland mask, landmarks and SDM of one side share a draw, so they stay aligned; a side none of whose
    keys is in the batch is skipped (the other side's draw does not change). Masks stay in [0, 1] (trilinear).
    ``scale``: NiftyNet's corner scale (:func:`label_reg.layers.random_affine`, 0 = none). ``rotation_deg``: the TRUS
    side is also turned rigidly about the crop centre by up to this many degrees about a random axis
    (:func:`label_reg.layers.random_rotation`, drawn from its own stream, so 0 leaves every other draw unchanged).
    ``shift_voxels``: the MR side is also translated by N(0, shift_voxels) voxels per axis
    (:func:`label_reg.layers.random_shift`, its own stream too), as if the pre-alignment had missed by that much.
    """
    if scale <= 0 and rotation_deg <= 0 and shift_voxels <= 0:
        return batch
    out = dict(batch)
    first = next(iter(batch.values()))
    size = tf.shape(first)[0]
    for offset, (name, side) in enumerate(_SIDES.items()):
        keys = [k for k in side if k in batch]
        if not keys:
            continue
        side_seed = tf.random.experimental.stateless_fold_in(seed, offset)
        transforms = layers.random_affine(size, max(scale, 0.0), side_seed)
        if name == "fixed" and rotation_deg > 0:
            rotation = layers.random_rotation(size, rotation_deg,
                                              tf.random.experimental.stateless_fold_in(side_seed, 1),
                                              tf.shape(first)[1:4])
            transforms = layers.compose_affines(rotation, transforms)
        if name == "moving" and shift_voxels > 0:
            shift = layers.random_shift(size, shift_voxels, tf.random.experimental.stateless_fold_in(side_seed, 2),
                                        tf.shape(first)[1:4])
            transforms = layers.compose_affines(shift, transforms)
        stacked = tf.concat([batch[k] for k in keys], axis=-1)
        warped = layers.apply_affine(stacked, transforms, boundary="replicate")
        start = 0
        for key in keys:
            channels = batch[key].shape[-1]
            out[key] = warped[..., start:start + channels]
            start += channels
    return out


def _stack(cases, keys=TRAINING_KEYS, num_landmarks=None):
    if num_landmarks is None:
        wanted = set(keys) & set(LANDMARK_KEYS)
        num_landmarks = max((landmark_count(c) for c in cases), default=0) if wanted else 0
    arrays = [training_arrays(c, keys, num_landmarks) for c in cases]
    shapes = {a[k].shape[:3] for a in arrays for k in keys}
    if len(shapes) != 1:
        raise ValueError(f"cases have different pre-processed shapes {sorted(shapes)}; use one pre-processing config")
    return {k: np.stack([a[k] for a in arrays]) for k in keys}


def training_dataset(cases, global_batch_size, num_steps, seed, start_step=0, augment_scale=0.1,
                     num_replicas=1, replica_offset=0, replicas_here=None, keys=TRAINING_KEYS, num_landmarks=None,
                     augment_rotation_deg=0.0, augment_shift_voxels=0.0):
    """Per-replica training batches for steps ``start_step .. num_steps - 1``.

    Yields, for every step, one element per local replica (``replicas_here`` of them, global replica ids from
    ``replica_offset``), each with ``global_batch_size // num_replicas`` samples, in the order
    ``tf.distribute`` hands elements to local replicas. With one replica it is simply one batch per step.
    ``keys``: the volumes each element holds (a subset of :data:`TRAINING_KEYS` that every case provides, plus
    :data:`LANDMARK_KEYS` if asked, with ``num_landmarks`` channels: default the most any case has).
    ``augment_scale`` / ``augment_rotation_deg`` / ``augment_shift_voxels``: see :func:`augment_batch`
    (``scale``, ``rotation_deg``, ``shift_voxels``).
    """
    keys = tuple(keys)
    if global_batch_size % num_replicas:
        raise ValueError(f"batch size {global_batch_size} does not split evenly over {num_replicas} replicas")
    replicas_here = num_replicas if replicas_here is None else replicas_here
    per_replica = global_batch_size // num_replicas
    arrays = _stack(cases, keys, num_landmarks)
    schedule = batch_schedule(len(cases), global_batch_size, num_steps, seed)

    def take(step, replica):
        rows = schedule[step, replica * per_replica:(replica + 1) * per_replica]
        return tuple(arrays[k][rows] for k in keys)

    def load(index):
        step = start_step + index // replicas_here
        replica = replica_offset + index % replicas_here
        values = tf.numpy_function(take, [step, replica], [tf.float32] * len(keys), stateful=False)
        batch = {k: tf.ensure_shape(v, (per_replica,) + arrays[k].shape[1:]) for k, v in zip(keys, values)}
        seed_pair = tf.stack([tf.cast(seed, tf.int64), step * num_replicas + replica])
        return augment_batch(batch, seed_pair, augment_scale, augment_rotation_deg, augment_shift_voxels)

    count = (num_steps - start_step) * replicas_here
    dataset = tf.data.Dataset.range(count).map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    options.deterministic = True
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


def validation_dataset(cases, batch_size=1, keys=TRAINING_KEYS, num_landmarks=None):
    """Un-augmented batches of ``keys`` over ``cases`` in order, with a ``case_index`` key to find labels and
    names."""
    arrays = _stack(cases, tuple(keys), num_landmarks)
    arrays["case_index"] = np.arange(len(cases), dtype=np.int32)
    return tf.data.Dataset.from_tensor_slices(arrays).batch(batch_size).prefetch(tf.data.AUTOTUNE)
