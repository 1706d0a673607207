"""The inference engine: a loaded model plus device, precision and tiled batching.

``Engine.upscale`` takes any number of float RGB images of any sizes, cuts them
into equal windows, runs the windows through the model in fixed-size batches
(one compiled shape) and stitches the cores back.  Nothing about one call is
kept on the engine, so one engine can serve many callers in turn.
``upscale_bands`` does the same for one huge image, a row of tiles at a time,
so that memory follows the tile size and the image width.  Every window's
output passes the flat-area guard (``flatguard.py``).
With several devices (``engine.device: all`` or ``gpu:0,1``) each holds a copy
of the model and the batches go round-robin over them, a thread per device.
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
from batchsr.imageio import to_float
from batchsr.tiling import Tile, place, plan_tiles, window, window_side


def _configure_devices(device: str) -> list[str | None]:
    """The TensorFlow devices to run on, one model copy each ([None]: let the backend choose)."""
    import keras

    backend = keras.backend.backend()
    if backend != "tensorflow":  # a device it cannot place the model on is refused, not ignored
        if device != "auto":
            raise ConfigError(f"engine.device = {device!r} is honoured on the TensorFlow backend only (KERAS_BACKEND is "
                              f"{backend}): set it to auto, and choose the device as {backend} does (JAX_PLATFORMS=cpu, "
                              "CUDA_VISIBLE_DEVICES=N)")
        return [None]
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass  # already initialised by an earlier engine in this process
    if device == "cpu":
        return ["/CPU:0"]
    if device == "auto":
        return ["/GPU:0" if gpus else "/CPU:0"]
    if device == "all":  # every GPU; without one, every CPU device TensorFlow was given
        if not gpus:
            logger.warning("engine.device = 'all': no GPU visible; running on the CPU")
        return [d.name for d in tf.config.list_logical_devices("GPU" if gpus else "CPU")]
    indices = [0] if device == "gpu" else [int(i) for i in device.split(":")[1].split(",")]
    for index in indices:
        if index >= len(gpus):
            raise ConfigError(f"engine.device = {device!r}: only {len(gpus)} GPU(s) visible")
    return [f"/GPU:{index}" for index in indices]


class Engine:
    def __init__(self, weights: Path | None, settings: EngineSettings):
        import keras

        from batchsr.checkpoint import load_model

        self.settings = settings
        self.devices = _configure_devices(settings.device)
        if settings.precision == "mixed_float16" and "/CPU:0" in self.devices:
            logger.warning("mixed_float16 is slow on the CPU; float32 or mixed_bfloat16 suit it better")
        previous = keras.mixed_precision.global_policy().name
        keras.mixed_precision.set_global_policy(settings.precision)
        try:
            loaded = [self._load(load_model, Path(weights) if weights else DEFAULT_MODEL, device) for device in self.devices]
        finally:
            keras.mixed_precision.set_global_policy(previous)
        self.models = [model for model, _ in loaded]
        self.model, self.info = loaded[0]
        self.scale = self.info.scale
        self.multiple = self.info.multiple
        logger.info(
            "model {} (x{}) on {} in {}", self.info.model_id, self.scale,
            ", ".join(d or "default device" for d in self.devices), settings.precision,
        )

    @staticmethod
    def _load(load_model, weights: Path, device: str | None):
        if device is None:
            return load_model(weights)
        import tensorflow as tf

        with tf.device(device):
            return load_model(weights)

    @property
    def model_id(self) -> str:
        return self.info.model_id

    def call_mb(self, height: int, width: int) -> float:
        """Upper estimate of the memory a model call over the windows of a ``height x width`` image takes at its
        peak, on every device at once; the run's memory budget counts it (TensorFlow keeps most of it afterwards).

        Per window pixel, float32: fifteen activations of the widest full-resolution stage and twenty of the
        sub-pixel head for the first window of a batch, half that for each further one, plus 60 MB a call:
        fitted to the first call's peaks of the bundled x2, x3 and x4 models over tiles 16-512 and batches
        1-64 (``scripts/call_memory.py``). One large window costs the most per pixel: nine activations for
        every window were 1.35x short for the x4 model at tile 256, batch 1, and 2x over at tile 128, batch 8.
        """
        config = self.info.config
        top = config.get("top_width") or config["width"]
        head = 20 * self.scale**2
        per_pixel = 4 * (15 * top + head) if config["arch"] != "seed" else 4 * self.scale**2 * (15 * config["width"] + 20)
        window_h, window_w = plan_tiles(height, width, self.settings.tile, self.settings.overlap, self.multiple).window_shape
        windows = 1 + (self.settings.batch_size - 1) / 2
        return len(self.devices) * (60.0 + windows * window_h * window_w * per_pixel / 1e6)

    def _infer(self, batch: np.ndarray, copy: int = 0) -> np.ndarray:
        """The model's output, or with ``self_ensemble`` the mean over the 8 flips and rotations of the batch."""
        if not self.settings.self_ensemble:
            return self._predict(batch, copy)
        total = None
        for turns in range(4):
            for flip in (False, True):
                view = np.rot90(batch, turns, axes=(1, 2))
                view = view[:, :, ::-1] if flip else view
                out = self._predict(np.ascontiguousarray(view), copy)
                out = np.rot90(out[:, :, ::-1] if flip else out, -turns, axes=(1, 2))
                total = out if total is None else total + out
        return total / np.float32(8)

    def _predict(self, batch: np.ndarray, copy: int = 0) -> np.ndarray:
        model, device = self.models[copy], self.devices[copy]
        if device is None:
            return np.asarray(model.predict_on_batch(batch), dtype=np.float32)
        import tensorflow as tf

        with tf.device(device):
            return np.asarray(model.predict_on_batch(batch), dtype=np.float32)

    def upscale(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Upscales float32 ``(H, W, 3)`` images in [0, 1]; outputs are ``scale`` times larger, unclipped."""
        s = self.scale
        for image in images:
            if image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"expected (H, W, 3) images, got shape {image.shape}")
        plans = [plan_tiles(im.shape[0], im.shape[1], self.settings.tile, self.settings.overlap, self.multiple) for im in images]
        outputs = [np.zeros((p.height * s, p.width * s, 3), np.float32) for p in plans]
        # Windows of one shape share batches, across images.
        groups: dict[tuple[int, int], list[tuple[int, Tile]]] = {}
        for i, plan in enumerate(plans):
            for tile in plan.tiles:
                groups.setdefault(plan.window_shape, []).append((i, tile))
        for shape, work in groups.items():
            for i, tile, upscaled in self._through_model(work, lambda i, t: _float(window(images[i], plans[i], t)), shape):
                place(outputs[i], upscaled, tile, s)
        return outputs

    def upscale_bands(self, image: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """Yields ``(first output row, rows)`` of the upscaled ``image``, top to bottom.

        ``image`` is ``(H, W, 3)``, integer (scaled by its dtype's range) or float in
        [0, 1]; it may be a broadcast view.  Only one row of windows is converted
        to float at a time, and each yielded band is ``tile * scale`` rows of
        float32 RGB; the result equals ``upscale([image])`` row for row.
        """
        s = self.scale
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
        plan = plan_tiles(image.shape[0], image.shape[1], self.settings.tile, self.settings.overlap, self.multiple)
        rows: dict[int, list[Tile]] = {}
        for tile in plan.tiles:
            rows.setdefault(tile.core[0], []).append(tile)
        for y0, tiles in rows.items():
            band = np.zeros(((tiles[0].core[1] - y0) * s, plan.width * s, 3), np.float32)
            work = [(None, tile) for tile in tiles]
            for _, tile, upscaled in self._through_model(work, lambda _, t: _float(window(image, plan, t)), plan.window_shape):
                place(band, upscaled, tile, s, first_row=y0)
            yield y0 * s, band

    def _through_model(self, work: list[tuple[object, Tile]], window_of, shape: tuple[int, int]):
        """Yields ``(job, tile, upscaled window)`` for each ``(job, tile)`` of ``work``, in batches.

        Full-size windows always fill ``batch_size`` slots (one compiled graph);
        smaller ones round the batch up to a power of two, so a folder of
        odd-sized images compiles a few graphs, not one per call.
        """
        batch_size = self.settings.batch_size
        full = (window_side(self.settings.tile, self.settings.overlap, self.multiple),) * 2  # as plan_tiles rounds them

        def batches():
            for start in range(0, len(work), batch_size):
                chunk = work[start : start + batch_size]
                rows = batch_size if shape == full else min(batch_size, 1 << (len(chunk) - 1).bit_length())
                batch = np.zeros((rows, *shape, 3), np.float32)
                for k, (job, tile) in enumerate(chunk):
                    batch[k] = window_of(job, tile)
                yield chunk, batch

        if len(self.models) == 1:
            results = ((chunk, batch, self._infer(batch)) for chunk, batch in batches())
        else:
            results = self._spread(batches())
        for chunk, batch, result in results:
            for k, (job, tile) in enumerate(chunk):
                yield job, tile, self._guard(batch[k], result[k])

    def _spread(self, batches):
        """Batches round-robin over the model copies, one thread per device, results in order."""
        from concurrent.futures import ThreadPoolExecutor

        copies = len(self.models)
        with ThreadPoolExecutor(max_workers=copies, thread_name_prefix="batchsr-device") as pool:
            pending = []
            for n, (chunk, batch) in enumerate(batches):
                pending.append((chunk, batch, pool.submit(self._infer, batch, n % copies)))
                if len(pending) >= copies:
                    chunk, batch, future = pending.pop(0)
                    yield chunk, batch, future.result()
            for chunk, batch, future in pending:
                yield chunk, batch, future.result()

    def _guard(self, pixels: np.ndarray, upscaled: np.ndarray) -> np.ndarray:
        return guard(pixels, upscaled, self.scale, self.settings.flat_guard / 255.0)


def _float(pixels: np.ndarray) -> np.ndarray:
    return to_float(pixels) if np.issubdtype(pixels.dtype, np.integer) else pixels.astype(np.float32, copy=False)
