"""The lab with real Redis: each topology comes up, breaks and goes away cleanly."""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

import psutil
import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster

from dslab.errors import (
    LabAlreadyRunning,
    LabNotRunning,
    LabStateCorrupt,
    NodeStartFailed,
    PortInUse,
)
from dslab.lab.lab import Lab
from dslab.lab.probe import cluster_info, connect
from dslab.lab.supervisor import processes_using
from dslab.settings import LabSettings, Persistence, Topology
from tests.conftest import StartLab
from tests.helpers import eventually


def _pids(lab: Lab) -> list[int]:
    state = lab.state()
    assert state is not None
    return [record.pid for record in state.processes]


def _assert_nothing_left(lab: Lab, pids: list[int]) -> None:
    assert all(not psutil.pid_exists(pid) or
               psutil.Process(pid).status() == psutil.STATUS_ZOMBIE for pid in pids)
    assert processes_using(lab.home) == []
    assert not lab.settings.state_file.exists()


def test_standalone_comes_up_answers_and_goes_away(start_lab: StartLab) -> None:
    """One node serves reads and writes; down leaves no process and no state."""
    lab = start_lab()
    node = lab.node("redis-1")

    with connect(node.host, node.port) as client:
        client.set("greeting", "hello")
        assert client.get("greeting") == "hello"
    assert lab.status().healthy
    pids = _pids(lab)

    result = lab.down()

    assert result.stopped == ["redis-1"]
    _assert_nothing_left(lab, pids)


def test_up_twice_starts_nothing_new(start_lab: StartLab) -> None:
    """A second `up` of the same topology returns the running lab."""
    lab = start_lab()
    pids = _pids(lab)

    again = lab.up(Topology.STANDALONE, Persistence.EVERYSEC)

    assert again.already_running
    assert _pids(lab) == pids


def test_another_topology_while_running_is_refused(start_lab: StartLab) -> None:
    """Asking for a cluster while a standalone lab runs says how to proceed."""
    lab = start_lab()

    with pytest.raises(LabAlreadyRunning) as caught:
        lab.up(Topology.CLUSTER)

    assert "lab down" in (caught.value.fix or "")
    assert lab.status().healthy


def test_a_killed_node_is_shown_dead_and_down_still_cleans(
    start_lab: StartLab,
) -> None:
    """kill -9 is seen live by status; down afterwards reports it already dead."""
    lab = start_lab()
    node = lab.node("redis-1")
    os.kill(node.pid, signal.SIGKILL)
    eventually(lambda: not node.is_alive(), timeout_s=5)

    health = lab.status().nodes[0]
    assert health.process == "dead"
    assert not health.healthy

    result = lab.down()
    assert result.already_dead == ["redis-1"]
    assert not lab.settings.state_file.exists()


def test_restart_brings_back_data_with_persistence_always(
    start_lab: StartLab,
) -> None:
    """With appendfsync always, a key written before kill -9 is there after restart."""
    lab = start_lab(Topology.STANDALONE, Persistence.ALWAYS)
    node = lab.node("redis-1")
    with connect(node.host, node.port) as client:
        client.set("survivor", "yes")
    os.kill(node.pid, signal.SIGKILL)
    eventually(lambda: not node.is_alive(), timeout_s=5)

    restarted = lab.restart("redis-1")

    assert restarted.pid != node.pid
    with connect(restarted.host, restarted.port) as client:
        assert client.get("survivor") == "yes"


def test_taken_port_is_refused_before_anything_starts(
    lab_settings: LabSettings,
) -> None:
    """A port already in use gives PortInUse and no process is started."""
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        lab = Lab(lab_settings)

        with pytest.raises(PortInUse) as caught:
            lab.up(base_port=port)

    assert str(port) in caught.value.message
    assert lab.state() is None
    assert processes_using(lab.home) == []


def test_node_dying_during_startup_leaves_nothing(lab_settings: LabSettings) -> None:
    """A node that exits while starting is reported with its log; nothing remains."""
    lab = Lab(lab_settings)

    with pytest.raises(NodeStartFailed) as caught:
        lab.up(Topology.REPLICATED, extra_config=["loadmodule /nonexistent/mod.so"])

    assert "exited while starting up" in caught.value.message
    assert "nonexistent" in caught.value.message  # the log tail says why
    assert lab.state() is None
    assert processes_using(lab.home) == []


def test_damaged_state_blocks_status_but_down_force_cleans(
    start_lab: StartLab,
) -> None:
    """With state.json destroyed, status refuses clearly and down --force
    still finds and stops the nodes by their command line."""
    lab = start_lab()
    pids = _pids(lab)
    lab.settings.state_file.write_text("garbage{")

    with pytest.raises(LabStateCorrupt):
        lab.status()
    result = lab.down(force=True)

    assert sorted(result.strays) == sorted(pids)
    _assert_nothing_left(lab, pids)


def test_status_without_a_lab_says_how_to_start_one(
    lab_settings: LabSettings,
) -> None:
    """No lab: a clear error pointing at `dslab lab up`."""
    with pytest.raises(LabNotRunning, match="no lab is running"):
        Lab(lab_settings).status()


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_sentinel_replaces_a_killed_primary(start_lab: StartLab) -> None:
    """kill -9 of the replicated primary: Sentinel promotes a replica and the lab
    reports the new primary; restarting the old one makes it a replica."""
    lab = start_lab(Topology.REPLICATED)
    assert lab.primary() == "redis-1"
    old = lab.node("redis-1")
    with connect(old.host, old.port) as client:
        client.set("before-failover", "1")
        client.wait(2, 1000)

    os.kill(old.pid, signal.SIGKILL)
    eventually(lambda: lab.primary() in ("redis-2", "redis-3"), timeout_s=30)

    new = lab.node(lab.primary())
    with connect(new.host, new.port) as client:
        assert client.get("before-failover") == "1"
        assert client.set("after-failover", "1")
    lab.restart("redis-1")
    eventually(
        lambda: next(n for n in lab.status().nodes if n.name == "redis-1").role
        == "replica",
        timeout_s=30,
    )


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_cluster_replaces_a_killed_primary(start_lab: StartLab) -> None:
    """A 3+3 cluster serves keys in every slot; kill -9 of a primary promotes its
    replica and cluster_state returns to ok."""
    lab = start_lab(Topology.CLUSTER)
    statuses = lab.status()
    assert all(n.detail.get("cluster_state") == "ok" for n in statuses.nodes)
    seeds = [ClusterNode(n.host, n.port) for n in lab.require_state().processes]
    cluster = RedisCluster(startup_nodes=seeds, decode_responses=True)
    try:
        for index in range(100):
            cluster.set(f"key-{index}", index)
    finally:
        cluster.close()

    victim = lab.node("redis-2")
    os.kill(victim.pid, signal.SIGKILL)
    replica = lab.node("redis-5")

    def promoted_and_ok() -> bool:
        try:
            with connect(replica.host, replica.port) as client:
                role = client.info("replication").get("role")
                return role == "master" and cluster_info(client)[
                    "cluster_state"] == "ok"
        except redis.RedisError:
            return False

    eventually(promoted_and_ok, timeout_s=30)
    health = {n.name: n for n in lab.status().nodes}
    assert health["redis-5"].role == "primary"
    assert health["redis-5"].detail["slots"] == "5461-10921"
    assert health["redis-2"].process == "dead"


def test_lab_context_manager_downs_on_exit(lab_settings: LabSettings) -> None:
    """`with Lab(...)` stops every node when the block ends, even on error."""
    with pytest.raises(RuntimeError), Lab(lab_settings) as lab:
        lab.up()
        pids = _pids(lab)
        raise RuntimeError("the test body failed")

    _assert_nothing_left(lab, pids)


def test_status_shows_a_paused_node_as_paused(start_lab: StartLab) -> None:
    """SIGSTOP makes the node paused and not answering; SIGCONT brings it back."""
    lab = start_lab()
    node = lab.node("redis-1")
    os.kill(node.pid, signal.SIGSTOP)
    try:
        # The kernel stops the process asynchronously: wait until it has.
        eventually(lambda: psutil.Process(node.pid).status() == psutil.STATUS_STOPPED,
                   timeout_s=5)
        health = lab.status().nodes[0]
        assert health.process == "paused"
        assert not health.answering
    finally:
        os.kill(node.pid, signal.SIGCONT)
    assert lab.status().healthy


def test_home_folder_is_used_for_every_node(start_lab: StartLab) -> None:
    """Each node keeps its config, data and log in its own folder under home."""
    lab = start_lab(Topology.STANDALONE, Persistence.ALWAYS)
    node = lab.node("redis-1")

    folder = Path(node.dir)
    assert folder.parent == lab.home
    assert (folder / "redis.conf").exists()
    assert Path(node.log).exists()


def _free_port() -> int:
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        return int(probe_socket.getsockname()[1])


def _http_server(port: int) -> list[str]:
    return [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]


def test_a_launched_service_is_supervised_like_a_node(start_lab: StartLab) -> None:
    """A service started through the lab (a real HTTP server here) is recorded,
    health-checked in status, restarted after kill -9, and stopped by down."""
    lab = start_lab()
    port = _free_port()
    name = lab.next_name("web")
    record = lab.launch(name, "web", _http_server(port), port=port,
                        extra={"health_url": f"http://127.0.0.1:{port}/"})

    assert name == "web-1"
    assert lab.next_name("web") == "web-2"
    health = {n.name: n for n in lab.status().nodes}
    assert health["web-1"].healthy

    os.kill(record.pid, signal.SIGKILL)
    eventually(lambda: not record.is_alive(), timeout_s=5)
    assert {n.name: n for n in lab.status().nodes}["web-1"].process == "dead"
    again = lab.restart("web-1")
    assert again.is_alive()

    result = lab.down()
    assert "web-1" in result.stopped
    assert processes_using(lab.home) == []


def test_a_service_that_cannot_start_is_forgotten(start_lab: StartLab) -> None:
    """A service that exits at once is reported with its log and not recorded."""
    lab = start_lab()
    port = _free_port()

    with pytest.raises(NodeStartFailed) as caught:
        lab.launch("web-1", "web", [sys.executable, "-c", "raise SystemExit('no')"],
                   port=port, extra={"health_url": f"http://127.0.0.1:{port}/"})

    assert "no" in caught.value.message
    assert [r.name for r in lab.require_state().processes] == ["redis-1"]
