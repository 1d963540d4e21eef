"""``dslab report``: latency tables, SLO verdicts and HTML pages from run files.

Thin, like every command module: load the run files, evaluate the SLOs,
render, and map the outcome to the documented exit code (0 every SLO passed
or none was given, 1 an SLO failed, 2 a bad constraint or an unreadable run
file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from dslab.cli.output import console, note, print_json
from dslab.errors import CheckFailed, UsageError
from dslab.report import metrics as server_metrics
from dslab.report.html import write_html
from dslab.report.runfile import RunFile
from dslab.report.slo import SloResult, evaluate, operation_figures, parse_slos
from dslab.report.tables import NamedRun, render_report

app = typer.Typer(
    help="Latency tables, SLO verdicts and HTML reports from run files.",
    no_args_is_help=True,
)


@app.callback()
def report() -> None:
    """Latency tables, SLO verdicts and HTML reports from run files."""
    # A callback keeps `report` a group on its own too (Typer would otherwise
    # collapse a one-command app), so `latency` is spelled the same everywhere.


@app.command()
def latency(
    runs: Annotated[
        list[Path] | None,
        typer.Argument(help="Run files written by a bench or `chaos run`; with "
                       "several, the first is the baseline of the comparison.",
                       metavar="RUN", show_default=False),
    ] = None,
    slo: Annotated[
        list[str] | None,
        typer.Option("--slo", help="A constraint every run must meet, e.g. "
                     "'p99<200ms', 'p99.9<1s', 'errors<0.1%', 'lost==0', "
                     "'throughput>=1000/s', 'send:p50<=20ms'. Repeatable."),
    ] = None,
    html: Annotated[
        Path | None,
        typer.Option("--html", help="Also write one self-contained HTML page "
                     "with the tables and plots to this file."),
    ] = None,
    metrics: Annotated[
        list[str] | None,
        typer.Option("--metrics", help="A server's Prometheus /metrics URL: its "
                     "own latency histograms, shown beside the runs. Repeatable."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document instead of tables.")
    ] = False,
) -> None:
    """Percentiles per operation, SLO verdicts and a comparison of runs.

    Exit 0 when every SLO passes (or none is given), 1 when any fails, 2 for
    a constraint dslab does not understand or a file that is not a run file.
    A constraint the run cannot answer (lost==0 on a run without a checker
    verdict) fails; it never passes by default.
    """
    constraints = parse_slos(slo or [])
    if not runs and not metrics:
        raise UsageError("no run file and no --metrics URL given",
                         fix="dslab report latency RUN.json [--metrics URL]")
    named_runs = _load(runs or [])
    servers = [(url, server_metrics.parse_histograms(server_metrics.fetch(url)))
               for url in metrics or []]
    results = [
        (named.name, result)
        for named in named_runs
        for result in evaluate(constraints, named.run)
    ]

    if as_json:
        print_json({**_json(named_runs, results), "servers": [
            {"url": url, "histograms": [server_metrics.to_dict(h) for h in found]}
            for url, found in servers
        ]})
    else:
        if named_runs:
            render_report(console, named_runs, results)
        for url, found in servers:
            console.print(server_metrics.table(url, found))
    if html is not None:
        if not named_runs:
            raise UsageError("--html needs at least one run file",
                             fix="dslab report latency RUN.json --html report.html")
        write_html(html, named_runs, results)
        note(f"HTML report written to {html}")

    failed = [result for _, result in results if not result.passed]
    if failed:
        raise CheckFailed(
            f"{len(failed)} of {len(results)} SLO checks failed "
            f"(first: {failed[0].constraint.text}: {failed[0].detail})",
            fix="see the SLO table; make the system meet them, or relax the --slo",
        )


def _load(paths: list[Path]) -> list[NamedRun]:
    named: list[NamedRun] = []
    seen: dict[str, int] = {}
    for path in paths:
        name = str(path)
        # The same file twice is allowed (it compares equal); keep rows apart.
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name} #{seen[name]}"
        named.append(NamedRun(name, RunFile.load(path)))

    return named


def _json(runs: list[NamedRun], results: list[tuple[str, SloResult]]) -> Any:
    return {
        "ok": all(result.passed for _, result in results),
        "runs": [
            {
                "name": named.name,
                "command": named.run.meta.command,
                "started_at": named.run.meta.started_at,
                "ended_at": named.run.meta.ended_at,
                "seed": named.run.meta.seed,
                "topology": named.run.meta.topology,
                "targets": named.run.meta.targets,
                "operations": [
                    figures.to_dict()
                    for figures in operation_figures(named.run).values()
                ],
                "faults": [
                    {"at": f.at, "action": f.action, "target": f.target,
                     "detail": f.detail}
                    for f in named.run.faults
                ],
                "verdict": named.run.verdict,
                "slo": [
                    result.to_dict() for name, result in results if name == named.name
                ],
            }
            for named in runs
        ],
    }
