"""Watch mode: a daemon that upscales every image dropped into an inbox, once.

File events (watchdog) are only hints; the journal (``batchsr.journal``) is the
truth.  A scan at start-up and every ``watch.rescan_interval_s`` catches what
events missed.  A file is ready once its size and ctime (which any write or
replacement moves) have been stable for ``watch.settle_s``, and it is
processed if it decodes; ready files go through the same tf.data decode stage,
engine and finishing steps (``batchsr.pipeline``) as ``batchsr run``, in
batches.

Order of effects, so that a kill at any instant leaves a state the next start
completes: output written to a temporary file, fsynced and renamed; metrics
row recorded in the journal, then appended and synced (a row written again
rewrites the CSV atomically without the old one); journal row marked done;
input moved (or deleted).
At start-up, temporary files are removed, claimed rows go back to the queue
and inputs whose row is finished but which are still in the inbox are moved.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import os
import queue
import shutil
import signal
import socket
import stat
import tempfile
import threading
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterator

import numpy as np
from loguru import logger
from watchdog.events import (
    EVENT_TYPE_CLOSED,
    EVENT_TYPE_CREATED,
    EVENT_TYPE_DELETED,
    EVENT_TYPE_MODIFIED,
    EVENT_TYPE_MOVED,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)

from batchsr.checkpoint import description_path, model_weights, read_info
from batchsr.config import EngineSettings, Settings, WatchSettings
from batchsr.errors import ConfigError, ImageError, InputError, LockedError, ModelError, OutputError
from batchsr.imageio import (
    Image, LinkedFolderError, atomic_write, cut_name, decode_image, decoding_mb, make_folders, mode_like, read_bounded,
    remove_temporaries, sniff_format, sync_folder, temporary_prefix, walk,
)
from batchsr.journal import JOURNAL_FILE, LOCK_FILE, Completed, Entry, JournalWriteError, Result, Seen, WatchJournal
from batchsr.lock import DAEMON, FolderLock, InboxLock, held_by_daemon
from batchsr.pipeline import MemoryBudget, output_name, target_format, upscale_each, write_streamed
from batchsr.runner import (
    METRIC_COLUMNS, STATE_DIR, ReferenceFolder, decode_ahead_mb, file_name, memory_budget, spreadsheet_text, write_output,
)

METRICS_FILE = "watch-metrics.csv"
METRICS_COLUMNS = [*METRIC_COLUMNS, "input_sha256", "finished"]
# Names of files still being written by transfer tools and browsers (WinSCP, qBittorrent, aria2, Opera...).
IGNORED_SUFFIXES = (".tmp", ".part", ".crdownload", ".filepart", ".partial", ".opdownload", ".aria2", ".!qb", ".download")
# What operating systems and office programs leave in shared folders.
IGNORED_NAMES = ("thumbs.db", "desktop.ini")
# Errors of the output folder rather than of the image: they do not count as a try.
OUTPUT_FOLDER_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
_EVENT_KINDS = {EVENT_TYPE_CREATED, EVENT_TYPE_MODIFIED, EVENT_TYPE_CLOSED, EVENT_TYPE_MOVED, EVENT_TYPE_DELETED}
_EVENT_CLASSES = [FileCreatedEvent, DirCreatedEvent, FileModifiedEvent, FileClosedEvent, FileMovedEvent, DirMovedEvent,
                  FileDeletedEvent, DirDeletedEvent]  # those of _EVENT_KINDS the handler acts on
_DEGRADED_RESCAN_S = 10.0  # the scan interval while file events miss part of the inbox
_SUSPECT_RESCAN_S = 2.0  # a scan that found folders without file events is confirmed this soon
_FORGET_EVERY_S = 86400.0  # a pass over finished journal entries a day; each pass walks them in slices


def is_ignored(rel: str) -> bool:
    """Names producers use while a file is incomplete: hidden files and folders, ``IGNORED_SUFFIXES``,
    Safari's ``NAME.download/`` folders, rsync's ``.NAME.XXXXXX``, Syncthing's ``.syncthing.*.tmp`` and
    ``~syncthing~*.tmp``; and droppings that are never images: ``Thumbs.db``, ``desktop.ini``, Office's
    ``~$NAME`` locks, editors' ``NAME~`` backups and ``#NAME#`` autosaves."""
    parts = rel.split("/")
    if any(part.startswith(".") for part in parts) or any(part.lower().endswith(".download") for part in parts[:-1]):
        return True
    name = parts[-1].lower()
    return (name.endswith(IGNORED_SUFFIXES) or name in IGNORED_NAMES or name.startswith(("~syncthing~", "~$"))
            or name.endswith("~") or (len(name) > 1 and name.startswith("#") and name.endswith("#")))


@dataclass(frozen=True)
class WatchFolders:
    inbox: Path
    output: Path
    done: Path
    failed: Path
    state: Path
    reference: Path | None

    @classmethod
    def from_settings(cls, watch: WatchSettings) -> "WatchFolders":
        """Absolute folders; refuses overlaps that would make the daemon read its own files."""

        def absolute(path: Path | None) -> Path | None:
            return None if path is None else Path(os.path.abspath(path.expanduser()))

        folders = cls(*(absolute(getattr(watch, key)) for key in ("inbox", "output", "done", "failed", "state", "reference")))
        # Compared where they really are: an output folder that is a link into the inbox fed outputs back in.
        real = {key: Path(os.path.realpath(path)) for key in ("inbox", "output", "done", "failed", "state", "reference")
                if (path := getattr(folders, key)) is not None}
        names = ["inbox", "output", "done", "failed"]
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                if _nested(real[a], real[b]):
                    raise ConfigError(f"watch.{a} ({_shown(getattr(folders, a), real[a])}) and watch.{b} "
                                      f"({_shown(getattr(folders, b), real[b])}) must be separate folders, neither inside the other")
        for key in ("state", "reference"):
            if key in real and (real[key] == real["inbox"] or real["inbox"] in real[key].parents):
                raise ConfigError(f"watch.{key} ({_shown(getattr(folders, key), real[key])}) must not be inside "
                                  f"watch.inbox ({_shown(folders.inbox, real['inbox'])})")
        return folders

    def create(self) -> None:
        """Creates missing folders; a folder that cannot be made is a start-up error."""
        try:
            self.inbox.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"inbox {self.inbox} cannot be created: {exc.strerror or exc}") from None
        if not self.inbox.is_dir():
            raise InputError(f"inbox {self.inbox} is not a folder")
        if self.reference is not None and not self.reference.is_dir():
            raise InputError(f"reference folder {self.reference} does not exist or is not a folder")
        for name in ("output", "done", "failed", "state"):
            folder = getattr(self, name)
            try:
                folder.mkdir(parents=True, exist_ok=True)
                with tempfile.NamedTemporaryFile(dir=folder, prefix=".batchsr-probe-", suffix=".tmp"):
                    pass
            except OSError as exc:
                error = FolderFullError if exc.errno in (errno.ENOSPC, errno.EDQUOT) else OutputError
                raise error(f"{name} folder {folder} is not writable: {exc.strerror or exc}") from None


class FolderFullError(OutputError):
    """A folder's filesystem is full (space, inodes or quota): waited out at start-up, as while running."""


def _nested(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def _shown(path: Path, real: Path) -> str:
    return str(path) if path == real else f"{path}, that is {real}"


@dataclass
class WatchSummary:
    done: int = 0
    failed: int = 0
    seconds: float = 0.0
    model_id: str = ""


# -- systemd ------------------------------------------------------------------------


def notify(message: str) -> bool:
    """Sends ``message`` (``READY=1``, ``WATCHDOG=1`` ...) to systemd; a no-op outside ``Type=notify``."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as sock:
            sock.connect(address)
            sock.send(message.encode("utf-8"))
    except BlockingIOError:  # the receiver is not reading: never let that stall the daemon
        logger.debug("systemd notification dropped (its socket is full): {}", message.splitlines()[0])
        return False
    except OSError as exc:
        logger.warning("cannot notify systemd at {}: {}", os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def _watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of systemd's ``WatchdogSec``, or None."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    if not usec.isdigit() or int(usec) == 0:
        logger.warning("ignoring WATCHDOG_USEC={!r}: not a positive number of microseconds", usec)
        return None
    return int(usec) / 2e6


STOPPED_FILE = "stopped"  # in the state folder: the daemon was cut off on purpose, so no file in flight is at fault


def stop_on_signals(stop: threading.Event, timeout_s: float, state: Path | None = None, hangup_stops: bool | None = None) -> None:
    """First SIGTERM/SIGINT: take no new files, finish the current batch, return.
    A second one exits at once; so does ``timeout_s`` passing. Either way the exit leaves
    ``STOPPED_FILE`` in ``state``, so that the next start charges no file in flight with it.
    SIGHUP killed the daemon mid-batch (a death systemd does not restart). Ignored already (``nohup``), it stays
    so; with a controlling terminal, whose closing sends it, it stops the daemon as SIGTERM does; without one
    (systemd, ``setsid``) it is said and ignored. ``hangup_stops`` decides instead, when given."""

    def first(signum, frame) -> None:
        for other in (signal.SIGTERM, signal.SIGINT) + ((signal.SIGHUP,) if signal.getsignal(signal.SIGHUP) is first else ()):
            signal.signal(other, second)
        _log_soon("INFO", "{}: finishing the current batch, then stopping (a second signal stops at once)", signal.Signals(signum).name)
        notify("STOPPING=1")
        stop.set()
        why = f"the current batch did not finish within watch.stop_timeout_s = {timeout_s}s"
        timer = threading.Timer(timeout_s, _exit_now, args=(signum, why, state))
        timer.daemon = True
        timer.start()

    def second(signum, frame) -> None:  # exits from a thread: its log line could not be written from here
        threading.Thread(target=_exit_now, args=(signum, f"a second {signal.Signals(signum).name}", state)).start()

    def hangup(signum, frame) -> None:
        _log_soon("WARNING", "SIGHUP ignored: batchsr watch has no reload; restart it to apply a changed configuration")

    signal.signal(signal.SIGTERM, first)
    signal.signal(signal.SIGINT, first)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN or hangup_stops is not None:
        signal.signal(signal.SIGHUP, first if (_has_terminal() if hangup_stops is None else hangup_stops) else hangup)


def _has_terminal() -> bool:
    try:
        os.close(os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY))
    except OSError:
        return False
    return True


def _log_soon(level: str, message: str, *args) -> None:
    """Logs from a signal handler: loguru is not re-entrant, and the handler may interrupt one of its calls
    (the line was lost, with a "Logging error" trace); a thread logs once that call is done."""
    threading.Thread(target=logger.log, args=(level, message, *args), daemon=True).start()


def _exit_now(signum: int, why: str, state: Path | None) -> None:
    logger.error("{}; exiting now (the next start resumes)", why)
    if state is not None:
        with contextlib.suppress(OSError):  # at worst a file in flight is charged a try
            atomic_write(state / STOPPED_FILE, f"pid {os.getpid()}: {why}\n".encode("utf-8"))
    os._exit(128 + signum)


# -- files ----------------------------------------------------------------------------


def move_file(source: Path | str, target: Path, *, dir_fd: int | None = None, within: Path | None = None) -> bool:
    """Renames ``source`` (a name in the folder ``dir_fd``, when given, never followed if a link) onto ``target``
    (``within``: see ``make_folders``); across filesystems, a synced copy under a temporary name, then an unlink.
    False: the copy is made, but ``source`` was replaced or rewritten meanwhile and stays (it is a new version,
    not the one copied)."""
    make_folders(target.parent, within)
    try:
        os.replace(source, target, src_dir_fd=dir_fd)
        return True
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    _check_removable(source, dir_fd)  # a source that would stay is not copied in full at each scan first
    there_before = os.path.lexists(target)  # a copy of this very content (``_version_name``): left as it is
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(target.name), suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out, open(source, "rb", opener=_no_follow(dir_fd) if dir_fd is not None else None) as src:
            copied = os.fstat(src.fileno())
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
            shutil.copystat(src.fileno(), tmp)
        os.replace(tmp, target)
        made = os.lstat(target)
        sync_folder(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    now = os.stat(source, dir_fd=dir_fd, follow_symlinks=False)
    if (now.st_dev, now.st_ino, now.st_size, now.st_ctime_ns) != (copied.st_dev, copied.st_ino, copied.st_size, copied.st_ctime_ns):
        return False
    try:
        os.unlink(source, dir_fd=dir_fd)
    except FileNotFoundError:  # gone meanwhile (or a retried NFS unlink that did it): the copy is the file now
        return True
    except OSError:  # the source stays (a sticky or read-only inbox): a copy left at each try filled the disk
        with contextlib.suppress(OSError):
            if not there_before and os.path.samestat(os.lstat(target), made):
                os.unlink(target)
        raise
    return True


def _check_removable(source: Path | str, dir_fd: int | None) -> None:
    """Raises what unlinking ``source`` would raise for want of permission (a read-only or sticky folder), so
    a cross-device move does not copy a file it could not then remove."""
    where = dir_fd if dir_fd is not None else Path(source).parent
    if os.statvfs(where).f_flag & os.ST_RDONLY:  # root's too
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(source))
    uid = os.geteuid()
    if uid == 0:
        return
    folder = os.stat(where)
    if not os.access("." if dir_fd is not None else Path(source).parent, os.W_OK | os.X_OK, dir_fd=dir_fd, effective_ids=True):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(source))
    if folder.st_mode & stat.S_ISVTX and uid != folder.st_uid:
        owner = os.stat(source, dir_fd=dir_fd, follow_symlinks=False).st_uid
        if uid != owner:  # a sticky folder lets only the file's or the folder's owner remove it
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(source))


def append_metrics(path: Path, rows: list[dict], *, replace: bool = False) -> list[tuple[str, str]] | None:
    """Adds rows to the CSV, one row per image and content.

    Appended and synced: a batch costs the same after months of history; a
    row cut short by a crash is dropped first, and a failed append is undone.
    With ``replace`` (a row of the same image and content may be there), or a
    file with no header or another one (saved by a spreadsheet with a byte-order
    mark, columns moved or taken out: appended rows went under the wrong
    columns), the file is rewritten atomically, its rows matched to the columns
    by name, without the old rows; then the (image, content) keys of every row
    it holds are returned.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        info = None
    # A link, or a second name of another file, planted in its place: neither read nor appended to (that
    # would write into, or copy into the CSV, a file elsewhere); the atomic rewrite replaces the name.
    own = info is not None and stat.S_ISREG(info.st_mode) and info.st_nlink == 1
    if info is not None and not own:
        logger.warning("{} is not a file of its own (a link?); written anew", path)
    if not replace and own:
        header = _csv_text([], header=True).encode("utf-8")
        with open(path, "r+b", buffering=0, opener=_no_follow()) as handle:
            end = _complete_lines_end(handle) if handle.read(len(header)) == header else 0
            if end:  # the header at least, batchsr's
                handle.truncate(end)
                handle.seek(end)
                data = memoryview(_csv_text(rows, header=False).encode("utf-8"))
                try:
                    while data:  # one system call in practice: a kill leaves all of it or none
                        data = data[handle.write(data):]
                    os.fsync(handle.fileno())
                except BaseException:
                    with contextlib.suppress(OSError):
                        handle.truncate(end)
                    raise
                return None
    existing: list[dict] = []
    if own:
        text = path.read_text(encoding="utf-8-sig", errors="replace")
        if text.startswith(_csv_text([], header=True)):  # ours: a last line without its end was cut by a crash
            text = text[: text.rfind("\n") + 1]
        existing = [{**row, "image": file_name(row["image"] or "")} if "image" in row else row
                    for row in csv.DictReader(io.StringIO(text))]
    keys = {(row["image"], row["input_sha256"]) for row in rows}
    kept = [row for row in existing if (row.get("image"), row.get("input_sha256")) not in keys] + rows
    atomic_write(path, _csv_text(kept, header=True).encode("utf-8"))
    return [(row["image"], row["input_sha256"]) for row in kept if row.get("image") and row.get("input_sha256")]


def _csv_text(rows: list[dict], header: bool) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRICS_COLUMNS, extrasaction="ignore", restval="")
    if header:
        writer.writeheader()
    writer.writerows({**row, "image": spreadsheet_text(row["image"])} if row.get("image") else row for row in rows)
    return buffer.getvalue()


def _complete_lines_end(handle) -> int:
    """Where the file's last complete line ends."""
    end = handle.seek(0, os.SEEK_END)
    position = end
    while position > 0:
        start = max(0, position - 65536)
        handle.seek(start)
        chunk = handle.read(position - start)
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        position = start
    return 0


def traceback_digest(exc: BaseException) -> str:
    """Groups failures by where they happened (exception type and frames), not by message."""
    frames = traceback.extract_tb(exc.__traceback__)
    text = type(exc).__qualname__ + "".join(f"|{Path(f.filename).name}:{f.name}:{f.lineno}" for f in frames)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(seconds))


@dataclass
class _Read:
    """A claimed file after the decode stage: its content and image, or why not."""

    entry: Entry
    sha256: str | None = None
    size: int = -1
    ctime_ns: int = -1
    image: Image | None = None
    error: str | None = None
    digest: str | None = None
    missing: bool = False
    changed: bool = False  # not the file that settled: it is still being written
    folder_error: bool = False  # unreadable because its folder or mount is: not the file's fault


@contextlib.contextmanager
def _inbox_folder(inbox: Path, rel: str):
    """A descriptor of the folder holding ``inbox/rel``, reached one folder at a time without following a link:
    a folder swapped for a link after its file was queued cannot lead a read, move or delete out of the inbox
    (OSError ELOOP or ENOTDIR instead)."""
    fd = os.open(inbox, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in rel.split("/")[:-1]:
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = inner
        yield fd
    finally:
        os.close(fd)


def _no_follow(folder_fd: int | None = None):
    """An ``open`` opener for names in ``folder_fd`` (None: paths) that refuses a symbolic link."""
    return lambda name, flags: os.open(name, flags | os.O_NOFOLLOW, dir_fd=folder_fd)


_LINK_NOTE = "a symbolic link: not followed; move the file itself into the inbox"
_RUN_OUTPUT_NOTE = f"the OUTPUT folder of a batchsr run (it holds {STATE_DIR}/): not read as input"
_LINK_REASON = "a symbolic link in its path: not followed; move the file itself into the inbox"
_LINK_ERRORS = (errno.ELOOP, errno.ENOTDIR)  # what opening through a folder swapped for a link gives


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, LinkedFolderError):  # on the done/ or failed/ side
        return str(exc)
    return _LINK_REASON if exc.errno in _LINK_ERRORS else str(exc.strerror or exc)


def _listable(folder: Path) -> bool:
    """Whether the folder can be read now: a file in a folder that cannot (permissions taken away, a mount gone)
    is not at fault itself."""
    try:
        with os.scandir(folder) as entries:
            next(entries, None)
        return True
    except OSError:
        return False


def read_claimed(inbox: Path, entry: Entry, max_pixels: int | None) -> _Read:
    """Reads, hashes and decodes one file; errors are returned, never raised (one file never stops a batch)."""
    item, path = _Read(entry), inbox / entry.path
    try:
        with _inbox_folder(inbox, entry.path) as folder, \
                open(path.name, "rb", opener=_no_follow(folder)) as handle:  # a link put in its place: refused
            before = os.fstat(handle.fileno())
            data = handle.read(16)
            if sniff_format(data) is None:  # not an image: hashed for the record, never held (it may be a video)
                content = hashlib.sha256(data)
                read = len(data) + sum(content.update(chunk) or len(chunk) for chunk in iter(lambda: handle.read(1 << 20), b""))
            else:
                handle.seek(0)
                data = read_bounded(handle, path, max_pixels)
                content, read = hashlib.sha256(data), len(data)
            after = os.fstat(handle.fileno())
    except FileNotFoundError:
        item.missing = True
        return item
    except ImageError as exc:  # too large to be an image: read no further
        item.error, item.digest = exc.reason, None
        return item
    except OSError as exc:
        if exc.errno in _LINK_ERRORS:
            item.error, item.digest = _LINK_REASON, None
        else:
            item.error, item.digest = f"cannot read: {exc.strerror or exc}", traceback_digest(exc)
            item.folder_error = not _listable(path.parent)  # a bad sector of the file alone is the file's failure
        return item
    item.size, item.ctime_ns = after.st_size, after.st_ctime_ns
    signature = (after.st_size, after.st_ctime_ns)
    if signature != (before.st_size, before.st_ctime_ns) or signature != (entry.size, entry.ctime_ns) or read != after.st_size:
        item.changed = True
        return item
    item.sha256 = content.hexdigest()
    try:
        item.image = decode_image(data, path, max_pixels=max_pixels)
    except ImageError as exc:
        item.error, item.digest = exc.reason, traceback_digest(exc)
    except Exception as exc:  # a decoder bug fails this image, not the batch; the reason is recorded
        item.error, item.digest = f"decoder error: {type(exc).__name__}: {exc}", traceback_digest(exc)
    return item


# -- the model --------------------------------------------------------------------------


class _Model:
    """The engine, replaced between batches when its weights file (and description) change."""

    def __init__(self, weights: Path, settings: EngineSettings, scale: int | None = None):
        from batchsr.engine import Engine

        self.path = Path(weights)
        self.settings = settings
        self.scale = scale  # model.scale: a replacement of another scale is refused, as at start-up
        self.signature = self._signature()
        self.rejected: tuple | None = None
        self.engine = Engine(self.path, settings)

    def _signature(self) -> tuple:
        def one(path: Path):
            try:
                info = os.stat(path)
            except FileNotFoundError:
                return None
            return info.st_ino, info.st_size, info.st_mtime_ns

        return one(self.path), one(description_path(self.path))

    def reload_if_replaced(self) -> None:
        signature = self._signature()
        if signature in (self.signature, self.rejected):
            return
        from batchsr.engine import Engine

        try:
            info = read_info(self.path)
            if info.model_id == self.engine.model_id:
                self.signature = signature
                return
            if self.scale is not None and info.scale != self.scale:
                raise ModelError(f"{self.path} is an x{info.scale} model, but scale {self.scale} was asked for")
            engine = Engine(self.path, self.settings)
        except ModelError as exc:
            self.rejected = signature
            logger.warning("the model file changed but cannot be loaded ({}); still using {}", exc, self.engine.model_id)
            return
        logger.info("model replaced: now using {} (was {})", engine.model_id, self.engine.model_id)
        self.engine, self.signature, self.rejected = engine, signature, None


# -- the daemon ----------------------------------------------------------------------------


class _InboxEvents(FileSystemEventHandler):
    """Turns file events into path hints for the loop; decides nothing itself."""

    def __init__(self, hints: queue.Queue):
        self.hints = hints

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in _EVENT_KINDS:
            return  # opened / closed-without-writing: our own reads
        if event.is_directory:
            # A folder created or moved in: its files may bring no events of their own.
            if event.event_type in (EVENT_TYPE_CREATED, EVENT_TYPE_MOVED):
                self.hints.put(os.fsdecode(event.dest_path or event.src_path))
            return
        self.hints.put(os.fsdecode(event.src_path))
        if event.event_type == EVENT_TYPE_MOVED:
            self.hints.put(os.fsdecode(event.dest_path))  # a move into the inbox counts at its destination


@dataclass
class _TreeShape:
    """What a full scan saw of the inbox's folders (links and hidden folders left out): their inodes, once each
    (a bind mount shows a folder twice, and the kernel watches it once)."""

    inodes: set[int] = field(default_factory=set)
    depth: int = 0

    @property
    def folders(self) -> int:
        return len(self.inodes)


def _kernel_watches() -> set[int] | None:
    """The inodes of the folders this process holds inotify watches on, as the kernel lists them (None without
    /proc or inotify): compared as sets, hidden folders watched beside them do not hide one left out."""
    try:
        descriptors = os.listdir("/proc/self/fd")
    except OSError:
        return None
    watched = None
    for fd in descriptors:
        with contextlib.suppress(OSError, ValueError):
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify":
                with open(f"/proc/self/fdinfo/{fd}", encoding="ascii", errors="replace") as info:
                    found = {int(part[4:], 16) for line in info if line.startswith("inotify wd:")
                             for part in line.split() if part.startswith("ino:")}
                watched = (watched or set()) | found
    return watched


def _watch_limit() -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(Path("/proc/sys/fs/inotify/max_user_watches").read_text(encoding="ascii"))
    return None


class _NoEvents:
    """In place of a file watcher that cannot start: the daemon finds new files by scans alone."""

    emitters = ()

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def join(self, timeout: float | None = None) -> None:
        pass

    def is_alive(self) -> bool:
        return True


@dataclass
class _BatchCounts:
    done: int = 0
    failed: int = 0
    retried: int = 0
    deferred: int = 0
    duplicates: int = 0


class _Daemon:
    """Daemon-lifetime state: journal, model, writer threads, event hints."""

    def __init__(self, settings: Settings, folders: WatchFolders, journal: WatchJournal, model: _Model,
                 writers: ThreadPoolExecutor, stop: threading.Event, loaded_mb: float, inbox_lock: InboxLock | None = None):
        self.settings, self.watch, self.run_settings = settings, settings.watch, settings.run
        self.loaded_mb = loaded_mb  # the process with the model loaded, before any model call: the memory budget's base
        self.folders, self.journal, self.model, self.writers, self.stop = folders, journal, model, writers, stop
        self.inbox_lock = inbox_lock
        self.events = "none"  # what finds new files between scans: "kernel" (inotify...), "polling" or "none"
        self.too_deep_at: int | None = None  # no file watcher: how deep the inbox's tree was then
        self.short_of_watches: tuple[int, int | None] | None = None  # (folders, watch limit) when events missed some
        self.shortfall_suspected = False
        self.hints: queue.Queue = queue.Queue()  # not SimpleQueue: its timed get() can hang after a signal (CPython 3.11)
        self.prefix = str(folders.inbox) + os.sep
        self.bad_names: set[str] = set()  # names already reported as not UTF-8
        self.inbox_missing = False
        self.reported: set[tuple[str, str]] = set()  # (name, why) of what a scan skips, reported once
        self.stuck: set[tuple[str, int, int, str]] = set()  # (name, size, ctime, why): inputs that could not be moved
        self.reported_now: set[tuple[str, str]] | None = None  # what the scan under way finds again
        self.recorded_problems: set[tuple[str, str]] | None = None  # ``reported`` as the journal has it (None: not read)
        self.metrics_rows_known: bool | None = None  # the journal records every row of the metrics CSV
        self.claims_cut_short = False  # a refused journal write left a batch claimed: queue it again before the next
        self.forget_after = 0  # the journal's row id where forgetting old entries goes on; 0: a new pass
        self.forgotten = 0

    # -- the loop --

    def run(self) -> WatchSummary:
        started = time.time()
        summary = WatchSummary(model_id=self.model.engine.model_id)
        observer = self._start_observer()
        try:
            observer = self._review_events(observer, self._scan(time.time()))
            status = self.journal.status(time.time())
            logger.info("watching {} with model {}; {} files queued", self.folders.inbox, self.model.engine.model_id, status.queue)
            if not self.stop.is_set():  # after STOPPING=1, READY=1 would mark a stopping unit running
                notify(f"READY=1\nSTATUS=watching, {status.queue} queued")
            tick = min(0.25, max(0.02, min(self.watch.settle_s, self.watch.max_wait_s) / 4))
            ping_every, last_ping = _watchdog_interval(), 0.0
            # Timers of this process run on the monotonic clock; the journal's times are wall-clock
            # (they outlive the process), so a clock stepped back is caught and clamped below.
            next_scan = time.monotonic() + (_SUSPECT_RESCAN_S if self.shortfall_suspected else self.rescan_s)
            identity, next_check = _identity(self.folders.inbox), time.monotonic() + 1.0
            journal_file = _file_key(self.journal.path)
            last_wall = time.time()
            next_forget = time.monotonic()
            while not self.stop.is_set():
                try:
                    if self.claims_cut_short:  # refused again: the except below waits, and this is tried next turn
                        self.journal.recover_claims(time.time(), blame=False)
                        self.claims_cut_short = False
                    self._take_hints(tick)
                    now, tick_at = time.time(), time.monotonic()
                    if now < last_wall - 1.0:
                        logger.warning("the clock went back {:.0f}s; waiting times are counted from now", last_wall - now)
                        self.journal.clamp_future(now)
                    last_wall = now
                    if tick_at >= next_check:  # an inbox deleted and made again, or a dead watcher: no events would come
                        next_check = tick_at + 1.0
                        key = _file_key(self.journal.path)
                        if journal_file in (None, ("", 0)):  # not told at the start: the first sure look
                            journal_file = key if key != ("", 0) else None
                        if key not in (journal_file, None):  # all it would record from now on would be lost
                            raise OutputError(f"the journal {self.journal.path} was deleted or replaced while the daemon ran "
                                              f"(the state folder removed?); stopping, so that the next start opens the one there")
                        current = _identity(self.folders.inbox)
                        if current is not None and (current != identity or not _watching(observer)):
                            logger.warning("the inbox {} was replaced or its file watcher stopped; watching it again", self.folders.inbox)
                            observer.stop()
                            observer.join(timeout=5)
                            try:
                                if current != identity and self.inbox_lock is not None:
                                    self.inbox_lock.relock()  # another daemon holding the new folder: LockedError, exit 75
                                observer = self._start_observer()
                            except (OSError, InputError) as exc:  # gone again meanwhile (a flapping mount): tried again
                                logger.warning("cannot watch the inbox {} yet ({}); trying again in a second", self.folders.inbox, exc)
                                observer, current, self.events = _NoEvents(), None, "none"
                            next_scan = tick_at  # and look at everything in it
                        elif current is None and identity is not None:
                            logger.error("the inbox {} is gone; waiting for it to come back", self.folders.inbox)
                            if self.inbox_lock is not None:
                                self.inbox_lock.release()  # so that its filesystem can be unmounted meanwhile
                        identity = current
                    if tick_at >= next_scan:
                        observer = self._review_events(observer, self._scan(now))
                        next_scan = tick_at + (_SUSPECT_RESCAN_S if self.shortfall_suspected else self.rescan_s)
                    self._settle(now)
                    if not self.stop.is_set() and self._batch_due(now):
                        self.model.reload_if_replaced()
                        counts = self._run_batch(self.journal.claim(self.watch.batch_images, now))
                        summary.done += counts.done
                        summary.failed += counts.failed
                        summary.model_id = self.model.engine.model_id
                    if self.watch.journal_keep_days and tick_at >= next_forget and not self.stop.is_set() and identity is not None:
                        if self._forget_some(now):  # a pass done: the next one in a day
                            next_forget = tick_at + _FORGET_EVERY_S
                    if ping_every is not None and time.monotonic() - last_ping >= ping_every and not self.stop.is_set():
                        notify("WATCHDOG=1")
                        last_ping = time.monotonic()
                except JournalWriteError as exc:  # a full disk under the state folder: wait, as for a full output folder
                    self._wait_for_journal(exc)
                    next_scan = time.monotonic()  # file events taken before the refusal are lost: look at the inbox again
        finally:
            observer.stop()
            observer.join(timeout=10)
            if self.claims_cut_short:
                self._release_cut_short()
        summary.seconds = time.time() - started
        return summary

    def _release_cut_short(self) -> None:
        """A stop while a refused journal write was waited out: the batch it cut short is queued again, charged
        nothing; or, the journal still refusing, the stop is recorded so that the next start charges nobody
        either (it took the claims left for a crash's)."""
        try:
            self.journal.recover_claims(time.time(), blame=False)
        except Exception as exc:  # noqa: BLE001 (the journal still refused, or gone: never mask why the loop ended)
            logger.warning("the batch cut short could not be queued again ({}); the next start does it, charging nobody", exc)
            try:
                atomic_write(self.folders.state / STOPPED_FILE,
                             f"pid {os.getpid()}: stopped with a batch cut short by a refused journal write\n".encode("utf-8"))
            except OSError as error:
                logger.error("cannot record the stop either ({}): the next start charges the batch cut short a try", error)

    def _forget_some(self, now: float) -> bool:
        """One slice of the pass over finished journal entries, between batches; True once the pass is done."""
        inbox, output = self.folders.inbox, self.folders.output

        def in_inbox(path: str, size: int, ctime_ns: int) -> bool:
            try:
                info = os.stat(inbox / path)
            except (FileNotFoundError, NotADirectoryError):
                return False
            except OSError:  # cannot tell (a stale mount...): it stays
                return True
            return (info.st_size, info.st_ctime_ns) == (size, ctime_ns)

        def output_on_disk(rel: str, identity: str | None) -> bool:
            try:
                info = os.stat(output / rel)
            except (FileNotFoundError, NotADirectoryError):
                return False
            except OSError:
                return True
            return identity is None or _same_identity(identity, _identity_of(info))

        self.forget_after, forgotten = self.journal.forget_finished(
            now - self.watch.journal_keep_days * 86400.0, in_inbox, output_on_disk, now, after_id=self.forget_after)
        self.forgotten += forgotten
        if self.forget_after:
            return False
        if self.forgotten:
            logger.info("forgot {} journal entries finished over {:g} days ago whose file and output are gone",
                        self.forgotten, self.watch.journal_keep_days)
        self.forgotten = 0
        return True

    def _wait_for_journal(self, exc: JournalWriteError) -> None:
        """Nothing can be recorded: logs and waits ``retry_delay_s`` (at least 5 s; a stop ends the wait,
        systemd's watchdog is fed), then the loop puts the files of the batch cut short back in the queue,
        charging none, as a restart would. Nothing was lost: each journal write is one transaction, rolled back
        when refused."""
        self.claims_cut_short = True
        _wait_for_space(exc, self.watch.retry_delay_s, self.stop, "retrying", lambda _: notify("WATCHDOG=1"))

    @property
    def rescan_s(self) -> float:
        """Scans come often while file events miss part of the inbox."""
        if self.events == "none" or self.short_of_watches is not None:
            return min(self.watch.rescan_interval_s, _DEGRADED_RESCAN_S)
        return self.watch.rescan_interval_s

    def _polling_observer(self):
        """Snapshots by lstat: with stat, polling walked into linked folders, never followed otherwise."""
        from watchdog.observers.polling import PollingObserverVFS

        return PollingObserverVFS(os.lstat, os.scandir, polling_interval=self.watch.poll_interval_s)

    def _start_observer(self):
        from watchdog.observers import Observer

        handler = _InboxEvents(self.hints)
        observer = self._polling_observer() if self.watch.polling else Observer()
        # Only the kinds the handler uses: asked for all, the kernel also queues an open and a close for every
        # folder each scan reads, and in an inbox of some thousand folders those overflowed its queue at each
        # scan; the watcher's rebuild of its watches read them all again, and overflowed it again (a core busy).
        observer.schedule(handler, str(self.folders.inbox), recursive=True, event_filter=_EVENT_CLASSES)
        self.events = "polling" if self.watch.polling else "kernel"
        try:
            try:
                observer.start()
            except OSError as exc:
                if self.watch.polling:
                    raise InputError(f"cannot watch {self.folders.inbox}: {exc.strerror or exc}") from None
                logger.warning("no kernel file events for {} ({}); polling every {}s instead", self.folders.inbox, exc, self.watch.poll_interval_s)
                observer = self._polling_observer()
                observer.schedule(handler, str(self.folders.inbox), recursive=True)
                self.events = "polling"
                observer.start()
        except RecursionError:  # the watcher library walks the tree recursively: a very deep inbox defeats it
            self.events = "none"
            logger.warning("the inbox {} holds folders too deep for file events; new files are found by a scan every {:g}s",
                           self.folders.inbox, self.rescan_s)
            with contextlib.suppress(Exception):
                observer.stop()
            return _NoEvents()
        return observer

    def _review_events(self, observer, shape: _TreeShape | None):
        """After a full scan: whether file events cover the inbox. The watcher library skips a folder it cannot
        watch in silence (the kernel's watch limit reached) and gives up on a very deep tree; files there are
        found by scans alone. The watcher is started again once a smaller tree or a higher limit may let it
        cover the inbox."""
        if shape is None:
            return observer
        if self.events == "none":
            if self.too_deep_at is not None and shape.depth < self.too_deep_at:
                observer = self._start_observer()
                if self.events != "none":
                    logger.info("file events for the inbox {} again", self.folders.inbox)
            if self.events == "none":
                self.too_deep_at = shape.depth
            return observer
        if self.events != "kernel":
            return observer
        watched = _kernel_watches()
        if watched is None or shape.inodes <= watched:
            if watched is not None and self.short_of_watches is not None:
                logger.info("file events cover the inbox {} again", self.folders.inbox)
            self.short_of_watches, self.shortfall_suspected = None, False
            return observer
        if self.short_of_watches is None and not self.shortfall_suspected:
            self.shortfall_suspected = True  # a folder made a moment ago may not be watched yet: the next scan tells
            return observer
        self.shortfall_suspected = False
        limit = _watch_limit()
        if self.short_of_watches is None:
            self.short_of_watches = (shape.folders, limit)
            logger.warning(
                "file events reach only {} of the {} folders of the inbox {}, most likely for the system's limit on "
                "inotify watches (fs.inotify.max_user_watches = {}, shared by all processes of the user); files in the "
                "others are found by a scan every {:g}s. Raise the limit, or set watch.polling: true",
                len(shape.inodes & watched), shape.folders, self.folders.inbox, limit if limit is not None else "unknown", self.rescan_s)
        elif shape.folders < self.short_of_watches[0] or limit != self.short_of_watches[1]:
            observer.stop()  # releases its watches
            observer.join(timeout=5)
            observer = self._start_observer()
            watched = _kernel_watches()
            if self.events != "kernel" or (watched is not None and shape.inodes <= watched):
                logger.info("file events cover the inbox {} again", self.folders.inbox)
                self.short_of_watches = None
                return observer
            self.short_of_watches = (shape.folders, limit)
        return observer

    # -- observing --

    def _relative(self, path: str) -> str | None:
        if not path.startswith(self.prefix):
            return None
        rel = path[len(self.prefix) :]
        return None if not rel or is_ignored(rel) else rel

    def _walk(self, top: str, shape: _TreeShape | None = None) -> Iterator[tuple[str, int, int]]:
        def report(error: OSError) -> None:  # once, not at every scan
            self._report_once(os.path.relpath(error.filename, self.folders.inbox), f"cannot list it: {error.strerror or error}")

        base = top.count(os.sep)
        for root, dirs, names in walk(top, onerror=report):
            if shape is not None:
                if self.events == "kernel":  # only kernel events are checked by inode: no lstat a folder otherwise
                    with contextlib.suppress(OSError):
                        shape.inodes.add(os.lstat(root).st_ino)
                shape.depth = max(shape.depth, root.count(os.sep) - base)
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for d in [d for d in dirs if os.path.isdir(os.path.join(root, d, STATE_DIR))]:  # `run IN inbox/x`: fed back, x16
                dirs.remove(d)
                self._report_once(os.path.relpath(os.path.join(root, d), self.folders.inbox), _RUN_OUTPUT_NOTE)
            for name in sorted(names + [d for d in dirs if os.path.islink(os.path.join(root, d))]):
                path = os.path.join(root, name)
                rel = self._relative(path)
                if rel is not None and (found := self._regular(path, rel)) is not None:
                    yield found

    def _regular(self, path: str, rel: str, info: os.stat_result | None = None) -> tuple[str, int, int] | None:
        """``(rel, size, ctime_ns)`` of a regular file (``info``: its lstat, when taken already); None for anything
        else. A symbolic link is not followed: it could bring files from outside the inbox in, to be moved out of
        their folder into done/. A file that cannot be looked at is reported once, and the scan goes on."""
        try:
            info = info or os.lstat(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._report_once(rel, f"cannot look at it: {exc.strerror or exc}; retried at each scan")
            return None
        if stat.S_ISLNK(info.st_mode):
            self._report_once(rel, _LINK_NOTE)
        elif stat.S_ISREG(info.st_mode):
            return rel, info.st_size, info.st_ctime_ns
        return None

    def _in_skipped_folder(self, rel: str, folder_too: bool = False) -> bool:
        """Whether a folder on the way to ``rel`` (``folder_too``: or ``rel``, a folder, itself) is a link, or
        another run's OUTPUT (a hint from inside a folder the scan does not enter): reported once."""
        folder = self.folders.inbox
        parts = rel.split("/")
        for part in parts if folder_too else parts[:-1]:
            folder = folder / part
            if folder.is_symlink():
                self._report_once(str(folder.relative_to(self.folders.inbox)), _LINK_NOTE)
                return True
            if (folder / STATE_DIR).is_dir():
                self._report_once(str(folder.relative_to(self.folders.inbox)), _RUN_OUTPUT_NOTE)
                return True
        return False

    def _report_once(self, rel: str, why: str) -> None:
        if self.reported_now is not None:
            self.reported_now.add((rel, why))
        if (rel, why) not in self.reported:
            self.reported.add((rel, why))
            logger.warning("{}: {}", rel, why)

    def _scan(self, now: float) -> _TreeShape | None:
        """The whole inbox: new and changed files, and queued files that are gone. Returns the shape of its
        folder tree (None when the inbox is missing)."""
        if not self.folders.inbox.is_dir():
            if not self.inbox_missing:  # said once, not at every scan while a share is unmounted
                logger.error("the inbox {} is missing or not a folder (unmounted?); looked for at each scan", self.folders.inbox)
            self.inbox_missing = True
            self._record_problems({(".", "the inbox is missing or not a folder (unmounted?); looked for at each scan")}, now)
            return None
        self.inbox_missing = False
        shape = _TreeShape()
        self.reported_now = found_again = set()
        try:
            files = list(self._walk(str(self.folders.inbox), shape))
        finally:
            self.reported_now = None
        # Forget what is gone or mended: the sets stay the size of the inbox's problems over months, and a
        # problem that comes back is said again.
        self.reported &= found_again
        self._record_problems(self.reported, now)
        self.bad_names &= {rel for rel, _, _ in files}
        present = set(files)
        self.stuck = {key for key in self.stuck if key[:3] in present}
        self._record(files, now)
        gone = self.journal.active_paths() - {rel for rel, _, _ in files}
        if gone:
            self.journal.vanish(sorted(gone))
        return shape

    def _record_problems(self, problems: set[tuple[str, str]], now: float) -> None:
        """What ``batchsr status`` lists as skipped in the inbox: written when it changes, not at every scan."""
        if problems != self.recorded_problems:
            self.journal.set_inbox_problems(problems, now)
            self.recorded_problems = set(problems)

    def _take_hints(self, timeout: float) -> None:
        try:
            paths = {self.hints.get(timeout=timeout)}
        except queue.Empty:
            return
        while len(paths) < 10000:
            try:
                paths.add(self.hints.get_nowait())
            except queue.Empty:
                break
        files, gone = [], []
        for path in sorted(paths):
            rel = self._relative(path)
            if rel is None:
                continue
            try:
                info = os.lstat(path)  # one look: what it is decides the rest
            except OSError:
                if _is_text(rel):  # the journal only ever held names that are text
                    gone.append(rel)
                continue
            if stat.S_ISDIR(info.st_mode):
                if not self._in_skipped_folder(rel, folder_too=True):
                    files.extend(self._walk(path))
            elif "/" in rel and self._in_skipped_folder(rel):
                continue
            elif (found := self._regular(path, rel, info)) is not None:
                files.append(found)
        self._record(files, time.time())
        if gone:
            self.journal.vanish(gone)

    def _record(self, files: list[tuple[str, int, int]], now: float) -> None:
        usable = []
        for rel, size, ctime_ns in files:
            if not _is_text(rel):
                if rel not in self.bad_names:
                    self.bad_names.add(rel)
                    logger.warning("{!r}: the file name is not valid UTF-8; rename it to have it processed", rel)
                continue
            usable.append((rel, size, ctime_ns))
        signatures = {rel: (size, ctime_ns) for rel, size, ctime_ns in usable}
        for rel, seen in self.journal.observe(usable, now):
            if seen is Seen.DONE_BEFORE:
                self._dispose_input(rel, *signatures[rel])
            elif seen is Seen.FAILED_BEFORE:
                result = self.journal.last_result(rel)
                if result is not None:
                    self._set_aside(result)

    def _settle(self, now: float) -> None:
        due = self.journal.settling(now - self.watch.settle_s)
        ready, changed, gone = [], [], []
        for entry in due:
            try:
                info = os.stat(self.folders.inbox / entry.path)
            except FileNotFoundError:
                gone.append(entry.path)
                continue
            except OSError:
                ready.append(entry.id)  # reading it will tell why, as a failed try
                continue
            if (info.st_size, info.st_ctime_ns) == (entry.size, entry.ctime_ns):
                ready.append(entry.id)
            else:
                changed.append((entry.id, info.st_size, info.st_ctime_ns))
        if ready:
            self.journal.mark_ready(ready, now)
        if changed:
            self.journal.restart_settling(changed, now)
        if gone:
            self.journal.vanish(gone)

    def _batch_due(self, now: float) -> bool:
        count, oldest = self.journal.queue_head(now)
        return count >= self.watch.batch_images or (count > 0 and now - oldest >= self.watch.max_wait_s)

    # -- a batch --

    def _run_batch(self, entries: list[Entry]) -> _BatchCounts:
        counts = _BatchCounts()
        if not entries:
            return counts
        started = time.time()
        logger.info("batch of {} images", len(entries))
        engine = self.model.engine
        writes = self._produce(engine, self._read_batch(entries, counts), counts)
        try:
            return self._conclude_batch(writes, engine, counts, started)
        except BaseException:  # cut short (a refused journal write): no write of this batch runs on into the next
            wait([job for _, _, job in writes])
            raise

    def _conclude_batch(self, writes: list, engine, counts: _BatchCounts, started: float) -> _BatchCounts:
        completed: list[tuple[_Read, Completed, dict | None]] = []
        for item, out_rel, future in writes:
            try:
                metrics = future.result()
            except OSError as exc:
                if exc.errno in OUTPUT_FOLDER_ERRORS or isinstance(exc, LinkedFolderError):
                    self._defer(item, f"cannot write {self.folders.output / out_rel}: {exc.strerror or exc}", counts)
                else:
                    self._try_failed(item, f"output not written: {exc.strerror or exc}", traceback_digest(exc), counts)
                continue
            except Exception as exc:  # an encoder bug fails this image, not the daemon; the reason is recorded
                reason = exc.reason if isinstance(exc, ImageError) else f"{type(exc).__name__}: {exc}"
                self._try_failed(item, f"output not written: {reason}", traceback_digest(exc), counts)
                continue
            finally:
                item.image = None
            done = Completed(item.entry.id, item.sha256, item.size, item.ctime_ns, engine.model_id, out_rel.as_posix(), metrics,
                             _file_identity(self.folders.output / out_rel))
            completed.append((item, done, metrics))
        completed = self._append_metrics(completed, counts)
        finished = self.journal.complete([done for _, done, _ in completed], time.time())
        for item, done, _ in completed:
            if done.entry_id in finished:
                counts.done += 1
                logger.debug("{} -> {}", item.entry.path, done.output)
                self._dispose_input(item.entry.path, item.size, item.ctime_ns)
            else:
                logger.info("{} changed while it was processed; the new version is queued", item.entry.path)
        seconds = time.time() - started
        logger.info(
            "batch: {} done, {} failed, {} to retry, {} deferred, {} already done, in {:.2f}s ({:.1f} img/s)",
            counts.done, counts.failed, counts.retried, counts.deferred, counts.duplicates, seconds, counts.done / max(seconds, 1e-9),
        )
        if os.environ.get("NOTIFY_SOCKET"):
            queued, done_last_hour = self.journal.progress(time.time())
            notify(f"STATUS=watching, {queued} queued, {done_last_hour} done in the last hour")
        return counts

    def _read_batch(self, entries: list[Entry], counts: _BatchCounts) -> list[_Read]:
        """The tf.data decode stage of ``run``; settles what is not for the model (gone, changed, known, broken).

        The batch's images stay decoded until they are written: once they take a quarter of what
        run.memory_mb leaves beside the model (``decoding_mb`` each), the files not read yet go back to the
        queue for the next batch.
        """
        from batchsr.data import DecodeAhead, prepared_files

        claimed = {self.folders.inbox / e.path: e for e in entries}
        max_pixels = self.settings.image.max_pixels
        share = decode_ahead_mb(self.settings, self.loaded_mb)
        ahead = DecodeAhead(share, keep=True)
        reads = prepared_files(list(claimed), lambda path: read_claimed(self.folders.inbox, claimed[path], max_pixels),
                               self.run_settings.decode_workers, ahead=ahead, max_pixels=max_pixels)
        usable = []
        held_mb = 0.0
        try:
            for taken, item in enumerate(reads, start=1):
                entry, now, kept = item.entry, time.time(), False
                if item.missing:
                    self.journal.vanish([entry.path])
                    logger.info("{}: left the inbox before it was read; forgotten", entry.path)
                elif item.changed:
                    self.journal.restart_settling([(entry.id, item.size, item.ctime_ns)], now)
                elif item.sha256 is not None and (done := self._still_done(entry.path, item.sha256)) is not None:
                    self.journal.absorb_duplicate(entry.id, done, item.size, item.ctime_ns, now)
                    logger.info("{}: same content as the version already done; not redone", entry.path)
                    self._dispose_input(entry.path, item.size, item.ctime_ns)
                    counts.duplicates += 1
                elif item.error is not None and item.folder_error:
                    self._defer(item, f"{entry.path}: {item.error} (its folder cannot be read now)", counts)
                elif item.error is not None:
                    self._try_failed(item, item.error, item.digest, counts)
                else:
                    usable.append(item)
                    held_mb += decoding_mb(*item.image.size, item.image.rgb.dtype.itemsize)
                    kept = True
                if not kept:  # settled here: what it reserved is free again
                    item.image = None
                    ahead.release(taken - 1)
                if held_mb >= share and taken < len(entries):
                    reads.close()
                    later = entries[taken:]
                    self.journal.unclaim([e.id for e in later], time.time())
                    logger.info("{} images decoded take about {:,.0f} MB, a quarter of run.memory_mb beside the model or more: "
                                "{} wait for the next batch", len(usable), held_mb, len(later))
                    break
        finally:  # cut short (a refused journal write) too: decoding ahead stops and frees what it holds
            reads.close()
        return usable

    def _still_done(self, path: str, sha256: str) -> int | None:
        """The done row of this content whose output is on disk as it wrote it: not written over by another
        version since (one that never reached done included), nor removed."""
        done = self.journal.done_with_content(path, sha256)
        if done is None:
            return None
        if done.output_identity is not None and not _same_identity(done.output_identity, _file_identity(self.folders.output / done.output)):
            return None
        return done.id

    def _produce(self, engine, items: list[_Read], counts: _BatchCounts) -> list[tuple[_Read, Path, Future]]:
        """Model and writes as in ``run`` (``batchsr.pipeline``): batched, or band by band for huge images.

        The batch's images hold ``run.memory_mb`` together (``MemoryBudget``): one that does not fit beside
        those planned before it waits until they are written, and is refused only if it does not fit alone.
        """
        run, image_settings = self.run_settings, self.settings.image
        factor = run.outscale or engine.scale
        budget = MemoryBudget(self.loaded_mb, decoded_mb=lambda: sum(item.image.nbytes for item in items if item.image is not None) / 1e6)
        batched: list[tuple[_Read, Path, str]] = []
        writes: list[tuple[_Read, Path, Future]] = []
        taken: dict[Path, str] = {}

        def model_and_write() -> None:
            t0 = time.time()
            upscaled = upscale_each(engine, [item.image for item, _, _ in batched], image_settings.alpha)
            ms = (time.time() - t0) * 1000.0 / max(len(batched), 1)
            for (item, out_rel, fmt), result in zip(batched, upscaled):
                if isinstance(result, Exception):
                    budget.release(item.entry.id)
                    item.image = None
                    self._try_failed(item, f"model failed: {type(result).__name__}: {result}", traceback_digest(result), counts)
                    continue
                colour, alpha = result
                job = self.writers.submit(self._write_output, item, colour, alpha, out_rel, engine, factor, ms)
                writes.append((item, out_rel, job))
            batched.clear()

        def stream(item: _Read, out_rel: Path, fmt: str) -> None:
            logger.info("{}: {}x{} upscaled band by band", item.entry.path, *item.image.size)
            job = Future()
            try:
                write_streamed(engine, item.image, self.folders.output / out_rel, fmt, image_settings.alpha,
                               within=self.folders.output, mode=mode_like(self.folders.inbox / item.entry.path))
                job.set_result(None)
            except Exception as exc:  # judged with the other writes' outcomes
                job.set_exception(exc)
            writes.append((item, out_rel, job))

        try:
            for item in items:
                fmt = target_format(item.image.format, run.output_format)
                out_rel = output_name(Path(item.entry.path), item.image.format, run.output_format, run.name_template, factor)
                recorded = self.journal.output_owner(out_rel.as_posix())
                owner = taken.get(out_rel) or recorded
                if owner is not None and owner != item.entry.path:  # as in run: never replace another input's output
                    # Final against an output recorded done; one claimed in this batch may yet fail and free the name.
                    self._try_failed(item, f"output {out_rel} would overwrite the output of {owner}", None, counts,
                                     final=owner == recorded)
                    item.image = None
                    continue
                try:  # a folder the output cannot go into is found before the model's time is spent
                    make_folders((self.folders.output / out_rel).parent, self.folders.output)
                except OSError as exc:
                    if exc.errno in OUTPUT_FOLDER_ERRORS or isinstance(exc, LinkedFolderError):
                        self._defer(item, f"cannot write {self.folders.output / out_rel}: {exc.strerror or exc}", counts)
                    else:
                        self._try_failed(item, f"output not written: {exc.strerror or exc}", traceback_digest(exc), counts)
                    item.image = None
                    continue
                taken[out_rel] = item.entry.path
                reference = self.folders.reference is not None and float(factor).is_integer()
                call_mb = engine.call_mb(*item.image.rgb.shape[:2])
                route = budget.plan(item.entry.id, item.image, fmt, engine.scale, run, self.settings.engine.tile, reference=reference,
                                    call_mb=call_mb)
                if route is None:  # it would go better alone: planned again once the others are written
                    model_and_write()
                    wait([job for _, _, job in writes])
                    for done, _, _ in writes:
                        budget.release(done.entry.id)
                        done.image = None  # the result stays in its future
                    route = budget.plan(item.entry.id, item.image, fmt, engine.scale, run, self.settings.engine.tile, reference=reference,
                                        call_mb=call_mb)
                if route.refusal is not None:
                    self._try_failed(item, route.refusal, None, counts, final=route.final)
                    item.image = None
                    continue
                if route.note:
                    logger.warning("{}: {}", item.entry.path, route.note)
                if route.streamed:
                    stream(item, out_rel, fmt)
                    budget.release(item.entry.id)
                    item.image = None
                else:
                    batched.append((item, out_rel, fmt))
            model_and_write()
        except BaseException:  # cut short: the writes handed to the pool finish before the batch is given up
            wait([job for _, _, job in writes])
            raise
        return writes

    def _write_output(self, item: _Read, colour: np.ndarray, alpha: np.ndarray | None, out_rel: Path, engine, factor: float,
                      ms: float) -> dict | None:
        """Writes one output as ``run`` does (``runner.write_output``); returns its metrics row when a reference exists."""
        references = ReferenceFolder(self.folders.reference) if self.folders.reference is not None else None
        written = write_output(item.image, colour, alpha, self.folders.output / out_rel, self.settings, engine.scale,
                               name=item.entry.path, rel=Path(item.entry.path), references=references, ms=ms,
                               within=self.folders.output, mode=mode_like(self.folders.inbox / item.entry.path))
        if written.metrics is None or "psnr_y" not in written.metrics:  # no reference, or none usable
            return None
        return {"image": item.entry.path, "scale": int(factor), "model_id": engine.model_id, **written.metrics,
                "input_sha256": item.sha256, "finished": _iso(time.time())}

    def _append_metrics(self, completed: list, counts: _BatchCounts) -> list:
        rows = [metrics for _, _, metrics in completed if metrics is not None]
        if not rows:
            return completed
        if self.metrics_rows_known is None:  # a CSV from before the journal recorded its rows is rewritten once
            self.metrics_rows_known = self.journal.has_metrics_rows()
        try:
            again = self.journal.note_metrics_rows([(row["image"], row["input_sha256"]) for row in rows])
            held = append_metrics(self.folders.output / METRICS_FILE, rows, replace=again or not self.metrics_rows_known)
            if held is not None:
                self.journal.note_metrics_rows(held)
                self.metrics_rows_known = True
        except OSError as exc:
            # The outputs exist but their rows do not: redo those images rather than record them done without.
            for item, _, metrics in completed:
                if metrics is not None:
                    self._defer(item, f"cannot write {self.folders.output / METRICS_FILE}: {exc.strerror or exc}", counts)
            return [c for c in completed if c[2] is None]
        return completed

    # -- outcomes --

    def _try_failed(self, item: _Read, reason: str, digest: str | None, counts: _BatchCounts, *, final: bool = False) -> None:
        """A failed try: retried after a delay up to max_attempts (a half-written file fails to decode until the
        rest arrives), unless ``final``: decided by the complete image and the settings, another try fails alike."""
        entry, now = item.entry, time.time()
        attempts = entry.attempts + 1
        tries = attempts + entry.interrupted
        if not final and tries < self.watch.max_attempts:
            self.journal.retry_later(entry.id, attempts=attempts, error=reason, digest=digest, not_before=now + self.watch.retry_delay_s, now=now)
            logger.warning("{}: {} (try {} of {}); retrying in {:g}s", entry.path, reason, tries, self.watch.max_attempts, self.watch.retry_delay_s)
            counts.retried += 1
            return
        result = self.journal.fail(entry.id, sha256=item.sha256, attempts=attempts, error=reason, digest=digest, now=now)
        if result is not None:
            tried = "not retried: another try would fail alike" if final else f"try {tries} of {self.watch.max_attempts}"
            logger.error("{}: {} ({}); set aside", entry.path, reason, tried)
            self._set_aside(result)
            counts.failed += 1

    def _defer(self, item: _Read, reason: str, counts: _BatchCounts) -> None:
        """The output folder refused the write (full, read-only): not the image's fault, not a try."""
        entry, now = item.entry, time.time()
        self.journal.retry_later(entry.id, attempts=entry.attempts, error=reason, digest=None, not_before=now + self.watch.retry_delay_s, now=now)
        logger.error("{}; {} stays in the inbox, retried in {:g}s", reason, entry.path, self.watch.retry_delay_s)
        counts.deferred += 1

    def set_aside_interrupted(self, entries: list[Entry]) -> None:
        """Files in flight when the daemon died too often: set aside so they cannot stop it again."""
        for entry in entries:
            if entry.attempts + entry.interrupted < self.watch.max_attempts:
                continue
            reason = f"the daemon stopped {entry.interrupted} times while processing this file (crash, kill or power loss)"
            result = self.journal.fail(entry.id, sha256=None, attempts=entry.attempts, error=reason, digest=None, now=time.time())
            if result is not None:
                logger.error("{}: {}; set aside", entry.path, reason)
                self._set_aside(result)

    def _dispose_input(self, rel: str, size: int, ctime_ns: int) -> None:
        """Applies watch.done_policy to an input whose output is recorded done."""
        policy = self.watch.done_policy
        if policy == "keep":
            return
        name = rel.rsplit("/", 1)[-1]
        try:
            with _inbox_folder(self.folders.inbox, rel) as folder:
                try:
                    info = os.stat(name, dir_fd=folder, follow_symlinks=False)
                except FileNotFoundError:
                    return
                if not stat.S_ISREG(info.st_mode) or (info.st_size, info.st_ctime_ns) != (size, ctime_ns):
                    logger.info("{} changed since it was read; the new version is queued", rel)
                    return
                if policy == "move":
                    target = _version_name(self.folders.done / rel, size, lambda: _sha256(name, folder))
                    if not move_file(name, target, dir_fd=folder, within=self.folders.done):
                        logger.info("{} was replaced while it was moved to {}; the new version is queued", rel, self.folders.done)
                else:
                    os.unlink(name, dir_fd=folder)
        except FileNotFoundError:
            return
        except OSError as exc:
            self._stuck(rel, size, ctime_ns, exc, f"output done, but the input could not be {policy}d", "or set watch.done_policy: keep")

    def _set_aside(self, result: Result) -> None:
        """Writes ``failed/NAME.error.json``, then moves the input beside it."""
        report = {
            "file": result.path,
            "reason": result.error,
            "attempts": result.attempts,
            "interrupted": result.interrupted,
            "time": _iso(result.finished),
            "first_seen": _iso(result.first_seen),
            "size": result.size,
            "sha256": result.sha256,
            "traceback_digest": result.traceback_digest,
        }
        name = result.path.rsplit("/", 1)[-1]
        try:
            target = _free_name(self.folders.failed / result.path, report)
            with _inbox_folder(self.folders.inbox, result.path) as folder:
                info = os.stat(name, dir_fd=folder, follow_symlinks=False)
                if stat.S_ISREG(info.st_mode) and (info.st_size, info.st_ctime_ns) == (result.size, result.ctime_ns):
                    data = (json.dumps(report, indent=2) + "\n").encode("utf-8")
                    with contextlib.suppress(OSError):  # there already, from the last try: not written (and synced) again
                        if _report_path(target).read_bytes() == data:
                            data = None
                    if data is not None:
                        atomic_write(_report_path(target), data, self.folders.failed)
                    if move_file(name, target, dir_fd=folder, within=self.folders.failed):
                        logger.info("{} moved to {}", result.path, target)
                    else:
                        logger.info("{} was replaced while it was moved to {}; the new version is queued", result.path, self.folders.failed)
                    self.journal.mark_set_aside(result.id)
                else:
                    logger.info("{} changed since it failed; the new version is queued", result.path)
        except FileNotFoundError:
            return
        except OSError as exc:
            self._stuck(result.path, result.size, result.ctime_ns, exc, f"cannot move it to {self.folders.failed}")

    def _stuck(self, rel: str, size: int, ctime_ns: int, exc: OSError, what: str, other_way: str = "") -> None:
        """An input that could not be moved or deleted: said once for each version of it, with the likely
        cause (it is tried at each scan: every minute, an error line per such file filled the logs)."""
        why = _os_reason(exc)
        if exc.errno in (errno.EPERM, errno.EACCES):
            why += (f" (uid {os.getuid()} may not take it out of the inbox, or put it where it goes: a sticky or read-only "
                    f"inbox holding another user's file, say; give the daemon's user that right{', ' + other_way if other_way else ''})")
        key = (rel, size, ctime_ns, why)
        if key in self.stuck:
            logger.debug("{}: {}: {}; retried at the next scan", rel, what, why)
            return
        self.stuck.add(key)
        logger.error("{}: {}: {}; retried at each scan, said again only if the reason changes", rel, what, why)


def _is_text(rel: str) -> bool:
    """A name that is valid UTF-8 (the journal, the CSV and most tools need text names)."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _numbered(path: Path, k: int) -> Path:
    """``stem.K.ext`` beside ``path``, the stem cut so that the name stays within 255 bytes."""
    tail = f".{k}{path.suffix}"
    return path.with_name(cut_name(path.stem, 255 - len(tail.encode("utf-8", "surrogateescape"))) + tail)


def _version_name(path: Path, size: int, source_digest: Callable[[], bytes]) -> Path:
    """``path`` in done/, or ``stem.2.ext``, ``stem.3.ext``... when another version of the input holds it: done/
    keeps the only copy of each input, so a new version dropped under the same name does not replace the
    last one's. A copy of the very same content is replaced, as before."""
    candidate, k, digest = path, 1, None
    while os.path.lexists(candidate):
        try:
            if os.path.getsize(candidate) == size:  # only then read: the source once at most
                digest = digest or source_digest()
                if _sha256(candidate) == digest:
                    return candidate
        except OSError:
            pass
        k += 1
        candidate = _numbered(path, k)
    return candidate


def _sha256(path: Path | str, dir_fd: int | None = None) -> bytes:
    with open(path, "rb", opener=_no_follow(dir_fd) if dir_fd is not None else None) as handle:
        return hashlib.file_digest(handle, "sha256").digest()


def _report_path(failed: Path) -> Path:
    """``NAME.error.json`` beside the failed file; for a name too long to take the suffix (a file name has at
    most 255 bytes), the name cut to 200 bytes and a hash of the whole, so that the report can be written."""
    name = failed.name + ".error.json"
    raw = failed.name.encode("utf-8", "surrogateescape")
    if len(raw) + len(".error.json") > 255:
        digest = hashlib.sha256(raw).hexdigest()[:12]
        name = f"{cut_name(failed.name, 200)}.{digest}.error.json"
    return failed.with_name(name)


def _free_name(path: Path, report: dict) -> Path:
    """``path``, or ``stem.2.ext``, ``stem.3.ext``... when an earlier failed file (or its report) holds it:
    failed/ keeps the only copy of each input, so nothing there is overwritten. A report of this very
    failure without its file (the daemon died between the two) is taken up again."""
    candidate, k = path, 1
    while True:
        sidecar = _report_path(candidate)
        if not os.path.lexists(candidate) and not os.path.lexists(sidecar):
            return candidate
        if not os.path.lexists(candidate):
            with contextlib.suppress(OSError, ValueError):
                if json.loads(sidecar.read_text(encoding="utf-8")) == report:
                    return candidate
        k += 1
        candidate = _numbered(path, k)


def _watching(observer) -> bool:
    """The observer and each of its emitters (an emitter ends when its folder is deleted) still run."""
    return observer.is_alive() and all(emitter.is_alive() for emitter in observer.emitters)


def _file_identity(path: Path) -> str | None:
    """Which file is at ``path``: an atomic replace gives another inode, an edit another size or mtime
    (not the device number, which a network mount may change across remounts)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return _identity_of(info)


def _identity_of(info: os.stat_result) -> str:
    return f"{info.st_ino}:{info.st_size}:{info.st_mtime_ns}"


def _same_identity(recorded: str, now: str | None) -> bool:
    """Whether an output is as written: ``recorded`` by a version that put the device number first
    (device:inode:size:mtime) is compared on the rest."""
    return now is not None and (recorded == now or (recorded.count(":") == 3 and recorded.partition(":")[2] == now))


def _file_key(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at ``path``; ("", 0) when there is none; None when it cannot be told now
    (a network share's passing error is not a deleted journal)."""
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return ("", 0)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _identity(folder: Path) -> tuple[int, int] | None:
    """Which folder is at ``folder`` now (device, inode), or None when there is none."""
    try:
        info = os.stat(folder)
    except OSError:
        return None
    return (info.st_dev, info.st_ino) if stat.S_ISDIR(info.st_mode) else None


def serve(settings: Settings, stop: threading.Event) -> WatchSummary:
    """Runs the watch daemon until ``stop`` is set, then returns after the current batch.

    Start-up problems raise: ConfigError (overlapping folders), InputError,
    OutputError (a folder cannot be created or written), LockedError (another
    daemon holds the state folder or the inbox, or anyone holds the output folder), ModelError.
    """
    folders = WatchFolders.from_settings(settings.watch)
    while True:  # a full disk is waited out, not made exit 73 until systemd's restarts run out
        try:
            folders.create()
            break
        except FolderFullError as exc:
            if not _wait_for_space(exc, settings.watch.retry_delay_s, stop, "starting again", _extend_start):
                return WatchSummary()
    with FolderLock(folders.state / LOCK_FILE, DAEMON):
        output_lock = _wait_for_runs(FolderLock(folders.output / STATE_DIR / "lock", DAEMON), stop)
        if output_lock is None:
            return WatchSummary()
        try:
            while True:
                try:
                    return _serve_locked(settings, folders, stop)
                except JournalWriteError as exc:  # refused before the loop (opening, the first scan): start again
                    if not _wait_for_space(exc, settings.watch.retry_delay_s, stop, "starting again", _extend_start):
                        return WatchSummary()
        finally:
            output_lock.release()


def _extend_start(seconds: float) -> None:
    """Tells systemd that start-up goes on for a while yet (its start timeout would fail the unit)."""
    notify(f"EXTEND_TIMEOUT_USEC={int(3 * seconds * 1e6)}")


def _wait_for_space(exc: OutputError, delay_s: float, stop: threading.Event, then: str, ping) -> bool:
    """A full disk under the journal or a folder, at start-up or while running: logs, then waits ``delay_s``
    (at least 5 s) in pieces of at most a minute, each after ``ping(its seconds)`` tells systemd the daemon
    lives; False when stopped meanwhile."""
    delay = max(delay_s, 5.0)
    logger.error("{}; {} in {:g}s", exc, then, delay)
    notify(f"STATUS=waiting for space: {exc}")
    deadline = time.monotonic() + delay
    while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
        piece = min(left, 60.0)
        ping(piece)
        stop.wait(piece)
    return not stop.is_set()


def _wait_for_runs(output_lock: FolderLock, stop: threading.Event, poll_s: float = 5.0) -> FolderLock | None:
    """Takes the output folder's lock, waiting while a ``batchsr run`` holds it (a cron job into it is no reason
    to fail the service) and telling systemd that start-up goes on; None when stopped meanwhile. Another
    daemon holding it is refused."""
    waiting = False
    while not stop.is_set():
        try:
            output_lock.acquire()
        except LockedError as exc:
            holder = output_lock.holder() or ""
            if held_by_daemon(holder):  # another daemon on this output: a configuration to fix, not to wait out
                raise
            if not waiting:
                logger.warning("{}; waiting for it to finish", exc)
                notify(f"STATUS=waiting for the output folder: {holder}")
                waiting = True
            _extend_start(poll_s)
            stop.wait(poll_s)
            continue
        if waiting:
            logger.info("the output folder is free: starting")
        return output_lock
    return None


def _serve_locked(settings: Settings, folders: WatchFolders, stop: threading.Event) -> WatchSummary:
    """The daemon, its state folder and output folder locked."""
    with InboxLock(folders.inbox) as inbox_lock:
        removed = sum(remove_temporaries(folder) for folder in (folders.output, folders.done, folders.failed, folders.state))
        if removed:
            logger.info("removed {} temporary files left by an interrupted run", removed)
        journal = WatchJournal(folders.state / JOURNAL_FILE)
        try:
            stopped = folders.state / STOPPED_FILE
            deliberate = stopped.exists()  # cut off by a stop signal: not the fault of a file in flight
            interrupted = journal.recover_claims(time.time(), blame=not deliberate)
            if interrupted:
                logger.warning("{} files were in flight when the daemon last stopped{}; they are queued again", len(interrupted),
                               " (cut off by a stop signal)" if deliberate else "")
            stopped.unlink(missing_ok=True)
            model = _Model(model_weights(settings.model), settings.engine, settings.model.scale)
            loaded_mb = memory_budget(settings).loaded_mb
            with ThreadPoolExecutor(max_workers=settings.run.write_workers, thread_name_prefix="batchsr-write") as writers:
                daemon = _Daemon(settings, folders, journal, model, writers, stop, loaded_mb, inbox_lock)
                daemon.set_aside_interrupted(interrupted)
                return daemon.run()
        finally:
            journal.close()
