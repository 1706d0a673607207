"""The visual report: files on disk, the most-changed window, and a real browser (slow)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from batchsr.report import most_changed_window
from tests.conftest import REPO, data_dir


def test_most_changed_window_finds_the_difference():
    base = np.full((100, 120, 3), 100, np.uint8)
    changed = base.copy()
    changed[60:70, 30:40] = 200
    y, x, side = most_changed_window(changed, base, window=16)
    assert side == 16 and y <= 60 and y + 16 >= 70 and x <= 30 and x + 16 >= 40


def _make_report(tmp_path, tiny_model):
    from batchsr.config import EngineSettings
    from batchsr.engine import Engine
    from batchsr.evaluate import evaluate_folder, summary_rows
    from batchsr.report import write_report

    engine = Engine(tiny_model, EngineSettings(tile=64, overlap=8))
    result = evaluate_folder(data_dir("Set5", "HR"), 4, engine, keep_images=True)
    return write_report(tmp_path / "report", result.images, "test", summary_rows([result], 4))


def test_report_page_references_only_existing_images(tmp_path, tiny_model):
    page = _make_report(tmp_path, tiny_model)
    text = page.read_text()
    sources = re.findall(r'src="([^"]+)"', text)
    assert len(sources) == 1 + 5 * 8  # the chart, then 4 panels x (full + zoom) per image
    for src in sources:
        assert (page.parent / src).stat().st_size > 100
    assert "Set5/bird" in text and "gain" in text


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path, tiny_model):
    page = _make_report(tmp_path, tiny_model)
    shot = tmp_path / "shot.png"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "check_report.py"), str(page.parent), str(shot)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "41/41 images loaded" in result.stdout and shot.stat().st_size > 10000


def test_the_zoom_stays_inside_the_scored_area():
    """The most-changed window could lie in the border the scores leave out (butterfly: x=3 at x4)."""
    base = np.full((100, 120, 3), 100, np.uint8)
    changed = base.copy()
    changed[:, :3] = 255  # the largest change, all in the left border
    changed[60:70, 60:70] = 160
    y, x, side = most_changed_window(changed, base, window=16, border=4)
    assert x >= 4 and y >= 4 and x + side <= 116 and y + side <= 96 and x <= 60 and x + side >= 70


def _images(page):
    return sorted(p.relative_to(page.parent).as_posix() for p in page.parent.rglob("*.png"))


def test_a_report_is_replaced_whole_and_an_interrupted_one_leaves_the_previous(tmp_path, tiny_model, monkeypatch):
    """A second report into the same folder left the first one's images beside it; one that failed or was
    interrupted part-way left the old page over a mix of both runs' images."""
    import batchsr.report
    from batchsr.errors import OutputError
    from batchsr.report import write_report

    page = _make_report(tmp_path, tiny_model)
    first_page, first_images = page.read_bytes(), _images(page)
    real_png, written = batchsr.report._png, []

    def interrupted(path, rgb):
        if len(written) == 9:
            raise KeyboardInterrupt
        written.append(path)
        real_png(path, rgb)

    monkeypatch.setattr(batchsr.report, "_png", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _make_report(tmp_path, tiny_model)
    assert page.read_bytes() == first_page and _images(page) == first_images
    monkeypatch.setattr(batchsr.report, "_png", real_png)
    second = _make_report(tmp_path, tiny_model)
    sources = set(re.findall(r'src="([^"]+)"', second.read_text()))
    assert set(_images(second)) == sources and not sources & set(first_images)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "index.html").write_text("<html>my own page</html>")
    with pytest.raises(OutputError, match="holds an index.html that batchsr did not write"):
        write_report(tmp_path / "mine", [], "test", [])
    assert (tmp_path / "mine" / "index.html").read_text() == "<html>my own page</html>"


def test_replacing_a_report_removes_only_what_batchsr_wrote_there(tmp_path, tiny_model):
    """Folders named like the report's (images-20240101) were deleted with the user's photos in them; the
    images/ folder of an earlier version's page went whole, with the user's own files."""
    from batchsr.report import write_report

    report = tmp_path / "report"
    (report / "images-20240101").mkdir(parents=True)
    (report / "images-20240101" / "holiday.jpg").write_bytes(b"mine")
    (report / "images").mkdir()
    (report / "images" / "logo.png").write_bytes(b"mine too")
    (report / "images" / "0000_old_lr.png").write_bytes(b"written by an earlier version")
    (report / "index.html").write_text('<body data-images="pending"><img src="images/0000_old_lr.png"></body>')
    page = _make_report(tmp_path, tiny_model)
    assert (report / "images-20240101" / "holiday.jpg").read_bytes() == b"mine"
    assert (report / "images" / "logo.png").read_bytes() == b"mine too" and not (report / "images" / "0000_old_lr.png").exists()
    first = set(re.findall(r'src="([^"/]+)/', page.read_text()))
    write_report(report, [], "empty", [])
    assert not any((report / name).exists() for name in first)


def test_a_report_leaves_files_outside_its_folder_and_a_live_writers_images_alone(tmp_path, tiny_model):
    """A page naming ../x/y.png (escaped) made the cleanup delete a file outside the report folder; the
    images of a run killed before its page stayed for good."""
    import subprocess

    from batchsr.report import MARKER, write_report

    report = tmp_path / "report"
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "y.png").write_bytes(b"the user's")
    report.mkdir()
    (report / "index.html").write_text('<meta name="generator" content="batchsr"><img src="..&#x2F;x/y.png">')
    gone = subprocess.Popen(["true"])  # a process that has ended: its pid names no writer
    gone.wait()
    for name, pid in (("images-0000dead", gone.pid), ("images-0000live", os.getppid())):
        (report / name).mkdir()
        (report / name / MARKER).write_text(f"{pid}\n")
    write_report(report, [], "empty", [])
    assert (tmp_path / "x" / "y.png").read_bytes() == b"the user's"
    assert not (report / "images-0000dead").exists() and (report / "images-0000live").exists()
