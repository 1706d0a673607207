"""The ``batchsr`` command: a thin layer over the library.

Library errors become one-line messages and sysexits-style exit codes here and
nowhere else.  Heavy modules (TensorFlow, OpenCV) load inside the commands, so
``batchsr --help`` answers at once.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import click

from batchsr import __version__, tfimport
from batchsr.errors import BatchSRError, ConfigError, ImageError, InputError, LockedError, ModelError, OutputError

EXIT_OK = 0
EXIT_FAILED_IMAGES = 65  # EX_DATAERR: some images failed
EXIT_NO_INPUT = 66  # EX_NOINPUT
EXIT_CANT_CREATE = 73  # EX_CANTCREAT: output not writable
EXIT_LOCKED = 75  # EX_TEMPFAIL: another instance holds the folder
EXIT_CONFIG = 78  # EX_CONFIG: bad configuration or model
EXIT_SOFTWARE = 70  # EX_SOFTWARE: a bug
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a job stopped by Ctrl-C

_EXIT_CODES = [
    (ConfigError, EXIT_CONFIG),
    (ModelError, EXIT_CONFIG),
    (InputError, EXIT_NO_INPUT),
    (ImageError, EXIT_FAILED_IMAGES),
    (OutputError, EXIT_CANT_CREATE),
    (LockedError, EXIT_LOCKED),
]


# Control characters but the tab: a file name holding a newline forged log lines (journald splits them into
# entries of their own), and escape sequences reached terminals through logs, `status` and failure lines.
_CONTROLS = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def _printable(text: str, *, newlines: bool = False) -> str:
    """``text`` with control characters shown as escapes (``\\n``, ``\\x1b``); ``newlines`` keeps line breaks."""

    def shown(match) -> str:
        char = match.group()
        return char if newlines and char == "\n" else char.encode("unicode_escape").decode("ascii")

    return _CONTROLS.sub(shown, text)


def _escape_controls(record) -> None:
    message = record["message"]
    record["message"] = _printable(message, newlines=message.startswith("internal error:\n"))  # a traceback keeps its lines


def _setup_logging(level: str, file: Path | None = None) -> None:
    from loguru import logger

    logger.configure(patcher=_escape_controls)
    logger.remove()
    logger.add(sys.stderr, level=level, format="<green>{time:HH:mm:ss}</green> <level>{level: <7}</level> {message}")
    if file is not None:
        try:
            logger.add(file, level=level, rotation="10 MB", retention=5)
        except OSError as exc:  # loguru opens the file at once: a bad path is a configuration error
            raise ConfigError(f"logging.file {file} cannot be opened for writing: {exc.strerror or exc}") from None


def _quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


class _Command(click.Command):
    """Turns library errors into a message and an exit code; anything else is a bug: exit 70, traceback in the log."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BrokenPipeError:  # the reader went away (`batchsr config | head`): nothing to report
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
            ctx.exit(128 + 13)  # as a shell tool killed by SIGPIPE
        except BatchSRError as exc:
            code = next(c for kind, c in _EXIT_CODES if isinstance(exc, kind))
            click.echo(_printable(f"batchsr: error: {exc}", newlines=True), err=True)  # one problem a line
            ctx.exit(code)
        except KeyboardInterrupt:  # Ctrl-C: the shell's code for SIGINT, not click's "Aborted!" and 1
            click.echo(f"batchsr: interrupted{_RESUMES.get(ctx.info_name, '')}", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # click's own ways out (usage errors, ctx.exit), not bugs
        except Exception as exc:
            _internal_error(ctx, exc)


# What a later start of a command takes up again after Ctrl-C; the others (eval, status, config) start over.
_RESUMES = {
    "run": " (a later run resumes: finished outputs are recorded)",
    "watch": " (a later start resumes: finished outputs are recorded)",
    "train": " (batchsr train --resume continues from the last checkpoint written)",
}


def _internal_error(ctx: click.Context, exc: Exception) -> None:
    """The traceback logged at ERROR (an unattended run cannot be rerun to see it), one line to report it, exit 70."""
    import traceback

    from loguru import logger

    logger.error("internal error:\n{}", "".join(traceback.format_exception(exc)).rstrip())
    what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    click.echo(f"batchsr: internal error: {what} (a bug: please report it with the traceback above)", err=True)
    ctx.exit(EXIT_SOFTWARE)


class _Group(click.Group):
    command_class = _Command


def _config_path(option: Path | None) -> Path | None:
    if option is not None:
        return option
    env = os.environ.get("BATCHSR_CONFIG")
    if env:
        return Path(env)
    local = Path("config.yaml")
    return local if local.is_file() else None


def _load(ctx: click.Context, overrides: dict, *, tensorflow: bool = True):
    from batchsr.config import load_settings

    settings = load_settings(ctx.obj["config"], overrides)
    _setup_logging(ctx.obj["log_level"] or settings.logging.level, settings.logging.file)
    tfimport.check_backend()
    if tensorflow:
        tfimport.import_tensorflow()
    return settings


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="batchsr")
@click.option("--config", "config", type=click.Path(path_type=Path),
              help="Settings file (default: $BATCHSR_CONFIG, else ./config.yaml if present, else built-in defaults).")
@click.option("--log-level", type=click.Choice(["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR"]),
              help="Overrides logging.level.")
@click.pass_context
def main(ctx: click.Context, config: Path | None, log_level: str | None) -> None:
    """batchsr: batch image super-resolution with a U-Net."""
    ctx.ensure_object(dict)
    ctx.obj["config"] = _config_path(config)
    ctx.obj["log_level"] = log_level
    _quiet_tensorflow()


def _engine_options(f):
    options = [
        click.option("--model", "weights", type=click.Path(path_type=Path), help="A .weights.h5 file with its .json (model.weights)."),
        click.option("--scale", type=click.Choice(["2", "3", "4"]),
                     help="Without --model: use the bundled model of this scale; with it: check its scale (model.scale)."),
        click.option("--device", help="auto, cpu, gpu, gpu:N, gpu:N,M,... or all (engine.device)."),
        click.option("--precision", type=click.Choice(["float32", "mixed_float16", "mixed_bfloat16"]), help="engine.precision."),
        click.option("--tile", type=int, help="Tile side in input pixels (engine.tile)."),
        click.option("--overlap", type=int, help="Context pixels around each tile (engine.overlap)."),
        click.option("--batch-size", type=int, help="Tiles per model call (engine.batch_size)."),
        click.option("--self-ensemble/--no-self-ensemble", default=None,
                     help="Average the 8 flips/rotations of each tile: higher PSNR, 8x the model time (engine.self_ensemble)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _engine_overrides(weights, scale, device, precision, tile, overlap, batch_size, self_ensemble) -> dict:
    return {
        "model.weights": str(weights) if weights else None,
        "model.scale": int(scale) if scale else None,
        "engine.device": device,
        "engine.precision": precision,
        "engine.tile": tile,
        "engine.overlap": overlap,
        "engine.batch_size": batch_size,
        "engine.self_ensemble": self_ensemble,
    }


@main.command()
@click.argument("input_dir", metavar="INPUT", type=click.Path())  # str: with --engine beam also a gs:// (etc.) URI
@click.argument("output_dir", metavar="OUTPUT", type=click.Path())
@click.argument("beam_args", metavar="[-- BEAM_OPTIONS...]", nargs=-1, type=click.UNPROCESSED)
@_engine_options
@click.option("--format", "output_format", type=click.Choice(["same", "png", "jpg", "webp", "tiff"]), help="run.output_format.")
@click.option("--reference", "reference_dir", type=click.Path(),
              help="Folder of HR references at the same relative paths: writes OUTPUT/metrics.csv.")
@click.option("--report", "report_dir", type=click.Path(path_type=Path), help="With --reference: an HTML visual report in this folder.")
@click.option("--force", is_flag=True, help="Redo images whose output is already up to date, and replace files at "
              "output paths that this OUTPUT's journal did not write.")
@click.option("--progress", type=click.Choice(["auto", "bar", "log", "none"]), help="run.progress.")
@click.option("--outscale", type=float, help="Output factor above 0, up to 64 (run.outscale): the model's scale, then a bicubic resize.")
@click.option("--name-template", help="Output file name, e.g. '{stem}_x{scale}{ext}' (run.name_template).")
@click.option("--min-age", type=float, help="Leave inputs modified less than this many seconds ago for the next run (run.min_age_s).")
@click.option("--engine", type=click.Choice(["local", "beam"]), default="local", show_default=True,
              help="local: this process; beam: an Apache Beam pipeline, INPUT and OUTPUT may be gs://, s3://... "
              "(pip install 'batchsr[beam]'; see docs/SCALING.md).")
@click.option("--runner", help="With --engine beam: the Beam runner (default DirectRunner, in this process). Beam's own options go after --.")
@click.pass_context
def run(ctx, input_dir, output_dir, beam_args, weights, scale, device, precision, tile, overlap, batch_size, self_ensemble, output_format, reference_dir, report_dir, force,
        progress, outscale, name_template, min_age, engine, runner):
    """Upscale every image under INPUT into OUTPUT (mirrored tree); exit 0, or 65 if some failed.

    With --engine beam the same run is an Apache Beam pipeline (docs/SCALING.md): e.g.
    `batchsr run gs://b/in gs://b/out --engine beam --runner DataflowRunner -- --project P --region R`.
    """
    overrides = _engine_overrides(weights, scale, device, precision, tile, overlap, batch_size, self_ensemble)
    overrides.update({"run.output_format": output_format, "run.progress": progress, "run.outscale": outscale, "run.name_template": name_template,
                      "run.min_age_s": min_age})
    settings = _load(ctx, overrides, tensorflow=False)
    from loguru import logger

    if report_dir is not None and reference_dir is None:
        raise ConfigError("--report needs --reference")
    info = None
    if engine != "beam":  # a mistyped folder or model is answered before TensorFlow's seconds of import
        from batchsr.runner import check_run

        info = check_run(Path(input_dir), Path(output_dir), settings, reference_dir=reference_dir)
        from batchsr.imageio import STATE_DIR
        from batchsr.lock import check_not_held

        check_not_held(Path(output_dir) / STATE_DIR / "lock")
        if report_dir is not None:
            from batchsr.report import check_report_dir

            check_report_dir(report_dir)
    if engine == "beam":
        if report_dir is not None:
            raise ConfigError("--report is not available with --engine beam")
        if settings.run.min_age_s:
            raise ConfigError(f"run.min_age_s = {settings.run.min_age_s:g}: not available with --engine beam; set it to 0")
        tfimport.import_tensorflow()
        from batchsr.beam import run_beam

        summary = run_beam(input_dir, output_dir, settings, reference_dir=reference_dir, force=force, runner=runner, pipeline_args=list(beam_args))
    else:
        if runner is not None or beam_args:
            raise ConfigError(f"--runner and Beam options after -- need --engine beam (got: {' '.join(beam_args) or '--runner'})")
        from batchsr.runner import run_folder

        summary = run_folder(Path(input_dir), Path(output_dir), settings, force=force,
                             reference_dir=Path(reference_dir) if reference_dir is not None else None,
                             report_dir=report_dir, info=info)
    logger.info(
        "done {}, skipped {}, failed {}, ignored {}{} in {:.1f}s ({:.2f} img/s, {:.1f} output MP)",
        summary.done, summary.skipped, len(summary.failed), summary.ignored,
        f", waiting {summary.waiting} (modified within run.min_age_s)" if summary.waiting else "",
        summary.seconds, summary.throughput, summary.megapixels,
    )
    if summary.metrics_csv is not None:
        logger.info("metrics: {}", summary.metrics_csv)
    if summary.report is not None:
        logger.info("report: {}", summary.report)
    for failure in summary.failed:
        click.echo(_printable(f"batchsr: failed: {failure.path}: {failure.reason}"), err=True)
    ctx.exit(EXIT_FAILED_IMAGES if summary.failed else EXIT_OK)


def _check_writable_file(path: Path, what: str) -> None:
    """A file about to be written atomically beside itself: its folder must exist and take files."""
    import os

    if path.is_dir():
        raise OutputError(f"{what} {path} is a folder, not a file")
    from batchsr.evaluate import written_in_place

    if written_in_place(path):
        return
    folder = Path(os.path.realpath(path)).parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {path}: folder {folder} does not exist or cannot be written")


@main.command("eval")
@click.option("--hr", "hr_dirs", multiple=True, required=True, type=click.Path(path_type=Path), help="Folder of HR images (repeatable).")
@_engine_options
@click.option("--bicubic-only", is_flag=True, help="Score the bicubic baseline only (no model).")
@click.option("--csv", "csv_path", type=click.Path(path_type=Path), help="Per-image CSV output.")
@click.option("--report", "report_dir", type=click.Path(path_type=Path), help="Write an HTML visual report into this folder.")
@click.pass_context
def eval_command(ctx, hr_dirs, scale, weights, device, precision, tile, overlap, batch_size, self_ensemble, bicubic_only, csv_path, report_dir):
    """Standard benchmark protocol: LR by MATLAB bicubic, PSNR/SSIM on Y with a `scale` border."""
    settings = _load(ctx, _engine_overrides(weights, scale, device, precision, tile, overlap, batch_size, self_ensemble))
    from batchsr.evaluate import evaluate_set, markdown_table, plan_sets, write_csv

    if csv_path is not None:  # before hours of scoring, not after
        _check_writable_file(csv_path, "--csv")
    scale = settings.model.scale
    if not bicubic_only or settings.model.weights is not None:  # the weights' scale, checked against --scale
        from batchsr.checkpoint import model_weights, read_info

        scale = read_info(model_weights(settings.model)).scale
    if scale is None:
        raise ConfigError("--scale is required with --bicubic-only")
    if report_dir is not None and bicubic_only:
        raise ConfigError("--report needs a model (drop --bicubic-only)")
    if report_dir is not None:
        from batchsr.report import check_report_dir

        check_report_dir(report_dir)
    hr_sets = plan_sets(hr_dirs, scale)
    engine = None
    if not bicubic_only:
        from batchsr.engine import Engine

        engine = Engine(model_weights(settings.model), settings.engine)
    results = [evaluate_set(hr_set, scale, engine, keep_images=report_dir is not None, max_pixels=settings.image.max_pixels)
               for hr_set in hr_sets]
    if csv_path is not None:
        write_csv(results, csv_path)
    if report_dir is not None:
        from batchsr.evaluate import summary_rows
        from batchsr.report import write_report

        page = write_report(report_dir, [im for r in results for im in r.images], f"batchsr x{scale}: {engine.model_id}", summary_rows(results, scale))
        click.echo(f"report: {page}", err=True)
    click.echo(markdown_table(results, scale, engine is not None))


@main.command()
@click.argument("train_config", type=click.Path(path_type=Path))
@click.option("--resume", is_flag=True, help="Continue the run in out_dir exactly where it stopped.")
@click.option("--init", "init", type=click.Path(path_type=Path), help="Warm-start from these weights (fine-tuning).")
@click.option("--steps", type=int, help="Overrides steps.")
@click.option("--out-dir", type=click.Path(path_type=Path), help="Overrides out_dir.")
@click.option("--until", type=click.IntRange(min=1), help="Stop this sitting at this step, rounded up to a validation interval "
              "(resume later with --resume).")
@click.pass_context
def train(ctx, train_config, resume, init, steps, out_dir, until):
    """Train a model from a training YAML (see configs/)."""
    from batchsr.config import load_settings, load_train_settings

    settings = load_train_settings(train_config, {"steps": steps, "out_dir": str(out_dir) if out_dir else None})
    logging = load_settings(ctx.obj["config"]).logging  # the one logging set-up every command follows
    _setup_logging(ctx.obj["log_level"] or logging.level, logging.file)
    tfimport.check_backend()
    tfimport.import_tensorflow()
    from batchsr.train import train as run_training

    result = run_training(settings, resume=resume, init=init, until=until)
    if result.step < settings.steps:
        click.echo(f"stopped at step {result.step} of {settings.steps}: continue with --resume")
        return
    click.echo(f"final weights: {result.final_weights}")
    if result.best_weights and result.best_psnr is not None:
        click.echo(f"best weights:  {result.best_weights} (validation Y-PSNR {result.best_psnr:.3f} dB)")


def _absolute(path: Path | None) -> str | None:
    """Flag paths are taken from the current folder (file paths from the file's folder)."""
    return str(Path(os.path.abspath(path))) if path is not None else None


@main.command()
@_engine_options
@click.option("--inbox", type=click.Path(path_type=Path), help="watch.inbox.")
@click.option("--output", "output_dir", type=click.Path(path_type=Path), help="watch.output.")
@click.option("--done", "done_dir", type=click.Path(path_type=Path), help="watch.done (inputs whose output is written).")
@click.option("--failed", "failed_dir", type=click.Path(path_type=Path), help="watch.failed (inputs that kept failing).")
@click.option("--state", "state_dir", type=click.Path(path_type=Path), help="watch.state (journal and lock).")
@click.option("--polling/--no-polling", default=None, help="watch.polling (needed on NFS and SMB mounts).")
@click.pass_context
def watch(ctx, weights, scale, device, precision, tile, overlap, batch_size, self_ensemble, inbox, output_dir, done_dir, failed_dir,
          state_dir, polling):
    """Upscale each image dropped into the inbox, once (a daemon: stops on SIGTERM or SIGINT)."""
    overrides = _engine_overrides(weights, scale, device, precision, tile, overlap, batch_size, self_ensemble)
    overrides.update({"watch.inbox": _absolute(inbox), "watch.output": _absolute(output_dir), "watch.done": _absolute(done_dir),
                      "watch.failed": _absolute(failed_dir), "watch.state": _absolute(state_dir), "watch.polling": polling})
    settings = _load(ctx, overrides)
    import threading

    from loguru import logger

    from batchsr.watch import serve, stop_on_signals

    stop = threading.Event()
    stop_on_signals(stop, settings.watch.stop_timeout_s, settings.watch.state)
    summary = serve(settings, stop)
    logger.info("stopped after {:.0f}s: {} done, {} failed (model {})", summary.seconds, summary.done, summary.failed, summary.model_id)


_SHOWN_PROBLEMS = 20  # lines of skipped inbox entries in the text report


@main.command()
@click.option("--state", "state_dir", type=click.Path(path_type=Path), help="watch.state (default: from the configuration).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("--errors", default=10, show_default=True, type=click.IntRange(0, 1000), help="How many recent errors to list.")
@click.pass_context
def status(ctx, state_dir, as_json, errors):
    """Queue, files by state, throughput and recent errors of `watch`, read from its journal."""
    import json

    from batchsr.config import load_settings
    from batchsr.journal import ACTIVE, STATES, read_status

    settings = load_settings(ctx.obj["config"], {"watch.state": _absolute(state_dir)})
    report = read_status(settings.watch.state, errors)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2, ensure_ascii=False))
        return
    oldest = "" if report.oldest_queued_s is None else f" (oldest {report.oldest_queued_s:.0f}s)"
    click.echo(f"journal:   {report.journal}")
    click.echo(f"daemon:    {report.daemon or 'not running'}")
    click.echo(f"queue:     {report.queue}{oldest}: " + ", ".join(f"{s} {report.counts[s]}" for s in ACTIVE))
    click.echo("states:    " + ", ".join(f"{s} {report.counts[s]}" for s in STATES))
    click.echo(f"last hour: {report.done_last_hour} done ({report.images_per_minute:.2f} images/min over the hour)")
    if report.errors:
        click.echo("recent errors:")
        for error in report.errors:
            click.echo(_printable(f"  {error['time']}  {error['state']:<8}  {error['file']}: {error['error']} (tries: {error['attempts']})"))
    if report.inbox_problems:
        click.echo("skipped in the inbox:")
        for problem in report.inbox_problems[:_SHOWN_PROBLEMS]:
            click.echo(_printable(f"  {problem['since']}  {problem['path']}: {problem['reason']}"))
        if len(report.inbox_problems) > _SHOWN_PROBLEMS:
            click.echo(f"  ... and {len(report.inbox_problems) - _SHOWN_PROBLEMS} more (--json lists them all)")


@main.command()
@click.pass_context
def config(ctx):
    """Print the effective configuration (file plus defaults, --log-level applied) as YAML."""
    from batchsr.config import dump_settings, load_settings

    source = ctx.obj["config"]
    settings = load_settings(source, {"logging.level": ctx.obj["log_level"]})
    click.echo(f"# from {source if source else 'built-in defaults'}")
    click.echo(dump_settings(settings), nl=False)


if __name__ == "__main__":  # pragma: no cover
    main()
