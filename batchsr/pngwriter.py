"""A PNG encoder that takes rows as they come.

OpenCV and Pillow encode whole images only, and OpenCV cannot write
gray + alpha.  This writer takes bands of rows of any PNG colour type at 8 or
16 bits and compresses them as they arrive, so an output of gigapixels never
has to exist in memory at once.  Rows use the "Up" filter, which NumPy computes
for a whole band in one step.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

from batchsr.metadata import png_chunk

_COLOUR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type
_IDAT_BYTES = 1 << 20


class PNGWriter:
    """Writes ``height`` rows of ``(width, channels)`` pixels to a binary file ``handle``."""

    def __init__(self, handle, width: int, height: int, channels: int, dtype, extra_chunks: bytes = b"", level: int = 6):
        if channels not in _COLOUR_TYPES:
            raise ValueError(f"PNG holds 1 to 4 channels, got {channels}")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"PNG holds 8- or 16-bit samples, got {self.dtype}")
        self.handle, self.width, self.height, self.channels = handle, width, height, channels
        self.rows_left = height
        self.previous = np.zeros(width * channels * self.dtype.itemsize, np.uint8)
        self.compressor = zlib.compressobj(level)
        self.pending = b""
        depth = 8 * self.dtype.itemsize
        handle.write(b"\x89PNG\r\n\x1a\n")
        handle.write(png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, _COLOUR_TYPES[channels], 0, 0, 0)))
        handle.write(extra_chunks)

    def write_rows(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows)
        if rows.ndim == 2:
            rows = rows[:, :, None]
        if rows.shape[1:] != (self.width, self.channels) or rows.dtype != self.dtype:
            raise ValueError(f"expected rows of ({self.width}, {self.channels}) {self.dtype}, got {rows.shape[1:]} {rows.dtype}")
        if len(rows) > self.rows_left:
            raise ValueError("more rows than the image height")
        raw = rows.astype(self.dtype.newbyteorder(">"), copy=False).reshape(len(rows), -1).view(np.uint8)
        up = np.empty((len(rows), raw.shape[1] + 1), np.uint8)
        up[:, 0] = 2  # filter type Up: each byte minus the byte above it
        up[0, 1:] = raw[0] - self.previous
        up[1:, 1:] = raw[1:] - raw[:-1]
        self.previous = raw[-1].copy()
        self.rows_left -= len(rows)
        self._emit(self.compressor.compress(up.tobytes()))

    def _emit(self, data: bytes, final: bool = False) -> None:
        self.pending += data
        while len(self.pending) >= _IDAT_BYTES or (final and self.pending):
            self.handle.write(png_chunk(b"IDAT", self.pending[:_IDAT_BYTES]))
            self.pending = self.pending[_IDAT_BYTES:]

    def close(self) -> None:
        if self.rows_left:
            raise ValueError(f"{self.rows_left} rows missing of {self.height}")
        self._emit(self.compressor.flush(), final=True)
        self.handle.write(png_chunk(b"IEND", b""))


def encode_png(pixels: np.ndarray, extra_chunks: bytes = b"") -> bytes:
    """A whole ``(H, W[, C])`` image as PNG bytes."""
    import io

    pixels = pixels if pixels.ndim == 3 else pixels[:, :, None]
    buffer = io.BytesIO()
    writer = PNGWriter(buffer, pixels.shape[1], pixels.shape[0], pixels.shape[2], pixels.dtype, extra_chunks)
    for start in range(0, pixels.shape[0], 256):
        writer.write_rows(pixels[start : start + 256])
    writer.close()
    return buffer.getvalue()
