"""Shared fixtures: real benchmark data from ../shared/data, tiny random models, a bicubic engine stand-in."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from batchsr.resize import imresize

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BATCHSR_DATA", REPO.parent / "shared" / "data"))


def data_dir(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.is_dir():
        pytest.fail(f"benchmark data missing: {path} (expected ../shared/data beside the repository)")
    return path


def model_fails_on_a_png(folder: Path, monkeypatch) -> list[int]:
    """``a.png`` and ``b.png`` of one size in ``folder``; ``Engine.upscale`` raises on any call holding a.png
    (marked by a green corner). Returns the number of images of each call made."""
    from batchsr.engine import Engine

    rng = np.random.default_rng(6)
    marked = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    marked[0, 0] = (0, 255, 0)
    write_png(folder / "a.png", marked)  # one size: both share a model call
    write_png(folder / "b.png", rng.integers(1, 255, (20, 24, 3), dtype=np.uint8))
    real, calls = Engine.upscale, []

    def upscale(self, images):
        calls.append(len(images))
        if any(list(image[0, 0]) == [0.0, 1.0, 0.0] for image in images):
            raise ValueError("simulated failure on a marked image")
        return real(self, images)

    monkeypatch.setattr(Engine, "upscale", upscale)
    return calls


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


class Bicubic:
    """An engine stand-in: MATLAB bicubic x4, so pixel checks do not depend on a model (exact, linear, flat colours kept)."""

    scale = 4
    info = SimpleNamespace(model_id="bicubic-x4", scale=4, config={"depth": 0}, multiple=1)

    def upscale(self, images):
        return [imresize(np.asarray(image, np.float32), scale=4) for image in images]

    def call_mb(self, height: int, width: int) -> float:
        return 0.0  # whole images through imresize: nothing beyond what pipeline.whole_mb counts

    def upscale_bands(self, image):
        image = image.astype(np.float32) / np.float32(np.iinfo(image.dtype).max) if image.dtype.kind == "u" else image
        whole = imresize(np.ascontiguousarray(image, np.float32), scale=4)
        for y in range(0, whole.shape[0], 64):
            yield y, whole[y : y + 64]


@pytest.fixture
def deep_tmp_path(tmp_path):
    """``tmp_path`` for trees too deep for shutil.rmtree (it recurses, and pytest's clean-up with it)."""
    yield tmp_path
    subprocess.run(["rm", "-rf", "--", str(tmp_path)], check=True)


def deep_file(root: Path, depth: int, name: str, data: bytes) -> str:
    """``root/d/d/.../name``, ``depth`` folders down (made through folder descriptors: os.makedirs and
    Path.mkdir recurse, and fail at such depths); returns the relative path."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        out = os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, data)
        os.close(out)
    finally:
        os.close(fd)
    return "/".join(["d"] * depth + [name])
