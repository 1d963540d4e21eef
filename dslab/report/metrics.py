"""The servers' own view of latency: histograms read from a ``/metrics`` page.

A chat server or shortener counts its latencies in Prometheus histograms.
Reading them beside a client's run file shows where time goes: what the
server saw versus what the client waited, queueing and the network included.

Attention: a Prometheus histogram only knows how many observations fell in
each bucket, so its percentiles are estimates interpolated inside a bucket
(the way Prometheus's ``histogram_quantile`` does), never finer than the
bucket edges. The client's HdrHistograms are exact to 0.1 %.
"""

from __future__ import annotations

import math
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families
from rich.table import Table
from rich.text import Text

from dslab.errors import EnvironmentProblem, UsageError

FETCH_TIMEOUT_S = 5.0
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


@dataclass(frozen=True)
class ServerHistogram:
    """One histogram series: a metric name with one set of labels."""

    name: str
    labels: tuple[tuple[str, str], ...]
    count: float
    total: float
    buckets: tuple[tuple[float, float], ...]  # (upper bound, cumulative count)

    @property
    def label_text(self) -> str:
        return ",".join(f"{key}={value}" for key, value in self.labels)

    def percentile(self, percent: float) -> float | None:
        """Estimated value below which ``percent`` % of observations fall; None
        when empty; the last finite bound when it falls in the +Inf bucket."""
        if self.count <= 0:
            return None
        rank = self.count * percent / 100
        lower_bound, lower_count = 0.0, 0.0
        for upper_bound, cumulative in self.buckets:
            if cumulative >= rank:
                if math.isinf(upper_bound):
                    return lower_bound
                inside = cumulative - lower_count
                share = (rank - lower_count) / inside if inside else 1.0
                return lower_bound + (upper_bound - lower_bound) * share
            lower_bound, lower_count = upper_bound, cumulative
        return lower_bound


def fetch(url: str) -> str:
    """The text of a /metrics page on a server dslab runs."""
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"--metrics {url!r} is not an http:// URL",
                         fix="give the server's metrics page, e.g. "
                         "http://127.0.0.1:8100/metrics")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=FETCH_TIMEOUT_S) as response:
            return str(response.read().decode("utf-8", errors="replace"))
    except (urllib.error.URLError, OSError) as exc:
        raise EnvironmentProblem(
            f"cannot read {url}: {getattr(exc, 'reason', exc)}",
            fix="check that the server runs (`dslab lab status`)",
        ) from exc


@dataclass
class _Series:
    buckets: list[tuple[float, float]] = field(default_factory=list)
    count: float = 0.0
    total: float = 0.0


def parse_histograms(text: str) -> list[ServerHistogram]:
    """Every histogram series in a Prometheus text page."""
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as exc:
        raise UsageError(f"not a Prometheus metrics page: {exc}") from exc

    found = []
    for family in families:
        if family.type != "histogram":
            continue
        series: dict[tuple[tuple[str, str], ...], _Series] = {}
        for sample in family.samples:
            labels = tuple(sorted((key, value) for key, value
                                  in sample.labels.items() if key != "le"))
            entry = series.setdefault(labels, _Series())
            if sample.name.endswith("_bucket"):
                entry.buckets.append((float(sample.labels["le"]),
                                      float(sample.value)))
            elif sample.name.endswith("_count"):
                entry.count = float(sample.value)
            elif sample.name.endswith("_sum"):
                entry.total = float(sample.value)
        found += [
            ServerHistogram(family.name, labels, entry.count, entry.total,
                            tuple(sorted(entry.buckets)))
            for labels, entry in series.items()
        ]
    return found


def in_ms(histogram: ServerHistogram, value: float | None) -> float | None:
    """Prometheus histograms of durations are in seconds by convention."""
    if value is None:
        return None
    return value * 1000 if histogram.name.endswith("_seconds") else value


def table(url: str, histograms: list[ServerHistogram]) -> Table:
    """The server's histograms as a table like the client's latency table."""
    shown = Table(title=f"server histograms at {url} (estimated from buckets)",
                  title_justify="left")
    for column in ("metric", "labels", "count", "mean",
                   *(f"p{p:g}" for p in PERCENTILES)):
        shown.add_column(column, justify="left" if column in ("metric", "labels")
                         else "right")
    for histogram in histograms:
        mean = histogram.total / histogram.count if histogram.count else None
        cells = [in_ms(histogram, mean),
                 *(in_ms(histogram, histogram.percentile(p)) for p in PERCENTILES)]
        unit = " ms" if histogram.name.endswith("_seconds") else ""
        shown.add_row(
            Text(histogram.name), Text(histogram.label_text),
            f"{histogram.count:.0f}",
            *("-" if cell is None else f"{cell:.2f}{unit}" for cell in cells),
        )
    return shown


def to_dict(histogram: ServerHistogram) -> dict[str, object]:
    return {
        "metric": histogram.name, "labels": dict(histogram.labels),
        "count": histogram.count, "sum": histogram.total,
        "percentiles_estimated": {
            f"p{p:g}": histogram.percentile(p) for p in PERCENTILES
        },
    }
