"""Image I/O: formats by content, bit depth by dtype, rounding, atomic writes."""

from __future__ import annotations

import io
import os

import cv2
import numpy as np
import pytest

from batchsr.errors import ImageError
from batchsr.imageio import atomic_write, decode_image, encode_image, from_float, read_image, to_float


def test_format_is_detected_by_content_not_extension(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    path = tmp_path / "really_a_png.jpg"
    cv2.imwrite(str(tmp_path / "x.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    path.write_bytes((tmp_path / "x.png").read_bytes())
    image = read_image(path)
    assert image.format == "png" and np.array_equal(image.rgb, rgb)


@pytest.mark.parametrize(
    "data, reason",
    [(b"", "empty file"), (b"hello world, not an image", "not a supported image"), (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "corrupt or truncated PNG")],
)
def test_bad_data_gives_the_file_and_the_reason(data, reason):
    with pytest.raises(ImageError) as info:
        decode_image(data, "some/file.png")
    assert reason in str(info.value) and "some/file.png" in str(info.value)


def test_sixteen_bit_survives_and_gray_stays_gray(tmp_path):
    pixels = np.arange(0, 65536, 257, dtype=np.uint16).reshape(16, 16)
    path = tmp_path / "g16.png"
    cv2.imwrite(str(path), pixels)
    image = read_image(path)
    assert image.rgb.dtype == np.uint16 and image.gray
    back = decode_image(encode_image(image, "png"))
    assert back.gray and back.rgb.dtype == np.uint16 and np.array_equal(back.rgb, image.rgb)


def test_from_float_rounds_and_clips():
    values = np.array([0.0, 0.4 / 255, 0.6 / 255, 254.5 / 255, 1.2, -0.1], np.float32)
    assert from_float(values, np.uint8).tolist() == [0, 0, 1, 255, 255, 0]
    assert np.array_equal(from_float(to_float(np.arange(256, dtype=np.uint8)), np.uint8), np.arange(256))


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["out.bin"]


def test_the_decoding_estimate_comes_from_the_header_and_covers_the_decoded_image(tmp_path):
    import tifffile

    from batchsr.imageio import decoding_mb, probe_decoding_mb

    rng = np.random.default_rng(2)
    eight = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    deep = rng.integers(0, 65536, (30, 50, 3), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "a.png"), eight)
    cv2.imwrite(str(tmp_path / "a.jpg"), eight)
    cv2.imwrite(str(tmp_path / "deep.png"), deep)
    tifffile.imwrite(tmp_path / "gray_alpha.tif", rng.integers(0, 65536, (30, 50, 2), dtype=np.uint16),
                     photometric="minisblack", extrasamples=["unassalpha"])  # Pillow cannot open it
    for name, sample in [("a.png", 1), ("a.jpg", 1), ("deep.png", 2), ("gray_alpha.tif", 2)]:
        estimate = probe_decoding_mb(tmp_path / name)
        assert estimate == decoding_mb(50, 30, sample), name
        image = read_image(tmp_path / name)
        held = image.rgb.nbytes + (image.alpha.nbytes if image.alpha is not None else 0)
        assert held <= estimate * 1e6 / 2, name  # what stays decoded, with the decoder's buffer beside it
    (tmp_path / "cut.png").write_bytes((tmp_path / "a.png").read_bytes()[:20])
    (tmp_path / "text.png").write_text("not an image")
    assert probe_decoding_mb(tmp_path / "cut.png") == probe_decoding_mb(tmp_path / "text.png") == 0.0
    assert probe_decoding_mb(tmp_path / "missing.png") == 0.0
    # Decoding refuses a file above image.max_pixels from its header: it holds only the file's bytes.
    assert probe_decoding_mb(tmp_path / "a.png", max_pixels=50 * 30) == decoding_mb(50, 30, 1)
    assert probe_decoding_mb(tmp_path / "a.png", max_pixels=50 * 30 - 1) == (tmp_path / "a.png").stat().st_size / 1e6


def _gray_png(values: np.ndarray, depth: int, key: int) -> bytes:
    """A gray PNG (colour type 0) of ``depth`` bits whose level ``key`` is transparent (tRNS)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b""
    for row in values:
        if depth == 16:
            packed = row.astype(">u2").tobytes()
        else:
            bits = "".join(format(int(v), f"0{depth}b") for v in row)
            bits += "0" * (-len(bits) % 8)
            packed = int(bits, 2).to_bytes(len(bits) // 8, "big")
        rows += b"\x00" + packed
    header = struct.pack(">IIBBBBB", values.shape[1], values.shape[0], depth, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"tRNS", struct.pack(">H", key))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("depth", [1, 2, 4, 8, 16])
def test_a_gray_png_with_a_transparent_level_keeps_its_transparency_at_every_bit_depth(depth):
    top = (1 << depth) - 1
    values = np.array([[0, top, top // 2, top], [top, 0, top // 2, 0]], np.uint32)
    image = decode_image(_gray_png(values, depth, key=top))
    peak = 65535 if depth == 16 else 255
    assert image.gray and image.alpha is not None and image.alpha.dtype == image.rgb.dtype
    assert image.alpha.tolist() == np.where(values == top, 0, peak).tolist()
    visible = values != top
    assert image.rgb[..., 0][visible].tolist() == (values[visible] * (peak // top)).tolist()


def test_metadata_too_long_for_a_jpeg_segment_is_dropped_not_fatal():
    """A PNG or TIFF may carry EXIF or XMP beyond the 64 kB a JPEG segment holds."""
    from PIL import Image as PILImage

    from batchsr.imageio import Image
    from batchsr.metadata import Metadata

    def exif(description: str) -> bytes:
        block = PILImage.Exif()
        block[0x010E] = description  # ImageDescription
        return block.tobytes()[6:]  # without the "Exif\0\0" header, as Metadata holds it

    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    fits = Metadata(exif=exif("x" * 60_000), xmp=b"<x/>" * 10)
    long = Metadata(exif=exif("x" * 70_000), xmp=b"<x/>" * 20_000)
    for meta, kept in [(fits, True), (long, False)]:
        data = encode_image(Image(rgb, None, False, "png", meta=meta), "jpg")
        with PILImage.open(io.BytesIO(data)) as written:
            assert ("exif" in written.info) == kept and ("xmp" in written.info) == kept


def test_a_truncated_image_gets_one_line_its_reason():
    """Nothing is said about its metadata or frames first: the file is broken, that is all."""
    from loguru import logger
    from PIL import Image as PILImage

    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    plain = cv2.imencode(".png", rgb)[1].tobytes()  # no eXIf before its pixels: Pillow looks for one after them
    exif = PILImage.Exif()
    exif[0x010F] = "Maker"
    buffer = io.BytesIO()
    PILImage.fromarray(rgb).save(buffer, "PNG", exif=exif)
    said = []
    sink = logger.add(lambda message: said.append(str(message)), level="DEBUG")
    try:
        for data in (plain, cv2.imencode(".png", rgb.astype(np.uint16) * 257)[1].tobytes()):
            with pytest.raises(ImageError, match="corrupt or truncated PNG"):
                decode_image(data[: len(data) // 2], "cut.png")
        assert decode_image(buffer.getvalue(), "whole.png").meta.exif is not None
    finally:
        logger.remove(sink)
    assert said == []


@pytest.mark.parametrize("orientation, expected", [(6, (150.0, 300.0)), (8, (150.0, 300.0)), (3, (300.0, 150.0))])
def test_a_quarter_turn_on_reading_trades_the_horizontal_and_vertical_resolution(orientation, expected):
    """A fax-like 300 x 150 dpi scan stored on its side keeps its physical size once upright."""
    from PIL import Image as PILImage
    from PIL import TiffImagePlugin

    from batchsr.metadata import X_RESOLUTION, Y_RESOLUTION, _load_exif

    exif = PILImage.Exif()
    exif[0x0112] = orientation
    exif[X_RESOLUTION], exif[Y_RESOLUTION] = TiffImagePlugin.IFDRational(300), TiffImagePlugin.IFDRational(150)
    buffer = io.BytesIO()
    PILImage.fromarray(np.zeros((10, 20, 3), np.uint8)).save(buffer, "JPEG", exif=exif, dpi=(300, 150))
    image = decode_image(buffer.getvalue(), "scan.jpg")
    carried = _load_exif(image.meta.exif)
    assert image.meta.dpi == expected and (float(carried[X_RESOLUTION]), float(carried[Y_RESOLUTION])) == expected


def test_a_temporary_is_private_until_written_then_takes_its_mode(tmp_path):
    """Made 0666 less the umask at once, a private input's output could be opened by anyone while it was
    written, and the open handle outlived the later chmod."""
    import stat

    from batchsr.imageio import _UMASK, atomic_file

    for mode, final in ((0o640, 0o640), (None, 0o666 & ~_UMASK)):
        target = tmp_path / f"out-{mode}.png"
        with atomic_file(target, mode=mode) as handle:
            handle.write(b"pixels")
            assert stat.S_IMODE(os.fstat(handle.fileno()).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(target).st_mode) == final and target.read_bytes() == b"pixels"
