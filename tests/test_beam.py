"""``batchsr run --engine beam``: the same outputs, metrics and exit codes as the local engine.

Beam runs in this process (DirectRunner pinned to the in-memory FnApiRunner).
Tests that need Apache Beam skip without the ``beam`` extra; the message for a
missing extra is tested either way.
"""

from __future__ import annotations

import csv
import gc
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from batchsr.config import Settings
from batchsr.imageio import read_image
from batchsr.resize import degrade
from tests.conftest import REPO, data_dir, model_fails_on_a_png, write_png

TIMING_COLUMNS = {"ms"}


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "batchsr.cli", *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=300, check=False)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture()
def tree(tmp_path) -> tuple[Path, Path]:
    """LR inputs (a subfolder, a JPEG, an RGBA PNG, a corrupt PNG, a text file) and HR references for two of them."""
    import cv2

    src, hr_dir = tmp_path / "in", tmp_path / "hr"
    for name, rel in [("bird", "bird.png"), ("head", "sub/deeper/head.png")]:
        hr = read_image(data_dir("Set5", "HR") / f"{name}.png").rgb
        hr = hr[: hr.shape[0] // 4 * 4, : hr.shape[1] // 4 * 4]
        write_png(hr_dir / rel, hr)
        write_png(src / rel, degrade(hr, 4))
    lr = read_image(src / "bird.png").rgb
    _, jpeg = cv2.imencode(".jpg", cv2.cvtColor(lr, cv2.COLOR_RGB2BGR))
    (src / "sub" / "photo.jpeg").write_bytes(jpeg.tobytes())
    rgba = np.dstack([lr[:30, :40], np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (30, 1))])
    (src / "sub" / "mask.png").write_bytes(cv2.imencode(".png", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))[1].tobytes())
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    (src / "notes.txt").write_text("not an image")
    return src, hr_dir


def _needs_beam() -> None:
    """The test command installs the beam extra: a broken install fails there rather than skip these tests."""
    if "beam" in os.environ.get("BATCHSR_TEST_EXTRAS", "").split(","):
        import apache_beam  # noqa: F401
    else:
        pytest.importorskip("apache_beam")


def _settings(model: Path, **run) -> Settings:
    return Settings.model_validate({"model": {"weights": str(model)}, "engine": {"tile": 32, "overlap": 8, "batch_size": 4},
                                    "run": {"progress": "none", **run}})


def _outputs(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and ".batchsr" not in p.parts)


def test_beam_matches_the_local_engine(tree, tmp_path, tiny_model):
    _needs_beam()
    from batchsr.runner import run_folder

    src, hr_dir = tree
    local = run_folder(src, tmp_path / "local", _settings(tiny_model), reference_dir=hr_dir)
    assert (local.done, local.ignored, [f.path.name for f in local.failed]) == (4, 1, ["broken.png"])
    # The command as a user types it: summary, failure lines, exit code.
    beam = _cli("run", str(src), str(tmp_path / "beam"), "--model", str(tiny_model), "--tile", "32", "--overlap", "8", "--batch-size", "4",
                "--progress", "none", "--reference", str(hr_dir), "--engine", "beam")
    assert beam.returncode == 65, beam.stderr
    assert "done 4, skipped 0, failed 1, ignored 1" in beam.stderr
    assert f"batchsr: failed: {src / 'broken.png'}: corrupt or truncated PNG data" in beam.stderr
    # Same names, same pixels (byte-identical here; 60 dB allows for float round-off across batch shapes).
    names = _outputs(tmp_path / "local")
    assert names == _outputs(tmp_path / "beam") == ["bird.png", "metrics.csv", "sub/deeper/head.png", "sub/mask.png", "sub/photo.jpeg"]
    for name in names:
        ours, theirs = tmp_path / "beam" / name, tmp_path / "local" / name
        if name.endswith(".csv") or ours.read_bytes() == theirs.read_bytes():
            continue
        a, b = read_image(ours), read_image(theirs)
        assert a.rgb.shape == b.rgb.shape and a.rgb.dtype == b.rgb.dtype, name
        assert _psnr(a.rgb, b.rgb) >= 60, name
        if b.alpha is not None:
            assert _psnr(a.alpha, b.alpha) >= 60, name
    # The same metrics.csv rows, timing aside.
    rows = {}
    for engine in ("local", "beam"):
        with open(tmp_path / engine / "metrics.csv", newline="") as handle:
            rows[engine] = [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(handle)]
    assert [r["image"] for r in rows["beam"]] == ["bird.png", "sub/deeper/head.png", "MEAN"]
    assert rows["beam"] == rows["local"]
    # The corrupt file is in the dead letter, with the local engine's reason; nothing temporary is left.
    dead = [json.loads(line) for line in (tmp_path / "beam" / ".batchsr" / "dead-letter.jsonl").read_text().splitlines()]
    assert dead == [{"file": str(src / "broken.png"), "reason": local.failed[0].reason}]
    assert not list((tmp_path / "beam").rglob("*.tmp")) and not list((tmp_path / "beam" / ".batchsr").glob("beam-*"))
    # The journal is recorded: a local run into the same folder has nothing left to do.
    again = run_folder(src, tmp_path / "beam", _settings(tiny_model))
    assert (again.done, again.skipped) == (0, 4)


def test_beam_refuses_an_output_that_is_the_input_or_holds_it(tmp_path, tiny_model):
    """As run: else every input is left out as lying inside OUTPUT, and the job "succeeds" doing nothing."""
    _needs_beam()
    from batchsr.beam import run_beam
    from batchsr.errors import OutputError

    write_png(tmp_path / "in" / "a.png", np.zeros((8, 8, 3), np.uint8))
    for source, target in [(tmp_path / "in", tmp_path / "in"), (tmp_path / "in", tmp_path), ("gs://b/in", "gs://b/"), ("gs://b/in", "gs://b/in/")]:
        with pytest.raises(OutputError, match="is the input"):
            run_beam(source, target, _settings(tiny_model))
    assert not (tmp_path / "in" / ".batchsr").exists()


def test_beam_streams_big_images_and_clashing_names_fail(tmp_path, tiny_model):
    _needs_beam()
    from batchsr.beam import run_beam
    from batchsr.runner import run_folder

    src = tmp_path / "in"
    rng = np.random.default_rng(3)
    write_png(src / "a.png", rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    write_png(src / "b.png", rng.integers(0, 256, (24, 20, 3), dtype=np.uint8))
    (src / "b.jpg").write_bytes((src / "a.png").read_bytes())  # PNG content: its output would be b.png too
    settings = _settings(tiny_model, stream_megapixels=0.001)  # every PNG here goes band by band
    local = run_folder(src, tmp_path / "local", settings)
    beam = run_beam(src, tmp_path / "beam", settings)
    assert (beam.done, beam.ignored) == (local.done, local.ignored) == (2, 0)
    assert [(f.path.name, f.reason) for f in beam.failed] == [(f.path.name, f.reason) for f in local.failed]
    assert [f.path.name for f in beam.failed] == ["b.png"] and "would overwrite the output of" in beam.failed[0].reason
    for name in ("a.png", "b.png"):
        assert (tmp_path / "beam" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()


def test_outputs_of_a_beam_job_that_stopped_early_are_batchsrs_for_the_next_run(tmp_path, tiny_model, monkeypatch):
    """Beam records its outputs only at the end: after a job cut short, a plain run refused them all as files
    the journal did not write."""
    _needs_beam()
    import batchsr.beam
    from batchsr.beam import run_beam
    from batchsr.runner import run_folder

    src = tmp_path / "in"
    for k in range(2):
        write_png(src / "sub" / f"{k}.png", np.full((12, 10, 3), 40 + k, np.uint8))

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(batchsr.beam, "_summarise", stopped)
    with pytest.raises(KeyboardInterrupt):
        run_beam(src, tmp_path / "out", _settings(tiny_model))
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "out" / "sub").iterdir()) == ["0.png", "1.png"]
    summary = run_folder(src, tmp_path / "out", _settings(tiny_model))
    assert (summary.done, summary.failed) == (2, [])


def test_beam_replaces_only_files_its_journal_wrote_unless_forced(tmp_path, tiny_model):
    """A file at an output path that no batchsr run wrote (here an original, INPUT's image under OUTPUT) was
    replaced by a Beam job; its own outputs are replaced, and --force replaces the other file too."""
    _needs_beam()
    from batchsr.beam import run_beam

    src, out = tmp_path / "in", tmp_path / "out"
    write_png(src / "a.png", np.full((12, 10, 3), 40, np.uint8))
    write_png(src / "b.png", np.full((12, 10, 3), 90, np.uint8))
    write_png(out / "b.png", np.full((5, 5, 3), 7, np.uint8))  # someone else's file
    original = (out / "b.png").read_bytes()
    summary = run_beam(src, out, _settings(tiny_model))
    assert summary.done == 1
    assert [(f.path.name, "journal did not write it" in f.reason) for f in summary.failed] == [("b.png", True)]
    assert (out / "b.png").read_bytes() == original
    assert read_image(out / "a.png").rgb.shape == (48, 40, 3)
    again = run_beam(src, out, _settings(tiny_model))  # its own output is replaced
    assert (again.done, [f.path.name for f in again.failed]) == (1, ["b.png"])
    forced = run_beam(src, out, _settings(tiny_model), force=True)
    assert (forced.done, forced.failed) == (2, [])
    assert read_image(out / "b.png").rgb.shape == (48, 40, 3)


@pytest.mark.parametrize("streamed", [False, True])
def test_beam_writes_through_no_linked_folder_and_reads_no_other_runs_output(tmp_path, tiny_model, streamed):
    """As run: OUT/sub linked to IN/sub had outputs written over the inputs; photos/x4, the OUTPUT of another
    run inside INPUT, was read as input."""
    _needs_beam()
    from batchsr.beam import run_beam

    src, out = tmp_path / "in", tmp_path / "out"
    write_png(src / "sub" / "a.png", np.full((6, 7, 3), 40, np.uint8))
    write_png(src / "b.png", np.full((5, 5, 3), 90, np.uint8))
    write_png(src / "x4" / "b.png", np.full((20, 20, 3), 90, np.uint8))
    (src / "x4" / ".batchsr").mkdir()
    (src / "b.png").chmod(0o600)  # a private input: a private output
    before = (src / "sub" / "a.png").read_bytes()
    out.mkdir()
    (out / "sub").symlink_to(src / "sub")
    summary = run_beam(src, out, _settings(tiny_model, stream_megapixels=0.0001 if streamed else 16.0))
    assert summary.done == 1 and [f.path.name for f in summary.failed] == ["a.png"]
    assert "is a symbolic link; batchsr does not write through links" in summary.failed[0].reason
    assert (src / "sub" / "a.png").read_bytes() == before and os.listdir(src / "sub") == ["a.png"]
    assert sorted(p.name for p in out.iterdir() if p.name != ".batchsr") == ["b.png", "sub"]
    assert (out / "b.png").stat().st_mode & 0o777 == 0o600
    shutil.rmtree(src / "x4" / ".batchsr")  # no longer another run's OUTPUT: read in the next run of this process
    assert run_beam(src, tmp_path / "again", _settings(tiny_model)).done == 3  # sub/a, b and x4/b


def test_beam_takes_folder_names_literally_and_fails_only_a_name_that_is_not_utf8(tmp_path, tiny_model):
    """"photos [2019]" matched nothing (a character class) and one Latin-1 name failed the whole job."""
    _needs_beam()
    from batchsr.beam import run_beam
    from batchsr.errors import OutputError

    src = tmp_path / "photos [2019]"
    rng = np.random.default_rng(4)
    write_png(src / "a.png", rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    write_png(src / "sub*" / "b?.png", rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    latin1 = os.fsdecode(os.fsencode(str(src)) + b"/caf\xe9.png")
    Path(latin1).write_bytes((src / "a.png").read_bytes())
    beam = run_beam(src, tmp_path / "out", _settings(tiny_model))
    assert beam.done == 2 and _outputs(tmp_path / "out") == ["a.png", "sub*/b?.png"]
    assert [(f.path.name, f.reason) for f in beam.failed] == [
        ("caf\\xe9.png", "the file name is not valid UTF-8; rename it to have it processed")]
    with pytest.raises(OutputError, match=r"cannot write under a path holding \[, \], \* or \?"):
        run_beam(src, tmp_path / "out [v2]", _settings(tiny_model))


def test_beam_records_streamed_images_against_their_reference_and_drops_a_stale_metrics_csv(tmp_path, tiny_model, monkeypatch):
    """As run: a streamed image is up to date for a later run --reference, and an unscored redo removes metrics.csv."""
    _needs_beam()
    import batchsr.pipeline
    from batchsr.beam import run_beam
    from batchsr.runner import run_folder

    rng = np.random.default_rng(5)
    hr = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    write_png(tmp_path / "hr" / "a.png", hr)
    write_png(tmp_path / "in" / "a.png", degrade(hr, 4))
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(batchsr.pipeline, "whole_mb", lambda *args, **kwargs: 1e7)  # too large to score whole: streamed
        assert run_beam(tmp_path / "in", out, _settings(tiny_model), reference_dir=tmp_path / "hr").done == 1
        again = run_folder(tmp_path / "in", out, _settings(tiny_model), reference_dir=tmp_path / "hr")
    assert (again.done, again.skipped) == (0, 1)
    scored = tmp_path / "scored"
    assert run_beam(tmp_path / "in", scored, _settings(tiny_model), reference_dir=tmp_path / "hr").done == 1
    assert (scored / "metrics.csv").exists()
    assert run_beam(tmp_path / "in", scored, _settings(tiny_model, output_format="jpg")).done == 1
    assert not (scored / "metrics.csv").exists() and (scored / "a.jpg").exists()


def test_beam_fails_only_the_image_the_model_fails_on(tmp_path, tiny_model, monkeypatch):
    """Its batch-mate was dead-lettered with it, under a Python repr for a reason."""
    _needs_beam()
    from batchsr.beam import run_beam

    calls = model_fails_on_a_png(tmp_path / "in", monkeypatch)
    beam = run_beam(tmp_path / "in", tmp_path / "out", _settings(tiny_model))
    assert beam.done == 1 and _outputs(tmp_path / "out") == ["b.png"]
    assert [(f.path.name, f.reason) for f in beam.failed] == [("a.png", "not upscaled: simulated failure on a marked image")]
    assert calls[0] == 2  # the call of both failed; each image was then tried on its own


@pytest.fixture()
def bucket(tmp_path):
    """``bucket://`` URIs kept in a local folder: a Beam filesystem other than the local one, as gs:// is, with no network."""
    _needs_beam()
    from apache_beam.io.filesystem import FileMetadata, FileSystem
    from apache_beam.io.localfilesystem import LocalFileSystem

    root, disk = tmp_path / "bucket", LocalFileSystem(None)

    def local(uri: str) -> str:
        return str(root / uri[len("bucket://"):])

    class Bucket(FileSystem):  # an object store: no folders, prefixes only
        @classmethod
        def scheme(cls):
            return "bucket"

        def join(self, base, *parts):
            return "/".join([base.rstrip("/"), *parts])

        def split(self, path):
            head, _, tail = path.rpartition("/")
            return head, tail

        def mkdirs(self, path):
            pass

        def has_dirs(self):
            return False

        def _list(self, prefix):
            for path in sorted(p for p in root.rglob("*") if p.is_file()):
                uri = "bucket://" + path.relative_to(root).as_posix()
                if uri.startswith(prefix):
                    yield FileMetadata(uri, path.stat().st_size, path.stat().st_mtime)

        def create(self, path, mime_type="application/octet-stream", compression_type="auto"):
            os.makedirs(os.path.dirname(local(path)), exist_ok=True)
            return disk.create(local(path), mime_type, compression_type)

        def open(self, path, mime_type="application/octet-stream", compression_type="auto"):
            return disk.open(local(path), mime_type, compression_type)

        def copy(self, sources, destinations):
            for destination in destinations:
                os.makedirs(os.path.dirname(local(destination)), exist_ok=True)
            disk.copy([local(s) for s in sources], [local(d) for d in destinations])

        def rename(self, sources, destinations):
            for destination in destinations:
                os.makedirs(os.path.dirname(local(destination)), exist_ok=True)
            disk.rename([local(s) for s in sources], [local(d) for d in destinations])

        def exists(self, path):
            return disk.exists(local(path))

        def size(self, path):
            return disk.size(local(path))

        def last_updated(self, path):
            return disk.last_updated(local(path))

        def checksum(self, path):
            return disk.checksum(local(path))

        def metadata(self, path):
            found = disk.metadata(local(path))
            return FileMetadata(path, found.size_in_bytes, found.last_updated_in_seconds)

        def delete(self, paths):
            disk.delete([local(p) for p in paths if disk.exists(local(p))])

    yield root
    del Bucket
    gc.collect()  # Beam finds filesystems among FileSystem's subclasses: let this one go with its test


def test_beam_reads_and_writes_other_filesystems(bucket, tmp_path, tiny_model):
    from batchsr.beam import run_beam
    from batchsr.runner import run_folder

    rng = np.random.default_rng(5)
    hr = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    write_png(bucket / "hr" / "a.png", hr)
    write_png(bucket / "in" / "a.png", degrade(hr, 4))
    write_png(bucket / "in" / "sub" / "b.png", rng.integers(0, 256, (24, 20, 3), dtype=np.uint8))
    (bucket / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(100))
    (bucket / "in" / "notes.txt").write_text("not an image")
    local = run_folder(bucket / "in", tmp_path / "local", _settings(tiny_model), reference_dir=bucket / "hr")
    beam = run_beam("bucket://in", "bucket://out", _settings(tiny_model), reference_dir="bucket://hr")
    assert (beam.done, beam.ignored, [(str(f.path), f.reason) for f in beam.failed]) == (
        local.done, local.ignored, [("bucket://in/broken.png", local.failed[0].reason)])
    assert beam.metrics_csv == "bucket://out/metrics.csv"
    for name in ("a.png", "sub/b.png"):
        assert (bucket / "out" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    with open(bucket / "out" / "metrics.csv", newline="") as ours, open(tmp_path / "local" / "metrics.csv", newline="") as theirs:
        assert [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in csv.DictReader(ours)] == \
               [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in csv.DictReader(theirs)]
    assert json.loads((bucket / "out" / ".batchsr" / "dead-letter.jsonl").read_text())["file"] == "bucket://in/broken.png"
    assert sorted(p.name for p in (bucket / "out" / ".batchsr").iterdir()) == ["dead-letter.jsonl"]  # no journal, nothing left over
    # Band by band, the output is made in a local temporary file and copied.
    streamed = _settings(tiny_model, stream_megapixels=0.0001)
    run_folder(bucket / "in", tmp_path / "local-streamed", streamed)
    assert run_beam("bucket://in", "bucket://streamed", streamed).done == 2
    for name in ("a.png", "sub/b.png"):
        assert (bucket / "streamed" / name).read_bytes() == (tmp_path / "local-streamed" / name).read_bytes()


def test_direct_runner_is_pinned_in_process():
    _needs_beam()
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from batchsr.beam import _runner, pipeline_options

    options = pipeline_options(None, [])
    assert options.view_as(StandardOptions).runner == "DirectRunner"
    assert options.view_as(DirectOptions).direct_running_mode == "in_memory"
    assert isinstance(_runner(options), FnApiRunner)  # never Prism, which downloads a binary
    remote = pipeline_options("DataflowRunner", ["--project", "p", "--runner", "FlinkRunner"])
    assert _runner(remote) == "DataflowRunner"


@pytest.fixture()
def restore_logging():
    yield
    from loguru import logger

    logger.remove()  # the CLI pointed loguru at CliRunner's stream
    logger.add(sys.stderr)


def test_missing_beam_says_how_to_install(tmp_path, monkeypatch, restore_logging):
    from click.testing import CliRunner

    from batchsr.cli import main

    src = tmp_path / "in"
    write_png(src / "a.png", np.zeros((8, 8, 3), np.uint8))
    monkeypatch.setitem(sys.modules, "apache_beam", None)  # as if the extra were not installed
    result = CliRunner().invoke(main, ["run", str(src), str(tmp_path / "out"), "--engine", "beam"])
    assert result.exit_code == 78, result.output
    assert "pip install 'batchsr[beam]'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
    # Beam's options without the Beam engine are refused, not ignored.
    local = CliRunner().invoke(main, ["run", str(src), str(tmp_path / "out"), "--", "--project", "p"])
    assert local.exit_code == 78 and "need --engine beam" in local.output
