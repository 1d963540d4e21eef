"""state.json: atomic round trips, damaged files refused, pids never trusted."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from dslab.errors import LabStateCorrupt, UnknownNode
from dslab.lab.state import (
    LabState,
    ProcessRecord,
    process_start_time,
    read_state,
    write_state,
)


def _record(pid: int, started_at: float, name: str = "redis-1") -> ProcessRecord:
    return ProcessRecord(
        name=name, kind="redis", role="primary", pid=pid, started_at=started_at,
        host="127.0.0.1", port=7000, dir="/tmp/x", log="/tmp/x/redis.log",
        argv=["redis-server", "/tmp/x/redis.conf"],
    )


def _state(*records: ProcessRecord) -> LabState:
    return LabState(
        topology="standalone", persistence="everysec",
        redis_server={"path": "/x", "version": "6.2.14", "source": "PATH"},
        created_at=time.time(), processes=list(records),
    )


def test_state_round_trips(tmp_path: Path) -> None:
    """What is written is read back unchanged."""
    path = tmp_path / "state.json"
    state = _state(_record(123, 1.5))

    write_state(path, state)

    assert read_state(path) == state
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".state-")]


def test_missing_state_means_no_lab(tmp_path: Path) -> None:
    """No file is not an error: there is simply no lab."""
    assert read_state(tmp_path / "state.json") is None


def test_invalid_json_is_reported_with_a_fix(tmp_path: Path) -> None:
    """A truncated file names itself, the parse error and the way out."""
    path = tmp_path / "state.json"
    path.write_text('{"format": "dslab-lab-state", "vers')

    with pytest.raises(LabStateCorrupt) as caught:
        read_state(path)

    assert str(path) in caught.value.message
    assert "lab down --force" in (caught.value.fix or "")


@pytest.mark.parametrize("document", [
    [], {"format": "something-else"}, {"format": "dslab-lab-state", "version": 99},
    {"format": "dslab-lab-state", "version": 1, "processes": [{"name": "x"}]},
])
def test_foreign_or_damaged_state_is_refused(tmp_path: Path, document: object) -> None:
    """JSON that is not (or no longer) a dslab lab state is refused, not guessed at."""
    path = tmp_path / "state.json"
    path.write_text(json.dumps(document))

    with pytest.raises(LabStateCorrupt):
        read_state(path)


def test_a_finished_process_is_dead() -> None:
    """The pid of a process that exited is reported dead."""
    child = subprocess.Popen(["/bin/sleep", "0.2"])
    started = process_start_time(child.pid)
    child.wait()

    assert started is not None
    assert not _record(child.pid, started).is_alive()


def test_a_zombie_is_dead() -> None:
    """An exited child nobody has reaped yet still counts as dead."""
    child = subprocess.Popen(["/bin/sh", "-c", "sleep 0.2"])
    started = process_start_time(child.pid)
    assert started is not None
    time.sleep(0.6)  # exited, not yet reaped: a zombie

    try:
        assert not _record(child.pid, started).is_alive()
    finally:
        child.wait()


def test_a_reused_pid_is_not_trusted() -> None:
    """A live pid whose start time differs from the recorded one is someone else."""
    own_start = process_start_time(os.getpid())
    assert own_start is not None

    assert _record(os.getpid(), own_start).is_alive()
    assert not _record(os.getpid(), own_start - 100).is_alive()


def test_unknown_node_lists_the_known_ones() -> None:
    """Asking for a node that does not exist names the ones that do."""
    state = _state(_record(1, 1.0, "redis-1"), _record(2, 1.0, "redis-2"))

    with pytest.raises(UnknownNode) as caught:
        state.find("redis-9")

    assert "redis-1, redis-2" in (caught.value.fix or "")
