"""Self-describing checkpoints: round trip, corrupt or mismatched files refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from batchsr.checkpoint import description_path, load_model, read_info
from batchsr.errors import ModelError


def test_round_trip_rebuilds_the_same_model(tiny_model):
    model, info = load_model(tiny_model)
    again, _ = load_model(tiny_model)
    x = np.random.rand(1, 9, 11, 3).astype("float32")
    assert np.array_equal(np.asarray(model(x)), np.asarray(again(x)))
    assert info.scale == 4 and info.model_id.startswith("unet-x4-")
    assert info.config["width"] == 8


def test_corrupt_weights_are_refused(tiny_model, tmp_path):
    copy = tmp_path / tiny_model.name
    shutil.copy(tiny_model, copy)
    shutil.copy(description_path(tiny_model), description_path(copy))
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="do not match their description"):
        read_info(copy)


def test_mismatched_description_is_refused(tiny_model, tmp_path):
    copy = tmp_path / tiny_model.name
    shutil.copy(tiny_model, copy)
    meta = json.loads(description_path(tiny_model).read_text())
    meta["model"]["width"] = 16  # the description no longer fits the weights
    description_path(copy).write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="the model config was edited after the weights were saved"):
        read_info(copy)
    del meta["model_sha256"]  # as descriptions written before the digest existed
    description_path(copy).write_text(json.dumps(meta))
    with pytest.raises(ModelError, match=r"do not fit the described model \(layer enc0_in_conv: the description builds "
                       r"\(3, 3, 3, 16\), the file holds \(3, 3, 3, 8\)\)$"):
        load_model(copy)  # one line, not Keras's dump of the weight arrays
    for broken in ({}, {"arch": "unet"}, {"arch": "unet", "scale": "four"}):
        description_path(copy).write_text(json.dumps({**meta, "model": broken}))
        with pytest.raises(ModelError, match="bad model config"):
            read_info(copy)


def test_keys_a_description_leaves_out_take_the_architecture_defaults_everywhere(tiny_model, tmp_path):
    """The tiles are cut to the multiple the built model pads to, also when ``depth`` is left to its default."""
    from batchsr.config import EngineSettings
    from batchsr.engine import Engine
    from batchsr.model import ModelConfig

    copy = tmp_path / tiny_model.name
    shutil.copy(tiny_model, copy)
    meta = json.loads(description_path(tiny_model).read_text())
    assert meta["model"].pop("depth") == ModelConfig().depth == 2
    del meta["model_sha256"]  # as descriptions written before the digest existed
    description_path(copy).write_text(json.dumps(meta))
    assert read_info(copy).multiple == read_info(tiny_model).multiple == 4
    assert Engine(copy, EngineSettings()).multiple == 4


def test_a_description_edited_after_saving_is_refused(tiny_model, tmp_path):
    """The same weights under another slope are another network: it must not pass for the model id of the first."""
    from batchsr.checkpoint import bundled_model

    copy = tmp_path / tiny_model.name
    shutil.copy(tiny_model, copy)
    meta = json.loads(description_path(tiny_model).read_text())
    meta["model"]["slope"] = 0.1
    description_path(copy).write_text(json.dumps(meta))
    with pytest.raises(ModelError, match=f"{copy.stem[:-8]}.json: the model config was edited after the weights were saved"):
        read_info(copy)
    meta["training"] = {"note": "edited"}  # the rest of the description may change
    meta["model"]["slope"] = json.loads(description_path(tiny_model).read_text())["model"]["slope"]
    description_path(copy).write_text(json.dumps(meta))
    assert read_info(copy).model_id == read_info(tiny_model).model_id
    # A description without the digest (batchsr's earliest, or the key deleted): the id names its config too, so
    # an edit is another model (it passed as the first, whose outputs were kept)
    del meta["model_sha256"]
    description_path(copy).write_text(json.dumps(meta))
    unsealed = read_info(copy).model_id
    assert unsealed != read_info(tiny_model).model_id
    meta["model"]["slope"] = 0.1
    description_path(copy).write_text(json.dumps(meta))
    assert read_info(copy).model_id not in (unsealed, read_info(tiny_model).model_id)
    for scale in (2, 3, 4):
        assert "model_sha256" in json.loads(description_path(bundled_model(scale)).read_text())
        read_info(bundled_model(scale))


def test_missing_description_and_wrong_name(tiny_model, tmp_path):
    copy = tmp_path / tiny_model.name
    shutil.copy(tiny_model, copy)
    with pytest.raises(ModelError, match="description"):
        read_info(copy)
    with pytest.raises(ModelError, match=".weights.h5"):
        read_info(tmp_path / "model.h5")


def test_model_settings_pick_the_bundled_model_of_their_scale(tiny_model, tmp_path, monkeypatch):
    from batchsr import checkpoint
    from batchsr.config import ModelSettings

    assert checkpoint.model_weights(ModelSettings()) == checkpoint.DEFAULT_MODEL
    assert read_info(checkpoint.model_weights(ModelSettings(scale=4))).scale == 4
    # Only the scales that ship can be picked; the error lists them.
    bundled = tmp_path / "bundled"
    bundled.mkdir()
    shutil.copy(tiny_model, bundled / "unet_x4.weights.h5")
    monkeypatch.setattr(checkpoint, "BUNDLED_DIR", bundled)
    with pytest.raises(ModelError, match=r"no bundled x3 model \(bundled: unet_x4.weights.h5\)"):
        checkpoint.model_weights(ModelSettings(scale=3))
    # Explicit weights win; a scale beside them must be theirs.
    assert checkpoint.model_weights(ModelSettings(weights=tiny_model)) == tiny_model
    assert checkpoint.model_weights(ModelSettings(weights=tiny_model, scale=4)) == tiny_model
    with pytest.raises(ModelError, match="is an x4 model, but scale 2 was asked for"):
        checkpoint.model_weights(ModelSettings(weights=tiny_model, scale=2))
