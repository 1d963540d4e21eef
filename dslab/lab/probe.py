"""Live checks of lab nodes: ask each process what it is right now.

Nothing here trusts ``state.json`` beyond the address: the role, replication
offset, slots and memory all come from the node itself, and a node that does
not answer within ``PROBE_TIMEOUT_S`` is reported as not answering.
"""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from dslab.lab.state import ProcessRecord
from dslab.settings import SENTINEL_SERVICE

# Long enough for a node on a loaded two-core machine, short enough that
# `lab status` on a lab full of paused nodes still returns promptly.
PROBE_TIMEOUT_S = 0.5


@contextmanager
def connect(
    host: str, port: int, timeout_s: float = PROBE_TIMEOUT_S
) -> Iterator[redis.Redis]:
    client = redis.Redis(
        host=host,
        port=port,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        decode_responses=True,
        # A probe asks once: redis-py's default retries would turn one paused
        # node into several seconds of waiting.
        retry=Retry(NoBackoff(), 0),
    )
    try:
        yield client
    finally:
        client.close()


def answers(record: ProcessRecord, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    try:
        with connect(record.host, record.port, timeout_s) as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


@dataclass(frozen=True)
class ClusterNode:
    """One line of CLUSTER NODES."""

    node_id: str
    address: str  # host:port
    flags: frozenset[str]
    primary_id: str | None
    link: str
    slots: tuple[tuple[int, int], ...]

    @property
    def is_primary(self) -> bool:
        return "master" in self.flags

    @property
    def failed(self) -> bool:
        return bool(self.flags & {"fail", "fail?"})


def parse_cluster_nodes(text: str) -> list[ClusterNode]:
    nodes = []
    for line in text.strip().splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        # "127.0.0.1:7000@17000" -> "127.0.0.1:7000"
        address = parts[1].split("@", 1)[0]
        slots = []
        for token in parts[8:]:
            if token.startswith("["):  # a slot being migrated
                continue
            first, _, last = token.partition("-")
            slots.append((int(first), int(last or first)))
        nodes.append(
            ClusterNode(
                node_id=parts[0],
                address=address,
                flags=frozenset(parts[2].split(",")),
                primary_id=None if parts[3] == "-" else parts[3],
                link=parts[7],
                slots=tuple(slots),
            )
        )
    return nodes


def cluster_nodes(client: redis.Redis) -> list[ClusterNode]:
    # Two words, so redis-py hands back the raw text instead of its own parse.
    return parse_cluster_nodes(str(client.execute_command("CLUSTER", "NODES")))


def cluster_info(client: redis.Redis) -> dict[str, str]:
    text = str(client.execute_command("CLUSTER", "INFO"))
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key: value.strip() for key, value in pairs}


@dataclass
class NodeHealth:
    """What a node said about itself just now (or that it said nothing)."""

    name: str
    kind: str
    pid: int
    address: str
    process: str  # "running", "paused" or "dead"
    answering: bool
    role: str = "-"
    detail: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def healthy(self) -> bool:
        return self.process == "running" and self.answering


REDIS_KINDS = ("redis", "sentinel")


def service_answers(record: ProcessRecord, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """A service (chat, shortener, proxy) answers its health URL with 200."""
    url = record.extra.get("health_url")
    if not url:
        return port_accepts(record.host, record.port, timeout_s)
    # Loopback only: never let an http_proxy setting route the probe elsewhere.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(str(url), timeout=timeout_s) as response:
            return int(response.status) == 200
    except (OSError, ValueError):
        return False


def port_accepts(host: str, port: int, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def ready_check(record: ProcessRecord) -> bool:
    """Is this process serving? The check that fits its kind."""
    if record.kind in REDIS_KINDS:
        return answers(record)
    return service_answers(record)


def inspect_node(record: ProcessRecord, process: str) -> NodeHealth:
    """Ask a Redis node, Sentinel or service for its role and vital signs."""
    health = NodeHealth(record.name, record.kind, record.pid, record.address,
                        process, answering=False)
    if process == "dead":
        return health
    if record.kind not in REDIS_KINDS:
        health.role = record.role
        health.answering = service_answers(record)
        health.detail.update(
            {key: value for key, value in record.extra.items() if key == "url"}
        )
        if not health.answering:
            health.error = "not answering its health check"
        return health
    try:
        with connect(record.host, record.port) as client:
            if record.kind == "sentinel":
                _inspect_sentinel(client, health)
            else:
                _inspect_redis(client, health)
        health.answering = True
    except redis.RedisError as exc:
        health.error = f"not answering: {exc}"

    return health


def _inspect_redis(client: redis.Redis, health: NodeHealth) -> None:
    info = client.info()
    role = info.get("role")
    health.role = {"master": "primary", "slave": "replica"}.get(str(role), str(role))
    health.detail["memory"] = info.get("used_memory_human", "?")
    health.detail["keys"] = sum(
        int(value.get("keys", 0)) for key, value in info.items()
        if key.startswith("db") and isinstance(value, dict)
    )
    health.detail["offset"] = info.get(
        "master_repl_offset" if role == "master" else "slave_repl_offset", 0
    )
    if role == "slave":
        primary = f"{info.get('master_host')}:{info.get('master_port')}"
        health.detail["primary"] = primary
        health.detail["link"] = info.get("master_link_status", "?")
    if info.get("cluster_enabled"):
        myself = next(
            (node for node in cluster_nodes(client) if "myself" in node.flags), None
        )
        if myself is not None:
            health.detail["slots"] = ", ".join(
                f"{first}-{last}" for first, last in myself.slots
            )
        health.detail["cluster_state"] = cluster_info(client).get("cluster_state")


def sentinel_primary(client: redis.Redis) -> dict[str, Any]:
    """What a Sentinel knows of the primary it monitors (SENTINEL MASTER)."""
    return cast(dict[str, Any], client.sentinel_master(SENTINEL_SERVICE))


def sentinel_primary_address(client: redis.Redis) -> str | None:
    """The primary's address as this Sentinel sees it now, or None."""
    reply = client.sentinel_get_master_addr_by_name(SENTINEL_SERVICE)
    if not isinstance(reply, (list, tuple)) or len(reply) != 2:
        return None
    host, port = (str(part) for part in reply)
    return f"{host}:{port}"


def _inspect_sentinel(client: redis.Redis, health: NodeHealth) -> None:
    health.role = "sentinel"
    primary = sentinel_primary(client)
    health.detail["primary"] = f"{primary['ip']}:{primary['port']}"
    health.detail["other_sentinels"] = primary.get("num-other-sentinels")
    health.detail["replicas"] = primary.get("num-slaves")
    flags = primary.get("flags", "")
    health.detail["primary_flags"] = (
        ",".join(sorted(flags)) if isinstance(flags, (set, frozenset)) else str(flags)
    )
