"""A real headless Chromium (the Debian package) driven by Playwright."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, sync_playwright

# Without the background-networking flags Chromium tries to reach Google's
# hosts at start-up; this lab has no business outside loopback.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Chromium for one test module; CI must have it (scripts/setup
    --test). Not session-wide: Playwright's sync API keeps an event loop
    running in this thread, which would break the asyncio tests after it."""
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: run scripts/setup --test")
        pytest.skip("chromium is not installed (scripts/setup --test installs it)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=executable, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield launched
        finally:
            launched.close()
