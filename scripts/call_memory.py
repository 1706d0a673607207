"""Measures the peak memory of one model call against ``Engine.call_mb``, the estimate run.memory_mb counts.

    .venv/bin/python scripts/call_memory.py                  # the bundled x4 model over tiles and batches
    .venv/bin/python scripts/call_memory.py --scale 2

Each setting runs in a fresh process (the first call is the one that allocates): the resident memory is sampled
every 2 ms during ``Engine.upscale`` on a Set14 image resized to the window, minus the output array.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = [(16, 8), (16, 64), (128, 1), (128, 8), (128, 32), (256, 1), (512, 1)]

CHILD = r"""
import sys, threading, time
import numpy as np
from PIL import Image
from batchsr.checkpoint import model_weights
from batchsr.config import load_settings
from batchsr.engine import Engine
from batchsr.pipeline import process_rss_mb

scale, tile, batch = map(int, sys.argv[1:4])
settings = load_settings(None, {"model.scale": scale, "engine.tile": tile, "engine.batch_size": batch})
engine = Engine(model_weights(settings.model), settings.engine)
side = max(tile * 2, 64)  # several windows of the full shape
image = np.asarray(Image.open(sys.argv[4]).convert("RGB").resize((side, side)), np.float32) / 255
base, peak, done = process_rss_mb(), [0.0], threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], process_rss_mb())
        time.sleep(0.002)

thread = threading.Thread(target=sample)
thread.start()
engine.upscale([image])
done.set()
thread.join()
output = side * side * scale * scale * 3 * 4 / 1e6
print(f"{engine.call_mb(side, side):.0f} {peak[0] - base - output:.0f}")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=4, choices=(2, 3, 4))
    parser.add_argument("--image", type=Path, default=REPO.parent / "shared" / "data" / "Set14" / "HR" / "barbara.png")
    args = parser.parse_args()
    if not args.image.is_file():
        parser.error(f"--image {args.image}: no such file")
    image = args.image.resolve()  # the child runs in the repository
    print(f"| x{args.scale} tile | batch | estimate MB | measured MB | measured / estimate |")
    print("|---|---|---|---|---|")
    for tile, batch in SETTINGS:
        result = subprocess.run([sys.executable, "-c", CHILD, str(args.scale), str(tile), str(batch), str(image)],
                                capture_output=True, text=True, cwd=REPO, check=False)
        if result.returncode != 0:
            sys.stderr.write(result.stderr[-4000:])
            sys.exit(f"tile {tile}, batch {batch}: the measuring process failed (exit {result.returncode})")
        estimate, measured = map(float, result.stdout.split()[-2:])
        print(f"| {tile} | {batch} | {estimate:.0f} | {measured:.0f} | {measured / estimate:.2f} |", flush=True)


if __name__ == "__main__":
    main()
