"""Shared test fixtures. Tests run on CPU with small volumes; the demo data is reached through a path only."""
import os
import pathlib

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_data_dir():
    """The shared MR-TRUS demo data: $LABEL_REG_DEMO_DATA, else ../shared/data/mrus-prostate-demo beside the repo."""
    path = pathlib.Path(os.environ.get("LABEL_REG_DEMO_DATA", REPO.parent / "shared" / "data" / "mrus-prostate-demo"))
    if not (path / "moving_images").is_dir():
        pytest.skip(f"demo data not found at {path} (set LABEL_REG_DEMO_DATA)")
    return path


# A small synthetic dataset and one short training run, shared by every test that needs a trained model.
TINY_SHAPE = (32, 32, 32)
TINY_SPACING_MM = 3.0


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory):
    """20 phantom pairs with known deformations (label_reg.synthetic), written once per test session."""
    from label_reg.synthetic import write_phantoms

    path = tmp_path_factory.mktemp("phantoms")
    write_phantoms(path, num_pairs=20, seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_train_config(phantom_dir, tmp_path_factory):
    """A MIX+ training configuration at 32^3 / 3 mm that learns something in ~200 steps on the phantoms."""
    from label_reg.train import TrainConfig

    root = tmp_path_factory.mktemp("tiny_model")
    return TrainConfig(data_dir=str(phantom_dir), model_dir=str(root / "model"), alpha=0.05, beta=0.45,
                       moving_label_input=True, learning_rate=1e-3, batch_size=4, num_steps=200,
                       spacing_mm=TINY_SPACING_MM, shape=TINY_SHAPE, num_folds=5, fold=0, seed=0,
                       validate_every=50, checkpoint_every=50, keep_checkpoint_every=100,
                       cache_dir=str(root / "cache"), progress=False)


@pytest.fixture(scope="session")
def trained_model(tiny_train_config):
    """(model_dir, training summary) of one short MIX+ run on the phantoms; fold 0 holds out 4 pairs."""
    from label_reg.train import train

    summary = train(tiny_train_config)
    return pathlib.Path(tiny_train_config.model_dir), summary


@pytest.fixture(scope="session")
def trained_segmenter(phantom_dir, tmp_path_factory):
    """(model_dir, summary) of one short TRUS gland segmenter run on the phantoms (32^3 at 3 mm, fold 0)."""
    from label_reg.train_segmenter import SegmenterConfig, train_segmenter

    root = tmp_path_factory.mktemp("tiny_segmenter")
    config = SegmenterConfig(data_dir=str(phantom_dir), model_dir=str(root / "model"), spacing_mm=TINY_SPACING_MM,
                             shape=TINY_SHAPE, base_filters=8, batch_size=4, num_steps=60, validate_every=30,
                             checkpoint_every=60, num_folds=5, fold=0, seed=0, cache_dir=str(root / "cache"),
                             progress=False)
    summary = train_segmenter(config)
    return pathlib.Path(config.model_dir), summary


@pytest.fixture(scope="session")
def gland_model(trained_model, trained_segmenter, tmp_path_factory):
    """A registration model directory with ``prealign: trus_gland`` that carries the tiny segmenter: the tiny MIX+
    weights (trained on the TRUS-centre pre-alignment; the tests using it check the plumbing of the gland chain,
    not its accuracy) with the segmenter attached, as ``label-reg train --prealign=trus_gland`` writes it."""
    import json
    import shutil

    from label_reg import model_dir as md

    source = trained_model[0]
    target = tmp_path_factory.mktemp("gland_model") / "model"
    target.mkdir()
    shutil.copyfile(source / md.WEIGHTS_FILE, target / md.WEIGHTS_FILE)
    info = json.loads((source / md.INFO_FILE).read_text())
    info["preprocess"]["prealign"] = "trus_gland"
    info["training"].update(prealign="trus_gland", segmenter_dir=str(trained_segmenter[0]))
    info["segmenter"] = md.copy_segmenter(trained_segmenter[0], target)
    (target / md.INFO_FILE).write_text(json.dumps(info, indent=2))
    return target


# Folders the operating system refuses to write into (SPEC section 7: outputs are checked before the model loads).
def _mount_tmpfs(path, options):
    import subprocess
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    return done.returncode == 0


def _umount(path):
    import subprocess
    subprocess.run(["umount", str(path)], capture_output=True)


@pytest.fixture
def readonly_dir(tmp_path):
    """An existing folder nobody can write into: a read-only tmpfs mount when running as root (root ignores file
    permissions), else a folder without write permission. Skips when neither is possible."""
    path = tmp_path / "readonly"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    if not _mount_tmpfs(path, "ro,size=64k"):
        pytest.skip("running as root and cannot mount a read-only tmpfs")
    try:
        yield path
    finally:
        _umount(path)


@pytest.fixture
def small_disk(tmp_path):
    """An empty folder on a 256 kB file system (a tmpfs; needs root). Skips when it cannot be mounted."""
    path = tmp_path / "small_disk"
    path.mkdir()
    if os.geteuid() != 0 or not _mount_tmpfs(path, "size=256k"):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        yield path
    finally:
        _umount(path)
