"""What each lab topology is made of, and how its nodes are configured.

A topology is a list of node plans (name, kind, role, port, config lines).
The plans are pure data so they can be read, printed and tested without
starting anything; ``dslab.lab.lab`` starts them and ``dslab.lab.cluster``
joins Cluster nodes together.

Lab timings are deliberately short so failures show up within seconds:

- Sentinel declares a primary down after 1 s without a reply;
- Cluster declares a node failed after 1 s (``cluster-node-timeout``).
"""

from __future__ import annotations

from collections.abc import Mapping
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


@dataclass(frozen=True)
class NodePlan:
    name: str
    kind: str  # "redis" or "sentinel"
    role: str  # "primary", "replica" or "sentinel"
    port: int
    config: list[str] = field(default_factory=list)
    replica_of: str | None = None  # the primary's name, for replicas
    slots: tuple[int, int] | None = None  # Cluster: first and last slot


def redis_config(
    port: int, persistence: Persistence, extra: list[str] | None = None,
    host: str = LOOPBACK_HOST,
) -> list[str]:
    """Settings every Redis node of the lab shares."""
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
    if host != LOOPBACK_HOST:
        # On the lab LAN (--network netns) a node tells others the address it
        # has there, never one seen through a translation.
        lines.append(f"replica-announce-ip {host}")

    return lines + list(extra or [])


def sentinel_config(
    port: int, primary_port: int, host: str = LOOPBACK_HOST,
    primary_host: str = LOOPBACK_HOST,
) -> list[str]:
    service = SENTINEL_SERVICE
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
) -> list[NodePlan]:
    """The nodes of ``topology`` on consecutive ports starting at ``base_port``.

    ``addresses`` (node name -> IP, from ``--network netns``) puts each node
    on its own address; without it every node binds 127.0.0.1.
    """
    def host(name: str) -> str:
        return (addresses or {}).get(name, LOOPBACK_HOST)

    if topology is Topology.STANDALONE:
        config = redis_config(base_port, persistence, extra_config, host("redis-1"))
        return [NodePlan("redis-1", "redis", "primary", base_port, config)]

    if topology is Topology.REPLICATED:
        primary_port = base_port
        primary_host = host("redis-1")
        nodes = [
            NodePlan(
                "redis-1", "redis", "primary", primary_port,
                redis_config(primary_port, persistence, extra_config, primary_host),
            )
        ]
        for index in range(REPLICAS):
            port = base_port + 1 + index
            name = f"redis-{index + 2}"
            config = redis_config(port, persistence, extra_config, host(name))
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
                                         primary_host))
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
        announce = ([f"cluster-announce-ip {host(name)}"]
                    if host(name) != LOOPBACK_HOST else [])
        return redis_config(port, persistence,
                            cluster_lines + announce + (extra_config or []),
                            host(name))

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
