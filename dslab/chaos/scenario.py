"""Scenarios: a topology, a workload, a fault schedule and constraints in one
TOML file, run by ``dslab chaos run``.

A scenario file reads like the experiment it describes::

    name = "chat server crash"
    seed = 7

    [lab]
    topology = "standalone"          # standalone | replicated | cluster
    persistence = "everysec"
    network = "netns"                # loopback (default) | netns | proxy

    [[services]]
    kind = "chat"                    # chat | shortener
    instances = 2
    options = ["--delivery", "streams"]

    [workload]
    kind = "chat"                    # chat | shortener | idle
    duration = "30s"
    options = ["--users", "100", "--rate", "1/s"]

    [[faults]]
    at = "10s"                       # or: every = "15s" (start, stop)
    action = "kill"                  #     random = ["5s", "25s"], count = 2
    target = "random:chat"

    [[faults]]
    at = "12s"
    action = "delay"                 # ms, jitter, loss, rate,
    target = "redis-1"               # backend = "auto" | "netem" | "proxy"
    ms = 150
    for = "5s"                       # pause, delay, partition: undo after

    [[faults]]
    at = "20s"
    action = "partition"             # target = "redis-1" isolates it, or
    sides = [["redis-1"], ["host"]]  # two sides; one_way = true drops A -> B

    [[faults]]
    at = "25s"
    action = "heal"                  # undo every active fault

    [constraints]
    slo = ["deliver:p99<200ms", "lost==0"]

Guarantees: the same file and seed give the same fault schedule and the same
random targets (the schedule is computed before the run starts and printed);
every fault goes through the fault journal, so the run file's timeline, `chaos
status` and `chaos heal` all see it; a bad file is refused before anything
starts, with the offending key named. The nemesis applies each fault with the
same functions as the ``dslab chaos`` command of that name, so a fault in a
file behaves exactly like the command typed by hand.

Attention: a partition needs a lab network that can cut one node off (``[lab]
network = "netns"``, or ``"proxy"`` where the lab has it); on the default
loopback network the file is refused. A proxy-backed delay slows only the
clients that connect through the proxy (see ``dslab.chaos.delay``).
"""

from __future__ import annotations

import logging
import random
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dslab.chaos import delay as delays
from dslab.chaos import netem, process
from dslab.chaos import partition as partitions
from dslab.chaos.heal import heal
from dslab.chaos.targets import resolve
from dslab.errors import DslabError, EnvironmentProblem, UsageError
from dslab.lab import netns
from dslab.lab.lab import Lab
from dslab.lab.netns import Network
from dslab.settings import Persistence, Topology
from dslab.units import parse_duration

log = logging.getLogger(__name__)

ACTIONS = ("kill", "pause", "resume", "restart", "delay", "partition", "heal")
# Actions with an undo, so `for` means something.
UNDOABLE = ("pause", "delay", "partition")
# "auto": netem where this kernel has it, else the fault proxy.
AUTO_BACKEND = "auto"
BACKENDS = (AUTO_BACKEND, *(backend.value for backend in delays.Backend))
TIMING_KEYS = frozenset({"at", "every", "start", "stop", "random", "count"})
# Keys each action takes besides `action` and the timing keys.
ACTION_KEYS: dict[str, frozenset[str]] = {
    "kill": frozenset({"target", "signal"}),
    "pause": frozenset({"target", "for"}),
    "resume": frozenset({"target"}),
    "restart": frozenset({"target"}),
    "delay": frozenset({"target", "ms", "jitter", "loss", "rate", "backend", "for"}),
    "partition": frozenset({"target", "sides", "one_way", "for"}),
    "heal": frozenset(),
}
WORKLOADS = ("chat", "shortener", "idle")
SERVICES = ("chat", "shortener", "worker")
# A scenario longer than this is almost surely a typo, and would hold the
# machine for an hour.
MAX_DURATION_S = 600.0
MAX_FAULTS = 1000
# How long the nemesis waits for the workload to report that its load began
# (users connected, processes started) before counting from its launch.
LOAD_START_WAIT_S = 60.0


@dataclass(frozen=True)
class FaultRule:
    """One ``[[faults]]`` table: what to do, to what, and when."""

    action: str
    target: str
    at_s: float | None = None
    every_s: float | None = None
    start_s: float = 0.0
    stop_s: float | None = None
    between_s: tuple[float, float] | None = None
    count: int = 1
    for_s: float | None = None
    signal: str | None = None
    delay: delays.DelaySpec | None = None
    backend: str = AUTO_BACKEND
    # A partition between two sides; None with a target means "isolate it".
    sides: tuple[tuple[str, ...], tuple[str, ...]] | None = None
    one_way: bool = False


@dataclass(frozen=True)
class PlannedFault:
    """One fault at one moment, target still a pattern (resolved at that time)."""

    at_s: float
    action: str
    target: str
    for_s: float | None = None
    signal: str | None = None
    delay: delays.DelaySpec | None = None
    backend: str = AUTO_BACKEND
    sides: tuple[tuple[str, ...], tuple[str, ...]] | None = None
    one_way: bool = False

    def describe(self) -> str:
        return f"{self.at_s:7.2f}s  {self.what()}"

    def what(self) -> str:
        """The fault in words: ``delay redis-1 150ms+-20ms (auto) for 2s``."""
        more = f" for {self.for_s:g}s" if self.for_s else ""
        if self.action == "heal":
            return "heal every active fault"
        if self.action == "delay" and self.delay is not None:
            return (f"delay {self.target} {self.delay.summary} "
                    f"({self.backend}){more}")
        if self.action == "partition":
            way = " one way" if self.one_way else ""
            if self.sides is None:
                return f"partition: isolate {self.target}{way}{more}"
            side_a, side_b = (",".join(side) for side in self.sides)
            arrow = "->" if self.one_way else "<->"
            return f"partition {side_a} {arrow} {side_b}{more}"
        return f"{self.action} {self.target}{more}"


@dataclass(frozen=True)
class ServiceSpec:
    kind: str
    instances: int = 1
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Scenario:
    name: str
    path: Path
    seed: int
    topology: Topology
    persistence: Persistence
    services: tuple[ServiceSpec, ...]
    workload: str
    duration_s: float
    workload_options: tuple[str, ...]
    faults: tuple[FaultRule, ...]
    slo: tuple[str, ...] = ()
    description: str = ""
    network: Network = Network.LOOPBACK


def load(path: Path) -> Scenario:
    """Read and check a scenario file; every mistake is a UsageError naming it."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"no scenario file {path}",
                         fix="give the path of a .toml scenario") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path} is not valid TOML: {exc}") from None
    return parse(data, path)


def parse(data: dict[str, Any], path: Path) -> Scenario:
    where = str(path)
    lab = _table(data, "lab", where)
    workload = _table(data, "workload", where)
    constraints = _table(data, "constraints", where)

    topology = _choice(lab.get("topology", "standalone"), [t.value for t in Topology],
                       f"{where}: lab.topology")
    persistence = _choice(lab.get("persistence", "everysec"),
                          [p.value for p in Persistence], f"{where}: lab.persistence")
    # Checked against the enum itself, so a network mode the lab gains is
    # accepted here without a change.
    network = Network(_choice(lab.get("network", Network.LOOPBACK.value),
                              [n.value for n in Network], f"{where}: lab.network"))
    kind = _choice(workload.get("kind", "idle"), list(WORKLOADS),
                   f"{where}: workload.kind")
    duration_s = _duration(workload.get("duration", "30s"),
                           f"{where}: workload.duration")
    if duration_s > MAX_DURATION_S:
        raise UsageError(f"{where}: workload.duration is over {MAX_DURATION_S:g} s")

    services = tuple(_service(item, f"{where}: services[{index}]")
                     for index, item in enumerate(_list(data, "services", where)))
    faults = tuple(_fault(item, f"{where}: faults[{index}]")
                   for index, item in enumerate(_list(data, "faults", where)))
    seed = data.get("seed", 1)
    if not isinstance(seed, int):
        raise UsageError(f"{where}: seed must be a whole number, not {seed!r}")
    _check_partitions_fit(network, faults, where)

    return Scenario(
        name=str(data.get("name", path.stem)),
        path=path,
        seed=seed,
        topology=Topology(topology),
        persistence=Persistence(persistence),
        services=services,
        workload=kind,
        duration_s=duration_s,
        workload_options=_strings(workload.get("options", []),
                                  f"{where}: workload.options"),
        faults=faults,
        slo=_strings(constraints.get("slo", []), f"{where}: constraints.slo"),
        description=str(data.get("description", "")),
        network=network,
    )


def check_machine(scenario: Scenario) -> None:
    """Refuse, before anything starts, a scenario this machine cannot run:
    a netns lab without root or nftables, a netem delay without netem."""
    if scenario.network is Network.NETNS:
        netns.require_support()
    delays_asked = [rule for rule in scenario.faults if rule.action == "delay"]
    netem_needed = [rule for rule in delays_asked
                    if rule.backend == delays.Backend.NETEM.value
                    or (rule.backend == AUTO_BACKEND and rule.delay is not None
                        and rule.delay.loss_pct)]
    if not netem_needed:
        return
    available, reason = netem.netem_available()
    if not available:
        raise EnvironmentProblem(
            f"{scenario.path}: a delay fault needs tc netem, and {reason}",
            fix='set backend = "proxy" on its [[faults]] table and leave out '
            "loss (the proxy cannot drop packets), or run as root on a Linux "
            "kernel with sch_netem",
        )


def plan(scenario: Scenario, seed: int) -> list[PlannedFault]:
    """The fault schedule, in time order; the same seed gives the same list."""
    rng = random.Random(seed)
    planned: list[PlannedFault] = []
    for rule in scenario.faults:
        for at_s in _moments(rule, scenario.duration_s, rng):
            planned.append(PlannedFault(
                round(at_s, 3), rule.action, rule.target, rule.for_s, rule.signal,
                rule.delay, rule.backend, rule.sides, rule.one_way))
    if len(planned) > MAX_FAULTS:
        raise UsageError(f"{scenario.path}: the schedule has {len(planned)} faults, "
                         f"more than {MAX_FAULTS}")
    return sorted(planned, key=lambda fault: fault.at_s)


def _moments(rule: FaultRule, duration_s: float, rng: random.Random) -> list[float]:
    if rule.at_s is not None:
        return [rule.at_s] if rule.at_s < duration_s else []
    if rule.every_s is not None:
        stop_s = min(rule.stop_s if rule.stop_s is not None else duration_s,
                     duration_s)
        moments, at_s = [], rule.start_s
        while at_s < stop_s:
            moments.append(at_s)
            at_s += rule.every_s
        return moments
    assert rule.between_s is not None
    low, high = rule.between_s
    return sorted(rng.uniform(low, min(high, duration_s)) for _ in range(rule.count))


class Nemesis:
    """Applies a planned schedule against a lab from a background thread,
    relative to ``started``; targets such as ``random:chat`` are resolved at
    the moment of each fault with the scenario's seeded RNG. Each action goes
    through the functions its ``dslab chaos`` command uses."""

    def __init__(
        self, lab: Lab, schedule: list[PlannedFault], seed: int,
        on_event: Callable[[str], None] | None = None,
        *, load_start_file: Path | None = None,
    ) -> None:
        self.lab = lab
        # Where the workload writes when its load begins: fault times count
        # from then, not from the workload's start-up (connecting users).
        self.load_start_file = load_start_file
        self.schedule = schedule
        self.seed = seed
        self.rng = random.Random(seed + 1)
        self.on_event = on_event
        self.applied: list[tuple[float, str]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nemesis",
                                        daemon=True)
        self._started = 0.0
        self._netem_works: bool | None = None

    def start(self) -> None:
        self._started = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        if self.load_start_file is not None and not self._wait_for_load():
            return
        for fault in self.schedule:
            wait_s = self._started + fault.at_s - time.monotonic()
            if wait_s > 0 and self._stop.wait(wait_s):
                return
            try:
                what = self._apply(fault)
            except DslabError as exc:
                # A fault that cannot be applied (its target already dead, say)
                # is part of what happened: reported, and the run goes on.
                what = f"could not {fault.what()}: {exc.message}"
                self.errors.append(what)
            self.applied.append((time.monotonic() - self._started, what))
            if self.on_event is not None:
                self.on_event(what)

    def _wait_for_load(self) -> bool:
        """Move the clock's origin to the instant the workload's load began;
        False when told to stop first. A workload that never says (it failed
        to start) leaves the origin at the nemesis start, with a note."""
        assert self.load_start_file is not None
        deadline = time.monotonic() + LOAD_START_WAIT_S
        while time.monotonic() < deadline:
            try:
                wall = float(self.load_start_file.read_text(encoding="utf-8"))
            except (FileNotFoundError, ValueError):
                if self._stop.wait(0.05):
                    return False
                continue
            self._started = time.monotonic() + (wall - time.time())
            return True
        self.errors.append(f"the workload did not report its start within "
                           f"{LOAD_START_WAIT_S:g}s: fault times count from "
                           "the workload's launch")
        return True

    def _apply(self, fault: PlannedFault) -> str:
        if fault.action == "heal":
            return self._heal()
        if fault.action == "partition":
            return self._partition(fault)
        if fault.action == "delay":
            return self._delay(fault)
        records = resolve(self.lab, fault.target, self.rng)
        done = []
        for record in records:
            if fault.action == "kill":
                signum = process.parse_signal(fault.signal or "KILL")
                process.kill(self.lab, record, signum)
            elif fault.action == "pause":
                process.pause(self.lab, record, duration_s=fault.for_s)
            elif fault.action == "resume":
                process.resume(self.lab, record)
            else:
                process.restart(self.lab, record)
            done.append(record.name)
        return f"{fault.action} {', '.join(done)}"

    def _delay(self, fault: PlannedFault) -> str:
        """As ``dslab chaos delay``: one delay per resolved target."""
        assert fault.delay is not None
        backend = self._backend(fault.backend)
        done = []
        for record in resolve(self.lab, fault.target, self.rng):
            if backend is delays.Backend.NETEM:
                outcome = delays.delay_netem(self.lab, record, fault.delay,
                                             duration_s=fault.for_s)
            else:
                outcome = delays.delay_proxy(self.lab, record, fault.delay,
                                             duration_s=fault.for_s, seed=self.seed)
            via = (f" via proxy {outcome.proxy_address}"
                   if outcome.proxy_address else " via netem")
            done.append(f"{record.name}{via} ({outcome.fault.id})")
        return f"delay {fault.delay.summary} on {', '.join(done)}"

    def _backend(self, asked: str) -> delays.Backend:
        if asked != AUTO_BACKEND:
            return delays.Backend(asked)
        if self._netem_works is None:
            # Probed once per run: the probe builds a throwaway namespace.
            self._netem_works, reason = netem.netem_available()
            log.debug("delay backend auto: %s", reason)
        return delays.Backend.NETEM if self._netem_works else delays.Backend.PROXY

    def _partition(self, fault: PlannedFault) -> str:
        """As ``dslab chaos partition`` (two sides, or ``--isolate``)."""
        network = partitions.lab_network(self.lab)
        if fault.sides is None:
            first = partitions.resolve_side(self.lab, network, fault.target,
                                            self.rng)
            second = partitions.everyone_but(network, first)
        else:
            first, second = (
                partitions.resolve_side(self.lab, network, ",".join(side), self.rng)
                for side in fault.sides
            )
        outcome = partitions.partition(self.lab, first, second,
                                       one_way=fault.one_way, duration_s=fault.for_s)
        arrow = "->" if fault.one_way else "<->"
        return (f"partition {','.join(first)} {arrow} {','.join(second)} "
                f"({outcome.fault.id})")

    def _heal(self) -> str:
        """As ``dslab chaos heal``: every active fault; one that stays is an
        error of the run."""
        results = heal(self.lab.home)
        failed = [f"{r.fault.id}: {r.outcome}" for r in results if not r.ok]
        if failed:
            raise EnvironmentProblem(f"{len(failed)} fault(s) could not be undone: "
                                     + "; ".join(failed))
        if not results:
            return "heal: nothing was active"
        return f"heal {', '.join(result.fault.id for result in results)}"


def _table(data: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise UsageError(f"{where}: [{key}] must be a table")
    return value


def _list(data: dict[str, Any], key: str, where: str) -> list[dict[str, Any]]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise UsageError(f"{where}: {key} must be written as [[{key}]] tables")
    return value


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"{where} must be a list of strings")
    return tuple(value)


def _choice(value: Any, choices: list[str], where: str) -> str:
    if value not in choices:
        raise UsageError(f"{where} is {value!r}", fix=f"use one of {choices}")
    return str(value)


def _duration(value: Any, where: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = f"{value}s"
    if not isinstance(value, str):
        raise UsageError(f"{where} must be a duration such as \"10s\"")
    return parse_duration(value, what=where, max_s=MAX_DURATION_S)


def _service(item: dict[str, Any], where: str) -> ServiceSpec:
    kind = _choice(item.get("kind"), list(SERVICES), f"{where}.kind")
    instances = item.get("instances", 1)
    if not isinstance(instances, int) or not 1 <= instances <= 16:
        raise UsageError(f"{where}.instances must be 1-16, not {instances!r}")
    return ServiceSpec(kind, instances,
                       _strings(item.get("options", []), f"{where}.options"))


def _fault(item: dict[str, Any], where: str) -> FaultRule:
    action = _choice(item.get("action"), list(ACTIONS), f"{where}.action")
    if "for" in item and action not in UNDOABLE:
        raise UsageError(f"{where}.for only applies to pause, delay and partition "
                         f"(not {action})",
                         fix="kill has no undo: add a restart fault instead")
    allowed = ACTION_KEYS[action] | TIMING_KEYS | {"action"}
    unknown = sorted(key for key in item if key not in allowed)
    if unknown:
        raise UsageError(f"{where}.{unknown[0]} is not a key of a {action} fault",
                         fix=f"a {action} fault takes {', '.join(sorted(allowed))}")
    target = item.get("target", "")
    if action == "partition" and "sides" in item:
        if "target" in item:
            raise UsageError(f"{where} gives both target and sides",
                             fix='either target = "redis-1" (isolate it) or '
                             'sides = [["redis-1"], ["redis-2", "redis-3"]]')
    elif action != "heal" and (not isinstance(target, str) or not target):
        raise UsageError(f"{where}.target is missing",
                         fix="name a node or service, e.g. chat-1 or random:chat")
    when = [key for key in ("at", "every", "random") if key in item]
    if len(when) != 1:
        raise UsageError(f"{where} needs exactly one of at, every or random",
                         fix='e.g. at = "10s", every = "15s" or '
                         'random = ["5s", "25s"]')
    for_s = _duration(item["for"], f"{where}.for") if "for" in item else None
    signal_name = item.get("signal")
    rule: dict[str, Any] = {"action": action, "target": str(target), "for_s": for_s,
                            "signal": str(signal_name) if signal_name else None}
    if action == "delay":
        rule["delay"] = _delay_spec(item, where)
        rule["backend"] = _choice(item.get("backend", AUTO_BACKEND), list(BACKENDS),
                                  f"{where}.backend")
        if rule["backend"] == delays.Backend.PROXY.value and rule["delay"].loss_pct:
            raise UsageError(f"{where}.loss needs the netem backend",
                             fix="the proxy relays a TCP stream, which never "
                             'loses bytes: drop loss, or use backend = "netem"')
    if action == "partition":
        if "sides" in item:
            rule["sides"] = _sides(item["sides"], f"{where}.sides")
        one_way = item.get("one_way", False)
        if not isinstance(one_way, bool):
            raise UsageError(f"{where}.one_way must be true or false")
        rule["one_way"] = one_way
    if "at" in item:
        rule["at_s"] = _duration_or_zero(item["at"], f"{where}.at")
    elif "every" in item:
        rule["every_s"] = _duration(item["every"], f"{where}.every")
        rule["start_s"] = _duration_or_zero(item.get("start", 0), f"{where}.start")
        if "stop" in item:
            rule["stop_s"] = _duration(item["stop"], f"{where}.stop")
    else:
        bounds = item["random"]
        if not isinstance(bounds, list) or len(bounds) != 2:
            raise UsageError(f"{where}.random must be [earliest, latest]")
        low = _duration_or_zero(bounds[0], f"{where}.random[0]")
        high = _duration(bounds[1], f"{where}.random[1]")
        if high <= low:
            raise UsageError(f"{where}.random: latest must come after earliest")
        count = item.get("count", 1)
        if not isinstance(count, int) or not 1 <= count <= MAX_FAULTS:
            raise UsageError(f"{where}.count must be 1-{MAX_FAULTS}")
        rule["between_s"] = (low, high)
        rule["count"] = count
    return FaultRule(**rule)


def _delay_spec(item: dict[str, Any], where: str) -> delays.DelaySpec:
    """``ms``, ``jitter``, ``loss`` and ``rate`` as ``chaos delay`` checks them."""
    numbers = {}
    for key in ("ms", "jitter"):
        value = item.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{where}.{key} must be a number of milliseconds, "
                             f"not {value!r}")
        numbers[key] = float(value)
    loss = item.get("loss", 0)
    if isinstance(loss, bool) or not isinstance(loss, (int, float, str)):
        raise UsageError(f"{where}.loss must be a percentage such as \"1%\"")
    rate = item.get("rate")
    if rate is not None and not isinstance(rate, str):
        raise UsageError(f"{where}.rate must be a string in tc's units, e.g. "
                         '"1mbit"')
    try:
        return delays.DelaySpec(
            ms=numbers["ms"], jitter_ms=numbers["jitter"],
            loss_pct=delays.parse_loss(str(loss)) if loss else 0.0, rate=rate,
        )
    except UsageError as error:
        # The spec speaks in the command's flags; name the file's keys instead.
        message = error.message.replace("--", "")
        raise UsageError(f"{where}: {message}", fix=error.fix) from None


def _sides(value: Any, where: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Two lists of names or roles (``host`` for the clients' side)."""
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(side, list) and side
                       and all(isinstance(name, str) and name for name in side)
                       for side in value)):
        raise UsageError(f"{where} must be two lists of names",
                         fix='e.g. sides = [["redis-1"], ["redis-2", "redis-3"]]')
    first, second = (tuple(side) for side in value)
    overlap = sorted(set(first) & set(second))
    if overlap:
        raise UsageError(f"{where}: {', '.join(overlap)} is on both sides",
                         fix="name each node on one side only")
    return first, second


def _check_partitions_fit(
    network: Network, faults: tuple[FaultRule, ...], where: str
) -> None:
    """A partition on a loopback lab could only ever fail: say so now."""
    if network is not Network.LOOPBACK:
        return
    if any(rule.action == "partition" for rule in faults):
        others = [n.value for n in Network if n is not Network.LOOPBACK]
        raise UsageError(
            f"{where}: a partition fault needs a lab network that can cut one "
            f"node off, and lab.network is {network.value!r}",
            fix=f"set network = one of {others} under [lab] (netns needs root); "
            "without root, a pause fault is a stand-in (see docs/scenarios.md)",
        )


def _duration_or_zero(value: Any, where: str) -> float:
    if value in (0, "0", "0s"):
        return 0.0
    return _duration(value, where)
