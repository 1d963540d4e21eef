"""``dslab shorten``: shorten a URL, run the shortener, inspect links.

``dslab shorten https://example.com`` works as typed: a first argument that
is not a sub-command is the URL to shorten.
"""

from __future__ import annotations

import asyncio
import random
import sys
import webbrowser
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from dslab import __version__
from dslab.cli.context import lab_of
from dslab.cli.http import request
from dslab.cli.options import JsonOption, RedisOption
from dslab.cli.output import console, err_console, note, print_json
from dslab.errors import CheckFailed, DslabError, EnvironmentProblem, UsageError
from dslab.lab import services
from dslab.lab.lab import Lab
from dslab.redisconn import async_client
from dslab.report.runfile import RunMeta, utc_timestamp
from dslab.settings import RedisTarget
from dslab.shortener.codes import DEFAULT_CODE_LENGTH
from dslab.shortener.server import API_KEY_HEADER
from dslab.shortener.store import DEFAULT_CODE_POOL, LinkStore
from dslab.shortener.validation import validate_alias, validate_url
from dslab.units import parse_duration, parse_rate
from dslab.workload import http as load
from dslab.workload.schedule import Mix

# The shortener listens from here up unless --port says otherwise.
DEFAULT_PORT = 8080
SUBCOMMANDS = {"create", "serve", "info", "open", "delete", "bench"}


class ShortenGroup(TyperGroup):
    """Treat `dslab shorten URL ...` as `dslab shorten create URL ...`."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["create", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=ShortenGroup,
    help="Shorten URLs (`dslab shorten https://...`), run the shortener, "
    "inspect and delete links.",
    no_args_is_help=True,
)



def _lab(ctx: typer.Context) -> Lab:
    return lab_of(ctx)


def _server_url(lab: Lab, server: str | None) -> str | None:
    if server:
        return server.rstrip("/")
    found = services.running(lab, "shortener")
    return str(found[0].extra["url"]) if found else None


@app.command()
def create(
    ctx: typer.Context,
    url: Annotated[str, typer.Argument(help="The long URL (http or https).")],
    alias: Annotated[str | None, typer.Option("--alias", help="Your own code.")] = None,
    ttl: Annotated[
        str | None, typer.Option("--ttl", help="Lifetime, e.g. 10m, 7d.")
    ] = None,
    max_visits: Annotated[
        int | None, typer.Option("--max-visits", help="Stop after N redirects.")
    ] = None,
    reuse: Annotated[
        bool, typer.Option("--reuse", help="Return the existing code for this URL.")
    ] = False,
    server: Annotated[
        str | None, typer.Option("--server", help="Shortener base URL "
                                 "[default: the lab's shortener, if one runs].")
    ] = None,
    redis_url: RedisOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a short link and print it.

    Through a running shortener when there is one (the lab's, or --server);
    otherwise straight into Redis, which the output says.
    """
    ttl_s = int(parse_duration(ttl, what="--ttl")) if ttl else None
    lab = _lab(ctx)
    base = None if redis_url else _server_url(lab, server)
    if base is not None:
        body: dict[str, Any] = {"url": url, "alias": alias, "ttl_s": ttl_s,
                                "max_visits": max_visits, "reuse": reuse}
        status, answer, _ = request(
            "POST", f"{base}/api/links",
            {key: value for key, value in body.items() if value is not None},
        )
        _raise_for(status, answer)
        via = f"shortener at {base}"
    else:
        target = services.redis_target(lab, redis_url)
        answer = asyncio.run(_create_in_redis(target, url, alias, ttl_s,
                                              max_visits, reuse))
        via = f"Redis directly at {target} (no shortener is running)"

    if as_json:
        print_json({**answer, "via": via})
        return
    note(f"Created via {via}.")
    console.print(answer.get("short_url") or answer["code"], soft_wrap=True)


async def _create_in_redis(
    target: RedisTarget, url: str, alias: str | None, ttl_s: int | None,
    max_visits: int | None, reuse: bool,
) -> dict[str, Any]:
    clean = validate_url(url, own_hosts=(), blocklist=())
    client = async_client(target)
    try:
        store = LinkStore(client, code_length=DEFAULT_CODE_LENGTH)
        created = await store.create(
            clean, alias=validate_alias(alias) if alias else None,
            ttl_s=ttl_s, max_visits=max_visits, reuse=reuse,
        )
    finally:
        await client.aclose()
    link = created.link
    return {"code": link.code, "url": link.url, "short_url": None,
            "expires_ms": link.expires_ms, "reused": created.reused}


@app.command()
def serve(
    ctx: typer.Context,
    port: Annotated[
        int | None, typer.Option("--port", help="Port [default: first free from "
                                 f"{DEFAULT_PORT}].")
    ] = None,
    workers: Annotated[
        int, typer.Option("--workers", "-w", help="Worker processes sharing the "
                          "port (SO_REUSEPORT).")
    ] = 1,
    redis_url: RedisOption = None,
    redirect_status: Annotated[
        int, typer.Option("--redirect-status", help="301, 302, 307 or 308.")
    ] = 302,
    code_length: Annotated[
        int, typer.Option("--code-length", help="Characters in a random code.")
    ] = DEFAULT_CODE_LENGTH,
    no_reserve: Annotated[
        bool, typer.Option("--no-reserve", help="Naive mode: a colliding code "
                           "overwrites the older link (to watch links get lost).")
    ] = False,
    code_pool: Annotated[
        int, typer.Option("--code-pool", help="Codes each worker reserves ahead, "
                          "so a create does not wait for a reservation; 0: "
                          "reserve one per create (off with --no-reserve).")
    ] = DEFAULT_CODE_POOL,
    api_key: Annotated[
        str | None, typer.Option("--api-key", envvar="DSLAB_SHORTENER_API_KEY",
                                 help="Key required to delete links.")
    ] = None,
    allow_private_targets: Annotated[
        bool, typer.Option("--allow-private-targets", help="Accept loopback and "
                           "private hosts as link targets.")
    ] = False,
    replicas_ack: Annotated[
        int, typer.Option("--replicas-ack", help="WAIT for N replicas to confirm "
                          "each new link; the answer says if they did.")
    ] = 0,
    create_per_minute: Annotated[
        float, typer.Option("--create-per-minute", help="Links one client may "
                            "create per minute and worker (429 beyond); 0: no "
                            "limit, e.g. for benchmarks.")
    ] = 600.0,
    not_found_per_minute: Annotated[
        float, typer.Option("--not-found-per-minute", help="404s one client may "
                            "cause per minute and worker (slows enumeration); "
                            "0: no limit.")
    ] = 600.0,
    foreground: Annotated[
        bool, typer.Option("--foreground", help="Run in this terminal instead of "
                           "as a lab service; Ctrl-C stops it.")
    ] = False,
) -> None:
    """Run the URL shortener (web page at /, API under /api/links).

    By default it runs detached as a lab service (`shortener-1`), shown by
    `dslab lab status` and stopped by `dslab lab down`.
    """
    lab = _lab(ctx)
    target = services.redis_target(lab, redis_url)
    args = ["--redis", target.url(with_password=True), "--workers", str(workers),
            "--redirect-status", str(redirect_status),
            "--code-length", str(code_length), "--code-pool", str(code_pool)]
    args += ["--no-reserve"] if no_reserve else []
    args += ["--api-key", api_key] if api_key else []
    args += ["--allow-private-targets"] if allow_private_targets else []
    args += ["--replicas-ack", str(replicas_ack)] if replicas_ack else []
    args += ["--create-per-minute", f"{create_per_minute:g}",
             "--not-found-per-minute", f"{not_found_per_minute:g}"]
    [chosen] = services.choose_ports(1, port, DEFAULT_PORT)

    if foreground:
        from dslab.shortener.serve import main as serve_main

        raise typer.Exit(serve_main(["--port", str(chosen), *args]))
    record = services.launch(lab, "shortener", "dslab.shortener", args, chosen)
    console.print(f"{record.name} serves {record.extra['url']} "
                  f"({workers} worker{'s' if workers != 1 else ''}, Redis {target}).")
    console.print(f"Open {record.extra['url']}/ in a browser; stop it with "
                  "`dslab lab down`.")


@app.command()
def info(
    ctx: typer.Context,
    code: Annotated[str, typer.Argument(help="The short code.")],
    server: Annotated[str | None, typer.Option("--server")] = None,
    as_json: JsonOption = False,
) -> None:
    """Show a link's target, creation, expiry and visits."""
    base = _require_server(ctx, server)
    status, answer, _ = request("GET", f"{base}/api/links/{code}")
    _raise_for(status, answer)
    if as_json:
        print_json(answer)
        return
    for key in ("code", "url", "short_url", "created_at", "expires_at", "visits",
                "unique_visitors", "max_visits"):
        if answer.get(key) is not None:
            console.print(f"{key:>16}  {answer[key]}", soft_wrap=True)


@app.command("open")
def open_link(
    ctx: typer.Context,
    code: Annotated[str, typer.Argument(help="The short code.")],
    server: Annotated[str | None, typer.Option("--server")] = None,
    browser: Annotated[
        bool, typer.Option("--browser", help="Also open the target in a browser.")
    ] = False,
) -> None:
    """Follow a short link once (counts as a visit) and print where it goes."""
    base = _require_server(ctx, server)
    status, answer, headers = request("GET", f"{base}/{code}",
                                      follow_redirects=False)
    if status not in (301, 302, 307, 308):
        _raise_for(status, answer)
    location = headers.get("Location", "")
    console.print(f"{status} -> {location}", soft_wrap=True)
    if browser:
        webbrowser.open(location)


@app.command()
def delete(
    ctx: typer.Context,
    code: Annotated[str, typer.Argument(help="The short code.")],
    server: Annotated[str | None, typer.Option("--server")] = None,
    api_key: Annotated[
        str | None, typer.Option("--api-key", envvar="DSLAB_SHORTENER_API_KEY")
    ] = None,
) -> None:
    """Delete a link; every shortener process forgets it at once."""
    base = _require_server(ctx, server)
    headers = {API_KEY_HEADER: api_key} if api_key else {}
    status, answer, _ = request("DELETE", f"{base}/api/links/{code}",
                                headers=headers)
    _raise_for(status, answer)
    console.print(f"Deleted {code}.")


# Above this rate one load-generator process is the bottleneck on this box.
ONE_PROCESS_MAX_RATE_PER_S = 5000.0
MAX_BENCH_CODES = 100_000  # links created before the run, through the API


@app.command()
def bench(
    ctx: typer.Context,
    rate: Annotated[str, typer.Option("--rate", help="Requests per second, "
                                      "e.g. 10000/s.")] = "1000/s",
    duration: Annotated[str, typer.Option("--duration", help="Measured time, "
                                          "e.g. 30s (at most 10m).")] = "10s",
    warmup: Annotated[
        str | None, typer.Option("--warmup", help="Load sent before measuring.")
    ] = None,
    mix: Annotated[str, typer.Option("--mix", help="redirect:create weights.")
                   ] = "95:5",
    codes: Annotated[int, typer.Option("--codes", help="Links to create and "
                                       "follow (the hot set).")] = 1000,
    zipf: Annotated[float, typer.Option("--zipf", help="Zipf exponent of link "
                                        "popularity; 0 = uniform.")] = 0.0,
    connections: Annotated[int, typer.Option("--connections", "-c",
                                             help="Keep-alive connections.")] = 64,
    processes: Annotated[
        int | None, typer.Option("--processes", "-p", help="Load-generator "
                                 "processes [default: 1, or 2 from 5000/s].")
    ] = None,
    server: Annotated[
        str | None, typer.Option("--server", help="Base URL on loopback "
                                 "[default: the lab's shortener].")
    ] = None,
    static_path: Annotated[
        str | None, typer.Option("--static-path", help="GET only this path and "
                                 "skip link creation and the Location check "
                                 "(to bench a baseline such as nginx).")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the "
                                             "request choices.")] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Run file [default: "
                                  "runs/shorten-bench-TIME.json].")
    ] = None,
    engine: Annotated[str, typer.Option("--engine", help="python (open loop) "
                                        "or wrk (closed loop).")] = "python",
    as_json: JsonOption = False,
) -> None:
    """Constant-rate redirect/create load with latency from the intended send time.

    Creates --codes links, then sends the --mix at --rate, checks that every
    redirect leads where its link says, and writes a run file. Exits 1 when a
    redirect went wrong or the rate was not held.
    """
    rate_per_s = parse_rate(rate, what="--rate")
    plan_mix = Mix.parse(mix)
    if engine not in ("python", "wrk"):
        raise UsageError(f"--engine {engine!r} is unknown", fix="use python or wrk")
    if not 0 <= codes <= MAX_BENCH_CODES:
        raise UsageError(f"--codes {codes} is outside 0-{MAX_BENCH_CODES}")
    base = server.rstrip("/") if server else _server_url(_lab(ctx), None)
    if base is None:
        raise EnvironmentProblem(
            "no shortener is running in the lab",
            fix="start one with `dslab shorten serve`, or pass --server URL",
        )
    target = load.HttpTarget.parse(base)
    seed = random.SystemRandom().randrange(2**31) if seed is None else seed
    if processes is None:
        processes = 2 if rate_per_s >= ONE_PROCESS_MAX_RATE_PER_S else 1
    if static_path is not None:
        plan_mix = Mix(100, 0)
    elif codes == 0 and plan_mix.redirect:
        raise UsageError("--codes 0 leaves nothing to redirect",
                         fix="give --codes 1 or more, or --mix 0:100")
    # Checks the bounds before any link is created.
    load.LoadPlan(
        target, rate_per_s, parse_duration(duration, what="--duration"),
        warmup_s=parse_duration(warmup, what="--warmup") if warmup else 0.0,
        connections=connections, processes=processes, seed=seed, mix=plan_mix,
        links=(load.BenchLink("x", "x"),), zipf_s=zipf, static_path=static_path,
    )

    links: tuple[load.BenchLink, ...] = ()
    if static_path is None and codes:
        note(f"Creating {codes} links at {target.url} ...")
        links = asyncio.run(load.create_links(target, codes, seed=seed))
    plan = load.LoadPlan(
        target, rate_per_s, parse_duration(duration, what="--duration"),
        warmup_s=parse_duration(warmup, what="--warmup") if warmup else 0.0,
        connections=connections, processes=processes, seed=seed, mix=plan_mix,
        links=links, zipf_s=zipf, static_path=static_path,
    )
    if engine == "wrk":
        started = utc_timestamp()
        note("wrk is closed loop: each connection waits for an answer before "
             "its next request, so a stall hides the requests it delayed.")
        result = load.run_wrk(plan)
    else:
        started = utc_timestamp()
        result = _run_with_progress(plan, quiet=as_json)
    meta = RunMeta(
        command=["dslab", *sys.argv[1:]], dslab_version=__version__,
        started_at=started, ended_at=utc_timestamp(), seed=seed,
        targets=[target.url],
    )
    path = out or Path("runs") / (
        "shorten-bench-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S") + ".json")
    result.run_file(meta).save(path)

    if as_json:
        print_json({"run_file": str(path), "verdict": result.verdict(),
                    "latency_ms": _latency_table(result)})
    else:
        _print_bench_summary(result, path)
    problems = []
    if result.wrong_location:
        problems.append(f"{result.wrong_location} redirects went to the wrong URL")
    if not result.rate_held:
        problems.append(result.rate_note())
    if problems:
        raise CheckFailed("; ".join(problems), fix=f"see the run file {path}")


BENCH_PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def _run_with_progress(plan: load.LoadPlan, *, quiet: bool) -> load.LoadResult:
    """Run the load with one live line on stderr (elapsed, sent, ok, errors)."""
    from rich.live import Live
    from rich.text import Text

    total_s = plan.warmup_s + plan.duration_s
    note(f"Sending {plan.rate_per_s:,.0f}/s to {plan.target.url} for "
         f"{plan.duration_s:g} s (open loop, {plan.connections} connections, "
         f"{plan.processes} process{'es' if plan.processes > 1 else ''}).")
    if quiet:
        return asyncio.run(load.run_load(plan))
    with Live(Text(""), console=err_console, transient=True,
              refresh_per_second=4) as live:

        def show(progress: load.Progress) -> None:
            live.update(Text(
                f"{min(progress.elapsed_s, total_s):5.1f}/{total_s:g} s  "
                f"sent {progress.sent:,}  ok {progress.answered_ok:,}  "
                f"errors {progress.failed:,}  wrong {progress.wrong_location:,}  "
                f"backlog {progress.backlog:,}"
            ))

        return asyncio.run(load.run_load(plan, show))


def _latency_table(result: load.LoadResult) -> dict[str, dict[str, float]]:
    table = {}
    for op, histogram in sorted(result.histograms.items()):
        found = histogram.percentiles_us(BENCH_PERCENTILES)
        row = {f"p{p:g}": found[p] / 1000 for p in BENCH_PERCENTILES}
        row["max"] = histogram.max_us / 1000
        row["count"] = histogram.count
        table[op] = row
    return table


def _print_bench_summary(result: load.LoadResult, path: Path) -> None:
    from rich.table import Table

    table = Table(title="Latency from the intended send time (ms)")
    for column in ("operation", "ok", "errors", "p50", "p90", "p99", "p99.9", "max"):
        table.add_column(column, justify="left" if column == "operation" else "right")
    for op, row in _latency_table(result).items():
        answered = sum(result.status_counts.get(op, {}).values())
        table.add_row(op, f"{row['count']:,.0f}", f"{answered - row['count']:,.0f}",
                      *(f"{row[key]:.2f}" for key in
                        ("p50", "p90", "p99", "p99.9", "max")))
    console.print(table)
    console.print(result.rate_note())
    statuses = ", ".join(
        f"{op} {status}: {count:,}"
        for op, counts in sorted(result.status_counts.items())
        for status, count in sorted(counts.items())
    )
    console.print(f"answers: {statuses or 'none'}", soft_wrap=True)
    console.print(f"wrong Location: {result.wrong_location:,}")
    for example in result.wrong_examples:
        console.print(f"  /{example['code']} -> {example['location']!r}, expected "
                      f"{example['expected']!r}", soft_wrap=True)
    if result.open_loop:
        lag = result.send_lag.percentiles_us((50.0, 99.0))
        console.print(f"send lag (wait before sending, included above): p50 "
                      f"{lag[50.0] / 1000:.2f} ms, p99 {lag[99.0] / 1000:.2f} ms")
    if result.generator_saturated:
        console.print("warning: the load generator itself was saturated (its "
                      "timers ran late, or a process used "
                      f"{result.generator_cpu_share:.0%} of a core): its figures "
                      "include its own queueing; add --processes or lower --rate")
    for warning in result.warnings():
        console.print(f"note: {warning}")
    console.print(f"run file: {path}")


def _require_server(ctx: typer.Context, server: str | None) -> str:
    base = _server_url(_lab(ctx), server)
    if base is None:
        raise EnvironmentProblem(
            "no shortener is running in the lab",
            fix="start one with `dslab shorten serve`, or pass --server URL",
        )
    return base


def _raise_for(status: int, answer: dict[str, Any]) -> None:
    """Turn an error answer of the shortener into the matching dslab error."""
    if status < 400:
        return
    message = (f"the shortener answered {status} {answer.get('error', '')}: "
               f"{answer.get('detail', answer)}")
    fix = answer.get("fix")
    if status in (400, 404, 409, 410):
        raise UsageError(message, fix=str(fix) if fix else None)
    raise DslabError(message, fix=str(fix) if fix else None)
