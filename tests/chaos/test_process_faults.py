"""Process faults, targets and proxy delays against real Redis labs."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from dslab.chaos import delay, process
from dslab.chaos.heal import heal, heal_all
from dslab.chaos.journal import Journal
from dslab.chaos.proxy import HEALTHY, Direction, ProxyControl
from dslab.chaos.targets import resolve
from dslab.errors import LabError, LabNotRunning, UsageError
from dslab.lab.lab import Lab
from dslab.lab.state import ProcessRecord
from dslab.settings import LabSettings, Topology
from tests.chaos.conftest import assert_healed_on_time
from tests.conftest import StartLab
from tests.helpers import eventually

# A paused node gets this long to answer before the test calls it silent.
SILENT_TIMEOUT_S = 0.3
HEAL_WAIT_S = 10.0


def _answers(host: str, port: int, timeout_s: float = SILENT_TIMEOUT_S) -> bool:
    client = redis.Redis(host=host, port=port, socket_timeout=timeout_s,
                         socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0))
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _node_answers(record: ProcessRecord) -> bool:
    return _answers(record.host, record.port)


def test_pause_silences_redis_and_heal_all_brings_it_back(start_lab: StartLab) -> None:
    """A paused redis-1 stops answering; heal_all (journal only) revives it."""
    lab = start_lab()
    node = lab.node("redis-1")

    outcome = process.pause(lab, node)

    assert not _node_answers(node)
    assert [f.id for f in Journal(lab.home).active_faults()] == [outcome.fault.id]
    results = heal_all(lab.home)
    assert [(r.fault.id, r.ok) for r in results] == [(outcome.fault.id, True)]
    assert _node_answers(node)


def test_pause_twice_keeps_one_fault(start_lab: StartLab) -> None:
    """Pausing a paused node returns the existing fault; one heal undoes it."""
    lab = start_lab()
    node = lab.node("redis-1")

    first = process.pause(lab, node)
    second = process.pause(lab, node)

    assert second.already and second.fault.id == first.fault.id
    assert len(heal_all(lab.home)) == 1
    assert _node_answers(node)


def test_heal_of_pause_on_a_since_killed_process_is_harmless(
    start_lab: StartLab,
) -> None:
    """The node was killed behind dslab's back: heal retires the pause, no error."""
    lab = start_lab()
    node = lab.node("redis-1")
    process.pause(lab, node)
    os.kill(node.pid, signal.SIGKILL)
    eventually(lambda: not node.is_alive(), timeout_s=5)

    results = heal_all(lab.home)

    assert results[0].ok and "gone" in results[0].outcome
    assert Journal(lab.home).active_faults() == []


def test_kill_is_journaled_without_undo_and_restart_brings_back(
    start_lab: StartLab,
) -> None:
    """kill ends a pause with the process, leaves no active fault, and restart
    starts the node again under a new pid."""
    lab = start_lab()
    node = lab.node("redis-1")
    paused = process.pause(lab, node)

    killed = process.kill(lab, node)

    assert killed.fault.remedy == "dslab chaos restart redis-1"
    assert killed.healed == (paused.fault.id,)
    assert Journal(lab.home).active_faults() == []
    with pytest.raises(LabError):
        process.pause(lab, node)
    restarted = process.restart(lab, node)
    assert restarted.new_pid != node.pid
    assert _node_answers(lab.node("redis-1"))


def test_resume_heals_the_matching_pause(start_lab: StartLab) -> None:
    """resume continues the node and marks its journaled pause healed."""
    lab = start_lab()
    node = lab.node("redis-1")
    paused = process.pause(lab, node)

    resumed = process.resume(lab, node)

    assert resumed.healed == (paused.fault.id,)
    assert _node_answers(node)
    assert Journal(lab.home).active_faults() == []


def test_pause_for_heals_itself_in_a_detached_healer(start_lab: StartLab) -> None:
    """With duration_s the healer process resumes the node by itself."""
    lab = start_lab()
    node = lab.node("redis-1")

    outcome = process.pause(lab, node, duration_s=0.5)

    assert outcome.fault.until is not None
    eventually(lambda: _node_answers(node), timeout_s=HEAL_WAIT_S)
    eventually(lambda: not Journal(lab.home).active_faults(), timeout_s=HEAL_WAIT_S)
    assert_healed_on_time(lab.home, outcome.fault, 0.5)


def test_targets_on_a_standalone_lab(start_lab: StartLab) -> None:
    """primary is redis-1; replicas do not exist; unknown names list options."""
    lab = start_lab()
    rng = random.Random(1)

    assert [r.name for r in resolve(lab, "primary", rng)] == ["redis-1"]
    assert [r.name for r in resolve(lab, "random:redis", rng)] == ["redis-1"]
    with pytest.raises(UsageError, match="no replicas"):
        resolve(lab, "random-replica", rng)
    with pytest.raises(UsageError) as caught:
        resolve(lab, "redis-9", rng)
    assert "use one of: redis-1, primary, random:redis, all:redis" in str(caught.value)
    with pytest.raises(UsageError, match="no process of kind 'chat'"):
        resolve(lab, "random:chat", rng)


def test_targets_on_a_replicated_lab(start_lab: StartLab) -> None:
    """primary is the Sentinels' primary, replica the first other node, and a
    seeded random choice is the same every time."""
    lab = start_lab(Topology.REPLICATED)
    primary = lab.primary()

    def pick(target: str, seed: int) -> list[str]:
        return [r.name for r in resolve(lab, target, random.Random(seed))]

    assert pick("primary", 0) == [primary]
    replicas = sorted(r.name for r in lab.require_state().of_kind("redis")
                      if r.name != primary)
    assert pick("replica", 0) == [replicas[0]]
    for seed in range(5):
        assert pick("random-replica", seed) == pick("random-replica", seed)
        assert pick("random-replica", seed)[0] in replicas
        assert pick("random:sentinel", seed) == pick("random:sentinel", seed)
    seen = {pick("random:sentinel", seed)[0] for seed in range(20)}
    assert len(seen) > 1
    assert pick("all:sentinel", 0) == ["sentinel-1", "sentinel-2", "sentinel-3"]


def _ping_s(address: str) -> float:
    host, port = address.split(":")
    client = redis.Redis(host=host, port=int(port), socket_timeout=5)
    try:
        client.ping()  # connect outside the measurement
        began = time.monotonic()
        client.ping()
        return time.monotonic() - began
    finally:
        client.close()


def test_proxy_delay_slows_pings_and_heal_clears_it(start_lab: StartLab) -> None:
    """A 150 ms proxy delay makes a PING through the proxy take at least 150 ms;
    heal leaves the proxy with no faults."""
    lab = start_lab()
    node = lab.node("redis-1")
    spec = delay.DelaySpec(ms=150)

    outcome = delay.delay_proxy(lab, node, spec)

    assert outcome.proxy_address is not None
    assert _ping_s(outcome.proxy_address) >= 0.150
    proxy = lab.node("proxy-redis-1")
    control = ProxyControl(str(proxy.extra["control_url"]))
    assert control.faults()[Direction.UPSTREAM].latency_ms == 150
    assert [r.fault.id for r in heal(lab.home, outcome.fault.id)] == [outcome.fault.id]
    assert control.faults() == {Direction.UPSTREAM: HEALTHY,
                                Direction.DOWNSTREAM: HEALTHY}


def test_second_delay_replaces_the_first(start_lab: StartLab) -> None:
    """A new delay on the same proxy retires the earlier fault."""
    lab = start_lab()
    node = lab.node("redis-1")

    first = delay.delay_proxy(lab, node, delay.DelaySpec(ms=50))
    second = delay.delay_proxy(lab, node, delay.DelaySpec(ms=80, rate="1mbit"))

    assert second.replaced == (first.fault.id,)
    assert [f.id for f in Journal(lab.home).active_faults()] == [second.fault.id]
    control = ProxyControl(str(lab.node("proxy-redis-1").extra["control_url"]))
    assert control.faults()[Direction.DOWNSTREAM].bandwidth_bytes_per_s == 125_000


def test_proxy_refuses_loss(start_lab: StartLab) -> None:
    """The proxy cannot drop packets: --loss with it is a usage error."""
    lab = start_lab()

    with pytest.raises(UsageError, match="cannot drop packets"):
        delay.delay_proxy(lab, lab.node("redis-1"), delay.DelaySpec(ms=10,
                                                                    loss_pct=1))

    assert Journal(lab.home).faults() == []


def test_rate_units_are_decimal_like_tc() -> None:
    """1mbit is 125000 bytes/s, 100kbps 100000 bytes/s; nonsense is refused."""
    assert delay.rate_bytes_per_s("1mbit") == 125_000
    assert delay.rate_bytes_per_s("100kbps") == 100_000
    with pytest.raises(UsageError):
        delay.rate_bytes_per_s("fast")


def test_lab_without_state_is_refused(lab_settings: LabSettings) -> None:
    """Resolving a target with no lab running is an environment problem (exit 3)."""
    with pytest.raises(LabNotRunning):
        resolve(Lab(lab_settings), "redis-1", random.Random(0))
