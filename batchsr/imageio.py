"""Image reading and writing: formats by content, bit depth by dtype, metadata carried.

Pixels travel as ``uint8`` or ``uint16`` arrays in RGB order, ``(H, W, 3)``,
plus an optional alpha plane; the dtype is the bit depth, never guessed from
the values.  Decoding refuses images above a pixel limit from their header,
before any pixel is decoded; turns images upright (EXIF orientation); converts
palette and CMYK images to RGB; takes the first frame of animations and
multi-page files, with a warning; and extends colour under fully transparent
pixels so that no fringe appears at transparent edges (see ``alpha.py``).
Encoding writes the ICC profile, EXIF, XMP and DPI where the format holds them.

Pillow parses every header and decodes 8-bit images; OpenCV decodes 16-bit
PNG and TIFF, which Pillow would cut to 8 bits.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import stat
import struct
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
from loguru import logger
from PIL import Image as PILImage

from batchsr.alpha import bleed, flatten, unpremultiply
from batchsr.errors import ImageError
from batchsr.lock import lock_is_free
from batchsr.metadata import (
    Metadata, orient, png_colour_chunks, png_metadata_chunks, png_with_metadata, read_metadata, tiff_metadata, tiff_tags, tiff_with_exif, transposed,
)

# batchsr applies its own limit (image.max_pixels) from the header, with a
# message naming the image; Pillow's global one would refuse 100-megapixel scans.
PILImage.MAX_IMAGE_PIXELS = None
# A file OpenCV cannot decode becomes one ImageError line naming it; OpenCV's own
# unattributed "[ERROR] ... TIFFReadDirectory" lines on stderr would only add noise.
with contextlib.suppress(AttributeError):
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)

# Magic numbers; extensions are only used for naming outputs.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpg"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
)
FORMATS = ("png", "jpg", "webp", "bmp", "tiff")  # written
INPUT_FORMATS = FORMATS + ("gif",)  # read
WRITTEN_AS = {"gif": "png"}  # 256 colours cannot hold an upscaled image
EXTENSIONS = {"png": ".png", "jpg": ".jpg", "webp": ".webp", "bmp": ".bmp", "tiff": ".tif"}
_PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP", "bmp": "BMP", "tiff": "TIFF", "gif": "GIF"}
NO_ALPHA = ("jpg", "bmp")  # formats without transparency: an image with alpha is flattened on the background
MAX_SIDE = {"jpg": 65535, "webp": 16383}  # the formats' own limits on a side
_JPEG_SEGMENT_LIMITS = {"exif": 65533, "xmp": 65504}  # bytes Pillow puts into one APP1 segment
MIN_SIDE = 1
DEFAULT_MAX_PIXELS = 200_000_000
_UMASK = os.umask(0)
os.umask(_UMASK)


@dataclass
class Image:
    rgb: np.ndarray  # (H, W, 3) uint8 or uint16
    alpha: np.ndarray | None  # (H, W), same dtype, or None
    gray: bool  # stored single-channel: written back single-channel
    format: str
    neutral: bool = False  # stored as colour, but R = G = B everywhere: the output is kept untinted too
    meta: Metadata = field(default_factory=Metadata)
    source: str = ""  # where it came from, for messages

    @property
    def peak(self) -> int:
        return int(np.iinfo(self.rgb.dtype).max)

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.shape[1], self.rgb.shape[0]

    @property
    def nbytes(self) -> int:
        return self.rgb.nbytes + (self.alpha.nbytes if self.alpha is not None else 0)


def sniff_format(head: bytes) -> str | None:
    """The image format named by the first bytes of a file, or None."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:2] == b"BM":  # two letters a text file may start with: the pixel data's offset must make sense too
        return "bmp" if len(head) >= 14 and 26 <= int.from_bytes(head[10:14], "little") < 1 << 24 else None
    for magic, name in _SIGNATURES:
        if head.startswith(magic):
            return name
    return None


def sniff_file(path: Path | str) -> str | None:
    """``sniff_format`` of a file's first bytes (OSError when it cannot be read)."""
    with open(path, "rb") as handle:
        return sniff_format(handle.read(16))


def written_format(fmt: str) -> str:
    """The format an image read as ``fmt`` is written in when the output format is ``same``."""
    return WRITTEN_AS.get(fmt, fmt)


def decode_image(data: bytes, path: Path | str = "<bytes>", *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image:
    """Decodes encoded bytes; raises ImageError naming ``path`` and the reason."""
    if len(data) == 0:
        raise ImageError(path, "empty file")
    fmt = sniff_format(data[:16])
    if fmt is None:
        raise ImageError(path, "not a supported image (PNG, JPEG, WebP, BMP, TIFF or GIF) by its content")
    stored_orientation = None
    if fmt == "tiff":
        unsupported = _tiff_unsupported(data)
        if unsupported:
            raise ImageError(path, unsupported)
        data, stored_orientation = _tiff_orientation_cleared(data)
        if stored_orientation not in range(1, 9):
            logger.warning("{}: invalid TIFF orientation {} ignored", path, stored_orientation)
            stored_orientation = 1
    try:
        pil = PILImage.open(io.BytesIO(data), formats=[_PIL_FORMATS[fmt]])
    except MemoryError:
        raise
    except PILImage.UnidentifiedImageError:
        if fmt == "tiff":  # layouts Pillow has no mode for, such as 16-bit gray + alpha (which batchsr writes)
            rgb, alpha, gray = _decode_tiff_with_tifffile(data, path, max_pixels, warn_pages=True)
            return _upright(rgb, alpha, gray, tiff_metadata(data, path)[0], fmt, stored_orientation, path)
        raise ImageError(path, f"corrupt or truncated {fmt.upper()} data (no valid header)") from None
    except Exception as exc:  # Pillow signals bad headers with many exception types
        raise ImageError(path, f"corrupt or truncated {fmt.upper()} data ({exc})") from None
    with pil:
        width, height = pil.size
        if min(width, height) < MIN_SIDE:
            raise ImageError(path, f"image of {width}x{height} pixels is empty")
        _check_pixel_limit(path, width, height, max_pixels)
        gray_key = _png_gray_key(data) if fmt == "png" else None
        if gray_key is not None:
            pil.info.pop("transparency", None)  # Pillow compares it unscaled with 1-, 2- and 4-bit levels
        sixteen = _sixteen_bit(pil, data, fmt, path)
        if sixteen and fmt == "tiff" and pil.tag_v2.get(284) == 2 and pil.tag_v2.get(277, 1) > 1:
            rgb, alpha, gray = _decode_tiff_with_tifffile(data, path, max_pixels)  # planar: OpenCV mixes the planes up
        elif sixteen:
            rgb, alpha, gray = _decode_with_opencv(data, fmt, path, _gray_header(pil, data, fmt))
            if fmt == "tiff" and pil.tag_v2.get(262) == 0:  # WhiteIsZero: OpenCV returns the stored values
                rgb = np.iinfo(rgb.dtype).max - rgb
            if alpha is not None and fmt == "tiff" and _associated_alpha(pil):
                rgb = unpremultiply(rgb, alpha)
        else:
            rgb, alpha, gray = _decode_with_pillow(pil, fmt, path)
        # Only once the pixels decoded: a broken file gets one line, its reason, not warnings about its parts too.
        try:
            more = getattr(pil, "is_animated", False)
        except Exception:  # a broken pointer to the next frame: the first one decoded, which is all that is used
            more = True
        if more:
            what = ("multi-page", "page") if fmt == "tiff" else ("animated", "frame")
            logger.warning("{}: {} {} ({} {}s): only the first {} is upscaled", path, what[0], fmt.upper(), _frames(pil), what[1], what[1])
        meta, orientation = read_metadata(pil, path)
        orientation = stored_orientation or orientation  # a TIFF's own, read before it was cleared
        if fmt == "png":
            meta = replace(meta, png_colour=png_colour_chunks(data))
    if gray_key is not None and alpha is None:
        level = gray_key * (np.iinfo(rgb.dtype).max // ((1 << data[24]) - 1))  # the key at the decoded depth
        alpha = np.where(rgb[:, :, 0] == level, 0, np.iinfo(rgb.dtype).max).astype(rgb.dtype)
    return _upright(rgb, alpha, gray, meta, fmt, orientation, path)


_MOST_FRAMES_COUNTED = 100


def _frames(pil: PILImage.Image) -> str:
    """How many frames or pages, counted up to 100 where counting means seeking through them (TIFF, GIF):
    Pillow's n_frames took 24 s over a TIFF of 20,000 pages."""
    count = 1
    try:
        if pil.format not in ("TIFF", "GIF"):
            return str(pil.n_frames)  # read from the header
        while count <= _MOST_FRAMES_COUNTED:
            pil.seek(count)
            count += 1
    except EOFError:
        pass
    except Exception:  # a broken frame after the first: counted so far
        return f"at least {count + 1}"
    finally:
        with contextlib.suppress(Exception):
            pil.seek(0)
    return str(count) if count <= _MOST_FRAMES_COUNTED else f"over {_MOST_FRAMES_COUNTED}"


def _png_gray_key(data: bytes) -> int | None:
    """The transparent level (tRNS) of a gray PNG (colour type 0), as stored; None when it has none."""
    if len(data) < 33 or data[25] != 0:
        return None
    at = 8
    while at + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[at : at + 8])
        if kind == b"tRNS":
            return struct.unpack(">H", data[at + 8 : at + 10])[0] if length >= 2 and at + 10 <= len(data) else None
        if kind in (b"IDAT", b"IEND"):
            return None
        at += 12 + length
    return None


def decoding_mb(width: int, height: int, sample_bytes: int) -> float:
    """Upper estimate of the memory an image takes while it is decoded and once decoded: RGB plus alpha,
    and the decoder's own buffer beside the array."""
    return 2 * 4 * sample_bytes * width * height / 1e6


def probe_decoding_mb(path: Path | str, max_pixels: int | None = None) -> float:
    """``decoding_mb`` from the file's header alone (nothing decoded); 0 for a file that is no image or whose
    header cannot be read: decoding it will say why.  Above ``max_pixels``, the file's own size: it is read,
    then refused from its header before any pixel is decoded."""
    header = probe_header(path)
    if header is None:
        return 0.0
    width, height, sixteen = header
    if max_pixels is not None and width * height > max_pixels:
        return os.path.getsize(path) / 1e6
    return decoding_mb(width, height, 2 if sixteen else 1)


def probe_header(path: Path | str) -> tuple[int, int, bool] | None:
    """``(width, height, 16-bit)`` as stored (before any EXIF turn), from the header alone; None for a file
    that is no image or whose header cannot be read: decoding it will say why."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(32)
            fmt = sniff_format(head[:16])
            if fmt is None:
                return None
            handle.seek(0)
            try:
                with PILImage.open(handle, formats=[_PIL_FORMATS[fmt]]) as pil:
                    return pil.size[0], pil.size[1], _sixteen_bit(pil, head, fmt, path)
            except PILImage.UnidentifiedImageError:
                if fmt != "tiff":
                    return None
                import tifffile

                handle.seek(0)
                with tifffile.TiffFile(handle) as tif:
                    page = tif.pages[0]
                    return page.imagewidth, page.imagelength, page.bitspersample > 8
    except Exception:  # noqa: BLE001 (an unreadable header is decoding's to report, with the reason)
        return None


def _check_pixel_limit(path, width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            path, f"{width}x{height} pixels ({width * height / 1e6:.3g} megapixels) exceeds the limit of "
            f"{max_pixels} pixels (image.max_pixels); refused before decoding"
        )


def _upright(rgb, alpha, gray: bool, meta: Metadata, fmt: str, orientation: int, path) -> Image:
    """The decoded planes turned upright, colour extended under transparent pixels."""
    rgb, alpha = orient(rgb, orientation), (orient(alpha, orientation) if alpha is not None else None)
    if alpha is not None:
        rgb = bleed(rgb, alpha)
    if orientation in (5, 6, 7, 8):  # a quarter turn: the stored width's resolution is the upright height's
        meta = transposed(meta)
    return Image(np.ascontiguousarray(rgb), alpha, gray, fmt, neutral=not gray and _channels_equal(rgb), meta=meta, source=str(path))


def _decode_tiff_with_tifffile(data: bytes, path, max_pixels: int | None, *, warn_pages: bool = False):
    """A TIFF that Pillow cannot open (or reads wrong): 8/16-bit gray or RGB, with an alpha sample or not, read
    by tifffile. Returns ``(rgb, alpha, gray)`` as stored (not yet upright)."""
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages[0]
            _check_pixel_limit(path, page.imagewidth, page.imagelength, max_pixels)
            pixels = page.asarray()
            if int(page.planarconfig) == 2 and pixels.ndim == 3:  # one plane per sample: samples last, as interleaved
                pixels = np.moveaxis(pixels, 0, -1)
            photometric, extra = int(page.photometric), tuple(page.extrasamples or ())
            if warn_pages and len(tif.pages) > 1:
                logger.warning("{}: multi-page TIFF ({} pages): only the first page is upscaled", path, len(tif.pages))
    except ImageError:
        raise
    except Exception as exc:  # tifffile signals bad files with many exception types
        if "imagecodecs" in str(exc):  # a compression tifffile decodes only with that package
            raise ImageError(path, f"unsupported compression for this TIFF layout ({exc}); save it uncompressed or "
                                   "with deflate") from None
        raise ImageError(path, f"corrupt or truncated TIFF data ({exc})") from None
    if pixels.dtype not in (np.uint8, np.uint16):
        raise ImageError(path, f"unsupported sample type {pixels.dtype} (8- or 16-bit integers only)")
    pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
    gray = photometric in (0, 1)  # WhiteIsZero, BlackIsZero
    if pixels.ndim != 3 or pixels.shape[2] != (1 if gray else 3) + len(extra[:1]):
        raise ImageError(path, f"unsupported TIFF layout: photometric {photometric}, {pixels.shape[-1]} samples")
    alpha = np.ascontiguousarray(pixels[:, :, -1]) if extra else None
    colour = pixels[:, :, :1] if gray else pixels[:, :, :3]
    if photometric == 0:
        colour = np.iinfo(colour.dtype).max - colour
    if alpha is not None and extra[0] == 1:  # associated (premultiplied) alpha
        colour = unpremultiply(colour, alpha)
    rgb = np.repeat(colour, 3, axis=2) if gray else colour
    return rgb, alpha, gray


def _tiff_entries(data: bytes) -> tuple[str, dict[int, tuple[int, int, int]]]:
    """Byte order and the first IFD's entries, ``tag: (type, count, offset of the value field)``."""
    endian = "<" if data[:2] == b"II" else ">"
    entries = {}
    if data[2:4] in (b"+\x00", b"\x00+"):  # BigTIFF: 64-bit offsets, left to the decoders
        return endian, entries
    try:
        (ifd,) = struct.unpack_from(endian + "I", data, 4)
        (count,) = struct.unpack_from(endian + "H", data, ifd)
        for k in range(count):
            at = ifd + 2 + 12 * k
            tag, kind, n = struct.unpack_from(endian + "HHI", data, at)
            entries[tag] = (kind, n, at + 8)
    except struct.error:
        pass  # a cut directory: the decoders report the file
    return endian, entries


def _tiff_short(data: bytes, endian: str, entry: tuple[int, int, int] | None) -> int | None:
    """The largest value of a SHORT or LONG entry (one per sample for some tags), else None."""
    if entry is None or entry[0] not in (3, 4) or not 1 <= entry[1] <= 64:
        return None
    kind, count, at = entry
    code, size = ("H", 2) if kind == 3 else ("I", 4)
    try:
        if count * size > 4:  # more than the 4 bytes of the field: it holds their offset
            (at,) = struct.unpack_from(endian + "I", data, at)
        return max(struct.unpack_from(f"{endian}{count}{code}", data, at))
    except struct.error:
        return None


def _tiff_orientation_cleared(data: bytes) -> tuple[bytes, int]:
    """The TIFF with its Orientation tag set to 1, and the orientation it held.

    Decoder versions disagree on whether they turn a TIFF upright themselves;
    decoding the stored layout and turning it here gives one answer with all.
    """
    endian, entries = _tiff_entries(data)
    entry = entries.get(274)
    orientation = _tiff_short(data, endian, entry) if entry is not None and entry[0] == 3 else None  # patched as a SHORT
    if orientation is None or orientation == 1:
        return data, 1
    patched = bytearray(data)
    struct.pack_into(endian + "H", patched, entries[274][2], 1)
    return bytes(patched), orientation


def _tiff_unsupported(data: bytes) -> str | None:
    """Why a TIFF the decoder cannot open is out of scope, when its header says so."""
    endian, entries = _tiff_entries(data)
    bits = _tiff_short(data, endian, entries.get(258)) or 1
    sample = _tiff_short(data, endian, entries.get(339)) or 1
    photometric = _tiff_short(data, endian, entries.get(262))
    if sample == 3:
        return f"unsupported sample type: {bits}-bit floating point TIFF (8- or 16-bit integers only)"
    if sample == 2:
        return f"unsupported sample type: {bits}-bit signed integer TIFF (8- or 16-bit unsigned integers only)"
    if 50706 in entries or photometric in (32803, 34892):  # DNGVersion; colour filter array, linear raw
        return "camera raw data (DNG or colour filter array): develop it to TIFF, PNG or JPEG first"
    if (_tiff_short(data, endian, entries.get(254)) or 0) & 1:  # NewSubfileType: a reduced-resolution image
        return ("the first image is a reduced-resolution preview (a camera raw file?): "
                "develop it to TIFF, PNG or JPEG first")
    if bits > 16:
        return f"unsupported sample type: {bits}-bit integer TIFF (8- or 16-bit integers only)"
    if photometric == 5 and bits == 16:
        return "unsupported 16-bit CMYK TIFF (8-bit CMYK, or 8- or 16-bit gray or RGB only)"
    return None


def _sixteen_bit(pil: PILImage.Image, data: bytes, fmt: str, path) -> bool:
    if fmt == "png":
        return len(data) > 25 and data[24] == 16
    if fmt == "tiff":
        bits = pil.tag_v2.get(258, (8,))
        return max(bits if isinstance(bits, tuple) else (bits,)) > 8  # wider samples were refused up front
    return False


def _gray_header(pil: PILImage.Image, data: bytes, fmt: str) -> bool:
    if fmt == "png":
        return data[25] in (0, 4)  # colour types gray, gray + alpha
    return pil.tag_v2.get(262, 2) in (0, 1)  # TIFF photometric WhiteIsZero / BlackIsZero


def _associated_alpha(pil: PILImage.Image) -> bool:
    """TIFF ExtraSamples = 1: colour is premultiplied by alpha."""
    extra = pil.tag_v2.get(338, ())
    return (extra if isinstance(extra, tuple) else (extra,))[:1] == (1,)


def _decode_with_opencv(data: bytes, fmt: str, path, gray: bool):
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise ImageError(path, f"corrupt or truncated {fmt.upper()} data")
    if pixels.dtype != np.uint16:
        raise ImageError(path, f"unsupported sample type {pixels.dtype} (8- or 16-bit integers only)")
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    channels = pixels.shape[2]
    if channels not in (1, 2, 3, 4):
        raise ImageError(path, f"unsupported channel count {channels}")
    alpha = np.ascontiguousarray(pixels[:, :, -1]) if channels in (2, 4) else None
    if gray or channels <= 2:
        return np.repeat(pixels[:, :, :1], 3, axis=2), alpha, True
    return cv2.cvtColor(np.ascontiguousarray(pixels[:, :, :3]), cv2.COLOR_BGR2RGB), alpha, False


def _decode_with_pillow(pil: PILImage.Image, fmt: str, path):
    try:
        pil.load()
    except MemoryError:
        raise
    except Exception as exc:  # truncated or corrupt data, in any of Pillow's exception types
        raise ImageError(path, f"corrupt or truncated {fmt.upper()} data ({exc})") from None
    mode = pil.mode
    if mode == "CMYK":
        pil = _cmyk_to_rgb(pil, path)
    elif mode in ("P", "PA"):
        pil = pil.convert("RGBA" if mode == "PA" or "transparency" in pil.info else "RGB")
    elif mode in ("L", "RGB") and "transparency" in pil.info:
        pil = pil.convert(mode + "A")
    elif mode == "1":
        pil = pil.convert("L")
    elif mode in ("RGBX", "YCbCr"):
        pil = pil.convert("RGB")
    mode = pil.mode
    if mode in ("La", "RGBa"):  # premultiplied (associated) alpha
        pixels = np.asarray(pil)
        alpha = np.ascontiguousarray(pixels[:, :, -1])
        color = unpremultiply(pixels[:, :, :-1], alpha)
        return (np.repeat(color, 3, axis=2), alpha, True) if mode == "La" else (color, alpha, False)
    if mode.startswith("I;16"):
        return np.repeat(np.asarray(pil).astype(np.uint16)[:, :, None], 3, axis=2), None, True
    if mode not in ("L", "LA", "RGB", "RGBA"):
        raise ImageError(path, f"unsupported {fmt.upper()} pixel mode {mode} (8- or 16-bit gray, RGB, palette or CMYK only)")
    pixels = np.asarray(pil)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    alpha = np.ascontiguousarray(pixels[:, :, -1]) if mode.endswith("A") else None
    if mode.startswith("L"):
        return np.repeat(pixels[:, :, :1], 3, axis=2), alpha, True
    return np.ascontiguousarray(pixels[:, :, :3]), alpha, False


_METADATA_ALLOWANCE = 256 << 20  # bytes of profiles, EXIF, XMP and other chunks beside the pixels


def read_bounded(handle, path, max_pixels: int | None) -> bytes:
    """The whole of an image file, refused unread (ImageError) when larger than any image within ``max_pixels``
    can be: 8 bytes a pixel (16-bit RGBA, uncompressed) and room for metadata. A sparse file of gigabytes
    behind a tiny header was read whole, past any memory cap."""
    if max_pixels is None:
        return handle.read()
    limit = max_pixels * 8 + _METADATA_ALLOWANCE

    def too_large_file(size: int) -> ImageError:
        return ImageError(path, f"file of {size / 1e6:,.0f} MB is larger than batchsr reads: {limit / 1e6:,.0f} MB, "
                                f"8 bytes a pixel of image.max_pixels ({max_pixels:,}) and 256 MB of metadata; "
                                "raise image.max_pixels to read it")

    size = os.fstat(handle.fileno()).st_size
    if size > limit:
        raise too_large_file(size)
    chunks = [handle.read(size)]  # read(n) sets n bytes aside at once: the size, not the limit
    total = len(chunks[0])
    while total <= limit and (more := handle.read(1 << 20)):  # a file still growing: the rest, a piece at a time
        chunks.append(more)
        total += len(more)
    if total > limit:
        raise too_large_file(total)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def too_large(fmt: str, width: int, height: int) -> str:
    return f"{width}x{height} is too large for {fmt.upper()} (at most {MAX_SIDE[fmt]} pixels a side); choose png or tiff"


def _cmyk_to_rgb(pil: PILImage.Image, path) -> PILImage.Image:
    """CMYK (print) to RGB: through the embedded ICC profile when there is one."""
    profile = pil.info.get("icc_profile")
    if profile:
        from PIL import ImageCms

        try:
            converted = ImageCms.profileToProfile(pil, io.BytesIO(profile), ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError) as exc:
            logger.warning("{}: embedded CMYK profile unusable ({}); converted to RGB by the naive formula (colours approximate)",
                           path, exc)
            return pil.convert("RGB")
        logger.info("{}: CMYK converted to sRGB through its embedded ICC profile", path)
        return converted
    logger.info("{}: CMYK without an ICC profile converted to RGB by the naive formula (colours approximate)", path)
    return pil.convert("RGB")


def _channels_equal(rgb: np.ndarray) -> bool:
    """True when R = G = B in every pixel (checked in bands: no full-size temporaries)."""
    for start in range(0, rgb.shape[0], 512):
        band = rgb[start : start + 512]
        if not (np.array_equal(band[:, :, 0], band[:, :, 1]) and np.array_equal(band[:, :, 0], band[:, :, 2])):
            return False
    return True


def read_image(path: Path | str, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageError(path, f"cannot read: {exc.strerror or exc}") from None
    return decode_image(data, path, max_pixels=max_pixels)


def encode_image(
    image: Image, fmt: str, jpeg_quality: int = 95, webp_quality: int = 95, *, background: tuple[int, int, int] = (255, 255, 255)
) -> bytes:
    """Encodes ``image`` as ``fmt`` with its metadata.

    Alpha is kept where the format holds it (PNG, WebP, TIFF); for JPEG and BMP
    the image is flattened on ``background`` and the log says so.  JPEG, WebP
    and BMP hold 8 bits: 16-bit images are rounded, never truncated.
    """
    fmt = written_format(fmt)
    if fmt not in FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; allowed: {FORMATS}")
    name = image.source or "<output>"
    width, height = image.size
    if fmt in MAX_SIDE and max(width, height) > MAX_SIDE[fmt]:
        raise ImageError(name, too_large(fmt, width, height))
    rgb, alpha, gray = image.rgb, image.alpha, image.gray
    if alpha is not None and fmt in NO_ALPHA:
        logger.warning("{}: {} has no transparency: flattened on #{:02x}{:02x}{:02x} (image.background)", name, fmt.upper(), *background)
        rgb, alpha = flatten(rgb, alpha, background), None
        gray = gray and len(set(background)) == 1  # a coloured background makes a gray image colour
    if rgb.dtype != np.uint8 and fmt in ("jpg", "webp", "bmp"):
        logger.info("{}: {} holds 8 bits per sample: the 16-bit result is rounded to 8 bits", name, fmt.upper())
        rgb, alpha = to_uint8(rgb), (to_uint8(alpha) if alpha is not None else None)
    if fmt == "webp" and gray:
        gray = False  # WebP has no gray mode; R = G = B keeps it untinted
    planes = rgb[:, :, :1] if gray else rgb
    pixels = np.dstack([planes, alpha]) if alpha is not None else planes
    meta = image.meta
    if fmt == "png":
        if pixels.shape[2] == 2:
            from batchsr.pngwriter import encode_png

            return encode_png(pixels, png_metadata_chunks(meta, gray))
        return png_with_metadata(_opencv_encode(".png", pixels, []), meta, gray)
    if fmt == "bmp":
        return _bmp_with_dpi(_opencv_encode(".bmp", pixels, []), meta.dpi)
    if fmt == "tiff":
        return _encode_tiff(pixels, gray, meta)
    pil = PILImage.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else np.ascontiguousarray(pixels))
    options: dict = {}
    if meta.icc_for(gray) is not None:
        options["icc_profile"] = meta.icc_for(gray)
    if meta.exif is not None:
        options["exif"] = b"Exif\x00\x00" + meta.exif
    if meta.xmp is not None:
        options["xmp"] = meta.xmp
    for key, limit in _JPEG_SEGMENT_LIMITS.items():  # one JPEG segment each: a PNG or TIFF may carry more
        if fmt == "jpg" and key in options and len(options[key]) > limit:
            logger.warning("{}: its {} kB of {} do not fit a JPEG segment; dropped", name, len(options.pop(key)) // 1000,
                           key.upper())
    if fmt == "jpg":
        if meta.dpi is not None:
            options["dpi"] = tuple(round(d) for d in meta.dpi)
        options["quality"] = jpeg_quality
    else:
        options.update(lossless=True, quality=100) if webp_quality > 100 else options.update(quality=webp_quality)
    buffer = io.BytesIO()
    pil.save(buffer, _PIL_FORMATS[fmt], **options)
    return buffer.getvalue()


def _bmp_with_dpi(data: bytes, dpi: tuple[float, float] | None) -> bytes:
    """OpenCV writes no resolution (0 pixels per metre): the header's two fields get the image's."""
    if dpi is None or data[14:18] != (40).to_bytes(4, "little"):  # BITMAPINFOHEADER, as OpenCV writes
        return data
    per_metre = b"".join(min(round(d / 0.0254), 2**31 - 1).to_bytes(4, "little", signed=True) for d in dpi)
    return data[:38] + per_metre + data[46:]


def _opencv_encode(ext: str, pixels: np.ndarray, params: list[int]) -> bytes:
    if pixels.shape[2] == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
    elif pixels.shape[2] == 4:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGBA2BGRA)
    ok, buffer = cv2.imencode(ext, pixels, params)
    if not ok:
        raise ImageError("<output>", f"OpenCV could not encode {ext[1:]}")
    return buffer.tobytes()


def tiff_options(gray: bool, channels: int, meta: Metadata) -> dict:
    """``tifffile`` arguments shared by in-memory and streamed TIFF outputs."""
    options = {
        "photometric": "minisblack" if gray else "rgb",
        "extrasamples": ["unassalpha"] if channels in (2, 4) else None,
        "metadata": None,
        "software": False,
        "extratags": tiff_tags(meta, gray),
    }
    if meta.dpi is not None:
        options.update(resolution=meta.dpi, resolutionunit="INCH")
    return options


def bigtiff_meta(shape: tuple[int, ...], dtype, meta: Metadata, name) -> tuple[bool, Metadata]:
    """Whether a TIFF of ``shape`` needs BigTIFF, and the metadata it can carry.

    Classic TIFF offsets are 32-bit: a file that may pass 4 GB (compression is not
    counted on) must be BigTIFF, into which the appended EXIF IFDs are not written.
    """
    if int(np.prod(shape)) * np.dtype(dtype).itemsize < 4_000_000_000:
        return False, meta
    if meta.exif is not None:
        logger.warning("{}: written as BigTIFF (over 4 GB); its EXIF is not carried", name)
    return True, replace(meta, exif=None)


def _encode_tiff(pixels: np.ndarray, gray: bool, meta: Metadata) -> bytes:
    import tifffile

    buffer = io.BytesIO()
    data = pixels[:, :, 0] if pixels.shape[2] == 1 else pixels
    big, meta = bigtiff_meta(pixels.shape, pixels.dtype, meta, "output")
    tifffile.imwrite(buffer, data, compression="zlib", predictor=True, bigtiff=big, **tiff_options(gray, pixels.shape[2], meta))
    return tiff_with_exif(buffer.getvalue(), meta)


@contextlib.contextmanager
def atomic_file(path: Path, within: Path | None = None, mode: int | None = None):
    """A binary file handle whose content appears at ``path`` only once complete (see ``atomic_write``)."""
    path = Path(path)
    make_folders(path.parent, within)
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        os.close(fd)
        with open(tmp, "w+b") as handle:  # by name, so that writers needing a path (tifffile) can use it
            yield handle
            handle.flush()
            # Its mode once written: mkstemp's 0600 keeps a private input's pixels from a reader who opens the
            # temporary meanwhile (the handle outlives a later chmod), and a read-only mode (0444) refused the writing.
            os.fchmod(handle.fileno(), 0o666 & ~_UMASK if mode is None else mode)
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    sync_folder(path.parent)


STATE_DIR = ".batchsr"  # in an output folder: its journal and lock; a folder holding one is another batchsr tree
_OLD_TEMPORARY = re.compile(r"\.(.+)\.[A-Za-z0-9_]{8}\.tmp")
TEMPORARY_PREFIX = ".batchsr-"  # of every temporary batchsr writes: others' hidden *.tmp files are not ours to remove


def cut_name(name: str, max_bytes: int) -> str:
    """``name`` cut to at most ``max_bytes`` bytes of UTF-8, at a character's edge: a file name holds at most 255."""
    return name.encode("utf-8", "surrogateescape")[:max_bytes].decode("utf-8", "ignore")


def temporary_prefix(name: str) -> str:
    """``.batchsr-NAME.``, the name cut to 200 bytes: with mkstemp's 8 characters and ``.tmp`` the temporary's
    name stays within the 255 bytes a file name may have, where NAME itself may take them all."""
    return TEMPORARY_PREFIX + cut_name(name, 200) + "."


def sync_folder(folder: Path) -> None:
    """A rename into ``folder`` survives power loss once the folder itself is synced."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LinkedFolderError(OSError):
    """A folder inside a tree batchsr writes is a symbolic link: it could lead the writes anywhere, onto the
    inputs too, so it is not written through (the tree's own top folder may be a link)."""

    def __init__(self, folder: Path):
        super().__init__(errno.ELOOP, f"{folder} is a symbolic link; batchsr does not write through links inside "
                                      f"the folders it writes (link the top folder itself instead)")

    def __str__(self) -> str:
        return self.strerror


# A folder opened to be gone through, not read: a drop folder of mode 0333 (write and search only) is fine.
_FOLDER_ONLY = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY


def make_folders(folder: Path, within: Path | None = None, made: list[Path] | None = None) -> None:
    """``folder.mkdir(parents=True, exist_ok=True)`` without recursion, for the same deep trees as ``walk``.
    With ``within`` (a folder above ``folder``), each folder below it must be a folder, not a link:
    ``LinkedFolderError`` (checked at each write, folder by folder from ``within`` down through their
    descriptors, in time linear in the depth; a link made in the instant before the write is still followed).
    ``made`` collects the folders below ``within`` that this call created."""
    rel = os.path.relpath(folder, within) if within is not None else ".."
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):  # no within, or not below it: nothing to check
        return _make_all(Path(folder))
    _make_all(Path(within))
    fd = os.open(within, _FOLDER_ONLY)
    try:
        at = Path(within)
        for part in Path(rel).parts if rel != os.curdir else ():
            at = at / part
            try:
                try:
                    inner = os.open(part, _FOLDER_ONLY | os.O_NOFOLLOW, dir_fd=fd)
                except FileNotFoundError:
                    try:
                        os.mkdir(part, dir_fd=fd)
                        if made is not None:
                            made.append(at)
                    except FileExistsError:
                        pass
                    inner = os.open(part, _FOLDER_ONLY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR) and stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
                    raise LinkedFolderError(at) from None
                raise
            os.close(fd)
            fd = inner
    finally:
        os.close(fd)


def _make_all(folder: Path) -> None:
    missing, at = [], folder
    while not at.is_dir() and at != at.parent:
        missing.append(at)
        at = at.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)


def walk(top, *, follow_links: bool = False, onerror=None):
    """``os.walk`` (top-down; prune by editing the folder list), without recursion: Python 3.11's own
    raised RecursionError on a tree some 1,000 folders deep, which a producer can drop into an inbox."""
    stack = [os.fspath(top)]
    while stack:
        root = stack.pop()
        try:
            with os.scandir(root) as listing:
                entries = list(listing)
        except OSError as exc:
            if onerror is not None:
                onerror(exc)
            continue
        dirs, names, links = [], [], set()
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # a link to a folder is listed as a folder, as os.walk does
            except OSError:
                is_dir = False
            (dirs if is_dir else names).append(entry.name)
            if is_dir and entry.is_symlink():
                links.add(entry.name)
        yield root, dirs, names
        for name in reversed(dirs):
            if follow_links or name not in links:
                stack.append(os.path.join(root, name))


def remove_temporaries(folder: Path) -> int:
    """Deletes the ``.batchsr-NAME.XXXX.tmp`` files of ``atomic_file`` (and probes) that a killed writer left
    under ``folder``; call it only while holding the folder's lock (no writer is live). Another batchsr output
    folder nested inside may have live writers: it is left alone unless its lock is free."""
    removed = 0
    for root, dirs, names in walk(folder):
        dirs[:] = [d for d in dirs if not (os.path.isdir(os.path.join(root, d, STATE_DIR))
                                           and not lock_is_free(Path(root, d, STATE_DIR, "lock")))]
        present = set(names)
        for name in names:
            older = _OLD_TEMPORARY.fullmatch(name)  # named by an earlier version: ours beside the file it became
            if (name.startswith(TEMPORARY_PREFIX) and name.endswith(".tmp")) or (older and older.group(1) in present):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(root, name))
                    removed += 1
    return removed


def mode_like(source: Path | str) -> int | None:
    """An output's mode, as ``cp`` gives it: the source's read and write bits the umask lets through (a private
    input, 0600, gave a world-readable output); None when the source cannot be looked at."""
    try:
        return os.stat(source).st_mode & 0o666 & ~_UMASK
    except OSError:
        return None


def atomic_write(path: Path, data: bytes, within: Path | None = None, mode: int | None = None) -> None:
    """Writes ``data`` to ``path`` so that ``path`` is either absent/old or complete (``within``: see
    ``make_folders``; ``mode``: the file's, else what the umask gives)."""
    with atomic_file(path, within, mode) as handle:
        handle.write(data)


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
