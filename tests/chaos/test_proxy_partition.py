"""`dslab chaos partition` and `chaos delay --backend proxy` on a proxy lab.

Without root: a partition is a named cut on the lab's fault proxies. The
labs, proxies, Sentinels and Cluster are real processes started through
``Lab``; every wait is bounded, and the `start_lab` fixture heals and downs
the lab whatever a test did.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time

import pytest
import redis

from dslab.chaos import partition as partitions
from dslab.chaos.heal import heal
from dslab.chaos.journal import Journal
from dslab.chaos.proxy import ProxyControl
from dslab.errors import UsageError
from dslab.lab.lab import Lab, is_lab_proxy
from dslab.lab.netns import Network
from dslab.lab.probe import connect
from dslab.lab.supervisor import processes_using
from dslab.redisconn import sync_client
from dslab.settings import LabSettings, Persistence, Topology
from tests.conftest import StartLab
from tests.helpers import eventually, run_dslab

# Sentinel calls a primary down after 1 s, then elects and promotes; a loaded
# two-core machine may need a few rounds.
FAILOVER_WAIT_S = 30.0
# After the heal, Sentinel sees the old primary report itself primary and
# turns it into a replica (about 10 s here), then it resyncs.
REJOIN_WAIT_S = 40.0
# Cluster: 1 s node timeout, then a replica's election.
PROMOTION_WAIT_S = 30.0
# How long a held request must stay unanswered before the test calls it held.
HELD_S = 0.5
CALL_TIMEOUT_S = 10.0


def _proxy_lab(start_lab: StartLab, topology_name: Topology) -> Lab:
    return start_lab(topology_name, Persistence.OFF, network=Network.PROXY)


def _role(lab: Lab, name: str) -> str:
    record = lab.node(name)
    try:
        with connect(record.host, record.port) as client:
            return str(client.info("replication")["role"])
    except redis.RedisError:
        return "not answering"


def _cuts_left(lab: Lab) -> dict[str, dict[str, frozenset[str]]]:
    """Every proxy's cuts, for proxies that still run."""
    return {record.name: ProxyControl(str(record.extra["control_url"])).cuts()
            for record in lab.require_state().processes
            if is_lab_proxy(record) and record.is_alive()}


# -- planning (pure on the lab state) ----------------------------------------


@pytest.mark.timeout(60)
def test_cut_plan_and_refusals(start_lab: StartLab) -> None:
    """`host -> redis-1` cuts 127.0.0.1 at redis-1's proxy; a node named on
    both sides, or a cut of nodes *from* the host (they never connect to it),
    is refused with exit 2."""
    lab = _proxy_lab(start_lab, Topology.STANDALONE)
    state = lab.require_state()

    cuts, pairs = partitions.plan_cuts(state, ["host"], ["redis-1"], one_way=True)

    assert [(c.proxy, c.sources) for c in cuts] == [("proxy-redis-1",
                                                     ("127.0.0.1",))]
    assert pairs == (("host", "redis-1"),)
    with pytest.raises(UsageError, match="cuts nothing") as nothing:
        partitions.plan_cuts(state, ["redis-1"], ["host"], one_way=True)
    assert nothing.value.exit_code == 2
    with pytest.raises(UsageError, match="both sides"):
        partitions.plan_cuts(state, ["redis-1"], ["redis-1"])


@pytest.mark.timeout(60)
def test_loopback_lab_partition_exits_3_suggesting_the_proxy_network(
    start_lab: StartLab, lab_env: dict[str, str], lab_settings: LabSettings
) -> None:
    """On a plain loopback lab `chaos partition` still exits 3, now naming
    `--network proxy` (no root) as a way forward; nothing is journaled."""
    start_lab(Topology.STANDALONE, Persistence.OFF)

    done = run_dslab("chaos", "partition", "host", "redis-1", env=lab_env)

    assert done.returncode == 3
    assert "dslab lab up --network proxy" in done.stderr
    assert Journal(lab_settings.home).faults() == []


# -- live ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_cut_holds_a_live_request_that_completes_after_heal(
    start_lab: StartLab, lab_settings: LabSettings
) -> None:
    """A client connected before `partition host redis-1 --one-way` gets no
    answer while it lasts, and its request completes (not lost, not failed)
    once `chaos heal` lifts the cut; heal is idempotent."""
    lab = _proxy_lab(start_lab, Topology.STANDALONE)
    client = sync_client(lab.redis_target())
    client.connection_pool.connection_kwargs["socket_timeout"] = CALL_TIMEOUT_S
    try:
        assert client.ping()
        outcome = partitions.partition(lab, ["host"], ["redis-1"], one_way=True)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(client.set, "after-heal", "delivered")
            time.sleep(HELD_S)
            assert not pending.done()
            healed = heal(lab_settings.home)
            assert pending.result(timeout=CALL_TIMEOUT_S) is True
        assert client.get("after-heal") == "delivered"
    finally:
        client.close()

    assert outcome.fault.undo is not None
    assert outcome.fault.undo["action"] == "proxy-uncut"
    assert [r.outcome for r in healed] == ["cut f1 lifted on 1 proxy(ies)"]
    assert heal(lab_settings.home) == []
    assert _cuts_left(lab) == {"proxy-redis-1": {}}


@pytest.mark.timeout(60)
def test_delay_on_a_proxy_lab_uses_the_lab_proxy(
    start_lab: StartLab, lab_env: dict[str, str]
) -> None:
    """`chaos delay --backend proxy` sets the delay on the node's lab proxy
    (no second proxy is started), and `chaos heal` clears it."""
    lab = _proxy_lab(start_lab, Topology.STANDALONE)
    lab_proxy = lab.node("proxy-redis-1")

    done = run_dslab("chaos", "delay", "redis-1", "--ms", "50", "--backend",
                     "proxy", "--json", env=lab_env)

    assert done.returncode == 0, done.stderr
    fault = json.loads(done.stdout)["faults"][0]
    assert fault["proxy_address"] == f"{lab_proxy.host}:{lab_proxy.port}"
    assert fault["undo"]["pid"] == lab_proxy.pid
    assert [r.name for r in lab.require_state().processes
            if r.kind == "proxy"] == ["proxy-redis-1"]
    control = ProxyControl(str(lab_proxy.extra["control_url"]))
    assert control.faults()["upstream"].latency_ms == 50
    assert [r.ok for r in heal(lab.home)] == [True]
    assert control.faults()["upstream"].latency_ms == 0


@pytest.mark.timeout(60)
def test_killed_mid_partition_then_lab_down_leaves_no_cut_and_no_process(
    start_lab: StartLab, lab_env: dict[str, str], lab_settings: LabSettings
) -> None:
    """A `--for 1h` partition whose healer is killed -9: `lab down` from a
    fresh process lifts the cut on the live proxies (before stopping them)
    and leaves no process and no active fault."""
    lab = _proxy_lab(start_lab, Topology.STANDALONE)
    applied = run_dslab("chaos", "partition", "--isolate", "redis-1", "--for",
                        "1h", env=lab_env)
    assert applied.returncode == 0, applied.stderr
    assert "cut on 1 lab proxy(ies)" in applied.stdout
    assert _cuts_left(lab)["proxy-redis-1"] == {"f1": frozenset({"127.0.0.1"})}
    os.kill(Journal(lab_settings.home).timers()["f1"].pid, signal.SIGKILL)

    down = run_dslab("lab", "down", "--json", env=lab_env)

    assert down.returncode == 0, down.stderr
    assert len(json.loads(down.stdout)["healed"]) == 1
    healed = [e for e in Journal(lab_settings.home).events()
              if e["event"] == "healed"]
    assert [e["outcome"] for e in healed] == ["cut f1 lifted on 1 proxy(ies)"]
    assert Journal(lab_settings.home).active_faults() == []
    assert processes_using(lab_settings.home) == []


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_primary_cut_from_replicas_and_sentinels_fails_over_and_rejoins(
    start_lab: StartLab, lab_env: dict[str, str], lab_settings: LabSettings
) -> None:
    """Cutting the primary from the replicas and Sentinels (clients keep
    it) makes the Sentinels promote a replica; after `chaos heal` the old
    primary follows the new one, and no cut is left on any proxy."""
    lab = _proxy_lab(start_lab, Topology.REPLICATED)

    done = run_dslab("chaos", "partition", "primary",
                     "redis-2,redis-3,sentinel-1,sentinel-2,sentinel-3", "--json",
                     env=lab_env)

    assert done.returncode == 0, done.stderr
    eventually(lambda: lab.primary() in ("redis-2", "redis-3"),
               timeout_s=FAILOVER_WAIT_S, poll_s=0.2)
    assert _role(lab, "redis-1") == "master"  # it does not know yet
    assert [r.ok for r in heal(lab_settings.home)] == [True]
    eventually(lambda: _role(lab, "redis-1") == "slave",
               timeout_s=REJOIN_WAIT_S, poll_s=0.2)
    assert all(cuts == {} for cuts in _cuts_left(lab).values())
    assert Journal(lab_settings.home).active_faults() == []


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_isolated_cluster_primary_is_replaced_by_its_replica(
    start_lab: StartLab, lab_settings: LabSettings
) -> None:
    """`--isolate redis-1` in a Cluster (its client and bus proxies cut off
    from every node and the host) promotes its replica redis-4."""
    lab = _proxy_lab(start_lab, Topology.CLUSTER)
    network = partitions.lab_network(lab)
    others = partitions.everyone_but(network, ["redis-1"])

    outcome = partitions.partition(lab, ["redis-1"], others)

    assert {"proxy-redis-1", "proxy-redis-1-bus", "proxy-redis-2-bus"} <= {
        cut.proxy for cut in outcome.proxy_cuts}
    eventually(lambda: _role(lab, "redis-4") == "master",
               timeout_s=PROMOTION_WAIT_S, poll_s=0.2)
    assert [r.ok for r in heal(lab_settings.home)] == [True]
    assert all(cuts == {} for cuts in _cuts_left(lab).values())
