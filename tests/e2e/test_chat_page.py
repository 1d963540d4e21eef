"""The chat web UI in real headless Chromium, against two real chat servers."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.helpers import run_dslab


@pytest.fixture
def chat_urls(lab_env: dict[str, str]) -> Iterator[dict[str, str]]:
    """A lab with `dslab chat serve -n 2`; the servers' URLs by name."""
    run_dslab("lab", "up", env=lab_env, check=True)
    try:
        run_dslab("chat", "serve", "-n", "2", env=lab_env, check=True)
        status = json.loads(run_dslab("lab", "status", "--json", env=lab_env,
                                      check=True).stdout)
        yield {n["name"]: n["detail"]["url"] for n in status["nodes"]
               if n["kind"] == "chat"}
    finally:
        run_dslab("lab", "down", env=lab_env)


def _join(browser: Browser, url: str, user: str) -> Page:
    page = browser.new_page()
    page.goto(f"{url}/")
    page.fill("#join input[name=room]", "lobby")
    page.fill("#join input[name=user]", user)
    page.click("#join button")
    expect(page.locator("#status")).to_contain_text("live in lobby")
    return page


def _say(page: Page, text: str) -> None:
    page.fill("#say input[name=text]", text)
    page.press("#say input[name=text]", "Enter")


@pytest.mark.timeout(120)
def test_messages_appear_live_across_servers_and_after_a_crash(
    browser: Browser, chat_urls: dict[str, str], lab_env: dict[str, str]
) -> None:
    """ada on chat-1 and bob on chat-2 see each other's messages without a
    refresh, see each other online, and after chat-1 is killed and restarted
    ada's page reconnects by itself and shows what bob said meanwhile."""
    ada = _join(browser, chat_urls["chat-1"], "ada")
    bob = _join(browser, chat_urls["chat-2"], "bob")

    _say(ada, "hello from ada")
    expect(bob.locator("#log")).to_contain_text("hello from ada")
    _say(bob, "hi ada")
    expect(ada.locator("#log")).to_contain_text("hi ada")
    expect(ada.locator("#users")).to_contain_text("bob")

    run_dslab("chaos", "kill", "chat-1", env=lab_env, check=True)
    expect(ada.locator("#status")).to_contain_text("reconnecting")
    _say(bob, "said while chat-1 was down")
    run_dslab("lab", "restart", "chat-1", env=lab_env, check=True)

    expect(ada.locator("#status")).to_contain_text("live in lobby", timeout=20_000)
    expect(ada.locator("#log")).to_contain_text("said while chat-1 was down")
    # Resumed, not replayed: every message is shown exactly once.
    assert ada.locator("#log li", has_text="hello from ada").count() == 1
    assert ada.locator("#log li", has_text="hi ada").count() == 1


@pytest.mark.timeout(120)
def test_reload_shows_each_message_once(
    browser: Browser, chat_urls: dict[str, str]
) -> None:
    """After a reload and a new join the history is shown once, with nothing
    doubled, and new messages keep arriving live."""
    ada = _join(browser, chat_urls["chat-1"], "ada")
    for index in range(3):
        _say(ada, f"before reload {index}")
    expect(ada.locator("#log")).to_contain_text("before reload 2")

    ada.reload()
    ada.fill("#join input[name=room]", "lobby")
    ada.fill("#join input[name=user]", "ada")
    ada.click("#join button")
    expect(ada.locator("#status")).to_contain_text("live in lobby")
    expect(ada.locator("#log")).to_contain_text("before reload 2")
    for index in range(3):
        assert ada.locator("#log li", has_text=f"before reload {index}").count() == 1

    bob = _join(browser, chat_urls["chat-2"], "bob")
    _say(bob, "after reload")
    expect(ada.locator("#log")).to_contain_text("after reload")
