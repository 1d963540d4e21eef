"""`dslab chaos partition`: real nftables drops between lab namespaces.

Live tests need root and network namespaces and skip with the reason
otherwise; packets are real (UDP datagrams and TCP connections between the
host and namespaces the lab itself created). The rule planning is pure and
tested everywhere.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import redis

from dslab.chaos import partition as partitions
from dslab.chaos.heal import heal
from dslab.chaos.journal import Journal
from dslab.errors import LabNotRunning, UsageError
from dslab.lab import netns, probe
from dslab.lab.lab import Lab
from dslab.lab.netns import LabNetwork, NodeLink
from dslab.settings import LabSettings, Persistence, Topology
from tests.chaos.conftest import assert_healed_on_time
from tests.conftest import StartLab
from tests.helpers import eventually, run_dslab
from tests.lab.test_netns import NetnsLab, needs_netns, netns_lab, traces_of

__all__ = ["netns_lab"]  # the fixture, shared with the lab's netns tests

# A datagram that has not arrived by then was dropped: on a bridge it takes
# microseconds.
RECEIVE_WAIT_S = 1.5
SEND_COUNT = 20
SUBPROCESS_TIMEOUT_S = 20.0
# Sentinel needs 1 s to call the primary down, then an election; a loaded
# two-core machine may need several rounds.
FAILOVER_WAIT_S = 30.0
# A returning old primary is demoted after Sentinel sees it report itself
# primary for a while (about 8 s), then resyncs.
REJOIN_WAIT_S = 40.0

_RECEIVER = """
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((sys.argv[1], 0))
print(sock.getsockname()[1], flush=True)
sock.settimeout(float(sys.argv[2]))
try:
    sock.recvfrom(64)
    print("received", flush=True)
except TimeoutError:
    print("nothing", flush=True)
"""
_SENDER = """
import socket, sys, time
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(int(sys.argv[3])):
    try:
        sock.sendto(b"hello", (sys.argv[1], int(sys.argv[2])))
    except OSError:
        pass  # a drop on the way out may say EPERM; it is still a drop
    time.sleep(0.05)
"""
_CONNECTOR = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.0).close()
    print("connected")
except OSError as error:
    print("failed", error)
"""


def _argv(namespace: str | None, script: str, *args: str) -> list[str]:
    prefix = netns.exec_prefix(namespace) if namespace else []
    return [*prefix, sys.executable, "-c", script, *args]


def _where(network: LabNetwork, name: str) -> tuple[str | None, str]:
    if name == partitions.HOST:
        return None, network.gateway
    link = network.node(name)
    assert link is not None
    return link.namespace, link.address


def datagram_arrives(network: LabNetwork, sender: str, receiver: str) -> bool:
    """Does a UDP datagram from ``sender`` reach ``receiver`` (names or host)?"""
    sender_ns, _ = _where(network, sender)
    receiver_ns, address = _where(network, receiver)
    listening = subprocess.Popen(
        _argv(receiver_ns, _RECEIVER, address, str(RECEIVE_WAIT_S)),
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert listening.stdout is not None
        port = listening.stdout.readline().strip()
        subprocess.run(_argv(sender_ns, _SENDER, address, port, str(SEND_COUNT)),
                       timeout=SUBPROCESS_TIMEOUT_S, check=True)
        output, _ = listening.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    finally:
        if listening.poll() is None:
            listening.kill()
            listening.wait()
    return "received" in output


def connects(network: LabNetwork, client: str, server: str, port: int) -> bool:
    """Does a TCP connection from ``client``'s namespace to ``server`` open?"""
    client_ns, _ = _where(network, client)
    _, address = _where(network, server)
    done = subprocess.run(_argv(client_ns, _CONNECTOR, address, str(port)),
                          capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT_S, check=True)
    return done.stdout.startswith("connected")


def host_pings(lab: Lab, name: str) -> bool:
    return probe.answers(lab.node(name))


def lab_env(settings: LabSettings) -> dict[str, str]:
    return {**os.environ, "DSLAB_HOME": str(settings.home), "COLUMNS": "200",
            "NO_COLOR": "1"}


def _network() -> LabNetwork:
    names = ["redis-1", "redis-2", "redis-3", "sentinel-1"]
    return LabNetwork(
        tag="abc123", subnet="10.213.0.0/24", bridge="dsbr-abc123",
        gateway="10.213.0.1",
        nodes=tuple(NodeLink(name, f"dslab-abc123-{name}", f"10.213.0.{11 + i}",
                             f"dsv-abc123-{i + 1}")
                    for i, name in enumerate(names)),
    )


# -- planning (pure) --------------------------------------------------------


def test_group_split_drops_both_ways_on_arrival() -> None:
    """`redis-1,redis-2 | redis-3`: each side drops the other's addresses on
    input, and a node on neither side keeps every link."""
    rules, cuts = partitions.plan_rules(_network(), ["redis-1", "redis-2"],
                                        ["redis-3"])

    by_namespace = {rule.namespace: rule for rule in rules}
    assert set(by_namespace) == {"dslab-abc123-redis-1", "dslab-abc123-redis-2",
                                 "dslab-abc123-redis-3"}
    assert by_namespace["dslab-abc123-redis-3"].drop_from == ("10.213.0.11",
                                                             "10.213.0.12")
    assert by_namespace["dslab-abc123-redis-1"].drop_from == ("10.213.0.13",)
    assert all(rule.drop_to == () for rule in rules)
    assert len(cuts) == 4


def test_one_way_drops_only_at_the_second_side() -> None:
    """`--one-way A B`: only B drops A's packets; A drops nothing."""
    rules, cuts = partitions.plan_rules(_network(), ["redis-1"], ["redis-2"],
                                        one_way=True)

    assert [(r.namespace, r.drop_from, r.drop_to) for r in rules] == [
        ("dslab-abc123-redis-2", ("10.213.0.11",), ())]
    assert cuts == (("redis-1", "redis-2"),)


def test_host_side_is_cut_on_the_nodes_way_out() -> None:
    """Cutting a node from `host` drops the gateway on the node's output and
    input: the host's own ruleset is never touched."""
    rules, _ = partitions.plan_rules(_network(), ["redis-1"], ["host"])

    assert [(r.namespace, r.drop_from, r.drop_to) for r in rules] == [
        ("dslab-abc123-redis-1", ("10.213.0.1",), ("10.213.0.1",))]
    text = rules[0].ruleset("dslab_partition_f7")
    assert text.startswith("table inet dslab_partition_f7 {")
    assert "ip saddr { 10.213.0.1 } drop" in text
    assert "ip daddr { 10.213.0.1 } drop" in text


def test_isolate_means_everyone_else_and_the_host() -> None:
    """`--isolate redis-2` puts every other node and the host on the far side."""
    assert partitions.everyone_but(_network(), ["redis-2"]) == [
        "redis-1", "redis-3", "sentinel-1", "host"]


def test_a_node_on_both_sides_is_refused() -> None:
    """A node cannot be cut from itself: a usage error (exit 2)."""
    with pytest.raises(UsageError) as caught:
        partitions.plan_rules(_network(), ["redis-1", "redis-2"], ["redis-2"])

    assert caught.value.exit_code == 2


def test_partition_without_netns_exits_3_with_the_hint(
    start_lab: StartLab, lab_settings: LabSettings
) -> None:
    """On a loopback lab, `chaos partition` pretends nothing: exit 3, the
    hint, and no fault in the journal."""
    start_lab(Topology.STANDALONE, Persistence.OFF)

    done = run_dslab("chaos", "partition", "redis-1", "host",
                     env=lab_env(lab_settings))

    assert done.returncode == 3
    assert "partitions need `lab up --network netns` (root); " in done.stderr
    assert Journal(lab_settings.home).faults() == []


# -- live ---------------------------------------------------------------------


@needs_netns
def test_one_way_cuts_one_direction_and_heal_restores_it(
    netns_lab: NetnsLab, lab_settings: LabSettings
) -> None:
    """`partition host redis-1 --one-way` drops the host's packets to redis-1
    but not redis-1's to the host; `chaos heal` restores both."""
    lab = netns_lab()
    network = lab.network()
    assert network is not None
    assert datagram_arrives(network, "host", "redis-1")

    done = run_dslab("chaos", "partition", "host", "redis-1", "--one-way",
                     "--json", env=lab_env(lab_settings))

    assert done.returncode == 0, done.stderr
    fault = json.loads(done.stdout)["faults"][0]
    assert fault["undo"]["action"] == "nft-delete-table"
    assert not datagram_arrives(network, "host", "redis-1")
    assert datagram_arrives(network, "redis-1", "host")
    assert not host_pings(lab, "redis-1")

    healed = run_dslab("chaos", "heal", env=lab_env(lab_settings))

    assert healed.returncode == 0, healed.stderr
    assert datagram_arrives(network, "host", "redis-1")
    assert host_pings(lab, "redis-1")


@needs_netns
def test_partitions_compose_and_heal_is_idempotent(netns_lab: NetnsLab) -> None:
    """Two partitions are two tables; healing one leaves the other, and a
    second heal of everything finds nothing to do."""
    lab = netns_lab()
    network = lab.network()
    assert network is not None
    namespace = network.nodes[0].namespace
    first = partitions.partition(lab, ["host"], ["redis-1"], one_way=True)
    second = partitions.partition(lab, ["redis-1"], ["host"], one_way=True)
    assert sorted(netns.list_tables(namespace)) == [
        f"inet {first.table}", f"inet {second.table}"]
    assert not datagram_arrives(network, "redis-1", "host")

    heal(lab.home, first.fault.id)

    assert netns.list_tables(namespace) == [f"inet {second.table}"]
    assert not datagram_arrives(network, "redis-1", "host")
    assert [r.fault.id for r in heal(lab.home)] == [second.fault.id]
    assert netns.list_tables(namespace) == []
    assert heal(lab.home) == []


@needs_netns
def test_killed_mid_partition_then_lab_down_leaves_nothing(
    netns_lab: NetnsLab, lab_settings: LabSettings
) -> None:
    """A partition with a --for healer, the healer killed -9 and the command
    long gone: `lab down` from a fresh process removes rules, namespaces,
    veths and bridge."""
    lab = netns_lab()
    tag = netns.lab_tag(lab_settings.home)
    env = lab_env(lab_settings)
    applied = run_dslab("chaos", "partition", "--isolate", "redis-1", "--for",
                        "1h", env=env)
    assert applied.returncode == 0, applied.stderr
    status = json.loads(run_dslab("chaos", "status", "--json", env=env).stdout)
    healer = status["faults"][0]["healer_pid"]
    os.kill(healer, signal.SIGKILL)
    assert not host_pings(lab, "redis-1")

    down = run_dslab("lab", "down", "--json", env=env)

    assert down.returncode == 0, down.stderr
    assert len(json.loads(down.stdout)["healed"]) == 1
    assert traces_of(tag) == []
    assert Journal(lab_settings.home).active_faults() == []


@needs_netns
@pytest.mark.slow
def test_isolated_primary_is_replaced_and_rejoins_as_a_replica(
    netns_lab: NetnsLab, lab_settings: LabSettings
) -> None:
    """`--isolate redis-1` makes the Sentinels promote a replica; after
    `chaos heal` the old primary follows the new one. A group split then cuts
    exactly the links between its sides."""
    lab = netns_lab(Topology.REPLICATED)
    network = lab.network()
    assert network is not None
    env = lab_env(lab_settings)

    applied = run_dslab("chaos", "partition", "--isolate", "redis-1", env=env)
    assert applied.returncode == 0, applied.stderr
    assert not host_pings(lab, "redis-1")

    def someone_else_is_primary() -> bool:
        try:
            return lab.primary() in ("redis-2", "redis-3")
        except LabNotRunning:  # no primary at all, mid-failover
            return False

    eventually(someone_else_is_primary, timeout_s=FAILOVER_WAIT_S, poll_s=0.2)
    new_primary = lab.primary()
    assert run_dslab("chaos", "heal", env=env).returncode == 0

    def follows_new_primary() -> bool:
        record = lab.node("redis-1")
        try:
            with probe.connect(record.host, record.port) as client:
                info = client.info("replication")
        except redis.RedisError:
            return False
        return (info.get("role") == "slave"
                and info.get("master_host") == lab.node(new_primary).host
                and info.get("master_link_status") == "up")

    eventually(follows_new_primary, timeout_s=REJOIN_WAIT_S, poll_s=0.2)

    port = lab.node("redis-3").port
    assert connects(network, "redis-2", "redis-3", port)
    split = partitions.partition(lab, ["redis-1", "redis-2"], ["redis-3"])
    assert not connects(network, "redis-2", "redis-3", port)
    assert not connects(network, "redis-3", "redis-1", lab.node("redis-1").port)
    assert connects(network, "sentinel-1", "redis-3", port)
    assert host_pings(lab, "redis-3")
    heal(lab.home, split.fault.id)
    assert connects(network, "redis-2", "redis-3", port)


@needs_netns
def test_bad_partition_arguments_exit_2_and_apply_nothing(
    netns_lab: NetnsLab, lab_settings: LabSettings
) -> None:
    """One side only, --isolate with sides, or a node on both sides is a
    usage error (exit 2) that loads no rule."""
    lab = netns_lab()
    env = lab_env(lab_settings)
    namespace = lab.node("redis-1").extra["namespace"]

    for words in (["redis-1"], ["--isolate", "redis-1", "host"],
                  ["redis-1", "primary"], ["redis-1", "nosuchnode"]):
        done = run_dslab("chaos", "partition", *words, env=env)
        assert done.returncode == 2, (words, done.stderr)

    assert netns.list_tables(namespace) == []
    assert Journal(lab_settings.home).faults() == []


@needs_netns
def test_a_partition_for_a_while_heals_itself(netns_lab: NetnsLab) -> None:
    """`--for 1s`: the detached healer deletes the rules on time, without any
    other command."""
    lab = netns_lab()
    namespace = lab.node("redis-1").extra["namespace"]

    outcome = partitions.partition(lab, ["host"], ["redis-1"], duration_s=1.0)

    assert not host_pings(lab, "redis-1")
    eventually(lambda: netns.list_tables(namespace) == [], timeout_s=15.0,
               poll_s=0.2)
    assert outcome.fault.id in Journal(lab.home).healed_ids()
    assert_healed_on_time(lab.home, outcome.fault, 1.0)
    assert host_pings(lab, "redis-1")


@needs_netns
def test_heal_after_the_namespace_is_gone_retires_the_fault(
    netns_lab: NetnsLab
) -> None:
    """A partition whose namespace was deleted by hand heals as "nothing left"
    instead of failing, so heal and `lab down` never get stuck on it."""
    lab = netns_lab()
    namespace = lab.node("redis-1").extra["namespace"]
    partitions.partition(lab, ["host"], ["redis-1"])
    subprocess.run(["ip", "netns", "delete", namespace], timeout=10, check=True)

    results = heal(lab.home)

    assert [r.ok for r in results] == [True]
    assert results[0].outcome.startswith("no rules were left")
    assert Journal(lab.home).active_faults() == []
