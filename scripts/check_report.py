#!/usr/bin/env python3
"""Opens a batchsr HTML report in headless Chromium: screenshot, and every image must load.

Usage: python scripts/check_report.py REPORT_DIR [SCREENSHOT.png]
Installs Debian's chromium with apt-get when it is missing (needs root).
The page marks ``<body data-images="loaded/total">`` once loaded; this reads it
back from the DOM Chromium dumps.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--allow-file-access-from-files", "--virtual-time-budget=10000",
]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    print("chromium not found: installing Debian's chromium package", file=sys.stderr)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    return shutil.which("chromium") or sys.exit("chromium could not be installed")


def check(report_dir: Path, screenshot: Path) -> tuple[int, int]:
    page = (report_dir / "index.html").resolve()
    if not page.is_file():
        sys.exit(f"{page}: no report page")
    browser = chromium()
    with tempfile.TemporaryDirectory() as profile:
        common = [browser, *FLAGS, f"--user-data-dir={profile}"]
        dom = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
        subprocess.run([*common, f"--screenshot={screenshot.resolve()}", "--window-size=1400,2400", page.as_uri()],
                       capture_output=True, text=True, timeout=120, check=True)
    match = re.search(r'data-images="(\d+)/(\d+)"', dom.stdout)
    if not match:
        sys.exit(f"the page did not report its images (Chromium said: {dom.stderr[-500:]})")
    return int(match.group(1)), int(match.group(2))


def main() -> None:
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    report_dir = Path(sys.argv[1])
    screenshot = Path(sys.argv[2]) if len(sys.argv) == 3 else report_dir / "screenshot.png"
    loaded, total = check(report_dir, screenshot)
    print(f"{loaded}/{total} images loaded; screenshot {screenshot}")
    if total == 0 or loaded != total:
        sys.exit(1)


if __name__ == "__main__":
    main()
