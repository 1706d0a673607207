"""One writer per folder: a kernel ``flock`` that the OS releases when the holder dies."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import sys
from pathlib import Path

from batchsr.errors import LockedError, OutputError


DAEMON = "(watch daemon)"  # in the line a daemon's lock holds: what another process waits for, or not
_COMMANDS = {"run", "watch", "train", "eval", "status", "config"}
_VALUED = {"--config", "--log-level"}  # the options before the subcommand that take a value


def held_by_daemon(holder: str) -> bool:
    """Whether a lock's line ("pid N: command") is a watch daemon's: marked ``DAEMON``, or, written by a
    version from before the mark, a command whose subcommand is ``watch``."""
    if DAEMON in holder:
        return True
    words = holder.partition(": ")[2].split()[1:]
    for before, word in zip([""] + words, words):
        if word in _COMMANDS and before not in _VALUED:  # not the value of an option: --config watch
            return word == "watch"
    return False


class FolderLock:
    def __init__(self, path: Path, role: str = ""):
        self.path = Path(path)
        self.role = role  # written after the pid: DAEMON for the watch daemon
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:  # the umask decides who else may take it: a group-shared folder (umask 002) stays shared
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except PermissionError:  # another user's lock file: flock needs no write access (the line goes unsaid)
                if not self.path.is_file():
                    raise
                fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:  # a full disk, a read-only or foreign folder: the user's to fix, not a bug
            raise OutputError(f"cannot create the lock {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = current_line(self.path, os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()) or "unknown process"
            os.close(fd)
            raise LockedError(f"{self.path.parent} is in use by another batchsr process ({holder})") from None
        command = " ".join(sys.argv)  # whole: with --config first, the subcommand comes after it
        role = f" {self.role}" if self.role else ""
        try:  # who holds it, for the messages of others; a full disk leaves it unsaid, not the lock untaken
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}{role}: {command[:300]}\n".encode("utf-8", "backslashreplace"), 0)
        except OSError:
            pass
        self._fd = fd
        return self

    def holder(self) -> str | None:
        """The line the process holding the lock wrote ("pid N: command"), if any."""
        try:
            with open(self.path, "rb") as handle:
                line = handle.read(4096).decode("utf-8", "replace").strip()
        except OSError:
            return None
        return current_line(self.path, line) or None

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class InboxLock:
    """One daemon per inbox: a ``flock`` on the folder itself, so nothing is written into it.

    Two daemons with their own state and output folders on one inbox would each
    process every file. Where the filesystem has no such locks (some network
    mounts), the daemon goes on without this one.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    def __enter__(self) -> "InboxLock":
        from loguru import logger

        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockedError(f"{self.path} is already watched by another batchsr daemon; give each daemon its own inbox") from None
        except OSError as exc:
            os.close(fd)
            logger.warning("cannot lock the inbox {} ({}): make sure no other daemon watches it", self.path, exc.strerror or exc)
            return self
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Lets the folder go: held open, a deleted inbox stays pinned and a mounted one cannot be unmounted."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def relock(self) -> None:
        """Locks the folder now at the path (the one locked was deleted, or unmounted and mounted again):
        a lock on the old one would let a second daemon watch the new one."""
        self.release()
        self.__enter__()


def check_not_held(lock_path: Path) -> None:
    """``LockedError`` naming the holder when another process holds the lock now: a start asks before its
    seconds of imports (a run every few minutes behind a long one paid them at each tick, to exit 75). Read
    from ``/proc/locks``, not by taking the lock: a probe could fail another start in that instant. What it
    cannot see (a lock of another NFS client) taking the lock finds."""
    holder = lock_holder(Path(lock_path))
    if holder is not None and not holder.startswith("unknown:"):
        raise LockedError(f"{Path(lock_path).parent} is in use by another batchsr process ({holder})")


def lock_is_free(lock_path: Path) -> bool:
    """Whether no process holds the lock now, found by taking it for an instant (a lock held on another NFS
    client or from another PID namespace is missing from /proc/locks); any doubt (the file unreadable) is no.
    A run starting into that folder in the very instant finds it taken (exit 75), so only start-ups use it."""
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)  # lets the lock go at once
    return True


def lock_holder(lock_path: Path) -> str | None:
    """The line the lock file's holder wrote, if a process holds it now.

    Read from ``/proc/locks`` rather than by trying the lock: a probe could make
    a daemon that starts at that instant fail.
    """
    try:
        pids = _holders(lock_path)
    except FileNotFoundError:
        return None
    except OSError as exc:  # a state folder of the daemon's user, closed to others
        return f"unknown: cannot look at {lock_path} ({exc.strerror or exc})"
    if not pids:
        return None
    try:
        return _named(lock_path.read_text(encoding="utf-8", errors="replace").strip(), pids) or "unknown process"
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"running (its line in {lock_path} cannot be read: {exc.strerror or exc})"


def current_line(lock_path: Path, line: str) -> str:
    """``line`` (the lock file's "pid N: command") when pid N holds the lock now, as /proc/locks tells; else the
    holder's own command, from /proc. A holder that could not write its line (another user's lock file, opened
    read-only) left an earlier holder's there: a dead daemon's line made a start refuse, not wait for a run."""
    try:
        return _named(line, _holders(lock_path))
    except OSError:
        return line


def _holders(lock_path: Path) -> list[str]:
    """The pids /proc/locks shows holding a flock on the lock file, lowest first."""
    info = os.stat(lock_path)
    with open("/proc/locks", encoding="ascii", errors="replace") as handle:
        return sorted({entry.split()[4] for entry in handle if names_inode(entry, info)}, key=int)


def _named(line: str, pids: list[str]) -> str:
    """``line`` when one of ``pids`` wrote it (or none is known), else the first holder's command from /proc."""
    written = re.match(r"pid (\d+)\b", line)
    if not pids or (written is not None and written.group(1) in pids):  # not seen here (NFS), or its own line
        return line
    try:
        command = Path(f"/proc/{pids[0]}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        command = ""
    return f"pid {pids[0]}: {command[:300] or 'command unknown'}"


def names_inode(line: str, info: os.stat_result) -> bool:
    """Whether a /proc/locks line is a flock on the file of ``info``. On a btrfs subvolume stat names another
    anonymous device (major 0) than /proc/locks does (a daemon running was said not to): there the inode and
    the holder having that very file open decide (tmpfs instances number their inodes alike)."""
    fields = line.split()
    if len(fields) < 6 or fields[1] != "FLOCK":
        return False
    if fields[5] == f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}":
        return True
    return (os.major(info.st_dev) == 0 and fields[5].startswith("00:") and fields[5].rsplit(":", 1)[-1] == str(info.st_ino)
            and _has_open(fields[4], info))


def _has_open(pid: str, info: os.stat_result) -> bool:
    try:
        descriptors = os.listdir(f"/proc/{pid}/fd")
    except OSError:  # gone, or another user's: not known to hold it
        return False
    for fd in descriptors:
        with contextlib.suppress(OSError):
            if os.path.samestat(os.stat(f"/proc/{pid}/fd/{fd}"), info):
                return True
    return False
