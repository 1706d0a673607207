#!/usr/bin/env python3
"""GPU check and throughput of the shipped model on the JAX backend (no TensorFlow needed).

1. Output must match the TensorFlow-CPU reference stored in ``scripts/gpu_reference/``
   (PSNR between them >= 60 dB in float32, >= 45 dB in mixed bfloat16).
2. Model-only x4 output MP/s at float32 and mixed_bfloat16 over a range of batch sizes.

Runs unattended in well under 3 minutes:
    KERAS_BACKEND=jax python3 scripts/bench_gpu.py
Re-create the reference (TensorFlow, CPU, float32) after changing the shipped model:
    .venv/bin/python scripts/bench_gpu.py --make-reference
For weights trained on the GPU before they ship, ``--model W --save DIR`` writes the
GPU outputs on the reference input; ``--compare DIR --model W`` (TensorFlow, CPU)
scores them against W's CPU output.
Needs only numpy, h5py and keras (plus JAX or PyTorch) beside this repository.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "scripts" / "gpu_reference"


def psnr(a, b) -> float:
    import numpy as np

    mse = float(np.mean((np.clip(a, 0, 1).astype(np.float64) - np.clip(b, 0, 1)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def load(precision: str, weights: Path | None = None):
    import keras

    from batchsr.checkpoint import DEFAULT_MODEL, load_model

    keras.mixed_precision.set_global_policy(precision)
    try:
        return load_model(weights or DEFAULT_MODEL)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def gpus() -> list:
    """The accelerators the backend computes on: without one this check would compare the CPU with itself."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        return [device for device in jax.devices() if device.platform != "cpu"]
    if keras.backend.backend() == "torch":
        import torch

        return [torch.cuda.get_device_name(k) for k in range(torch.cuda.device_count())]
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.config.list_physical_devices("GPU")
    return []


def make_reference() -> None:
    import cv2
    import numpy as np

    model, info = load("float32")
    lr = cv2.cvtColor(cv2.imread(str(REPO / "batchsr" / "samples" / "astronaut.png")), cv2.COLOR_BGR2RGB)[:96, :96]
    x = lr.astype(np.float32) / 255.0
    sr = np.asarray(model.predict_on_batch(x[None]))[0]
    REFERENCE.mkdir(exist_ok=True)
    np.save(REFERENCE / "lr.npy", x)
    np.save(REFERENCE / "sr_float32.npy", sr.astype(np.float32))
    (REFERENCE / "MODEL_ID").write_text(info.model_id + "\n")
    print(f"reference for {info.model_id} written to {REFERENCE}")


def save_or_compare(weights: Path | None, save: Path | None, compare: Path | None) -> None:
    import numpy as np

    x = np.load(REFERENCE / "lr.npy")
    if save:
        save.mkdir(parents=True, exist_ok=True)
        for precision in ("float32", "mixed_bfloat16"):
            model, info = load(precision, weights)
            np.save(save / f"sr_{precision}.npy", np.asarray(model.predict_on_batch(x[None]), dtype=np.float32)[0])
        (save / "MODEL_ID").write_text(info.model_id + "\n")
        print(f"outputs of {info.model_id} written to {save}")
        return
    model, info = load("float32", weights)
    saved_id = (compare / "MODEL_ID").read_text().strip()
    if saved_id != info.model_id:
        sys.exit(f"{compare} holds outputs of {saved_id}, not of {info.model_id}")
    reference = np.asarray(model.predict_on_batch(x[None]), dtype=np.float32)[0]
    failures = []
    for precision, floor in (("float32", 60.0), ("mixed_bfloat16", 45.0)):
        value = psnr(np.load(compare / f"sr_{precision}.npy"), reference)
        verdict = "ok" if value >= floor else "FAIL"
        print(f"{info.model_id} {precision}: PSNR vs this backend's float32 {value:.1f} dB (need >= {floor}) {verdict}")
        if value < floor:
            failures.append(f"{precision}: {value:.1f} dB < {floor}")
    if failures:
        sys.exit("; ".join(failures))


def throughput(model, scale: int, tile: int, batch: int, seconds: float = 3.0) -> float:
    """Output MP/s of ``predict_on_batch``, the output copied back to the host as the product does."""
    import numpy as np

    x = np.random.default_rng(0).random((batch, tile, tile, 3), dtype=np.float32)
    np.asarray(model.predict_on_batch(x))  # compile for this shape
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        np.asarray(model.predict_on_batch(x))  # np.asarray waits for the device
        runs += 1
    elapsed = time.perf_counter() - start
    return runs * batch * tile * tile * scale * scale / 1e6 / elapsed


def device_throughput(model, scale: int, tile: int, batch: int, seconds: float = 2.0) -> float | None:
    """Output MP/s of the compiled forward pass alone: input and output stay on the device (JAX only).

    Set beside ``throughput`` it splits the time between the arithmetic and the
    host copies and per-call overhead of ``predict_on_batch``.
    """
    import keras

    if keras.backend.backend() != "jax":
        return None
    import jax
    import numpy as np

    trainable = [v.value for v in model.trainable_variables]
    fixed = [v.value for v in model.non_trainable_variables]
    forward = jax.jit(lambda t, f, x: model.stateless_call(t, f, x, training=False)[0])
    x = jax.device_put(np.random.default_rng(0).random((batch, tile, tile, 3), dtype=np.float32))
    forward(trainable, fixed, x).block_until_ready()  # compile for this shape
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        forward(trainable, fixed, x).block_until_ready()
        runs += 1
    elapsed = time.perf_counter() - start
    return runs * batch * tile * tile * scale * scale / 1e6 / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description="GPU check and throughput (JAX backend)")
    parser.add_argument("--make-reference", action="store_true")
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 32, 64])
    parser.add_argument("--model", type=Path, help="weights to check instead of the shipped model")
    parser.add_argument("--save", type=Path, help="only write this backend's outputs on the reference input here")
    parser.add_argument("--compare", type=Path, help="score outputs saved with --save against this backend's float32 output")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    if args.make_reference:
        if args.model:
            parser.error(f"--model {args.model}: --make-reference makes the reference of the shipped model; "
                         "for other weights use --save and --compare")
        make_reference()
        return
    if args.model:
        from batchsr.checkpoint import read_info
        from batchsr.errors import ModelError

        try:
            read_info(args.model)
        except ModelError as exc:
            parser.error(f"--model: {exc}")
    import keras
    import numpy as np

    if not args.compare and not gpus():  # --compare runs on the CPU, against outputs --save wrote on the GPU
        sys.exit(f"no GPU found (Keras backend {keras.backend.backend()}): run this on a machine with a GPU, "
                 "KERAS_BACKEND=jax python3 scripts/bench_gpu.py")
    if args.save or args.compare:
        save_or_compare(args.model, args.save, args.compare)
        return
    print(f"backend {keras.backend.backend()}, keras {keras.__version__}, devices {gpus()}")
    x = np.load(REFERENCE / "lr.npy")
    reference = np.load(REFERENCE / "sr_float32.npy")
    failures = []
    if args.model:  # the stored reference is the shipped model's output
        print(f"{args.model}: throughput only (to check its output, --save here and --compare on the CPU)")
    for precision, floor in (("float32", 60.0), ("mixed_bfloat16", 45.0)):
        model, info = load(precision, args.model)
        if not args.model:
            expected_id = (REFERENCE / "MODEL_ID").read_text().strip()
            if info.model_id != expected_id:
                failures.append(f"reference was made for {expected_id}, the shipped model is {info.model_id}: "
                                "rerun --make-reference")
            sr = np.asarray(model.predict_on_batch(x[None]), dtype=np.float32)[0]
            value = psnr(sr, reference)
            verdict = "ok" if value >= floor else "FAIL"
            print(f"{precision}: PSNR vs TensorFlow-CPU reference {value:.1f} dB (need >= {floor}) {verdict}")
            if value < floor:
                failures.append(f"{precision} output differs from the reference ({value:.1f} dB < {floor})")
        print("| precision | tile | batch | output MP/s | on the device alone |\n|---|---|---|---|---|")
        for batch in args.batches:
            mps = throughput(model, info.scale, args.tile, batch)
            alone = device_throughput(model, info.scale, args.tile, batch)
            print(f"| {precision} | {args.tile} | {batch} | {mps:.1f} | {'-' if alone is None else f'{alone:.1f}'} |", flush=True)
    if failures:
        sys.exit("; ".join(failures))


if __name__ == "__main__":
    main()
