"""One experiment from a scenario file: lab, services, workload, faults, verdict.

``dslab chaos run`` and ``dslab exercise check`` both come here. The steps:

1. check that this machine can run the scenario at all (a netns lab needs
   root, a netem delay needs netem) and refuse before anything starts; bring
   up the scenario's lab on its network (or reuse the same one already
   running) and start the chat, shortener or worker services it asks for;
2. start the workload as its own process (``dslab chat bench`` or ``dslab
   shorten bench`` with the scenario's options), and at the same moment the
   nemesis, which applies the seeded fault schedule through the journal;
3. when the workload ends: stop the nemesis and heal every fault (also on
   Ctrl-C or an error); with chat workers, wait for them to drain and audit
   what they processed; rebuild the run's fault timeline from the journal,
   check the constraints, write the run file, report.

Fault times count from the moment the workload's load begins, which the
bench writes to a file the nemesis waits for (``LOAD_START_FILE``): its
set-up (connecting users, creating links) does not use up the schedule. The
warm-up is part of the load; a scenario that wants faults in the measured
window schedules them after it.

A run can grade someone else's server instead of dslab's own (``dslab
exercise check --target``): a ``ServerTarget`` either names servers already
running (the workload is pointed at them and faults aimed at dslab's servers
of that kind are skipped, each with a note) or gives a command the lab
launches as a supervised service in their place (so kill, pause and restart
hit the learner's process).

This module sits above ``chaos``, ``workload`` and ``report``; it departs
from the layout of DESIGN.md, which has no place for code that uses all
three (see docs/scenarios.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

from dslab import __version__
from dslab.chaos.heal import heal_all
from dslab.chaos.journal import APPLIED, HEALED, Journal
from dslab.chaos.scenario import Nemesis, PlannedFault, Scenario, check_machine, plan
from dslab.chat.worker import RoomAudit, audit
from dslab.errors import CheckFailed, DslabError, Interrupted, UsageError
from dslab.lab import services
from dslab.lab.lab import Lab
from dslab.lab.state import ProcessRecord
from dslab.redisconn import async_client
from dslab.report.runfile import FaultEvent, RunFile, RunMeta, utc_timestamp
from dslab.report.slo import SloResult, evaluate, parse_slos
from dslab.workload.shards import LOAD_START_FILE_ENV

log = logging.getLogger(__name__)

SERVICE_MODULES = {"chat": "dslab.chat", "shortener": "dslab.shortener",
                   "worker": "dslab.chat.worker"}
SERVICE_PORTS = {"chat": 8100, "shortener": 8080, "worker": 8300}
# The process name flag for services that want to know their lab name.
SERVICE_NAME_FLAGS = {"chat": "--name", "shortener": None, "worker": "--name"}
BENCH_COMMANDS = {"chat": ["chat", "bench"], "shortener": ["shorten", "bench"]}
# The timeline keeps faults from the experiment's start on; those before the
# measured window (during connect and warmup) show at negative times.
FAULT_MARGIN_S = 1.0
# After the workload, how long the worker pool gets to finish what is pending:
# a killed worker's entries are claimed after 2 s idle (CLAIM_IDLE_MS).
WORKER_DRAIN_S = 15.0
# In the lab folder: the instant the workload's load began (see Nemesis).
LOAD_START_FILE = "load-started"
# A workload still running this long after its duration is stuck.
WORKLOAD_GRACE_S = 120.0


@dataclass(frozen=True)
class ServerTarget:
    """The learner's own server in place of dslab's, for one service kind.

    ``urls``: servers already running (``--target URL``). ``command``: a
    command line with ``{port}`` and ``{redis}`` that the lab launches, once
    per instance the scenario asks for (``--target-cmd``).
    """

    kind: str
    urls: tuple[str, ...] = ()
    command: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in BENCH_COMMANDS:
            raise UsageError(f"no server kind {self.kind!r} to replace",
                             fix=f"use one of {sorted(BENCH_COMMANDS)}")
        if bool(self.urls) == (self.command is not None):
            raise UsageError("give either the URLs of running servers or a "
                             "command that starts one, not both (nor neither)",
                             fix="--target URL or --target-cmd 'CMD {port} {redis}'")

    def hits(self, fault: PlannedFault) -> bool:
        """Whether ``fault`` is aimed at dslab's own servers of this kind."""
        text = fault.target.strip()
        return (text in (f"random:{self.kind}", f"all:{self.kind}")
                or text.startswith(f"{self.kind}-"))


@dataclass
class ExperimentResult:
    scenario: Scenario
    seed: int
    schedule: list[PlannedFault]
    run: RunFile
    run_path: Path
    slo: list[SloResult] = field(default_factory=list)
    workload_exit: int = 0
    fault_errors: list[str] = field(default_factory=list)
    # Faults left out because they aimed at servers replaced by a target.
    skipped: list[PlannedFault] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.workload_exit == 0 and all(result.passed for result in self.slo)

    def failures(self) -> list[str]:
        found = [f"{r.constraint.text}: {r.detail}" for r in self.slo if not r.passed]
        if self.workload_exit != 0:
            found.append(f"the workload reported a failure (exit {self.workload_exit})")
        return found


def run(
    scenario: Scenario,
    lab: Lab,
    *,
    seed: int | None = None,
    out: Path | None = None,
    extra_slo: list[str] | None = None,
    on_event: Callable[[str], None] | None = None,
    target: ServerTarget | None = None,
) -> ExperimentResult:
    """Run ``scenario`` against ``lab``; every fault is healed before returning.

    With ``target`` the learner's servers stand in for dslab's (see module).
    """
    seed = scenario.seed if seed is None else seed
    constraints = parse_slos([*scenario.slo, *(extra_slo or [])])
    schedule = plan(scenario, seed)
    skipped: list[PlannedFault] = []
    if target is not None and target.urls:
        skipped = [fault for fault in schedule if target.hits(fault)]
        schedule = [fault for fault in schedule if not target.hits(fault)]
        for fault in skipped:
            _tell(on_event, f"skipped {fault.action} {fault.target} at "
                  f"{fault.at_s:g}s: it aims at dslab's own {target.kind} "
                  "servers, and --target replaces them")
    out = out or Path("runs") / f"scenario-{_slug(scenario.name)}-{_stamp()}.json"

    check_machine(scenario)
    lab.up(scenario.topology, scenario.persistence, network=scenario.network)
    target_urls = _start_services(scenario, lab, on_event, target)

    argv = bench_argv(scenario, seed, out)
    if argv and target is not None and scenario.workload == target.kind:
        argv += target_flags(target.kind, target_urls)
    load_started = lab.home / LOAD_START_FILE
    load_started.unlink(missing_ok=True)
    nemesis = Nemesis(lab, schedule, seed, on_event,
                      load_start_file=load_started if argv else None)
    started_wall, started = time.time(), utc_timestamp()
    workload_exit = 0
    try:
        workload = _start_workload(argv, lab, load_started)
        nemesis.start()
        workload_exit = _wait(workload, scenario.duration_s)
    except KeyboardInterrupt:
        raise Interrupted("interrupted: every fault was healed") from None
    finally:
        nemesis.stop()
        heal_all(lab.home)
    ended_wall = time.time()

    run_file = _run_file(scenario, seed, out, argv, started, lab)
    if any(spec.kind == "worker" for spec in scenario.services):
        _audit_workers(lab, run_file, on_event)
    # On the run's own clock, so faults line up with its per-second series.
    run_started = _epoch(run_file.meta.started_at, started_wall)
    run_file.faults = journal_timeline(lab.home, run_started, ended_wall,
                                       since=started_wall)
    results = evaluate(constraints, run_file)
    run_file.slo = [result.to_dict() for result in results]
    run_file.save(out)

    return ExperimentResult(scenario, seed, schedule, run_file, out, results,
                            workload_exit, nemesis.errors, skipped)


def bench_argv(scenario: Scenario, seed: int, out: Path) -> list[str]:
    """The workload's command line: the matching bench with the file's options."""
    if scenario.workload == "idle":
        return []
    return [sys.executable, "-m", "dslab", *BENCH_COMMANDS[scenario.workload],
            "--duration", f"{scenario.duration_s:g}s", "--seed", str(seed),
            "--out", str(out), *scenario.workload_options]


def target_flags(kind: str, urls: list[str]) -> list[str]:
    """The bench options that point a workload at exactly these servers."""
    if kind == "chat":
        return ["--servers", ",".join(urls)]
    if len(urls) != 1:
        raise UsageError(f"the shortener workload drives one server, not {len(urls)}",
                         fix="give a single --target URL (one server, any workers)")
    return ["--server", urls[0]]


def journal_timeline(home: Path, wall_from: float, wall_to: float,
                     *, since: float | None = None) -> list[FaultEvent]:
    """The faults applied and healed between ``since`` (default ``wall_from``)
    and ``wall_to``, as a run file's timeline: seconds since ``wall_from``."""
    journal = Journal(home)
    targets = {fault.id: fault.target for fault in journal.faults()}
    first = (wall_from if since is None else min(since, wall_from)) - FAULT_MARGIN_S
    timeline = []
    for event in journal.events():
        at = float(event.get("started_at") or event.get("at") or 0.0)
        if not first <= at <= wall_to:
            continue
        if event["event"] == APPLIED:
            action, detail = str(event.get("kind")), str(event["id"])
        elif event["event"] == HEALED:
            action, detail = "heal", f"{event['id']}: {event.get('outcome', '')}"
        else:
            continue
        target = str(event.get("target") or targets.get(str(event["id"]), ""))
        timeline.append(FaultEvent(round(at - wall_from, 3), action, target, detail))
    return sorted(timeline, key=lambda fault: fault.at)


def _audit_workers(
    lab: Lab, run_file: RunFile, on_event: Callable[[str], None] | None
) -> None:
    """Grade the worker pool on the run's rooms: wait (bounded) until nothing
    is pending, then add ``worker_missed``, ``worker_duplicated`` and
    ``worker_pending`` to the checker verdict's totals, where SLOs such as
    ``worker_missed==0`` read them."""
    if run_file.verdict is None or not isinstance(run_file.verdict.get("rooms"), dict):
        raise CheckFailed("the scenario runs chat workers but its workload "
                          "produced no chat verdict to grade them against",
                          fix='use kind = "chat" in [workload]')
    rooms = sorted(run_file.verdict["rooms"])
    _tell(on_event, f"waiting up to {WORKER_DRAIN_S:g}s for the workers to "
          "finish what is pending")
    audits = asyncio.run(_drained_audit(lab, rooms))
    totals = run_file.verdict.setdefault("total", {})
    totals["worker_entries"] = sum(a.entries for a in audits)
    totals["worker_processed"] = sum(a.processed for a in audits)
    totals["worker_missed"] = sum(a.missed for a in audits)
    totals["worker_duplicated"] = sum(a.duplicated for a in audits)
    totals["worker_pending"] = sum(a.pending for a in audits)
    _tell(on_event, f"workers processed {totals['worker_processed']} of "
          f"{totals['worker_entries']} entries; {totals['worker_pending']} pending")


async def _drained_audit(lab: Lab, rooms: list[str]) -> list[RoomAudit]:
    client = async_client(lab.redis_target())
    try:
        deadline = time.monotonic() + WORKER_DRAIN_S
        while True:
            audits = await audit(client, rooms)
            settled = all(a.pending == 0 and a.processed >= a.entries
                          for a in audits)
            # With no live worker nothing will change: no point waiting.
            stuck = not services.running(lab, "worker")
            if settled or stuck or time.monotonic() >= deadline:
                return audits
            await asyncio.sleep(0.25)
    finally:
        await client.aclose()


def _start_services(
    scenario: Scenario, lab: Lab, on_event: Callable[[str], None] | None,
    server_target: ServerTarget | None = None,
) -> list[str]:
    """Start what the scenario asks for; the URLs of the target's servers."""
    target = lab.redis_target()
    target_urls: list[str] = []
    if server_target is not None and server_target.urls:
        target_urls = list(server_target.urls)
    for spec in scenario.services:
        if server_target is not None and spec.kind == server_target.kind:
            if server_target.command is not None:
                records = _launch_learner(lab, spec.instances, server_target,
                                          target.url(with_password=True))
                target_urls += [str(record.extra["url"]) for record in records]
                for record in records:
                    _tell(on_event, f"started {record.name} (your server) at "
                          f"{record.extra['url']}")
            continue
        missing = spec.instances - len(services.running(lab, spec.kind))
        if missing <= 0:
            continue
        args = ["--redis", target.url(with_password=True),
                *services.own_args(lab, spec.kind), *spec.options]
        ports = services.choose_ports(missing, None, SERVICE_PORTS[spec.kind])
        for port in ports:
            record = services.launch(lab, spec.kind, SERVICE_MODULES[spec.kind],
                                     args, port,
                                     name_flag=SERVICE_NAME_FLAGS[spec.kind])
            _tell(on_event, f"started {record.name} at {record.extra['url']}")
    if server_target is not None and not target_urls:
        raise UsageError(
            f"the scenario starts no {server_target.kind} server, so there is "
            "nothing for your command to replace",
            fix="use --target URL with a server you started yourself",
        )
    return target_urls


def _launch_learner(
    lab: Lab, instances: int, server_target: ServerTarget, redis_url: str
) -> list[ProcessRecord]:
    """Start the learner's command as lab services of the replaced kind, so
    that the workload finds them and faults aimed at that kind hit them.

    Ready when the port accepts connections: a learner's server owes dslab
    no health endpoint.
    """
    assert server_target.command is not None
    ports = services.choose_ports(instances, None, SERVICE_PORTS[server_target.kind])
    records = []
    for port in ports:
        try:
            text = server_target.command.format(port=port, redis=redis_url)
            argv = shlex.split(text)
        except (KeyError, IndexError, ValueError) as exc:
            raise UsageError(
                f"cannot use the server command {server_target.command!r}: {exc}",
                fix="write it as one command line; only {port} and {redis} are "
                "filled in (double other braces: {{ }})",
            ) from None
        if not argv:
            raise UsageError("the server command is empty",
                             fix="e.g. --target-cmd './myserver --port {port}'")
        url = f"http://127.0.0.1:{port}"
        # Run where the learner typed the command, so `./my-server` works.
        records.append(lab.launch(lab.next_name(server_target.kind),
                                  server_target.kind, argv, port=port,
                                  extra={"url": url, "command": text},
                                  workdir=Path.cwd()))
    return records


def _tell(on_event: Callable[[str], None] | None, what: str) -> None:
    if on_event is not None:
        on_event(what)


def _start_workload(
    argv: list[str], lab: Lab, load_started: Path
) -> subprocess.Popen[bytes] | None:
    if not argv:
        return None
    return subprocess.Popen(argv, env={**os.environ, "DSLAB_HOME": str(lab.home),
                                       LOAD_START_FILE_ENV: str(load_started)})


def _wait(workload: subprocess.Popen[bytes] | None, duration_s: float) -> int:
    if workload is None:
        time.sleep(duration_s)  # the idle workload: just the faults
        return 0
    try:
        return workload.wait(timeout=duration_s + WORKLOAD_GRACE_S)
    except subprocess.TimeoutExpired:
        workload.kill()
        workload.wait()
        raise DslabError(
            f"the workload did not finish within {WORKLOAD_GRACE_S:.0f} s of its "
            "duration and was killed",
            fix="read its output above; the lab may be overloaded",
        ) from None
    except BaseException:
        workload.terminate()
        workload.wait(timeout=10)
        raise


def _run_file(
    scenario: Scenario, seed: int, out: Path, argv: list[str], started: str,
    lab: Lab,
) -> RunFile:
    meta_command = ["dslab", "chaos", "run", str(scenario.path)]
    if argv and out.exists():
        run_file = RunFile.load(out)
        # The workload's own command line stays readable after the marker.
        run_file.meta = replace(
            run_file.meta, command=[*meta_command, "# workload:", *argv[2:]],
            topology=scenario.topology.value,
        )
        return run_file
    if argv:
        raise CheckFailed(
            f"the workload wrote no run file at {out}",
            fix="read the workload's error above",
        )
    meta = RunMeta(
        command=meta_command, dslab_version=__version__, started_at=started,
        ended_at=utc_timestamp(), seed=seed, topology=scenario.topology.value,
        targets=[str(lab.redis_target())],
    )
    return RunFile(meta=meta)


def _epoch(iso: str, default: float) -> float:
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return default


def _slug(name: str) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    if not slug:
        raise UsageError("a scenario needs a name made of letters or digits")
    return "-".join(part for part in slug.split("-") if part)[:40]


def _stamp() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")
