"""The tc netem wrapper: exact commands everywhere, the real thing where possible."""

from __future__ import annotations

import gzip
import itertools
import os
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dslab.chaos import delay as delays
from dslab.chaos import netem
from dslab.chaos.heal import heal
from dslab.chaos.netem import Match, NetemFault
from dslab.errors import EXIT_ENVIRONMENT, EnvironmentProblem, UsageError
from dslab.lab import netns
from dslab.lab.state import ProcessRecord
from tests.helpers import run_dslab
from tests.lab.test_netns import NetnsLab, needs_netns, netns_lab

__all__ = ["netns_lab"]  # the fixture, shared with the lab's netns tests

IS_ROOT = os.geteuid() == 0
KERNEL_CONFIG = Path("/proc/config.gz")
_namespace_numbers = itertools.count()


def _kernel_lacks_netem() -> bool:
    """True only when the running kernel's own config says netem is not built."""
    if not KERNEL_CONFIG.exists():
        return False
    with gzip.open(KERNEL_CONFIG, "rt") as config:
        return "# CONFIG_NET_SCH_NETEM is not set" in config.read()


def _namespaces() -> str:
    return subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=False
    ).stdout


@pytest.fixture
def namespace() -> Iterator[str]:
    """A network namespace of this test's own, with lo up; always deleted."""
    if not IS_ROOT:
        pytest.skip("creating a network namespace needs root")
    name = f"dslab-test-{os.getpid()}-{next(_namespace_numbers)}"
    added = subprocess.run(
        ["ip", "netns", "add", name], capture_output=True, text=True, check=False
    )
    if added.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {added.stderr.strip()}")
    try:
        subprocess.run(
            ["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
            check=True,
            capture_output=True,
        )
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


# -- command construction ------------------------------------------------------


def _argv(*lines: str) -> list[list[str]]:
    """Expected commands written as shell lines, compared as exact argv lists."""
    return [shlex.split(line) for line in lines]


def test_apply_commands_scope_delay_to_a_destination_port() -> None:
    """A port target gives prio root, netem on band 4, one dport u32 filter."""
    fault = NetemFault(port=7000, delay_ms=150, jitter_ms=20)

    assert netem.apply_commands(fault) == _argv(
        "tc qdisc add dev lo root handle d5: prio bands 4",
        "tc qdisc add dev lo parent d5:4 handle d50: netem delay 150ms 20ms",
        "tc filter add dev lo parent d5: protocol ip prio 1 u32"
        " match ip dport 7000 0xffff flowid d5:4",
    )


def test_apply_commands_in_namespace_with_address_both_ways_loss_and_rate() -> None:
    """Namespace prefix, loss and rate, and one filter per end for match=both."""
    fault = NetemFault(
        device="veth1",
        namespace="lab",
        address="127.0.0.2",
        port=6379,
        match=Match.BOTH,
        loss_pct=1.5,
        rate="1mbit",
    )

    assert netem.apply_commands(fault) == _argv(
        "ip netns exec lab tc qdisc add dev veth1 root handle d5: prio bands 4",
        "ip netns exec lab tc qdisc add dev veth1 parent d5:4 handle d50:"
        " netem loss 1.5% rate 1mbit",
        "ip netns exec lab tc filter add dev veth1 parent d5: protocol ip prio 1"
        " u32 match ip dst 127.0.0.2/32 match ip dport 6379 0xffff flowid d5:4",
        "ip netns exec lab tc filter add dev veth1 parent d5: protocol ip prio 2"
        " u32 match ip src 127.0.0.2/32 match ip sport 6379 0xffff flowid d5:4",
    )


def test_src_match_filters_on_source_address_only() -> None:
    """match=src with an address network filters on the packet's source."""
    fault = NetemFault(address="10.0.0.0/24", match=Match.SRC, delay_ms=5)

    filters = netem.apply_commands(fault)[2:]

    assert filters == _argv(
        "tc filter add dev lo parent d5: protocol ip prio 1 u32"
        " match ip src 10.0.0.0/24 flowid d5:4"
    )


def test_undo_commands_remove_only_dslabs_root_handle() -> None:
    """Undo deletes the root qdisc by dslab's handle, inside the namespace."""
    assert netem.undo_commands("eth0", "lab") == _argv(
        "ip netns exec lab tc qdisc del dev eth0 root handle d5:"
    )


def test_format_commands_gives_one_shell_quoted_line_each() -> None:
    """--dry-run output is pasteable shell: one line per command, quoted."""
    text = netem.format_commands([["tc", "qdisc", "show"], ["echo", "a b", "50%"]])

    assert text == "tc qdisc show\necho 'a b' 50%"


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        ({"delay_ms": 10}, "target port or address"),
        ({"port": 70000, "delay_ms": 10}, "outside 1-65535"),
        ({"port": 7000}, "delay, a loss or a rate"),
        ({"port": 7000, "jitter_ms": 5}, "jitter needs a delay"),
        ({"port": 7000, "loss_pct": 150}, "outside 0-100"),
        ({"port": 7000, "rate": "fast"}, "tc's units"),
        ({"address": "::1", "delay_ms": 10}, "IPv6"),
        ({"address": "not-an-ip", "delay_ms": 10}, "not an IP"),
        ({"device": "lo; reboot", "port": 1, "delay_ms": 10}, "device name"),
        ({"port": 7000, "delay_ms": 10, "match": "sideways"}, "dst, src or both"),
    ],
)
def test_bad_faults_are_refused_before_any_command(
    options: dict[str, object], complaint: str
) -> None:
    """Every invalid fault is a UsageError naming the problem."""
    with pytest.raises(UsageError, match=complaint):
        NetemFault(**options)  # type: ignore[arg-type]


# -- the probe and the real thing ----------------------------------------------


@pytest.mark.skipif(not IS_ROOT, reason="the netem probe needs root")
def test_probe_reports_missing_netem_and_leaves_no_namespace() -> None:
    """The probe agrees with the kernel config and deletes its namespace."""
    available, reason = netem.netem_available()

    assert f"dslab-probe-{os.getpid()}" not in _namespaces()
    if _kernel_lacks_netem():
        assert available is False
        assert "qdisc kind is unknown" in reason
        assert "no sch_netem" in reason
    else:
        assert available or reason


@pytest.mark.skipif(IS_ROOT, reason="checks the answer for users other than root")
def test_probe_without_root_says_root_is_needed() -> None:
    """As a normal user the probe answers unavailable, naming root."""
    available, reason = netem.netem_available()

    assert available is False
    assert "root" in reason


def test_apply_without_netem_raises_environment_problem(namespace: str) -> None:
    """Where netem is missing apply refuses with exit 3 and points to the proxy."""
    available, _ = netem.netem_available()
    if available:
        pytest.skip("this kernel has netem; the refusal cannot happen here")
    fault = NetemFault(namespace=namespace, port=7000, delay_ms=100)

    with pytest.raises(EnvironmentProblem) as raised:
        netem.apply(fault)

    assert raised.value.exit_code == EXIT_ENVIRONMENT
    assert "use --backend proxy" in raised.value.message
    assert "d5:" not in _qdiscs(namespace)


def test_undo_is_idempotent_when_nothing_was_applied(namespace: str) -> None:
    """Undo on a clean device reports nothing removed, twice, without error."""
    assert netem.undo("lo", namespace) is False
    assert netem.undo("lo", namespace) is False


def _qdiscs(namespace: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", namespace, "tc", "qdisc", "show", "dev", "lo"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_apply_and_undo_for_real_in_a_namespace(namespace: str) -> None:
    """Where netem exists: apply installs prio+netem, undo removes it, twice."""
    available, reason = netem.netem_available()
    if not available:
        pytest.skip(f"netem is not available here: {reason}")
    fault = NetemFault(namespace=namespace, port=7000, delay_ms=50, loss_pct=1)

    netem.apply(fault)
    applied = _qdiscs(namespace)
    netem.apply(fault)  # a second apply replaces the first
    reapplied = _qdiscs(namespace)
    removed = netem.undo("lo", namespace)
    removed_again = netem.undo("lo", namespace)

    assert "prio d5: root" in applied
    assert "netem d50:" in applied
    assert "delay 50ms" in applied
    assert reapplied.count("netem d50:") == 1
    assert (removed, removed_again) == (True, False)
    assert "d5:" not in _qdiscs(namespace)


# -- a node in its own namespace (`lab up --network netns`) ---------------------


def _record(**extra: object) -> ProcessRecord:
    return ProcessRecord(name="redis-1", kind="redis", role="primary", pid=1,
                         started_at=0.0, host="10.213.0.11", port=7000, dir="/x",
                         log="/x/log", argv=[], extra=dict(extra))


def test_a_node_in_a_namespace_is_slowed_on_its_own_link() -> None:
    """For a netns node the fault sits on eth0 inside its namespace and
    matches what it sends from its port; a loopback node keeps lo + dport."""
    spec = delays.DelaySpec(ms=100, jitter_ms=10)

    in_namespace = delays.netem_fault(_record(namespace="dslab-ab12cd-redis-1"),
                                      spec)
    on_loopback = delays.netem_fault(_record(), spec)

    assert (in_namespace.device, in_namespace.namespace) == (
        netns.NODE_DEVICE, "dslab-ab12cd-redis-1")
    assert in_namespace.match is Match.SRC and in_namespace.port == 7000
    assert (on_loopback.device, on_loopback.namespace) == ("lo", None)
    assert on_loopback.match is Match.DST


@needs_netns
def test_dry_run_on_a_netns_lab_prints_commands_inside_the_namespace(
    netns_lab: NetnsLab, lab_env: dict[str, str]
) -> None:
    """`chaos delay --dry-run` on a netns lab prints tc commands run with
    `ip netns exec <node's namespace>` on its eth0, and undo likewise."""
    lab = netns_lab()
    record = lab.node("redis-1")
    namespace = str(record.extra["namespace"])

    done = run_dslab("chaos", "delay", "redis-1", "--ms", "100", "--jitter", "10",
                     "--dry-run", env=lab_env, check=True)

    prefix = f"ip netns exec {namespace} tc"
    assert f"{prefix} qdisc add dev eth0 root handle d5: prio bands 4" in done.stdout
    assert f"{prefix} qdisc add dev eth0 parent d5:4 handle d50: netem delay " \
        "100ms 10ms" in done.stdout
    assert f"match ip sport {record.port} 0xffff" in done.stdout
    assert f"{prefix} qdisc del dev eth0 root handle d5:" in done.stdout
    assert " dev lo " not in done.stdout


@needs_netns
def test_delay_netem_on_a_netns_lab_for_real(netns_lab: NetnsLab) -> None:
    """Where netem exists: the delay lands on the node's eth0 in its
    namespace (not on the host's lo), and heal removes it."""
    available, reason = netem.netem_available()
    if not available:
        pytest.skip(f"netem is not available here: {reason}")
    lab = netns_lab()
    record = lab.node("redis-1")
    namespace = str(record.extra["namespace"])

    outcome = delays.delay_netem(lab, record, delays.DelaySpec(ms=40))
    applied = _device_qdiscs(namespace, netns.NODE_DEVICE)
    healed = heal(lab.home)

    assert outcome.fault.undo == {"action": "netem-undo", "device": "eth0",
                                  "namespace": namespace}
    assert "netem d50:" in applied and "delay 40ms" in applied
    assert [result.ok for result in healed] == [True]
    assert "d5:" not in _device_qdiscs(namespace, netns.NODE_DEVICE)


def _device_qdiscs(namespace: str, device: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", namespace, "tc", "qdisc", "show", "dev", device],
        capture_output=True, text=True, check=True,
    ).stdout
