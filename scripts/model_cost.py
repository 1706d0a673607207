#!/usr/bin/env python3
"""Parameters and multiply-adds per input pixel of model configurations (no weights needed).

    python scripts/model_cost.py                                  # the bundled x4 shape, unet (also top_width 48, blocks 3), seed
    python scripts/model_cost.py --arch unet --scale 2 --blocks 3
    python scripts/model_cost.py --edsr --scale 4                   # the EDSR-baseline-shaped reference of bench_cpu.py

Counts the trainable convolutions (the fixed bicubic branch adds about 0.001 M)
by running the model once on a 64x64 input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cost(model, side: int = 64) -> tuple[int, float]:
    """(parameters, multiply-adds per input pixel) of a Keras ``model``, from its convolutions."""
    import keras
    import numpy as np

    convs = [layer for layer in model.layers if isinstance(layer, (keras.layers.Conv2D, keras.layers.Conv2DTranspose))]
    probe = keras.Model(model.input, [layer.output for layer in convs])
    outputs = probe.predict_on_batch(np.zeros((1, side, side, 3), "float32"))
    macs = 0
    for layer, out in zip(convs, outputs):
        kh, kw = layer.kernel.shape[:2]
        h, w = out.shape[1:3]
        if isinstance(layer, keras.layers.Conv2DTranspose):  # kernel (kh, kw, out, in); one input pixel feeds kh*kw outputs
            cout, cin = layer.kernel.shape[2:]
            h, w = h // layer.strides[0], w // layer.strides[1]
        else:
            cin, cout = layer.kernel.shape[2:]
        macs += h * w * kh * kw * cin * cout
    return model.count_params(), macs / side**2


def main() -> None:
    from batchsr.model import ModelConfig, validate_config

    parser = argparse.ArgumentParser(description="parameters and multiply-adds per input pixel")
    parser.add_argument("--arch", choices=["unet", "seed"])
    parser.add_argument("--scale", type=int, choices=(2, 3, 4), help="default 4")
    parser.add_argument("--width", type=int, help="default 32")
    parser.add_argument("--depth", type=int, help="default 2")
    parser.add_argument("--blocks", type=int, help="default 2")
    parser.add_argument("--top-width", type=int, help="channels of the full-resolution stages (default 0: width)")
    parser.add_argument("--top-blocks", type=int, help="residual blocks of the full-resolution stages (default: blocks)")
    parser.add_argument("--edsr", action="store_true", help="count the EDSR-baseline-shaped network of bench_cpu.py instead")
    args = parser.parse_args()
    # Shape flags shape the --arch model and --edsr takes only --scale: anything else would be silently ignored.
    shape = {name: value for name, value in vars(args).items() if name not in ("arch", "edsr") and value is not None}
    if args.edsr:
        extra = [f"--{name.replace('_', '-')} {value}" for name, value in {**shape, "arch": args.arch}.items()
                 if value is not None and name != "scale"]
        if extra:
            parser.error(f"--edsr takes only --scale, not {', '.join(extra)}")
    elif shape and not args.arch:
        given = ", ".join(f"--{name.replace('_', '-')} {value}" for name, value in shape.items())
        parser.error(f"{given}: shape flags need --arch unet or --arch seed")
    scale = args.scale or 4
    print("| model | parameters | M multiply-adds per input pixel |\n|---|---|---|")
    if args.edsr:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_cpu import edsr_baseline

        params, macs = cost(edsr_baseline(scale))
        print(f"| EDSR-baseline shape x{scale} | {params:,} | {macs / 1e6:.3f} |")
        return
    if args.arch:
        config = ModelConfig(args.arch, **shape)
        try:
            validate_config(config)
        except ValueError as exc:
            parser.error(str(exc))
        configs = [config]
    else:
        configs = [ModelConfig("unet", 4, 32, 2, 1, top_width=48, top_blocks=2), ModelConfig("unet", 4, 32, 2, 2),
                   ModelConfig("unet", 4, 32, 2, 2, top_width=48), ModelConfig("unet", 4, 32, 2, 3),
                   ModelConfig("seed", 4, 32, 2, 2)]
    from batchsr.model import build_model

    for config in configs:
        params, macs = cost(build_model(config))
        print(f"| {config.arch} x{config.scale} width {config.width} depth {config.depth} blocks {config.blocks}"
              f"{f' top_width {config.top_width}' if config.top_width else ''}"
              f"{f' top_blocks {config.top_blocks}' if config.top_blocks is not None else ''} "
              f"| {params:,} | {macs / 1e6:.3f} |")


if __name__ == "__main__":
    main()
