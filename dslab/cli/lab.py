"""``dslab lab``: start, inspect, restart and stop the local Redis lab."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from dslab.cli.context import lab_of
from dslab.cli.options import JsonOption
from dslab.cli.output import console, note, print_json
from dslab.errors import UsageError
from dslab.lab import bench as lab_bench
from dslab.lab.lab import Lab, LabStatus, network_mode
from dslab.lab.netns import Network
from dslab.lab.supervisor import log_tail
from dslab.settings import Persistence, Topology

app = typer.Typer(
    help="Start, inspect, restart and stop a local Redis lab "
    "(standalone, replicated with Sentinel, or Cluster).",
    no_args_is_help=True,
)

RedisServerOption = Annotated[
    str | None,
    typer.Option("--redis-server", envvar="DSLAB_REDIS_SERVER", show_envvar=True,
                 help="redis-server binary to run [default: PATH, then the one "
                 "shipped with dslab]."),
]
# How often `logs --follow` looks for new lines.
FOLLOW_POLL_S = 0.25


def _lab(ctx: typer.Context, redis_server: str | None = None) -> Lab:
    return lab_of(ctx, redis_server)


@app.command()
def up(
    ctx: typer.Context,
    topology: Annotated[
        Topology,
        typer.Option("--topology", "-t", help="standalone: one node. replicated: "
                     "a primary, 2 replicas, 3 Sentinels. cluster: 3 primaries, "
                     "3 replicas."),
    ] = Topology.STANDALONE,
    persistence: Annotated[
        Persistence,
        typer.Option("--persistence", "-p", help="AOF fsync policy: always (no "
                     "acknowledged write lost on a crash), everysec (up to ~1 s "
                     "lost), off (no persistence)."),
    ] = Persistence.EVERYSEC,
    port: Annotated[
        int | None,
        typer.Option("--port", help="First port; nodes use consecutive ports "
                     "[default: the first free block from 7000]."),
    ] = None,
    config: Annotated[
        list[str] | None,
        typer.Option("--config", "-c", help="Extra redis.conf line for every "
                     "Redis node, e.g. -c 'maxmemory 64mb'. Repeatable."),
    ] = None,
    network: Annotated[
        Network,
        typer.Option("--network", help="loopback: every node on 127.0.0.1. "
                     "proxy (no root): every node on its own 127.0.0.x address "
                     "behind a lab fault proxy that every path goes through, so "
                     "`dslab chaos partition` and `delay --backend proxy` reach "
                     "replication, Sentinel and the Cluster bus too. "
                     "netns (root, Linux): every node in its own network "
                     "namespace on a private bridge, so `dslab chaos partition` "
                     "can cut real links."),
    ] = Network.LOOPBACK,
    redis_server: RedisServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Start a lab and wait until every node is ready.

    Idempotent: if the same lab already runs, nothing new starts (dead nodes
    are brought back). Nodes run detached: they keep running after this
    command returns, until `dslab lab down`.
    """
    lab = _lab(ctx, redis_server)
    result = lab.up(topology, persistence, base_port=port, extra_config=config,
                    network=network)
    if as_json:
        print_json({
            "started": result.started,
            "already_running": result.already_running,
            "seconds": round(result.seconds, 3),
            "redis_server": result.state.redis_server,
            "redis_url": str(lab.redis_target()),
            **_status_json(lab.status()),
        })
        return

    server = result.state.redis_server
    if result.already_running:
        note(f"A {result.state.topology} lab is already running in {lab.home}; "
             "nothing new was started.")
    elif result.binary is None:
        note(f"The lab was running; restarted dead nodes: {', '.join(result.started)}")
    else:
        note(f"Using redis-server {server['version']} at {server['path']} "
             f"(from {server['source']}).")
        count = len(result.started)
        note(f"Started a {topology.value} lab with {count} "
             f"{'node' if count == 1 else 'nodes'} in {result.seconds:.2f} s.")
    _render_status(lab.status(), lab)


@app.command()
def status(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Show every node with its live role, health, replication and memory.

    Health is asked of each process now: a dead pid is shown dead, a paused
    one paused. Exit 3 when no lab is running.
    """
    lab = _lab(ctx)
    current = lab.status()
    if as_json:
        print_json({"redis_url": str(lab.redis_target()), **_status_json(current)})
        return
    _render_status(current, lab)


@app.command()
def down(
    ctx: typer.Context,
    force: Annotated[
        bool,
        typer.Option("--force", help="Also work when state.json is damaged: stop "
                     "every process started from the lab folder."),
    ] = False,
    keep_data: Annotated[
        bool, typer.Option("--keep-data", help="Keep node folders (data, logs).")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Stop every node and service of the lab and remove its state.

    Safe to run twice, and after nodes were killed. Processes started from
    the lab folder are found by their command line even without state.json.
    """
    result = _lab(ctx).down(force=force, keep_data=keep_data)
    if as_json:
        print_json(asdict(result))
        return
    if result.healed:
        console.print(f"Healed {len(result.healed)} fault(s): "
                      f"{'; '.join(result.healed)}.")
    if not (result.stopped or result.already_dead or result.strays):
        console.print("No lab was running; nothing to stop.")
        return
    console.print(f"Stopped {len(result.stopped)} process(es)"
                  + (f": {', '.join(result.stopped)}" if result.stopped else "."))
    if result.already_dead:
        console.print(f"Already dead: {', '.join(result.already_dead)}.")
    if result.strays:
        console.print(f"Also killed {len(result.strays)} process(es) found by "
                      f"their command line: pids {result.strays}.")


@app.command()
def restart(
    ctx: typer.Context,
    node: Annotated[str, typer.Argument(help="Node name, e.g. redis-1.")],
) -> None:
    """Bring a killed (or running) node back from its own folder, with its data."""
    lab = _lab(ctx)
    record = lab.restart(node)
    console.print(f"Restarted {record.name} (pid {record.pid}, port {record.port}).")


@app.command()
def logs(
    ctx: typer.Context,
    node: Annotated[str, typer.Argument(help="Node name, e.g. redis-1.")],
    lines: Annotated[int, typer.Option("--lines", "-n", help="Lines to show.")] = 40,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines.")
    ] = False,
) -> None:
    """Print the end of a node's log (its stdout and stderr)."""
    if lines < 1:
        raise UsageError(f"--lines {lines} must be at least 1")
    path = _lab(ctx).log_path(node)
    typer.echo(log_tail(path, lines))
    if follow:
        _follow(path)


@app.command()
def bench(
    ctx: typer.Context,
    topology: Annotated[
        Topology, typer.Option("--topology", "-t", help="Topology to time.")
    ] = Topology.CLUSTER,
    runs: Annotated[int, typer.Option("--runs", "-n", help="Fresh labs to time.")] = 5,
    as_json: JsonOption = False,
) -> None:
    """Time start-up and failover of fresh labs (in temporary folders).

    Start-up is compared with a standalone node started in the same run;
    failover (kill -9 of a primary until a replica serves as primary) with
    the configured failure-detection timeout.
    """
    if runs < 1:
        raise UsageError(f"--runs {runs} must be at least 1")
    settings = ctx.obj.lab_settings()
    result = lab_bench.bench(topology, runs, settings,
                             progress=None if as_json else note)
    up_s = result.summary(result.up_s)
    baseline_s = result.summary(result.baseline_up_s)
    failover_s = result.summary(result.failover_s)
    if as_json:
        print_json({"topology": result.topology, "runs": runs,
                    "up_s": up_s, "baseline_up_s": baseline_s,
                    "failover_s": failover_s, "detection_ms": result.detection_ms,
                    "samples": asdict(result)})
        return
    table = Table(title=f"{topology.value} lab, {runs} runs", title_justify="left")
    for column in ("measure", "min", "median", "max", "ratio (median)"):
        table.add_column(column)
    table.add_row("up until ready (s)", *_fmt(up_s),
                  f"{up_s['median'] / baseline_s['median']:.1f}x standalone")
    table.add_row("standalone up (s)", *_fmt(baseline_s), "1.0x")
    if failover_s:
        table.add_row("failover (s)", *_fmt(failover_s),
                      f"{failover_s['median'] * 1000 / result.detection_ms:.1f}x "
                      f"detection timeout ({result.detection_ms} ms)")
    console.print(table)


def _fmt(summary: dict[str, float]) -> list[str]:
    return [f"{summary[key]:.2f}" for key in ("min", "median", "max")]


def _follow(path: Path) -> None:
    with open(path, encoding="utf-8", errors="replace") as handle:
        handle.seek(0, 2)
        while True:
            line = handle.readline()
            if line:
                typer.echo(line, nl=False)
            else:
                time.sleep(FOLLOW_POLL_S)


def _status_json(current: LabStatus) -> dict[str, Any]:
    return {
        "topology": current.state.topology,
        "network": network_mode(current.state).value,
        "persistence": current.state.persistence,
        "primary": current.primary,
        "healthy": current.healthy,
        "nodes": [
            {**asdict(node), "healthy": node.healthy} for node in current.nodes
        ],
    }


def _render_status(current: LabStatus, lab: Lab) -> None:
    state = current.state
    server = state.redis_server
    table = Table(
        title=f"{state.topology} lab, persistence {state.persistence}, "
        f"network {network_mode(state).value}, "
        f"redis-server {server.get('version')} ({server.get('source')})",
        title_justify="left",
    )
    for column in ("node", "role", "health", "pid", "address", "details"):
        table.add_column(column)
    for node in current.nodes:
        if node.healthy:
            health = "[green]ok[/]"
        elif node.process == "running":
            health = "[red]not answering[/]"
        else:
            health = f"[red]{node.process}[/]"
        role = node.role
        if node.name == current.primary and state.topology != Topology.STANDALONE:
            role = f"[bold]{role}[/]"
        table.add_row(node.name, role, health, str(node.pid), node.address,
                      _details(node.detail))
    console.print(table)
    console.print(f"Clients connect with --redis {lab.redis_target()}")
    if not current.healthy:
        console.print("[yellow]Some nodes are not healthy.[/] Bring them back with "
                      "`dslab lab restart NODE` or `dslab lab up`.")


def _details(detail: dict[str, Any]) -> str:
    parts = []
    for key in ("url", "slots", "offset", "primary", "link", "other_sentinels",
                "replicas", "keys", "memory", "cluster_state"):
        value = detail.get(key)
        if value not in (None, ""):
            parts.append(f"{key.replace('_', ' ')}={value}")
    return " ".join(parts)
