"""Open-loop HTTP load on a constant-rate timetable, with honest latency.

``run_load`` sends requests to one HTTP server on loopback at a fixed rate and
measures every request's latency from its *intended* send time (see
dslab.workload.schedule). A request that waits because the server stalled, or
because every connection was busy, is charged for that wait: a stall shows as
the latency of all the requests it delayed, not only of the few in flight.

How it stays lean enough for 10k+ requests a second in Python: HTTP/1.1
keep-alive connections driven by bare asyncio Protocols (no client library
per request), one request in flight per connection as a real client does
(no pipelining), and the timetable split over several load-generator
processes whose latency histograms are added at the end. All processes read
the one CLOCK_MONOTONIC of this machine (``time.monotonic``), so they share
the start instant the parent hands them.

Guarantees:

- Every request due in the measured window is accounted for exactly once:
  answered (status counted), failed (connection lost, bad answer, no answer
  by the deadline) or ``unsent`` (still waiting for a connection when the
  grace period ran out).
- If the requests did not go out at the asked rate, ``rate_held`` is false and
  the summary says "rate not held: sent X/s of Y/s asked"; the run is never
  silently slower than asked.
- A redirect counts as correct only if its ``Location`` equals the URL its
  link was created with; anything else is a ``wrong_location`` error.
- Only loopback servers are driven (``HttpTarget.parse`` refuses others).

Each connection binds its own loopback source address (127.1.x.y), so a
server that limits per client address sees a crowd of clients, as it would
in production, rather than one client hammering it.

Limits: asyncio timers fire up to ~1 ms late (epoll's resolution), which adds
up to ~1 ms to the measured latency of requests sent from an idle loop; the
``send_lag`` figures show how much. Answers must carry ``Content-Length`` or
chunked encoding (every server dslab drives does).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import shutil
import subprocess
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import aiohttp

from dslab.errors import DslabError, EnvironmentProblem, UsageError
from dslab.report.histogram import COARSE_SIGNIFICANT_DIGITS, LatencyHistogram
from dslab.report.runfile import SERIES_PERCENTILES, RunFile, RunMeta, SecondStats
from dslab.workload.schedule import Mix, Operation, Picker, Timetable
from dslab.workload.shards import (
    Shard,
    await_all,
    mark_load_started,
    run_shard,
    running_shards,
    start_all,
)

log = logging.getLogger(__name__)

# Past this, one 2-core machine measures its own generator, not the server.
MAX_RATE_PER_S = 200_000.0
# Runs are for learning, not soak tests; 10 minutes shows any trend.
MAX_DURATION_S = 600.0
# Each connection is a socket and a source address; more is a fork bomb.
MAX_CONNECTIONS = 4096
MAX_PROCESSES = 16
# select() (see shards.precise_loop) only watches file descriptors below 1024.
MAX_CONNECTIONS_PER_PROCESS = 900
# After the window closes: time to send a backlog and to hear the last answers.
GRACE_S = 5.0
# Sending at least this share of the asked rate counts as holding it.
RATE_HELD_SHARE = 0.9
# Timer wake-ups later than this (p99) mean the generator, not the server,
# is saturated: asyncio's own resolution is ~1 ms.
GENERATOR_LAG_LIMIT_MS = 5.0
# A generator process using this share of a core cannot go faster: what it
# measures beyond that point is partly its own queueing.
GENERATOR_CPU_LIMIT = 0.9
# How often the generator checks its own event loop's lateness.
LOOP_PROBE_S = 0.01
# How often the processes publish their counters for the live progress line.
PROGRESS_INTERVAL_S = 0.25
# Spawning a process re-imports dslab; slow on a busy 2-core box.
READY_TIMEOUT_S = 30.0
# Between "all processes connected" and the first intended send.
START_DELAY_S = 0.2
# A lost connection is re-opened after this pause (not in a hot loop).
RECONNECT_DELAY_S = 0.05
# Beyond the grace period: time for processes to encode and send results.
RESULT_TIMEOUT_S = 60.0
# A response head longer than this is not from a sane server.
MAX_HEAD_BYTES = 64 * 1024
# How many wrong redirects the verdict quotes.
WRONG_EXAMPLES = 5
# Source addresses: the load uses 127.1.x.y, link creation 127.2.x.y.
LOAD_SOURCE_BASE = int(ipaddress.IPv4Address("127.1.0.1"))
SETUP_SOURCE_BASE = int(ipaddress.IPv4Address("127.2.0.1"))
# Links created per source address: under the shortener's default burst of
# 100 creates per client, so setting up never trips its rate limit.
LINKS_PER_SETUP_CLIENT = 50
SETUP_PARALLEL = 8
SETUP_TIMEOUT_S = 10.0
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
CREATED_STATUSES = frozenset({200, 201})

# Indices into a process's shared progress counters.
SENT, ANSWERED_OK, FAILED, BACKLOG, WRONG = range(5)
PROGRESS_FIELDS = 5


# -- what to drive -----------------------------------------------------------


@dataclass(frozen=True)
class HttpTarget:
    """An HTTP server on loopback: ``http://127.0.0.1:8080``."""

    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> HttpTarget:
        parts = urlsplit(url)
        fix = "give a loopback URL such as http://127.0.0.1:8080"
        if parts.scheme != "http" or not parts.hostname:
            raise UsageError(f"--server {url!r} is not an http:// URL", fix=fix)
        host = "127.0.0.1" if parts.hostname == "localhost" else parts.hostname
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise UsageError(
                f"--server {url!r} is not on loopback; dslab only loads servers "
                "on this machine (127.0.0.0/8)",
                fix=fix,
            )
        try:
            port = parts.port or 80
        except ValueError:
            raise UsageError(f"--server {url!r} has a bad port", fix=fix) from None

        return cls(host, port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def is_ipv4(self) -> bool:
        return ipaddress.ip_address(self.host).version == 4


@dataclass(frozen=True)
class BenchLink:
    """A link the bench created: following ``code`` must lead to ``url``."""

    code: str
    url: str


@dataclass(frozen=True)
class LoadPlan:
    """Everything one run needs; pickled to each load-generator process."""

    target: HttpTarget
    rate_per_s: float
    duration_s: float
    warmup_s: float = 0.0
    connections: int = 64
    processes: int = 1
    seed: int = 0
    mix: Mix = field(default_factory=lambda: Mix(100, 0))
    links: tuple[BenchLink, ...] = ()
    zipf_s: float = 0.0
    static_path: str | None = None  # GET this path only; no Location check
    grace_s: float = GRACE_S

    def __post_init__(self) -> None:
        if not 0 < self.rate_per_s <= MAX_RATE_PER_S:
            raise UsageError(
                f"--rate {self.rate_per_s:g}/s is outside 0-{MAX_RATE_PER_S:g}/s",
                fix=f"ask at most {MAX_RATE_PER_S:g}/s",
            )
        if not 0 < self.duration_s <= MAX_DURATION_S:
            raise UsageError(
                f"--duration {self.duration_s:g}s is outside 0-{MAX_DURATION_S:g}s",
                fix="run for 10 minutes at most",
            )
        if not 0 <= self.warmup_s <= MAX_DURATION_S:
            raise UsageError(f"--warmup {self.warmup_s:g}s is outside 0-600s")
        if not 1 <= self.processes <= MAX_PROCESSES:
            raise UsageError(f"--processes {self.processes} is outside 1-16")
        if not self.processes <= self.connections <= MAX_CONNECTIONS:
            raise UsageError(
                f"--connections {self.connections} is outside "
                f"{self.processes}-{MAX_CONNECTIONS}",
                fix="give each process at least one connection",
            )
        if self.connections > self.processes * MAX_CONNECTIONS_PER_PROCESS:
            raise UsageError(
                f"--connections {self.connections} is more than "
                f"{MAX_CONNECTIONS_PER_PROCESS} per process",
                fix="add --processes",
            )
        if self.static_path is None and self.mix.redirect and not self.links:
            raise UsageError("redirects were asked for but there are no links",
                             fix="create links first, or give --static-path")
        if self.static_path is not None and not self.static_path.startswith("/"):
            raise UsageError(f"--static-path {self.static_path!r} must start "
                             "with '/'")

    @property
    def measured_requests(self) -> int:
        return Timetable(self.rate_per_s, self.duration_s, 0.0).total_requests


# -- the HTTP/1.1 answer parser ----------------------------------------------


class BadAnswer(Exception):
    """The bytes from the server are not an HTTP/1.1 answer we can read."""


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    status: int
    location: bytes | None
    close: bool  # the server will close the connection after this answer


def parse_answer(buffer: bytes | bytearray) -> tuple[HttpAnswer, int] | None:
    """The first complete answer in ``buffer`` and its length in bytes, or None
    while it is incomplete. Raises BadAnswer for bytes that are not HTTP."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        if len(buffer) > MAX_HEAD_BYTES:
            raise BadAnswer(f"no end of the response head in {len(buffer)} bytes")
        return None
    head = bytes(buffer[:head_end])
    if not head.startswith(b"HTTP/1.") or len(head) < 12:
        raise BadAnswer(f"not an HTTP/1.x status line: {head[:40]!r}")
    try:
        status = int(head[9:12])
    except ValueError:
        raise BadAnswer(f"bad status in {head[:40]!r}") from None
    lowered = head.lower()
    body_start = head_end + 4

    if _header(lowered, head, b"transfer-encoding") == b"chunked":
        end = _chunked_end(buffer, body_start)
        if end is None:
            return None
    elif (length := _header(lowered, head, b"content-length")) is not None:
        try:
            end = body_start + int(length)
        except ValueError:
            raise BadAnswer(f"bad Content-Length {length!r}") from None
        if len(buffer) < end:
            return None
    elif status in (204, 304) or 100 <= status < 200:
        end = body_start
    else:
        raise BadAnswer("an answer with neither Content-Length nor chunks")

    connection = (_header(lowered, lowered, b"connection") or b"").strip()
    close = connection == b"close" or (
        head.startswith(b"HTTP/1.0") and connection != b"keep-alive"
    )
    answer = HttpAnswer(status, _header(lowered, head, b"location"), close)

    return answer, end


def _header(lowered: bytes, head: bytes, name: bytes) -> bytes | None:
    """The value of header ``name`` (lower case), taken from ``head``."""
    start = lowered.find(b"\r\n" + name + b":")
    if start < 0:
        return None
    start += len(name) + 3
    stop = head.find(b"\r\n", start)

    return head[start : stop if stop >= 0 else len(head)].strip()


def _chunked_end(buffer: bytes | bytearray, position: int) -> int | None:
    """Where a chunked body starting at ``position`` ends, None if incomplete."""
    while True:
        line_end = buffer.find(b"\r\n", position)
        if line_end < 0:
            return None
        try:
            size = int(bytes(buffer[position:line_end]).split(b";")[0], 16)
        except ValueError:
            raise BadAnswer("bad chunk size") from None
        if size == 0:
            trailer_end = buffer.find(b"\r\n", line_end + 2)
            if trailer_end < 0:
                return None
            if trailer_end == line_end + 2:
                return trailer_end + 2
            end = buffer.find(b"\r\n\r\n", line_end)
            return None if end < 0 else end + 4
        position = line_end + 2 + size + 2
        if len(buffer) < position:
            return None


# -- one load-generator process ----------------------------------------------


@dataclass
class ShardResult:
    """What one process measured; plain data so it pickles to the parent."""

    histograms: dict[str, str]  # op -> encoded full-resolution histogram
    seconds: dict[str, dict[int, str]]  # op -> second -> encoded coarse histogram
    errors: dict[str, dict[int, int]]  # op -> second -> failures
    status_counts: dict[str, dict[str, int]]  # op -> status (or failure) -> n
    wrong_location: int
    wrong_examples: list[dict[str, str]]
    planned: int  # measured requests this process owned
    sent: int
    unsent: int
    last_sent_offset_s: float  # last measured send, from the window's start
    send_lag: str  # encoded histogram: actual send time - intended time
    timer_lag: str  # encoded histogram: how late the send timer fired
    cpu_share: float = 0.0  # this process's CPU seconds per second of its run


class _Pending:
    __slots__ = ("expected", "intended", "link", "operation")

    def __init__(
        self, operation: str, intended: float, expected: bytes | None, link: int
    ) -> None:
        self.operation = operation
        self.intended = intended
        self.expected = expected
        self.link = link


class _Connection(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight."""

    def __init__(self, shard: _Shard, source: str | None) -> None:
        self.shard = shard
        self.source = source
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.pending: _Pending | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            parsed = parse_answer(self.buffer)
        except BadAnswer as exc:
            log.debug("bad answer from the server: %s", exc)
            self.shard.failed(self, "bad_answer")
            self.close()
            return
        if parsed is None:
            return
        answer, length = parsed
        del self.buffer[:length]
        self.shard.answered(self, answer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.shard.lost(self)

    def send(self, payload: bytes, pending: _Pending) -> None:
        self.pending = pending
        assert self.transport is not None
        self.transport.write(payload)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _Shard:
    """Sends one process's share of the timetable and records what came back."""

    def __init__(self, plan: LoadPlan, shard: int, progress: Any) -> None:
        self.plan = plan
        self.shard = shard
        self.progress = progress
        self.loop = asyncio.get_running_loop()
        self.picker = Picker(links=len(plan.links), mix=plan.mix,
                             zipf_s=plan.zipf_s, seed=plan.seed, shard=shard)
        authority = f"{plan.target.host}:{plan.target.port}".encode()
        self.host_header = b"Host: " + authority + b"\r\n"
        if plan.static_path is not None:
            self.static_request: bytes | None = self._get(plan.static_path)
        else:
            self.static_request = None
        self.link_requests = [self._get(f"/{link.code}") for link in plan.links]
        self.link_locations = [link.url.encode() for link in plan.links]

        self.connections: set[_Connection] = set()
        self.free: list[_Connection] = []
        self.freed = asyncio.Event()
        self.idle = asyncio.Event()
        self.in_flight = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.closing = False
        self.next_k = 0
        self.timetable = Timetable(plan.rate_per_s, plan.warmup_s + plan.duration_s,
                                   0.0, shard, plan.processes)
        self.measured_from = 0.0
        self.deadline = math.inf

        self.histograms: dict[str, LatencyHistogram] = {}
        self.seconds: dict[str, dict[int, LatencyHistogram]] = defaultdict(dict)
        self.errors: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.status_counts: dict[str, dict[str, int]] = defaultdict(
            lambda: defaultdict(int))
        self.send_lag = LatencyHistogram()
        self.timer_lag = LatencyHistogram()
        self.cpu_began = (time.process_time(), time.monotonic())
        self.wrong_examples: list[dict[str, str]] = []
        self.counters = [0] * PROGRESS_FIELDS
        self.last_sent = 0.0

    def _get(self, path: str) -> bytes:
        return b"GET " + path.encode() + b" HTTP/1.1\r\n" + self.host_header + b"\r\n"

    def _create(self, k: int) -> bytes:
        body = json.dumps(
            {"url": f"https://example.com/dslab-bench/{self.plan.seed}/"
                    f"{self.shard}-{k}"}
        ).encode()
        return (b"POST /api/links HTTP/1.1\r\n" + self.host_header
                + b"Content-Type: application/json\r\nContent-Length: "
                + str(len(body)).encode() + b"\r\n\r\n" + body)

    # -- connections --

    def source_address(self, number: int) -> str | None:
        if not self.plan.target.is_ipv4:
            return None
        # Global connection numbers: shard s owns s, s + P, s + 2P, ...
        global_number = self.shard + number * self.plan.processes
        return str(ipaddress.IPv4Address(LOAD_SOURCE_BASE + global_number))

    async def connect(self, source: str | None) -> None:
        target = self.plan.target
        await self.loop.create_connection(
            lambda: self._adopt(source), target.host, target.port,
            local_addr=(source, 0) if source else None,
        )

    def _adopt(self, source: str | None) -> _Connection:
        connection = _Connection(self, source)
        self.connections.add(connection)
        self.free.append(connection)
        return connection

    async def open(self, count: int) -> None:
        """Open this process's connections; a refused first connect is fatal."""
        async with asyncio.TaskGroup() as group:
            for number in range(count):
                group.create_task(self.connect(self.source_address(number)))

    async def _reconnect(self, source: str | None) -> None:
        while not self.closing and self.loop.time() < self.deadline:
            await asyncio.sleep(RECONNECT_DELAY_S)
            try:
                await self.connect(source)
            except OSError as exc:
                log.debug("reconnect to %s failed: %s", self.plan.target.url, exc)
                continue
            self.pump(self.loop.time())
            self.freed.set()
            return

    # -- sending --

    async def run(self, started_at: float) -> ShardResult:
        plan = self.plan
        self.timetable = Timetable(plan.rate_per_s, plan.warmup_s + plan.duration_s,
                                   started_at, self.shard, plan.processes)
        self.measured_from = started_at + plan.warmup_s
        self.deadline = self.measured_from + plan.duration_s + plan.grace_s
        self.cpu_began = (time.process_time(), time.monotonic())
        reporter = asyncio.create_task(self._report_progress())
        watcher = asyncio.create_task(self._watch_loop())
        try:
            await self._dispatch()
            await self._drain()
        finally:
            self.closing = True
            reporter.cancel()
            watcher.cancel()
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(reporter, watcher, *self.tasks,
                                 return_exceptions=True)
            for connection in list(self.connections):
                connection.close()

        return self._result()

    async def _watch_loop(self) -> None:
        """Time this process's own event loop: a generator too busy to keep
        its timetable never sleeps waiting for a send, so only a timer of its
        own shows that it, not the server, is late."""
        while True:
            due = self.loop.time() + LOOP_PROBE_S
            await asyncio.sleep(LOOP_PROBE_S)
            self.timer_lag.record_us(max(0, round((self.loop.time() - due) * 1e6)))

    async def _dispatch(self) -> None:
        total = self.timetable.requests
        while self.next_k < total:
            now = self.loop.time()
            if now >= self.deadline:
                return
            self.pump(now)
            if self.next_k >= total:
                return
            if self.free:
                due_at = self.timetable.intended_at(self.next_k)
                if due_at > now:
                    await asyncio.sleep(due_at - now)
                    woke = self.loop.time()
                    self.timer_lag.record_us(max(0, round((woke - due_at) * 1e6)))
                continue
            self.freed.clear()
            try:
                async with asyncio.timeout_at(self.deadline):
                    await self.freed.wait()
            except TimeoutError:
                return

    async def _drain(self) -> None:
        if self.in_flight == 0:
            return
        self.idle.clear()
        try:
            async with asyncio.timeout_at(self.deadline):
                await self.idle.wait()
        except TimeoutError:
            pass

    def pump(self, now: float) -> None:
        """Send every due request that a free connection can take."""
        if self.closing or now >= self.deadline:
            return
        due = self.timetable.due_by(now)
        while self.next_k < due and self.free:
            connection = self.free.pop()
            if connection.transport is None or connection.transport.is_closing():
                continue
            self._send(connection, self.next_k, now)
            self.next_k += 1

    def _send(self, connection: _Connection, k: int, now: float) -> None:
        intended = self.timetable.intended_at(k)
        link = -1
        expected = None
        if self.static_request is not None:
            operation, payload = Operation.REDIRECT, self.static_request
        else:
            operation = self.picker.operation()
            if operation is Operation.CREATE:
                payload = self._create(k)
            else:
                link = self.picker.link()
                payload = self.link_requests[link]
                expected = self.link_locations[link]
        connection.send(payload, _Pending(operation.value, intended, expected, link))
        self.in_flight += 1
        if intended >= self.measured_from:
            self.counters[SENT] += 1
            self.last_sent = now
            self.send_lag.record_us(max(0, round((now - intended) * 1e6)))

    # -- answers --

    def answered(self, connection: _Connection, answer: HttpAnswer) -> None:
        pending = connection.pending
        if pending is None:
            log.debug("an answer nobody asked for; closing the connection")
            connection.close()
            return
        connection.pending = None
        self.in_flight -= 1
        now = self.loop.time()
        if pending.intended >= self.measured_from:
            self._judge(pending, answer, now)
        if answer.close:
            connection.close()
        else:
            self.free.append(connection)
            self.pump(now)
            self.freed.set()
        if self.in_flight == 0:
            self.idle.set()

    def _judge(self, pending: _Pending, answer: HttpAnswer, now: float) -> None:
        operation = pending.operation
        self.status_counts[operation][str(answer.status)] += 1
        if operation == Operation.CREATE:
            good = answer.status in CREATED_STATUSES
        elif pending.expected is None:  # --static-path: any redirect or 2xx
            good = answer.status in REDIRECT_STATUSES or 200 <= answer.status < 300
        else:
            good = answer.status in REDIRECT_STATUSES
            if good and answer.location != pending.expected:
                good = False
                self.counters[WRONG] += 1
                if len(self.wrong_examples) < WRONG_EXAMPLES:
                    self.wrong_examples.append({
                        "code": self.plan.links[pending.link].code,
                        "expected": pending.expected.decode(errors="replace"),
                        "location": (answer.location or b"").decode(errors="replace"),
                    })
        if good:
            self._record(operation, pending.intended, now)
        else:
            self._record_error(operation, pending.intended)

    def failed(self, connection: _Connection, reason: str) -> None:
        """The request in flight on ``connection`` will never get its answer."""
        pending = connection.pending
        if pending is None:
            return
        connection.pending = None
        self.in_flight -= 1
        if pending.intended >= self.measured_from:
            self.status_counts[pending.operation][reason] += 1
            self._record_error(pending.operation, pending.intended)
        if self.in_flight == 0:
            self.idle.set()

    def lost(self, connection: _Connection) -> None:
        self.failed(connection, "connection_lost")
        self.connections.discard(connection)
        if connection in self.free:
            self.free.remove(connection)
        if not self.closing and self.loop.time() < self.deadline:
            task = asyncio.create_task(self._reconnect(connection.source))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def _record(self, operation: str, intended: float, completed: float) -> None:
        latency_us = max(0, round((completed - intended) * 1e6))
        histogram = self.histograms.get(operation)
        if histogram is None:
            histogram = self.histograms[operation] = LatencyHistogram()
        histogram.record_us(latency_us)
        second = int(intended - self.measured_from)
        coarse = self.seconds[operation].get(second)
        if coarse is None:
            coarse = self.seconds[operation][second] = LatencyHistogram(
                significant_digits=COARSE_SIGNIFICANT_DIGITS)
        coarse.record_us(latency_us)
        self.counters[ANSWERED_OK] += 1

    def _record_error(self, operation: str, intended: float) -> None:
        self.errors[operation][int(intended - self.measured_from)] += 1
        self.counters[FAILED] += 1

    # -- reporting --

    async def _report_progress(self) -> None:
        while True:
            self._publish()
            await asyncio.sleep(PROGRESS_INTERVAL_S)

    def _publish(self) -> None:
        self.counters[BACKLOG] = max(
            0, self.timetable.due_by(self.loop.time()) - self.next_k)
        for index, value in enumerate(self.counters):
            self.progress[index] = value

    def _result(self) -> ShardResult:
        in_flight = [c.pending for c in self.connections if c.pending is not None]
        for pending in in_flight:
            if pending.intended >= self.measured_from:
                self.status_counts[pending.operation]["no_answer"] += 1
                self._record_error(pending.operation, pending.intended)
        planned = self._measured_requests()
        sent_measured = self.counters[SENT]
        self._publish()
        cpu_at, wall_at = self.cpu_began
        cpu_share = ((time.process_time() - cpu_at)
                     / max(1e-6, time.monotonic() - wall_at))

        return ShardResult(
            histograms={op: h.encode() for op, h in self.histograms.items()},
            seconds={op: {t: h.encode() for t, h in by_second.items()}
                     for op, by_second in self.seconds.items()},
            errors={op: dict(by_second) for op, by_second in self.errors.items()},
            status_counts={op: dict(c) for op, c in self.status_counts.items()},
            wrong_location=self.counters[WRONG],
            wrong_examples=self.wrong_examples,
            planned=planned,
            sent=sent_measured,
            unsent=planned - sent_measured,
            last_sent_offset_s=max(0.0, self.last_sent - self.measured_from),
            send_lag=self.send_lag.encode(),
            timer_lag=self.timer_lag.encode(),
            cpu_share=cpu_share,
        )

    def _measured_requests(self) -> int:
        """How many of this process's requests are due in the measured window."""
        # The first k whose intended time is in the window, by bisection; the
        # same comparison as _send's, so the two always agree.
        low, high = 0, self.timetable.requests
        while low < high:
            middle = (low + high) // 2
            if self.timetable.intended_at(middle) >= self.measured_from:
                high = middle
            else:
                low = middle + 1
        return self.timetable.requests - low


def _shard_process(
    plan: LoadPlan, shard: int, channel: Connection, progress: Any
) -> None:
    """Entry point of a load-generator process: connect, wait, run, report."""
    run_shard(_shard_main(plan, shard, channel, progress), channel)


async def _shard_main(
    plan: LoadPlan, shard: int, channel: Connection, progress: Any
) -> ShardResult | None:
    runner = _Shard(plan, shard, progress)
    share = plan.connections // plan.processes
    share += 1 if shard < plan.connections % plan.processes else 0
    try:
        await runner.open(share)
    except* OSError as group:
        first = group.exceptions[0]
        raise EnvironmentProblem(
            f"cannot connect to {plan.target.url}: {first}",
            fix="check that the server runs (`dslab lab status`)",
        ) from None
    channel.send(("ready", None))

    message, started_at = await asyncio.to_thread(channel.recv)
    if message != "start":
        return None
    return await runner.run(float(started_at))


# -- the parent: spawn, start, watch, merge -----------------------------------


@dataclass(frozen=True)
class Progress:
    """Counters of all processes so far, for a live progress line."""

    elapsed_s: float
    sent: int
    answered_ok: int
    failed: int
    backlog: int
    wrong_location: int


@dataclass
class LoadResult:
    """The merged measurements of one run."""

    plan: LoadPlan
    histograms: dict[str, LatencyHistogram]
    series: dict[str, list[SecondStats]]
    status_counts: dict[str, dict[str, int]]
    wrong_location: int
    wrong_examples: list[dict[str, str]]
    planned: int
    sent: int
    unsent: int
    achieved_rate: float
    send_lag: LatencyHistogram
    timer_lag: LatencyHistogram
    engine: str = "python"
    # The busiest generator process's CPU seconds per second of run.
    generator_cpu_share: float = 0.0
    # Closed-loop engines (wrk) send as fast as answers come back: there is no
    # asked rate to hold, and latency is measured from the actual send.
    open_loop: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def rate_held(self) -> bool:
        if not self.open_loop:
            return True
        return (self.unsent == 0
                and self.achieved_rate >= RATE_HELD_SHARE * self.plan.rate_per_s)

    def warnings(self) -> list[str]:
        return list(self.notes)

    @property
    def generator_saturated(self) -> bool:
        """The load generator, not the server, was the busy one: its own
        timers ran late, or one of its processes used (nearly) a whole core."""
        return (self.timer_lag.percentile_us(99.0) > GENERATOR_LAG_LIMIT_MS * 1000
                or self.generator_cpu_share >= GENERATOR_CPU_LIMIT)

    @property
    def failures(self) -> int:
        good = sum(h.count for h in self.histograms.values())
        answered = sum(sum(c.values()) for c in self.status_counts.values())
        return answered - good + self.unsent

    def rate_note(self) -> str:
        asked = self.plan.rate_per_s
        if not self.open_loop:
            return (f"closed loop ({self.engine}): {self.achieved_rate:,.0f}/s "
                    "achieved; no rate was asked, so none was held")
        sent = f"sent {self.achieved_rate:,.0f}/s of {asked:,.0f}/s asked"
        if self.rate_held:
            return f"rate held: {sent}"
        note = f"rate not held: {sent}"
        if self.unsent:
            note += f", {self.unsent:,} requests never sent"
        return note

    def verdict(self) -> dict[str, Any]:
        return {
            "wrong_location": self.wrong_location,
            "wrong_location_examples": self.wrong_examples,
            "status_counts": self.status_counts,
            "rate_held": self.rate_held,
            "achieved_rate": round(self.achieved_rate, 1),
            "asked_rate": self.plan.rate_per_s,
            "planned": self.planned,
            "sent": self.sent,
            "unsent": self.unsent,
            "send_lag_p99_ms": self.send_lag.percentile_us(99.0) / 1000,
            "generator_saturated": self.generator_saturated,
            "generator_cpu_share": round(self.generator_cpu_share, 2),
            "connections": self.plan.connections,
            "processes": self.plan.processes,
            "engine": self.engine,
            "open_loop": self.open_loop,
            "notes": self.notes,
        }

    def run_file(self, meta: RunMeta) -> RunFile:
        return RunFile(meta=meta, series=self.series,
                       histograms=dict(self.histograms), verdict=self.verdict())


async def run_load(
    plan: LoadPlan, on_progress: Callable[[Progress], None] | None = None
) -> LoadResult:
    """Run ``plan`` in ``plan.processes`` processes and merge what they measured.

    ``on_progress`` is called about every PROGRESS_INTERVAL_S while it runs.
    """
    fix = "check that the server runs; lower --rate or --connections"
    async with running_shards(
        _shard_process, lambda shard: (plan, shard), plan.processes,
        name="dslab-load", progress_fields=PROGRESS_FIELDS,
    ) as shards:
        await await_all(shards, "ready", time.monotonic() + READY_TIMEOUT_S,
                        what="load generator", fix=fix)
        started_at = start_all(shards, START_DELAY_S)
        log.debug("load started: %s at %g/s", plan.target.url, plan.rate_per_s)
        deadline = (started_at + plan.warmup_s + plan.duration_s + plan.grace_s
                    + RESULT_TIMEOUT_S)

        def tick(now: float) -> None:
            if on_progress is not None:
                on_progress(_progress(shards, now - started_at))

        await await_all(shards, "done", deadline, what="load generator", fix=fix,
                        on_tick=tick)

    return _merge(plan, [shard.answer for shard in shards])


def _progress(shards: list[Shard], elapsed_s: float) -> Progress:
    totals = [sum(s.progress[i] for s in shards) for i in range(PROGRESS_FIELDS)]
    return Progress(elapsed_s, totals[SENT], totals[ANSWERED_OK], totals[FAILED],
                    totals[BACKLOG], totals[WRONG])


def _merge(plan: LoadPlan, results: list[ShardResult]) -> LoadResult:
    histograms: dict[str, LatencyHistogram] = {}
    seconds: dict[str, dict[int, LatencyHistogram]] = defaultdict(dict)
    errors: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    status_counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    send_lag, timer_lag = LatencyHistogram(), LatencyHistogram()
    for result in results:
        for op, text in result.histograms.items():
            histograms.setdefault(op, LatencyHistogram()).add(
                LatencyHistogram.decode(text))
        for op, by_second in result.seconds.items():
            for t, text in by_second.items():
                seconds[op].setdefault(t, LatencyHistogram(
                    significant_digits=COARSE_SIGNIFICANT_DIGITS,
                )).add(LatencyHistogram.decode(text))
        for op, failures in result.errors.items():
            for t, count in failures.items():
                errors[op][t] += count
        for op, counts in result.status_counts.items():
            for status, count in counts.items():
                status_counts[op][status] += count
        send_lag.add(LatencyHistogram.decode(result.send_lag))
        timer_lag.add(LatencyHistogram.decode(result.timer_lag))

    operations = sorted(set(histograms) | set(seconds) | set(errors))
    last_second = max(
        [t for op in operations for t in (*seconds[op], *errors[op])], default=-1)
    series = {
        op: [_second(t, seconds[op].get(t), errors[op].get(t, 0))
             for t in range(last_second + 1)]
        for op in operations
    }
    for op in operations:
        histograms.setdefault(op, LatencyHistogram())

    planned = sum(r.planned for r in results)
    sent = sum(r.sent for r in results)
    last_sent_s = max((r.last_sent_offset_s for r in results), default=0.0)
    # Sends spread over more than the window mean the rate was not kept.
    achieved = sent / max(plan.duration_s, last_sent_s)

    return LoadResult(
        plan=plan, histograms=histograms, series=series,
        status_counts={op: dict(c) for op, c in status_counts.items()},
        wrong_location=sum(r.wrong_location for r in results),
        wrong_examples=[e for r in results for e in r.wrong_examples][:WRONG_EXAMPLES],
        planned=planned, sent=sent, unsent=sum(r.unsent for r in results),
        achieved_rate=achieved, send_lag=send_lag, timer_lag=timer_lag,
        generator_cpu_share=max((r.cpu_share for r in results), default=0.0),
    )


def _second(t: int, histogram: LatencyHistogram | None, errors: int) -> SecondStats:
    if histogram is None or histogram.count == 0:
        return SecondStats(t, 0, errors, None, None)
    p50_us, p99_us = histogram.percentiles_us(SERIES_PERCENTILES).values()
    return SecondStats(t, histogram.count, errors, p50_us / 1000, p99_us / 1000)


# -- setting up: links to follow ----------------------------------------------


async def create_links(
    target: HttpTarget, count: int, *, seed: int
) -> tuple[BenchLink, ...]:
    """Create ``count`` links through the shortener's API, in rank order.

    Each group of LINKS_PER_SETUP_CLIENT links comes from its own loopback
    source address, so the shortener's per-client create limit is not hit.
    """
    links: list[BenchLink | None] = [None] * count
    groups = list(range(0, count, LINKS_PER_SETUP_CLIENT))
    queue: asyncio.Queue[int] = asyncio.Queue()
    for start in groups:
        queue.put_nowait(start)

    async def creator() -> None:
        while not queue.empty():
            start = queue.get_nowait()
            source = None
            if target.is_ipv4:
                address = SETUP_SOURCE_BASE + start // LINKS_PER_SETUP_CLIENT
                source = (str(ipaddress.IPv4Address(address)), 0)
            connector = aiohttp.TCPConnector(local_addr=source, limit=1)
            async with aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=SETUP_TIMEOUT_S),
            ) as session:
                for rank in range(start, min(start + LINKS_PER_SETUP_CLIENT, count)):
                    links[rank] = await _create_one(session, target, seed, rank)

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(min(SETUP_PARALLEL, len(groups))):
                group.create_task(creator())
    except* (aiohttp.ClientError, OSError, TimeoutError) as failures:
        raise EnvironmentProblem(
            f"cannot create the bench's links at {target.url}: "
            f"{failures.exceptions[0]!r}",
            fix="check that the shortener runs (`dslab lab status`)",
        ) from None
    except* DslabError as failures:
        raise failures.exceptions[0] from None

    return tuple(link for link in links if link is not None)


async def _create_one(
    session: aiohttp.ClientSession, target: HttpTarget, seed: int, rank: int
) -> BenchLink:
    url = f"https://example.com/dslab-bench/{seed}/link-{rank}"
    async with session.post(f"{target.url}/api/links", json={"url": url}) as answer:
        body = await answer.json(content_type=None)
    if answer.status not in CREATED_STATUSES or not isinstance(body, dict):
        raise EnvironmentProblem(
            f"the shortener refused to create a bench link ({answer.status}: "
            f"{body})",
            fix="check the shortener's log; a 429 means its create limit is low",
        )

    return BenchLink(str(body["code"]), str(body["url"]))


# -- the wrk engine (closed loop) ---------------------------------------------

# wrk reports latency quantiles, not its histogram; this many rebuild one.
WRK_QUANTILES = 1000
# wrk's own answer timeout; a slower answer is a wrk "timeout" error.
WRK_TIMEOUT_S = 10
# Beyond the run itself: wrk's start-up and report.
WRK_EXTRA_S = 60.0

_WRK_SCRIPT = """\
local paths = {%(paths)s}
local targets = {%(targets)s}
local check = %(check)s
local n = #paths
local position = 0
statuses = {}
wrong = 0
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  position = math.random(n) - 1
end

function request()
  position = (position %% n) + 1
  return wrk.format("GET", paths[position])
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if check and status >= 300 and status < 400 and not targets[headers["Location"]] then
    wrong = wrong + 1
  end
end

function done(summary, latency, requests)
  io.write(string.format("dslab requests %%d\\n", summary.requests))
  io.write(string.format("dslab duration_us %%d\\n", summary.duration))
  for _, kind in ipairs({"connect", "read", "write", "timeout"}) do
    io.write(string.format("dslab error %%s %%d\\n", kind, summary.errors[kind]))
  end
  for _, thread in ipairs(threads) do
    io.write(string.format("dslab wrong %%d\\n", thread:get("wrong")))
    for status, count in pairs(thread:get("statuses")) do
      io.write(string.format("dslab status %%d %%d\\n", status, count))
    end
  end
  for q = 1, %(quantiles)d do
    local p = q * 100 / %(quantiles)d
    io.write(string.format("dslab q %%.4f %%d\\n", p, latency:percentile(p)))
  end
end
"""


def _lua_string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def wrk_script(plan: LoadPlan) -> str:
    """The Lua script that makes wrk follow the plan's links (or its static path)."""
    if plan.static_path is not None:
        paths = [plan.static_path]
    else:
        paths = [f"/{link.code}" for link in plan.links]
    return _WRK_SCRIPT % {
        "paths": ", ".join(_lua_string(path) for path in paths),
        "targets": ", ".join(f"[{_lua_string(link.url)}] = true"
                             for link in plan.links),
        "check": "false" if plan.static_path is not None else "true",
        "quantiles": WRK_QUANTILES,
    }


def run_wrk(plan: LoadPlan) -> LoadResult:
    """Drive ``wrk`` (closed loop, redirects only) and read its report.

    wrk cannot tell which request an answer belongs to, so the Location check
    is weaker than the python engine's: an answer must lead to *one of* the
    bench's links. The histogram is rebuilt from wrk's quantiles.
    """
    binary = shutil.which("wrk")
    if binary is None:
        raise EnvironmentProblem(
            "--engine wrk needs the wrk program, which is not installed",
            fix="install it (apt-get install wrk) or use --engine python",
        )
    seconds = max(1, round(plan.warmup_s + plan.duration_s))
    with tempfile.TemporaryDirectory(prefix="dslab-wrk-") as folder:
        script = Path(folder) / "bench.lua"
        script.write_text(wrk_script(plan), encoding="utf-8")
        argv = [binary, f"-t{plan.processes}", f"-c{plan.connections}",
                f"-d{seconds}s", f"--timeout={WRK_TIMEOUT_S}s", "-s", str(script),
                plan.target.url]
        log.debug("running %s", " ".join(argv))
        mark_load_started(time.time())
        try:
            done = subprocess.run(argv, capture_output=True, text=True,
                                  timeout=seconds + WRK_EXTRA_S, check=False)
        except subprocess.TimeoutExpired as exc:
            raise EnvironmentProblem(
                f"wrk did not finish within {seconds + WRK_EXTRA_S:g} s",
                fix="lower --connections, or use --engine python",
            ) from exc
    if done.returncode != 0:
        raise EnvironmentProblem(
            f"wrk failed (exit {done.returncode}): {done.stderr.strip()[:300]}",
            fix="run the printed wrk command by hand to see why",
        )

    return parse_wrk_report(plan, done.stdout)


def parse_wrk_report(plan: LoadPlan, report: str) -> LoadResult:
    """Turn the ``dslab ...`` lines of our wrk script's report into a result."""
    requests, duration_us, wrong = 0, 0, 0
    statuses: dict[str, int] = defaultdict(int)
    quantiles: list[int] = []
    for line in report.splitlines():
        words = line.split()
        if len(words) < 3 or words[0] != "dslab":
            continue
        kind, values = words[1], words[2:]
        if kind == "requests":
            requests = int(values[0])
        elif kind == "duration_us":
            duration_us = int(values[0])
        elif kind == "error" and int(values[1]):
            statuses[values[0]] += int(values[1])
        elif kind == "wrong":
            wrong += int(values[0])
        elif kind == "status":
            statuses[values[0]] += int(values[1])
        elif kind == "q":
            quantiles.append(int(values[1]))
    if not quantiles or not duration_us:
        raise EnvironmentProblem(
            "wrk's report has no latency figures (was the script run?)",
            fix="check the wrk version (4.x needed) or use --engine python",
        )

    histogram = LatencyHistogram()
    answered = sum(count for status, count in statuses.items() if status.isdigit())
    good = sum(count for status, count in statuses.items()
               if status.isdigit() and 200 <= int(status) < 400) - wrong
    # Spread the good answers over the quantiles: each stands for an equal share.
    share, extra = divmod(max(good, 0), len(quantiles))
    for index, value_us in enumerate(quantiles):
        count = share + (1 if index < extra else 0)
        if count:
            histogram.record_us(value_us, count)

    return LoadResult(
        plan=plan, histograms={"redirect": histogram}, series={},
        status_counts={"redirect": dict(statuses)}, wrong_location=wrong,
        wrong_examples=[], planned=requests, sent=max(requests, answered), unsent=0,
        achieved_rate=requests / (duration_us / 1e6),
        send_lag=LatencyHistogram(), timer_lag=LatencyHistogram(), engine="wrk",
        open_loop=False,
        notes=[
            "wrk is closed loop: latency runs from each request's actual send, "
            "so a stall hides the requests it delayed (coordinated omission)",
            f"the histogram is rebuilt from wrk's {WRK_QUANTILES} quantiles",
            "wrk checks only that a Location is one of the bench's links",
        ],
    )
