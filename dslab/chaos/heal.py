"""Undoing faults: one, all, or on a timer in a detached healer process.

Undo is driven by the data in the journal, never by memory of the process
that applied the fault, so ``dslab chaos heal`` (or ``lab down``) in a fresh
process heals what a dslab killed with kill -9 left behind.

Guarantees:

- every undo is idempotent: healing twice, or healing a pause whose process
  has since died, does nothing and says so; a pid is signalled only while its
  start time matches the journal's, so a reused pid is never touched;
- a fault is marked healed only after its undo worked (or was found to be
  unnecessary); one that could not be undone stays active and is reported;
- a ``--for`` fault is healed by a detached process
  (``python -m dslab.chaos.heal --home H --fault ID --at T``) started with the
  lab's marker, so it outlives the terminal and ``lab down`` stops it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dslab.chaos import netem
from dslab.chaos.journal import Fault, Journal, Timer
from dslab.chaos.proxy import ProxyControl, ProxyUnreachable
from dslab.errors import DslabError, UsageError
from dslab.lab import netns
from dslab.lab.state import process_matches
from dslab.lab.supervisor import spawn_detached

log = logging.getLogger(__name__)

# Sleeping in short steps lets the healer notice that its fault was healed by
# hand meanwhile and exit early instead of lingering until its deadline.
HEALER_POLL_S = 0.5
# The longest --for a person can ask for; longer is almost surely a typo
# (10h for 10s) and would leave a healer waiting for a day.
MAX_DURATION_S = 24 * 3600.0


@dataclass(frozen=True)
class HealResult:
    """What healing one fault did; ``ok`` False means it is still active."""

    fault: Fault
    outcome: str
    ok: bool = True


def undo(fault: Fault) -> str:
    """Execute ``fault.undo``; return what happened. Raises if it could not."""
    action = fault.undo or {}
    kind = action.get("action")
    if kind == "sigcont":
        pid, started_at = int(action["pid"]), float(action["process_started_at"])
        if not process_matches(pid, started_at):
            return "process is gone; nothing to resume"
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            return "process is gone; nothing to resume"
        return "resumed (SIGCONT)"
    if kind == "proxy-clear":
        pid, started_at = int(action["pid"]), float(action["process_started_at"])
        if not process_matches(pid, started_at):
            return "proxy is gone, and its faults with it"
        try:
            ProxyControl(str(action["control_url"])).clear()
        except ProxyUnreachable:
            # It may have exited between the check and the call.
            if not process_matches(pid, started_at):
                return "proxy is gone, and its faults with it"
            raise
        return "proxy faults cleared"
    if kind == "netem-undo":
        removed = netem.undo(str(action.get("device", "lo")), action.get("namespace"))
        return "netem qdisc removed" if removed else "no dslab qdisc was left"
    if kind == "nft-delete-table":
        return _delete_nft_tables(action)
    if kind == "proxy-uncut":
        return _lift_proxy_cuts(action)
    raise UsageError(
        f"fault {fault.id} has an undo dslab does not know: {action!r}",
        fix="it was written by another version of dslab; undo it by hand",
    )


def _delete_nft_tables(action: dict[str, Any]) -> str:
    """A partition's undo: its table in each namespace it touched. A table or
    namespace that is gone already (``lab down`` deleted it) counts as done."""
    family, table = str(action.get("family", "inet")), str(action["table"])
    namespaces = action["namespaces"]
    if not isinstance(namespaces, list):
        raise TypeError(f"namespaces is not a list: {namespaces!r}")
    deleted = [name for name in map(str, namespaces)
               if netns.delete_table(name, table, family)]
    if deleted:
        return f"nftables table {table} deleted in {len(deleted)} namespace(s)"
    return "no rules were left (table or namespaces already gone)"


def _lift_proxy_cuts(action: dict[str, Any]) -> str:
    """A proxy partition's undo: lift its named cut on every proxy it set it
    on. A proxy that is gone (or never had the cut) counts as done."""
    name = str(action["cut"])
    proxies = action["proxies"]
    if not isinstance(proxies, list):
        raise TypeError(f"proxies is not a list: {proxies!r}")
    lifted = gone = 0
    for proxy in proxies:
        pid, started_at = int(proxy["pid"]), float(proxy["process_started_at"])
        if not process_matches(pid, started_at):
            gone += 1
            continue
        try:
            lifted += ProxyControl(str(proxy["control_url"])).remove_cut(name)
        except ProxyUnreachable:
            # It may have exited between the check and the call.
            if process_matches(pid, started_at):
                raise
            gone += 1
    if not lifted:
        return "no cut was left (lifted already, or its proxies are gone)"
    gone_words = f"; {gone} proxy(ies) gone, with their cut" if gone else ""
    return f"cut {name} lifted on {lifted} proxy(ies){gone_words}"


def heal(home: Path, fault_id: str | None = None) -> list[HealResult]:
    """Heal one active fault (``fault_id``) or all of them; see the module."""
    journal = Journal(home)
    with journal.locked():
        active = journal.active_faults()
        if fault_id is not None:
            chosen = [fault for fault in active if fault.id == fault_id]
            if not chosen:
                raise _not_active(journal, fault_id, active)
            active = chosen
        timers = journal.timers()
        results = [_heal_one(journal, fault) for fault in active]

    for result in results:
        _stop_healer(timers.get(result.fault.id))

    return results


def heal_all(home: Path) -> list[HealResult]:
    """Heal every active fault of the lab in ``home``; for `lab down`."""
    return heal(home)


def close_faults_of_process(
    journal: Journal, pid: int, started_at: float, reason: str
) -> list[str]:
    """Mark the active faults held by a process that is going away as healed.

    A caller holds ``journal.locked()``. Used when a paused node is killed or
    restarted: its pause cannot outlive it.
    """
    closed = []
    for fault in journal.active_faults():
        action = fault.undo or {}
        if action.get("pid") == pid and action.get("process_started_at") == started_at:
            journal.record_healed(fault.id, reason)
            log.info("fault healed: %s (%s)", fault.describe(), reason)
            closed.append(fault.id)
    return closed


def _heal_one(journal: Journal, fault: Fault) -> HealResult:
    try:
        outcome = undo(fault)
    except DslabError as error:
        log.warning("fault not healed: %s (%s)", fault.describe(), error.message)
        return HealResult(fault, error.message, ok=False)
    except (KeyError, TypeError, ValueError) as error:
        # A damaged record must not stop the heal of the others (lab down).
        log.warning("fault not healed: %s (undo data unreadable: %r)",
                    fault.describe(), error)
        return HealResult(fault, f"undo data unreadable: {error!r}", ok=False)
    journal.record_healed(fault.id, outcome)
    log.info("fault healed: %s (%s)", fault.describe(), outcome)

    return HealResult(fault, outcome)


def _not_active(journal: Journal, fault_id: str, active: list[Fault]) -> UsageError:
    known = journal.find(fault_id)
    listing = ", ".join(fault.id for fault in active) or "none"
    if known is not None and not known.reversible:
        return UsageError(
            f"fault {fault_id} ({known.describe()}) has no undo",
            fix=known.remedy or "see `dslab chaos status`",
        )
    if known is not None:
        return UsageError(
            f"fault {fault_id} ({known.describe()}) is already healed",
            fix=f"active faults: {listing}",
        )
    return UsageError(f"no fault {fault_id!r} in the journal",
                      fix=f"active faults: {listing} (see `dslab chaos status`)")


def _stop_healer(timer: Timer | None) -> None:
    """A fault healed by hand needs its --for healer no more."""
    if timer is None or timer.pid == os.getpid():
        return
    if process_matches(timer.pid, timer.process_started_at):
        with contextlib.suppress(ProcessLookupError):
            os.kill(timer.pid, signal.SIGTERM)


# -- the timer ------------------------------------------------------------


def schedule_heal(home: Path, fault: Fault, at: float) -> Timer:
    """Start the detached healer that heals ``fault`` at ``at`` (epoch seconds).

    The caller holds ``journal.locked()``; the timer is journaled so a manual
    heal can stop it early and ``chaos status`` can show it.
    """
    argv = [sys.executable, "-m", "dslab.chaos.heal", "--home", str(home),
            "--fault", fault.id, "--at", f"{at:.3f}"]
    folder = home / "chaos"
    spawned = spawn_detached(argv, log_path=folder / f"healer-{fault.id}.log",
                             cwd=home, lab_home=home)
    timer = Timer(fault.id, spawned.pid, spawned.started_at, at)
    Journal(home).record_timer(timer)
    log.info("heal scheduled: %s at %.3f pid=%d", fault.id, at, spawned.pid)

    return timer


def run_healer(home: Path, fault_id: str, at: float) -> int:
    """Sleep until ``at``, then heal ``fault_id`` unless it was healed already."""
    journal = Journal(home)
    while (left := at - time.time()) > 0:
        if fault_id in journal.healed_ids():
            log.info("healer done early: %s was healed already", fault_id)
            return 0
        time.sleep(min(HEALER_POLL_S, left))
    try:
        results = heal(home, fault_id)
    except UsageError:
        # Healed by hand (or by `lab down`) in the meantime: nothing to do.
        return 0
    return 0 if all(result.ok for result in results) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dslab.chaos.heal",
        description="Heal one journaled fault at a given time (the --for timer).",
    )
    parser.add_argument("--home", required=True, type=Path, help="lab folder")
    parser.add_argument("--fault", required=True, help="fault id, e.g. f3")
    parser.add_argument("--at", required=True, type=float,
                        help="when, in seconds since the epoch")
    args = parser.parse_args(argv)

    from dslab.logs import setup_server_logging

    setup_server_logging(1)
    # SIGTERM (a manual heal, `lab down`) ends the wait quietly.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    return run_healer(args.home, args.fault, args.at)


if __name__ == "__main__":
    # Run the imported module, not this ``__main__`` copy, so log lines carry
    # the ``dslab.chaos.heal`` logger name that the log setup routes.
    from dslab.chaos import heal as _module

    sys.exit(_module.main())

