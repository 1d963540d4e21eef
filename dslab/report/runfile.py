"""Run files: one JSON document per workload run, and the recorder that fills it.

A run file says what ran (command line, dslab version, seed, topology,
targets, start and end), what faults were injected when, how the run went
second by second, the full latency histogram of every operation in
HdrHistogram's standard encoding, and the checker's verdict. docs/run-files.md
describes every field.

Guarantees:

- ``RunFile.from_json(run.to_json()) == run``: histograms decode to exactly
  the counts that were recorded, floats and strings come back unchanged.
- ``save`` replaces the file atomically: a reader sees the old run file or the
  new one, never half of one.
- ``load`` refuses anything that is not a run file, or is a run file of a
  newer format version, with a ``UsageError`` that says what to do.
- Latency is measured from the *intended* send time of the schedule, and the
  per-second series is bucketed by that intended second, so a stall shows as
  the latency of the sends it delayed (docs/checker.md explains why).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from dslab.errors import UsageError
from dslab.report.histogram import COARSE_SIGNIFICANT_DIGITS, LatencyHistogram

log = logging.getLogger(__name__)

RUN_FORMAT = "dslab-run"
# Bump when a reader of the old format would misread a new file.
RUN_FORMAT_VERSION = 1
# asyncio may fire a timer up to a clock tick early; a send that completes
# this much before its intended time is a rounding matter, not a clock bug.
EARLY_TOLERANCE_S = 0.001
# The two percentiles each second of the series shows.
SERIES_PERCENTILES = (50.0, 99.0)

_NOT_A_RUN_FILE_FIX = (
    "pass a file written by `dslab chat bench`, `dslab shorten bench` or "
    "`dslab chaos run`"
)

T = TypeVar("T")


def utc_timestamp(moment: datetime | None = None) -> str:
    """ISO-8601 UTC with milliseconds, e.g. ``2026-01-31T12:00:00.123Z``."""
    moment = moment or datetime.now(UTC)
    text = moment.astimezone(UTC).isoformat(timespec="milliseconds")

    return text.replace("+00:00", "Z")


@dataclass(frozen=True)
class RunMeta:
    """What ran: enough to run it again and to tell two runs apart."""

    command: list[str]
    dslab_version: str
    started_at: str  # ISO-8601 UTC, see utc_timestamp
    ended_at: str
    seed: int | None = None
    topology: str | None = None
    targets: list[str] = field(default_factory=list)  # URLs or lab node names


@dataclass(frozen=True)
class FaultEvent:
    """One step of the fault timeline; ``at`` is seconds since the run started."""

    at: float
    action: str  # kill, pause, resume, partition, heal, delay, ...
    target: str
    detail: str = ""


@dataclass(frozen=True)
class SecondStats:
    """One second of one operation, by the intended time of its sends.

    ``throughput`` counts sends intended in second ``t`` that succeeded,
    ``errors`` those that failed; the percentiles are of the successes and are
    None when there were none.
    """

    t: int
    throughput: int
    errors: int
    p50_ms: float | None
    p99_ms: float | None


class _Second:
    """The recordings of one operation in one intended second."""

    __slots__ = ("errors", "histogram")

    def __init__(self) -> None:
        self.histogram = LatencyHistogram(significant_digits=COARSE_SIGNIFICANT_DIGITS)
        self.errors = 0


class LatencyRecorder:
    """Records latencies per operation, measured from the intended send time.

    Times are seconds on one monotonic clock, the one ``started_at`` was read
    from. Each success is recorded twice: into the operation's full-resolution
    histogram, and into a coarse one for its intended second.

    Attention: the per-second histograms stay in memory until the run file is
    written, ~20 KB per operation per second of run (a 10-minute run with
    three operations holds ~36 MB).
    """

    def __init__(self, started_at: float) -> None:
        self.started_at = started_at
        self._histograms: dict[str, LatencyHistogram] = {}
        self._seconds: dict[str, dict[int, _Second]] = defaultdict(dict)
        self._last_second = -1

    def record(self, operation: str, intended_at: float, completed_at: float) -> None:
        """A success: latency is ``completed_at - intended_at``."""
        latency_s = completed_at - intended_at
        if latency_s < -EARLY_TOLERANCE_S:
            raise UsageError(
                f"{operation} completed {-latency_s:.6f} s before it was due",
                fix="read intended and completed times from one monotonic clock",
            )
        latency_us = max(0, round(latency_s * 1_000_000))

        histogram = self._histograms.get(operation)
        if histogram is None:
            histogram = self._histograms[operation] = LatencyHistogram()
        histogram.record_us(latency_us)
        self._second(operation, intended_at).histogram.record_us(latency_us)

    def record_error(self, operation: str, intended_at: float) -> None:
        """A failure: counted in its intended second, not in any histogram."""
        self._second(operation, intended_at).errors += 1

    @property
    def operations(self) -> list[str]:
        return sorted(set(self._histograms) | set(self._seconds))

    def histograms(self) -> dict[str, LatencyHistogram]:
        """The full-resolution histogram of each operation (empty if all failed)."""
        return {
            op: self._histograms.get(op) or LatencyHistogram() for op in self.operations
        }

    def series(self) -> dict[str, list[SecondStats]]:
        """Per operation, one row for every second from 0 to the last one used."""
        series: dict[str, list[SecondStats]] = {}
        for op in self.operations:
            seconds = self._seconds.get(op, {})
            rows = []
            for t in range(self._last_second + 1):
                second = seconds.get(t)
                rows.append(_summarise(t, second))
            series[op] = rows

        return series

    def _second(self, operation: str, intended_at: float) -> _Second:
        offset_s = intended_at - self.started_at
        if offset_s < -EARLY_TOLERANCE_S:
            raise UsageError(
                f"{operation} was due {-offset_s:.6f} s before the run started",
                fix="start the recorder with the schedule's start time",
            )
        t = max(0, math.floor(offset_s))
        self._last_second = max(self._last_second, t)
        seconds = self._seconds[operation]
        second = seconds.get(t)
        if second is None:
            second = seconds[t] = _Second()

        return second


def _summarise(t: int, second: _Second | None) -> SecondStats:
    if second is None:
        return SecondStats(t, 0, 0, None, None)
    histogram = second.histogram
    if histogram.count == 0:
        return SecondStats(t, 0, second.errors, None, None)
    p50_us, p99_us = histogram.percentiles_us(SERIES_PERCENTILES).values()

    return SecondStats(t, histogram.count, second.errors, p50_us / 1000, p99_us / 1000)


@dataclass
class RunFile:
    """One run, as stored on disk; see docs/run-files.md."""

    meta: RunMeta
    faults: list[FaultEvent] = field(default_factory=list)
    series: dict[str, list[SecondStats]] = field(default_factory=dict)
    histograms: dict[str, LatencyHistogram] = field(default_factory=dict)
    verdict: dict[str, Any] | None = None  # Verdict.to_dict() of the checker
    slo: list[dict[str, Any]] | None = None  # SLO / constraint results

    @classmethod
    def from_recorder(
        cls,
        meta: RunMeta,
        recorder: LatencyRecorder,
        *,
        faults: list[FaultEvent] | None = None,
        verdict: dict[str, Any] | None = None,
        slo: list[dict[str, Any]] | None = None,
    ) -> RunFile:
        return cls(
            meta=meta,
            faults=list(faults or []),
            series=recorder.series(),
            histograms=recorder.histograms(),
            verdict=verdict,
            slo=slo,
        )

    def to_json(self) -> str:
        document = {
            "format": RUN_FORMAT,
            "version": RUN_FORMAT_VERSION,
            "meta": _meta_to_json(self.meta),
            "faults": [
                {"at": f.at, "action": f.action, "target": f.target, "detail": f.detail}
                for f in self.faults
            ],
            "series": {
                op: [_second_to_json(row) for row in rows]
                for op, rows in self.series.items()
            },
            "histograms": {
                op: {"unit": "us", "encoding": "hdrhistogram", "data": h.encode()}
                for op, h in self.histograms.items()
            },
            "verdict": self.verdict,
            "slo": self.slo,
        }
        try:
            return json.dumps(document, indent=1, allow_nan=False)
        except ValueError as exc:
            raise UsageError(
                f"the run cannot be written as JSON ({exc})",
                fix="a time or a verdict holds NaN or infinity; record finite values",
            ) from exc

    @classmethod
    def from_json(cls, text: str, *, source: str = "the run file") -> RunFile:
        try:
            document = json.loads(text, parse_constant=_refuse_constant)
        except ValueError as exc:
            raise UsageError(
                f"{source} is not a dslab run file (not JSON: {exc})",
                fix=_NOT_A_RUN_FILE_FIX,
            ) from exc

        return _Reader(source).run_file(document)

    def save(self, path: Path) -> None:
        """Write atomically: a temporary file next to ``path``, then a rename."""
        text = self.to_json()
        try:
            _write_atomically(path, text)
        except OSError as exc:
            raise UsageError(
                f"cannot write the run file {path} ({exc.strerror or exc})",
                fix="choose a path in a writable directory with free space",
            ) from exc
        log.debug("run file written: %s", path)

    @classmethod
    def load(cls, path: Path) -> RunFile:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise UsageError(
                f"there is no run file at {path}",
                fix="check the path; bench commands print where they wrote theirs",
            ) from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(
                f"{path} is not a dslab run file ({exc})",
                fix=_NOT_A_RUN_FILE_FIX,
            ) from exc

        return cls.from_json(text, source=str(path))


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(  # noqa: SIM115  closed below
        "w",
        encoding="utf-8",
        dir=path.parent,
        prefix=f".{path.name}.",
        suffix=".tmp",
        delete=False,
    )
    try:
        with handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        # Whatever went wrong, the old file is untouched; leave no debris.
        Path(handle.name).unlink(missing_ok=True)
        raise


def _refuse_constant(name: str) -> NoReturn:
    # Python's json accepts NaN and Infinity, which no other JSON reader does.
    raise ValueError(f"{name} is not JSON")


def _meta_to_json(meta: RunMeta) -> dict[str, Any]:
    return {
        "command": list(meta.command),
        "dslab_version": meta.dslab_version,
        "seed": meta.seed,
        "topology": meta.topology,
        "targets": list(meta.targets),
        "started_at": meta.started_at,
        "ended_at": meta.ended_at,
    }


def _second_to_json(row: SecondStats) -> dict[str, Any]:
    return {
        "t": row.t,
        "throughput": row.throughput,
        "errors": row.errors,
        "p50_ms": row.p50_ms,
        "p99_ms": row.p99_ms,
    }


class _Reader:
    """Turns a parsed JSON document into a RunFile, naming the first bad field."""

    def __init__(self, source: str) -> None:
        self.source = source

    def damaged(self, where: str, problem: str) -> NoReturn:
        raise UsageError(
            f"{self.source} is a damaged run file: {where} {problem}",
            fix="re-run the workload to write a fresh run file",
        )

    def run_file(self, document: object) -> RunFile:
        if not isinstance(document, dict) or document.get("format") != RUN_FORMAT:
            raise UsageError(
                f'{self.source} is not a dslab run file (no "format": '
                f'"{RUN_FORMAT}" marker)',
                fix=_NOT_A_RUN_FILE_FIX,
            )
        version = document.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            self.damaged("version", f"is {version!r}, not a format version")
        if version > RUN_FORMAT_VERSION:
            raise UsageError(
                f"{self.source} was written by a newer dslab (run file version "
                f"{version}; this dslab reads version {RUN_FORMAT_VERSION})",
                fix="upgrade dslab (pip install -U dslab) to read it",
            )

        return RunFile(
            meta=self.meta(self.get(document, "meta", dict, "")),
            faults=[
                self.fault(item, f"faults[{i}]")
                for i, item in enumerate(self.get(document, "faults", list, ""))
            ],
            series={
                op: [
                    self.second(row, f"series.{op}[{i}]")
                    for i, row in enumerate(self.typed(rows, list, f"series.{op}"))
                ]
                for op, rows in self.get(document, "series", dict, "").items()
            },
            histograms={
                op: self.histogram(entry, f"histograms.{op}")
                for op, entry in self.get(document, "histograms", dict, "").items()
            },
            verdict=self.optional(document, "verdict", dict, ""),
            slo=self.slo(document.get("slo")),
        )

    def meta(self, meta: dict[str, Any]) -> RunMeta:
        where = "meta."
        for stamp in ("started_at", "ended_at"):
            text = self.get(meta, stamp, str, where)
            try:
                datetime.fromisoformat(text)
            except ValueError:
                self.damaged(where + stamp, f"is {text!r}, not an ISO-8601 time")

        return RunMeta(
            command=self.strings(self.get(meta, "command", list, where), "command"),
            dslab_version=self.get(meta, "dslab_version", str, where),
            started_at=meta["started_at"],
            ended_at=meta["ended_at"],
            seed=self.optional(meta, "seed", int, where),
            topology=self.optional(meta, "topology", str, where),
            targets=self.strings(self.get(meta, "targets", list, where), "targets"),
        )

    def fault(self, item: object, where: str) -> FaultEvent:
        fault = self.typed(item, dict, where)
        where += "."
        return FaultEvent(
            at=self.get(fault, "at", float, where),
            action=self.get(fault, "action", str, where),
            target=self.get(fault, "target", str, where),
            detail=self.get(fault, "detail", str, where),
        )

    def second(self, item: object, where: str) -> SecondStats:
        row = self.typed(item, dict, where)
        where += "."
        return SecondStats(
            t=self.get(row, "t", int, where),
            throughput=self.get(row, "throughput", int, where),
            errors=self.get(row, "errors", int, where),
            p50_ms=self.optional(row, "p50_ms", float, where),
            p99_ms=self.optional(row, "p99_ms", float, where),
        )

    def histogram(self, item: object, where: str) -> LatencyHistogram:
        entry = self.typed(item, dict, where)
        unit = entry.get("unit")
        if unit != "us":
            self.damaged(where + ".unit", f"is {unit!r}, expected 'us'")

        return LatencyHistogram.decode(self.get(entry, "data", str, where + "."))

    def slo(self, value: object) -> list[dict[str, Any]] | None:
        if value is None:
            return None
        items = self.typed(value, list, "slo")

        return [self.typed(item, dict, f"slo[{i}]") for i, item in enumerate(items)]

    def strings(self, items: list[Any], where: str) -> list[str]:
        return [
            self.typed(item, str, f"meta.{where}[{i}]") for i, item in enumerate(items)
        ]

    def get(self, obj: Mapping[str, Any], key: str, kind: type[T], where: str) -> T:
        if key not in obj:
            self.damaged(where + key, "is missing")
        return self.typed(obj[key], kind, where + key)

    def optional(
        self, obj: Mapping[str, Any], key: str, kind: type[T], where: str
    ) -> T | None:
        value = obj.get(key)
        return None if value is None else self.typed(value, kind, where + key)

    def typed(self, value: object, kind: type[T], where: str) -> T:
        # JSON has one number type: an integral float is fine where a float is
        # wanted; a bool is never a number.
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and kind is not bool:
            self.damaged(where, f"is {value!r}, expected {kind.__name__}")
        if not isinstance(value, kind):
            self.damaged(where, f"is {value!r}, expected {kind.__name__}")
        return value
