"""Latency histograms: a typed face on the ``hdrhistogram`` package.

Every latency dslab reports goes through ``LatencyHistogram``: values are
recorded in whole microseconds between 1 us and 60 s with 3 significant
digits, percentiles come from HdrHistogram itself (never computed here), and
``encode``/``decode`` use HdrHistogram's standard compressed, base64 form, so
any HdrHistogram implementation in another language can read a run file's
histograms. A decoded histogram has exactly the counts of the one encoded.

Latencies above the ceiling are recorded *at* the ceiling: a value of 60 s
in a report means "60 s or more".
"""

from __future__ import annotations

import binascii
import logging
import zlib
from collections.abc import Sequence
from typing import Any

from hdrh.codec import HdrCookieException, HdrLengthException
from hdrh.histogram import HdrHistogram

from dslab.errors import UsageError

log = logging.getLogger(__name__)

# One microsecond: finer than any round trip through a socket.
LOWEST_US = 1
# Sixty seconds: anything slower is a timeout, not a latency worth resolving.
HIGHEST_US = 60_000_000
# 0.1 % value resolution, HdrHistogram's usual choice for latencies.
SIGNIFICANT_DIGITS = 3
# Per-second histograms only feed p50/p99 of one plot point; 1 % resolution
# keeps them at ~20 KB each instead of ~140 KB.
COARSE_SIGNIFICANT_DIGITS = 2

# Everything hdrh and the layers below it raise for text that is not a
# histogram; all of them mean the same thing to a reader of a run file.
_DECODE_ERRORS = (
    binascii.Error,
    zlib.error,
    UnicodeError,
    ValueError,
    TypeError,
    RuntimeError,
    HdrCookieException,
    HdrLengthException,
)


class LatencyHistogram:
    """Recorded latencies of one operation, in microseconds."""

    def __init__(
        self,
        *,
        significant_digits: int = SIGNIFICANT_DIGITS,
        _hdr: Any = None,
    ) -> None:
        self._hdr: Any = _hdr or HdrHistogram(LOWEST_US, HIGHEST_US, significant_digits)

    def record_us(self, latency_us: int, count: int = 1) -> None:
        """Record one latency (``count`` times); above the ceiling means at it."""
        if latency_us < 0:
            raise UsageError(
                f"a latency of {latency_us} us is negative",
                fix="measure start and end on one monotonic clock",
            )
        self._hdr.record_value(min(latency_us, HIGHEST_US), count)

    def add(self, other: LatencyHistogram) -> None:
        """Add every recording of ``other`` to this histogram."""
        self._hdr.add(other._hdr)

    @property
    def count(self) -> int:
        return int(self._hdr.get_total_count())

    @property
    def max_us(self) -> int:
        return int(self._hdr.get_max_value())

    @property
    def min_us(self) -> int:
        return int(self._hdr.get_min_value())

    @property
    def mean_us(self) -> float:
        return float(self._hdr.get_mean_value())

    def percentile_us(self, percentile: float) -> int:
        """The latency at ``percentile`` (0..100); 0 when nothing was recorded."""
        return int(self._hdr.get_value_at_percentile(percentile))

    def percentiles_us(self, percentiles: Sequence[float]) -> dict[float, int]:
        """Several percentiles in one pass over the counts."""
        found = self._hdr.get_percentile_to_value_dict(list(percentiles))
        return {p: int(found.get(p, 0)) for p in percentiles}

    def counts(self) -> dict[int, int]:
        """Non-zero buckets as {lowest value in the bucket (us): count}."""
        hdr = self._hdr
        return {
            int(hdr.get_value_from_index(index)): int(count)
            for index, count in enumerate(hdr.counts)
            if count
        }

    def encode(self) -> str:
        """HdrHistogram's standard compressed encoding, as ASCII text."""
        encoded: bytes = self._hdr.encode()
        return encoded.decode("ascii")

    @classmethod
    def decode(cls, text: str) -> LatencyHistogram:
        """The histogram ``encode`` wrote; damaged text raises ``UsageError``."""
        try:
            hdr = HdrHistogram.decode(text.encode("ascii"))
        except _DECODE_ERRORS as exc:
            raise UsageError(
                f"a latency histogram does not decode ({type(exc).__name__}: {exc})",
                fix="the run file is damaged; re-run the workload to write it again",
            ) from exc

        return cls(_hdr=hdr)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LatencyHistogram):
            return NotImplemented
        return self.counts() == other.counts()

    __hash__ = None  # type: ignore[assignment]  # mutable: not hashable

    def __repr__(self) -> str:
        return f"LatencyHistogram(count={self.count}, max_us={self.max_us})"
