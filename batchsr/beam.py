"""``batchsr run --engine beam``: the same archive run as an Apache Beam pipeline.

Why Beam: the local engine is one process on one machine.  A Beam runner
(Dataflow, Flink, Spark) spreads the same work over many workers and reads and
writes any Beam filesystem (``gs://``, ``s3://``, HDFS) as well as local
folders.  Nothing about an image's treatment is new here: reading and
decoding (``imageio``), the engine with its tiling and batching (``engine``),
finishing, naming and huge-image streaming (``pipeline``), scoring and the
metrics CSV (``runner``) are batchsr's own, so an image comes out the same
from either engine.

The pipeline::

    match INPUT -> name each file from its first bytes -> group by output name
    (one input per output; a clash fails the later input, as in ``run``)
    -> read, hash, decode -> RunInference(EngineModelHandler: one Engine per
    worker process, batches of ``engine.batch_size`` tiles) -> finish, encode,
    write atomically, score -> results and dead letter

A failed image (unreadable, corrupt, too big, not written) becomes a line of
``OUTPUT/.batchsr/dead-letter.jsonl`` (``{"file", "reason"}``, in no
particular order) and never fails the pipeline.  The launching process waits
for the job, then writes ``metrics.csv`` with ``runner``'s own function and,
for a local OUTPUT, records the outputs in the journal, so that a later
``batchsr run`` into the same folder skips them.  Unlike the local engine a
Beam run redoes every image: it is meant for fresh bulk jobs.  In a local
OUTPUT it replaces, as ``run`` does, only files the journal wrote (``--force``:
any file); an object store has no journal, and its objects are replaced.

Beam is imported inside the functions and the ModelHandler subclass is built
on first use (module ``__getattr__``), so that this module imports without
the ``beam`` extra and ``run_beam`` can say how to install it.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from loguru import logger

from batchsr.checkpoint import model_weights, read_info
from batchsr.config import Settings
from batchsr.errors import ConfigError, ImageError, InputError, OutputError
from batchsr.imageio import Image, atomic_write, decode_image, mode_like, sniff_format, walk
from batchsr.lock import FolderLock
from batchsr.pipeline import (
    IMAGE_SUFFIXES, failure_reason, output_name, plan_route, process_rss_mb, target_format, upscale_each, write_streamed,
)
from batchsr.runner import (
    METRICS_FILE, STATE_DIR, Failure, Journal, ReferenceFolder, RunSummary, _write_metrics, check_folders_apart, check_output_dir,
    metrics_csv, output_options, reference_candidates, window_plan, write_output,
)

INSTALL_HINT = "pip install 'batchsr[beam]'"
DEAD_LETTER = "dead-letter.jsonl"
IN_PROCESS_RUNNERS = ("DirectRunner", "direct")  # Beam's names for its in-process runner
_FAILED, _RESULTS = "failed", "results"
# One model call at a time per process: Beam runs several bundles on threads
# that share the process's Engine (Engine.upscale is not meant for concurrent
# callers); decoding and encoding on the other threads still overlap it.
_MODEL_LOCK = threading.Lock()


def require_beam():
    """The ``apache_beam`` module, or a ConfigError that says how to install it."""
    try:
        import apache_beam
    except ImportError:
        raise ConfigError(f"--engine beam needs Apache Beam, which is not installed: {INSTALL_HINT}") from None
    return apache_beam


def is_local(location: str | os.PathLike) -> bool:
    """True for a plain path; False for a URI of another Beam filesystem (``gs://``, ``s3://``, ...)."""
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.get_scheme(os.fspath(location)) is None


def _location(location: str | os.PathLike) -> str:
    text = os.fspath(location)
    return os.path.abspath(text) if is_local(text) else text.rstrip("/")


@dataclass(frozen=True)
class _Job:
    """Everything a worker needs, pickled into each step: settings and the three roots."""

    settings: Settings
    source: str  # INPUT: an absolute path or a URI
    target: str  # OUTPUT
    reference: str | None
    scale: int

    @property
    def factor(self) -> float:
        return self.settings.run.outscale or self.scale

    @property
    def local_target(self) -> bool:
        return is_local(self.target)

    def relative(self, path: str) -> PurePosixPath | None:
        """``path`` relative to INPUT; None for what ``run`` never lists (hidden, inside OUTPUT)."""
        root = self.source.rstrip("/") + "/"
        if not path.startswith(root):
            return None
        rel = PurePosixPath(path[len(root):])
        if any(part.startswith(".") for part in rel.parts):
            return None
        if is_local(self.source) and any(_holds_state(root + "/".join(rel.parts[:k])) for k in range(1, len(rel.parts))):
            return None  # in the OUTPUT of another run: sibling outputs fed each other (see data.list_files)
        if self.local_target:
            out, real = Path(self.target).resolve(), Path(path).resolve()
            if real == out or out in real.parents:
                return None
        elif path.startswith(self.target + "/"):
            return None
        return rel

    def output(self, rel: str) -> str:
        return _join(self.target, rel)

    def target_format(self, image: Image) -> str:
        return target_format(image.format, self.settings.run.output_format)


@dataclass
class _Work:
    """One decoded input on its way through the model."""

    path: str
    rel: str
    out_rel: str
    sha256: str
    image: Image
    tiles: int  # its weight in a batch: windows through the model, alpha passes included
    stream: bool  # written band by band during inference (pipeline.write_streamed), without metrics


@dataclass
class _Upscaled:
    """What RunInference gives back for one input."""

    colour: np.ndarray | None = None
    alpha: np.ndarray | None = None
    ms: float = 0.0  # model time per image of its batch, as ``run`` reports it
    streamed: bool = False
    error: str | None = None


def _join(root: str, rel: str) -> str:
    from apache_beam.io.filesystems import FileSystems

    return os.path.join(root, *PurePosixPath(rel).parts) if is_local(root) else FileSystems.join(root, rel)


def _read(path: str, size: int = -1) -> bytes:
    from apache_beam.io.filesystems import CompressionTypes, FileSystems

    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return handle.read(size)


def _holds_state(folder: str) -> bool:
    return os.path.isdir(os.path.join(folder, STATE_DIR))


def _write(path: str, data: bytes, within: str | None = None, mode: int | None = None) -> None:
    """Atomic either way: a local file is renamed into place (no linked folder below ``within`` written
    through, ``mode`` its input's, as in ``run``); an object store shows an object once closed."""
    if is_local(path):
        atomic_write(Path(path), data, Path(within) if within is not None and is_local(within) else None, mode)
        return
    from apache_beam.io.filesystems import CompressionTypes, FileSystems

    with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        handle.write(data)


def _failure(path: str, reason: str) -> dict:
    logger.error("{}: {}", path, reason)
    return {"file": path, "reason": reason}


# Pipeline steps: plain functions, so that Beam pickles them by reference.

def _text_path(match):
    """The matched file's path, unless its name is no valid UTF-8, which no step could pass on (as in run)."""
    from apache_beam import pvalue

    path = match.path
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        shown = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        yield pvalue.TaggedOutput(_FAILED, _failure(shown, "the file name is not valid UTF-8; rename it to have it processed"))
        return
    yield path


def _name(path: str, job: _Job):
    """Sorts a matched file from its first bytes: ignored, failed, or keyed by its output name.

    Naming needs only the format, so inputs claim their outputs before any
    pixel is decoded and the grouping that follows moves names, not images.
    """
    from apache_beam import pvalue

    rel = job.relative(path)
    if rel is None:
        return
    try:
        head = _read(path, 16)
    except OSError as exc:
        yield pvalue.TaggedOutput(_FAILED, _failure(path, f"cannot read: {exc.strerror or exc}"))
        return
    fmt = sniff_format(head)
    if fmt is None:
        if rel.suffix.lower() not in IMAGE_SUFFIXES:  # empty too: only an image's name makes emptiness a failure
            logger.info("{}: not an image, ignored", path)
            yield pvalue.TaggedOutput(_RESULTS, {"status": "ignored", "file": path})
            return
        try:
            decode_image(head, path)  # empty or unknown content: the same reason ``run`` gives
        except ImageError as exc:
            yield pvalue.TaggedOutput(_FAILED, _failure(path, exc.reason))
        return
    run = job.settings.run
    out_rel = output_name(Path(rel), fmt, run.output_format, run.name_template, job.factor)
    yield PurePosixPath(out_rel).as_posix(), (rel.as_posix(), path)


def _through_link(root: str, rel: str) -> bool:
    """Whether ``rel``'s folders below ``root`` pass through a link; the write refuses such an output itself,
    for that reason."""
    at = root
    for part in PurePosixPath(rel).parts[:-1]:
        at = os.path.join(at, part)
        if os.path.islink(at):
            return True
        if not os.path.isdir(at):
            return False
    return False


def _claim(named, job: _Job, ours: frozenset[str] | None):
    """The first input (in ``run``'s order) gets the output; the others fail, as in ``run``.  So does the
    input whose output path holds a file the journal did not write (an original, another program's file):
    ``ours``, the outputs OUTPUT's journal knows as batchsr's (None: no such check, with --force or an OUTPUT
    without a journal, an object store).  Only this step is given them: each step's arguments are pickled."""
    from apache_beam import pvalue

    out_rel, inputs = named
    (rel, path), *others = sorted(inputs, key=lambda item: PurePosixPath(item[0]).parts)
    if ours is not None and out_rel not in ours and not _through_link(job.target, out_rel) \
            and os.path.lexists(job.output(out_rel)):
        yield pvalue.TaggedOutput(_FAILED, _failure(path, f"output {job.output(out_rel)} is there already, and this "
                                                          "OUTPUT's journal did not write it; not replaced (move it away, "
                                                          "or give --force to replace it)"))
    else:
        yield rel, path, out_rel
    for _, other in others:
        yield pvalue.TaggedOutput(_FAILED, _failure(other, f"output {out_rel} would overwrite the output of {path}"))


def _decode(claimed, job: _Job, info):
    """Reads an input whole, once, as ``run`` does: its hash goes to the journal, its pixels to the model."""
    from apache_beam import pvalue

    rel, path, out_rel = claimed
    try:
        data = _read(path)
    except OSError as exc:
        yield pvalue.TaggedOutput(_FAILED, _failure(path, f"cannot read: {exc.strerror or exc}"))
        return
    try:
        image = decode_image(data, path, max_pixels=job.settings.image.max_pixels)
    except ImageError as exc:
        yield pvalue.TaggedOutput(_FAILED, _failure(path, exc.reason))
        return
    settings = job.settings
    # As in ``run``: this worker process's memory (its model included) decides whole, band by band, or refused.
    route = plan_route(image, job.target_format(image), job.scale, settings.run, settings.engine.tile,
                       reference=job.reference is not None and float(job.factor).is_integer(), in_use_mb=process_rss_mb())
    if route.refusal is not None:
        yield pvalue.TaggedOutput(_FAILED, _failure(path, route.refusal))
        return
    if route.note:
        logger.warning("{}: {}", path, route.note)
    passes = 2 if image.alpha is not None and settings.image.alpha == "model" else 1
    tiles = len(window_plan(settings, info, image).tiles) * passes
    yield _Work(path, rel, out_rel, hashlib.sha256(data).hexdigest(), image, tiles, route.streamed)


def _tiles(work: _Work) -> int:
    return work.tiles


def _infer(job: _Job, batch: list[_Work], engine) -> list:
    """One engine call for the batch (as ``run`` does); huge images on their own, band by band."""
    from apache_beam.ml.inference.base import PredictionResult

    results = []
    together = [work for work in batch if not work.stream]
    with _MODEL_LOCK:
        if together:
            t0 = time.time()
            outputs = upscale_each(engine, [work.image for work in together], job.settings.image.alpha)
            ms = (time.time() - t0) * 1000.0 / len(together)
            results += [PredictionResult(work, _Upscaled(error=failure_reason(result)) if isinstance(result, Exception)
                                         else _Upscaled(*result, ms)) for work, result in zip(together, outputs)]
        for work in batch:
            if work.stream:
                results.append(PredictionResult(work, _stream(job, engine, work)))
    return results


def _stream(job: _Job, engine, work: _Work) -> _Upscaled:
    logger.info("{}: {}x{} upscaled band by band", work.path, *work.image.size)
    fmt = job.target_format(work.image)
    try:
        if job.local_target:
            write_streamed(engine, work.image, Path(job.output(work.out_rel)), fmt, job.settings.image.alpha, within=Path(job.target),
                           mode=mode_like(work.path) if is_local(work.path) else None)
        else:
            from apache_beam.io.filesystems import CompressionTypes, FileSystems

            with tempfile.TemporaryDirectory(prefix="batchsr-") as folder:
                local = Path(folder) / PurePosixPath(work.out_rel).name
                write_streamed(engine, work.image, local, fmt, job.settings.image.alpha)
                remote = job.output(work.out_rel)
                with open(local, "rb") as source, FileSystems.create(remote, compression_type=CompressionTypes.UNCOMPRESSED) as sink:
                    shutil.copyfileobj(source, sink, 1 << 22)
    except Exception as exc:  # noqa: BLE001 (one image's failure, as in run)
        return _Upscaled(streamed=True, error=failure_reason(exc))
    return _Upscaled(streamed=True)


def _finish(result, job: _Job):
    """Finishes, encodes, writes and scores one image with ``run``'s own function."""
    from apache_beam import pvalue

    work, upscaled = result.example, result.inference
    image, metrics = work.image, None
    if upscaled.error is not None:  # the reasons run gives
        stage = "output not written" if upscaled.streamed else "not upscaled"
        yield pvalue.TaggedOutput(_FAILED, _failure(work.path, f"{stage}: {upscaled.error}"))
        return
    try:
        if not upscaled.streamed:
            destination = functools.partial(_write, job.output(work.out_rel), within=job.target,
                                            mode=mode_like(work.path) if is_local(work.path) else None)
            written = write_output(image, upscaled.colour, upscaled.alpha, destination,
                                   job.settings, job.scale, name=work.path, rel=PurePosixPath(work.rel),
                                   references=_references(job.reference), ms=upscaled.ms)
            metrics = written.metrics
        elif job.reference is not None:  # recorded against its reference, as run records an image it streamed
            references = _references(job.reference)
            metrics = {"reference": references.identity(references.find(PurePosixPath(work.rel)))}
    except Exception as exc:  # noqa: BLE001 (one image's failure, as in run)
        yield pvalue.TaggedOutput(_FAILED, _failure(work.path, f"output not written: {failure_reason(exc)}"))
        return
    height, width = image.rgb.shape[:2]
    options = output_options(job.settings, job.target_format(image), job.factor, transparent=image.alpha is not None)
    yield {"status": "done", "file": work.path, "input": work.rel, "output": work.out_rel, "sha256": work.sha256,
           "metrics": metrics, "options": options, "megapixels": height * width * job.factor * job.factor / 1e6}


class _RemoteReferences(ReferenceFolder):
    """A reference folder on another Beam filesystem: the same candidates in the same order, read into memory."""

    def __init__(self, root: str):
        self.root = root  # a URI: no Path

    def find(self, rel: PurePosixPath) -> str | None:
        from apache_beam.io.filesystems import FileSystems

        for candidate in reference_candidates(rel):
            uri = _join(self.root, candidate.as_posix())
            if FileSystems.exists(uri):
                return uri
        return None

    def read(self, found: str) -> Image:
        return decode_image(_read(found), found)

    def identity(self, found: str | None) -> str | None:
        return found  # the URI: another filesystem's files are not stat'ed here

    def same(self, recorded: str | None, found: str | None) -> tuple[bool, str | None]:
        return recorded == found, None


def _references(root: str | None) -> ReferenceFolder | None:
    if root is None:
        return None
    return ReferenceFolder(Path(root)) if is_local(root) else _RemoteReferences(root)


def _inference_failures(failed):
    batch, (_, error, _) = failed
    for work in batch:
        yield _failure(work.path, f"not upscaled: {error}")


def _model_handler_class():
    from apache_beam.ml.inference.base import ModelHandler

    class EngineModelHandler(ModelHandler):
        """batchsr's Engine as a RunInference model.

        RunInference loads it once per worker process (a shared handle, not
        per bundle) and hands it batches weighed in tiles, so that a model call
        holds ``engine.batch_size`` windows as in ``run``.
        """

        def __init__(self, job: _Job):
            size = job.settings.engine.batch_size
            super().__init__(min_batch_size=size, max_batch_size=size, element_size_fn=_tiles)
            self.job = job

        def load_model(self):
            from batchsr.engine import Engine

            return Engine(model_weights(self.job.settings.model), self.job.settings.engine)

        def run_inference(self, batch, model, inference_args=None):
            return _infer(self.job, list(batch), model)

        def get_num_bytes(self, batch) -> int:
            return sum(work.image.rgb.nbytes for work in batch)  # the default pickles the batch

        def get_metrics_namespace(self) -> str:
            return "batchsr"

    EngineModelHandler.__qualname__ = "EngineModelHandler"  # pickled by reference, found through __getattr__
    return EngineModelHandler


def __getattr__(name: str):
    if name == "EngineModelHandler":
        globals()[name] = handler = _model_handler_class()
        return handler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def pipeline_options(runner: str | None, pipeline_args: list[str]):
    """Beam's PipelineOptions from ``pipeline_args``; ``runner`` (else the args', else DirectRunner) wins."""
    from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

    options = PipelineOptions(list(pipeline_args))
    standard = options.view_as(StandardOptions)
    standard.runner = runner or standard.runner or "DirectRunner"
    if standard.runner in IN_PROCESS_RUNNERS and not any(arg.startswith("--direct_running_mode") for arg in pipeline_args):
        options.view_as(DirectOptions).direct_running_mode = "in_memory"
    return options


def _runner(options):
    """The in-process FnApiRunner for DirectRunner; else the runner's name, for Beam to create.

    Beam's DirectRunner first tries Prism, a runner binary downloaded at run
    time; pinning the FnApiRunner (the DirectRunner's own batch engine) keeps a
    local run in this process and off the network.
    """
    from apache_beam.options.pipeline_options import StandardOptions

    if _in_process(options):
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return FnApiRunner()
    return options.view_as(StandardOptions).runner


def _in_process(options) -> bool:
    from apache_beam.options.pipeline_options import StandardOptions

    return options.view_as(StandardOptions).runner in IN_PROCESS_RUNNERS


def build_pipeline(pipeline, job: _Job, info, run_dir: str, ours: frozenset[str] | None = None) -> None:
    """Adds the run's steps to ``pipeline``: outputs, the dead letter, and a results file for the launcher."""
    import apache_beam as beam
    from apache_beam.io import fileio
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.ml.inference.base import RunInference

    # The folder is taken literally: "photos [2019]" is no character class.
    pattern = FileSystems.join(glob.escape(job.source), "**" if job.settings.run.recursive else "*")
    paths = (
        pipeline
        | "Match" >> fileio.MatchFiles(pattern, empty_match_treatment=fileio.EmptyMatchTreatment.ALLOW)
        | "Paths" >> beam.FlatMap(_text_path).with_outputs(_FAILED, main="paths")
    )
    named = paths.paths | "Name" >> beam.FlatMap(_name, job).with_outputs(_FAILED, _RESULTS, main="named")
    claimed = (
        named.named
        | "GroupByOutput" >> beam.GroupByKey()
        | "Claim" >> beam.FlatMap(_claim, job, ours).with_outputs(_FAILED, main="claimed")
    )
    decoded = claimed.claimed | "Decode" >> beam.FlatMap(_decode, job, info).with_outputs(_FAILED, main="work")
    handler = sys.modules[__name__].EngineModelHandler(job)  # built on first use: see __getattr__
    upscaled, dead = decoded.work | "Upscale" >> RunInference(handler).with_exception_handling(
        exc_class=(ImageError, OSError, ValueError)
    )
    written = upscaled | "Write" >> beam.FlatMap(_finish, job).with_outputs(_FAILED, main="done")
    not_upscaled = dead.failed_inferences | "Unbatch" >> beam.FlatMap(_inference_failures)
    failed = (
        (paths[_FAILED], named[_FAILED], claimed[_FAILED], decoded[_FAILED], written[_FAILED], not_upscaled)
        | "Failures" >> beam.Flatten()
        | "FailureLines" >> beam.Map(json.dumps, ensure_ascii=False)
    )
    _ = failed | "DeadLetter" >> beam.io.WriteToText(  # one file, written (empty too) on every run
        _join(job.target, f"{STATE_DIR}/{DEAD_LETTER}"), num_shards=1, shard_name_template="",
        compression_type=CompressionTypes.UNCOMPRESSED,
    )
    _ = (
        (named[_RESULTS], written.done)
        | "Results" >> beam.Flatten()
        | "ResultLines" >> beam.Map(json.dumps, ensure_ascii=False)
        | "WriteResults" >> beam.io.WriteToText(_join(run_dir, "results"), file_name_suffix=".jsonl",
                                                compression_type=CompressionTypes.UNCOMPRESSED)
    )


def run_beam(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    settings: Settings,
    *,
    reference_dir: str | os.PathLike | None = None,
    force: bool = False,
    runner: str | None = None,
    pipeline_args: list[str] | tuple[str, ...] = (),
) -> RunSummary:
    """Upscales every image under INPUT into OUTPUT with a Beam pipeline; see the module docstring.

    Same outputs, names, metrics.csv and summary as ``runner.run_folder``;
    ``runner`` names a Beam runner (default DirectRunner, in this process) and
    ``pipeline_args`` are Beam's own flags (``--project``, ``--region``, ...).
    ``force`` replaces files at output paths that OUTPUT's journal did not write.
    """
    require_beam()
    if settings.run.min_age_s:
        raise ConfigError(f"run.min_age_s = {settings.run.min_age_s:g}: not available with --engine beam; set it to 0")
    started = time.time()
    source, target = _location(input_dir), _location(output_dir)
    reference = _location(reference_dir) if reference_dir is not None else None
    if is_local(source) and not Path(source).is_dir():
        raise InputError(f"input folder {input_dir} does not exist or is not a folder")
    if reference is not None and is_local(reference) and not Path(reference).is_dir():
        raise InputError(f"reference folder {reference_dir} does not exist or is not a folder")
    if any(c in target for c in "[]*?"):  # Beam's writers match their own files under it as patterns
        raise OutputError(f"output {output_dir}: --engine beam cannot write under a path holding [, ], * or ?; choose another")
    if is_local(source) and is_local(target):
        check_folders_apart(Path(source), Path(target))
    elif source.rstrip("/") == target.rstrip("/") or source.startswith(target.rstrip("/") + "/"):
        raise OutputError(f"output {output_dir} is the input {input_dir} or contains it; choose an output outside the input")
    info = read_info(model_weights(settings.model))
    job = _Job(settings, source, target, reference, info.scale)
    options = pipeline_options(runner, list(pipeline_args))
    local_paths = [path for path in (source, target, reference) if path is not None and is_local(path)]
    if local_paths and not _in_process(options):
        logger.warning("the workers of {} read and write {} themselves: every worker must see them (else use gs://, s3://, ...)",
                       _runner_name(options), ", ".join(local_paths))
    lock = contextlib.nullcontext()
    if job.local_target:
        check_output_dir(Path(target))
        lock = FolderLock(Path(target) / STATE_DIR / "lock")
    with lock:
        ours = None
        if job.local_target and not force:  # read under the lock: no other run adds to it meanwhile
            journal = Journal(Path(target) / STATE_DIR / "journal.sqlite")
            try:
                ours = frozenset(journal.outputs())
            finally:
                journal.close()
        import apache_beam as beam

        run_dir = _join(target, f"{STATE_DIR}/beam-{uuid.uuid4().hex[:12]}")
        logger.info("beam pipeline on {}: {} -> {}; model {}", _runner_name(options), source, target, info.model_id)
        pipeline = beam.Pipeline(runner=_runner(options), options=options)
        build_pipeline(pipeline, job, info, run_dir, ours)
        begun_ns = time.time_ns()
        try:
            pipeline.run().wait_until_finish()
            summary = _summarise(job, info, run_dir)
        except BaseException:
            if job.local_target:  # what it wrote before it stopped: batchsr's, for the guard of the next `run`
                _adopt_written(Path(target), begun_ns)
            raise
        finally:
            _remove(run_dir)
    summary.seconds = time.time() - started
    return summary


def _runner_name(options) -> str:
    from apache_beam.options.pipeline_options import StandardOptions

    name = options.view_as(StandardOptions).runner
    return f"{name} (in process)" if _in_process(options) else name


def _lines(pattern: str) -> list[dict]:
    from apache_beam.io.filesystems import FileSystems

    rows = []
    for match in FileSystems.match([pattern])[0].metadata_list:
        rows += [json.loads(line) for line in _read(match.path).decode("utf-8").splitlines() if line.strip()]
    return rows


def _adopt_written(target: Path, begun_ns: int) -> None:
    """Records as batchsr's the files of a job that stopped early (created or replaced since it began, while it
    held OUTPUT's lock), so that a later `run` replaces them as its own instead of refusing them."""
    names = []
    for root, dirs, files in walk(target):
        dirs[:] = [d for d in dirs if d != STATE_DIR]
        for name in files:
            with contextlib.suppress(OSError):
                if os.lstat(os.path.join(root, name)).st_ctime_ns >= begun_ns - 1_000_000_000:  # the file system's coarse clock
                    names.append(Path(os.path.relpath(os.path.join(root, name), target)).as_posix())
    if names:
        journal = Journal(target / STATE_DIR / "journal.sqlite")
        try:
            journal.intend(names)
        except OutputError as exc:
            logger.warning("{}; the next run refuses the {} outputs this job wrote, unless given --force", exc, len(names))
        finally:
            journal.close()


def _summarise(job: _Job, info, run_dir: str) -> RunSummary:
    """The run's counts and failures, the journal (local OUTPUT) and metrics.csv, from the job's files."""
    summary = RunSummary(model_id=info.model_id)
    results = _lines(_join(run_dir, "results*"))
    failures = _lines(_join(job.target, f"{STATE_DIR}/{DEAD_LETTER}"))
    done = [row for row in results if row["status"] == "done"]
    summary.done = len(done)
    summary.ignored = sum(row["status"] == "ignored" for row in results)
    summary.megapixels = sum(row["megapixels"] for row in done)
    local_source = is_local(job.source)
    summary.failed = sorted((Failure(Path(row["file"]) if local_source else row["file"], row["reason"]) for row in failures),
                            key=lambda failure: str(failure.path))
    rels = [rel for rel in (job.relative(row["file"]) for row in results + failures) if rel is not None]
    inputs = [rel.as_posix() for rel in sorted(rels, key=lambda rel: rel.parts)]
    if job.local_target:
        journal = Journal(Path(job.target) / STATE_DIR / "journal.sqlite")
        try:
            journal.record_many([(row["input"], row["sha256"], info.model_id, row["output"], row["metrics"], row["options"], None)
                                 for row in done])
            if job.reference is not None or (Path(job.target) / METRICS_FILE).exists():  # drops rows of outputs redone unscored
                summary.metrics_csv = _write_metrics(Path(job.target), journal, inputs, job.scale)
        finally:
            journal.close()
    elif job.reference is not None:  # no journal there: this run's results are the entries
        entries = {row["input"]: (row["sha256"], info.model_id, row["output"], row["metrics"], row["options"]) for row in done}
        data = metrics_csv(entries, inputs, job.scale)
        if data is not None:
            summary.metrics_csv = _join(job.target, METRICS_FILE)
            _write(summary.metrics_csv, data)
    return summary


def _remove(folder: str) -> None:
    from apache_beam.io.filesystems import FileSystems

    with contextlib.suppress(Exception):  # a leftover folder of results is harmless; never mask the run's outcome
        if is_local(folder):
            shutil.rmtree(folder, ignore_errors=True)
        else:
            FileSystems.delete([folder + "/"])
