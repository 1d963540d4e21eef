"""Run the shortener as a process: ``python -m dslab.shortener [options]``.

One worker runs in this process. With ``--workers N`` this process becomes a
small supervisor of N worker processes that each listen on the same port with
``SO_REUSEPORT``, so the kernel spreads connections over them.

Guarantees: binds 127.0.0.1 unless told otherwise; logs exactly one line
``shortener ready: http://HOST:PORT (workers=N)`` on stderr once every worker
listens; SIGTERM or SIGINT stops every worker cleanly (visits flushed) and
exits 0; if a worker dies on its own, the others are stopped and the exit
code is 1 (no restart: a crash should be seen, not hidden).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import multiprocessing
import signal
import socket
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType

from dslab.errors import DslabError, PortInUse, UsageError
from dslab.logs import setup_server_logging
from dslab.redisconn import async_client
from dslab.settings import LOOPBACK_HOST, RedisKind, RedisTarget
from dslab.shortener.codes import DEFAULT_CODE_LENGTH, MAX_CODE_LENGTH
from dslab.shortener.server import REDIRECT_STATUSES, ShortenerConfig, start_server
from dslab.shortener.store import DEFAULT_CODE_POOL

log = logging.getLogger(__name__)

WORKER_READY_TIMEOUT_S = 30.0  # spawning re-imports dslab; slow on a busy box
WORKER_STOP_TIMEOUT_S = 10.0  # time for a worker to flush visits and close
MAX_WORKERS = 64
# Past this one refill's script holds Redis long enough for everyone else to
# notice, and a dead worker strands that many codes.
MAX_CODE_POOL = 10_000


@dataclass(frozen=True)
class ServeOptions:
    host: str
    port: int
    target: RedisTarget
    workers: int
    config: ShortenerConfig
    verbosity: int = 1


def parse_args(argv: Sequence[str] | None = None) -> ServeOptions:
    parser = argparse.ArgumentParser(
        prog="python -m dslab.shortener", description="Run the URL shortener."
    )
    parser.add_argument("--host", default=LOOPBACK_HOST)
    parser.add_argument("--port", type=int, default=8080, help="0: any free port")
    parser.add_argument("--redis", required=True, help="redis:// URL of the store")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--redirect-status", type=int, default=302,
                        choices=REDIRECT_STATUSES)
    parser.add_argument("--code-length", type=int, default=DEFAULT_CODE_LENGTH)
    parser.add_argument("--no-reserve", action="store_true",
                        help="naive SET without NX: collisions overwrite links")
    parser.add_argument("--code-pool", type=int, default=DEFAULT_CODE_POOL,
                        metavar="N", help="codes each worker reserves ahead "
                        "(0: reserve one per create; off with --no-reserve)")
    parser.add_argument("--replicas-ack", type=int, default=0, metavar="N",
                        help="WAIT for N replicas to confirm each new link")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--create-requires-key", action="store_true")
    parser.add_argument("--public-url", default=None,
                        help="base of short URLs (default: the listening address)")
    parser.add_argument("--blocklist", default="",
                        help="comma-separated domains that may not be shortened")
    parser.add_argument("--allow-private-targets", action="store_true",
                        help="accept loopback and private hosts as targets")
    parser.add_argument("--create-per-minute", type=float, default=600.0)
    parser.add_argument("--not-found-per-minute", type=float, default=600.0)
    parser.add_argument("-v", "--verbose", action="count", default=1)
    args = parser.parse_args(argv)

    if not 1 <= args.workers <= MAX_WORKERS:
        raise UsageError(f"--workers {args.workers} is outside 1..{MAX_WORKERS}")
    if not 1 <= args.code_length <= MAX_CODE_LENGTH:
        raise UsageError(
            f"--code-length {args.code_length} is outside 1..{MAX_CODE_LENGTH}"
        )
    if not 0 <= args.code_pool <= MAX_CODE_POOL:
        raise UsageError(f"--code-pool {args.code_pool} is outside 0..{MAX_CODE_POOL}",
                         fix="64 is the default; 0 reserves one code per create")
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port {args.port} is outside 0..65535")
    target = RedisTarget.parse(args.redis)
    if args.replicas_ack < 0:
        raise UsageError(f"--replicas-ack {args.replicas_ack} must not be negative")
    if args.replicas_ack and target.kind is RedisKind.CLUSTER:
        raise UsageError(
            "--replicas-ack works with one primary (standalone or Sentinel); "
            "Redis Cluster would run WAIT on whichever node holds the key",
            fix="leave --replicas-ack out on a Cluster",
        )
    config = ShortenerConfig(
        public_url=args.public_url,
        redirect_status=args.redirect_status,
        code_length=args.code_length,
        reserve=not args.no_reserve,
        code_pool=args.code_pool,
        replicas_ack=args.replicas_ack,
        api_key=args.api_key,
        create_requires_key=args.create_requires_key,
        blocklist=tuple(d.strip() for d in args.blocklist.split(",") if d.strip()),
        allow_private_targets=args.allow_private_targets,
        create_per_minute=args.create_per_minute,
        not_found_per_minute=args.not_found_per_minute,
    )
    return ServeOptions(
        host=args.host,
        port=args.port,
        target=target,
        workers=args.workers,
        config=config,
        verbosity=args.verbose,
    )


def serve(options: ServeOptions) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
    if options.workers == 1:
        asyncio.run(run_worker(options, announce=True))
        return 0
    return _supervise(options)


async def run_worker(
    options: ServeOptions, *, announce: bool, ready: Connection | None = None
) -> None:
    """One worker: listen, serve until SIGTERM/SIGINT, then shut down cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    client = async_client(options.target)
    try:
        server = await start_server(
            options.config, client, host=options.host, port=options.port,
            reuse_port=options.workers > 1, close_client=True,
        )
    except OSError as exc:
        raise PortInUse(
            f"cannot listen on {options.host}:{options.port}: {exc.strerror}",
            fix="pick another --port, or --port 0 for any free one",
        ) from exc
    try:
        if announce:
            log.info("shortener ready: %s (workers=%d)", server.url, options.workers)
        if ready is not None:
            ready.send(server.url)
            ready.close()
        await stop.wait()
    finally:
        await server.close()
        log.debug("shortener worker stopped: %s", server.url)


def _worker_main(options: ServeOptions, ready: Connection) -> None:
    setup_server_logging(options.verbosity)
    asyncio.run(run_worker(options, announce=False, ready=ready))


def _supervise(options: ServeOptions) -> int:
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    previous = {
        signum: signal.signal(signum, on_signal)
        for signum in (signal.SIGTERM, signal.SIGINT)
    }
    context = multiprocessing.get_context("spawn")
    workers: list[BaseProcess] = []
    try:
        with _port_for_workers(options) as port:
            fixed = replace(options, port=port)
            readers = []
            for index in range(options.workers):
                reader, writer = context.Pipe(duplex=False)
                worker = context.Process(
                    target=_worker_main, args=(fixed, writer),
                    name=f"shortener-worker-{index + 1}",
                )
                worker.start()
                writer.close()
                workers.append(worker)
                readers.append(reader)
            _wait_ready(readers, workers, stopping)
        if stopping.is_set():
            return 0
        log.info("shortener ready: http://%s:%d (workers=%d)", options.host, port,
                 options.workers)

        sentinels = [worker.sentinel for worker in workers]
        while not stopping.is_set():
            if wait(sentinels, timeout=0.2):
                died = [w.name for w in workers if not w.is_alive()]
                log.error("shortener worker died: %s; stopping the others", died)
                return 1
        return 0
    finally:
        _stop_workers(workers)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def _port_for_workers(options: ServeOptions) -> Iterator[int]:
    """Port 0 asks for a free port: hold one with SO_REUSEPORT so every worker
    binds the same; released once they listen."""
    if options.port != 0:
        yield options.port
        return
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind((options.host, 0))
        yield int(holder.getsockname()[1])
    finally:
        holder.close()


def _wait_ready(
    readers: list[Connection], workers: list[BaseProcess], stopping: threading.Event
) -> None:
    pending = list(readers)
    deadline = WORKER_READY_TIMEOUT_S / 0.2
    for _ in range(int(deadline)):
        if not pending or stopping.is_set():
            return
        ready = wait(pending, timeout=0.2)
        for reader in [conn for conn in pending if conn in ready]:
            try:
                reader.recv()
            except EOFError:
                raise DslabError(
                    "a shortener worker exited before it listened",
                    fix="run with -vv and read the worker's error above",
                ) from None
            pending.remove(reader)
    if pending:
        raise DslabError(
            f"{len(pending)} of {len(workers)} workers did not listen within "
            f"{WORKER_READY_TIMEOUT_S:.0f} s",
            fix="check that Redis answers and the port is free",
        )


def _stop_workers(workers: list[BaseProcess]) -> None:
    for worker in workers:
        if worker.is_alive() and worker.pid is not None:
            worker.terminate()  # SIGTERM: the worker flushes and exits
    for worker in workers:
        worker.join(WORKER_STOP_TIMEOUT_S)
        if worker.is_alive():
            log.warning("shortener worker did not stop, killing: %s", worker.name)
            worker.kill()
            worker.join(1.0)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        options = parse_args(argv)
        setup_server_logging(options.verbosity)
        return serve(options)
    except DslabError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return exc.exit_code
