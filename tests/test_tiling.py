"""Tiles cover the image exactly once, and tiled inference equals whole-image inference."""

from __future__ import annotations

import numpy as np
import pytest

from batchsr.tiling import plan_tiles


@pytest.mark.parametrize("h, w, tile, overlap, multiple", [(100, 37, 32, 8, 4), (5, 3, 16, 4, 4), (64, 64, 64, 0, 8), (129, 250, 48, 12, 4)])
def test_cores_partition_the_image(h, w, tile, overlap, multiple):
    plan = plan_tiles(h, w, tile, overlap, multiple)
    covered = np.zeros((h, w), int)
    for t in plan.tiles:
        y0, y1, x0, x1 = t.core
        covered[y0:y1, x0:x1] += 1
        assert t.y % multiple == 0 and t.x % multiple == 0
        wh, ww = plan.window_shape
        assert t.y <= y0 and y1 <= t.y + wh and t.x <= x0 and x1 <= t.x + ww
        assert t.y + wh <= plan.padded_height and t.x + ww <= plan.padded_width
    assert (covered == 1).all()
    assert plan.padded_height % multiple == 0 and plan.padded_width % multiple == 0
    assert plan.padded_height - h < multiple and plan.padded_width - w < multiple  # padded only as the model pads


def test_a_side_one_window_holds_is_not_cut_again():
    """150 px at tile 128 + 2 x 16: one 152 px window holds it; four copies of it would quadruple the model time."""
    plan = plan_tiles(150, 150, 128, 16, 4)
    assert plan.window_shape == (152, 152) and [t.core for t in plan.tiles] == [(0, 150, 0, 150)]
    wide = plan_tiles(40, 300, 16, 16, 4)  # a side the window holds, and one it does not
    assert plan_tiles(40, 40, 16, 16, 4).tiles == (plan_tiles(40, 40, 16, 16, 4).tiles[0],)
    assert {t.y for t in wide.tiles} == {0} and len(wide.tiles) == len(plan_tiles(16, 300, 16, 16, 4).tiles) > 1


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="0x5"):
        plan_tiles(0, 5, 16, 4, 4)


def test_tiled_equals_whole_image_on_real_photos():
    """The shipped model on real photos: tiled output within 50 dB of whole-image output, no seams."""
    from batchsr.config import EngineSettings
    from batchsr.engine import Engine
    from batchsr.imageio import read_image, to_float
    from batchsr.metrics import psnr
    from batchsr.resize import degrade
    from tests.conftest import data_dir

    engine = Engine(None, EngineSettings(tile=48, overlap=16, batch_size=4))
    single = Engine(None, EngineSettings(tile=256, overlap=0, batch_size=1))  # one window covers the image
    for name in ["baboon", "lenna"]:
        hr = read_image(data_dir("Set14", "HR") / f"{name}.png").rgb
        lr = to_float(degrade(hr, 4))
        tiled = engine.upscale([lr])[0]
        whole = single.upscale([lr])[0]
        raw = np.asarray(engine.model.predict_on_batch(lr[None]))[0]
        assert psnr(whole, raw, peak=1.0) >= 50.0  # the engine's own steps (padding, flat guard) change little
        assert psnr(tiled, raw, peak=1.0) >= 50.0
        assert tiled.shape == whole.shape == (lr.shape[0] * 4, lr.shape[1] * 4, 3)
        assert len(plan_tiles(lr.shape[0], lr.shape[1], 48, 16, engine.multiple).tiles) >= 4
        assert psnr(tiled, whole, peak=1.0) >= 50.0
        # No seams: the worst pixel is a few levels at most (the bundled model: 1.8 on
        # baboon, 4.1 on lenna at one of 262,144 pixels, 69-74 dB overall), and the rows
        # and columns where windows meet differ by a fraction of a level on average.
        diff = np.abs(tiled - whole).max(axis=2)
        assert diff.max() < 6.0 / 255
        seams = [4 * y for y in range(48, lr.shape[0], 48)]
        assert diff[seams].mean() < 0.25 / 255 and diff[:, seams].mean() < 0.25 / 255
