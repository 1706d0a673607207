"""A tiny generator of CMYK ICC profiles, for tests only.

No CMYK ICC profile exists on the test machines and nothing may be downloaded,
so the embedded-profile path of the CMYK reader is exercised with a profile
built here: ICC v2, output class ('prtr'), data colour space CMYK, PCS XYZ,
tags 'desc', 'cprt', 'wtpt' and 'A2B0' (lut16Type: CMYK -> PCS), which is all
lcms2 needs to use a profile as the source of a transform.  There is no B2A0
(PCS -> CMYK) nor 'gamt', which a printer profile would also carry by the
letter of the spec: lcms2 does not read them in this direction.

The A2B0 colour lookup table has two grid points per ink: its 16 entries are
the colours of the 16 ink corners (each ink 0 % or 100 %), given as sRGB.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

import numpy as np

Corner = tuple[int, int, int, int]  # (C, M, Y, K), each 0 (no ink) or 1 (full ink)

D50 = (0.9642, 1.0, 0.8249)  # the ICC PCS illuminant
# Linear sRGB -> XYZ (D65), IEC 61966-2-1.
_SRGB_TO_XYZ_D65 = np.array(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
)
_BRADFORD = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]])
_D65 = np.array([0.95047, 1.0, 1.08883])


def _adaptation(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Bradford chromatic adaptation matrix from white ``source`` to white ``target``."""
    cone = np.diag((_BRADFORD @ target) / (_BRADFORD @ source))
    return np.linalg.inv(_BRADFORD) @ cone @ _BRADFORD


_SRGB_TO_XYZ_D50 = _adaptation(_D65, np.array(D50)) @ _SRGB_TO_XYZ_D65


def srgb_to_xyz_d50(rgb) -> np.ndarray:
    """8-bit sRGB colour(s) to PCS XYZ (D50 adapted, white Y = 1), as the ICC sRGB profile does."""
    v = np.asarray(rgb, np.float64) / 255.0
    linear = np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)
    return linear @ _SRGB_TO_XYZ_D50.T


def _s15f16(value: float) -> bytes:
    """s15Fixed16Number: signed 32-bit, 16 fractional bits."""
    return struct.pack(">i", round(value * 65536))


def _pad4(data: bytes) -> bytes:
    return data + b"\x00" * (-len(data) % 4)


def _text_description(text: str) -> bytes:
    """textDescriptionType (v2 'desc'): ASCII part, empty Unicode part, empty ScriptCode part."""
    ascii_ = text.encode("ascii") + b"\x00"
    return (
        b"desc" + b"\x00" * 4 + struct.pack(">I", len(ascii_)) + ascii_
        + struct.pack(">II", 0, 0)  # Unicode language code, Unicode count (no Unicode text)
        + struct.pack(">HB", 0, 0) + b"\x00" * 67  # ScriptCode code, count, fixed 67-byte field
    )


def _text(text: str) -> bytes:
    """textType ('cprt' in v2): NUL-terminated ASCII."""
    return b"text" + b"\x00" * 4 + text.encode("ascii") + b"\x00"


def _xyz(xyz) -> bytes:
    """XYZType: one XYZNumber (three s15Fixed16Numbers)."""
    return b"XYZ " + b"\x00" * 4 + b"".join(_s15f16(v) for v in xyz)


def _lut16_cmyk_to_xyz(corners: Mapping[Corner, tuple[int, int, int]]) -> bytes:
    """lut16Type ('mft2'): 4 inputs, 3 outputs, 2 grid points, linear 2-entry curves.

    The matrix is the identity (the spec says it is only used for XYZ input).
    CLUT order: the first input channel (C) varies slowest; each entry holds
    X, Y, Z in the v2 16-bit PCS XYZ encoding (1.0 = 0x8000, u1Fixed15).
    """
    header = b"mft2" + b"\x00" * 4 + struct.pack(">BBBB", 4, 3, 2, 0)
    matrix = b"".join(_s15f16(1.0 if row == col else 0.0) for row in range(3) for col in range(3))
    entries = struct.pack(">HH", 2, 2)  # input and output table entries
    linear = struct.pack(">HH", 0, 0xFFFF)
    clut = []
    for c in (0, 1):
        for m in (0, 1):
            for y in (0, 1):
                for k in (0, 1):
                    xyz = srgb_to_xyz_d50(corners[(c, m, y, k)])
                    clut.extend(int(v) for v in np.clip(np.round(xyz * 32768), 0, 0xFFFF))
    return header + matrix + entries + linear * 4 + struct.pack(f">{len(clut)}H", *clut) + linear * 3


def cmyk_profile(corners: Mapping[Corner, tuple[int, int, int]], description: str = "batchsr test CMYK") -> bytes:
    """An ICC v2 CMYK printer profile whose A2B0 maps each ink corner to the given 8-bit sRGB colour.

    ``corners`` maps every (C, M, Y, K) in {0, 1}^4 to an sRGB triple; inks in
    between are interpolated (multilinearly in XYZ) by the colour engine.
    """
    missing = [(c, m, y, k) for c in (0, 1) for m in (0, 1) for y in (0, 1) for k in (0, 1) if (c, m, y, k) not in corners]
    if missing:
        raise ValueError(f"corners missing: {missing}")
    tags = [
        (b"desc", _text_description(description)),
        (b"cprt", _text("No copyright, test data")),
        (b"wtpt", _xyz(D50)),
        (b"A2B0", _lut16_cmyk_to_xyz(corners)),
    ]
    table_size = 4 + 12 * len(tags)
    offset = 128 + table_size  # 128 + 4 + 12n is a multiple of 4
    table, body = struct.pack(">I", len(tags)), b""
    for signature, data in tags:
        table += signature + struct.pack(">II", offset + len(body), len(data))
        body += _pad4(data)  # every tag starts on a 4-byte boundary; the size excludes the padding
    size = 128 + table_size + len(body)
    header = (
        struct.pack(">I", size)
        + b"\x00" * 4  # preferred CMM: none
        + struct.pack(">I", 0x02100000)  # version 2.1.0
        + b"prtr" + b"CMYK" + b"XYZ "
        + struct.pack(">6H", 2024, 1, 1, 0, 0, 0)  # creation date and time
        + b"acsp"
        + b"\x00" * 4  # primary platform
        + struct.pack(">I", 0)  # flags
        + b"\x00" * 4 + b"\x00" * 4  # device manufacturer, model
        + b"\x00" * 8  # device attributes: reflective, glossy, positive, colour
        + struct.pack(">I", 0)  # rendering intent: perceptual
        + b"".join(_s15f16(v) for v in D50)  # PCS illuminant
        + b"\x00" * 4  # creator
        + b"\x00" * 16  # profile ID (v4 only)
        + b"\x00" * 28  # reserved
    )
    assert len(header) == 128
    return header + table + body


# Realistic print colours (sRGB) of the single inks on white paper.
PAPER = (255, 255, 255)
INKS = {"C": (0, 158, 224), "M": (226, 0, 122), "Y": (255, 237, 0), "K": (35, 31, 32)}


def print_corners(paper=PAPER, inks=INKS) -> dict[Corner, tuple[int, int, int]]:
    """Plausible colours of all 16 ink corners: overprinted inks multiply their transmittance in linear light.

    With these inks, three or four inks give pure black.  That matters: lcms2
    forces black point compensation when the destination is its (v4) sRGB
    profile in perceptual intent, so a darker-than-black corner would be
    stretched to (0, 0, 0) and every dark colour shifted (K alone would come
    out near (20, 17, 16) with a 400 % black of (25, 22, 24)).
    """

    def linear(rgb):
        v = np.asarray(rgb, np.float64) / 255.0
        return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)

    def encode(lin):
        v = np.where(lin <= 0.0031308, lin * 12.92, 1.055 * np.power(lin, 1 / 2.4) - 0.055)
        return tuple(int(x) for x in np.clip(np.round(v * 255), 0, 255))

    white = linear(paper)
    factors = [linear(inks[name]) / white for name in "CMYK"]
    corners = {}
    for c in (0, 1):
        for m in (0, 1):
            for y in (0, 1):
                for k in (0, 1):
                    lin = white.copy()
                    for on, factor in zip((c, m, y, k), factors):
                        if on:
                            lin = lin * factor
                    corners[(c, m, y, k)] = encode(lin)
    return corners
