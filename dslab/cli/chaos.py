"""``dslab chaos``: kill, pause, resume, restart and slow parts of the lab; heal.

Every fault goes through the fault journal (``<lab home>/faults.jsonl``)
before it is applied, so ``dslab chaos heal`` and ``dslab lab down`` can undo
it later, from any process. Targets are lab names or roles resolved live
(see ``dslab.chaos.targets``).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from dslab import experiment
from dslab.chaos import delay as delays
from dslab.chaos import partition as partitions
from dslab.chaos import process as faults
from dslab.chaos import scenario as scenarios
from dslab.chaos.heal import MAX_DURATION_S, HealResult, heal
from dslab.chaos.journal import Fault, Journal
from dslab.chaos.targets import resolve
from dslab.cli.context import lab_of
from dslab.cli.options import JsonOption
from dslab.cli.output import console, note, print_json
from dslab.errors import CheckFailed, EnvironmentProblem, UsageError
from dslab.lab.lab import Lab
from dslab.lab.netns import Network
from dslab.lab.state import ProcessRecord
from dslab.report.html import write_html
from dslab.report.tables import NamedRun, render_report
from dslab.units import parse_duration

app = typer.Typer(
    help="Kill, pause, resume, restart and slow parts of the lab; list and heal "
    "every fault. Every fault is journaled with its undo before it is applied.",
    no_args_is_help=True,
)

TargetArg = Annotated[
    str,
    typer.Argument(help="A lab name (redis-1, chat-2, sentinel-1) or a role: "
                   "primary, replica, random-replica, random:KIND, all:KIND."),
]
SeedOption = Annotated[
    int | None,
    typer.Option("--seed", help="Seed for random targets, so a run can be "
                 "repeated [default: a fresh one, printed with --json]."),
]
ForOption = Annotated[
    str | None,
    typer.Option("--for", help="Undo automatically after this long (500ms, 10s, "
                 "2m), even if this terminal closes."),
]


def _for_seconds(duration: str | None) -> float | None:
    if duration is None:
        return None
    return parse_duration(duration, what="--for", max_s=MAX_DURATION_S)


def _lab(ctx: typer.Context) -> Lab:
    return lab_of(ctx)


def _targets(lab: Lab, target: str, seed: int | None) -> tuple[list[ProcessRecord],
                                                               int]:
    chosen_seed = random.SystemRandom().randrange(2**31) if seed is None else seed
    return resolve(lab, target, random.Random(chosen_seed)), chosen_seed


def _clock(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at))


def _fault_json(fault: Fault, **more: Any) -> dict[str, Any]:
    body = fault.to_json()
    body.pop("event")
    return {**body, **more}


@app.command()
def kill(
    ctx: typer.Context,
    target: TargetArg,
    signal_name: Annotated[
        str, typer.Option("--signal", "-s", help="Signal to send: KILL, TERM, INT, "
                          "or a number.")
    ] = "KILL",
    seed: SeedOption = None,
    as_json: JsonOption = False,
) -> None:
    """Send a signal (SIGKILL by default): a crash with no goodbye.

    A kill has no undo; it is journaled for the timeline. Bring the node
    back with `dslab chaos restart NAME` (or `dslab lab up`).
    """
    signum = faults.parse_signal(signal_name)
    lab = _lab(ctx)
    records, used_seed = _targets(lab, target, seed)
    outcomes = [faults.kill(lab, record, signum) for record in records]
    if as_json:
        print_json({"seed": used_seed,
                    "faults": [_fault_json(o.fault, closed=list(o.healed))
                               for o in outcomes]})
        return
    for outcome in outcomes:
        fault = outcome.fault
        console.print(f"Killed {fault.target} (pid {fault.pid}) with "
                      f"{signum.name} as fault {fault.id}; it has no undo. "
                      f"Bring it back: {fault.remedy}")


@app.command()
def pause(
    ctx: typer.Context,
    target: TargetArg,
    duration: ForOption = None,
    seed: SeedOption = None,
    as_json: JsonOption = False,
) -> None:
    """Freeze a process with SIGSTOP: it keeps its sockets but stops answering,
    like a node stuck in a long GC pause or a hung VM."""
    duration_s = _for_seconds(duration)
    lab = _lab(ctx)
    records, used_seed = _targets(lab, target, seed)
    outcomes = [faults.pause(lab, record, duration_s=duration_s)
                for record in records]
    if as_json:
        print_json({"seed": used_seed,
                    "faults": [_fault_json(o.fault, already=o.already)
                               for o in outcomes]})
        return
    for outcome in outcomes:
        fault = outcome.fault
        if outcome.already:
            console.print(f"{fault.target} (pid {fault.pid}) is already paused "
                          f"by fault {fault.id}; nothing new applied.")
            continue
        timer = (f" It heals itself at {_clock(fault.until)}."
                 if fault.until is not None else "")
        console.print(f"Paused {fault.target} (pid {fault.pid}) as fault "
                      f"{fault.id}. Undo: dslab chaos heal {fault.id}.{timer}")


@app.command()
def resume(
    ctx: typer.Context,
    target: TargetArg,
    seed: SeedOption = None,
    as_json: JsonOption = False,
) -> None:
    """Continue a paused process (SIGCONT) and mark its pause healed."""
    lab = _lab(ctx)
    records, used_seed = _targets(lab, target, seed)
    outcomes = [faults.resume(lab, record) for record in records]
    if as_json:
        print_json({"seed": used_seed,
                    "resumed": [{"target": o.fault.target, "pid": o.fault.pid,
                                 "healed": list(o.healed)} for o in outcomes]})
        return
    for outcome in outcomes:
        healed = (f"; healed {', '.join(outcome.healed)}" if outcome.healed
                  else "; it was not paused by dslab")
        console.print(f"Resumed {outcome.fault.target} (pid {outcome.fault.pid})"
                      f"{healed}.")


@app.command()
def restart(
    ctx: typer.Context,
    target: TargetArg,
    seed: SeedOption = None,
    as_json: JsonOption = False,
) -> None:
    """Stop a process (if it runs) and start it again with its data."""
    lab = _lab(ctx)
    records, used_seed = _targets(lab, target, seed)
    outcomes = [faults.restart(lab, record) for record in records]
    if as_json:
        print_json({"seed": used_seed,
                    "faults": [_fault_json(o.fault, new_pid=o.new_pid,
                                           closed=list(o.healed))
                               for o in outcomes]})
        return
    for outcome in outcomes:
        console.print(f"Restarted {outcome.fault.target} (pid {outcome.fault.pid}"
                      f" -> {outcome.new_pid}) as fault {outcome.fault.id}.")


@app.command()
def delay(
    ctx: typer.Context,
    target: TargetArg,
    ms: Annotated[float, typer.Option("--ms", help="Added delay in ms.")] = 0.0,
    jitter: Annotated[
        float, typer.Option("--jitter", help="Spread of the delay, +- ms.")
    ] = 0.0,
    loss: Annotated[
        str | None, typer.Option("--loss", help="Packet loss, e.g. 1% (netem only).")
    ] = None,
    rate: Annotated[
        str | None, typer.Option("--rate", help="Bandwidth limit in tc units, "
                                 "e.g. 1mbit, 500kbit, 100kbps.")
    ] = None,
    backend: Annotated[
        delays.Backend,
        typer.Option("--backend", help="netem: the kernel slows every client "
                     "(root, sch_netem). proxy: a fault proxy slows the clients "
                     "that connect through it (no privileges); on a `--network "
                     "proxy` lab that is everyone, replication included."),
    ] = delays.Backend.NETEM,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the tc commands; change nothing.")
    ] = False,
    duration: ForOption = None,
    seed: SeedOption = None,
    as_json: JsonOption = False,
) -> None:
    """Slow the link to a node: delay with jitter, loss and a rate limit.

    With --backend netem (the default) the kernel is probed first; where it
    has no netem this exits 3 and suggests --backend proxy. The proxy backend
    affects only clients that connect to the proxy address it prints; on a
    lab started with `--network proxy` every path to the node does.
    """
    spec = delays.DelaySpec(ms=ms, jitter_ms=jitter,
                            loss_pct=delays.parse_loss(loss) if loss else 0.0,
                            rate=rate)
    duration_s = _for_seconds(duration)
    lab = _lab(ctx)
    records, used_seed = _targets(lab, target, seed)

    if dry_run:
        if backend is not delays.Backend.NETEM:
            note("--dry-run shows tc commands; the proxy backend has none.")
        for record in records:
            typer.echo(f"# {record.name} (port {record.port})")
            typer.echo(delays.dry_run(record, spec))
        return

    outcomes = []
    for record in records:
        if backend is delays.Backend.NETEM:
            outcomes.append(delays.delay_netem(lab, record, spec,
                                               duration_s=duration_s))
        else:
            outcomes.append(delays.delay_proxy(lab, record, spec,
                                               duration_s=duration_s,
                                               seed=used_seed))
    every_path = lab.network_mode() is Network.PROXY
    if as_json:
        print_json({"seed": used_seed,
                    "faults": [_fault_json(o.fault, proxy_address=o.proxy_address,
                                           replaced=list(o.replaced))
                               for o in outcomes]})
        return
    for outcome in outcomes:
        _render_delay(outcome, every_path=every_path)


def _render_delay(outcome: delays.DelayOutcome, *, every_path: bool = False
                  ) -> None:
    fault = outcome.fault
    timer = (f" It heals itself at {_clock(fault.until)}."
             if fault.until is not None else "")
    replaced = (f" (replaces {', '.join(outcome.replaced)})"
                if outcome.replaced else "")
    console.print(f"Delay {fault.params['summary']} on {fault.target} as fault "
                  f"{fault.id}{replaced}. Undo: dslab chaos heal {fault.id}.{timer}")
    if outcome.proxy_address is not None and every_path:
        console.print(f"Slowed at the lab's proxy {outcome.proxy_address}: "
                      "clients, replication and Sentinels all pass it.")
    elif outcome.proxy_address is not None:
        console.print(f"Proxy address: {outcome.proxy_address}  (clients use "
                      f"--redis redis://{outcome.proxy_address})")
        console.print("Only clients that connect through the proxy are slowed; "
                      "direct clients, replication and Sentinels are not "
                      "(a lab started with `--network proxy` slows them all).")


@app.command()
def partition(
    ctx: typer.Context,
    side_a: Annotated[
        str | None,
        typer.Argument(help="One side: lab names or roles, comma-separated "
                       "(redis-1,sentinel-1), or `host` for the clients' side."),
    ] = None,
    side_b: Annotated[
        str | None, typer.Argument(help="The other side, written the same way.")
    ] = None,
    isolate: Annotated[
        str | None,
        typer.Option("--isolate", help="Cut this node off from every other node "
                     "and from the host."),
    ] = None,
    one_way: Annotated[
        bool,
        typer.Option("--one-way", help="Drop only what the first side sends to "
                     "the second; the second side's packets still arrive. On a "
                     "proxy lab: only connections the first side opens are cut."),
    ] = False,
    duration: ForOption = None,
    seed: SeedOption = None,
    as_json: JsonOption = False,
) -> None:
    """Cut the links between two groups of nodes.

    Needs a lab whose nodes have addresses of their own: `dslab lab up
    --network proxy` (no root; the lab's fault proxies black-hole the other
    side's connections) or `--network netns` (root; real nftables rules).
    Traffic between the sides stops silently, as at a dead switch.
    Examples: `partition redis-1 redis-2`, `partition redis-1,sentinel-1
    redis-2,redis-3,sentinel-2,sentinel-3`, `partition --isolate primary`
    (from every node and the host), `partition host redis-1 --one-way`
    (clients cannot reach redis-1).
    """
    duration_s = _for_seconds(duration)
    lab = _lab(ctx)
    network = partitions.lab_network(lab)
    if isolate is not None and (side_a is not None or side_b is not None):
        raise UsageError("give either --isolate NODE or two sides, not both",
                         fix="dslab chaos partition --isolate redis-1")
    if isolate is None and (side_a is None or side_b is None):
        raise UsageError("a partition needs two sides (or --isolate NODE)",
                         fix="dslab chaos partition redis-1 redis-2,redis-3")
    chosen_seed = random.SystemRandom().randrange(2**31) if seed is None else seed
    rng = random.Random(chosen_seed)
    first = partitions.resolve_side(lab, network, isolate or side_a or "", rng)
    second = (partitions.everyone_but(network, first) if isolate is not None
              else partitions.resolve_side(lab, network, side_b or "", rng))
    outcome = partitions.partition(lab, first, second, one_way=one_way,
                                   duration_s=duration_s)
    fault = outcome.fault
    if as_json:
        print_json({"seed": chosen_seed,
                    "faults": [_fault_json(fault, cuts=[list(cut) for cut in
                                                        outcome.cuts],
                                           proxies=[cut.to_json() for cut in
                                                    outcome.proxy_cuts])]})
        return
    arrow = "->" if one_way else "<->"
    timer = (f" It heals itself at {_clock(fault.until)}."
             if fault.until is not None else "")
    how = (f"cut on {len(outcome.proxy_cuts)} lab proxy(ies)" if outcome.proxy_cuts
           else f"nftables table {_table_words(outcome)} in "
           f"{len(outcome.rules)} namespace(s)")
    console.print(f"Partitioned {','.join(first)} {arrow} {','.join(second)} "
                  f"as fault {fault.id}: {how}. Undo: dslab chaos heal "
                  f"{fault.id}.{timer}")


def _table_words(outcome: partitions.PartitionOutcome) -> str:
    return str(outcome.fault.params.get("table", outcome.table))


@app.command()
def status(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Every active fault: what, where, since, until, and how to undo it."""
    journal = Journal(_lab(ctx).home)
    active = journal.active_faults()
    timers = journal.timers()
    if as_json:
        print_json({"faults": [
            _fault_json(fault, what=fault.describe(),
                        undo_command=f"dslab chaos heal {fault.id}",
                        healer_pid=timers[fault.id].pid if fault.id in timers
                        else None)
            for fault in active
        ]})
        return
    if not active:
        console.print("No active faults.")
        return

    now = time.time()
    table = Table(title=f"{len(active)} active fault(s)", title_justify="left")
    for column in ("id", "fault", "target", "since", "until", "undo"):
        table.add_column(column)
    for fault in active:
        until = "-"
        if fault.until is not None:
            left = fault.until - now
            until = (f"{_clock(fault.until)} (in {left:.0f}s)" if left > 0
                     else f"{_clock(fault.until)} (overdue: run heal)")
        table.add_row(fault.id, fault.describe(), fault.target,
                      f"{_clock(fault.started_at)} ({now - fault.started_at:.0f}s "
                      "ago)", until, f"dslab chaos heal {fault.id}: "
                      f"{_undo_words(fault)}")
    console.print(table)
    console.print("Undo everything: dslab chaos heal")


def _undo_words(fault: Fault) -> str:
    action = fault.undo or {}
    if action.get("action") == "sigcont":
        return f"SIGCONT to pid {action.get('pid')}"
    if action.get("action") == "proxy-clear":
        return f"clear the faults of {fault.params.get('proxy', 'the proxy')}"
    if action.get("action") == "netem-undo":
        return f"remove dslab's qdisc from {action.get('device')}"
    if action.get("action") == "nft-delete-table":
        return (f"delete nftables table {action.get('table')} in "
                f"{len(action.get('namespaces') or [])} namespace(s)")
    return str(action.get("action"))


@app.command("heal")
def heal_command(
    ctx: typer.Context,
    fault_id: Annotated[
        str | None, typer.Argument(help="Fault id (see `dslab chaos status`); "
                                   "all active faults when left out.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Undo every active fault (or one). Safe to run any number of times."""
    results = heal(_lab(ctx).home, fault_id)
    if as_json:
        print_json({"healed": [_heal_json(r) for r in results if r.ok],
                    "failed": [_heal_json(r) for r in results if not r.ok]})
    elif not results:
        console.print("No active faults; nothing to heal.")
    for result in results if not as_json else []:
        verb = "Healed" if result.ok else "Could not heal"
        console.print(f"{verb} {result.fault.id}: {result.fault.describe()} "
                      f"({result.outcome}).")

    failed = [result for result in results if not result.ok]
    if failed:
        raise EnvironmentProblem(
            f"{len(failed)} fault(s) could not be undone: "
            + "; ".join(f"{r.fault.id}: {r.outcome}" for r in failed),
            fix="they stay in the journal; fix the cause and run "
            "`dslab chaos heal` again",
        )


def _heal_json(result: HealResult) -> dict[str, Any]:
    return {"id": result.fault.id, "what": result.fault.describe(),
            "outcome": result.outcome}


@app.command("run")
def run_scenario(
    ctx: typer.Context,
    scenario_file: Annotated[
        Path, typer.Argument(help="A scenario .toml: lab, servers, workload, "
                             "faults and constraints (see docs/scenarios.md).",
                             metavar="SCENARIO")
    ],
    seed: Annotated[
        int | None, typer.Option("--seed", help="Seed of the fault schedule and "
                                 "random targets [default: the file's].")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Run file [default: "
                                  "runs/scenario-NAME-TIME.json].")
    ] = None,
    slo: Annotated[
        list[str] | None, typer.Option("--slo", help="A constraint on top of the "
                                       "file's, e.g. 'deliver:p99<200ms'.")
    ] = None,
    html: Annotated[
        Path | None, typer.Option("--html", help="Also write the report as HTML.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the fault schedule and stop.")
    ] = False,
) -> None:
    """Run a scenario: its workload under a scheduled, seeded series of faults,
    then check its constraints (exit 0 all met, 1 one failed).

    The same file and seed give the same schedule. Every fault is healed when
    the run ends, also on Ctrl-C; the lab and its servers are left running so
    you can look around (`dslab lab down` when done).
    """
    scenario = scenarios.load(scenario_file)
    used_seed = scenario.seed if seed is None else seed
    schedule = scenarios.plan(scenario, used_seed)
    console.print(f"Scenario {scenario.name!r}: {scenario.workload} workload for "
                  f"{scenario.duration_s:g} s on a {scenario.topology.value} lab, "
                  f"seed {used_seed}, {len(schedule)} fault(s):", markup=False)
    for fault in schedule:
        console.print(f"  {fault.describe()}", markup=False)
    if dry_run:
        return

    began = time.monotonic()

    def event(what: str) -> None:
        note(f"[{time.monotonic() - began:6.1f}s] {what}")

    result = experiment.run(scenario, _lab(ctx), seed=used_seed, out=out,
                            extra_slo=slo, on_event=event)
    named = [NamedRun(str(result.run_path), result.run)]
    render_report(console, named, [(str(result.run_path), r) for r in result.slo])
    if html is not None:
        write_html(html, named, [(str(result.run_path), r) for r in result.slo])
        note(f"HTML report written to {html}")
    note(f"Run file: {result.run_path}")
    if not result.passed:
        failures = result.failures()
        raise CheckFailed(
            f"scenario {scenario.name!r} failed {len(failures)} check(s): "
            + "; ".join(failures),
            fix=f"see the report above and `dslab report latency {result.run_path}`",
        )
