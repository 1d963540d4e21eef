"""What each lab topology is made of, and how its nodes are configured.

A topology is a list of node plans (name, kind, role, port, config lines).
The plans are pure data so they can be read, printed and tested without
starting anything; ``dslab.lab.lab`` starts them and ``dslab.lab.cluster``
joins Cluster nodes together.

With ``--network proxy`` (see ``proxy_addresses`` and ``proxy_plans``) each
node binds its own loopback address, 127.0.0.11, .12, ... in plan order, on
its planned port, and a lab fault proxy listens on 127.0.0.1 with the *same*
port and forwards to it (a Cluster node gets a second proxy for its bus,
port + 10000 on both sides, because Redis 6.2 derives the bus port from the
client port). Nodes announce their proxy (127.0.0.1 and the port) and reach
each other only through proxies, so every path can be cut or slowed. Redis
opens its own connections (replication, Cluster bus, Sentinel) from its first
bind address, so a proxy can tell which node a connection comes from, and
127.0.0.1 is left to clients, services and dslab itself.

Lab timings are deliberately short so failures show up within seconds:

- Sentinel declares a primary down after 1 s without a reply;
- Cluster declares a node failed after 1 s (``cluster-node-timeout``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from dslab.settings import LOOPBACK_HOST, SENTINEL_SERVICE, Persistence, Topology

# Failure detection fast enough to watch a failover happen, slow enough that a
# busy two-core machine does not trigger false failovers.
SENTINEL_DOWN_AFTER_MS = 1000
# Also the wait before Sentinel retries a failover that did not complete.
SENTINEL_FAILOVER_TIMEOUT_MS = 3000
SENTINEL_QUORUM = 2
CLUSTER_NODE_TIMEOUT_MS = 1000
# Redis Cluster always listens for its node-to-node bus at port + 10000.
CLUSTER_BUS_OFFSET = 10000
CLUSTER_SLOTS = 16384
CLUSTER_PRIMARIES = 3
REPLICAS = 2
# --network proxy: node addresses start at .11 so they read like a small
# rack, and stay clear of 127.0.0.1 (clients and proxies) and of the .2-.10
# that tests and other tools like to use.
PROXY_NODE_NETWORK = ipaddress.IPv4Network("127.0.0.0/8")
PROXY_FIRST_NODE_HOST = 11
PROXY_KIND = "proxy"
# The two proxies a Cluster node has: clients and replication, and the bus.
CLIENT_PATH = "client"
BUS_PATH = "bus"


@dataclass(frozen=True)
class NodePlan:
    name: str
    kind: str  # "redis" or "sentinel"
    role: str  # "primary", "replica" or "sentinel"
    port: int
    config: list[str] = field(default_factory=list)
    replica_of: str | None = None  # the primary's name, for replicas
    slots: tuple[int, int] | None = None  # Cluster: first and last slot

    @property
    def has_bus(self) -> bool:
        return "cluster-enabled yes" in self.config


@dataclass(frozen=True)
class ProxyPlan:
    """A lab fault proxy: where it listens and the node it stands in front of."""

    name: str  # "proxy-redis-1", or "proxy-redis-1-bus" for a Cluster bus
    node: str
    path: str  # CLIENT_PATH or BUS_PATH
    port: int  # listens on 127.0.0.1:port
    upstream: tuple[str, int]


def proxy_addresses(names: Sequence[str]) -> dict[str, str]:
    """Node name -> the loopback address it binds with ``--network proxy``."""
    first = int(PROXY_NODE_NETWORK.network_address) + PROXY_FIRST_NODE_HOST
    return {name: str(ipaddress.IPv4Address(first + index))
            for index, name in enumerate(names)}


def proxy_plans(nodes: Sequence[NodePlan], addresses: Mapping[str, str]
                ) -> list[ProxyPlan]:
    """One proxy per node on the node's own port at 127.0.0.1, plus one per
    Cluster node for its bus (port + 10000, as Redis 6.2 expects)."""
    plans = []
    for node in nodes:
        address = addresses[node.name]
        plans.append(ProxyPlan(f"{PROXY_KIND}-{node.name}", node.name, CLIENT_PATH,
                               node.port, (address, node.port)))
        if node.has_bus:
            bus_port = node.port + CLUSTER_BUS_OFFSET
            plans.append(ProxyPlan(f"{PROXY_KIND}-{node.name}-{BUS_PATH}", node.name,
                                   BUS_PATH, bus_port, (address, bus_port)))
    return plans


def redis_config(
    port: int, persistence: Persistence, extra: list[str] | None = None,
    host: str = LOOPBACK_HOST, announce: tuple[str, int] | None = None,
) -> list[str]:
    """Settings every Redis node of the lab shares; ``announce`` is the
    address replicas tell their primary (and Sentinels) to reach them at."""
    lines = [
        f"port {port}",
        f"bind {host}",
        "daemonize no",
        'logfile ""',
        # RDB snapshots off: AOF is the persistence the learner chooses, and a
        # shutdown never waits for a snapshot.
        'save ""',
        # Replicas sync straight away over the socket instead of waiting 5 s.
        "repl-diskless-sync yes",
        "repl-diskless-sync-delay 0",
    ]
    if persistence is Persistence.OFF:
        lines.append("appendonly no")
    else:
        lines += ["appendonly yes", f"appendfsync {persistence.value}"]
    if announce is not None:
        # Behind a proxy (--network proxy) a node is reached at its proxy.
        lines += [f"replica-announce-ip {announce[0]}",
                  f"replica-announce-port {announce[1]}"]
    elif host != LOOPBACK_HOST:
        # On the lab LAN (--network netns) a node tells others the address it
        # has there, never one seen through a translation.
        lines.append(f"replica-announce-ip {host}")

    return lines + list(extra or [])


def sentinel_config(
    port: int, primary_port: int, host: str = LOOPBACK_HOST,
    primary_host: str = LOOPBACK_HOST, announce: tuple[str, int] | None = None,
) -> list[str]:
    service = SENTINEL_SERVICE
    # Other Sentinels learn this one's address from its hello messages.
    announced = ([] if announce is None else
                 [f"sentinel announce-ip {announce[0]}",
                  f"sentinel announce-port {announce[1]}"])
    return [
        f"port {port}",
        f"bind {host}",
        "daemonize no",
        'logfile ""',
        f"sentinel monitor {service} {primary_host} {primary_port} "
        f"{SENTINEL_QUORUM}",
        f"sentinel down-after-milliseconds {service} {SENTINEL_DOWN_AFTER_MS}",
        f"sentinel failover-timeout {service} {SENTINEL_FAILOVER_TIMEOUT_MS}",
        f"sentinel parallel-syncs {service} {REPLICAS}",
        *announced,
    ]


def cluster_slot_ranges(primaries: int = CLUSTER_PRIMARIES) -> list[tuple[int, int]]:
    """Split the 16384 slots into contiguous, nearly equal ranges."""
    ranges = []
    for index in range(primaries):
        first = index * CLUSTER_SLOTS // primaries
        last = (index + 1) * CLUSTER_SLOTS // primaries - 1
        ranges.append((first, last))
    return ranges


def node_count(topology: Topology) -> int:
    return {
        Topology.STANDALONE: 1,
        Topology.REPLICATED: 1 + REPLICAS + 3,
        Topology.CLUSTER: 2 * CLUSTER_PRIMARIES,
    }[topology]


def plan(
    topology: Topology,
    persistence: Persistence,
    base_port: int,
    extra_config: list[str] | None = None,
    addresses: Mapping[str, str] | None = None,
    *,
    proxied: bool = False,
) -> list[NodePlan]:
    """The nodes of ``topology`` on consecutive ports starting at ``base_port``.

    ``addresses`` (node name -> IP, from ``--network netns`` or ``proxy``)
    puts each node on its own address; without it every node binds
    127.0.0.1. ``proxied`` makes nodes announce, and reach each other at,
    their lab proxies (127.0.0.1, same port): see the module docstring.
    """
    def host(name: str) -> str:
        return (addresses or {}).get(name, LOOPBACK_HOST)

    def reached_at(name: str) -> str:
        """The address other lab parts use for ``name``."""
        return LOOPBACK_HOST if proxied else host(name)

    def announce(port: int) -> tuple[str, int] | None:
        return (LOOPBACK_HOST, port) if proxied else None

    if topology is Topology.STANDALONE:
        config = redis_config(base_port, persistence, extra_config, host("redis-1"),
                              announce(base_port))
        return [NodePlan("redis-1", "redis", "primary", base_port, config)]

    if topology is Topology.REPLICATED:
        primary_port = base_port
        primary_host = reached_at("redis-1")
        nodes = [
            NodePlan(
                "redis-1", "redis", "primary", primary_port,
                redis_config(primary_port, persistence, extra_config,
                             host("redis-1"), announce(primary_port)),
            )
        ]
        for index in range(REPLICAS):
            port = base_port + 1 + index
            name = f"redis-{index + 2}"
            config = redis_config(port, persistence, extra_config, host(name),
                                  announce(port))
            config.append(f"replicaof {primary_host} {primary_port}")
            nodes.append(
                NodePlan(name, "redis", "replica", port, config,
                         replica_of="redis-1")
            )
        for index in range(3):
            port = base_port + 1 + REPLICAS + index
            name = f"sentinel-{index + 1}"
            nodes.append(
                NodePlan(name, "sentinel", "sentinel", port,
                         sentinel_config(port, primary_port, host(name),
                                         primary_host, announce(port)))
            )
        return nodes

    cluster_lines = [
        "cluster-enabled yes",
        "cluster-config-file nodes.conf",
        f"cluster-node-timeout {CLUSTER_NODE_TIMEOUT_MS}",
        # A replica may always take over, however long its link was down: in a
        # lab we want failover, not a cluster that stays down.
        "cluster-replica-validity-factor 0",
    ]

    def cluster_config(name: str, port: int) -> list[str]:
        announced = []
        if proxied:
            announced = [f"cluster-announce-ip {LOOPBACK_HOST}",
                         f"cluster-announce-port {port}",
                         f"cluster-announce-bus-port {port + CLUSTER_BUS_OFFSET}"]
        elif host(name) != LOOPBACK_HOST:
            announced = [f"cluster-announce-ip {host(name)}"]
        return redis_config(port, persistence,
                            cluster_lines + announced + (extra_config or []),
                            host(name), announce(port))

    nodes = []
    for index, slots in enumerate(cluster_slot_ranges()):
        port = base_port + index
        name = f"redis-{index + 1}"
        nodes.append(
            NodePlan(name, "redis", "primary", port, cluster_config(name, port),
                     slots=slots)
        )
    for index in range(CLUSTER_PRIMARIES):
        port = base_port + CLUSTER_PRIMARIES + index
        name = f"redis-{CLUSTER_PRIMARIES + index + 1}"
        nodes.append(
            NodePlan(name, "redis", "replica", port, cluster_config(name, port),
                     replica_of=f"redis-{index + 1}")
        )
    return nodes
