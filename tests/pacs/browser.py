"""Headless Chromium (Debian package ``chromium``): the DOM of a page after its scripts ran, and a screenshot.

Each call is one short-lived browser process (``--headless --no-sandbox``, a private profile folder).
``--virtual-time-budget`` lets the page's timers and fetches run (the worklist fetches ``/api/studies`` and
re-renders) before the DOM is dumped or the picture taken.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_chromium() -> str | None:
    """Path of a Chromium executable, or None when none is installed."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[bytes]:
    exe = find_chromium()
    if exe is None:
        raise RuntimeError("Chromium is not installed (Debian: apt-get install -y chromium)")
    with tempfile.TemporaryDirectory(prefix="rsna19-chromium-") as profile:
        cmd = [
            exe,
            "--headless",
            "--no-sandbox",  # root in a container: the sandbox cannot start
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            *args,
        ]
        return subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)


def dump_dom(url: str, wait_ms: int = 3000, timeout: float = 60.0) -> str:
    """The page's DOM (serialised HTML) after ``wait_ms`` ms of virtual time."""
    proc = _run([f"--virtual-time-budget={wait_ms}", "--dump-dom", url], timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"chromium --dump-dom {url} failed ({proc.returncode}): {proc.stderr.decode()[-500:]}")
    return proc.stdout.decode("utf-8", errors="replace")


def screenshot(url: str, out: Path, size: tuple[int, int] = (1280, 800), wait_ms: int = 3000, timeout: float = 60.0):
    """Save a PNG of the page (``size`` = width, height in CSS pixels) to ``out``; returns ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    args = [f"--virtual-time-budget={wait_ms}", f"--window-size={size[0]},{size[1]}", f"--screenshot={out}", url]
    proc = _run(args, timeout)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"chromium --screenshot {url} failed ({proc.returncode}): {proc.stderr.decode()[-500:]}")
    return out


class _Rows(HTMLParser):
    """Collects the ``<tr class="study ...">`` rows of ``<table id="worklist">``: (study UID, classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0  # > 0 inside the worklist table
        self.rows: list[tuple[str, set[str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            if self.depth or a.get("id") == "worklist":
                self.depth += 1
        elif tag == "tr" and self.depth:
            classes = set((a.get("class") or "").split())
            if "study" in classes:
                self.rows.append((a.get("data-study-uid") or "", classes))

    def handle_endtag(self, tag: str) -> None:
        if tag == "table" and self.depth:
            self.depth -= 1


def worklist_rows(html: str) -> list[tuple[str, bool]]:
    """The worklist rows of a dumped page, top to bottom: (study UID, flagged)."""
    parser = _Rows()
    parser.feed(html)
    return [(uid, "flagged" in classes) for uid, classes in parser.rows]


def is_red(rgb: tuple[int, ...]) -> bool:
    """Whether a pixel is in the #c62828 family (a saturated red: R high, G and B low)."""
    r, g, b = (int(v) for v in rgb[:3])
    return r >= 150 and g <= 90 and b <= 90 and r - max(g, b) >= 80


def bands(png: Path, min_red: int = 20) -> list[tuple[int, int, bool]]:
    """Horizontal bands of a screenshot, top to bottom: (first y, last y, red).

    A pixel row is *content* when it is not all background (the top-left pixel's colour) and *red* when at least
    ``min_red`` of its pixels are :func:`is_red`; consecutive rows of the same kind make one band (background
    rows separate bands). Table rows with a red background show as red bands.
    """
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(png).convert("RGB")).astype(np.int16)
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    red = (r >= 150) & (g <= 90) & (b <= 90) & (r - np.maximum(g, b) >= 80)
    red_rows = red.sum(axis=1) >= min_red
    content = (img != img[0, 0]).any(axis=2).any(axis=1)
    out: list[tuple[int, int, bool]] = []
    for y in range(img.shape[0]):
        if not content[y]:
            continue
        kind = bool(red_rows[y])
        if out and out[-1][1] == y - 1 and out[-1][2] == kind:
            out[-1] = (out[-1][0], y, kind)
        else:
            out.append((y, y, kind))
    return out
