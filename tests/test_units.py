"""Durations and rates as typed on the command line."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dslab.errors import UsageError
from dslab.units import parse_duration, parse_rate


@pytest.mark.parametrize(("text", "seconds"), [
    ("500ms", 0.5), ("10s", 10.0), ("2m", 120.0), ("1h", 3600.0), ("3", 3.0),
    ("1.5s", 1.5), ("7d", 604800.0), ("1w", 604800.0),
])
def test_durations_parse(text: str, seconds: float) -> None:
    """Durations take ms, s, m, h, d and w; a bare number is seconds."""
    assert parse_duration(text) == pytest.approx(seconds)


@given(st.text(st.characters(blacklist_categories=("Nd",)), max_size=8))
def test_durations_without_digits_are_usage_errors(text: str) -> None:
    """Text without a number in it is refused as a usage error, never crashes."""
    with pytest.raises(UsageError):
        parse_duration(text)


@pytest.mark.parametrize("text", ["0s", "-1s", "25h", "10x", ""])
def test_out_of_range_durations_are_refused(text: str) -> None:
    """Zero, negative, over the caller's limit, or an unknown unit: refused."""
    with pytest.raises(UsageError):
        parse_duration(text, max_s=24 * 3600)


@pytest.mark.parametrize(("text", "per_s"), [
    ("10000/s", 10000.0), ("1/s", 1.0), ("30/m", 0.5), ("5", 5.0), ("2/ms", 2000.0),
])
def test_rates_parse(text: str, per_s: float) -> None:
    """Rates are events per unit of time; a bare number is per second."""
    assert parse_rate(text) == pytest.approx(per_s)


@pytest.mark.parametrize("text", ["0/s", "fast", "10/y", "/s"])
def test_bad_rates_are_refused(text: str) -> None:
    """A rate of zero, without a number, or with an unknown unit is refused."""
    with pytest.raises(UsageError, match="rate"):
        parse_rate(text)
