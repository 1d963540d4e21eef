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
    port: int, persistence: Persistence, extra: list[str] | None = None
) -> list[str]:
    """Settings every Redis node of the lab shares."""
    lines = [
        f"port {port}",
        f"bind {LOOPBACK_HOST}",
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

    return lines + list(extra or [])


def sentinel_config(port: int, primary_port: int) -> list[str]:
    service = SENTINEL_SERVICE
    return [
        f"port {port}",
        f"bind {LOOPBACK_HOST}",
        "daemonize no",
        'logfile ""',
        f"sentinel monitor {service} {LOOPBACK_HOST} {primary_port} "
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
) -> list[NodePlan]:
    """The nodes of ``topology`` on consecutive ports starting at ``base_port``."""
    if topology is Topology.STANDALONE:
        config = redis_config(base_port, persistence, extra_config)
        return [NodePlan("redis-1", "redis", "primary", base_port, config)]

    if topology is Topology.REPLICATED:
        primary_port = base_port
        nodes = [
            NodePlan(
                "redis-1", "redis", "primary", primary_port,
                redis_config(primary_port, persistence, extra_config),
            )
        ]
        for index in range(REPLICAS):
            port = base_port + 1 + index
            config = redis_config(port, persistence, extra_config)
            config.append(f"replicaof {LOOPBACK_HOST} {primary_port}")
            nodes.append(
                NodePlan(f"redis-{index + 2}", "redis", "replica", port, config,
                         replica_of="redis-1")
            )
        for index in range(3):
            port = base_port + 1 + REPLICAS + index
            nodes.append(
                NodePlan(f"sentinel-{index + 1}", "sentinel", "sentinel", port,
                         sentinel_config(port, primary_port))
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
    nodes = []
    for index, slots in enumerate(cluster_slot_ranges()):
        port = base_port + index
        config = redis_config(port, persistence, cluster_lines + (extra_config or []))
        nodes.append(
            NodePlan(f"redis-{index + 1}", "redis", "primary", port, config,
                     slots=slots)
        )
    for index in range(CLUSTER_PRIMARIES):
        port = base_port + CLUSTER_PRIMARIES + index
        config = redis_config(port, persistence, cluster_lines + (extra_config or []))
        nodes.append(
            NodePlan(f"redis-{CLUSTER_PRIMARIES + index + 1}", "redis", "replica",
                     port, config, replica_of=f"redis-{index + 1}")
        )
    return nodes
