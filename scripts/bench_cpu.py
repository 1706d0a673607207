#!/usr/bin/env python3
"""CPU throughput: OpenCV bicubic, the model alone, `batchsr run` end to end, and an
EDSR-baseline-shaped reference network, measured side by side in one run.

Output megapixels per second (MP/s = output pixels / 1e6 / seconds), the
end-to-end / model-only ratio (the pipeline's overhead) and peak memory.
Run on a quiet machine:  .venv/bin/python scripts/bench_cpu.py
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"


def edsr_baseline(scale: int):
    """EDSR-baseline's shape: 16 residual blocks of 64 channels, sub-pixel upsampler (random weights)."""
    import keras
    from keras import layers, ops

    class Shuffle(layers.Layer):
        def __init__(self, s, **kw):
            super().__init__(**kw)
            self.s = s

        def call(self, x):
            return ops.depth_to_space(x, self.s)

    x_in = keras.Input((None, None, 3))
    x = head = layers.Conv2D(64, 3, padding="same")(x_in)
    for _ in range(16):
        y = layers.Conv2D(64, 3, padding="same", activation="relu")(x)
        y = layers.Conv2D(64, 3, padding="same")(y)
        x = layers.Add()([x, y])
    x = layers.Add()([head, layers.Conv2D(64, 3, padding="same")(x)])
    for _ in range({2: 1, 3: 1, 4: 2}[scale]):
        s = 3 if scale == 3 else 2
        x = Shuffle(s)(layers.Conv2D(64 * s * s, 3, padding="same")(x))
    return keras.Model(x_in, layers.Conv2D(3, 3, padding="same")(x))


def timed(fn, repeat: int) -> float:
    """Median seconds of ``repeat`` calls after a warm-up call (tracing, allocation)."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench_bicubic(sizes, scales, repeat):
    import cv2

    rows = []
    for scale in scales:
        for h, w in sizes:
            img = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
            t = timed(lambda: cv2.resize(img, (w * scale, h * scale), interpolation=cv2.INTER_CUBIC), repeat * 5)
            rows.append((f"x{scale}", f"{w}x{h}", h * w * scale * scale / 1e6 / t))
    return rows


def bench_pair(ours, reference, scale, batches, tiles, repeat):
    """Output MP/s of both networks per (tile, batch). Their calls alternate, so that a
    slow spell of a shared machine hits both; each timing repeats the call for at least
    a quarter of a second, so that a 64x64 tile is not one timer tick."""
    rows = {}
    for tile in tiles:
        for batch in batches:
            x = np.random.default_rng(0).random((batch, tile, tile, 3), dtype=np.float32)
            calls = {}
            for name, model in (("ours", ours), ("reference", reference)):
                model.predict_on_batch(x)  # tracing, allocation
                t0, n = time.perf_counter(), 0
                while time.perf_counter() - t0 < 0.25:
                    model.predict_on_batch(x)
                    n += 1
                calls[name] = n
            times = {"ours": [], "reference": []}
            for _ in range(repeat):
                for name, model in (("ours", ours), ("reference", reference)):
                    t0 = time.perf_counter()
                    for _ in range(calls[name]):
                        model.predict_on_batch(x)
                    times[name].append((time.perf_counter() - t0) / calls[name])
            mp = batch * tile * tile * scale * scale / 1e6
            rows[(tile, batch)] = tuple(mp / float(np.median(times[name])) for name in ("ours", "reference"))
    return rows


def bench_end_to_end(weights: Path | None, scale: int, count: int, tile: int, batch: int):
    """`batchsr run` as a user runs it, in a child process: decode, infer, encode, write."""
    from batchsr.imageio import read_image
    from batchsr.resize import degrade

    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "in", Path(tmp) / "out"
        src.mkdir()
        import cv2

        hr_files = sorted((DATA / "BSD100" / "HR").glob("*.png"))
        out_mp = 0.0
        for k in range(count):  # cycles through BSD100 when more images are asked for
            path = hr_files[k % len(hr_files)]
            lr = degrade(read_image(path).rgb, 4)
            cv2.imwrite(str(src / f"{k:05d}_{path.name}"), cv2.cvtColor(lr, cv2.COLOR_RGB2BGR))
            out_mp += lr.shape[0] * lr.shape[1] * scale**2 / 1e6
        # The child reports its own peak RSS from /proc (VmHWM): ru_maxrss would carry over
        # the pages it shared with this process before exec.
        probe = ("import atexit, re, sys; atexit.register(lambda: sys.stderr.write('PEAK_RSS_KB %s\\n' % "
                 "re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))); "
                 "from batchsr.cli import main; sys.argv = ['batchsr'] + sys.argv[1:]; main()")
        cmd = [sys.executable, "-c", probe, "run", str(src), str(out), "--tile", str(tile),
               "--batch-size", str(batch), "--progress", "none", "--format", "png"]
        if weights:
            cmd += ["--model", str(weights)]
        t0 = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - t0
        if result.returncode != 0:
            sys.exit(f"batchsr run failed:\n{result.stderr}")
        seconds = float(re.search(r"in ([0-9.]+)s \(", result.stderr).group(1))
        peak_mb = int(re.search(r"PEAK_RSS_KB (\d+)", result.stderr).group(1)) / 1024
        return count, out_mp, seconds, wall, peak_mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="weights (default: the bundled x4 model)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--tiles", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--images", type=int, default=300, help="LR images (BSD100, cycled) for the end-to-end run")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    for flag, values in (("--batches", args.batches), ("--tiles", args.tiles), ("--images", [args.images]), ("--repeat", [args.repeat])):
        if min(values) < 1:
            parser.error(f"{flag} {min(values)}: must be at least 1")

    import keras
    import tensorflow as tf

    from batchsr.checkpoint import DEFAULT_MODEL, load_model
    from batchsr.errors import ModelError
    from batchsr.model import ModelConfig, build_model

    # Resolved here: the end-to-end run's child runs in the repository. Loaded before the long model-only part.
    weights = args.model.resolve() if args.model else None
    try:
        ours, info = load_model(weights or DEFAULT_MODEL)
    except ModelError as exc:
        parser.error(f"--model: {exc}")
    print(f"# CPU benchmark: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"TensorFlow {tf.__version__}, Keras {keras.__version__}, model {info.model_id}\n")

    print("## OpenCV bicubic (output MP/s)\n\n| scale | input | MP/s |\n|---|---|---|")
    for scale, size, mps in bench_bicubic([(128, 128), (256, 256), (480, 320)], [2, 4], args.repeat):
        print(f"| {scale} | {size} | {mps:.1f} |")

    print("\n## Model only, float32 (output MP/s)\n")
    print("| scale | network | tile | batch | MP/s | batchsr / EDSR-baseline |\n|---|---|---|---|---|---|")
    for scale in sorted({2, 4, info.scale}):  # the loaded model at its scale, its shape at x2 and x4
        net = ours if scale == info.scale else build_model(ModelConfig(**{**info.config, "scale": scale}))
        pairs = bench_pair(net, edsr_baseline(scale), scale, args.batches, args.tiles, args.repeat)
        for key, (mine, edsr) in pairs.items():
            label = "batchsr" + ("" if scale == info.scale else " (same shape, random weights)")
            print(f"| x{scale} | {label} | {key[0]} | {key[1]} | {mine:.3f} | {mine / edsr:.1f}x |")
            print(f"| x{scale} | EDSR-baseline shape | {key[0]} | {key[1]} | {edsr:.3f} | |")

    tile, batch = 128, 8
    n, out_mp, seconds, wall, peak = bench_end_to_end(weights, info.scale, args.images, tile, batch)
    # BSD100 LR images (120x80) are smaller than a window, so the model runs on
    # 120x80 / 80x120 windows: model-only is measured on that shape too.
    x = np.random.default_rng(0).random((batch, 80, 120, 3), dtype=np.float32)
    ref = batch * 80 * 120 * info.scale**2 / 1e6 / timed(lambda: ours.predict_on_batch(x), args.repeat)
    e2e = out_mp / seconds
    print(f"\n## `batchsr run` end to end (x{info.scale}, {n} BSD100 LR images of 120x80, tile {tile}, batch {batch})\n")
    print(f"model only on batches of {batch} 120x80 inputs: {ref:.3f} MP/s; run time counts TensorFlow start-up and model loading.\n")
    print("| output MP | run time (s) | process wall (s) | MP/s | end-to-end / model-only | peak RSS (MB) |\n|---|---|---|---|---|---|")
    print(f"| {out_mp:.1f} | {seconds:.1f} | {wall:.1f} | {e2e:.3f} | {e2e / ref:.2f} | {peak:.0f} |")
    print(f"\npeak RSS of this benchmark process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
