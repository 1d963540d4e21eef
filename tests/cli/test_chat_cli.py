"""`dslab chat serve` and `dslab chat connect` as a person uses them."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.helpers import DSLAB, eventually, run_dslab


@pytest.fixture
def chat_lab(lab_env: dict[str, str]) -> Iterator[dict[str, str]]:
    """A lab with two chat servers started by `dslab chat serve -n 2`."""
    run_dslab("lab", "up", env=lab_env, check=True)
    try:
        serve = run_dslab("chat", "serve", "-n", "2", env=lab_env, check=True)
        assert "chat-1 serves" in serve.stdout and "chat-2 serves" in serve.stdout
        yield lab_env
    finally:
        run_dslab("lab", "down", env=lab_env)


def _connect(env: dict[str, str], user: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*DSLAB, "chat", "connect", "--room", "lobby", "--user", user, *extra],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )


@pytest.mark.timeout(60)
def test_two_terminals_talk_through_two_servers(chat_lab: dict[str, str]) -> None:
    """Lines typed by ada on one server are printed for bob on the other."""
    status = json.loads(run_dslab("lab", "status", "--json", env=chat_lab,
                                  check=True).stdout)
    urls = {n["name"]: n["detail"]["url"] for n in status["nodes"]
            if n["kind"] == "chat"}
    bob = _connect(chat_lab, "bob", "--server", urls["chat-2"])
    ada = _connect(chat_lab, "ada", "--server", urls["chat-1"])
    try:
        assert ada.stdin is not None and bob.stdin is not None
        ada.stdin.write("hello bob\n")
        ada.stdin.close()  # ada leaves once her message is acknowledged
        assert ada.wait(timeout=20) == 0
        time.sleep(1.0)  # delivery takes milliseconds; leave ample margin
        bob.stdin.close()
        assert bob.wait(timeout=20) == 0
        assert bob.stdout is not None
        assert "ada: hello bob" in bob.stdout.read()
    finally:
        for process in (ada, bob):
            if process.poll() is None:
                process.kill()


def test_connect_without_servers_exits_3(lab_env: dict[str, str]) -> None:
    """No chat server running: exit 3 and how to start some."""
    run_dslab("lab", "up", env=lab_env, check=True)
    try:
        done = run_dslab("chat", "connect", "-r", "lobby", "-u", "ada",
                         env=lab_env)
    finally:
        run_dslab("lab", "down", env=lab_env)

    assert done.returncode == 3
    assert "dslab chat serve" in done.stderr


def test_bad_delivery_mode_is_a_usage_error(lab_env: dict[str, str]) -> None:
    """An unknown --delivery exits 2 naming the choices."""
    done = run_dslab("chat", "serve", "--delivery", "carrier-pigeon", env=lab_env)

    assert done.returncode == 2
    assert "streams or pubsub" in done.stderr


def test_killed_chat_server_is_seen_and_restarted(chat_lab: dict[str, str]) -> None:
    """kill -9 of chat-1 shows it dead; `lab restart chat-1` brings it back."""
    run_dslab("chaos", "kill", "chat-1", env=chat_lab, check=True)

    def chat1() -> dict[str, object]:
        status = json.loads(run_dslab("lab", "status", "--json", env=chat_lab,
                                      check=True).stdout)
        return next(n for n in status["nodes"] if n["name"] == "chat-1")

    eventually(lambda: chat1()["process"] == "dead", timeout_s=10)
    run_dslab("lab", "restart", "chat-1", env=chat_lab, check=True)
    assert chat1()["healthy"] is True
