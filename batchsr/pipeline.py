"""From a decoded image to its output: model inputs, finishing, naming, huge images.

``run`` and ``watch`` share these steps, so an image comes out the same from
either:

- colour goes through the model; the alpha plane goes through the model too
  (``image.alpha: model``, the better of the two on sharp and soft masks) or
  through MATLAB-style bicubic (``bicubic``);
- gray and R = G = B images come back untinted (the channel mean);
- ``run.outscale`` resizes the model's output to any factor (bicubic,
  antialiased when shrinking);
- metadata follow the new size (``metadata.scaled``).

Images above ``run.stream_megapixels`` written as PNG or TIFF take
``write_streamed``: the engine yields a row of tiles at a time and each is
finished and encoded at once, so the output never exists in memory whole.
``plan_route`` holds every image to ``run.memory_mb``: what would not fit in
memory whole is streamed when its output allows, else refused with the reason;
``MemoryBudget`` holds the images in flight together to it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from loguru import logger

from batchsr.errors import ImageError
from batchsr.imageio import (
    EXTENSIONS, MAX_SIDE, Image, atomic_file, bigtiff_meta, from_float, tiff_options, to_float, too_large, written_format,
)
from batchsr.metadata import append_tiff_exif, png_metadata_chunks, scaled
from batchsr.resize import imresize, imresize_rows

SUFFIX_FORMATS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".webp": "webp", ".bmp": "bmp", ".tif": "tiff", ".tiff": "tiff",
                  ".gif": "gif"}  # the format an image's name says it holds
IMAGE_SUFFIXES = set(SUFFIX_FORMATS)
STREAMED_FORMATS = ("png", "tiff")
_TIFF_TILE = 256
_CHUNK_ROWS = 64


def failure_reason(error: Exception) -> str:
    """The line a failed image gets: an unforeseen error (a bug) is named by its type, so it can be reported."""
    if isinstance(error, ImageError):
        return error.reason
    if isinstance(error, (OSError, ValueError)):
        return str(error)
    return f"{type(error).__name__}: {error}"


def output_size(width: int, height: int, factor: float) -> tuple[int, int]:
    """Output (width, height) for ``factor``, rounded half up, at least one pixel."""
    return max(1, math.floor(width * factor + 0.5)), max(1, math.floor(height * factor + 0.5))


def factor_text(factor: float) -> str:
    """``4`` for 4.0, ``2.5`` for 2.5: the factor as it reads in a file name."""
    return str(int(factor)) if float(factor).is_integer() else f"{factor:g}"


def target_format(fmt: str, output_format: str) -> str:
    """The format an input read as ``fmt`` is written in under ``run.output_format``."""
    return written_format(fmt if output_format == "same" else output_format)


def output_name(rel: Path, fmt: str, output_format: str, template: str = "{stem}{ext}", factor: float | None = None) -> Path:
    """The output's path relative to OUTPUT: same folders, ``template`` filled in.

    ``{stem}`` is the input's name without an image extension, ``{ext}`` the
    input's own extension when it names the written format (``.jpeg`` stays),
    else the format's; ``{scale}`` the output factor, ``{format}`` the format.
    """
    target = target_format(fmt, output_format)
    suffix = rel.suffix.lower()
    ext = rel.suffix if SUFFIX_FORMATS.get(suffix) == target else EXTENSIONS[target]
    stem = rel.stem if suffix in IMAGE_SUFFIXES or not rel.suffix else rel.name
    scale = factor_text(factor) if factor is not None else ""
    return rel.with_name(template.format(stem=stem, ext=ext, scale=scale, format=target))


def upscale_images(engine, images: list[Image], alpha: str = "model") -> list[tuple[np.ndarray, np.ndarray | None]]:
    """``(colour, alpha or None)`` float outputs for each image, from one ``engine.upscale`` call.

    With ``alpha == "model"`` the alpha planes ride along as gray images; with
    ``bicubic`` the second item is None and ``finish_image`` resizes the plane.
    """
    inputs = [to_float(image.rgb) for image in images]
    planes = [i for i, image in enumerate(images) if image.alpha is not None and alpha == "model"]
    inputs += [np.repeat(to_float(images[i].alpha)[:, :, None], 3, axis=2) for i in planes]
    outputs = engine.upscale(inputs)
    alphas = {i: np.clip(outputs[len(images) + k].mean(axis=2), 0.0, 1.0) for k, i in enumerate(planes)}
    return [(outputs[i], alphas.get(i)) for i in range(len(images))]


def upscale_each(engine, images: list[Image], alpha: str = "model") -> list:
    """``upscale_images``, with each image's exception in its place: a failing call is tried again one
    image at a time, so that the model failing on one image (or a batch too large for the GPU) fails no other."""
    if not images:
        return []
    try:
        return upscale_images(engine, images, alpha)
    except Exception as exc:  # noqa: BLE001 (recorded as the image's failure by the caller)
        if len(images) == 1:
            return [exc]
        logger.warning("a model call of {} images failed ({}); trying them one by one", len(images), failure_reason(exc))
    results = []
    for image in images:
        try:
            results.append(upscale_images(engine, [image], alpha)[0])
        except Exception as exc:  # noqa: BLE001 (as above)
            results.append(exc)
    return results


def finish_image(image: Image, upscaled: np.ndarray, scale: int, *, alpha: np.ndarray | None = None,
                 outscale: float | None = None) -> Image:
    """Model output (float RGB, ``scale`` x the input) to an image of the input's kind.

    Bit depth, gray storage and R = G = B are kept; the alpha plane is
    ``alpha`` (model-upscaled, float) or else bicubic-upscaled here; with
    ``outscale`` both are resized to exactly that factor of the input.
    """
    height, width = image.rgb.shape[:2]
    rgb = upscaled
    if image.gray or image.neutral:
        rgb = rgb.mean(axis=2, keepdims=True)
    plane = None
    if image.alpha is not None:
        plane = alpha if alpha is not None else imresize(to_float(image.alpha), size=(height * scale, width * scale))
    factor = float(scale)
    if outscale is not None and outscale != scale:
        factor = float(outscale)
        out_w, out_h = output_size(width, height, factor)
        rgb = imresize(np.asarray(rgb, np.float32), size=(out_h, out_w))
        plane = imresize(np.asarray(plane, np.float32), size=(out_h, out_w)) if plane is not None else None
    pixels = from_float(rgb, image.rgb.dtype)
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    out_alpha = from_float(plane, image.alpha.dtype) if plane is not None else None
    size = (pixels.shape[1], pixels.shape[0])
    return Image(pixels, out_alpha, image.gray, image.format, neutral=image.neutral, meta=scaled(image.meta, size, factor),
                 source=image.source)


def process_rss_mb() -> float:
    """This process's resident memory now (Linux), else its peak so far."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 1e6 if sys.platform == "darwin" else peak / 1e3


def whole_mb(image: Image, scale: int, factor: float, *, reference: bool) -> float:
    """Upper estimate of the memory one image takes upscaled whole (``upscale_images`` + ``finish_image``
    + encoding), and with its reference and bicubic baseline for metrics."""
    h, w = image.rgb.shape[:2]
    item = image.rgb.dtype.itemsize
    passes = 2 if image.alpha is not None else 1
    model_px = h * w * scale * scale
    out_w, out_h = output_size(w, h, factor)
    out_px = out_w * out_h
    total = passes * (h * w + model_px) * 12  # float input and model output
    if factor != scale:
        total += (out_px + h * scale * out_w) * 12  # the two passes of the resize
    total += out_px * (12 + 2 * 4 * item)  # rounding temporaries, pixels, encoded file
    if reference:
        # reference, 8-bit copies, bicubic, and scoring: float64 RGB copies of both images and skimage's SSIM planes
        total += out_px * (2 * 3 * item + 12 + 8 * 8 + 160)
    return total / 1e6


def band_mb(image: Image, scale: int, tile: int) -> float:
    """Upper estimate of the memory ``write_streamed`` takes besides the decoded input."""
    out_w = image.rgb.shape[1] * scale
    item = image.rgb.dtype.itemsize
    passes = 2 if image.alpha is not None else 1
    band = passes * tile * scale * out_w * 12  # float rows of tiles
    encoder = out_w * ((_TIFF_TILE + _CHUNK_ROWS) * 4 * item + _CHUNK_ROWS * 36)  # pending rows, chunk temporaries
    return (band + encoder) / 1e6


@dataclass(frozen=True)
class Route:
    """How one image goes: whole (in a batch) or band by band, with metrics or not, or refused."""

    streamed: bool = False
    metrics: bool = True
    refusal: str | None = None
    note: str | None = None
    mb: float = 0.0  # the estimate the route was planned with, held until the image is written
    paused: bool = False  # it fits only while decoding ahead pauses, which it does until the image is written
    final: bool = False  # refused for the image and settings alone, whatever else is held: a retry fails alike


def plan_route(image: Image, fmt: str, scale: int, run, tile: int, *, reference: bool, in_use_mb: float) -> Route:
    """The route that keeps this process under ``run.memory_mb`` (``run`` is the run settings).

    ``in_use_mb`` is what the process holds already (model and decoded input
    included); ``reference``: metrics are wanted, which need the output whole.
    """
    cap = run.memory_cap_mb
    factor = float(run.outscale or scale)
    out_w, out_h = output_size(image.rgb.shape[1], image.rgb.shape[0], factor)
    target = written_format(fmt)
    if target in MAX_SIDE and max(out_w, out_h) > MAX_SIDE[target]:  # known before the model runs
        return Route(refusal=too_large(target, out_w, out_h), final=True)
    can_stream = written_format(fmt) in STREAMED_FORMATS and factor == scale
    whole_est, band_est = whole_mb(image, scale, factor, reference=reference), band_mb(image, scale, tile)
    whole, band = in_use_mb + whole_est, in_use_mb + band_est
    big = image.rgb.shape[0] * image.rgb.shape[1] > run.stream_megapixels * 1e6
    if can_stream and (big and not reference or whole > cap) and band <= cap:
        note = None
        if reference:
            note = f"no metrics: scoring needs the output whole (about {whole:,.0f} MB, above run.memory_mb = {cap:,.0f})"
        return Route(streamed=True, metrics=False, note=note, mb=band_est)
    if whole <= cap:
        return Route(mb=whole_est)
    if can_stream:
        advice = "lower engine.tile or raise run.memory_mb"
        need = band
    else:
        why = f"{written_format(fmt).upper()} output" if factor == scale else f"outscale {factor:g}"
        advice = f"the {why} needs the whole image in memory; write PNG or TIFF at the model's scale (band by band) or raise run.memory_mb"
        need = whole
    size = f"{image.rgb.shape[1]}x{image.rgb.shape[0]}"
    return Route(refusal=f"{size} needs about {need:,.0f} MB, above run.memory_mb = {cap:,.0f}; {advice}")


class MemoryBudget:
    """Holds ``run.memory_mb`` across the images of one run in flight together (one budget per run or batch).

    The process takes its resident memory now, but at least what it took with
    the model loaded (``loaded_mb``) plus the working memory of the largest
    model call among the images in flight (``Engine.call_mb``), which a first
    call has not taken yet, plus what the images decoded ahead may take
    (``ahead``, a ``data.DecodeAhead``: its limit).  Every image planned and
    not yet written holds its own estimate on top, so images in flight together
    cannot pass the cap between them.  An image that fits only if decoding
    ahead pauses is planned counting what is reserved now and the next file's
    estimate (``DecodeAhead.pending_mb``), and pauses
    it until it is written (``Route.paused``).  ``decoded_mb``: images decoded
    before planning began (a callable), which RSS may not show above the model
    call's estimate yet.  An image refused, or sent band by band where alone it
    would go whole, while others are held waits: ``plan`` returns None, the
    caller lets the others finish and plans it again.  So only an image that
    does not fit on its own is refused, and none loses its metrics to its
    neighbours or to decoding ahead.
    """

    def __init__(self, loaded_mb: float, ahead=None, decoded_mb=None):
        self.loaded_mb = loaded_mb
        self.ahead = ahead
        self.decoded_mb = decoded_mb or (lambda: 0.0)  # what the images decoded before planning hold now (watch: its batch)
        self._held: dict[object, tuple[float, float]] = {}  # key: (its estimate, its model call)

    def plan(self, key, image: Image, fmt: str, scale: int, run, tile: int, *, reference: bool, call_mb: float) -> Route | None:
        """``plan_route`` against what is in use; a route that fits holds its estimate under ``key``.
        ``call_mb``: the model call over this image's windows.  None: wait for the images held, then plan again."""
        rss = process_rss_mb()
        largest_call = max([call_mb, *(call for _, call in self._held.values())])
        held, decoded = sum(mb for mb, _ in self._held.values()), self.decoded_mb()
        pending = self.ahead.pending_mb if self.ahead is not None else 0.0
        share = max(self.ahead.limit_mb, pending) if self.ahead is not None else 0.0  # the next file may pass the limit

        def route_with(ahead_mb: float, others: float, call: float) -> Route:
            in_use = max(rss, self.loaded_mb + decoded + call + ahead_mb) + others
            return plan_route(image, fmt, scale, run, tile, reference=reference, in_use_mb=in_use)

        route = route_with(share, held, largest_call)
        if route.final:  # refused whatever else is held: no waiting, and memory is no part of the reason
            return route
        if (route.refusal is not None or route.streamed) and share > pending:
            pending = self.ahead.pause(key)  # what is reserved now and the next file, which alone is admitted now
            paused = route_with(pending, held, largest_call)
            if route.refusal is not None or (paused.refusal is None and not paused.streamed):
                route = dataclasses.replace(paused, paused=paused.refusal is None)
            if not route.paused:
                self.ahead.resume(key)
        if self._held:
            if route.refusal is not None or (route.streamed and not route_with(pending, 0.0, call_mb).streamed):
                if route.paused:
                    self.ahead.resume(key)
                return None
        if route.refusal is None:
            self._held[key] = (route.mb, call_mb)
        else:
            counted = [f"{call_mb:,.0f} MB for a model call over its windows, set by engine.batch_size and engine.tile"] if call_mb else []
            if pending:
                counted.append(f"{pending:,.0f} MB for the images decoded ahead of it")
            if counted:
                route = dataclasses.replace(route, refusal=f"{route.refusal} (counted: {'; '.join(counted)})")
        return route

    def release(self, key) -> None:
        self._held.pop(key, None)
        if self.ahead is not None:
            self.ahead.resume(key)


def write_streamed(engine, image: Image, path: Path, fmt: str, alpha: str = "model", *,
                   within: Path | None = None, mode: int | None = None) -> tuple[int, int]:
    """Upscales ``image`` and writes it to ``path`` (PNG or TIFF) a row of tiles at a time (``within`` and
    ``mode``: see ``imageio.atomic_file``).

    Returns the output (width, height).  Memory: the input, one band of
    ``engine.tile * scale`` output rows and the encoder's buffers.
    """
    fmt = written_format(fmt)
    if fmt not in STREAMED_FORMATS:
        raise ValueError(f"{fmt} cannot be written band by band; use one of {STREAMED_FORMATS}")
    s = engine.scale
    height, width = image.rgb.shape[:2]
    out_h, out_w = height * s, width * s
    meta = scaled(image.meta, (out_w, out_h), s)
    dtype = image.rgb.dtype
    channels = (1 if image.gray else 3) + (image.alpha is not None)

    def bands():
        colour = engine.upscale_bands(image.rgb)
        planes = None
        if image.alpha is not None and alpha == "model":
            planes = engine.upscale_bands(np.broadcast_to(image.alpha[:, :, None], (height, width, 3)))
        for y, band in colour:
            alpha_band = next(planes)[1] if planes is not None else None
            for start in range(0, len(band), _CHUNK_ROWS):  # small float temporaries
                rows = band[start : start + _CHUNK_ROWS]
                if image.gray or image.neutral:
                    rows = rows.mean(axis=2, keepdims=True)
                pixels = from_float(rows, dtype)
                if image.neutral:
                    pixels = np.repeat(pixels, 3, axis=2)
                if image.alpha is not None:
                    if alpha_band is not None:
                        plane = np.clip(alpha_band[start : start + len(rows)].mean(axis=2), 0.0, 1.0)
                    else:
                        first = y + start
                        plane = imresize_rows(image.alpha, (out_h, out_w), first, first + len(rows)) / np.float32(np.iinfo(dtype).max)
                    pixels = np.concatenate([pixels, from_float(plane, dtype)[:, :, None]], axis=2)
                yield pixels

    with atomic_file(path, within, mode) as handle:
        if fmt == "png":
            from batchsr.pngwriter import PNGWriter

            writer = PNGWriter(handle, out_w, out_h, channels, dtype, png_metadata_chunks(meta, image.gray))
            for pixels in bands():
                writer.write_rows(pixels)
            writer.close()
        else:
            import tifffile

            shape = (out_h, out_w) if channels == 1 else (out_h, out_w, channels)
            big, meta = bigtiff_meta(shape, dtype, meta, path)
            tifffile.imwrite(handle, _tiles(bands(), out_w, channels, dtype), shape=shape, dtype=dtype, tile=(_TIFF_TILE, _TIFF_TILE),
                             compression="zlib", predictor=True, bigtiff=big, **tiff_options(image.gray, channels, meta))
            append_tiff_exif(handle, meta)
    return out_w, out_h


def _tiles(bands, width: int, channels: int, dtype):
    """TIFF tiles in row-major order from bands of rows of any height; edge tiles zero-padded."""
    t = _TIFF_TILE
    pending = np.zeros((0, width, channels), dtype)

    def row_of_tiles(rows: np.ndarray):
        for x in range(0, width, t):
            tile = np.zeros((t, t, channels), dtype)
            part = rows[:, x : x + t]
            tile[: part.shape[0], : part.shape[1]] = part
            yield tile[:, :, 0] if channels == 1 else tile

    for band in bands:
        pending = np.concatenate([pending, band]) if len(pending) else band
        while len(pending) >= t:
            yield from row_of_tiles(pending[:t])
            pending = pending[t:]
    if len(pending):
        yield from row_of_tiles(pending)
