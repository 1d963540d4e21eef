"""SLOs a learner writes on the command line, and their verdict on a run.

A constraint reads ``[operation:]metric comparator value``, for example
``p99<200ms``, ``deliver:p99.9<=1s``, ``errors<0.1%``, ``lost==0`` or
``throughput>=10000/s``. ``parse_slo`` turns one into an ``Slo`` or raises a
``UsageError`` (exit 2) that lists the accepted forms; ``evaluate`` checks a
list of them against a ``RunFile`` and returns one ``SloResult`` per
constraint and operation.

This module also computes the figures every report shows
(``operation_figures``), so that a table, the HTML page, ``--json`` and the
SLO verdicts all read the same numbers.

Guarantees:

- Percentiles come from the run's HdrHistograms (3 significant digits), never
  from averaging per-second values.
- A constraint about something the run does not have (a checker count on a
  run without a verdict, an operation it never ran, a percentile of an
  operation with no successful sends) *fails* as "cannot evaluate"; nothing
  passes by default.
"""

from __future__ import annotations

import logging
import math
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from dslab.errors import UsageError
from dslab.report.histogram import LatencyHistogram
from dslab.report.runfile import RunFile

log = logging.getLogger(__name__)

# The percentiles every table and JSON document shows, in this order.
REPORT_PERCENTILES = (50.0, 90.0, 99.0, 99.9)
# Checker counts a constraint may name; the fields of the verdict's "total".
VERDICT_COUNTS = (
    "lost",
    "duplicated",
    "reordered",
    "unacked_delivered",
    "double_appended",
    # Added by a scenario that runs the chat worker pool (consumer groups):
    # entries no worker processed, processed twice, still unacknowledged.
    "worker_missed",
    "worker_duplicated",
    "worker_pending",
)
# Microseconds per unit a latency threshold may be written in.
LATENCY_UNITS_US = {"us": 1.0, "µs": 1.0, "ms": 1000.0, "s": 1_000_000.0}

ACCEPTED_FORMS = (
    "p99<200ms, p50<=20ms, p99.9<1s, max<500ms (latency: us, ms or s); "
    "errors<0.1% (error rate) or errors==0 (count); lost==0, duplicated==0, "
    "reordered==0, unacked_delivered==0, double_appended==0 (checker counts); "
    "worker_missed==0, worker_duplicated==0, worker_pending==0 (chat workers); "
    "throughput>=10000/s; any of them scoped to an operation as "
    "OPERATION:RULE, e.g. deliver:p99<200ms; comparators <, <=, ==, =, >=, >"
)

_COMPARATORS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    ">=": operator.ge,
    ">": operator.gt,
}

_RULE = re.compile(
    r"""^\s*
    (?:(?P<operation>[A-Za-z0-9_.\-]+)\s*:\s*)?
    (?P<metric>[A-Za-z_][A-Za-z0-9_.]*)
    \s*(?P<comparator><=|>=|==|<|>|=)\s*
    (?P<number>\d+(?:\.\d*)?|\.\d+)
    \s*(?P<unit>[A-Za-zµ]+|%|/s)?
    \s*$""",
    re.VERBOSE,
)
_PERCENTILE = re.compile(r"^p(\d+(?:\.\d+)?)$")


@dataclass(frozen=True)
class Slo:
    """One parsed constraint.

    ``kind`` is ``latency`` (``threshold`` in microseconds, ``percentile``
    set, or None for ``max``), ``error_rate`` (a fraction, 0.001 for 0.1 %),
    ``error_count``, ``verdict`` (a checker count named by ``metric``) or
    ``throughput`` (successful sends per second).
    """

    text: str
    kind: str
    metric: str
    comparator: str
    threshold: float
    operation: str | None = None
    percentile: float | None = None

    def holds(self, measured: float) -> bool:
        return _COMPARATORS[self.comparator](measured, self.threshold)

    @property
    def unit(self) -> str:
        """The unit ``SloResult.measured`` is given in for this constraint."""
        return {
            "latency": "ms",
            "error_rate": "%",
            "error_count": "errors",
            "verdict": self.metric,
            "throughput": "/s",
        }[self.kind]

    @property
    def limit(self) -> str:
        """The threshold as a person reads it, e.g. ``< 200 ms``."""
        shown = self.threshold
        if self.kind == "latency":
            shown = self.threshold / 1000
        elif self.kind == "error_rate":
            shown = self.threshold * 100
        separator = "" if self.unit in ("%", "/s") else " "
        return f"{self.comparator} {_number(shown)}{separator}{self.unit}"


@dataclass(frozen=True)
class SloResult:
    """The verdict of one constraint on one operation of one run.

    ``measured`` is in ``constraint.unit``; it is None when the run has
    nothing to measure, and then ``passed`` is False.
    """

    constraint: Slo
    operation: str | None
    measured: float | None
    passed: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.constraint.text,
            "operation": self.operation,
            "ok": self.passed,
            "measured": self.measured,
            "unit": self.constraint.unit,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class OperationFigures:
    """What one operation of one run measured; latencies in milliseconds.

    ``seconds`` is the length of the run's per-second series (seconds by
    intended send time); throughput is successes per such second. The
    latency fields are None when nothing succeeded.
    """

    operation: str
    count: int
    errors: int
    seconds: int
    percentiles_ms: dict[float, float] | None
    max_ms: float | None
    mean_ms: float | None

    @property
    def attempts(self) -> int:
        return self.count + self.errors

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.attempts if self.attempts else None

    @property
    def throughput(self) -> float | None:
        return self.count / self.seconds if self.seconds else None

    def to_dict(self) -> dict[str, Any]:
        percentiles = self.percentiles_ms or {}
        return {
            "operation": self.operation,
            "count": self.count,
            "errors": self.errors,
            "error_rate": self.error_rate,
            "seconds": self.seconds,
            "throughput_per_s": self.throughput,
            **{f"{_p_name(p)}_ms": percentiles.get(p) for p in REPORT_PERCENTILES},
            "max_ms": self.max_ms,
            "mean_ms": self.mean_ms,
        }


def operation_figures(run: RunFile) -> dict[str, OperationFigures]:
    """The figures of every operation that has a histogram or a series."""
    seconds = max((len(rows) for rows in run.series.values()), default=0)
    figures: dict[str, OperationFigures] = {}
    for op in sorted(set(run.histograms) | set(run.series)):
        histogram = run.histograms.get(op)
        count = histogram.count if histogram is not None else 0
        if histogram is None or count == 0:
            # No histogram: fall back on the series for the success count.
            count = count or sum(row.throughput for row in run.series.get(op, []))
            percentiles = max_ms = mean_ms = None
        else:
            found = histogram.percentiles_us(REPORT_PERCENTILES)
            percentiles = {p: us / 1000 for p, us in found.items()}
            max_ms = histogram.max_us / 1000
            mean_ms = histogram.mean_us / 1000
        errors = sum(row.errors for row in run.series.get(op, []))
        figures[op] = OperationFigures(
            op, count, errors, seconds, percentiles, max_ms, mean_ms
        )

    return figures


def parse_slo(text: str) -> Slo:
    """One constraint as written on the command line; ``UsageError`` if unknown."""
    match = _RULE.match(text)
    if match is None:
        _refuse(text, "it is not of the form [OPERATION:]METRIC<VALUE")
    operation: str | None = match["operation"]
    metric = match["metric"].lower()
    comparator = "==" if match["comparator"] == "=" else match["comparator"]
    value = float(match["number"])
    unit: str | None = match["unit"]
    if unit is not None and unit != "µs":
        unit = unit.lower()

    def made(kind: str, threshold: float, percentile: float | None = None) -> Slo:
        return Slo(text.strip(), kind, metric, comparator, threshold,
                   operation, percentile)

    percentile_match = _PERCENTILE.match(metric)
    if percentile_match is not None or metric == "max":
        if unit not in LATENCY_UNITS_US:
            given = "none" if unit is None else repr(unit)
            _refuse(text, f"a latency needs a unit (us, ms or s); it has {given}")
        percentile = None
        if percentile_match is not None:
            percentile = float(percentile_match[1])
            if not 0 < percentile <= 100:
                _refuse(text, f"{metric} is not a percentile in (0, 100]")
        return made("latency", value * LATENCY_UNITS_US[unit], percentile)
    if metric == "errors":
        if unit == "%":
            return made("error_rate", value / 100)
        if unit is None:
            return made("error_count", value)
        _refuse(text, "errors take a rate in % (errors<0.1%) or a count (errors==0)")
    if metric in VERDICT_COUNTS:
        if unit is not None:
            _refuse(text, f"{metric} is a count; write it without a unit")
        if operation is not None:
            _refuse(text, f"{metric} is counted for the whole run, not per operation")
        return made("verdict", value)
    if metric == "throughput":
        if unit != "/s":
            _refuse(text, "throughput is in sends per second, e.g. throughput>=100/s")
        return made("throughput", value)

    _refuse(text, f"{metric!r} is not something dslab measures")


def parse_slos(texts: Sequence[str]) -> list[Slo]:
    return [parse_slo(text) for text in texts]


def evaluate(slos: Sequence[Slo], run: RunFile) -> list[SloResult]:
    """Every constraint against ``run``: one result per constraint and operation.

    An unscoped latency, error or throughput constraint is checked for each
    operation of the run separately; a checker count once for the run.
    """
    figures = operation_figures(run)
    results: list[SloResult] = []
    for slo in slos:
        if slo.kind == "verdict":
            results.append(_evaluate_verdict(slo, run.verdict))
            continue
        every = list(figures)
        operations = every if slo.operation is None else [slo.operation]
        if not operations:
            results.append(_cannot(slo, None, "the run recorded no operation"))
        for op in operations:
            found = figures.get(op)
            if found is None:
                known = ", ".join(figures) or "none"
                results.append(_cannot(
                    slo, op, f"the run has no operation {op!r} (it has: {known})"
                ))
            else:
                results.append(
                    _evaluate_operation(slo, found, run.histograms.get(op))
                )
    log.debug("evaluated %d SLO result(s)", len(results))

    return results


def _evaluate_operation(
    slo: Slo, figures: OperationFigures, histogram: LatencyHistogram | None
) -> SloResult:
    op = figures.operation
    if slo.kind == "latency":
        if histogram is None or histogram.count == 0:
            return _cannot(slo, op, f"{op} has no successful sends to measure")
        if slo.percentile is None:
            measured_us = float(histogram.max_us)
        else:
            measured_us = float(histogram.percentile_us(slo.percentile))
        return _judge(slo, op, measured_us, measured_us / 1000,
                      f"{slo.metric} of {op} is {_number(measured_us / 1000)} ms")
    if slo.kind == "error_rate":
        rate = figures.error_rate
        if rate is None:
            return _cannot(slo, op, f"{op} made no attempts")
        return _judge(slo, op, rate, rate * 100,
                      f"{figures.errors} of {figures.attempts} {op} attempts failed "
                      f"({_number(rate * 100)}%)")
    if slo.kind == "error_count":
        return _judge(slo, op, figures.errors, figures.errors,
                      f"{figures.errors} {op} errors")
    throughput = figures.throughput
    if throughput is None:
        return _cannot(slo, op, "the run has no per-second series")
    return _judge(slo, op, throughput, throughput,
                  f"{figures.count} {op} successes in {figures.seconds} s "
                  f"= {_number(throughput)}/s")


def _evaluate_verdict(slo: Slo, verdict: dict[str, Any] | None) -> SloResult:
    if verdict is None:
        return _cannot(slo, None, "the run has no checker verdict "
                       "(only chat runs check deliveries)")
    total = verdict.get("total")
    value = total.get(slo.metric) if isinstance(total, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _cannot(slo, None, f"the checker verdict has no {slo.metric} count")
    assert isinstance(total, dict)  # a count was found in it
    if slo.metric.startswith("worker_"):
        expected, of_what = total.get("worker_entries"), "stream entries"
    else:
        expected, of_what = total.get("expected"), "expected deliveries"
    of = f" of {expected} {of_what}" if isinstance(expected, int) else ""

    return _judge(slo, None, float(value), float(value),
                  f"{_number(value)} {slo.metric}{of}")


def _judge(
    slo: Slo, operation: str | None, compared: float, shown: float, what: str
) -> SloResult:
    passed = slo.holds(compared)
    detail = f"{what}; limit {slo.limit}"

    return SloResult(slo, operation, shown, passed, detail)


def _cannot(slo: Slo, operation: str | None, why: str) -> SloResult:
    return SloResult(slo, operation, None, False, f"cannot evaluate: {why}")


def _refuse(text: str, why: str) -> NoReturn:
    raise UsageError(
        f"--slo {text!r} is not a constraint dslab understands: {why}",
        fix=f"write one of: {ACCEPTED_FORMS}",
    )


def _p_name(percentile: float) -> str:
    return f"p{_number(percentile)}"


def _number(value: float) -> str:
    """Short, exact-enough text for a figure: 200, 0.1, 903.2, 1.5e+06."""
    if not math.isfinite(value):
        return str(value)
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    if abs(value) >= 1000:
        return f"{value:.0f}"
    return f"{value:.4g}" if abs(value) >= 1e-3 else f"{value:.3g}"
