"""The engine: device and precision settings, batching across images of different sizes."""

from __future__ import annotations

import numpy as np
import pytest

from batchsr.config import EngineSettings
from batchsr.engine import Engine
from batchsr.errors import ConfigError
from batchsr.metrics import psnr


def test_missing_gpu_is_a_config_error(tiny_model):
    with pytest.raises(ConfigError, match="gpu:3"):
        Engine(tiny_model, EngineSettings(device="gpu:3"))


def test_batching_across_images_equals_one_at_a_time(tiny_model):
    engine = Engine(tiny_model, EngineSettings(device="cpu", tile=32, overlap=8, batch_size=3))
    rng = np.random.default_rng(0)
    images = [rng.random((h, w, 3), dtype=np.float32) for h, w in [(40, 70), (9, 13), (33, 32)]]
    together = engine.upscale(images)
    for image, out in zip(images, together):
        alone = engine.upscale([image])[0]
        assert out.shape == (image.shape[0] * 4, image.shape[1] * 4, 3)
        assert np.array_equal(out, alone)


def test_mixed_bfloat16_stays_close_to_float32(tiny_model):
    image = np.random.default_rng(1).random((24, 24, 3), dtype=np.float32)
    exact = Engine(tiny_model, EngineSettings(device="cpu")).upscale([image])[0]
    half = Engine(tiny_model, EngineSettings(device="cpu", precision="mixed_bfloat16")).upscale([image])[0]
    assert half.dtype == np.float32
    assert psnr(np.clip(half, 0, 1), np.clip(exact, 0, 1), peak=1.0) > 35
