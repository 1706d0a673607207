"""Images decoded ahead of their turn are held to a share of ``run.memory_mb`` (``data.DecodeAhead``)."""

from __future__ import annotations

import re
import threading
import time

import cv2
import numpy as np
import yaml

from batchsr.config import Settings, load_settings
from batchsr.data import DecodeAhead, prepared_files
from batchsr.runner import run_folder
from tests.conftest import Bicubic
from tests.test_watch import drop, journal_rows, png, serving_here, states, wait_for, write_config


def _stream(monkeypatch, sizes: list[float], limit: float | None, consume_s: float = 0.02, stop_after: int | None = None):
    """prepared_files over fake files of ``sizes`` MB; returns (results in order, most files decoded and not yet
    taken at once, the files that decoded, the gate)."""
    monkeypatch.setattr("batchsr.data.probe_decoding_mb", lambda index, max_pixels: sizes[index])
    ahead = DecodeAhead(limit) if limit is not None else None
    lock = threading.Lock()
    state = {"decoded_not_taken": 0, "most": 0}
    decoded = []

    def prepare(index):
        with lock:
            decoded.append(index)
            state["decoded_not_taken"] += 1
            state["most"] = max(state["most"], state["decoded_not_taken"])
        return index

    results = []
    stream = prepared_files(list(range(len(sizes))), prepare, workers=4, ahead=ahead)
    for item in stream:
        with lock:
            state["decoded_not_taken"] -= 1
        results.append(item)
        time.sleep(consume_s)  # the model's turn
        if stop_after is not None and len(results) == stop_after:
            stream.close()
            break
    return results, state["most"], decoded, ahead


def test_files_decoded_ahead_stay_within_the_limit_in_order(monkeypatch):
    results, most, _, _ = _stream(monkeypatch, [10.0] * 12, limit=None, consume_s=0.05)
    assert results == list(range(12)) and most >= 4  # unbounded: workers and prefetch fill up while the consumer works
    results, most, _, ahead = _stream(monkeypatch, [10.0] * 12, limit=25.0)
    assert results == list(range(12))
    assert ahead.peak_mb <= 25.0 + 10.0 and most <= 3  # two within the limit, and the next file, which never waits


def test_a_file_larger_than_the_limit_does_not_stall_the_stream(monkeypatch):
    results, _, _, ahead = _stream(monkeypatch, [100.0, 5.0, 100.0, 5.0, 5.0, 100.0], limit=10.0, consume_s=0.0)
    assert results == list(range(6)) and ahead.peak_mb <= 110.0


def test_closing_a_stream_early_neither_hangs_nor_decodes_the_rest(monkeypatch):
    results, _, decoded, _ = _stream(monkeypatch, [10.0] * 40, limit=15.0, consume_s=0.05, stop_after=3)
    time.sleep(0.5)  # files that were waiting give up
    assert results == [0, 1, 2] and len(decoded) <= 5, decoded


def _folder(path, count: int, size=(30, 40)):
    path.mkdir()
    rng = np.random.default_rng(3)
    for k in range(count):
        assert cv2.imwrite(str(path / f"{k:02d}.png"), rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def test_run_holds_the_images_decoded_ahead_to_a_quarter_of_the_room_beside_the_model(tmp_path, monkeypatch):
    seen = []

    class Recording(DecodeAhead):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self)

    class Slow(Bicubic):  # the model's turn takes a while: without the limit, every file would be decoded ahead
        def upscale(self, images):
            time.sleep(0.2)
            return super().upscale(images)

    monkeypatch.setattr("batchsr.data.DecodeAhead", Recording)
    monkeypatch.setattr("batchsr.data.probe_decoding_mb", lambda path, max_pixels: 100.0)  # as if each were a big scan
    for where in ("batchsr.runner", "batchsr.pipeline"):
        monkeypatch.setattr(f"{where}.process_rss_mb", lambda: 1000.0)
    _folder(tmp_path / "in", 10)
    settings = Settings.model_validate({"run": {"progress": "none", "memory_mb": 2000, "decode_workers": 4}})
    summary = run_folder(tmp_path / "in", tmp_path / "out", settings.model_copy(update={"engine": settings.engine.model_copy(
        update={"batch_size": 1})}), engine=Slow())
    assert summary.done == 10 and not summary.failed
    [ahead] = seen
    assert ahead.limit_mb == 250.0 and 0 < ahead.peak_mb <= 350.0  # (2000 - 1000) / 4, and the next file


def test_an_image_that_fits_only_while_decoding_ahead_pauses_is_not_refused(tmp_path, monkeypatch):
    """Counting the whole share for decoding ahead would refuse it; decoding ahead waits for it instead."""
    from batchsr.imageio import decode_image
    from batchsr.pipeline import whole_mb

    _folder(tmp_path / "in", 4, size=(200, 240))
    one = whole_mb(decode_image((tmp_path / "in" / "00.png").read_bytes()), 4, 4.0, reference=False)
    for where in ("batchsr.runner", "batchsr.pipeline"):
        monkeypatch.setattr(f"{where}.process_rss_mb", lambda: 1000.0)
    cap = int(1000 + 1.1 * one)  # one image fits beside the model, but not with a quarter of the room kept
    assert (cap - 1000) / 4 + one > cap - 1000
    settings = Settings.model_validate({"engine": {"tile": 256, "batch_size": 8}, "run": {"progress": "none", "memory_mb": cap}})
    summary = run_folder(tmp_path / "in", tmp_path / "out", settings, engine=Bicubic())
    assert summary.done == 4 and not summary.failed, [f.reason for f in summary.failed]


def test_watch_leaves_what_does_not_fit_decoded_beside_the_batch_for_the_next_one(tmp_path, tiny_model, monkeypatch):
    config = write_config(tmp_path, tiny_model, batch_images=8, max_wait_s=1.0)
    raw = yaml.safe_load(config.read_text())
    raw["run"]["memory_mb"] = 800  # a quarter of the 700 MB beside the model: 175 MB, two of these images
    config.write_text(yaml.safe_dump(raw))
    assert load_settings(config).run.memory_cap_mb == 800
    for where in ("batchsr.runner", "batchsr.pipeline"):
        monkeypatch.setattr(f"{where}.process_rss_mb", lambda: 100.0)
    monkeypatch.setattr("batchsr.data.probe_decoding_mb", lambda path, max_pixels: 100.0)
    monkeypatch.setattr("batchsr.watch.decoding_mb", lambda w, h, b: 100.0)
    names = [f"{k}.png" for k in range(5)]
    with serving_here(config) as messages:
        for k, name in enumerate(names):
            drop(tmp_path / "inbox", name, png(k, (20, 20)))
        wait_for(lambda: states(tmp_path).get("done") and sorted(states(tmp_path)["done"]) == names, 90, what="all five done")
    done_per_batch = [int(m.group(1)) for m in (re.search(r"batch: (\d+) done", m) for m in messages) if m]
    assert any("wait for the next batch" in m for m in messages)
    assert sum(done_per_batch) == 5 and max(done_per_batch) == 2, done_per_batch  # two decoded at a time, no more
    assert all(row["attempts"] == 0 and row["error"] is None for row in journal_rows(tmp_path))


def test_the_budget_pauses_decoding_ahead_for_an_image_that_fits_only_without_it_until_it_is_written(monkeypatch):
    from batchsr.config import RunSettings
    from batchsr.imageio import Image
    from batchsr.pipeline import MemoryBudget, whole_mb

    monkeypatch.setattr("batchsr.pipeline.process_rss_mb", lambda: 1000.0)
    image = Image(np.zeros((100, 120, 3), np.uint8), None, False, "png")
    one = whole_mb(image, 4, 4.0, reference=False)
    run = RunSettings(memory_mb=int(1000 + one + 20))  # whole, beside a quarter of the cap kept for decoding ahead: no
    ahead = DecodeAhead(run.memory_cap_mb / 4)
    ahead.reserve(0, 5.0)  # the next file, decoded ahead
    budget = MemoryBudget(1000.0, ahead)
    route = budget.plan("a", image, "png", 4, run, 128, reference=False, call_mb=0.0)
    assert route.refusal is None and not route.streamed and route.paused
    waiting = threading.Thread(target=ahead.reserve, args=(1, 1.0), daemon=True)  # not the next file: it waits
    waiting.start()
    waiting.join(0.3)
    assert waiting.is_alive() and ahead.pending_mb == 5.0
    budget.release("a")
    waiting.join(5)
    assert not waiting.is_alive() and ahead.pending_mb == 6.0
    # A next file larger than the quarter counts in full: here the image no longer fits beside it.
    big = DecodeAhead(10.0)
    big.reserve(0, 800.0)
    roomy = RunSettings(memory_mb=int(1000 + one + 100))
    assert MemoryBudget(1000.0, big).plan("b", image, "png", 4, roomy, 128, reference=False, call_mb=0.0).refusal is not None
    whole = MemoryBudget(1000.0, DecodeAhead(10.0)).plan("c", image, "png", 4, roomy, 128, reference=False, call_mb=0.0)
    assert whole.refusal is None and not whole.streamed and not whole.paused


def test_an_image_refused_even_with_decoding_ahead_paused_leaves_it_running_and_says_what_was_counted(monkeypatch):
    from batchsr.config import RunSettings
    from batchsr.imageio import Image
    from batchsr.pipeline import MemoryBudget

    monkeypatch.setattr("batchsr.pipeline.process_rss_mb", lambda: 1000.0)
    run = RunSettings(memory_mb=1100)
    ahead = DecodeAhead(25.0)
    ahead.reserve(0, 5.0)
    huge = Image(np.zeros((2000, 2400, 3), np.uint8), None, False, "jpg")  # JPEG output: it cannot go band by band
    route = MemoryBudget(1000.0, ahead).plan("h", huge, "jpg", 4, run, 128, reference=False, call_mb=0.0)
    assert route.refusal is not None and not route.paused and "(counted: 5 MB for the images decoded ahead of it)" in route.refusal
    admitted = threading.Thread(target=ahead.reserve, args=(1, 1.0), daemon=True)  # would wait for ever if still paused
    admitted.start()
    admitted.join(5)
    assert not admitted.is_alive() and ahead.pending_mb == 6.0


def test_the_next_file_counts_from_its_header_before_it_is_admitted():
    """It never waits, so a plan made before it is admitted must count it already."""
    read = []

    def estimate(index):
        read.append(index)
        return [5.0, 700.0][index]

    ahead = DecodeAhead(10.0)
    ahead.stream(estimate, 2)
    assert ahead.pending_mb == 5.0  # file 0, not admitted yet
    ahead.reserve(0, ahead.estimate_mb(0))
    ahead.handed_over(0)
    assert ahead.pause("a") == 700.0  # file 1 is next: it decodes even while paused
    ahead.reserve(1, ahead.estimate_mb(1))
    assert ahead.pending_mb == 700.0 and read == [0, 1]  # each header read once
    ahead.handed_over(1)
    assert ahead.pending_mb == 0.0  # no file after it


def _huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels; its data is cut short."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(bytes(100))) + chunk(b"IEND", b"")


def test_a_file_above_max_pixels_reserves_only_its_bytes_for_decoding_ahead(tmp_path, monkeypatch):
    """Next in order, its header would claim far more than the cap, and refuse the image before it."""
    from batchsr.imageio import decode_image, probe_decoding_mb
    from batchsr.pipeline import whole_mb

    _folder(tmp_path / "in", 1, size=(200, 240))
    (tmp_path / "in" / "01.png").write_bytes(_huge_png_header(30000, 30000))
    assert probe_decoding_mb(tmp_path / "in" / "01.png") == 7200.0
    one = whole_mb(decode_image((tmp_path / "in" / "00.png").read_bytes()), 4, 4.0, reference=False)
    for where in ("batchsr.runner", "batchsr.pipeline"):
        monkeypatch.setattr(f"{where}.process_rss_mb", lambda: 1000.0)
    settings = Settings.model_validate({"engine": {"tile": 256, "batch_size": 8}, "image": {"max_pixels": 100_000_000},
                                        "run": {"progress": "none", "memory_mb": int(1000 + 1.1 * one)}})
    summary = run_folder(tmp_path / "in", tmp_path / "out", settings, engine=Bicubic())
    assert summary.done == 1, [f.reason for f in summary.failed]
    [failure] = summary.failed
    assert failure.path.name == "01.png" and "image.max_pixels" in failure.reason
