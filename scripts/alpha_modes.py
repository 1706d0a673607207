#!/usr/bin/env python3
"""``image.alpha``: the alpha plane upscaled by the model or by bicubic, scored against the HR mask.

    .venv/bin/python scripts/alpha_modes.py            # the bundled x4 model
    .venv/bin/python scripts/alpha_modes.py --scale 2

HR masks (hard and soft edges) are downscaled with the benchmark's MATLAB
bicubic, upscaled back both ways as ``run`` does, and scored by PSNR (dB,
``scale`` border pixels cropped): the README's "Transparency" figures.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def masks(side: int = 240) -> dict:
    import cv2
    import numpy as np

    yy, xx = np.mgrid[:side, :side]
    disk = (((yy - side / 2) ** 2 + (xx - side / 2) ** 2) < (side / 3) ** 2).astype(np.float32)
    box = np.zeros((side, side), np.float32)
    cv2.fillPoly(box, [np.array([[30, 60], [200, 20], [220, 170], [50, 210]], np.int32)], 1.0)
    text = np.zeros((side, side), np.uint8)
    cv2.putText(text, "batchsr", (8, 140), cv2.FONT_HERSHEY_SIMPLEX, 2.0, 255, 5, cv2.LINE_AA)
    text = text.astype(np.float32) / 255.0
    soft = cv2.GaussianBlur(disk, (0, 0), 6.0)
    ramp = np.tile(np.linspace(0.0, 1.0, side, dtype=np.float32), (side, 1))
    return {"hard disk": disk, "hard polygon": box, "anti-aliased text": text, "soft disk (blur 6 px)": soft,
            "linear ramp": ramp}


def main() -> None:
    import numpy as np

    from batchsr.checkpoint import bundled_model
    from batchsr.config import EngineSettings
    from batchsr.engine import Engine
    from batchsr.imageio import from_float, to_float
    from batchsr.metrics import psnr
    from batchsr.resize import degrade, imresize

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=4, choices=[2, 3, 4])
    args = parser.parse_args()
    s = args.scale
    engine = Engine(bundled_model(s), EngineSettings(device="cpu"))
    print("| mask | bicubic PSNR | model PSNR | gain |\n|---|---|---|---|")
    for name, mask in masks().items():
        hr = from_float(mask, np.uint8)
        lr = degrade(np.repeat(hr[:, :, None], 3, axis=2), s)[:, :, 0]
        bicubic = imresize(lr, size=hr.shape)
        model = engine.upscale([np.repeat(to_float(lr)[:, :, None], 3, axis=2)])[0]
        model = from_float(np.clip(model.mean(axis=2), 0.0, 1.0), np.uint8)  # as run keeps the plane
        a, b = psnr(bicubic, hr, border=s), psnr(model, hr, border=s)
        print(f"| {name} | {a:.2f} | {b:.2f} | {b - a:+.2f} |")


if __name__ == "__main__":
    main()
