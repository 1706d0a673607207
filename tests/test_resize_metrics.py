"""The degradation and the metrics, by hand on small arrays and against published figures."""

from __future__ import annotations

import numpy as np
import pytest

from batchsr.metrics import psnr, rgb_to_y, ssim
from batchsr.resize import imresize, resize_matrix


def test_resize_matrix_rows_sum_to_one_and_match_matlab_taps():
    m = resize_matrix(8, 16)  # x2 up: interior output pixel 5 (0-based) sits at source 2.25
    assert np.allclose(m.sum(axis=1), 1.0)
    x = 0.25
    expected = [(-0.5 * (1 + x) ** 3 + 2.5 * (1 + x) ** 2 - 4 * (1 + x) + 2), (1.5 * x**3 - 2.5 * x**2 + 1),
                (1.5 * (1 - x) ** 3 - 2.5 * (1 - x) ** 2 + 1), (-0.5 * (2 - x) ** 3 + 2.5 * (2 - x) ** 2 - 4 * (2 - x) + 2)]
    assert np.allclose(m[5, 1:5], expected)


def test_downscale_is_antialiased_and_keeps_flat_colour():
    flat = np.full((40, 40, 3), 173, np.uint8)
    assert np.array_equal(imresize(flat, 0.25), flat[:10, :10])
    # A one-pixel checkerboard averages out when antialiased (plain cubic sampling would alias).
    board = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.float64)
    small = imresize(board, 0.25)
    assert np.abs(small[2:-2, 2:-2] - 127.5).max() < 1.0


def test_uint8_rounds_not_truncates():
    # 0.5-level results round half away from zero like MATLAB, not down.
    image = np.array([[0, 1]], np.uint8)
    out = imresize(image, size=(1, 1))
    assert out.dtype == np.uint8 and out[0, 0] == 1


def test_psnr_and_ssim_by_hand():
    a = np.zeros((8, 8))
    b = np.full((8, 8), 5.0)
    assert psnr(a, b) == pytest.approx(10 * np.log10(255**2 / 25))
    b[0, :] = 1000  # the border row is cropped away
    assert psnr(a, b, border=1) == pytest.approx(10 * np.log10(255**2 / 25))
    assert psnr(a, a) == 100.0  # identical: capped, so that means stay finite
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 255, (32, 32))
    assert ssim(img, img) == pytest.approx(1.0)
    assert ssim(img, 255 - img) < 0


def test_ssim_constant_images_by_formula():
    # For flat images SSIM reduces to the luminance term (2*mu1*mu2 + C1) / (mu1^2 + mu2^2 + C1).
    c1 = (0.01 * 255) ** 2
    a, b = np.full((20, 20), 100.0), np.full((20, 20), 120.0)
    assert ssim(a, b) == pytest.approx((2 * 100 * 120 + c1) / (100**2 + 120**2 + c1))


def test_y_channel_bt601():
    assert rgb_to_y(np.array([[[0, 0, 0]]]))[0, 0] == pytest.approx(16.0)
    assert rgb_to_y(np.array([[[255, 255, 255]]]))[0, 0] == pytest.approx(235.0)
    assert rgb_to_y(np.array([[[255, 0, 0]]]))[0, 0] == pytest.approx(16 + 65.481)
