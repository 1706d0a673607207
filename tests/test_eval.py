"""``batchsr eval``: published bicubic figures, the model's gain, clear errors on bad input."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from batchsr.errors import ImageError, InputError
from batchsr.evaluate import evaluate_folder, markdown_table, write_csv
from batchsr.imageio import read_image
from tests.conftest import data_dir, write_png

PUBLISHED = {  # (set, scale): (PSNR-Y, SSIM-Y) of bicubic
    ("Set5", 4): (28.42, 0.8104),
    ("Set14", 4): (26.00, 0.7027),
    ("BSD100", 4): (25.96, 0.6675),
    ("Set5", 2): (33.66, 0.9299),
    ("Set14", 2): (30.24, 0.8688),
    ("BSD100", 2): (29.56, 0.8431),
}


@pytest.mark.parametrize("name, scale", sorted(PUBLISHED))
def test_eval_reproduces_published_bicubic(name, scale):
    result = evaluate_folder(data_dir(name, "HR"), scale)
    psnr, ssim = PUBLISHED[(name, scale)]
    assert abs(result.mean("bicubic_psnr_y") - psnr) <= 0.02
    assert abs(result.mean("bicubic_ssim_y") - ssim) <= 0.002


def test_eval_with_a_model_writes_csv_and_table(tiny_model, tmp_path):
    from batchsr.config import EngineSettings
    from batchsr.engine import Engine

    engine = Engine(tiny_model, EngineSettings(tile=64, overlap=8))
    result = evaluate_folder(data_dir("Set5", "HR"), 4, engine)
    assert len(result.rows) == 5
    row = result.rows[0]
    assert row["gain_psnr_y"] == pytest.approx(row["psnr_y"] - row["bicubic_psnr_y"])
    assert row["model_id"] == engine.model_id and row["ms"] > 0
    path = tmp_path / "e.csv"
    write_csv([result], path)
    rows = list(csv.DictReader(open(path)))
    assert [r["image"] for r in rows] == ["baby", "bird", "butterfly", "head", "woman", "MEAN"]
    assert float(rows[1]["psnr_rgb"]) == pytest.approx(result.rows[1]["psnr_rgb"], abs=1e-4)
    mean = rows[-1]
    assert (mean["set"], mean["scale"], mean["model_id"], mean["width"]) == ("Set5", "4", engine.model_id, "")
    assert float(mean["psnr_y"]) == pytest.approx(np.mean([float(r["psnr_y"]) for r in rows[:-1]]), abs=1e-4)
    assert float(mean["bicubic_ssim_y"]) == pytest.approx(result.mean("bicubic_ssim_y"), abs=1e-4)
    table = markdown_table([result], 4, with_model=True)
    assert "| Set5 | 4 |" in table and f"{result.mean('psnr_y'):.2f}" in table


def test_a_set_is_named_the_same_however_its_folder_is_given(tmp_path, monkeypatch):
    from batchsr.evaluate import set_name

    hr = tmp_path / "Set14" / "HR"
    hr.mkdir(parents=True)
    (tmp_path / "Set14" / "hr1").mkdir()
    monkeypatch.chdir(hr)
    assert set_name(Path(".")) == set_name(Path("../HR")) == set_name(hr) == "Set14"
    monkeypatch.chdir(tmp_path / "Set14")
    assert set_name(Path("HR")) == "Set14" and set_name(Path("hr1")) == "hr1"


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        evaluate_folder(tmp_path / "missing", 4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no images"):
        evaluate_folder(tmp_path / "empty", 4)
    mixed = tmp_path / "mixed"
    write_png(mixed / "a.png", np.zeros((40, 40, 3), np.uint8))
    (mixed / "readme.txt").write_text("hello")
    with pytest.raises(ImageError, match="readme.txt.*not an image"):
        evaluate_folder(mixed, 4)
    tiny = tmp_path / "tiny"
    write_png(tiny / "t.png", np.zeros((12, 12, 3), np.uint8))
    with pytest.raises(ImageError, match="too small to evaluate at x4"):
        evaluate_folder(tiny, 4)


def test_a_perfect_score_keeps_the_means_finite_and_rows_are_named_by_their_path(tmp_path):
    """A flat image upscales exactly (PSNR inf), which made every mean inf and the mean gain nan;
    x.png in two subfolders gave two rows named alike."""
    folder = tmp_path / "mixed"
    write_png(folder / "flat.png", np.full((48, 48, 3), 128, np.uint8))
    photo = read_image(data_dir("Set5", "HR") / "bird.png").rgb[:96, :96]
    write_png(folder / "a" / "x.png", photo)
    write_png(folder / "b" / "x.png", photo[::-1])
    result = evaluate_folder(folder, 4)
    rows = {row["image"]: row for row in result.rows}
    assert sorted(rows) == ["a/x", "b/x", "flat"]
    assert rows["flat"]["bicubic_psnr_y"] == 100.0 and rows["flat"]["bicubic_ssim_y"] == pytest.approx(1.0)
    assert np.isfinite(result.mean("bicubic_psnr_y")) and 25 < rows["a/x"]["bicubic_psnr_y"] < 40


CARD_SET5 = {2: 37.6907, 3: 33.7036, 4: 31.3097}  # Set5 Y-PSNR in the model card and README


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_each_bundled_model_beats_bicubic_on_set5_by_its_card(scale):
    """The bundled models are what their model card says: the Set5 Y-PSNR measured when they shipped."""
    from batchsr.checkpoint import BUNDLED_DIR, model_weights, read_info
    from batchsr.config import EngineSettings, ModelSettings
    from batchsr.engine import Engine

    path = BUNDLED_DIR / f"unet_x{scale}.weights.h5"
    assert model_weights(ModelSettings(scale=scale)) == path and read_info(path).scale == scale
    result = evaluate_folder(data_dir("Set5", "HR"), scale, Engine(path, EngineSettings()))
    assert result.mean("psnr_y") == pytest.approx(CARD_SET5[scale], abs=0.005)
    assert result.mean("gain_psnr_y") >= 2.0


def test_eval_times_the_model_without_tracing(tiny_model):
    """The first image of each window shape and count is run once untimed (tracing the graph) before the timed call."""
    from batchsr.config import EngineSettings
    from batchsr.engine import Engine

    # Set5's LR images whole: four window shapes (bird 72x72 and head 70x70 share one, padded); in 16-pixel tiles:
    # one window shape, and four window counts (bird and head both have 5 x 5 windows).
    for tile, warmups in ((512, 4), (16, 4)):
        engine = Engine(tiny_model, EngineSettings(tile=tile, overlap=4))
        shapes = []
        upscale = engine.upscale
        engine.upscale = lambda images, upscale=upscale: shapes.append(images[0].shape) or upscale(images)
        result = evaluate_folder(data_dir("Set5", "HR"), 4, engine)
        assert len(result.rows) == 5 and len(shapes) == 5 + warmups, (tile, shapes)
        assert shapes[0] == shapes[1]  # the first image: untimed, then timed


def test_every_folder_and_image_size_is_checked_before_anything_is_scored(tmp_path, monkeypatch):
    """A typo in the last --hr, or a 16x16 image in it, was found only after every folder before it had been
    scored, and all that work was lost."""
    import batchsr.evaluate
    from click.testing import CliRunner

    from batchsr.cli import main

    scored = []
    monkeypatch.setattr(batchsr.evaluate, "score", lambda *args: scored.append(args) or {})
    good = data_dir("Set5", "HR")
    write_png(tmp_path / "small" / "tiny.png", np.zeros((16, 16, 3), np.uint8))
    for last, message in [(tmp_path / "typo", "does not exist"), (tmp_path / "small", "16x16 is too small to evaluate at x4")]:
        result = CliRunner().invoke(main, ["eval", "--bicubic-only", "--scale", "4", "--hr", str(good), "--hr", str(last)])
        assert result.exit_code in (65, 66) and message in result.output, result.output
    assert scored == []


def test_sets_and_images_named_alike_are_told_apart(tmp_path):
    """Two Set5 folders gave two rows "Set5,MEAN" with different figures; x.png and x.jpg were both "x"; the
    same folder given twice was scored twice."""
    from batchsr.evaluate import plan_sets, set_names

    photo = read_image(data_dir("Set5", "HR") / "bird.png").rgb[:48, :48]
    for version in ("x", "y"):
        write_png(tmp_path / version / "Set5" / "HR" / "img.png", photo)
    for name in ("img.jpg", "img.png.png"):
        (tmp_path / "x" / "Set5" / "HR" / name).write_bytes((tmp_path / "x" / "Set5" / "HR" / "img.png").read_bytes())
    first, second = tmp_path / "x" / "Set5" / "HR", tmp_path / "y" / "Set5" / "HR"
    sets = plan_sets([first, second, first / ".." / "HR"], 4)
    assert [s.name for s in sets] == ["x/Set5", "y/Set5"]
    assert [label for _, label in sets[0].images] == ["img.jpg", "img.png", "img.png.png"] and [label for _, label in sets[1].images] == ["img"]
    write_png(tmp_path / "z" / "Set5" / "HR_x4" / "img.png", photo)
    write_png(tmp_path / "z" / "Set5" / "HR" / "img.png", photo)
    named = set_names([tmp_path / "z" / "Set5" / "HR", tmp_path / "z" / "Set5" / "HR_x4", data_dir("Set14", "HR")])
    assert named[2] == "Set14" and named[0] != named[1] and named[0].endswith("HR") and named[1].endswith("HR_x4")


def test_ctrl_c_in_eval_does_not_promise_a_resume(monkeypatch):
    """Ctrl-C said "a later start resumes: finished outputs are recorded" — eval records nothing."""
    import batchsr.evaluate
    from click.testing import CliRunner

    from batchsr.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(batchsr.evaluate, "evaluate_set", interrupted)
    result = CliRunner().invoke(main, ["eval", "--bicubic-only", "--scale", "4", "--hr", str(data_dir("Set5", "HR"))])
    assert result.exit_code == 130 and result.output.splitlines()[-1] == "batchsr: interrupted", result.output
