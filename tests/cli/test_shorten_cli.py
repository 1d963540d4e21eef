"""`dslab shorten` as typed at a terminal, against a real lab and shortener."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_dslab


@pytest.fixture
def lab_up(lab_env: dict[str, str]) -> dict[str, str]:
    """A running standalone lab; downed (with any shortener) after the test."""
    run_dslab("lab", "up", env=lab_env, check=True)
    try:
        yield lab_env
    finally:
        run_dslab("lab", "down", env=lab_env)


def test_bare_url_is_shortened_straight_into_redis(lab_up: dict[str, str]) -> None:
    """`dslab shorten URL` works as typed; with no shortener it says it wrote to
    Redis directly."""
    done = run_dslab("shorten", "https://example.com/a", env=lab_up, check=True)

    assert "Redis directly" in done.stderr
    assert len(done.stdout.strip()) == 7


def test_served_links_round_trip(lab_up: dict[str, str]) -> None:
    """serve, create through it, follow, inspect, delete; all via the CLI."""
    serve = run_dslab("shorten", "serve", env=lab_up, check=True)
    assert "shortener-1 serves http://127.0.0.1:" in serve.stdout

    made = json.loads(run_dslab("shorten", "https://example.com/b", "--alias",
                                "docs-b", "--json", env=lab_up, check=True).stdout)
    assert made["short_url"].endswith("/docs-b")
    assert "shortener at http://127.0.0.1:" in made["via"]

    followed = run_dslab("shorten", "open", "docs-b", env=lab_up, check=True)
    assert "302 -> https://example.com/b" in followed.stdout

    info = json.loads(run_dslab("shorten", "info", "docs-b", "--json",
                                env=lab_up, check=True).stdout)
    assert info["url"] == "https://example.com/b"

    run_dslab("shorten", "delete", "docs-b", env=lab_up, check=True)
    gone = run_dslab("shorten", "info", "docs-b", env=lab_up)
    assert gone.returncode == 2
    assert "404" in gone.stderr


def test_taken_alias_and_bad_url_are_usage_errors(lab_up: dict[str, str]) -> None:
    """409 and 400 from the shortener become exit 2 with the server's reason."""
    run_dslab("shorten", "serve", env=lab_up, check=True)
    run_dslab("shorten", "https://example.com/c", "--alias", "taken",
              env=lab_up, check=True)

    again = run_dslab("shorten", "https://example.com/d", "--alias", "taken",
                      env=lab_up)
    assert again.returncode == 2
    assert "already taken" in again.stderr

    bad = run_dslab("shorten", "javascript:alert(1)", env=lab_up)
    assert bad.returncode == 2
    assert "javascript" in bad.stderr


def test_info_without_a_shortener_exits_3(lab_up: dict[str, str]) -> None:
    """Asking a shortener that is not running says how to start one."""
    done = run_dslab("shorten", "info", "abc1234", env=lab_up)

    assert done.returncode == 3
    assert "dslab shorten serve" in done.stderr


def test_serve_is_a_lab_service_stopped_by_down(lab_env: dict[str, str]) -> None:
    """The shortener shows in `lab status` and `lab down` stops it."""
    run_dslab("lab", "up", env=lab_env, check=True)
    run_dslab("shorten", "serve", "--workers", "2", env=lab_env, check=True)

    status = json.loads(run_dslab("lab", "status", "--json", env=lab_env,
                                  check=True).stdout)
    names = {node["name"]: node for node in status["nodes"]}
    assert names["shortener-1"]["healthy"] is True

    down = run_dslab("lab", "down", env=lab_env, check=True)
    assert "shortener-1" in down.stdout
