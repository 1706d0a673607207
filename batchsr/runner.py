"""Archive mode: upscale every image of a folder tree once, resumably.

Per output folder, ``.batchsr/`` holds a lock (one writer at a time) and an
SQLite journal of what was produced from which input content by which model,
so a re-run skips finished images and a crash loses at most the images in
flight.  Outputs are written atomically; inputs are never modified.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import os
import re
import shutil
import sqlite3
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePath, PurePosixPath

import numpy as np
from loguru import logger

from batchsr.checkpoint import ModelInfo, file_sha256, model_weights, read_info
from batchsr.config import Settings
from batchsr.errors import ConfigError, ImageError, InputError, ModelError, OutputError
from batchsr.imageio import (
    NO_ALPHA, STATE_DIR, Image, atomic_write, decode_image, encode_image, make_folders, mode_like, read_bounded, read_image,
    remove_temporaries, sniff_file, sniff_format, to_uint8,
)
from batchsr.journal import check_layout, damaged_journal, full_or_failing, open_journal
from batchsr.lock import FolderLock
from batchsr.metrics import score
from batchsr.pipeline import (
    IMAGE_SUFFIXES, SUFFIX_FORMATS, MemoryBudget, failure_reason, finish_image, output_name, process_rss_mb, target_format,
    upscale_each, write_streamed,
)
from batchsr.report import ReportImage, write_report
from batchsr.resize import imresize

METRICS_FILE = "metrics.csv"
METRIC_COLUMNS = [
    "image", "width", "height", "scale", "model_id",
    "psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb",
    "bicubic_psnr_y", "bicubic_ssim_y", "bicubic_psnr_rgb", "bicubic_ssim_rgb",
    "gain_psnr_y", "ms",
]


@dataclass
class Failure:
    path: Path | str  # a str for an input on another Beam filesystem (gs://, s3://, ...)
    reason: str


@dataclass
class RunSummary:
    done: int = 0
    skipped: int = 0
    ignored: int = 0
    failed: list[Failure] = field(default_factory=list)
    waiting: int = 0  # changed within run.min_age_s: left for the next run
    seconds: float = 0.0
    megapixels: float = 0.0  # output megapixels written
    model_id: str = ""
    metrics_csv: Path | str | None = None  # a str for an OUTPUT on another Beam filesystem
    report: Path | None = None

    @property
    def throughput(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Item:
    path: Path
    rel: Path
    sha256: str = ""
    fingerprint: str | None = None  # see ``fingerprint``
    image: Image | None = None
    error: str | None = None
    skip: bool = False
    not_image: bool = False
    reference_now: str | None = None  # with ``rerecord``: the identity of its reference to record now
    rerecord: bool = False  # up to date, its reference's identity to record (a reference only touched since, ...)
    rescore: bool = False  # its output up to date, its scores to compute again from it (``_same_reference``)


def _owner_and_mode(path: Path) -> str:
    """Whose a file or folder is, for a message about it: state made by another user (sudo batchsr once) is the
    usual cause of a journal that cannot be opened or written."""
    try:
        info = os.stat(path)
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    try:
        import pwd

        owner = pwd.getpwuid(info.st_uid).pw_name
    except (KeyError, ImportError):
        owner = str(info.st_uid)
    return f"{path} is owned by {owner}, mode {info.st_mode & 0o7777:04o}; this process runs as uid {os.getuid()}"


_SQLITE_WRITE_ERRORS = {8, 10, 13}  # SQLITE_READONLY, SQLITE_IOERR, SQLITE_FULL: an extended code's low byte


_JOURNAL_VERSION = 1  # PRAGMA user_version; 0: a journal from before it was stamped, upgraded in place
_JOURNAL_COLUMNS = {"input", "sha256", "model_id", "output", "metrics", "updated", "options", "stat"}


class Journal:
    """What each input became: ``input -> (content hash, model id, output, metrics, output options)``."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = open_journal(path, check_same_thread=False)
        except sqlite3.OperationalError as exc:  # a state folder another user made (sudo batchsr once): not a bug
            raise OutputError(f"cannot open the journal {path}: {exc} ({_owner_and_mode(path.parent)}; check its "
                              "permissions)") from None
        try:
            found = check_layout(self.db, path, _JOURNAL_VERSION, "outputs", _JOURNAL_COLUMNS - {"options", "stat"})
            self.db.execute("PRAGMA journal_mode=WAL")
            columns = {row[1] for row in self.db.execute("PRAGMA table_info(outputs)")}
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS outputs (input TEXT PRIMARY KEY, sha256 TEXT NOT NULL, "
                "model_id TEXT NOT NULL, output TEXT NOT NULL, metrics TEXT, updated REAL NOT NULL, options TEXT, stat TEXT)"
            )
            for column in ("options", "stat"):  # a journal from before they were recorded
                if columns and column not in columns:
                    self.db.execute(f"ALTER TABLE outputs ADD COLUMN {column} TEXT")
            # Each record looks up the output's earlier owner: without it, a scan of the table per image
            self.db.execute("CREATE INDEX IF NOT EXISTS outputs_by_output ON outputs (output)")
            # Every output written (or about to be: one a crash left before its entry is known as batchsr's),
            # under any name an input had (a format changed and changed back): kept while the file is there
            self.db.execute("CREATE TABLE IF NOT EXISTS written (output TEXT PRIMARY KEY) WITHOUT ROWID")
            if found != _JOURNAL_VERSION:  # written once: a journal only read (nothing new) needs no write
                self.db.execute(f"PRAGMA user_version = {_JOURNAL_VERSION}")
            self.db.commit()
        except OutputError:
            self.db.close()
            raise
        except sqlite3.OperationalError as exc:
            self.db.close()
            if full_or_failing(exc):
                raise OutputError(f"cannot write the journal {path}: {exc} (the disk holding it may be full or failing: "
                                  "free some space there, or check the disk)") from None
            raise OutputError(f"cannot write the journal {path}: {exc} ({_owner_and_mode(path)}; check the permissions "
                              "of it and its folder, and the mount)") from None  # read-only, unopenable: the folder's to fix
        except sqlite3.DatabaseError as exc:
            self.db.close()
            raise damaged_journal(path, exc) from None

    def entries(self) -> dict[str, tuple[str, str, str, dict | None, str | None]]:
        with self._damage_named():
            rows = self.db.execute("SELECT input, sha256, model_id, output, metrics, options FROM outputs")
            return {r[0]: (r[1], r[2], r[3], json.loads(r[4]) if r[4] else None, r[5]) for r in rows}

    def outputs(self) -> set[str]:
        """Every output this journal knows as batchsr's: recorded, written under an earlier name, or about to be
        written when a run stopped."""
        with self._damage_named():
            return {row[0] for row in self.db.execute("SELECT output FROM outputs UNION SELECT output FROM written")}

    def intend(self, outputs: list[str]) -> None:
        """Marks outputs as batchsr's before they are written (see ``outputs``)."""
        with self._damage_named():
            self.db.executemany("INSERT OR IGNORE INTO written (output) VALUES (?)", [(o,) for o in outputs])
            self.db.commit()

    def forget_written(self, outputs: list[str]) -> None:
        with self._damage_named():
            self.db.executemany("DELETE FROM written WHERE output = ?", [(o,) for o in outputs])
            self.db.commit()

    def record(self, rel: str, sha256: str, model_id: str, output: str, metrics: dict | None, options: str | None = None,
               stat: str | None = None) -> None:
        """``stat``: the input's ``fingerprint`` when its content was read, if it may be trusted."""
        self.record_many([(rel, sha256, model_id, output, metrics, options, stat)])

    def record_many(self, rows: list[tuple]) -> None:
        """``record``'s rows in one transaction (a Beam job's results, recorded once it has ended)."""
        with self._damage_named():
            for rel, sha256, model_id, output, metrics, options, stat in rows:
                self._record(rel, sha256, model_id, output, metrics, options, stat)
            self.db.commit()

    def _record(self, rel, sha256, model_id, output, metrics, options, stat) -> None:
        self.db.execute("INSERT OR IGNORE INTO written (output) VALUES (?)", (output,))
        # One owner per output: an input whose output was replaced no longer has it.
        self.db.execute("DELETE FROM outputs WHERE output = ? AND input != ?", (output, rel))
        self.db.execute(
            "INSERT OR REPLACE INTO outputs (input, sha256, model_id, output, metrics, updated, options, stat) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (rel, sha256, model_id, output, json.dumps(metrics) if metrics else None, time.time(), options, stat),
        )

    def stats(self) -> dict[str, str]:
        """The inputs' recorded fingerprints."""
        with self._damage_named():
            return dict(self.db.execute("SELECT input, stat FROM outputs WHERE stat IS NOT NULL"))

    def remember_stats(self, rows: list[tuple[str, str, str]]) -> None:
        """Fingerprints ``(input, content hash, fingerprint)`` of inputs found up to date by reading them, in one
        transaction, so that the next run need not read them; an entry whose content changed meanwhile keeps none."""
        with self._damage_named():
            self.db.executemany("UPDATE outputs SET stat = ? WHERE input = ? AND sha256 = ?", [(f, i, h) for i, h, f in rows])
            self.db.commit()

    def update_references(self, rows: list[tuple[str, str, dict, str | None]]) -> None:
        """``(input, output, metrics, fingerprint)`` of outputs up to date whose reference only changed its times,
        in one transaction (a reference folder copied again touches every one)."""
        with self._damage_named():
            now = time.time()
            self.db.executemany("INSERT OR IGNORE INTO written (output) VALUES (?)", [(o,) for _, o, _, _ in rows])
            self.db.executemany("UPDATE outputs SET metrics = ?, stat = ?, updated = ? WHERE input = ?",
                                [(json.dumps(m), f, now, i) for i, _, m, f in rows])
            self.db.commit()

    def forget(self, inputs: list[str]) -> None:
        with self._damage_named():
            self.db.executemany("DELETE FROM outputs WHERE input = ?", [(rel,) for rel in inputs])
            self.db.commit()

    @contextlib.contextmanager
    def _damage_named(self):
        """Damage found past the opening (a malformed page) is named as at the opening, and a write the
        disk refuses (full, an I/O error) as an output error, exit 73: neither is a bug."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            if (getattr(exc, "sqlite_errorcode", 0) & 0xFF) not in _SQLITE_WRITE_ERRORS and "disk is full" not in str(exc):
                raise
            raise OutputError(f"cannot write the journal {self.path}: {exc} (the outputs written so far are kept; "
                              "free some space, and the next run goes on from there)") from None
        except sqlite3.DatabaseError as exc:
            if type(exc) is not sqlite3.DatabaseError:  # an integrity error: as it is
                raise
            raise damaged_journal(self.path, exc) from None

    def close(self) -> None:
        self.db.close()


_SETTLED_NS = 2_000_000_000


def stat_key(info: os.stat_result) -> str:
    return f"{info.st_size}:{info.st_mtime_ns}:{info.st_ctime_ns}:{info.st_ino}"


def fingerprint(info: os.stat_result, fmt: str, read_ns: int) -> str | None:
    """What lets a later run trust an input's recorded content hash without reading it again, as git's index
    does: its size, times and inode when it was read (``info``, taken as reading began at ``read_ns``), and the
    format its content has. None when it had changed within 2 s before: a change in the same tick of the
    file system's clock as the reading would leave the times as they were."""
    if read_ns - max(info.st_mtime_ns, info.st_ctime_ns) < _SETTLED_NS:
        return None
    return f"{stat_key(info)}:{fmt}"


def output_options(settings: Settings, fmt: str, factor: float, *, transparent: bool | None = None) -> str:
    """What besides the input and the model decides an output's pixels, for the written format ``fmt``
    at the output ``factor``; ``transparent``: whether the input has an alpha plane, once known.

    A re-run redoes an image when this changes (``options_match``; a journal
    entry without it, from an older version, counts as matching). Engine
    settings that change pixels are recorded only away from their defaults,
    so that entries from before they were recorded still match outputs made
    with the defaults.
    """
    run, image, engine = settings.run, settings.image, settings.engine
    options = {"format": fmt, "factor": float(factor), "alpha": image.alpha, "background": image.background}
    defaults = type(engine)()
    for key in ("self_ensemble", "flat_guard", "precision"):
        if getattr(engine, key) != getattr(defaults, key):
            options[key] = getattr(engine, key)
    if fmt == "jpg":
        options["quality"] = run.jpeg_quality
    elif fmt == "webp":
        options["quality"] = run.webp_quality
    if transparent is not None:
        options["transparent"] = transparent
    return json.dumps(options, sort_keys=True)


def options_match(recorded: str | None, current: str, fmt: str) -> bool:
    """Whether the output recorded with ``recorded`` options is the one ``current`` options make in ``fmt``.

    The alpha mode and the background decide only an image with transparency, and the background only
    one flattened (JPEG, BMP): where the entry records that its input had none, they are not compared.
    """
    if recorded is None:  # an entry from before options were recorded
        return True
    old, new = json.loads(recorded), json.loads(current)
    if "format" not in old:  # recorded before the format was: the output's name told it, unless a template hid it
        new.pop("format", None)
    transparent = old.pop("transparent", None)
    new.pop("transparent", None)
    ignored = set()
    if transparent is False:
        ignored = {"alpha", "background"}
    elif transparent and fmt not in NO_ALPHA:
        ignored = {"background"}
    return {k: v for k, v in old.items() if k not in ignored} == {k: v for k, v in new.items() if k not in ignored}


def reference_candidates(rel: PurePath) -> list[PurePath]:
    """Where the HR reference of input ``rel`` may be, relative to the reference folder, in the order looked at:
    the same name, then the same stem with each image extension (lower case, then upper).

    Public so that a reference folder on another filesystem (``beam``) is searched in the same order.
    """
    stem = rel.stem if rel.suffix.lower() in IMAGE_SUFFIXES else rel.name
    return [rel] + [rel.parent / (stem + s) for suffix in sorted(IMAGE_SUFFIXES) for s in (suffix, suffix.upper())]


def find_reference(reference_dir: Path, rel: PurePath) -> Path | None:
    """The HR image at the same relative path, with any image extension."""
    for candidate in reference_candidates(rel):
        if (reference_dir / candidate).is_file():
            return reference_dir / candidate
    return None


def _eight_bit(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float64) * (255.0 / np.iinfo(pixels.dtype).max)


@dataclass
class Reference:
    """An HR reference cropped to the output's size, and the bicubic baseline beside it."""

    rgb: np.ndarray  # the reference's own dtype
    bicubic: np.ndarray  # MATLAB bicubic upscale of the input, the input's dtype
    gray: bool


def load_reference(lr: Image, sr: Image, reference: Path | Image, scale: int) -> Reference:
    """``reference`` is a file, or an image already decoded (one read from another filesystem)."""
    ref = reference if isinstance(reference, Image) else read_image(reference)
    h, w = sr.rgb.shape[:2]
    rh, rw = ref.rgb.shape[:2]
    if not (h <= rh < h + scale and w <= rw < w + scale):
        where = reference.source if isinstance(reference, Image) else reference
        raise ImageError(where, f"reference is {rw}x{rh}, expected {w}x{h} (scale x the input)")
    bicubic = imresize(lr.rgb, size=(h, w))  # integer in, integer out, rounded per axis as MATLAB
    return Reference(ref.rgb[:h, :w], bicubic, lr.gray and ref.gray)


def score_against(sr: Image, reference: Reference, scale: int) -> dict:
    """The output and the bicubic baseline scored against the reference."""
    ref_rgb = _eight_bit(reference.rgb)
    ours = score(_eight_bit(sr.rgb), ref_rgb, border=scale, gray=reference.gray)
    base = score(_eight_bit(reference.bicubic), ref_rgb, border=scale, gray=reference.gray)
    return {
        **{k: round(v, 4) for k, v in ours.items()},
        **{f"bicubic_{k}": round(v, 4) for k, v in base.items()},
        "gain_psnr_y": round(ours["psnr_y"] - base["psnr_y"], 4),
    }


class ReferenceFolder:
    """The HR references of a run: found at the inputs' relative paths, read when an output is scored.

    A local folder; ``beam`` subclasses it for a folder on another filesystem.
    """

    def __init__(self, root: Path):
        self.root = Path(root)

    def find(self, rel: PurePath) -> Path | None:
        return find_reference(self.root, rel)

    def read(self, found: Path) -> Path | Image:
        """What ``load_reference`` takes: here the file itself, which it reads."""
        return found

    def identity(self, found: Path | None) -> str | None:
        """What the scores of an output were computed against: the reference file as it is now (path,
        size, modification time, content hash), so that another folder or a changed file is scored again."""
        stated = self._stated(found)
        digest = _file_sha256(found) if stated is not None else None
        return stated if digest is None else f"{stated}:{digest}"  # unreadable: compared by its time, as before

    def same(self, recorded: str | None, found: Path | None) -> tuple[bool, str | None]:
        """Whether ``found`` is the reference an output was scored against, and its identity to record when
        only its time changed. A file only touched (copied again, restored: a new time, the same bytes) is
        the same: its images are not upscaled again, nor is it read again at the next run."""
        stated = self._stated(found)
        if recorded is None or stated is None:
            return recorded == stated, None
        if recorded == stated or recorded.startswith(stated + ":"):  # the second: recorded with its hash
            return True, None
        head, _, digest = recorded.rpartition(":")
        if re.fullmatch(r"[0-9a-f]{64}", digest) is None:
            return False, None
        path_size = head.rpartition(":")[0]  # the recorded modification time left out
        if path_size == stated.rpartition(":")[0] and _file_sha256(found) == digest:
            return True, f"{stated}:{digest}"
        return False, None

    def _stated(self, found: Path | None) -> str | None:
        if found is None:
            return None
        try:
            info = os.stat(found)
        except OSError:
            return None
        return f"{Path(found).resolve()}:{info.st_size}:{info.st_mtime_ns}"


def _file_sha256(path: Path) -> str | None:
    """A reference's hash; None when it cannot be read (then compared by its time)."""
    try:
        return file_sha256(path)
    except OSError:
        return None


@dataclass
class Written:
    """An output on disk: the finished image and, when references were given, its metrics (``reference``,
    the identity of what it was scored against, or None; the scores when it could be scored) and the
    reference behind them."""

    image: Image
    metrics: dict | None = None
    reference: Reference | None = None


def write_output(
    image: Image, upscaled: np.ndarray, alpha: np.ndarray | None, destination: Path | Callable[[bytes], None], settings: Settings,
    scale: int, *, name: str | Path, rel: PurePath, references: ReferenceFolder | None = None, ms: float = 0.0,
    within: Path | None = None, mode: int | None = None,
) -> Written:
    """Finishes, encodes and atomically writes one model output, then scores it when ``references`` are given.

    One function for every engine, so that an image comes out, and scores, the
    same from each.  ``destination`` is the output file, or a function that
    writes the bytes atomically (a file on another filesystem); ``name`` is the
    input in log lines; ``rel`` its path relative to INPUT, where its
    reference is looked for; ``ms`` the model time per image, for the metrics; ``within`` the output
    folder, below which no folder may be a link (``imageio.make_folders``); ``mode`` the output file's
    (``imageio.mode_like`` the input).
    """
    run = settings.run
    factor = run.outscale or scale
    fmt = target_format(image.format, run.output_format)
    result = finish_image(image, upscaled, scale, alpha=alpha, outscale=run.outscale)
    data = encode_image(result, fmt, run.jpeg_quality, run.webp_quality, background=settings.image.background_rgb)
    if callable(destination):
        destination(data)
    else:
        atomic_write(destination, data, within, mode)
    if references is None:
        return Written(result)
    found = references.find(rel)
    unscored = {"reference": references.identity(found)}  # recorded, so that a re-run skips the image until that changes
    if found is None:
        logger.warning("{}: no reference image at the same relative path; no metrics", name)
        return Written(result, unscored)
    if not float(factor).is_integer():  # before reading it: plan_route counted no reference at such a factor
        logger.warning("{}: no metrics at the non-integer factor {}", name, factor)
        return Written(result, unscored)
    try:
        reference = load_reference(image, result, references.read(found), int(factor))
    except ImageError as exc:  # the output is good; only its score is lost
        logger.warning("{}: no metrics: {}", name, exc)
        return Written(result, unscored)
    # Lossy formats are scored as written: the decoded file, not the pixels before encoding.
    delivered = replace(result, rgb=decode_image(data, name, max_pixels=None).rgb) if fmt in ("jpg", "webp") else result
    try:
        metrics = score_against(delivered, reference, int(factor))
    except ValueError as exc:  # too small to score: written all the same
        logger.warning("{}: no metrics: {}", name, exc)
        return Written(result, unscored)
    metrics.update(width=result.rgb.shape[1], height=result.rgb.shape[0], scale=int(factor), ms=round(ms, 1), **unscored)
    return Written(result, metrics, reference)


class _Progress:
    """A tqdm bar on a terminal, periodic log lines elsewhere. It counts files: those found not to be
    images, or failing, are settled too, and the total is known before any file is read."""

    def __init__(self, total: int, mode: str, interval: float):
        self.total, self.count, self.interval = total, 0, interval
        self.start = self.last = time.time()
        use_bar = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
        self.enabled = mode != "none"
        self.bar = None
        if use_bar and self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="file", dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.time()
        if self.enabled and (now - self.last >= self.interval or self.count == self.total):
            self.last = now
            rate = self.count / max(now - self.start, 1e-9)
            eta = (self.total - self.count) / rate if rate > 0 else float("inf")
            logger.info("{}/{} files, {:.2f} files/s, ETA {:.0f}s", self.count, self.total, rate, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def check_output_dir(output_dir: Path, what: str = "output folder") -> None:
    """Creates OUTPUT (or another folder written at the end) and proves it writable before any work,
    so that a bad folder fails the run at once, not after it."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".batchsr-probe-{os.getpid()}.tmp"  # the name of a temporary: removed at a start after a kill
        probe.write_bytes(b"")
        probe.unlink(missing_ok=True)
    except OSError as exc:
        raise OutputError(f"{what} {output_dir} is not writable: {exc.strerror or exc}") from None


def list_inputs(input_dir: Path, output_dir: Path, recursive: bool,
                problems: list[tuple[Path, str]] | None = None) -> list[Path]:
    """Every regular, non-hidden file under INPUT (outside OUTPUT when nested, and outside the OUTPUT folders
    of other runs); what could not be looked into goes to ``problems`` (see ``data.list_files``)."""
    from batchsr.data import list_files

    out, outputs = output_dir.resolve(), []
    paths = [path for path in list_files(input_dir, recursive, problems, outputs)
             if not ((real := path.resolve()) == out or out in real.parents)]
    for folder in outputs:
        if folder.resolve() != out:
            logger.warning("{}: the output folder of another batchsr run (it holds {}); not read as input", folder, STATE_DIR)
    return paths


def memory_budget(settings: Settings, ahead=None) -> MemoryBudget:
    """With the model loaded: the run's memory budget (``ahead``: the run's ``data.DecodeAhead``).  A
    run.memory_mb below what the process already takes would refuse every image, each with advice (lower
    the tile) that cannot help."""
    cap, loaded = settings.run.memory_cap_mb, process_rss_mb()
    if loaded >= cap:
        raise ConfigError(f"run.memory_mb = {cap:,.0f} is below what the model and runtime already take "
                          f"(about {loaded:,.0f} MB); raise it")
    return MemoryBudget(loaded, ahead)


def decode_ahead_mb(settings: Settings, loaded_mb: float) -> float:
    """What the images decoded ahead of their turn may take together: a quarter of what run.memory_mb leaves
    beside the process (``loaded_mb``: what it takes, with the model loaded once it is)."""
    return max(settings.run.memory_cap_mb - loaded_mb, 0.0) / 4


def check_folders_apart(input_dir: Path, output_dir: Path) -> None:
    """OUTPUT may sit inside INPUT (it is left out of the inputs), but not be INPUT or hold it:
    every input would be left out, and the run would succeed having done nothing."""
    real_in, real_out = input_dir.resolve(), output_dir.resolve()
    if real_in == real_out or real_out in real_in.parents:
        raise OutputError(f"output folder {output_dir} is the input folder {input_dir} or contains it; "
                          "choose an output folder outside the input (or inside it)")


def check_run(input_dir: Path, output_dir: Path, settings: Settings, *, reference_dir: Path | None = None,
              engine=None) -> ModelInfo:
    """What can be refused before anything is loaded or made: the folders, and the model's description.
    The command line asks before importing TensorFlow, so that a mistyped folder is answered at once."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise InputError(f"input folder {input_dir} does not exist or is not a folder")
    if reference_dir is not None and not Path(reference_dir).is_dir():
        raise InputError(f"reference folder {reference_dir} does not exist or is not a folder")
    if reference_dir is not None:
        try:
            with os.scandir(reference_dir) as entries:
                empty = next((e for e in entries if not e.name.startswith(".")), None) is None  # .snapshot, .DS_Store
        except OSError as exc:
            raise InputError(f"reference folder {reference_dir} cannot be read: {exc.strerror or exc}") from None
        if empty:  # a share not mounted: every image would be redone unscored, and its metrics rows dropped
            raise InputError(f"reference folder {reference_dir} is empty (a share not mounted?)")
    check_folders_apart(input_dir, output_dir)
    # A bad model file is refused before the output folder is made: a mistyped --model leaves nothing behind.
    return engine.info if engine is not None else read_info(model_weights(settings.model))


def run_folder(
    input_dir: Path,
    output_dir: Path,
    settings: Settings,
    *,
    force: bool = False,
    reference_dir: Path | None = None,
    report_dir: Path | None = None,
    engine=None,
    info: ModelInfo | None = None,
) -> RunSummary:
    """Upscales every image under ``input_dir`` into ``output_dir``; see the module docstring. ``info``: what
    ``check_run`` returned, when the caller asked it first (the model's weights are hashed once)."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if info is None:
        info = check_run(input_dir, output_dir, settings, reference_dir=reference_dir, engine=engine)
    made = _missing_folders(output_dir)
    check_output_dir(output_dir)
    with FolderLock(output_dir / STATE_DIR / "lock"):
        removed = remove_temporaries(output_dir)
        if removed:
            logger.info("removed {} temporary files left by an interrupted run", removed)
        try:
            return _run_locked(input_dir, output_dir, settings, force, reference_dir, report_dir, engine, info)
        except (ConfigError, ModelError):  # found when the model loads (a GPU not there, memory_mb too low, a
            # description that reads but does not build): the fix is the user's.  Under the lock: no other run
            # has begun in it.
            _unmake(made)
            raise


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first, as real paths: ``new/../kept``
    is ``kept``, which exists, and a link's ``..`` is the parent of its target, as the system resolves them."""
    folder, missing = Path(os.path.realpath(folder)), []
    while not os.path.lexists(folder) and folder.parent != folder:
        missing.append(folder)
        folder = folder.parent
    return missing


def _unmake(made: list[Path]) -> None:
    """Removes the OUTPUT this run made (``made``: see ``_missing_folders``) when nothing but its state is in it,
    so that a run refused for its settings leaves no OUTPUT behind (a folder named before a ``..`` in its path,
    made by the way, stays)."""
    if not made:
        return
    for root, dirs, files in os.walk(made[0]):
        if Path(root) == made[0]:
            dirs[:] = [d for d in dirs if d != STATE_DIR]
            files = [f for f in files if not f.startswith(".batchsr-probe-")]
        if files or dirs:  # anything else, a link included (os.walk lists it and does not follow it)
            return
    with contextlib.suppress(OSError):
        shutil.rmtree(made[0])
        for folder in made[1:]:
            os.rmdir(folder)


def _run_locked(input_dir, output_dir, settings: Settings, force, reference_dir, report_dir, engine, info: ModelInfo) -> RunSummary:
    started = time.time()
    model_id, scale = info.model_id, info.scale
    summary = RunSummary(model_id=model_id)
    journal = Journal(output_dir / STATE_DIR / "journal.sqlite")
    known = journal.entries()
    problems: list[tuple[Path, str]] = []
    paths = list_inputs(input_dir, output_dir, settings.run.recursive, problems)
    logger.info("{} files under {}; model {}", len(paths), input_dir, model_id)
    for path, reason in problems:
        summary.failed.append(Failure(path, reason))
        logger.error("{}: {}", path, reason)
    run = settings.run
    factor = run.outscale or scale

    references = ReferenceFolder(Path(reference_dir)) if reference_dir is not None else None

    def _up_to_date(entry, item: _Item, fmt: str) -> bool:
        """Same content, model, output name and options, the output still there, metrics if asked."""
        sha256, model, output, metrics, options = entry
        target = target_format(fmt, run.output_format)
        expected = output_name(item.rel, fmt, run.output_format, run.name_template, factor).as_posix()
        return (sha256 == item.sha256 and model == model_id and output == expected and (output_dir / output).is_file()
                and options_match(options, output_options(settings, target, factor), target)
                and (references is None or _same_reference(item, metrics)))

    def _same_reference(item: _Item, metrics: dict | None) -> bool:
        """Whether the output's scores (or their absence) stand against the reference found now."""
        found = references.find(item.rel)
        if metrics is not None and "reference" in metrics:
            same, item.reference_now = references.same(metrics["reference"], found)
            item.rerecord = item.reference_now is not None
            return same
        if metrics is None:  # never scored (a run without --reference): up to date while there is nothing to score against
            item.rerecord = found is None
            return item.rerecord
        # Scored by a version from before references were recorded (against another folder, perhaps, and a JPEG
        # before its encoding): the output on disk is scored again, not upscaled again (the first run after an
        # upgrade redid a whole archive).
        item.rescore = found is not None and "psnr_y" in metrics and float(factor).is_integer()
        return item.rescore

    def prepare(path: Path) -> _Item:
        item = _Item(path, path.relative_to(input_dir))
        try:
            item.rel.as_posix().encode("utf-8")
        except UnicodeEncodeError:  # the journal, the CSV and most tools need text names
            item.error = "the file name is not valid UTF-8; rename it to have it processed"
            return item
        try:
            with open(path, "rb") as handle:
                read_ns, opened = time.time_ns(), os.fstat(handle.fileno())
                head = handle.read(16)
                sniffed = sniff_format(head)
                if sniffed is None and item.rel.suffix.lower() not in IMAGE_SUFFIXES:
                    item.not_image = True  # read no further: it may be a video of many gigabytes
                    return item
                if sniffed is None:
                    data = head  # not an image by its content: decoding says why
                else:
                    handle.seek(0)
                    data = read_bounded(handle, path, settings.image.max_pixels)
        except OSError as exc:
            item.error = f"cannot read: {exc.strerror or exc}"
            return item
        except ImageError as exc:
            item.error = exc.reason
            return item
        item.sha256 = hashlib.sha256(data).hexdigest()
        if sniffed is not None:
            item.fingerprint = fingerprint(opened, sniffed, read_ns)
        entry = known.get(item.rel.as_posix())
        if not force and entry is not None and sniffed is not None and _up_to_date(entry, item, sniffed):
            item.skip = not item.rescore
            if item.skip:
                return item
        try:
            item.image = decode_image(data, path, max_pixels=settings.image.max_pixels)
        except ImageError as exc:
            item.error = exc.reason
        return item

    from batchsr.data import DecodeAhead, prepared_files

    progress = _Progress(len(paths), run.progress, run.log_interval_s)
    fingerprints = {} if force else journal.stats()
    confirmed: list[tuple[str, str, str]] = []  # fingerprints of inputs found up to date by reading them
    rereferenced: list[tuple[str, str, dict, str | None]] = []  # the same, whose reference's times changed

    def record_skip(item: _Item) -> None:
        """An input found up to date: its reference's new time and its fingerprint recorded when they changed."""
        rel = item.rel.as_posix()
        summary.skipped += 1
        if item.rerecord:
            rereferenced.append((rel, known[rel][2], {**(known[rel][3] or {}), "reference": item.reference_now}, item.fingerprint))
            if len(rereferenced) >= 1000:
                remember_rereferenced()
        elif item.fingerprint is not None and fingerprints.get(rel) != item.fingerprint:
            confirmed.append((rel, item.sha256, item.fingerprint))
            if len(confirmed) >= 1000:
                remember_confirmed()
        progress.update()

    def remember_confirmed() -> None:
        """Only saves reading next time: a journal that refuses the write (full, read-only) fails no run."""
        try:
            journal.remember_stats(confirmed)
        except OutputError as exc:
            logger.warning("{}; the next run reads these {} inputs again", exc, len(confirmed))
        confirmed.clear()

    def remember_rereferenced() -> None:
        journal.update_references(rereferenced)
        rereferenced.clear()

    def keep_found() -> None:
        """What the run found up to date, kept when it stops early (Ctrl-C, a full disk) as each image's record
        is: never in place of the error that stopped it."""
        with contextlib.suppress(OutputError, sqlite3.Error):
            if rereferenced:
                remember_rereferenced()
            if confirmed:
                remember_confirmed()

    def unchanged(path: Path, stat: os.stat_result) -> bool:
        """Up to date by its recorded fingerprint: skipped without being read (a cron tick over a finished
        archive reads no image)."""
        rel = path.relative_to(input_dir).as_posix()
        entry, recorded = known.get(rel), fingerprints.get(rel)
        if entry is None or recorded is None:
            return False
        key, _, fmt = recorded.rpartition(":")
        if key != stat_key(stat):
            return False
        item = _Item(path, Path(rel), entry[0], fingerprint=recorded)
        if not _up_to_date(entry, item, fmt) or item.rescore:
            return False
        record_skip(item)
        return True

    def rescored(item: _Item) -> bool:
        """The scores of an up-to-date output computed again from the file on disk (as a new run scores it: as
        written), its model time kept; False when that fails, and the image is then done again."""
        if item.image.alpha is not None and written_as(item) not in ("jpg", "webp"):
            return False  # a new run scores its pixels before the file (colour under transparency, a flattened BMP)
        rel = item.rel.as_posix()
        sha256, model, output, metrics, options = known[rel]
        found = references.find(item.rel)
        try:
            shown = read_image(output_dir / output)
            reference = load_reference(item.image, shown, references.read(found), int(factor))
            scores = score_against(shown, reference, int(factor))
        except (ImageError, ValueError, OSError) as exc:
            logger.warning("{}: its scores cannot be computed again ({}); upscaled again", item.path, exc)
            return False
        scores.update(width=shown.rgb.shape[1], height=shown.rgb.shape[0], scale=int(factor), ms=metrics.get("ms", 0.0),
                      reference=references.identity(found))
        journal.record(rel, sha256, model, output, scores, options, item.fingerprint)
        summary.skipped += 1
        item.image = None
        progress.update()
        return True

    def ignored(path: Path) -> bool:
        """Not an image by its name nor by its first bytes (a video of many gigabytes is read no further); a name
        that is not UTF-8 is left to ``prepare``, which fails it."""
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return False
        try:
            path.relative_to(input_dir).as_posix().encode("utf-8")
        except UnicodeEncodeError:
            return False
        try:
            if sniff_file(path) is not None:
                return False
        except OSError:  # reading it says why
            return False
        summary.ignored += 1
        logger.info("{}: not an image, ignored", path)
        progress.update()
        return True

    to_read, min_age_ns = [], round(run.min_age_s * 1e9)
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:  # reading it says why
            to_read.append(path)
            continue
        if unchanged(path, stat) or ignored(path):
            continue
        age_ns = time.time_ns() - stat.st_mtime_ns
        if min_age_ns and age_ns < min_age_ns:  # still being written, perhaps: the next run takes it
            summary.waiting += 1
            logger.info("{}: modified {}; left for the next run (run.min_age_s = {:g})", path,
                        f"{age_ns / 1e9:.1f}s ago" if age_ns >= 0 else "in the future", run.min_age_s)
            progress.update()
        else:
            to_read.append(path)
    writers = ThreadPoolExecutor(max_workers=run.write_workers, thread_name_prefix="batchsr-write")
    in_flight: list[tuple[_Item, Future]] = []
    report_images: list = []
    claimed: dict[Path, Path] = {}
    budget: MemoryBudget | None = None
    ahead = DecodeAhead(decode_ahead_mb(settings, process_rss_mb()))  # set again once the model is loaded

    def written_as(item: _Item) -> str:
        return target_format(item.image.format, run.output_format)

    def fail(item: _Item, reason: str) -> None:
        summary.failed.append(Failure(item.path, reason))
        logger.error("{}: {}", item.path, reason)

    def write_one(item: _Item, out_rel: Path, upscaled: np.ndarray, alpha: np.ndarray | None, ms: float) -> dict | None:
        written = write_output(item.image, upscaled, alpha, output_dir / out_rel, settings, scale,
                               name=item.path, rel=item.rel, references=references, ms=ms, within=output_dir,
                               mode=mode_like(item.path))
        if report_dir is not None and written.reference is not None:
            reference = written.reference
            report_images.append(ReportImage(item.rel.as_posix(), to_uint8(item.image.rgb), to_uint8(reference.bicubic),
                                             to_uint8(written.image.rgb), to_uint8(reference.rgb), written.metrics))
        return written.metrics

    def conclude(item: _Item, error: Exception | None, metrics: dict | None = None, *, stage: str = "output not written") -> None:
        """One image's end: journal and counts once its output is on disk, else a failure line."""
        if error is None:
            options = output_options(settings, written_as(item), factor, transparent=item.image.alpha is not None)
            journal.record(item.rel.as_posix(), item.sha256, model_id, claimed[item.path].as_posix(), metrics, options,
                           item.fingerprint)
            summary.done += 1
            summary.megapixels += item.image.rgb.shape[0] * item.image.rgb.shape[1] * factor * factor / 1e6
        else:
            fail(item, f"{stage}: {failure_reason(error)}")
            if isinstance(error, OSError) and error.errno in (28, 30):  # ENOSPC, EROFS: nothing more can succeed
                raise OutputError(f"cannot write to {output_dir}: {error.strerror}") from None
        item.image = None
        budget.release(item.path)
        progress.update()

    def settle(block: bool) -> None:
        while in_flight and (block or len(in_flight) > 2 * run.write_workers or in_flight[0][1].done()):
            item, future = in_flight.pop(0)
            try:
                metrics = future.result()
            except Exception as exc:  # noqa: BLE001 (one image's metadata or encoder bug fails it, not the run)
                conclude(item, exc)
            else:
                conclude(item, None, metrics)

    def get_engine():
        nonlocal engine, budget
        if engine is None:
            from batchsr.engine import Engine
            from batchsr.tfimport import import_tensorflow

            import_tensorflow()

            engine = Engine(model_weights(settings.model), settings.engine)
        if budget is None:
            budget = memory_budget(settings, ahead)
            ahead.limit_mb = decode_ahead_mb(settings, budget.loaded_mb)
        return engine

    def flush(batch: list[_Item]) -> None:
        if not batch:
            return
        engine = get_engine()
        intend([claimed[item.path].as_posix() for item in batch])
        t0 = time.time()
        outputs = upscale_each(engine, [item.image for item in batch], settings.image.alpha)
        ms = (time.time() - t0) * 1000.0 / len(batch)
        for item, result in zip(batch, outputs):
            if isinstance(result, Exception):
                conclude(item, result, stage="not upscaled")
                continue
            upscaled, alpha = result
            in_flight.append((item, writers.submit(write_one, item, claimed[item.path], upscaled, alpha, ms)))
        settle(block=False)

    def intend(names: list[str]) -> None:
        journal.intend(names)
        ours.update(names)

    def stream_one(item: _Item, out_rel: Path) -> None:
        """A huge image on its own, band by band (see pipeline.write_streamed)."""
        logger.info("{}: {}x{} upscaled band by band", item.path, *item.image.size)
        intend([out_rel.as_posix()])
        try:
            write_streamed(get_engine(), item.image, output_dir / out_rel, written_as(item), settings.image.alpha,
                           within=output_dir, mode=mode_like(item.path))
        except Exception as exc:  # noqa: BLE001 (as in settle)
            conclude(item, exc)
        else:  # not scored (too large to score whole), but recorded against the reference, as any unscored image
            conclude(item, None, {"reference": references.identity(references.find(item.rel))} if references else None)

    # Windows of one shape share a model call, so images wait in a group per window shape until their
    # windows fill engine.batch_size: small images of two orientations then run full batches, not halves.
    groups: dict[tuple[int, int], list[_Item]] = {}
    waiting: dict[tuple[int, int], int] = {}

    def plan(item: _Item):
        return budget.plan(item.path, item.image, written_as(item), scale, run, settings.engine.tile,
                           reference=reference_dir is not None and float(factor).is_integer(),
                           call_mb=engine.call_mb(*item.image.rgb.shape[:2]))

    def flush_groups() -> None:
        batch = [item for group in groups.values() for item in group]
        groups.clear()
        waiting.clear()
        flush(batch)

    # An output belongs to the input the journal has for it while that input exists, whatever
    # the name order: a new input whose name maps onto it fails instead of overwriting it.
    present = set(paths)

    def still_writes(rel: str, recorded: str) -> bool:
        """Whether the input's output under the current settings is still ``recorded``: a changed
        run.output_format or name template frees the old name.  Its first bytes are read only where its
        name does not tell its format."""
        def writes(fmt: str | None) -> bool:
            return fmt is not None and output_name(Path(rel), fmt, run.output_format, run.name_template, factor).as_posix() == recorded

        if writes(SUFFIX_FORMATS.get(Path(rel).suffix.lower())):
            return True
        try:
            return writes(sniff_file(input_dir / rel))
        except OSError:
            return True  # reading it will say why; meanwhile it keeps its output

    outputs_taken: dict[Path, Path] = {Path(entry[2]): input_dir / rel for rel, entry in known.items()
                                       if input_dir / rel in present and still_writes(rel, entry[2])}
    made_folders: list[Path] = []  # output folders this run made, removed at its end if nothing went into them
    ours = journal.outputs()  # files in OUTPUT this journal wrote (or was writing): the only ones replaced
    try:
        for item in prepared_files(to_read, prepare, run.decode_workers, ahead=ahead, max_pixels=settings.image.max_pixels):
            if item.skip:
                record_skip(item)
                continue
            if item.not_image:
                summary.ignored += 1
                logger.info("{}: not an image, ignored", item.path)
                progress.update()
                continue
            if item.error is not None:
                fail(item, item.error)
                progress.update()
                continue
            if item.rescore and rescored(item):
                continue
            out_rel = output_name(item.rel, item.image.format, run.output_format, run.name_template, factor)
            if outputs_taken.get(out_rel, item.path) != item.path:
                fail(item, f"output {out_rel} would overwrite the output of {outputs_taken[out_rel]}")
                progress.update()
                continue
            outputs_taken[out_rel] = item.path
            claimed[item.path] = out_rel
            try:  # a folder the output cannot go into (a link), or a name too long, is found before the model's time is spent
                make_folders((output_dir / out_rel).parent, output_dir, made_folders)
                check_name_length(output_dir / out_rel)
            except OSError as exc:
                fail(item, f"output not written: {failure_reason(exc)}")
                item.image = None
                progress.update()
                continue
            if not force and out_rel.as_posix() not in ours and os.path.lexists(output_dir / out_rel):
                # Another program's file, an original (INPUT and OUTPUT swapped), or another run's output: never replaced
                fail(item, f"output {output_dir / out_rel} is there already, and this OUTPUT's journal did not write it; "
                           "not replaced (move it away, or give --force to replace it)")
                item.image = None
                progress.update()
                continue
            get_engine()  # loaded before the memory check, which counts it
            route = plan(item)
            if route is None:  # it would go better alone: the images in flight finish first
                flush_groups()
                settle(block=True)
                route = plan(item)
            if route.refusal is not None:
                fail(item, route.refusal)
                item.image = None
                progress.update()
                continue
            if route.streamed:
                if route.note:
                    logger.warning("{}: {}", item.path, route.note)
                stream_one(item, out_rel)
                continue
            tiles = window_plan(settings, info, item.image)
            group = groups.setdefault(tiles.window_shape, [])
            group.append(item)
            alpha_passes = 2 if item.image.alpha is not None and settings.image.alpha == "model" else 1
            waiting[tiles.window_shape] = waiting.get(tiles.window_shape, 0) + len(tiles.tiles) * alpha_passes
            if waiting[tiles.window_shape] >= settings.engine.batch_size:
                del groups[tiles.window_shape], waiting[tiles.window_shape]
                flush(group)
            elif sum(waiting.values()) >= 4 * settings.engine.batch_size:  # many shapes: the wait stays short
                flush_groups()
        flush_groups()
        settle(block=True)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):  # Ctrl-C: what is written by now is recorded, so the next run skips it
            settle(block=True)
        keep_found()
        raise
    finally:
        writers.shutdown(wait=True)
        progress.close()
        for folder in sorted(made_folders, key=lambda f: len(f.parts), reverse=True):  # made for images that failed
            with contextlib.suppress(OSError):  # one an output went into is not empty: it stays
                os.rmdir(folder)
    if confirmed:
        remember_confirmed()
    if rereferenced:  # before metrics.csv, which is read from the journal
        remember_rereferenced()
    _forget_vanished(journal, known, {p.relative_to(input_dir).as_posix() for p in paths}, output_dir, ours)
    if reference_dir is not None or (output_dir / METRICS_FILE).exists():  # also drops rows of outputs redone unscored
        summary.metrics_csv = _write_metrics(output_dir, journal, [p.relative_to(input_dir).as_posix() for p in paths], scale)
    journal.close()
    if report_dir is not None and len(report_images) < summary.done + summary.skipped:
        why = [f"{summary.skipped} up to date (--force redoes them)"] if summary.skipped else []
        if summary.done > len(report_images):
            why.append(f"{summary.done - len(report_images)} upscaled without a usable reference (see the lines above)")
        logger.warning("report: {} of {} images were scored in this run; not in it: {}", len(report_images),
                       summary.done + summary.skipped, "; ".join(why))
    if report_dir is not None and report_images:
        report_images.sort(key=lambda im: im.name)
        rows = [{"images": len(report_images), "scale": scale, "model": model_id,
                 **{k: round(float(np.mean([im.metrics[k] for im in report_images])), 4)
                    for k in ("bicubic_psnr_y", "psnr_y", "gain_psnr_y", "bicubic_ssim_y", "ssim_y")}}]
        summary.report = write_report(Path(report_dir), report_images, f"batchsr run: {input_dir}", rows)
    summary.seconds = time.time() - started
    return summary


def window_plan(settings: Settings, info: ModelInfo, image: Image):
    """The windows ``image`` sends through the model (``tiling.TilePlan``): its weight in a batch of ``engine.batch_size``."""
    from batchsr.tiling import plan_tiles

    h, w = image.rgb.shape[:2]
    return plan_tiles(h, w, settings.engine.tile, settings.engine.overlap, info.multiple)


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")


def spreadsheet_text(name: str) -> str:
    """A file name as a CSV cell a spreadsheet shows as text: one starting like a formula (=, +, -, @, a tab)
    gets an apostrophe before it, which spreadsheets do not show (a producer's ``=HYPERLINK(...).png`` ran as
    one); so does a file named ``MEAN``, which read as the aggregate row; a name starting with an apostrophe
    gets one more, so that ``file_name`` gives every name back."""
    return "'" + name if name.startswith(_FORMULA_STARTS) or name == "MEAN" else name


def file_name(cell: str) -> str:
    """The name a ``spreadsheet_text`` cell stands for."""
    return cell[1:] if cell.startswith("'") and (cell[1:].startswith(_FORMULA_STARTS) or cell[1:] == "MEAN") else cell


def column_means(rows: list[dict], columns: list[str]) -> dict:
    """The MEAN row's figures: each metric column the rows have, averaged (ms to 0.1, the rest to 4 places)."""
    labels = ("set", "image", "model_id", "width", "height", "scale")
    return {c: round(float(np.mean([r[c] for r in rows])), 1 if c == "ms" else 4)
            for c in columns if c not in labels and c in rows[0]}


def metrics_csv(entries: dict, inputs: list[str], scale: int) -> bytes | None:
    """metrics.csv's content: a row per input of ``inputs`` with metrics, in that order, then their MEAN; None without any.

    ``entries`` maps an input to its journal entry (as ``Journal.entries``).
    Apart from the writing, so that a run can put it elsewhere (``beam``).
    """
    rows = []
    for rel in inputs:
        entry = entries.get(rel)
        if entry is None or entry[3] is None or "psnr_y" not in entry[3]:  # not scored: no reference, or none usable
            continue
        # the row's own scale when recorded
        rows.append({"image": spreadsheet_text(rel), "scale": scale, "model_id": entry[1], **entry[3]})
    if not rows:
        return None
    scales, models = {r["scale"] for r in rows}, {r["model_id"] for r in rows}
    # The rows' own model: rows kept for outputs still on disk may be of another model than this run's.
    mean = {"image": "MEAN", "scale": scales.pop() if len(scales) == 1 else "", "model_id": models.pop() if len(models) == 1 else "",
            "width": "", "height": "", **column_means(rows, METRIC_COLUMNS)}
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    writer.writerow(mean)
    return buffer.getvalue().encode("utf-8")


def check_name_length(path: Path) -> None:
    """Raises what creating ``path`` would raise when its name passes the file system's limit (a long input
    name under a name template): refused at the write, such an image loaded the model at every run."""
    try:
        limit = os.pathconf(path.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    if 0 < limit < len(os.fsencode(path.name)):  # 0 or -1: no limit told
        raise OSError(errno.ENAMETOOLONG, f"{os.strerror(errno.ENAMETOOLONG)} ({len(os.fsencode(path.name))} bytes, "
                      f"the file system takes {limit}; shorten the input's name or run.name_template)", str(path))


def _forget_vanished(journal: Journal, known: dict, listed: set[str], output_dir: Path, ours: set[str]) -> None:
    """Drops the entries whose input and output are both gone: a folder that others fill and empty grew the
    journal by a row for every file it ever held, read whole at each run. An entry whose output is still on
    disk stays (its metrics.csv row, and an input put back or mounted again, are kept), and so does the name
    of every output still there (``ours``: the names known at the start, with this run's); only saves work,
    so a journal that refuses the write fails no run."""
    gone = [rel for rel, entry in known.items() if rel not in listed and not os.path.lexists(output_dir / entry[2])]
    # Names an entry kept holds stay ``ours`` through it: only the others are looked at, not every output each run
    forgotten = set(gone)
    others = ours - {entry[2] for rel, entry in known.items() if rel not in forgotten}
    unwritten = [name for name in others if not os.path.lexists(output_dir / name)]  # removed, or never written (failed)
    try:
        if gone:
            journal.forget(gone)
        if unwritten:
            journal.forget_written(unwritten)
    except OutputError as exc:
        logger.warning("{}; the entries of outputs gone stay until a later run", exc)


def _write_metrics(output_dir: Path, journal: Journal, inputs: list[str], scale: int) -> Path | None:
    """Rewrites metrics.csv from the journal: rows of this run's inputs, and of earlier outputs still on disk whose
    input the run did not list (deleted since, or in a folder not mounted: an empty listing removed every row).
    Removes it when no output has scores (a stale file would lie). A file of that name that batchsr did not
    write is left alone; one whose content would not change is not rewritten (nor its mode, owner, links)."""
    entries, listed = journal.entries(), set(inputs)
    kept = [rel for rel, entry in entries.items() if rel not in listed and (output_dir / entry[2]).is_file()]
    data = metrics_csv(entries, sorted([*inputs, *kept], key=lambda rel: PurePosixPath(rel).parts), scale)
    path = output_dir / METRICS_FILE
    try:
        with open(path, "rb") as handle:
            old, mode = handle.read(), os.fstat(handle.fileno()).st_mode & 0o7777
    except FileNotFoundError:
        old = mode = None
    if old is not None and not old.startswith(b"image,"):
        logger.warning("{}: not a metrics file batchsr wrote (its first line differs); left as it is", path)
        return None
    if data is None:
        if old is not None:
            path.unlink()
            logger.info("{} removed: no output has metrics now", path)
        return None
    if data != old:
        atomic_write(path, data, mode=mode)  # a mode the user gave it is kept
    return path
