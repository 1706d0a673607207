"""Shared fixtures: real benchmark data from ../shared/data and tiny random models."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BATCHSR_DATA", REPO.parent / "shared" / "data"))


def data_dir(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.is_dir():
        pytest.fail(f"benchmark data missing: {path} (expected ../shared/data beside the repository)")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A small random x4 U-Net saved as a self-describing checkpoint."""
    import keras

    from batchsr.checkpoint import save_model
    from batchsr.model import ModelConfig, build_model

    keras.utils.set_random_seed(1)
    config = ModelConfig(width=8, depth=2, blocks=1)
    path = tmp_path_factory.mktemp("model") / "tiny_x4.weights.h5"
    save_model(build_model(config), config, path, training={"note": "random weights for tests"})
    return path


def write_png(path: Path, rgb: np.ndarray) -> Path:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rgb if rgb.ndim == 2 else cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    assert cv2.imwrite(str(path), pixels)
    return path
