"""MATLAB-compatible bicubic ``imresize``: the degradation of the SR benchmarks.

OpenCV's cubic resize uses a different kernel coefficient and no antialiasing
when shrinking, so published figures (bicubic x4 Set5 28.42 dB) are only
reproduced with MATLAB's algorithm.  Resizing is separable and linear, so each
axis is one weight matrix; training pipelines reuse the same matrices.
"""

from __future__ import annotations

import functools

import numpy as np


def _cubic(x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    return (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1) + (
        -0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0
    ) * ((ax > 1) & (ax <= 2))


@functools.lru_cache(maxsize=64)
def resize_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output index, the input indices and weights MATLAB's bicubic imresize uses on one axis."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got in_size={in_size}, out_size={out_size}")
    scale = out_size / in_size
    antialias = scale < 1
    width = 4.0 / scale if antialias else 4.0
    out = np.arange(1, out_size + 1, dtype=np.float64)
    centre = out / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(centre - width / 2.0)
    taps = int(np.ceil(width)) + 2
    idx = left[:, None] + np.arange(taps)[None, :]
    dist = centre[:, None] - idx
    weights = scale * _cubic(dist * scale) if antialias else _cubic(dist)
    weights /= weights.sum(axis=1, keepdims=True)
    # MATLAB mirrors out-of-range taps (symmetric boundary).
    mirror = np.concatenate([np.arange(in_size), np.arange(in_size - 1, -1, -1)])
    src = mirror[np.mod(idx.astype(np.int64) - 1, 2 * in_size)]
    src.setflags(write=False)
    weights.setflags(write=False)
    return src, weights


@functools.lru_cache(maxsize=256)
def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """The ``(out_size, in_size)`` matrix MATLAB's bicubic imresize applies to one axis."""
    src, weights = resize_taps(in_size, out_size)
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    np.add.at(matrix, (np.repeat(np.arange(out_size), src.shape[1]), src.ravel()), weights.ravel())
    matrix.setflags(write=False)
    return matrix


def imresize_rows(image: np.ndarray, size: tuple[int, int], start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of the bicubic resize of ``image`` to ``size``, in float32, unrounded.

    Only the input rows those output rows need are read and converted, and no
    weight matrix the size of the image is built, so a huge image can be
    resized band by band.  Integer input comes back in its own units.
    """
    h, w = image.shape[:2]
    out_h, out_w = size
    rows_idx, rows_w = resize_taps(h, out_h)
    cols_idx, cols_w = resize_taps(w, out_w)
    rows_idx, rows_w = rows_idx[start:stop], rows_w[start:stop].astype(np.float32)
    needed = np.unique(rows_idx)
    source = image[needed].astype(np.float32)
    local = np.searchsorted(needed, rows_idx)
    extra = (1,) * (image.ndim - 2)
    rows = np.zeros((stop - start, w) + image.shape[2:], np.float32)
    for k in range(rows_idx.shape[1]):
        rows += rows_w[:, k].reshape((-1, 1) + extra) * source[local[:, k]]
    out = np.zeros((stop - start, out_w) + image.shape[2:], np.float32)
    cols_w = cols_w.astype(np.float32)
    for k in range(cols_idx.shape[1]):
        out += cols_w[:, k].reshape((1, -1) + extra) * rows[:, cols_idx[:, k]]
    return out


_DENSE_LIMIT = 16_000_000  # weight-matrix elements above which float images are resized in bands


def _output_size(size: int, scale: float) -> int:
    return int(np.ceil(size * scale))


def imresize(image: np.ndarray, scale: float | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
    """Resize an ``(H, W[, C])`` image like MATLAB's ``imresize(image, scale, 'bicubic')``.

    Integer images come back in their own dtype, rounded and clipped after each
    axis as MATLAB does; float images stay float and unclipped.
    """
    if (scale is None) == (size is None):
        raise ValueError("give exactly one of scale or size")
    if image.ndim not in (2, 3):
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {image.shape}")
    h, w = image.shape[:2]
    if size is None:
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        size = (_output_size(h, scale), _output_size(w, scale))
    out_h, out_w = size
    integer = np.issubdtype(image.dtype, np.integer)
    if not integer and out_h * h + out_w * w > _DENSE_LIMIT:
        # Dense weight matrices would outgrow the image itself: resize in bands of rows.
        bands = [imresize_rows(image, (out_h, out_w), y, min(y + 256, out_h)) for y in range(0, out_h, 256)]
        return np.concatenate(bands).astype(image.dtype if image.dtype == np.float32 else np.float64)
    limits = np.iinfo(image.dtype) if integer else None

    def settle(x: np.ndarray) -> np.ndarray:
        if integer:
            return np.clip(np.floor(x + 0.5), limits.min, limits.max)  # MATLAB rounds halves up
        return x

    x = image.astype(np.float64)
    # MATLAB resizes the axis with the smaller scale first (rows on a tie).
    order = (0, 1) if out_h / h <= out_w / w else (1, 0)
    for axis in order:
        n_out = out_h if axis == 0 else out_w
        m = resize_matrix(x.shape[axis], n_out)
        x = settle(np.tensordot(m, x, axes=([1], [axis])) if axis == 0 else np.moveaxis(np.tensordot(m, x, axes=([1], [1])), 0, 1))
    return x.astype(image.dtype) if integer else x.astype(image.dtype if image.dtype == np.float32 else np.float64)


def degrade(hr: np.ndarray, scale: int) -> np.ndarray:
    """The benchmark LR image: crop HR to a multiple of ``scale``, then MATLAB bicubic down."""
    hr = crop_to_multiple(hr, scale)
    return imresize(hr, size=(hr.shape[0] // scale, hr.shape[1] // scale))


def crop_to_multiple(image: np.ndarray, scale: int) -> np.ndarray:
    h, w = image.shape[:2]
    return image[: h - h % scale, : w - w % scale]
