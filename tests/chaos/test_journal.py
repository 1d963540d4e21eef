"""The fault journal and heal: records on disk, active faults, idempotent undo."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from dslab.chaos.heal import heal, heal_all
from dslab.chaos.journal import JOURNAL_FILE, Journal
from dslab.errors import UsageError
from dslab.lab.state import process_start_time
from tests.helpers import eventually

# Long enough to outlive any test here; the fixture kills it anyway.
SLEEPER_S = 60


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A real process to pause and resume; killed (and continued) afterwards."""
    process = subprocess.Popen(["sleep", str(SLEEPER_S)])
    try:
        yield process
    finally:
        process.send_signal(signal.SIGCONT)
        process.kill()
        process.wait(timeout=5)


def _stopped(pid: int) -> bool:
    return psutil.Process(pid).status() == psutil.STATUS_STOPPED


def _pause_record(journal: Journal, pid: int, started_at: float) -> str:
    undo = {"action": "sigcont", "pid": pid, "process_started_at": started_at}
    with journal.locked():
        return journal.begin("pause", "sleeper", pid, undo=undo).id


def test_applied_record_is_on_disk_when_begin_returns(tmp_path: Path) -> None:
    """begin() leaves one complete JSON line with the undo data in the file."""
    journal = Journal(tmp_path)
    with journal.locked():
        fault = journal.begin("pause", "redis-1", 123,
                              undo={"action": "sigcont", "pid": 123,
                                    "process_started_at": 1.0},
                              duration_s=10)

    lines = (tmp_path / JOURNAL_FILE).read_text().splitlines()
    record = json.loads(lines[0])
    assert len(lines) == 1
    assert record["event"] == "applied" and record["id"] == fault.id == "f1"
    assert record["undo"] == {"action": "sigcont", "pid": 123,
                              "process_started_at": 1.0}
    assert record["until"] == pytest.approx(record["started_at"] + 10)


def test_active_faults_are_applied_minus_healed(tmp_path: Path) -> None:
    """A healed fault and a fault without undo (a kill) are not active."""
    journal = Journal(tmp_path)
    undo = {"action": "sigcont", "pid": 1, "process_started_at": 0.0}
    with journal.locked():
        first = journal.begin("pause", "redis-1", 1, undo=undo)
        second = journal.begin("pause", "redis-2", 2, undo=undo)
        journal.begin("kill", "redis-3", 3, remedy="dslab chaos restart redis-3")
        journal.record_healed(first.id, "resumed")

    assert [fault.id for fault in journal.active_faults()] == [second.id]
    assert [fault.id for fault in journal.faults()] == ["f1", "f2", "f3"]


def test_torn_last_line_is_skipped_and_not_glued_to_the_next(tmp_path: Path) -> None:
    """A line cut off by a crash is ignored; the next record still parses."""
    journal = Journal(tmp_path)
    undo = {"action": "sigcont", "pid": 1, "process_started_at": 0.0}
    with journal.locked():
        journal.begin("pause", "redis-1", 1, undo=undo)
    with open(tmp_path / JOURNAL_FILE, "a") as handle:
        handle.write('{"event": "applied", "id": "f2", "ki')

    with journal.locked():
        third = journal.begin("pause", "redis-2", 2, undo=undo)

    assert third.id == "f2"
    assert [fault.id for fault in journal.active_faults()] == ["f1", "f2"]


def test_heal_resumes_a_paused_process_from_journal_data(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    """heal_all sends SIGCONT to the journaled pid and marks the fault healed."""
    started_at = process_start_time(sleeper.pid)
    assert started_at is not None
    sleeper.send_signal(signal.SIGSTOP)
    eventually(lambda: _stopped(sleeper.pid), timeout_s=5)
    fault_id = _pause_record(Journal(tmp_path), sleeper.pid, started_at)

    results = heal_all(tmp_path)

    assert [(r.fault.id, r.ok) for r in results] == [(fault_id, True)]
    eventually(lambda: not _stopped(sleeper.pid), timeout_s=5)
    assert Journal(tmp_path).active_faults() == []


def test_heal_twice_is_harmless(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    """The second heal finds nothing active and changes nothing."""
    started_at = process_start_time(sleeper.pid)
    assert started_at is not None
    _pause_record(Journal(tmp_path), sleeper.pid, started_at)
    heal_all(tmp_path)
    lines_after_first = (tmp_path / JOURNAL_FILE).read_text()

    assert heal_all(tmp_path) == []
    assert (tmp_path / JOURNAL_FILE).read_text() == lines_after_first


def test_a_reused_pid_is_not_signalled(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    """If the start time does not match, the pid belongs to someone else: heal
    leaves that process alone and still retires the fault."""
    sleeper.send_signal(signal.SIGSTOP)
    eventually(lambda: _stopped(sleeper.pid), timeout_s=5)
    _pause_record(Journal(tmp_path), sleeper.pid, started_at=12345.0)

    results = heal_all(tmp_path)

    assert results[0].ok and "gone" in results[0].outcome
    assert _stopped(sleeper.pid)
    assert Journal(tmp_path).active_faults() == []


def test_heal_of_unknown_id_names_the_active_ones(tmp_path: Path) -> None:
    """Healing an id that is not active is a usage error listing what is."""
    journal = Journal(tmp_path)
    _pause_record(journal, 1, 0.0)

    with pytest.raises(UsageError) as caught:
        heal(tmp_path, "f9")

    assert "active faults: f1" in str(caught.value)


