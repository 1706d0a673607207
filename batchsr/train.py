"""Training: the same model code as inference, fed by the tf.data patch pipeline.

The loop is Keras ``fit`` (backend-agnostic); only the input pipeline uses
TensorFlow.  A resumable checkpoint is written after every validation
interval: model weights, every optimizer variable (moments, EMA, step, loss scale) and the
state, so ``--resume`` continues exactly — the patch stream is indexed by step.
``devices: all`` trains data-parallel with TensorFlow's MirroredStrategy: the
model and optimizer are built in its scope and each device takes a slice of
every batch (``batch_size`` stays the global batch).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import importlib.util
import io
import json
import os
import platform
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from loguru import logger

from batchsr.config import TrainModel, TrainSettings
from batchsr.errors import ConfigError, ModelError, OutputError
from batchsr.imageio import atomic_write, from_float, sync_folder, to_float
from batchsr.lock import FolderLock
from batchsr.metrics import psnr, rgb_to_y
from batchsr.resize import degrade


@dataclass
class TrainResult:
    step: int
    best_psnr: float | None
    final_weights: Path
    best_weights: Path | None
    seconds: float


def _schedule(settings: TrainSettings):
    import keras
    from keras import ops

    @keras.saving.register_keras_serializable(package="batchsr")
    class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
        """Linear warm-up, then cosine decay to ``lr_min`` or steps at milestones."""

        def __call__(self, step):
            step = ops.cast(step, "float32")
            warm = float(max(settings.warmup_steps, 1))
            warmup = settings.lr * ops.minimum(1.0, (step + 1.0) / warm)
            if settings.schedule == "cosine":
                span = float(max(settings.steps - settings.warmup_steps, 1))
                t = ops.clip((step - settings.warmup_steps) / span, 0.0, 1.0)
                decayed = settings.lr_min + 0.5 * (settings.lr - settings.lr_min) * (1.0 + ops.cos(np.pi * t))
            else:
                passed = sum(ops.cast(step >= m, "float32") for m in settings.step_milestones) if settings.step_milestones else 0.0
                decayed = ops.maximum(settings.lr * ops.power(settings.step_gamma, passed), settings.lr_min)
            if settings.warmup_steps == 0:
                return decayed
            return ops.where(step < settings.warmup_steps, warmup, decayed)

        def get_config(self):
            return {}

    return WarmupSchedule()


def _loss(kind: str):
    from keras import ops

    if kind == "l1":
        return "mean_absolute_error"
    if kind == "l2":  # the loss PSNR measures; on the bundled models it did worse than L1 (docs/MODEL.md)
        return "mean_squared_error"

    def charbonnier(y_true, y_pred):
        diff = y_true - y_pred
        return ops.mean(ops.sqrt(diff * diff + 1e-6))

    return charbonnier


def _sync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


class _Checkpoints:
    """``out_dir/checkpoints/step-N/`` folders and a ``latest`` pointer written atomically."""

    def __init__(self, out_dir: Path):
        self.root = out_dir / "checkpoints"

    def latest(self) -> Path | None:
        """The checkpoint to resume from; a missing or damaged pointer falls back on the newest complete
        checkpoint (a step folder is complete once renamed into place), rather than on none: a fresh run
        would delete it at its first save."""
        pointer = self.root / "latest"
        name = pointer.read_text().strip() if pointer.is_file() else ""
        if name and (self.root / name / "state.json").is_file():
            return self.root / name
        steps = sorted(self.root.glob("step-*"))
        complete = [folder for folder in steps if (folder / "state.json").is_file()]
        if complete:
            logger.warning("{}: the pointer is missing or names no checkpoint; the newest complete one is {}", pointer, complete[-1].name)
            return complete[-1]
        if steps:
            raise ModelError(f"{self.root}: checkpoint folders without their state.json; move them away to start afresh")
        return None

    def save(self, step: int, model, optimizer, state: dict) -> Path:
        folder = self.root / f"step-{step:08d}"
        tmp = self.root / f".tmp-step-{step:08d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model.save_weights(tmp / "model.weights.h5")
        np.savez(tmp / "optimizer.npz", *[np.asarray(v.numpy() if hasattr(v, "numpy") else v) for v in optimizer.variables])
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        for written in tmp.iterdir():  # on disk before the older checkpoints go: they are removed below
            _sync_file(written)
        sync_folder(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        pointer_tmp = self.root / ".latest.tmp"
        pointer_tmp.write_text(folder.name)
        _sync_file(pointer_tmp)
        os.replace(pointer_tmp, self.root / "latest")
        sync_folder(self.root)
        for old in self.root.glob("step-*"):
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)
        return folder


_FILE_OVERHEAD = 1 << 20  # an HDF5 or NPZ file's own structure beside its arrays, generously


def _bytes_of(variables) -> int:
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables)


def _check_room(folder: Path, needed: int, what: str) -> None:
    """h5py crashes the process (a segfault) when the disk fills while it writes: a save first makes sure of
    its room, so that a full disk is an error with the last checkpoint kept."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OutputError(f"{folder}: {free / 1e6:.1f} MB free, saving {what} needs about {needed / 1e6:.1f} MB; "
                          f"free some space, then continue with --resume (the last checkpoint is kept)")


# What decides the patch stream: changing one on --resume would not continue the run, but start another.
# (train_dirs may change: the same images at another path, as on another machine, give the same stream.)
_STREAM_KEYS = ("rescale", "patch_size", "batch_size", "seed", "augment", "permute_channels")


def _check_resumed_recipe(saved: dict, current: dict, checkpoint: Path) -> None:
    """Refuses a resume whose patch stream would differ; names the other changed keys (schedule, loss...)."""
    defaults = TrainSettings.model_fields

    def value(settings: dict, key: str):
        return settings[key] if key in settings else defaults[key].get_default()  # keys newer than the checkpoint

    changed = sorted(k for k in current if k not in ("out_dir", "model") and value(saved, k) != value(current, k))
    stream = [k for k in changed if k in _STREAM_KEYS]
    if (value(saved, "ema") is None) != (value(current, "ema") is None):
        raise ConfigError(f"--resume: ema ({value(saved, 'ema')!r} -> {value(current, 'ema')!r}) changed since {checkpoint}; "
                          "the optimizer keeps an average only while ema is set. Restore it, or start a new run with --init")
    if stream:
        raise ConfigError(f"--resume: {', '.join(f'{k} ({value(saved, k)!r} -> {value(current, k)!r})' for k in stream)} "
                          f"changed since {checkpoint}; the run would not continue its patch stream. Restore them, "
                          "or start a new run with --init")
    if changed:
        logger.warning("--resume: {} changed since {}; the run continues with the new values",
                       ", ".join(f"{k} ({value(saved, k)!r} -> {value(current, k)!r})" for k in changed), checkpoint)


def _fingerprint(images: list[np.ndarray]) -> str:
    """The training images' content, in order: what the patch stream is drawn from."""
    digest = hashlib.sha256()
    for image in images:
        digest.update(repr(image.shape).encode())
        digest.update(np.ascontiguousarray(image).data)
    return f"{len(images)} images, sha256 {digest.hexdigest()[:16]}"


def _trim_log(path: Path, step: int) -> None:
    """Keeps the log rows up to ``step``, where the resumed run continues."""
    if not path.exists():
        return
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    kept = rows[:1] + [row for row in rows[1:] if row and row[0].isdigit() and int(row[0]) <= step]
    if len(kept) <= 1:
        path.unlink()  # started again with its header
    elif kept != rows:
        buffer = io.StringIO()
        csv.writer(buffer).writerows(kept)
        atomic_write(path, buffer.getvalue().encode("utf-8"))


def _load_validation(settings: TrainSettings):
    if settings.val_dir is None:
        return []
    from batchsr.data import find_images, has_transparency
    from batchsr.imageio import read_image, to_uint8

    if not Path(settings.val_dir).is_dir():
        raise ConfigError(f"val_dir {settings.val_dir} does not exist or is not a folder")
    val = Path(settings.val_dir).resolve()
    for folder in settings.train_dirs:
        train = Path(folder).resolve()
        if val == train or train in val.parents or val in train.parents:  # the best weights would be chosen on training images
            logger.warning("val_dir {} and train_dirs {} share images: validation scores images the model trains on, "
                           "so the best weights are not chosen on unseen ones", settings.val_dir, folder)
    pairs = []
    scale = settings.model.scale
    for path in find_images(settings.val_dir):
        image = read_image(path)
        if has_transparency(image):
            raise ConfigError(f"val_dir image {path} has transparent pixels: the colour under them is no photo to score "
                              "against; flatten it or take it out")
        hr = to_uint8(image.rgb)
        if min(hr.shape[:2]) < 4 * scale:  # scored with a border of scale pixels cropped on each side
            raise ConfigError(f"val_dir image {path} is {hr.shape[1]}x{hr.shape[0]}: too small to validate at x{scale} "
                              f"(at least {4 * scale} px a side)")
        lr = degrade(hr, settings.model.scale)
        pairs.append((path.stem, to_float(lr), hr[: lr.shape[0] * settings.model.scale, : lr.shape[1] * settings.model.scale]))
    if not pairs:
        raise ConfigError(f"val_dir {settings.val_dir} holds no images")
    return pairs


def validate(model, pairs, scale: int) -> float:
    """Mean Y-PSNR (border ``scale``) over the validation pairs."""
    scores = []
    for _, lr, hr in pairs:
        sr = np.asarray(model(lr[None], training=False))[0]
        out = from_float(sr, np.uint8)
        scores.append(psnr(rgb_to_y(out), rgb_to_y(hr), border=scale))
    return float(np.mean(scores))


def _ema_values(optimizer, model) -> list[np.ndarray]:
    averages = getattr(optimizer, "_model_variables_moving_average", None)
    source = averages if averages else model.trainable_variables
    return [np.asarray(v.numpy() if hasattr(v, "numpy") else v) for v in source]


def _input_groups(layer_name: str, config) -> list[int] | None:
    """Channel groups of a decoder stage's input (upsampled, skip), which widening shifts apart."""
    if layer_name.startswith("dec") and layer_name.endswith("_in_conv"):
        width = config.stage_width(int(layer_name[3:].split("_")[0]))
        return [width, width]
    return None


def _widened(old: list[np.ndarray], fresh: list[np.ndarray], transposed: bool,
             old_groups: list[int] | None, new_groups: list[int] | None) -> list[np.ndarray]:
    """Embeds a narrower layer's kernel and bias into a wider one so that the old output
    channels compute exactly what they did: new inputs feed them with zeros, new outputs
    keep their fresh initialisation."""
    kernel, new_kernel = old[0], fresh[0].copy()
    # Work on (h, w, in, out) views; Conv2DTranspose kernels are (h, w, out, in).
    view = new_kernel.swapaxes(2, 3) if transposed else new_kernel
    kernel = kernel.swapaxes(2, 3) if transposed else kernel
    old_groups = old_groups or [kernel.shape[2]]
    new_groups = new_groups or [view.shape[2]]
    starts = np.cumsum([0] + new_groups[:-1])
    inputs = np.concatenate([start + np.arange(n) for start, n in zip(starts, old_groups)])
    n_out = kernel.shape[3]
    view[..., :n_out] = 0.0
    view[:, :, inputs, :n_out] = kernel
    if len(old) == 1:
        return [new_kernel]
    bias = fresh[1].copy()
    bias[:n_out] = old[1]
    return [new_kernel, bias]


def _warm_start(model, init: Path, config) -> dict:
    """Copies every layer the two models share; a wider model (``width``/``top_width``)
    starts as an exact copy of the narrower one, its new channels free to learn, and so
    does a deeper one (``blocks``/``top_blocks``): its new residual blocks start as the identity."""
    from batchsr.checkpoint import load_model
    from batchsr.model import ModelConfig

    source, info = load_model(init)
    source_config = ModelConfig.from_dict(info.config)
    copied, widened, skipped = 0, [], []
    for layer in source.layers:
        weights = layer.get_weights()
        if not weights:
            continue
        try:
            target = model.get_layer(layer.name)
        except ValueError:
            skipped.append(layer.name)
            continue
        fresh = target.get_weights()
        shapes, new_shapes = [w.shape for w in weights], [w.shape for w in fresh]
        if new_shapes == shapes:
            target.set_weights(weights)
            copied += 1
        elif (
            len(shapes) == len(new_shapes)
            and all(len(a) == len(b) and all(m <= n for m, n in zip(a, b)) for a, b in zip(shapes, new_shapes))
            and type(layer).__name__ in ("Conv2D", "Conv2DTranspose")
            and source_config.scale == config.scale  # a head's channels mean other pixels at another scale
        ):
            transposed = type(layer).__name__ == "Conv2DTranspose"
            target.set_weights(_widened(weights, fresh, transposed,
                                        _input_groups(layer.name, source_config), _input_groups(layer.name, config)))
            widened.append(layer.name)
        else:
            skipped.append(layer.name)
    # A residual block the source lacks (more ``blocks``/``top_blocks``) starts as the identity:
    # zeros in its last convolution, so a deeper model too starts at the source's output.
    source_names = {layer.name for layer in source.layers}
    added = [layer for layer in model.layers if layer.name not in source_names
             and re.search(r"_res\d+_b_conv$", layer.name) and layer.get_weights()]
    for layer in added:
        layer.set_weights([np.zeros_like(w) for w in layer.get_weights()])
    if not copied and not widened:
        raise ConfigError(f"--init {init} ({info.model_id}): no layer fits the training config's model {config}; "
                          "nothing would be warm-started")
    # At another scale the head must start afresh; any other layer left behind is a model that forgets.
    lost = [name for name in skipped if not (name == "head_conv" and source_config.scale != config.scale)]
    (logger.warning if lost else logger.info)(
        "warm start from {} ({}): {} layers copied, {} widened, {} new residual blocks as identity, skipped {}{}",
        init, info.model_id, copied, len(widened), len(added), skipped or "none",
        f": the training config's model ({config}) does not hold them; leave out its model keys to train the "
        f"shape of {init.name}" if lost else "",
    )
    return {"from": info.model_id, "weights": init.name}


def _one_blas_thread():
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def _distribution(devices: str):
    """The scope the model and optimizer are built in: MirroredStrategy for ``devices: all``."""
    if devices == "auto":
        return contextlib.nullcontext()
    import keras

    if keras.backend.backend() != "tensorflow":
        raise ConfigError(f"devices: all needs the TensorFlow backend (MirroredStrategy), not {keras.backend.backend()}")
    import tensorflow as tf

    kind = "GPU" if tf.config.list_logical_devices("GPU") else "CPU"
    names = [d.name for d in tf.config.list_logical_devices(kind)]
    strategy = tf.distribute.MirroredStrategy(names)
    logger.info("data-parallel training on {} replicas: {}", strategy.num_replicas_in_sync, ", ".join(names))
    return strategy.scope()


def _with_model_of(settings: TrainSettings, model: dict) -> TrainSettings:
    """``settings`` whose model keys the training YAML left out are those of ``model`` (another run's, or the
    model a run warm-starts from): fine-tuning a model trains its shape, not the defaults'."""
    given = settings.model.model_dump(include=settings.model.model_fields_set)
    merged = TrainModel.model_validate({**{k: v for k, v in model.items() if k in TrainModel.model_fields}, **given})
    return settings.model_copy(update={"model": merged})


def train(
    settings: TrainSettings,
    resume: bool = False,
    init: Path | None = None,
    progress: bool | None = None,
    until: int | None = None,
) -> TrainResult:
    """Trains (or resumes) a run; ``until`` stops this sitting early at that step (rounded up
    to a validation interval), leaving a checkpoint that ``resume`` continues."""
    import keras

    keras.utils.set_random_seed(settings.seed)
    out_dir = Path(settings.out_dir)
    from batchsr.runner import check_output_dir

    # A data folder or --init mistyped is said before out_dir is made: a new run leaves nothing behind.
    for folder in settings.train_dirs:
        if not Path(folder).is_dir():
            raise ConfigError(f"train_dirs: {folder} does not exist or is not a folder")
    if settings.val_dir is not None and not Path(settings.val_dir).is_dir():
        raise ConfigError(f"val_dir {settings.val_dir} does not exist or is not a folder")
    if init is not None:
        from batchsr.checkpoint import read_info

        settings = _with_model_of(settings, read_info(init).config)  # the YAML's model keys left out: the init's
    # before any work: a folder that cannot take checkpoints fails at once, not after an interval
    check_output_dir(out_dir, "out_dir")
    check_output_dir(out_dir / "checkpoints", "checkpoint folder")
    with FolderLock(out_dir / ".batchsr-train.lock"):  # two trainings in one out_dir would mix their checkpoints
        return _train_locked(settings, resume, init, progress, until, out_dir)


def _train_locked(settings: TrainSettings, resume: bool, init: Path | None, progress: bool | None, until: int | None,
                  out_dir: Path) -> TrainResult:
    import keras

    from batchsr.checkpoint import save_model
    from batchsr.data import load_training_images, numpy_training_batches, training_dataset
    from batchsr.model import ModelConfig, build_model

    if settings.tensorboard and keras.backend.backend() == "tensorflow" and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("tensorboard: true needs the tensorboard package (pip install tensorboard), which TensorFlow "
                          "no longer brings")
    ckpts = _Checkpoints(out_dir)
    config = ModelConfig(**settings.model.model_dump())
    scale = config.scale
    pipeline = settings.pipeline
    if pipeline == "auto":
        pipeline = "tfdata" if importlib.util.find_spec("tensorflow") else "numpy"
    state = {"step": 0, "best_psnr": None, "seconds": 0.0, "pipeline": pipeline, "settings": settings.model_dump(mode="json")}
    latest = ckpts.latest()
    if resume and latest is None:
        raise ConfigError(f"--resume: no checkpoint in {ckpts.root}")
    if not resume and latest is not None:
        raise ConfigError(f"{out_dir} already holds a training checkpoint; pass --resume to continue it or choose another out_dir")
    if resume and init is not None:
        raise ConfigError("--resume continues the run's own weights; --init is for a new run: pass one of them")
    if resume:
        try:
            saved = json.loads((latest / "state.json").read_text())
            if not isinstance(saved, dict) or not isinstance(saved.get("settings"), dict) or any(
                    k not in saved for k in ("step", "best_psnr", "seconds")):
                raise ValueError("keys missing")
        except (OSError, ValueError) as exc:
            raise ModelError(f"{latest / 'state.json'}: unreadable checkpoint state ({exc})") from None
        try:  # keys newer than the checkpoint take their defaults
            saved_model = TrainModel.model_validate(saved["settings"].get("model", {}))
        except ValueError as exc:  # pydantic's ValidationError: a key or value this version does not know
            raise ConfigError(f"--resume: the model in {latest} is not one this version builds ({exc})") from None
        settings = _with_model_of(settings, saved_model.model_dump())  # a run started with --init goes on as it began
        config = ModelConfig(**settings.model.model_dump())
        scale = config.scale
        state["settings"] = settings.model_dump(mode="json")
        if saved_model != settings.model:
            changed = [f"model.{k} ({v!r} -> {getattr(settings.model, k)!r})" for k, v in saved_model if getattr(settings.model, k) != v]
            raise ConfigError(f"--resume: {', '.join(changed)} changed since {latest}; the checkpoint holds the other "
                              "model. Restore them, or start a new run with --init")
        if saved.get("pipeline", "tfdata") != pipeline:
            raise ConfigError(
                f"--resume: {latest} was trained with the {saved.get('pipeline', 'tfdata')} pipeline, this run would use "
                f"{pipeline}; set pipeline: {saved.get('pipeline', 'tfdata')} to continue the same patch stream"
            )
        _check_resumed_recipe(saved["settings"], state["settings"], latest)
        state.update({k: saved[k] for k in ("step", "best_psnr", "seconds")})
        if saved.get("init") is not None:
            state["init"] = saved["init"]
        if saved["settings"].get("val_dir") != state["settings"]["val_dir"] and state["best_psnr"] is not None:
            logger.warning("--resume: {}", "another validation folder; the best weights are chosen afresh on it" if settings.val_dir
                           else "no validation folder now; no best weights are chosen")
            state["best_psnr"] = None
    if state["step"] >= settings.steps:
        logger.info("training already complete at step {}", state["step"])

    keras.mixed_precision.set_global_policy("float32")
    eval_model = build_model(config)
    with _distribution(settings.devices):
        keras.mixed_precision.set_global_policy(settings.precision)
        try:
            model = build_model(config)
        finally:
            keras.mixed_precision.set_global_policy("float32")
        optimizer = keras.optimizers.Adam(
            learning_rate=_schedule(settings),
            use_ema=settings.ema is not None,
            ema_momentum=settings.ema or 0.99,
        )
        # JAX steps must be compiled (XLA) to train at any speed; TensorFlow runs
        # its graph kernels, as the bundled model was trained.
        model.compile(optimizer=optimizer, loss=_loss(settings.loss), jit_compile=keras.backend.backend() == "jax")
        # mixed_float16 wraps the optimizer in a loss scaler: its scale and step count are state a resume must keep.
        stepper = model.optimizer
        stepper.build(model.trainable_variables)
    if resume:
        try:
            with warnings.catch_warnings():  # optimizer.npz below is what restores the optimizer, whatever the precision
                warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
                model.load_weights(latest / "model.weights.h5")
        except Exception as exc:  # h5py and Keras signal a damaged file with many exception types
            raise ModelError(f"{latest / 'model.weights.h5'}: unreadable checkpoint weights ({exc})") from None
        try:
            with np.load(latest / "optimizer.npz") as saved_vars:
                values = [saved_vars[f"arr_{i}"] for i in range(len(saved_vars.files))]
        except Exception as exc:  # zipfile and NumPy signal a damaged file with many exception types
            raise ModelError(f"{latest / 'optimizer.npz'}: unreadable optimizer state ({exc})") from None
        # The precision may change on resume: mixed_float16's loss scaler keeps its own variables, ahead of Adam's.
        variables, inner = stepper.variables, optimizer.variables
        if len(values) != len(variables) and stepper is optimizer and len(values) > len(inner):
            values = values[len(values) - len(inner):]  # saved under mixed_float16: its loss scale has no use now
        elif len(values) != len(variables) and stepper is not optimizer and len(values) == len(inner):
            variables = inner  # saved without a loss scale: the scaler keeps what the weights file holds, or starts afresh
        if len(values) != len(variables):
            raise ModelError(f"{latest}: optimizer state does not match ({len(values)} vs {len(variables)} variables)")
        for var, value in zip(variables, values):
            var.assign(value)
        logger.info("resumed from {} at step {}", latest, state["step"])
    elif init is not None:
        state["init"] = _warm_start(model, Path(init), config)

    images = load_training_images(settings.train_dirs, settings.patch_size * scale, settings.rescale)
    state["images"] = _fingerprint(images)
    if resume and saved.get("images", state["images"]) != state["images"]:
        raise ConfigError(f"--resume: the training images differ from those of {latest} (added, removed or changed); "
                          "the run would not continue its patch stream. Restore them, or start a new run with --init")
    val_pairs = _load_validation(settings)
    logger.info(
        "training {} ({} parameters) on {} images, {} validation images, steps {}..{}",
        config, model.count_params(), len(images), len(val_pairs), state["step"], settings.steps,
    )
    final_path = out_dir / f"{settings.name}.weights.h5"
    best_path = out_dir / f"{settings.name}-best.weights.h5"
    log_path = out_dir / "log.csv"
    interval = settings.val_interval
    start = state["step"]
    # Validation every interval from where this sitting starts: a resumed run may start between multiples of
    # the interval (val_interval changed, or a finished run given more steps), and its patch stream goes on
    # from its own step.
    end = settings.steps if until is None else min(settings.steps, until)
    chunks = max(0, -(-(end - start) // interval))
    first = start // interval  # numbers the chunks on from the run's earlier ones (TensorBoard's epochs)
    _trim_log(log_path, start)  # rows past the checkpoint (a kill between the two), or of a run that never checkpointed

    def metadata() -> dict:
        return {
            "train_dirs": [str(p) for p in settings.train_dirs],
            "val_dir": str(settings.val_dir) if settings.val_dir else None,
            "images": len(images),
            "steps": state["step"],
            "patch_size": settings.patch_size,
            "batch_size": settings.batch_size,
            "lr": settings.lr,
            "lr_min": settings.lr_min,
            "warmup_steps": settings.warmup_steps,
            "schedule": settings.schedule,
            "loss": settings.loss,
            "ema": settings.ema,
            "precision": settings.precision,
            "rescale": settings.rescale,
            "permute_channels": settings.permute_channels,
            "augment": settings.augment,
            "seed": settings.seed,
            "val_interval": settings.val_interval,
            **({"init": state["init"]} if state.get("init") else {}),
            "pipeline": pipeline,
            "seconds": round(state["seconds"], 1),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus, {keras.backend.backend()} backend",
        }

    class Progress(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.bar = None
            self.tick = time.time()

        def on_train_begin(self, logs=None):
            show = sys.stderr.isatty() if progress is None else progress
            if show:
                from tqdm import tqdm

                self.bar = tqdm(total=settings.steps, initial=start, unit="step", dynamic_ncols=True)

        def on_train_batch_end(self, batch, logs=None):
            if self.bar is not None:
                self.bar.update(1)
                if batch % 20 == 0:  # Keras's loss: the mean over this interval so far
                    self.bar.set_postfix(loss=f"{float(logs.get('loss', np.nan)):.4f}", val=state["best_psnr"])

        def on_epoch_end(self, epoch, logs=None):
            now = time.time()
            state["seconds"] += now - self.tick
            self.tick = now
            state["step"] = min(start + (epoch - first + 1) * interval, settings.steps)
            loss = float((logs or {}).get("loss", np.nan))  # the mean over the interval's steps
            ema = _ema_values(optimizer, model)
            if not (np.isfinite(loss) and all(np.isfinite(v).all() for v in ema)):
                raise ConfigError(f"training diverged by step {state['step']} (loss {loss}): lower lr (or warm up longer); "
                                  f"the last checkpoint before it is kept for --resume")
            # the checkpoint, and the best weights if they improve
            needed = _bytes_of(model.weights) + _bytes_of(optimizer.variables) + _bytes_of(eval_model.weights)
            _check_room(out_dir, needed + 4 * _FILE_OVERHEAD, f"step {state['step']}")
            for var, value in zip(eval_model.trainable_variables, ema):
                var.assign(value)
            val = validate(eval_model, val_pairs, scale) if val_pairs else None
            improved = val is not None and (state["best_psnr"] is None or val > state["best_psnr"])
            if improved:
                state["best_psnr"] = val
                save_model(eval_model, config, best_path, training=metadata(), metrics={"val_psnr_y": round(val, 4)})
            new_log = not log_path.exists()
            with open(log_path, "a", newline="") as handle:
                writer = csv.writer(handle)
                if new_log:
                    writer.writerow(["step", "loss", "val_psnr_y", "lr", "seconds"])
                lr_now = float(np.asarray(optimizer.learning_rate))
                writer.writerow([state["step"], f"{loss:.6f}", "" if val is None else f"{val:.4f}", f"{lr_now:.3e}", f"{state['seconds']:.1f}"])
            ckpts.save(state["step"], model, stepper, state)
            message = "step {} loss {:.5f} val Y-PSNR {} (best {}) {:.0f}s"
            best = "-" if state["best_psnr"] is None else f"{state['best_psnr']:.3f}"
            shown = "-" if val is None else f"{val:.3f}"
            if self.bar is not None:
                self.bar.write(message.format(state["step"], loss, shown, best, state["seconds"]))
            else:
                logger.info(message, state["step"], loss, shown, best, state["seconds"])

        def on_train_end(self, logs=None):
            if self.bar is not None:
                self.bar.close()

    if chunks:
        args = (images, scale, settings.patch_size, settings.batch_size, settings.seed,
                start, settings.steps, settings.augment, settings.permute_channels)
        workers = settings.workers or os.cpu_count() or 2
        dataset = training_dataset(*args) if pipeline == "tfdata" else numpy_training_batches(*args, workers=workers)
        # Each patch thread's small NumPy products would start a BLAS pool of one thread per core: three
        # runs on 16 cores took 110 s for their first 100 steps, 30 s for 1,000 with one BLAS thread each.
        with _one_blas_thread() if pipeline == "numpy" else contextlib.nullcontext(), warnings.catch_warnings():
            # A last interval cut short by the steps (the patch stream ends there) is expected, not a mistake.
            warnings.filterwarnings("ignore", message="Your input ran out of data")
            model.fit(
                dataset,
                epochs=first + chunks,
                initial_epoch=first,
                steps_per_epoch=interval,
                callbacks=[Progress()] + (
                    [keras.callbacks.TensorBoard(log_dir=str(out_dir / "tensorboard"), update_freq=100)] if settings.tensorboard else []
                ),
                verbose=0,
                shuffle=False,  # the patch stream is shuffled by its seed; Keras warned it ignores shuffle here
            )
    best = best_path if best_path.exists() and state["best_psnr"] is not None else None  # not one of another validation
    if state["step"] < settings.steps:
        logger.info("stopped at step {} of {}; continue with --resume", state["step"], settings.steps)
        return TrainResult(state["step"], state["best_psnr"], final_path, best, state["seconds"])
    for var, value in zip(eval_model.trainable_variables, _ema_values(optimizer, model)):
        var.assign(value)
    final_val = validate(eval_model, val_pairs, scale) if val_pairs else None
    _check_room(out_dir, _bytes_of(eval_model.weights) + _FILE_OVERHEAD, "the final weights")
    save_model(eval_model, config, final_path, training=metadata(),
               metrics={"val_psnr_y": round(final_val, 4)} if final_val is not None else {})
    logger.info("saved {} (validation Y-PSNR {})", final_path, "-" if final_val is None else f"{final_val:.4f}")
    return TrainResult(state["step"], state["best_psnr"], final_path, best, state["seconds"])
