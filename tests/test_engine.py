"""The engine: device and precision settings, batching across images of different sizes."""

from __future__ import annotations

import numpy as np
import pytest

from batchsr.config import EngineSettings
from batchsr.engine import Engine
from batchsr.errors import ConfigError
from batchsr.metrics import psnr


def test_missing_gpu_is_a_config_error(tiny_model):
    with pytest.raises(ConfigError, match="gpu:3"):
        Engine(tiny_model, EngineSettings(device="gpu:3"))


def test_a_run_refused_when_the_model_loads_removes_the_output_folder_it_made(tmp_path, tiny_model):
    """A GPU not there, a memory cap below the loaded model, a description that reads but does not build: each
    is found when the engine loads, after OUTPUT, its journal and lock (and a subfolder) were made, and they
    were left behind. An OUTPUT that was there before stays, and so does one holding anything but batchsr's state."""
    import hashlib
    import json
    import shutil

    from batchsr.checkpoint import config_sha256, description_path
    from batchsr.config import Settings
    from batchsr.errors import ModelError
    from batchsr.runner import run_folder
    from tests.conftest import write_png

    write_png(tmp_path / "in" / "sub" / "a.png", np.full((8, 8, 3), 9, np.uint8))
    unbuildable = tmp_path / "m" / tiny_model.name
    unbuildable.parent.mkdir()
    shutil.copy(tiny_model, unbuildable)
    meta = json.loads(description_path(tiny_model).read_text())
    meta["model"]["foo"] = 1
    meta["model_sha256"] = config_sha256(meta["model"])
    description_path(unbuildable).write_text(json.dumps(meta))
    assert meta["weights_sha256"] == hashlib.sha256(unbuildable.read_bytes()).hexdigest()
    cases = [({"engine": {"device": "gpu:63"}}, ConfigError, "gpu:63"),
             ({"run": {"memory_mb": 256}}, ConfigError, "memory_mb = 256 is below"),
             ({"model": {"weights": str(unbuildable)}}, ModelError, "foo")]
    for case, error, message in cases:
        settings = Settings.model_validate({"model": {"weights": str(tiny_model)}, **case})
        with pytest.raises(error, match=message):
            run_folder(tmp_path / "in", tmp_path / "new" / "out", settings)
        assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(ConfigError):
        run_folder(tmp_path / "in", tmp_path / "kept", Settings.model_validate({"engine": {"device": "gpu:63"}}))
    assert (tmp_path / "kept" / ".batchsr").is_dir()
    # A path through a folder not there yet and back up names a folder that is there: it was taken as made
    for output in (tmp_path / "none" / ".." / "kept", tmp_path / "none2" / ".." / "kept" / "sub"):
        with pytest.raises(ConfigError):
            run_folder(tmp_path / "in", output, Settings.model_validate({"engine": {"device": "gpu:63"}}))
        assert (tmp_path / "kept" / ".batchsr").is_dir()
    assert not (tmp_path / "kept" / "sub").exists()
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError):
        run_folder(tmp_path / "in", tmp_path / "new", Settings.model_validate({"engine": {"device": "gpu:63"}}))
    assert (tmp_path / "new" / "notes.txt").read_text() == "mine"


def test_a_device_another_backend_cannot_be_told_to_use_is_refused(tmp_path, tiny_model):
    """On JAX, engine.device was ignored with a warning: `cpu` could run on a GPU, `gpu:3` ran without one."""
    import subprocess
    import sys

    from tests.conftest import REPO

    code = ("import sys; from batchsr.config import EngineSettings; from batchsr.engine import Engine; "
            "Engine(sys.argv[1], EngineSettings(device=sys.argv[2]))")
    env = {**__import__("os").environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    for device, refused in (("cpu", True), ("gpu:3", True), ("auto", False)):
        done = subprocess.run([sys.executable, "-c", code, str(tiny_model), device], capture_output=True, text=True,
                              cwd=REPO, env=env, timeout=300)
        assert ("is honoured on the TensorFlow backend only (KERAS_BACKEND is jax)" in done.stderr) == refused, done.stderr
        assert (done.returncode != 0) == refused


def test_batching_across_images_equals_one_at_a_time(tiny_model):
    engine = Engine(tiny_model, EngineSettings(device="cpu", tile=32, overlap=8, batch_size=3))
    rng = np.random.default_rng(0)
    images = [rng.random((h, w, 3), dtype=np.float32) for h, w in [(40, 70), (9, 13), (33, 32)]]
    together = engine.upscale(images)
    for image, out in zip(images, together):
        alone = engine.upscale([image])[0]
        assert out.shape == (image.shape[0] * 4, image.shape[1] * 4, 3)
        assert np.array_equal(out, alone)


def test_full_windows_keep_one_batch_shape_when_tile_and_overlap_are_rounded_up(tiny_model):
    """A tile or overlap off the model's multiple made full windows look partial: each short call a new graph."""
    engine = Engine(tiny_model, EngineSettings(device="cpu", tile=29, overlap=7, batch_size=5))
    assert engine.multiple > 1 and 29 % engine.multiple and 7 % engine.multiple
    shapes = []
    predict = engine._predict
    engine._predict = lambda batch, copy=0: shapes.append(batch.shape) or predict(batch, copy)
    image = np.random.default_rng(2).random((100, 100, 3), dtype=np.float32)  # 16 windows: batches of 5, 5, 5 and 1
    engine.upscale([image])
    assert len(shapes) > 1 and len(set(shapes)) == 1 and shapes[0][0] == 5


def test_mixed_bfloat16_stays_close_to_float32(tiny_model):
    image = np.random.default_rng(1).random((24, 24, 3), dtype=np.float32)
    exact = Engine(tiny_model, EngineSettings(device="cpu")).upscale([image])[0]
    half = Engine(tiny_model, EngineSettings(device="cpu", precision="mixed_bfloat16")).upscale([image])[0]
    assert half.dtype == np.float32
    assert psnr(np.clip(half, 0, 1), np.clip(exact, 0, 1), peak=1.0) > 35


_TWO_DEVICES = """
import json, sys
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from batchsr.config import EngineSettings
from batchsr.engine import Engine

settings = dict(tile=32, overlap=8, batch_size=2)
one = Engine(sys.argv[1], EngineSettings(device="cpu", **settings))
every = Engine(sys.argv[1], EngineSettings(device="all", **settings))
copies = []
predict = every._predict
every._predict = lambda batch, copy=0: (copies.append(copy), predict(batch, copy))[1]
rng = np.random.default_rng(3)
images = [rng.random((70, 90, 3)).astype(np.float32), rng.random((33, 47, 3)).astype(np.float32)]
a, b = one.upscale(images), every.upscale(images)
bands = np.concatenate([band for _, band in every.upscale_bands(images[0])])
print(json.dumps({"devices": every.devices, "copies": copies,
                  "diff": max(float(np.abs(x - y).max()) for x, y in zip(a, b)),
                  "bands": float(np.abs(bands - a[0]).max())}))
"""


def test_device_all_spreads_batches_over_every_device(tiny_model):
    """Two logical CPU devices stand in for two GPUs: one model copy each, same pixels as one device."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {**__import__("os").environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-c", _TWO_DEVICES, str(tiny_model)], capture_output=True, text=True,
                            cwd=REPO, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert [d.split(":")[-2:] for d in report["devices"]] == [["CPU", "0"], ["CPU", "1"]]
    assert set(report["copies"]) == {0, 1} and len(report["copies"]) >= 4
    assert report["diff"] < 1e-5 and report["bands"] < 1e-5


def test_device_lists_are_validated():
    from batchsr.config import EngineSettings

    assert EngineSettings(device="gpu:0,1").device == "gpu:0,1"
    with pytest.raises(ValueError, match="gpu:N,M"):
        EngineSettings(device="gpu:0,")


def test_self_ensemble_makes_the_output_follow_flips_and_rotations(tiny_model):
    """A random model is not flip-equivariant; averaged over the 8 symmetries of the window it is."""
    image = np.random.default_rng(4).random((24, 24, 3)).astype(np.float32)  # one window

    def turned(engine, turns, flip):
        view = np.rot90(image, turns)
        view = view[:, ::-1] if flip else view
        out = engine.upscale([np.ascontiguousarray(view)])[0]
        out = out[:, ::-1] if flip else out
        return np.rot90(out, -turns)

    plain = Engine(tiny_model, EngineSettings(device="cpu", tile=32, overlap=8, flat_guard=0))
    ensemble = Engine(tiny_model, EngineSettings(device="cpu", tile=32, overlap=8, flat_guard=0, self_ensemble=True))
    reference = ensemble.upscale([image])[0]
    for turns, flip in [(1, False), (0, True), (3, True)]:
        assert np.abs(turned(ensemble, turns, flip) - reference).max() < 1e-5
        assert np.abs(turned(plain, turns, flip) - plain.upscale([image])[0]).max() > 1e-3
    assert np.abs(reference - plain.upscale([image])[0]).max() > 1e-3
