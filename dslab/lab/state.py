"""The lab's memory: ``state.json`` records every process dslab started.

The file is rewritten atomically (write a temporary file, fsync, rename), so a
crash mid-write leaves the old state or the new one, never half of each. A pid
read back from it is never trusted on its own: a process counts as alive only
if a process with that pid exists, is not a zombie, and started at the time
recorded when dslab launched it (pids are reused).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from dslab.errors import LabStateCorrupt, UnknownNode

STATE_FORMAT = "dslab-lab-state"
STATE_VERSION = 1
# psutil reports start times with clock-tick resolution; two readings of the
# same process agree to well within this.
START_TIME_TOLERANCE_S = 0.05


@dataclass
class ProcessRecord:
    """One process dslab started: a Redis node, a Sentinel, or a service."""

    name: str
    kind: str  # "redis", "sentinel", or a service kind such as "chat"
    role: str  # the role it was started in; the live role may differ
    pid: int
    started_at: float  # the process's own start time, to detect pid reuse
    host: str
    port: int
    dir: str
    log: str
    argv: list[str]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def is_alive(self) -> bool:
        return process_matches(self.pid, self.started_at)


@dataclass
class LabState:
    topology: str
    persistence: str
    redis_server: dict[str, str]
    created_at: float
    processes: list[ProcessRecord] = field(default_factory=list)
    # The private LAN of a `--network netns` lab (see dslab.lab.netns); None
    # for the default loopback lab, and then absent from the file.
    network: dict[str, Any] | None = None

    def find(self, name: str) -> ProcessRecord:
        for record in self.processes:
            if record.name == name:
                return record
        known = ", ".join(record.name for record in self.processes) or "none"
        raise UnknownNode(
            f"no node or service named {name!r} in the lab",
            fix=f"use one of: {known} (see `dslab lab status`)",
        )

    def of_kind(self, kind: str) -> list[ProcessRecord]:
        return [record for record in self.processes if record.kind == kind]

    def replace(self, record: ProcessRecord) -> None:
        self.processes = [
            record if old.name == record.name else old for old in self.processes
        ]

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        if body["network"] is None:
            del body["network"]
        return {"format": STATE_FORMAT, "version": STATE_VERSION, **body}

    @classmethod
    def from_json(cls, data: Any, *, origin: Path) -> LabState:
        if (
            not isinstance(data, dict)
            or data.get("format") != STATE_FORMAT
            or data.get("version") != STATE_VERSION
        ):
            raise LabStateCorrupt(
                f"{origin} is not a dslab lab state (format "
                f"{STATE_FORMAT!r} version {STATE_VERSION} expected)",
                fix=_corrupt_fix(origin),
            )
        try:
            processes = [ProcessRecord(**item) for item in data["processes"]]
            return cls(
                topology=str(data["topology"]),
                persistence=str(data["persistence"]),
                redis_server=dict(data["redis_server"]),
                created_at=float(data["created_at"]),
                processes=processes,
                network=None if data.get("network") is None
                else dict(data["network"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise LabStateCorrupt(
                f"{origin} is damaged: {exc!r}", fix=_corrupt_fix(origin)
            ) from exc


def _corrupt_fix(origin: Path) -> str:
    return (
        f"run `dslab lab down --force` to stop any process started from "
        f"{origin.parent} and remove the state, or set DSLAB_HOME to another folder"
    )


def process_start_time(pid: int) -> float | None:
    """The process's start time, or None if it does not exist or is a zombie."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return float(process.create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
        return None


def process_matches(pid: int, started_at: float) -> bool:
    start = process_start_time(pid)
    return start is not None and abs(start - started_at) < START_TIME_TOLERANCE_S


def read_state(path: Path) -> LabState | None:
    """The saved state, None when there is none, an error when it is damaged."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LabStateCorrupt(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})",
            fix=_corrupt_fix(path),
        ) from exc

    return LabState.from_json(data, origin=path)


def write_state(path: Path, state: LabState) -> None:
    """Replace ``path`` atomically: readers see the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".state-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as tmp:
            json.dump(state.to_json(), tmp, indent=2)
            tmp.write("\n")
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


@contextlib.contextmanager
def locked(home: Path) -> Iterator[None]:
    """Serialise commands that change the lab (two `lab up` at once, say)."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "lock", "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
