"""Slowing the link to one lab node: tc netem in the kernel, or the fault proxy.

Two backends, one journal:

- ``netem`` (root, a kernel with ``sch_netem``): on a loopback lab, packets
  *to* the target's port on ``lo`` are delayed, dropped or rate-limited; on a
  ``--network netns`` lab, packets the node sends *from* its port leave
  through its own link (``eth0`` inside its namespace, the inner end of its
  veth), so nothing outside that namespace is touched. Either way every
  client of the node, replicas included, is affected. The kernel is probed
  first; where netem is missing this refuses with exit 3 and points at the
  proxy. ``--dry-run`` prints the exact tc commands and works everywhere.
- ``proxy`` (no privileges): the delay is set on the fault proxy
  ``proxy-<target>`` in front of the node: latency and jitter on requests
  (client -> node), a rate limit both ways. On a ``--network proxy`` lab
  that is the lab's own proxy, through which clients, replicas and Sentinels
  all reach the node, so replication is slowed too (a Cluster node's bus
  has a proxy of its own, ``proxy-<target>-bus``, which is not slowed). On
  other labs a proxy is started on demand as a lab service (or the running
  one reused).

Attention: on a lab without ``--network proxy`` the on-demand proxy only
slows clients that connect *through* it, at the address this module
returns; clients using the node's own port, replication and Sentinel
traffic are not affected.

A link carries one delay at a time: a new delay on the same proxy or device
replaces the earlier one, which is marked healed ("replaced by fN").
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from dslab.chaos import netem
from dslab.chaos.heal import schedule_heal
from dslab.chaos.journal import Fault, Journal
from dslab.chaos.proxy import HEALTHY, Direction, Faults, ProxyControl
from dslab.errors import DslabError, EnvironmentProblem, UsageError
from dslab.lab.lab import Lab
from dslab.lab.netns import NODE_DEVICE
from dslab.lab.state import ProcessRecord
from dslab.lab.supervisor import os_free_ports
from dslab.settings import LOOPBACK_HOST

log = logging.getLogger(__name__)

PROXY_KIND = "proxy"
DEVICE = "lo"

_RATE = re.compile(r"^(\d+(?:\.\d+)?)([kmgt]?)(bit|bps)$", re.IGNORECASE)
# tc's rate units are decimal: 1mbit is 1,000,000 bits per second.
_PREFIX = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


class Backend(StrEnum):
    NETEM = "netem"
    PROXY = "proxy"


@dataclass(frozen=True)
class DelaySpec:
    """What to do to the link; ``rate`` is in tc's units (``1mbit``)."""

    ms: float
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    rate: str | None = None

    def __post_init__(self) -> None:
        if self.ms < 0 or self.jitter_ms < 0:
            raise UsageError("--ms and --jitter must be >= 0")
        if self.jitter_ms > self.ms:
            raise UsageError(
                f"--jitter {self.jitter_ms:g} is larger than --ms {self.ms:g}",
                fix="keep the jitter at or below the delay, e.g. --ms 150 --jitter 20",
            )
        if not 0 <= self.loss_pct <= 100:
            raise UsageError(f"--loss {self.loss_pct:g}% is outside 0-100%")
        if self.rate is not None:
            rate_bytes_per_s(self.rate)
        if not (self.ms or self.loss_pct or self.rate):
            raise UsageError("nothing to do", fix="give --ms, --loss or --rate")

    @property
    def summary(self) -> str:
        """``150ms+-20ms loss 1% rate 1mbit``: the words of the log lines."""
        parts = []
        if self.ms:
            jitter = f"+-{self.jitter_ms:g}ms" if self.jitter_ms else ""
            parts.append(f"{self.ms:g}ms{jitter}")
        if self.loss_pct:
            parts.append(f"loss {self.loss_pct:g}%")
        if self.rate:
            parts.append(f"rate {self.rate}")
        return " ".join(parts)


@dataclass(frozen=True)
class DelayOutcome:
    fault: Fault
    proxy_address: str | None  # where clients must connect (proxy backend)
    replaced: tuple[str, ...] = ()


def parse_loss(text: str) -> float:
    """``1%``, ``0.5%`` or ``1`` as a percentage."""
    number = text.strip().removesuffix("%")
    try:
        return float(number)
    except ValueError:
        raise UsageError(f"--loss {text!r} is not a percentage",
                         fix="give for example 1% or 0.5%") from None


def rate_bytes_per_s(rate: str) -> int:
    """tc's rate units in bytes per second: ``1mbit`` -> 125000."""
    match = _RATE.match(rate.strip())
    if match is None:
        raise UsageError(f"--rate {rate!r} is not in tc's units",
                         fix="give for example 1mbit, 500kbit or 100kbps")
    value = float(match.group(1)) * _PREFIX[match.group(2).lower()]
    per_s = value / 8 if match.group(3).lower() == "bit" else value
    if per_s < 1:
        raise UsageError(f"--rate {rate!r} is below one byte per second")
    return int(per_s)


def netem_fault(record: ProcessRecord, spec: DelaySpec) -> netem.NetemFault:
    """The netem fault that slows ``record``'s traffic: requests to its port on
    ``lo``, or, for a node in its own namespace, what it sends from its port
    out of its own link (egress is the only side a qdisc shapes)."""
    namespace = record.extra.get("namespace")
    if isinstance(namespace, str):
        return netem.NetemFault(
            device=NODE_DEVICE, namespace=namespace, port=record.port,
            match=netem.Match.SRC, delay_ms=spec.ms, jitter_ms=spec.jitter_ms,
            loss_pct=spec.loss_pct, rate=spec.rate,
        )
    return netem.NetemFault(
        device=DEVICE, port=record.port, delay_ms=spec.ms, jitter_ms=spec.jitter_ms,
        loss_pct=spec.loss_pct, rate=spec.rate,
    )


def dry_run(record: ProcessRecord, spec: DelaySpec) -> str:
    """The exact tc commands, apply then undo, as ``--dry-run`` prints them."""
    fault = netem_fault(record, spec)
    return (
        "# apply\n" + netem.format_commands(netem.apply_commands(fault))
        + "\n# undo (dslab chaos heal)\n"
        + netem.format_commands(netem.undo_commands(fault.device, fault.namespace))
    )


def delay_netem(lab: Lab, record: ProcessRecord, spec: DelaySpec,
                *, duration_s: float | None = None) -> DelayOutcome:
    fault_spec = netem_fault(record, spec)
    available, reason = netem.netem_available()
    if not available:
        raise EnvironmentProblem(
            f"{reason}; use --backend proxy",
            fix=netem.PROXY_HINT + "; `--dry-run` shows the tc commands anyway",
        )

    journal = Journal(lab.home)
    undo = {"action": "netem-undo", "device": fault_spec.device,
            "namespace": fault_spec.namespace}
    with journal.locked():
        earlier = [f for f in journal.active_faults()
                   if (f.undo or {}).get("action") == "netem-undo"
                   and f.undo == undo]
        params = {"backend": Backend.NETEM.value, "summary": spec.summary,
                  "port": record.port, "device": fault_spec.device,
                  "namespace": fault_spec.namespace,
                  "commands": netem.format_commands(netem.apply_commands(fault_spec))}
        fault = journal.begin("delay", record.name, None, params=params, undo=undo,
                              remedy="dslab chaos heal", duration_s=duration_s)
        _apply(journal, fault, lambda: netem.apply(fault_spec))
        replaced = _mark_replaced(journal, earlier, fault)

    log.info("fault applied: %s (undo: dslab chaos heal %s)",
             fault.describe(), fault.id)
    return DelayOutcome(fault, None, replaced)


def delay_proxy(lab: Lab, record: ProcessRecord, spec: DelaySpec,
                *, duration_s: float | None = None, seed: int = 0) -> DelayOutcome:
    if spec.loss_pct:
        raise UsageError(
            "the proxy cannot drop packets: it relays a TCP stream, which "
            "never loses bytes",
            fix="leave out --loss, or use --backend netem where the kernel has it",
        )
    proxy = ensure_proxy(lab, record, seed=seed)
    control_url = str(proxy.extra["control_url"])
    address = f"{proxy.host}:{proxy.port}"
    bandwidth = rate_bytes_per_s(spec.rate) if spec.rate else None
    upstream = Faults(latency_ms=spec.ms, jitter_ms=spec.jitter_ms,
                      bandwidth_bytes_per_s=bandwidth)
    downstream = Faults(bandwidth_bytes_per_s=bandwidth) if bandwidth else HEALTHY

    journal = Journal(lab.home)
    undo = {"action": "proxy-clear", "control_url": control_url, "pid": proxy.pid,
            "process_started_at": proxy.started_at}
    with journal.locked():
        earlier = [f for f in journal.active_faults() if f.undo == undo]
        params = {"backend": Backend.PROXY.value, "summary": spec.summary,
                  "proxy": proxy.name, "proxy_address": address,
                  "ms": spec.ms, "jitter_ms": spec.jitter_ms, "rate": spec.rate}
        fault = journal.begin("delay", record.name, None, params=params, undo=undo,
                              remedy="dslab chaos heal", duration_s=duration_s)

        def set_on_proxy() -> None:
            control = ProxyControl(control_url)
            control.set_faults(Direction.UPSTREAM, upstream)
            control.set_faults(Direction.DOWNSTREAM, downstream)

        _apply(journal, fault, set_on_proxy)
        replaced = _mark_replaced(journal, earlier, fault)

    log.info("fault applied: %s via %s (undo: dslab chaos heal %s)",
             fault.describe(), address, fault.id)
    return DelayOutcome(fault, address, replaced)


def ensure_proxy(lab: Lab, record: ProcessRecord, *, seed: int = 0) -> ProcessRecord:
    """The running ``proxy-<name>`` in front of ``record``, started if needed."""
    if record.kind == PROXY_KIND:
        raise UsageError(f"{record.name} is a fault proxy itself",
                         fix="slow the node it stands in front of instead")
    name = f"{PROXY_KIND}-{record.name}"
    # A --network proxy lab already routes every path to the node through
    # its own proxy; a second one would slow only the clients that knew it.
    lab_proxy = next((proxy for proxy in lab.lab_proxies(record.name)
                      if proxy.name == name), None)
    if lab_proxy is not None:
        if not lab_proxy.is_alive():
            raise EnvironmentProblem(
                f"{name}, the lab's proxy in front of {record.name}, is not "
                "running",
                fix="bring it back with `dslab lab up` (same options), then "
                "delay again",
            )
        return lab_proxy
    state = lab.require_state()
    for existing in state.processes:
        if existing.name == name and existing.is_alive():
            return existing

    listen_port, control_port = os_free_ports(2)
    control_url = f"http://{LOOPBACK_HOST}:{control_port}"
    argv = [sys.executable, "-m", "dslab.chaos.proxy",
            "--listen", f"{LOOPBACK_HOST}:{listen_port}",
            "--upstream", record.address,
            "--control", f"{LOOPBACK_HOST}:{control_port}",
            "--seed", str(seed)]
    extra: dict[str, object] = {
        "health_url": f"{control_url}/faults", "control_url": control_url,
        "in_front_of": record.name, "upstream": record.address,
    }
    return lab.launch(name, PROXY_KIND, argv, port=listen_port, extra=extra)


def _apply(journal: Journal, fault: Fault, action: Callable[[], None]) -> None:
    """Schedule the timer, then run ``action``; a failure is journaled healed."""
    if fault.until is not None:
        schedule_heal(journal.home, fault, fault.until)
    try:
        action()
    except DslabError as error:
        journal.record_healed(fault.id, f"not applied: {error.message}")
        raise


def _mark_replaced(journal: Journal, earlier: list[Fault], fault: Fault
                   ) -> tuple[str, ...]:
    for old in earlier:
        journal.record_healed(old.id, f"replaced by {fault.id}")
        log.info("fault healed: %s (replaced by %s)", old.describe(), fault.id)
    return tuple(old.id for old in earlier)
