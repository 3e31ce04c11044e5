"""A page as a reader sees it: loaded in headless Chromium (Debian's package, which `make browser` installs for
`make test`, `unit` and `integration`) through Playwright from PyPI, which then downloads no browser of its own, and
read back from the rendered DOM: every table's cells under its heading, every figure decoded or not. Unit tests
import it as integration.browser."""

from __future__ import annotations

import shutil
from pathlib import Path

RENDERED = """() => ({
  tables: [...document.querySelectorAll("table")].map(t => ({
    heading: (() => { let e = t.closest("div.scroll") || t; while (e && !/^H[1-6]$/.test(e.tagName)) {
      e = e.previousElementSibling; } return e ? e.textContent.trim() : null; })(),
    rows: [...t.rows].map(r => [...r.cells].map(c => c.textContent.trim())),
  })),
  images: [...document.images].map(i => ({alt: i.alt, width: i.naturalWidth, height: i.naturalHeight,
    shown: i.getBoundingClientRect().width})),
})"""


def rendered(page: Path) -> dict:
    """{"tables": [{"heading", "rows"}], "images": [{"alt", "width", "height", "shown"}]} of PAGE in Chromium."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Chromium is not installed: `make browser` installs Debian's package"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            tab = browser.new_page()
            tab.goto(page.resolve().as_uri(), wait_until="load")
            return tab.evaluate(RENDERED)
        finally:
            browser.close()
