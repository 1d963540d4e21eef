"""The chat workload against real chat server processes on a real lab Redis.

Servers are lab services (``python -m dslab.chat``), so faults are real
signals to real processes, journaled as `dslab chaos` would. Runs are a few
seconds of a few users: enough to exercise failover, not a benchmark.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dslab.chaos import process as chaos
from dslab.errors import UsageError
from dslab.lab import services
from dslab.lab.lab import Lab
from dslab.lab.state import ProcessRecord
from dslab.report.runfile import RunFile, RunMeta
from dslab.workload import chat as load
from tests.conftest import StartLab

# A fault starts this long into the measured run: after every user has sent.
FAULT_AT_S = 1.0
# SIGSTOP length of the stall test; latency from the schedule must show it.
STALL_S = 1.0
# Where the test chat servers listen from, as a service default: conftest's
# DSLAB_SERVICE_PORT_START moves it into this test process's own region.
CHAT_PORT_START = 8500


def _serve(lab: Lab, count: int, delivery: str = "streams") -> list[ProcessRecord]:
    """``count`` chat server processes on the lab's Redis, as lab services."""
    target = lab.redis_target()
    args = ["--redis", target.url(with_password=True), "--delivery", delivery]
    return [services.launch(lab, "chat", "dslab.chat", args, port, name_flag="--name")
            for port in services.choose_ports(count, None, CHAT_PORT_START)]


def _plan(records: list[ProcessRecord], **options: object) -> load.ChatPlan:
    settings: dict[str, object] = {"users": 10, "rooms": 1, "rate_per_s": 2.0,
                                   "duration_s": 3.0, "seed": 7,
                                   "run_id": f"t{time.monotonic_ns()}"}
    settings.update(options)
    return load.ChatPlan(tuple(str(r.extra["url"]) for r in records),
                         **settings)  # type: ignore[arg-type]


def _once_at(at_s: float, action: Callable[[], None]) -> Callable[[load.Progress],
                                                                   None]:
    """A progress callback that runs ``action`` once, ``at_s`` into the run."""
    fired = threading.Event()

    def on_progress(progress: load.Progress) -> None:
        if progress.elapsed_s >= at_s and not fired.is_set():
            fired.set()
            action()

    return on_progress


def _run(plan: load.ChatPlan, on_progress: Callable[[load.Progress], None] | None
         = None, floor: object = None) -> load.ChatResult:
    return asyncio.run(load.run_chat_load(plan, on_progress,
                                          floor=floor))  # type: ignore[arg-type]


@pytest.mark.timeout(90)
def test_clean_run_delivers_every_send_to_every_member(start_lab: StartLab) -> None:
    """No fault: every send is acked and reaches every member of its room once."""
    lab = start_lab()
    records = _serve(lab, 2)
    plan = _plan(records, rooms=2, processes=2, warmup_s=0.5)

    result = _run(plan, floor=lab.redis_target())

    total = result.verdict.total
    assert result.verdict.ok
    assert total.sends == total.acked > 0
    assert total.lost == total.duplicated == total.reordered == 0
    # Two rooms of five: each message goes to its five members, sender included.
    assert total.expected == total.acked * 5 == total.deliveries
    histograms = result.recorder.histograms()
    measured = histograms[load.ACK].count
    assert 0 < measured < total.sends  # warmup sends are checked, not timed
    assert histograms[load.DELIVER].count == measured * 5
    assert histograms[load.FLOOR].count > 0
    assert result.reconnects == 0
    # Both servers' CPU over the load, from their own /metrics.
    assert result.cpu is not None
    assert result.cpu.servers_measured == result.cpu.servers_total == 2
    assert result.cpu.servers_s is not None and result.cpu.servers_s > 0
    assert result.cpu.generator_s > 0


@pytest.mark.timeout(90)
def test_killed_server_loses_nothing(start_lab: StartLab) -> None:
    """SIGKILL of one of two servers mid-run: users fail over, nothing is lost."""
    lab = start_lab()
    records = _serve(lab, 2)
    plan = _plan(records, rate_per_s=4.0, duration_s=3.0)

    result = _run(plan, _once_at(FAULT_AT_S, lambda: chaos.kill(lab, records[0])))

    total = result.verdict.total
    assert result.reconnects > 0
    assert total.gaps > 0
    assert total.lost == 0 and total.duplicated == 0 and total.reordered == 0
    assert total.acked == total.sends
    faults = load.journal_faults(lab.home, result.wall_measured_from,
                                 result.wall_ended)
    assert [(f.action, f.target) for f in faults] == [("kill", records[0].name)]
    assert 0 < faults[0].at < plan.duration_s
    # The dead server's CPU is unknown: left out, and the report says so.
    assert result.cpu is not None and result.cpu.servers_measured == 1
    assert any("CPU is known for 1 of 2" in note for note in result.notes)


@pytest.mark.timeout(90)
def test_restarted_server_is_left_out_of_the_cpu_figure(start_lab: StartLab) -> None:
    """A server restarted during the load is a new process whose CPU counter
    began again: its figure would be wrong either way, so it is left out."""
    lab = start_lab()
    records = _serve(lab, 2)
    plan = _plan(records, rate_per_s=4.0, duration_s=4.0)

    result = _run(plan, _once_at(FAULT_AT_S, lambda: chaos.restart(lab, records[0])))

    assert result.verdict.total.lost == 0
    assert result.cpu is not None
    assert (result.cpu.servers_measured, result.cpu.servers_total) == (1, 2)
    assert result.cpu.servers_s is not None and result.cpu.servers_s > 0


@pytest.mark.timeout(90)
def test_pubsub_mode_loses_messages_when_a_server_dies(start_lab: StartLab) -> None:
    """The naive PUBLISH-only design drops what is sent while users reconnect."""
    lab = start_lab()
    records = _serve(lab, 2, delivery="pubsub")
    plan = _plan(records, rate_per_s=8.0, duration_s=3.0)

    result = _run(plan, _once_at(FAULT_AT_S, lambda: chaos.kill(lab, records[0])))

    assert result.reconnects > 0
    assert result.verdict.total.lost > 0
    assert not result.verdict.ok


@pytest.mark.timeout(90)
def test_stalled_server_shows_in_max_latency(start_lab: StartLab) -> None:
    """A 1 s SIGSTOP is charged from the schedule: max deliver latency >= ~1 s."""
    lab = start_lab()
    records = _serve(lab, 2)
    plan = _plan(records, rate_per_s=4.0, duration_s=3.0)

    def stall() -> None:
        chaos.pause(lab, records[0])
        time.sleep(STALL_S)
        chaos.resume(lab, records[0])

    stalls: list[threading.Thread] = []

    def start_stall() -> None:
        stalls.append(threading.Thread(target=stall))
        stalls[0].start()

    try:
        result = _run(plan, _once_at(FAULT_AT_S, start_stall))
    finally:
        for thread in stalls:
            thread.join(timeout=10)

    histograms = result.recorder.histograms()
    assert histograms[load.DELIVER].max_us >= 0.9 * STALL_S * 1_000_000
    assert histograms[load.ACK].max_us >= 0.9 * STALL_S * 1_000_000
    assert result.verdict.total.lost == 0


@pytest.mark.timeout(60)
def test_run_file_round_trips(start_lab: StartLab, tmp_path: Path) -> None:
    """The run file written from a result loads back with its verdict and faults."""
    lab = start_lab()
    records = _serve(lab, 1)
    result = _run(_plan(records, users=4, duration_s=1.0))
    meta = RunMeta(command=["dslab", "chat", "bench"], dslab_version="test",
                   started_at="2026-01-01T00:00:00.000Z",
                   ended_at="2026-01-01T00:00:01.000Z", seed=7)

    path = tmp_path / "run.json"
    result.run_file(meta).save(path)
    loaded = RunFile.load(path)

    assert loaded.verdict is not None and loaded.verdict["ok"] is True
    assert loaded.verdict["total"]["lost"] == 0
    assert loaded.histograms[load.DELIVER].count == 4 * 4 * 2
    assert set(loaded.series) == {load.ACK, load.DELIVER}


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        ({"users": 0}, "--users"),
        ({"users": load.MAX_USERS + 1}, "--users"),
        ({"rooms": 11}, "--rooms"),
        ({"rate_per_s": load.MAX_RATE_PER_USER_S * 2}, "--rate"),
        ({"duration_s": load.MAX_DURATION_S + 1}, "--duration"),
        ({"processes": 11}, "--processes"),
        ({"servers": ("http://10.1.2.3:8100",)}, "loopback"),
        ({"servers": ()}, "no chat server"),
    ],
)
def test_plan_refuses_out_of_bounds(options: dict[str, object], complaint: str) -> None:
    """A plan outside the documented bounds is a usage error naming the option."""
    settings: dict[str, object] = {"servers": ("http://127.0.0.1:8100",),
                                   "users": 10, "rooms": 1, "rate_per_s": 1.0,
                                   "duration_s": 1.0}
    settings.update(options)

    with pytest.raises(UsageError, match=complaint):
        load.ChatPlan(**settings)  # type: ignore[arg-type]


def test_phases_are_reproducible_and_inside_one_period() -> None:
    """The same seed staggers users the same way, within one send period."""
    plan = load.ChatPlan(("http://127.0.0.1:1",), users=50, rooms=5,
                         rate_per_s=2.0, duration_s=1.0, seed=11)
    again = load.ChatPlan(("http://localhost:1",), users=50, rooms=5,
                          rate_per_s=2.0, duration_s=1.0, seed=11)

    assert plan.phases() == again.phases()
    assert all(0.0 <= phase <= 0.5 for phase in plan.phases())
    assert plan.phases() != load.ChatPlan(
        ("http://127.0.0.1:1",), users=50, rooms=5, rate_per_s=2.0,
        duration_s=1.0, seed=12).phases()
    assert sum(plan.members(plan.room_of(u)) for u in range(5)) == 50
