"""Tests for the terminal report: tables rendered at a fixed width, colour off."""

from __future__ import annotations

from rich.console import Console, RenderableType

from dslab.report.runfile import FaultEvent
from dslab.report.slo import evaluate, parse_slos
from dslab.report.tables import (
    NamedRun,
    comparison_table,
    fault_table,
    fault_windows,
    latency_chart,
    latency_table,
    render_report,
    slo_table,
    verdict_table,
)
from tests.report.test_slo import ONE_TO_THOUSAND_MS, build_run, verdict_with_lost

PAUSE = [
    FaultEvent(3.0, "pause", "redis-1", "SIGSTOP"),
    FaultEvent(5.0, "resume", "redis-1", "SIGCONT"),
]


def render(renderable: RenderableType) -> list[str]:
    console = Console(width=100, color_system=None, record=True)
    console.print(renderable)
    return [line.rstrip() for line in console.export_text().splitlines()]


def cells(lines: list[str], first: str) -> list[str]:
    """The cells of the one table row whose first cell is ``first``."""
    rows = [
        [cell.strip() for cell in line.strip("│┃").replace("┃", "│").split("│")]
        for line in lines
        if line.startswith(("│", "┃"))
    ]
    (row,) = [row for row in rows if row[0] == first]
    return row


def test_latency_table_shows_count_errors_throughput_and_percentiles() -> None:
    """1..1000 ms at 100/s with 10 errors: the row reads 1,000 / 10 / 100.0 /
    p50 500 / p90 900 / p99 990 / p99.9 999 / max 1,000 (ms, 3 digits)."""
    run = build_run({"send": ONE_TO_THOUSAND_MS}, errors={"send": 10})

    lines = render(latency_table([NamedRun("a.json", run)]))

    assert "Latency in ms, measured from the intended send time" in lines[0]
    header = cells(lines, "operation")
    assert header == ["operation", "count", "errors", "per s", "p50", "p90", "p99",
                      "p99.9", "max"]
    assert cells(lines, "send") == ["send", "1,000", "10", "100.0", "500", "900",
                                    "990", "999", "1,000"]


def test_several_runs_get_a_run_column_and_a_comparison() -> None:
    """Two runs: each row names its run; the comparison shows p99 ratio 10.00x."""
    before = NamedRun("before.json", build_run({"send": [10.0] * 200}))
    after = NamedRun("after.json", build_run({"send": [100.0] * 200}))

    table = render(latency_table([before, after]))
    comparison = render(comparison_table([before, after]))

    assert cells(table, "after.json")[:3] == ["after.json", "send", "200"]
    assert "Compared with the first run, before.json" in comparison[0]
    baseline = [line for line in comparison if "before.json" in line and "│" in line]
    changed = [line for line in comparison if "after.json" in line]
    assert "1.00x" in baseline[0]
    assert [c.strip() for c in changed[0].strip("│").split("│")][-2:] == [
        "100", "10.00x"
    ]


def test_verdict_table_counts_and_examples() -> None:
    """Two lost messages show as 'lost (FAIL)  2' with their room/user/entry."""
    run = build_run({"send": [5.0] * 10}, verdict=verdict_with_lost(2))

    lines = render(verdict_table(NamedRun("chat.json", run)))  # type: ignore[arg-type]

    assert "Checker verdict for chat.json: FAILED, 5 expected deliveries" in lines[0]
    lost = cells(lines, "lost (FAIL)")
    assert lost[1] == "2"
    assert lost[2] == "lobby/bob 4-0 c-3"
    assert cells(lines, "duplicated")[1] == "0"
    assert any("lobby/bob 5-0 c-4" in line for line in lines)


def test_no_verdict_no_faults_no_tables() -> None:
    """A run without a verdict or faults gets neither table (nothing invented)."""
    named = NamedRun("r.json", build_run({"send": [5.0]}))

    assert verdict_table(named) is None
    assert fault_table(named) is None


def test_fault_timeline_and_chart_mark_the_window() -> None:
    """A pause from 3 s to 5 s: listed in order, and the chart's fault line
    covers exactly columns 3 and 4 under a p99 peak in those seconds."""
    latencies = [500.0 if 300 <= i < 500 else 5.0 for i in range(1000)]
    named = NamedRun("stall.json", build_run({"send": latencies}, faults=PAUSE))

    timeline = render(fault_table(named))  # type: ignore[arg-type]
    chart = render(latency_chart(named))  # type: ignore[arg-type]

    assert cells(timeline, "3.00") == ["3.00", "pause", "redis-1", "SIGSTOP"]
    assert cells(timeline, "5.00")[1] == "resume"
    assert chart[0].startswith("p99 over time, stall.json: one column = 1 s")
    send_line = next(line for line in chart if line.startswith("send"))
    fault_line = next(line for line in chart if line.startswith("faults"))
    offset = len("faults ")
    assert send_line[offset:] == "▁▁▁██▁▁▁▁▁"
    assert fault_line[offset:] == "   ##"


def test_fault_windows_pair_faults_with_their_undo() -> None:
    """pause/resume on one target pair up, a heal of all ends what is still
    open, and a kill never undone stays open to the end."""
    windows = fault_windows([
        *PAUSE,
        FaultEvent(6.0, "kill", "chat-1", "SIGKILL"),
        FaultEvent(4.0, "partition", "redis-2", ""),
        FaultEvent(5.5, "heal", "all", ""),
    ])

    spans = [(w.action, w.target, w.start, w.end) for w in windows]
    assert spans == [
        ("pause", "redis-1", 3.0, 5.0),
        ("partition", "redis-2", 4.0, 5.5),
        ("kill", "chat-1", 6.0, None),
    ]


def test_slo_table_rows_say_pass_or_fail() -> None:
    """Each (rule, operation) is a row with PASS or FAIL and the measured figure."""
    run = build_run({"send": [5.0] * 100})
    results = [("r.json", r) for r in
               evaluate(parse_slos(["p99<10ms", "p99<1ms", "lost==0"]), run)]

    lines = render(slo_table(results))

    assert lines[0].startswith("SLOs: 1 of 3 passed")
    assert cells(lines, "p99<10ms")[1:3] == ["send", "PASS"]
    assert cells(lines, "p99<1ms")[1:3] == ["send", "FAIL"]
    assert cells(lines, "lost==0")[1:3] == ["(run)", "FAIL"]
    assert any("cannot evaluate" in line for line in lines)


def test_run_file_strings_are_not_rich_markup() -> None:
    """Markup in a run file ([bold], [/]) is printed literally, not interpreted."""
    run = build_run({"[red]op[/red]": [5.0]},
                    command=["dslab", "[bold]x[/bold]"],
                    faults=[FaultEvent(0.0, "kill", "[/]", "[link=http://x]y")])
    console = Console(width=100, color_system=None, record=True)

    render_report(console, [NamedRun("[i]n[/i]", run)])
    text = console.export_text()

    for literal in ("[red]op[/red]", "[bold]x[/bold]", "[/]", "[link=http://x]y",
                    "Run [i]n[/i]"):
        assert literal in text


def test_full_report_orders_its_sections() -> None:
    """The whole report reads: run header, latency, comparison, chart, faults,
    verdict, SLOs."""
    first = NamedRun("a.json", build_run({"send": [5.0] * 100}))
    second = NamedRun("b.json", build_run({"send": [9.0] * 100}, faults=PAUSE,
                                          verdict=verdict_with_lost(0)))
    results = [(n.name, r) for n in (first, second)
               for r in evaluate(parse_slos(["p99<8ms"]), n.run)]
    console = Console(width=100, color_system=None, record=True)

    render_report(console, [first, second], results)
    text = console.export_text()

    markers = ["Run a.json", "Run b.json", "Latency in ms", "Compared with the first",
               "p99 over time, b.json", "Faults during b.json",
               "Checker verdict for b.json: ok", "SLOs: 1 of 2 passed"]
    positions = [text.index(marker) for marker in markers]
    assert positions == sorted(positions)
