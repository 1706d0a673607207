"""``batchsr run`` end to end: folder trees, bad files, skip-if-done, exit codes, metrics."""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import importlib.util
import os
import re
import subprocess
import sys
from time import time_ns
from pathlib import Path

import numpy as np
import pytest

from batchsr.config import Settings
from batchsr.errors import InputError
from batchsr.imageio import read_image
from batchsr.metrics import score
from batchsr.resize import degrade, imresize
from batchsr.runner import run_folder
from tests.conftest import REPO, Bicubic, data_dir, deep_file, model_fails_on_a_png, write_png


def _settings(model: Path, **engine) -> Settings:
    return Settings.model_validate(
        {"model": {"weights": str(model)}, "engine": {"tile": 32, "overlap": 8, "batch_size": 4, **engine}, "run": {"progress": "none"}}
    )


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "batchsr.cli", *args], capture_output=True, text=True, cwd=cwd or REPO, env=env, timeout=300)


@pytest.fixture()
def tree(tmp_path) -> Path:
    """Real photos in a tree with a subfolder, a corrupt PNG, a truncated JPEG and a text file."""
    src = tmp_path / "in"
    hr = read_image(data_dir("Set5", "HR") / "bird.png").rgb
    write_png(src / "bird.png", degrade(hr, 4))
    write_png(src / "sub" / "deeper" / "head.png", degrade(read_image(data_dir("Set5", "HR") / "head.png").rgb, 4))
    import cv2

    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(degrade(hr, 4), cv2.COLOR_RGB2BGR))
    (src / "sub" / "photo.jpeg").write_bytes(jpeg.tobytes())
    (src / "sub" / "cut.jpg").write_bytes(jpeg.tobytes()[: len(jpeg) // 3])
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    (src / "notes.txt").write_text("not an image")
    return src


def test_run_mirrors_the_tree_and_reports_bad_files(tree, tmp_path, tiny_model):
    out = tmp_path / "out"
    summary = run_folder(tree, out, _settings(tiny_model))
    assert summary.done == 3 and summary.ignored == 1
    assert sorted(f.path.name for f in summary.failed) == ["broken.png", "cut.jpg"]
    reasons = {f.path.name: f.reason for f in summary.failed}
    assert "corrupt or truncated PNG" in reasons["broken.png"]
    for rel, lr in [("bird.png", tree / "bird.png"), ("sub/deeper/head.png", tree / "sub/deeper/head.png"), ("sub/photo.jpeg", tree / "sub/photo.jpeg")]:
        src, dst = read_image(lr), read_image(out / rel)
        assert dst.rgb.shape == (src.rgb.shape[0] * 4, src.rgb.shape[1] * 4, 3)
        assert dst.format == src.format
    assert not (out / "notes.txt").exists() and not (out / "broken.png").exists()
    assert not [p for p in out.rglob("*.tmp")]


def test_up_to_date_outputs_are_skipped_until_forced_or_changed(tree, tmp_path, tiny_model):
    out = tmp_path / "out"
    first = run_folder(tree, out, _settings(tiny_model))
    stamp = (out / "bird.png").stat().st_mtime_ns
    again = run_folder(tree, out, _settings(tiny_model))
    assert (again.done, again.skipped) == (0, first.done)
    assert (out / "bird.png").stat().st_mtime_ns == stamp
    forced = run_folder(tree, out, _settings(tiny_model), force=True)
    assert forced.done == first.done
    # New content under the same name is redone; a deleted output is redone.
    write_png(tree / "bird.png", np.full((20, 24, 3), 90, np.uint8))
    (out / "sub" / "photo.jpeg").unlink()
    changed = run_folder(tree, out, _settings(tiny_model))
    assert changed.done == 2 and changed.skipped == 1
    assert read_image(out / "bird.png").rgb.shape == (80, 96, 3)


def test_changed_output_options_redo_only_the_images_they_change(tree, tmp_path, tiny_model):
    out = tmp_path / "out"
    base = _settings(tiny_model)
    first = run_folder(tree, out, base)

    def again(**run):
        return run_folder(tree, out, base.model_copy(update={"run": base.run.model_copy(update=run)}))

    assert (again().done, again().skipped) == (0, first.done)
    jpeg_quality = again(jpeg_quality=80)  # only the JPEG output depends on it
    assert (jpeg_quality.done, jpeg_quality.skipped) == (1, first.done - 1)
    renamed = again(jpeg_quality=80, name_template="{stem}_x{scale}{ext}")
    assert renamed.done == first.done and (out / "bird_x4.png").is_file()
    outscale = again(jpeg_quality=80, name_template="{stem}_x{scale}{ext}", outscale=4.0)
    assert outscale.skipped == first.done  # the model's own scale: the same pixels
    outscale = again(jpeg_quality=80, name_template="{stem}_x{scale}{ext}", outscale=2.0)
    assert outscale.done == first.done and read_image(out / "bird_x2.png").rgb.shape[0] == read_image(tree / "bird.png").rgb.shape[0] * 2


def test_another_output_format_under_the_same_name_is_redone(tree, tmp_path, tiny_model):
    """A template without {ext} gives a PNG and a TIFF output the same name: the format must count."""
    out = tmp_path / "out"
    base = _settings(tiny_model)

    def again(output_format):
        run = base.run.model_copy(update={"output_format": output_format, "name_template": "{stem}.out"})
        return run_folder(tree, out, base.model_copy(update={"run": run}))

    first = again("png")
    assert (again("png").done, again("tiff").done) == (0, first.done)
    assert read_image(out / "bird.out").format == "tiff"


def test_engine_settings_that_change_pixels_redo_the_outputs(tree, tmp_path, tiny_model):
    """--self-ensemble (or another flat_guard, or precision) on a folder done before kept the old outputs."""
    out = tmp_path / "out"
    first = run_folder(tree, out, _settings(tiny_model))
    for engine in ({"self_ensemble": True}, {"flat_guard": 0.0}, {"precision": "mixed_bfloat16"}, {}):
        redone = run_folder(tree, out, _settings(tiny_model, **engine))
        assert (redone.done, redone.skipped) == (first.done, 0), engine
    assert run_folder(tree, out, _settings(tiny_model, tile=48, overlap=12)).skipped == first.done  # same pixels


def test_alpha_and_background_settings_redo_only_images_they_change(tmp_path, tiny_model):
    """image.background (or image.alpha) changed redid every image, transparent or not."""
    rng = np.random.default_rng(8)
    write_png(tmp_path / "in" / "opaque.png", rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    import cv2

    (tmp_path / "in" / "clear.png").write_bytes(cv2.imencode(".png", rng.integers(0, 256, (20, 24, 4), dtype=np.uint8))[1].tobytes())
    out = tmp_path / "out"

    def again(**image):
        settings = _settings(tiny_model)
        return run_folder(tmp_path / "in", out, settings.model_copy(update={"image": settings.image.model_copy(update=image)}))

    assert again().done == 2
    assert (again(background="#000000").done, again(background="#000000").skipped) == (0, 2)  # PNG keeps the alpha
    alpha = again(background="#000000", alpha="bicubic")
    assert (alpha.done, alpha.skipped) == (1, 1) and read_image(out / "clear.png").alpha is not None
    jpeg = run_folder(tmp_path / "in", tmp_path / "jpg", _settings(tiny_model).model_copy(
        update={"run": _settings(tiny_model).run.model_copy(update={"output_format": "jpg"})}))
    assert jpeg.done == 2
    flat = _settings(tiny_model)
    flat = flat.model_copy(update={"run": flat.run.model_copy(update={"output_format": "jpg"}),
                                   "image": flat.image.model_copy(update={"background": "#000000"})})
    black = run_folder(tmp_path / "in", tmp_path / "jpg", flat)
    assert (black.done, black.skipped) == (1, 1)  # flattened on another colour: only the transparent one


def test_a_write_probe_cut_off_by_a_kill_is_removed_by_the_next_run(tmp_path, tiny_model, monkeypatch):
    """The probe proving OUTPUT writable stayed in the user's folder when a kill fell between its write and unlink."""
    from pathlib import Path as PathType

    write_png(tmp_path / "in" / "a.png", np.zeros((8, 8, 3), np.uint8))
    real_unlink = PathType.unlink

    def killed(self, *args, **kwargs):
        if self.name.startswith(".batchsr-probe-"):
            raise KeyboardInterrupt  # stands in for the kill: the probe stays
        return real_unlink(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(PathType, "unlink", killed)
        with pytest.raises(KeyboardInterrupt):
            run_folder(tmp_path / "in", tmp_path / "out", _settings(tiny_model))
    (left,) = (tmp_path / "out").glob(".batchsr-probe-*")
    left.rename(left.with_name(left.name.replace(str(os.getpid()), "99999")))  # a process gone since (the next run's pid differs)
    assert run_folder(tmp_path / "in", tmp_path / "out", _settings(tiny_model)).done == 1
    assert not list((tmp_path / "out").glob(".batchsr-probe-*"))


def test_outputs_written_before_ctrl_c_are_recorded(tmp_path, tiny_model, monkeypatch):
    """Interrupted runs left finished outputs unrecorded: the next run made them again."""
    import batchsr.runner

    rng = np.random.default_rng(9)
    for name in ("a.png", "b.png"):
        write_png(tmp_path / "in" / name, rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    real = batchsr.runner.output_name

    def interrupt_at_b(rel, *args, **kwargs):
        if rel.name == "b.png":
            raise KeyboardInterrupt
        return real(rel, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(batchsr.runner, "output_name", interrupt_at_b)
        with pytest.raises(KeyboardInterrupt):
            run_folder(tmp_path / "in", tmp_path / "out", _settings(tiny_model, batch_size=1))
    assert (tmp_path / "out" / "a.png").exists()
    again = run_folder(tmp_path / "in", tmp_path / "out", _settings(tiny_model))
    assert (again.done, again.skipped) == (1, 1)


def test_a_journal_from_before_output_options_still_skips(tree, tmp_path, tiny_model):
    import sqlite3

    out = tmp_path / "out"
    first = run_folder(tree, out, _settings(tiny_model))
    db = sqlite3.connect(out / ".batchsr" / "journal.sqlite")
    db.execute("ALTER TABLE outputs DROP COLUMN options")
    db.commit()
    db.close()
    again = run_folder(tree, out, _settings(tiny_model))
    assert (again.done, again.skipped) == (0, first.done)


def test_reference_metrics_match_a_recomputation(tmp_path, tiny_model):
    hr_dir, lr_dir = tmp_path / "hr", tmp_path / "lr"
    for name in ["baby", "woman"]:
        hr = read_image(data_dir("Set5", "HR") / f"{name}.png").rgb
        write_png(hr_dir / f"{name}.png", hr)
        write_png(lr_dir / f"{name}.png", degrade(hr, 4))
    out = tmp_path / "out"
    summary = run_folder(lr_dir, out, _settings(tiny_model), reference_dir=hr_dir)
    rows = list(csv.DictReader(open(summary.metrics_csv)))
    assert [r["image"] for r in rows] == ["baby.png", "woman.png", "MEAN"]
    for row in rows[:2]:
        sr = read_image(out / row["image"]).rgb.astype(np.float64)
        hr = read_image(hr_dir / row["image"]).rgb.astype(np.float64)
        lr = read_image(lr_dir / row["image"]).rgb
        ours = score(sr, hr, 4)
        bicubic = score(imresize(lr, size=hr.shape[:2]).astype(np.float64), hr, 4)
        assert float(row["psnr_y"]) == pytest.approx(ours["psnr_y"], abs=1e-3)
        assert float(row["ssim_rgb"]) == pytest.approx(ours["ssim_rgb"], abs=1e-3)
        assert float(row["bicubic_psnr_y"]) == pytest.approx(bicubic["psnr_y"], abs=1e-3)
        assert float(row["gain_psnr_y"]) == pytest.approx(ours["psnr_y"] - bicubic["psnr_y"], abs=2e-3)
    mean = rows[2]
    assert float(mean["psnr_y"]) == pytest.approx(np.mean([float(r["psnr_y"]) for r in rows[:2]]), abs=1e-3)


def test_metrics_follow_the_reference_and_the_written_file(tmp_path, tiny_model):
    """Scores are redone against a new reference folder, JPEG outputs are scored as written, an input
    without a reference is not redone on every run, and metrics.csv never keeps stale rows."""
    import cv2

    hr_dir, blurred, lr_dir = tmp_path / "hr", tmp_path / "blurred", tmp_path / "lr"
    hr = read_image(data_dir("Set5", "HR") / "bird.png").rgb[:96, :96]
    write_png(hr_dir / "bird.png", hr)
    write_png(blurred / "bird.png", cv2.GaussianBlur(hr, (0, 0), 2))
    write_png(lr_dir / "bird.png", degrade(hr, 4))
    write_png(lr_dir / "alone.png", degrade(hr, 4)[:12])  # no reference anywhere
    out = tmp_path / "out"

    def rows(summary):
        return {r["image"]: r for r in csv.DictReader(open(summary.metrics_csv))}

    first = run_folder(lr_dir, out, _settings(tiny_model), reference_dir=hr_dir)
    scored = rows(first)
    assert first.done == 2 and list(scored) == ["bird.png", "MEAN"]
    again = run_folder(lr_dir, out, _settings(tiny_model), reference_dir=hr_dir)
    assert (again.done, again.skipped) == (0, 2)  # alone.png too: its missing reference was recorded
    other = run_folder(lr_dir, out, _settings(tiny_model), reference_dir=blurred)
    assert other.done == 1 and rows(other)["bird.png"]["psnr_y"] != scored["bird.png"]["psnr_y"]

    def with_run(**changes):
        settings = _settings(tiny_model)
        return settings.model_copy(update={"run": settings.run.model_copy(update=changes)})

    lossy = run_folder(lr_dir, tmp_path / "jpg", with_run(output_format="jpg", jpeg_quality=30), reference_dir=hr_dir)
    written = read_image(tmp_path / "jpg" / "bird.jpg").rgb.astype(np.float64)
    assert float(rows(lossy)["bird.png"]["psnr_y"]) == pytest.approx(score(written, hr.astype(np.float64), 4)["psnr_y"], abs=1e-3)
    write_png(tmp_path / "half" / "bird.png", imresize(hr, 0.5))
    halved = run_folder(lr_dir, tmp_path / "x2", with_run(outscale=2.0), reference_dir=tmp_path / "half")
    assert rows(halved)["bird.png"]["scale"] == "2" and rows(halved)["MEAN"]["scale"] == "2"

    write_png(lr_dir / "bird.png", degrade(hr, 4)[:20])  # new content, run without references: its old row goes
    plain = run_folder(lr_dir, out, _settings(tiny_model))
    assert plain.done == 1 and not (out / "metrics.csv").exists()


def _scored_then_reference_touched(tmp_path: Path, tiny_model: Path):
    """``in/a.png`` upscaled and scored against ``hr/a.png``, whose times then change (its bytes do not)."""
    src, hr, out = tmp_path / "in", tmp_path / "hr", tmp_path / "out"
    pixels = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    write_png(hr / "a.png", pixels)
    write_png(src / "a.png", degrade(pixels, 4))
    settings = _settings(tiny_model)
    assert run_folder(src, out, settings, reference_dir=hr).done == 1
    os.utime(hr / "a.png", ns=(1_000_000_000, 1_000_000_000))
    return src, hr, out, pixels, settings


def test_a_touched_or_unmounted_reference_folder_does_not_redo_the_archive(tmp_path, tiny_model, monkeypatch):
    """References copied again (new times, same bytes) redid every image; an empty reference folder (a share
    not mounted) redid them all unscored, removed metrics.csv and exited 0, and its return redid them again."""
    import batchsr.runner

    src, hr, out, pixels, settings = _scored_then_reference_touched(tmp_path, tiny_model)
    with monkeypatch.context() as patch:  # the new times in one transaction, not an image's full record each
        patch.setattr(batchsr.runner.Journal, "record", lambda *args: pytest.fail("recorded one by one"))
        assert (run_folder(src, out, settings, reference_dir=hr).done, (out / "metrics.csv").exists()) == (0, True)
    with monkeypatch.context() as patch:  # its new time recorded: not read again at the next run
        patch.setattr(batchsr.runner, "_file_sha256", lambda path: pytest.fail(f"{path} read again"))
        assert run_folder(src, out, settings, reference_dir=hr).skipped == 1
    (hr / ".DS_Store").write_bytes(b"")  # hidden files of a mount point do not count
    write_png(hr / "a.png", pixels[::-1])  # new content: scored again
    assert run_folder(src, out, settings, reference_dir=hr).done == 1
    (hr / "a.png").unlink()
    with pytest.raises(InputError, match="reference folder .* is empty"):
        run_folder(src, out, settings, reference_dir=hr)
    assert (out / "metrics.csv").exists()


def test_recording_an_output_looks_up_its_earlier_owner_by_index(tmp_path):
    """Each image's record scanned the whole journal for the output's earlier owner: 50 ms an image at 100,000
    entries, the first pass of a large archive growing with the square of its size."""
    from batchsr.runner import Journal

    journal = Journal(tmp_path / "journal.sqlite")
    try:
        plan = " ".join(str(row) for row in journal.db.execute(
            "EXPLAIN QUERY PLAN DELETE FROM outputs WHERE output = ? AND input != ?", ("a.png", "a.png")))
    finally:
        journal.close()
    assert "USING INDEX" in plan or "USING COVERING INDEX" in plan, plan


def test_references_found_touched_are_kept_when_the_run_stops_early(tmp_path, tiny_model, monkeypatch):
    """The new times of touched references were kept for the end of the run: a Ctrl-C before it lost them, and
    the next run read every such reference again."""
    import batchsr.runner

    src, hr, out, _, settings = _scored_then_reference_touched(tmp_path, tiny_model)
    write_png(src / "b.png", np.full((8, 8, 3), 9, np.uint8))
    named = batchsr.runner.output_name

    def interrupted(rel, *args, **kwargs):
        if Path(rel).name == "b.png":
            raise KeyboardInterrupt
        return named(rel, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(batchsr.runner, "output_name", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_folder(src, out, settings, reference_dir=hr)
    with monkeypatch.context() as patch:
        patch.setattr(batchsr.runner, "_file_sha256", lambda path: pytest.fail(f"{path} read again"))
        summary = run_folder(src, out, settings, reference_dir=hr)
    assert (summary.done, summary.skipped) == (1, 1)


def test_metrics_keep_the_rows_of_outputs_on_disk_and_the_file_as_the_user_left_it(tmp_path, tiny_model):
    """An empty (unmounted) input folder removed metrics.csv, a deleted input its row though its output stayed;
    each run replaced the file even when unchanged (a new inode, the mode 0600 given to it widened to 0644); and
    a metrics.csv of the user's own in OUTPUT was deleted."""
    src, hr, out = tmp_path / "in", tmp_path / "hr", tmp_path / "out"
    for name, seed in (("a", 1), ("b", 2)):
        pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        write_png(hr / f"{name}.png", pixels)
        write_png(src / f"{name}.png", degrade(pixels, 4))
    settings = _settings(tiny_model)
    run_folder(src, out, settings, reference_dir=hr)
    metrics = out / "metrics.csv"

    def images() -> list[str]:
        return [row["image"] for row in csv.DictReader(metrics.open())]

    assert images() == ["a.png", "b.png", "MEAN"]
    metrics.chmod(0o600)
    inode = metrics.stat().st_ino
    run_folder(src, out, settings, reference_dir=hr)  # nothing changed
    assert metrics.stat().st_ino == inode
    (src / "b.png").unlink()
    run_folder(src, out, settings, reference_dir=hr)
    assert images() == ["a.png", "b.png", "MEAN"]  # b's output is still there
    (out / "b.png").unlink()
    (src / "a.png").rename(tmp_path / "a.png")  # an empty input folder: a share not mounted
    run_folder(src, out, settings, reference_dir=hr)
    assert images() == ["a.png", "MEAN"] and metrics.stat().st_mode & 0o777 == 0o600
    mine = tmp_path / "mine"
    (mine / "metrics.csv").parent.mkdir()
    (mine / "metrics.csv").write_text("my notes\n")
    (tmp_path / "mine_in").mkdir()
    run_folder(tmp_path / "mine_in", mine, settings)
    assert (mine / "metrics.csv").read_text() == "my notes\n"


def test_names_that_look_like_spreadsheet_formulas_are_written_as_text(tmp_path, tiny_model):
    """A producer's "=HYPERLINK(...).png" went into metrics.csv as it is: a formula once opened in a spreadsheet."""
    from batchsr.runner import file_name, spreadsheet_text

    src, hr, out = tmp_path / "in", tmp_path / "hr", tmp_path / "out"
    names = ["=HYPERLINK(1).png", "+a.png", "-b.png", "@c.png", "'d.png", "plain.png", "MEAN"]
    for k, name in enumerate(names):
        pixels = np.random.default_rng(k).integers(0, 256, (48, 48, 3), dtype=np.uint8)
        write_png(hr / (name if name.endswith(".png") else f"{name}.png"), pixels)  # a reference of any extension
        write_png(src / f"{name}.png", degrade(pixels, 4))
        (src / f"{name}.png").rename(src / name)  # the image's own name (MEAN has no extension)
    run_folder(src, out, _settings(tiny_model), reference_dir=hr)
    cells = [row["image"] for row in csv.DictReader((out / "metrics.csv").open())][:-1]
    assert sorted(cells) == sorted(["'=HYPERLINK(1).png", "'+a.png", "'-b.png", "'@c.png", "''d.png", "plain.png", "'MEAN"])
    assert sorted(map(file_name, cells)) == sorted(names)  # and a file named MEAN is not taken for the mean
    assert all(file_name(spreadsheet_text(n)) == n for n in ["'", "''", "'x", "=", "x=", "'=", "", "MEAN", "'MEAN", "MEANS"])


def test_a_colliding_input_never_takes_an_up_to_date_output(tmp_path, tiny_model):
    """a.jpg and a.png both become a.png: the first keeps it on every run, the second fails each time."""
    src, out = tmp_path / "in", tmp_path / "out"
    write_png(src / "a.png", np.full((12, 10, 3), 30, np.uint8))
    import cv2

    (src / "a.jpg").write_bytes(cv2.imencode(".jpg", np.full((12, 10, 3), 220, np.uint8))[1].tobytes())
    settings = _settings(tiny_model).model_copy(update={"run": Settings().run.model_copy(update={"output_format": "png", "progress": "none"})})
    for attempt in range(2):
        summary = run_folder(src, out, settings)
        assert [f.path.name for f in summary.failed] == ["a.png"], attempt
        assert "would overwrite the output of" in summary.failed[0].reason
        assert read_image(out / "a.png").rgb.mean() > 150, attempt  # still a.jpg's upscale
    # An input added later that sorts first does not take an output another input owns.
    (src / "a.jpg").rename(tmp_path / "a.jpg")
    assert run_folder(src, out, settings).done == 1 and read_image(out / "a.png").rgb.mean() < 80
    (tmp_path / "a.jpg").rename(src / "a.jpg")
    summary = run_folder(src, out, settings)
    assert [f.path.name for f in summary.failed] == ["a.jpg"] and summary.skipped == 1
    assert read_image(out / "a.png").rgb.mean() < 80


def test_problem_files_and_folders_are_reported_and_links_followed(tmp_path, tiny_model):
    src, out = tmp_path / "in", tmp_path / "out"
    write_png(src / "a.png", np.full((12, 10, 3), 90, np.uint8))
    write_png(tmp_path / "elsewhere" / "b.png", np.full((12, 10, 3), 90, np.uint8))
    (src / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (src / "loop").symlink_to(src, target_is_directory=True)  # back up the tree: listed once, not forever
    (src / "gone.png").symlink_to(tmp_path / "missing.png")
    (src / "empty.txt").write_bytes(b"")  # empty, and not an image by name: ignored, not failed
    (src / "empty.png").write_bytes(b"")
    odd = os.fsdecode(b"odd\xffname.png")
    (src / odd).write_bytes((src / "a.png").read_bytes())
    stale = out / "sub" / ".batchsr-x.png.k2j3h4ab.tmp"  # what a run killed while writing leaves
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"partial")
    older = out / "sub" / ".y.png.k2j3h4ab.tmp"  # the same, named by an earlier version, beside its output
    older.write_bytes(b"partial")
    (out / "sub" / "y.png").write_bytes(b"an output")
    notes = out / "sub" / ".notes.tmp"  # someone else's: not removed (it was, as a "temporary")
    notes.write_bytes(b"mine")
    summary = run_folder(src, out, _settings(tiny_model))
    assert summary.done == 2 and summary.ignored == 1
    assert (out / "a.png").is_file() and (out / "linked" / "b.png").is_file()
    reasons = {f.path.name: f.reason for f in summary.failed}
    assert set(reasons) == {"gone.png", "empty.png", odd}
    assert "broken link" in reasons["gone.png"] and "not valid UTF-8" in reasons[odd]
    assert not stale.exists() and not older.exists() and notes.read_bytes() == b"mine"


def test_a_folder_also_reached_through_a_link_is_named_by_its_own_path(tmp_path):
    """Which name a folder reached twice got hung on the order the file system lists entries in: the same
    tree on another disk renamed, so upscaled again, every image under it."""
    from batchsr.data import list_files

    src = tmp_path / "in"
    for rel in ("real/x.png", "b/deep/y.png", "a/z.png"):
        write_png(src / rel, np.full((4, 4, 3), 9, np.uint8))
    (src / "alias").symlink_to("real", target_is_directory=True)  # listed before "real" in name order
    (src / "a" / "back").symlink_to("../b", target_is_directory=True)  # a link met before the folder itself
    (src / "a" / "outside").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    write_png(tmp_path / "elsewhere" / "w.png", np.full((4, 4, 3), 9, np.uint8))
    names = [p.relative_to(src).as_posix() for p in list_files(src)]
    assert names == ["a/outside/w.png", "a/z.png", "b/deep/y.png", "real/x.png"]


@pytest.mark.parametrize("layout", ["same", "input inside output"])
def test_an_output_folder_holding_the_input_is_refused(tmp_path, tiny_model, layout):
    from batchsr.errors import OutputError

    src = tmp_path / "in" if layout == "same" else tmp_path / "out" / "in"
    write_png(src / "a.png", np.full((12, 10, 3), 90, np.uint8))
    out = src if layout == "same" else tmp_path / "out"
    with pytest.raises(OutputError, match="contains it"):
        run_folder(src, out, _settings(tiny_model))
    assert not (out / ".batchsr").exists() and [p.name for p in src.iterdir()] == ["a.png"]


@pytest.mark.parametrize("streamed", [False, True])
def test_a_linked_folder_inside_the_output_is_not_written_through(tmp_path, tiny_model, streamed):
    """OUT/sub, a link to IN/sub: each run wrote its output over the input, 4x larger at each run."""
    src, out = tmp_path / "in", tmp_path / "out"
    write_png(src / "sub" / "deeper" / "bird.png", np.full((6, 7, 3), 40, np.uint8))
    write_png(src / "top.png", np.full((5, 5, 3), 90, np.uint8))
    before = (src / "sub" / "deeper" / "bird.png").read_bytes()
    out.mkdir()
    (out / "sub").symlink_to(src / "sub")
    settings = _settings(tiny_model)
    settings = settings.model_copy(update={"run": settings.run.model_copy(update={"stream_megapixels": 0.0001 if streamed else 16.0})})
    summary = run_folder(src, out, settings)
    assert summary.done == 1 and [f.reason for f in summary.failed] == [
        f"output not written: {out / 'sub'} is a symbolic link; batchsr does not write through links inside the folders "
        f"it writes (link the top folder itself instead)"]
    assert (src / "sub" / "deeper" / "bird.png").read_bytes() == before and os.listdir(src / "sub" / "deeper") == ["bird.png"]
    assert (out / "top.png").is_file()


def test_a_lock_is_free_only_when_no_process_holds_it_or_there_is_none(tmp_path):
    """/proc/locks misses locks held from another PID namespace or NFS client, and reading it raised
    PermissionError (exit 70) for a nested .batchsr/ this user could not search."""
    from batchsr.lock import FolderLock, lock_is_free

    lock = tmp_path / ".batchsr" / "lock"
    assert lock_is_free(lock)  # none
    with FolderLock(lock):
        assert not lock_is_free(lock)
    assert lock_is_free(lock)
    (tmp_path / "file").write_text("x")
    assert not lock_is_free(tmp_path / "file" / "lock")  # cannot be looked at: taken as held


def test_making_folders_within_a_tree_refuses_links_at_any_depth_and_takes_any_path(tmp_path):
    """Linear in the depth (the first version was quadratic: 136 ms a write 1,000 folders down); a folder not
    below ``within`` raised ValueError, which the daemon's move to done/ did not catch."""
    from batchsr.imageio import LinkedFolderError, make_folders

    root = tmp_path / "out"
    make_folders(root / "a" / "b", root)
    (tmp_path / "elsewhere").mkdir()
    (root / "a" / "b" / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(LinkedFolderError, match="link is a symbolic link"):
        make_folders(root / "a" / "b" / "link" / "c", root)
    assert not (tmp_path / "elsewhere" / "c").exists()
    make_folders(tmp_path / "other" / "x", root)  # not below: made, unchecked
    make_folders(Path(os.path.relpath(root / "r", Path.cwd())), root)  # relative against absolute
    assert (tmp_path / "other" / "x").is_dir() and (root / "r").is_dir()


def test_output_folders_of_other_runs_inside_the_input_are_not_read_and_their_temporaries_not_removed(tmp_path, tiny_model):
    """photos/x2 and photos/x4 of two cron jobs on photos/: each run upscaled the other's outputs, nesting deeper
    (photos/x2/x4/x2/baby.png); and a run's start removed the live temporaries of a run into a folder inside its
    own OUTPUT."""
    photos = tmp_path / "photos"
    write_png(photos / "baby.png", np.full((6, 7, 3), 40, np.uint8))
    settings = _settings(tiny_model)
    for out in ("x2", "x4", "x2"):
        run_folder(photos, photos / out, settings)
    assert sorted(p.relative_to(photos).as_posix() for p in photos.rglob("*.png") if ".batchsr" not in p.parts) == [
        "baby.png", "x2/baby.png", "x4/baby.png"]
    from batchsr.lock import FolderLock

    live = photos / "x2" / "inner" / ".batchsr-live.png.abcdefgh.tmp"  # another run writing into photos/x2/inner
    (photos / "x2" / "inner" / ".batchsr").mkdir(parents=True)
    live.write_bytes(b"being written")
    left = photos / "x2" / "sub" / ".batchsr-left.png.abcdefgh.tmp"  # this tree's own, left by a kill
    left.parent.mkdir()
    left.write_bytes(b"cut off")
    stale = photos / "x2" / "old" / ".batchsr-stale.png.abcdefgh.tmp"  # under a tree of an earlier run, over now
    (stale.parent / ".batchsr").mkdir(parents=True)
    stale.write_bytes(b"cut off too")
    with FolderLock(photos / "x2" / "inner" / ".batchsr" / "lock"):
        run_folder(photos, photos / "x2", settings)
    assert live.exists() and not left.exists() and not stale.exists()


def test_a_damaged_journal_is_exit_73_naming_it(tmp_path, tiny_model):
    """It was exit 70, "internal error ... (a bug)"."""
    write_png(tmp_path / "in" / "a.png", np.full((6, 7, 3), 40, np.uint8))
    journal = tmp_path / "out" / ".batchsr" / "journal.sqlite"
    journal.parent.mkdir(parents=True)
    journal.write_bytes(os.urandom(8192))
    run = _cli("run", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(tiny_model))
    assert run.returncode == 73 and f"the journal {journal} is damaged (file is not a database); move it aside" in run.stderr, run.stderr


@pytest.mark.parametrize("change", ["later version", "column renamed", "table renamed", "another program's"])
def test_a_journal_this_version_cannot_read_is_refused_untouched(tmp_path, change):
    """A column renamed (a later version's journal, or a hand's) was exit 70, "a bug"; a table renamed, or
    another program's database, was taken for an empty journal and every image upscaled again."""
    import sqlite3

    from batchsr.errors import OutputError

    write_png(tmp_path / "in" / "a.png", np.full((8, 8, 3), 60, np.uint8))
    assert run_folder(tmp_path / "in", tmp_path / "out", _bicubic_settings(), engine=Bicubic()).done == 1
    journal = tmp_path / "out" / ".batchsr" / "journal.sqlite"
    with contextlib.closing(sqlite3.connect(journal)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
        db.execute({"later version": "PRAGMA user_version = 2",
                    "column renamed": "ALTER TABLE outputs RENAME COLUMN sha256 TO content_hash",
                    "table renamed": "ALTER TABLE outputs RENAME TO outputs_v2",
                    "another program's": "DROP TABLE outputs"}[change])
        if change == "another program's":
            db.execute("CREATE TABLE notes (text TEXT)")
        db.commit()
        db.execute("PRAGMA journal_mode=DELETE")  # a rollback journal, as another program's may be: not switched to WAL
    before = journal.read_bytes()
    why = "was written by a later version of batchsr" if change == "later version" else "is not one this version of batchsr knows"
    with pytest.raises(OutputError, match=f"the journal {re.escape(str(journal))} {why} .*(?:move the journal aside|move it aside)"):
        run_folder(tmp_path / "in", tmp_path / "out", _bicubic_settings(), engine=Bicubic())
    assert journal.read_bytes() == before and not journal.with_name("journal.sqlite-wal").exists()


def test_an_output_name_too_long_fails_before_the_model_runs(tmp_path):
    """A 250-byte name under a template that lengthens it was refused only at the write: every run loaded
    the model and upscaled it for nothing."""
    calls = []

    class Counted(Bicubic):
        def upscale(self, images):
            calls.append(len(images))
            return super().upscale(images)

    src, stem = tmp_path / "in", "n" * 250
    write_png(src / "sub" / "deeper" / f"{stem}.png", np.full((8, 8, 3), 60, np.uint8))
    summary = run_folder(src, tmp_path / "out", _bicubic_settings(name_template="{stem}_x{scale}{ext}"), engine=Counted())
    assert summary.done == 0 and [f.path.name for f in summary.failed] == [f"{stem}.png"] and calls == []
    assert "File name too long (257 bytes, the file system takes 255" in summary.failed[0].reason
    assert not (tmp_path / "out" / "sub").exists()  # its folders, made for it, are not left behind empty
    write_png(src / "sub" / "short.png", np.full((8, 8, 3), 60, np.uint8))
    assert run_folder(src, tmp_path / "out", _bicubic_settings(name_template="{stem}_x{scale}{ext}"), engine=Counted()).done == 1
    assert calls == [1] and sorted(p.name for p in (tmp_path / "out" / "sub").iterdir()) == ["short_x4.png"]


def test_a_file_the_journal_did_not_write_is_never_replaced_without_force(tmp_path):
    """INPUT and OUTPUT swapped in a cron line (`run up photos` after `run photos up`) replaced the original
    photos with upscales of their own upscales; a run into a subfolder of another run's OUTPUT replaced its
    outputs, which that run then took for up to date."""
    photos, up = tmp_path / "photos", tmp_path / "up"
    for k in range(2):
        write_png(photos / f"p{k}.png", np.full((8, 6, 3), 50 + k, np.uint8))
    originals = {p.name: p.read_bytes() for p in photos.iterdir()}
    assert run_folder(photos, up, _bicubic_settings(), engine=Bicubic()).done == 2
    swapped = run_folder(up, photos, _bicubic_settings(), engine=Bicubic())
    assert swapped.done == 0 and len(swapped.failed) == 2
    assert all("is there already, and this OUTPUT's journal did not write it; not replaced" in f.reason for f in swapped.failed)
    assert {p.name: p.read_bytes() for p in photos.iterdir() if p.is_file()} == originals
    other = tmp_path / "other"
    write_png(other / "p0.png", np.full((8, 6, 3), 200, np.uint8))
    before = (up / "p0.png").read_bytes()
    nested = run_folder(other, up, _bicubic_settings(), engine=Bicubic())  # another INPUT into the same OUTPUT: its journal knows p0.png
    assert nested.done == 1  # an output of this OUTPUT's own journal: replaced, as a changed input's output is
    assert run_folder(other, up / "sub", _bicubic_settings(), engine=Bicubic()).done == 1  # nothing there: written
    (up / "sub" / "q.png").write_bytes(before)  # someone's file where an output is to go
    write_png(other / "q.png", np.full((8, 6, 3), 9, np.uint8))
    assert len(run_folder(other, up / "sub", _bicubic_settings(), engine=Bicubic()).failed) == 1
    assert (up / "sub" / "q.png").read_bytes() == before
    assert run_folder(other, up / "sub", _bicubic_settings(), engine=Bicubic(), force=True).done == 2
    assert (up / "sub" / "q.png").read_bytes() != before


def test_an_output_under_an_earlier_name_and_a_failed_ones_name_are_handled_as_they_should(tmp_path):
    """A format changed and changed back: the first name's output, kept on disk, was refused as not the
    journal's. A name only intended (the image failed) made a user's file there replaceable."""
    class Failing(Bicubic):
        def upscale(self, images):
            raise RuntimeError("no")

        upscale_bands = upscale

    src, out = tmp_path / "in", tmp_path / "out"
    write_png(src / "a.png", np.full((8, 6, 3), 70, np.uint8))
    assert run_folder(src, out, _bicubic_settings(), engine=Bicubic()).done == 1
    assert run_folder(src, out, _bicubic_settings(output_format="jpg"), engine=Bicubic()).done == 1
    again = run_folder(src, out, _bicubic_settings(), engine=Bicubic())
    assert (again.done, again.failed) == (1, []) and sorted(p.name for p in out.iterdir() if p.is_file()) == ["a.jpg", "a.png"]
    write_png(src / "b.png", np.full((8, 6, 3), 70, np.uint8))
    assert len(run_folder(src, out, _bicubic_settings(), engine=Failing()).failed) == 1
    (out / "b.png").write_bytes(b"mine")
    assert len(run_folder(src, out, _bicubic_settings(), engine=Bicubic()).failed) == 1
    assert (out / "b.png").read_bytes() == b"mine"


def test_an_output_written_just_before_a_crash_is_known_as_batchsrs(tmp_path, monkeypatch):
    """Killed between an output's rename into place and its journal entry: the next run replaces it, as its own."""
    import batchsr.runner

    src, out = tmp_path / "in", tmp_path / "out"
    write_png(src / "a.png", np.full((8, 6, 3), 70, np.uint8))
    monkeypatch.setattr(batchsr.runner.Journal, "record", lambda *args, **kwargs: os.kill(os.getpid(), 0) or 1 / 0)
    with pytest.raises(ZeroDivisionError):  # the run dies at the entry, the output on disk
        run_folder(src, out, _bicubic_settings(), engine=Bicubic())
    monkeypatch.undo()
    assert (out / "a.png").is_file()
    assert run_folder(src, out, _bicubic_settings(), engine=Bicubic()).done == 1
    assert run_folder(src, out, _bicubic_settings(), engine=Bicubic()).skipped == 1


def test_entries_whose_input_and_output_are_gone_are_forgotten(tmp_path):
    """An inbox that others fill and empty grew the journal by a row for every file it ever held, each read at
    every run (300,000 such rows: a run with nothing to do took 4x the time and 10x the memory)."""
    import sqlite3

    src, out = tmp_path / "in", tmp_path / "out"
    for name in ("a", "b", "c"):
        write_png(src / f"{name}.png", np.full((8, 8, 3), 60, np.uint8))
    assert run_folder(src, out, _bicubic_settings(), engine=Bicubic()).done == 3
    (src / "a.png").unlink()
    (out / "a.png").unlink()  # input and output gone: nothing to keep
    (src / "b.png").unlink()  # the output stays: its entry too (an input put back, or mounted again, is not redone)
    summary = run_folder(src, out, _bicubic_settings(), engine=Bicubic())
    assert (summary.done, summary.skipped) == (0, 1)
    with contextlib.closing(sqlite3.connect(out / ".batchsr" / "journal.sqlite")) as db:
        assert sorted(row[0] for row in db.execute("SELECT input FROM outputs")) == ["b.png", "c.png"]
    write_png(src / "b.png", np.full((8, 8, 3), 60, np.uint8))
    assert run_folder(src, out, _bicubic_settings(), engine=Bicubic()).skipped == 2


def test_an_empty_journal_file_is_said_not_silently_started_over(tmp_path):
    """An emptied journal was taken for a new one: the whole archive upscaled again without a word."""
    from loguru import logger

    write_png(tmp_path / "in" / "a.png", np.full((8, 8, 3), 60, np.uint8))
    assert run_folder(tmp_path / "in", tmp_path / "out", _bicubic_settings(), engine=Bicubic()).done == 1
    journal = tmp_path / "out" / ".batchsr" / "journal.sqlite"
    for leftover in journal.parent.glob("journal.sqlite-*"):
        leftover.unlink()
    journal.write_bytes(b"")
    messages: list[str] = []
    handler = logger.add(messages.append, format="{message}", level="WARNING")
    try:  # it knows no output now: the one on disk is not replaced without --force
        assert len(run_folder(tmp_path / "in", tmp_path / "out", _bicubic_settings(), engine=Bicubic()).failed) == 1
        assert any(f"the journal {journal} is an empty file" in m for m in messages)
        assert run_folder(tmp_path / "in", tmp_path / "out", _bicubic_settings(), engine=Bicubic(), force=True).done == 1
        messages.clear()
        assert run_folder(tmp_path / "in", tmp_path / "out", _bicubic_settings(), engine=Bicubic()).skipped == 1
        assert not any("empty file" in m for m in messages)
    finally:
        logger.remove(handler)


def test_a_journal_damaged_past_its_first_page_is_exit_73_naming_it(tmp_path, tiny_model):
    """The opening went well, the first read raised "database disk image is malformed": exit 70, "a bug"."""
    import sqlite3

    for k in range(3):
        write_png(tmp_path / "in" / f"{k}.png", np.full((6, 7, 3), 40 + k, np.uint8))
    assert _cli("run", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(tiny_model)).returncode == 0
    journal = tmp_path / "out" / ".batchsr" / "journal.sqlite"
    with sqlite3.connect(journal) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page = db.execute("PRAGMA page_size").fetchone()[0]
    data = bytearray(journal.read_bytes())
    data[page:] = os.urandom(len(data) - page)  # the first page (the schema) whole, the table's pages not
    journal.write_bytes(bytes(data))
    run = _cli("run", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(tiny_model))
    assert run.returncode == 73 and f"the journal {journal} is damaged (" in run.stderr, run.stderr


def test_a_group_shared_output_folder_stays_writable_by_the_group(tmp_path, tiny_model):
    """Under umask 002 the lock was made 0644 by batchsr and the journal 0644 by SQLite: another member of the
    group got exit 73, then (the lock made writable) exit 70 on the read-only journal."""
    write_png(tmp_path / "in" / "a.png", np.full((6, 7, 3), 40, np.uint8))
    old = os.umask(0o002)
    try:
        run_folder(tmp_path / "in", tmp_path / "out", _settings(tiny_model))
    finally:
        os.umask(old)
    for name in ("lock", "journal.sqlite"):
        assert (tmp_path / "out" / ".batchsr" / name).stat().st_mode & 0o777 == 0o664, name


@pytest.mark.parametrize("streamed", [False, True])
def test_an_output_keeps_a_private_inputs_mode_as_cp_does(tmp_path, tiny_model, streamed):
    """A 0600 input gave a 0644 output, readable by everyone."""
    src = tmp_path / "in"
    write_png(src / "private.png", np.full((6, 7, 3), 40, np.uint8))
    write_png(src / "shared.png", np.full((6, 7, 3), 90, np.uint8))
    from batchsr.imageio import _UMASK

    (src / "private.png").chmod(0o600)
    (src / "shared.png").chmod(0o644)
    settings = _settings(tiny_model)
    settings = settings.model_copy(update={"run": settings.run.model_copy(update={"stream_megapixels": 0.0001 if streamed else 16.0})})
    run_folder(src, tmp_path / "out", settings)
    assert (tmp_path / "out" / "private.png").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "out" / "shared.png").stat().st_mode & 0o777 == 0o644 & ~_UMASK


def test_a_read_only_mode_is_given_once_the_output_is_written():
    """The temporary took the input's 0444 first and was then opened by name to be written: refused (EACCES),
    for everyone but root, so read-only inputs could not be upscaled. Run as an ordinary user here."""
    import shutil
    import tempfile

    from batchsr.imageio import atomic_write

    folder = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        pid = os.fork()
        if pid == 0:  # the child: an ordinary user, when the tests run as root
            code = 1
            try:
                if os.getuid() == 0:
                    os.chown(folder, 65534, 65534)
                    os.setgid(65534)
                    os.setuid(65534)
                atomic_write(folder / "sub" / "a.png", b"pixels", folder, mode=0o444)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert (folder / "sub" / "a.png").read_bytes() == b"pixels" and (folder / "sub" / "a.png").stat().st_mode & 0o777 == 0o444
    finally:
        shutil.rmtree(folder)


def test_names_of_up_to_255_bytes_are_written(tmp_path, tiny_model):
    """The temporary of an output named by 242 to 255 bytes was too long a name: the image failed."""
    names = ["a" * 251 + ".png", "\u6587" * 83 + ".png"]  # 255 and 253 bytes
    for name in names:
        write_png(tmp_path / "in" / name, np.full((6, 7, 3), 40, np.uint8))
    summary = run_folder(tmp_path / "in", tmp_path / "out", _settings(tiny_model))
    assert summary.done == 2 and not summary.failed
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name != ".batchsr") == sorted(names)


def test_a_tree_a_thousand_folders_deep_is_processed(deep_tmp_path, tiny_model):
    """Python 3.11's os.walk and Path.mkdir recurse: such a tree was exit 70 before any image."""
    import cv2

    data = cv2.imencode(".png", np.full((6, 7, 3), 40, np.uint8))[1].tobytes()
    rel = deep_file(deep_tmp_path / "in", 1100, "deep.png", data)
    summary = run_folder(deep_tmp_path / "in", deep_tmp_path / "out", _settings(tiny_model))
    assert summary.done == 1 and not summary.failed
    assert read_image(deep_tmp_path / "out" / rel).rgb.shape == (24, 28, 3)


def test_a_file_larger_than_any_image_within_the_pixel_limit_is_refused_unread(tmp_path, tiny_model):
    """A sparse file of gigabytes behind a PNG header was read whole, past the memory cap, then reported done."""
    import cv2

    header = cv2.imencode(".png", np.full((6, 7, 3), 40, np.uint8))[1].tobytes()
    (tmp_path / "in").mkdir()
    with open(tmp_path / "in" / "sparse.png", "wb") as handle:
        handle.write(header)
        handle.truncate(300_000_000)  # a hole: nothing on disk
    base = _settings(tiny_model)
    settings = base.model_copy(update={"image": base.image.model_copy(update={"max_pixels": 1000})})
    summary = run_folder(tmp_path / "in", tmp_path / "out", settings)
    assert summary.done == 0 and [f.reason for f in summary.failed] == [
        "file of 300 MB is larger than batchsr reads: 268 MB, 8 bytes a pixel of image.max_pixels (1,000) and 256 MB "
        "of metadata; raise image.max_pixels to read it"]


def test_file_names_cannot_forge_log_lines_or_reach_the_terminal(tmp_path, tiny_model):
    """A name holding a newline and escape sequences printed forged lines and drove the terminal."""
    good = tmp_path / "in"
    write_png(good / "a.png", np.full((12, 10, 3), 200, np.uint8))
    evil = "evil\n23:59:59 INFO    batch: 9 done\x1b]0;pwned\x07\x1b[31mRED.png"
    (good / evil).write_bytes(b"not an image")
    result = _cli("run", str(good), str(tmp_path / "out"), "--model", str(tiny_model), "--progress", "none")
    assert result.returncode == 65, result.stderr
    assert "\x1b" not in result.stderr and "\x07" not in result.stderr
    assert not any(line.startswith("23:59:59") for line in result.stderr.splitlines())
    assert "evil\\n23:59:59 INFO    batch: 9 done\\x1b]0;pwned\\x07\\x1b[31mRED.png" in result.stderr


def test_cli_exit_codes(tree, tmp_path, tiny_model):
    out = tmp_path / "out"
    result = _cli("run", str(tree), str(out), "--model", str(tiny_model), "--tile", "32", "--progress", "none")
    assert result.returncode == 65, result.stderr
    assert "broken.png" in result.stderr and "cut.jpg" in result.stderr
    good = tmp_path / "good"
    write_png(good / "a.png", np.full((12, 10, 3), 200, np.uint8))
    assert _cli("run", str(good), str(tmp_path / "o2"), "--model", str(tiny_model), "--progress", "none").returncode == 0
    missing = _cli("--log-level", "DEBUG", "run", str(tmp_path / "nope"), str(tmp_path / "o3"), "--model", str(tiny_model))
    assert missing.returncode == 66 and "nope" in missing.stderr
    assert "tensorflow:" not in missing.stderr  # answered before TensorFlow's import (its notices log at DEBUG)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    unwritable = _cli("run", str(good), str(blocker / "sub"), "--model", str(tiny_model))
    assert unwritable.returncode == 73 and "not writable" in unwritable.stderr
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text("engine:\n  tile: -5\n  batch_size: 0\n")
    config_error = _cli("--config", str(bad_config), "run", str(good), str(tmp_path / "o4"))
    assert config_error.returncode == 78 and "engine.tile" in config_error.stderr and "-5" in config_error.stderr
    lines = config_error.stderr.splitlines()  # one problem a line, not flattened into "\n"s
    assert any("engine.tile" in line and "batch_size" not in line for line in lines) and any("engine.batch_size" in line for line in lines)
    folder_as_config = _cli("--config", str(tmp_path), "config")
    assert folder_as_config.returncode == 78 and "Is a directory" in folder_as_config.stderr
    flag_error = _cli("run", str(good), str(tmp_path / "o4"), "--tile", "8")
    assert flag_error.returncode == 78 and "engine.tile (from the command line) = 8" in flag_error.stderr
    bad_model = _cli("run", str(good), str(tmp_path / "o5"), "--model", str(tmp_path / "none.weights.h5"))
    assert bad_model.returncode == 78 and "not found" in bad_model.stderr
    assert not (tmp_path / "o5").exists()  # refused before the output folder is made
    wrong_scale = _cli("run", str(good), str(tmp_path / "o6"), "--model", str(tiny_model), "--scale", "2")
    assert wrong_scale.returncode == 78 and "is an x4 model, but scale 2 was asked for" in wrong_scale.stderr
    assert not (tmp_path / "o6" / "a.png").exists()
    # Another process holds the output folder.
    lock_path = tmp_path / "o2" / ".batchsr" / "lock"
    with open(lock_path, "r+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        handle.write(f"pid {os.getpid()}: test holder")
        handle.flush()
        locked = _cli("run", str(good), str(tmp_path / "o2"), "--model", str(tiny_model))
    assert locked.returncode == 75 and f"pid {os.getpid()}: test holder" in locked.stderr


def test_unwritable_outputs_of_eval_and_logging_fail_up_front(tmp_path):
    hr = str(data_dir("Set5", "HR"))
    folder = _cli("eval", "--hr", hr, "--bicubic-only", "--scale", "4", "--csv", str(tmp_path))
    assert folder.returncode == 73 and "is a folder" in folder.stderr
    nowhere = _cli("eval", "--hr", hr, "--bicubic-only", "--scale", "4", "--csv", str(tmp_path / "no" / "such.csv"))
    assert nowhere.returncode == 73 and "does not exist" in nowhere.stderr
    config = tmp_path / "c.yaml"
    config.write_text(f"logging:\n  file: {tmp_path}\n")
    bad_log = _cli("--config", str(config), "eval", "--hr", hr, "--bicubic-only", "--scale", "4")
    assert bad_log.returncode == 78 and "logging.file" in bad_log.stderr


def test_eval_csv_through_a_link_or_to_standard_output_is_written_where_it_leads(tmp_path):
    """--csv link.csv replaced the link with a file, its target left as it was."""
    hr = tmp_path / "hr"
    write_png(hr / "a.png", np.arange(24 * 24 * 3, dtype=np.uint8).reshape(24, 24, 3))
    (tmp_path / "target.csv").write_text("old\n")
    (tmp_path / "link.csv").symlink_to(tmp_path / "target.csv")
    linked = _cli("eval", "--bicubic-only", "--scale", "4", "--hr", str(hr), "--csv", str(tmp_path / "link.csv"))
    assert linked.returncode == 0, linked.stderr
    assert (tmp_path / "link.csv").is_symlink() and (tmp_path / "target.csv").read_text().startswith("set,image,")
    piped = _cli("eval", "--bicubic-only", "--scale", "4", "--hr", str(hr), "--csv", "/dev/stdout")
    assert piped.returncode == 0 and "set,image," in piped.stdout, piped.stderr
    log = tmp_path / "log.txt"  # --csv /dev/stdout >> log.txt: the log was replaced by the CSV; > log.txt: the table
    for mode, before in (("a", "an earlier line\n"), ("w", "")):  # printed after the CSV overwrote its start
        log.write_text("an earlier line\n")
        with open(log, mode) as handle:
            env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
            subprocess.run([sys.executable, "-m", "batchsr.cli", "eval", "--bicubic-only", "--scale", "4", "--hr", str(hr), "--csv",
                            "/dev/stdout"], stdout=handle, stderr=subprocess.PIPE, cwd=REPO, env=env, timeout=300, check=True)
        text = log.read_text()
        assert text.startswith(before + "set,image,") and text.count("set,image,") == 1 and "| set |" in text, (mode, text)
    shm = tmp_path / "regular.csv"  # a regular file is replaced, wherever it is (files under /dev/shm were appended to)
    for _ in range(2):
        assert _cli("eval", "--bicubic-only", "--scale", "4", "--hr", str(hr), "--csv", str(shm)).returncode == 0
    assert shm.read_text().count("set,image,") == 1


def test_bicubic_only_eval_checks_the_scale_against_the_weights(tmp_path):
    """--bicubic-only with an x4 model and --scale 2 scored x2 without a word; with a model the clash is refused."""
    x4 = str(REPO / "batchsr" / "weights" / "unet_x4.weights.h5")
    hr = tmp_path / "hr"
    write_png(hr / "a.png", read_image(data_dir("Set5", "HR") / "bird.png").rgb[:96, :96])
    clash = _cli("eval", "--hr", str(hr), "--bicubic-only", "--model", x4, "--scale", "2")
    assert clash.returncode == 78 and "is an x4 model, but scale 2 was asked for" in clash.stderr
    own = _cli("eval", "--hr", str(hr), "--bicubic-only", "--model", x4)
    assert own.returncode == 0 and "| 4 |" in own.stdout


def test_the_model_failing_on_one_image_fails_that_image_only(tmp_path, tiny_model, monkeypatch):
    """A model call that raised (say the GPU out of memory, or a backend bug on one shape) ended the whole run."""
    calls = model_fails_on_a_png(tmp_path / "in", monkeypatch)
    summary = run_folder(tmp_path / "in", tmp_path / "out", _settings(tiny_model))
    assert summary.done == 1 and (tmp_path / "out" / "b.png").exists() and not (tmp_path / "out" / "a.png").exists()
    assert [(f.path.name, f.reason) for f in summary.failed] == [("a.png", "not upscaled: simulated failure on a marked image")]
    assert calls[0] == 2  # the call of both failed; each image was then tried on its own


def test_a_memory_cap_below_the_loaded_model_is_a_configuration_error(tmp_path, tiny_model):
    from batchsr.errors import ConfigError

    write_png(tmp_path / "in" / "a.png", np.full((12, 10, 3), 90, np.uint8))
    settings = _settings(tiny_model)
    settings = settings.model_copy(update={"run": settings.run.model_copy(update={"memory_mb": 256})})
    with pytest.raises(ConfigError, match=r"run.memory_mb = 256 is below what the model and runtime already take"):
        run_folder(tmp_path / "in", tmp_path / "out", settings)


def test_the_memory_cap_counts_the_model_call_over_each_images_windows(tmp_path, tiny_model, monkeypatch):
    """A call of engine.batch_size windows is counted at the windows the image has: a big tile costs small images
    nothing, and an image refused for its call's memory is upscaled with smaller batches."""
    from batchsr.engine import Engine

    write_png(tmp_path / "in" / "a.png", np.random.default_rng(1).integers(0, 256, (100, 120, 3), dtype=np.uint8))
    settings = _settings(tiny_model)
    big = settings.engine.model_copy(update={"tile": 2048, "overlap": 16})
    engine = Engine(tiny_model, big)
    fixed = engine.call_mb(1, 1)  # the per-call part, beside a few pixels
    assert engine.call_mb(100, 120) == engine.call_mb(97, 117)
    assert engine.call_mb(400, 120) - fixed > 3 * (engine.call_mb(100, 120) - fixed)
    call = engine.call_mb(100, 120)
    monkeypatch.setattr("batchsr.runner.process_rss_mb", lambda: 1000.0)  # the loaded process, as the estimates see it
    monkeypatch.setattr("batchsr.pipeline.process_rss_mb", lambda: 1000.0)
    assert call > 30  # and the image itself about 6 MB
    one = big.model_copy(update={"batch_size": 1})
    single = Engine(tiny_model, one).call_mb(100, 120)
    assert call - single > 30  # room between them for the image's own share
    run = settings.run.model_copy(update={"memory_mb": int(1000 + (call + single) / 2)})
    refused = run_folder(tmp_path / "in", tmp_path / "refused", settings.model_copy(update={"run": run, "engine": big}), engine=engine)
    [failure] = refused.failed
    assert "for a model call over its windows, set by engine.batch_size and engine.tile" in failure.reason
    done = run_folder(tmp_path / "in", tmp_path / "done", settings.model_copy(update={"run": run, "engine": one}),
                      engine=Engine(tiny_model, one))
    assert done.done == 1 and not done.failed


def test_a_quiet_run_prints_nothing_but_its_problems(tmp_path, tiny_model):
    """Cron mails whatever a job prints: at WARNING a clean run says nothing, TensorFlow's import notices included."""
    write_png(tmp_path / "in" / "a.png", np.full((12, 10, 3), 90, np.uint8))
    clean = _cli("--log-level", "WARNING", "run", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(tiny_model), "--progress", "none")
    assert clean.returncode == 0 and clean.stderr == "" and clean.stdout == "", clean.stderr
    (tmp_path / "in" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    broken = _cli("--log-level", "WARNING", "run", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(tiny_model), "--progress", "none")
    assert broken.returncode == 65 and "b.png" in broken.stderr and "tensorflow" not in broken.stderr.lower(), broken.stderr


def test_an_unwritable_report_folder_fails_before_any_work(tmp_path, tiny_model):
    write_png(tmp_path / "in" / "a.png", np.full((12, 10, 3), 90, np.uint8))
    write_png(tmp_path / "hr" / "a.png", np.full((24, 20, 3), 90, np.uint8))
    (tmp_path / "afile").write_text("not a folder")
    report = str(tmp_path / "afile" / "report")
    run = _cli("run", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(tiny_model), "--reference", str(tmp_path / "hr"),
               "--report", report, "--progress", "none")
    assert run.returncode == 73 and f"--report folder {report} is not writable" in run.stderr, run.stderr
    assert not (tmp_path / "out" / "a.png").exists()
    scored = _cli("eval", "--hr", str(tmp_path / "hr"), "--model", str(tiny_model), "--report", report)
    assert scored.returncode == 73 and f"--report folder {report} is not writable" in scored.stderr, scored.stderr
    assert "PSNR-Y" not in scored.stdout  # refused before scoring


def test_a_fatal_line_from_the_tensorflow_import_is_shown_even_when_it_kills_the_process(tmp_path):
    """TensorFlow built for AVX on a CPU without it prints one F-line and aborts: that line is the only diagnosis."""
    fake = tmp_path / "site" / "tensorflow"
    fake.mkdir(parents=True)
    line = "F0000 00:00:1.0 1 cpu_feature_guard.cc:99] The TensorFlow library was compiled to use AVX instructions"
    (fake / "__init__.py").write_text(f"import os\nos.write(2, b'I0000 00:00:1.0 1 port.cc:1] a notice\\n{line}\\n')\nos.abort()\n")
    write_png(tmp_path / "in" / "a.png", np.full((12, 10, 3), 90, np.uint8))
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{REPO}"}
    result = subprocess.run([sys.executable, "-m", "batchsr.cli", "run", str(tmp_path / "in"), str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert result.returncode == -6 and line in result.stderr and "a notice" not in result.stderr, result.stderr


def test_tensorflow_import_notices_go_to_the_debug_log(tmp_path):
    """... through a file without a name: a named one in /tmp outlived every kill during the import's seconds."""
    fake = tmp_path / "site" / "tensorflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("import os\nos.write(2, b'I0000 00:00:1.0 1 port.cc:1] a notice\\nplain line\\n')\n"
                                      "os.write(2, f'tmp holds: {os.listdir(os.environ[\"TMPDIR\"])}\\n'.encode())\n"
                                      "raise ImportError('no tensorflow here')\n")
    (tmp_path / "tmp").mkdir()
    write_png(tmp_path / "in" / "a.png", np.full((12, 10, 3), 90, np.uint8))
    config = tmp_path / "c.yaml"
    config.write_text(f"logging:\n  file: {tmp_path / 'batchsr.log'}\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{REPO}", "TMPDIR": str(tmp_path / "tmp")}
    result = subprocess.run([sys.executable, "-m", "batchsr.cli", "--config", str(config), "--log-level", "DEBUG", "run",
                             str(tmp_path / "in"), str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert result.returncode == 70 and "plain line" in result.stderr, result.stderr
    assert "tmp holds: []" in result.stderr
    log = (tmp_path / "batchsr.log").read_text()
    assert "tensorflow: I0000 00:00:1.0 1 port.cc:1] a notice" in log and "no tensorflow here" in log


def test_the_cron_wrapper_prints_only_on_trouble(tmp_path, tiny_model):
    script = str(REPO / "scripts" / "cron-run.sh")
    write_png(tmp_path / "in" / "a.png", np.full((12, 10, 3), 90, np.uint8))
    batchsr = [sys.executable, "-m", "batchsr.cli", "run", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(tiny_model),
               "--progress", "log"]
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}

    def tick(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["sh", script, *(command or batchsr)], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)

    fine = tick()
    assert (fine.returncode, fine.stdout, fine.stderr) == (0, "", "") and (tmp_path / "out" / "a.png").is_file()
    (tmp_path / "in" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    trouble = tick()
    assert trouble.returncode == 65 and "b.png" in trouble.stdout and "done 0, skipped 1, failed 1" in trouble.stdout
    assert "2/2 files" in trouble.stdout  # the progress counts files: the failed one too, as it did as "images"
    # The same file still broken at the next ticks: mailed about once, not every quarter of an hour.
    assert (tick().returncode, tick().stdout) == (65, "")
    (tmp_path / "in" / "c.png").write_bytes(b"not an image at all")
    news = tick()
    assert news.returncode == 65 and "c.png" in news.stdout and "b.png" in news.stdout
    (tmp_path / "in" / "c.png").unlink()
    assert tick().stdout == ""  # one fewer: no news
    (tmp_path / "in" / "c.png").write_bytes(b"not an image at all")
    assert "c.png" in tick().stdout  # broken again: news again
    for _ in range(2):  # an exit 65 without a failure line (an error of another kind) is never kept quiet
        assert tick("sh", "-c", "echo 'batchsr: error: x.png: not an image' >&2; exit 65").stdout != ""
    said = tmp_path / "said.txt"  # one command whose output changes: failed, another error, failed again
    memory = ("9000x7000 needs about {:,} MB, above run.memory_mb = 2,000; lower engine.tile or raise run.memory_mb "
              "(counted: 96 MB for a model call over its windows, set by engine.batch_size and engine.tile; {} MB for the images decoded ahead of it)")
    for text, rc, told in (("batchsr: failed: x.png: bad", 65, True), ("batchsr: error: another kind", 65, True),
                           ("batchsr: failed: x.png: bad", 65, True), ("batchsr: failed: x.png: bad", 65, False),
                           ("batchsr: error: output not writable", 73, True), ("batchsr: failed: x.png: bad", 65, True),
                           # a memory refusal's figures move with what the process holds: the same refusal is no news
                           (f"batchsr: failed: y.png: {memory.format(2_345, 310)}", 65, True),
                           (f"batchsr: failed: y.png: {memory.format(2_351, 296)}", 65, False),
                           (f"batchsr: failed: y.png: {memory.format(2_351, 0).replace('; 0 MB for the images decoded ahead of it', '')}", 65, False),
                           (f"batchsr: failed: y 2.png: {memory.format(2_351, 296)}", 65, True)):
        said.write_text(f"{text}\n{rc}\n")
        assert (tick("sh", "-c", f"head -1 {said} >&2; exit $(tail -1 {said})").stdout != "") is told, text
    # Nowhere to keep them (a state folder that cannot be made; no HOME): all told, and why
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "said.txt")}
    for _ in range(2):
        told = tick("sh", "-c", "echo 'batchsr: failed: x.png: not an image' >&2; exit 65").stdout
        assert "x.png" in told and f"cron-run.sh: cannot keep these failures in {tmp_path / 'said.txt' / 'batchsr'}" in told
    env = {k: v for k, v in os.environ.items() if k not in ("HOME", "XDG_STATE_HOME")}
    for _ in range(2):
        told = tick("sh", "-c", "echo 'batchsr: failed: x.png: not an image' >&2; exit 65").stdout
        assert "x.png" in told and "neither HOME nor XDG_STATE_HOME is set" in told
    locked = tick("sh", "-c", "echo held by pid 7 >&2; exit 75")
    assert (locked.returncode, locked.stdout, locked.stderr) == (0, "", "")


def test_help_does_not_import_tensorflow():
    code = "import sys; from click.testing import CliRunner; from batchsr.cli import main; r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0; print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.stdout.strip() == "False False", result.stderr


def test_config_command_prints_effective_settings(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("engine:\n  tile: 64\n")
    result = _cli("--config", str(path), "config")
    assert result.returncode == 0 and "tile: 64" in result.stdout and "batch_size: 8" in result.stdout
    assert "level: INFO" in result.stdout
    flagged = _cli("--config", str(path), "--log-level", "DEBUG", "config")  # it printed the file's INFO
    assert flagged.returncode == 0 and "level: DEBUG" in flagged.stdout


def test_a_keras_backend_keras_cannot_import_is_exit_78_before_output_is_made(tmp_path):
    """A mistyped or uninstalled KERAS_BACKEND was exit 70 ("a bug") with Keras's traceback, at the first model,
    after OUTPUT and its state were made."""
    src = tmp_path / "in"
    write_png(src / "a.png", np.full((8, 8, 3), 9, np.uint8))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    absent = next(name for name in ("openvino", "torch", "jax", None) if name is None or importlib.util.find_spec(name) is None)
    cases = [("tensorflw", "is not a Keras backend")] + ([(absent, f"{absent} is not installed")] if absent else [])
    for backend, reason in cases:
        done = subprocess.run([sys.executable, "-m", "batchsr.cli", "run", str(src), str(tmp_path / "out")],
                              capture_output=True, text=True, cwd=REPO, env={**env, "KERAS_BACKEND": backend}, timeout=300)
        assert done.returncode == 78, done.stderr
        assert f"KERAS_BACKEND = '{backend}'" in done.stderr and reason in done.stderr
        assert "Traceback" not in done.stderr
        assert not (tmp_path / "out").exists()


def test_ctrl_c_exits_130_not_1(tmp_path, monkeypatch):
    """Click's "Aborted!" and exit 1 read as a failure to cron and systemd; a shell says 130 for SIGINT."""
    from click.testing import CliRunner
    from loguru import logger

    import batchsr.runner
    from batchsr.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(batchsr.runner, "run_folder", interrupted)
    write_png(tmp_path / "in" / "a.png", np.zeros((8, 8, 3), np.uint8))
    try:
        result = CliRunner().invoke(main, ["run", str(tmp_path / "in"), str(tmp_path / "out"), "--progress", "none"])
    finally:
        logger.remove()  # the CLI pointed loguru at CliRunner's stream
        logger.add(sys.stderr)
    assert result.exit_code == 130, result.output
    assert result.output.splitlines()[-1] == "batchsr: interrupted (a later run resumes: finished outputs are recorded)"


def test_an_unexpected_error_exits_70_with_its_traceback(tmp_path, monkeypatch):
    """A bug is exit code 70, its traceback logged at ERROR (a cron or systemd run cannot be rerun to see it)
    and one line asking for a report, not exit 1."""
    from click.testing import CliRunner
    from loguru import logger

    import batchsr.runner
    from batchsr.cli import main

    def broken(*args, **kwargs):
        raise RuntimeError("something broke")

    monkeypatch.setattr(batchsr.runner, "run_folder", broken)
    src = tmp_path / "in"
    write_png(src / "a.png", np.zeros((8, 8, 3), np.uint8))
    config = tmp_path / "c.yaml"
    config.write_text(f"run:\n  progress: none\nlogging:\n  file: {tmp_path / 'batchsr.log'}\n")
    args = ["--config", str(config), "--log-level", "WARNING", "run", str(src), str(tmp_path / "out")]
    try:
        result = CliRunner().invoke(main, args)
    finally:
        logger.remove()  # the CLI pointed loguru at CliRunner's stream
        logger.add(sys.stderr)
    assert result.exit_code == 70, result.output
    line = "batchsr: internal error: RuntimeError: something broke (a bug: please report it with the traceback above)"
    assert result.output.splitlines()[-1] == line
    assert "Traceback" in result.output and "in broken" in result.output
    assert "in broken" in (tmp_path / "batchsr.log").read_text()  # the log file keeps it too


def _bicubic_settings(**run) -> Settings:
    return Settings.model_validate({"engine": {"tile": 32, "overlap": 8, "batch_size": 4}, "run": {"progress": "none", **run}})


def test_odd_metadata_neither_stops_the_run_nor_fails_its_image(tmp_path, monkeypatch):
    """A pHYs at its largest value (no 32-bit field holds it x4) and an EXIF resolution of 0/0, seen in real files."""
    import struct
    import zlib

    import cv2
    from PIL import Image as PILImage
    from PIL import TiffImagePlugin

    src, rng = tmp_path / "in", np.random.default_rng(0)
    src.mkdir()
    exif = PILImage.Exif()
    exif[0x010F], exif[282], exif[283] = "Maker", TiffImagePlugin.IFDRational(0, 0), TiffImagePlugin.IFDRational(0, 0)
    PILImage.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(src / "a.jpg", exif=exif, quality=95)
    ok, png = cv2.imencode(".png", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    payload = struct.pack(">IIB", 0xFFFFFFFF, 0xFFFFFFFF, 1)
    phys = struct.pack(">I", len(payload)) + b"pHYs" + payload + struct.pack(">I", zlib.crc32(b"pHYs" + payload))
    (src / "b.png").write_bytes(png.tobytes()[:33] + phys + png.tobytes()[33:])
    for k in range(3):
        write_png(src / f"c{k}.png", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    summary = run_folder(src, tmp_path / "out", _bicubic_settings(), engine=Bicubic())
    assert summary.done == 5 and not summary.failed, [f.reason for f in summary.failed]
    with PILImage.open(tmp_path / "out" / "a.jpg") as written:
        assert 282 not in written.getexif() and written.getexif()[0x010F] == "Maker"
    with PILImage.open(tmp_path / "out" / "b.png") as written:
        assert "dpi" not in written.info
    # An error nobody foresaw in one image's encoding fails that image by name, and the run goes on.
    import batchsr.runner

    real = batchsr.runner.encode_image

    def encode(result, fmt, *args, **kwargs):
        if result.rgb.shape[:2] == (32, 32) and result.source.endswith("c1.png"):
            raise KeyError("a bug")
        return real(result, fmt, *args, **kwargs)

    monkeypatch.setattr(batchsr.runner, "encode_image", encode)
    summary = run_folder(src, tmp_path / "again", _bicubic_settings(), engine=Bicubic())
    assert summary.done == 4 and [(f.path.name, f.reason) for f in summary.failed] == [("c1.png", "output not written: KeyError: 'a bug'")]


def test_images_written_but_not_scored_are_up_to_date_on_the_next_run(tmp_path, monkeypatch):
    """Too small for SSIM's window, or written band by band: no metrics, yet done, and not redone."""
    import batchsr.pipeline

    real_whole_mb = batchsr.pipeline.whole_mb
    monkeypatch.setattr(batchsr.pipeline, "whole_mb", lambda image, *args, **kwargs: 5000.0 if image.size == (30, 40)
                        else real_whole_mb(image, *args, **kwargs))  # big.png fits only band by band
    for where in ("batchsr.runner", "batchsr.pipeline"):
        monkeypatch.setattr(f"{where}.process_rss_mb", lambda: 1000.0)

    rng = np.random.default_rng(0)
    src, ref = tmp_path / "in", tmp_path / "ref"
    write_png(src / "tiny.png", rng.integers(0, 255, (4, 4, 3), dtype=np.uint8))
    write_png(ref / "tiny.png", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    write_png(src / "big.png", rng.integers(0, 255, (40, 30, 3), dtype=np.uint8))
    write_png(ref / "big.png", rng.integers(0, 255, (160, 120, 3), dtype=np.uint8))
    write_png(src / "ok.png", rng.integers(0, 255, (12, 12, 3), dtype=np.uint8))
    write_png(ref / "ok.png", rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
    settings = _bicubic_settings(memory_mb=2000)
    first = run_folder(src, tmp_path / "out", settings, engine=Bicubic(), reference_dir=ref)
    assert first.done == 3 and not first.failed, [f.reason for f in first.failed]
    assert read_image(tmp_path / "out" / "tiny.png").rgb.shape == (16, 16, 3)
    rows = list(csv.DictReader(open(first.metrics_csv)))
    assert [r["image"] for r in rows if r["psnr_y"]] == ["ok.png", "MEAN"]
    again = run_folder(src, tmp_path / "out", settings, engine=Bicubic(), reference_dir=ref)
    assert again.done == 0 and again.skipped == 3 and not again.failed


def test_a_text_file_starting_with_bm_is_not_taken_for_a_bmp(tmp_path):
    import cv2

    src = tmp_path / "in"
    src.mkdir()
    (src / "bmi.csv").write_text("BMI,weight,height\n22.5,70,1.76\n")
    ok, bmp = cv2.imencode(".bmp", np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8))
    (src / "photo.dat").write_bytes(bmp.tobytes())  # detected by content, not by name
    summary = run_folder(src, tmp_path / "out", _bicubic_settings(), engine=Bicubic())
    assert summary.done == 1 and summary.ignored == 1 and not summary.failed, [f.reason for f in summary.failed]


def test_a_huge_file_that_is_no_image_is_never_read_into_memory(tmp_path):
    """A video dropped among the images by mistake: its first bytes tell it is no image."""
    import tracemalloc

    src = tmp_path / "in"
    write_png(src / "photo.png", np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8))
    run_folder(src, tmp_path / "warm-up", _bicubic_settings(), engine=Bicubic())  # TensorFlow's first import is not counted
    for name in ("movie.mp4", "misnamed.png"):
        with open(src / name, "wb") as handle:
            handle.truncate(200_000_000)  # sparse: 200 MB to read, no disk taken
    tracemalloc.start()
    try:
        summary = run_folder(src, tmp_path / "out", _bicubic_settings(), engine=Bicubic())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert summary.done == 1 and summary.ignored == 1
    assert [(f.path.name, "not a supported image" in f.reason) for f in summary.failed] == [("misnamed.png", True)]
    assert peak < 50e6, f"{peak / 1e6:.0f} MB allocated"


def test_an_output_name_freed_by_a_new_output_format_is_taken_at_once(tmp_path):
    """a.jpg wrote a.png under output_format png; under same it writes a.jpg, and a.png may have a.png."""
    import cv2

    src, out = tmp_path / "in", tmp_path / "out"
    write_png(src / "a.png", np.full((12, 10, 3), 30, np.uint8))
    (src / "a.jpg").write_bytes(cv2.imencode(".jpg", np.full((12, 10, 3), 220, np.uint8))[1].tobytes())
    first = run_folder(src, out, _bicubic_settings(output_format="png"), engine=Bicubic())
    assert first.done == 1 and [f.path.name for f in first.failed] == ["a.png"]
    second = run_folder(src, out, _bicubic_settings(), engine=Bicubic())
    assert second.done == 2 and not second.failed, [f.reason for f in second.failed]
    assert read_image(out / "a.png").rgb.mean() < 80 and read_image(out / "a.jpg").rgb.mean() > 150


def test_a_report_folder_holding_a_page_of_the_users_is_refused_before_the_run(tmp_path):
    """`run --report` found the user's index.html only once every image was done, and then failed the run."""
    from click.testing import CliRunner
    from loguru import logger

    from batchsr.cli import main

    write_png(tmp_path / "in" / "a.png", np.full((8, 8, 3), 90, np.uint8))
    write_png(tmp_path / "ref" / "a.png", np.full((32, 32, 3), 90, np.uint8))
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text("<html>my site</html>")
    try:
        result = CliRunner().invoke(main, ["run", str(tmp_path / "in"), str(tmp_path / "out"), "--reference", str(tmp_path / "ref"),
                                           "--report", str(tmp_path / "site"), "--progress", "none"])
    finally:
        logger.remove()
        logger.add(sys.stderr)
    assert result.exit_code == 73 and "holds an index.html that batchsr did not write" in result.output, result.output
    assert not (tmp_path / "out" / "a.png").exists()


def test_a_disk_full_at_the_journal_is_exit_73_not_a_bug(tmp_path, tiny_model, monkeypatch):
    """SQLite's "database or disk is full" at a journal commit was an internal error, exit 70."""
    import sqlite3

    import batchsr.runner
    from batchsr.errors import OutputError

    real_open = batchsr.runner.open_journal

    class Full:
        def __init__(self, db):
            self.db, self.commits = db, 0

        def __getattr__(self, name):
            return getattr(self.db, name)

        def commit(self):
            self.commits += 1
            if self.commits > 1:  # the table made, then the first image's row refused
                error = sqlite3.OperationalError("database or disk is full")
                error.sqlite_errorcode = 13
                raise error
            return self.db.commit()

    monkeypatch.setattr(batchsr.runner, "open_journal", lambda *args, **kwargs: Full(real_open(*args, **kwargs)))
    write_png(tmp_path / "in" / "a.png", np.full((8, 8, 3), 60, np.uint8))
    with pytest.raises(OutputError, match="cannot write the journal .*disk is full.*the next run goes on"):
        run_folder(tmp_path / "in", tmp_path / "out", _settings(tiny_model))


def test_a_run_finding_its_output_folder_held_exits_75_before_importing_tensorflow(tmp_path, monkeypatch):
    """Each cron tick behind a long run spent some ten seconds importing TensorFlow, only to exit 75."""
    from click.testing import CliRunner
    from loguru import logger

    import batchsr.tfimport
    from batchsr.cli import main

    def imported():
        raise AssertionError("TensorFlow imported")

    monkeypatch.setattr(batchsr.tfimport, "import_tensorflow", imported)
    write_png(tmp_path / "in" / "a.png", np.full((8, 8, 3), 60, np.uint8))
    lock_path = tmp_path / "out" / ".batchsr" / "lock"
    lock_path.parent.mkdir(parents=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        handle.write(f"pid {os.getpid()}: the long run")
        handle.flush()
        try:
            result = CliRunner().invoke(main, ["run", str(tmp_path / "in"), str(tmp_path / "out"), "--progress", "none"])
        finally:
            logger.remove()
            logger.add(sys.stderr)
    assert result.exit_code == 75 and f"pid {os.getpid()}: the long run" in result.output, result.output


def test_the_mean_row_names_the_model_of_its_rows():
    """After a run with another model, rows kept for the earlier outputs still on disk were averaged under a
    MEAN row naming the new model, which had scored none of them."""
    from batchsr.runner import metrics_csv

    scores = {"psnr_y": 30.0, "ssim_y": 0.9, "psnr_rgb": 29.0, "ssim_rgb": 0.89, "bicubic_psnr_y": 28.0, "bicubic_ssim_y": 0.8,
              "bicubic_psnr_rgb": 27.0, "bicubic_ssim_rgb": 0.79, "gain_psnr_y": 2.0}
    entries = {"a.png": ("s1", "old-model", "a.png", scores, None), "b.png": ("s2", "old-model", "b.png", scores, None)}
    mean = list(csv.DictReader(io.StringIO(metrics_csv(entries, ["a.png", "b.png"], 4).decode())))[-1]
    assert (mean["image"], mean["model_id"]) == ("MEAN", "old-model")
    entries["b.png"] = ("s2", "new-model", "b.png", scores, None)
    mean = list(csv.DictReader(io.StringIO(metrics_csv(entries, ["a.png", "b.png"], 4).decode())))[-1]
    assert (mean["image"], mean["model_id"]) == ("MEAN", "")


def _never(what: str):
    def called(*args, **kwargs):
        raise AssertionError(f"{what} called")

    return called


def test_a_rerun_over_a_finished_folder_reads_no_image_and_imports_no_tensorflow(tmp_path, tiny_model, monkeypatch):
    """Each cron tick over a finished archive read and hashed every image and imported TensorFlow (seconds
    to hours of work for nothing); an input whose size, times and inode are as recorded is now skipped unread."""
    import batchsr.runner
    import batchsr.tfimport

    monkeypatch.setattr(batchsr.runner, "_SETTLED_NS", 0)  # the inputs were written a moment ago
    for name, level in (("a.png", 60), ("sub/b.png", 90)):
        write_png(tmp_path / "in" / name, np.full((10, 12, 3), level, np.uint8))
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    first = run_folder(tmp_path / "in", tmp_path / "out", _settings(tiny_model))
    assert (first.done, first.ignored) == (2, 1)
    with monkeypatch.context() as patched:
        patched.setattr(batchsr.runner, "read_bounded", _never("reading an input"))
        patched.setattr(batchsr.tfimport, "import_tensorflow", _never("importing TensorFlow"))
        again = run_folder(tmp_path / "in", tmp_path / "out", _settings(tiny_model))
    assert (again.done, again.skipped, again.ignored, again.failed) == (0, 2, 1, [])
    # New content in place, its modification time set back: its change time tells, and it is redone.
    recorded = (tmp_path / "in" / "a.png").stat()
    with open(tmp_path / "in" / "a.png", "r+b") as handle:
        data = bytearray(handle.read())
        handle.seek(0)
        import cv2

        handle.write(cv2.imencode(".png", np.full((10, 12, 3), 61, np.uint8))[1].tobytes().ljust(len(data), b"\0"))
    os.utime(tmp_path / "in" / "a.png", ns=(recorded.st_atime_ns, recorded.st_mtime_ns))
    assert (tmp_path / "in" / "a.png").stat().st_size == recorded.st_size
    changed = run_folder(tmp_path / "in", tmp_path / "out", _settings(tiny_model))
    assert (changed.done, changed.skipped) == (1, 1)
    assert read_image(tmp_path / "out" / "a.png").rgb[5, 5, 0] in (60, 61, 62)  # the tiny model: near the input
    forced = run_folder(tmp_path / "in", tmp_path / "out", _settings(tiny_model), force=True)
    assert forced.done == 2


def test_a_fingerprint_is_trusted_only_once_the_file_had_settled_before_it_was_read():
    """A change within the same tick of the file system's clock as the reading leaves size and times as
    they were: only a file unchanged for two seconds before it was read may be skipped unread later."""
    from batchsr.runner import fingerprint

    now = 10 * 10**9

    def stat(mtime_ns: int, ctime_ns: int) -> os.stat_result:  # mode, inode, device, links, uid, gid, size, 3 times
        return os.stat_result((0o100644, 7, 0, 1, 0, 0, 1234, 0, 0, 0, 0.0, 0.0, 0.0, 0, mtime_ns, ctime_ns))  # then the ns times

    assert fingerprint(stat(now - 3 * 10**9, now - 5 * 10**9), "png", now) == f"1234:{now - 3 * 10**9}:{now - 5 * 10**9}:7:png"
    assert fingerprint(stat(now - 5 * 10**9, now - 10**9), "png", now) is None  # its inode changed (a rename, a chmod) a second before
    assert fingerprint(stat(now - 10**9, now - 5 * 10**9), "png", now) is None  # written a second before


def test_min_age_leaves_files_still_being_written_for_the_next_run(tmp_path, tiny_model):
    """A cron run over a folder others upload to failed a half-copied image as truncated and mailed about it."""
    from batchsr.config import Settings

    write_png(tmp_path / "in" / "old.png", np.full((10, 12, 3), 60, np.uint8))
    write_png(tmp_path / "in" / "new.png", np.full((10, 12, 3), 90, np.uint8))
    (tmp_path / "in" / "future.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # half uploaded, its clock ahead of ours
    hour = 3600 * 10**9
    os.utime(tmp_path / "in" / "old.png", ns=(os.stat(tmp_path / "in" / "old.png").st_atime_ns, time_ns() - hour))
    os.utime(tmp_path / "in" / "future.png", ns=(0, time_ns() + hour))
    settings = _settings(tiny_model).model_copy(update={"run": Settings().run.model_copy(update={"progress": "none", "min_age_s": 60})})
    summary = run_folder(tmp_path / "in", tmp_path / "out", settings)
    assert (summary.done, summary.waiting, summary.failed) == (1, 2, [])
    assert (tmp_path / "out" / "old.png").is_file() and not (tmp_path / "out" / "new.png").exists()
    (tmp_path / "in" / "upload.log").write_text("a log growing beside the images")  # not an image: ignored, not waiting
    (tmp_path / "in" / os.fsdecode(b"caf\xe9.txt")).write_text("a name not in UTF-8: failed, as before")
    os.utime(tmp_path / "in" / os.fsdecode(b"caf\xe9.txt"), ns=(0, time_ns() - hour))
    again = run_folder(tmp_path / "in", tmp_path / "out", settings)
    assert (again.skipped, again.waiting, again.ignored, [f.path.name for f in again.failed]) == (1, 2, 1, [os.fsdecode(b"caf\xe9.txt")])
    (tmp_path / "in" / os.fsdecode(b"caf\xe9.txt")).unlink()
    later = run_folder(tmp_path / "in", tmp_path / "out", _settings(tiny_model))  # min_age_s 0: every file
    assert (later.done, later.skipped, [f.path.name for f in later.failed]) == (1, 1, ["future.png"])


def test_the_run_command_over_a_finished_folder_exits_0_without_importing_tensorflow(tmp_path, tiny_model, monkeypatch):
    from click.testing import CliRunner
    from loguru import logger

    import batchsr.runner
    import batchsr.tfimport
    from batchsr.cli import main

    monkeypatch.setattr(batchsr.runner, "_SETTLED_NS", 0)
    write_png(tmp_path / "in" / "a.png", np.full((10, 12, 3), 60, np.uint8))
    command = ["run", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(tiny_model), "--tile", "32", "--progress", "none"]
    try:
        first = CliRunner().invoke(main, command)
        monkeypatch.setattr(batchsr.tfimport, "import_tensorflow", _never("importing TensorFlow"))
        again = CliRunner().invoke(main, command)
    finally:
        logger.remove()
        logger.add(sys.stderr)
    assert first.exit_code == 0 and again.exit_code == 0, again.output
    assert "done 0, skipped 1" in again.output


def test_min_age_is_refused_with_beam_before_anything_is_imported(tmp_path, monkeypatch):
    from click.testing import CliRunner
    from loguru import logger

    import batchsr.tfimport
    from batchsr.cli import main

    monkeypatch.setattr(batchsr.tfimport, "import_tensorflow", _never("importing TensorFlow"))
    (tmp_path / "in").mkdir()
    try:
        result = CliRunner().invoke(main, ["run", str(tmp_path / "in"), str(tmp_path / "out"), "--engine", "beam", "--min-age", "60"])
        huge = CliRunner().invoke(main, ["run", str(tmp_path / "in"), str(tmp_path / "out"), "--min-age", "1e300"])
    finally:
        logger.remove()
        logger.add(sys.stderr)
    assert result.exit_code == 78 and "run.min_age_s = 60: not available with --engine beam" in result.output, result.output
    assert huge.exit_code == 78 and "run.min_age_s" in huge.output, huge.output  # it overflowed: exit 70


def test_two_threads_importing_tensorflow_at_once_both_finish_and_leave_stderr_as_it_was(tmp_path):
    """The import swaps the process's stderr for a filter; two library calls at once (two runs in threads)
    interleaved their swaps: one waited forever, and stderr stayed routed to an orphaned filter."""
    fake = tmp_path / "site" / "tensorflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("import time\ntime.sleep(1.0)\n")
    code = (
        "import os, sys, threading\n"
        "from batchsr.tfimport import import_tensorflow\n"
        "threads = [threading.Thread(target=import_tensorflow) for _ in range(2)]\n"
        "[t.start() for t in threads]; [t.join(20) for t in threads]\n"
        "print([t.is_alive() for t in threads], flush=True)\n"
        "sys.stderr.write('after\\n'); sys.stderr.flush()\n"
        "os._exit(0)\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{REPO}"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert result.stdout.strip() == "[False, False]", result.stdout + result.stderr
    assert result.stderr.strip() == "after", result.stderr


def test_entries_scored_before_references_were_recorded_are_scored_again_not_upscaled_again(tmp_path):
    """After an upgrade from a version that recorded scores without the reference's identity (or no metrics
    for an image without a reference), the first run with --reference upscaled the whole archive again. Its
    scores are not trusted either (made against another folder perhaps, and a JPEG before its encoding): the
    outputs on disk are scored again."""
    import json
    import sqlite3

    rng = np.random.default_rng(1)
    src, ref, out = tmp_path / "in", tmp_path / "ref", tmp_path / "out"
    write_png(src / "a.png", rng.integers(0, 255, (12, 12, 3), dtype=np.uint8))
    write_png(ref / "a.png", rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
    write_png(src / "alone.png", rng.integers(0, 255, (12, 12, 3), dtype=np.uint8))  # no reference
    write_png(src / "gone.png", rng.integers(0, 255, (12, 12, 3), dtype=np.uint8))
    write_png(ref / "gone.png", rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
    settings = _bicubic_settings(output_format="jpg", jpeg_quality=40)
    assert run_folder(src, out, settings, engine=Bicubic(), reference_dir=ref).done == 3
    with sqlite3.connect(out / ".batchsr" / "journal.sqlite") as db:  # as the older version left it
        for rel, metrics in db.execute("SELECT input, metrics FROM outputs").fetchall():
            old = {k: v for k, v in json.loads(metrics).items() if k != "reference"}
            db.execute("UPDATE outputs SET metrics = ? WHERE input = ?", (json.dumps(old) if "psnr_y" in old else None, rel))
    write_png(ref / "a.png", rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))  # not what it was scored against
    (ref / "gone.png").unlink()  # scored against a reference deleted since: redone, as a vanished reference is
    stamp = (out / "a.jpg").stat().st_mtime_ns
    again = run_folder(src, out, settings, engine=Bicubic(), reference_dir=ref)
    assert (again.done, again.skipped) == (1, 2) and (out / "a.jpg").stat().st_mtime_ns == stamp  # a.jpg not written again
    fresh = run_folder(src, tmp_path / "fresh", settings, engine=Bicubic(), reference_dir=ref)
    rows, expected = ([r for r in csv.DictReader(io.StringIO((folder / "metrics.csv").read_text())) if r["image"] == "a.png"]
                      for folder in (out, tmp_path / "fresh"))
    assert len(rows) == 1 and {k: v for k, v in rows[0].items() if k != "ms"} == {k: v for k, v in expected[0].items() if k != "ms"}
    assert fresh.done == 3
    third = run_folder(src, out, settings, engine=Bicubic(), reference_dir=ref)  # the identities now recorded
    assert (third.done, third.skipped) == (0, 3)


def test_a_first_run_with_reference_redoes_only_the_images_that_have_one(tmp_path):

    rng = np.random.default_rng(2)
    src, ref, out = tmp_path / "in", tmp_path / "ref", tmp_path / "out"
    write_png(src / "a.png", rng.integers(0, 255, (12, 12, 3), dtype=np.uint8))
    write_png(ref / "a.png", rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
    write_png(src / "alone.png", rng.integers(0, 255, (12, 12, 3), dtype=np.uint8))
    assert run_folder(src, out, _bicubic_settings(), engine=Bicubic()).done == 2
    scored = run_folder(src, out, _bicubic_settings(), engine=Bicubic(), reference_dir=ref)
    assert (scored.done, scored.skipped) == (1, 1)  # alone.png has nothing to be scored against: not upscaled again
    assert (run_folder(src, out, _bicubic_settings(), engine=Bicubic(), reference_dir=ref).skipped) == 2


@pytest.mark.parametrize("error", ["disk I/O error", "database or disk is full"])
def test_a_journal_that_cannot_be_set_up_on_a_full_disk_says_so(tmp_path, monkeypatch, error):
    """A full disk at the opening was reported as a matter of owner and mode."""
    import sqlite3

    import batchsr.journal
    from batchsr.errors import OutputError
    from batchsr.runner import Journal

    real_connect = sqlite3.connect

    class Full:
        def __init__(self, *args, **kwargs):
            self.db = real_connect(*args, **kwargs)

        def execute(self, sql, *args):
            if sql.startswith("PRAGMA journal_mode"):
                raise sqlite3.OperationalError(error)
            return self.db.execute(sql, *args)

        def close(self):
            self.db.close()

    monkeypatch.setattr(batchsr.journal.sqlite3, "connect", Full)
    with pytest.raises(OutputError, match=f"cannot write the journal .*{error} \\(the disk holding it may be full or failing"):
        Journal(tmp_path / "journal.sqlite")


def test_a_journal_that_cannot_be_opened_is_an_output_error_not_a_bug(tmp_path):
    """A state folder made by another user (sudo batchsr once) ended the service's run with exit 70 and a
    traceback; the message now names the owner and mode."""
    from batchsr.errors import OutputError

    write_png(tmp_path / "in" / "a.png", np.full((8, 8, 3), 60, np.uint8))
    (tmp_path / "out" / ".batchsr" / "journal.sqlite").mkdir(parents=True)  # cannot be opened as a database
    with pytest.raises(OutputError, match=r"cannot open the journal .*journal\.sqlite: .*is owned by \w+, mode \d{4}"):
        run_folder(tmp_path / "in", tmp_path / "out", _bicubic_settings())


def test_a_journal_refusing_the_fingerprints_fails_no_run(tmp_path, monkeypatch):
    """Recording fingerprints only saves reading next time: a full or read-only journal made a run that had
    nothing to do exit 73, at every tick."""
    import batchsr.runner
    from batchsr.errors import OutputError

    def refused(self, rows):
        raise OutputError(f"cannot write the journal {self.path}: database or disk is full")

    for name in ("a.png", "b.png"):
        write_png(tmp_path / "in" / name, np.full((12, 12, 3), 60, np.uint8))
    monkeypatch.setattr(batchsr.runner, "_SETTLED_NS", 10**18)  # none recorded at the first run
    assert run_folder(tmp_path / "in", tmp_path / "out", _bicubic_settings(), engine=Bicubic()).done == 2
    monkeypatch.setattr(batchsr.runner, "_SETTLED_NS", 0)
    monkeypatch.setattr(batchsr.runner.Journal, "remember_stats", refused)
    again = run_folder(tmp_path / "in", tmp_path / "out", _bicubic_settings(), engine=Bicubic())
    assert (again.done, again.skipped, again.failed) == (0, 2, [])


def test_an_output_of_an_input_with_transparency_is_upscaled_again_not_rescored(tmp_path):
    """Read back from disk, its pixels are not those a new run scores (colour under full transparency is
    filled in, a BMP is flattened): rescoring an old version's entry gave other figures than a new run."""
    import json
    import sqlite3

    rng = np.random.default_rng(3)
    src, ref, out = tmp_path / "in", tmp_path / "ref", tmp_path / "out"
    rgba = rng.integers(0, 255, (12, 12, 4), dtype=np.uint8)
    rgba[:6, :, 3] = 0  # half fully transparent
    import cv2

    assert cv2.imwrite(str((src.mkdir(), src / "a.png")[1]), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    write_png(ref / "a.png", rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
    settings = _bicubic_settings()
    assert run_folder(src, out, settings, engine=Bicubic(), reference_dir=ref).done == 1
    expected = (out / "metrics.csv").read_text()
    with sqlite3.connect(out / ".batchsr" / "journal.sqlite") as db:  # as an older version left it
        (metrics,) = db.execute("SELECT metrics FROM outputs").fetchone()
        db.execute("UPDATE outputs SET metrics = ?", (json.dumps({k: v for k, v in json.loads(metrics).items() if k != "reference"}),))
    again = run_folder(src, out, settings, engine=Bicubic(), reference_dir=ref)
    assert again.done == 1
    strip = lambda text: [{k: v for k, v in row.items() if k != "ms"} for row in csv.DictReader(io.StringIO(text))]  # noqa: E731
    assert strip((out / "metrics.csv").read_text()) == strip(expected)
