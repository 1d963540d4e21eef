"""Durations and rates as a person types them: ``500ms``, ``10s``, ``7d``, ``1/s``.

One parser for every command, so ``--for``, ``--ttl``, ``--duration`` and
``--rate`` accept the same forms and refuse bad ones with the same message.
"""

from __future__ import annotations

import re

from dslab.errors import UsageError

_SECONDS_PER_UNIT = {
    "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0,
}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*(ms|s|m|h))?\s*$")


def parse_duration(
    text: str, *, what: str = "duration", max_s: float | None = None
) -> float:
    """Seconds in ``text``: ``250ms``, ``10s``, ``2m``, ``1.5h``, ``7d``, ``2w``;
    a bare number means seconds. Longer than ``max_s`` is refused."""
    match = _DURATION_RE.match(text)
    if not match:
        raise UsageError(
            f"{what} {text!r} is not a duration",
            fix="write a number with a unit: 500ms, 10s, 2m, 1h, 7d",
        )
    number, unit = match.groups()
    seconds = float(number) * _SECONDS_PER_UNIT[unit or "s"]
    if seconds <= 0:
        raise UsageError(f"{what} {text!r} must be longer than zero")
    if max_s is not None and seconds > max_s:
        raise UsageError(
            f"{what} {text!r} is longer than the limit of {max_s:g} s",
            fix="give a shorter duration (a unit typo such as h for s?)",
        )

    return seconds


def parse_rate(text: str, *, what: str = "rate") -> float:
    """Events per second in ``text``: ``10000/s``, ``1/s``, ``30/m``, ``5``."""
    match = _RATE_RE.match(text)
    if not match:
        raise UsageError(
            f"{what} {text!r} is not a rate",
            fix="write events per unit of time: 1/s, 100/s, 30/m",
        )
    number, unit = match.groups()
    rate = float(number) / _SECONDS_PER_UNIT[unit or "s"]
    if rate <= 0:
        raise UsageError(f"{what} {text!r} must be above zero")

    return rate
