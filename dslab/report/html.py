"""The HTML half of ``dslab report latency``: one self-contained page.

``render_html`` fills ``templates/report.html`` with the same figures the
terminal tables show (they come from ``dslab.report.slo``) and with plots
drawn here as inline SVG: the percentile distribution of each operation,
every run overlaid, and each run's p50/p99 per second with its faults marked.

Guarantees:

- The page loads nothing and runs nothing: no network, no CDN, no script;
  its Content-Security-Policy forbids both, in case anyone edits it later.
- Every string that comes from a run file or the command line is escaped
  before it reaches the page, so a run file holding
  ``<script>alert(1)</script>`` shows that text and nothing else.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape
from importlib import resources
from pathlib import Path
from string import Template

import dslab
from dslab.errors import UsageError
from dslab.report.runfile import utc_timestamp
from dslab.report.slo import REPORT_PERCENTILES, SloResult, operation_figures
from dslab.report.tables import (
    FAULT_ENDS,
    VERDICT_FAILURES,
    FaultWindow,
    NamedRun,
    example_lines,
    fault_windows,
    format_ms,
    format_ratio,
    verdict_rows,
)

log = logging.getLogger(__name__)

# Okabe-Ito colours: told apart by people with any common colour blindness.
PALETTE = (
    "#0072B2", "#D55E00", "#009E73", "#CC79A7",
    "#E69F00", "#56B4E9", "#000000", "#999999",
)
PLOT_WIDTH_PX = 760
PLOT_HEIGHT_PX = 300
# Room for tick labels on the left and below, and for fault labels above.
MARGIN_LEFT_PX, MARGIN_RIGHT_PX, MARGIN_TOP_PX, MARGIN_BOTTOM_PX = 64, 16, 30, 40
# Points along the distribution's x axis per factor of ten in the tail;
# enough for a smooth curve, few enough to keep the page small.
DISTRIBUTION_STEPS_PER_NINE = 40
# The distribution stops at 99.999 %: beyond, even a long run has few values.
DISTRIBUTION_MAX_NINES = 5.0
# Anomaly examples per kind on the page (the run file keeps up to 10).
PAGE_EXAMPLES = 10

_TEMPLATE = "templates/report.html"


def write_html(
    path: Path,
    runs: Sequence[NamedRun],
    results: Sequence[tuple[str, SloResult]] = (),
) -> None:
    """Write the page to ``path``; an unwritable path is a ``UsageError``."""
    page = render_html(runs, results)
    try:
        path.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise UsageError(
            f"cannot write the HTML report {path} ({exc.strerror or exc})",
            fix="choose a path in a writable directory (--html report.html)",
        ) from exc
    log.debug("html report written: %s (%d bytes)", path, len(page))


def render_html(
    runs: Sequence[NamedRun], results: Sequence[tuple[str, SloResult]] = ()
) -> str:
    """The whole page as text."""
    template = resources.files("dslab.report").joinpath(_TEMPLATE).read_text("utf-8")
    names = ", ".join(named.name for named in runs)

    return Template(template).substitute(
        title=escape(f"dslab latency report: {names}"),
        version=escape(dslab.__version__),
        generated=escape(utc_timestamp()),
        summary=_summary(runs, results),
        slo=_slo_section(runs, results),
        latency=_latency_section(runs),
        distribution=_distribution_section(runs),
        over_time=_over_time_section(runs),
        verdict=_verdict_section(runs),
        faults=_fault_section(runs),
    )


# --- sections ----------------------------------------------------------------


def _summary(runs: Sequence[NamedRun], results: Sequence[tuple[str, SloResult]]) -> str:
    failed = sum(1 for _, result in results if not result.passed)
    if not results:
        line = '<p class="verdict-line">No SLOs were given.</p>'
    elif failed:
        line = (f'<p class="verdict-line fail">FAIL: {failed} of {len(results)} '
                "SLO checks failed.</p>")
    else:
        line = (f'<p class="verdict-line pass">PASS: all {len(results)} SLO '
                "checks passed.</p>")
    rows = []
    for named in runs:
        meta = named.run.meta
        rows.append([
            _cell(named.name),
            _cell(" ".join(meta.command), "mono"),
            _cell(f"{meta.started_at} to {meta.ended_at}"),
            _cell("-" if meta.seed is None else str(meta.seed)),
            _cell(meta.topology or "-"),
            _cell(", ".join(meta.targets) or "-"),
            _cell(meta.dslab_version),
        ])
    headers = ["run", "command", "time (UTC)", "seed", "topology", "targets",
               "dslab"]

    return line + "\n" + _table(headers, rows)


def _slo_section(
    runs: Sequence[NamedRun], results: Sequence[tuple[str, SloResult]]
) -> str:
    if not results:
        return ('<p>None given. Add constraints with <code>--slo</code>, e.g. '
                "<code>--slo 'p99&lt;200ms' --slo 'lost==0'</code>.</p>")
    rows = []
    for name, result in results:
        verdict = "PASS" if result.passed else "FAIL"
        rows.append([
            _cell(name),
            _cell(result.constraint.text, "mono"),
            _cell(result.operation or "(run)"),
            _cell(verdict, verdict.lower()),
            _cell(result.detail),
        ])

    return _table(["run", "rule", "operation", "result", "measured"], rows)


def _latency_section(runs: Sequence[NamedRun]) -> str:
    headers = ["run", "operation", "count", "errors", "per s",
               *(f"p{p:g}" for p in REPORT_PERCENTILES), "max", "mean"]
    rows = []
    for named in runs:
        for figures in operation_figures(named.run).values():
            percentiles = figures.percentiles_ms or {}
            throughput = figures.throughput
            rows.append([
                _cell(named.name),
                _cell(figures.operation),
                _num(f"{figures.count:,}"),
                _num(f"{figures.errors:,}"),
                _num("-" if throughput is None else f"{throughput:,.1f}"),
                *(_num(format_ms(percentiles.get(p))) for p in REPORT_PERCENTILES),
                _num(format_ms(figures.max_ms)),
                _num(format_ms(figures.mean_ms)),
            ])
    html = _table(headers, rows)
    if len(runs) > 1:
        html += "\n<h3>Compared with the first run</h3>\n" + _comparison(runs)

    return html


def _comparison(runs: Sequence[NamedRun]) -> str:
    all_figures = [operation_figures(named.run) for named in runs]
    rows = []
    for op in sorted({op for figures in all_figures for op in figures}):
        first = all_figures[0].get(op)
        first_p = (first.percentiles_ms or {}) if first else {}
        for named, figures in zip(runs, all_figures, strict=True):
            mine = figures.get(op)
            mine_p = (mine.percentiles_ms or {}) if mine else {}
            p50, p99 = mine_p.get(50.0), mine_p.get(99.0)
            rows.append([
                _cell(op),
                _cell(named.name),
                _num(format_ms(p50)),
                _num(format_ratio(p50, first_p.get(50.0))),
                _num(format_ms(p99)),
                _num(format_ratio(p99, first_p.get(99.0))),
            ])
    headers = ["operation", "run", "p50", "p50 vs first", "p99", "p99 vs first"]

    return _table(headers, rows)


def _distribution_section(runs: Sequence[NamedRun]) -> str:
    operations = sorted({op for named in runs for op in named.run.histograms})
    parts = []
    for op in operations:
        lines = []
        for index, named in enumerate(runs):
            histogram = named.run.histograms.get(op)
            if histogram is None or histogram.count == 0:
                continue
            # No point past the resolution of the data: 1/count of the tail.
            nines = min(DISTRIBUTION_MAX_NINES, math.log10(max(histogram.count, 10)))
            steps = max(1, round(nines * DISTRIBUTION_STEPS_PER_NINE))
            xs = [nines * i / steps for i in range(steps + 1)]
            percentiles = [100 * (1 - 10 ** -x) for x in xs]
            found = histogram.percentiles_us(percentiles)
            pairs = zip(xs, percentiles, strict=True)
            points = [(x, found[p] / 1000) for x, p in pairs]
            lines.append(_Line(named.name, _colour(index), [points]))
        if not lines:
            continue
        x_max = max(x for line in lines for seg in line.segments for x, _ in seg)
        ticks = [(float(n), _nines_label(n)) for n in range(int(x_max) + 1)]
        plot = _Plot(
            title=f"Percentile distribution of {op}",
            x_label="percentile",
            y_label="latency (ms)",
            x_max=max(x_max, 1.0),
            x_ticks=ticks,
            lines=lines,
        )
        parts.append(_figure(plot, f"{op}: latency by percentile, runs overlaid"))

    return "\n".join(parts) or "<p>No run recorded a successful operation.</p>"


def _over_time_section(runs: Sequence[NamedRun]) -> str:
    parts = []
    for named in runs:
        series = {op: rows for op, rows in named.run.series.items() if rows}
        if not series:
            continue
        seconds = max(len(rows) for rows in series.values())
        lines = []
        for index, (op, rows) in enumerate(sorted(series.items())):
            colour = _colour(index)
            # Each second is drawn at its middle; a second with no successes
            # breaks the line instead of pretending the latency was zero.
            p99 = _segments([(r.t + 0.5, r.p99_ms) for r in rows])
            p50 = _segments([(r.t + 0.5, r.p50_ms) for r in rows])
            lines.append(_Line(f"{op} p99", colour, p99))
            lines.append(_Line(f"{op} p50", colour, p50, dashed=True))
        step = _nice_step(seconds / 8)
        ticks = [(float(t), f"{t:g} s") for t in _frange(0, seconds, step)]
        plot = _Plot(
            title=f"Latency over time, {named.name}",
            x_label="seconds since the start (intended send time)",
            y_label="latency (ms)",
            x_max=float(seconds),
            x_ticks=ticks,
            lines=lines,
            windows=fault_windows(named.run.faults),
            events=[
                (f.at, f"{f.action} {f.target}", f.action.lower() in FAULT_ENDS)
                for f in named.run.faults
            ],
        )
        parts.append(_figure(plot, f"{named.name}: p50 and p99 of each second"))

    return "\n".join(parts) or "<p>No run has a per-second series.</p>"


def _verdict_section(runs: Sequence[NamedRun]) -> str:
    parts = []
    for named in runs:
        verdict = named.run.verdict
        if verdict is None:
            continue
        total = verdict.get("total")
        total = total if isinstance(total, dict) else {}
        examples = verdict.get("examples")
        examples = examples if isinstance(examples, dict) else {}
        ok = verdict.get("ok")
        state = "ok" if ok is True else "FAILED" if ok is False else "unknown"
        rows = []
        for name in verdict_rows(total):
            value = total[name]
            failing = name in VERDICT_FAILURES and bool(value)
            shown = f"{value:.2f} s" if isinstance(value, float) else f"{value:,}"
            cases = example_lines(examples.get(name), PAGE_EXAMPLES)
            rows.append([
                _cell(f"{name} (FAIL)" if failing else name, "fail" if failing else ""),
                _num(shown),
                "<td class=\"mono\">" + "<br>".join(escape(c) for c in cases) + "</td>",
            ])
        parts.append(
            f"<h3>{escape(named.name)}: {escape(state)}</h3>\n"
            + _table(["check", "count", "examples (room/user entry client-id)"], rows)
        )

    return "\n".join(parts) or "<p>No run has a checker verdict.</p>"


def _fault_section(runs: Sequence[NamedRun]) -> str:
    parts = []
    for named in runs:
        if not named.run.faults:
            continue
        rows = [
            [_num(f"{f.at:.2f}"), _cell(f.action), _cell(f.target), _cell(f.detail)]
            for f in sorted(named.run.faults, key=lambda f: f.at)
        ]
        parts.append(
            f"<h3>{escape(named.name)}</h3>\n"
            + _table(["at (s)", "action", "target", "detail"], rows)
        )

    return "\n".join(parts) or "<p>No faults were injected.</p>"


# --- HTML pieces -------------------------------------------------------------


def _cell(text: str, css_class: str = "") -> str:
    klass = f' class="{escape(css_class)}"' if css_class else ""
    return f"<td{klass}>{escape(text)}</td>"


def _num(text: str) -> str:
    return _cell(text, "num")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A table from already-rendered ``<td>`` cells; headers are escaped here."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "\n".join("<tr>" + "".join(row) + "</tr>" for row in rows)

    return (
        f"<table>\n<thead><tr>{head}</tr></thead>\n"
        f"<tbody>\n{body}\n</tbody>\n</table>"
    )


def _figure(plot: _Plot, caption: str) -> str:
    legend = "".join(
        f'<li><span class="swatch" style="background:{line.colour}"></span>'
        f"{escape(line.label)}</li>"
        for line in plot.lines
        if not line.dashed
    )
    return (
        f"<figure>\n{plot.svg()}\n<ul class=\"legend\">{legend}</ul>\n"
        f"<figcaption>{escape(caption)}</figcaption>\n</figure>"
    )


# --- SVG plots ---------------------------------------------------------------


Point = tuple[float, float]


@dataclass
class _Line:
    label: str
    colour: str
    segments: list[list[Point]]
    dashed: bool = False


@dataclass
class _Plot:
    """A line plot with a linear y axis from zero, drawn as an SVG string."""

    title: str
    x_label: str
    y_label: str
    x_max: float
    x_ticks: list[tuple[float, str]]
    lines: list[_Line]
    windows: list[FaultWindow] = field(default_factory=list)
    # (seconds, label, is an undo): a vertical line each, labelled unless an undo.
    events: list[tuple[float, str, bool]] = field(default_factory=list)

    def svg(self) -> str:
        y_top = max(
            (y for line in self.lines for seg in line.segments for _, y in seg),
            default=0.0,
        )
        y_step = _nice_step(max(y_top, 0.001) / 5)
        y_max = y_step * math.ceil(max(y_top, 0.001) / y_step)
        inner_w = PLOT_WIDTH_PX - MARGIN_LEFT_PX - MARGIN_RIGHT_PX
        inner_h = PLOT_HEIGHT_PX - MARGIN_TOP_PX - MARGIN_BOTTOM_PX
        x_max = self.x_max or 1.0

        def px(x: float) -> float:
            return MARGIN_LEFT_PX + min(max(x, 0.0), x_max) / x_max * inner_w

        def py(y: float) -> float:
            return MARGIN_TOP_PX + inner_h - y / y_max * inner_h

        out = [
            f'<svg xmlns="http://www.w3.org/2000/svg" role="img" '
            f'viewBox="0 0 {PLOT_WIDTH_PX} {PLOT_HEIGHT_PX}" '
            f'width="{PLOT_WIDTH_PX}" height="{PLOT_HEIGHT_PX}" '
            f'aria-label="{escape(self.title)}">',
            f"<title>{escape(self.title)}</title>",
        ]
        bottom = MARGIN_TOP_PX + inner_h
        for window in self.windows:
            end = x_max if window.end is None else window.end
            x0, x1 = px(window.start), px(end)
            label = f"{window.action} {window.target}: {window.start:g} s to " + (
                "the end" if window.end is None else f"{window.end:g} s"
            )
            out.append(
                f'<rect class="fault-window" x="{x0:.1f}" y="{MARGIN_TOP_PX}" '
                f'width="{max(x1 - x0, 1.0):.1f}" height="{inner_h}" '
                f'fill="#b00020" fill-opacity="0.10">'
                f"<title>{escape(label)}</title></rect>"
            )
        for y, text in _y_ticks(y_max, y_step):
            out.append(
                f'<line x1="{MARGIN_LEFT_PX}" x2="{MARGIN_LEFT_PX + inner_w}" '
                f'y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#eee"/>'
                f'<text x="{MARGIN_LEFT_PX - 6}" y="{py(y) + 4:.1f}" '
                f'text-anchor="end">{escape(text)}</text>'
            )
        for x, text in self.x_ticks:
            out.append(
                f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{bottom}" '
                f'y2="{bottom + 5}" stroke="#555"/>'
                f'<text x="{px(x):.1f}" y="{bottom + 18}" '
                f'text-anchor="middle">{escape(text)}</text>'
            )
        out.append(
            f'<rect x="{MARGIN_LEFT_PX}" y="{MARGIN_TOP_PX}" width="{inner_w}" '
            f'height="{inner_h}" fill="none" stroke="#555"/>'
        )
        labelled = 0
        for at, text, undo in self.events:
            x = px(at)
            out.append(
                f'<line class="fault-marker" x1="{x:.1f}" x2="{x:.1f}" '
                f'y1="{MARGIN_TOP_PX}" y2="{bottom}" stroke="#b00020" '
                f'stroke-width="1.5"><title>{escape(f"{at:g} s: {text}")}</title>'
                "</line>"
            )
            if undo:
                continue  # the end of the shaded window says it; keep labels apart
            # Alternate two rows so that neighbouring labels overlap less.
            label_y = MARGIN_TOP_PX - (4 if labelled % 2 == 0 else 14)
            labelled += 1
            out.append(
                f'<text x="{x + 3:.1f}" y="{label_y}" fill="#b00020">'
                f"{escape(text)}</text>"
            )
        for line in self.lines:
            dash = ' stroke-dasharray="5 4"' if line.dashed else ""
            for segment in line.segments:
                coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in segment)
                out.append(
                    f'<polyline fill="none" stroke="{line.colour}" '
                    f'stroke-width="1.8"{dash} points="{coords}">'
                    f"<title>{escape(line.label)}</title></polyline>"
                )
        out.append(
            f'<text x="{MARGIN_LEFT_PX + inner_w / 2:.1f}" '
            f'y="{PLOT_HEIGHT_PX - 6}" text-anchor="middle">'
            f"{escape(self.x_label)}</text>"
            f'<text x="14" y="{MARGIN_TOP_PX + inner_h / 2:.1f}" '
            f'text-anchor="middle" transform="rotate(-90 14 '
            f'{MARGIN_TOP_PX + inner_h / 2:.1f})">{escape(self.y_label)}</text>'
        )
        out.append("</svg>")

        return "\n".join(out)


def _segments(points: Sequence[tuple[float, float | None]]) -> list[list[Point]]:
    """Split a series at missing values; a lone point becomes a short dash."""
    segments: list[list[Point]] = []
    current: list[Point] = []
    for x, y in points:
        if y is None:
            if current:
                segments.append(current)
            current = []
        else:
            current.append((x, y))
    if current:
        segments.append(current)

    return [
        [(seg[0][0] - 0.25, seg[0][1]), (seg[0][0] + 0.25, seg[0][1])]
        if len(seg) == 1
        else seg
        for seg in segments
    ]


def _nice_step(rough: float) -> float:
    """1, 2 or 5 times a power of ten, at least ``rough``."""
    if rough <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(rough))
    for factor in (1, 2, 5, 10):
        if factor * power >= rough:
            return float(factor * power)
    return float(10 * power)


def _frange(start: float, stop: float, step: float) -> list[float]:
    count = math.floor((stop - start) / step + 1e-9) + 1
    return [start + i * step for i in range(count)]


def _y_ticks(y_max: float, step: float) -> list[tuple[float, str]]:
    return [(y, f"{y:g}") for y in _frange(0.0, y_max, step)]


def _nines_label(nines: int) -> str:
    """0 -> 0%, 1 -> 90%, 2 -> 99%, 3 -> 99.9%, ..."""
    if nines == 0:
        return "0%"
    return f"{100 * (1 - 10 ** -nines):.{max(0, nines - 2)}f}%"


def _colour(index: int) -> str:
    return PALETTE[index % len(PALETTE)]
