"""The bundled models on the JAX and PyTorch backends: the same output as on TensorFlow.

Keras picks its backend when it is imported, so each other backend runs in a
fresh interpreter that rebuilds every model from its description with
``load_model`` and writes its outputs; the reference is computed here, on
TensorFlow.  Both sides run on the CPU: GPU convolutions may round through
TF32, which is not what is compared.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from tests.conftest import REPO, data_dir

# Float32 through ~30 convolutions summed in another order differs by ~2e-7 on [0, 1] outputs; a layer that
# means something else on another backend (padding side, sub-pixel order, kernel layout) moves whole pixels.
# 1e-5 keeps fifty times the rounding and stays below one 16-bit level (1/65535).
ATOL = 1e-5
EVEN, ODD = (40, 36), (41, 37)  # ODD: not a multiple of 4, so the model pads and crops back
BACKENDS = ("jax", "torch")
# On JAX each weight shape's initial values come from a newly compiled function, and LLVM's optimisation of
# those compiles is most of a run this small (36 s against 12 s on 2 cores). Level 0 changes the machine code,
# not the arithmetic: the outputs were bit-identical.
FAST_COMPILE = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
CASES = [(2, EVEN), (2, ODD), (3, EVEN), (3, ODD), (4, EVEN), (4, ODD)]

CHILD = """
import sys

import keras
import numpy as np

from batchsr.checkpoint import bundled_model, load_model

inputs = np.load(sys.argv[1])
outputs = {}
for scale in sorted({int(key.split("_")[0][1:]) for key in inputs.files}):
    model, _ = load_model(bundled_model(scale))
    for key in [k for k in inputs.files if k.startswith(f"x{scale}_")]:
        outputs[key] = np.asarray(model.predict_on_batch(inputs[key]), dtype=np.float32)
np.savez(sys.argv[2], backend=keras.backend.backend(), **outputs)
"""


def _key(scale: int, size: tuple[int, int]) -> str:
    return f"x{scale}_{size[0]}x{size[1]}"


def _crop(size: tuple[int, int]) -> np.ndarray:
    """A textured part of baby.png (eye and skin), as float RGB in [0, 1]."""
    bgr = cv2.imread(str(data_dir("Set5", "HR") / "baby.png"), cv2.IMREAD_COLOR)
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)[200 : 200 + size[0], 220 : 220 + size[1]]
    return (rgb.astype(np.float32) / 255.0)[None]


def _needs(backend: str) -> None:
    if backend == "jax":  # part of the test extra: missing means a broken install, not an optional one
        if importlib.util.find_spec("jax") is None:
            pytest.fail("jax is not installed; it comes with the test extra: pip install -e '.[test]'")
    elif "torch" in os.environ.get("BATCHSR_TEST_EXTRAS", "").split(","):
        if importlib.util.find_spec("torch") is None:
            pytest.fail("the test command installed torch, but it cannot be found")
    elif importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed (optional: not a dependency, a PyPI torch wheel brings CUDA, several GB)")


@pytest.fixture(scope="module")
def backend_outputs(tmp_path_factory):
    """``outputs(backend)``: every case run in a fresh interpreter on ``backend``.

    The runs start at once, one per installed backend, and go on while the reference is computed.
    """
    folder = tmp_path_factory.mktemp("backends")
    np.savez(folder / "inputs.npz", **{_key(scale, size): _crop(size) for scale, size in CASES})
    started = {}
    for backend in BACKENDS:
        if importlib.util.find_spec(backend) is not None:
            env = {**os.environ, "KERAS_BACKEND": backend, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "",
                   "TF_CPP_MIN_LOG_LEVEL": "3", "XLA_FLAGS": FAST_COMPILE}
            args = [sys.executable, "-c", CHILD, str(folder / "inputs.npz"), str(folder / f"{backend}.npz")]
            with open(folder / f"{backend}.log", "w") as log:  # a file, not a pipe: nothing reads it until the end
                started[backend] = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    runs: dict[str, dict[str, np.ndarray]] = {}

    def outputs(backend: str) -> dict[str, np.ndarray]:
        if backend not in runs:
            try:
                code = started[backend].wait(timeout=300)
            except subprocess.TimeoutExpired:
                started[backend].kill()
                raise
            log = (folder / f"{backend}.log").read_text(errors="replace")
            assert code == 0, f"the {backend} run failed:\n{log[-3000:]}"
            with np.load(folder / f"{backend}.npz") as saved:
                runs[backend] = {key: saved[key] for key in saved.files}
            assert str(runs[backend]["backend"]) == backend  # KERAS_BACKEND took effect
        return runs[backend]

    yield outputs
    for run in started.values():
        if run.poll() is None:
            run.kill()
            run.wait()


@pytest.fixture(scope="module")
def reference(backend_outputs) -> dict[str, np.ndarray]:
    """TensorFlow's outputs, computed here (after the other backends' runs have started)."""
    import keras

    if keras.backend.backend() != "tensorflow":
        pytest.skip(f"the reference is TensorFlow's output; this process runs {keras.backend.backend()}")
    import tensorflow as tf

    from batchsr.checkpoint import bundled_model, load_model

    outputs = {}
    with tf.device("/CPU:0"):
        for scale in sorted({scale for scale, _ in CASES}):
            model, _ = load_model(bundled_model(scale))
            for s, size in CASES:
                if s == scale:
                    outputs[_key(scale, size)] = np.asarray(model.predict_on_batch(_crop(size)), dtype=np.float32)
    return outputs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale, size", CASES, ids=[_key(scale, size) for scale, size in CASES])
def test_bundled_model_matches_tensorflow(backend, scale, size, reference, backend_outputs):
    _needs(backend)
    expected = reference[_key(scale, size)]
    got = backend_outputs(backend)[_key(scale, size)]
    assert expected.shape == got.shape == (1, size[0] * scale, size[1] * scale, 3)
    assert expected.std() > 0.05  # a real, textured output, not a flat one that any backend would agree on
    diff = float(np.abs(got - expected).max())
    assert diff < ATOL, f"x{scale} {size[0]}x{size[1]} on {backend}: max abs difference {diff:.3g} from TensorFlow"
