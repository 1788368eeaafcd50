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
