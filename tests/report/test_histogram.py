"""Tests for LatencyHistogram: recording, percentiles and the standard encoding."""

from __future__ import annotations

import math

import pytest
from hdrh.histogram import HdrHistogram
from hypothesis import given, settings
from hypothesis import strategies as st

from dslab.errors import UsageError
from dslab.report.histogram import HIGHEST_US, LatencyHistogram


def test_percentiles_match_recorded_values_within_resolution() -> None:
    """p50 and p99 of 1..10000 us are 5000 and 9900 us to 3 significant digits."""
    histogram = LatencyHistogram()
    for value in range(1, 10_001):
        histogram.record_us(value)

    found = histogram.percentiles_us([50.0, 99.0])

    assert histogram.count == 10_000
    assert found[50.0] == pytest.approx(5_000, rel=1e-3)
    assert found[99.0] == pytest.approx(9_900, rel=1e-3)
    assert histogram.percentile_us(99.0) == found[99.0]


def test_latency_above_ceiling_is_recorded_at_ceiling() -> None:
    """A 2-minute latency is kept, as 60 s, so it still counts in percentiles."""
    histogram = LatencyHistogram()
    histogram.record_us(120_000_000)

    assert histogram.count == 1
    assert histogram.max_us == pytest.approx(HIGHEST_US, rel=1e-3)


def test_negative_latency_is_refused() -> None:
    """A negative latency means two clocks were mixed: UsageError with a fix."""
    with pytest.raises(UsageError) as caught:
        LatencyHistogram().record_us(-1)
    assert caught.value.fix


def test_encoding_is_hdrhistograms_standard_form() -> None:
    """The text decodes with the hdrhistogram package itself, same counts."""
    histogram = LatencyHistogram()
    for value in (3, 3, 150, 42_000):
        histogram.record_us(value)

    other = HdrHistogram.decode(histogram.encode().encode("ascii"))

    assert other.get_total_count() == 4
    assert other.get_count_at_value(3) == 2
    assert other.get_count_at_value(42_000) == 1


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 2 * HIGHEST_US), max_size=200))
def test_encode_decode_keeps_every_count(values: list[int]) -> None:
    """Decoding an encoded histogram gives back exactly the same counts."""
    histogram = LatencyHistogram()
    for value in values:
        histogram.record_us(value)

    again = LatencyHistogram.decode(histogram.encode())

    assert again.counts() == histogram.counts()
    assert again.count == len(values)
    assert again == histogram


def test_add_merges_counts() -> None:
    """add() sums the counts of two histograms."""
    left, right = LatencyHistogram(), LatencyHistogram()
    left.record_us(10)
    right.record_us(10)
    right.record_us(20)

    left.add(right)

    assert left.counts() == {10: 2, 20: 1}


@pytest.mark.parametrize("bad", ["", "not base64!", "aGVsbG8=", "HISTFAAAAB"])
def test_damaged_encoding_is_a_usage_error(bad: str) -> None:
    """Text that is not an encoded histogram raises UsageError, not a crash."""
    with pytest.raises(UsageError):
        LatencyHistogram.decode(bad)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(min_value=1, max_value=60_000_000), min_size=1,
             max_size=2_000),
    st.sampled_from([50.0, 90.0, 99.0, 99.9, 100.0]),
)
def test_percentiles_agree_with_a_brute_force_nearest_rank(
    values: list[int], percentile: float
) -> None:
    """On any data, a percentile from the histogram equals the exact one
    computed from the sorted values, to the histogram's resolution (3
    significant digits). HdrHistogram's definition: the value at rank
    p% x n rounded half up (at least 1)."""
    histogram = LatencyHistogram()
    for value in values:
        histogram.record_us(value)
    ordered = sorted(values)
    rank = max(1, math.floor(percentile / 100 * len(ordered) + 0.5))
    exact = ordered[min(rank, len(ordered)) - 1]

    found = histogram.percentile_us(percentile)

    assert found == pytest.approx(exact, rel=1e-3, abs=1)
