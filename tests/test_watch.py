"""``batchsr watch`` and ``batchsr status`` end to end: real daemon processes, real files.

Most daemons here run the real command (``batchsr.cli.main``) in a process
forked from a multiprocessing fork server that has TensorFlow imported already:
a start costs about a second instead of ten, which is what makes twenty
``kill -9`` trials affordable.  The SIGTERM test, the lock tests and the slow
variant of the kill test start ``python -m batchsr.cli`` itself.  A few tests
run the daemon in this process to make a write fail on purpose.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import itertools
import json
import multiprocessing
import importlib
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import unicodedata
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from loguru import logger

from batchsr.config import Settings, WatchSettings, load_settings
from batchsr.errors import ConfigError, InputError, OutputError
from batchsr.imageio import decode_image, read_image
from batchsr.resize import degrade
from batchsr.watch import METRICS_COLUMNS, METRICS_FILE, WatchFolders, is_ignored, serve
from conftest import REPO, deep_file, write_png  # works under both `pytest` and `python -m pytest`

PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
KILL_TRIALS = 20
_numbers = itertools.count()


# -- images, folders, journal ---------------------------------------------------------------------------


def image(seed: int, size: tuple[int, int] = (8, 8)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def png(seed: int, size: tuple[int, int] = (8, 8)) -> bytes:
    ok, data = cv2.imencode(".png", image(seed, size))
    assert ok
    return data.tobytes()


def jpeg(seed: int, size: tuple[int, int] = (16, 16)) -> bytes:
    ok, data = cv2.imencode(".jpg", image(seed, size))
    assert ok
    return data.tobytes()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def drop(inbox: Path, rel: str, data: bytes) -> Path:
    """The producer contract: write under a hidden temporary name, then rename."""
    target = inbox / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.part")
    temporary.write_bytes(data)
    os.replace(temporary, target)
    return target


def write_config(root: Path, model: Path, **watch) -> Path:
    """Folders relative to the config file (so also a test of their resolution); fast timings."""
    settings = {
        "model": {"weights": str(model)},
        "engine": {"tile": 16, "overlap": 4, "batch_size": 16},
        "run": {"decode_workers": 2, "write_workers": 2},
        "watch": {
            "inbox": "inbox", "output": "output", "done": "done", "failed": "failed", "state": "state",
            "settle_s": 0.2, "max_wait_s": 0.1, "retry_delay_s": 0.2, "max_attempts": 3,
            "rescan_interval_s": 30.0, "poll_interval_s": 0.1, "stop_timeout_s": 60.0, **watch,
        },
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    return path


def journal_rows(root: Path) -> list[dict]:
    path = root / "state" / "journal.sqlite"
    if not path.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as db:
        db.row_factory = sqlite3.Row
        if db.execute("SELECT name FROM sqlite_master WHERE name = 'files'").fetchone() is None:
            return []  # created, not yet initialised
        return [dict(row) for row in db.execute("SELECT * FROM files ORDER BY id")]


def states(root: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for row in journal_rows(root):
        found.setdefault(row["state"], []).append(row["path"])
    return found


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and ".batchsr" not in p.parts)


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if p.is_file() and p.name.endswith(".tmp")]


def wait_for(condition, timeout: float = 90, daemon: "Daemon | None" = None, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        if daemon is not None and not daemon.alive():
            pytest.fail(f"the daemon exited ({daemon.returncode()}) while waiting for {what}:\n{daemon.log()[-4000:]}")
        time.sleep(0.05)
    log = daemon.log()[-4000:] if daemon is not None else ""
    pytest.fail(f"timed out after {timeout}s waiting for {what}\n{log}")


def assert_outputs_complete(output: Path) -> None:
    """Whatever is under a final name is complete: kills may only leave temporary files."""
    for rel in files_under(output):
        path = output / rel
        if rel.endswith(".png"):
            assert path.read_bytes().endswith(PNG_END), f"truncated output {rel}"
        if rel == METRICS_FILE:
            with open(path, newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                assert reader.fieldnames == METRICS_COLUMNS
                rows = list(reader)
            keys = [(r["image"], r["input_sha256"]) for r in rows]
            assert len(keys) == len(set(keys)), "duplicate metrics rows"
            assert all(r["psnr_y"] and r["finished"] and r["model_id"] for r in rows), "torn metrics row"


def assert_consistent(root: Path, expected: dict[str, bytes], side: int = 8) -> None:
    """Each input once: one complete output, the input in done/, journal and folders agreeing, no temporaries."""
    inbox, output, done = root / "inbox", root / "output", root / "done"
    assert files_under(inbox) == []
    assert files_under(done) == sorted(expected)
    assert files_under(output) == sorted([*expected, *([METRICS_FILE] if (output / METRICS_FILE).exists() else [])])
    assert_outputs_complete(output)
    for rel, data in expected.items():
        assert (done / rel).read_bytes() == data
        assert read_image(output / rel).rgb.shape == (side * 4, side * 4, 3)
    assert temporaries(root) == []
    rows = journal_rows(root)
    assert [r for r in rows if r["state"] != "done"] == []
    assert sorted((r["path"], r["sha256"], r["output"]) for r in rows) == sorted((rel, sha(d), rel) for rel, d in expected.items())


# -- daemon processes ------------------------------------------------------------------------


def _daemon_main(args: list[str], env: dict[str, str], log_path: str) -> None:
    """Fork-server child: the real ``batchsr`` command, output into a log file, without a terminal (as under
    systemd: SIGHUP is then ignored), and with SIGHUP's default action, as systemd starts a service (pytest
    itself may run under nohup)."""
    os.setsid()
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    os.environ.update(env)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from batchsr.cli import main

    main(args, prog_name="batchsr")


# ``python -m batchsr.cli`` with SIGHUP's default action, as systemd starts a service (pytest may run under nohup)
_DEFAULT_SIGHUP_MAIN = ("import runpy, signal, sys; signal.signal(signal.SIGHUP, signal.SIG_DFL); "
                        "sys.argv[0] = 'batchsr'; runpy.run_module('batchsr.cli', run_name='__main__')")


class Daemon:
    """A ``batchsr watch`` process and the datagram socket it notifies, as systemd's NOTIFY_SOCKET."""

    def __init__(self, context, root: Path, config: Path, launcher: str, env: dict | None = None):
        self.launcher = launcher
        self.log_path = root / f"daemon-{next(_numbers)}.log"
        name = f"batchsr-test-{uuid.uuid4().hex}"
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind("\0" + name)
        self.messages: list[str] = []
        self.closed = False
        self.reader = threading.Thread(target=self._read_messages, daemon=True)  # like systemd, always reading
        self.reader.start()
        env = {"NOTIFY_SOCKET": "@" + name, **(env or {})}
        args = ["--config", str(config), "watch"]
        if launcher == "fork":
            self.process = context.Process(target=_daemon_main, args=(args, env, str(self.log_path)), daemon=True)
            self.process.start()
        else:
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen([sys.executable, "-c", _DEFAULT_SIGHUP_MAIN, *args], env={**os.environ, **env},
                                                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        self.pid = self.process.pid

    def returncode(self) -> int | None:
        return self.process.exitcode if self.launcher == "fork" else self.process.poll()

    def alive(self) -> bool:
        return self.returncode() is None

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def _read_messages(self) -> None:
        self.socket.settimeout(0.1)
        while not self.closed:
            with contextlib.suppress(TimeoutError):
                self.messages.append(self.socket.recv(4096).decode())

    def wait_message(self, text: str, timeout: float = 120) -> None:
        wait_for(lambda: any(text in m for m in list(self.messages)), timeout, self, f"{text!r} from the daemon")

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float = 120) -> int:
        if self.launcher == "fork":
            self.process.join(timeout)
        else:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        code = self.returncode()
        if code is None:
            self.signal(signal.SIGKILL)
            pytest.fail(f"the daemon did not exit within {timeout}s:\n{self.log()[-4000:]}")
        return code

    def stop(self) -> int:
        self.signal(signal.SIGTERM)
        return self.wait()

    def close(self) -> None:
        if self.closed:
            return
        if self.alive():
            self.signal(signal.SIGKILL)
            self.wait(30)
        self.closed = True
        self.reader.join()
        self.socket.close()


@pytest.fixture(scope="module")
def fork_context():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(
        ["tensorflow", "keras", "cv2", "batchsr.cli", "batchsr.watch", "batchsr.engine", "batchsr.model", "batchsr.data", _daemon_main.__module__]
    )
    return context


@pytest.fixture()
def start(fork_context, tmp_path):
    started: list[Daemon] = []

    def start_daemon(config: Path, launcher: str = "fork", env: dict | None = None) -> Daemon:
        daemon = Daemon(fork_context, tmp_path, config, launcher, env)
        started.append(daemon)
        return daemon

    yield start_daemon
    for daemon in started:
        daemon.close()


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "batchsr.cli", *args], capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


@contextlib.contextmanager
def serving_here(config: Path):
    """The daemon in a thread of this process (for tests that make writes fail); yields its log messages."""
    settings = load_settings(config)
    stop, outcome, messages = threading.Event(), {}, []
    sink = logger.add(lambda m: messages.append(str(m)), level="DEBUG", format="{level} {message}")

    def target():
        try:
            outcome["summary"] = serve(settings, stop)
        except BaseException as exc:  # re-raised in the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        wait_for(lambda: any("watching" in m for m in messages) or not thread.is_alive(), 120, what="start-up")
        yield messages
    finally:
        stop.set()
        thread.join(60)
        logger.remove(sink)
    assert not thread.is_alive()
    if "error" in outcome:
        raise outcome["error"]


# -- crash safety ------------------------------------------------------------------------------


@pytest.mark.parametrize("launcher", ["fork", pytest.param("command", marks=pytest.mark.slow)])
def test_kill_9_at_random_moments_then_restart_processes_each_input_exactly_once(tmp_path, tiny_model, start, launcher):
    """Kills during start-up, scans, settling, batches, writes and moves; a metrics CSV is kept too."""
    rng = random.Random(20240611)
    config = write_config(tmp_path, tiny_model, batch_images=3, max_attempts=1000, reference="hr", rescan_interval_s=0.5)
    (tmp_path / "hr").mkdir()
    inbox, expected, killed_mid_batch = tmp_path / "inbox", {}, 0
    for trial in range(KILL_TRIALS):
        for k in range(4):
            rel = f"t{trial:02d}/{k}.png" if k % 2 else f"t{trial:02d}-{k}.png"
            hr = image(1000 * trial + k, (32, 32))
            write_png(tmp_path / "hr" / rel, hr)
            ok, data = cv2.imencode(".png", degrade(hr, 4))
            expected[rel] = drop(inbox, rel, data.tobytes()).read_bytes()
        daemon = start(config, launcher)
        mode = trial % 3
        if mode == 0:  # anywhere, start-up included
            time.sleep(rng.uniform(0.0, 2.5 if launcher == "fork" else 12.0))
        elif mode == 1:  # after start-up: scanning, settling, batches, idle
            daemon.wait_message("READY=1")
            time.sleep(rng.uniform(0.0, 0.8))
        else:  # inside a batch
            daemon.wait_message("READY=1")
            wait_for(lambda: "claimed" in states(tmp_path), 60, daemon, "a batch")
            time.sleep(rng.uniform(0.0, 0.15))
        daemon.signal(signal.SIGKILL)
        assert daemon.wait() == -signal.SIGKILL
        daemon.close()
        killed_mid_batch += "claimed" in states(tmp_path)
        assert_outputs_complete(tmp_path / "output")
    assert killed_mid_batch >= 3, f"only {killed_mid_batch} kills landed inside a batch"

    daemon = start(config, launcher)
    wait_for(lambda: len(states(tmp_path).get("done", [])) == len(expected) and not files_under(inbox), 300, daemon, "every input done")
    assert daemon.stop() == 0
    assert_consistent(tmp_path, expected)
    with open(tmp_path / "output" / METRICS_FILE, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((r["image"], r["input_sha256"]) for r in rows) == sorted((rel, sha(d)) for rel, d in expected.items())
    model_id = journal_rows(tmp_path)[0]["model_id"]
    assert model_id.startswith("unet-x4-") and {r["model_id"] for r in rows} == {model_id}


def test_sigterm_during_a_batch_finishes_it_and_exits_0(tmp_path, tiny_model, start):
    config = write_config(tmp_path, tiny_model, batch_images=4, max_wait_s=1.0)
    inbox = tmp_path / "inbox"
    expected = {f"big{i}.png": drop(inbox, f"big{i}.png", png(i, (256, 256))).read_bytes() for i in range(4)}
    daemon = start(config, "command", env={"WATCHDOG_USEC": "300000"})
    wait_for(lambda: "batch of 4 images" in daemon.log(), 180, daemon, "the batch to start")
    daemon.signal(signal.SIGTERM)
    drop(inbox, "late.png", png(99))  # arrives after the signal: not taken
    assert daemon.wait(120) == 0
    log = daemon.log()
    assert log.index("batch of 4 images") < log.index("SIGTERM") < log.index("batch: 4 done"), log
    assert files_under(inbox) == ["late.png"]
    assert files_under(tmp_path / "done") == sorted(expected)
    assert files_under(tmp_path / "output") == sorted(expected)
    assert_outputs_complete(tmp_path / "output")
    assert sorted(states(tmp_path)["done"]) == sorted(expected)
    wait_for(lambda: any("STOPPING=1" in m for m in list(daemon.messages)), 5, what="STOPPING=1")
    for message in ("READY=1", "WATCHDOG=1", "STATUS=watching"):
        assert any(message in m for m in daemon.messages), daemon.messages


def test_a_runs_output_folder_inside_the_inbox_is_not_read_as_input(tmp_path, tiny_model):
    """`batchsr run SRC inbox/x4` into a watched inbox: the daemon upscaled the run's outputs again (x16) and
    moved them to done/, so each cron tick redid the run's whole work."""
    from batchsr.journal import read_status

    config = write_config(tmp_path, tiny_model, rescan_interval_s=0.5)
    inbox = tmp_path / "inbox"
    (inbox / "at_start" / ".batchsr").mkdir(parents=True)
    drop(inbox / "at_start", "old.png", png(40))
    with serving_here(config):
        (inbox / "later" / "deeper").mkdir(parents=True)
        (inbox / "later" / ".batchsr").mkdir()
        drop(inbox / "later" / "deeper", "new.png", png(41))  # an event from inside it
        drop(inbox, "mine.png", png(42))
        wait_for(lambda: states(tmp_path).get("done") == ["mine.png"], 60, what="mine.png")
        time.sleep(1.5)  # more scans: the run's outputs stay where they are
        shown = {p["path"]: p["reason"] for p in read_status(tmp_path / "state").inbox_problems}
    assert states(tmp_path) == {"done": ["mine.png"]}
    assert files_under(inbox) == ["at_start/old.png", "later/deeper/new.png"]
    assert all(shown.get(folder, "").startswith("the OUTPUT folder of a batchsr run") for folder in ("at_start", "later")), shown


def test_a_missing_inbox_is_said_once_not_at_every_scan(tmp_path, tiny_model):
    """An unmounted share gave an error line at every rescan: 1,440 a day at the default 60 s."""
    config = write_config(tmp_path, tiny_model, rescan_interval_s=0.2)
    from batchsr.journal import read_status

    with serving_here(config) as messages:
        os.rmdir(tmp_path / "inbox")
        time.sleep(2.0)  # some ten scans
        assert [(p["path"], p["reason"][:40]) for p in read_status(tmp_path / "state").inbox_problems] == \
            [(".", "the inbox is missing or not a folder (un")]  # status shows it too
        drop(tmp_path / "inbox", "back.png", png(45))
        wait_for(lambda: states(tmp_path).get("done") == ["back.png"], 60, what="back.png")
    assert sum("is missing or not a folder" in m for m in messages) == 1
    assert read_status(tmp_path / "state").inbox_problems == []


def test_what_a_scan_skips_is_forgotten_once_gone_and_said_again_when_it_comes_back(tmp_path, tiny_model):
    """Each link or badly named file ever seen stayed in the daemon's memory for its life, and one put back a
    week later was skipped without a word."""
    config = write_config(tmp_path, tiny_model, rescan_interval_s=0.2)
    inbox = tmp_path / "inbox"
    bad = os.path.join(os.fsencode(inbox), b"caf\xe9.png")
    with serving_here(config) as messages:
        for turn in (1, 2):
            (inbox / "link.png").symlink_to(tmp_path / "elsewhere.png")
            with open(bad, "wb") as handle:
                handle.write(png(1))
            wait_for(lambda: sum("not valid UTF-8" in m for m in messages) == turn
                     and sum("link.png: a symbolic link" in m for m in messages) == turn, 30, what=f"warnings, turn {turn}")
            (inbox / "link.png").unlink()
            os.unlink(bad)
            time.sleep(1.0)  # some scans without them
    assert sum("not valid UTF-8" in m for m in messages) == 2
    assert sum("link.png: a symbolic link" in m for m in messages) == 2


def test_a_damaged_journal_stops_the_daemon_with_exit_73_naming_it(tmp_path, tiny_model):
    """It was exit 70, "internal error ... (a bug)", restarted by systemd five times over."""
    config = write_config(tmp_path, tiny_model)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "journal.sqlite").write_bytes(os.urandom(8192))
    run = cli("--config", str(config), "watch")
    assert run.returncode == 73 and "journal.sqlite is damaged (file is not a database); move it aside" in run.stderr, run.stderr


@pytest.mark.parametrize("change", ["later version", "column renamed"])
def test_a_watch_journal_this_version_cannot_read_is_refused_untouched(tmp_path, change):
    """A column renamed stopped the daemon with exit 70, "a bug", at every restart by systemd."""
    from batchsr.journal import WatchJournal

    journal = tmp_path / "journal.sqlite"
    WatchJournal(journal).close()
    with contextlib.closing(sqlite3.connect(journal)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
        db.execute("PRAGMA user_version = 7" if change == "later version" else "ALTER TABLE files RENAME COLUMN output TO result")
        db.commit()
        db.execute("PRAGMA journal_mode=DELETE")
    before = journal.read_bytes()
    why = "was written by a later version of batchsr (journal version 7" if change == "later version" else \
        "is not one this version of batchsr knows (table 'files' has no column output)"
    with pytest.raises(OutputError, match=re.escape(f"the journal {journal} {why}")):
        WatchJournal(journal)
    assert journal.read_bytes() == before and not journal.with_name("journal.sqlite-wal").exists()


def test_inbox_problems_are_kept_as_they_change_odd_names_included(tmp_path):
    """What a scan skipped was a warning logged once; status now lists it, mended ones gone, times kept."""
    from batchsr.journal import WatchJournal, read_status

    odd = os.fsdecode(b"odd\xffname")  # not UTF-8: SQLite takes text only
    journal = WatchJournal(tmp_path / "journal.sqlite")
    journal.set_inbox_problems({(odd, "cannot list it: Permission denied"), ("link", "a symbolic link: not followed")}, 1000.0)
    journal.set_inbox_problems({("link", "a symbolic link: not followed"), ("new", "cannot look at it: I/O error")}, 2000.0)
    journal.close()
    shown = {(p["path"], p["reason"], p["since"]) for p in read_status(tmp_path).inbox_problems}
    assert {(path, reason) for path, reason, _ in shown} == {("link", "a symbolic link: not followed"), ("new", "cannot look at it: I/O error")}
    assert [since for path, _, since in shown if path == "link"] == [time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(1000.0))]
    journal = WatchJournal(tmp_path / "journal.sqlite")
    journal.set_inbox_problems({(odd, "cannot list it: Permission denied")}, 3000.0)
    journal.close()
    assert [p["path"] for p in read_status(tmp_path).inbox_problems] == ["odd\\xffname"]


def test_a_state_folder_deleted_while_running_stops_the_daemon(tmp_path, tiny_model):
    """The daemon went on recording into the deleted journal, feeding systemd's watchdog, and all it recorded
    (what was done, tries, output owners) was lost at the next start."""
    config = write_config(tmp_path, tiny_model)
    with pytest.raises(OutputError, match="the journal .*journal.sqlite was deleted or replaced while the daemon ran"):
        with serving_here(config):
            shutil.rmtree(tmp_path / "state")
            time.sleep(3.0)


def test_an_output_keeps_a_private_inputs_mode(tmp_path, tiny_model):
    """A 0600 input gave a 0644 output, readable by everyone."""
    config = write_config(tmp_path, tiny_model)
    (tmp_path / "staging").mkdir()
    (tmp_path / "staging" / "private.png").write_bytes(png(46))
    (tmp_path / "staging" / "private.png").chmod(0o600)
    with serving_here(config):
        (tmp_path / "inbox").mkdir(exist_ok=True)
        os.replace(tmp_path / "staging" / "private.png", tmp_path / "inbox" / "private.png")
        wait_for(lambda: states(tmp_path).get("done") == ["private.png"], 60, what="private.png")
    assert (tmp_path / "output" / "private.png").stat().st_mode & 0o777 == 0o600


def test_an_inbox_gone_again_while_it_is_watched_again_is_tried_again(tmp_path, tiny_model, monkeypatch):
    """A flapping mount: the inbox gone between noticing it back and locking it again was exit 70 (or 66, which
    systemd does not restart)."""
    from batchsr.lock import InboxLock

    config = write_config(tmp_path, tiny_model)
    real, failures = InboxLock.relock, [FileNotFoundError(errno.ENOENT, "No such file or directory")]

    def relock(self):
        if failures:
            raise failures.pop()
        real(self)

    monkeypatch.setattr(InboxLock, "relock", relock)
    with serving_here(config) as messages:
        os.rmdir(tmp_path / "inbox")
        wait_for(lambda: any("is gone" in m for m in messages), 30, what="the inbox gone")
        (tmp_path / "inbox").mkdir()
        wait_for(lambda: any("cannot watch the inbox" in m for m in messages), 30, what="the failed try")
        drop(tmp_path / "inbox", "later.png", png(47))
        wait_for(lambda: states(tmp_path).get("done") == ["later.png"], 60, what="later.png")
    assert not failures


def test_status_finds_the_daemons_lock_on_a_filesystem_of_an_anonymous_device():
    """On a btrfs subvolume stat names another device than /proc/locks: status said "not running". The inode
    alone would match another tmpfs's lock: the holder must have the very file open."""
    import tempfile

    from batchsr.lock import names_inode

    with tempfile.NamedTemporaryFile(dir="/dev/shm") as held:
        info = os.stat(held.name)
        assert os.major(info.st_dev) == 0  # tmpfs: an anonymous device
        exact = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
        elsewhere = f"00:{os.minor(info.st_dev) + 1:02x}:{info.st_ino}"  # as on a btrfs subvolume
        assert names_inode(f"1: FLOCK  ADVISORY  WRITE 999999999 {exact} 0 EOF", info)
        assert names_inode(f"1: FLOCK  ADVISORY  WRITE {os.getpid()} {elsewhere} 0 EOF", info)  # this process has it open
        # a lock file of the same number on a third tmpfs: the holder of the listed lock does not have it open
        mimic = os.stat_result((info.st_mode, info.st_ino, os.makedev(0, os.minor(info.st_dev) + 2), 1, 0, 0, 0, 0, 0, 0))
        assert not names_inode(f"1: FLOCK  ADVISORY  WRITE {os.getpid()} {elsewhere} 0 EOF", mimic)
        assert not names_inode(f"1: POSIX  ADVISORY  WRITE {os.getpid()} {exact} 0 EOF", info)


def _as_another_user(check) -> int:
    """``check()``'s exit code, run in a child process as an ordinary user (nobody) when the tests run as root;
    1 when it raises.  What the child imports is imported here first: Python may be installed where that user
    cannot read (root's home), and the codec of a file opened with ``encoding="ascii"`` is imported on use."""
    import traceback

    importlib.import_module("encodings.ascii")
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest: whatever happens, it exits here
        code = 1
        try:
            if os.getuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            code = check()
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code if isinstance(code, int) else 1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_status_of_a_state_folder_closed_to_the_user_is_an_error_not_a_crash():
    """The service's state folder belongs to its own user: an admin's `batchsr status` crashed with
    "internal error (a bug)", exit 70, on EACCES from the journal or from the lock file. Run as an
    ordinary user here."""
    import fcntl
    import shutil
    import tempfile

    from batchsr.journal import WatchJournal, read_status
    from batchsr.lock import lock_holder

    folder = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        os.chmod(folder, 0o755)
        (folder / "closed").mkdir()
        WatchJournal(folder / "closed" / "journal.sqlite").close()
        os.chmod(folder / "closed", 0)
        lock = folder / "lock"
        lock.write_text("pid 1 on a host")
        held = os.open(lock, os.O_RDONLY)
        fcntl.flock(held, fcntl.LOCK_EX)
        os.chmod(lock, 0)
        def check() -> int:
            try:
                read_status(folder / "closed")
            except InputError as exc:
                if "cannot look at the journal" not in str(exc) or "Permission denied" not in str(exc):
                    return 2
                return 0 if (lock_holder(lock) or "").startswith("running (its line in") else 3
            return 1

        code = _as_another_user(check)
        os.close(held)
        assert code == 0
    finally:
        os.chmod(folder / "closed", 0o700)
        shutil.rmtree(folder)


def test_status_reads_a_stopped_daemons_journal_from_a_folder_it_cannot_write():
    """SQLite makes a -wal and -shm file to read a WAL journal closed cleanly: `status` by a user who may read
    the daemon's state folder but not write it ("attempt to write a readonly database") was an error."""
    import tempfile

    from batchsr.journal import WatchJournal, read_status

    folder = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        os.chmod(folder, 0o755)
        journal = WatchJournal(folder / "journal.sqlite")
        journal.observe([("a.png", 10, 1), ("b.png", 20, 2)], time.time())
        journal.close()
        assert sorted(os.listdir(folder)) == ["journal.sqlite"]
        os.chmod(folder / "journal.sqlite", 0o644)
        assert _as_another_user(lambda: 0 if read_status(folder).counts["seen"] == 2 else 2) == 0
        assert sorted(os.listdir(folder)) == ["journal.sqlite"]
    finally:
        shutil.rmtree(folder)


def test_sighup_is_said_and_ignored(tmp_path, tiny_model, start):
    """It killed the daemon, mid-batch too (status 129, a death systemd does not restart), charging the file in flight."""
    config = write_config(tmp_path, tiny_model)
    daemon = start(config)
    daemon.wait_message("READY=1")
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: "SIGHUP ignored: batchsr watch has no reload" in daemon.log(), 30, daemon, "the line")
    drop(tmp_path / "inbox", "after.png", png(44))
    wait_for(lambda: states(tmp_path).get("done") == ["after.png"], 60, daemon, "after.png")
    assert daemon.stop() == 0


def test_sighup_from_a_closing_terminal_stops_the_daemon_as_sigterm_does():
    """Ignored everywhere, a daemon started from a terminal kept running after it closed, holding its locks."""
    from batchsr.watch import stop_on_signals

    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    stop = threading.Event()
    try:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup: stays ignored
        stop_on_signals(threading.Event(), 1e6)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        stop_on_signals(stop, 1e6, hangup_stops=True)  # a terminal's (the stop timeout's timer must not end this process)
        os.kill(os.getpid(), signal.SIGHUP)
        wait_for(stop.is_set, 10, what="the stop")
        assert signal.getsignal(signal.SIGHUP).__name__ == "second"  # a second one stops it at once
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


@pytest.mark.parametrize("how", ["second signal", "stop timeout"])
def test_an_abrupt_stop_inside_a_batch_is_resumed_by_the_next_start(tmp_path, tiny_model, start, how):
    config = write_config(tmp_path, tiny_model, batch_images=4, max_wait_s=1.0, stop_timeout_s=0.3 if how == "stop timeout" else 60.0)
    inbox = tmp_path / "inbox"
    expected = {f"big{i}.png": drop(inbox, f"big{i}.png", png(i, (256, 256))).read_bytes() for i in range(4)}
    daemon = start(config)
    wait_for(lambda: "batch of 4 images" in daemon.log(), 120, daemon, "the batch to start")
    daemon.signal(signal.SIGTERM)
    daemon.wait_message("STOPPING=1", 30)
    if how == "second signal":
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(5) == 128 + signal.SIGTERM  # at once
        assert "a second SIGTERM; exiting now" in daemon.log()
    else:
        assert daemon.wait(10) == 128 + signal.SIGTERM
        assert "did not finish within watch.stop_timeout_s" in daemon.log()
    assert "claimed" in states(tmp_path), "the batch had finished: the test did not stop it midway"
    write_config(tmp_path, tiny_model, batch_images=4, max_wait_s=1.0)  # an ordinary stop timeout for the restart
    again = start(config)
    wait_for(lambda: len(states(tmp_path).get("done", [])) == 4, 120, again, "the batch redone")
    assert again.stop() == 0
    assert_consistent(tmp_path, expected, side=256)


def test_after_a_crash_the_batch_goes_one_by_one_and_only_a_lone_file_is_charged(tmp_path):
    """One image that kills the process must not take its batch-mates to failed/."""
    from batchsr.journal import WatchJournal

    journal = WatchJournal(tmp_path / "journal.sqlite")
    journal.observe([(f"f{k}.png", 10, k) for k in range(3)] + [("later.png", 10, 9)], 0.0)
    journal.mark_ready([e.id for e in journal.settling(1.0)], 1.0)
    assert len(journal.claim(3, 2.0)) == 3
    recovered = journal.recover_claims(3.0)  # the daemon died with three files in flight
    assert sorted(e.path for e in recovered) == ["f0.png", "f1.png", "f2.png"] and {e.interrupted for e in recovered} == {0}
    alone = journal.claim(3, 4.0)
    assert [e.path for e in alone] == ["f0.png"]
    assert [e.interrupted for e in journal.recover_claims(5.0)] == [1]  # died again, with f0 alone: f0's fault
    now = 6.0
    for expected in (["f0.png"], ["f1.png"], ["f2.png"]):  # each alone until the suspects are through
        claimed = journal.claim(3, now)
        assert [e.path for e in claimed] == expected
        journal.fail(claimed[0].id, sha256=None, attempts=0, error="x", digest=None, now=now)
        now += 1
    assert [e.path for e in journal.claim(3, now)] == ["later.png"]  # then batches again
    journal.close()


def test_a_version_done_after_the_clock_stepped_back_is_still_the_later_one(tmp_path):
    """With the clock set back an hour (a daemon's months take in NTP steps), the version done first counted as
    the latest over their shared output: dropped again, it was taken for done, with the other's output on disk."""
    from batchsr.journal import Completed, WatchJournal

    journal = WatchJournal(tmp_path / "journal.sqlite")
    # each later version done with the clock further back: an hour, then years (a board without a clock,
    # booted at 1970, working before it is set)
    for version, (size, now) in enumerate([(10, 1.7e9), (20, 1.7e9 - 3600), (30, 1e6)]):
        journal.observe([("a.png", size, size)], now)
        journal.mark_ready([e.id for e in journal.settling(now)], now)
        (entry,) = journal.claim(1, now)
        journal.complete([Completed(entry.id, f"sha{version}", size, size, "m", "a.png", None, f"identity{version}")], now)
        assert journal.done_with_content("a.png", f"sha{version}").output_identity == f"identity{version}"
        assert all(journal.done_with_content("a.png", f"sha{earlier}") is None for earlier in range(version))
    journal.close()


def _finished_row(journal, path: str, state: str, now: float, *, output: str | None = None,
                  identity: str | None = None, size: int = 10, ctime_ns: int = 1) -> int:
    journal.observe([(path, size, ctime_ns)], now)
    journal.mark_ready([e.id for e in journal.settling(now)], now)
    (entry,) = journal.claim(1, now)
    if state == "failed":
        journal.fail(entry.id, sha256=sha(path.encode()), attempts=3, error="corrupt", digest=None, now=now)
    else:
        from batchsr.journal import Completed

        journal.complete([Completed(entry.id, sha(path.encode()), size, ctime_ns, "m", output or path, None, identity)], now)
    return entry.id


def test_old_finished_entries_are_forgotten_once_their_file_and_output_are_gone(tmp_path):
    """The journal of a daemon running for years must not keep a row for every file it ever saw, but an entry
    that still protects an output, or describes a file still in the inbox, stays."""
    from batchsr.journal import WatchJournal
    from batchsr.watch import _file_identity

    inbox, output = tmp_path / "inbox", tmp_path / "output"
    inbox.mkdir()
    output.mkdir()
    for name in ("kept.png", "replaced.png", "old-format.png"):
        (output / name).write_bytes(b"as written")
    identity = _file_identity(output / "kept.png")
    journal = WatchJournal(tmp_path / "journal.sqlite")
    day = 86400.0
    _finished_row(journal, "gone.png", "done", 0.0, identity="1:2:3")  # output deleted by its consumer
    _finished_row(journal, "kept.png", "done", 0.0, identity=identity)
    _finished_row(journal, "replaced.png", "done", 0.0, identity="1:2:3")  # another write is there now
    _finished_row(journal, "old-format.png", "done", 0.0)  # recorded before identities: present is enough
    _finished_row(journal, "bad.png", "failed", 0.0)
    (inbox / "kept-input.png").write_bytes(b"x" * 10)  # done_policy keep: the input stays, never redone
    info = os.stat(inbox / "kept-input.png")
    _finished_row(journal, "kept-input.png", "done", 0.0, output="elsewhere.png", size=10, ctime_ns=info.st_ctime_ns)
    _finished_row(journal, "recent.png", "done", 95 * day, identity="1:2:3")

    mounted = True  # False: the inbox and output folders look empty, as before their mounts come up

    def in_inbox(path, size, ctime_ns):
        try:
            info = os.stat(inbox / path)
        except OSError:
            return False
        return mounted and (info.st_size, info.st_ctime_ns) == (size, ctime_ns)

    def on_disk(rel, recorded):
        current = _file_identity(output / rel)
        return mounted and current is not None and recorded in (None, current)

    def sweep(now: float) -> int:
        cursor, forgotten = 0, 0
        while True:  # in slices of two rows, as the daemon walks a long journal between batches
            cursor, count = journal.forget_finished(90 * day + 1, in_inbox, on_disk, now, after_id=cursor, limit=2)
            forgotten += count
            if not cursor:
                return forgotten

    def remaining() -> list[str]:
        return sorted(r[0] for r in journal.db.execute("SELECT path FROM files"))

    everything = remaining()
    mounted = False
    assert sweep(100 * day) == 0 and remaining() == everything  # standing for nothing at one look: not enough
    mounted = True
    assert sweep(101 * day) == 3  # gone, replaced and bad: stale at both looks, a day apart
    mounted = False
    assert sweep(102 * day) == 0  # the others stood at the last look: the wait starts again
    assert remaining() == ["kept-input.png", "kept.png", "old-format.png", "recent.png"]
    journal.close()


def test_the_daemon_forgets_old_entries_and_a_file_dropped_again_is_processed(tmp_path, tiny_model, start):
    config = write_config(tmp_path, tiny_model, journal_keep_days=30)
    inbox, output = tmp_path / "inbox", tmp_path / "output"
    data = png(21)
    daemon = start(config)
    daemon.wait_message("READY=1")
    drop(inbox, "a.png", data)
    wait_for(lambda: (tmp_path / "done" / "a.png").exists(), 60, daemon, "a.png")
    assert daemon.stop() == 0
    with contextlib.closing(sqlite3.connect(tmp_path / "state" / "journal.sqlite")) as db, db:
        # Done a month ago, and found standing for nothing by a pass two days ago: this start's pass forgets it.
        db.execute("UPDATE files SET finished = finished - 31 * 86400, stale_since = ?", (time.time() - 2 * 86400,))
    (output / "a.png").unlink()  # and its output taken away since
    (tmp_path / "done" / "a.png").unlink()
    again = start(config)
    wait_for(lambda: "forgot 1 journal entries" in again.log(), 60, again, "the old entry forgotten")
    assert journal_rows(tmp_path) == []
    drop(inbox, "a.png", data)
    wait_for(lambda: (output / "a.png").exists() and not files_under(inbox), 60, again, "a.png again")
    assert again.stop() == 0
    assert "not redone" not in again.log() and [r["state"] for r in journal_rows(tmp_path)] == ["done"]


def test_a_full_state_folder_is_an_output_error_not_a_bug(tmp_path):
    from batchsr.journal import WatchJournal

    class FullDisk:  # what SQLite says when the state folder's filesystem is full
        def __init__(self, db):
            self.db = db

        def execute(self, sql, *args):
            if sql == "COMMIT":
                raise sqlite3.OperationalError("database or disk is full")
            return self.db.execute(sql, *args)

    journal = WatchJournal(tmp_path / "journal.sqlite")
    journal.db = FullDisk(journal.db)
    with pytest.raises(OutputError, match="journal.sqlite: database or disk is full"):
        journal.observe([("a.png", 10, 1)], 0.0)


def test_a_clock_stepped_back_does_not_stretch_settling(tmp_path):
    from batchsr.journal import WatchJournal

    journal = WatchJournal(tmp_path / "journal.sqlite")
    journal.observe([("a.png", 10, 1)], 5000.0)  # seen before the clock went back an hour and more
    assert journal.settling(1000.0) == []
    journal.clamp_future(1000.0)
    assert [e.path for e in journal.settling(1000.0)] == ["a.png"]
    journal.close()


def test_a_failed_file_moved_back_into_the_inbox_is_tried_again(tmp_path):
    from batchsr.journal import Seen, WatchJournal

    journal = WatchJournal(tmp_path / "journal.sqlite")
    journal.observe([("bad.png", 10, 1)], 0.0)
    journal.mark_ready([e.id for e in journal.settling(1.0)], 1.0)
    (entry,) = journal.claim(4, 2.0)
    result = journal.fail(entry.id, sha256="ab", attempts=3, error="corrupt", digest=None, now=3.0)
    # Still in the inbox (the daemon died before moving it): only the move is left to do.
    assert journal.observe([("bad.png", 10, 1)], 4.0) == [("bad.png", Seen.FAILED_BEFORE)]
    journal.mark_set_aside(result.id)
    # Moved to failed/, then back by the user (mv keeps size and mtime): a new try.
    assert journal.observe([("bad.png", 10, 1)], 5.0) == [("bad.png", Seen.NEW)]
    journal.close()


def test_a_full_disk_under_the_journal_is_waited_out_not_fatal(tmp_path, tiny_model, monkeypatch):
    """State and output on one full filesystem (the default layout): the first refused journal write ended the
    daemon (exit 73, then 70 at each restart while full). It now waits, and charges no file for it."""
    from batchsr.journal import JournalWriteError, WatchJournal

    config = write_config(tmp_path, tiny_model)
    refuse = {"observe": 0, "complete": 0, "recover_claims": 0}  # how many more calls of each to refuse
    for method in refuse:
        real = getattr(WatchJournal, method)

        def refusing(self, *args, real=real, **kwargs):
            if refuse[real.__name__] > 0:
                refuse[real.__name__] -= 1
                raise JournalWriteError(f"cannot write the journal {self.path}: database or disk is full")
            return real(self, *args, **kwargs)

        monkeypatch.setattr(WatchJournal, method, refusing)
    with serving_here(config) as messages:
        refuse["observe"] = 2
        drop(tmp_path / "inbox", "a.png", png(1))  # seen only once the disk takes writes again
        wait_for(lambda: states(tmp_path).get("done") == ["a.png"], 60, what="a.png done")
        refuse["complete"] = 1
        drop(tmp_path / "inbox", "b.png", png(2))  # written, then its record refused: queued again and redone
        wait_for(lambda: states(tmp_path).get("done") == ["a.png", "b.png"], 60, what="b.png done")
        refuse["complete"] = refuse["recover_claims"] = 1  # the disk still full when the batch is queued again
        drop(tmp_path / "inbox", "c.png", png(3))
        wait_for(lambda: states(tmp_path).get("done") == ["a.png", "b.png", "c.png"], 60, what="c.png done, not left claimed")
    assert refuse == {"observe": 0, "complete": 0, "recover_claims": 0}
    assert sum("database or disk is full; retrying in" in m for m in messages) == 5
    rows = [(row["path"], row["attempts"], row["interrupted"], row["alone"]) for row in journal_rows(tmp_path)]
    assert rows == [("a.png", 0, 0, 0), ("b.png", 0, 0, 0), ("c.png", 0, 0, 0)]  # nobody charged, nobody made to go alone
    assert files_under(tmp_path / "output") == ["a.png", "b.png", "c.png"] and not files_under(tmp_path / "inbox")


@pytest.mark.parametrize("queued_again", [True, False])
def test_a_stop_while_a_full_disk_is_waited_out_charges_nobody(tmp_path, tiny_model, monkeypatch, queued_again):
    """The batch cut short stayed claimed, and the next start took it for a crash's: a try charged, the file
    made to go alone; a few such stops sent a good image to failed/."""
    from batchsr.journal import JournalWriteError, WatchJournal

    config = write_config(tmp_path, tiny_model, retry_delay_s=30.0)
    full, refused, real_complete, real_recover = [True], [], WatchJournal.complete, WatchJournal.recover_claims

    def complete(self, *args, **kwargs):
        if full[0]:
            refused.append(1)
            raise JournalWriteError(f"cannot write the journal {self.path}: database or disk is full")
        return real_complete(self, *args, **kwargs)

    def recover(self, now, blame=True):
        if full[0] and refused and not queued_again:
            raise JournalWriteError(f"cannot write the journal {self.path}: database or disk is full")
        return real_recover(self, now, blame=blame)

    monkeypatch.setattr(WatchJournal, "complete", complete)
    monkeypatch.setattr(WatchJournal, "recover_claims", recover)
    with serving_here(config) as messages:
        drop(tmp_path / "inbox", "a.png", png(1))
        wait_for(lambda: any("database or disk is full; retrying in" in m for m in messages), 60, what="the wait")
    full[0] = False
    with serving_here(config) as messages:
        wait_for(lambda: states(tmp_path).get("done") == ["a.png"], 60, what="a.png done")
    assert [(row["attempts"], row["interrupted"], row["alone"]) for row in journal_rows(tmp_path)] == [(0, 0, 0)]


def test_a_full_disk_at_start_up_is_waited_out_too(tmp_path, tiny_model, monkeypatch):
    """A refused write before the loop (here queueing again what a crash left) ended the daemon: exit 73, and
    systemd's restarts could run out while the disk stayed full."""
    from batchsr.journal import JournalWriteError, WatchJournal

    config = write_config(tmp_path, tiny_model)
    real, refusals = WatchJournal.recover_claims, [1]

    def refusing(self, *args, **kwargs):
        if refusals:
            refusals.pop()
            raise JournalWriteError(f"cannot write the journal {self.path}: database or disk is full")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(WatchJournal, "recover_claims", refusing)
    drop(tmp_path / "inbox", "a.png", png(1))
    with serving_here(config) as messages:
        wait_for(lambda: states(tmp_path).get("done") == ["a.png"], 60, what="a.png done")
    assert not refusals and any("database or disk is full; starting again in 5s" in m for m in messages)


def test_a_full_disk_under_a_folder_at_start_up_is_waited_out(tmp_path, tiny_model, monkeypatch):
    """The start-up check that done/ is writable, refused for want of space or inodes, was exit 73 at each
    start until systemd's restarts ran out, although the same disk full while running is waited out."""
    import tempfile

    config = write_config(tmp_path, tiny_model)
    refusals, real = [1], tempfile.NamedTemporaryFile

    def probe(*args, dir=None, **kwargs):
        if refusals and Path(dir).name == "done":
            refusals.pop()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", probe)
    drop(tmp_path / "inbox", "a.png", png(1))
    with serving_here(config) as messages:
        wait_for(lambda: states(tmp_path).get("done") == ["a.png"], 60, what="a.png done")
    assert not refusals
    assert any("done folder" in m and "No space left on device; starting again in 5s" in m for m in messages)


def test_a_journal_that_cannot_be_opened_on_a_full_disk_is_a_clear_error(tmp_path, monkeypatch):
    """Switching to WAL on a full disk raised a bare OperationalError: exit 70, "a bug"."""
    import sqlite3

    import batchsr.journal
    from batchsr.errors import OutputError
    from batchsr.journal import JournalWriteError, WatchJournal

    real_connect = sqlite3.connect

    class Full:
        error = "disk I/O error"

        def __init__(self, *args, **kwargs):
            self.db = real_connect(*args, **kwargs)

        def execute(self, sql, *args):
            if sql.startswith("PRAGMA journal_mode"):
                raise sqlite3.OperationalError(self.error)
            return self.db.execute(sql, *args)

        def close(self):
            self.db.close()

    monkeypatch.setattr(batchsr.journal.sqlite3, "connect", Full)
    with pytest.raises(JournalWriteError, match="cannot write the journal .*disk I/O error"):  # waited out
        WatchJournal(tmp_path / "journal.sqlite")
    Full.error = "attempt to write a readonly database"  # a configuration to fix: reported, not waited out
    with pytest.raises(OutputError, match="readonly database.*permissions") as refused:
        WatchJournal(tmp_path / "journal.sqlite")
    assert not isinstance(refused.value, JournalWriteError)


def test_a_lock_is_taken_even_when_its_holder_line_cannot_be_written(tmp_path, monkeypatch):
    """A full disk failed the lock's courtesy line with ENOSPC: exit 70 at start."""
    import batchsr.lock
    from batchsr.lock import FolderLock

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(batchsr.lock.os, "pwrite", full)
    lock = FolderLock(tmp_path / "lock").acquire()
    try:
        with pytest.raises(Exception, match="in use by another batchsr process"):
            FolderLock(tmp_path / "lock").acquire()
    finally:
        lock.release()
    # A lock that cannot be created at all (here: under a file) is the user's to fix, not "a bug" (exit 70).
    from batchsr.errors import OutputError

    (tmp_path / "plain").write_text("a file")
    with pytest.raises(OutputError, match="cannot create the lock"):
        FolderLock(tmp_path / "plain" / ".batchsr" / "lock").acquire()


def test_a_lone_file_cut_off_by_a_stop_signal_is_not_charged(tmp_path, tiny_model, start):
    """A stop that outlasts watch.stop_timeout_s is ours, not the file's: it used to count as the file killing the daemon."""
    config = write_config(tmp_path, tiny_model, batch_images=1, max_attempts=2, stop_timeout_s=0.3)
    drop(tmp_path / "inbox", "big.png", png(1, (512, 512)))
    daemon = start(config)
    wait_for(lambda: "batch of 1 images" in daemon.log(), 120, daemon, "the batch to start")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(10) == 128 + signal.SIGTERM
    assert states(tmp_path) == {"claimed": ["big.png"]}, "the batch had finished: the test did not stop it midway"
    assert (tmp_path / "state" / "stopped").exists()
    (tmp_path / "state" / ".batchsr-stopped.k1lled.tmp").write_text("a later stop killed mid-write")  # a temporary left behind
    write_config(tmp_path, tiny_model, batch_images=1, max_attempts=2)
    again = start(config)
    wait_for(lambda: states(tmp_path).get("done") == ["big.png"], 120, again, "big.png done")
    assert again.stop() == 0
    assert [(row["attempts"], row["interrupted"]) for row in journal_rows(tmp_path)] == [(0, 0)]
    assert not (tmp_path / "state" / "stopped").exists() and "cut off by a stop signal" in again.log()
    assert not (tmp_path / "state" / ".batchsr-stopped.k1lled.tmp").exists()


def test_a_file_in_flight_whenever_the_daemon_dies_is_set_aside_after_max_attempts(tmp_path, tiny_model, start):
    """A file that crashes the process must not crash it forever: each death counts as a try."""
    config = write_config(tmp_path, tiny_model, batch_images=1, max_attempts=2)
    inbox = tmp_path / "inbox"
    # Large enough that the batch is still in flight when the test kills the daemon.
    poison = {"poison.png": drop(inbox, "poison.png", png(1, (640, 640))).read_bytes()}
    for _ in range(2):
        daemon = start(config)
        daemon.wait_message("READY=1")  # claims left by the previous kill are released by then
        wait_for(lambda: "claimed" in states(tmp_path), 120, daemon, "the batch")
        daemon.signal(signal.SIGKILL)
        assert daemon.wait() == -signal.SIGKILL
    daemon = start(config)
    daemon.wait_message("READY=1")
    drop(inbox, "fine.png", png(7))
    wait_for(lambda: states(tmp_path).get("done") == ["fine.png"], 60, daemon, "fine.png")
    assert daemon.stop() == 0
    assert sorted(states(tmp_path)["failed"]) == sorted(poison)
    for name, data in poison.items():
        assert (tmp_path / "failed" / name).read_bytes() == data
        error = json.loads((tmp_path / "failed" / f"{name}.error.json").read_text())
        assert error["interrupted"] == 2 and "the daemon stopped 2 times" in error["reason"]
    assert files_under(inbox) == [] and files_under(tmp_path / "output") == ["fine.png"]


# -- readiness and producers --------------------------------------------------------------------


@pytest.mark.parametrize("pause, settle", [(0.6, 1.5), (1.0, 0.2)], ids=["pause shorter than settle", "pause longer than settle"])
def test_a_slow_writer_is_processed_once_from_the_complete_file(tmp_path, tiny_model, start, pause, settle):
    """Half the file, a pause longer than one poll, the rest: never an output from half a file."""
    config = write_config(tmp_path, tiny_model, settle_s=settle, polling=True, max_attempts=20)
    daemon = start(config)
    daemon.wait_message("READY=1")
    data = png(5, (24, 20))
    with open(tmp_path / "inbox" / "slow.png", "wb") as handle:
        handle.write(data[: len(data) // 2])
        handle.flush()
        time.sleep(pause)
        handle.write(data[len(data) // 2 :])
    wait_for(lambda: states(tmp_path).get("done"), 60, daemon, "the file done")
    time.sleep(0.5)
    assert daemon.stop() == 0
    rows = journal_rows(tmp_path)
    assert [(r["path"], r["state"], r["sha256"]) for r in rows] == [("slow.png", "done", sha(data))]
    assert (tmp_path / "done" / "slow.png").read_bytes() == data
    assert read_image(tmp_path / "output" / "slow.png").rgb.shape == (96, 80, 3)
    assert daemon.log().count("batch: 1 done") == 1
    if pause < settle:
        assert rows[0]["attempts"] == 0 and "truncated" not in daemon.log()


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_cp_mv_and_rsync_producers_are_each_processed_once(tmp_path, tiny_model, start, polling):
    config = write_config(tmp_path, tiny_model, polling=polling)  # rescans 30 s apart: events must do it
    inbox, staging = tmp_path / "inbox", tmp_path / "staging"
    staging.mkdir()
    sources = {name: staging / f"src-{name}.png" for name in ("cp", "mv", "rsync", "album1", "album2")}
    for i, path in enumerate(sources.values()):
        path.write_bytes(png(i))
    expected = {"cp.png": sources["cp"].read_bytes(), "moved.png": sources["mv"].read_bytes(),
                "album/1.png": sources["album1"].read_bytes(), "album/2.png": sources["album2"].read_bytes()}
    daemon = start(config)
    daemon.wait_message("READY=1")
    subprocess.run(["cp", "--", str(sources["cp"]), str(inbox / "cp.png")], check=True)
    subprocess.run(["mv", "--", str(sources["mv"]), str(inbox / "moved.png")], check=True)
    (staging / "album").mkdir()
    shutil.move(sources["album1"], staging / "album" / "1.png")
    shutil.move(sources["album2"], staging / "album" / "2.png")
    subprocess.run(["mv", "--", str(staging / "album"), str(inbox / "album")], check=True)  # a whole folder moved in
    if shutil.which("rsync") is not None:  # rsync writes .NAME.XXXXXX, then renames
        expected["rsync.png"] = sources["rsync"].read_bytes()
        subprocess.run(["rsync", "--", str(sources["rsync"]), str(inbox / "rsync.png")], check=True)
    wait_for(lambda: sorted(states(tmp_path).get("done", [])) == sorted(expected), 60, daemon, "every producer's file")
    time.sleep(0.5)
    assert daemon.stop() == 0
    assert_consistent(tmp_path, expected)
    if shutil.which("rsync") is None:
        pytest.skip("rsync is not installed: cp and mv were checked, rsync was not")


def test_temporary_names_are_ignored_until_renamed(tmp_path, tiny_model, start):
    config = write_config(tmp_path, tiny_model)
    inbox = tmp_path / "inbox"
    ignored = [".hidden.png", "a.png.tmp", "b.part", "c.crdownload", ".d.png.Xy12Ab", ".syncthing.e.png.tmp", "~syncthing~f.png.tmp",
               ".stage/g.png"]
    for i, rel in enumerate(ignored):
        (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
        (inbox / rel).write_bytes(png(i))
    daemon = start(config)
    daemon.wait_message("READY=1")
    drop(inbox, "marker.png", png(50))
    wait_for(lambda: states(tmp_path).get("done") == ["marker.png"], 60, daemon, "marker.png")
    time.sleep(0.5)
    assert files_under(inbox) == sorted(ignored)
    assert [r["path"] for r in journal_rows(tmp_path)] == ["marker.png"]
    os.replace(inbox / "a.png.tmp", inbox / "a.png")  # the rename that completes the upload
    wait_for(lambda: "a.png" in states(tmp_path).get("done", []), 60, daemon, "a.png after its rename")
    assert daemon.stop() == 0
    assert files_under(tmp_path / "output") == ["a.png", "marker.png"]


@pytest.mark.parametrize("rel", [
    "with space.png", "-leading-dash.png", unicodedata.normalize("NFC", "café.png"), unicodedata.normalize("NFD", "café.png"),
    "sous dossier/ünïcode – ok.png", "#1 photo.png", "x~y.png", "downloads/a.png",
])
def test_is_ignored_accepts_ordinary_names(rel):
    assert not is_ignored(rel)


def test_awkward_names_are_processed_and_mirrored_exactly(tmp_path, tiny_model, start):
    config = write_config(tmp_path, tiny_model)
    names = ["with space.png", "-leading-dash.png", unicodedata.normalize("NFC", "café.png"), unicodedata.normalize("NFD", "café.png"),
             "sous dossier/ünïcode – ok.png"]
    assert len(set(names)) == 5  # NFC and NFD are two different files
    daemon = start(config)
    daemon.wait_message("READY=1")
    expected = {name: drop(tmp_path / "inbox", name, png(i)).read_bytes() for i, name in enumerate(names)}
    wait_for(lambda: len(states(tmp_path).get("done", [])) == 5, 60, daemon, "every name")
    time.sleep(0.3)
    assert daemon.stop() == 0
    assert_consistent(tmp_path, expected)
    assert {p.name for p in (tmp_path / "output").iterdir()} >= {names[2], names[3]}


# -- failures -------------------------------------------------------------------------------------


def test_failed_keeps_every_failed_file_of_the_same_name(tmp_path):
    from batchsr.watch import _free_name

    report = {"file": "x.png", "time": "t1"}
    assert _free_name(tmp_path / "x.png", report) == tmp_path / "x.png"
    (tmp_path / "x.png").write_bytes(b"first")
    (tmp_path / "x.png.error.json").write_text(json.dumps({"file": "x.png", "time": "t0"}))
    assert _free_name(tmp_path / "x.png", report) == tmp_path / "x.2.png"
    (tmp_path / "x.2.png.error.json").write_text(json.dumps(report))  # this failure's report, its file not moved yet
    assert _free_name(tmp_path / "x.png", report) == tmp_path / "x.2.png"
    assert _free_name(tmp_path / "x.png", {"file": "x.png", "time": "t2"}) == tmp_path / "x.3.png"


def test_bad_files_land_in_failed_with_their_reason_and_status_reports_them(tmp_path, tiny_model, start):
    config = write_config(tmp_path, tiny_model, max_attempts=2)
    good = jpeg(1)
    bad = {
        "truncated.png": (png(2, (32, 32))[:150], "corrupt or truncated PNG"),
        "truncated.jpg": (good[: len(good) // 2], "corrupt or truncated JPG"),
        "empty.png": (b"", "empty file"),
        "text.png": (b"this is not an image\n", "not a supported image"),
        "photo.heic": (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(40), "not a supported image"),
    }
    daemon = start(config)
    daemon.wait_message("READY=1")
    for name, (data, _) in bad.items():
        drop(tmp_path / "inbox", name, data)
    wait_for(lambda: len(states(tmp_path).get("failed", [])) == len(bad), 60, daemon, "the bad files failed")
    drop(tmp_path / "inbox", "after.jpg", good)  # the daemon keeps going
    wait_for(lambda: states(tmp_path).get("done") == ["after.jpg"], 60, daemon, "after.jpg")

    status = cli("--config", str(config), "status", "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["counts"]["failed"] == len(bad) and report["counts"]["done"] == 1 and report["queue"] == 0
    assert report["done_last_hour"] == 1 and report["daemon"].startswith(f"pid {daemon.pid} (watch daemon):")
    assert sorted(e["file"] for e in report["errors"]) == sorted(bad)
    text = cli("--config", str(config), "status")
    assert text.returncode == 0 and "failed 5" in text.stdout and "truncated.jpg" in text.stdout

    assert daemon.stop() == 0
    assert files_under(tmp_path / "inbox") == []
    assert files_under(tmp_path / "failed") == sorted([*bad, *(f"{n}.error.json" for n in bad)])
    for name, (data, reason) in bad.items():
        assert (tmp_path / "failed" / name).read_bytes() == data
        error = json.loads((tmp_path / "failed" / f"{name}.error.json").read_text())
        assert reason in error["reason"] and error["attempts"] == 2 and error["sha256"] == sha(data)
        assert len(error["traceback_digest"]) == 12 and error["time"]
    assert files_under(tmp_path / "output") == ["after.jpg"]
    stopped = json.loads(cli("--config", str(config), "status", "--json").stdout)
    assert stopped["daemon"] is None


def test_names_of_up_to_255_bytes_are_processed_and_set_aside_with_their_report(tmp_path, tiny_model, start):
    """A legal name of 242-255 bytes could never be written (the temporary added 14 bytes to it), and a failed
    one stayed in the inbox, its NAME.error.json too long, logged again at every scan."""
    config = write_config(tmp_path, tiny_model, max_attempts=1)
    good, bad = "g" * 251 + ".png", "\u00e9" * 125 + ".png"  # 255 and 254 bytes
    staging = tmp_path / "staging"
    staging.mkdir()
    daemon = start(config)
    daemon.wait_message("READY=1")
    for name, data in ((good, png(5)), (bad, b"not an image")):
        (staging / name).write_bytes(data)
        os.replace(staging / name, tmp_path / "inbox" / name)
    wait_for(lambda: states(tmp_path) == {"done": [good], "failed": [bad]} and not files_under(tmp_path / "inbox"),
             60, daemon, "both finished")
    assert daemon.stop() == 0
    assert files_under(tmp_path / "output") == [good] and files_under(tmp_path / "done") == [good]
    failed = files_under(tmp_path / "failed")
    assert bad in failed and len(failed) == 2
    (report,) = [name for name in failed if name.endswith(".error.json")]
    assert report.startswith("\u00e9" * 100) and len(report.encode()) <= 255
    assert "not a supported image" in json.loads((tmp_path / "failed" / report).read_text())["reason"]
    # Second versions of both names: numbered names that fit (a 257-byte name crashed every start).
    again = start(config)
    again.wait_message("READY=1")
    for name, data in ((good, png(6)), (bad, b"not an image either")):
        (staging / name).write_bytes(data)
        os.replace(staging / name, tmp_path / "inbox" / name)
    wait_for(lambda: len(files_under(tmp_path / "done")) == 2 and len(files_under(tmp_path / "failed")) == 4
             and not files_under(tmp_path / "inbox"), 60, again, "the second versions")
    assert again.stop() == 0
    assert all(len(name.encode()) <= 255 for name in files_under(tmp_path / "done") + files_under(tmp_path / "failed"))


@pytest.mark.parametrize("polling", [False, True])
def test_symbolic_links_in_the_inbox_are_never_followed(tmp_path, tiny_model, start, polling):
    """A link to a folder made while the daemon ran was walked: the files it led to (here an output) were upscaled
    and moved out of their folder into done/. A link loop crashed the daemon at every start (exit 70). The
    polling observer took its snapshots through links."""
    config = write_config(tmp_path, tiny_model, polling=polling)
    inbox, elsewhere = tmp_path / "inbox", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.png").write_bytes(png(30))
    inbox.mkdir()
    (inbox / "at_start").symlink_to(elsewhere)
    (inbox / "file_link.png").symlink_to(elsewhere / "x.png")
    (inbox / "loop.png").symlink_to("loop.png")
    daemon = start(config)
    daemon.wait_message("READY=1")
    drop(inbox, "first.png", png(31))
    wait_for(lambda: states(tmp_path).get("done") == ["first.png"], 60, daemon, "first.png")
    (inbox / "live").symlink_to(elsewhere)
    (inbox / "live_output").symlink_to(tmp_path / "output")
    drop(inbox, "second.png", png(32))
    wait_for(lambda: states(tmp_path).get("done") == ["first.png", "second.png"], 60, daemon, "second.png")
    wait_for(lambda: "live_output: a symbolic link: not followed" in daemon.log(), 30, daemon, "the live links seen")
    (elsewhere / "later.png").write_bytes(png(38))  # a new file behind a link: no event, no poll, no row
    time.sleep(1.0)
    assert daemon.stop() == 0
    assert [r["path"] for r in journal_rows(tmp_path)] == ["first.png", "second.png"]
    assert files_under(elsewhere) == ["later.png", "x.png"] and files_under(tmp_path / "output") == ["first.png", "second.png"]
    assert files_under(tmp_path / "done") == ["first.png", "second.png"] and files_under(tmp_path / "failed") == []
    for link in ("at_start", "file_link.png", "loop.png", "live", "live_output"):
        assert (inbox / link).is_symlink() and daemon.log().count(f"{link}: a symbolic link: not followed") == 1, link
    # status shows them too: a warning logged once, months ago, was the only trace
    shown = json.loads(cli("--config", str(config), "status", "--json").stdout)["inbox_problems"]
    assert {"at_start", "file_link.png", "loop.png"} <= {p["path"] for p in shown if p["reason"].startswith("a symbolic link")}
    assert "skipped in the inbox:" in cli("--config", str(config), "status").stdout


def test_a_tree_a_thousand_folders_deep_neither_stops_the_daemon_nor_its_restarts(deep_tmp_path, tiny_model):
    """os.walk recursed: such a tree in the inbox was exit 70 at every start, until systemd gave up."""
    config = write_config(deep_tmp_path, tiny_model)
    rel = deep_file(deep_tmp_path / "inbox", 1100, "deep.png", png(34))
    for _ in range(2):  # the second start walks done/ and output/ for temporaries, now that deep too
        with serving_here(config):
            wait_for(lambda: states(deep_tmp_path).get("done") == [rel], 60, what="the deep file done")
    assert os.path.isfile(deep_tmp_path / "done" / rel) and os.path.isfile(deep_tmp_path / "output" / rel)


def test_file_events_come_back_once_a_deep_tree_leaves_the_inbox(deep_tmp_path, tiny_model):
    """Without them the daemon scanned every 10 s until its next start."""
    config = write_config(deep_tmp_path, tiny_model, rescan_interval_s=600.0)
    deep_file(deep_tmp_path / "staging", 1100, ".keep", b"")  # hidden: never queued
    (deep_tmp_path / "inbox").mkdir()
    os.rename(deep_tmp_path / "staging" / "d", deep_tmp_path / "inbox" / "d")
    with serving_here(config) as messages:
        assert any("too deep for file events" in m for m in messages)
        os.rename(deep_tmp_path / "inbox" / "d", deep_tmp_path / "staging" / "d")
        wait_for(lambda: any("file events for the inbox" in m for m in messages), 60, what="file events again")
        drop(deep_tmp_path / "inbox", "after.png", png(39))  # found by its event: no scan is due for 600 s
        wait_for(lambda: states(deep_tmp_path).get("done") == ["after.png"], 30, what="after.png")


def test_folders_the_kernel_cannot_watch_are_said_scanned_often_and_watched_once_they_can_be(tmp_path, tiny_model, monkeypatch):
    """The watcher library skips a folder the kernel refuses to watch (its inotify watch limit reached) in
    silence: a file dropped there waited for the next full scan, 60 s by default, and nothing said why."""
    import ctypes

    import watchdog.observers.inotify_c as inotify_c

    config = write_config(tmp_path, tiny_model, rescan_interval_s=600.0)
    inbox, full, real = tmp_path / "inbox", [True], inotify_c.inotify_add_watch
    for name in ("a", "b", "c"):
        (inbox / "crowd" / name).mkdir(parents=True)
    for hidden in (".git/objects", ".git/refs", ".thumbnails"):  # watched, not scanned: counted, they hid the shortfall
        (inbox / hidden).mkdir(parents=True)

    def limited(fd, path, mask):
        if full[0] and b"/crowd/" in path:  # what the kernel answers past fs.inotify.max_user_watches
            ctypes.set_errno(errno.ENOSPC)
            return -1
        return real(fd, path, mask)

    monkeypatch.setattr(inotify_c, "inotify_add_watch", limited)
    with serving_here(config) as messages:
        wait_for(lambda: any("file events reach only 2 of the 5 folders" in m for m in messages), 30, what="the warning")
        drop(inbox, "crowd/a/one.png", png(40))  # no event: found by a scan within 10 s
        wait_for(lambda: states(tmp_path).get("done") == ["crowd/a/one.png"], 60, what="one.png")
        full[0] = False
        shutil.rmtree(inbox / "crowd" / "c")  # fewer folders: the watcher is started again
        wait_for(lambda: any("file events cover the inbox" in m for m in messages), 60, what="events again")
        drop(inbox, "crowd/b/two.png", png(41))  # found by its event
        wait_for(lambda: states(tmp_path).get("done") == ["crowd/a/one.png", "crowd/b/two.png"], 30, what="two.png")
    assert sum("file events reach only" in m for m in messages) == 1


def test_the_kernel_is_asked_for_no_open_or_read_events(tmp_path, tiny_model, monkeypatch):
    """Asked for every kind, the kernel queued an open and a close for each folder a scan read: in an inbox of
    some thousand folders they overflowed its queue at every scan, and the watcher's rebuild read them all
    again and overflowed it again, a core busy while the daemon had nothing to do."""
    import watchdog.observers.inotify_c as inotify_c

    config = write_config(tmp_path, tiny_model, rescan_interval_s=600.0)
    masks, real = [], inotify_c.inotify_add_watch

    def recorded(fd, path, mask):
        masks.append(mask)
        return real(fd, path, mask)

    monkeypatch.setattr(inotify_c, "inotify_add_watch", recorded)
    (tmp_path / "inbox" / "sub").mkdir(parents=True)
    with serving_here(config):
        wait_for(lambda: len(masks) >= 2, 30, what="the watches")
        drop(tmp_path / "inbox", "sub/a.png", png(40))  # found by its events: the next scan is 10 minutes away
        wait_for(lambda: states(tmp_path).get("done") == ["sub/a.png"], 30, what="a.png")
    unwanted = inotify_c.InotifyConstants.IN_OPEN | inotify_c.InotifyConstants.IN_CLOSE_NOWRITE | inotify_c.InotifyConstants.IN_ACCESS
    assert masks and all(mask & unwanted == 0 for mask in masks), [hex(m) for m in masks]


def test_a_sparse_file_behind_an_image_header_is_refused_unread(tmp_path, tiny_model):
    config = write_config(tmp_path, tiny_model, max_attempts=1)
    settings = yaml.safe_load(config.read_text(encoding="utf-8"))
    settings["image"] = {"max_pixels": 1000}  # files above 8 KB + 256 MB cannot be such an image
    config.write_text(yaml.safe_dump(settings), encoding="utf-8")
    (tmp_path / "staging").mkdir()
    with open(tmp_path / "staging" / "sparse.png", "wb") as handle:
        handle.write(png(35))
        handle.truncate(300_000_000)
    with serving_here(config) as messages:
        os.replace(tmp_path / "staging" / "sparse.png", tmp_path / "inbox" / "sparse.png")
        wait_for(lambda: states(tmp_path).get("failed") == ["sparse.png"], 60, what="sparse.png failed")
    assert any("file of 300 MB is larger than batchsr reads" in m for m in messages)


@pytest.mark.parametrize("policy", ["move", "delete"])
def test_a_queued_folder_swapped_for_a_link_leads_nothing_out_of_the_inbox(tmp_path, policy):
    """sub/inner.png queued, then sub replaced by a link to another folder holding inner.png: that file was read,
    upscaled and moved into done/ (deleted, under done_policy delete)."""
    from batchsr.journal import Entry
    from batchsr.watch import _Daemon, read_claimed

    inbox, victim = tmp_path / "inbox", tmp_path / "victim"
    drop(inbox, "sub/inner.png", png(36))
    info = (inbox / "sub" / "inner.png").stat()
    entry = Entry(id=1, path="sub/inner.png", size=info.st_size, ctime_ns=info.st_ctime_ns, attempts=0, interrupted=0, first_seen=0.0)
    victim.mkdir()
    os.replace(inbox / "sub" / "inner.png", victim / "inner.png")  # same size and ctime as recorded
    shutil.rmtree(inbox / "sub")
    (inbox / "sub").symlink_to(victim)
    item = read_claimed(inbox, entry, max_pixels=None)
    assert item.error == "a symbolic link in its path: not followed; move the file itself into the inbox" and item.image is None
    daemon = _Daemon.__new__(_Daemon)  # only what disposing of an input needs
    daemon.watch = WatchSettings(done_policy=policy)
    daemon.folders = WatchFolders(inbox, tmp_path / "output", tmp_path / "done", tmp_path / "failed", tmp_path / "state", None)
    daemon.stuck = set()
    victim_info = (victim / "inner.png").stat()
    daemon._dispose_input("sub/inner.png", victim_info.st_size, victim_info.st_ctime_ns)
    assert (victim / "inner.png").read_bytes() == png(36) and not (tmp_path / "done").exists()


def test_a_file_deleted_while_its_batch_starts_is_said_forgotten(tmp_path, tiny_model, monkeypatch):
    """It vanished from the batch's summary without a line."""
    import batchsr.watch

    config = write_config(tmp_path, tiny_model)
    real = batchsr.watch.read_claimed

    def deleted_first(inbox, entry, max_pixels):
        (inbox / entry.path).unlink(missing_ok=True)
        return real(inbox, entry, max_pixels)

    monkeypatch.setattr(batchsr.watch, "read_claimed", deleted_first)
    drop(tmp_path / "inbox", "gone.png", png(37))
    with serving_here(config) as messages:
        wait_for(lambda: any("gone.png: left the inbox before it was read; forgotten" in m for m in messages), 60, what="the line")
    assert journal_rows(tmp_path) == [] and files_under(tmp_path / "failed") == []


def test_a_file_that_cannot_be_read_in_a_readable_folder_counts_its_tries(tmp_path, tiny_model, monkeypatch):
    """An I/O error of the file alone (a bad sector) was deferred for ever, never set aside."""
    config = write_config(tmp_path, tiny_model, max_attempts=2)
    real_open = os.open

    def bad_sector(path, flags, *args, **kwargs):
        if kwargs.get("dir_fd") is not None and path == "bad.png":
            raise OSError(errno.EIO, os.strerror(errno.EIO), path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", bad_sector)
    drop(tmp_path / "inbox", "bad.png", png(39))
    with serving_here(config) as messages:
        wait_for(lambda: states(tmp_path).get("failed") == ["bad.png"], 60, what="bad.png set aside")
    assert not any("its folder cannot be read now" in m for m in messages)


def test_a_folder_that_cannot_be_read_for_a_while_costs_no_tries(tmp_path, tiny_model, monkeypatch):
    """A network mount that failed for longer than max_attempts x retry_delay_s sent every queued image to
    failed/, as if each were broken."""
    config = write_config(tmp_path, tiny_model, max_attempts=2)
    inbox, real_open, refusals, stale_since = str(tmp_path / "inbox") + os.sep, os.open, [1, 1, 1], []

    def stale(path, flags, *args, **kwargs):
        if refusals and (str(path).startswith(inbox) or (kwargs.get("dir_fd") is not None and path == "a.png")):
            stale_since.append(1)
            refusals.pop()
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE), str(path))
        return real_open(path, flags, *args, **kwargs)

    import batchsr.watch

    monkeypatch.setattr(os, "open", stale)
    # The folder of each refused read cannot be listed either, while the mount is stale.
    monkeypatch.setattr(batchsr.watch, "_listable", lambda folder: not stale_since.pop() if stale_since else True)
    drop(tmp_path / "inbox", "a.png", png(33))
    with serving_here(config) as messages:
        wait_for(lambda: states(tmp_path).get("done") == ["a.png"], 60, what="a.png done")
    assert not refusals and sum("its folder cannot be read now" in m for m in messages) == 3
    assert [(r["attempts"], r["state"]) for r in journal_rows(tmp_path)] == [(0, "done")]
    assert files_under(tmp_path / "failed") == []


def test_output_folder_under_a_regular_file_is_a_clear_error_and_moves_nothing(tmp_path, tiny_model):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    config = write_config(tmp_path, tiny_model, output=str(blocker / "output"))
    drop(tmp_path / "inbox", "a.png", png(1))
    result = cli("--config", str(config), "watch")
    assert result.returncode == 73, result.stderr
    assert "output folder" in result.stderr and "not writable" in result.stderr and str(blocker) in result.stderr
    assert files_under(tmp_path / "inbox") == ["a.png"]
    assert not (tmp_path / "done").exists() and not (tmp_path / "state" / "journal.sqlite").exists()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS], ids=["disk full", "read-only"])
def test_a_refused_output_write_keeps_the_input_pending_until_it_works(tmp_path, tiny_model, monkeypatch, code):
    config = write_config(tmp_path, tiny_model, max_attempts=2, retry_delay_s=0.2)
    output = str(tmp_path / "output") + os.sep
    refusing = threading.Event()
    refusing.set()
    real_fsync = os.fsync

    def fsync(fd):  # the output's data never reaches the disk while refusing
        if refusing.is_set() and os.readlink(f"/proc/self/fd/{fd}").startswith(output):
            raise OSError(code, os.strerror(code))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    data = png(3)
    with serving_here(config) as messages:
        drop(tmp_path / "inbox", "a.png", data)
        wait_for(lambda: sum(os.strerror(code) in m for m in messages) >= 3, 60, what="three refused writes")
        rows = journal_rows(tmp_path)
        assert [(r["state"], r["attempts"]) for r in rows] == [("ready", 0)]  # not a try: never failed for it
        assert os.strerror(code) in rows[0]["error"]
        assert files_under(tmp_path / "output") == [] and temporaries(tmp_path) == []
        assert files_under(tmp_path / "inbox") == ["a.png"] and files_under(tmp_path / "done") == []
        assert any("a.png stays in the inbox" in m for m in messages)
        refusing.clear()  # space returns / the folder is writable again
        wait_for(lambda: states(tmp_path).get("done") == ["a.png"], 60, what="a.png done")
    assert_consistent(tmp_path, {"a.png": data})


def test_the_periodic_rescan_catches_what_events_missed(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr("batchsr.watch._InboxEvents.on_any_event", lambda self, event: None)
    config = write_config(tmp_path, tiny_model, rescan_interval_s=0.3)
    data = png(4)
    with serving_here(config):
        drop(tmp_path / "inbox", "missed.png", data)
        wait_for(lambda: states(tmp_path).get("done") == ["missed.png"], 60, what="missed.png done")
    assert_consistent(tmp_path, {"missed.png": data})


def test_an_image_the_model_fails_on_holds_no_memory_from_its_neighbours(tmp_path, tiny_model, monkeypatch):
    """Under a cap that fits one image at a time, a model failure must not keep its share: the others are done."""
    import batchsr.pipeline
    from batchsr.engine import Engine
    from batchsr.pipeline import whole_mb

    config = write_config(tmp_path, tiny_model, batch_images=4, max_wait_s=5.0)
    settings = load_settings(config)
    call = Engine(tiny_model, settings.engine).call_mb(120, 120)
    one = whole_mb(decode_image(png(1, (120, 120))), 4, 4.0, reference=False)
    raw = yaml.safe_load(config.read_text())
    raw["run"]["memory_mb"] = int(1000 + call + 1.5 * one)  # one image at a time, never two
    config.write_text(yaml.safe_dump(raw))
    for where in ("batchsr.runner", "batchsr.pipeline"):
        monkeypatch.setattr(f"{where}.process_rss_mb", lambda: 1000.0)
    real = batchsr.pipeline.upscale_images

    def poisoned(engine, images, alpha):
        if any(im.rgb.shape[1] == 124 for im in images):
            raise RuntimeError("out of device memory")
        return real(engine, images, alpha)

    monkeypatch.setattr(batchsr.pipeline, "upscale_images", poisoned)  # under upscale_each, which watch calls
    good = {f"b{k}.png": png(k, (120, 120)) for k in range(3)}
    with serving_here(config) as messages:
        drop(tmp_path / "inbox", "aaa.png", png(9, (120, 124)))  # first in name order
        for name, data in good.items():
            drop(tmp_path / "inbox", name, data)
        wait_for(lambda: states(tmp_path).get("done") == sorted(good) and states(tmp_path).get("failed") == ["aaa.png"], 90,
                 what="the three done, aaa.png failed")
    assert not any("run.memory_mb" in m for m in messages), [m for m in messages if "run.memory_mb" in m]


def test_an_inbox_deleted_and_made_again_is_watched_again(tmp_path, tiny_model):
    config = write_config(tmp_path, tiny_model, rescan_interval_s=600.0)  # no rescan would find the file in time
    data = png(6)
    with serving_here(config):
        drop(tmp_path / "inbox", "first.png", data)
        wait_for(lambda: states(tmp_path).get("done") == ["first.png"], 60, what="first.png done")
        shutil.rmtree(tmp_path / "inbox")
        time.sleep(1.5)
        (tmp_path / "inbox").mkdir()
        time.sleep(1.5)
        drop(tmp_path / "inbox", "second.png", png(8))
        wait_for(lambda: sorted(states(tmp_path).get("done", [])) == ["first.png", "second.png"], 30, what="second.png done")
        # The new inbox is locked as the old one was: a second daemon on it (its own state and output) is refused.
        other = cli("watch", "--inbox", str(tmp_path / "inbox"), "--output", str(tmp_path / "out2"), "--state",
                    str(tmp_path / "state2"), "--done", str(tmp_path / "done2"), "--failed", str(tmp_path / "failed2"),
                    "--model", str(tiny_model))
        assert other.returncode == 75 and "already watched by another batchsr daemon" in other.stderr, other.stderr


# -- content, policies, model -------------------------------------------------------------------


def test_same_name_new_content_is_redone_identical_content_is_not(tmp_path, tiny_model, start):
    config = write_config(tmp_path, tiny_model)
    inbox, output = tmp_path / "inbox", tmp_path / "output"
    first, second = png(10, (8, 8)), png(11, (12, 10))
    daemon = start(config)
    daemon.wait_message("READY=1")
    drop(inbox, "a.png", first)
    wait_for(lambda: (tmp_path / "done" / "a.png").exists(), 60, daemon, "a.png")
    stamp = (output / "a.png").stat().st_mtime_ns
    drop(inbox, "a.png", first)  # identical content, new file
    wait_for(lambda: "not redone" in daemon.log(), 60, daemon, "the duplicate")
    wait_for(lambda: not files_under(inbox), 30, daemon, "the duplicate moved")
    assert (output / "a.png").stat().st_mtime_ns == stamp
    drop(inbox, "a.png", second)  # new content, same name
    wait_for(lambda: len(states(tmp_path).get("done", [])) == 2 and not files_under(inbox), 60, daemon, "the new version")
    assert daemon.stop() == 0
    assert read_image(output / "a.png").rgb.shape == (48, 40, 3)
    # done/ keeps both versions: the second did not replace the only copy of the first (it used to).
    assert (tmp_path / "done" / "a.png").read_bytes() == first and (tmp_path / "done" / "a.2.png").read_bytes() == second
    assert files_under(tmp_path / "done") == ["a.2.png", "a.png"]  # the identical copy replaced its twin
    assert sorted((r["path"], r["sha256"], r["state"]) for r in journal_rows(tmp_path)) == sorted(
        [("a.png", sha(first), "done"), ("a.png", sha(second), "done")])


def test_an_input_never_replaces_the_output_of_another_input(tmp_path, tiny_model, start):
    """a.jpg and a.png both become a.png with output_format png: the later one fails, as in run, at once
    (another try would fail alike: it used to wait out max_attempts x retry_delay_s)."""
    config = write_config(tmp_path, tiny_model, max_attempts=3, retry_delay_s=600)
    settings = yaml.safe_load(config.read_text(encoding="utf-8"))
    settings["run"]["output_format"] = "png"
    config.write_text(yaml.safe_dump(settings), encoding="utf-8")
    inbox, output = tmp_path / "inbox", tmp_path / "output"
    daemon = start(config)
    daemon.wait_message("READY=1")
    drop(inbox, "a.jpg", jpeg(3))
    wait_for(lambda: (tmp_path / "done" / "a.jpg").exists(), 60, daemon, "a.jpg")
    first = (output / "a.png").read_bytes()
    drop(inbox, "a.png", png(4, (12, 10)))
    wait_for(lambda: (tmp_path / "failed" / "a.png").exists(), 60, daemon, "a.png set aside")
    assert daemon.stop() == 0
    assert (output / "a.png").read_bytes() == first
    report = json.loads((tmp_path / "failed" / "a.png.error.json").read_text())
    assert "would overwrite the output of a.jpg" in report["reason"] and report["attempts"] == 1
    assert "not retried: another try would fail alike" in daemon.log()


def test_an_output_too_large_for_its_format_fails_at_once_and_the_next_image_goes_on(tmp_path, tiny_model, start):
    """A JPEG side is limited to 65,535 pixels: a refusal no retry can change, so no waiting out the retries."""
    config = write_config(tmp_path, tiny_model, max_attempts=3, retry_delay_s=600)
    settings = yaml.safe_load(config.read_text(encoding="utf-8"))
    settings["run"]["output_format"] = "jpg"
    config.write_text(yaml.safe_dump(settings), encoding="utf-8")
    daemon = start(config)
    daemon.wait_message("READY=1")
    drop(tmp_path / "inbox", "strip.png", png(5, (16400, 4)))
    drop(tmp_path / "inbox", "fine.png", png(6))
    wait_for(lambda: (tmp_path / "failed" / "strip.png").exists() and (tmp_path / "done" / "fine.png").exists(), 60, daemon,
             "strip.png set aside, fine.png done")
    assert daemon.stop() == 0
    report = json.loads((tmp_path / "failed" / "strip.png.error.json").read_text())
    assert "JPG" in report["reason"].upper() and "65535" in report["reason"].replace(",", "") and report["attempts"] == 1
    assert (tmp_path / "output" / "fine.jpg").exists() and not (tmp_path / "output" / "strip.jpg").exists()


def test_a_replacement_model_of_another_scale_is_refused_when_the_scale_is_set(tmp_path, tiny_model):
    from batchsr.checkpoint import save_model
    from batchsr.config import EngineSettings
    from batchsr.model import ModelConfig, build_model
    from batchsr.watch import _Model

    weights = tmp_path / "m.weights.h5"
    shutil.copy(tiny_model, weights)
    shutil.copy(tiny_model.with_name("tiny_x4.json"), weights.with_name("m.json"))
    model = _Model(weights, EngineSettings(device="cpu"), scale=4)
    before = model.engine.model_id
    config = ModelConfig(scale=2, width=8, depth=1, blocks=0)
    save_model(build_model(config), config, weights)  # the file is replaced by an x2 model
    model.reload_if_replaced()
    assert model.engine.model_id == before and model.rejected is not None


@pytest.mark.parametrize("policy", ["keep", "delete"])
def test_done_policy_keep_and_delete(tmp_path, tiny_model, start, policy):
    config = write_config(tmp_path, tiny_model, done_policy=policy, rescan_interval_s=0.2)
    data = png(12)
    daemon = start(config)
    daemon.wait_message("READY=1")
    drop(tmp_path / "inbox", "a.png", data)
    wait_for(lambda: states(tmp_path).get("done") == ["a.png"], 60, daemon, "a.png")
    stamp = (tmp_path / "output" / "a.png").stat().st_mtime_ns
    time.sleep(1.0)  # several rescans
    assert daemon.stop() == 0
    assert files_under(tmp_path / "inbox") == (["a.png"] if policy == "keep" else [])
    assert files_under(tmp_path / "done") == []
    assert (tmp_path / "output" / "a.png").stat().st_mtime_ns == stamp  # a kept input is not redone
    assert len(journal_rows(tmp_path)) == 1 and daemon.log().count("batch of") == 1


def test_a_replaced_model_is_loaded_between_batches_and_recorded(tmp_path, tiny_model, start):
    from batchsr.checkpoint import read_info, save_model
    from batchsr.model import ModelConfig, build_model

    import keras

    weights = tmp_path / "model" / "m.weights.h5"
    weights.parent.mkdir()
    shutil.copy(tiny_model, weights)
    shutil.copy(tiny_model.with_name("tiny_x4.json"), weights.with_name("m.json"))
    first_id = read_info(weights).model_id
    config = write_config(tmp_path, weights, reference="hr")
    for i, name in enumerate(["a.png", "b.png"]):
        hr = image(20 + i, (32, 32))
        write_png(tmp_path / "hr" / name, hr)
    daemon = start(config)
    daemon.wait_message("READY=1")
    ok, lr = cv2.imencode(".png", degrade(image(20, (32, 32)), 4))
    drop(tmp_path / "inbox", "a.png", lr.tobytes())
    wait_for(lambda: states(tmp_path).get("done") == ["a.png"], 60, daemon, "a.png")

    keras.utils.set_random_seed(2)
    model_config = ModelConfig(width=8, depth=2, blocks=1)
    new = save_model(build_model(model_config), model_config, tmp_path / "new" / "m.weights.h5")
    assert new.model_id != first_id
    os.replace(tmp_path / "new" / "m.weights.h5", weights)  # weights first, description last, as save_model does
    time.sleep(0.3)
    os.replace(tmp_path / "new" / "m.json", weights.with_name("m.json"))
    ok, lr = cv2.imencode(".png", degrade(image(21, (32, 32)), 4))
    drop(tmp_path / "inbox", "b.png", lr.tobytes())
    wait_for(lambda: len(states(tmp_path).get("done", [])) == 2, 60, daemon, "b.png")
    assert daemon.stop() == 0
    assert f"model replaced: now using {new.model_id} (was {first_id})" in daemon.log()
    assert {r["path"]: r["model_id"] for r in journal_rows(tmp_path)} == {"a.png": first_id, "b.png": new.model_id}
    with open(tmp_path / "output" / METRICS_FILE, newline="", encoding="utf-8") as handle:
        assert {r["image"]: r["model_id"] for r in csv.DictReader(handle)} == {"a.png": first_id, "b.png": new.model_id}


# -- volume and exclusivity ----------------------------------------------------------------------


@pytest.mark.parametrize("count", [200, pytest.param(1000, marks=pytest.mark.slow)])
def test_many_files_present_at_start_and_dropped_at_once_are_each_done_once(tmp_path, tiny_model, start, count):
    config = write_config(tmp_path, tiny_model, batch_images=64, rescan_interval_s=5.0)
    config_data = yaml.safe_load(config.read_text())
    config_data["engine"]["batch_size"] = 64
    config.write_text(yaml.safe_dump(config_data))
    inbox, staging = tmp_path / "inbox", tmp_path / "staging"
    expected = {f"pre/{i:04d}.png": png(i) for i in range(count)}
    for rel, data in expected.items():
        drop(inbox, rel, data)
    daemon = start(config)
    wait_for(lambda: len(states(tmp_path).get("done", [])) == count, 600, daemon, "the files present at start")
    rss_before = _rss_kib(daemon.pid)
    batch = {f"drop/{i:04d}.png": png(count + i) for i in range(count)}
    for rel, data in batch.items():
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        (staging / rel).write_bytes(data)
    os.replace(staging / "drop", inbox / "drop")  # all at once
    expected.update(batch)
    wait_for(lambda: len(states(tmp_path).get("done", [])) == 2 * count and not files_under(inbox), 600, daemon, "the dropped files")
    rss_after = _rss_kib(daemon.pid)
    assert daemon.stop() == 0
    assert_consistent(tmp_path, expected)
    batches = [int(line.split("batch of ")[1].split()[0]) for line in daemon.log().splitlines() if "batch of " in line]
    assert max(batches) <= 64 and sum(batches) == 2 * count  # bounded batches, no file taken twice
    assert rss_after - rss_before < 150 * 1024, f"memory grew by {(rss_after - rss_before) // 1024} MiB"


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_second_instance_and_a_run_on_the_same_output_are_refused_with_75(tmp_path, tiny_model, start):
    config = write_config(tmp_path, tiny_model)
    daemon = start(config)
    daemon.wait_message("READY=1")
    second = cli("--config", str(config), "watch")
    assert second.returncode == 75, second.stderr
    assert f"pid {daemon.pid}" in second.stderr and "state" in second.stderr
    other_state = cli("--config", str(config), "watch", "--state", str(tmp_path / "other-state"))
    assert other_state.returncode == 75 and f"pid {daemon.pid}" in other_state.stderr and "output" in other_state.stderr
    (tmp_path / "archive").mkdir()
    archive = cli("run", str(tmp_path / "archive"), str(tmp_path / "output"), "--model", str(tiny_model))
    assert archive.returncode == 75 and f"pid {daemon.pid}" in archive.stderr
    same_inbox = cli("--config", str(config), "watch", "--state", str(tmp_path / "s2"), "--output", str(tmp_path / "o2"))
    assert same_inbox.returncode == 75 and "already watched by another batchsr daemon" in same_inbox.stderr
    assert daemon.alive()
    assert daemon.stop() == 0


def test_the_daemon_waits_for_a_run_that_holds_its_output_folder(tmp_path, tiny_model, start):
    """It exited 75, and systemd's restarts ran out (the unit failed for good) while a long run went on."""
    import fcntl

    config = write_config(tmp_path, tiny_model)
    lock_path = tmp_path / "output" / ".batchsr" / "lock"
    lock_path.parent.mkdir(parents=True)
    drop(tmp_path / "inbox", "a.png", png(1))
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        handle.write(f"pid {os.getpid()}: /opt/batchsr/.venv/bin/batchsr run /srv/archive /srv/batchsr/output\n")
        handle.flush()
        daemon = start(config)
        wait_for(lambda: "waiting for it to finish" in daemon.log(), 60, daemon, "the daemon to wait")
        time.sleep(1.0)
        assert daemon.alive() and not (tmp_path / "output" / "a.png").exists()
        assert any("EXTEND_TIMEOUT_USEC" in m for m in daemon.messages)
    wait_for(lambda: states(tmp_path).get("done") == ["a.png"], 60, daemon, "a.png done once the run is over")
    assert daemon.stop() == 0


def test_the_output_lock_waited_for_is_kept_not_taken_again(tmp_path):
    """It was released once free and taken again for the daemon: a run starting in between made the daemon exit 75."""
    from batchsr.errors import LockedError
    from batchsr.lock import DAEMON, FolderLock
    from batchsr.watch import _wait_for_runs

    path = tmp_path / "output" / ".batchsr" / "lock"
    held = _wait_for_runs(FolderLock(path, DAEMON), threading.Event())
    try:
        with pytest.raises(LockedError, match=r"\(watch daemon\)"):
            FolderLock(path).acquire()  # the run that would have slipped in
    finally:
        held.release()


def test_an_output_name_claimed_in_the_same_batch_is_retried_not_final(tmp_path, tiny_model, start):
    """a.jpg and a.png both become a.png: a.png, refused while a.jpg only claims the name in the batch, is tried again
    (a.jpg could still fail), and fails for good once a.jpg's output is recorded."""
    config = write_config(tmp_path, tiny_model, max_attempts=3)
    settings = yaml.safe_load(config.read_text(encoding="utf-8"))
    settings["run"]["output_format"] = "png"
    config.write_text(yaml.safe_dump(settings), encoding="utf-8")
    drop(tmp_path / "inbox", "a.jpg", jpeg(3))
    drop(tmp_path / "inbox", "a.png", png(4, (12, 10)))
    daemon = start(config)
    wait_for(lambda: (tmp_path / "failed" / "a.png").exists(), 60, daemon, "a.png set aside")
    assert daemon.stop() == 0
    report = json.loads((tmp_path / "failed" / "a.png.error.json").read_text())
    assert "would overwrite the output of a.jpg" in report["reason"] and report["attempts"] == 2
    assert states(tmp_path)["done"] == ["a.jpg"]


# -- configuration --------------------------------------------------------------------------------


def test_watch_folders_in_the_file_are_taken_from_its_folder_and_flags_from_the_current_one(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("watch:\n  inbox: in\n  state: /abs/state\n")
    settings = load_settings(path, {"watch.output": "out"})
    assert settings.watch.inbox == tmp_path / "in" and settings.watch.state == Path("/abs/state")
    assert settings.watch.output == Path("out") and settings.watch.done == WatchSettings().done
    assert load_settings(None) == Settings()


@pytest.mark.parametrize("field, value", [("output", "/srv/in/out"), ("done", "/srv"), ("failed", "/srv/in"), ("state", "/srv/in/.state")])
def test_overlapping_folders_are_refused(field, value):
    watch = WatchSettings(inbox=Path("/srv/in"), output=Path("/srv/out"), done=Path("/srv/done"), failed=Path("/srv/failed"))
    with pytest.raises(ConfigError, match=f"watch.{field}"):
        WatchFolders.from_settings(watch.model_copy(update={field: Path(value)}))


@pytest.mark.parametrize("field", ["output", "done", "state"])
def test_folders_overlapping_through_a_link_are_refused(tmp_path, field):
    """Compared as written, watch.output as a link into the inbox fed each output back in (32, 128, 512... px);
    watch.done so looped about once a second, nesting done/d/d/d/..."""
    (tmp_path / "inbox" / "d").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "inbox" / "d")
    watch = WatchSettings(inbox=tmp_path / "inbox", output=tmp_path / "out", done=tmp_path / "done", failed=tmp_path / "failed",
                          state=tmp_path / "state")
    with pytest.raises(ConfigError, match=f"watch.{field} \\({tmp_path / 'link'}, that is {tmp_path / 'inbox' / 'd'}\\)"):
        WatchFolders.from_settings(watch.model_copy(update={field: tmp_path / "link"}))


def test_linked_folders_inside_output_and_done_are_not_written_through(tmp_path, tiny_model):
    """output/sub or done/sub, a link elsewhere: outputs and inputs were written and moved wherever it led. Such
    an output folder is the folder's problem, not the image's: the input waits in the inbox, charged nothing."""
    config = write_config(tmp_path, tiny_model, max_attempts=1)
    elsewhere = tmp_path / "elsewhere"
    for name in ("out", "done"):
        (elsewhere / name).mkdir(parents=True)
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "sub").symlink_to(elsewhere / "out")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "keep").symlink_to(elsewhere / "done")
    with serving_here(config) as messages:
        drop(tmp_path / "inbox", "sub/a.png", png(42))
        drop(tmp_path / "inbox", "keep/b.png", png(43))
        wait_for(lambda: states(tmp_path).get("done") == ["keep/b.png"], 60, what="b.png done")
        wait_for(lambda: any("keep/b.png: output done, but the input could not be moved" in m for m in messages), 30, what="the line")
        wait_for(lambda: any("sub/a.png stays in the inbox" in m for m in messages), 30, what="a.png deferred")
        assert files_under(elsewhere) == [] and files_under(tmp_path / "output") == ["keep/b.png"]
        assert files_under(tmp_path / "inbox") == ["keep/b.png", "sub/a.png"] and files_under(tmp_path / "failed") == []
        (tmp_path / "output" / "sub").unlink()  # the link taken away: the waiting input goes through
        wait_for(lambda: sorted(states(tmp_path).get("done", [])) == ["keep/b.png", "sub/a.png"], 60, what="a.png done")
    assert [row["attempts"] for row in journal_rows(tmp_path) if row["path"] == "sub/a.png"] == [0]
    assert any(f"{tmp_path / 'output' / 'sub'} is a symbolic link; batchsr does not write through links" in m for m in messages)
    assert any(f"{tmp_path / 'done' / 'keep'} is a symbolic link" in m for m in messages if "keep/b.png" in m)


def test_every_watch_folder_can_be_given_on_the_command_line(tmp_path):
    """Without --done and --failed the inputs would go to the configured (or built-in) folders unasked."""
    inbox = tmp_path / "in"
    refused = cli("watch", "--inbox", str(inbox), "--output", str(tmp_path / "out"), "--state", str(tmp_path / "state"),
                  "--done", str(inbox / "done"), "--failed", str(tmp_path / "failed"))
    assert refused.returncode == 78 and f"watch.done ({inbox / 'done'})" in refused.stderr, refused.stderr
    refused = cli("watch", "--inbox", str(inbox), "--output", str(tmp_path / "out"), "--state", str(tmp_path / "state"),
                  "--done", str(tmp_path / "done"), "--failed", str(inbox / "failed"))
    assert refused.returncode == 78 and f"watch.failed ({inbox / 'failed'})" in refused.stderr, refused.stderr


@pytest.mark.parametrize("rel", [".a.png", "x/.b.png", ".dir/c.png", "d.png.tmp", "e.PART", "f.crdownload", ".g.png.AbC123",
                                 ".syncthing.h.png.tmp", "~syncthing~i.png.tmp", "up.png.filepart", "dl.png.!qB",
                                 "x.png.aria2", "y.png.partial", "z.png.opdownload", "w.jpg.download/w.jpg", "Thumbs.db",
                                 "sub/desktop.ini", "~$report.docx", "photo.png~", "#auto.png#"])
def test_temporary_names_are_recognised(rel):
    assert is_ignored(rel)


# -- service files ---------------------------------------------------------------------------------


def _unit(path: Path) -> dict[str, dict[str, str]]:
    import configparser

    parser = configparser.ConfigParser(interpolation=None, strict=False, comment_prefixes=("#", ";"))
    parser.optionxform = str
    parser.read_string(path.read_text(encoding="utf-8"))
    return {section: dict(parser[section]) for section in parser.sections()}


def _seconds(value: str) -> float:
    units = {"min": 60, "ms": 0.001, "s": 1, "h": 3600}
    for suffix, factor in units.items():
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * factor
    return float(value)


def test_the_systemd_units_fit_the_daemon():
    watch = _unit(REPO / "scripts" / "batchsr-watch.service")["Service"]
    assert watch["Type"] == "notify" and watch["Restart"] == "on-failure"
    assert watch["ExecStart"].split()[1:] == ["watch"]
    assert _seconds(watch["TimeoutStopSec"]) > WatchSettings().stop_timeout_s  # the batch finishes before systemd's SIGKILL
    assert _seconds(watch["WatchdogSec"]) > 0 and {"66", "78"} <= set(watch["RestartPreventExitStatus"].split())
    assert "143" in watch["SuccessExitStatus"].split()  # cut off after watch.stop_timeout_s: the next start resumes
    unit = _unit(REPO / "scripts" / "batchsr-watch.service")["Unit"]
    assert int(unit["StartLimitBurst"]) >= 3 and _seconds(unit["StartLimitIntervalSec"]) > int(unit["StartLimitBurst"]) * _seconds(watch["RestartSec"])
    run = _unit(REPO / "scripts" / "batchsr-run.service")["Service"]
    assert run["Type"] == "oneshot" and run["ExecStart"].split()[1] == "run" and "75" in run["SuccessExitStatus"].split()
    timer = _unit(REPO / "scripts" / "batchsr-run.timer")
    assert timer["Timer"]["OnCalendar"] and timer["Install"]["WantedBy"] == "timers.target"


# -- replacements ------------------------------------------------------------------------------


def _bmp(seed: int) -> bytes:
    ok, data = cv2.imencode(".bmp", image(seed))
    assert ok
    return data.tobytes()


def test_new_content_with_the_size_and_mtime_of_a_file_done_is_processed_not_deleted(tmp_path, tiny_model):
    """BMPs of one size, delivered with their mtime kept (cp -p, rsync -a, archives): the ctime tells them apart."""
    config = write_config(tmp_path, tiny_model, done_policy="delete")
    first, second = _bmp(1), _bmp(2)
    assert len(first) == len(second) and first != second
    inbox, kept_ns = tmp_path / "inbox", 1_700_000_000_000_000_000

    def deliver(data: bytes) -> None:
        part = inbox / ".scan.bmp.part"
        part.write_bytes(data)
        os.utime(part, ns=(kept_ns, kept_ns))
        os.replace(part, inbox / "scan.bmp")

    def done_hashes() -> list[str]:
        return [row["sha256"] for row in journal_rows(tmp_path) if row["state"] == "done"]

    with serving_here(config):
        deliver(first)
        wait_for(lambda: done_hashes() == [sha(first)] and not files_under(inbox), 60, what="the first version done")
        upscaled_first = (tmp_path / "output" / "scan.bmp").read_bytes()
        deliver(second)
        wait_for(lambda: sha(second) in done_hashes() and not files_under(inbox), 60, what="the second version done")
    assert (tmp_path / "output" / "scan.bmp").read_bytes() != upscaled_first


def test_a_version_dropped_again_after_another_is_upscaled_again(tmp_path, tiny_model):
    """A, then B, then A again: the output is B's until A is redone, so A is not 'already done'."""
    config = write_config(tmp_path, tiny_model)
    inbox, output = tmp_path / "inbox", tmp_path / "output" / "a.png"
    small, large = png(10, (8, 8)), png(11, (12, 10))
    with serving_here(config) as messages:
        for data, side in [(small, (32, 32)), (large, (48, 40)), (small, (32, 32))]:
            drop(inbox, "a.png", data)
            wait_for(lambda: not files_under(inbox) and output.exists() and read_image(output).rgb.shape[:2] == side,
                     60, what=f"a.png upscaled to {side}")
    assert not any("not redone" in m for m in messages)
    assert (tmp_path / "done" / "a.png").read_bytes() == small


def test_a_version_dropped_again_after_one_written_but_not_done_is_upscaled_again(tmp_path, tiny_model, monkeypatch):
    """A done; B written over A's output, then held back (its metrics row failed); A dropped again over B.
    A used to be taken for 'already done' and moved away, leaving B's output under its name."""
    import batchsr.watch

    config = write_config(tmp_path, tiny_model, reference="hr")
    write_png(tmp_path / "hr" / "a.png", image(40, (32, 32)))
    inbox, output = tmp_path / "inbox", tmp_path / "output" / "a.png"
    a, b = png(10, (8, 8)), png(11, (8, 8))
    real_append, failing = batchsr.watch.append_metrics, threading.Event()

    def append(path, rows, **kwargs):
        if failing.is_set():
            raise OSError(errno.EIO, "input/output error")
        return real_append(path, rows, **kwargs)

    monkeypatch.setattr(batchsr.watch, "append_metrics", append)
    with serving_here(config) as messages:
        drop(inbox, "a.png", a)
        wait_for(lambda: not files_under(inbox) and output.exists(), 60, what="A done")
        upscaled_a = read_image(output).rgb
        failing.set()
        drop(inbox, "a.png", b)
        wait_for(lambda: sum("input/output error" in m for m in messages) >= 2, 60, what="B written, its row refused")
        assert not np.array_equal(read_image(output).rgb, upscaled_a)
        drop(inbox, "a.png", a)
        time.sleep(1.5)
        failing.clear()
        wait_for(lambda: not files_under(inbox) and states(tmp_path).get("done") == ["a.png"], 60, what="A done again")
    assert not any("not redone" in m for m in messages)
    assert np.array_equal(read_image(output).rgb, upscaled_a)
    assert (tmp_path / "done" / "a.png").read_bytes() == a


def test_a_move_across_filesystems_leaves_a_version_that_arrived_during_the_copy(tmp_path, monkeypatch):
    from batchsr.watch import move_file

    source, target = tmp_path / "inbox" / "a.png", tmp_path / "done" / "a.png"
    source.parent.mkdir()
    source.write_bytes(b"old version")
    real_replace, real_copy = os.replace, shutil.copyfileobj

    def replace(src, dst, *args, **kwargs):
        if Path(src) == source and Path(dst) == target:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        return real_replace(src, dst, *args, **kwargs)

    def copy(src, dst, length=0):
        real_copy(src, dst, length)
        drop(source.parent, "a.png", b"new version")  # the producer renames a new version into place meanwhile

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "copyfileobj", copy)
    assert move_file(source, target) is False
    assert target.read_bytes() == b"old version" and source.read_bytes() == b"new version"
    monkeypatch.setattr(shutil, "copyfileobj", real_copy)
    assert move_file(source, target) is True and not source.exists() and target.read_bytes() == b"new version"


def test_a_file_whose_name_is_not_utf8_renamed_as_asked_is_processed(tmp_path, tiny_model):
    config = write_config(tmp_path, tiny_model)
    inbox = os.fsencode(tmp_path / "inbox")
    with serving_here(config) as messages:
        with open(os.path.join(inbox, b"caf\xe9.png"), "wb") as handle:  # a Latin-1 name from an old share or archive
            handle.write(png(1))
        wait_for(lambda: any("not valid UTF-8" in m for m in messages), 30, what="the warning")
        os.rename(os.path.join(inbox, b"caf\xe9.png"), os.path.join(inbox, "café.png".encode()))
        wait_for(lambda: states(tmp_path).get("done") == ["café.png"], 60, what="café.png done")


def test_a_huge_file_that_is_no_image_is_hashed_without_being_held(tmp_path):
    import tracemalloc

    from batchsr.journal import Entry
    from batchsr.watch import read_claimed

    path = tmp_path / "movie.mp4"
    with open(path, "wb") as handle:
        handle.truncate(200_000_000)  # sparse: 200 MB to read, no disk taken
    info = path.stat()
    entry = Entry(id=1, path="movie.mp4", size=info.st_size, ctime_ns=info.st_ctime_ns, attempts=0, interrupted=0, first_seen=0.0)
    tracemalloc.start()
    try:
        item = read_claimed(tmp_path, entry, max_pixels=None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    expected = hashlib.sha256()
    for _ in range(200):
        expected.update(bytes(1_000_000))
    assert item.sha256 == expected.hexdigest() and "not a supported image" in item.error and not item.changed
    assert peak < 20e6, f"{peak / 1e6:.0f} MB allocated"


@pytest.mark.parametrize("link", ["symbolic", "hard"])
def test_a_metrics_file_that_is_a_link_is_neither_written_through_nor_read(tmp_path, link):
    """A watch-metrics.csv planted as a link to another file had that file cut and appended to (and, when
    rewritten, its content copied into the CSV)."""
    from batchsr.watch import append_metrics

    victim, path = tmp_path / "victim.txt", tmp_path / METRICS_FILE
    victim.write_text("image,input_sha256\nsecret,line\npartial")
    (path.symlink_to if link == "symbolic" else path.hardlink_to)(victim)
    for replace in (False, True):
        append_metrics(path, [{"image": "a.png", "input_sha256": "1", "psnr_y": 30.0, "finished": "t", "model_id": "m"}],
                       replace=replace)
        assert victim.read_text() == "image,input_sha256\nsecret,line\npartial"
        assert not path.is_symlink() and "secret" not in path.read_text() and "a.png" in path.read_text()


def test_a_metrics_file_a_spreadsheet_saved_is_rewritten_in_its_columns(tmp_path):
    """Saved with a byte-order mark, its rows lost their image at the next rewrite; with columns moved or taken
    out, appended rows went under the wrong columns (a model id under psnr_y)."""
    from batchsr.watch import METRICS_COLUMNS, append_metrics

    path = tmp_path / METRICS_FILE
    row = {"image": "b.png", "input_sha256": "2", "psnr_y": 31.0, "finished": "t", "model_id": "m"}
    path.write_bytes("\ufeffimage,input_sha256,psnr_y\r\na.png,1,30.0".encode("utf-8"))  # no last line end: still a row
    append_metrics(path, [row])
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == ",".join(METRICS_COLUMNS)
    back = list(csv.DictReader(io.StringIO("\n".join(lines))))
    assert [(r["image"], r["input_sha256"], r["psnr_y"], r["model_id"]) for r in back] == [("a.png", "1", "30.0", ""), ("b.png", "2", "31.0", "m")]


def test_metrics_rows_of_names_like_formulas_are_text_and_replaced_not_doubled(tmp_path):
    from batchsr.watch import append_metrics

    path = tmp_path / METRICS_FILE
    row = {"image": "=cmd.png", "input_sha256": "1", "psnr_y": 30.0, "finished": "t", "model_id": "m"}
    assert append_metrics(path, [row]) == [("=cmd.png", "1")]  # a new file: rewritten, its keys returned
    assert append_metrics(path, [{**row, "psnr_y": 31.0}], replace=True) == [("=cmd.png", "1")]
    assert [(r["image"], r["psnr_y"]) for r in csv.DictReader(path.open())] == [("'=cmd.png", "31.0")]


def test_metrics_rows_are_appended_and_rewritten_only_to_replace_one(tmp_path):
    """Months of history cost a batch nothing: the CSV grows in place; a row cut by a crash is dropped."""
    from batchsr.watch import append_metrics

    path = tmp_path / METRICS_FILE

    def row(name: str, content: str, psnr: float) -> dict:
        return {"image": name, "input_sha256": content, "psnr_y": psnr, "finished": "t", "model_id": "m"}

    def rows() -> list[tuple[str, str, str]]:
        with open(path, newline="", encoding="utf-8") as handle:
            return [(r["image"], r["input_sha256"], r["psnr_y"]) for r in csv.DictReader(handle)]

    append_metrics(path, [row("a.png", "1", 30.0)])
    inode = path.stat().st_ino
    append_metrics(path, [row("b.png", "2", 31.0), row("c.png", "3", 32.0)])
    assert path.stat().st_ino == inode and rows() == [("a.png", "1", "30.0"), ("b.png", "2", "31.0"), ("c.png", "3", "32.0")]
    with open(path, "ab") as handle:
        handle.write(b"d.png,4,29.")  # a crash in the middle of an append
    append_metrics(path, [row("e.png", "5", 33.0)])
    assert path.stat().st_ino == inode and [r[0] for r in rows()] == ["a.png", "b.png", "c.png", "e.png"]
    append_metrics(path, [row("b.png", "2", 31.5)], replace=True)  # redone: its old row goes
    assert rows() == [("a.png", "1", "30.0"), ("c.png", "3", "32.0"), ("e.png", "5", "33.0"), ("b.png", "2", "31.5")]


def test_a_version_redone_keeps_one_metrics_row_per_content(tmp_path, tiny_model):
    config = write_config(tmp_path, tiny_model, reference="hr")
    inbox, first, second = tmp_path / "inbox", degrade(image(30, (32, 32)), 4), degrade(image(31, (32, 32)), 4)
    write_png(tmp_path / "hr" / "a.png", image(30, (32, 32)))
    versions = [cv2.imencode(".png", lr)[1].tobytes() for lr in (first, second, first)]
    with serving_here(config):
        for count, data in enumerate(versions, start=1):
            drop(inbox, "a.png", data)
            wait_for(lambda: not files_under(inbox) and len([r for r in journal_rows(tmp_path) if r["state"] == "done"]) == min(count, 2)
                     and data in [p.read_bytes() for p in (tmp_path / "done").iterdir()], 60, what=f"version {count} done")
    with open(tmp_path / "output" / METRICS_FILE, newline="", encoding="utf-8") as handle:
        keys = [(r["image"], r["input_sha256"]) for r in csv.DictReader(handle)]
    assert sorted(keys) == sorted([("a.png", sha(versions[0])), ("a.png", sha(versions[1]))])


def test_an_image_redone_after_a_crash_between_its_metrics_and_the_journal_keeps_one_row(tmp_path, tiny_model, monkeypatch):
    from batchsr.journal import WatchJournal

    config = write_config(tmp_path, tiny_model, reference="hr")
    write_png(tmp_path / "hr" / "a.png", image(40, (32, 32)))
    data = cv2.imencode(".png", degrade(image(40, (32, 32)), 4))[1].tobytes()
    real_complete = WatchJournal.complete

    def crash(self, results, now):
        raise RuntimeError("the daemon dies here")

    monkeypatch.setattr(WatchJournal, "complete", crash)
    with pytest.raises(RuntimeError, match="dies here"):
        with serving_here(config):
            drop(tmp_path / "inbox", "a.png", data)
            wait_for(lambda: (tmp_path / "output" / METRICS_FILE).exists(), 60, what="the metrics row")
            time.sleep(1.0)  # the daemon's thread ends with the error
    assert states(tmp_path) == {"claimed": ["a.png"]}
    monkeypatch.setattr(WatchJournal, "complete", real_complete)
    with serving_here(config):
        wait_for(lambda: states(tmp_path).get("done") == ["a.png"], 60, what="a.png done")
    with open(tmp_path / "output" / METRICS_FILE, newline="", encoding="utf-8") as handle:
        assert [(r["image"], r["input_sha256"]) for r in csv.DictReader(handle)] == [("a.png", sha(data))]


def test_a_failed_metrics_append_is_undone_and_a_headerless_csv_rewritten(tmp_path, monkeypatch):
    import batchsr.watch
    from batchsr.watch import append_metrics

    path = tmp_path / METRICS_FILE
    first = {"image": "a.png", "input_sha256": "1", "psnr_y": 30.0}
    assert append_metrics(path, [first]) == [("a.png", "1")]
    before = path.read_bytes()
    real_fsync = os.fsync

    def refuse(fd):
        raise OSError(errno.EIO, "input/output error")

    monkeypatch.setattr(batchsr.watch.os, "fsync", refuse)
    with pytest.raises(OSError):
        append_metrics(path, [{"image": "b.png", "input_sha256": "2", "psnr_y": 31.0}])
    monkeypatch.setattr(batchsr.watch.os, "fsync", real_fsync)
    assert path.read_bytes() == before
    path.write_bytes(b"")  # emptied by hand
    assert append_metrics(path, [first]) == [("a.png", "1")]
    with open(path, newline="", encoding="utf-8") as handle:
        assert [(r["image"], r["psnr_y"]) for r in csv.DictReader(handle)] == [("a.png", "30.0")]


def test_a_metrics_csv_the_journal_has_no_record_of_is_rewritten_without_duplicates(tmp_path, tiny_model):
    """A new state folder beside an old CSV (or a CSV from a version before the record): one rewrite, no duplicates."""
    config = write_config(tmp_path, tiny_model, reference="hr")
    write_png(tmp_path / "hr" / "a.png", image(50, (32, 32)))
    data = cv2.imencode(".png", degrade(image(50, (32, 32)), 4))[1].tobytes()
    with serving_here(config):
        drop(tmp_path / "inbox", "a.png", data)
        wait_for(lambda: states(tmp_path).get("done") == ["a.png"] and not files_under(tmp_path / "inbox"), 60, what="a.png done")
    shutil.rmtree(tmp_path / "state")
    with serving_here(config):
        drop(tmp_path / "inbox", "a.png", data)
        wait_for(lambda: states(tmp_path).get("done") == ["a.png"] and not files_under(tmp_path / "inbox"), 60, what="a.png again")
    with open(tmp_path / "output" / METRICS_FILE, newline="", encoding="utf-8") as handle:
        assert [(r["image"], r["input_sha256"]) for r in csv.DictReader(handle)] == [("a.png", sha(data))]


def test_a_lock_line_of_a_daemon_from_before_the_mark_is_known_as_a_daemons():
    """A daemon of an older version wrote no mark: a new daemon on the same output waited for it forever,
    as for a cron run, instead of refusing the configuration."""
    from batchsr.lock import DAEMON, held_by_daemon

    assert held_by_daemon(f"pid 7 {DAEMON}: /opt/batchsr/.venv/bin/batchsr watch")
    assert held_by_daemon("pid 7: /opt/batchsr/batchsr/cli.py --config /etc/batchsr/config.yaml watch")
    assert not held_by_daemon("pid 7: /opt/batchsr/.venv/bin/batchsr run /srv/watch /srv/out")
    assert not held_by_daemon("pid 7: batchsr --config watch.yaml run watch out")
    assert not held_by_daemon("pid 7: /opt/batchsr/.venv/bin/batchsr --config watch run /srv/in /srv/out")
    assert not held_by_daemon("unknown process")


def test_an_output_identity_recorded_with_the_device_number_still_matches():
    """Versions that recorded device:inode:size:mtime made every output look rewritten after an upgrade:
    content dropped again was upscaled again."""
    from batchsr.watch import _same_identity

    assert _same_identity("12:34:56:78", "34:56:78") and _same_identity("34:56:78", "34:56:78")
    assert not _same_identity("12:34:56:78", "34:56:79") and not _same_identity("12:34:56:78", None)
    assert not _same_identity("34:56:78", "12:34:56:78")


def test_a_stale_line_in_a_lock_held_by_another_process_is_not_taken_for_the_holder(tmp_path):
    """A holder that could not write its line (another user's lock file, opened read-only) left a dead daemon's
    line in place: a starting daemon read it, refused with exit 75 instead of waiting for the run, and named a
    process long gone."""
    import subprocess
    import sys

    from batchsr.errors import LockedError
    from batchsr.lock import FolderLock, held_by_daemon, lock_holder

    lock = tmp_path / ".batchsr" / "lock"
    lock.parent.mkdir()
    lock.write_text("pid 999999 (watch daemon): /opt/batchsr/.venv/bin/batchsr watch\n")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1]); fcntl.flock(f, fcntl.LOCK_EX); "
                               "print('held', flush=True); time.sleep(60)", str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError) as refused:
            FolderLock(lock).acquire()
        said = [str(refused.value), FolderLock(lock).holder(), lock_holder(lock)]
    finally:
        holder.kill()
        holder.wait()
    for line in said:
        assert f"pid {holder.pid}:" in line and "999999" not in line and "fcntl" in line, line
    assert not held_by_daemon(said[1])


def test_an_input_that_cannot_be_moved_out_of_the_inbox_is_said_once_per_version(tmp_path, monkeypatch):
    """A sticky inbox (another user's files): the move was tried and logged as an error at every scan, a line
    a minute per finished file, for ever."""
    import errno

    from loguru import logger

    import batchsr.watch
    from batchsr.watch import _Daemon

    def refused(*args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(batchsr.watch, "move_file", refused)
    inbox = tmp_path / "inbox"
    drop(inbox, "a.png", png(36))
    daemon = _Daemon.__new__(_Daemon)  # only what disposing of an input needs
    daemon.watch = WatchSettings(done_policy="move")
    daemon.folders = WatchFolders(inbox, tmp_path / "output", tmp_path / "done", tmp_path / "failed", tmp_path / "state", None)
    daemon.stuck = set()
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(f"{m.record['level'].name} {m.record['message']}"), level="DEBUG")
    try:
        info = (inbox / "a.png").stat()
        for _ in range(3):
            daemon._dispose_input("a.png", info.st_size, info.st_ctime_ns)
        drop(inbox, "a.png", png(37))  # another version: said again
        info = (inbox / "a.png").stat()
        daemon._dispose_input("a.png", info.st_size, info.st_ctime_ns)
    finally:
        logger.remove(sink)
    errors = [line for line in lines if line.startswith("ERROR")]
    assert len(errors) == 2 and "could not be moved" in errors[0] and "done_policy: keep" in errors[0], lines
    assert (inbox / "a.png").is_file()


def test_a_failure_report_is_not_written_again_while_its_file_cannot_be_moved(tmp_path, monkeypatch):
    """The same failed/NAME.error.json was rewritten and synced at every scan while the move kept failing."""
    import errno

    import batchsr.watch
    from batchsr.journal import Result
    from batchsr.watch import _Daemon

    def refused(*args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(batchsr.watch, "move_file", refused)
    inbox = tmp_path / "inbox"
    drop(inbox, "bad.png", b"not a png")
    info = (inbox / "bad.png").stat()
    daemon = _Daemon.__new__(_Daemon)
    daemon.folders = WatchFolders(inbox, tmp_path / "output", tmp_path / "done", tmp_path / "failed", tmp_path / "state", None)
    daemon.stuck = set()
    result = Result(id=1, path="bad.png", state="failed", sha256=None, size=info.st_size, ctime_ns=info.st_ctime_ns, attempts=3,
                    interrupted=0, error="not an image", traceback_digest=None, model_id=None, output=None, finished=1.0, first_seen=0.0)
    daemon._set_aside(result)
    report = tmp_path / "failed" / "bad.png.error.json"
    first = report.stat()
    daemon._set_aside(result)
    assert (report.stat().st_ino, report.stat().st_mtime_ns) == (first.st_ino, first.st_mtime_ns) and (inbox / "bad.png").is_file()


def _across_file_systems(monkeypatch, source: Path, unlink_source) -> None:
    """``os.replace`` of ``source`` fails as between two file systems (move_file then copies), and its
    ``os.unlink`` is ``unlink_source(real_unlink, path)``."""
    import errno

    real_replace, real_unlink = os.replace, os.unlink

    def cross_device(src, dst, **kwargs):
        if Path(src) == source:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_replace(src, dst, **kwargs)

    def unlink(path, **kwargs):
        return unlink_source(real_unlink, path, **kwargs) if Path(path) == source else real_unlink(path, **kwargs)

    monkeypatch.setattr(os, "replace", cross_device)
    monkeypatch.setattr(os, "unlink", unlink)


@pytest.mark.parametrize("there_before", [False, True])
def test_a_copy_whose_source_cannot_be_removed_is_not_left_behind(tmp_path, monkeypatch, there_before):
    """Across file systems, from an inbox that would not let the file go: each scan left one more full copy
    in failed/ (a.2.png, a.3.png, ...) until the disk was full."""
    import errno

    from batchsr.watch import move_file

    def refused(real_unlink, path, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    source, target = tmp_path / "inbox" / "a.png", tmp_path / "failed" / "a.png"
    drop(tmp_path / "inbox", "a.png", png(5))
    if there_before:  # a copy of this very content, kept by an earlier move: not removed
        drop(tmp_path / "failed", "a.png", png(5))
    _across_file_systems(monkeypatch, source, refused)
    with pytest.raises(PermissionError):
        move_file(source, target)
    monkeypatch.undo()
    assert source.read_bytes() == png(5) and target.exists() is there_before
    assert sorted(p.name for p in (tmp_path / "failed").iterdir()) == (["a.png"] if there_before else [])


def test_a_source_in_a_sticky_folder_it_cannot_leave_is_not_copied(tmp_path, monkeypatch):
    """A stuck input of a sticky inbox (another user's file) was copied in full across file systems at each
    scan, then the copy removed: the unlink's refusal is foreseen, and nothing is read."""
    import stat as st

    from batchsr.watch import move_file

    source, target = tmp_path / "inbox" / "a.png", tmp_path / "failed" / "a.png"
    drop(tmp_path / "inbox", "a.png", png(5))
    (tmp_path / "inbox").chmod(0o1777)
    reads = []
    _across_file_systems(monkeypatch, source, lambda real_unlink, path, **kwargs: pytest.fail("unlinked"))
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(source).st_uid + 4242)  # neither the file's nor the folder's owner
    monkeypatch.setattr(shutil, "copyfileobj", lambda *args, **kwargs: reads.append(args))
    with pytest.raises(PermissionError):
        move_file(source, target)
    monkeypatch.undo()
    assert reads == [] and source.read_bytes() == png(5) and list((tmp_path / "failed").iterdir()) == []
    assert st.S_IMODE((tmp_path / "inbox").stat().st_mode) == 0o1777


def test_a_source_on_a_read_only_mount_is_not_copied_and_the_mount_is_named(tmp_path, monkeypatch):
    """Even for root, who may unlink anything but not on a read-only file system: copied in full at each scan."""
    from types import SimpleNamespace

    from batchsr.watch import move_file

    source, target = tmp_path / "inbox" / "a.png", tmp_path / "done" / "a.png"
    drop(tmp_path / "inbox", "a.png", png(5))
    reads = []
    _across_file_systems(monkeypatch, source, lambda real_unlink, path, **kwargs: pytest.fail("unlinked"))
    monkeypatch.setattr(os, "statvfs", lambda where: SimpleNamespace(f_flag=os.ST_RDONLY))
    monkeypatch.setattr(shutil, "copyfileobj", lambda *args, **kwargs: reads.append(args))
    with pytest.raises(OSError, match="Read-only file system") as raised:
        move_file(source, target)
    monkeypatch.undo()
    assert raised.value.errno == errno.EROFS and reads == [] and source.read_bytes() == png(5)
    assert list((tmp_path / "done").iterdir()) == []


def test_a_cross_device_move_whose_source_vanishes_at_the_end_keeps_the_copy(tmp_path, monkeypatch):
    """The source gone at its unlink (another process, or a retried NFS unlink that had done it): the cleanup
    of a copy whose source stays removed the only copy left."""
    import errno

    from batchsr.watch import move_file

    def vanished(real_unlink, path, **kwargs):
        real_unlink(path, **kwargs)
        raise FileNotFoundError(errno.ENOENT, "No such file or directory")

    source, target = tmp_path / "inbox" / "a.png", tmp_path / "done" / "a.png"
    drop(tmp_path / "inbox", "a.png", png(6))
    _across_file_systems(monkeypatch, source, vanished)
    assert move_file(source, target) is True
    monkeypatch.undo()
    assert target.read_bytes() == png(6) and not source.exists()
