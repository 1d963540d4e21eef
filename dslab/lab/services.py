"""Running dslab's servers (chat, shortener) as supervised lab services.

Used by ``dslab chat serve``, ``dslab shorten serve`` and scenarios alike.

``dslab chat serve`` and ``dslab shorten serve`` start their servers the
same way: as ``python -m dslab.<service>`` processes launched through the
lab, so they are recorded in ``state.json``, shown by ``lab status``,
targetable by ``chaos`` and stopped by ``lab down``.
"""

from __future__ import annotations

import os
import sys

from dslab.errors import LabNotRunning, UsageError
from dslab.lab.lab import Lab
from dslab.lab.state import ProcessRecord
from dslab.lab.supervisor import find_free_block, require_free
from dslab.settings import LOOPBACK_HOST, RedisTarget


def redis_target(lab: Lab, url: str | None) -> RedisTarget:
    """``--redis URL`` when given, else the running lab's own URL."""
    if url:
        return RedisTarget.parse(url)
    try:
        return lab.redis_target()
    except LabNotRunning as exc:
        raise LabNotRunning(
            exc.message,
            fix="start a lab with `dslab lab up`, or pass --redis URL",
        ) from exc


def running(lab: Lab, kind: str) -> list[ProcessRecord]:
    """Live services of ``kind`` in the lab (none when there is no lab)."""
    state = lab.state()
    if state is None:
        return []
    return [r for r in state.of_kind(kind) if r.is_alive()]


# Services' default ports (chat 8100, shortener 8080, workers 8300) are
# offsets from this base; DSLAB_SERVICE_PORT_START moves the base, so that two
# labs, or two test processes, can start services side by side.
SERVICE_PORT_BASE = 8000
SERVICE_PORT_ENV = "DSLAB_SERVICE_PORT_START"


def service_port_shift() -> int:
    """How far ``DSLAB_SERVICE_PORT_START`` moves the services' default ports."""
    text = os.environ.get(SERVICE_PORT_ENV)
    if not text:
        return 0
    if not text.isdigit() or not 1024 <= int(text) <= 60000:
        raise UsageError(f"{SERVICE_PORT_ENV}={text!r} is not a port in 1024-60000",
                         fix=f"unset it, or give e.g. {SERVICE_PORT_ENV}=18000")
    return int(text) - SERVICE_PORT_BASE


def choose_ports(count: int, port: int | None, default_start: int) -> list[int]:
    """``count`` consecutive free ports: from ``port`` exactly, or the first free
    block from ``default_start`` (moved by ``DSLAB_SERVICE_PORT_START``)."""
    if port is None:
        start = default_start + service_port_shift()
        port = find_free_block(count, start=start, stop=start + 2000)
    ports = list(range(port, port + count))
    require_free(ports)
    return ports


def launch(
    lab: Lab, kind: str, module: str, args: list[str], port: int,
    *, name_flag: str | None = None,
) -> ProcessRecord:
    """Start ``python -m module args...`` listening on ``port`` as a lab service
    named ``kind-N``; with ``name_flag`` the process is told its name too."""
    name = lab.next_name(kind)
    url = f"http://{LOOPBACK_HOST}:{port}"
    argv = [sys.executable, "-m", module, "--host", LOOPBACK_HOST,
            "--port", str(port), *args]
    if name_flag:
        argv += [name_flag, name]
    return lab.launch(name, kind, argv, port=port,
                      extra={"url": url, "health_url": f"{url}/healthz"})


def own_args(lab: Lab, kind: str) -> list[str]:
    """Options every server of ``kind`` in this lab gets: the chat servers
    share one secret (in the lab folder) to sign users' identity tokens."""
    if kind == "chat":
        return ["--secret-file", str(lab.home / "chat-secret")]
    return []
