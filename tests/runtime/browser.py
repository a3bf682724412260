"""A real headless Chromium (Debian's package) driven by Playwright, and the screenshot's text read
back by Tesseract: what the page tests look with. No browser download: `.ci/run` installs the
`chromium` and `tesseract-ocr` packages; elsewhere the tests skip, naming them."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
# As root, in a sandbox with no network: no setuid sandbox, no GPU, no calls home.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1200, "height": 900}
OCR_TIMEOUT = 60


def require_tools() -> None:
    """Skip without the browser or OCR, except on CI, where a missing one is a failed install."""
    found = {"chromium": Path(CHROMIUM).exists(), "tesseract-ocr": bool(shutil.which("tesseract"))}
    missing = [name for name, there in found.items() if not there]
    try:
        import playwright.sync_api  # noqa: F401  (only to know it is installed)
    except ImportError:
        missing.append("playwright (pip)")
    if missing and os.environ.get("CI"):
        pytest.fail(f"page tests need {', '.join(missing)}: .ci/run installs them")
    if missing:
        pytest.skip(f"page tests need {', '.join(missing)} (apt-get install chromium tesseract-ocr)")


@dataclass(frozen=True)
class Shot:
    """One loaded page: its HTML as served, the text a reader sees, and its screenshot."""

    html: str
    text: str
    png: bytes

    def ocr(self) -> str:
        """The screenshot's text as Tesseract reads it."""
        command = ["tesseract", "stdin", "stdout"]
        done = subprocess.run(command, input=self.png, capture_output=True, timeout=OCR_TIMEOUT, check=True)
        return done.stdout.decode("utf-8", "replace")

    def colours(self) -> set[tuple[int, int, int]]:
        from PIL import Image  # a test-only dependency, imported where it is used

        image = Image.open(io.BytesIO(self.png)).convert("RGB")
        return {colour for _count, colour in image.getcolors(1 << 24) or ()}

    def is_blank(self) -> bool:
        """One colour (or nearly): nothing was painted."""
        return len(self.colours()) < 8

    def save(self, name: str) -> None:
        """Keep the screenshot when RECONCILER_SCREENSHOTS names a folder (README pictures)."""
        folder = os.environ.get("RECONCILER_SCREENSHOTS")
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / f"{name}.png").write_bytes(self.png)


class Browser:
    def __init__(self, chromium: Any) -> None:
        self.chromium = chromium

    @contextmanager
    def page(self, url: str) -> Iterator[tuple[Any, Shot]]:
        """The page at `url`, loaded, with a full-page screenshot of it."""
        context = self.chromium.new_context(viewport=VIEWPORT, java_script_enabled=False)
        try:
            page = context.new_page()
            response = page.goto(url, wait_until="load")
            assert response is not None and response.status == 200, url
            html = response.text()
            shot = Shot(html, page.inner_text("body"), page.screenshot(full_page=True))
            yield page, shot
        finally:
            context.close()

    def shoot_html(self, html: str) -> Shot:
        """A page from markup, for the checks' own controls."""
        context = self.chromium.new_context(viewport=VIEWPORT)
        try:
            page = context.new_page()
            page.set_content(html)
            return Shot(html, page.inner_text("body"), page.screenshot(full_page=True))
        finally:
            context.close()


@contextmanager
def browser() -> Iterator[Browser]:
    require_tools()
    from playwright.sync_api import sync_playwright  # optional: require_tools skipped without it

    with sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield Browser(chromium)
        finally:
            chromium.close()


def squashed(text: str) -> str:
    """OCR text without the spaces and line breaks it puts inside long tokens, upper-cased."""
    return "".join(text.split()).upper()
