"""The watch daemon's journal: one SQLite row per version of a file in the inbox.

A row moves through ``seen`` (waiting for the file to settle), ``ready``
(queued), ``claimed`` (in the batch being processed) to ``done`` or
``failed``.  At most one active row (seen, ready, claimed) exists per path;
finished rows are keyed by path and content hash, so a file dropped again with
new content gets a new row while identical content is recognised.  Every
change is one committed transaction in WAL mode: a killed daemon resumes from
the last commit, and ``batchsr status`` reads while the daemon writes.

This module does not import TensorFlow, so ``batchsr status`` starts at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from urllib.request import pathname2url

from loguru import logger

from batchsr.errors import InputError, OutputError
from batchsr.lock import lock_holder

JOURNAL_FILE = "journal.sqlite"
LOCK_FILE = "lock"
STATES = ("seen", "ready", "claimed", "done", "failed")
ACTIVE = ("seen", "ready", "claimed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL,                -- relative to the inbox, '/'-separated, exactly as on disk
    sha256 TEXT,                       -- content hash, once the file has been read
    state TEXT NOT NULL CHECK (state IN ('seen', 'ready', 'claimed', 'done', 'failed')),
    size INTEGER NOT NULL,             -- size and ctime when last observed (or when read): a write, a rename
    ctime_ns INTEGER NOT NULL,         -- into place or a copy over it moves the ctime, even when the mtime is kept
    first_seen REAL NOT NULL,
    changed REAL NOT NULL,             -- when size or ctime last changed: settling counts from here
    ready_since REAL,
    not_before REAL NOT NULL DEFAULT 0,  -- retry back-off
    attempts INTEGER NOT NULL DEFAULT 0,     -- tries that failed
    interrupted INTEGER NOT NULL DEFAULT 0,  -- tries cut short by the daemon dying while it was processed alone
    alone INTEGER NOT NULL DEFAULT 0,        -- in a batch the daemon died in: processed on its own from then on
    set_aside INTEGER NOT NULL DEFAULT 0,    -- failed, and moved to failed/: the same file in the inbox again is a retry
    error TEXT,
    traceback_digest TEXT,
    model_id TEXT,
    output TEXT,                       -- relative to the output folder
    output_identity TEXT,              -- inode:size:mtime of the output as written: another write replaces it
    stale_since REAL,                  -- when a finished row was first found standing for nothing (forget_finished)
    metrics TEXT,                      -- JSON, when a reference was found
    finished REAL,
    updated REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS one_active_row_per_path ON files(path) WHERE state IN ('seen', 'ready', 'claimed');
CREATE UNIQUE INDEX IF NOT EXISTS one_result_per_content ON files(path, sha256) WHERE state IN ('done', 'failed');
CREATE INDEX IF NOT EXISTS by_state ON files(state, ready_since);
CREATE INDEX IF NOT EXISTS by_path ON files(path, id);
CREATE INDEX IF NOT EXISTS by_finished ON files(finished) WHERE finished IS NOT NULL;
CREATE INDEX IF NOT EXISTS by_output ON files(output) WHERE state = 'done';
-- (image, content) of the rows in watch-metrics.csv, recorded before they are appended: a row to write
-- again (after a crash, a failed write, a version redone) makes the CSV be rewritten without the old one
CREATE TABLE IF NOT EXISTS metrics_rows (image TEXT NOT NULL, sha256 TEXT NOT NULL, PRIMARY KEY (image, sha256)) WITHOUT ROWID;
-- what the last scan of the inbox could not look into, or would not follow (for `batchsr status`)
CREATE TABLE IF NOT EXISTS inbox_problems (path TEXT NOT NULL, reason TEXT NOT NULL, since REAL NOT NULL,
    PRIMARY KEY (path, reason)) WITHOUT ROWID;
"""

_VERSION = 1  # PRAGMA user_version; 0: a journal from before it was stamped, upgraded in place


def _schema_columns(schema: str) -> dict[str, set[str]]:
    with contextlib.closing(sqlite3.connect(":memory:")) as db:
        db.executescript(schema)
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {table: {row[1] for row in db.execute(f"PRAGMA table_info({table})")} for table in tables}


_COLUMNS = _schema_columns(_SCHEMA)
_ADDED_LATER = {"ctime_ns", "alone", "set_aside", "output_identity", "stale_since"}  # added (or renamed) by upgrades


class JournalWriteError(OutputError):
    """The state folder's filesystem is full (or failing) and refused a journal write: the transaction was
    rolled back, so the daemon can wait for space and try again. A read-only or unopenable journal stays
    an OutputError: a configuration to fix, not to wait out."""


class Seen(Enum):
    """What an observation of a file in the inbox means."""

    NEW = "new"  # no active row: one was created
    CHANGED = "changed"  # size or ctime differ from the active row: settling restarts
    UNCHANGED = "unchanged"
    DONE_BEFORE = "done_before"  # this very file was processed; only its move is left
    FAILED_BEFORE = "failed_before"  # this very file failed; only its move to failed/ is left


@dataclass(frozen=True)
class Entry:
    """An active row, as the daemon needs it."""

    id: int
    path: str
    size: int
    ctime_ns: int
    attempts: int
    interrupted: int
    first_seen: float


@dataclass(frozen=True)
class Result:
    """A finished row (done or failed)."""

    id: int
    path: str
    state: str
    sha256: str | None
    size: int
    ctime_ns: int
    attempts: int
    interrupted: int
    error: str | None
    traceback_digest: str | None
    model_id: str | None
    output: str | None
    finished: float
    first_seen: float


@dataclass(frozen=True)
class Completed:
    """A successful output, to be recorded as done."""

    entry_id: int
    sha256: str
    size: int
    ctime_ns: int
    model_id: str
    output: str
    metrics: dict | None
    output_identity: str | None = None


@dataclass(frozen=True)
class DoneVersion:
    """A done row of some content, with what its output was when written (None: not recorded)."""

    id: int
    output: str
    output_identity: str | None


@dataclass
class Status:
    """What ``batchsr status`` shows."""

    journal: Path
    counts: dict[str, int]
    queue: int
    done_last_hour: int
    oldest_queued_s: float | None
    errors: list[dict] = field(default_factory=list)
    daemon: str | None = None  # the lock holder line, when a daemon holds the state folder
    inbox_problems: list[dict] = field(default_factory=list)  # what the last scan could not look into or follow

    @property
    def images_per_minute(self) -> float:
        return self.done_last_hour / 60.0

    def as_dict(self) -> dict:
        return {
            "journal": str(self.journal),
            "daemon": self.daemon,
            "queue": self.queue,
            "counts": self.counts,
            "done_last_hour": self.done_last_hour,
            "images_per_minute_last_hour": round(self.images_per_minute, 3),
            "oldest_queued_s": None if self.oldest_queued_s is None else round(self.oldest_queued_s, 1),
            "errors": self.errors,
            "inbox_problems": self.inbox_problems,
        }


def _is_storage_error(exc: sqlite3.OperationalError) -> bool:
    """Full disk or quota, read-only or failing storage: the folder's fault, not a bug."""
    text = str(exc).lower()
    return any(words in text for words in ("full", "readonly", "read-only", "disk i/o", "unable to open"))


def full_or_failing(exc: sqlite3.OperationalError) -> bool:
    """A write refused by a full (or failing) disk: space to free, not permissions to mend."""
    return any(words in str(exc).lower() for words in ("full", "disk i/o"))


def _storage_error(path: Path, exc: sqlite3.OperationalError) -> OutputError:
    """Full (or failing) storage is waited out; read-only storage or an unopenable file is reported."""
    if full_or_failing(exc):
        return JournalWriteError(f"cannot write the journal {path}: {exc} (free space in the state folder)")
    return OutputError(f"cannot write the journal {path}: {exc} (check the state folder's permissions and mount)")


_NEW_JOURNAL = "a new journal knows no earlier output: `run` then needs --force to replace those on disk"


_SAID_EMPTY: set[str] = set()  # empty journals warned about in this process


def open_journal(path: Path, **options) -> sqlite3.Connection:
    """Connects to the SQLite file at ``path``, made first with the umask's mode (SQLite's own 0644 kept
    a group-shared folder's journal, and its -wal file, from the group). An empty file found there (emptied,
    or made by a start killed at once) is said: it knows no earlier output."""
    with contextlib.suppress(OSError):
        if os.stat(path).st_size == 0 and _size_or_zero(Path(f"{path}-wal")) == 0 and str(path) not in _SAID_EMPTY:
            _SAID_EMPTY.add(str(path))  # once: a daemon waiting out a full disk at its first start opens it again
            logger.warning("the journal {} is an empty file: it knows no earlier output (`run` replaces none without "
                           "--force)", path)
    with contextlib.suppress(OSError):  # an error here is SQLite's to report
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT, 0o666))
    return sqlite3.connect(path, **options)


def _size_or_zero(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def check_layout(db: sqlite3.Connection, path: Path, version: int, table: str, core: set[str]) -> int:
    """Refuses, before anything is written to it (WAL mode included), a journal this version cannot read: one
    stamped by a later version, or a database without the ``table`` of batchsr's or its ``core`` columns
    (another program's, or changed by hand). Exit 73, as a damaged one: a new journal knows no earlier
    output, so that is the user's choice to make. Returns the version found (0: from before the stamp)."""
    found = db.execute("PRAGMA user_version").fetchone()[0]
    if found > version:
        raise OutputError(f"the journal {path} was written by a later version of batchsr (journal version {found}; "
                          f"this one reads up to {version}): upgrade batchsr, or move the journal aside and start "
                          f"again ({_NEW_JOURNAL})")
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if tables and table not in tables:
        raise unknown_journal(path, f"no table {table!r}")
    if table in tables:
        check_columns(db, path, table, core)
    return found


def check_columns(db: sqlite3.Connection, path: Path, table: str, columns: set[str]) -> None:
    """Refuses a journal whose ``table`` lacks a column this version reads (after its own upgrades)."""
    missing = columns - {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
    if missing:
        raise unknown_journal(path, f"table {table!r} has no column {', '.join(sorted(missing))}")


def unknown_journal(path: Path, why: str) -> OutputError:
    return OutputError(f"the journal {path} is not one this version of batchsr knows ({why}); move it aside and "
                       f"start again ({_NEW_JOURNAL})")


def damaged_journal(path: Path, exc: sqlite3.DatabaseError) -> OutputError:
    """A journal that is not a database (or a damaged one): the state folder's problem (exit 73), not a bug."""
    return OutputError(f"the journal {path} is damaged ({exc}); move it aside and start again ({_NEW_JOURNAL})")


def _entry(row) -> Entry:
    return Entry(*row)


_ENTRY_COLUMNS = "id, path, size, ctime_ns, attempts, interrupted, first_seen"
_RESULT_COLUMNS = (
    "id, path, state, sha256, size, ctime_ns, attempts, interrupted, error, traceback_digest, model_id, output, finished, first_seen"
)


class WatchJournal:
    """The daemon's only connection; used from one thread."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = open_journal(self.path, timeout=30, isolation_level=None)
        try:
            self.version = check_layout(self.db, self.path, _VERSION, "files", _COLUMNS["files"] - _ADDED_LATER)
            self.db.execute("PRAGMA journal_mode=WAL")
        except OutputError:
            self.db.close()
            raise
        except sqlite3.OperationalError as exc:  # a full disk at start-up: the same error as for any write
            self.db.close()
            if not _is_storage_error(exc):
                raise
            raise _storage_error(self.path, exc) from None
        except sqlite3.DatabaseError as exc:
            self.db.close()
            raise damaged_journal(self.path, exc) from None
        self.db.execute("PRAGMA synchronous=FULL")  # a committed 'done' survives power loss, not only a crash
        try:
            self._upgrade()
        except OutputError:
            self.db.close()
            raise

    def _upgrade(self) -> None:
        """Creates the tables, or brings an earlier version's up to date, and stamps the version."""
        with self._transaction() as db:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                db.execute(statement)
            columns = {row[1] for row in db.execute("PRAGMA table_info(files)")}
            if "mtime_ns" in columns:  # a journal from before ctime: a file whose ctime passed its mtime is
                db.execute("ALTER TABLE files RENAME COLUMN mtime_ns TO ctime_ns")  # hashed once again
            for column in ("alone", "set_aside"):  # a journal from before them
                if column not in columns:
                    db.execute(f"ALTER TABLE files ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")
            if "output_identity" not in columns:
                db.execute("ALTER TABLE files ADD COLUMN output_identity TEXT")
            if "stale_since" not in columns:
                db.execute("ALTER TABLE files ADD COLUMN stale_since REAL")
            for table, names in _COLUMNS.items():
                check_columns(db, self.path, table, names)
            if self.version != _VERSION:  # written once: a journal only read (nothing new) needs no write
                db.execute(f"PRAGMA user_version = {_VERSION}")

    @contextmanager
    def _transaction(self):
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if not _is_storage_error(exc):
                raise
            raise _storage_error(self.path, exc) from None
        except sqlite3.DatabaseError as exc:
            if type(exc) is not sqlite3.DatabaseError:  # an integrity error...: a bug
                raise
            raise damaged_journal(self.path, exc) from None

    def close(self) -> None:
        self.db.close()

    # -- observing the inbox ------------------------------------------------

    def observe(self, files: list[tuple[str, int, int]], now: float) -> list[tuple[str, Seen]]:
        """Records ``(path, size, ctime_ns)`` observations; says what each one means."""
        outcomes = []
        with self._transaction() as db:
            for path, size, ctime_ns in files:
                active = db.execute(
                    "SELECT id, size, ctime_ns FROM files WHERE path = ? AND state IN ('seen', 'ready', 'claimed')", (path,)
                ).fetchone()
                if active is not None:
                    if (active[1], active[2]) == (size, ctime_ns):
                        outcomes.append((path, Seen.UNCHANGED))
                        continue
                    db.execute(
                        "UPDATE files SET state = 'seen', size = ?, ctime_ns = ?, changed = ?, ready_since = NULL, sha256 = NULL, "
                        "attempts = 0, interrupted = 0, not_before = 0, error = NULL, traceback_digest = NULL, updated = ? WHERE id = ?",
                        (size, ctime_ns, now, now, active[0]),
                    )
                    outcomes.append((path, Seen.CHANGED))
                    continue
                last = db.execute(
                    "SELECT state, size, ctime_ns, set_aside FROM files WHERE path = ? AND state IN ('done', 'failed') "
                    "ORDER BY updated DESC, id DESC LIMIT 1",
                    (path,),
                ).fetchone()
                if last is not None and (last[1], last[2]) == (size, ctime_ns) and not last[3]:
                    outcomes.append((path, Seen.DONE_BEFORE if last[0] == "done" else Seen.FAILED_BEFORE))
                    continue
                db.execute(
                    "INSERT INTO files (path, state, size, ctime_ns, first_seen, changed, updated) VALUES (?, 'seen', ?, ?, ?, ?, ?)",
                    (path, size, ctime_ns, now, now, now),
                )
                outcomes.append((path, Seen.NEW))
        return outcomes

    def vanish(self, paths: list[str]) -> int:
        """Forgets active rows whose file left the inbox before it was processed."""
        with self._transaction() as db:
            return sum(
                db.execute("DELETE FROM files WHERE path = ? AND state IN ('seen', 'ready', 'claimed')", (p,)).rowcount for p in paths
            )

    def set_inbox_problems(self, problems: set[tuple[str, str]], now: float) -> None:
        """Records ``(path, reason)`` of what the scan skipped; those mended are dropped, the others keep their time.
        A name that is not UTF-8 is kept with its odd bytes escaped (SQLite takes text only)."""
        problems = {(os.fsencode(path).decode("utf-8", "backslashreplace"), reason) for path, reason in problems}
        with self._transaction() as db:
            old = set(db.execute("SELECT path, reason FROM inbox_problems"))
            db.executemany("DELETE FROM inbox_problems WHERE path = ? AND reason = ?", sorted(old - problems))
            db.executemany("INSERT INTO inbox_problems (path, reason, since) VALUES (?, ?, ?)",
                           [(path, reason, now) for path, reason in sorted(problems - old)])

    def active_paths(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT path FROM files WHERE state IN ('seen', 'ready', 'claimed')")}

    def settling(self, changed_before: float) -> list[Entry]:
        """Seen rows whose size and ctime have not changed since ``changed_before``."""
        rows = self.db.execute(f"SELECT {_ENTRY_COLUMNS} FROM files WHERE state = 'seen' AND changed <= ? ORDER BY changed, id", (changed_before,))
        return [_entry(r) for r in rows]

    def next_settle_time(self) -> float | None:
        row = self.db.execute("SELECT MIN(changed) FROM files WHERE state = 'seen'").fetchone()
        return row[0]

    def mark_ready(self, ids: list[int], now: float) -> None:
        with self._transaction() as db:
            db.executemany("UPDATE files SET state = 'ready', ready_since = ?, updated = ? WHERE id = ? AND state = 'seen'", [(now, now, i) for i in ids])

    def restart_settling(self, changes: list[tuple[int, int, int]], now: float) -> None:
        """``(id, size, ctime_ns)``: the file is still changing; back to seen, from now."""
        with self._transaction() as db:
            db.executemany(
                "UPDATE files SET state = 'seen', size = ?, ctime_ns = ?, changed = ?, ready_since = NULL, sha256 = NULL, "
                "attempts = 0, interrupted = 0, alone = 0, not_before = 0, updated = ? WHERE id = ? AND state IN ('seen', 'ready', 'claimed')",
                [(size, ctime_ns, now, now, i) for i, size, ctime_ns in changes],
            )

    def clamp_future(self, now: float) -> None:
        """After the wall clock stepped back: times ahead of ``now`` become ``now``, so that
        settling, back-off and waiting are not stretched by the size of the step."""
        with self._transaction() as db:
            for column in ("changed", "ready_since", "not_before", "first_seen"):
                db.execute(f"UPDATE files SET {column} = ? WHERE {column} > ? AND state IN ('seen', 'ready', 'claimed')", (now, now))

    def forget(self, ids: list[int]) -> None:
        with self._transaction() as db:
            db.executemany("DELETE FROM files WHERE id = ? AND state IN ('seen', 'ready', 'claimed')", [(i,) for i in ids])

    # -- the queue --------------------------------------------------------------

    def queue_head(self, now: float) -> tuple[int, float | None]:
        """Ready rows whose back-off has passed, and the oldest one's ready time."""
        count, oldest = self.db.execute(
            "SELECT COUNT(*), MIN(MAX(ready_since, not_before)) FROM files WHERE state = 'ready' AND not_before <= ?", (now,)
        ).fetchone()
        return count, oldest

    def next_retry_time(self) -> float | None:
        return self.db.execute("SELECT MIN(not_before) FROM files WHERE state = 'ready'").fetchone()[0]

    def claim(self, limit: int, now: float) -> list[Entry]:
        """The next batch: up to ``limit`` queued rows, or one row alone while any must go alone."""
        with self._transaction() as db:
            order = "ORDER BY MAX(ready_since, not_before), id LIMIT ?"
            rows = db.execute(
                f"SELECT {_ENTRY_COLUMNS} FROM files WHERE state = 'ready' AND not_before <= ? AND alone = 1 {order}", (now, 1)
            ).fetchall() or db.execute(
                f"SELECT {_ENTRY_COLUMNS} FROM files WHERE state = 'ready' AND not_before <= ? AND alone = 0 {order}", (now, limit)
            ).fetchall()
            db.executemany("UPDATE files SET state = 'claimed', updated = ? WHERE id = ?", [(now, r[0]) for r in rows])
        return [_entry(r) for r in rows]

    def recover_claims(self, now: float, *, blame: bool = True) -> list[Entry]:
        """After a crash: claimed rows go back to the queue, to be processed one at a time.

        Only a file that was processed alone when the daemon died is charged an
        interrupted try: the batch-mates of a crashing file are not at fault;
        with ``blame`` off (the daemon was stopped on purpose) none is.
        """
        with self._transaction() as db:
            rows = db.execute(f"SELECT {_ENTRY_COLUMNS} FROM files WHERE state = 'claimed'").fetchall()
            charge = 1 if blame and len(rows) == 1 else 0
            db.execute(  # suspects go one at a time; a batch stopped on purpose is no suspect
                "UPDATE files SET state = 'ready', interrupted = interrupted + ?, alone = CASE WHEN ? THEN 1 ELSE alone END, "
                "not_before = 0, updated = ? WHERE state = 'claimed'", (charge, blame, now),
            )
        return [Entry(r[0], r[1], r[2], r[3], r[4], r[5] + charge, r[6]) for r in rows]

    # -- outcomes -----------------------------------------------------------------

    def note_metrics_rows(self, keys: list[tuple[str, str]]) -> bool:
        """Records that the metrics CSV holds (or is about to hold) rows of these (image, content) keys,
        before they are written; True when one was recorded before: its row may be there already."""
        with self._transaction() as db:
            before = any(db.execute("SELECT 1 FROM metrics_rows WHERE image = ? AND sha256 = ?", key).fetchone() for key in keys)
            db.executemany("INSERT OR IGNORE INTO metrics_rows (image, sha256) VALUES (?, ?)", keys)
        return before

    def has_metrics_rows(self) -> bool:
        return self.db.execute("SELECT 1 FROM metrics_rows LIMIT 1").fetchone() is not None

    def done_with_content(self, path: str, sha256: str) -> DoneVersion | None:
        """The done row of this content, unless a later version is recorded done over its output.

        A version that wrote the output without reaching done is not recorded: the caller compares the
        output on disk with ``output_identity``.
        """
        row = self.db.execute(
            "SELECT id, output, output_identity FROM files AS d WHERE path = ? AND sha256 = ? AND state = 'done' AND NOT EXISTS ("
            "SELECT 1 FROM files AS later WHERE later.state = 'done' AND later.output = d.output AND later.id != d.id "
            "AND (later.finished > d.finished OR (later.finished = d.finished AND later.id > d.id)))",
            (path, sha256),
        ).fetchone()
        return DoneVersion(*row) if row else None

    def absorb_duplicate(self, entry_id: int, done_id: int, size: int, ctime_ns: int, now: float) -> None:
        """The file is identical to a version already done: no new row, the old one now describes it."""
        with self._transaction() as db:
            db.execute("DELETE FROM files WHERE id = ? AND state IN ('seen', 'ready', 'claimed')", (entry_id,))
            db.execute("UPDATE files SET size = ?, ctime_ns = ?, updated = ? WHERE id = ?", (size, ctime_ns, now, done_id))

    def complete(self, results: list[Completed], now: float) -> set[int]:
        """Marks claimed rows done; returns the ids that were still claimed (not changed meanwhile)."""
        completed = set()
        with self._transaction() as db:
            for r in results:
                db.execute(
                    "DELETE FROM files WHERE path = (SELECT path FROM files WHERE id = ?) AND sha256 = ? AND state IN ('done', 'failed') AND id != ?",
                    (r.entry_id, r.sha256, r.entry_id),
                )
                # Later than any other done over the same output even when the clock was set back meanwhile:
                # which version the output on disk stands for is decided by this order.
                cursor = db.execute(
                    "UPDATE files SET state = 'done', sha256 = ?, size = ?, ctime_ns = ?, model_id = ?, output = ?, output_identity = ?, "
                    "metrics = ?, error = NULL, traceback_digest = NULL, updated = ?, finished = MAX(?, COALESCE(("
                    "SELECT MAX(finished) + 0.001 FROM files WHERE state = 'done' AND output = ? AND id != ?), ?)) "
                    "WHERE id = ? AND state = 'claimed'",
                    (r.sha256, r.size, r.ctime_ns, r.model_id, r.output, r.output_identity, json.dumps(r.metrics) if r.metrics else None,
                     now, now, r.output, r.entry_id, now, r.entry_id),
                )
                if cursor.rowcount:
                    completed.add(r.entry_id)
        return completed

    def unclaim(self, entry_ids: list[int], now: float) -> None:
        """Back to the queue untried, in their place (a batch too large to hold decoded at once)."""
        with self._transaction() as db:
            db.executemany("UPDATE files SET state = 'ready', updated = ? WHERE id = ? AND state = 'claimed'",
                           [(now, entry_id) for entry_id in entry_ids])

    def retry_later(self, entry_id: int, *, attempts: int, error: str, digest: str | None, not_before: float, now: float) -> None:
        """Back to the queue after ``not_before``; ``attempts`` is the new count of failed tries."""
        with self._transaction() as db:
            db.execute(
                "UPDATE files SET state = 'ready', attempts = ?, error = ?, traceback_digest = ?, not_before = ?, updated = ? "
                "WHERE id = ? AND state IN ('claimed', 'ready')",
                (attempts, error, digest, not_before, now, entry_id),
            )

    def fail(self, entry_id: int, *, sha256: str | None, attempts: int, error: str, digest: str | None, now: float) -> Result | None:
        """Marks a row failed for good; returns it, or None when it changed meanwhile."""
        with self._transaction() as db:
            if sha256 is not None:
                db.execute(
                    "DELETE FROM files WHERE path = (SELECT path FROM files WHERE id = ?) AND sha256 = ? AND state IN ('done', 'failed') AND id != ?",
                    (entry_id, sha256, entry_id),
                )
            cursor = db.execute(
                "UPDATE files SET state = 'failed', sha256 = COALESCE(?, sha256), attempts = ?, error = ?, traceback_digest = ?, "
                "finished = ?, updated = ? WHERE id = ? AND state IN ('claimed', 'ready')",
                (sha256, attempts, error, digest, now, now, entry_id),
            )
            if not cursor.rowcount:
                return None
            row = db.execute(f"SELECT {_RESULT_COLUMNS} FROM files WHERE id = ?", (entry_id,)).fetchone()
        return Result(*row)

    def output_owner(self, output: str) -> str | None:
        """The input whose finished output ``output`` is (the latest, should there be several)."""
        row = self.db.execute(
            "SELECT path FROM files WHERE output = ? AND state = 'done' ORDER BY updated DESC, id DESC LIMIT 1", (output,)
        ).fetchone()
        return row[0] if row else None

    def mark_set_aside(self, entry_id: int) -> None:
        """The failed file is in failed/: should it come back, that is a request to try again."""
        with self._transaction() as db:
            db.execute("UPDATE files SET set_aside = 1 WHERE id = ? AND state = 'failed'", (entry_id,))

    def forget_finished(self, before: float, in_inbox: Callable[[str, int, int], bool],
                        output_on_disk: Callable[[str, str | None], bool], now: float, *, confirm_s: float = 72000.0,
                        after_id: int = 0, limit: int = 500) -> tuple[int, int]:
        """Forgets finished rows from before ``before`` that no longer stand for anything, so the journal
        of a daemon running for years does not grow with every file it ever saw.

        A row stands while its file is still in the inbox as recorded (``in_inbox(path, size, ctime_ns)``:
        ``done_policy: keep``, or a move not yet made), and a done row while its output is on disk as its
        version wrote it (``output_on_disk(output, identity)``): it protects that output's name and
        recognises the same content dropped again. A row found standing for nothing is forgotten only when
        found so again ``confirm_s`` later: an inbox or output not mounted yet looks empty once. Looks at up
        to ``limit`` rows after ``after_id``; returns the last id looked at (0 once past the end) and the
        count forgotten.
        """
        rows = self.db.execute(
            "SELECT id, path, size, ctime_ns, state, output, output_identity, stale_since, EXISTS (SELECT 1 FROM files AS later "
            "WHERE later.state = 'done' AND later.output = d.output AND later.id != d.id AND (later.finished > d.finished "
            "OR (later.finished = d.finished AND later.id > d.id))) FROM files AS d "
            "WHERE id > ? AND state IN ('done', 'failed') AND finished < ? ORDER BY id LIMIT ?",
            (after_id, before, limit),
        ).fetchall()
        forget, mark, standing = [], [], []
        for row_id, path, size, ctime_ns, state, output, identity, stale_since, superseded in rows:
            stale = not in_inbox(path, size, ctime_ns) and (
                state == "failed" or superseded or output is None or not output_on_disk(output, identity))
            if not stale:
                if stale_since is not None:
                    standing.append(row_id)
            elif stale_since is None:
                mark.append(row_id)
            elif stale_since <= now - confirm_s:
                forget.append(row_id)
        if forget or mark or standing:
            with self._transaction() as db:
                db.executemany("DELETE FROM files WHERE id = ? AND state IN ('done', 'failed') AND finished < ?",
                               [(i, before) for i in forget])
                db.executemany("UPDATE files SET stale_since = ? WHERE id = ?", [(now, i) for i in mark])
                db.executemany("UPDATE files SET stale_since = NULL WHERE id = ?", [(i,) for i in standing])
        return (rows[-1][0] if len(rows) == limit else 0), len(forget)

    def last_result(self, path: str) -> Result | None:
        row = self.db.execute(
            f"SELECT {_RESULT_COLUMNS} FROM files WHERE path = ? AND state IN ('done', 'failed') ORDER BY updated DESC, id DESC LIMIT 1", (path,)
        ).fetchone()
        return Result(*row) if row else None

    # -- reporting ------------------------------------------------------------------

    def progress(self, now: float) -> tuple[int, int]:
        """Files queued, and done in the last hour: read from the indexes in time that does not grow with history."""
        queued = self.db.execute("SELECT COUNT(*) FROM files WHERE state IN ('seen', 'ready', 'claimed')").fetchone()[0]
        return queued, _done_since(self.db, now - 3600)

    def status(self, now: float, errors: int = 10) -> Status:
        return _status(self.db, self.path, now, errors)


def _done_since(db: sqlite3.Connection, since: float) -> int:
    # "+state": through the index on finished, not every done row of the journal's history
    return db.execute("SELECT COUNT(*) FROM files WHERE +state = 'done' AND finished >= ?", (since,)).fetchone()[0]


def _status(db: sqlite3.Connection, path: Path, now: float, errors: int) -> Status:
    counts = dict.fromkeys(STATES, 0)
    counts.update(dict(db.execute("SELECT state, COUNT(*) FROM files GROUP BY state").fetchall()))
    done_last_hour = _done_since(db, now - 3600)
    oldest = db.execute("SELECT MIN(first_seen) FROM files WHERE state IN ('seen', 'ready', 'claimed')").fetchone()[0]
    rows = db.execute(
        "SELECT path, state, error, attempts, traceback_digest, updated FROM files WHERE error IS NOT NULL ORDER BY updated DESC, id DESC LIMIT ?",
        (errors,),
    ).fetchall()
    recent = [
        {
            "file": file,
            "state": "failed" if state == "failed" else "retrying",
            "error": error,
            "attempts": attempts,
            "traceback_digest": digest,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(updated)),
        }
        for file, state, error, attempts, digest, updated in rows
    ]
    problems = []
    if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'inbox_problems'").fetchone():  # older daemons
        problems = [{"path": path, "reason": reason, "since": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(since))}
                    for path, reason, since in db.execute("SELECT path, reason, since FROM inbox_problems ORDER BY path, reason")]
    return Status(
        journal=path,
        counts=counts,
        queue=sum(counts[s] for s in ACTIVE),
        done_last_hour=done_last_hour,
        oldest_queued_s=None if oldest is None else max(0.0, now - oldest),
        errors=recent,
        inbox_problems=problems,
    )


def read_status(state_dir: Path, errors: int = 10) -> Status:
    """The journal's status, read-only, while a daemon may be writing it."""
    path = Path(state_dir) / JOURNAL_FILE
    try:
        found = path.is_file()
    except OSError as exc:  # a state folder closed to others than the daemon's user
        raise InputError(f"cannot look at the journal {path}: {exc.strerror or exc} (run status as the daemon's user, "
                         "or give its group read access to the state folder)") from None
    if not found:
        raise InputError(f"no journal at {path}: has `batchsr watch` run with this state folder?")
    try:
        status = _read_status(path, errors, immutable=False)
    except sqlite3.OperationalError:
        # A WAL journal closed cleanly has no -wal file, and SQLite would make one (with -shm) to read it: a
        # state folder or file system this user cannot write refuses that.  Nothing is pending then, so the
        # file is read as it stands.
        status = _read_status(path, errors, immutable=True)
    status.daemon = lock_holder(Path(state_dir) / LOCK_FILE)
    return status


def _read_status(path: Path, errors: int, *, immutable: bool) -> Status:
    """Raises sqlite3.OperationalError only where a plain read fails with no -wal file beside the journal (the
    caller then reads it ``immutable``); every other error is an InputError."""
    uri = f"file:{pathname2url(str(path.absolute()))}?mode=ro" + ("&immutable=1" if immutable else "")
    try:
        db = sqlite3.connect(uri, uri=True, timeout=30)
    except sqlite3.Error as exc:
        raise InputError(f"cannot open the journal {path}: {exc}") from None
    try:
        found = db.execute("PRAGMA user_version").fetchone()[0]
        if found > _VERSION:
            raise InputError(f"the journal {path} was written by a later version of batchsr (journal version {found}; "
                             f"this one reads up to {_VERSION}): run the status command of the daemon's version")
        return _status(db, path, time.time(), errors)
    except sqlite3.OperationalError as exc:
        if not immutable and not os.path.lexists(f"{path}-wal"):
            raise
        raise InputError(f"cannot read the journal {path}: {exc}") from None
    except sqlite3.Error as exc:
        raise InputError(f"cannot read the journal {path}: {exc}") from None
    finally:
        db.close()
