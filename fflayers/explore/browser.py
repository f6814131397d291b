"""Headless chromium for the explorer page: the browser tests and the demo's screenshot.

Playwright (the ``dev`` extra) drives the system's chromium (Debian's ``/usr/bin/chromium``) through
``executable_path``; nothing is downloaded (no ``playwright install``). ``FFLAYERS_CHROMIUM`` names another
binary.

>>> screenshot("http://127.0.0.1:8765/#state=...", "explorer.png")
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fflayers.core import InputError

__all__ = ["CHROMIUM_ARGS", "browser_missing", "chromium_path", "launch", "screenshot"]

#: flags for chromium in containers and CI: no sandbox (often run as root), no /dev/shm limit, no GPU, and
#: none of the browser's own network traffic (updates, sync, first-run pages)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "chromium", "chromium-browser",
               "google-chrome", "google-chrome-stable")

INSTALL_HINT = "install Debian's chromium (apt-get install chromium) or name a binary in FFLAYERS_CHROMIUM"


def chromium_path() -> str | None:
    """The chromium binary to drive: ``$FFLAYERS_CHROMIUM``, else the first found of /usr/bin/chromium and
    the usual names on PATH; None when there is none."""
    env = os.environ.get("FFLAYERS_CHROMIUM")
    if env:
        return env if Path(env).is_file() else shutil.which(env)
    for name in _CANDIDATES:
        found = name if Path(name).is_file() else shutil.which(name)
        if found:
            return found
    return None


def browser_missing() -> str | None:
    """Why no browser can be driven (one line naming the fix); None when playwright and chromium are there."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return ("playwright is not installed: pip install playwright "
                "(it is in the dev extra: pip install -e '.[dev]')")
    if chromium_path() is None:
        return f"no chromium binary found: {INSTALL_HINT}"
    return None


def launch(playwright, **kwargs):
    """A headless chromium Browser of a started ``sync_playwright()``; an :class:`InputError` when missing."""
    why = browser_missing()
    if why:
        raise InputError(why)
    return playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True,
                                      **kwargs)


def screenshot(url: str, path: str | Path, wait_state: str | None = "traced", width: int = 1400,
               height: int = 1800, timeout_s: float = 120) -> Path:
    """Opens ``url`` (an explorer permalink) in headless chromium, waits until ``body[data-state=wait_state]``
    (None: the page's load event) and saves a full-page PNG at ``path``; an error shown in the page's error
    bar is raised as an :class:`InputError`."""
    why = browser_missing()
    if why:
        raise InputError(f"cannot take the explorer screenshot: {why}")
    from playwright.sync_api import sync_playwright

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(timeout_s * 1000)
            page.goto(url)
            if wait_state:
                error = page.locator("#error")
                page.wait_for_function(
                    "s => document.body.dataset.state === s || !document.getElementById('error').hidden",
                    arg=wait_state, timeout=timeout_s * 1000)
                if error.is_visible():
                    raise InputError(f"the explorer page shows an error: {error.inner_text().strip()}")
                page.wait_for_load_state("networkidle")
            page.screenshot(path=str(path), full_page=True)
        finally:
            browser.close()
    return path
