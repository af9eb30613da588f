"""A real headless browser for report tests: Debian's chromium driven by Playwright (no browser download).

The flags are the ones known to work on this project's machines (no sandbox as root, no GPU, no
background networking: the machines have no internet and chromium would keep retrying).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def open_in_browser(html: Path, screenshot: Path) -> dict[str, Any]:
    """Load ``html`` in headless chromium (a new empty profile), wait for every image, screenshot the
    full page; returns the images (src prefix, loaded, natural width), the title and the visible text."""
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install -y chromium); .ci/run installs it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=binary, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(html.resolve().as_uri(), wait_until="load")
            images = page.evaluate(
                "Array.from(document.images).map(i => ({src: i.src.slice(0, 40), complete: i.complete, "
                "width: i.naturalWidth}))"
            )
            screenshot.write_bytes(page.screenshot(full_page=True))
            return {
                "images": images,
                "title": page.title(),
                "text": page.inner_text("body"),
                "requests": requests,
            }
        finally:
            browser.close()
