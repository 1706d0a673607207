"""A self-contained HTML report: LR, bicubic, batchsr and HR side by side, with metrics.

Each row shows the four images and, under each, a zoom on the window where
batchsr differs most from bicubic — where the model actually did something.
The page has its images beside it (``images-<token>/``), a summary table and a
chart of the per-image gain; it marks on ``<body data-images>`` how many images
the browser loaded, so a headless browser can check the page.

A report is replaced whole: the new images go into a folder of their own and
the page, renamed into place last, is what switches to them. An interrupted
run leaves the previous report as it was, never one page over two runs' images.
"""

from __future__ import annotations

import contextlib
import html
import os
import re
import secrets
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from batchsr.errors import OutputError
from batchsr.imageio import atomic_write
from batchsr.metrics import rgb_to_y

ZOOM_WINDOW = 48  # HR pixels of the zoomed region
ZOOM_FACTOR = 4
GENERATOR = '<meta name="generator" content="batchsr">'  # marks a page as batchsr's: only such a page is replaced
MARKER = ".batchsr-report"  # in each folder of report images batchsr made: only such a folder is ever removed


@dataclass
class ReportImage:
    name: str
    lr: np.ndarray  # 8-bit RGB
    bicubic: np.ndarray  # 8-bit RGB, HR size
    sr: np.ndarray
    hr: np.ndarray
    metrics: dict


def most_changed_window(sr: np.ndarray, bicubic: np.ndarray, window: int = ZOOM_WINDOW, border: int = 0) -> tuple[int, int, int]:
    """Top-left corner and side of the window where ``sr`` and ``bicubic`` differ most (on Y), inside the
    ``border`` the scores leave out."""
    inner = (slice(border, sr.shape[0] - border), slice(border, sr.shape[1] - border))
    h, w = sr[inner].shape[:2]
    side = min(window, h, w)
    diff = np.abs(rgb_to_y(sr[inner].astype(np.float64)) - rgb_to_y(bicubic[inner].astype(np.float64))).astype(np.float32)
    integral = cv2.integral(diff)
    sums = integral[side:, side:] - integral[:-side, side:] - integral[side:, :-side] + integral[:-side, :-side]
    y, x = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(y) + border, int(x) + border, side


def _png(path: Path, rgb: np.ndarray) -> None:
    ok, data = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"could not encode {path}")
    atomic_write(path, data.tobytes())


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "image"


def _nearest(image: np.ndarray, factor: int) -> np.ndarray:
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def _gain_chart(path: Path, images: list[ReportImage]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gains = [im.metrics.get("gain_psnr_y", 0.0) for im in images]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(images) + 2), 3.2), dpi=100)
    ax.bar(range(len(images)), gains, color=["#2b8a3e" if g >= 0 else "#c92a2a" for g in gains])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("Y-PSNR gain over bicubic (dB)")
    ax.set_xticks(range(len(images)), [im.name for im in images], rotation=60, ha="right", fontsize=7)
    with warnings.catch_warnings():  # names in scripts the font lacks: boxes on the chart, the page has them right
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.tight_layout()
        fig.savefig(path, format="png")
    plt.close(fig)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table.summary { border-collapse: collapse; margin-bottom: 1em; }
table.summary td, table.summary th { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
.row { margin: 1.5em 0; border-top: 1px solid #ddd; padding-top: 0.8em; }
.cells { display: flex; gap: 0.8em; flex-wrap: wrap; }
figure { margin: 0; text-align: center; }
figure img.full { max-width: 260px; height: auto; image-rendering: auto; }
figure img.zoom { width: 192px; height: 192px; image-rendering: pixelated; border: 1px solid #999; }
figcaption { font-size: 0.85em; }
"""

_CHECK = """
window.addEventListener("load", function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; }
  document.body.setAttribute("data-images", ok + "/" + imgs.length);
});
"""


def check_report_dir(report_dir: Path) -> None:
    """Before any scoring: the folder can be written, and a page there is a report of ours to replace."""
    from batchsr.runner import check_output_dir

    report_dir = Path(report_dir)
    if report_dir.exists() and not report_dir.is_dir():
        raise OutputError(f"--report {report_dir} is a file, not a folder")
    check_output_dir(report_dir, "--report folder")
    _previous_assets(report_dir)


def _previous_assets(report_dir: Path) -> list[str]:
    """The image files (relative paths) the report page now in ``report_dir`` shows; an error for a page not ours."""
    index = report_dir / "index.html"
    try:
        with open(index, "rb") as handle:
            page = handle.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise OutputError(f"--report folder {report_dir}: cannot read {index}: {exc.strerror or exc}") from None
    if GENERATOR not in page and 'data-images="pending"' not in page:  # the second: pages of earlier versions
        raise OutputError(f"--report folder {report_dir} holds an index.html that batchsr did not write; "
                          "choose another folder, or move that page away")
    sources = [html.unescape(src).split("/") for src in re.findall(r'src="([^"/]+/[^"/]+)"', page)]
    return ["/".join(parts) for parts in sources if len(parts) == 2 and not {"", ".", ".."} & set(parts)]  # inside only


def write_report(report_dir: Path, images: list[ReportImage], title: str, summary_rows: list[dict]) -> Path:
    """Writes ``report_dir/index.html`` with its images; returns the page's path."""
    try:
        return _write_report(Path(report_dir), images, title, summary_rows)
    except OSError as exc:  # the outputs and metrics are written by now: a report that fails is the user's folder
        raise OutputError(f"report {report_dir} not written: {exc.strerror or exc}") from None


def _write_report(report_dir: Path, images: list[ReportImage], title: str, summary_rows: list[dict]) -> Path:
    report_dir.mkdir(parents=True, exist_ok=True)
    previous = _previous_assets(report_dir)
    folder = f"images-{secrets.token_hex(4)}"
    assets = report_dir / folder
    assets.mkdir()
    try:
        (assets / MARKER).write_text(f"{os.getpid()}\n")  # who writes it: a live writer's folder is left alone
        index = _write_page(report_dir, folder, images, title, summary_rows)
    except BaseException:  # Ctrl-C included: the previous report stays whole, and no half folder beside it
        shutil.rmtree(assets, ignore_errors=True)
        raise
    _remove_previous(report_dir, previous, keep=folder)
    return index


def _remove_previous(report_dir: Path, previous: list[str], keep: str) -> None:
    """The previous page's images, and those of runs killed before their page: folders batchsr made (they
    hold ``MARKER``) whole, unless a live process still writes one; in a folder of an earlier version
    (``images/``, perhaps the user's too), only the files that page showed."""
    for name in os.listdir(report_dir):
        folder = report_dir / name
        if name != keep and not folder.is_symlink() and folder.is_dir() and _ours_and_idle(folder / MARKER):
            shutil.rmtree(folder, ignore_errors=True)
    for name in {src.split("/")[0] for src in previous} - {keep}:
        folder = report_dir / name
        if folder.is_symlink() or not folder.is_dir():
            continue
        for src in previous:
            if src.startswith(name + "/") and src.endswith(".png"):
                with contextlib.suppress(OSError):
                    (report_dir / src).unlink()
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when nothing else is in it


def _ours_and_idle(marker: Path) -> bool:
    """Whether a folder holding ``marker`` is batchsr's and no live process (its writer) still fills it."""
    try:
        pid = int(marker.read_text().strip() or 0)
    except (OSError, ValueError):
        return marker.is_file()
    if pid in (0, os.getpid()):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


def _write_page(report_dir: Path, folder: str, images: list[ReportImage], title: str, summary_rows: list[dict]) -> Path:
    rows_html = []
    for index, image in enumerate(images):
        slug = f"{index:04d}_{_slug(image.name)}"
        scale = image.hr.shape[0] // image.lr.shape[0]
        y, x, side = most_changed_window(image.sr, image.bicubic, border=scale)
        panels = [
            ("LR (nearest)", _nearest(image.lr, scale)[: image.hr.shape[0], : image.hr.shape[1]]),
            ("bicubic", image.bicubic),
            ("batchsr", image.sr),
            ("HR", image.hr),
        ]
        cells = []
        for label, pixels in panels:
            key = label.split()[0].lower()
            full, zoom = f"{folder}/{slug}_{key}.png", f"{folder}/{slug}_{key}_zoom.png"
            _png(report_dir / full, pixels)
            _png(report_dir / zoom, _nearest(pixels[y : y + side, x : x + side], ZOOM_FACTOR))
            cells.append(
                f'<figure><img class="full" src="{full}" alt="{html.escape(label)}">'
                f'<br><img class="zoom" src="{zoom}" alt="{html.escape(label)} zoom">'
                f"<figcaption>{html.escape(label)}</figcaption></figure>"
            )
        m = image.metrics
        caption = (
            f"bicubic {m.get('bicubic_psnr_y', float('nan')):.2f} dB / {m.get('bicubic_ssim_y', float('nan')):.4f}, "
            f"batchsr {m.get('psnr_y', float('nan')):.2f} dB / {m.get('ssim_y', float('nan')):.4f}, "
            f"gain {m.get('gain_psnr_y', float('nan')):+.2f} dB (Y); zoom at x={x}, y={y}"
        )
        rows_html.append(
            f'<div class="row"><h3>{html.escape(image.name)}</h3><p>{html.escape(caption)}</p>'
            f'<div class="cells">{"".join(cells)}</div></div>'
        )
    _gain_chart(report_dir / folder / "gain.png", images)
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in (summary_rows[0] if summary_rows else {}))
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row.values()) + "</tr>" for row in summary_rows
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">{GENERATOR}<title>{html.escape(title)}</title>
<style>{_STYLE}</style><script>{_CHECK}</script></head>
<body data-images="pending">
<h1>{html.escape(title)}</h1>
<table class="summary"><tr>{head}</tr>{body}</table>
<img class="chart" src="{folder}/gain.png" alt="per-image gain over bicubic">
{"".join(rows_html)}
</body></html>
"""
    index = report_dir / "index.html"
    atomic_write(index, page.encode("utf-8"))
    return index
