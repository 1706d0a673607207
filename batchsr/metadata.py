"""What travels from input to output besides pixels: EXIF, ICC profile, XMP, DPI.

Inputs are turned upright on reading (EXIF orientation), so outputs say
orientation 1.  An upscaled image keeps its physical size: DPI and the EXIF
resolution tags are multiplied by the scale, the EXIF pixel dimensions follow
the new size.  PNG and TIFF writers do not take these fields, so they are added
to the encoded bytes here (PNG chunks; TIFF tags plus an appended EXIF IFD).
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass, replace

import numpy as np
from loguru import logger
from PIL import Image as PILImage
from PIL import TiffImagePlugin, TiffTags

ORIENTATION = 0x0112
X_RESOLUTION, Y_RESOLUTION = 282, 283
EXIF_IFD, GPS_IFD, INTEROP_IFD = 0x8769, 0x8825, 0xA005
PIXEL_X, PIXEL_Y = 0xA002, 0xA003
ICC_TAG, XMP_TAG = 34675, 700
MAX_DPI = 65535  # JPEG's JFIF density field; PNG's pHYs holds about 1e8
# Tags that describe one file's pixel layout or embed other blocks: never carried.
_LAYOUT_TAGS = {
    254, 255, 256, 257, 258, 259, 262, 263, 266, 273, 277, 278, 279, 280, 281, 284, 292, 293, 317, 320,
    322, 323, 324, 325, 330, 332, 338, 339, 340, 341, 347, 513, 514, 529, 530, 531, 532,
    XMP_TAG, 33723, 34377, ICC_TAG, 37724, 50341,
}
# Descriptive IFD0 tags written as plain TIFF tags into TIFF outputs.
_TIFF_TEXT_TAGS = (270, 271, 272, 305, 306, 315, 316, 33432)
_XMP_ORIENTATION = re.compile(rb'(tiff:Orientation\s*=\s*["\']|<tiff:Orientation>\s*)[1-8]')


@dataclass(frozen=True)
class Metadata:
    icc: bytes | None = None  # ICC profile, as embedded
    exif: bytes | None = None  # TIFF-structured EXIF (no "Exif\0\0" header); orientation already 1
    xmp: bytes | None = None  # XMP packet
    dpi: tuple[float, float] | None = None
    png_colour: bytes | None = None  # a PNG input's colour-space chunks (gAMA, cHRM, sRGB, cICP, ...), encoded

    def icc_for(self, gray: bool) -> bytes | None:
        """The profile if it describes the output's colour space (RGB or gray), else None."""
        if self.icc is None or len(self.icc) < 20:
            return None
        space = self.icc[16:20]
        return self.icc if space == (b"GRAY" if gray else b"RGB ") else None


def read_metadata(im: PILImage.Image, path) -> tuple[Metadata, int]:
    """Metadata of an opened Pillow image and its EXIF orientation (1 when absent)."""
    return _metadata(im.info, getattr(im, "tag_v2", None), im.getexif, path)


def tiff_metadata(tiff: bytes, path) -> tuple[Metadata, int]:
    """Metadata of a TIFF that Pillow cannot open (such as 16-bit gray + alpha, which batchsr writes):
    its first IFD read as EXIF, which is what a TIFF's EXIF is."""
    ifd0 = PILImage.Exif()
    try:
        ifd0.load(tiff)
    except Exception as exc:  # as in read_metadata: the pixels are still good
        logger.warning("{}: unreadable TIFF tags: metadata dropped ({}: {})", path, type(exc).__name__, exc)
        return Metadata(), 1
    info: dict = {}
    if ICC_TAG in ifd0:
        info["icc_profile"] = bytes(ifd0[ICC_TAG])
    if X_RESOLUTION in ifd0 and Y_RESOLUTION in ifd0 and ifd0.get(296) != 1:  # unit "none": an aspect ratio only
        per_cm = ifd0.get(296) == 3  # ResolutionUnit centimetre; inch otherwise, as Pillow reads it
        info["dpi"] = tuple(float(ifd0[tag]) * (2.54 if per_cm else 1.0) for tag in (X_RESOLUTION, Y_RESOLUTION))
    return _metadata(info, ifd0, lambda: ifd0, path)


def _metadata(info: dict, tags, exif_of, path) -> tuple[Metadata, int]:
    """From Pillow's ``info``, a TIFF's tags (None for other formats) and a function giving the EXIF."""
    icc = info.get("icc_profile") or None
    xmp = info.get("xmp")
    if xmp is None and tags is not None:
        xmp = tags.get(XMP_TAG)
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8")
    orientation, exif_bytes = 1, None
    try:
        source = exif_of()
        orientation = int(source.get(ORIENTATION, 1) or 1)
        exif = _carried_exif(source)
        if ORIENTATION in exif:
            exif[ORIENTATION] = 1
        if len(exif):
            exif_bytes = _strip_header(exif.tobytes())
    except Exception as exc:  # Pillow raises many types on malformed EXIF; the pixels are still good
        logger.warning("{}: unreadable EXIF dropped ({}: {})", path, type(exc).__name__, exc)
        orientation, exif_bytes = 1, None
    if orientation not in range(1, 9):
        logger.warning("{}: invalid EXIF orientation {} ignored", path, orientation)
        orientation = 1
    if xmp is not None:
        xmp = _XMP_ORIENTATION.sub(rb"\g<1>1", bytes(xmp))
    dpi = info.get("dpi")
    if tags is not None and X_RESOLUTION not in tags:
        dpi = None  # Pillow reports a TIFF without resolution tags as 1 dpi
    try:
        dpi = (round(float(dpi[0]), 2), round(float(dpi[1]), 2)) if dpi else None  # PNG stores px/m: 300 reads 299.9994
    except (TypeError, ValueError, IndexError):
        dpi = None
    if dpi is not None and not all(0 < d <= MAX_DPI for d in dpi):
        dpi = None
    return Metadata(icc=icc, exif=exif_bytes, xmp=xmp, dpi=dpi), orientation


def _carried_exif(source: PILImage.Exif) -> PILImage.Exif:
    """A copy of ``source`` without the layout tags, its sub-IFDs loaded.

    Never edit Pillow's own EXIF in place: Pillow reads a TIFF's pixels through it
    (its orientation included), so a changed tag breaks the decode that follows.
    Only sub-IFDs the source has are written: none are added empty.
    """
    exif = PILImage.Exif()
    for tag, value in source.items():
        if tag in _LAYOUT_TAGS:
            continue
        if tag == 270 and isinstance(value, str) and value.lstrip().startswith('{"shape":'):
            continue  # tifffile's description of the input's array shape: wrong for the output

        exif[tag] = _stored_ifd(source, tag) if tag in (EXIF_IFD, GPS_IFD) else _stored_text(value, tag)
    return exif


def _stored_ifd(exif: PILImage.Exif, tag: int) -> dict:
    """The EXIF or GPS sub-IFD of ``exif``, its text as stored and its interoperability IFD loaded."""
    values = {k: _stored_text(v, k) for k, v in exif.get_ifd(tag).items()}
    if tag == EXIF_IFD and INTEROP_IFD in values:
        values[INTEROP_IFD] = {k: _stored_text(v, k) for k, v in exif.get_ifd(INTEROP_IFD).items()}
    return values


class _StoredText(str):
    """EXIF text of a tag Pillow has no type for (LensModel, a maker's private tag): still a str, so that
    Pillow writes it as text (given bytes, it wrote them as BYTE), whose encoding is the stored bytes."""

    stored: bytes

    def __new__(cls, stored: bytes):
        text = super().__new__(cls, stored.decode("latin-1"))
        text.stored = stored
        return text

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return self.stored


def _stored_text(value, tag: int | None = None):
    """Text as the file stored it: Pillow reads EXIF text as Latin-1 and writes it back as ASCII, which
    turned the UTF-8 of a "© José" copyright into "?? Jos??"; bytes are written unchanged, for a tag
    Pillow knows as text (and for tifffile, ``tag`` None). A tag of a known other type is left as it is."""
    if not isinstance(value, str) or value.isascii():
        return value
    stored = value.encode("latin-1") if max(map(ord, value)) < 256 else value.encode("utf-8")
    known = TiffTags.lookup(tag).type if tag is not None else TiffTags.ASCII
    if known == TiffTags.ASCII:
        return stored
    return _StoredText(stored) if known is None else value


def _strip_header(exif: bytes) -> bytes:
    return exif[6:] if exif.startswith(b"Exif\x00\x00") else exif


def _load_exif(data: bytes) -> PILImage.Exif:
    exif = PILImage.Exif()
    exif.load(data)
    return exif


def scaled(meta: Metadata, size: tuple[int, int], factor: float) -> Metadata:
    """Metadata of an output of ``size`` (width, height) made ``factor`` times larger.  A resolution that
    would leave what every output format can hold (``MAX_DPI``), or none to begin with (0/0), is dropped."""
    dpi = (meta.dpi[0] * factor, meta.dpi[1] * factor) if meta.dpi else None
    if dpi is not None and max(dpi) > MAX_DPI:
        dpi = None
    exif = meta.exif
    if exif is not None:
        loaded = _load_exif(exif)
        for tag in (X_RESOLUTION, Y_RESOLUTION):
            if tag in loaded:
                value = float(loaded[tag]) * factor
                if 0 < value <= MAX_DPI:
                    loaded[tag] = TiffImagePlugin.IFDRational(value)
                else:
                    del loaded[tag]
        if EXIF_IFD in loaded:  # tobytes writes back the sub-IFDs the data has, edited here in place
            sub = loaded.get_ifd(EXIF_IFD)
            if PIXEL_X in sub:
                sub[PIXEL_X] = int(size[0])
            if PIXEL_Y in sub:
                sub[PIXEL_Y] = int(size[1])
        exif = _strip_header(loaded.tobytes())
    return replace(meta, dpi=dpi, exif=exif)


def transposed(meta: Metadata) -> Metadata:
    """Metadata of the image turned a quarter: horizontal and vertical resolution trade places."""
    dpi = (meta.dpi[1], meta.dpi[0]) if meta.dpi else None
    exif = meta.exif
    if exif is not None:
        loaded = _load_exif(exif)
        if X_RESOLUTION in loaded and Y_RESOLUTION in loaded:
            loaded[X_RESOLUTION], loaded[Y_RESOLUTION] = loaded[Y_RESOLUTION], loaded[X_RESOLUTION]
            exif = _strip_header(loaded.tobytes())
    return replace(meta, dpi=dpi, exif=exif)


# -- orientation ---------------------------------------------------------------------------


def orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Applies EXIF ``orientation`` (1-8) to an (H, W[, C]) array: the upright image, contiguous."""
    if orientation == 1:
        return pixels
    transforms = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
        8: lambda a: np.rot90(a, 1),
    }
    return np.ascontiguousarray(transforms[orientation](pixels))


# -- PNG ------------------------------------------------------------------------------------


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


# How the samples of a PNG map to colours, beside an ICC profile: an HDR image tagged by cICP (BT.2100 PQ)
# read without it is taken for sRGB. Carried from PNG to PNG, as the input had them.
_PNG_COLOUR_CHUNKS = (b"gAMA", b"cHRM", b"sRGB", b"cICP", b"mDCV", b"cLLI")


def png_colour_chunks(png: bytes) -> bytes | None:
    """The colour-space chunks before the first IDAT of an encoded PNG, as they are (CRCs included); the
    first of each kind only, as the PNG specification allows one."""
    found: dict[bytes, bytes] = {}
    at = 8
    while at + 12 <= len(png):
        (length,) = struct.unpack_from(">I", png, at)
        kind, end = png[at + 4 : at + 8], at + 12 + length
        if kind == b"IDAT" or end > len(png):
            break
        if kind in _PNG_COLOUR_CHUNKS and kind not in found:
            found[kind] = png[at:end]
        at = end
    return b"".join(found.values()) or None


def png_metadata_chunks(meta: Metadata, gray: bool) -> bytes:
    """Colour-space, iCCP, pHYs, eXIf and XMP (iTXt) chunks; they go before the first IDAT."""
    chunks = meta.png_colour or b""
    icc = meta.icc_for(gray)
    if icc is not None:
        chunks += png_chunk(b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(icc))
    if meta.dpi is not None:
        x, y = (max(1, round(d / 0.0254)) for d in meta.dpi)
        chunks += png_chunk(b"pHYs", struct.pack(">IIB", x, y, 1))
    if meta.exif is not None:
        chunks += png_chunk(b"eXIf", meta.exif)
    if meta.xmp is not None:
        chunks += png_chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + meta.xmp)
    return chunks


def png_with_metadata(png: bytes, meta: Metadata, gray: bool) -> bytes:
    """Inserts the metadata chunks right after IHDR of an encoded PNG."""
    extra = png_metadata_chunks(meta, gray)
    if not extra:
        return png
    ihdr_end = 8 + 8 + struct.unpack(">I", png[8:12])[0] + 4
    return png[:ihdr_end] + extra + png[ihdr_end:]


# -- TIFF -----------------------------------------------------------------------------------


def tiff_tags(meta: Metadata, gray: bool) -> list[tuple]:
    """``tifffile`` extratags: ICC profile, XMP and the descriptive EXIF IFD0 tags."""
    tags: list[tuple] = []
    icc = meta.icc_for(gray)
    if icc is not None:
        tags.append((ICC_TAG, 7, len(icc), icc, True))
    if meta.xmp is not None:
        tags.append((XMP_TAG, 1, len(meta.xmp), meta.xmp, True))
    if meta.exif is not None:
        exif = _load_exif(meta.exif)
        for tag in _TIFF_TEXT_TAGS:
            value = exif.get(tag)
            if isinstance(value, str) and value:
                tags.append((tag, 2, 0, _stored_text(value), True))
        if ORIENTATION in exif:
            tags.append((ORIENTATION, 3, 1, 1, True))
        for tag in (EXIF_IFD, GPS_IFD):
            if exif.get_ifd(tag):
                # tifffile refuses IFD pointers: a placeholder of the next lower (unused) code keeps
                # IFD0's tag order; append_tiff_exif renames it and sets the offset.
                tags.append((tag - 1, 4, 1, 0, True))
    return tags


def tiff_with_exif(tiff: bytes, meta: Metadata) -> bytes:
    """Bytes of ``tiff`` with the EXIF and GPS IFDs appended (see ``append_tiff_exif``)."""
    import io

    if meta.exif is None:
        return tiff
    handle = io.BytesIO(tiff)
    append_tiff_exif(handle, meta)
    return handle.getvalue()


def append_tiff_exif(handle, meta: Metadata) -> None:
    """Appends the EXIF and GPS IFDs to a little-endian TIFF file and points IFD0 at them.

    ``tiff_tags`` left placeholder entries (code minus one, offset zero) in IFD0.
    """
    if meta.exif is None:
        return
    exif = _load_exif(meta.exif)
    handle.seek(0)
    header = handle.read(8)
    if header[:4] != b"II*\x00":
        raise ValueError("expected a little-endian classic TIFF")
    first = struct.unpack("<I", header[4:8])[0]
    handle.seek(first)
    count = struct.unpack("<H", handle.read(2))[0]
    entries = handle.read(12 * count)
    for i in range(count):
        tag = struct.unpack("<H", entries[12 * i : 12 * i + 2])[0] + 1
        if tag not in (EXIF_IFD, GPS_IFD):
            continue
        end = handle.seek(0, 2)
        if end % 2:
            handle.write(b"\x00")
            end += 1
        ifd = TiffImagePlugin.ImageFileDirectory_v2(prefix=b"II")
        for key, value in _stored_ifd(exif, tag).items():
            ifd[key] = value
        handle.write(ifd.tobytes(end))
        handle.seek(first + 2 + 12 * i)
        handle.write(struct.pack("<HHII", tag, 4, 1, end))
