"""Starting, watching and stopping the lab's detached processes.

Every process the lab runs (Redis nodes, Sentinels, and later the chat and
shortener servers) is started here, the same way: detached into its own
session with stdout and stderr appended to a log file, so that it outlives the
command that started it. dslab is never its parent: a tiny ``/bin/sh`` starts
it in the background and exits, so no zombie waits on the CLI or on a test.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil

from dslab.errors import NodeStartFailed, PortInUse
from dslab.lab.state import ProcessRecord, process_matches, process_start_time

log = logging.getLogger(__name__)

SPAWN_TIMEOUT_S = 10.0
# A clean SIGTERM shutdown of Redis takes milliseconds without RDB saving
# (the lab turns RDB snapshots off); this bounds a stuck one.
STOP_GRACE_S = 5.0
TERM_REPEAT_S = 0.5
POLL_S = 0.02
LOG_TAIL_LINES = 12

# The environment variable that marks a process as started by a given lab.
LAB_MARKER = "DSLAB_LAB_HOME"

# Start the command in the background with its output appended to the log,
# print its pid, and exit: the command is re-parented away from dslab.
_SPAWN_SCRIPT = 'log=$1; shift; "$@" </dev/null >>"$log" 2>&1 & echo $!'


@dataclass(frozen=True)
class Spawned:
    pid: int
    started_at: float


def spawn_detached(
    argv: list[str],
    *,
    log_path: Path,
    cwd: Path,
    lab_home: Path,
    env: dict[str, str] | None = None,
) -> Spawned:
    """Start ``argv`` detached; its output goes to ``log_path``.

    The process carries ``DSLAB_LAB_HOME`` in its environment and runs in
    ``cwd``, so that ``processes_using`` can find it without a state file.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**(os.environ if env is None else env), LAB_MARKER: str(lab_home)}
    done = subprocess.run(
        ["/bin/sh", "-c", _SPAWN_SCRIPT, "sh", str(log_path), *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=SPAWN_TIMEOUT_S,
        start_new_session=True,
        check=False,
    )
    if done.returncode != 0 or not done.stdout.strip().isdigit():
        raise NodeStartFailed(
            f"could not start {argv[0]}: {done.stderr.strip() or done.stdout!r}",
            fix="check that the binary exists and is executable",
        )
    pid = int(done.stdout.strip())
    # The process may already have failed; then its log says why.
    started_at = process_start_time(pid) or 0.0

    return Spawned(pid, started_at)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return "(no log written)"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def wait_until(
    record: ProcessRecord,
    ready: Callable[[], bool],
    *,
    timeout_s: float,
    what: str,
) -> None:
    """Poll ``ready`` until true; fail early and clearly if the process dies."""
    deadline = time.monotonic() + timeout_s
    while True:
        if not record.is_alive():
            raise NodeStartFailed(
                f"{record.name} exited while {what}; last lines of "
                f"{record.log}:\n{log_tail(Path(record.log))}",
                fix=f"read the full log with `dslab lab logs {record.name}`",
            )
        if ready():
            return
        if time.monotonic() > deadline:
            raise NodeStartFailed(
                f"{record.name} did not finish {what} within {timeout_s:.0f} s; "
                f"last lines of {record.log}:\n{log_tail(Path(record.log))}",
                fix="the machine may be overloaded; try again, or read "
                f"`dslab lab logs {record.name}`",
            )
        time.sleep(POLL_S)


def signal_process(record: ProcessRecord, signum: int) -> bool:
    """Send ``signum`` if the recorded process is still the one we started."""
    if not record.is_alive():
        return False
    try:
        os.kill(record.pid, signum)
    except ProcessLookupError:
        return False
    return True


def stop_processes(
    records: Iterable[ProcessRecord], *, grace_s: float = STOP_GRACE_S
) -> list[str]:
    """SIGTERM all at once, wait, then SIGKILL stragglers; names that were alive."""
    alive = [record for record in records if record.is_alive()]
    for record in alive:
        # A paused (SIGSTOP) process cannot act on SIGTERM until continued.
        signal_process(record, signal.SIGCONT)
        signal_process(record, signal.SIGTERM)

    deadline = time.monotonic() + grace_s
    next_term = time.monotonic() + TERM_REPEAT_S
    waiting = list(alive)
    while waiting and time.monotonic() < deadline:
        waiting = [record for record in waiting if record.is_alive()]
        if waiting and time.monotonic() > next_term:
            # Redis refuses a SIGTERM while it writes its first AOF ("Writing
            # initial AOF, can't exit") and does not retry; asking again works.
            for record in waiting:
                signal_process(record, signal.SIGTERM)
            next_term = time.monotonic() + TERM_REPEAT_S
        if waiting:
            time.sleep(POLL_S)
    for record in waiting:
        log.warning("node did not stop on SIGTERM, killing: %s", record.name)
        signal_process(record, signal.SIGKILL)
        _wait_gone(record.pid, record.started_at)

    return [record.name for record in alive]


def _wait_gone(pid: int, started_at: float, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while process_matches(pid, started_at) and time.monotonic() < deadline:
        time.sleep(POLL_S)


def processes_using(home: Path) -> list[psutil.Process]:
    """Live processes that dslab started for the lab in ``home``.

    Found without any state file, so ``lab down --force`` works when
    ``state.json`` is lost or damaged. A process counts when it carries the
    ``DSLAB_LAB_HOME`` marker that ``spawn_detached`` puts in its environment,
    or, for Redis, which overwrites its own environment and process title
    when it renames itself, when it is a ``redis-server`` running in a folder
    of the lab. The working directory alone would not be safe: a person's
    shell may sit there.
    """
    wanted = str(home.absolute())
    found = []
    for process in psutil.process_iter(["pid", "name", "status"]):
        with contextlib.suppress(psutil.Error):
            if process.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if process.pid == os.getpid():
                continue
            if process.info["name"] == "redis-server":
                if process.cwd().startswith(wanted + os.sep):
                    found.append(process)
            elif process.environ().get(LAB_MARKER) == wanted:
                found.append(process)
    return found


def kill_processes(processes: list[psutil.Process]) -> None:
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(processes, timeout=5.0)


def os_free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` different ports the OS says are free now (all bound at once,
    so they differ; free again when this returns, so a small race remains)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if a server could listen on ``host:port`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # Redis sets SO_REUSEADDR too, so TIME_WAIT leftovers do not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def require_free(ports: Iterable[int], host: str = "127.0.0.1") -> None:
    for port in ports:
        if not 0 < port < 65536:
            raise PortInUse(
                f"port {port} is outside 1-65535",
                fix="choose a smaller --port (Cluster also needs port + 10000)",
            )
        if not port_is_free(port, host):
            raise PortInUse(
                f"port {port} on {host} is already in use by another process",
                fix=f"stop whatever listens there (`ss -ltnp 'sport = :{port}'`), "
                "pick another --port, or leave --port out to use free ports",
            )


def find_free_block(
    count: int, *, start: int = 7000, stop: int = 9900, bus_offset: int | None = None
) -> int:
    """The first base port with ``count`` consecutive free ports after it.

    With ``bus_offset`` (Cluster) the ports ``+ bus_offset`` must be free too.
    """
    for base in range(start, stop, 100):
        ports = list(range(base, base + count))
        if bus_offset is not None:
            ports += [port + bus_offset for port in ports]
        if all(port_is_free(port) for port in ports):
            return base
    raise PortInUse(
        f"no {count} consecutive free ports between {start} and {stop}",
        fix="free some ports or pass --port BASE explicitly",
    )
