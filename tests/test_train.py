"""A short training lowers the loss; an interrupted one resumes exactly where it stopped."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from batchsr.checkpoint import load_model
from batchsr.config import TrainSettings
from batchsr.errors import ConfigError, OutputError
from batchsr.train import train
from tests.conftest import data_dir


def _settings(out_dir, **extra) -> TrainSettings:
    return TrainSettings.model_validate(
        {
            "train_dirs": [str(data_dir("T91", "HR"))],
            "val_dir": str(data_dir("Set5", "HR")),
            "out_dir": str(out_dir),
            "name": "tiny",
            "model": {"width": 8, "depth": 1, "blocks": 0},
            "patch_size": 16,
            "batch_size": 8,
            "steps": 60,
            "lr": 2e-3,
            "warmup_steps": 5,
            "val_interval": 20,
            "ema": 0.9,
            **extra,
        }
    )


def _log(out_dir):
    return list(csv.DictReader(open(out_dir / "log.csv")))


@pytest.mark.parametrize("pipeline", ["tfdata", "numpy"])
def test_training_lowers_the_loss_and_resumes_exactly(tmp_path, pipeline):
    straight = tmp_path / "straight"
    result = train(_settings(straight, pipeline=pipeline), progress=False)
    log = _log(straight)
    assert [int(r["step"]) for r in log] == [20, 40, 60]
    assert float(log[-1]["loss"]) < 0.8 * float(log[0]["loss"])
    assert result.step == 60 and result.final_weights.exists()
    model, info = load_model(result.final_weights)
    assert info.training["steps"] == 60 and info.config["width"] == 8
    assert info.metrics["val_psnr_y"] > 20

    split = tmp_path / "split"
    first = train(_settings(split, pipeline=pipeline), progress=False, until=40)
    assert first.step == 40 and not first.final_weights.exists()
    with pytest.raises(ConfigError, match="--resume"):
        train(_settings(split, pipeline=pipeline), progress=False)
    state = json.loads((split / "checkpoints" / "step-00000040" / "state.json").read_text())
    assert state["step"] == 40
    other = "numpy" if pipeline == "tfdata" else "tfdata"
    with pytest.raises(ConfigError, match="pipeline"):
        train(_settings(split, pipeline=other), resume=True, progress=False)
    second = train(_settings(split, pipeline=pipeline), resume=True, progress=False)
    assert second.step == 60
    assert [int(r["step"]) for r in _log(split)] == [20, 40, 60]
    resumed, _ = load_model(second.final_weights)
    for a, b in zip(model.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert float(_log(split)[-1]["loss"]) == pytest.approx(float(log[-1]["loss"]), rel=1e-3)


def test_resuming_a_finished_run_changes_nothing_and_a_changed_stream_is_refused(tmp_path):
    from batchsr.checkpoint import file_sha256

    out = tmp_path / "run"
    done = train(_settings(out, steps=50), progress=False)  # the last interval is a partial one
    assert [int(r["step"]) for r in _log(out)] == [20, 40, 50]
    sha = file_sha256(done.final_weights)
    with open(out / "log.csv", "a") as handle:
        handle.write("60,0.1,20.0,1e-4,9.9\n")  # as if killed after logging a step it never checkpointed
    again = train(_settings(out, steps=50), resume=True, progress=False)
    assert again.step == 50 and file_sha256(again.final_weights) == sha
    assert [int(r["step"]) for r in _log(out)] == [20, 40, 50]
    with pytest.raises(ConfigError, match=r"batch_size \(8 -> 4\)"):
        train(_settings(out, steps=50, batch_size=4), resume=True, progress=False)


def test_an_init_that_fits_no_layer_is_refused(tmp_path, tiny_model):
    with pytest.raises(ConfigError, match="no layer fits"):
        train(_settings(tmp_path / "narrow", model={"width": 4, "depth": 1, "blocks": 0}), init=tiny_model, progress=False)


def test_resume_without_checkpoint_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(_settings(tmp_path / "empty"), resume=True, progress=False)


def test_init_warm_starts_the_shared_layers_across_scales(tmp_path, tiny_model):
    """x4 weights seed an x2 model: every layer of matching shape is copied, the head is not."""
    from batchsr.checkpoint import load_model as load

    source, _ = load(tiny_model)
    settings = _settings(tmp_path / "x2", model={"width": 8, "depth": 2, "blocks": 1, "scale": 2}, steps=1, warmup_steps=0, val_interval=1, lr=1e-12, lr_min=0.0, ema=None)
    result = train(settings, init=tiny_model, progress=False)
    target, info = load(result.final_weights)
    assert info.scale == 2
    for name in ("enc0_in_conv", "bottleneck_res0_a_conv", "dec1_up"):
        for a, b in zip(source.get_layer(name).get_weights(), target.get_layer(name).get_weights()):
            np.testing.assert_allclose(a, b, atol=1e-6)
    assert target.get_layer("head_conv").get_weights()[0].shape[-1] == 12


def test_init_without_model_keys_trains_the_inits_shape_and_a_lost_layer_is_warned_about(tmp_path, tiny_model):
    """The README's fine-tune (--init the bundled model, a YAML with no model keys) trained the default shape:
    13 of its 22 layers, the head among them, started afresh, and only an INFO line said so."""
    from loguru import logger

    keys = ("arch", "scale", "width", "depth", "blocks", "top_width", "top_blocks")
    quick = {"steps": 1, "warmup_steps": 0, "val_interval": 1, "lr": 1e-12, "lr_min": 0.0, "ema": None}
    plain = _settings(tmp_path / "ft", **quick).model_dump(mode="json", exclude={"model"})
    source, source_info = load_model(tiny_model)
    result = train(TrainSettings.model_validate(plain), init=tiny_model, progress=False)
    target, info = load_model(result.final_weights)
    assert {k: info.config.get(k) for k in keys} == {k: source_info.config.get(k) for k in keys}
    for layer in source.layers:  # every layer started from the source (the learning rate leaves them as they were)
        for a, b in zip(layer.get_weights(), target.get_layer(layer.name).get_weights()):
            np.testing.assert_allclose(a, b, atol=1e-6)
    assert info.training["init"] == {"from": source_info.model_id, "weights": tiny_model.name}  # the card says where it began
    resumed = train(TrainSettings.model_validate({**plain, "steps": 2}), resume=True, progress=False)  # goes on as it began
    assert resumed.step == 2 and load_model(resumed.final_weights)[1].training["init"]["from"] == source_info.model_id
    messages: list[str] = []
    handler = logger.add(messages.append, level="WARNING", format="{message}")
    try:  # fewer residual blocks at the same scale: layers of the source left behind
        train(_settings(tmp_path / "shrunk", model={"width": 8, "depth": 2, "blocks": 0}, **quick), init=tiny_model, progress=False)
    finally:
        logger.remove(handler)
    assert any("res0_a_conv" in m and "does not hold them" in m for m in messages), messages


def test_init_into_a_wider_model_starts_from_the_same_output(tmp_path, tiny_model):
    """Widened warm start: the new channels join with zero influence, so the wider model
    upscales a real photo exactly as the narrow one did, and its extra channels exist."""
    from batchsr.checkpoint import load_model as load
    from batchsr.imageio import read_image

    source, _ = load(tiny_model)
    model = {"width": 12, "top_width": 16, "depth": 2, "blocks": 1, "scale": 4}
    settings = _settings(tmp_path / "wide", model=model, steps=1, warmup_steps=0, val_interval=1, lr=1e-12, lr_min=0.0, ema=None)
    result = train(settings, init=tiny_model, progress=False)
    target, _ = load(result.final_weights)
    assert target.get_layer("enc0_in_conv").get_weights()[0].shape == (3, 3, 3, 16)
    assert target.get_layer("dec1_in_conv").get_weights()[0].shape == (3, 3, 48, 24)
    lr = read_image(data_dir("Set5", "HR") / "butterfly.png").rgb[:64, :64].astype("float32")[None] / 255.0
    narrow, wide = np.asarray(source(lr)), np.asarray(target(lr))
    assert np.abs(narrow - wide).max() < 1e-4
    assert np.abs(narrow - lr.repeat(4, 1).repeat(4, 2)).mean() > 1e-3  # the model does something


def test_init_into_deeper_top_stages_starts_from_the_same_output(tmp_path, tiny_model):
    """More residual blocks at full resolution (``top_blocks``): the new blocks start as the
    identity, so the deeper model upscales a real photo exactly as the source did."""
    from batchsr.checkpoint import load_model as load
    from batchsr.imageio import read_image

    source, _ = load(tiny_model)
    model = {"width": 12, "depth": 2, "blocks": 1, "top_blocks": 3, "scale": 4}
    settings = _settings(tmp_path / "deep", model=model, steps=1, warmup_steps=0, val_interval=1, lr=1e-12, lr_min=0.0, ema=None)
    result = train(settings, init=tiny_model, progress=False)
    target, _ = load(result.final_weights)
    names = {layer.name for layer in target.layers}
    assert {"enc0_res2_b_conv", "dec0_res2_b_conv"} <= names and "enc1_res1_b_conv" not in names
    lr = read_image(data_dir("Set5", "HR") / "butterfly.png").rgb[:64, :64].astype("float32")[None] / 255.0
    narrow, deep = np.asarray(source(lr)), np.asarray(target(lr))
    assert np.abs(narrow - deep).max() < 1e-4
    assert np.abs(narrow - lr.repeat(4, 1).repeat(4, 2)).mean() > 1e-3  # the model does something


def test_numpy_pipeline_runs_blas_on_one_thread(tmp_path, monkeypatch):
    """The patch threads each call NumPy; BLAS pools of their own would oversubscribe the cores."""
    from threadpoolctl import threadpool_info, threadpool_limits

    import batchsr.data as data

    def blas_threads() -> set[int]:
        return {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}

    seen = []
    real = data.numpy_training_batches

    def spy(*args, **kwargs):
        for batch in real(*args, **kwargs):
            seen.append(blas_threads())
            yield batch

    monkeypatch.setattr(data, "numpy_training_batches", spy)
    with threadpool_limits(limits=2, user_api="blas"):  # a pool of several threads, whatever the machine or environment
        assert blas_threads() == {2}
        train(_settings(tmp_path / "run", pipeline="numpy", steps=4, val_interval=2, warmup_steps=1), progress=False)
    assert len(seen) >= 4 and all(threads == {1} for threads in seen), seen


_MIRRORED = """
import json, sys
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from batchsr.checkpoint import load_model
from batchsr.config import TrainSettings
from batchsr.train import train

base = json.loads(sys.argv[1])
weights = {}
for devices in ("auto", "all"):
    settings = TrainSettings.model_validate({**base, "devices": devices, "out_dir": base["out_dir"] + "-" + devices})
    result = train(settings, progress=False)
    model, _ = load_model(result.final_weights)
    weights[devices] = [np.asarray(w) for w in model.get_weights()]
moved = max(float(np.abs(a).max()) for a in weights["auto"])
diff = max(float(np.abs(a - b).max()) for a, b in zip(weights["auto"], weights["all"]))
print(json.dumps({"diff": diff, "largest": moved}))
"""


def test_devices_all_trains_data_parallel_like_one_device(tmp_path):
    """Two logical CPU devices stand in for two GPUs: MirroredStrategy gives the weights one device gives."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    base = _settings(tmp_path / "run", steps=12, val_interval=6, warmup_steps=2, ema=None).model_dump(mode="json")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-c", _MIRRORED, json.dumps(base)], capture_output=True, text=True,
                            cwd=REPO, env=env, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data-parallel training on 2 replicas" in result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["diff"] < 1e-4 * max(1.0, report["largest"]), report


def test_rescale_adds_matlab_downscaled_copies_that_fit_a_patch():
    """Each factor adds the 8-bit MATLAB-bicubic copy of every image; copies too small for a patch are dropped."""
    from batchsr.data import load_training_images
    from batchsr.imageio import read_image, to_uint8
    from batchsr.resize import imresize

    folder = data_dir("Set5", "HR")  # sides 512, 288, 256, 280 and 344x228: only baby is still 200 px at half size
    baby = imresize(to_uint8(read_image(folder / "baby.png").rgb), 0.5)
    assert baby.dtype == np.uint8 and baby.shape == (256, 256, 3)
    assert len(load_training_images([folder], 200)) == 5
    both = load_training_images([folder], 200, rescale=[1.0, 0.5])
    assert len(both) == 6 and sum(np.array_equal(im, baby) for im in both if im.shape == baby.shape) == 1
    halves = load_training_images([folder], 200, rescale=[0.5])
    assert len(halves) == 1 and np.array_equal(halves[0], baby)


@pytest.mark.parametrize("pipeline", ["tfdata", "numpy"])
def test_pipelines_pair_each_patch_with_the_benchmark_lr(pipeline):
    """Training LR is exactly the 8-bit LR the benchmarks use (MATLAB rounds after each axis)."""
    from batchsr.data import load_training_images, numpy_training_batches, training_dataset
    from batchsr.resize import degrade

    scale, patch, size = 3, 12, 6
    images = load_training_images([data_dir("Set5", "HR")], patch * scale)

    def batches(workers):
        args = (images, scale, patch, size, 7, 2, 5)
        if pipeline == "tfdata":
            return [(np.asarray(lr), np.asarray(hr)) for lr, hr in training_dataset(*args)]
        return list(numpy_training_batches(*args, workers=workers))

    one, again = batches(1), batches(4)
    assert len(one) == 3
    for (lr, hr), (lr_again, hr_again) in zip(one, again):
        # Batch contents depend on (seed, step) only, not on threads or timing.
        np.testing.assert_array_equal(lr, lr_again)
        np.testing.assert_array_equal(hr, hr_again)
        assert lr.shape == (size, patch, patch, 3) and hr.shape == (size, patch * scale, patch * scale, 3)
        hr8 = np.rint(hr * 255).astype(np.uint8)
        np.testing.assert_allclose(hr * 255, hr8, atol=1e-3)  # HR patches are the 8-bit pixels
        for k in range(size):
            expected = degrade(hr8[k], scale).astype(np.float32)
            # Exact, but for a rare tie rounded the other way by float32 sums.
            diff = np.abs(lr[k] * 255 - expected)
            assert diff.max() <= 1.0 + 1e-3 and (diff > 1e-3).mean() < 2e-3
    assert not np.array_equal(one[0][1], one[1][1])  # a different step, different patches


@pytest.mark.parametrize("pipeline", ["tfdata", "numpy"])
def test_permuted_channels_keep_the_crops_and_use_every_order(pipeline):
    from batchsr.data import CHANNEL_ORDERS, load_training_images, numpy_training_batches, training_dataset

    scale, patch, size = 2, 8, 16
    images = load_training_images([data_dir("Set5", "HR")], patch * scale)

    def hr_patches(permute):
        args = (images, scale, patch, size, 3, 0, 6, True, permute)
        if pipeline == "tfdata":
            return np.concatenate([np.asarray(hr) for _, hr in training_dataset(*args)])
        return np.concatenate([hr for _, hr in numpy_training_batches(*args, workers=2)])

    plain, permuted = hr_patches(False), hr_patches(True)
    used = []
    for a, b in zip(plain, permuted):
        # The same crop and flip as without the option, in one of the six channel orders.
        matches = [k for k, order in enumerate(CHANNEL_ORDERS) if np.array_equal(a[:, :, list(order)], b)]
        assert matches, "a permuted patch is not a channel order of the plain one"
        used.append(matches[0] if len(matches) == 1 else None)
    assert {k for k in used if k is not None} == set(range(6))


@pytest.mark.parametrize(
    "kind, expected",
    [("l1", (0.1 + 0.3) / 4), ("l2", (0.01 + 0.09) / 4), ("charbonnier", (np.sqrt(0.01 + 1e-6) + np.sqrt(0.09 + 1e-6) + 2e-3) / 4)],
)
def test_losses_match_their_definitions(kind, expected):
    import keras

    from batchsr.train import _loss

    loss = keras.losses.get(_loss(kind))
    y_true = np.array([[0.5, 0.2, 0.0, 1.0]], "float32")
    y_pred = np.array([[0.6, -0.1, 0.0, 1.0]], "float32")
    assert float(np.mean(keras.ops.convert_to_numpy(loss(y_true, y_pred)))) == pytest.approx(expected, rel=1e-5)


def test_resume_of_a_checkpoint_written_before_a_new_model_key(tmp_path):
    """A checkpoint's settings lack keys added later (``top_blocks``): their defaults are what it trained with."""
    import json

    settings = _settings(tmp_path / "run", steps=4, val_interval=2, warmup_steps=1)
    train(settings, progress=False, until=2)
    [state_path] = (tmp_path / "run" / "checkpoints").glob("*/state.json")
    state = json.loads(state_path.read_text())
    del state["settings"]["model"]["top_blocks"]
    state_path.write_text(json.dumps(state))
    assert train(settings, resume=True, progress=False).step == 4


def _iterations(checkpoint) -> int:
    """The optimizer's own step counter, saved with the checkpoint."""
    with np.load(checkpoint / "optimizer.npz") as saved:
        counters = [int(saved[name]) for name in saved.files if saved[name].ndim == 0 and saved[name].dtype.kind == "i"]
    assert counters, "no step counter saved"
    return counters[0]


def test_a_resume_between_validation_points_continues_the_same_stream(tmp_path):
    """A changed val_interval, or more steps for a finished run: the patch stream goes on from the step saved."""
    straight = train(_settings(tmp_path / "straight"), progress=False)
    split = tmp_path / "split"
    train(_settings(split), progress=False, until=40)
    resumed = train(_settings(split, val_interval=30), resume=True, progress=False)
    assert resumed.step == 60 and [int(r["step"]) for r in _log(split)] == [20, 40, 60]
    assert _iterations(split / "checkpoints" / "step-00000060") == 60
    a, _ = load_model(straight.final_weights)
    b, _ = load_model(resumed.final_weights)
    for x, y in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)

    extended = tmp_path / "extended"
    train(_settings(extended, steps=50), progress=False)
    more = train(_settings(extended, steps=70), resume=True, progress=False)
    assert more.step == 70 and [int(r["step"]) for r in _log(extended)] == [20, 40, 50, 70]
    assert _iterations(extended / "checkpoints" / "step-00000070") == 70


def test_a_damaged_checkpoint_or_a_resume_with_init_is_refused_by_name(tmp_path, tiny_model):
    from batchsr.errors import ModelError

    out = tmp_path / "run"
    train(_settings(out), progress=False, until=20)
    with pytest.raises(ConfigError, match="--init"):
        train(_settings(out), resume=True, init=tiny_model, progress=False)
    checkpoint = out / "checkpoints" / "step-00000020"
    for name in ("optimizer.npz", "model.weights.h5", "state.json"):
        data = (checkpoint / name).read_bytes()
        (checkpoint / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(ModelError, match=name.replace(".", r"\.")):
            train(_settings(out), resume=True, progress=False)
        (checkpoint / name).write_bytes(data)


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_a_seed_out_of_range_is_a_configuration_error(tmp_path, seed):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="seed"):
        _settings(tmp_path, seed=seed)


def test_a_resume_on_another_validation_folder_chooses_the_best_afresh_and_ema_cannot_be_switched(tmp_path):
    out = tmp_path / "run"
    train(_settings(out), progress=False, until=20)
    with pytest.raises(ConfigError, match=r"ema \(0.9 -> None\)"):
        train(_settings(out, ema=None), resume=True, progress=False)
    result = train(_settings(out, val_dir=str(data_dir("Set14", "HR"))), resume=True, progress=False, until=40)
    rows = _log(out)
    assert [int(r["step"]) for r in rows] == [20, 40] and float(rows[1]["val_psnr_y"]) < float(rows[0]["val_psnr_y"])
    assert result.best_psnr == pytest.approx(float(rows[1]["val_psnr_y"]), abs=1e-3)  # Set5's score is no longer the mark


def test_step_schedule_warms_up_then_drops_by_gamma_at_each_milestone(tmp_path):
    from batchsr.train import _schedule

    settings = _settings(tmp_path, steps=100, lr=1e-3, lr_min=1e-5, warmup_steps=10, schedule="step",
                         step_milestones=[40, 70], step_gamma=0.1)
    rate = _schedule(settings)
    got = [float(rate(step)) for step in (0, 9, 10, 39, 40, 69, 70, 99)]
    np.testing.assert_allclose(got, [1e-4, 1e-3, 1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5], rtol=1e-5)


def test_train_command_follows_the_logging_settings(tmp_path):
    """`train` logged to stderr at INFO whatever config.yaml said; a service's log file stayed empty."""
    import os
    import subprocess
    import sys

    (tmp_path / "config.yaml").write_text(f"logging:\n  level: DEBUG\n  file: {tmp_path / 'batchsr.log'}\n")
    (tmp_path / "t.yaml").write_text(
        f"train_dirs: [{data_dir('Set5', 'HR')}]\nout_dir: {tmp_path / 'run'}\nname: tiny\n"
        "model: {width: 8, depth: 1, blocks: 0}\npatch_size: 16\nbatch_size: 2\nsteps: 2\nwarmup_steps: 0\nval_interval: 2\n")
    result = subprocess.run([sys.executable, "-m", "batchsr.cli", "--config", str(tmp_path / "config.yaml"), "train",
                             str(tmp_path / "t.yaml")], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr
    logged = (tmp_path / "batchsr.log").read_text()
    assert "saved " in logged and "tiny.weights.h5" in logged


def test_mixed_float16_checkpoints_keep_the_loss_scale(tmp_path):
    """The loss scaler's scale and step count were left out of checkpoints: a resume restarted them."""
    out = tmp_path / "run"
    train(_settings(out, precision="mixed_float16", steps=40), progress=False, until=20)
    with np.load(out / "checkpoints" / "step-00000020" / "optimizer.npz") as saved:
        values = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    counter, scale = int(values[2]), float(values[3])  # the scaler's own iteration, rate, step count, scale; then Adam's
    # 20 steps, none overflowing at the initial scale of 2**15 (a halving would restart the count).
    assert (counter, scale) == (20, 2.0**15)
    result = train(_settings(out, precision="mixed_float16", steps=40), resume=True, progress=False)
    assert result.step == 40
    with np.load(out / "checkpoints" / "step-00000040" / "optimizer.npz") as saved:
        assert int(saved["arr_2"]) == 40
    # The precision may change on a resume (a GPU run continued on a CPU, and back): the state carries over.
    assert train(_settings(out, precision="float32", steps=60), resume=True, progress=False).step == 60
    assert train(_settings(out, precision="mixed_float16", steps=80), resume=True, progress=False).step == 80


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    """A rate too high gave NaN losses that were checkpointed over the last good state and saved as the final
    weights, exit 0; and `lr: .inf` was accepted."""
    from pydantic import ValidationError

    out = tmp_path / "run"
    train(_settings(out), progress=False, until=20)
    with pytest.raises(ConfigError, match="diverged by step 40"):
        train(_settings(out, lr=1e6, warmup_steps=0), resume=True, progress=False)
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-00000020"]
    assert not (out / "tiny.weights.h5").exists()
    assert train(_settings(out), resume=True, progress=False).step == 60  # the kept checkpoint still resumes
    with pytest.raises(ValidationError, match="lr"):
        _settings(out, lr=float("inf"))


def test_an_out_dir_that_cannot_be_written_fails_before_any_work(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OutputError, match="out_dir .*file/run is not writable"):
        train(_settings(tmp_path / "file" / "run"), progress=False)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("not a folder")
    with pytest.raises(OutputError, match="checkpoint folder .*checkpoints is not writable"):
        train(_settings(tmp_path / "run"), progress=False)


def test_a_disk_too_full_for_a_checkpoint_stops_before_writing_it(tmp_path, monkeypatch):
    """h5py crashed the process (a segfault, exit 139) when the disk filled while it wrote a checkpoint."""
    out = tmp_path / "run"
    train(_settings(out), progress=False, until=20)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=200_000))
    with pytest.raises(OutputError, match=r"0\.2 MB free, saving step 40 needs about [0-9.]+ MB"):
        train(_settings(out), resume=True, progress=False)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-00000020"]
    assert [row["step"] for row in _log(out)] == ["20"]
    monkeypatch.undo()
    assert train(_settings(out), resume=True, progress=False).step == 60


def test_resume_problems_are_named_and_nothing_is_lost(tmp_path, monkeypatch):
    """Without val_dir a resumed run crashed at its end; another training in the same out_dir mixed checkpoints;
    added images went unnoticed; a lost pointer made a fresh run delete the checkpoint; a changed model did not
    say which key."""
    import shutil

    from batchsr.errors import LockedError
    from batchsr.lock import FolderLock

    images = tmp_path / "hr"
    images.mkdir()
    for path in sorted(data_dir("T91", "HR").iterdir())[:6]:
        shutil.copy(path, images / path.name)
    out = tmp_path / "run"
    train(_settings(out, train_dirs=[str(images)]), progress=False, until=20)
    with FolderLock(out / ".batchsr-train.lock"), pytest.raises(LockedError, match="in use by another batchsr process"):
        train(_settings(out, train_dirs=[str(images)]), resume=True, progress=False)
    with pytest.raises(ConfigError, match=r"model.width \(8 -> 12\)"):
        train(_settings(out, train_dirs=[str(images)], model={"width": 12, "depth": 1, "blocks": 0}), resume=True, progress=False)
    extra = sorted(data_dir("T91", "HR").iterdir())[6]
    shutil.copy(extra, images / extra.name)
    with pytest.raises(ConfigError, match="training images differ"):
        train(_settings(out, train_dirs=[str(images)]), resume=True, progress=False)
    (images / extra.name).unlink()
    (out / "checkpoints" / "latest").unlink()  # damaged: the newest complete checkpoint is still found
    with pytest.raises(ConfigError, match="already holds a training checkpoint"):
        train(_settings(out, train_dirs=[str(images)]), progress=False)
    result = train(_settings(out, train_dirs=[str(images)], val_dir=None), resume=True, progress=False)
    assert result.step == 60 and result.best_weights is None and result.best_psnr is None


def test_tensorboard_without_its_package_is_a_configuration_error(tmp_path, monkeypatch):
    """TensorFlow no longer brings the tensorboard package: `tensorboard: true` failed as a bug (exit 70) once
    training had started."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match="tensorboard package"):
        train(_settings(tmp_path / "run", tensorboard=True), progress=False)


def _loaded_with_warnings(folders, min_side: int):
    """``load_training_images`` and the warnings it logged."""
    from loguru import logger

    from batchsr.data import load_training_images

    messages = []
    sink = logger.add(messages.append, level="WARNING")
    try:
        return load_training_images(folders, min_side), messages
    finally:
        logger.remove(sink)


def test_training_images_count_once_and_small_ones_are_named(tmp_path):
    """A folder listed twice (or with one of its subfolders) counted its images twice; images smaller than a
    patch were dropped without a word."""
    from tests.conftest import write_png

    write_png(tmp_path / "hr" / "big.png", np.full((40, 40, 3), 9, np.uint8))
    write_png(tmp_path / "hr" / "sub" / "also.png", np.full((40, 48, 3), 9, np.uint8))
    write_png(tmp_path / "hr" / "tiny.png", np.full((8, 40, 3), 9, np.uint8))
    images, messages = _loaded_with_warnings([tmp_path / "hr", tmp_path / "hr", tmp_path / "hr" / "sub"], 32)
    assert sorted(image.shape for image in images) == [(40, 40, 3), (40, 48, 3)]
    assert any("1 training images smaller than a patch (32px a side) are left out" in m and "tiny.png" in m for m in messages)


def test_training_leaves_out_upscaled_outputs_and_transparent_images_by_name(tmp_path):
    """Another run's OUTPUT folder inside a training folder was read as high-resolution originals, and the
    display fill under transparent pixels was learnt as photo content; neither said a word."""
    import cv2

    from tests.conftest import write_png

    write_png(tmp_path / "hr" / "photo.png", np.full((40, 40, 3), 9, np.uint8))
    write_png(tmp_path / "hr" / "x4" / "upscaled.png", np.full((40, 44, 3), 9, np.uint8))
    (tmp_path / "hr" / "x4" / ".batchsr").mkdir()  # what `batchsr run IN IN/x4` leaves
    rgba = np.full((40, 48, 4), 200, np.uint8)
    rgba[:, :20, 3] = 0
    assert cv2.imwrite(str(tmp_path / "hr" / "cutout.png"), rgba)
    opaque = rgba.copy()
    opaque[:, :, 3] = 255
    assert cv2.imwrite(str(tmp_path / "hr" / "opaque.png"), opaque)  # an alpha plane, all opaque: a photo
    images, messages = _loaded_with_warnings([tmp_path / "hr"], 32)
    assert sorted(image.shape for image in images) == [(40, 40, 3), (40, 48, 3)]
    assert any("x4: left out, a batchsr output folder" in m for m in messages)
    assert any("1 training images with transparency are left out" in m and "cutout.png" in m for m in messages)


def test_a_validation_folder_inside_the_training_folders_is_warned_about(tmp_path):
    """Validation on images the model trains on chose the "best" weights on seen images, without a word."""
    from loguru import logger

    from batchsr.train import _load_validation

    messages = []
    sink = logger.add(messages.append, level="WARNING")
    try:
        for train_dirs, val_dir in (([data_dir("Set5")], data_dir("Set5", "HR")), ([data_dir("T91", "HR")], data_dir("Set5", "HR"))):
            settings = _settings(tmp_path / "run").model_copy(update={"train_dirs": train_dirs, "val_dir": val_dir})
            assert len(_load_validation(settings)) == 5
    finally:
        logger.remove(sink)
    assert len([m for m in messages if "share images: validation scores images the model trains on" in m]) == 1


def test_an_unreadable_training_image_is_left_out_by_name_not_the_end_of_the_run(tmp_path):
    """One truncated file among a user's own photos ended the training before its first step (exit 65)."""
    from tests.conftest import write_png

    write_png(tmp_path / "hr" / "photo.png", np.full((40, 40, 3), 9, np.uint8))
    (tmp_path / "hr" / "cut.png").write_bytes((tmp_path / "hr" / "photo.png").read_bytes()[:60])
    images, messages = _loaded_with_warnings([tmp_path / "hr"], 32)
    assert [image.shape for image in images] == [(40, 40, 3)]
    assert any("1 training images cannot be read and are left out" in m and "cut.png (" in m for m in messages), messages


def test_a_mistyped_data_folder_or_init_leaves_no_out_dir_behind(tmp_path):
    """A typo in train_dirs failed the run, but only after out_dir, its checkpoint folder and lock were made."""
    from batchsr.errors import ModelError

    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="train_dirs: .*nosuchdir does not exist"):
        train(_settings(out, train_dirs=[str(tmp_path / "nosuchdir")]), progress=False)
    with pytest.raises(ConfigError, match="val_dir .*nosuchval does not exist"):
        train(_settings(out, val_dir=str(tmp_path / "nosuchval")), progress=False)
    with pytest.raises(ModelError):
        train(_settings(out), init=tmp_path / "missing.weights.h5", progress=False)
    assert not out.exists()
