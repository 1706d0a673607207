#!/usr/bin/env python3
"""What a bundled model makes of flat colours, with and without ``engine.flat_guard``.

    .venv/bin/python scripts/flat_colours.py            # the bundled x4 model
    .venv/bin/python scripts/flat_colours.py --scale 2

Upscales flat 8-bit images (64 x 64) of a few levels and prints the range of
levels in each 8-bit output: the README's "Flat colours" figures.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LEVELS = (0, 16, 64, 128, 192, 235, 255)


def main() -> None:
    import numpy as np

    from batchsr.checkpoint import bundled_model
    from batchsr.config import EngineSettings
    from batchsr.engine import Engine
    from batchsr.imageio import from_float

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=4, choices=[2, 3, 4])
    args = parser.parse_args()
    weights = bundled_model(args.scale)
    print("| level | flat_guard 0 (model alone) | flat_guard 2.0 (default) |\n|---|---|---|")
    engines = [Engine(weights, EngineSettings(device="cpu", flat_guard=guard)) for guard in (0.0, 2.0)]
    for level in LEVELS:
        flat = np.full((64, 64, 3), level / 255.0, np.float32)
        ranges = []
        for engine in engines:
            out = from_float(engine.upscale([flat])[0], np.uint8)
            ranges.append(f"{out.min()}-{out.max()}")
        print(f"| {level} | {ranges[0]} | {ranges[1]} |")


if __name__ == "__main__":
    main()
