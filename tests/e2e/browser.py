"""Headless Chromium for the dashboard tests: Playwright driving Debian's `chromium` package.

Playwright's own browser download is not used (`playwright install` needs a
host these machines cannot reach): `executable_path` points at the system
Chromium, which `make install` (deploy/local/ensure_system_deps.sh) installs.
A missing browser fails the test with the command that installs it; it is
never a skip. `CHROMIUM=/path` picks another Chromium-based browser.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright

INSTALL_HINT = "apt-get install -y chromium (or run `make install` as root)"


def chromium_path() -> str:
    """Return the Chromium executable, or fail naming the install command."""
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(path, os.X_OK):
        pytest.fail(f"chromium is not installed at {path}: {INSTALL_HINT}", pytrace=False)
    return path


@dataclass
class PageErrors:
    """Script errors and console errors a page raised (4xx answers the page shows are not errors)."""

    items: list[str] = field(default_factory=list)

    def console(self, msg: ConsoleMessage) -> None:
        if msg.type == "error" and "Failed to load resource" not in msg.text:
            self.items.append(msg.text)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    executable = chromium_path()
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=executable,
                                            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield launched
        finally:
            await launched.close()


async def new_page(browser: Browser, errors: PageErrors, *, width: int = 1440, height: int = 900) -> Page:
    """Open a page that records its errors and accepts confirm() dialogs, as a person pressing OK."""
    context = await browser.new_context(viewport={"width": width, "height": height}, locale="en-IN",
                                        timezone_id="Asia/Kolkata")
    page = await context.new_page()
    page.on("console", errors.console)
    page.on("pageerror", lambda exc: errors.items.append(str(exc)))
    page.on("dialog", lambda dialog: dialog.accept())
    page.set_default_timeout(10_000)
    return page
