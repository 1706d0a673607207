#!/usr/bin/env python3
"""Peak memory of `batchsr run` while large images wait decoded ahead of their turn.

Writes one ordinary PNG (the model takes a few seconds over it) followed by
``--count`` large JPEGs whose x4 output would pass JPEG's 65535-pixel limit,
so each is decoded and then refused before the model: while the first image
is in the model, the others can only pile up decoded ahead.  Runs `batchsr
run` on the folder in a child process under ``run.memory_mb`` and reports the
child's peak resident memory.  ``--source DIR`` runs the batchsr of another
checkout (to compare versions in one sitting).  Output: key=value lines.

    .venv/bin/python scripts/bench_decode_ahead.py --count 12 --memory-mb 2500
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=12, help="large JPEGs after the first image")
    parser.add_argument("--width", type=int, default=17000, help="their width, a multiple of 8 (x4 must pass 65535)")
    parser.add_argument("--height", type=int, default=2000)
    parser.add_argument("--memory-mb", type=int, default=2500, help="run.memory_mb")
    parser.add_argument("--source", type=Path, default=REPO, help="the checkout whose batchsr runs")
    parser.add_argument("--work", type=Path, help="folder for the input and output (default: a temporary one)")
    args = parser.parse_args()
    if args.width < 8 or args.width % 8:
        parser.error(f"--width {args.width}: must be a multiple of 8 (the image repeats a tile 8 times across)")
    if args.height < 1:
        parser.error(f"--height {args.height}: must be at least 1")
    # The child runs in --source: paths are checked and resolved here.
    if not (args.source / "batchsr").is_dir():
        parser.error(f"--source {args.source}: not a batchsr checkout (no batchsr/ folder)")
    if args.work is not None and not args.work.is_dir():
        parser.error(f"--work {args.work}: no such folder")
    args.source, args.work = args.source.resolve(), args.work and args.work.resolve()

    work = Path(tempfile.mkdtemp(prefix="batchsr-ahead-", dir=args.work))
    src, out = work / "in", work / "out"
    src.mkdir()
    rng = np.random.default_rng(0)
    first = cv2.GaussianBlur(rng.integers(0, 256, (600, 600, 3), dtype=np.uint8), (5, 5), 0)
    assert cv2.imwrite(str(src / "a_first.png"), first)
    y, x = np.mgrid[0 : args.height, 0 : args.width // 8]
    tile = (128 + 100 * np.sin(x / 37.0) * np.cos(y / 53.0)).astype(np.uint8)
    large = np.repeat(np.tile(tile, (1, 8))[:, :, None], 3, axis=2)
    for k in range(args.count):
        assert cv2.imwrite(str(src / f"b_{k:02d}.jpg"), large, [cv2.IMWRITE_JPEG_QUALITY, 90])
    config = work / "bench.yaml"
    config.write_text(f"run:\n  memory_mb: {args.memory_mb}\n  progress: none\n")
    command = [sys.executable, "-m", "batchsr.cli", "--config", str(config), "run", str(src), str(out)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(args.source)}
    t0 = time.time()
    result = subprocess.run(command, cwd=args.source, env=env, capture_output=True, text=True, check=False)
    seconds = time.time() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0  # Linux: kilobytes
    refused = result.stderr.count("too large for JPG")
    report = {
        "source": args.source,
        "exit_code": result.returncode,
        "large_images": args.count,
        "large_rgb_mb_each": round(args.width * args.height * 3 / 1e6, 1),
        "first_done": (out / "a_first.png").is_file(),
        "refused_lines": refused,
        "memory_cap_mb": args.memory_mb,
        "peak_rss_mb": round(peak_mb, 1),
        "run_s": round(seconds, 1),
    }
    for key, value in report.items():
        print(f"{key}={value}")
    if result.returncode not in (0, 65):
        sys.stderr.write(result.stderr[-4000:])
    if args.work is None:
        import shutil

        shutil.rmtree(work)


if __name__ == "__main__":
    main()
