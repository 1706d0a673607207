"""The standard SR benchmark protocol over folders of HR images.

For each HR image: crop to a multiple of the scale, make LR with the
MATLAB-compatible degradation, upscale with the model and with MATLAB bicubic,
score both on Y (BT.601) and RGB with ``scale`` border pixels cropped.
"""

from __future__ import annotations

import csv
import io
import os
import re
import stat
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from loguru import logger

from batchsr.errors import ImageError, InputError
from batchsr.imageio import DEFAULT_MAX_PIXELS, atomic_write, from_float, probe_header, read_image, to_float, to_uint8
from batchsr.metrics import SSIM_WINDOW, score
from batchsr.report import ReportImage
from batchsr.resize import crop_to_multiple, degrade, imresize
from batchsr.runner import column_means, spreadsheet_text
from batchsr.tiling import plan_tiles

# Images stored as RGB here whose published source was single-channel; the
# published tables score them on their gray values (see shared/data/SOURCES.md).
SINGLE_CHANNEL_SOURCES = {("Set14", "bridge")}

COLUMNS = [
    "set", "image", "width", "height", "scale", "model_id",
    "bicubic_psnr_y", "bicubic_ssim_y", "bicubic_psnr_rgb", "bicubic_ssim_rgb",
    "psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb", "gain_psnr_y", "ms",
]


@dataclass
class SetResult:
    name: str
    rows: list[dict]
    images: list = field(default_factory=list)  # ReportImage, when a report was asked for

    def mean(self, key: str) -> float:
        return float(np.mean([r[key] for r in self.rows]))


def set_name(folder: Path) -> str:
    """``.../Set5/HR`` (or ``HR_x4``...) is named ``Set5``; other folders by their own name.
    The path is resolved first: ``--hr HR`` and ``--hr .`` name the same set as the full path."""
    return _name_parts(folder)[-1]


def _name_parts(folder: Path) -> list[str]:
    parts = list(Path(folder).resolve().parts[1:])
    if len(parts) > 1 and re.fullmatch(r"HR([_\-. ].*)?", parts[-1], re.IGNORECASE):
        parts.pop()
    return parts or ["/"]


def set_names(folders: list[Path]) -> list[str]:
    """Each folder's set name, longer by a parent folder where two would be named alike
    (``x/Set5`` and ``y/Set5``): their rows, means and report sections told apart."""
    parts = [_name_parts(f) for f in folders]
    depth = [1] * len(folders)
    while True:
        names = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        clash = [i for i, n in enumerate(names) if names.count(n) > 1 and depth[i] < len(parts[i])]
        if not clash:  # folders named alike but for their HR part (HR, HR_x4) are named in full
            return [n if names.count(n) == 1 else str(Path(f).resolve()) for n, f in zip(names, folders)]
        for i in clash:
            depth[i] += 1


@dataclass
class HRSet:
    name: str
    folder: Path
    images: list[tuple[Path, str]]  # (file, row label)


def plan_sets(folders: list[Path], scale: int) -> list[HRSet]:
    """Every HR folder listed and each image's size read from its header before anything is scored, so a
    typo in the last ``--hr`` or one image too small stops the run at once, not after hours of scoring."""
    unique: dict[Path, Path] = {}
    for folder in map(Path, folders):
        real = folder.resolve()
        if real in unique:
            logger.warning("--hr {} is {} again: scored once", folder, unique[real])
        else:
            unique[real] = folder
    folders = list(unique.values())
    sets = []
    for folder, name in zip(folders, set_names(folders)):
        files = hr_files(folder)
        for path in files:
            if (header := probe_header(path)) is not None:
                _check_size(path, header[0], header[1], scale)
        sets.append(HRSet(name, folder, list(zip(files, _labels(folder, files)))))
    return sets


def _labels(folder: Path, files: list[Path]) -> list[str]:
    """Each image's row label: its path below the folder (searched recursively: x.png in two subfolders)
    without the suffix, kept where that would name two images alike (x.png and x.jpg)."""
    names = [path.relative_to(folder).as_posix() for path in files]
    stems = [path.relative_to(folder).with_suffix("").as_posix() for path in files]
    clashing = {stem for stem, count in Counter(stems).items() if count > 1} | (set(stems) & set(names))
    return [name if stem in clashing else stem for name, stem in zip(names, stems)]


def _check_size(path: Path, width: int, height: int, scale: int) -> None:
    if min(height - height % scale, width - width % scale) < min_side(scale):
        need = -(-min_side(scale) // scale) * scale  # after the crop to a multiple of the scale
        raise ImageError(path, f"{width}x{height} is too small to evaluate at x{scale} (needs {need} px a side)")


def min_side(scale: int) -> int:
    """Smallest HR side that still leaves an 11x11 SSIM window after the border crop."""
    return 2 * scale + SSIM_WINDOW


def hr_files(folder: Path) -> list[Path]:
    """Every image of an HR folder; anything else there is an error, not silently skipped."""
    from batchsr.data import is_image_file, list_files

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"HR folder {folder} does not exist or is not a folder")
    files = list_files(folder)
    for path in files:
        if not is_image_file(path):
            raise ImageError(path, "not an image (PNG, JPEG, WebP, BMP, TIFF or GIF by content); remove it from the HR folder")
    if not files:
        raise InputError(f"HR folder {folder} holds no images")
    return files


def evaluate_folder(folder: Path, scale: int, engine=None, keep_images: bool = False, *,
                    max_pixels: int | None = DEFAULT_MAX_PIXELS) -> SetResult:
    return evaluate_set(plan_sets([folder], scale)[0], scale, engine, keep_images, max_pixels=max_pixels)


def evaluate_set(hr_set: HRSet, scale: int, engine=None, keep_images: bool = False, *,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> SetResult:
    name = hr_set.name
    rows, kept = [], []
    traced: set[tuple[tuple[int, int], int]] = set()
    for path, label in hr_set.images:
        image = read_image(path, max_pixels=max_pixels)
        hr = crop_to_multiple(image.rgb, scale)
        _check_size(path, image.rgb.shape[1], image.rgb.shape[0], scale)  # a header that could not be read
        if image.alpha is not None and int(image.alpha.min()) == 0:
            logger.warning("{}: transparent pixels; scored on the colour as read, extended under them from visible "
                           "neighbours (the alpha plane is not scored)", path)
        gray = image.gray or (set_name(hr_set.folder), path.stem) in SINGLE_CHANNEL_SOURCES
        lr = degrade(hr, scale)
        peak = 255.0 / np.iinfo(hr.dtype).max
        ref = hr.astype(np.float64) * peak
        bicubic = imresize(lr, size=hr.shape[:2])
        row = {"set": name, "image": label, "width": hr.shape[1], "height": hr.shape[0], "scale": scale}
        row.update({f"bicubic_{k}": v for k, v in score(bicubic.astype(np.float64) * peak, ref, scale, gray).items()})
        if engine is not None:
            plan = plan_tiles(lr.shape[0], lr.shape[1], engine.settings.tile, engine.settings.overlap, engine.multiple)
            calls = (plan.window_shape, len(plan.tiles))  # which set the shapes of the model's batches
            if calls not in traced:  # a new batch shape traces the model's graph: ``ms`` times the network alone
                engine.upscale([to_float(lr)])
                traced.add(calls)
            t0 = time.time()
            sr = engine.upscale([to_float(lr)])[0]
            if image.gray or image.neutral:  # untinted, as run and watch write it
                sr = np.repeat(sr.mean(axis=2, keepdims=True), 3, axis=2)
            row["ms"] = (time.time() - t0) * 1000.0
            out = from_float(sr, hr.dtype)
            row.update(score(out.astype(np.float64) * peak, ref, scale, gray))
            row["gain_psnr_y"] = row["psnr_y"] - row["bicubic_psnr_y"]
            row["model_id"] = engine.model_id
            if keep_images:
                kept.append(ReportImage(f"{name}/{label}", to_uint8(lr), to_uint8(bicubic), to_uint8(out), to_uint8(hr), row))
        rows.append(row)
    return SetResult(name, rows, kept)


def summary_rows(results: list[SetResult], scale: int) -> list[dict]:
    """Per-set means for the report's table."""
    return [
        {
            "set": r.name,
            "images": len(r.rows),
            "scale": scale,
            "bicubic PSNR-Y": f"{r.mean('bicubic_psnr_y'):.2f}",
            "bicubic SSIM-Y": f"{r.mean('bicubic_ssim_y'):.4f}",
            "batchsr PSNR-Y": f"{r.mean('psnr_y'):.2f}",
            "batchsr SSIM-Y": f"{r.mean('ssim_y'):.4f}",
            "gain": f"{r.mean('gain_psnr_y'):+.2f} dB",
        }
        for r in results
    ]


def write_csv(results: list[SetResult], path: Path) -> None:
    """A row per image, then a ``MEAN`` row per set (the figures the table prints), as in run's metrics.csv."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for result in results:
        for row in result.rows:
            writer.writerow({k: (round(v, 4) if isinstance(v, float) else spreadsheet_text(v) if k in ("set", "image") else v)
                             for k, v in row.items()})
        first = result.rows[0]
        writer.writerow({"set": spreadsheet_text(result.name), "image": "MEAN", "scale": first["scale"],
                         "model_id": first.get("model_id", ""), **column_means(result.rows, COLUMNS)})
    data, path = buffer.getvalue().encode("utf-8"), Path(path)
    if _is_stdout(path):  # through our own descriptor, in order with what else is printed
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    elif written_in_place(path):
        with open(path, "wb") as handle:
            handle.write(data)
    else:  # through a link, to the file it names: replacing the link left its target as it was
        atomic_write(Path(os.path.realpath(path)), data)


def written_in_place(path: Path) -> bool:
    """What is not a regular file (a pipe, a terminal, /dev/stdout) is written into, never replaced: a
    temporary was renamed over /dev/stdout, or over the file the shell had redirected it to."""
    try:
        return _is_stdout(path) or not stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


def _is_stdout(path: Path) -> bool:
    try:
        return os.path.samestat(os.stat(path), os.fstat(sys.stdout.fileno()))
    except (OSError, ValueError, AttributeError):  # no such file, or no stdout descriptor
        return False


def markdown_table(results: list[SetResult], scale: int, with_model: bool) -> str:
    head = "| set | x | bicubic PSNR-Y / SSIM-Y |" + (" batchsr PSNR-Y / SSIM-Y | gain |" if with_model else "")
    rule = "|---|---|---|" + ("---|---|" if with_model else "")
    lines = [head, rule]
    for r in results:
        line = f"| {r.name} | {scale} | {r.mean('bicubic_psnr_y'):.2f} / {r.mean('bicubic_ssim_y'):.4f} |"
        if with_model:
            line += f" {r.mean('psnr_y'):.2f} / {r.mean('ssim_y'):.4f} | {r.mean('gain_psnr_y'):+.2f} dB |"
        lines.append(line)
    return "\n".join(lines)
