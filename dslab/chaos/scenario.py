"""Scenarios: a topology, a workload, a fault schedule and constraints in one
TOML file, run by ``dslab chaos run``.

A scenario file reads like the experiment it describes::

    name = "chat server crash"
    seed = 7

    [lab]
    topology = "standalone"          # standalone | replicated | cluster
    persistence = "everysec"

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
    for = "5s"                       # pause and delay: undo after this long

    [constraints]
    slo = ["deliver:p99<200ms", "lost==0"]

Guarantees: the same file and seed give the same fault schedule and the same
random targets (the schedule is computed before the run starts and printed);
every fault goes through the fault journal, so the run file's timeline, `chaos
status` and `chaos heal` all see it; a bad file is refused before anything
starts, with the offending key named.
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

from dslab.chaos import process
from dslab.chaos.targets import resolve
from dslab.errors import DslabError, UsageError
from dslab.lab.lab import Lab
from dslab.settings import Persistence, Topology
from dslab.units import parse_duration

log = logging.getLogger(__name__)

ACTIONS = ("kill", "pause", "resume", "restart")
WORKLOADS = ("chat", "shortener", "idle")
SERVICES = ("chat", "shortener")
# A scenario longer than this is almost surely a typo, and would hold the
# machine for an hour.
MAX_DURATION_S = 600.0
MAX_FAULTS = 1000


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


@dataclass(frozen=True)
class PlannedFault:
    """One fault at one moment, target still a pattern (resolved at that time)."""

    at_s: float
    action: str
    target: str
    for_s: float | None = None
    signal: str | None = None

    def describe(self) -> str:
        more = f" for {self.for_s:g}s" if self.for_s else ""
        return f"{self.at_s:7.2f}s  {self.action} {self.target}{more}"


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
    )


def plan(scenario: Scenario, seed: int) -> list[PlannedFault]:
    """The fault schedule, in time order; the same seed gives the same list."""
    rng = random.Random(seed)
    planned: list[PlannedFault] = []
    for rule in scenario.faults:
        for at_s in _moments(rule, scenario.duration_s, rng):
            planned.append(PlannedFault(round(at_s, 3), rule.action, rule.target,
                                        rule.for_s, rule.signal))
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
    the moment of each fault with the scenario's seeded RNG."""

    def __init__(
        self, lab: Lab, schedule: list[PlannedFault], seed: int,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        self.lab = lab
        self.schedule = schedule
        self.rng = random.Random(seed + 1)
        self.on_event = on_event
        self.applied: list[tuple[float, str]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nemesis",
                                        daemon=True)
        self._started = 0.0

    def start(self) -> None:
        self._started = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        for fault in self.schedule:
            wait_s = self._started + fault.at_s - time.monotonic()
            if wait_s > 0 and self._stop.wait(wait_s):
                return
            try:
                what = self._apply(fault)
            except DslabError as exc:
                # A fault that cannot be applied (its target already dead, say)
                # is part of what happened: reported, and the run goes on.
                what = f"could not {fault.action} {fault.target}: {exc.message}"
                self.errors.append(what)
            self.applied.append((time.monotonic() - self._started, what))
            if self.on_event is not None:
                self.on_event(what)

    def _apply(self, fault: PlannedFault) -> str:
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
    target = item.get("target")
    if not isinstance(target, str) or not target:
        raise UsageError(f"{where}.target is missing",
                         fix="name a node or service, e.g. chat-1 or random:chat")
    when = [key for key in ("at", "every", "random") if key in item]
    if len(when) != 1:
        raise UsageError(f"{where} needs exactly one of at, every or random",
                         fix='e.g. at = "10s", every = "15s" or '
                         'random = ["5s", "25s"]')
    for_s = _duration(item["for"], f"{where}.for") if "for" in item else None
    if for_s is not None and action not in ("pause",):
        raise UsageError(f"{where}.for only applies to pause",
                         fix="kill has no undo: add a restart fault instead")
    signal_name = item.get("signal")
    rule: dict[str, Any] = {"action": action, "target": target, "for_s": for_s,
                            "signal": str(signal_name) if signal_name else None}
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


def _duration_or_zero(value: Any, where: str) -> float:
    if value in (0, "0", "0s"):
        return 0.0
    return _duration(value, where)
