#!/usr/bin/env python3
"""Fine-tunes a model towards its own self-ensemble (the average of its outputs over the 8 flips/rotations).

`--self-ensemble` gains about 0.1 dB at 8x the model time. This moves part of that gain into the single
model at no cost at run time: each training target is a mix of the HR patch and the ensemble's output for
its LR patch (``--alpha`` of HR), the ensemble computed once, before training, on the whole LR image.

    python scripts/self_distill.py --weights batchsr/weights/unet_x4.weights.h5 --out runs/distill_x4 \\
        --steps 10000 --lr 5e-5 --alpha 0.5 --interval 500

Training images: T91 + BSDS200 (``--data``) and their MATLAB-bicubic copies at 0.8 and 0.6 of their size,
HR cropped to a multiple of the scale, LR made by the benchmark degradation (rounded to 8 bits). Patches:
48x48 LR, batch 16, random crops weighted by area, the 8 flips/rotations. Adam under a cosine schedule
(200 warm-up steps, a tenth of a shorter run; down to 2% of ``--lr``), weights averaged (EMA 0.999). At each interval and at
the last step the EMA weights are scored on Set5 (Y-PSNR, the validation set) and saved, with their description, as
``OUT/step-N/<name>.weights.h5``; ``OUT/log.csv`` lists the scores. Pure Keras: any backend.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from batchsr.checkpoint import load_model, save_model  # noqa: E402
from batchsr.data import find_images  # noqa: E402
from batchsr.errors import ModelError  # noqa: E402
from batchsr.imageio import read_image, to_uint8  # noqa: E402
from batchsr.resize import crop_to_multiple, degrade, imresize  # noqa: E402
from batchsr.train import validate  # noqa: E402

PATCH, BATCH, WARMUP, SEED = 48, 16, 200, 7
RESCALE = (1.0, 0.8, 0.6)


def _turned(image: np.ndarray, code: int) -> np.ndarray:
    image = image[:, ::-1] if code & 1 else image
    image = image[::-1] if code & 2 else image
    return image.transpose(1, 0, 2) if code & 4 else image


def _unturned(image: np.ndarray, code: int) -> np.ndarray:
    image = image.transpose(1, 0, 2) if code & 4 else image
    image = image[::-1] if code & 2 else image
    return image[:, ::-1] if code & 1 else image


def ensemble(model, lr: np.ndarray) -> np.ndarray:
    """The mean of the model's outputs over the 8 flips/rotations of ``lr`` (float RGB in [0, 1])."""
    total = None
    for code in range(8):
        out = np.asarray(model(np.ascontiguousarray(_turned(lr, code))[None], training=False))[0]
        total = _unturned(out, code) if total is None else total + _unturned(out, code)
    return np.clip(total / 8, 0, 1)


def training_triples(model, data: Path, scale: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(LR uint8, ensemble output x255 float16, HR uint8)`` for each training image and rescaled copy."""
    triples = []
    paths = find_images(data / "T91" / "HR") + find_images(data / "BSDS200" / "HR")
    started = time.time()
    for index, path in enumerate(paths):
        rgb = to_uint8(read_image(path).rgb)
        for factor in RESCALE:
            hr = crop_to_multiple(rgb if factor == 1.0 else imresize(rgb, factor), scale)
            if min(hr.shape[:2]) < PATCH * scale:
                continue
            lr = degrade(hr, scale)
            teacher = ensemble(model, lr.astype(np.float32) / 255)
            triples.append((lr, (teacher * 255).astype(np.float16), hr))
        if index % 20 == 0:
            print(f"teacher outputs: {index}/{len(paths)} images, {time.time() - started:.0f}s", flush=True)
    return triples


def batches(triples, scale: int, alpha: float, seed: int):
    """Endless batches of (LR patches, targets): targets are ``alpha`` HR + ``1 - alpha`` ensemble."""
    areas = np.array([lr.shape[0] * lr.shape[1] for lr, _, _ in triples], float)
    cumulative = np.cumsum(areas) / areas.sum()
    rng = np.random.default_rng(seed)
    while True:
        inputs, targets = [], []
        for _ in range(BATCH):
            lr, teacher, hr = triples[min(int(np.searchsorted(cumulative, rng.random())), len(triples) - 1)]
            h, w = lr.shape[:2]
            y, x = rng.integers(0, h - PATCH + 1), rng.integers(0, w - PATCH + 1)
            window = (slice(scale * y, scale * (y + PATCH)), slice(scale * x, scale * (x + PATCH)))
            target = alpha * hr[window].astype(np.float32) + (1 - alpha) * teacher[window].astype(np.float32)
            code = rng.integers(8)
            inputs.append(_turned(lr[y : y + PATCH, x : x + PATCH].astype(np.float32) / 255, code))
            targets.append(_turned(target, code) / 255)
        yield np.stack(inputs), np.stack(targets).astype(np.float32)


def validation_pairs(folder: Path, scale: int):
    pairs = []
    for path in find_images(folder):
        hr = to_uint8(read_image(path).rgb)
        lr = degrade(hr, scale)
        pairs.append((path.stem, lr.astype(np.float32) / 255, hr[: lr.shape[0] * scale, : lr.shape[1] * scale]))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=REPO / "batchsr" / "weights" / "unet_x4.weights.h5")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=10000)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--alpha", type=float, default=0.5, help="share of the HR patch in each target")
    parser.add_argument("--interval", type=int, default=500)
    args = parser.parse_args()
    # Checked before the teacher outputs, which take minutes to hours.
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: must be at least 1")
    if not 1 <= args.interval <= args.steps:
        parser.error(f"--interval {args.interval}: must be from 1 to --steps ({args.steps})")
    for folder in (args.data / "T91" / "HR", args.data / "BSDS200" / "HR", args.data / "Set5" / "HR"):
        if not folder.is_dir() or not find_images(folder):
            parser.error(f"--data {args.data}: no images in {folder}")

    import keras

    from batchsr.model import ModelConfig, build_model

    try:
        model, info = load_model(args.weights)
    except ModelError as exc:
        parser.error(f"--weights: {exc}")
    config, scale = ModelConfig.from_dict(info.config), info.scale
    export = build_model(config)  # saved from a model without an optimizer: the weights alone
    triples = training_triples(model, args.data, scale)
    pairs = validation_pairs(args.data / "Set5" / "HR", scale)
    start = validate(model, pairs, scale)
    print(f"start: Set5 validation {start:.4f}", flush=True)
    warmup = min(WARMUP, args.steps // 10)  # 200 in any real run; a short check run still has a schedule
    schedule = keras.optimizers.schedules.CosineDecay(0.0, args.steps - warmup, alpha=0.02, warmup_target=args.lr, warmup_steps=warmup)
    optimizer = keras.optimizers.Adam(schedule, use_ema=True, ema_momentum=0.999)
    model.compile(optimizer=optimizer, loss="mae")
    stream = batches(triples, scale, args.alpha, SEED)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "log.csv", "w", newline="") as handle:
        log = csv.writer(handle)
        log.writerow(["step", "loss", "val_psnr_y", "seconds"])
        ends = [*range(args.interval, args.steps, args.interval), args.steps]  # the last interval may be shorter
        for previous, step in zip([0] + ends, ends):
            started = time.time()
            history = model.fit(stream, steps_per_epoch=step - previous, epochs=1, verbose=0)
            current = [v.numpy() for v in model.trainable_variables]
            for variable, average in zip(model.trainable_variables, optimizer._model_variables_moving_average):
                variable.assign(average)
            score = validate(model, pairs, scale)
            log.writerow([step, f"{history.history['loss'][-1]:.5f}", f"{score:.4f}", f"{time.time() - started:.0f}"])
            handle.flush()
            print(f"step {step}: loss {history.history['loss'][-1]:.5f}, Set5 validation (EMA) {score:.4f}", flush=True)
            training = {**info.training, "distilled": {"from": info.model_id, "steps": step, "lr": args.lr, "alpha": args.alpha,
                                                       "rescale": list(RESCALE), "patch_size": PATCH, "batch_size": BATCH}}
            for variable, value in zip(export.weights, model.weights):
                variable.assign(value)
            save_model(export, config, args.out / f"step-{step}" / args.weights.name, training, {"val_psnr_y": round(score, 4)})
            for variable, value in zip(model.trainable_variables, current):
                variable.assign(value)


if __name__ == "__main__":
    main()
