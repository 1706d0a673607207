"""Image reading and writing: formats by content, bit depth by dtype, atomic writes.

Pixels travel as ``uint8`` or ``uint16`` arrays in RGB order, ``(H, W, 3)``,
plus an optional alpha plane; the dtype is the bit depth, never guessed from
the values.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from batchsr.errors import ImageError

# Magic numbers; extensions are only used for naming outputs.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpg"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)
FORMATS = ("png", "jpg", "webp", "bmp", "tiff")
EXTENSIONS = {"png": ".png", "jpg": ".jpg", "webp": ".webp", "bmp": ".bmp", "tiff": ".tif"}
MIN_SIDE = 1
_UMASK = os.umask(0)
os.umask(_UMASK)


@dataclass
class Image:
    rgb: np.ndarray  # (H, W, 3) uint8 or uint16
    alpha: np.ndarray | None  # (H, W), same dtype, or None
    gray: bool  # stored single-channel: written back single-channel
    format: str

    @property
    def peak(self) -> int:
        return int(np.iinfo(self.rgb.dtype).max)

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.shape[1], self.rgb.shape[0]


def sniff_format(head: bytes) -> str | None:
    """The image format named by the first bytes of a file, or None."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    for magic, name in _SIGNATURES:
        if head.startswith(magic):
            return name
    return None


def decode_image(data: bytes, path: Path | str = "<bytes>") -> Image:
    """Decodes encoded bytes; raises ImageError naming ``path`` and the reason."""
    if len(data) == 0:
        raise ImageError(path, "empty file")
    fmt = sniff_format(data[:16])
    if fmt is None:
        raise ImageError(path, "not a supported image (PNG, JPEG, WebP, BMP or TIFF) by its content")
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise ImageError(path, f"corrupt or truncated {fmt.upper()} data")
    if pixels.dtype not in (np.uint8, np.uint16):
        raise ImageError(path, f"unsupported sample type {pixels.dtype} (8- or 16-bit integers only)")
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    channels = pixels.shape[2]
    alpha = None
    if channels in (2, 4):
        alpha = np.ascontiguousarray(pixels[:, :, -1])
        pixels = pixels[:, :, :-1]
    if pixels.shape[2] == 1:
        rgb, gray = np.repeat(pixels, 3, axis=2), True
    elif pixels.shape[2] == 3:
        rgb, gray = cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB), False
    else:
        raise ImageError(path, f"unsupported channel count {channels}")
    if min(rgb.shape[:2]) < MIN_SIDE:
        raise ImageError(path, f"image of {rgb.shape[1]}x{rgb.shape[0]} pixels is empty")
    return Image(np.ascontiguousarray(rgb), alpha, gray, fmt)


def read_image(path: Path | str) -> Image:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageError(path, f"cannot read: {exc.strerror or exc}") from None
    return decode_image(data, path)


def encode_image(image: Image, fmt: str, jpeg_quality: int = 95, webp_quality: int = 95) -> bytes:
    if fmt not in FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; allowed: {FORMATS}")
    pixels = image.rgb[:, :, :1] if image.gray else cv2.cvtColor(image.rgb, cv2.COLOR_RGB2BGR)
    if image.alpha is not None and fmt in ("png", "webp", "tiff"):
        pixels = np.dstack([pixels, image.alpha])
    if fmt in ("jpg", "webp", "bmp") and pixels.dtype != np.uint8:
        # These formats hold 8 bits only: round, never truncate.
        pixels = np.floor(pixels.astype(np.float64) / 257.0 + 0.5).astype(np.uint8)
    params: list[int] = []
    if fmt == "jpg":
        params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]
    elif fmt == "webp":
        params = [cv2.IMWRITE_WEBP_QUALITY, webp_quality]
    ok, buffer = cv2.imencode(EXTENSIONS[fmt], pixels, params)
    if not ok:
        raise ImageError("<output>", f"OpenCV could not encode {fmt}")
    return buffer.tobytes()


def atomic_write(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` so that ``path`` is either absent/old or complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide outputs from other users
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def to_float(pixels: np.ndarray) -> np.ndarray:
    """``uint8``/``uint16`` to float32 in [0, 1], scaled by the dtype's range."""
    return pixels.astype(np.float32) / np.float32(np.iinfo(pixels.dtype).max)


def from_float(pixels: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Float in [0, 1] back to ``dtype``, rounded (never truncated) and clipped."""
    peak = np.iinfo(dtype).max
    return np.clip(np.floor(pixels * np.float32(peak) + np.float32(0.5)), 0, peak).astype(dtype)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """8-bit copy of 8- or 16-bit pixels, rounded."""
    if pixels.dtype == np.uint8:
        return pixels
    return np.floor(pixels.astype(np.float64) * (255.0 / np.iinfo(pixels.dtype).max) + 0.5).astype(np.uint8)
