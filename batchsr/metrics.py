"""Quality metrics in the super-resolution benchmark convention.

PSNR and SSIM on the BT.601 luma (Y of YCbCr, 16..235) or on RGB, ``border``
pixels cropped on every side, SSIM with the 11x11 Gaussian window (sigma 1.5)
of Wang et al. 2004.  Inputs are 8-bit-range arrays (0..255 floats or uint8);
higher bit depths are scaled to that range by the caller.
"""

from __future__ import annotations

import numpy as np
from skimage.metrics import structural_similarity

SSIM_WINDOW = 11  # the Gaussian window's side (sigma 1.5, truncated at 3.5 sigma)
_Y_WEIGHTS = np.array([65.481, 128.553, 24.966]) / 255.0


def rgb_to_y(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma of an RGB image in 0..255, as MATLAB's ``rgb2ycbcr`` (unrounded)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {rgb.shape}")
    return rgb.astype(np.float64) @ _Y_WEIGHTS + 16.0


def _crop(image: np.ndarray, border: int) -> np.ndarray:
    if border < 0:
        raise ValueError(f"border must be >= 0, got {border}")
    if border == 0:
        return image
    if image.shape[0] <= 2 * border or image.shape[1] <= 2 * border:
        raise ValueError(f"image of shape {image.shape} is too small to crop a border of {border}")
    return image[border:-border, border:-border]


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")


MAX_PSNR = 100.0  # identical images: a finite score keeps every mean (and gain) a number


def psnr(a: np.ndarray, b: np.ndarray, border: int = 0, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB over all pixels and channels, at most ``MAX_PSNR``."""
    _check_pair(a, b)
    diff = _crop(a.astype(np.float64), border) - _crop(b.astype(np.float64), border)
    mse = float(np.mean(diff * diff))
    return MAX_PSNR if mse == 0 else min(MAX_PSNR, 10.0 * np.log10(peak * peak / mse))


def ssim(a: np.ndarray, b: np.ndarray, border: int = 0, peak: float = 255.0) -> float:
    """SSIM of Wang et al. (Gaussian 11x11, sigma 1.5, K1=0.01, K2=0.03), averaged over channels."""
    _check_pair(a, b)
    a = _crop(a.astype(np.float64), border)
    b = _crop(b.astype(np.float64), border)
    if min(a.shape[:2]) < SSIM_WINDOW:
        raise ValueError(f"{a.shape[1]}x{a.shape[0]} pixels left after cropping the border: too small for SSIM's "
                         f"{SSIM_WINDOW}x{SSIM_WINDOW} window")
    return float(
        structural_similarity(
            a,
            b,
            data_range=peak,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            channel_axis=2 if a.ndim == 3 else None,
        )
    )


def luma(rgb: np.ndarray, gray: bool = False) -> np.ndarray:
    """The channel the benchmarks score: Y, or the gray value for images stored single-channel.

    Whether an image is gray is a property of its source file, never guessed
    from pixel values (Set14 ``man`` is gray content published as RGB and
    scored through Y; ``bridge`` was single-channel and is scored on gray).
    """
    return rgb[..., 0].astype(np.float64) if gray else rgb_to_y(rgb)


def score(output: np.ndarray, reference: np.ndarray, border: int, gray: bool = False) -> dict[str, float]:
    """PSNR/SSIM on luma and on RGB for an 8-bit-range pair of RGB images."""
    y_out, y_ref = luma(output, gray), luma(reference, gray)
    return {
        "psnr_y": psnr(y_out, y_ref, border),
        "ssim_y": ssim(y_out, y_ref, border),
        "psnr_rgb": psnr(output, reference, border),
        "ssim_rgb": ssim(output, reference, border),
    }
