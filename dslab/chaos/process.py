"""Process faults on lab nodes and services: kill, pause, resume, restart.

Each fault is journaled before it is applied (see ``dslab.chaos.journal``)
and logs one fixed line, for example::

    fault applied: pause on redis-1 pid=123 (undo: dslab chaos heal f1)

Guarantees:

- a signal reaches a process only while its pid and start time still match
  the lab state, so a reused pid is never hit;
- pausing a process that is already paused by dslab returns the existing
  fault instead of stacking a second one that a single heal would undo;
- a pause ends with its process: killing or restarting a paused node marks
  its pause healed, so ``chaos status`` shows only faults that still exist;
- with ``duration_s`` the detached healer is started *before* the signal is
  sent, so no moment exists where the fault is applied and no timer runs.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass

from dslab.chaos.heal import close_faults_of_process, schedule_heal
from dslab.chaos.journal import Fault, Journal
from dslab.errors import LabError, UsageError
from dslab.lab.lab import Lab
from dslab.lab.state import ProcessRecord
from dslab.lab.supervisor import signal_process

log = logging.getLogger(__name__)

# A SIGKILLed process is gone within milliseconds; this bounds a wait on a
# machine under heavy load before its faults are closed anyway.
KILL_SETTLE_S = 2.0
KILL_POLL_S = 0.02


@dataclass(frozen=True)
class Outcome:
    """A fault and what the command did about it."""

    fault: Fault
    already: bool = False  # the fault existed; nothing new was applied
    healed: tuple[str, ...] = ()  # ids of faults this command ended
    new_pid: int | None = None  # after a restart


def parse_signal(text: str) -> signal.Signals:
    """``KILL``, ``SIGKILL``, ``kill`` or ``9`` as a signal."""
    name = text.strip().upper()
    try:
        if name.isdigit():
            return signal.Signals(int(name))
        return signal.Signals[name if name.startswith("SIG") else "SIG" + name]
    except (KeyError, ValueError):
        raise UsageError(
            f"{text!r} is not a signal",
            fix="give a name or number such as KILL, TERM, INT or 9",
        ) from None


def pause(lab: Lab, record: ProcessRecord, *, duration_s: float | None = None
          ) -> Outcome:
    """SIGSTOP ``record``: it stops answering but keeps its sockets open."""
    _require_alive(record)
    journal = Journal(lab.home)
    with journal.locked():
        for fault in journal.active_faults():
            if fault.kind == "pause" and _holds(fault, record):
                return Outcome(fault, already=True)

        undo = {"action": "sigcont", "pid": record.pid,
                "process_started_at": record.started_at}
        fault = journal.begin("pause", record.name, record.pid,
                              params={"signal": "SIGSTOP"}, undo=undo,
                              remedy="dslab chaos heal", duration_s=duration_s)
        if fault.until is not None:
            schedule_heal(lab.home, fault, fault.until)
        if not signal_process(record, signal.SIGSTOP):
            journal.record_healed(fault.id, "not applied: the process was gone")
            raise _gone(record)
        log.info("fault applied: %s (undo: dslab chaos heal %s)",
                 fault.describe(), fault.id)

        return Outcome(fault)


def resume(lab: Lab, record: ProcessRecord) -> Outcome:
    """SIGCONT ``record`` and mark dslab's pauses of it healed."""
    _require_alive(record)
    journal = Journal(lab.home)
    with journal.locked():
        pauses = [fault for fault in journal.active_faults()
                  if fault.kind == "pause" and _holds(fault, record)]
        if not signal_process(record, signal.SIGCONT):
            raise _gone(record)
        for fault in pauses:
            journal.record_healed(fault.id, "resumed (dslab chaos resume)")
            log.info("fault healed: %s (resumed)", fault.describe())
        if pauses:
            return Outcome(pauses[0], healed=tuple(f.id for f in pauses))

        # Not paused by dslab (or by hand): still a timeline event.
        fault = journal.begin("resume", record.name, record.pid,
                              params={"signal": "SIGCONT"})
        log.info("fault applied: %s (nothing to undo)", fault.describe())
        return Outcome(fault)


def kill(lab: Lab, record: ProcessRecord, signum: signal.Signals = signal.SIGKILL
         ) -> Outcome:
    """Send ``signum`` (SIGKILL by default); journaled, but it has no undo."""
    _require_alive(record)
    journal = Journal(lab.home)
    remedy = f"dslab chaos restart {record.name}"
    with journal.locked():
        fault = journal.begin("kill", record.name, record.pid,
                              params={"signal": signum.name, "summary": signum.name},
                              remedy=remedy)
        if not signal_process(record, signum):
            raise _gone(record)
        log.info("fault applied: %s (no undo; remedy: %s)", fault.describe(), remedy)

        healed: list[str] = []
        if signum == signal.SIGKILL and _wait_dead(record):
            healed = close_faults_of_process(journal, record.pid, record.started_at,
                                             "the process was killed")
        return Outcome(fault, healed=tuple(healed))


def restart(lab: Lab, record: ProcessRecord) -> Outcome:
    """Stop ``record`` (if alive) and start it again from its own folder."""
    journal = Journal(lab.home)
    with journal.locked():
        fault = journal.begin("restart", record.name, record.pid,
                              remedy="none needed")
    # Not under the journal's lock: restart takes the lab's lock, and
    # `lab down` heals (journal lock) while holding the lab's.
    fresh = lab.restart(record.name)
    with journal.locked():
        healed = close_faults_of_process(journal, record.pid, record.started_at,
                                         "the process was restarted")
    log.info("fault applied: %s new pid=%d (nothing to undo)",
             fault.describe(), fresh.pid)

    return Outcome(fault, healed=tuple(healed), new_pid=fresh.pid)


def _holds(fault: Fault, record: ProcessRecord) -> bool:
    action = fault.undo or {}
    return (action.get("pid") == record.pid
            and action.get("process_started_at") == record.started_at)


def _require_alive(record: ProcessRecord) -> None:
    if not record.is_alive():
        raise _gone(record)


def _gone(record: ProcessRecord) -> LabError:
    return LabError(
        f"{record.name} is not running (pid {record.pid} is gone)",
        fix=f"bring it back with `dslab chaos restart {record.name}` or "
        "`dslab lab up`",
    )


def _wait_dead(record: ProcessRecord) -> bool:
    deadline = time.monotonic() + KILL_SETTLE_S
    while record.is_alive():
        if time.monotonic() > deadline:
            return False
        time.sleep(KILL_POLL_S)
    return True
