"""The inference engine: a loaded model plus device, precision and tiled batching.

``Engine.upscale`` takes any number of float RGB images of any sizes, cuts them
into equal windows, runs the windows through the model in fixed-size batches
(one compiled shape) and stitches the cores back.  Nothing about one call is
kept on the engine, so one engine can serve many callers in turn.
``upscale_bands`` does the same for one huge image, a row of tiles at a time,
so that memory follows the tile size and the image width.  Every window's
output passes the flat-area guard (``flatguard.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from loguru import logger

from batchsr.checkpoint import DEFAULT_MODEL
from batchsr.config import EngineSettings
from batchsr.errors import ConfigError
from batchsr.flatguard import guard
from batchsr.tiling import Tile, TilePlan, extract, pad_image, place, plan_tiles


def _configure_device(device: str) -> str | None:
    """Returns the TensorFlow device name to run on (None: let TensorFlow choose)."""
    import keras

    if keras.backend.backend() != "tensorflow":
        if device not in ("auto",):
            logger.warning("device {} is only honoured on the TensorFlow backend", device)
        return None
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass  # already initialised by an earlier engine in this process
    if device == "cpu":
        return "/CPU:0"
    if device == "auto":
        return "/GPU:0" if gpus else "/CPU:0"
    index = 0 if device == "gpu" else int(device.split(":")[1])
    if index >= len(gpus):
        raise ConfigError(f"engine.device = {device!r}: only {len(gpus)} GPU(s) visible")
    return f"/GPU:{index}"


class Engine:
    def __init__(self, weights: Path | None, settings: EngineSettings):
        import keras

        from batchsr.checkpoint import load_model

        self.settings = settings
        self.device = _configure_device(settings.device)
        if settings.precision == "mixed_float16" and self.device == "/CPU:0":
            logger.warning("mixed_float16 is slow on the CPU; float32 or mixed_bfloat16 suit it better")
        previous = keras.mixed_precision.global_policy().name
        keras.mixed_precision.set_global_policy(settings.precision)
        try:
            self.model, self.info = self._load(load_model, Path(weights) if weights else DEFAULT_MODEL)
        finally:
            keras.mixed_precision.set_global_policy(previous)
        self.scale = self.info.scale
        self.multiple = 2 ** int(self.info.config.get("depth", 0))
        logger.info(
            "model {} (x{}) on {} in {}", self.info.model_id, self.scale, self.device or "default device", settings.precision
        )

    def _load(self, load_model, weights: Path):
        if self.device is None:
            return load_model(weights)
        import tensorflow as tf

        with tf.device(self.device):
            return load_model(weights)

    @property
    def model_id(self) -> str:
        return self.info.model_id

    def tiles_for(self, height: int, width: int) -> int:
        return len(plan_tiles(height, width, self.settings.tile, self.settings.overlap, self.multiple).tiles)

    def _predict(self, batch: np.ndarray) -> np.ndarray:
        if self.device is None:
            return np.asarray(self.model.predict_on_batch(batch), dtype=np.float32)
        import tensorflow as tf

        with tf.device(self.device):
            return np.asarray(self.model.predict_on_batch(batch), dtype=np.float32)

    def upscale(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Upscales float32 ``(H, W, 3)`` images in [0, 1]; outputs are ``scale`` times larger, unclipped."""
        s, batch_size = self.scale, self.settings.batch_size
        jobs = []  # (image index, plan, padded image)
        for image in images:
            if image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"expected (H, W, 3) images, got shape {image.shape}")
            plan = plan_tiles(image.shape[0], image.shape[1], self.settings.tile, self.settings.overlap, self.multiple)
            jobs.append((plan, pad_image(image.astype(np.float32, copy=False), plan)))
        outputs = [np.zeros((p.height * s, p.width * s, 3), np.float32) for p, _ in jobs]
        # Windows of one shape share batches; full-size windows (every image larger than
        # a window) always fill ``batch_size`` slots, so they compile one graph.
        groups: dict[tuple[int, int], list[tuple[int, Tile]]] = {}
        for i, (plan, _) in enumerate(jobs):
            for tile in plan.tiles:
                groups.setdefault(plan.window_shape, []).append((i, tile))
        full = (self.settings.tile + 2 * self.settings.overlap,) * 2
        for shape, work in groups.items():
            for start in range(0, len(work), batch_size):
                chunk = work[start : start + batch_size]
                # Batch sizes are rounded up to a power of two (full windows: to batch_size)
                # so that a folder of odd-sized images compiles a few graphs, not one per call.
                rows = batch_size if shape == full else min(batch_size, 1 << (len(chunk) - 1).bit_length())
                batch = np.zeros((rows, *shape, 3), np.float32)
                for k, (i, tile) in enumerate(chunk):
                    batch[k] = extract(jobs[i][1], jobs[i][0], tile)
                result = self._predict(batch)
                for k, (i, tile) in enumerate(chunk):
                    place(outputs[i], self._guard(batch[k], result[k]), tile, s)
        return outputs

    def _guard(self, window: np.ndarray, upscaled: np.ndarray) -> np.ndarray:
        return guard(window, upscaled, self.scale, self.settings.flat_guard / 255.0)

    def upscale_bands(self, image: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """Yields ``(first output row, rows)`` of the upscaled ``image``, top to bottom.

        ``image`` is ``(H, W, 3)``, integer (scaled by its dtype's range) or float in
        [0, 1]; it may be a broadcast view.  Only one row of windows is converted
        to float at a time, and each yielded band is ``tile * scale`` rows of
        float32 RGB; the result equals ``upscale([image])`` row for row.
        """
        s, batch_size = self.scale, self.settings.batch_size
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
        plan = plan_tiles(image.shape[0], image.shape[1], self.settings.tile, self.settings.overlap, self.multiple)
        rows: dict[int, list[Tile]] = {}
        for tile in plan.tiles:
            rows.setdefault(tile.core[0], []).append(tile)
        for y0, tiles in rows.items():
            y1 = tiles[0].core[1]
            band = np.zeros(((y1 - y0) * s, plan.width * s, 3), np.float32)
            for start in range(0, len(tiles), batch_size):
                chunk = tiles[start : start + batch_size]
                batch = np.zeros((batch_size, *plan.window_shape, 3), np.float32)
                for k, tile in enumerate(chunk):
                    batch[k] = _window(image, plan, tile)
                result = self._predict(batch)
                for k, tile in enumerate(chunk):
                    _, _, x0, x1 = tile.core
                    cy, cx = (y0 - tile.y) * s, (x0 - tile.x) * s
                    out = self._guard(batch[k], result[k])
                    band[:, x0 * s : x1 * s] = out[cy : cy + (y1 - y0) * s, cx : cx + (x1 - x0) * s]
            yield y0 * s, band


def _window(image: np.ndarray, plan: TilePlan, tile: Tile) -> np.ndarray:
    """One float window; past the bottom and right edges the last row and column repeat (as ``pad_image``)."""
    rows = np.minimum(np.arange(tile.y, tile.y + plan.window_height), image.shape[0] - 1)
    cols = np.minimum(np.arange(tile.x, tile.x + plan.window_width), image.shape[1] - 1)
    window = image[rows[:, None], cols[None, :]]
    if np.issubdtype(window.dtype, np.integer):
        return window.astype(np.float32) / np.float32(np.iinfo(window.dtype).max)
    return window.astype(np.float32, copy=False)
