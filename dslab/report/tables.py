"""The terminal half of ``dslab report latency``: rich tables and a text chart.

Every function here takes run files (and SLO results) and returns a rich
renderable; ``render_report`` prints them all in reading order. Nothing here
computes a percentile: the figures come from ``dslab.report.slo``, which
reads them from the runs' HdrHistograms.

Guarantees:

- Every string that comes from a run file is shown as plain text, never
  interpreted as rich markup, so a run file cannot restyle or hide rows.
- Output depends only on the inputs and the console width: tests render at a
  fixed width with colour off and compare lines.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from dslab.report.runfile import FaultEvent, RunFile
from dslab.report.slo import REPORT_PERCENTILES, OperationFigures, SloResult
from dslab.report.slo import operation_figures as figures_of

log = logging.getLogger(__name__)

# Examples per anomaly kind in the terminal; the run file keeps up to 10.
TERMINAL_EXAMPLES = 3
# Widest text chart in columns; longer runs put several seconds in a column.
CHART_MAX_COLUMNS = 60
# Eight heights of a block character: the resolution of the text chart.
SPARK_BLOCKS = "▁▂▃▄▅▆▇█"
# Fault actions that start a window and the actions that end one. A window
# with no end lasts until the end of the run.
FAULT_STARTS = frozenset({"kill", "pause", "partition", "delay", "stop", "slow"})
FAULT_ENDS = frozenset({"restart", "resume", "heal", "start", "undelay", "cont"})
# A heal of one of these targets ends every open window.
HEAL_ALL_TARGETS = frozenset({"", "all", "*"})
# Checker counts that mean the run broke a promise; others are informative.
VERDICT_FAILURES = ("lost", "duplicated", "reordered", "double_appended")


@dataclass(frozen=True)
class NamedRun:
    """A run file and the name a person gave it (its path on the command line)."""

    name: str
    run: RunFile


@dataclass(frozen=True)
class FaultWindow:
    """A span of the run (seconds since start) during which a fault was active."""

    start: float
    end: float | None  # None: never undone within the run
    action: str
    target: str


def fault_windows(faults: Sequence[FaultEvent]) -> list[FaultWindow]:
    """Pair each fault with the later event that undid it (same target, or a
    heal of everything); faults never undone stay open to the end."""
    open_faults: list[FaultEvent] = []
    windows: list[FaultWindow] = []
    for event in sorted(faults, key=lambda f: f.at):
        action = event.action.lower()
        if action in FAULT_STARTS:
            open_faults.append(event)
        elif action in FAULT_ENDS:
            heal_all = action == "heal" and event.target.lower() in HEAL_ALL_TARGETS
            still_open = []
            for fault in open_faults:
                if heal_all or fault.target == event.target:
                    windows.append(
                        FaultWindow(fault.at, event.at, fault.action, fault.target)
                    )
                else:
                    still_open.append(fault)
            open_faults = still_open
    windows.extend(FaultWindow(f.at, None, f.action, f.target) for f in open_faults)

    return sorted(windows, key=lambda w: w.start)


def format_ms(value: float | None) -> str:
    """A latency in ms with about three significant digits; ``-`` for none."""
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def format_ratio(value: float | None, baseline: float | None) -> str:
    """``value / baseline`` as ``2.50x``; ``-`` when either is missing or zero."""
    if value is None or not baseline:
        return "-"
    return f"{value / baseline:.2f}x"


def run_header(named: NamedRun) -> Text:
    """One line saying which run this is: name, command, start, seed, targets."""
    meta = named.run.meta
    header = Text()
    header.append(f"Run {named.name}", style="bold")
    header.append(f": {' '.join(meta.command)}\n")
    details = [f"started {meta.started_at}", f"ended {meta.ended_at}"]
    if meta.seed is not None:
        details.append(f"seed {meta.seed}")
    if meta.topology:
        details.append(f"topology {meta.topology}")
    if meta.targets:
        details.append(f"targets {', '.join(meta.targets)}")
    details.append(f"dslab {meta.dslab_version}")
    header.append("  " + ", ".join(details))

    return header


def latency_table(runs: Sequence[NamedRun]) -> Table:
    """Per run and operation: count, errors, throughput and percentiles in ms."""
    several = len(runs) > 1
    table = Table(
        title="Latency in ms, measured from the intended send time",
        title_justify="left",
    )
    if several:
        table.add_column("run")
    table.add_column("operation")
    for column in ("count", "errors", "per s"):
        table.add_column(column, justify="right")
    for percentile in REPORT_PERCENTILES:
        table.add_column(_p_label(percentile), justify="right")
    table.add_column("max", justify="right")

    for named in runs:
        for figures in figures_of(named.run).values():
            cells: list[RenderableType] = [Text(named.name)] if several else []
            cells.append(Text(figures.operation))
            cells.extend(_figure_cells(figures))
            table.add_row(*cells)

    return table


def comparison_table(runs: Sequence[NamedRun]) -> Table:
    """Per operation, each run's p50 and p99 and their ratio to the first run's."""
    baseline = runs[0]
    table = Table(
        title=Text(f"Compared with the first run, {baseline.name}"),
        title_justify="left",
    )
    table.add_column("operation")
    table.add_column("run")
    for column in ("count", "errors", "p50", "p50 vs first", "p99", "p99 vs first"):
        table.add_column(column, justify="right")

    all_figures = [figures_of(named.run) for named in runs]
    operations = sorted({op for figures in all_figures for op in figures})
    for op in operations:
        first = all_figures[0].get(op)
        for named, figures in zip(runs, all_figures, strict=True):
            mine = figures.get(op)
            if mine is None:
                table.add_row(Text(op), Text(named.name), "-", "-", "-", "-", "-", "-")
                continue
            p50, p99 = _p(mine, 50.0), _p(mine, 99.0)
            table.add_row(
                Text(op),
                Text(named.name),
                f"{mine.count:,}",
                f"{mine.errors:,}",
                format_ms(p50),
                format_ratio(p50, _p(first, 50.0)),
                format_ms(p99),
                format_ratio(p99, _p(first, 99.0)),
            )

    return table


def verdict_table(named: NamedRun) -> Table | None:
    """The checker's counts with a few examples of each anomaly; None if no verdict."""
    verdict = named.run.verdict
    if verdict is None:
        return None
    if not isinstance(verdict.get("total"), dict):
        return _plain_verdict_table(named.name, verdict)
    total = verdict.get("total")
    total = total if isinstance(total, dict) else {}
    examples = verdict.get("examples")
    examples = examples if isinstance(examples, dict) else {}
    ok = verdict.get("ok")
    state = "ok" if ok is True else "FAILED" if ok is False else "unknown"
    expected = total.get("expected")
    of = f", {expected:,} expected deliveries" if isinstance(expected, int) else ""

    table = Table(
        title=Text(f"Checker verdict for {named.name}: {state}{of}"),
        title_justify="left",
    )
    table.add_column("check")
    table.add_column("count", justify="right")
    table.add_column("examples (room/user entry client-id)")
    for name in verdict_rows(total):
        value = total[name]
        count = f"{value:.2f} s" if isinstance(value, float) else f"{value:,}"
        if name in VERDICT_FAILURES and value:
            label = Text(f"{name} (FAIL)", style="bold red")
        else:
            label = Text(name)
        table.add_row(label, count, Text("\n".join(example_lines(examples.get(name)))))

    return table


def _plain_verdict_table(name: str, verdict: Mapping[str, Any]) -> Table:
    """A verdict that is not the chat checker's (the shortener bench's, say):
    its fields as written, nested ones in short JSON."""
    table = Table(title=Text(f"Verdict for {name}"), title_justify="left")
    table.add_column("check")
    table.add_column("value")
    for key, value in verdict.items():
        if isinstance(value, (dict, list)):
            shown = json.dumps(value, sort_keys=True)
            shown = shown if len(shown) <= 120 else shown[:117] + "..."
        else:
            shown = str(value)
        table.add_row(Text(str(key)), Text(shown))
    return table


def fault_table(named: NamedRun) -> Table | None:
    """The fault timeline, in the order the faults happened; None if there were none."""
    if not named.run.faults:
        return None
    table = Table(title=Text(f"Faults during {named.name}"), title_justify="left")
    table.add_column("at (s)", justify="right")
    for column in ("action", "target", "detail"):
        table.add_column(column)
    for fault in sorted(named.run.faults, key=lambda f: f.at):
        table.add_row(
            f"{fault.at:.2f}",
            Text(fault.action),
            Text(fault.target),
            Text(fault.detail),
        )

    return table


def latency_chart(named: NamedRun, max_columns: int = CHART_MAX_COLUMNS) -> Text | None:
    """p99 per second as one line of block characters per operation, with a
    line below marking the seconds in which a fault was active."""
    series = {op: rows for op, rows in named.run.series.items() if rows}
    if not series:
        return None
    seconds = max(len(rows) for rows in series.values())
    per_column = max(1, math.ceil(seconds / max_columns))
    columns = math.ceil(seconds / per_column)
    peaks: dict[str, list[float | None]] = {}
    for op, rows in series.items():
        values = [row.p99_ms for row in rows]
        peaks[op] = [
            _max_of(values[c * per_column:(c + 1) * per_column]) for c in range(columns)
        ]
    top = max((v for col in peaks.values() for v in col if v is not None), default=0.0)

    label_width = max(len(op) for op in [*series, "faults"])
    chart = Text()
    chart.append(
        f"p99 over time, {named.name}: one column = {per_column} s, "
        f"full block = {format_ms(top)} ms\n"
    )
    for op, column_peaks in peaks.items():
        chart.append(op.ljust(label_width) + " ")
        chart.append("".join(_block(v, top) for v in column_peaks) + "\n")
    windows = fault_windows(named.run.faults)
    if windows or named.run.faults:
        marks = _fault_marks(named.run.faults, windows, columns, per_column)
        chart.append("faults".ljust(label_width) + " ")
        chart.append(marks, style="red")
        chart.append("\n")
    chart.rstrip()

    return chart


def slo_table(results: Sequence[tuple[str, SloResult]]) -> Table:
    """One row per (run, constraint, operation): PASS or FAIL and the figure."""
    several = len({name for name, _ in results}) > 1
    passed = sum(1 for _, result in results if result.passed)
    table = Table(
        title=f"SLOs: {passed} of {len(results)} passed", title_justify="left"
    )
    if several:
        table.add_column("run")
    for column in ("rule", "operation", "result", "measured"):
        table.add_column(column)
    for name, result in results:
        cells: list[RenderableType] = [Text(name)] if several else []
        verdict = (
            Text("PASS", style="bold green")
            if result.passed
            else Text("FAIL", style="bold red")
        )
        cells.extend([
            Text(result.constraint.text),
            Text(result.operation or "(run)"),
            verdict,
            Text(result.detail),
        ])
        table.add_row(*cells)

    return table


def report(
    runs: Sequence[NamedRun], results: Sequence[tuple[str, SloResult]] = ()
) -> Group:
    """Everything, in reading order: what ran, latency, comparison, per-run
    faults and verdicts, then the SLO verdicts."""
    parts: list[RenderableType] = [run_header(named) for named in runs]
    parts.append(latency_table(runs))
    if len(runs) > 1:
        parts.append(comparison_table(runs))
    for named in runs:
        optional = (latency_chart(named), fault_table(named), verdict_table(named))
        parts.extend(part for part in optional if part is not None)
    if results:
        parts.append(slo_table(results))
    spaced: list[RenderableType] = []
    for part in parts:
        spaced.extend([part, Text("")])

    return Group(*spaced[:-1])


def render_report(
    console: Console,
    runs: Sequence[NamedRun],
    results: Sequence[tuple[str, SloResult]] = (),
) -> None:
    console.print(report(runs, results))


def _p_label(percentile: float) -> str:
    return f"p{percentile:g}"


def _p(figures: OperationFigures | None, percentile: float) -> float | None:
    if figures is None or figures.percentiles_ms is None:
        return None
    return figures.percentiles_ms.get(percentile)


def _figure_cells(figures: OperationFigures) -> list[RenderableType]:
    throughput = figures.throughput
    cells: list[RenderableType] = [
        f"{figures.count:,}",
        f"{figures.errors:,}",
        "-" if throughput is None else f"{throughput:,.1f}",
    ]
    cells.extend(format_ms(_p(figures, p)) for p in REPORT_PERCENTILES)
    cells.append(format_ms(figures.max_ms))

    return cells


def verdict_rows(total: Mapping[str, Any]) -> list[str]:
    """Known checker counts first, in a fixed order, then anything else numeric."""
    preferred = [
        "sends", "acked", "deliveries", "expected", *VERDICT_FAILURES,
        "unacked_delivered", "unknown", "lost_during_gaps",
        "gaps", "gap_total_s", "gap_max_s",
    ]
    rest = sorted(set(total) - set(preferred))
    return [
        name
        for name in [*preferred, *rest]
        if name in total
        and isinstance(total[name], int | float)
        and not isinstance(total[name], bool)
    ]


def example_lines(cases: object, limit: int = TERMINAL_EXAMPLES) -> list[str]:
    """The first ``limit`` anomaly examples as ``room/user entry client-id``."""
    if not isinstance(cases, list) or not cases:
        return []
    shown = []
    for case in cases[:limit]:
        if isinstance(case, dict) and {"room", "user", "entry_id"} <= case.keys():
            shown.append(
                f"{case['room']}/{case['user']} {case['entry_id']} "
                f"{case.get('client_msg_id', '')}".rstrip()
            )
        else:
            shown.append(str(case))
    more = len(cases) - limit
    if more > 0:
        shown.append(f"... {more} more in the run file")

    return shown


def _max_of(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _block(value: float | None, top: float) -> str:
    if value is None:
        return " "  # nothing succeeded in that second: no bar, not a low one
    if top <= 0:
        return SPARK_BLOCKS[0]
    level = round(value / top * (len(SPARK_BLOCKS) - 1))
    return SPARK_BLOCKS[max(0, min(level, len(SPARK_BLOCKS) - 1))]


def _fault_marks(
    faults: Sequence[FaultEvent],
    windows: Sequence[FaultWindow],
    columns: int,
    per_column: int,
) -> str:
    """``#`` where a fault window covers a column, ``|`` for any other event
    (an undo is shown by where its window ends, not by a mark of its own)."""
    marks = [" "] * columns

    def column(at: float) -> int:
        return max(0, min(columns - 1, int(at // per_column)))

    for fault in faults:
        if fault.action.lower() not in FAULT_ENDS:
            marks[column(fault.at)] = "|"
    for window in windows:
        end = window.end if window.end is not None else columns * per_column
        # A window ending exactly on a column boundary does not cover that column.
        last = column(max(window.start, end - 1e-9))
        for c in range(column(window.start), last + 1):
            marks[c] = "#"

    return "".join(marks).rstrip()
