"""Topology plans: ports, roles, slot ranges and persistence settings."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dslab.lab.topology import CLUSTER_SLOTS, cluster_slot_ranges, plan
from dslab.settings import Persistence, Topology


@given(st.integers(min_value=1, max_value=64))
def test_slot_ranges_cover_every_slot_once(primaries: int) -> None:
    """However many primaries, the ranges tile 0..16383 with no gap or overlap."""
    ranges = cluster_slot_ranges(primaries)

    covered = [slot for first, last in ranges for slot in range(first, last + 1)]
    assert covered == list(range(CLUSTER_SLOTS))
    sizes = [last - first + 1 for first, last in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_replicated_plan_has_primary_replicas_and_three_sentinels() -> None:
    """A primary, two replicas following it, three Sentinels watching it."""
    nodes = plan(Topology.REPLICATED, Persistence.ALWAYS, 7000)

    assert [(n.name, n.role, n.port) for n in nodes] == [
        ("redis-1", "primary", 7000), ("redis-2", "replica", 7001),
        ("redis-3", "replica", 7002), ("sentinel-1", "sentinel", 7003),
        ("sentinel-2", "sentinel", 7004), ("sentinel-3", "sentinel", 7005),
    ]
    assert "replicaof 127.0.0.1 7000" in nodes[1].config
    assert "sentinel monitor dslab 127.0.0.1 7000 2" in nodes[3].config
    assert "appendfsync always" in nodes[0].config


def test_cluster_plan_pairs_each_replica_with_a_primary() -> None:
    """Three primaries own all slots; replica i follows primary i."""
    nodes = plan(Topology.CLUSTER, Persistence.EVERYSEC, 7100)

    primaries = [n for n in nodes if n.role == "primary"]
    replicas = [n for n in nodes if n.role == "replica"]
    assert [n.slots for n in primaries] == cluster_slot_ranges(3)
    assert [n.replica_of for n in replicas] == ["redis-1", "redis-2", "redis-3"]
    assert all("cluster-enabled yes" in n.config for n in nodes)


def test_persistence_off_disables_aof_and_snapshots() -> None:
    """`--persistence off` means nothing survives a restart."""
    config = plan(Topology.STANDALONE, Persistence.OFF, 7000)[0].config

    assert "appendonly no" in config
    assert 'save ""' in config


def test_extra_config_reaches_every_redis_node() -> None:
    """`--config` lines are appended to every Redis node, not to Sentinels."""
    nodes = plan(Topology.REPLICATED, Persistence.OFF, 7000, ["maxmemory 64mb"])

    assert all("maxmemory 64mb" in n.config for n in nodes if n.kind == "redis")
    assert all("maxmemory 64mb" not in n.config for n in nodes
               if n.kind == "sentinel")
