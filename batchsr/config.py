"""Typed, validated settings: ``config.yaml`` for run/watch, a YAML file per training.

Every section rejects unknown keys; errors name the key, the bad value and what
is allowed.  Downstream code receives these objects, never raw dicts.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator

from batchsr.errors import ConfigError

Precision = Literal["float32", "mixed_float16", "mixed_bfloat16"]
def _non_empty_path(value):
    if isinstance(value, str) and not value.strip():  # "" would become the config file's own folder without a word
        raise ValueError("must name a file or folder, not be empty")
    return value


FilePath = Annotated[Path, Strict(False), BeforeValidator(_non_empty_path)]  # paths alone are taken from text


class _Section(BaseModel):
    # Strict: `batch_size: true` or `tile: "64"` is an error, not 1 or 64 (paths are FilePath).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)  # `lr: .inf` too


class ModelSettings(_Section):
    weights: FilePath | None = None  # None: the bundled model for `scale`
    scale: Literal[2, 3, 4] | None = None  # with weights null: which bundled model (default 4); else must match the weights


class EngineSettings(_Section):
    device: str = "auto"
    precision: Precision = "float32"
    tile: int = Field(128, ge=16, le=4096)
    overlap: int = Field(16, ge=0, le=512)
    batch_size: int = Field(8, ge=1, le=1024)
    flat_guard: float = Field(2.0, ge=0, le=255)  # 8-bit levels; 0 turns the flat-area guard off
    self_ensemble: bool = False  # mean over the 8 flips/rotations of each window: higher PSNR, 8x the model time

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|gpu|all|gpu:\d+(,\d+)*", value):
            raise ValueError("must be auto, cpu, gpu, gpu:N, a list gpu:N,M,... or all")
        return value


class RunSettings(_Section):
    recursive: bool = True
    output_format: Literal["same", "png", "jpg", "webp", "tiff"] = "same"
    jpeg_quality: int = Field(95, ge=1, le=100)
    webp_quality: int = Field(95, ge=1, le=101)
    decode_workers: int = Field(4, ge=1, le=64)
    write_workers: int = Field(2, ge=1, le=64)
    progress: Literal["auto", "bar", "log", "none"] = "auto"
    log_interval_s: float = Field(10.0, gt=0)
    outscale: float | None = Field(None, gt=0, le=64)  # None: the model's scale
    name_template: str = "{stem}{ext}"
    stream_megapixels: float = Field(16.0, gt=0)
    memory_mb: int | None = Field(None, ge=256)  # None: three quarters of the physical memory
    min_age_s: float = Field(0.0, ge=0, le=31_536_000)  # inputs modified more recently are left for the next run

    @property
    def memory_cap_mb(self) -> float:
        """``memory_mb``, or three quarters of the machine's physical memory."""
        if self.memory_mb is not None:
            return float(self.memory_mb)
        try:
            return 0.75 * os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e6
        except (ValueError, OSError, AttributeError):
            return 8192.0

    @field_validator("name_template")
    @classmethod
    def _name_template(cls, value: str) -> str:
        try:
            name = value.format(stem="a", ext=".png", scale="4", format="png")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"bad field {exc}; allowed fields: {{stem}}, {{ext}}, {{scale}}, {{format}}, each filled in "
                             "as text (the scale as 4 or 2.5): no number formats such as {scale:.1f}") from None
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise ValueError("must give a file name (no folders)")
        if value.format(stem="", ext="", scale="", format="") == value.format(stem="b", ext="", scale="", format=""):
            raise ValueError("must hold {stem}: without it the outputs of a folder's images all take one name")
        # The extension is what follows the input's name: a stem may hold dots (photo.v2) of its own.
        try:
            tail = value.rpartition("{stem}")[2].format(ext=".png", scale="4", format="png")
        except (KeyError, IndexError, ValueError):  # no plain {stem} last ({stem:>8}, or text "{{stem}}")
            tail = name
        if not re.search(r"\.[^.]+$", tail):
            raise ValueError(f"gives names without an extension ({name!r} for a.png): end it with {{ext}} or .{{format}}")
        if any(ord(c) < 32 or ord(c) == 127 for c in value):  # a NUL fails every image only once the run writes
            raise ValueError("must not hold control characters")
        return value


class ImageSettings(_Section):
    """How ``run``, ``watch`` and ``eval`` read and write images (README: Image fidelity)."""

    max_pixels: int = Field(200_000_000, ge=1)  # larger inputs are refused from their header
    alpha: Literal["model", "bicubic"] = "model"  # how the alpha plane is upscaled
    background: str = Field("#ffffff", pattern=r"^#[0-9a-fA-F]{6}$")  # transparent images flattened for JPEG/BMP

    @property
    def background_rgb(self) -> tuple[int, int, int]:
        return tuple(int(self.background[i : i + 2], 16) for i in (1, 3, 5))


class LoggingSettings(_Section):
    level: Literal["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR"] = "INFO"
    file: FilePath | None = None


class WatchSettings(_Section):
    """The hot-folder daemon (``batchsr watch``); output format, quality and workers come from ``run``."""

    inbox: FilePath = Path("/srv/batchsr/inbox")
    output: FilePath = Path("/srv/batchsr/output")
    done: FilePath = Path("/srv/batchsr/done")
    failed: FilePath = Path("/srv/batchsr/failed")
    state: FilePath = Path("/var/lib/batchsr")
    done_policy: Literal["move", "keep", "delete"] = "move"
    reference: FilePath | None = None
    settle_s: float = Field(2.0, ge=0)
    batch_images: int = Field(16, ge=1, le=4096)
    max_wait_s: float = Field(2.0, ge=0)
    max_attempts: int = Field(3, ge=1, le=1000)
    retry_delay_s: float = Field(30.0, ge=0)
    rescan_interval_s: float = Field(60.0, gt=0)
    polling: bool = False
    poll_interval_s: float = Field(1.0, gt=0)
    stop_timeout_s: float = Field(120.0, gt=0)
    journal_keep_days: float = Field(90.0, ge=0)  # 0: keep every finished entry


WATCH_FOLDERS = ("inbox", "output", "done", "failed", "state", "reference")


class Settings(_Section):
    model: ModelSettings = ModelSettings()
    engine: EngineSettings = EngineSettings()
    run: RunSettings = RunSettings()
    image: ImageSettings = ImageSettings()
    logging: LoggingSettings = LoggingSettings()
    watch: WatchSettings = WatchSettings()


class TrainModel(_Section):
    arch: Literal["unet", "seed"] = "unet"
    scale: Literal[2, 3, 4] = 4
    width: int = Field(32, ge=4, le=256)
    depth: int = Field(2, ge=0, le=4)
    blocks: int = Field(2, ge=0, le=16)
    top_width: int = Field(0, ge=0, le=256)  # channels of the full-resolution stages; 0: width
    top_blocks: int | None = Field(None, ge=0, le=16)  # residual blocks of the full-resolution stages; null: blocks

    @field_validator("top_width")
    @classmethod
    def _top_width(cls, value: int) -> int:
        if 0 < value < 4:
            raise ValueError("must be 0 (same as width) or at least 4")
        return value


class TrainSettings(_Section):
    """One training run; relative paths are taken from the training file's folder."""

    train_dirs: list[FilePath] = Field(min_length=1)
    val_dir: FilePath | None = None
    out_dir: FilePath = Path("runs/train")
    model: TrainModel = TrainModel()
    patch_size: int = Field(48, ge=8, le=512)  # low-resolution side of a training patch
    batch_size: int = Field(16, ge=1, le=1024)
    steps: int = Field(20000, ge=1)
    lr: float = Field(2e-4, gt=0)
    lr_min: float = Field(1e-6, ge=0)
    schedule: Literal["cosine", "step"] = "cosine"
    warmup_steps: int = Field(500, ge=0)
    step_milestones: list[int] = []  # for schedule: step
    step_gamma: float = Field(0.5, gt=0, le=1)
    loss: Literal["l1", "charbonnier", "l2"] = "l1"
    ema: float | None = Field(0.999, gt=0, lt=1)
    augment: bool = True
    permute_channels: bool = False  # also show each patch in one of the six orders of its RGB planes
    # HR images are also used downscaled by each factor (MATLAB bicubic, 8-bit): more
    # scales of texture from the same photos. [1.0]: only as they are.
    rescale: list[float] = Field([1.0], min_length=1)
    val_interval: int = Field(1000, ge=1)  # steps between validation and resumable checkpoints
    precision: Precision = "float32"
    seed: int = Field(0, ge=0, le=2**32 - 1)
    name: str = Field("model", pattern=r"^[A-Za-z0-9_.-]+$")
    tensorboard: bool = False  # also log to out_dir/tensorboard (needs TensorFlow installed)
    pipeline: Literal["auto", "tfdata", "numpy"] = "auto"  # auto: tf.data when TensorFlow is installed
    workers: int | None = Field(None, ge=1, le=256)  # threads making patches in the numpy pipeline; default one per CPU
    devices: Literal["auto", "all"] = "auto"  # all: data-parallel over every GPU (TensorFlow's MirroredStrategy)

    @model_validator(mode="after")
    def _consistent(self) -> "TrainSettings":
        if self.lr_min > self.lr:
            raise ValueError(f"lr_min ({self.lr_min}) must not exceed lr ({self.lr})")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below steps ({self.steps})")
        if not all(0.25 <= f <= 1.0 for f in self.rescale) or len(set(self.rescale)) != len(self.rescale):
            raise ValueError(f"rescale ({self.rescale}) must hold distinct factors in 0.25..1.0")
        if self.schedule == "cosine":  # silently ignored keys would train another schedule than the file reads
            fields = type(self).model_fields
            given = sorted(k for k in ("step_milestones", "step_gamma") if getattr(self, k) != fields[k].get_default())
            if given:
                raise ValueError(f"{' and '.join(given)} apply only to schedule: step (schedule is cosine)")
        milestones = self.step_milestones
        if milestones and (milestones != sorted(set(milestones)) or not 0 < milestones[0] or milestones[-1] >= self.steps):
            raise ValueError(f"step_milestones ({milestones}) must increase strictly within 1..steps-1 (steps: {self.steps})")
        return self


def _format_errors(error: ValidationError, source: str, section: type[BaseModel], flags: frozenset[str] = frozenset()) -> str:
    """One line per error; a key set by a command-line flag (in ``flags``) says so."""
    lines = [f"invalid configuration in {source}:"]
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        if key in flags:
            key += " (from the command line)"
        if item["type"] == "extra_forbidden":
            allowed = _allowed_keys(section, item["loc"][:-1])
            lines.append(f"  unknown key '{key}'; allowed here: {', '.join(allowed)}")
        elif not item["loc"]:  # a check across keys: the message names them
            lines.append(f"  {item['msg'].removeprefix('Value error, ')}")
        elif item["type"] == "missing":  # its input is the whole section: not worth printing
            lines.append(f"  {key}: required, and not given")
        elif item["type"] in ("model_type", "model_attributes_type"):
            lines.append(f"  {key} = {item.get('input')!r}: a section of keys belongs here")
        else:
            value = item.get("input")
            lines.append(f"  {key} = {value!r}: {item['msg']}{_quote_hint(value, item['type'])}")
    return "\n".join(lines)


def _quote_hint(value: Any, kind: str) -> str:
    """What YAML made of text written unquoted: ``#ffffff`` is a comment (null), ``{stem}`` a mapping."""
    if kind != "string_type":
        return ""
    if value is None:
        return " (empty: in YAML a value starting with # is a comment; quote it, as in '#ffffff')"
    if isinstance(value, (dict, list)):
        return " (YAML read a value starting with { or [ as a mapping or list; quote it, as in '{stem}_x{scale}{ext}')"
    return ""


def _allowed_keys(section: type[BaseModel], path: tuple) -> list[str]:
    model: Any = section
    for part in path:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return sorted(model.model_fields)


_SECTIONS = frozenset(Settings.model_fields)  # the mappings of config.yaml (and a training file's model)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error:
    silently keeping the last one hides edits made in the wrong place."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)) and key is not None:  # [a]: 1, {a: b}: 1
                raise yaml.constructor.ConstructorError(None, None, f"a key must be a name, not {key!r}", key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"found the key '{key}' twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 reads 2e-4 (no dot) as text; YAML 1.2, and everyone writing a learning rate, reads a number.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _read_yaml(path: Path, schema: type[BaseModel]) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"configuration {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.MarkedYAMLError as exc:  # its own text names "<unicode string>", not the file
        mark = exc.problem_mark or exc.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        line = text.splitlines()[mark.line] if mark and mark.line < len(text.splitlines()) else ""
        hint = "; a value starting with { [ & * ! | > % @ or ` must be quoted" if re.search(r":\s+[{\[&*!|>%@`]", line) else ""
        raise ConfigError(f"{path}{where} is not valid YAML: {exc.problem or exc.context}{hint}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    except ValueError as exc:  # a scalar YAML took for a date or number that is none (2024-13-45)
        raise ConfigError(f"{path}: a value cannot be read ({exc}); quote it if it is text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    _paths_as_written(data, yaml.load(text, Loader=yaml.BaseLoader), schema)  # noqa: S506 (text only)
    # A section whose keys are all commented out reads as null: it means "all defaults".
    return {key: {} if value is None and key in _SECTIONS else value for key, value in data.items()}


def _is_path(annotation: Any) -> bool:
    """``Path``, ``FilePath`` or an optional one; not a list of them."""
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) is list:
        return False
    return annotation is Path or any(_is_path(arg) for arg in get_args(annotation))


def _as_written(value: Any, written: Any) -> Any:
    return written if value is not None and not isinstance(value, str) and isinstance(written, str) else value


def _paths_as_written(data: dict, text: Any, schema: type[BaseModel]) -> None:
    """A path YAML read as a number, flag or date (``1e5``, ``2024-01-01``, ``on``) is the text as written:
    folder names are not numbers.  ``text`` is the same file read with every scalar as text."""
    if not isinstance(text, dict):
        return
    for key, field in schema.model_fields.items():
        value, written = data.get(key), text.get(key)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            if isinstance(value, dict):
                _paths_as_written(value, written, field.annotation)
        elif _is_path(field.annotation):
            if key in data:
                data[key] = _as_written(value, written)
        elif get_origin(field.annotation) is list and _is_path(get_args(field.annotation)[0]):
            if isinstance(value, list) and isinstance(written, list) and len(value) == len(written):
                data[key] = [_as_written(v, w) for v, w in zip(value, written)]


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot override {dotted}: '{part}' is not a section")
        node = child
    node[leaf] = value


def _resolve(base: Path, path: Path | None) -> Path | None:
    if path is None:
        return None
    path = path.expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def load_settings(path: Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Loads ``path`` (or the defaults) and applies dotted ``overrides`` such as ``engine.tile``."""
    data = _read_yaml(Path(path), Settings) if path is not None else {}
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, key, value)
    flags = frozenset(key for key, value in (overrides or {}).items() if value is not None)
    source = str(path) if path is not None else "the built-in defaults"
    if flags:
        source += " and the command line"
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source, Settings, flags)) from None
    if path is not None:
        base = Path(path).resolve().parent
        weights = settings.model.weights
        if weights is not None and "model" in data and not (overrides or {}).get("model.weights"):
            weights = _resolve(base, weights)
        logfile = _resolve(base, settings.logging.file) if "logging" in data else settings.logging.file
        in_file = data.get("watch") if isinstance(data.get("watch"), dict) else {}
        folders = {
            key: _resolve(base, getattr(settings.watch, key))
            for key in WATCH_FOLDERS
            if key in in_file and (overrides or {}).get(f"watch.{key}") is None
        }
        settings = settings.model_copy(
            update={
                "model": settings.model.model_copy(update={"weights": weights}),
                "logging": settings.logging.model_copy(update={"file": logfile}),
                "watch": settings.watch.model_copy(update=folders),
            }
        )
    return settings


def load_train_settings(path: Path, overrides: dict[str, Any] | None = None) -> TrainSettings:
    """Paths in the file are taken from its folder; a path given by a flag (``out_dir``) from the current one."""
    data = _read_yaml(Path(path), TrainSettings)
    in_file = set(data)
    flags = frozenset(key for key, value in (overrides or {}).items() if value is not None)
    for key in flags:
        _set_dotted(data, key, overrides[key])
    try:
        settings = TrainSettings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, f"{path}{' and the command line' if flags else ''}", TrainSettings, flags)) from None
    base = Path(path).resolve().parent
    return settings.model_copy(
        update={
            "train_dirs": [_resolve(base, p) for p in settings.train_dirs],
            "val_dir": _resolve(base, settings.val_dir),
            "out_dir": _resolve(base, settings.out_dir) if "out_dir" in in_file and "out_dir" not in flags else settings.out_dir,
        }
    )


def dump_settings(settings: BaseModel) -> str:
    """YAML of the effective settings, for ``batchsr config``."""
    return yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False)
