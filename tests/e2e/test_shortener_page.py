"""The shortener's web page in real headless Chromium against a real server."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, expect

from tests.helpers import run_dslab


@pytest.fixture
def shortener_url(lab_env: dict[str, str]) -> Iterator[str]:
    """A lab with a shortener started by `dslab shorten serve`; its base URL."""
    run_dslab("lab", "up", env=lab_env, check=True)
    try:
        run_dslab("shorten", "serve", env=lab_env, check=True)
        status = json.loads(run_dslab("lab", "status", "--json", env=lab_env,
                                      check=True).stdout)
        [service] = [n for n in status["nodes"] if n["name"] == "shortener-1"]
        yield str(service["detail"]["url"])
    finally:
        run_dslab("lab", "down", env=lab_env)


@pytest.mark.timeout(120)
def test_form_creates_a_link_that_redirects(
    browser: Browser, shortener_url: str
) -> None:
    """Typing a URL and pressing Shorten shows a short link and its QR code, and
    following the link answers with a redirect to the long URL."""
    page = browser.new_page()
    page.goto(f"{shortener_url}/")
    page.fill("#url", "https://example.com/from-the-browser")
    page.fill("#alias", "from-browser")
    page.click("#shorten")

    link = page.locator("#short-url")
    expect(link).to_have_text(f"{shortener_url}/from-browser")
    expect(page.locator("#qr")).to_have_attribute(
        "src", "/api/links/from-browser/qr.svg"
    )
    qr = page.request.get(f"{shortener_url}/api/links/from-browser/qr.svg")
    assert qr.ok and b"<svg" in qr.body()

    answer = page.request.get(f"{shortener_url}/from-browser", max_redirects=0)
    assert answer.status == 302
    assert answer.headers["location"] == "https://example.com/from-the-browser"


@pytest.mark.timeout(120)
def test_form_shows_why_a_url_is_refused(browser: Browser, shortener_url: str) -> None:
    """A refused URL shows the server's reason in the page, and no result."""
    page = browser.new_page()
    page.goto(f"{shortener_url}/")
    page.fill("#url", "http://user:secret@example.com/")
    page.click("#shorten")

    error = page.locator("#error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("userinfo")
    expect(page.locator("#result")).to_be_hidden()
