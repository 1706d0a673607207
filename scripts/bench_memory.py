#!/usr/bin/env python3
"""Peak memory of `batchsr run` on one large image: the band-by-band path against the output size.

Writes a synthetic N-megapixel PNG (textured, with flat areas, written row
band by row band so this script stays small), upscales it with `batchsr run`
in a child process held to ``run.memory_mb`` (``--memory-mb``) and reports the
child's peak resident memory next to that cap and to the sizes that an
in-memory pipeline would have to hold.  Output: key=value lines.

    .venv/bin/python scripts/bench_memory.py --megapixels 100            # bundled model (slow on CPU)
    .venv/bin/python scripts/bench_memory.py --megapixels 16 --whole     # the in-memory path, for contrast
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_input(path: Path, width: int, height: int) -> None:
    """Sine texture with noise on the left, flat colour on the right, 256 rows at a time."""
    from batchsr.pngwriter import PNGWriter

    rng = np.random.default_rng(0)
    x = np.arange(width)
    with open(path, "wb") as handle:
        writer = PNGWriter(handle, width, height, 3, np.uint8)
        for y0 in range(0, height, 256):
            y = np.arange(y0, min(y0 + 256, height))[:, None]
            wave = 128 + 80 * np.sin(x[None, :] / 17.0) * np.cos(y / 23.0)
            band = np.repeat(wave[:, :, None], 3, axis=2) + rng.normal(0, 6, (len(y), width, 3))
            band[:, width // 2 :] = (40, 120, 200)
            band[:, :, 1] = np.roll(band[:, :, 1], 5, axis=1)
            writer.write_rows(np.clip(band, 0, 255).astype(np.uint8))
        writer.close()


def png_size(path: Path) -> tuple[int, int]:
    with open(path, "rb") as handle:
        head = handle.read(24)
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def measure(work: Path, side: int, args) -> dict:
    """Writes the input under ``work`` and upscales it in a child process: the report (exits if the run fails)."""
    src, out = work / "in", work / "out"
    src.mkdir()
    t0 = time.time()
    write_input(src / "large.png", side, side)
    made = time.time() - t0
    config = work / "bench.yaml"
    # run.stream_megapixels above the input with --whole, below it otherwise: the run takes the path asked for.
    stream = args.megapixels * 2 if args.whole else min(1.0, side * side / 2e6)
    cap = None if args.whole else args.memory_mb  # the in-memory path would be refused under a small cap
    config.write_text(f"run:\n  stream_megapixels: {stream}\n  memory_mb: {cap or 'null'}\n  progress: log\n  log_interval_s: 60\n"
                      f"engine:\n  tile: {args.tile}\n")
    command = [sys.executable, "-m", "batchsr.cli", "--config", str(config), "run", str(src), str(out), "--format", "png"]
    if args.model is not None:
        command += ["--model", str(args.model)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    t0 = time.time()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    seconds = time.time() - t0
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-4000:])
        sys.exit(result.returncode)
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0  # Linux: kilobytes
    out_w, out_h = png_size(out / "large.png")
    return {
        "path": "band-by-band" if "upscaled band by band" in result.stderr else "in-memory",  # the run's log says which
        "in_width": side,
        "in_height": side,
        "out_width": out_w,
        "out_height": out_h,
        "input_rgb_mb": round(side * side * 3 / 1e6, 1),
        "output_rgb_mb": round(out_w * out_h * 3 / 1e6, 1),
        "output_float_mb": round(out_w * out_h * 12 / 1e6, 1),
        "output_file_mb": round((out / "large.png").stat().st_size / 1e6, 1),
        "peak_rss_mb": round(peak_mb, 1),
        "memory_cap_mb": cap or "auto",
        "under_cap": cap is None or peak_mb < cap,
        "input_written_s": round(made, 1),
        "run_s": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megapixels", type=float, default=100.0, help="input size (a square image)")
    parser.add_argument("--model", type=Path, help="weights (default: the bundled x4 model)")
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--memory-mb", type=int, default=2500, help="run.memory_mb: the cap the run is held to (not with --whole)")
    parser.add_argument("--whole", action="store_true", help="force the in-memory path (run.stream_megapixels above the input)")
    parser.add_argument("--work", type=Path, help="folder for the input and output (default: a temporary one)")
    args = parser.parse_args()
    side = int(math.sqrt(args.megapixels * 1e6))
    if side < 1:
        parser.error(f"--megapixels {args.megapixels}: must be above 0")
    # The child runs in the repository: paths are checked and resolved here.
    if args.work is not None and not args.work.is_dir():
        parser.error(f"--work {args.work}: no such folder")
    if args.model is not None and not args.model.is_file():
        parser.error(f"--model {args.model}: no such file")
    args.work, args.model = (None if path is None else path.resolve() for path in (args.work, args.model))

    work = Path(tempfile.mkdtemp(prefix="batchsr-bench-", dir=args.work))
    try:
        report = measure(work, side, args)
    finally:
        if args.work is None:
            import shutil

            shutil.rmtree(work)
    for key, value in report.items():
        print(f"{key}={value}")


if __name__ == "__main__":
    main()
