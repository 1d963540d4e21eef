"""Delay, loss and rate limits in the kernel with ``tc netem``, for one target only.

A netem fault is scoped to one target's traffic: a ``prio`` root qdisc gets an
extra band that no traffic uses by default, netem sits on that band, and u32
filters send only the packets of the target (a port, an address, or both) into
it. Everything else on the device keeps its normal path.

Guarantees:

- the command builders are pure: the same fault always gives the same argv
  lists, which ``--dry-run`` prints with ``format_commands``;
- ``apply`` checks first that this machine can run netem at all and refuses
  with exit code 3 and a pointer to the fault proxy when it cannot;
- ``undo`` is idempotent and removes only a root qdisc that dslab installed
  (recognised by its handle), never a qdisc someone else put on the device.

Attention: netem needs root (CAP_NET_ADMIN) and a kernel built with
``sch_netem`` and ``sch_prio``; many containers and small VMs have neither.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from dslab.errors import EnvironmentProblem, UsageError

log = logging.getLogger(__name__)

# The root qdisc's handle (hex major); distinctive so undo can tell the qdisc
# dslab installed from one that was already there.
ROOT_HANDLE = "d5:"
# prio's default priomap uses bands 1-3; band 4 therefore carries only the
# packets our filters put there.
BANDS = 4
FAULT_BAND = f"{ROOT_HANDLE}{BANDS}"
NETEM_HANDLE = "d50:"
# tc and ip answer in milliseconds; longer means the machine is wedged.
COMMAND_TIMEOUT_S = 10.0
# What tc prints when the kernel lacks the qdisc (module not built).
UNKNOWN_QDISC = "Specified qdisc kind is unknown"
# What tc prints when there is no qdisc to delete.
NOTHING_TO_DELETE = ("Cannot delete qdisc with handle of zero", "No such file")
PROXY_HINT = "use --backend proxy, which needs neither root nor netem"

_NAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")
_NAMESPACE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_RATE = re.compile(r"^\d+(\.\d+)?([kmgt]?(bit|bps))$", re.IGNORECASE)


class Match(StrEnum):
    """Which end of a packet the filter compares with the target."""

    DST = "dst"  # packets sent to the target (requests)
    SRC = "src"  # packets sent by the target (replies)
    BOTH = "both"  # both ways: the delay counts twice in a round trip


@dataclass(frozen=True)
class NetemFault:
    """One netem fault on ``device`` (inside ``namespace`` if given).

    The target is ``port``, ``address`` or both (both: packets must match
    both). ``rate`` uses tc's units, for example ``1mbit`` or ``500kbps``.
    """

    device: str = "lo"
    namespace: str | None = None
    port: int | None = None
    address: str | None = None
    match: Match = Match.DST
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    rate: str | None = None

    def __post_init__(self) -> None:
        try:
            # Frozen: accept "dst" from the CLI and store the enum once.
            object.__setattr__(self, "match", Match(self.match))
        except ValueError:
            raise UsageError(f"match {self.match!r} is not dst, src or both") from None
        if not _NAME.match(self.device):
            raise UsageError(f"{self.device!r} is not a network device name")
        if self.namespace is not None and not _NAMESPACE.match(self.namespace):
            raise UsageError(f"{self.namespace!r} is not a network namespace name")
        if self.port is None and self.address is None:
            raise UsageError(
                "a netem fault needs a target port or address",
                fix="name the node to slow, so other traffic on the device "
                "is left alone",
            )
        if self.port is not None and not 0 < self.port < 65536:
            raise UsageError(f"port {self.port} is outside 1-65535")
        if self.address is not None:
            _ipv4_network(self.address)
        if self.delay_ms < 0 or self.jitter_ms < 0:
            raise UsageError("delay and jitter must be >= 0 ms")
        if self.jitter_ms and not self.delay_ms:
            raise UsageError(
                "jitter needs a delay to vary around",
                fix="give --ms as well, for example --ms 100 --jitter 20",
            )
        if not 0 <= self.loss_pct <= 100:
            raise UsageError(f"loss {self.loss_pct}% is outside 0-100%")
        if self.rate is not None and not _RATE.match(self.rate):
            raise UsageError(
                f"rate {self.rate!r} is not in tc's units",
                fix="give for example 1mbit, 500kbit or 100kbps",
            )
        if not (self.delay_ms or self.loss_pct or self.rate):
            raise UsageError(
                "a netem fault needs a delay, a loss or a rate",
                fix="give for example --ms 150",
            )

    @property
    def target(self) -> str:
        parts = [self.address or "", f":{self.port}" if self.port else ""]
        return "".join(parts)


def _ipv4_network(address: str) -> str:
    try:
        network = ipaddress.ip_network(address, strict=False)
    except ValueError:
        raise UsageError(f"{address!r} is not an IP address or network") from None
    if network.version != 4:
        raise UsageError(
            f"{address!r} is IPv6; the netem filters match IPv4 only",
            fix="target an IPv4 address such as 127.0.0.1",
        )
    return str(network)


def _ms(value: float) -> str:
    return f"{value:g}ms"


def _in_namespace(namespace: str | None, argv: list[str]) -> list[str]:
    if namespace is None:
        return argv
    return ["ip", "netns", "exec", namespace, *argv]


def _filter_matches(fault: NetemFault, end: str) -> list[str]:
    port_key = "dport" if end == "dst" else "sport"
    matches: list[str] = []
    if fault.address is not None:
        matches += ["match", "ip", end, _ipv4_network(fault.address)]
    if fault.port is not None:
        matches += ["match", "ip", port_key, str(fault.port), "0xffff"]
    return matches


def apply_commands(fault: NetemFault) -> list[list[str]]:
    """The tc commands that install ``fault``, in order."""
    device = ["dev", fault.device]
    netem = ["netem"]
    if fault.delay_ms:
        netem += ["delay", _ms(fault.delay_ms)]
        if fault.jitter_ms:
            netem.append(_ms(fault.jitter_ms))
    if fault.loss_pct:
        netem += ["loss", f"{fault.loss_pct:g}%"]
    if fault.rate:
        netem += ["rate", fault.rate]

    root = ["root", "handle", ROOT_HANDLE, "prio", "bands", str(BANDS)]
    band = ["parent", FAULT_BAND, "handle", NETEM_HANDLE, *netem]
    commands = [
        ["tc", "qdisc", "add", *device, *root],
        ["tc", "qdisc", "add", *device, *band],
    ]
    ends = ["dst", "src"] if fault.match is Match.BOTH else [fault.match.value]
    for priority, end in enumerate(ends, start=1):
        selector = ["protocol", "ip", "prio", str(priority), "u32"]
        target = [*_filter_matches(fault, end), "flowid", FAULT_BAND]
        commands.append(
            ["tc", "filter", "add", *device, "parent", ROOT_HANDLE, *selector, *target]
        )

    return [_in_namespace(fault.namespace, argv) for argv in commands]


def undo_commands(device: str = "lo", namespace: str | None = None) -> list[list[str]]:
    """The tc command that removes dslab's root qdisc (and all under it)."""
    argv = ["tc", "qdisc", "del", "dev", device, "root", "handle", ROOT_HANDLE]
    return [_in_namespace(namespace, argv)]


def show_command(device: str = "lo", namespace: str | None = None) -> list[str]:
    return _in_namespace(namespace, ["tc", "qdisc", "show", "dev", device])


def format_commands(commands: Sequence[Sequence[str]]) -> str:
    """One shell-quoted line per command, as ``--dry-run`` prints them."""
    return "\n".join(shlex.join(argv) for argv in commands)


# -- running them --------------------------------------------------------


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )
    except FileNotFoundError:
        raise EnvironmentProblem(
            f"{argv[0]!r} is not installed",
            fix="install iproute2 (apt-get install iproute2), or " + PROXY_HINT,
        ) from None
    except subprocess.TimeoutExpired:
        raise EnvironmentProblem(
            f"`{shlex.join(argv)}` did not finish in {COMMAND_TIMEOUT_S:g} s",
            fix="check the machine's network configuration, or " + PROXY_HINT,
        ) from None


def _said(result: subprocess.CompletedProcess[str]) -> str:
    return (result.stderr or result.stdout).strip()


def netem_available() -> tuple[bool, str]:
    """Whether this machine can run netem, and why not; changes nothing.

    The probe adds a netem qdisc in a throwaway network namespace, so the
    host's own devices are never touched; the namespace is always deleted.
    """
    if os.geteuid() != 0:
        return False, f"tc netem needs root (running as uid {os.geteuid()})"
    namespace = f"dslab-probe-{os.getpid()}"
    try:
        added = _run(["ip", "netns", "add", namespace])
    except EnvironmentProblem as problem:
        return False, problem.message
    if added.returncode != 0:
        return False, f"cannot create a network namespace: {_said(added)}"

    try:
        probe = _run(
            _in_namespace(
                namespace,
                ["tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
            )
        )
    except EnvironmentProblem as problem:
        return False, problem.message
    finally:
        deleted = _run(["ip", "netns", "del", namespace])
        if deleted.returncode != 0:
            log.warning("probe namespace %s not deleted: %s", namespace, _said(deleted))

    if probe.returncode == 0:
        return True, "tc netem works (probed in a throwaway namespace)"
    said = _said(probe)
    if UNKNOWN_QDISC in said:
        return False, f"this kernel has no sch_netem (tc said: {said})"
    return False, f"tc netem failed: {said}"


def _root_is_ours(device: str, namespace: str | None) -> bool:
    shown = _run(show_command(device, namespace))
    if shown.returncode != 0:
        raise EnvironmentProblem(
            f"cannot read the qdiscs of {device}: {_said(shown)}",
            fix="check the device and namespace names (`ip link`, `ip netns`)",
        )
    return any(
        line.split()[2:4] == [ROOT_HANDLE, "root"]
        for line in shown.stdout.splitlines()
        if len(line.split()) >= 4
    )


def apply(fault: NetemFault) -> None:
    """Install ``fault``, replacing an earlier dslab fault on that device."""
    available, reason = netem_available()
    if not available:
        raise EnvironmentProblem(
            f"{reason}; use --backend proxy",
            fix=PROXY_HINT + "; or run as root on a kernel with sch_netem "
            "(`modprobe sch_netem`)",
        )
    undo(fault.device, fault.namespace)

    for argv in apply_commands(fault):
        result = _run(argv)
        if result.returncode != 0:
            undo(fault.device, fault.namespace)
            raise EnvironmentProblem(
                f"`{shlex.join(argv)}` failed: {_said(result)}",
                fix="check that the kernel has sch_prio and the u32 filter, or "
                + PROXY_HINT,
            )
    log.info(
        "fault applied: netem on %s %s (undo: chaos heal)",
        fault.device,
        fault.target,
    )


def undo(device: str = "lo", namespace: str | None = None) -> bool:
    """Remove dslab's netem fault from ``device``; True if there was one."""
    if not _root_is_ours(device, namespace):
        return False
    for argv in undo_commands(device, namespace):
        result = _run(argv)
        said = _said(result)
        if result.returncode != 0 and not any(
            text in said for text in NOTHING_TO_DELETE
        ):
            raise EnvironmentProblem(
                f"`{shlex.join(argv)}` failed: {said}",
                fix="remove it by hand with `tc qdisc del dev DEVICE root`",
            )
    log.info("fault healed: netem on %s", device)

    return True
