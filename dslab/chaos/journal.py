"""The fault journal: every fault dslab applies, with the data needed to undo it.

The journal is an append-only JSON-lines file, ``<lab home>/faults.jsonl``.
Each line is one event:

- ``applied``: a fault, written (flushed and fsynced) *before* it is applied,
  with its undo as data (``{"action": "sigcont", "pid": ...}``) that a fresh
  process can execute after the one that applied it was killed with kill -9;
- ``healed``: the fault with that id is undone (or turned out to need no
  undo), with what happened;
- ``timer``: the detached healer that undoes a ``--for`` fault on time.

Guarantees:

- ``active_faults()`` is exactly the applied faults that have an undo and no
  healed event; a fault whose application failed gets its healed event at
  once, so it never lingers as active;
- writers hold ``faults.lock`` (an flock), so ids are unique and a heal never
  races an apply; the lab's own lock is not used, so ``lab down`` can heal
  while it holds that one;
- a line torn by a crash mid-write is skipped on reading (its fault was not
  applied yet, since the record comes first) and never glued to the next one.

Faults without an undo (kill, restart, resume) are journaled as ``applied``
events for the timeline, with a suggested ``remedy``, and are never active:
``heal`` does not restart a killed node, because ``lab down`` heals too and
must not bring nodes back just to stop them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

JOURNAL_FILE = "faults.jsonl"
LOCK_FILE = "faults.lock"
# Ids are short so a person can type them: `dslab chaos heal f3`.
ID_PREFIX = "f"

APPLIED = "applied"
HEALED = "healed"
TIMER = "timer"


@dataclass
class Fault:
    """One fault as the journal holds it.

    ``undo`` is None for a fault that cannot be undone (a kill); ``until`` is
    the wall-clock time (seconds since the epoch) when a ``--for`` fault ends.
    """

    id: str
    kind: str  # "pause", "delay", "kill", "restart", "resume"
    target: str  # the lab name the fault hit, e.g. "redis-1"
    pid: int | None
    params: dict[str, Any] = field(default_factory=dict)
    started_at: float = 0.0
    until: float | None = None
    undo: dict[str, Any] | None = None
    remedy: str | None = None

    @property
    def reversible(self) -> bool:
        return self.undo is not None

    def describe(self) -> str:
        """``pause on redis-1 pid=123``: the words of the log lines."""
        detail = self.params.get("summary")
        what = f"{self.kind} {detail}" if detail else self.kind
        pid = f" pid={self.pid}" if self.pid is not None else ""
        return f"{what} on {self.target}{pid}"

    def to_json(self) -> dict[str, Any]:
        return {"event": APPLIED, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Fault:
        return cls(
            id=str(data["id"]),
            kind=str(data["kind"]),
            target=str(data["target"]),
            pid=None if data.get("pid") is None else int(data["pid"]),
            params=dict(data.get("params") or {}),
            started_at=float(data.get("started_at") or 0.0),
            until=None if data.get("until") is None else float(data["until"]),
            undo=None if data.get("undo") is None else dict(data["undo"]),
            remedy=data.get("remedy"),
        )


@dataclass(frozen=True)
class Timer:
    """The detached healer process of a ``--for`` fault."""

    id: str
    pid: int
    process_started_at: float
    at: float


class Journal:
    """The fault journal of the lab in ``home``; see the module docstring."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.path = home / JOURNAL_FILE

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the journal's lock; apply and heal each run under it."""
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.home / LOCK_FILE, "a+") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    # -- reading -----------------------------------------------------------

    def events(self) -> list[dict[str, Any]]:
        """Every readable event in file order; torn or foreign lines skipped."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        events = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                log.warning("journal line skipped (torn by a crash?): %s:%d",
                            self.path, number)
                continue
            if isinstance(event, dict) and "event" in event and "id" in event:
                events.append(event)

        return events

    def faults(self) -> list[Fault]:
        """Every fault ever applied, in order, including the healed ones."""
        found = []
        for event in self.events():
            if event["event"] != APPLIED:
                continue
            try:
                found.append(Fault.from_json(event))
            except (KeyError, TypeError, ValueError):
                log.warning("journal record skipped (unreadable): %r", event)

        return found

    def healed_ids(self) -> set[str]:
        return {str(e["id"]) for e in self.events() if e["event"] == HEALED}

    def active_faults(self) -> list[Fault]:
        """Applied faults with an undo that have not been healed."""
        healed = self.healed_ids()
        return [f for f in self.faults() if f.reversible and f.id not in healed]

    def find(self, fault_id: str) -> Fault | None:
        for fault in self.faults():
            if fault.id == fault_id:
                return fault
        return None

    def timers(self) -> dict[str, Timer]:
        """The healer of each ``--for`` fault, by fault id."""
        found = {}
        for event in self.events():
            if event["event"] == TIMER:
                with contextlib.suppress(KeyError, TypeError, ValueError):
                    found[str(event["id"])] = Timer(
                        str(event["id"]), int(event["pid"]),
                        float(event["process_started_at"]), float(event["at"]),
                    )
        return found

    # -- writing (callers hold ``locked()``) --------------------------------

    def next_id(self) -> str:
        numbers = [
            int(fault.id[len(ID_PREFIX):])
            for fault in self.faults()
            if fault.id[len(ID_PREFIX):].isdigit()
        ]
        return f"{ID_PREFIX}{max(numbers, default=0) + 1}"

    def begin(
        self,
        kind: str,
        target: str,
        pid: int | None,
        *,
        params: dict[str, Any] | None = None,
        undo: dict[str, Any] | None = None,
        remedy: str | None = None,
        duration_s: float | None = None,
    ) -> Fault:
        """Journal a new fault (on disk when this returns); apply it after."""
        now = time.time()
        fault = Fault(
            id=self.next_id(), kind=kind, target=target, pid=pid,
            params=dict(params or {}), started_at=now,
            until=None if duration_s is None else now + duration_s,
            undo=undo, remedy=remedy,
        )
        self.record_applied(fault)

        return fault

    def record_applied(self, fault: Fault) -> None:
        self._append(fault.to_json())

    def record_healed(self, fault_id: str, outcome: str) -> None:
        self._append(
            {"event": HEALED, "id": fault_id, "at": time.time(), "outcome": outcome}
        )

    def record_timer(self, timer: Timer) -> None:
        self._append({"event": TIMER, **asdict(timer)})

    def _append(self, event: dict[str, Any]) -> None:
        """One line, on disk (fsync) before this returns."""
        self.home.mkdir(parents=True, exist_ok=True)
        line = json.dumps(event, sort_keys=True) + "\n"
        with open(self.path, "a+b") as handle:
            # A line torn by a crash must not swallow this one.
            if handle.tell() > 0:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    line = "\n" + line
            handle.write(line.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
