"""Self-describing model checkpoints: ``NAME.weights.h5`` plus ``NAME.json``.

The JSON holds the model config (the model is rebuilt from it), the weights'
SHA-256 (a swapped or corrupt file is refused), the batchsr version and how
the weights were trained.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

from batchsr.config import ModelSettings, TrainModel
from batchsr.errors import ModelError

FORMAT = "batchsr-model"
FORMAT_VERSION = 1
BUNDLED_DIR = Path(__file__).parent / "weights"
DEFAULT_MODEL = BUNDLED_DIR / "unet_x4.weights.h5"


def bundled_model(scale: int) -> Path:
    """The weights file shipped for ``scale``."""
    path = BUNDLED_DIR / f"unet_x{scale}.weights.h5"
    if not path.is_file():
        shipped = sorted(p.name for p in BUNDLED_DIR.glob("unet_x*.weights.h5"))
        raise ModelError(f"no bundled x{scale} model (bundled: {', '.join(shipped) or 'none'}); give one with --model")
    return path


def model_weights(settings: ModelSettings) -> Path:
    """The weights file that ``model`` settings name: their ``weights``, else the bundled model for their scale.

    A scale given beside explicit weights must be the weights' own scale.
    """
    if settings.weights is None:
        return bundled_model(settings.scale or 4)
    path = Path(settings.weights)
    if settings.scale is not None:
        own = read_info(path).scale
        if own != settings.scale:
            raise ModelError(f"{path} is an x{own} model, but scale {settings.scale} was asked for")
    return path


@dataclass
class ModelInfo:
    config: dict
    weights_path: Path
    sha256: str
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    batchsr_version: str = ""
    id_digest: str = ""  # what the model id names: the weights' digest, or (see read_info) weights and config

    @property
    def model_id(self) -> str:
        """Changes whenever the architecture or any weight changes."""
        return f"{self.config['arch']}-x{self.config['scale']}-{(self.id_digest or self.sha256)[:12]}"

    @property
    def scale(self) -> int:
        return int(self.config["scale"])

    @property
    def multiple(self) -> int:
        """What the model pads its input to; tiles are cut to it.  The architecture's defaults fill keys the
        description leaves out, as they do when the model is built."""
        from batchsr.model import ModelConfig

        return ModelConfig.from_dict(self.config).multiple


def description_path(weights_path: Path) -> Path:
    name = weights_path.name
    stem = name[: -len(".weights.h5")] if name.endswith(".weights.h5") else weights_path.stem
    return weights_path.with_name(stem + ".json")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def config_sha256(model: dict) -> str:
    """The model config's digest: a description edited after saving (``slope``, a width) would rebuild
    another network under the same model id, which names the weights."""
    return hashlib.sha256(json.dumps(model, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def read_info(weights_path: Path | str) -> ModelInfo:
    """Reads and checks a checkpoint's description without building the model."""
    weights_path = Path(weights_path)
    if not weights_path.name.endswith(".weights.h5"):
        raise ModelError(f"{weights_path}: a model is a '.weights.h5' file with its '.json' description beside it")
    if not weights_path.is_file():
        raise ModelError(f"{weights_path}: weights file not found")
    desc = description_path(weights_path)
    try:
        meta = json.loads(desc.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{weights_path}: description {desc.name} not found beside it") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"{desc}: unreadable model description ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelError(f"{desc}: not a batchsr model description (format must be '{FORMAT}')")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelError(f"{desc}: format_version {meta.get('format_version')!r} is not supported (expected {FORMAT_VERSION})")
    model = meta.get("model")
    archs, scales = (get_args(TrainModel.model_fields[k].annotation) for k in ("arch", "scale"))
    if not (isinstance(model, dict) and model.get("arch") in archs and model.get("scale") in scales):
        raise ModelError(f"{desc}: bad model config {model!r} (needs 'arch' in {archs} and 'scale' in {scales})")
    if "model_sha256" in meta and meta["model_sha256"] != config_sha256(model):  # absent in descriptions of batchsr 0.1
        raise ModelError(f"{desc}: the model config was edited after the weights were saved (model_sha256 does not match); "
                         "restore it, or train or save the model again")
    sha = file_sha256(weights_path)
    if meta.get("weights_sha256") != sha:
        raise ModelError(
            f"{weights_path}: weights do not match their description {desc.name} "
            f"(sha256 {sha[:12]} vs {str(meta.get('weights_sha256'))[:12]}): corrupt or replaced file"
        )
    # A description with model_sha256 cannot be edited unseen, so the weights name the model (the ids of
    # every model saved since); one without it (batchsr's earliest) has its config named in the id too, so that
    # an edit to it (a slope, a width) is another model, whose outputs are redone.
    id_digest = sha if "model_sha256" in meta else hashlib.sha256(f"{sha}:{config_sha256(model)}".encode()).hexdigest()
    return ModelInfo(
        config=meta["model"],
        weights_path=weights_path,
        sha256=sha,
        id_digest=id_digest,
        training=meta.get("training", {}),
        metrics=meta.get("metrics", {}),
        batchsr_version=meta.get("batchsr_version", ""),
    )


def _mismatch(exc: Exception) -> str:
    """One line out of Keras's load error, which prints whole weight arrays: the first layer and shapes."""
    text = str(exc)
    layer = re.search(r"name=([\w.]+)", text)
    shapes = re.findall(r"(?:variable|value)\.shape=\([^)]*\)", text)[:2]
    if layer and shapes:
        return f"layer {layer.group(1)}: the description builds {shapes[0].split('=', 1)[1]}, the file holds " + (
            shapes[1].split("=", 1)[1] if len(shapes) > 1 else "another shape")
    first = (text.strip().splitlines() or [type(exc).__name__])[0]
    return first[:300] + ("..." if len(first) > 300 else "")


def load_model(weights_path: Path | str):
    """Rebuilds the model from its description and loads the weights: ``(model, info)``."""
    from batchsr.model import ModelConfig, build_model

    info = read_info(weights_path)
    try:
        config = ModelConfig.from_dict(info.config)
        model = build_model(config)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{description_path(info.weights_path)}: bad model config: {exc}") from None
    try:
        with warnings.catch_warnings():  # Keras warns per layer before it raises; the error says it once
            warnings.simplefilter("ignore")
            model.load_weights(info.weights_path)
    except Exception as exc:  # h5py/keras raise many types for bad files; report them all the same way
        raise ModelError(f"{info.weights_path}: weights do not fit the described model ({_mismatch(exc)})") from None
    return model, info


def save_model(model, config, weights_path: Path | str, training: dict | None = None, metrics: dict | None = None) -> ModelInfo:
    """Writes weights and description; the description is written last, so a torn save is refused."""
    from batchsr import __version__

    weights_path = Path(weights_path)
    if not weights_path.name.endswith(".weights.h5"):
        raise ValueError(f"weights file name must end in '.weights.h5', got {weights_path.name}")
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = weights_path.with_name(".tmp-" + weights_path.name)
    model.save_weights(tmp, overwrite=True)
    tmp.replace(weights_path)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "batchsr_version": __version__,
        "model": config.to_dict(),
        "model_sha256": config_sha256(config.to_dict()),
        "weights_file": weights_path.name,
        "weights_sha256": file_sha256(weights_path),
        "parameters": int(model.count_params()),
        "training": training or {},
        "metrics": metrics or {},
    }
    desc = description_path(weights_path)
    tmp_desc = desc.with_name(".tmp-" + desc.name)
    tmp_desc.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    tmp_desc.replace(desc)
    return read_info(weights_path)
