"""Overlapping tiles: each window carries ``overlap`` pixels of context, only its core is kept.

Window origins are multiples of the model's pooling multiple, so every tile sees
the same max-pooling grid as the whole image; with enough context the stitched
result equals whole-image inference.  All coordinates are low-resolution pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tile:
    y: int  # window origin in the padded image
    x: int
    core: tuple[int, int, int, int]  # (y0, y1, x0, x1) of the kept region, image coordinates


@dataclass(frozen=True)
class TilePlan:
    height: int  # original size
    width: int
    padded_height: int  # rounded up to the pooling multiple, exactly as the model pads
    padded_width: int
    window_height: int  # tile + 2 * overlap, or the padded side when the image is smaller
    window_width: int
    tiles: tuple[Tile, ...]

    @property
    def window_shape(self) -> tuple[int, int]:
        return self.window_height, self.window_width


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def window_side(tile: int, overlap: int, multiple: int) -> int:
    """The side of a full window: ``tile`` and ``overlap`` rounded up to ``multiple``, context on both sides."""
    return _round_up(tile, multiple) + 2 * (_round_up(overlap, multiple) if overlap else 0)


def plan_tiles(height: int, width: int, tile: int, overlap: int, multiple: int) -> TilePlan:
    """Covers an ``height x width`` image with equal windows of ``tile + 2 * overlap`` pixels.

    ``tile`` and ``overlap`` are rounded up to ``multiple``.  The image is padded
    only to the multiple, as the model itself does, so that windows touching the
    image's edges see the same borders as whole-image inference; along a side
    shorter than a window, the window shrinks to that side.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if tile < 1 or overlap < 0 or multiple < 1:
        raise ValueError(f"bad tiling: tile={tile}, overlap={overlap}, multiple={multiple}")
    window = window_side(tile, overlap, multiple)
    tile = _round_up(tile, multiple)
    overlap = _round_up(overlap, multiple) if overlap else 0
    padded_h, padded_w = _round_up(height, multiple), _round_up(width, multiple)
    window_h, window_w = min(window, padded_h), min(window, padded_w)

    def origins(size: int, padded: int, span: int):
        if span == padded:  # one window holds the whole side: more tiles would repeat it
            return [(0, 0, size)]
        spans = []
        for start in range(0, size, tile):
            stop = min(start + tile, size)
            origin = min(max(start - overlap, 0), padded - span)
            spans.append((origin, start, stop))
        return spans

    tiles = tuple(
        Tile(y=oy, x=ox, core=(y0, y1, x0, x1))
        for oy, y0, y1 in origins(height, padded_h, window_h)
        for ox, x0, x1 in origins(width, padded_w, window_w)
    )
    return TilePlan(height, width, padded_h, padded_w, window_h, window_w, tiles)


def window(image: np.ndarray, plan: TilePlan, tile: Tile) -> np.ndarray:
    """The pixels of one window; past the bottom and right edges the last row and column
    repeat, as the model's own padding does.  Works on views (no padded copy of the image)."""
    rows = np.minimum(np.arange(tile.y, tile.y + plan.window_height), image.shape[0] - 1)
    cols = np.minimum(np.arange(tile.x, tile.x + plan.window_width), image.shape[1] - 1)
    return image[rows[:, None], cols[None, :]]


def place(output: np.ndarray, upscaled_window: np.ndarray, tile: Tile, scale: int, first_row: int = 0) -> None:
    """Copies the core of one upscaled window into ``output``, whose first row is image row ``first_row``."""
    y0, y1, x0, x1 = tile.core
    cy, cx = (y0 - tile.y) * scale, (x0 - tile.x) * scale
    output[(y0 - first_row) * scale : (y1 - first_row) * scale, x0 * scale : x1 * scale] = upscaled_window[
        cy : cy + (y1 - y0) * scale, cx : cx + (x1 - x0) * scale
    ]
