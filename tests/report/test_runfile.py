"""Tests for run files: the recorder, lossless round trips, atomic saves, refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dslab
from dslab.errors import UsageError
from dslab.report.histogram import HIGHEST_US, LatencyHistogram
from dslab.report.runfile import (
    RUN_FORMAT,
    RUN_FORMAT_VERSION,
    FaultEvent,
    LatencyRecorder,
    RunFile,
    RunMeta,
    SecondStats,
    utc_timestamp,
)
from dslab.workload.checker import Delivery, Membership, Send, Verdict, check_history

START = 1000.0  # a monotonic clock reading; any value works


def meta(**changes: Any) -> RunMeta:
    values: dict[str, Any] = {
        "command": ["dslab", "chat", "bench", "--rate", "10/s"],
        "dslab_version": dslab.__version__,
        "started_at": "2026-01-31T12:00:00.000Z",
        "ended_at": "2026-01-31T12:00:30.000Z",
        "seed": 7,
        "topology": "standalone",
        "targets": ["redis://127.0.0.1:7000"],
    }
    values.update(changes)
    return RunMeta(**values)


# --- the recorder ----------------------------------------------------------------


def test_series_is_bucketed_by_intended_second() -> None:
    """A send due at 0.5 s that completes at 2.7 s lands in second 0 as 2.2 s."""
    recorder = LatencyRecorder(START)
    recorder.record("send", START + 0.5, START + 2.7)

    (row,) = recorder.series()["send"]

    assert row.t == 0
    assert row.throughput == 1
    assert row.p50_ms == pytest.approx(2200, rel=0.01)


def test_series_percentiles_come_from_the_recordings() -> None:
    """100 sends of 1..100 ms in one second give p50 ~50 ms and p99 ~99 ms."""
    recorder = LatencyRecorder(START)
    for i in range(1, 101):
        recorder.record("send", START + 0.001 * i, START + 0.001 * i + i / 1000)

    (row,) = recorder.series()["send"]

    assert row.throughput == 100
    assert row.p50_ms == pytest.approx(50, rel=0.01)
    assert row.p99_ms == pytest.approx(99, rel=0.01)
    whole = recorder.histograms()["send"]
    assert whole.count == 100
    assert whole.percentile_us(99.0) == pytest.approx(99_000, rel=1e-3)


def test_stall_shows_as_latency_of_the_delayed_sends() -> None:
    """A 1 s stall at 100/s: every send due during it carries the wait."""
    recorder = LatencyRecorder(START)
    for i in range(300):
        due = START + i / 100
        # The server answers in 1 ms, except that nothing completes during 1..2 s.
        done = START + 2.0 if 1.0 <= due - START < 2.0 else due + 0.001
        recorder.record("send", due, done)

    rows = recorder.series()["send"]

    assert [r.throughput for r in rows] == [100, 100, 100]
    assert rows[0].p99_ms == pytest.approx(1, rel=0.01)
    assert rows[1].p50_ms == pytest.approx(500, rel=0.02)
    assert rows[1].p99_ms == pytest.approx(990, rel=0.02)
    assert rows[2].p99_ms == pytest.approx(1, rel=0.01)


def test_errors_are_counted_per_second_not_in_histograms() -> None:
    """Failures appear in the series' errors column and nowhere else."""
    recorder = LatencyRecorder(START)
    recorder.record_error("send", START + 0.2)
    recorder.record_error("send", START + 2.2)
    recorder.record("redirect", START + 1.5, START + 1.501)

    series = recorder.series()

    assert [r.errors for r in series["send"]] == [1, 0, 1]
    assert series["send"][1] == SecondStats(1, 0, 0, None, None)
    assert recorder.histograms()["send"].count == 0
    assert [r.throughput for r in series["redirect"]] == [0, 1, 0]


def test_slightly_early_completion_is_zero_but_clock_mixups_are_refused() -> None:
    """Half a millisecond early records 0; a second early is a UsageError."""
    recorder = LatencyRecorder(START)
    recorder.record("send", START + 1.0, START + 0.9995)
    assert recorder.histograms()["send"].max_us == 0

    with pytest.raises(UsageError):
        recorder.record("send", START + 1.0, START)
    with pytest.raises(UsageError):
        recorder.record("send", START - 5.0, START)


# --- the file --------------------------------------------------------------------


def sample_run() -> RunFile:
    recorder = LatencyRecorder(START)
    for i in range(50):
        recorder.record("send", START + i * 0.05, START + i * 0.05 + 0.002 * i)
    recorder.record_error("send", START + 1.2)
    sends = [Send("r", "a", "m1", 1.0, True, "5-0", 1.1)]
    verdict = check_history(sends, [], [Membership("r", "bob", 0.0)])
    faults = [FaultEvent(1.5, "kill", "redis-1", "SIGKILL")]

    return RunFile.from_recorder(
        meta(),
        recorder,
        faults=faults,
        verdict=verdict.to_dict(),
        slo=[{"rule": "p99<200ms", "ok": True}],
    )


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    """A saved run file loads back equal, verdict included."""
    run = sample_run()
    path = tmp_path / "runs" / "run.json"

    run.save(path)
    again = RunFile.load(path)

    assert again == run
    assert again.verdict is not None
    assert not Verdict.from_dict(again.verdict).ok
    document = json.loads(path.read_text())
    assert document["format"] == RUN_FORMAT
    assert document["version"] == RUN_FORMAT_VERSION
    assert document["histograms"]["send"]["data"].startswith("HIST")


def test_save_replaces_atomically_and_leaves_no_temporary(tmp_path: Path) -> None:
    """Saving over a file replaces it; a failed save keeps the old one intact."""
    path = tmp_path / "run.json"
    sample_run().save(path)
    before = path.read_text()

    broken = sample_run()
    broken.faults.append(FaultEvent(math.nan, "pause", "redis-1"))
    with pytest.raises(UsageError):
        broken.save(path)

    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_timestamps_are_utc_iso8601() -> None:
    """utc_timestamp writes ISO-8601 with a Z that fromisoformat reads back."""
    from datetime import UTC, datetime

    moment = datetime(2026, 1, 31, 12, 0, 0, 123_000, tzinfo=UTC)

    assert utc_timestamp(moment) == "2026-01-31T12:00:00.123Z"
    assert datetime.fromisoformat(utc_timestamp(moment)) == moment


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello",
        "[1, 2]",
        '{"meta": {}}',
        '{"format": "something-else", "version": 1}',
    ],
)
def test_not_a_run_file_is_refused(text: str) -> None:
    """Anything without the dslab-run marker is a UsageError with a fix."""
    with pytest.raises(UsageError) as caught:
        RunFile.from_json(text, source="x.json")

    assert "not a dslab run file" in caught.value.message
    assert caught.value.fix


def test_newer_version_is_refused_with_upgrade_hint() -> None:
    """A run file from a newer format version says to upgrade dslab."""
    document = json.loads(sample_run().to_json())
    document["version"] = RUN_FORMAT_VERSION + 1

    with pytest.raises(UsageError) as caught:
        RunFile.from_json(json.dumps(document))

    assert "newer dslab" in caught.value.message
    assert caught.value.fix is not None and "upgrade" in caught.value.fix


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        (("meta", "seed"), "seven", "meta.seed"),
        (("meta", "started_at"), "yesterday", "meta.started_at"),
        (("meta", "command"), [1], "meta.command[0]"),
        (("faults",), [{"at": "soon"}], "faults[0].at"),
        (("series", "send"), [{"t": True}], "series.send[0].t"),
        (("histograms", "send"), {"unit": "us", "data": "garbage"}, "histogram"),
        (("version",), 0, "version"),
        (("meta", "started_at"), math.nan, "not JSON"),
    ],
)
def test_damaged_fields_are_named(
    path: tuple[str, ...], value: object, named: str
) -> None:
    """A damaged field raises a UsageError that names it."""
    document = json.loads(sample_run().to_json())
    node = document
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value

    with pytest.raises(UsageError) as caught:
        RunFile.from_json(json.dumps(document))

    assert named in caught.value.message


def test_missing_or_unreadable_path_is_a_usage_error(tmp_path: Path) -> None:
    """A missing path or a directory is refused as a usage error."""
    with pytest.raises(UsageError, match="no run file"):
        RunFile.load(tmp_path / "absent.json")
    with pytest.raises(UsageError, match="not a dslab run file"):
        RunFile.load(tmp_path)


# --- lossless round trip, generated ---------------------------------------------

names = st.text(min_size=1, max_size=12)
finite = st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | finite | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
metas = st.builds(
    RunMeta,
    command=st.lists(st.text(max_size=20), max_size=6),
    dslab_version=names,
    started_at=st.datetimes().map(lambda d: d.isoformat()),
    ended_at=st.datetimes().map(lambda d: d.isoformat()),
    seed=st.none() | st.integers(),
    topology=st.none() | st.sampled_from(["standalone", "replicated", "cluster"]),
    targets=st.lists(names, max_size=3),
)
faults = st.builds(FaultEvent, at=finite, action=names, target=names, detail=st.text())
rows = st.builds(
    SecondStats,
    t=st.integers(0, 10_000),
    throughput=st.integers(0, 10**6),
    errors=st.integers(0, 10**6),
    p50_ms=st.none() | finite,
    p99_ms=st.none() | finite,
)


def _histogram(values: list[int]) -> LatencyHistogram:
    histogram = LatencyHistogram()
    for value in values:
        histogram.record_us(value)
    return histogram


histograms = st.lists(st.integers(0, HIGHEST_US), max_size=60).map(_histogram)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    meta=metas,
    fault_list=st.lists(faults, max_size=4),
    series=st.dictionaries(names, st.lists(rows, max_size=4), max_size=3),
    histogram_map=st.dictionaries(names, histograms, max_size=3),
    verdict=st.none() | st.dictionaries(st.text(max_size=6), json_values, max_size=4),
    slo=st.none() | st.lists(st.dictionaries(st.text(max_size=6), json_values)),
)
def test_any_run_file_round_trips_losslessly(
    meta: RunMeta,
    fault_list: list[FaultEvent],
    series: dict[str, list[SecondStats]],
    histogram_map: dict[str, LatencyHistogram],
    verdict: dict[str, Any] | None,
    slo: list[dict[str, Any]] | None,
) -> None:
    """from_json(to_json(run)) equals run; histograms keep every count."""
    run = RunFile(meta, fault_list, series, histogram_map, verdict, slo)

    again = RunFile.from_json(run.to_json())

    assert again == run
    for op, histogram in histogram_map.items():
        assert again.histograms[op].counts() == histogram.counts()
        assert again.histograms[op].count == histogram.count


def test_delivery_verdict_survives_the_run_file() -> None:
    """A checker verdict with examples reads back as the same Verdict."""
    sends = [Send("r", "a", "m1", 1.0, True, "5-0", 1.1)]
    deliveries = [Delivery("r", "bob", "5-0", "m1", 2.0)] * 2
    verdict = check_history(sends, deliveries, [Membership("r", "bob", 0.0)])
    run = RunFile(meta(), verdict=verdict.to_dict())

    again = RunFile.from_json(run.to_json())

    assert again.verdict is not None
    assert Verdict.from_dict(again.verdict) == verdict


def test_failed_rename_leaves_no_temporary(tmp_path: Path) -> None:
    """Saving onto a directory fails as UsageError and cleans up its temp file."""
    (tmp_path / "run.json").mkdir()

    with pytest.raises(UsageError, match="cannot write"):
        sample_run().save(tmp_path / "run.json")

    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]
