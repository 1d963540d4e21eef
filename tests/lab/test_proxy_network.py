"""`lab up --network proxy`: every node on its own 127.0.0.x address, every path
between lab parts through a lab fault proxy, no privileges needed.

The labs are real: redis-server processes and `python -m dslab.chaos.proxy`
processes started through dslab's ``Lab`` and always torn down by the
``start_lab`` fixture. The plans are pure data and tested without starting
anything.
"""

from __future__ import annotations

import json

import psutil
import pytest
import redis

from dslab.errors import LabAlreadyRunning
from dslab.lab import topology
from dslab.lab.lab import Lab, is_lab_proxy
from dslab.lab.netns import Network
from dslab.lab.probe import connect
from dslab.lab.state import ProcessRecord
from dslab.lab.supervisor import processes_using
from dslab.redisconn import sync_client
from dslab.settings import LabSettings, Persistence, Topology
from tests.conftest import StartLab
from tests.helpers import run_dslab

# Generous bound on one client call through a proxy; only a hang reaches it.
CLIENT_TIMEOUT_S = 5.0


def _proxy_lab(start_lab: StartLab, topology_name: Topology) -> Lab:
    return start_lab(topology_name, Persistence.OFF, network=Network.PROXY)


def _client_proxy(lab: Lab, name: str) -> ProcessRecord:
    return next(proxy for proxy in lab.lab_proxies(name)
                if proxy.extra["path"] == topology.CLIENT_PATH)


def _local_ends(process: ProcessRecord) -> set[str]:
    """``ip:port`` of every TCP socket end the process holds right now."""
    return {f"{c.laddr.ip}:{c.laddr.port}"
            for c in psutil.Process(process.pid).net_connections("tcp")}


# -- plans (pure) -------------------------------------------------------------


def test_node_addresses_start_at_eleven_inside_loopback() -> None:
    """Nodes get 127.0.0.11, .12, ... in plan order, never 127.0.0.1."""
    addresses = topology.proxy_addresses(["redis-1", "redis-2", "sentinel-1"])

    assert addresses == {"redis-1": "127.0.0.11", "redis-2": "127.0.0.12",
                         "sentinel-1": "127.0.0.13"}


def test_cluster_nodes_get_a_bus_proxy_at_client_port_plus_10000() -> None:
    """Each Cluster node has a client proxy on its own port and a bus proxy on
    port + 10000 (Redis 6.2's MEET has no bus port), both on 127.0.0.1 and
    forwarding to the same ports on the node's own address."""
    nodes = topology.plan(Topology.CLUSTER, Persistence.OFF, 7000)
    addresses = topology.proxy_addresses([node.name for node in nodes])

    plans = topology.proxy_plans(nodes, addresses)

    assert [(p.name, p.port, p.upstream) for p in plans[:2]] == [
        ("proxy-redis-1", 7000, ("127.0.0.11", 7000)),
        ("proxy-redis-1-bus", 17000, ("127.0.0.11", 17000))]
    assert len(plans) == 2 * len(nodes)


def test_proxied_nodes_announce_their_proxies() -> None:
    """Replicas follow the primary's proxy and announce their own; Sentinels
    watch the primary through its proxy and announce theirs; Cluster nodes
    announce address, port and bus port of their proxies."""
    names = [n.name for n in topology.plan(Topology.REPLICATED, Persistence.OFF,
                                           7000)]
    replicated = {n.name: n.config for n in topology.plan(
        Topology.REPLICATED, Persistence.OFF, 7000,
        addresses=topology.proxy_addresses(names), proxied=True)}
    cluster = topology.plan(Topology.CLUSTER, Persistence.OFF, 7000,
                            addresses=topology.proxy_addresses(names),
                            proxied=True)

    assert "bind 127.0.0.12" in replicated["redis-2"]
    assert "replicaof 127.0.0.1 7000" in replicated["redis-2"]
    assert "replica-announce-port 7001" in replicated["redis-2"]
    assert "sentinel monitor dslab 127.0.0.1 7000 2" in replicated["sentinel-1"]
    assert "sentinel announce-port 7003" in replicated["sentinel-1"]
    assert {"cluster-announce-ip 127.0.0.1", "cluster-announce-port 7001",
            "cluster-announce-bus-port 17001"} <= set(cluster[1].config)


# -- live ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_standalone_client_goes_through_the_proxy(
    start_lab: StartLab, lab_settings: LabSettings, lab_env: dict[str, str]
) -> None:
    """A redis-py client at `lab.redis_target()` reaches the node through its
    proxy: the node's CLIENT LIST shows a connection whose far end is the
    proxy process, and `lab status` names the network mode."""
    lab = _proxy_lab(start_lab, Topology.STANDALONE)
    node, proxy = lab.node("redis-1"), _client_proxy(lab, "redis-1")

    client = sync_client(lab.redis_target())
    try:
        client.client_setname("through-proxy")
        assert client.set("greeting", "hello")
        with connect(node.host, node.port, CLIENT_TIMEOUT_S) as direct:
            clients = direct.client_list()
        proxy_ends = _local_ends(proxy)
    finally:
        client.close()
    status = run_dslab("lab", "status", "--json", env=lab_env)

    assert lab.redis_target().addresses == ((proxy.host, proxy.port),)
    assert node.host == "127.0.0.11" and proxy.host == "127.0.0.1"
    ours = next(c for c in clients if c["name"] == "through-proxy")
    assert ours["addr"] in proxy_ends
    assert ours["laddr"] == f"{node.host}:{node.port}"
    assert json.loads(status.stdout)["network"] == "proxy"


@pytest.mark.timeout(60)
def test_loopback_up_does_not_replace_a_running_proxy_lab(
    start_lab: StartLab, lab_settings: LabSettings
) -> None:
    """The reusable-state check knows the proxy mode: a loopback `up` of the
    same topology refuses, a proxy `up` reuses the running lab."""
    _proxy_lab(start_lab, Topology.STANDALONE)
    lab = Lab(lab_settings)

    with pytest.raises(LabAlreadyRunning, match="network proxy"):
        lab.up(Topology.STANDALONE, Persistence.OFF)
    again = lab.up(Topology.STANDALONE, Persistence.OFF, network=Network.PROXY)

    assert again.already_running


@pytest.mark.timeout(60)
def test_down_stops_nodes_and_proxies_and_leaves_no_process(
    start_lab: StartLab, lab_settings: LabSettings
) -> None:
    """`lab down` stops the node and its proxy; nothing started from the lab
    folder is left running."""
    lab = _proxy_lab(start_lab, Topology.STANDALONE)
    proxies = [r for r in lab.require_state().processes if is_lab_proxy(r)]

    result = lab.down()

    assert set(result.stopped) == {"redis-1", "proxy-redis-1"}
    assert result.stopped[-1] == "proxy-redis-1"
    assert not any(proxy.is_alive() for proxy in proxies)
    assert processes_using(lab_settings.home) == []


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_replicas_and_sentinels_reach_the_primary_through_proxies(
    start_lab: StartLab,
) -> None:
    """The primary lists its replicas at 127.0.0.1:<their proxy port>, and its
    replication and Sentinel links arrive through its proxy from the
    replicas' and Sentinels' own addresses."""
    lab = _proxy_lab(start_lab, Topology.REPLICATED)
    primary = lab.node("redis-1")
    proxy = _client_proxy(lab, "redis-1")

    with connect(primary.host, primary.port, CLIENT_TIMEOUT_S) as direct:
        info = direct.info("replication")
        clients = direct.client_list()

    listed = {f"{info[f'slave{i}']['ip']}:{info[f'slave{i}']['port']}"
              for i in range(int(info["connected_slaves"]))}
    assert listed == {f"127.0.0.1:{_client_proxy(lab, name).port}"
                      for name in ("redis-2", "redis-3")}
    proxy_ends = _local_ends(proxy)
    replication = [c for c in clients if "S" in c["flags"]]
    assert len(replication) == 2
    assert all(c["addr"] in proxy_ends for c in replication)
    assert lab.primary() == "redis-1"
    assert all(host == "127.0.0.1" for host, _ in lab.redis_target().addresses)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_cluster_serves_through_proxies(start_lab: StartLab) -> None:
    """A Cluster formed through proxies reaches cluster_state:ok, announces
    only proxy addresses, and a cluster client at `redis_target()` writes and
    reads keys of every shard."""
    lab = _proxy_lab(start_lab, Topology.CLUSTER)
    first = lab.node("redis-1")

    with connect(first.host, first.port, CLIENT_TIMEOUT_S) as direct:
        nodes = str(direct.execute_command("CLUSTER", "NODES"))
    client = sync_client(lab.redis_target())
    try:
        for index in range(30):
            client.set(f"key-{index}", index)
        values = [client.get(f"key-{index}") for index in range(30)]
    finally:
        client.close()

    announced = {line.split()[1] for line in nodes.splitlines()}
    assert announced == {f"127.0.0.1:{port}@{port + 10000}"
                         for port in (r.port for r in lab.require_state()
                                      .of_kind("redis"))}
    assert values == [str(index) for index in range(30)]
    assert isinstance(client, redis.RedisCluster)
