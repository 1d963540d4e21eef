"""Joining fresh Redis nodes into a Cluster, step by step.

This is what ``redis-cli --cluster create`` does, written out so a learner can
read it (and so the lab works with a redis-server that came without
redis-cli):

1. give each primary a distinct config epoch, so that no two primaries ever
   claim the same slots with the same epoch;
2. assign each primary its range of hash slots;
3. introduce every node to the first one (CLUSTER MEET); gossip spreads the
   rest until every node knows every other. Behind lab proxies (``--network
   proxy``) the MEET names each node's proxy, whose port + 10000 is its bus
   proxy, so the bus runs through proxies from the very first packet;
4. make each replica follow its primary (CLUSTER REPLICATE);
5. wait until every node reports ``cluster_state:ok``, sees every replica in
   place and each replica's link to its primary is up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager

import redis

from dslab.errors import NodeStartFailed
from dslab.lab.probe import cluster_info, cluster_nodes, connect
from dslab.lab.state import ProcessRecord
from dslab.lab.topology import NodePlan

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 30.0
POLL_S = 0.05
# CLUSTER commands can take longer than a PING while gossip is busy.
COMMAND_TIMEOUT_S = 2.0


def create_cluster(
    plans: list[NodePlan], records: dict[str, ProcessRecord],
    *, timeout_s: float = JOIN_TIMEOUT_S,
    meet_at: Mapping[str, tuple[str, int]] | None = None,
) -> None:
    """Join the nodes of ``plans``; ``meet_at`` (node name -> host, port) is
    where the others reach a node, when not at its own address."""
    primaries = [plan for plan in plans if plan.role == "primary"]
    replicas = [plan for plan in plans if plan.role == "replica"]
    deadline = time.monotonic() + timeout_s

    for epoch, plan in enumerate(primaries, start=1):
        with _client(records[plan.name]) as client:
            client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", epoch)
            assert plan.slots is not None
            first, last = plan.slots
            client.execute_command("CLUSTER", "ADDSLOTS", *range(first, last + 1))

    seed = records[plans[0].name]
    with _client(seed) as client:
        for plan in plans[1:]:
            other = records[plan.name]
            host, port = (meet_at or {}).get(plan.name, (other.host, other.port))
            client.execute_command("CLUSTER", "MEET", host, port)
    _wait(lambda: _all_know_each_other(plans, records), deadline,
          "nodes to learn about each other (CLUSTER MEET)", records)

    node_ids = {name: _node_id(record) for name, record in records.items()}
    for plan in replicas:
        assert plan.replica_of is not None
        with _client(records[plan.name]) as client:
            client.execute_command("CLUSTER", "REPLICATE", node_ids[plan.replica_of])
    _wait(lambda: _cluster_ready(plans, records), deadline,
          "the cluster to reach cluster_state:ok with every replica in sync",
          records)
    log.info("cluster formed: %d primaries, %d replicas", len(primaries),
             len(replicas))


def _client(record: ProcessRecord) -> AbstractContextManager[redis.Redis]:
    return connect(record.host, record.port, COMMAND_TIMEOUT_S)


def _node_id(record: ProcessRecord) -> str:
    with _client(record) as client:
        return str(client.execute_command("CLUSTER", "MYID"))


def _all_know_each_other(
    plans: list[NodePlan], records: dict[str, ProcessRecord]
) -> bool:
    for plan in plans:
        with _client(records[plan.name]) as client:
            nodes = cluster_nodes(client)
        if len(nodes) != len(plans) or any("handshake" in n.flags for n in nodes):
            return False
    return True


def _cluster_ready(plans: list[NodePlan], records: dict[str, ProcessRecord]) -> bool:
    replica_count = sum(plan.role == "replica" for plan in plans)
    for plan in plans:
        with _client(records[plan.name]) as client:
            if cluster_info(client).get("cluster_state") != "ok":
                return False
            nodes = cluster_nodes(client)
            if sum(not node.is_primary for node in nodes) != replica_count:
                return False
            if plan.role == "replica":
                link = client.info("replication").get("master_link_status")
                if link != "up":
                    return False
    return True


def _wait(
    ready: Callable[[], bool], deadline: float, what: str,
    records: dict[str, ProcessRecord],
) -> None:
    while True:
        dead = [name for name, record in records.items() if not record.is_alive()]
        if dead:
            raise NodeStartFailed(
                f"{', '.join(dead)} exited while waiting for {what}",
                fix=f"read `dslab lab logs {dead[0]}`",
            )
        try:
            if ready():
                return
        except redis.RedisError as exc:
            log.debug("cluster not ready yet: %s", exc)
        if time.monotonic() > deadline:
            raise NodeStartFailed(
                f"timed out waiting for {what}",
                fix="the machine may be overloaded; run `dslab lab down` and try "
                "again, or read `dslab lab logs redis-1`",
            )
        time.sleep(POLL_S)
