"""Tests for SLO constraints: what parses, what is refused, and their verdicts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import dslab
from dslab.errors import EXIT_USAGE, UsageError
from dslab.report.runfile import FaultEvent, LatencyRecorder, RunFile, RunMeta
from dslab.report.slo import evaluate, operation_figures, parse_slo, parse_slos
from dslab.workload.checker import Delivery, Membership, Send, check_history

RATE_PER_S = 100  # sends per second of the runs built here


def build_run(
    latencies_ms: Mapping[str, Sequence[float]],
    *,
    errors: Mapping[str, int] | None = None,
    faults: Sequence[FaultEvent] = (),
    verdict: dict[str, Any] | None = None,
    command: Sequence[str] = ("dslab", "chat", "bench", "--rate", "100/s"),
    targets: Sequence[str] = ("redis://127.0.0.1:7000",),
) -> RunFile:
    """A run recorded through the real LatencyRecorder: send i of an operation
    is due at i / RATE_PER_S seconds and takes latencies_ms[op][i]."""
    recorder = LatencyRecorder(started_at=0.0)
    for op, latencies in latencies_ms.items():
        for i, latency_ms in enumerate(latencies):
            intended = i / RATE_PER_S
            recorder.record(op, intended, intended + latency_ms / 1000)
    for op, count in (errors or {}).items():
        for i in range(count):
            recorder.record_error(op, i / RATE_PER_S)
    meta = RunMeta(
        command=list(command),
        dslab_version=dslab.__version__,
        started_at="2026-01-31T12:00:00.000Z",
        ended_at="2026-01-31T12:00:10.000Z",
        seed=7,
        topology="standalone",
        targets=list(targets),
    )
    return RunFile.from_recorder(meta, recorder, faults=list(faults), verdict=verdict)


def verdict_with_lost(lost: int) -> dict[str, Any]:
    """A real checker verdict for one room where bob misses ``lost`` messages."""
    sends = [
        Send("lobby", "alice", f"c-{i}", float(i), True, f"{i + 1}-0", i + 0.1)
        for i in range(5)
    ]
    deliveries = [
        Delivery("lobby", "bob", f"{i + 1}-0", f"c-{i}", i + 0.2)
        for i in range(5 - lost)
    ]
    memberships = [Membership("lobby", "bob", 0.0)]
    return check_history(sends, deliveries, memberships).to_dict()


ONE_TO_THOUSAND_MS = [float(i) for i in range(1, 1001)]


# --- parsing ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "threshold", "percentile", "operation"),
    [
        ("p99<200ms", "latency", 200_000, 99.0, None),
        ("p50<=20ms", "latency", 20_000, 50.0, None),
        ("p99.9<1s", "latency", 1_000_000, 99.9, None),
        ("p99<250us", "latency", 250, 99.0, None),
        ("max<500ms", "latency", 500_000, None, None),
        ("errors<0.1%", "error_rate", 0.001, None, None),
        ("errors==0", "error_count", 0, None, None),
        ("lost==0", "verdict", 0, None, None),
        ("duplicated==0", "verdict", 0, None, None),
        ("reordered=0", "verdict", 0, None, None),
        ("throughput>=10000/s", "throughput", 10_000, None, None),
        ("deliver:p99<200ms", "latency", 200_000, 99.0, "deliver"),
        ("  send : p50 < 1.5 ms ", "latency", 1_500, 50.0, "send"),
    ],
)
def test_accepted_forms_parse(
    text: str, kind: str, threshold: float, percentile: float | None,
    operation: str | None,
) -> None:
    """Each documented form parses to its kind, threshold (us, fraction, count,
    per second), percentile and operation scope."""
    slo = parse_slo(text)

    assert slo.kind == kind
    assert slo.threshold == pytest.approx(threshold)
    assert slo.percentile == percentile
    assert slo.operation == operation


def test_single_equals_means_equality() -> None:
    """`lost=0` (as a person may type it) is the same rule as `lost==0`."""
    assert parse_slo("lost=0").comparator == parse_slo("lost==0").comparator == "=="


@pytest.mark.parametrize(
    "text",
    [
        "", "p99", "p99<", "p99<200", "p99<200m", "p0<1ms", "p101<1ms",
        "p99<-1ms", "average<2ms", "lost==0%", "send:lost==0", "errors<1ms",
        "throughput>5", "p99<<2ms", "p99<2ms;rm", "a:b:p99<1ms",
    ],
)
def test_unknown_forms_are_usage_errors(text: str) -> None:
    """Anything else is a UsageError (exit 2) whose fix lists the accepted forms."""
    with pytest.raises(UsageError) as caught:
        parse_slo(text)

    assert caught.value.exit_code == EXIT_USAGE
    assert "p99<200ms" in str(caught.value.fix)
    assert "throughput>=10000/s" in str(caught.value.fix)


@given(
    whole=st.integers(min_value=0, max_value=10**6),
    fraction=st.text(alphabet="0123456789", max_size=4),
    unit=st.sampled_from(["us", "ms", "s"]),
)
def test_latency_numbers_parse_exactly(whole: int, fraction: str, unit: str) -> None:
    """Any plain decimal (`200`, `0.25`, `7.`) with any unit gives that many us."""
    number = f"{whole}.{fraction}" if fraction else str(whole)
    scale = {"us": 1, "ms": 1_000, "s": 1_000_000}[unit]

    slo = parse_slo(f"p99<{number}{unit}")

    assert slo.threshold == pytest.approx(float(number) * scale)


# --- evaluation ------------------------------------------------------------------


def test_percentile_verdict_uses_the_histogram() -> None:
    """Latencies 1..1000 ms: p99 is 990 ms within hdrh's 0.1 %, so p99<1s
    passes and p99<900ms fails, with the measured figure in ms."""
    run = build_run({"send": ONE_TO_THOUSAND_MS})

    passing, failing = (
        evaluate(parse_slos([rule]), run)[0] for rule in ("p99<1s", "p99<900ms")
    )

    assert passing.passed and not failing.passed
    assert failing.measured == pytest.approx(990, rel=1e-3)
    assert "limit < 900 ms" in failing.detail


def test_rare_percentiles_and_max_are_read_from_the_histogram() -> None:
    """p75 and max are answered too, not only the report's fixed percentiles."""
    run = build_run({"send": ONE_TO_THOUSAND_MS})

    p75, top = evaluate(parse_slos(["p75<=1s", "max<1s"]), run)

    assert p75.measured == pytest.approx(750, rel=1e-3)
    assert top.measured == pytest.approx(1000, rel=1e-3)
    assert not top.passed  # 1000 ms is not below 1 s


def test_unscoped_rule_is_checked_per_operation() -> None:
    """p99<100ms over send (fast) and deliver (slow) gives one result each."""
    run = build_run({"send": [5.0] * 100, "deliver": [500.0] * 100})

    results = {r.operation: r.passed for r in evaluate(parse_slos(["p99<100ms"]), run)}

    assert results == {"deliver": False, "send": True}


def test_scoped_rule_checks_only_its_operation() -> None:
    """deliver:p99<100ms checks deliver alone."""
    run = build_run({"send": [5.0] * 100, "deliver": [500.0] * 100})

    (result,) = evaluate(parse_slos(["deliver:p99<100ms"]), run)

    assert result.operation == "deliver" and not result.passed


def test_unknown_operation_cannot_be_evaluated_and_fails() -> None:
    """A rule about an operation the run never ran fails, naming what it has."""
    run = build_run({"send": [5.0] * 100})

    (result,) = evaluate(parse_slos(["redirect:p99<100ms"]), run)

    assert not result.passed and result.measured is None
    assert "cannot evaluate" in result.detail and "send" in result.detail


def test_checker_rule_without_verdict_fails_explicitly() -> None:
    """lost==0 on a run without a checker verdict is a failure, not a silent pass."""
    run = build_run({"redirect": [5.0] * 100})

    (result,) = evaluate(parse_slos(["lost==0"]), run)

    assert not result.passed
    assert result.measured is None
    assert "no checker verdict" in result.detail


def test_checker_rules_read_the_verdict() -> None:
    """lost==0 fails with the count when two messages were lost; passes when none."""
    lossy = build_run({"send": [5.0] * 10}, verdict=verdict_with_lost(2))
    clean = build_run({"send": [5.0] * 10}, verdict=verdict_with_lost(0))

    (failed,) = evaluate(parse_slos(["lost==0"]), lossy)
    (passed,) = evaluate(parse_slos(["lost==0"]), clean)

    assert not failed.passed and failed.measured == 2
    assert passed.passed and passed.measured == 0


def test_error_rate_compares_errors_with_attempts() -> None:
    """1 error in 1000 attempts is 0.1 %: errors<0.1% fails, errors<=0.1% passes."""
    run = build_run({"send": [5.0] * 999}, errors={"send": 1})

    strict, lenient, count = evaluate(
        parse_slos(["errors<0.1%", "errors<=0.1%", "errors==0"]), run
    )

    assert not strict.passed and strict.measured == pytest.approx(0.1)
    assert lenient.passed
    assert not count.passed and count.measured == 1


def test_throughput_is_successes_per_second_of_the_run() -> None:
    """1000 successes due over 10 s is 100/s."""
    run = build_run({"send": [5.0] * 1000})

    at_least, above = evaluate(
        parse_slos(["throughput>=100/s", "throughput>100/s"]), run
    )

    assert at_least.passed and at_least.measured == pytest.approx(100)
    assert not above.passed


def test_latency_of_an_operation_that_only_failed_cannot_pass() -> None:
    """An operation with errors but no successes has no percentile: FAIL."""
    run = build_run({"send": [5.0] * 100}, errors={"create": 10})

    (result,) = evaluate(parse_slos(["create:p99<1s"]), run)

    assert not result.passed and "no successful" in result.detail


def test_figures_match_the_recorded_latencies() -> None:
    """Figures: count, errors, throughput and p50/p90/p99/p99.9/max as recorded."""
    run = build_run({"send": ONE_TO_THOUSAND_MS}, errors={"send": 10})

    figures = operation_figures(run)["send"]

    assert (figures.count, figures.errors, figures.seconds) == (1000, 10, 10)
    assert figures.throughput == pytest.approx(100)
    assert figures.percentiles_ms is not None
    for percentile, expected_ms in ((50.0, 500), (90.0, 900), (99.0, 990),
                                    (99.9, 999)):
        assert figures.percentiles_ms[percentile] == pytest.approx(
            expected_ms, rel=1e-3
        )
    assert figures.max_ms == pytest.approx(1000, rel=1e-3)
