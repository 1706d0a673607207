"""CMYK JPEGs with an embedded ICC profile: the profile, not the naive formula, sets the colours.

Print CMYK means nothing without its profile: the naive formula turns cyan ink
into (0, 255, 255), far brighter than any printed cyan.  No CMYK profile
exists on the test machines, so ``tests/icc.py`` builds one whose ink corners
are known sRGB colours; the reader must reproduce them.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from loguru import logger
from PIL import Image as PILImage
from PIL import ImageCms

from batchsr.config import Settings
from batchsr.imageio import read_image
from batchsr.runner import run_folder
from tests.conftest import Bicubic
from tests.icc import cmyk_profile, print_corners

CORNERS = print_corners()
PROFILE = cmyk_profile(CORNERS)
# Quadrants of the 32x32 test image: (row slice, column slice) -> full ink.
PATCHES = {
    "cyan": ((slice(0, 16), slice(0, 16)), (1, 0, 0, 0)),
    "magenta": ((slice(0, 16), slice(16, 32)), (0, 1, 0, 0)),
    "yellow": ((slice(16, 32), slice(0, 16)), (0, 0, 1, 0)),
    "black": ((slice(16, 32), slice(16, 32)), (0, 0, 0, 1)),
}
TOLERANCE = 4  # 8-bit levels: JPEG error plus lcms2 interpolation


def _settings(output_format: str = "same") -> Settings:
    return Settings.model_validate(
        {"engine": {"tile": 32, "overlap": 8, "batch_size": 4}, "run": {"progress": "none", "output_format": output_format}}
    )


@pytest.fixture()
def logs():
    """(level, message) of every log record while the test runs."""
    records: list[tuple[str, str]] = []
    sink = logger.add(lambda m: records.append((m.record["level"].name, m.record["message"])), level="DEBUG")
    yield records
    logger.remove(sink)


def _cmyk_jpeg(path: Path, icc: bytes | None) -> Path:
    """32x32 CMYK JPEG with four flat full-ink patches (C, M, Y, K), ``icc`` embedded."""
    cmyk = PILImage.new("CMYK", (32, 32))
    for (rows, cols), ink in PATCHES.values():
        cmyk.paste(tuple(255 * v for v in ink), (cols.start, rows.start, cols.stop, rows.stop))
    path.parent.mkdir(parents=True, exist_ok=True)
    cmyk.save(path, "JPEG", quality=95, **({"icc_profile": icc} if icc is not None else {}))
    return path


def _naive(ink) -> np.ndarray:
    return np.asarray(PILImage.new("CMYK", (1, 1), tuple(255 * v for v in ink)).convert("RGB"), int)[0, 0]


def _centre(rgb: np.ndarray, rows: slice, cols: slice, scale: int = 1) -> np.ndarray:
    """Mean colour of the middle half of a patch (away from JPEG and resampling ringing at its edges)."""
    h, w = (rows.stop - rows.start) * scale, (cols.stop - cols.start) * scale
    y, x = rows.start * scale + h // 4, cols.start * scale + w // 4
    region = rgb[y : y + h // 2, x : x + w // 2].astype(float)
    assert np.ptp(region, axis=(0, 1)).max() <= 2 * TOLERANCE, "patch centre is not flat"
    return region.reshape(-1, 3).mean(axis=0)


def test_generated_profile_is_accepted_by_lcms_and_maps_the_corners():
    """Guards the generator itself: lcms2 opens it as CMYK -> XYZ and returns each corner's colour."""
    profile = ImageCms.ImageCmsProfile(io.BytesIO(PROFILE))
    assert (profile.profile.xcolor_space, profile.profile.connection_space) == ("CMYK", "XYZ ")
    assert len(PROFILE) == int.from_bytes(PROFILE[:4], "big") and len(PROFILE) % 4 == 0 and PROFILE[36:40] == b"acsp"
    keys = sorted(CORNERS)
    strip = PILImage.new("CMYK", (len(keys), 1))
    strip.putdata([tuple(255 * v for v in key) for key in keys])
    rgb = np.asarray(ImageCms.profileToProfile(strip, io.BytesIO(PROFILE), ImageCms.createProfile("sRGB"), outputMode="RGB"), int)
    assert np.abs(rgb[0] - np.array([CORNERS[key] for key in keys])).max() <= 1


def test_embedded_profile_sets_the_colours_not_the_naive_formula(tmp_path, logs):
    """Printed cyan is (0, 158, 224), not the naive (0, 255, 255): only the profile knows, and the log says it was used."""
    path = _cmyk_jpeg(tmp_path / "print.jpg", PROFILE)
    image = read_image(path)
    assert image.rgb.dtype == np.uint8 and image.rgb.shape == (32, 32, 3) and not image.gray
    for name, ((rows, cols), ink) in PATCHES.items():
        got, want, naive = _centre(image.rgb, rows, cols), np.array(CORNERS[ink]), _naive(ink)
        apart = np.abs(want - naive).max()  # cyan 97, magenta 133, black 35, yellow 18 levels
        assert apart >= 4 * TOLERANCE, f"{name}: test profile too close to the naive formula"
        assert np.abs(got - want).max() <= TOLERANCE, (name, got.round(1), want)
        assert np.abs(got - naive).max() >= apart - TOLERANCE, (name, got.round(1), naive)
    embedded = [m for level, m in logs if "embedded ICC profile" in m]
    assert embedded and "print.jpg" in embedded[0], logs
    assert not any("naive" in m for _, m in logs), logs


@pytest.mark.parametrize("output_format, name", [("same", "print.jpg"), ("png", "print.png"), ("tiff", "print.tif"), ("webp", "print.webp")])
def test_run_folder_keeps_the_profile_colours_and_writes_untagged_rgb(tmp_path, logs, output_format, name):
    """The whole run: upscaled patches keep the profile's colours; no RGB output may carry the CMYK profile."""
    src, out = tmp_path / "in", tmp_path / "out"
    _cmyk_jpeg(src / "print.jpg", PROFILE)
    summary = run_folder(src, out, _settings(output_format), engine=Bicubic())
    assert not summary.failed, [f.reason for f in summary.failed]
    with PILImage.open(out / name) as written:
        assert written.mode == "RGB" and written.size == (128, 128)
        icc = written.info.get("icc_profile")
        rgb = np.asarray(written)
    # An RGB file tagged with a CMYK profile is misread by colour-managed viewers (or refused).
    assert icc is None or icc[16:20] == b"RGB ", f"output embeds a {icc[16:20]!r} profile"
    for patch, ((rows, cols), ink) in PATCHES.items():
        got = _centre(rgb, rows, cols, scale=4)
        assert np.abs(got - np.array(CORNERS[ink])).max() <= TOLERANCE, (patch, got.round(1), CORNERS[ink])
    assert any("embedded ICC profile" in m and "print.jpg" in m for _, m in logs), logs


def _without_a2b0(profile: bytes) -> bytes:
    at = profile.index(b"A2B0", 128)
    return profile[:at] + b"zzzz" + profile[at + 4 :]


@pytest.mark.parametrize(
    "icc",
    [
        pytest.param(b"this is not an ICC profile " * 8, id="garbage"),
        pytest.param(PROFILE[:150], id="truncated"),
        pytest.param(_without_a2b0(PROFILE), id="no-A2B0"),
        pytest.param(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes(), id="RGB-profile"),
    ],
)
def test_unusable_profile_falls_back_to_the_naive_formula_with_a_warning(tmp_path, logs, icc):
    """A broken profile must not cost the image: naive colours, and a warning naming the file."""
    image = read_image(_cmyk_jpeg(tmp_path / "broken.jpg", icc))
    for name, ((rows, cols), ink) in PATCHES.items():
        got = _centre(image.rgb, rows, cols)
        assert np.abs(got - _naive(ink)).max() <= TOLERANCE, (name, got.round(1), _naive(ink))
    warnings = [m for level, m in logs if level == "WARNING"]
    assert any("broken.jpg" in m and "profile" in m for m in warnings), logs
