"""``dslab chat``: run chat servers, talk to them from a terminal."""

from __future__ import annotations

import asyncio
import random
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from dslab import __version__
from dslab.chat.client import ChatClient, Message
from dslab.cli.context import lab_of
from dslab.cli.options import RedisOption
from dslab.cli.output import console, err_console, note, print_json
from dslab.errors import CheckFailed, EnvironmentProblem, LabNotRunning, UsageError
from dslab.lab import services
from dslab.lab.lab import Lab
from dslab.report.runfile import RunMeta, utc_timestamp
from dslab.report.slo import evaluate, operation_figures, parse_slos
from dslab.report.tables import NamedRun, render_report
from dslab.settings import RedisTarget
from dslab.units import parse_duration, parse_rate
from dslab.workload import chat as load

# Chat servers listen from here up unless --port says otherwise.
DEFAULT_PORT = 8100
MAX_INSTANCES = 16

app = typer.Typer(
    help="Run the WebSocket chat (several servers sharing Redis Streams) and "
    "talk to it.",
    no_args_is_help=True,
)



@app.command()
def serve(
    ctx: typer.Context,
    instances: Annotated[
        int, typer.Option("--instances", "-n", help="Server processes, each on "
                          "its own port, all sharing one Redis.")
    ] = 1,
    port: Annotated[
        int | None, typer.Option("--port", help="First port [default: first free "
                                 f"block from {DEFAULT_PORT}].")
    ] = None,
    redis_url: RedisOption = None,
    delivery: Annotated[
        str, typer.Option("--delivery", help="streams (ordered, resumable) or "
                          "pubsub (the naive design: PUBLISH only, loses messages "
                          "when a server or client drops).")
    ] = "streams",
    replicas_ack: Annotated[
        int, typer.Option("--replicas-ack", help="WAIT for N replicas before "
                          "acknowledging a send.")
    ] = 0,
) -> None:
    """Start chat servers as lab services (`chat-1`, `chat-2`, ...).

    Each serves the web UI at / and WebSockets at /ws; `dslab lab status`
    shows them, `dslab chaos kill chat-1` breaks one, `dslab lab down` stops
    them.
    """
    if not 1 <= instances <= MAX_INSTANCES:
        raise UsageError(f"--instances {instances} is outside 1-{MAX_INSTANCES}")
    if delivery not in ("streams", "pubsub"):
        raise UsageError(f"--delivery {delivery!r} is not streams or pubsub")
    if replicas_ack < 0:
        raise UsageError(f"--replicas-ack {replicas_ack} must not be negative")
    lab = lab_of(ctx)
    target = services.redis_target(lab, redis_url)
    args = ["--redis", target.url(with_password=True), "--delivery", delivery,
            "--replicas-ack", str(replicas_ack), *services.own_args(lab, "chat")]

    for chosen in services.choose_ports(instances, port, DEFAULT_PORT):
        record = services.launch(lab, "chat", "dslab.chat", args, chosen,
                                 name_flag="--name")
        console.print(f"{record.name} serves {record.extra['url']} "
                      f"({delivery}, Redis {target}).")
    console.print("Open one in a browser, or `dslab chat connect --room lobby "
                  "--user ada`.")


@app.command()
def connect(
    ctx: typer.Context,
    room: Annotated[str, typer.Option("--room", "-r", help="Room to join.")],
    user: Annotated[str, typer.Option("--user", "-u", help="Your name.")],
    server: Annotated[
        list[str] | None, typer.Option("--server", help="Chat server URL; "
                                       "repeat for failover [default: the lab's "
                                       "chat servers].")
    ] = None,
    history: Annotated[
        int, typer.Option("--history", help="Recent messages to show on join.")
    ] = 20,
) -> None:
    """A terminal chat client: lines you type are sent, messages are printed.

    It reconnects to another server when one dies and resumes from the last
    message it saw, so nothing is missed or shown twice. Ctrl-D or Ctrl-C
    leaves.
    """
    urls = server or [str(r.extra["url"]) for r in
                      services.running(lab_of(ctx), "chat")]
    if not urls:
        raise EnvironmentProblem(
            "no chat server is running in the lab",
            fix="start some with `dslab chat serve --instances 2`, or pass --server",
        )
    asyncio.run(_converse(urls, room, user, history))


def _show(message: Message) -> None:
    stamp = time.strftime("%H:%M:%S", time.localtime(message.ts / 1000))
    console.print(f"[dim]{stamp}[/] [bold]{message.user}[/]: ", end="")
    console.print(message.text, markup=False, highlight=False, soft_wrap=True)


async def _converse(urls: list[str], room: str, user: str, history: int) -> None:
    async with ChatClient(urls, room, user, history=history,
                          on_message=_show) as client:
        await client.wait_joined()
        note(f"Joined {room!r} as {user!r} via {client.url}. Type and press "
             "Enter; Ctrl-D leaves.")
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            text = line.rstrip("\n")
            if text:
                await client.send(text)


@app.command()
def bench(
    ctx: typer.Context,
    users: Annotated[int, typer.Option("--users", "-u", help="Virtual users, "
                                       f"1-{load.MAX_USERS}.")] = 100,
    rooms: Annotated[int, typer.Option("--rooms", help="Rooms; users are spread "
                                       "over them round-robin.")] = 1,
    rate: Annotated[str, typer.Option("--rate", help="Messages per user, e.g. "
                                      "1/s or 12/m.")] = "1/s",
    duration: Annotated[str, typer.Option("--duration", help="Measured time, "
                                          "e.g. 30s (at most 10m).")] = "30s",
    warmup: Annotated[
        str | None, typer.Option("--warmup", help="Sends before measuring; they "
                                 "are checked but not in the latency figures.")
    ] = None,
    servers: Annotated[
        list[str] | None, typer.Option("--servers", help="Chat server URLs on "
                                       "loopback, comma-separated or repeated "
                                       "[default: the lab's chat servers].")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the users' "
                                             "send phases.")] = None,
    processes: Annotated[
        int | None, typer.Option("--processes", "-p", help="Load-generator "
                                 "processes [default: 1 up to "
                                 f"{load.ONE_PROCESS_MAX_USERS} users, else 2].")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Run file [default: "
                                  "runs/chat-bench-TIME.json].")
    ] = None,
    slo: Annotated[
        list[str] | None, typer.Option("--slo", help="A constraint, e.g. "
                                       "'deliver:p99<200ms' or 'lost==0'. "
                                       "Repeatable.")
    ] = None,
    floor: Annotated[
        bool, typer.Option("--floor/--no-floor", help="Measure a raw Redis XADD "
                           "-> XREAD round trip beside the run (needs the lab).")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Virtual users chatting over real WebSockets, checked for lost messages.

    Each user sends --rate messages on a fixed timetable; latency runs from
    the scheduled time to the ack (`ack`) and to each member of the room,
    the sender included (`deliver`). Users fail over and resume like a real
    client. Exits 1 if a message was lost, duplicated or reordered, or an
    --slo failed; 2 for bad options; 3 when no chat server runs.
    """
    lab = lab_of(ctx)
    constraints = parse_slos(slo or [])
    rate_per_s = parse_rate(rate, what="--rate")
    duration_s = parse_duration(duration, what="--duration",
                                max_s=load.MAX_DURATION_S)
    warmup_s = (parse_duration(warmup, what="--warmup", max_s=load.MAX_DURATION_S)
                if warmup else 0.0)
    urls = [url.strip() for item in servers or [] for url in item.split(",")
            if url.strip()]
    if not servers:
        urls = [str(r.extra["url"]) for r in services.running(lab, "chat")]
    if not urls:
        raise EnvironmentProblem(
            "no chat server is running in the lab",
            fix="start some with `dslab chat serve --instances 2`, or pass --servers",
        )
    seed = random.SystemRandom().randrange(2**31) if seed is None else seed
    if processes is None:
        processes = min(load.ChatPlan.default_processes(users), max(users, 1))
    plan = load.ChatPlan(
        tuple(load.require_loopback(url) for url in urls), users, rooms, rate_per_s,
        duration_s, warmup_s, seed=seed, processes=processes,
        run_id=f"bench{int(time.time())}s{seed % 10_000}",
    )
    floor_target = _floor_target(lab) if floor else None

    result = _run_with_progress(plan, floor_target, quiet=as_json)
    state = lab.state()
    meta = RunMeta(
        command=["dslab", *sys.argv[1:]], dslab_version=__version__,
        started_at=_iso(result.wall_measured_from), ended_at=_iso(result.wall_ended),
        seed=seed, topology=state.topology if state else None,
        targets=list(plan.servers),
    )
    faults = load.journal_faults(lab.home, result.wall_measured_from,
                                 result.wall_ended)
    run = result.run_file(meta, faults)
    results = evaluate(constraints, run)
    run.slo = [r.to_dict() for r in results] if results else None
    path = out or Path("runs") / (
        "chat-bench-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S") + ".json")
    run.save(path)

    if as_json:
        print_json({
            "run_file": str(path), "ok": result.verdict.ok,
            "verdict": run.verdict, "reconnects": result.reconnects,
            "operations": {op: f.to_dict() for op, f in
                           operation_figures(run).items()},
            "slo": run.slo or [], "notes": result.notes,
        })
    else:
        render_report(console, [NamedRun(str(path), run)],
                      [(str(path), r) for r in results])
        _print_summary(result, run.histograms, path)
    problems = []
    if not result.verdict.ok:
        problems.append(f"the checker found anomalies ({result.verdict.summary()})")
    failed = [r for r in results if not r.passed]
    if failed:
        problems.append(f"{len(failed)} of {len(results)} SLO checks failed "
                        f"(first: {failed[0].constraint.text}: {failed[0].detail})")
    if problems:
        raise CheckFailed("; ".join(problems), fix=f"see the run file {path}")


def _floor_target(lab: Lab) -> RedisTarget | None:
    try:
        return lab.redis_target()
    except LabNotRunning:
        return None


def _iso(wall_s: float) -> str:
    return utc_timestamp(datetime.fromtimestamp(wall_s, UTC))


def _run_with_progress(
    plan: load.ChatPlan, floor: RedisTarget | None, *, quiet: bool
) -> load.ChatResult:
    """Run the load with one live line on stderr."""
    from rich.live import Live
    from rich.text import Text

    total_s = plan.warmup_s + plan.duration_s
    note(f"{plan.users} users in {plan.rooms} room(s) send {plan.rate_per_s:g}/s "
         f"each to {len(plan.servers)} server(s) for {total_s:g} s "
         f"({plan.processes} process{'es' if plan.processes > 1 else ''}, "
         f"seed {plan.seed}).")
    if quiet:
        return asyncio.run(load.run_chat_load(plan, floor=floor))
    with Live(Text(""), console=err_console, transient=True,
              refresh_per_second=4) as live:

        def show(progress: load.Progress) -> None:
            elapsed = min(max(progress.elapsed_s, 0.0), total_s)
            live.update(Text(
                f"{elapsed:5.1f}/{total_s:g} s  sent {progress.sent:,}  "
                f"acked {progress.acked:,}  delivered {progress.delivered:,}  "
                f"p99 {progress.p99_ms:.1f} ms  errors {progress.errors:,}  "
                f"reconnects {progress.reconnects:,}"
            ))

        return asyncio.run(load.run_chat_load(plan, show, floor=floor))


def _print_summary(result: load.ChatResult, histograms: dict[str, Any],
                   path: Path) -> None:
    console.print(f"sends {result.sends:,}, deliveries {result.deliveries:,}, "
                  f"reconnects {result.reconnects:,}, gaps {result.gaps:,}")
    deliver, floor = histograms.get(load.DELIVER), histograms.get(load.FLOOR)
    if deliver is not None and floor is not None and floor.count and deliver.count:
        ratio = deliver.percentile_us(99.0) / max(floor.percentile_us(99.0), 1)
        console.print(f"deliver p99 is {ratio:.1f}x the Redis XADD->XREAD floor "
                      f"p99 ({floor.percentile_us(99.0) / 1000:.2f} ms) of this run")
    if result.cpu is not None:
        console.print(_cpu_line(result.cpu))
    for line in result.notes:
        console.print(f"note: {line}")
    console.print(f"run file: {path}")


def _cpu_line(cpu: load.CpuUse) -> str:
    """CPU seconds, and cores' worth over the load, of both sides."""
    def used(seconds: float) -> str:
        return f"{seconds:.1f} s ({cpu.cores(seconds):.2f} of a core)"

    servers = ("unknown" if cpu.servers_s is None
               else used(cpu.servers_s) + (
                   "" if cpu.servers_measured == cpu.servers_total
                   else f", {cpu.servers_measured} of {cpu.servers_total} servers"))
    return (f"CPU over the {cpu.window_s:.1f} s of load: chat servers {servers}, "
            f"load generator {used(cpu.generator_s)}")
