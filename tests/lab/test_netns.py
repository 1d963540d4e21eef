"""`lab up --network netns`: every node in its own namespace on a private bridge.

These tests need root and a kernel with network namespaces; they skip with
the reason otherwise. Every namespace, veth and bridge they make is removed
in a ``finally``, also when a test fails, and checked gone where that is the
behaviour under test.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from dslab.lab import netns, probe
from dslab.lab.lab import Lab
from dslab.lab.netns import Network
from dslab.settings import LabSettings, Persistence, Topology
from tests.conftest import StartLab
from tests.helpers import run_dslab

# `ip` answers in milliseconds; this bounds a wedged one.
IP_TIMEOUT_S = 10.0
NOBODY_UID = 65534

NetnsLab = Callable[..., Lab]


def _netns_unavailable() -> str | None:
    """Why this machine cannot run netns labs, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth, nftables)"
    probe_name = f"dslab-probe-{os.getpid()}"
    added = subprocess.run(["ip", "netns", "add", probe_name], capture_output=True,
                           text=True, timeout=IP_TIMEOUT_S, check=False)
    if added.returncode != 0:
        return f"`ip netns add` failed: {added.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe_name], capture_output=True,
                   timeout=IP_TIMEOUT_S, check=False)
    return None


NETNS_SKIP_REASON = _netns_unavailable()
needs_netns = pytest.mark.skipif(NETNS_SKIP_REASON is not None,
                                 reason=str(NETNS_SKIP_REASON))


@pytest.fixture
def netns_lab(start_lab: StartLab, lab_settings: LabSettings) -> Iterator[NetnsLab]:
    """Factory: a lab in netns mode; its network is torn down whatever happens."""
    labs: list[Lab] = []

    def start(topology: Topology = Topology.STANDALONE, **options: object) -> Lab:
        lab = start_lab(topology, Persistence.OFF, network=Network.NETNS, **options)
        labs.append(lab)
        return lab

    try:
        yield start
    finally:
        for lab in labs:
            lab.down(force=True)
        # Belt and braces: whatever down could not do, the tag still finds.
        netns.teardown(netns.lab_tag(lab_settings.home))


def ip_lines(*args: str) -> list[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True,
                          timeout=IP_TIMEOUT_S, check=True)
    return done.stdout.splitlines()


def traces_of(tag: str) -> list[str]:
    """What `ip netns list`, `ip link` and the host's nft say of lab ``tag``."""
    found = [line for line in ip_lines("netns", "list") if tag in line]
    found += [line for line in ip_lines("-br", "link") if tag in line]
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True,
                            text=True, timeout=IP_TIMEOUT_S, check=True)
    found += [line for line in tables.stdout.splitlines() if "dslab" in line]
    return found


def free_subnet_of(*routes: str) -> str:
    return str(netns.free_subnet([ipaddress.IPv4Network(r) for r in routes]))


def test_free_subnet_skips_routed_ones() -> None:
    """The lab LAN is the first /24 of 10.213/16 that no route covers."""
    assert free_subnet_of() == "10.213.0.0/24"
    assert free_subnet_of("10.213.0.0/24", "10.213.1.7/32") == "10.213.2.0/24"
    assert free_subnet_of("192.0.2.0/24", "127.0.0.0/8") == "10.213.0.0/24"


def test_free_subnet_refuses_when_the_pool_is_routed() -> None:
    """A route covering all of 10.213/16 leaves no LAN: exit 3, not a clash."""
    with pytest.raises(netns.NetworkUnavailable) as caught:
        netns.free_subnet([ipaddress.IPv4Network("10.0.0.0/8")])

    assert caught.value.exit_code == 3


def test_loopback_lab_is_unchanged(start_lab: StartLab, lab_settings: LabSettings
                                   ) -> None:
    """The default lab records no network and runs redis-server directly."""
    lab = start_lab(Topology.STANDALONE, Persistence.OFF)

    record = lab.node("redis-1")
    saved = json.loads(lab_settings.state_file.read_text(encoding="utf-8"))
    assert "network" not in saved
    assert lab.network() is None
    assert record.host == "127.0.0.1"
    assert record.argv[0] != "ip"


def test_non_root_is_refused_with_exit_code_3() -> None:
    """Without root, netns mode says so (exit code 3) before touching anything."""
    if os.geteuid() != 0:
        reason = pytest.raises(netns.NetworkUnavailable)
        with reason:
            netns.require_support()
        return
    # As root: drop to nobody in a child, after the import, and ask there.
    script = (
        "import os, sys\n"
        "from dslab.lab import netns\n"
        f"os.setgid({NOBODY_UID}); os.setuid({NOBODY_UID})\n"
        "try:\n"
        "    netns.require_support()\n"
        "except netns.NetworkUnavailable as error:\n"
        "    print(error.exit_code, error.message); sys.exit(0)\n"
        "sys.exit(1)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True,
                          text=True, timeout=30, check=False)

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("3 --network netns needs root")


@needs_netns
def test_standalone_node_answers_at_its_namespace_address(netns_lab: NetnsLab
                                                          ) -> None:
    """The node lives in its own namespace and answers PING from the host at
    its address there, and not on the host's loopback."""
    lab = netns_lab()

    record = lab.node("redis-1")
    network = lab.network()
    assert network is not None
    link = network.node("redis-1")
    assert link is not None and record.host == link.address
    assert ipaddress.IPv4Address(record.host) in ipaddress.IPv4Network(
        network.subnet)
    identified = ip_lines("netns", "identify", str(record.pid))
    assert identified == [link.namespace]
    with probe.connect(record.host, record.port) as client:
        assert client.ping()
    with pytest.raises(redis.ConnectionError), \
            probe.connect("127.0.0.1", record.port) as client:
        client.ping()
    assert str(lab.redis_target()) == f"redis://{record.host}:{record.port}"


@needs_netns
def test_lab_down_leaves_no_namespace_veth_bridge_or_table(
    netns_lab: NetnsLab, lab_settings: LabSettings
) -> None:
    """`lab down` stops the node, then deletes namespace, veth and bridge."""
    lab = netns_lab()
    tag = netns.lab_tag(lab_settings.home)
    assert len(traces_of(tag)) >= 3  # namespace, veth, bridge

    result = lab.down()

    assert result.stopped == ["redis-1"]
    # The veth goes with its namespace; the bridge is deleted by name.
    assert {f"dslab-{tag}-redis-1", f"dsbr-{tag}"} <= set(result.network_removed)
    assert traces_of(tag) == []


@needs_netns
def test_down_force_finds_the_network_without_state(
    netns_lab: NetnsLab, lab_settings: LabSettings
) -> None:
    """With state.json lost, `lab down --force` still finds the node by its
    folder and the network by the lab's tag, and removes both."""
    lab = netns_lab()
    pid = lab.node("redis-1").pid
    tag = netns.lab_tag(lab_settings.home)
    lab_settings.state_file.unlink()

    done = run_dslab("lab", "down", "--force", "--json",
                     env={**os.environ, "DSLAB_HOME": str(lab_settings.home)})

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["strays"] == [pid]
    assert traces_of(tag) == []


@needs_netns
def test_netns_lab_refuses_to_replace_a_loopback_lab(
    start_lab: StartLab, lab_settings: LabSettings
) -> None:
    """`lab up --network netns` over a running loopback lab exits 3 and
    starts no namespace."""
    start_lab(Topology.STANDALONE, Persistence.OFF)

    done = run_dslab("lab", "up", "--network", "netns",
                     env={**os.environ, "DSLAB_HOME": str(lab_settings.home)})

    assert done.returncode == 3
    assert "network loopback" in done.stderr
    assert traces_of(netns.lab_tag(lab_settings.home)) == []


@needs_netns
@pytest.mark.slow
def test_cluster_comes_up_on_namespace_addresses(netns_lab: NetnsLab) -> None:
    """A Cluster in netns mode reaches cluster_state:ok and every node knows
    the others by their namespace addresses."""
    lab = netns_lab(Topology.CLUSTER)

    records = lab.require_state().of_kind("redis")
    addresses = {record.address for record in records}
    assert not any(address.startswith("127.") for address in addresses)
    for record in records:
        with probe.connect(record.host, record.port, timeout_s=2.0) as client:
            assert probe.cluster_info(client)["cluster_state"] == "ok"
            known = {node.address for node in probe.cluster_nodes(client)}
        assert known == addresses


def test_node_namespaces_are_named_after_the_lab(tmp_path: Path) -> None:
    """Two lab folders get different tags; one folder always the same one,
    and every name fits Linux's 15-character device limit."""
    first = netns.lab_tag(tmp_path / "a")
    assert first == netns.lab_tag(tmp_path / "a")
    assert first != netns.lab_tag(tmp_path / "b")
    assert len(f"{netns.VETH_PREFIX}{first}-99") <= 15
    assert len(f"{netns.BRIDGE_PREFIX}{first}") <= 15
