"""Image fidelity: bit depth, alpha, gray, palette, CMYK, orientation, metadata, animation, size.

Fixtures are generated here.  Where a check is about pixel values rather than
about the model, ``Bicubic`` stands in for the engine (exact, linear, and
faithful to flat colours); the tiny random model checks the real engine path,
and the bundled model checks the claims that depend on a trained model (no
fringe at transparent edges, flat colours unchanged).
"""

from __future__ import annotations

import csv
import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from loguru import logger
from PIL import Image as PILImage
from PIL import ImageCms, ImageOps, PngImagePlugin

from batchsr.config import EngineSettings, Settings
from batchsr.errors import ImageError
from batchsr.evaluate import evaluate_folder
from batchsr.imageio import Image, decode_image, from_float, read_image, to_float
from batchsr.pipeline import finish_image, upscale_images
from batchsr.resize import imresize
from batchsr.runner import run_folder
from tests.conftest import REPO, Bicubic

SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
XMP = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><rdf:Description tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'


@pytest.fixture(scope="module")
def engine(tiny_model):
    from batchsr.engine import Engine

    return Engine(tiny_model, EngineSettings(tile=32, overlap=8, batch_size=4))


@pytest.fixture(scope="module")
def bundled():
    from batchsr.engine import Engine

    return Engine(None, EngineSettings(tile=32, overlap=8, batch_size=4))


@pytest.fixture()
def logs():
    messages: list[str] = []
    sink = logger.add(lambda message: messages.append(message.record["message"]), level="DEBUG")
    yield messages
    logger.remove(sink)


def _settings(run: dict | None = None, image: dict | None = None) -> Settings:
    return Settings.model_validate(
        {"engine": {"tile": 32, "overlap": 8, "batch_size": 4}, "run": {"progress": "none", **(run or {})}, "image": image or {}}
    )


def _run(src: Path, out: Path, engine, run: dict | None = None, image: dict | None = None, failures: int = 0):
    summary = run_folder(src, out, _settings(run, image), engine=engine)
    assert len(summary.failed) == failures, [f.reason for f in summary.failed]
    return summary


def _save(path: Path, pil: PILImage.Image, fmt: str | None = None, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pil.save(path, fmt, **options)
    return path


def _unchanged(path: Path) -> np.ndarray:
    """Pixels as stored (OpenCV: BGR order, no orientation, no conversion)."""
    pixels = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
    assert pixels is not None, path
    return pixels


def _disk(n: int = 48):
    """Alpha planes in [0, 1] with a hard edge (left) and a soft edge (right)."""
    yy, xx = np.mgrid[:n, :n]
    r = np.hypot(yy - n / 2 + 0.5, xx - n / 2 + 0.5)
    hard = (r < n * 0.3).astype(np.float32)
    soft = np.clip((n * 0.38 - r) / (n * 0.12), 0, 1).astype(np.float32)
    return np.where(xx < n / 2, hard, soft)


# -- bit depth ------------------------------------------------------------------------------


def test_sixteen_bit_in_gives_sixteen_bit_out_with_no_eight_bit_step(tmp_path, engine):
    rng = np.random.default_rng(0)
    deep = rng.integers(0, 65536, (20, 24, 3), dtype=np.uint16)
    src = tmp_path / "in"
    src.mkdir()
    assert cv2.imwrite(str(src / "deep.png"), deep)
    tifffile.imwrite(src / "deep.tif", deep, photometric="rgb")
    assert cv2.imwrite(str(src / "eight.png"), (deep >> 8).astype(np.uint8))
    out = tmp_path / "out"
    _run(src, out, engine)
    for name in ("deep.png", "deep.tif"):
        pixels = _unchanged(out / name)
        assert pixels.dtype == np.uint16 and pixels.shape == (80, 96, 3), name
        # An 8-bit step would leave only multiples of 257.
        assert np.mean(pixels % 257 != 0) > 0.9, name
    assert _unchanged(out / "eight.png").dtype == np.uint8


def test_values_are_rounded_not_truncated_on_the_way_out():
    image = Image(np.zeros((1, 2, 3), np.uint16), None, False, "png")
    upscaled = np.empty((1, 2, 3), np.float32)
    upscaled[0, 0], upscaled[0, 1] = 1000.6 / 65535, 1000.4 / 65535
    result = finish_image(image, upscaled, 1)
    assert result.rgb.dtype == np.uint16 and result.rgb[0, :, 0].tolist() == [1001, 1000]


# -- alpha ----------------------------------------------------------------------------------


def _rgba_png(path: Path, alpha: np.ndarray, colour, hidden) -> Path:
    rgb = np.where(alpha[..., None] > 0, np.array(colour, np.uint8), np.array(hidden, np.uint8))
    return _save(path, PILImage.fromarray(np.dstack([rgb, from_float(alpha, np.uint8)]), "RGBA"))


def test_colour_under_fully_transparent_pixels_changes_nothing(tmp_path, engine):
    alpha = _disk(40)
    src = tmp_path / "in"
    for name, hidden in [("black", (0, 0, 0)), ("white", (255, 255, 255)), ("green", (0, 255, 0))]:
        _rgba_png(src / f"{name}.png", alpha, (200, 40, 30), hidden)
    out = tmp_path / "out"
    _run(src, out, engine)
    results = [_unchanged(out / f"{name}.png") for name in ("black", "white", "green")]
    assert results[0].shape == (160, 160, 4) and results[0].dtype == np.uint8
    assert np.array_equal(results[0], results[1]) and np.array_equal(results[0], results[2])
    # Flat areas of the alpha plane stay exact: transparent corners, opaque centre.
    assert results[0][:12, :12, 3].max() == 0 and results[0][76:84, 60:72, 3].min() == 255


def test_transparent_edges_get_no_fringe_with_the_bundled_model(tmp_path, bundled):
    """Colour bleeding beats premultiplying: the choice made in alpha.py, measured."""
    alpha = _disk(48)
    red = np.array([200, 30, 30])
    path = _rgba_png(tmp_path / "disk.png", alpha, red, (0, 255, 0))
    image = read_image(path)
    (colour, plane), = upscale_images(bundled, [image], "model")
    result = finish_image(image, colour, 4, alpha=plane)
    a = result.alpha.astype(np.float64) / 255
    visible = result.alpha >= 8
    error = np.abs(result.rgb.astype(np.float64) - red).max(axis=2)[visible]
    assert error.max() <= 3
    over_white = result.rgb * a[..., None] + 255 * (1 - a[..., None])
    ideal = red * a[..., None] + 255 * (1 - a[..., None])
    assert np.abs(over_white - ideal).max() <= 3
    # The alternatives fringe: raw colour (green under transparency) and premultiplied colour.
    raw = np.where(alpha[..., None] > 0, red / 255, [0, 1, 0]).astype(np.float32)
    naive, premultiplied = bundled.upscale([raw, (raw * alpha[..., None]).astype(np.float32)])
    straight = premultiplied / np.maximum(plane[..., None], 1e-6)
    for other in (naive, straight):
        other_error = np.abs(np.clip(other, 0, 1) * 255 - red).max(axis=2)[visible]
        assert other_error.max() > 30


def test_alpha_bicubic_option_and_jpeg_flattening_with_a_log_line(tmp_path, engine, logs):
    alpha = np.zeros((16, 20), np.float32)
    alpha[:, :8] = 1.0
    alpha[:, 8:11] = [0.75, 0.5, 0.25]
    src = tmp_path / "in"
    _rgba_png(src / "half.png", alpha, (255, 0, 0), (0, 0, 0))
    out = tmp_path / "bicubic"
    _run(src, out, engine, image={"alpha": "bicubic"})
    expected = from_float(imresize(from_float(alpha, np.uint8).astype(np.float32) / 255, size=(64, 80)), np.uint8)
    assert np.array_equal(_unchanged(out / "half.png")[:, :, 3], expected)
    jpeg = tmp_path / "jpeg"
    _run(src, jpeg, engine, run={"output_format": "jpg"}, image={"background": "#00ff00"})
    flat = cv2.cvtColor(_unchanged(jpeg / "half.jpg"), cv2.COLOR_BGR2RGB).astype(int)
    assert flat.shape == (64, 80, 3)
    assert np.abs(flat[8:56, 60:76] - [0, 255, 0]).max() <= 8  # transparent: the background colour
    assert np.abs(flat[8:56, 4:20] - [255, 0, 0]).max() <= 8  # opaque: the image
    assert any("flattened on #00ff00" in m and "half.png" in m for m in logs)


def test_gray_with_alpha_flattened_on_a_colour_background_takes_its_colour(tmp_path):
    """Flattening gray + alpha into JPEG or BMP on a green background wrote only the red plane: black."""
    from batchsr.imageio import encode_image

    la = np.dstack([np.full((6, 8), 128, np.uint8), np.full((6, 8), 255, np.uint8)])
    la[:, :4, 1] = 0
    image = decode_image(_save(tmp_path / "la.png", PILImage.fromarray(la, "LA")).read_bytes(), "la.png")
    assert image.gray
    for fmt in ("jpg", "bmp"):
        back = np.asarray(PILImage.open(io.BytesIO(encode_image(image, fmt, background=(0, 255, 0)))).convert("RGB"))
        assert np.abs(back[:, :3].astype(int) - [0, 255, 0]).max() <= 3, fmt  # JPEG's own error
        assert np.abs(back[:, 5:].astype(int) - 128).max() <= 3, fmt
    white = PILImage.open(io.BytesIO(encode_image(image, "bmp", background=(255, 255, 255))))
    assert white.mode == "L"  # a gray background keeps a gray image gray


def test_la_and_palette_transparency_keep_their_alpha(tmp_path):
    src = tmp_path / "in"
    la = np.zeros((12, 16, 2), np.uint8)
    la[:, :, 0] = np.arange(16, dtype=np.uint8) * 16
    la[:, 8:, 1] = 255
    _save(src / "la.png", PILImage.fromarray(la, "LA"))
    palette = PILImage.new("P", (16, 12), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * 759)
    palette.paste(1, (8, 0, 16, 6))
    palette.paste(2, (8, 6, 16, 12))
    _save(src / "p.png", palette, transparency=0)
    out = tmp_path / "out"
    _run(src, out, Bicubic())
    with PILImage.open(out / "la.png") as back:
        assert back.mode == "LA" and back.size == (64, 48)
        values = np.asarray(back)
    assert values[:, :24, 1].max() == 0 and values[:, 40:, 1].min() == 255
    with PILImage.open(out / "p.png") as back:
        assert back.mode == "RGBA"
        rgba = np.asarray(back)
    assert rgba[:, :24, 3].max() == 0 and rgba[:, 40:, 3].min() == 255
    assert (rgba[4:16, 44:60, :3] == [255, 0, 0]).all() and (rgba[32:44, 44:60, :3] == [0, 0, 255]).all()


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_premultiplied_tiff_alpha_is_made_straight(dtype):
    peak = np.iinfo(dtype).max
    pixels = np.zeros((4, 5, 4), dtype)
    pixels[..., 0], pixels[..., 3] = peak // 4, peak // 2  # a quarter of full red at half coverage: half red
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, pixels, photometric="rgb", extrasamples=["assocalpha"])
    image = decode_image(buffer.getvalue(), "premultiplied.tif")
    assert image.rgb.dtype == dtype and abs(int(image.rgb[0, 0, 0]) - peak // 2) <= 1 and image.alpha[0, 0] == peak // 2


# -- gray and palette -----------------------------------------------------------------------


def test_gray_stays_gray_and_untinted(tmp_path, engine):
    rng = np.random.default_rng(3)
    texture = rng.integers(0, 256, (16, 20), dtype=np.uint8)
    src = tmp_path / "in"
    src.mkdir()
    assert cv2.imwrite(str(src / "l8.png"), texture)
    assert cv2.imwrite(str(src / "l16.png"), texture.astype(np.uint16) * 257 + 3)
    assert cv2.imwrite(str(src / "rgb_gray.png"), np.dstack([texture] * 3))
    assert cv2.imwrite(str(src / "colour.png"), rng.integers(0, 256, (16, 20, 3), dtype=np.uint8))
    gray_palette = PILImage.fromarray(texture // 16 * 16, "L").convert("P")
    _save(src / "gray_palette.png", gray_palette)
    out = tmp_path / "out"
    _run(src, out, engine)
    l8, l16 = _unchanged(out / "l8.png"), _unchanged(out / "l16.png")
    assert l8.shape == (64, 80) and l8.dtype == np.uint8
    assert l16.shape == (64, 80) and l16.dtype == np.uint16
    for name in ("rgb_gray.png", "gray_palette.png"):
        pixels = _unchanged(out / name)
        assert pixels.shape == (64, 80, 3), name
        assert np.array_equal(pixels[:, :, 0], pixels[:, :, 1]) and np.array_equal(pixels[:, :, 1], pixels[:, :, 2]), name
    colour = _unchanged(out / "colour.png")  # the check above can fail: this random model tints
    assert not np.array_equal(colour[:, :, 0], colour[:, :, 1])


def test_palette_without_transparency_becomes_rgb(tmp_path):
    palette = PILImage.new("P", (10, 8), 0)
    palette.putpalette([10, 200, 30, 250, 250, 0] + [0] * 762)
    palette.paste(1, (5, 0, 10, 8))
    src = tmp_path / "in"
    _save(src / "p.png", palette)
    out = tmp_path / "out"
    _run(src, out, Bicubic())
    with PILImage.open(out / "p.png") as back:
        assert back.mode == "RGB" and back.size == (40, 32)
        rgb = np.asarray(back)
    assert (rgb[:, :12] == [10, 200, 30]).all() and (rgb[:, 28:] == [250, 250, 0]).all()


def test_cmyk_jpeg_is_converted_to_rgb_with_a_log_line(tmp_path, logs):
    cmyk = PILImage.new("CMYK", (32, 32), (0, 0, 0, 0))
    for box, ink in [((0, 0, 16, 16), (255, 0, 0, 0)), ((16, 0, 32, 16), (0, 255, 0, 0)),
                     ((0, 16, 16, 32), (0, 0, 255, 0)), ((16, 16, 32, 32), (0, 0, 0, 255))]:
        cmyk.paste(ink, box)
    src = tmp_path / "in"
    _save(src / "print.jpg", cmyk, quality=95)
    out = tmp_path / "out"
    _run(src, out, Bicubic())
    rgb = cv2.cvtColor(_unchanged(out / "print.jpg"), cv2.COLOR_BGR2RGB).astype(int)
    assert rgb.shape == (128, 128, 3)
    for (y, x), colour in [((20, 20), (0, 255, 255)), ((20, 100), (255, 0, 255)), ((100, 20), (255, 255, 0)), ((100, 100), (0, 0, 0))]:
        assert np.abs(rgb[y - 8 : y + 8, x - 8 : x + 8] - colour).max() <= 12, colour
    assert any("CMYK" in m and "print.jpg" in m for m in logs)


# -- orientation ----------------------------------------------------------------------------

_INVERSE = {
    2: PILImage.Transpose.FLIP_LEFT_RIGHT, 3: PILImage.Transpose.ROTATE_180, 4: PILImage.Transpose.FLIP_TOP_BOTTOM,
    5: PILImage.Transpose.TRANSPOSE, 6: PILImage.Transpose.ROTATE_90, 7: PILImage.Transpose.TRANSVERSE,
    8: PILImage.Transpose.ROTATE_270,
}


def _upright() -> np.ndarray:
    """24 x 40, red top-left and green top-right: every one of the 8 orientations looks different."""
    image = np.full((24, 40, 3), 60, np.uint8)
    image[:10, :14] = (230, 20, 20)
    image[:10, 26:] = (20, 230, 20)
    return image


def _corners_upright(rgb: np.ndarray) -> None:
    h, w = rgb.shape[:2]
    top_left = rgb[: h // 8, : w // 8].reshape(-1, 3).mean(axis=0)
    top_right = rgb[: h // 8, -w // 8 :].reshape(-1, 3).mean(axis=0)
    assert np.abs(top_left - (230, 20, 20)).max() < 20 and np.abs(top_right - (20, 230, 20)).max() < 20


def test_exif_orientation_is_applied_for_all_eight(tmp_path, logs):
    src = tmp_path / "in"
    upright = PILImage.fromarray(_upright())
    for orientation in range(1, 9):
        stored = upright if orientation == 1 else upright.transpose(_INVERSE[orientation])
        exif = PILImage.Exif()
        exif[0x0112] = orientation
        _save(src / f"o{orientation}.jpg", stored, exif=exif.tobytes(), quality=95)
        with PILImage.open(src / f"o{orientation}.jpg") as check:  # the fixture is what a phone writes
            _corners_upright(np.asarray(ImageOps.exif_transpose(check)))
        image = read_image(src / f"o{orientation}.jpg")
        assert image.rgb.shape == (24, 40, 3)
        _corners_upright(image.rgb)
    out = tmp_path / "out"
    _run(src, out, Bicubic())
    for orientation in range(1, 9):
        with PILImage.open(out / f"o{orientation}.jpg") as back:
            assert back.size == (160, 96), orientation
            assert back.getexif().get(0x0112) == 1, orientation
            _corners_upright(np.asarray(back))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_tiff_orientation_is_applied_once_for_all_eight(tmp_path, dtype):
    """Some decoder versions turn TIFFs upright themselves; the result must not depend on it."""
    from batchsr.imageio import encode_image

    upright = _upright().astype(dtype) * (257 if dtype == np.uint16 else 1)
    for orientation in range(1, 9):
        stored = np.asarray(PILImage.fromarray(_upright()).transpose(_INVERSE[orientation])) if orientation > 1 else _upright()
        stored = stored.astype(dtype) * (257 if dtype == np.uint16 else 1)
        path = tmp_path / f"o{orientation}.tif"
        tifffile.imwrite(path, stored, photometric="rgb", extratags=[(274, "H", 1, orientation, True)])
        image = read_image(path)
        assert image.rgb.dtype == dtype and np.array_equal(image.rgb, upright), orientation
        with PILImage.open(io.BytesIO(encode_image(image, "tiff"))) as back:
            assert back.getexif().get(0x0112, 1) == 1, orientation


def test_metadata_adds_no_empty_exif_blocks_nor_a_resolution(tmp_path):
    """EXIF with IFD0 tags only stays so (no empty Exif/GPS sub-IFDs); a TIFF without
    resolution tags gets none (Pillow reads such a file as 1 dpi)."""
    from batchsr.imageio import encode_image

    exif = PILImage.Exif()
    exif[0x010F] = "Acme"
    _save(tmp_path / "a.jpg", PILImage.fromarray(_upright()), exif=exif.tobytes(), quality=95)
    with PILImage.open(io.BytesIO(encode_image(read_image(tmp_path / "a.jpg"), "jpg"))) as back:
        written = back.getexif()
        assert written.get(0x010F) == "Acme" and 0x8769 not in written and 0x8825 not in written
    tifffile.imwrite(tmp_path / "plain.tif", _upright(), photometric="rgb")
    image = read_image(tmp_path / "plain.tif")
    assert image.meta.dpi is None
    with PILImage.open(io.BytesIO(encode_image(image, "tiff"))) as back:
        assert back.tag_v2.get(296, 1) == 1 and "dpi" not in back.info  # no unit: no physical size claimed


def test_sixteen_bit_gray_alpha_and_big_tiffs_read_back(tmp_path):
    """Layouts Pillow cannot open, which batchsr itself writes: 16-bit gray + alpha, and BigTIFF."""
    from batchsr.imageio import bigtiff_meta, encode_image
    from batchsr.metadata import Metadata

    gray = (np.arange(6 * 8).reshape(6, 8) * 1000).astype(np.uint16)
    alpha = np.full((6, 8), 65535, np.uint16)
    alpha[0, 0] = 0
    tifffile.imwrite(tmp_path / "la.tif", np.dstack([gray, alpha]), photometric="minisblack", extrasamples=["unassalpha"])
    image = read_image(tmp_path / "la.tif")
    assert image.gray and image.rgb.dtype == np.uint16 and np.array_equal(image.alpha, alpha)
    assert np.array_equal(image.rgb[1:, :, 0], gray[1:])
    again = decode_image(encode_image(image, "tiff"), "again")  # batchsr's own output
    assert np.array_equal(again.alpha, alpha) and np.array_equal(again.rgb, image.rgb)
    tifffile.imwrite(tmp_path / "big.tif", _upright(), photometric="rgb", bigtiff=True)
    assert np.array_equal(read_image(tmp_path / "big.tif").rgb, _upright())
    meta = Metadata(exif=b"II*\x00")
    assert bigtiff_meta((40000, 40000, 3), np.uint8, meta, "x") == (True, Metadata())  # over 4 GB: BigTIFF, no EXIF
    assert bigtiff_meta((6000, 4000, 3), np.uint16, meta, "x") == (False, meta)


def test_sixteen_bit_gray_alpha_tiff_keeps_its_metadata(tmp_path):
    """The layout batchsr writes for 16-bit gray + alpha lost its DPI, XMP and EXIF when read back."""
    from batchsr.imageio import encode_image
    from batchsr.metadata import _load_exif

    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"/>'
    tifffile.imwrite(tmp_path / "la.tif", np.full((6, 8, 2), 30000, np.uint16), photometric="minisblack",
                     extrasamples=["unassalpha"], resolution=(300, 300), resolutionunit="INCH",
                     extratags=[(700, 1, len(xmp), xmp, True), (271, 2, 0, "Acme", True)])
    image = read_image(tmp_path / "la.tif")
    again = decode_image(encode_image(image, "tiff"), "again")  # and through batchsr's own output
    for meta in (image.meta, again.meta):
        assert meta.dpi == (300.0, 300.0) and meta.xmp == xmp and _load_exif(meta.exif)[271] == "Acme"
    tifffile.imwrite(tmp_path / "ratio.tif", np.full((6, 8, 2), 30000, np.uint16), photometric="minisblack",
                     extrasamples=["unassalpha"], resolution=(150, 150), resolutionunit="NONE")
    assert read_image(tmp_path / "ratio.tif").meta.dpi is None  # unit "none": an aspect ratio, not dots per inch


def test_a_jpeg_or_webp_output_too_large_is_refused_before_the_model(tmp_path):
    from batchsr.pipeline import plan_route

    image = Image(np.zeros((8, 9000, 3), np.uint8), None, False, "png")
    route = plan_route(image, "webp", 2, Settings().run, 128, reference=False, in_use_mb=0.0)
    assert route.refusal == "18000x16 is too large for WEBP (at most 16383 pixels a side); choose png or tiff"
    assert plan_route(image, "png", 2, Settings().run, 128, reference=False, in_use_mb=0.0).refusal is None
    # With images in flight, as run plans it: refused at once, memory named nowhere in the reason.
    from batchsr.pipeline import MemoryBudget

    budget = MemoryBudget(1000.0)
    assert budget.plan("held", Image(np.zeros((8, 8, 3), np.uint8), None, False, "png"), "png", 2, Settings().run, 128,
                       reference=False, call_mb=50.0).refusal is None
    route = budget.plan("big", image, "webp", 2, Settings().run, 128, reference=False, call_mb=50.0)
    assert route is not None and route.final
    assert route.refusal == "18000x16 is too large for WEBP (at most 16383 pixels a side); choose png or tiff"


def test_sixteen_bit_white_is_zero_tiff_is_not_a_negative(tmp_path):
    gray = (np.arange(6 * 8).reshape(6, 8) * 1000).astype(np.uint16)
    tifffile.imwrite(tmp_path / "w.tif", 65535 - gray, photometric="miniswhite")
    image = read_image(tmp_path / "w.tif")
    assert image.gray and np.array_equal(image.rgb[:, :, 0], gray)


@pytest.mark.parametrize("channels", [3, 4, 2])
def test_sixteen_bit_planar_tiffs_keep_their_colours(tmp_path, channels):
    """One plane per sample (PlanarConfiguration 2): OpenCV mixed the planes up, and the run wrote wrong colours
    with exit 0 (RGB and RGBA); gray + alpha was refused as an unknown layout."""
    planes = np.random.default_rng(channels).integers(0, 65536, (channels, 6, 8), dtype=np.uint16)
    photometric = "minisblack" if channels == 2 else "rgb"
    extra = ["unassalpha"] if channels in (2, 4) else None
    tifffile.imwrite(tmp_path / "p.tif", planes, photometric=photometric, planarconfig="separate", extrasamples=extra)
    image = read_image(tmp_path / "p.tif")
    colour = np.repeat(planes[:1], 3, axis=0) if channels == 2 else planes[:3]
    assert image.rgb.dtype == np.uint16 and np.array_equal(image.rgb, np.moveaxis(colour, 0, -1))
    assert image.alpha is None if channels == 3 else np.array_equal(image.alpha, planes[-1])
    assert image.gray == (channels == 2)


def test_planar_gray_with_lzw_still_reads_and_planar_rgb_with_lzw_is_refused_by_its_compression(tmp_path, monkeypatch):
    """One sample a pixel is the same planar or not, and OpenCV reads its LZW; several samples go to tifffile,
    which decodes LZW only with another package: the reason called that corrupt data."""
    gray = (np.arange(6 * 8).reshape(6, 8) * 1000).astype(np.uint16)
    PILImage.fromarray(gray).save(tmp_path / "g.tif", compression="tiff_lzw", tiffinfo={284: 2})
    assert np.array_equal(read_image(tmp_path / "g.tif").rgb[:, :, 0], gray)
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((3, 6, 8), np.uint16), photometric="rgb", planarconfig="separate")

    def without_the_codec(self, *args, **kwargs):  # what tifffile says of LZW without imagecodecs
        raise ValueError("<COMPRESSION.LZW: 5> requires the 'imagecodecs' package")

    monkeypatch.setattr(tifffile.TiffPage, "asarray", without_the_codec)
    with pytest.raises(ImageError, match="unsupported compression for this TIFF layout") as info:
        read_image(tmp_path / "rgb.tif")
    assert "corrupt" not in str(info.value)


@pytest.mark.parametrize(
    "pixels, photometric, reason",
    [
        (np.zeros((6, 8, 3), np.float32), "rgb", "32-bit floating point TIFF"),
        (np.zeros((6, 8, 3), np.uint32), "rgb", "32-bit integer TIFF"),
        (np.zeros((6, 8, 4), np.uint16), "separated", "16-bit CMYK TIFF"),
        (np.full((6, 8), -5, np.int8), "minisblack", "8-bit signed integer TIFF"),  # was read as 251
        (np.zeros((6, 8), np.int16), "minisblack", "16-bit signed integer TIFF"),
    ],
)
def test_unsupported_tiff_sample_types_are_named(tmp_path, pixels, photometric, reason):
    tifffile.imwrite(tmp_path / "x.tif", pixels, photometric=photometric)
    with pytest.raises(ImageError, match=reason):
        read_image(tmp_path / "x.tif")


def test_camera_raw_layouts_are_refused_not_their_preview_upscaled(tmp_path):
    """A raw file whose first image is a small preview (the raw data in a SubIFD, as NEF and DNG keep it) was
    upscaled from that preview, exit 0."""
    with tifffile.TiffWriter(tmp_path / "photo.nef") as tif:
        tif.write(np.zeros((12, 16, 3), np.uint8), photometric="rgb", subfiletype=1, subifds=1)
        tif.write(np.zeros((120, 160), np.uint16), photometric="minisblack")
    with pytest.raises(ImageError, match="reduced-resolution preview"):
        read_image(tmp_path / "photo.nef")
    tifffile.imwrite(tmp_path / "raw.dng", np.zeros((12, 16), np.uint16), photometric=32803)  # colour filter array
    with pytest.raises(ImageError, match="camera raw data"):
        read_image(tmp_path / "raw.dng")
    tifffile.imwrite(tmp_path / "full.tif", np.zeros((12, 16, 3), np.uint8), photometric="rgb", subfiletype=0)
    assert read_image(tmp_path / "full.tif").size == (16, 12)  # an ordinary first image still reads


# -- metadata -------------------------------------------------------------------------------


def _tagged_png(path: Path, rgb: np.ndarray) -> Path:
    exif = PILImage.Exif()
    exif[0x010F] = "Acme"
    exif[0x0112] = 1
    exif[282] = exif[283] = 300.0
    exif[296] = 2
    sub = exif.get_ifd(0x8769)
    sub[0x9003] = "2024:05:06 07:08:09"
    sub[0xA002], sub[0xA003] = rgb.shape[1], rgb.shape[0]
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", XMP.decode())
    if rgb.dtype == np.uint8:
        return _save(path, PILImage.fromarray(rgb), icc_profile=SRGB, exif=exif.tobytes(), pnginfo=info, dpi=(300, 300))
    from batchsr.metadata import Metadata, png_with_metadata

    _, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    meta = Metadata(icc=SRGB, exif=exif.tobytes()[6:], xmp=XMP, dpi=(300.0, 300.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_with_metadata(data.tobytes(), meta, gray=False))
    return path


def _xmp_of(back: PILImage.Image) -> bytes | None:
    xmp = back.info.get("xmp") or back.info.get("XML:com.adobe.xmp")
    if xmp is None and hasattr(back, "tag_v2"):
        xmp = back.tag_v2.get(700)
    return xmp.encode() if isinstance(xmp, str) else xmp


@pytest.mark.parametrize("fmt, ext", [("png", "png"), ("jpg", "jpg"), ("webp", "webp"), ("tiff", "tif")])
def test_icc_exif_xmp_and_dpi_are_carried(tmp_path, fmt, ext):
    src = tmp_path / "in"
    gradient = np.dstack([*np.meshgrid(np.linspace(0, 255, 20), np.linspace(0, 255, 16)), np.full((16, 20), 99.0)]).astype(np.uint8)
    _tagged_png(src / "eight.png", gradient)
    _tagged_png(src / "deep.png", gradient.astype(np.uint16) * 257)
    out = tmp_path / "out"
    _run(src, out, Bicubic(), run={"output_format": fmt})
    for name in ("eight", "deep"):
        with PILImage.open(out / f"{name}.{ext}") as back:
            assert back.size == (80, 64)
            assert back.info.get("icc_profile") == SRGB, name
            exif = back.getexif()
            assert exif.get(0x010F) == "Acme" and exif.get(0x0112) == 1
            assert float(exif.get(282)) == pytest.approx(1200.0, abs=0.1)  # 300 dpi x 4: same print size
            sub = exif.get_ifd(0x8769)
            assert sub.get(0x9003) == "2024:05:06 07:08:09" and (sub.get(0xA002), sub.get(0xA003)) == (80, 64)
            xmp = _xmp_of(back)
            assert xmp is not None and b"adobe:ns:meta" in xmp and b'tiff:Orientation="1"' in xmp
            if fmt != "webp":  # WebP has no resolution field outside EXIF
                assert back.info["dpi"][0] == pytest.approx(1200.0, abs=0.1)
    if fmt in ("png", "tiff"):
        assert _unchanged(out / f"deep.{ext}").dtype == np.uint16


def test_a_bmp_keeps_its_print_size(tmp_path):
    """A 96 dpi BMP came out at 0 dpi: OpenCV writes no resolution."""
    src = tmp_path / "in"
    src.mkdir()
    PILImage.fromarray(np.full((12, 10, 3), 80, np.uint8)).save(src / "scan.bmp", dpi=(96, 150))
    _run(src, tmp_path / "out", Bicubic())
    with PILImage.open(tmp_path / "out" / "scan.bmp") as back:
        assert back.size == (40, 48) and back.info["dpi"] == pytest.approx((384, 600), abs=0.1)


def test_exif_text_beyond_ascii_is_carried_byte_for_byte(tmp_path):
    """A UTF-8 copyright ("© 2024 José") came out as "?? 2024 Jos??" in every format."""
    from batchsr.imageio import encode_image

    text = "© 2024 José".encode() + b"\0"
    ifd = struct.pack("<H", 1) + struct.pack("<HHII", 33432, 2, len(text), 26) + struct.pack("<I", 0)
    exif = b"Exif\0\0II*\0" + struct.pack("<I", 8) + ifd + text
    buffer = io.BytesIO()
    PILImage.fromarray(np.full((8, 8, 3), 9, np.uint8)).save(buffer, "JPEG", exif=exif)
    image = decode_image(buffer.getvalue(), "in.jpg")
    for fmt in ("jpg", "png", "tiff", "webp"):
        out = encode_image(image, fmt)
        assert text in out, fmt
        assert PILImage.open(io.BytesIO(out)).getexif()[33432] == PILImage.open(buffer).getexif()[33432], fmt
        assert isinstance(PILImage.open(io.BytesIO(out)).getexif()[33432], str), fmt  # still text (ASCII type), not bytes


def test_exif_text_of_tags_pillow_has_no_type_for_keeps_its_type_and_bytes():
    """LensModel (EXIF sub-IFD) and private text tags: "Objectif Ø" became "Objectif ??" (as bytes they
    would have become BYTE-typed)."""
    from batchsr.imageio import encode_image

    lens, private = "Objectif \u00d8 50".encode() + b"\0", "Priv\u00e9".encode() + b"\0"
    # IFD0 at 8: one private text tag and the EXIF pointer; the EXIF IFD at 38: LensModel; then the texts
    exif_at, texts_at = 8 + 2 + 2 * 12 + 4, 8 + 2 + 2 * 12 + 4 + 2 + 12 + 4
    ifd0 = struct.pack("<H", 2) + struct.pack("<HHII", 34665, 4, 1, exif_at) + struct.pack("<HHII", 50000, 2, len(private), texts_at)
    sub = struct.pack("<H", 1) + struct.pack("<HHII", 0xA434, 2, len(lens), texts_at + len(private))
    exif = b"Exif\0\0II*\0" + struct.pack("<I", 8) + ifd0 + struct.pack("<I", 0) + sub + struct.pack("<I", 0) + private + lens
    buffer = io.BytesIO()
    PILImage.fromarray(np.full((8, 8, 3), 9, np.uint8)).save(buffer, "JPEG", exif=exif)
    image = decode_image(buffer.getvalue(), "in.jpg")
    for fmt in ("jpg", "png", "tiff", "webp"):
        out = encode_image(image, fmt)
        back = PILImage.open(io.BytesIO(out)).getexif()
        assert lens in out and back.get_ifd(34665)[0xA434] == lens[:-1].decode("latin-1"), fmt
        if fmt != "tiff":  # a TIFF's first IFD carries the descriptive tags only
            assert private in out and back[50000] == private[:-1].decode("latin-1"), fmt


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_colour_space_chunks_are_carried_to_png(tmp_path, dtype):
    """gAMA, cHRM and cICP were dropped: an HDR PNG tagged BT.2100 PQ came out untagged, taken for sRGB."""
    from batchsr.imageio import encode_image
    from batchsr.metadata import png_chunk

    chunks = (png_chunk(b"cICP", bytes([9, 16, 0, 1])) + png_chunk(b"gAMA", struct.pack(">I", 45455))
              + png_chunk(b"cHRM", struct.pack(">8I", 31270, 32900, 64000, 33000, 30000, 60000, 15000, 6000)))
    pixels = (np.arange(6 * 8 * 3).reshape(6, 8, 3) * 7).astype(dtype)
    _, data = cv2.imencode(".png", pixels)
    data = data.tobytes()
    ihdr_end = 8 + 8 + 13 + 4
    image = decode_image(data[:ihdr_end] + chunks + data[ihdr_end:], "hdr.png")
    out = encode_image(image, "png")
    assert chunks in out and out.index(chunks) < out.index(b"IDAT")
    assert chunks not in encode_image(image, "tiff")  # PNG's own chunks: not for another format
    twice = data[:ihdr_end] + chunks + png_chunk(b"gAMA", struct.pack(">I", 100000)) + data[ihdr_end:]
    assert encode_image(decode_image(twice, "twice.png"), "png").count(b"gAMA") == 1  # one of a kind: the first


def test_a_gray_output_does_not_carry_an_rgb_profile(tmp_path):
    src = tmp_path / "in"
    _save(src / "g.png", PILImage.fromarray(np.full((8, 8), 90, np.uint8), "L"), icc_profile=SRGB)
    _save(src / "c.png", PILImage.fromarray(np.full((8, 8, 3), 90, np.uint8)), icc_profile=SRGB)
    out = tmp_path / "out"
    _run(src, out, Bicubic())
    with PILImage.open(out / "g.png") as gray, PILImage.open(out / "c.png") as colour:
        assert gray.mode == "L" and "icc_profile" not in gray.info
        assert colour.info.get("icc_profile") == SRGB


# -- animation and pages ---------------------------------------------------------------------


def test_animations_and_multi_page_tiff_take_the_first_frame_with_a_warning(tmp_path, logs):
    src = tmp_path / "in"
    src.mkdir()
    frames = [PILImage.new("P", (12, 10), i) for i in range(3)]
    for frame in frames:
        frame.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9] + [0] * 756)
    frames[0].paste(3, (0, 0, 4, 10))  # index 3 is transparent
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0, transparency=3, disposal=2)
    moving = [PILImage.new("RGB", (12, 10), (40 + 80 * i, 90, 10)) for i in range(3)]
    moving[0].save(src / "anim.webp", save_all=True, append_images=moving[1:], duration=100, lossless=True)
    tifffile.imwrite(src / "pages.tif", np.stack([np.full((10, 12, 3), v, np.uint8) for v in (70, 140, 210)]), photometric="rgb")
    out = tmp_path / "out"
    summary = _run(src, out, Bicubic())
    assert summary.done == 3 and summary.ignored == 0
    with PILImage.open(out / "anim.png") as gif:  # GIF cannot hold an upscaled image: written as PNG
        assert gif.mode == "RGBA" and gif.size == (48, 40)
        rgba = np.asarray(gif)
    assert rgba[:, :8, 3].max() == 0 and (rgba[:, 24:] == [255, 0, 0, 255]).all()
    with PILImage.open(out / "anim.webp") as webp:
        assert getattr(webp, "n_frames", 1) == 1
        assert np.abs(np.asarray(webp.convert("RGB")).astype(int) - (40, 90, 10)).max() <= 4  # lossy WebP out
    pages = tifffile.TiffFile(out / "pages.tif")
    assert len(pages.pages) == 1 and (pages.pages[0].asarray() == 70).all()
    pages.close()
    for text in ("animated GIF (3 frames)", "animated WEBP (3 frames)", "multi-page TIFF (3 pages)"):
        assert any(text in m for m in logs), text


def test_pages_are_counted_only_so_far(tmp_path, logs):
    """Counting every page (Pillow's n_frames) took 24 s over a TIFF of 20,000 tiny pages: counting stops at 100."""
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as tif:
        for value in range(150):
            tif.write(np.full((4, 4, 3), value, np.uint8), photometric="rgb", contiguous=False)
    image = decode_image(buffer.getvalue(), "pages.tif")
    assert (image.rgb == 0).all() and any("multi-page TIFF (over 100 pages)" in m for m in logs)
    data = bytearray(buffer.getvalue())  # the second page's directory pointing past the end of the file
    first_ifd = struct.unpack_from("<I", data, 4)[0]
    entries = struct.unpack_from("<H", data, first_ifd)[0]
    struct.pack_into("<I", data, first_ifd + 2 + 12 * entries, len(data) + 1000)
    assert (decode_image(bytes(data), "broken.tif").rgb == 0).all()  # was a TypeError: exit 70 for the whole run


# -- output options --------------------------------------------------------------------------


@pytest.mark.parametrize("outscale, size", [(2.0, (20, 14)), (2.5, (25, 18)), (3.0, (30, 21)), (6.0, (60, 42))])
def test_outscale_gives_the_exact_factor_and_names_follow_the_template(tmp_path, outscale, size):
    src = tmp_path / "in"
    _save(src / "flat.png", PILImage.new("RGB", (10, 7), (12, 200, 90)))
    out = tmp_path / "out"
    _run(src, out, Bicubic(), run={"outscale": outscale, "name_template": "{stem}_x{scale}{ext}"})
    name = f"flat_x{int(outscale) if outscale.is_integer() else outscale}.png"
    with PILImage.open(out / name) as back:
        assert back.size == size
        assert (np.asarray(back) == (12, 200, 90)).all()
        assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == [name]


def test_cli_outscale_and_name_template(tmp_path, tiny_model):
    src = tmp_path / "in"
    _save(src / "a.png", PILImage.new("RGB", (10, 8), (200, 100, 50)))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-m", "batchsr.cli", "run", str(src), str(tmp_path / "out"), "--model", str(tiny_model), "--progress", "none",
         "--outscale", "1.5", "--name-template", "{stem}-{scale}x{ext}", "--format", "webp"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    with PILImage.open(tmp_path / "out" / "a-1.5x.webp") as back:
        assert back.size == (15, 12)


# -- size limits -----------------------------------------------------------------------------


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")


def test_decompression_bombs_are_refused_from_the_header(tmp_path):
    with pytest.raises(ImageError) as info:
        decode_image(_png_header_only(100_000, 100_000), "bomb.png")  # 30 GB of pixels if decoded
    message = str(info.value)
    assert "bomb.png" in message and "100000x100000" in message and "200000000" in message
    src = tmp_path / "in"
    _save(src / "big.png", PILImage.new("RGB", (20, 10)))
    _save(src / "ok.png", PILImage.new("RGB", (10, 10)))
    summary = _run(src, tmp_path / "out", Bicubic(), image={"max_pixels": 100}, failures=1)
    reason = summary.failed[0].reason
    assert summary.failed[0].path.name == "big.png" and "20x10" in reason and "limit of 100 pixels" in reason
    assert summary.done == 1


def test_images_smaller_than_the_model_window_are_padded(tmp_path, engine):
    src = tmp_path / "in"
    for name, (w, h) in {"dot": (1, 1), "bar": (5, 1), "tiny": (2, 3)}.items():
        _save(src / f"{name}.png", PILImage.new("RGB", (w, h), (90, 140, 230)))
    out = tmp_path / "out"
    _run(src, out, engine)
    for name, (w, h) in {"dot": (1, 1), "bar": (5, 1), "tiny": (2, 3)}.items():
        assert _unchanged(out / f"{name}.png").shape == (4 * h, 4 * w, 3)


# -- colour ----------------------------------------------------------------------------------

_FLAT_8 = [(0, 0, 0), (255, 255, 255), (128, 128, 128), (255, 0, 0), (12, 200, 90), (250, 5, 250)]
_FLAT_16 = [(0, 0, 0), (65535, 65535, 65535), (12345, 12345, 12345), (65535, 0, 30000)]


@pytest.mark.parametrize("dtype, colours", [(np.uint8, _FLAT_8), (np.uint16, _FLAT_16)])
def test_flat_colours_survive_the_bundled_model(bundled, dtype, colours):
    images = [Image(np.full((20, 28, 3), colour, dtype), None, False, "png") for colour in colours]
    for image, colour, (upscaled, _) in zip(images, colours, upscale_images(bundled, images)):
        result = finish_image(image, upscaled, 4)
        assert result.rgb.dtype == dtype
        assert np.abs(result.rgb.astype(np.int64) - colour).max() <= 1, colour


def test_the_flat_guard_is_what_keeps_flat_colours(tiny_model):
    from batchsr.engine import Engine

    flat = to_float(np.full((20, 28, 3), 128, np.uint8))
    unguarded = Engine(tiny_model, EngineSettings(tile=32, overlap=8, flat_guard=0)).upscale([flat])[0]
    guarded = Engine(tiny_model, EngineSettings(tile=32, overlap=8)).upscale([flat])[0]
    assert np.abs(from_float(unguarded, np.uint8).astype(int) - 128).max() > 5  # a random model shifts colours
    assert (from_float(guarded, np.uint8) == 128).all()


# -- huge images -----------------------------------------------------------------------------


def test_band_by_band_output_equals_the_whole_image_path(tmp_path, engine):
    rng = np.random.default_rng(5)
    src = tmp_path / "in"
    src.mkdir()
    colour = rng.integers(0, 256, (37, 45, 3), dtype=np.uint8)
    assert cv2.imwrite(str(src / "colour.png"), colour)
    assert cv2.imwrite(str(src / "gray16.tif"), rng.integers(0, 65536, (37, 45), dtype=np.uint16))
    assert cv2.imwrite(str(src / "neutral.png"), np.dstack([colour[:, :, 0]] * 3))
    _rgba_png(src / "rgba.png", _disk(40), (30, 60, 200), (0, 0, 0))
    _save(src / "tagged.png", PILImage.fromarray(colour), icc_profile=SRGB, dpi=(72, 72))
    for alpha in ("model", "bicubic"):
        whole, banded = tmp_path / f"whole-{alpha}", tmp_path / f"banded-{alpha}"
        _run(src, whole, engine, image={"alpha": alpha})
        _run(src, banded, engine, run={"stream_megapixels": 1e-4}, image={"alpha": alpha})
        for name in ("colour.png", "gray16.tif", "neutral.png", "rgba.png", "tagged.png"):
            a, b = _unchanged(whole / name), _unchanged(banded / name)
            assert a.shape == b.shape and a.dtype == b.dtype, name
            assert np.abs(a.astype(int) - b.astype(int)).max() <= (1 if alpha == "bicubic" else 0), name
        with PILImage.open(banded / "tagged.png") as back:
            assert back.info.get("icc_profile") == SRGB and back.info["dpi"][0] == pytest.approx(288, abs=0.1)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_the_streaming_png_writer_round_trips_every_colour_type(channels, dtype):
    from batchsr.pngwriter import PNGWriter

    pixels = np.random.default_rng(channels).integers(0, np.iinfo(dtype).max + 1, (37, 23, channels), dtype=dtype)
    buffer = io.BytesIO()
    writer = PNGWriter(buffer, 23, 37, channels, dtype)
    for start in (0, 5, 30):  # bands of uneven heights
        writer.write_rows(pixels[start : {0: 5, 5: 30, 30: 37}[start]])
    writer.close()
    with PILImage.open(io.BytesIO(buffer.getvalue())) as check:
        check.verify()  # CRCs and structure
    image = decode_image(buffer.getvalue())
    colours = 1 if channels <= 2 else 3
    visible = pixels[:, :, -1] > 0 if channels in (2, 4) else np.ones((37, 23), bool)  # hidden colour is bled
    assert image.rgb.dtype == dtype and image.gray == (channels <= 2)
    assert np.array_equal(image.rgb[:, :, :colours][visible], pixels[:, :, :colours][visible])
    if channels in (2, 4):
        assert np.array_equal(image.alpha, pixels[:, :, -1])


def _big(width: int, height: int, dtype=np.uint8, alpha: bool = False) -> Image:
    """An image of that size that takes no memory: plan_route only looks at shapes."""
    rgb = np.broadcast_to(np.zeros(1, dtype), (height, width, 3))
    return Image(rgb, np.broadcast_to(np.zeros(1, dtype), (height, width)) if alpha else None, False, "png")


def test_the_memory_cap_streams_what_fits_band_by_band_and_refuses_the_rest():
    from batchsr.config import RunSettings
    from batchsr.pipeline import band_mb, plan_route, whole_mb

    run = RunSettings(memory_mb=3000)
    image = _big(10000, 10000)  # 100 MP in, 1.6 gigapixels out: whole is out of the question
    assert whole_mb(image, 4, 4.0, reference=False) > 3000 * 5
    assert 300 < band_mb(image, 4, 128) < 1000
    png = plan_route(image, "png", 4, run, 128, reference=False, in_use_mb=1500)
    assert png.streamed and png.refusal is None
    with_reference = plan_route(image, "tiff", 4, run, 128, reference=True, in_use_mb=1500)
    assert with_reference.streamed and not with_reference.metrics and "no metrics" in with_reference.note
    jpeg = plan_route(image, "jpg", 4, run, 128, reference=False, in_use_mb=1500)
    assert not jpeg.streamed and "10000x10000" in jpeg.refusal and "run.memory_mb = 3,000" in jpeg.refusal
    assert "JPG output" in jpeg.refusal and "PNG or TIFF" in jpeg.refusal
    outscale = plan_route(image, "png", 4, run.model_copy(update={"outscale": 3.0}), 128, reference=False, in_use_mb=1500)
    assert "outscale 3" in outscale.refusal
    tight = plan_route(image, "png", 4, run, 128, reference=False, in_use_mb=2750)
    assert tight.refusal is not None and "lower engine.tile" in tight.refusal
    assert plan_route(image, "png", 4, run, 16, reference=False, in_use_mb=2750).streamed  # smaller bands fit
    small = _big(640, 480, np.uint16, alpha=True)
    whole = plan_route(small, "jpg", 4, run, 128, reference=True, in_use_mb=1500)
    assert whole == type(png)(mb=whole_mb(small, 4, 4.0, reference=True))  # whole, with metrics, holding its estimate
    assert png.mb == band_mb(image, 4, 128)
    assert whole_mb(small, 4, 4.0, reference=True) > whole_mb(small, 4, 4.0, reference=False) > whole_mb(_big(640, 480), 4, 4.0, reference=False)


def test_run_holds_each_image_to_the_memory_cap(tmp_path, monkeypatch):
    rng = np.random.default_rng(9)
    src = tmp_path / "in"
    src.mkdir()
    pixels = rng.integers(0, 256, (200, 240, 3), dtype=np.uint8)
    assert cv2.imwrite(str(src / "photo.png"), pixels)
    assert cv2.imwrite(str(src / "photo2.jpg"), pixels)
    whole = tmp_path / "whole"
    _run(src, whole, Bicubic())
    for where in ("batchsr.runner", "batchsr.pipeline"):  # the estimates, not this test process
        monkeypatch.setattr(f"{where}.process_rss_mb", lambda: 1000.0)
    capped = tmp_path / "capped"
    summary = _run(src, capped, Bicubic(), run={"memory_mb": 1012}, failures=1)
    [failure] = summary.failed
    assert failure.path.name == "photo2.jpg" and "240x200" in failure.reason and "run.memory_mb = 1,012" in failure.reason
    assert not (capped / "photo2.jpg").exists()
    assert np.abs(_unchanged(capped / "photo.png").astype(int) - _unchanged(whole / "photo.png").astype(int)).max() <= 1


def test_images_that_do_not_fit_the_memory_cap_together_go_through_the_model_apart(tmp_path, monkeypatch):
    from batchsr.pipeline import whole_mb

    calls = []

    class Counting(Bicubic):
        def upscale(self, images):
            calls.append(len(images))
            return super().upscale(images)

    src = tmp_path / "in"
    src.mkdir()
    pixels = np.random.default_rng(4).integers(0, 256, (200, 240, 3), dtype=np.uint8)
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        assert cv2.imwrite(str(src / name), pixels)
    for where in ("batchsr.runner", "batchsr.pipeline"):
        monkeypatch.setattr(f"{where}.process_rss_mb", lambda: 1000.0)
    one = whole_mb(decode_image((src / "a.jpg").read_bytes()), 4, 4.0, reference=False)

    def settings(cap: float) -> Settings:  # a tile each, all three in one batch
        return Settings.model_validate({"engine": {"tile": 256, "batch_size": 8}, "run": {"progress": "none", "memory_mb": int(cap)}})

    run_folder(src, tmp_path / "roomy", settings(1000 + 3.5 * one), engine=Counting())
    assert calls == [3]
    calls.clear()
    tight = tmp_path / "tight"
    summary = run_folder(src, tight, settings(1000 + 1.5 * one), engine=Counting())
    assert calls == [1, 1, 1] and summary.done == 3  # each waited for the one before it, none refused
    assert all((tight / name).is_file() for name in ("a.jpg", "b.jpg", "c.jpg"))


def test_small_images_share_model_calls_with_images_of_their_window_shape(tmp_path):
    """Landscape and portrait thumbnails in turn: each call holds one window shape, so no batch runs half empty."""
    calls = []

    class Counting(Bicubic):
        def upscale(self, images):
            calls.append(sorted({im.shape[:2] for im in images}))
            return super().upscale(images)

    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(6)
    for k in range(8):
        size = (20, 30) if k % 2 == 0 else (30, 20)
        assert cv2.imwrite(str(src / f"{k}.png"), rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    settings = Settings.model_validate({"engine": {"tile": 64, "batch_size": 4}, "run": {"progress": "none"}})
    summary = run_folder(src, tmp_path / "out", settings, engine=Counting())
    assert summary.done == 8 and sorted(map(tuple, calls)) == [((20, 30),), ((30, 20),)], calls


def test_an_image_that_fits_whole_alone_waits_instead_of_losing_its_metrics(tmp_path, monkeypatch):
    """Beside an image in flight it would go band by band (no metrics); alone it goes whole and is scored."""
    from batchsr.pipeline import whole_mb

    src, hr = tmp_path / "in", tmp_path / "hr"
    rng = np.random.default_rng(5)
    hr.mkdir()
    src.mkdir()
    for name in ("a.png", "b.png", "c.png"):  # an output band is far smaller than the whole output
        pixels = rng.integers(0, 256, (400, 480, 3), dtype=np.uint8)
        assert cv2.imwrite(str(hr / name), pixels) and cv2.imwrite(str(src / name), pixels[::4, ::4])
    for where in ("batchsr.runner", "batchsr.pipeline"):
        monkeypatch.setattr(f"{where}.process_rss_mb", lambda: 1000.0)
    one = whole_mb(decode_image((src / "a.png").read_bytes()), 4, 4.0, reference=True)
    settings = Settings.model_validate({"engine": {"tile": 256, "batch_size": 8},
                                        "run": {"progress": "none", "memory_mb": int(1000 + 1.5 * one)}})
    summary = run_folder(src, tmp_path / "out", settings, engine=Bicubic(), reference_dir=hr)
    assert summary.done == 3 and not summary.failed
    with open(tmp_path / "out" / "metrics.csv", newline="") as handle:
        assert [row["image"] for row in csv.DictReader(handle)] == ["a.png", "b.png", "c.png", "MEAN"]


@pytest.mark.slow
def test_a_hundred_megapixel_image_is_upscaled_in_bounded_memory(tmp_path, tiny_model):
    """10000 x 10000 in, 40000 x 40000 out: peak memory stays under the configured cap, far below the 4.8 GB output."""
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_memory.py"), "--megapixels", "100", "--model", str(tiny_model),
         "--work", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, timeout=3600, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = dict(line.split("=", 1) for line in result.stdout.split() if "=" in line)
    assert (int(report["out_width"]), int(report["out_height"])) == (40000, 40000)
    assert float(report["peak_rss_mb"]) < float(report["memory_cap_mb"]) == 2500, report


# -- eval ------------------------------------------------------------------------------------


def test_eval_reads_through_the_same_module(tmp_path):
    folder = tmp_path / "hr"
    upright = np.random.default_rng(2).integers(0, 256, (64, 40, 3), dtype=np.uint8)
    exif = PILImage.Exif()
    exif[0x0112] = 6
    _save(folder / "phone.png", PILImage.fromarray(upright).transpose(PILImage.Transpose.ROTATE_90), exif=exif.tobytes())
    row = evaluate_folder(folder, 4).rows[0]
    assert (row["width"], row["height"]) == (40, 64)
    with pytest.raises(ImageError, match="limit of 1000 pixels"):
        evaluate_folder(folder, 4, max_pixels=1000)
