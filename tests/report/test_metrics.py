"""Reading a server's Prometheus histograms: parsing and percentile estimates."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from dslab.errors import UsageError
from dslab.report.metrics import in_ms, parse_histograms


def _page(values: list[float], buckets: tuple[float, ...]) -> str:
    registry = CollectorRegistry()
    histogram = Histogram("demo_latency_seconds", "demo", ["route"],
                          buckets=buckets, registry=registry)
    for value in values:
        histogram.labels(route="redirect").observe(value)
    return generate_latest(registry).decode()


def test_counts_and_sum_are_read_per_label_set() -> None:
    """Each label set becomes one series with its count and sum."""
    [series] = parse_histograms(_page([0.001, 0.002, 0.003], (0.005, 0.01)))

    assert series.name == "demo_latency_seconds"
    assert series.label_text == "route=redirect"
    assert series.count == 3
    assert series.total == pytest.approx(0.006)


def test_percentiles_interpolate_inside_a_bucket() -> None:
    """100 values spread evenly over 0-10 ms in 1 ms buckets: the estimate of
    p50 is 5 ms and of p90 is 9 ms, as histogram_quantile would say."""
    values = [(i + 0.5) / 100_000 for i in range(0, 1000, 10)]
    buckets = tuple(b / 1000 for b in range(1, 11))
    [series] = parse_histograms(_page(values, buckets))

    assert in_ms(series, series.percentile(50)) == pytest.approx(5.0, abs=0.01)
    assert in_ms(series, series.percentile(90)) == pytest.approx(9.0, abs=0.01)


def test_a_percentile_in_the_overflow_bucket_is_the_last_bound() -> None:
    """Beyond the last finite bucket nothing is known but its bound."""
    [series] = parse_histograms(_page([0.5, 0.6, 0.7], (0.001, 0.01)))

    assert series.percentile(99) == pytest.approx(0.01)


def test_empty_histogram_has_no_percentiles() -> None:
    """No observation, no estimate (rather than a made-up zero)."""
    registry = CollectorRegistry()
    Histogram("idle_seconds", "idle", registry=registry)
    [series] = parse_histograms(generate_latest(registry).decode())

    assert series.percentile(50) is None


def test_garbage_is_a_usage_error() -> None:
    """A page that is not Prometheus text is refused clearly."""
    with pytest.raises(UsageError):
        parse_histograms("{this is json}\n")
