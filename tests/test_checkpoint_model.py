"""tools/checkpoint_model.py: a model directory with a checkpoint's weights instead of the selected ones."""
import json

import numpy as np
import pytest

from tool_scripts import load_tool

tool = load_tool("checkpoint_model.py", "checkpoint_model_tool")


def checkpoint_model_arrays(path):
    """Shape and sum of every model variable stored in a training checkpoint, sorted: read with TensorFlow's
    checkpoint reader, independently of how the tool restores it. A checkpoint stores each variable once, under its
    shortest path: the trainable ones under the optimizer (``optimizer/_trainable_variables/N``), the batch-norm
    statistics under ``model/``; the optimizer's own state (``optimizer/_variables``, moments) is left out."""
    import tensorflow as tf
    reader = tf.train.load_checkpoint(str(path))
    keys = [k for k in reader.get_variable_to_shape_map() if k.startswith(("model/", "optimizer/_trainable_variables/"))
            and k.endswith("/.ATTRIBUTES/VARIABLE_VALUE")]
    return sorted((tuple(reader.get_tensor(k).shape), round(float(reader.get_tensor(k).sum()), 4)) for k in keys)


def model_arrays(model):
    return sorted((tuple(w.shape), round(float(np.sum(w)), 4)) for w in model.get_weights())


def checkpoint_step(path):
    import tensorflow as tf
    return int(tf.train.load_checkpoint(str(path)).get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE"))


def test_training_keeps_every_kth_checkpoint_besides_the_last_two(trained_model):
    # The fixture checkpoints every 50 of 200 steps and keeps every 100th (--keep_checkpoint_every=100).
    folder = trained_model[0] / "checkpoints"
    assert sorted(p.name for p in folder.glob("*.index")) == ["ckpt-150.index", "ckpt-200.index"]
    assert sorted(p.name for p in (folder / "kept").iterdir()) == [
        "ckpt-100.data-00000-of-00001", "ckpt-100.index", "ckpt-200.data-00000-of-00001", "ckpt-200.index"]
    assert [checkpoint_step(folder / "kept" / f"ckpt-{n}") for n in (100, 200)] == [100, 200]
    for name in ("ckpt-200.index", "ckpt-200.data-00000-of-00001"):
        assert (folder / "kept" / name).read_bytes() == (folder / name).read_bytes()
    assert sorted(tool.checkpoint_prefixes(trained_model[0])) == [100, 150, 200]


def test_keeping_a_checkpoint_copies_it_whole_or_not_at_all(trained_model, tmp_path):
    from label_reg.trainer import keep_checkpoint
    keep_checkpoint(trained_model[0] / "checkpoints" / "ckpt-150", tmp_path / "kept")
    assert checkpoint_step(tmp_path / "kept" / "ckpt-150") == 150
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["ckpt-150.data-00000-of-00001",
                                                                     "ckpt-150.index"]
    with pytest.raises(FileNotFoundError, match="ckpt-50.index: no checkpoint to keep"):
        keep_checkpoint(trained_model[0] / "checkpoints" / "ckpt-50", tmp_path / "kept")


def test_a_full_disk_leaves_no_partial_kept_checkpoint(trained_model, small_disk):
    from label_reg.trainer import keep_checkpoint
    source = trained_model[0] / "checkpoints" / "ckpt-150"
    with pytest.raises(OSError):
        for copy in range(1000):  # until the 256 kB disk is full
            keep_checkpoint(source, small_disk / f"copy{copy}")
    assert not (small_disk / f"copy{copy}" / "ckpt-150.index").exists()  # the copy that failed is not listed
    assert not list(small_disk.glob("*/*.partial"))
    for folder in small_disk.iterdir():  # the copies before it are whole
        if folder.name != f"copy{copy}":
            assert checkpoint_step(folder / "ckpt-150") == 150


def test_the_newest_checkpoint_becomes_a_loadable_model_directory(trained_model, tmp_path):
    from label_reg import model_dir as md
    source = trained_model[0]
    assert sorted(tool.checkpoint_prefixes(source)) == [100, 150, 200]
    out = tmp_path / "last"
    assert tool.main(["--model_dir", str(source), "--output_dir", str(out)]) == 0

    model, info, _ = md.load(out)
    assert model_arrays(model) == checkpoint_model_arrays(source / "checkpoints" / "ckpt-200")
    assert info["best_step"] == 200 and "validation" not in info
    assert info["checkpoint"] == {"source": str(source.resolve()), "step": 200}
    original = json.loads((source / md.INFO_FILE).read_text())
    assert info["build"] == original["build"] and info["preprocess"] == original["preprocess"]

    tool.write_checkpoint_model(source, out, step=100, overwrite=True)  # a kept one
    model, info, _ = md.load(out)
    assert info["best_step"] == 100
    assert model_arrays(model) == checkpoint_model_arrays(source / "checkpoints" / "kept" / "ckpt-100")
    assert model_arrays(model) != checkpoint_model_arrays(source / "checkpoints" / "ckpt-200")


def test_a_gland_model_keeps_its_segmenter(gland_model, trained_model, tmp_path):
    import shutil

    from label_reg import model_dir as md
    source = tmp_path / "gland_model"  # the shared fixture stays as it is
    shutil.copytree(gland_model, source)
    shutil.copytree(trained_model[0] / "checkpoints", source / "checkpoints")
    out = tmp_path / "gland_last"
    tool.write_checkpoint_model(source, out)
    _, info, _ = md.load(out)
    assert md.segmenter_path(out, info) == out / md.SEGMENTER_DIR
    assert (out / md.SEGMENTER_DIR / md.WEIGHTS_FILE).read_bytes() == \
        (gland_model / md.SEGMENTER_DIR / md.WEIGHTS_FILE).read_bytes()


def test_bad_requests_are_one_line_errors_with_no_output(trained_model, tmp_path, capsys):
    source = trained_model[0]
    out = tmp_path / "out"
    assert tool.main(["--model_dir", str(source), "--output_dir", str(out), "--step", "50"]) == 2
    assert capsys.readouterr().err.strip() == (f"checkpoint_model: {source / 'checkpoints'}: has no checkpoint of "
                                               "step 50 (it has 100, 150, 200)")
    assert not out.exists()

    assert tool.main(["--model_dir", str(tmp_path), "--output_dir", str(out)]) == 2
    assert "label_reg.json" in capsys.readouterr().err and not out.exists()

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert tool.main(["--model_dir", str(source), "--output_dir", str(out)]) == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
