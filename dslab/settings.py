"""Settings for every part of dslab, built in one place.

Command-line options, environment variables and URLs become frozen
dataclasses here; nothing else in dslab reads ``os.environ``. The parts take
these objects, never raw strings, so a bad value is refused once, early, with
a message that says how to fix it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from dslab.errors import UsageError

DEFAULT_HOME_DIR = ".dslab"
LOOPBACK_HOST = "127.0.0.1"
# The name under which the lab's Sentinels monitor the primary; clients ask
# the Sentinels for the current address of this name.
SENTINEL_SERVICE = "dslab"


class Topology(StrEnum):
    STANDALONE = "standalone"
    REPLICATED = "replicated"
    CLUSTER = "cluster"


class Persistence(StrEnum):
    """AOF policy: what a crash (kill -9, power loss) can take with it."""

    ALWAYS = "always"  # fsync after every write: nothing acknowledged is lost
    EVERYSEC = "everysec"  # fsync once a second: up to ~1 s of writes lost
    OFF = "off"  # no AOF, no snapshots: a restart starts empty


@dataclass(frozen=True)
class LabSettings:
    """Where the lab lives and which Redis binary it runs."""

    home: Path
    redis_server: str | None = None
    # Where the search for free ports begins when no --port is given.
    port_start: int = 7000

    @classmethod
    def build(
        cls,
        *,
        home: Path | str | None = None,
        redis_server: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> LabSettings:
        """Options win over the environment, which wins over the defaults."""
        env = os.environ if environ is None else environ
        chosen_home = home or env.get("DSLAB_HOME") or Path.cwd() / DEFAULT_HOME_DIR
        chosen_server = redis_server or env.get("DSLAB_REDIS_SERVER") or None
        port_text = env.get("DSLAB_PORT_START", "7000")
        if not port_text.isdigit() or not 1024 <= int(port_text) <= 55000:
            raise UsageError(
                f"DSLAB_PORT_START={port_text!r} is not a port between 1024 and 55000",
                fix="unset it or give a number such as 7000",
            )

        return cls(
            home=Path(chosen_home).absolute(),
            redis_server=chosen_server,
            port_start=int(port_text),
        )

    @property
    def state_file(self) -> Path:
        return self.home / "state.json"


class RedisKind(StrEnum):
    STANDALONE = "standalone"
    SENTINEL = "sentinel"
    CLUSTER = "cluster"


_SCHEMES = {
    "redis": (RedisKind.STANDALONE, False),
    "rediss": (RedisKind.STANDALONE, True),
    "redis+sentinel": (RedisKind.SENTINEL, False),
    "rediss+sentinel": (RedisKind.SENTINEL, True),
    "redis+cluster": (RedisKind.CLUSTER, False),
    "rediss+cluster": (RedisKind.CLUSTER, True),
}
URL_HELP = (
    "use redis://HOST:PORT[/DB], redis+sentinel://HOST:PORT[,HOST:PORT...]"
    "[/SERVICE] or redis+cluster://HOST:PORT[,HOST:PORT...]"
)


@dataclass(frozen=True)
class RedisTarget:
    """A parsed ``--redis`` URL: which Redis deployment to talk to and how.

    For Sentinel the addresses are the Sentinels' and ``service`` names the
    monitored primary; for Cluster they are seed nodes.
    """

    kind: RedisKind
    addresses: tuple[tuple[str, int], ...]
    db: int = 0
    service: str = SENTINEL_SERVICE
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> RedisTarget:
        scheme, sep, rest = url.partition("://")
        if not sep or scheme.lower() not in _SCHEMES:
            raise UsageError(f"unsupported Redis URL {url!r}", fix=URL_HELP)
        kind, tls = _SCHEMES[scheme.lower()]

        # urlsplit understands one host only; split the host list by hand.
        netloc, _, path_query = rest.partition("/")
        userinfo, at, hosts = netloc.rpartition("@")
        if not at:
            hosts = netloc
        username, password = _split_userinfo(userinfo) if at else (None, None)
        addresses = tuple(_parse_address(part, url) for part in hosts.split(","))
        if kind is RedisKind.STANDALONE and len(addresses) != 1:
            raise UsageError(f"{url!r} names several hosts", fix=URL_HELP)

        parsed = urlsplit("x://h/" + path_query)
        path = parsed.path.strip("/")
        query = parse_qs(parsed.query)
        db, service = 0, SENTINEL_SERVICE
        if kind is RedisKind.SENTINEL:
            service = path or query.get("service_name", [SENTINEL_SERVICE])[0]
        elif path:
            db = _parse_db(path, url)
        if kind is RedisKind.CLUSTER and db != 0:
            raise UsageError(f"{url!r}: Redis Cluster has only db 0", fix=URL_HELP)

        return cls(kind, addresses, db, service, username, password, tls)

    def url(self, *, with_password: bool = False) -> str:
        scheme = {
            RedisKind.STANDALONE: "redis",
            RedisKind.SENTINEL: "redis+sentinel",
            RedisKind.CLUSTER: "redis+cluster",
        }[self.kind]
        if self.tls:
            scheme = scheme.replace("redis", "rediss", 1)
        auth = ""
        if self.password:
            secret = self.password if with_password else "***"
            auth = f"{self.username or ''}:{secret}@"
        elif self.username:
            auth = f"{self.username}:@"
        hosts = ",".join(f"{host}:{port}" for host, port in self.addresses)
        tail = ""
        if self.kind is RedisKind.SENTINEL:
            tail = f"/{self.service}"
        elif self.db:
            tail = f"/{self.db}"

        return f"{scheme}://{auth}{hosts}{tail}"

    def __str__(self) -> str:
        return self.url()


def _split_userinfo(userinfo: str) -> tuple[str | None, str | None]:
    user, colon, password = userinfo.partition(":")
    if not colon:
        # redis://secret@host is the historical "password only" form.
        return None, unquote(user) or None
    return unquote(user) or None, unquote(password) or None


def _parse_address(part: str, url: str) -> tuple[str, int]:
    host, colon, port_text = part.strip().rpartition(":")
    if not colon:
        host, port_text = port_text, "6379"
    host = host.strip("[]")
    if not host:
        raise UsageError(f"{url!r} has an empty host", fix=URL_HELP)
    try:
        port = int(port_text)
    except ValueError:
        raise UsageError(f"{url!r}: port {port_text!r} is not a number") from None
    if not 0 < port < 65536:
        raise UsageError(f"{url!r}: port {port} is outside 1-65535")
    return host, port


def _parse_db(path: str, url: str) -> int:
    try:
        db = int(path)
    except ValueError:
        raise UsageError(
            f"{url!r}: database {path!r} is not a number", fix=URL_HELP
        ) from None
    if db < 0:
        raise UsageError(f"{url!r}: database {db} is negative", fix=URL_HELP)
    return db
