"""The fault proxy: a TCP proxy in front of a node that breaks the link on demand.

A client connects to the proxy instead of the node; the proxy forwards bytes
both ways and applies the faults set for each direction (``upstream`` is
client -> node, ``downstream`` is node -> client): latency with jitter, a
bandwidth limit, blackhole, reset and close-after-N-bytes. It needs no
privileges, which is why it is the fallback where the kernel lacks netem.

Guarantees:

- latency, jitter and the bandwidth limit delay bytes but never reorder, drop
  or duplicate them within a connection: every connection has one FIFO queue
  per direction and a chunk leaves only after the one before it;
- a blackhole holds bytes, it does not drop them: when it is cleared, held
  bytes flow on in order, as TCP would deliver them after a healed partition;
- a change of faults reaches live connections at once (queued chunks are
  re-timed, blackholes and resets take effect on the next step);
- which connections a fault hits (``probability``) is decided per connection
  and direction by an RNG seeded in the constructor, in accept order, so the
  same seed and the same order of connections hit the same connections;
- a *cut* black-holes everything from a set of source addresses, as a dead
  switch port between two hosts would: new connections from a cut source are
  accepted and held without connecting upstream, live ones stop relaying in
  both directions with their bytes held, and all of them carry on when the
  cut is removed. Cuts are named (a partition's fault id), so two partitions
  that cut the same source compose, and setting or removing one twice is the
  same as once. Other sources pass untouched.

A separate process changes faults through a small HTTP control API
(``GET/PUT/DELETE /faults``, ``GET /cuts``, ``PUT/DELETE /cuts/{name}``,
``GET /stats``); ``ProxyControl`` is its blocking client. Run it detached with::

    python -m dslab.chaos.proxy --listen 127.0.0.1:0 \\
        --upstream 127.0.0.1:6379 --control 127.0.0.1:0

which prints one JSON line with the actual ports when it is ready and exits
cleanly on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import os
import random
import signal
import socket
import struct
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from types import TracebackType
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from dslab.errors import DslabError, EnvironmentProblem, UsageError

log = logging.getLogger(__name__)

# One read from a socket; large enough for throughput, small enough that
# jitter and the bandwidth limit act at a fine grain.
CHUNK_BYTES = 64 * 1024
# Chunks queued per connection and direction before the proxy stops reading:
# bounds memory (4 MiB) and passes back-pressure on to the sender.
QUEUE_CHUNKS = 64
# The bandwidth limit allows bursts of this much time's worth of bytes, so a
# slow rate still moves data in small, regular steps.
BURST_S = 0.05
# Each write under the limit is this fraction of a burst: the bucket keeps
# room for the rest, so a wake-up that comes late (a busy machine) finds the
# tokens it missed still there instead of losing them to the bucket's cap.
STEP_OF_BURST = 4
# A node that does not accept within this time counts as down: the client's
# connection is reset, as it would be by the node itself.
UPSTREAM_CONNECT_TIMEOUT_S = 2.0
# A closing connection may flush its last bytes for this long; a peer that
# reads nothing would otherwise keep the proxy's close waiting forever.
CLOSE_TIMEOUT_S = 1.0
# The control client gives up after this long; the API answers in
# milliseconds, so longer means the proxy process is stuck or gone.
CONTROL_TIMEOUT_S = 5.0
# The key in a PUT body that sets both directions at once.
BOTH = "both"
# Cut names travel in URL paths (/cuts/f3): short, and nothing to escape.
CUT_NAME_MAX_CHARS = 64
_CUT_NAME_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-"
)


class ProxyUnreachable(EnvironmentProblem):
    """The proxy's control API did not answer."""


class Direction(StrEnum):
    UPSTREAM = "upstream"  # client -> node
    DOWNSTREAM = "downstream"  # node -> client


@dataclass(frozen=True)
class Faults:
    """The faults of one direction; the default value is a healthy link.

    ``probability`` is the share of connections the faults hit (decided once
    per connection); jitter spreads the latency uniformly over
    ``latency_ms +/- jitter_ms``, never below zero.
    """

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    bandwidth_bytes_per_s: int | None = None
    blackhole: bool = False
    reset: bool = False
    close_after_bytes: int | None = None
    probability: float = 1.0

    def __post_init__(self) -> None:
        for name in ("latency_ms", "jitter_ms"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise UsageError(
                    f"fault {name}={value!r} must be a finite number >= 0",
                    fix="give milliseconds such as 150",
                )
        if self.bandwidth_bytes_per_s is not None and self.bandwidth_bytes_per_s < 1:
            raise UsageError(
                f"fault bandwidth_bytes_per_s={self.bandwidth_bytes_per_s} "
                "must be at least 1",
                fix="give bytes per second such as 125000 (1 Mbit/s), or none",
            )
        if self.close_after_bytes is not None and self.close_after_bytes < 0:
            raise UsageError(
                f"fault close_after_bytes={self.close_after_bytes} is negative",
                fix="give a byte count such as 1024, or none",
            )
        if not 0.0 <= self.probability <= 1.0:
            raise UsageError(
                f"fault probability={self.probability!r} is outside 0..1",
                fix="give a share of connections such as 0.5",
            )

    def delay_s(self, spread: float) -> float:
        """The delay of a chunk whose jitter draw is ``spread`` (0..1)."""
        delay_ms = self.latency_ms + self.jitter_ms * (2.0 * spread - 1.0)
        return max(0.0, delay_ms) / 1000.0

    def describe(self) -> str:
        changed = [
            f"{name}={value}"
            for name, value in self.to_dict().items()
            if value != getattr(HEALTHY, name)
        ]
        return " ".join(changed) or "none"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> Faults:
        """Faults from JSON-like data; unknown keys and wrong types are refused."""
        if not isinstance(data, Mapping):
            raise UsageError(
                f"faults must be a JSON object, not {data!r}",
                fix='send for example {"latency_ms": 100}',
            )
        known = {item.name: item for item in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise UsageError(
                f"unknown fault(s) {', '.join(map(str, unknown))}",
                fix=f"use {', '.join(known)}",
            )
        values: dict[str, Any] = {}
        for name, value in data.items():
            values[name] = _checked_field(name, value)

        return cls(**values)


HEALTHY = Faults()

_BOOL_FIELDS = {"blackhole", "reset"}
_OPTIONAL_INT_FIELDS = {"bandwidth_bytes_per_s", "close_after_bytes"}


def _checked_field(name: str, value: object) -> object:
    if name in _BOOL_FIELDS:
        if not isinstance(value, bool):
            raise UsageError(f"fault {name}={value!r} must be true or false")
        return value
    if name in _OPTIONAL_INT_FIELDS:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"fault {name}={value!r} must be a whole number")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UsageError(f"fault {name}={value!r} must be a number")
    return float(value)


def parse_directions(name: Direction | str | None) -> tuple[Direction, ...]:
    """``None`` or ``"both"`` name both directions; otherwise exactly one."""
    if name is None or name == BOTH:
        return tuple(Direction)
    try:
        return (Direction(name),)
    except ValueError:
        raise UsageError(
            f"unknown direction {name!r}",
            fix="use upstream (client -> node), downstream (node -> client) or both",
        ) from None


@dataclass
class ProxyStats:
    """Counters since the proxy started; bytes are bytes forwarded."""

    connections_total: int = 0
    connections_active: int = 0
    bytes_upstream: int = 0
    bytes_downstream: int = 0
    resets: int = 0
    closed_after_bytes: int = 0

    def count_bytes(self, direction: Direction, size: int) -> None:
        if direction is Direction.UPSTREAM:
            self.bytes_upstream += size
        else:
            self.bytes_downstream += size

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProxyStats:
        names = {item.name for item in fields(cls)}
        return cls(**{key: int(value) for key, value in data.items() if key in names})


def parse_address(text: str, *, what: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as a (host, port) pair."""
    host, colon, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not colon or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise UsageError(
            f"{what} address {text!r} is not HOST:PORT",
            fix=f"give for example --{what} 127.0.0.1:6379",
        )
    return host, int(port_text)


def check_cut_name(name: str) -> str:
    """A cut's name as the control API takes it; refused when it is not."""
    if not name or len(name) > CUT_NAME_MAX_CHARS or set(name) - _CUT_NAME_CHARS:
        raise UsageError(
            f"cut name {name!r} must be 1-{CUT_NAME_MAX_CHARS} letters, digits, "
            "'_', '.' or '-'",
            fix="name a cut after its fault, for example f3",
        )
    return name


def check_sources(sources: object) -> frozenset[str]:
    """Source addresses of a cut, normalised (``127.0.0.011`` is refused)."""
    if isinstance(sources, str) or not isinstance(sources, Iterable):
        raise UsageError(
            f"cut sources must be a list of IP addresses, not {sources!r}",
            fix='send for example {"sources": ["127.0.0.11"]}',
        )
    checked = set()
    for source in sources:
        try:
            checked.add(str(ipaddress.ip_address(str(source))))
        except ValueError:
            raise UsageError(
                f"cut source {source!r} is not an IP address",
                fix="give the address a node connects from, e.g. 127.0.0.11",
            ) from None
    return frozenset(checked)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_loopback(host: str, *, what: str, allowed: bool) -> None:
    """Refuse to listen beyond this machine unless the caller allowed it."""
    if allowed or is_loopback(host):
        return
    raise UsageError(
        f"refusing to listen for the {what} on {host!r}, which is not loopback",
        fix="listen on 127.0.0.1, or pass --allow-non-loopback if you really "
        "mean to expose a fault proxy to the network",
    )


def _abort_with_reset(writer: asyncio.StreamWriter) -> None:
    """Close at once with RST (SO_LINGER 0), as a crashed or hostile peer would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
    writer.transport.abort()


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close with FIN; a peer that does not read its last bytes gets RST."""
    writer.close()
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await writer.wait_closed()
    except TimeoutError:
        _abort_with_reset(writer)
    except OSError:
        pass


class _LinkClosed(Exception):
    """Raised inside a link to end it on purpose (close_after_bytes)."""


@dataclass
class _Chunk:
    arrived: float  # loop time at which the proxy read it
    spread: float  # this chunk's jitter draw, 0..1
    data: bytes


@dataclass
class _TokenBucket:
    """Bandwidth limit for one direction of one link; full at the start."""

    rate: int = 0
    tokens: float = 0.0
    updated: float = 0.0

    def burst(self, rate: int) -> int:
        return max(1, int(rate * BURST_S))

    def step(self, rate: int) -> int:
        return max(1, self.burst(rate) // STEP_OF_BURST)

    def take(self, rate: int, want: int, now: float) -> tuple[int, float]:
        """Grant up to one step of ``want`` bytes at ``now``: (bytes, 0.0), or
        (0, seconds until that step's tokens are there)."""
        size = min(want, self.step(rate))
        self.refill(rate, now)
        missing = size - self.tokens
        if missing > 1e-6:  # not a rounding error's worth short
            return 0, missing / rate
        self.tokens -= size
        return size, 0.0

    def refill(self, rate: int, now: float) -> None:
        if rate != self.rate:
            self.rate, self.tokens = rate, float(self.burst(rate))
        else:
            elapsed = now - self.updated
            self.tokens = min(float(self.burst(rate)), self.tokens + elapsed * rate)
        self.updated = now


@dataclass(eq=False)  # links are kept in a set, by identity
class _Link:
    """One proxied connection: a client and its connection to the node."""

    number: int
    client: asyncio.StreamWriter
    source: str  # the client's IP address, what cuts match
    # One draw per direction: the faults hit this link when draw < probability.
    draws: dict[Direction, float]
    rng: random.Random
    node: asyncio.StreamWriter | None = None
    task: asyncio.Task[None] | None = None
    sent: dict[Direction, int] = field(
        default_factory=lambda: dict.fromkeys(Direction, 0)
    )
    aborted: bool = False

    def abort(self) -> None:
        if self.aborted:
            return
        self.aborted = True
        for writer in (self.client, self.node):
            if writer is not None:
                _abort_with_reset(writer)


class FaultProxy:
    """Forwards one loopback port to ``upstream`` and injects faults.

    Use it as an async context manager, or call ``start`` and ``stop``.
    ``set_faults`` and ``clear`` must be called from the proxy's event loop.
    """

    def __init__(
        self,
        upstream: tuple[str, int],
        *,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        seed: int = 0,
        allow_non_loopback: bool = False,
    ) -> None:
        require_loopback(listen[0], what="proxy", allowed=allow_non_loopback)
        self.upstream = upstream
        self.listen = listen
        self.seed = seed
        self.stats = ProxyStats()
        self._faults: dict[Direction, Faults] = dict.fromkeys(Direction, HEALTHY)
        self._cuts: dict[str, frozenset[str]] = {}
        self._cut_sources: frozenset[str] = frozenset()
        self._rng = random.Random(seed)
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None
        # Replaced on every change; whoever waits on the old one wakes up and
        # looks at the faults again.
        self._changed = asyncio.Event()

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def address(self) -> tuple[str, int]:
        """Where clients connect; the real port once started."""
        if self._server is None or not self._server.sockets:
            return self.listen
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def start(self) -> None:
        host, port = self.listen
        try:
            self._server = await asyncio.start_server(self._accept, host, port)
        except OSError as error:
            raise EnvironmentProblem(
                f"the fault proxy cannot listen on {host}:{port}: {error.strerror}",
                fix="choose another port, or port 0 for any free one",
            ) from error
        host, port = self.address
        log.info(
            "proxy started: %s:%d -> %s:%d seed=%d",
            host,
            port,
            *self.upstream,
            self.seed,
        )

    async def stop(self) -> None:
        """Stop listening and close every connection; safe to call twice."""
        if self._server is None:
            return
        host, port = self.address
        server, self._server = self._server, None
        server.close()
        tasks = [link.task for link in self._links if link.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()
        log.info("proxy stopped: %s:%d", host, port)

    # -- faults ------------------------------------------------------------

    def faults(self) -> dict[Direction, Faults]:
        return dict(self._faults)

    def set_faults(self, direction: Direction | str | None, faults: Faults) -> None:
        """Set the faults of one direction (or both, for ``None``/"both")."""
        for chosen in parse_directions(direction):
            self._faults[chosen] = faults
            log.info("fault set: proxy %s %s", chosen.value, faults.describe())
        self._announce_change()

    def clear(self) -> None:
        """Heal both directions; held bytes flow on."""
        self._faults = dict.fromkeys(Direction, HEALTHY)
        log.info("fault cleared: proxy both directions")
        self._announce_change()

    def cuts(self) -> dict[str, frozenset[str]]:
        """Every cut by name: the source addresses it black-holes."""
        return dict(self._cuts)

    def set_cut(self, name: str, sources: Iterable[str]) -> None:
        """Black-hole every connection from ``sources`` under ``name``;
        setting the same cut again changes nothing."""
        checked = check_sources(sources)
        self._cuts[check_cut_name(name)] = checked
        log.info("fault set: proxy cut %s from %s", name,
                 ",".join(sorted(checked)) or "no source")
        self._cuts_changed()

    def remove_cut(self, name: str) -> bool:
        """Lift the cut ``name``; False when there was none (already lifted)."""
        if self._cuts.pop(check_cut_name(name), None) is None:
            return False
        log.info("fault cleared: proxy cut %s", name)
        self._cuts_changed()
        return True

    def _cuts_changed(self) -> None:
        self._cut_sources = frozenset().union(*self._cuts.values())
        self._announce_change()

    def _is_cut(self, link: _Link) -> bool:
        return link.source in self._cut_sources

    def _announce_change(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        for link in list(self._links):
            if self._reset_wanted(link):
                self._reset(link)

    def _faults_for(self, link: _Link, direction: Direction) -> Faults:
        faults = self._faults[direction]
        if link.draws[direction] < faults.probability:
            return faults
        return HEALTHY

    def _reset_wanted(self, link: _Link) -> bool:
        return any(self._faults_for(link, chosen).reset for chosen in Direction)

    def _reset(self, link: _Link) -> None:
        if link.aborted:
            return
        self.stats.resets += 1
        link.abort()
        if link.task is not None and link.task is not asyncio.current_task():
            link.task.cancel()

    # -- connections -------------------------------------------------------

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.stats.connections_total += 1
        draws = {chosen: self._rng.random() for chosen in Direction}
        peer = writer.get_extra_info("peername")
        link = _Link(
            number=self.stats.connections_total,
            client=writer,
            source=str(peer[0]) if peer else "",
            draws=draws,
            rng=random.Random(self._rng.getrandbits(64)),
            task=asyncio.current_task(),
        )
        self._links.add(link)
        self.stats.connections_active += 1
        try:
            await self._serve(link, reader)
        except asyncio.CancelledError:
            # Only stop() and a reset cancel a link, and both own its end;
            # a handler that ends cancelled makes asyncio's stream server log
            # a spurious error, so the cancellation ends here.
            link.abort()
        except Exception:
            log.warning("proxy link %d failed", link.number, exc_info=True)
            link.abort()
        finally:
            self._links.discard(link)
            self.stats.connections_active -= 1

    async def _serve(self, link: _Link, client_reader: asyncio.StreamReader) -> None:
        if self._reset_wanted(link):
            self._reset(link)
            return
        # A cut source's connection waits here, accepted but never passed on,
        # as a SYN across a dead switch would wait for it to come back.
        while self._is_cut(link):
            await self._changed.wait()
        try:
            async with asyncio.timeout(UPSTREAM_CONNECT_TIMEOUT_S):
                node_reader, node = await asyncio.open_connection(*self.upstream)
        except (OSError, TimeoutError) as error:
            log.debug("proxy link %d: upstream unreachable: %s", link.number, error)
            link.abort()
            return
        link.node = node
        if self._reset_wanted(link):  # set while we were connecting
            self._reset(link)
            return

        try:
            async with asyncio.TaskGroup() as group:
                pairs = (
                    (Direction.UPSTREAM, client_reader, node),
                    (Direction.DOWNSTREAM, node_reader, link.client),
                )
                for direction, source, sink in pairs:
                    queue: asyncio.Queue[_Chunk | None] = asyncio.Queue(QUEUE_CHUNKS)
                    group.create_task(self._receive(link, direction, source, queue))
                    group.create_task(self._send(link, direction, queue, sink))
        except* _LinkClosed:
            self.stats.closed_after_bytes += 1
        except* OSError as errors:
            log.debug("proxy link %d ended: %s", link.number, errors.exceptions)
            link.abort()
        finally:
            if not link.aborted:
                await _close(link.client)
                await _close(node)

    async def _receive(
        self,
        link: _Link,
        direction: Direction,
        source: asyncio.StreamReader,
        queue: asyncio.Queue[_Chunk | None],
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._hold_while_blackholed(link, direction)
            data = await source.read(CHUNK_BYTES)
            if not data:
                await queue.put(None)
                return
            await queue.put(_Chunk(loop.time(), link.rng.random(), data))

    async def _send(
        self,
        link: _Link,
        direction: Direction,
        queue: asyncio.Queue[_Chunk | None],
        sink: asyncio.StreamWriter,
    ) -> None:
        bucket = _TokenBucket()
        while True:
            chunk = await queue.get()
            if chunk is None:
                await self._hold_while_blackholed(link, direction)
                if sink.can_write_eof():
                    sink.write_eof()
                return
            await self._wait_until_due(link, direction, chunk)

            data = chunk.data
            limit = self._faults_for(link, direction).close_after_bytes
            if limit is not None and link.sent[direction] + len(data) > limit:
                allowed = max(0, limit - link.sent[direction])
                await self._write(link, direction, data[:allowed], sink, bucket)
                raise _LinkClosed(direction)
            await self._write(link, direction, data, sink, bucket)

    async def _write(
        self,
        link: _Link,
        direction: Direction,
        data: bytes,
        sink: asyncio.StreamWriter,
        bucket: _TokenBucket,
    ) -> None:
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        while view:
            await self._hold_while_blackholed(link, direction)
            rate = self._faults_for(link, direction).bandwidth_bytes_per_s
            size = len(view)
            if rate is not None:
                size, wait_s = bucket.take(rate, size, loop.time())
                if not size:
                    await self._wait_for_change(wait_s)
                    continue  # the rate may have changed while we waited

            sink.write(view[:size])
            await sink.drain()
            link.sent[direction] += size
            self.stats.count_bytes(direction, size)
            view = view[size:]

    async def _hold_while_blackholed(self, link: _Link, direction: Direction) -> None:
        """Hold while this direction is black-holed or the link's source cut."""
        while self._faults_for(link, direction).blackhole or self._is_cut(link):
            await self._changed.wait()

    async def _wait_until_due(
        self, link: _Link, direction: Direction, chunk: _Chunk
    ) -> None:
        """Wait out the chunk's delay as the faults say now, not when it came."""
        loop = asyncio.get_running_loop()
        while True:
            await self._hold_while_blackholed(link, direction)
            faults = self._faults_for(link, direction)
            remaining = chunk.arrived + faults.delay_s(chunk.spread) - loop.time()
            if remaining <= 0:
                return
            await self._wait_for_change(remaining)

    async def _wait_for_change(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._changed.wait()


# -- the control API -----------------------------------------------------


def _faults_body(proxy: FaultProxy) -> dict[str, Any]:
    return {chosen.value: faults.to_dict() for chosen, faults in proxy.faults().items()}


def _cuts_body(proxy: FaultProxy) -> dict[str, Any]:
    return {"cuts": {name: sorted(sources)
                     for name, sources in sorted(proxy.cuts().items())}}


def _error_response(error: DslabError) -> web.Response:
    body = {"error": error.message, "fix": error.fix}
    return web.json_response(body, status=400)


@web.middleware
async def _refusals(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A handler refuses by raising DslabError: the client gets a 400 that
    says what is wrong and how to fix it, and nothing is applied."""
    try:
        return await handler(request)
    except DslabError as error:
        return _error_response(error)


async def _json_object(request: web.Request, example: str) -> dict[str, Any]:
    """The request's body as a JSON object, or a refusal showing ``example``."""
    fix = f"send for example {example}"
    try:
        body = await request.json()
    except ValueError:
        raise UsageError("the body is not JSON", fix=fix) from None
    if not isinstance(body, dict):
        raise UsageError("the body must be a JSON object", fix=fix)
    return body


def control_app(proxy: FaultProxy) -> web.Application:
    """The HTTP control API of ``proxy``; every answer is JSON."""

    async def get_faults(request: web.Request) -> web.Response:
        return web.json_response(_faults_body(proxy))

    async def put_faults(request: web.Request) -> web.Response:
        example = '{"upstream": {"latency_ms": 100}}'
        body = await _json_object(request, example)
        if not body:
            raise UsageError("the body must name directions",
                             fix=f"send for example {example}")
        # Every direction is checked before any is set: all or nothing.
        wanted = [(parse_directions(name), Faults.from_dict(value))
                  for name, value in body.items()]
        for directions, faults in wanted:
            for chosen in directions:
                proxy.set_faults(chosen, faults)
        return web.json_response(_faults_body(proxy))

    async def delete_faults(request: web.Request) -> web.Response:
        proxy.clear()
        return web.json_response(_faults_body(proxy))

    async def get_stats(request: web.Request) -> web.Response:
        return web.json_response(proxy.stats.to_dict())

    async def get_cuts(request: web.Request) -> web.Response:
        return web.json_response(_cuts_body(proxy))

    async def put_cut(request: web.Request) -> web.Response:
        example = '{"sources": ["127.0.0.11"]}'
        body = await _json_object(request, example)
        if set(body) != {"sources"}:
            raise UsageError("the body must hold exactly the cut's sources",
                             fix=f"send for example {example}")
        proxy.set_cut(request.match_info["name"], body["sources"])
        return web.json_response(_cuts_body(proxy))

    async def delete_cut(request: web.Request) -> web.Response:
        removed = proxy.remove_cut(request.match_info["name"])
        return web.json_response({"removed": removed, **_cuts_body(proxy)})

    app = web.Application(middlewares=[_refusals])
    app.router.add_get("/faults", get_faults)
    app.router.add_put("/faults", put_faults)
    app.router.add_delete("/faults", delete_faults)
    app.router.add_get("/stats", get_stats)
    app.router.add_get("/cuts", get_cuts)
    app.router.add_put("/cuts/{name}", put_cut)
    app.router.add_delete("/cuts/{name}", delete_cut)
    return app


class ControlServer:
    """Serves ``control_app(proxy)`` on a loopback port."""

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        allow_non_loopback: bool = False,
    ) -> str:
        require_loopback(host, what="control API", allowed=allow_non_loopback)
        runner = web.AppRunner(control_app(self.proxy), access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as error:
            await runner.cleanup()
            raise EnvironmentProblem(
                f"the proxy control API cannot listen on {host}:{port}: "
                f"{error.strerror}",
                fix="choose another port, or port 0 for any free one",
            ) from error
        self._runner = runner
        bound_host, bound_port = runner.addresses[0][:2]
        self.url = f"http://{bound_host}:{bound_port}"
        log.info("proxy control started: %s", self.url)
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()


class ProxyControl:
    """Blocking client of a proxy's control API, for the CLI and tests."""

    def __init__(self, url: str, *, timeout_s: float = CONTROL_TIMEOUT_S) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        # No proxy handler: an http_proxy variable must not divert loopback calls.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def faults(self) -> dict[Direction, Faults]:
        return _parse_faults(self._call("GET", "/faults"))

    def set_faults(
        self, direction: Direction | str | None, faults: Faults
    ) -> dict[Direction, Faults]:
        body = {
            chosen.value: faults.to_dict() for chosen in parse_directions(direction)
        }
        return _parse_faults(self._call("PUT", "/faults", body))

    def clear(self) -> dict[Direction, Faults]:
        return _parse_faults(self._call("DELETE", "/faults"))

    def cuts(self) -> dict[str, frozenset[str]]:
        return self._parse_cuts(self._call("GET", "/cuts"))

    def set_cut(self, name: str, sources: Iterable[str]) -> dict[str, frozenset[str]]:
        """Cut ``sources`` under ``name``; idempotent."""
        body = {"sources": sorted(check_sources(sources))}
        answer = self._call("PUT", f"/cuts/{check_cut_name(name)}", body)
        return self._parse_cuts(answer)

    def remove_cut(self, name: str) -> bool:
        """Lift the cut ``name``; False when the proxy had none by that name."""
        answer = self._call("DELETE", f"/cuts/{check_cut_name(name)}")
        if not isinstance(answer, dict):
            raise self._garbled(answer)
        return bool(answer.get("removed"))

    def _parse_cuts(self, answer: object) -> dict[str, frozenset[str]]:
        cuts = answer.get("cuts") if isinstance(answer, dict) else None
        if not isinstance(cuts, dict):
            raise self._garbled(answer)
        return {str(name): check_sources(sources) for name, sources in cuts.items()}

    def stats(self) -> ProxyStats:
        answer = self._call("GET", "/stats")
        if not isinstance(answer, dict):
            raise self._garbled(answer)
        return ProxyStats.from_dict(answer)

    def _call(self, method: str, path: str, body: object = None) -> object:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            answer = _json_or_none(error.read())
            if error.code == 400 and isinstance(answer, dict):
                raise UsageError(
                    str(answer.get("error")), fix=answer.get("fix")
                ) from None
            raise ProxyUnreachable(
                f"the fault proxy at {self.url} answered {method} {path} "
                f"with HTTP {error.code}",
                fix="check that the URL is a dslab fault proxy's control URL",
            ) from None
        except (urllib.error.URLError, OSError, ValueError) as error:
            raise ProxyUnreachable(
                f"the fault proxy at {self.url} did not answer: {error}",
                fix="check that the proxy process runs (`dslab chaos status`) "
                "and that the URL is its control URL",
            ) from None

    def _garbled(self, answer: object) -> ProxyUnreachable:
        return ProxyUnreachable(
            f"the fault proxy at {self.url} sent an answer dslab cannot read: "
            f"{answer!r:.200}",
            fix="check that the URL is a dslab fault proxy's control URL",
        )


def _json_or_none(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _parse_faults(answer: object) -> dict[Direction, Faults]:
    if not isinstance(answer, dict):
        raise UsageError(f"unexpected answer from the fault proxy: {answer!r:.200}")
    return {
        chosen: Faults.from_dict(answer.get(chosen.value, {})) for chosen in Direction
    }


# -- running it as a process ---------------------------------------------


async def serve(
    *,
    listen: tuple[str, int],
    upstream: tuple[str, int],
    control: tuple[str, int],
    seed: int,
    allow_non_loopback: bool = False,
) -> None:
    """Run a proxy and its control API until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    async with FaultProxy(
        upstream, listen=listen, seed=seed, allow_non_loopback=allow_non_loopback
    ) as proxy:
        server = ControlServer(proxy)
        await server.start(*control, allow_non_loopback=allow_non_loopback)
        try:
            host, port = proxy.address
            ready = {
                "pid": os.getpid(),
                "listen": f"{host}:{port}",
                "upstream": f"{upstream[0]}:{upstream[1]}",
                "control": server.url,
                "seed": seed,
            }
            print(json.dumps(ready), flush=True)
            await stop.wait()
        finally:
            await server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dslab.chaos.proxy",
        description="A TCP proxy that injects faults, driven over HTTP.",
    )
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT")
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the node")
    parser.add_argument("--control", default="127.0.0.1:0", help="HOST:PORT")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--allow-non-loopback", action="store_true")
    parser.add_argument("-v", "--verbose", action="count", default=1)
    args = parser.parse_args(argv)

    from dslab.logs import setup_server_logging

    setup_server_logging(args.verbose)
    try:
        listen = parse_address(args.listen, what="listen")
        control = parse_address(args.control, what="control")
        allowed = args.allow_non_loopback
        require_loopback(listen[0], what="proxy", allowed=allowed)
        require_loopback(control[0], what="control API", allowed=allowed)
        asyncio.run(
            serve(
                listen=listen,
                upstream=parse_address(args.upstream, what="upstream"),
                control=control,
                seed=args.seed,
                allow_non_loopback=allowed,
            )
        )
    except DslabError as error:
        print(f"Error: {error}", file=sys.stderr)
        return error.exit_code

    return 0


if __name__ == "__main__":
    # Run the imported module, not this ``__main__`` copy, so log lines carry
    # the ``dslab.chaos.proxy`` logger name that the log setup routes.
    from dslab.chaos import proxy as _module

    sys.exit(_module.main())
