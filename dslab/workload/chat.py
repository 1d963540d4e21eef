"""The chat workload: virtual users over real WebSockets, on a timetable.

``run_chat_load`` connects ``users`` virtual users (each a ``ChatClient``,
which reconnects to the next server and resumes from its last entry ID, and
re-sends unacknowledged messages with the same ``cmid``) to chat servers on
loopback, spreads them over ``rooms`` and over load-generator processes, and
lets each user send ``rate_per_s`` messages a second on a fixed timetable:
user ``u``'s ``k``-th message is due at ``started_at + phase[u] + k / rate``
whatever happened before it, with phases drawn from the seeded RNG.

Latency is measured from that *scheduled* time:

- ``ack``: scheduled -> the acknowledgement (entry ID) arrives at the sender;
- ``deliver``: scheduled -> the message arrives at a member of the room, once
  per member, **the sender included** (its own copy comes back through the
  room like everyone else's, and a sender that misses its own message has
  lost it just as much).

A send that could not go out on time (socket down, generator busy) is still
charged from its schedule. Every message is also recorded for the history
checker (``dslab.workload.checker``): sends with their acks, every delivery,
each user's membership (joined before the first send is due, left after
the drain) and each reconnect gap.

All processes read one ``time.monotonic()`` clock (CLOCK_MONOTONIC is one per
machine), so a delivery measured in one process is compared with a schedule
made in another. The message text is that scheduled time, so anyone reading
the room can see how late each message was.

Limits: every send and delivery is kept in memory until the run ends (about
100 bytes each, ~300 MB for 100,000 deliveries a second for 30 s); the
bounds in ``ChatPlan`` keep a run within what one machine can hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import heapq
import ipaddress
import logging
import math
import random
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from dslab.chaos.journal import APPLIED, HEALED, Journal
from dslab.chat.client import ChatClient, Message, SendRejected, http_url
from dslab.errors import EnvironmentProblem, UsageError
from dslab.redisconn import async_client
from dslab.report.histogram import LatencyHistogram
from dslab.report.runfile import FaultEvent, LatencyRecorder, RunFile, RunMeta
from dslab.settings import RedisTarget
from dslab.workload.checker import (
    Delivery,
    Gap,
    Membership,
    Send,
    Verdict,
    check_history,
)
from dslab.workload.shards import (
    Shard,
    await_all,
    fast_loop,
    run_shard,
    running_shards,
    start_all,
)

log = logging.getLogger(__name__)

# Bounds of one run: past them the history no longer fits comfortably in
# memory on a laptop, or the run is a typo (10h for 10s).
MAX_USERS = 2000
MAX_DURATION_S = 600.0
MAX_PROCESSES = 8
# The server allows 20 sends/s per socket; half of it leaves room for the
# burst of re-sends after a reconnect.
MAX_RATE_PER_USER_S = 10.0
# Up to this many users one process keeps up on this 2-core box (~10,000
# deliveries/s in one room); above it the default is two processes.
ONE_PROCESS_MAX_USERS = 100
# Connecting and joining 2000 users on a loaded 2-core box takes seconds.
READY_TIMEOUT_S = 60.0
# Lets every process receive "start" before the first send is due.
START_DELAY_S = 0.3
# A send not acknowledged by then is an error; longer than any failover
# between chat servers on loopback (reconnect backoff caps at 2 s).
SEND_TIMEOUT_S = 10.0
# After every process has its acks, deliveries may still be on the way
# (a user resuming after a reconnect); past this they count as lost.
DRAIN_TIMEOUT_S = 5.0
# How often each process looks at its sockets to time reconnect gaps.
GAP_POLL_S = 0.02
# The "current p99" of the progress line covers this much recent time.
PROGRESS_WINDOW_S = 1.0
# The Redis floor probe: one XADD -> XREAD round trip this often.
FLOOR_INTERVAL_S = 0.02
# XREAD BLOCK of the floor probe: short, so the probe stops soon after asked.
FLOOR_BLOCK_MS = 200
# The floor probe gets this long to stop before it is abandoned.
FLOOR_STOP_TIMEOUT_S = 5.0
# A server's /metrics, read before and after the load for its CPU, must answer
# within this; one that does not is left out of the CPU figure.
METRICS_TIMEOUT_S = 5.0
# What a server exports (prometheus_client's process collector) for the CPU
# seconds its process has used, and when that process started: a server that
# restarted during the load has a new start time and is left out.
CPU_METRIC = "process_cpu_seconds_total"
START_METRIC = "process_start_time_seconds"

DELIVER = "deliver"
ACK = "ack"
FLOOR = "redis-floor"

# Slots of the shared progress array each process writes.
SENT, ACKED, DELIVERED, ERRORS, RECONNECTS, WINDOW_P99_US = range(6)
PROGRESS_FIELDS = 6

LOOPBACK_NAMES = frozenset({"localhost"})


def require_loopback(url: str) -> str:
    """``url`` itself if its host is on loopback; else ``UsageError`` (exit 2)."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https", "ws", "wss") or not parts.hostname:
        raise UsageError(f"--servers {url!r} is not a chat server URL",
                         fix="write http://127.0.0.1:8100 or ws://127.0.0.1:8100/ws")
    host = parts.hostname
    loopback = host in LOOPBACK_NAMES
    with contextlib.suppress(ValueError):
        loopback = loopback or ipaddress.ip_address(host).is_loopback
    if not loopback:
        raise UsageError(
            f"{url!r} is not on loopback; dslab only loads servers on this machine",
            fix="point --servers at 127.0.0.1 (the lab's chat servers)",
        )

    return url if "://" in url else f"http://{url}"


@dataclass(frozen=True)
class ChatPlan:
    """What to run; checked on construction, so a bad plan never starts."""

    servers: tuple[str, ...]
    users: int
    rooms: int
    rate_per_s: float  # per user
    duration_s: float
    warmup_s: float = 0.0
    seed: int = 0
    processes: int = 1
    # Prefix of the room names: each run gets rooms with no history.
    run_id: str = "bench"

    def __post_init__(self) -> None:
        if not self.servers:
            raise UsageError("no chat server to load",
                             fix="start some with `dslab chat serve -n 2`")
        for url in self.servers:
            require_loopback(url)
        if not 1 <= self.users <= MAX_USERS:
            raise UsageError(f"--users {self.users} is outside 1-{MAX_USERS}")
        if not 1 <= self.rooms <= self.users:
            raise UsageError(f"--rooms {self.rooms} is outside 1-{self.users}",
                             fix="give each room at least one user")
        if not 0 < self.rate_per_s <= MAX_RATE_PER_USER_S:
            raise UsageError(
                f"--rate {self.rate_per_s:g}/s per user is outside "
                f"(0, {MAX_RATE_PER_USER_S:g}/s]",
                fix="the chat server limits each socket to 20 sends/s; add users "
                "for more load",
            )
        if not 0 < self.duration_s <= MAX_DURATION_S:
            raise UsageError(f"--duration {self.duration_s:g} s is outside "
                             f"(0, {MAX_DURATION_S:g}] s")
        if not 0 <= self.warmup_s <= MAX_DURATION_S:
            raise UsageError(f"--warmup {self.warmup_s:g} s is outside "
                             f"0-{MAX_DURATION_S:g} s")
        if not 1 <= self.processes <= min(MAX_PROCESSES, self.users):
            raise UsageError(
                f"--processes {self.processes} is outside "
                f"1-{min(MAX_PROCESSES, self.users)}",
                fix="use at most one process per user and at most "
                f"{MAX_PROCESSES}",
            )

    @staticmethod
    def default_processes(users: int) -> int:
        return 1 if users <= ONE_PROCESS_MAX_USERS else 2

    def user_name(self, user: int) -> str:
        return f"u{user}"

    def room_of(self, user: int) -> str:
        return f"{self.run_id}-r{user % self.rooms}"

    def members(self, room: str) -> int:
        index = int(room.rpartition("-r")[2])
        return len(range(index, self.users, self.rooms))

    def phases(self) -> list[float]:
        """Each user's offset into the first period; the same in every process."""
        rng = random.Random(f"{self.seed}:phases")
        return [rng.uniform(0.0, 1.0 / self.rate_per_s) for _ in range(self.users)]

    def sends_of(self, phase: float) -> int:
        """How many messages a user with ``phase`` sends in warmup + duration."""
        window_s = self.warmup_s + self.duration_s
        return max(0, math.ceil((window_s - phase) * self.rate_per_s - 1e-9))


# -- one load-generator process ----------------------------------------------


@dataclass
class ShardResult:
    """What one process saw, as plain tuples (cheap to pickle)."""

    # (room, sender, cmid, intended_at, entry_id or None, acked_at or None)
    sends: list[tuple[str, str, str, float, str | None, float | None]]
    # (room, user, entry_id, cmid, received_at)
    deliveries: list[tuple[str, str, str, str, float]]
    # (room, user, joined_at, left_at)
    memberships: list[tuple[str, str, float, float]]
    # (room, user, disconnected_at, reconnected_at)
    gaps: list[tuple[str, str, float, float]]
    reconnects: int
    send_lag: str  # encoded histogram: how late the generator itself sent
    cpu_s: float = 0.0  # this process's CPU seconds while it sent its timetable


class _User:
    """One virtual user: its client and what it saw."""

    def __init__(self, plan: ChatPlan, index: int, shard: _Shard) -> None:
        self.name = plan.user_name(index)
        self.room = plan.room_of(index)
        self.received = 0
        self.joined_at: float | None = None
        self.away_since: float | None = None
        self.client = ChatClient(
            plan.servers, self.room, self.name, keep=False,
            on_message=self._received, start_index=index,
        )
        self._shard = shard

    def _received(self, message: Message) -> None:
        self.received += 1
        self._shard.delivered(self, message)


class _Shard:
    """The users of one process, their timetable, and their history."""

    def __init__(self, plan: ChatPlan, shard: int, progress: Any) -> None:
        self.plan = plan
        self.progress = progress
        self.users = [_User(plan, i, self) for i in range(plan.users)
                      if i % plan.processes == shard]
        phases = plan.phases()
        self.phases = {user.name: phases[i] for i, user in
                       zip(range(shard, plan.users, plan.processes), self.users,
                           strict=True)}
        self.sends: list[tuple[str, str, str, float, str | None, float | None]] = []
        self.deliveries: list[tuple[str, str, str, str, float]] = []
        self.gaps: list[tuple[str, str, float, float]] = []
        self.send_lag = LatencyHistogram()
        self.delivered_count = 0
        # Latencies (s) of the current progress window: a list append per
        # delivery is the cheapest record; the window's p99 is computed once.
        self.window: list[float] = []
        self.window_started = time.monotonic()

    def delivered(self, user: _User, message: Message) -> None:
        """Runs for every delivery (10,000s a second): kept to the minimum.
        Counters reach the shared progress array in ``watch_once``."""
        now = time.monotonic()
        self.deliveries.append((message.room, user.name, message.entry_id,
                                message.cmid, now))
        self.delivered_count += 1
        # A bare try costs nothing; contextlib.suppress is an object per call.
        try:  # noqa: SIM105
            self.window.append(now - float(message.text))
        except ValueError:
            pass
        if now - self.window_started >= PROGRESS_WINDOW_S:
            self._publish_window(now)

    def _publish_window(self, now: float) -> None:
        # The history grows by 10,000s of objects a second and a full garbage
        # collection walks all of it: measured pauses of 100-300 ms, charged
        # to whichever deliveries were waiting. Frozen objects are never
        # walked again; cyclic garbage is caught young, long before this.
        gc.freeze()
        window = sorted(self.window)
        if window:
            p99_s = window[min(len(window) - 1, int(len(window) * 0.99))]
            self.progress[WINDOW_P99_US] = max(0, round(p99_s * 1e6))
        self.window = []
        self.window_started = now

    async def connect(self) -> None:
        for user in self.users:
            await user.client.__aenter__()
        async with asyncio.timeout(READY_TIMEOUT_S):
            for user in self.users:
                await user.client.joined.wait()
                user.joined_at = time.monotonic()
        gc.freeze()  # the clients and sockets: alive for the whole run

    async def close(self) -> None:
        for user in self.users:
            await user.client.close()

    async def run(self, started_at: float) -> None:
        """Send every message of the timetable, each in its own task."""
        timetable = [(started_at + self.phases[u.name], 0, n)
                     for n, u in enumerate(self.users)]
        heapq.heapify(timetable)
        async with asyncio.TaskGroup() as group:
            watcher = group.create_task(self._watch_gaps())
            in_flight: set[asyncio.Task[None]] = set()
            while timetable:
                intended_at, k, n = timetable[0]
                delay_s = intended_at - time.monotonic()
                if delay_s > 0:
                    await asyncio.sleep(delay_s)
                heapq.heappop(timetable)
                user = self.users[n]
                lag_s = time.monotonic() - intended_at
                self.send_lag.record_us(max(0, round(lag_s * 1e6)))
                send = group.create_task(self._send(user, k, intended_at))
                in_flight.add(send)
                send.add_done_callback(in_flight.discard)
                if k + 1 < self.plan.sends_of(self.phases[user.name]):
                    heapq.heappush(timetable, (
                        started_at + self.phases[user.name]
                        + (k + 1) / self.plan.rate_per_s, k + 1, n))
            while in_flight:
                await asyncio.wait(set(in_flight))
            # The watcher never ends on its own; drain() takes over its job.
            watcher.cancel()

    async def _send(self, user: _User, k: int, intended_at: float) -> None:
        cmid = f"{user.name}.{k}"
        self.progress[SENT] += 1
        try:
            ack = await user.client.send(repr(intended_at), cmid,
                                         timeout_s=SEND_TIMEOUT_S)
        except (TimeoutError, SendRejected) as exc:
            log.debug("send failed: %s %s", cmid, exc)
            self.progress[ERRORS] += 1
            self.sends.append((user.room, user.name, cmid, intended_at, None, None))
            return
        self.progress[ACKED] += 1
        self.sends.append((user.room, user.name, cmid, intended_at, ack.entry_id,
                           time.monotonic()))

    async def _watch_gaps(self) -> None:
        """Time each user's disconnections by looking at its sockets often."""
        while True:
            await asyncio.sleep(GAP_POLL_S)
            self.watch_once()

    def watch_once(self) -> None:
        now = time.monotonic()
        reconnects = 0
        for user in self.users:
            joined = user.client.joined.is_set()
            if not joined and user.away_since is None:
                user.away_since = now
            elif joined and user.away_since is not None:
                self.gaps.append((user.room, user.name, user.away_since, now))
                user.away_since = None
            reconnects += max(0, user.client.joins - 1)
        self.progress[RECONNECTS] = reconnects
        self.progress[DELIVERED] = self.delivered_count

    def acked_per_room(self) -> dict[str, int]:
        acked: dict[str, int] = defaultdict(int)
        for room, *_, entry_id, _ in self.sends:
            if entry_id is not None:
                acked[room] += 1
        return dict(acked)

    async def drain(self, expected: dict[str, int]) -> float:
        """Wait until every user has the messages acked in its room (or the
        timeout); return the time everyone left."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while time.monotonic() < deadline:
            self.watch_once()
            if all(u.received >= expected.get(u.room, 0) for u in self.users):
                break
            await asyncio.sleep(GAP_POLL_S)
        self.watch_once()
        left_at = time.monotonic()
        for user in self.users:
            if user.away_since is not None:  # still away at the end
                self.gaps.append((user.room, user.name, user.away_since, left_at))

        return left_at

    def result(self, left_at: float, cpu_s: float) -> ShardResult:
        return ShardResult(
            sends=self.sends, deliveries=self.deliveries,
            memberships=[(u.room, u.name, u.joined_at or left_at, left_at)
                         for u in self.users],
            gaps=self.gaps,
            reconnects=sum(max(0, u.client.joins - 1) for u in self.users),
            send_lag=self.send_lag.encode(), cpu_s=cpu_s,
        )


def _shard_process(plan: ChatPlan, shard: int, channel: Connection,
                   progress: Any) -> None:
    """Entry point of a load-generator process: join, wait, send, drain, report.

    On uvloop: a shard's work is receiving (every member gets every message),
    and uvloop's C sockets and polling cost less per delivery than select()'s
    microsecond timers gain (measured in docs/performance.md).
    """
    run_shard(_shard_main(plan, shard, channel, progress), channel, fast_loop)


async def _shard_main(plan: ChatPlan, shard: int, channel: Connection,
                      progress: Any) -> ShardResult | None:
    users = _Shard(plan, shard, progress)
    try:
        try:
            await users.connect()
        except TimeoutError:
            raise EnvironmentProblem(
                f"{len(users.users)} users could not all join within "
                f"{READY_TIMEOUT_S:g} s",
                fix="check that the chat servers run (`dslab lab status`)",
            ) from None
        channel.send(("ready", None))
        message, started_at = await asyncio.to_thread(channel.recv)
        if message != "start":
            return None
        cpu_began = time.process_time()
        await users.run(float(started_at))
        cpu_s = time.process_time() - cpu_began
        channel.send(("sent", users.acked_per_room()))
        message, expected = await asyncio.to_thread(channel.recv)
        if message != "drain":
            return None
        left_at = await users.drain(expected)
    finally:
        await users.close()

    return users.result(left_at, cpu_s)


# -- the Redis floor: the same clock, no chat server ---------------------------


async def probe_floor(target: RedisTarget, key: str, started_at: float,
                      samples: list[tuple[float, float]], stop: asyncio.Event,
                      ) -> None:
    """XADD on a timetable and XREAD BLOCK on another connection until ``stop``.

    Appends ``(sent_at, read_at)`` for each round trip, timed from the XADD
    call: the latency floor of any design that goes through Redis, measured
    beside the chat run on the same machine. It ends by itself once ``stop``
    is set rather than by cancellation: a redis-py read cancelled mid-reply
    can leave its connection unable to close.
    """
    writer, reader = async_client(target), async_client(target)
    try:
        async with asyncio.TaskGroup() as probes:
            probes.create_task(_read_floor(reader, key, samples, stop))
            k = 0
            while not stop.is_set():
                intended_at = started_at + k * FLOOR_INTERVAL_S
                delay_s = intended_at - time.monotonic()
                if delay_s > 0:
                    await asyncio.sleep(delay_s)
                # The floor is the round trip itself, so it starts at the
                # XADD, not at the timetable: the probe's own lateness is not
                # Redis's.
                await _xadd(writer, key, time.monotonic())
                k += 1
    finally:
        with contextlib.suppress(Exception):
            await writer.delete(key)
        await writer.aclose()
        await reader.aclose()


async def _read_floor(reader: Any, key: str, samples: list[tuple[float, float]],
                      stop: asyncio.Event) -> None:
    last_id = "$"
    while not stop.is_set():
        for entry_id, intended_at in await _xread(reader, key, last_id):
            samples.append((intended_at, time.monotonic()))
            last_id = entry_id


async def _xadd(client: Any, key: str, intended_at: float) -> None:
    await client.xadd(key, {"t": repr(intended_at)}, maxlen=1000, approximate=True)


async def _xread(client: Any, key: str, last_id: str) -> list[tuple[str, float]]:
    answer = await client.xread({key: last_id}, block=FLOOR_BLOCK_MS,
                                count=100)
    found: list[tuple[str, float]] = []
    for _, entries in answer or []:
        for entry_id, fields in entries:
            found.append((str(entry_id), float(fields["t"])))
    return found


# -- the parent: spawn, start, watch, merge -----------------------------------


@dataclass(frozen=True)
class Progress:
    """Counters of all processes so far, for the live display."""

    elapsed_s: float
    sent: int
    acked: int
    delivered: int
    errors: int
    reconnects: int
    p99_ms: float


@dataclass(frozen=True)
class CpuUse:
    """CPU seconds used while the load ran: from its start until every send
    was answered (``window_s``)."""

    window_s: float
    generator_s: float  # every load-generator process, the parent included
    servers_s: float | None  # the servers', from their /metrics; None: none said
    servers_measured: int  # how many servers' figures are in ``servers_s``
    servers_total: int

    def cores(self, seconds: float) -> float:
        """CPU seconds as cores' worth over the window."""
        return seconds / max(self.window_s, 1e-9)

    def to_dict(self) -> dict[str, Any]:
        servers = self.servers_s
        return {
            "window_s": round(self.window_s, 3),
            "generator_s": round(self.generator_s, 3),
            "generator_cores": round(self.cores(self.generator_s), 3),
            "servers_s": None if servers is None else round(servers, 3),
            "servers_cores": None if servers is None else round(self.cores(servers), 3),
            "servers_measured": self.servers_measured,
            "servers_total": self.servers_total,
        }


@dataclass
class ChatResult:
    """The merged measurements and the checker's verdict of one run."""

    plan: ChatPlan
    recorder: LatencyRecorder
    verdict: Verdict
    sends: int
    deliveries: int
    reconnects: int
    gaps: int
    send_lag: LatencyHistogram
    measured_from: float  # time.monotonic() when the measured window began
    wall_measured_from: float  # the same instant in time.time()
    wall_ended: float
    cpu: CpuUse | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def generator_late(self) -> bool:
        """The generator's own timers ran >10 ms late at p99: it was saturated."""
        return self.send_lag.percentile_us(99.0) > 10_000

    def run_file(self, meta: RunMeta, faults: Sequence[FaultEvent] = ()) -> RunFile:
        verdict = self.verdict.to_dict()
        verdict["reconnects"] = self.reconnects
        verdict["send_lag_p99_ms"] = self.send_lag.percentile_us(99.0) / 1000
        verdict["generator_saturated"] = self.generator_late
        if self.cpu is not None:
            verdict["cpu"] = self.cpu.to_dict()
        return RunFile.from_recorder(meta, self.recorder, faults=list(faults),
                                     verdict=verdict)


async def run_chat_load(
    plan: ChatPlan,
    on_progress: Callable[[Progress], None] | None = None,
    *,
    floor: RedisTarget | None = None,
) -> ChatResult:
    """Run ``plan`` in ``plan.processes`` processes; merge and check the history.

    With ``floor``, a Redis XADD -> XREAD round trip is measured on that Redis
    during the run, as operation ``redis-floor``.
    """
    floor_samples: list[tuple[float, float]] = []
    fix = "check that the chat servers run (`dslab lab status`); lower --users"
    async with running_shards(
        _shard_process, lambda shard: (plan, shard), plan.processes,
        name="dslab-chat-load", progress_fields=PROGRESS_FIELDS,
    ) as shards:
        await await_all(shards, "ready", time.monotonic() + READY_TIMEOUT_S + 10,
                        what="chat load generator", fix=fix)
        servers_cpu_before = await read_servers_cpu(plan.servers)
        own_cpu_before = time.process_time()
        wall_started = time.time() + START_DELAY_S
        started_at = start_all(shards, START_DELAY_S)
        log.debug("chat load started: %d users at %g/s", plan.users, plan.rate_per_s)

        def tick(now: float) -> None:
            if on_progress is not None:
                on_progress(progress_of(shards, now - started_at))

        stop_floor = asyncio.Event()
        prober = (asyncio.create_task(probe_floor(
            floor, f"dslab:bench:{{{plan.run_id}}}:floor", started_at,
            floor_samples, stop_floor)) if floor is not None else None)
        try:
            ends = started_at + plan.warmup_s + plan.duration_s + SEND_TIMEOUT_S + 30
            await await_all(shards, "sent", ends, what="chat load generator",
                            fix=fix, on_tick=tick)
            window_s = time.monotonic() - started_at
            own_cpu_s = time.process_time() - own_cpu_before
            servers_cpu_after = await read_servers_cpu(plan.servers)
            totals: dict[str, int] = defaultdict(int)
            for shard in shards:
                for room, count in shard.answer.items():
                    totals[room] += count
            for shard in shards:
                shard.channel.send(("drain", dict(totals)))
            await await_all(shards, "done", time.monotonic() + DRAIN_TIMEOUT_S + 60,
                            what="chat load generator", fix=fix, on_tick=tick)
        finally:
            floor_problem = await _stop(prober, stop_floor)

    measured_from = started_at + plan.warmup_s
    result = _merge(plan, [shard.answer for shard in shards], measured_from,
                    wall_started + plan.warmup_s, floor_samples)
    if floor_problem:
        result.notes.append(f"the Redis floor could not be measured: {floor_problem}")
    used = {url: after.cpu_s - servers_cpu_before[url].cpu_s
            for url, after in servers_cpu_after.items()
            if url in servers_cpu_before
            and after.started_at == servers_cpu_before[url].started_at}
    result.cpu = CpuUse(
        window_s=window_s,
        generator_s=own_cpu_s + sum(shard.answer.cpu_s for shard in shards),
        servers_s=sum(used.values()) if used else None,
        servers_measured=len(used), servers_total=len(plan.servers),
    )
    if len(used) < len(plan.servers):
        result.notes.append(
            f"CPU is known for {len(used)} of {len(plan.servers)} chat servers: "
            f"the others did not answer /metrics with {CPU_METRIC} before and "
            "after the load, or restarted during it")

    return result


@dataclass(frozen=True)
class ProcessCpu:
    """A server process's CPU seconds so far, and when it started (epoch s)."""

    cpu_s: float
    started_at: float


async def read_servers_cpu(servers: Sequence[str]) -> dict[str, ProcessCpu]:
    """Each server's process CPU so far, from its /metrics; a server that
    does not export it (or does not answer) is left out. Servers that share
    one process (tests) each report that whole process."""
    timeout = aiohttp.ClientTimeout(total=METRICS_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        answers = await asyncio.gather(*(_server_cpu(session, url)
                                         for url in servers))
    return {url: cpu for url, cpu in zip(servers, answers, strict=True)
            if cpu is not None}


async def _server_cpu(session: aiohttp.ClientSession,
                      url: str) -> ProcessCpu | None:
    try:
        async with session.get(http_url(url) + "/metrics") as answer:
            if answer.status != 200:
                return None
            text = await answer.text()
        values = {sample.name: float(sample.value)
                  for family in text_string_to_metric_families(text)
                  for sample in family.samples
                  if sample.name in (CPU_METRIC, START_METRIC)}
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        log.debug("no CPU figure from %s: %r", url, exc)
        return None
    if len(values) < 2:
        return None
    return ProcessCpu(values[CPU_METRIC], values[START_METRIC])


async def _stop(prober: asyncio.Task[None] | None,
                stop: asyncio.Event) -> str | None:
    """Ask the floor probe to stop and wait for it; say why if it failed."""
    if prober is None:
        return None
    stop.set()
    try:
        async with asyncio.timeout(FLOOR_STOP_TIMEOUT_S):
            await asyncio.wait([prober])
    except TimeoutError:
        prober.cancel()
        return f"it did not stop within {FLOOR_STOP_TIMEOUT_S:g} s"
    if prober.cancelled():
        return "it was cancelled"
    problem = prober.exception()
    if problem is not None:  # a broken probe must not spoil the chat run
        log.debug("floor probe failed: %r", problem)
        return f"{type(problem).__name__}: {problem}"
    return None


def progress_of(shards: Sequence[Shard], elapsed_s: float) -> Progress:
    def total(slot: int) -> int:
        return sum(int(s.progress[slot]) for s in shards)

    p99_us = max((int(s.progress[WINDOW_P99_US]) for s in shards), default=0)
    return Progress(elapsed_s, total(SENT), total(ACKED), total(DELIVERED),
                    total(ERRORS), total(RECONNECTS), p99_us / 1000)


def _merge(
    plan: ChatPlan, results: list[ShardResult], measured_from: float,
    wall_measured_from: float, floor_samples: list[tuple[float, float]],
) -> ChatResult:
    sends = [Send(room, sender, cmid, intended, entry_id is not None, entry_id,
                  acked_at)
             for r in results for room, sender, cmid, intended, entry_id, acked_at
             in r.sends]
    deliveries = [Delivery(*d) for r in results for d in r.deliveries]
    memberships = [Membership(*m) for r in results for m in r.memberships]
    gaps = [Gap(*g) for r in results for g in r.gaps]
    verdict = check_history(sends, deliveries, memberships, gaps)

    recorder = LatencyRecorder(measured_from)
    intended_of = {(s.room, s.client_msg_id): s.intended_at for s in sends}
    recipients: dict[tuple[str, str], set[str]] = defaultdict(set)
    for d in deliveries:
        intended = intended_of.get((d.room, d.client_msg_id))
        if intended is None or intended < measured_from:
            continue
        if d.user not in recipients[(d.room, d.client_msg_id)]:
            recipients[(d.room, d.client_msg_id)].add(d.user)
            recorder.record(DELIVER, intended, d.received_at)
    for s in sends:
        if s.intended_at < measured_from:
            continue
        if s.acked_at is None:
            # An unacknowledged send is the sender's error; whoever got it
            # anyway was recorded above, and nobody had to get it.
            recorder.record_error(ACK, s.intended_at)
            continue
        recorder.record(ACK, s.intended_at, s.acked_at)
        missing = plan.members(s.room) - len(recipients[(s.room, s.client_msg_id)])
        for _ in range(max(0, missing)):
            recorder.record_error(DELIVER, s.intended_at)
    for intended, read_at in floor_samples:
        if intended >= measured_from:
            recorder.record(FLOOR, intended, read_at)

    send_lag = LatencyHistogram()
    for r in results:
        send_lag.add(LatencyHistogram.decode(r.send_lag))
    result = ChatResult(
        plan=plan, recorder=recorder, verdict=verdict, sends=len(sends),
        deliveries=len(deliveries), reconnects=sum(r.reconnects for r in results),
        gaps=len(gaps), send_lag=send_lag, measured_from=measured_from,
        wall_measured_from=wall_measured_from, wall_ended=time.time(),
    )
    if result.generator_late:
        result.notes.append(
            f"the load generator sent late (p99 "
            f"{send_lag.percentile_us(99.0) / 1000:.1f} ms behind its timetable): "
            "it, not the chat servers, may be the bottleneck; add --processes")

    return result


def journal_faults(home: Path, wall_from: float, wall_to: float) -> list[FaultEvent]:
    """Faults the lab's journal recorded between ``wall_from`` and ``wall_to``
    (time.time()), as the run file's timeline: ``at`` from ``wall_from``."""
    journal = Journal(home)
    targets = {fault.id: fault.target for fault in journal.faults()}
    timeline: list[FaultEvent] = []
    for event in journal.events():
        with contextlib.suppress(KeyError, TypeError, ValueError):
            if event["event"] == APPLIED:
                at = float(event["started_at"])
                action, target = str(event["kind"]), str(event["target"])
                detail = str((event.get("params") or {}).get("summary", ""))
            elif event["event"] == HEALED:
                at = float(event["at"])
                action, target = "heal", targets.get(str(event["id"]), "")
                detail = str(event.get("outcome", ""))
            else:
                continue
            if wall_from <= at <= wall_to:
                timeline.append(FaultEvent(round(at - wall_from, 3), action,
                                           target, detail))

    return sorted(timeline, key=lambda f: f.at)
