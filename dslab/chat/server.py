"""The chat server: one aiohttp process serving WebSocket clients from Redis.

Routes: ``GET /`` the web UI, ``GET /ws`` the chat WebSocket (protocol in
``protocol.py`` and ``docs/chat-protocol.md``), ``GET /healthz`` and
``GET /metrics`` (Prometheus text format).

Guarantees, with ``Delivery.STREAMS``: a send is acknowledged only after the
append succeeded (and, with ``replicas_ack``, after WAIT returned, the ack
saying whether enough replicas confirmed); sends of one socket are appended
in the order they arrive; every socket of a room receives the room's entries
in stream order, with no gap and no duplicate across a resume, or is closed
with ``CLOSE_SLOW_CONSUMER`` and must resume. ``Delivery.PUBSUB`` keeps none
of these: it exists to be watched failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiohttp
import redis.exceptions
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from dslab.chat import protocol, tokens
from dslab.chat.fanout import (
    OUTBOX_FRAMES,
    Delivery,
    Hub,
    Outbox,
    OutFrame,
    Subscription,
)
from dslab.chat.presence import Presence
from dslab.chat.store import MAX_ENTRIES, ChatStore
from dslab.redisconn import async_client
from dslab.settings import LOOPBACK_HOST, RedisTarget

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).parent / "web"
# aiohttp pings idle sockets this often and drops one that stops answering.
WS_HEARTBEAT_S = 15.0
# Closing a socket whose peer no longer reads must not hang the server.
CLOSE_TIMEOUT_S = 2.0
# Malformed frames tolerated in a row before the socket is closed.
MAX_BAD_FRAMES = 10
# Sends per second one socket may sustain, and the burst it may save up:
# far above a person typing, low enough that one script cannot flood a room.
SEND_RATE_PER_S = 20.0
SEND_BURST = 40
# Sockets one user name may hold on one server (tabs, devices, reconnects
# racing the old socket's close).
MAX_CONNECTIONS_PER_USER = 8
# Redis connections one server may open: one per followed room (blocked in
# XREAD) plus the store's commands; redis-py's default of 100 is too few.
REDIS_POOL_CONNECTIONS = 1024
# A frame is written to a socket at once only while that socket's unsent
# bytes stay below this (aiohttp's own flow-control mark); past it, frames
# queue in the socket's bounded outbox and its writer waits for the peer.
DIRECT_WRITE_MAX_BYTES = 64 * 1024
# Latency buckets from sub-millisecond (loopback) to the 200 ms target and past.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2,
                     0.5, 1.0, 2.5)


@dataclass(frozen=True)
class ChatConfig:
    """Everything one chat server process needs; built by the CLI or tests."""

    redis: RedisTarget
    host: str = LOOPBACK_HOST
    port: int = 0
    delivery: Delivery = Delivery.STREAMS
    replicas_ack: int = 0
    replicas_timeout_ms: int = 500
    name: str = "chat"
    outbox_frames: int = OUTBOX_FRAMES
    # Browser origins allowed to open /ws; empty: only the server's own.
    allowed_origins: frozenset[str] = frozenset()
    send_rate_per_s: float = SEND_RATE_PER_S
    send_burst: int = SEND_BURST
    max_connections_per_user: int = MAX_CONNECTIONS_PER_USER
    max_entries: int = MAX_ENTRIES
    # The lab's shared signing secret: with it, a join must carry a token from
    # POST /token. Without it the server trusts the join's user name, a mode
    # for in-process experiments only (`dslab chat serve` always sets one).
    secret: bytes | None = field(default=None, repr=False)


class ChatMetrics:
    """The server's Prometheus metrics, in a registry of its own so several
    servers can live in one process (tests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.connections = Gauge("dslab_chat_connections",
                                 "open WebSocket connections",
                                 registry=self.registry)
        self.messages_in = Counter("dslab_chat_messages_in",
                                   "sends acknowledged", registry=self.registry)
        self.duplicates = Counter("dslab_chat_duplicate_sends",
                                  "retried sends answered with the original id",
                                  registry=self.registry)
        self.messages_out = Counter("dslab_chat_messages_out",
                                    "message frames written to sockets",
                                    registry=self.registry)
        self.delivery = Histogram("dslab_chat_delivery_seconds",
                                  "from append in Redis to the write on this "
                                  "server's live sockets, once per message",
                                  buckets=LATENCY_BUCKETS_S,
                                  registry=self.registry)
        self.append = Histogram("dslab_chat_xadd_seconds",
                                "append round trip (with WAIT when configured)",
                                buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.slow_consumers = Counter("dslab_chat_slow_consumer_disconnects",
                                      "sockets closed for falling behind",
                                      registry=self.registry)
        # process_cpu_seconds_total and friends: `dslab chat bench` reads the
        # CPU a server used during its load from them.
        ProcessCollector(registry=self.registry)


class ChatServer:
    """The application object: ``app()`` builds the aiohttp application."""

    def __init__(self, config: ChatConfig) -> None:
        self.config = config
        self.metrics = ChatMetrics()
        self.connections: set[Connection] = set()
        self.sockets_per_user: dict[str, int] = {}
        self._client: Any = None
        self._store: ChatStore | None = None
        self._hub: Hub | None = None
        self._presence: Presence | None = None
        self._pubsub_ids = itertools.count(1)

    @property
    def store(self) -> ChatStore:
        assert self._store is not None, "server not started"
        return self._store

    @property
    def hub(self) -> Hub:
        assert self._hub is not None, "server not started"
        return self._hub

    @property
    def presence(self) -> Presence:
        assert self._presence is not None, "server not started"
        return self._presence

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self._index)
        app.router.add_get("/ws", self._websocket)
        app.router.add_post("/token", self._token)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        app.cleanup_ctx.append(self._lifetime)
        app.on_shutdown.append(self._close_sockets)
        return app

    # -- lifetime -------------------------------------------------------------

    async def _lifetime(self, app: web.Application) -> AsyncIterator[None]:
        self._client = async_client(self.config.redis,
                                    max_connections=REDIS_POOL_CONNECTIONS)
        self._store = ChatStore(
            self._client, replicas_ack=self.config.replicas_ack,
            replicas_timeout_ms=self.config.replicas_timeout_ms,
            max_entries=self.config.max_entries,
        )
        self._presence = Presence(self._client, self._presence_changed)
        started, stop = asyncio.Event(), asyncio.Event()
        service = asyncio.create_task(self._serve(started, stop), name="chat-service")
        await asyncio.wait(
            {service, asyncio.create_task(started.wait())},
            return_when=asyncio.FIRST_COMPLETED,
        )
        if service.done():
            service.result()  # raises why the service could not start
        log.info("chat service started: %s delivery=%s redis=%s", self.config.name,
                 self.config.delivery.value, self.config.redis)
        try:
            yield
        finally:
            stop.set()
            await service
            await self._client.aclose()
            log.info("chat service stopped: %s", self.config.name)

    async def _serve(self, started: asyncio.Event, stop: asyncio.Event) -> None:
        """Owns the room tails and the presence heartbeat until ``stop``."""
        async with Hub(self.store, self.config.delivery,
                       self._fanned_out) as hub:
            self._hub = hub
            heartbeat = asyncio.create_task(self.presence.run(), name="presence")
            started.set()
            try:
                await stop.wait()
            finally:
                heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeat

    async def _close_sockets(self, app: web.Application) -> None:
        for connection in list(self.connections):
            connection.shut_down()

    def _fanned_out(self, stamps_ms: Sequence[int], written: int) -> None:
        """Metrics per message, not per socket: at 10,000 deliveries a second
        a histogram observation per socket costs more than the write."""
        now = time.time()
        for ts_ms in stamps_ms:
            self.metrics.delivery.observe(max(0.0, now - ts_ms / 1000))
        if written:
            self.metrics.messages_out.inc(written)

    def _presence_changed(self, room: str, users: list[str]) -> None:
        frame = OutFrame(protocol.presence_frame(room, users))
        for subscription in self.hub.local_subscribers(room):
            subscription.outbox.offer(frame)

    # -- routes ---------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(WEB_DIR / "index.html")

    async def _healthz(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = {
            "name": self.config.name,
            "delivery": self.config.delivery.value,
            "connections": len(self.connections),
            "rooms": {room: len(self.hub.local_subscribers(room))
                      for room in self.hub.rooms()},
        }
        try:
            async with asyncio.timeout(1.0):
                await self._client.ping()
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            body["status"] = f"redis unavailable: {type(exc).__name__}"
            return web.json_response(body, status=503)
        body["status"] = "ok"
        return web.json_response(body)

    async def _token(self, request: web.Request) -> web.Response:
        """Sign an identity: ``{"user": NAME}`` -> ``{"token", "expires_at"}``."""
        if self.config.secret is None:
            raise web.HTTPNotFound(text="this server does not sign identities\n")
        try:
            body = await request.json()
            user = body["user"] if isinstance(body, dict) else None
            token, expires = tokens.issue(self.config.secret, str(user or ""))
        except (ValueError, KeyError, protocol.ProtocolError) as exc:
            return web.json_response(
                {"error": "bad_field", "detail": f"send {{\"user\": NAME}}: {exc}"},
                status=400)
        return web.json_response({"user": user, "token": token,
                                  "expires_at": expires})

    async def _metrics(self, request: web.Request) -> web.Response:
        data = generate_latest(self.metrics.registry)
        return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def origin_allowed(self, request: web.Request) -> bool:
        """Browsers always send Origin; other clients need not. A foreign
        origin is refused so that another site's page cannot use a visitor's
        browser to talk to this chat."""
        origin = request.headers.get("Origin")
        if origin is None:
            return True
        if self.config.allowed_origins:
            return origin in self.config.allowed_origins
        return origin in (f"http://{request.host}", f"https://{request.host}")

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        if not self.origin_allowed(request):
            raise web.HTTPForbidden(text="origin not allowed\n")
        ws = web.WebSocketResponse(
            protocols=(protocol.SUBPROTOCOL,), max_msg_size=protocol.MAX_FRAME_BYTES,
            heartbeat=WS_HEARTBEAT_S, compress=False, timeout=CLOSE_TIMEOUT_S,
        )
        await ws.prepare(request)
        connection = Connection(self, ws, request.transport)
        self.connections.add(connection)
        self.metrics.connections.inc()
        try:
            await connection.serve()
        finally:
            self.connections.discard(connection)
            self.metrics.connections.dec()
        return ws

    # -- sends ----------------------------------------------------------------

    async def append(self, room: str, user: str, send: protocol.Send) -> str:
        """Store (or publish) one send; the ack frame to answer with."""
        began = time.perf_counter()
        if self.config.delivery is Delivery.PUBSUB:
            now_ms = int(time.time() * 1000)
            # Server-local IDs: the naive mode has no shared order to offer.
            entry_id = f"{now_ms}-{next(self._pubsub_ids)}"
            frame = protocol.message_frame(room, entry_id, send.cmid, user,
                                           send.text, now_ms)
            await self.store.publish(room, frame)
            self.metrics.append.observe(time.perf_counter() - began)
            self.metrics.messages_in.inc()
            return protocol.ack_frame(room, send.cmid, entry_id, duplicate=False)

        result = await self.store.append(room, user, send.cmid, send.text)
        self.metrics.append.observe(time.perf_counter() - began)
        self.metrics.messages_in.inc()
        if result.duplicate:
            self.metrics.duplicates.inc()
        return protocol.ack_frame(
            room, send.cmid, result.entry_id, duplicate=result.duplicate,
            replicas=result.replicas, replicas_met=result.replicas_met,
        )


class Connection:
    """One WebSocket: a reader handling frames, a writer draining the outbox."""

    def __init__(self, server: ChatServer, ws: web.WebSocketResponse,
                 transport: asyncio.BaseTransport | None) -> None:
        self.server = server
        self.ws = ws
        # uvloop's transports do not subclass asyncio's, hence the cast.
        self._transport = (cast(asyncio.WriteTransport, transport)
                           if hasattr(transport, "get_write_buffer_size") else None)
        self.outbox = Outbox(self._fell_behind, capacity=server.config.outbox_frames,
                             write_now=self._write_now)
        self.memberships: dict[str, tuple[Subscription, str]] = {}
        self.users: set[str] = set()
        self._allowance = float(server.config.send_burst)
        self._allowance_at = time.monotonic()
        self._done = asyncio.Event()
        self._close_code: int = aiohttp.WSCloseCode.OK
        self._close_reason = b""
        self._bad_frames = 0

    def shut_down(self) -> None:
        self._finish(aiohttp.WSCloseCode.GOING_AWAY, b"server shutting down")

    def _fell_behind(self) -> None:
        self.server.metrics.slow_consumers.inc()
        log.debug("slow consumer closed: %s", list(self.memberships))
        self._finish(protocol.CLOSE_SLOW_CONSUMER, b"slow consumer, resume")

    def _finish(self, code: int, reason: bytes) -> None:
        if not self._done.is_set():
            self._close_code, self._close_reason = code, reason
            self._done.set()

    async def serve(self) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                reader = group.create_task(self._read())
                writer = group.create_task(self._write())
                await self._done.wait()
                writer.cancel()
                # Closing ends the reader's receive loop; cancel it only if
                # it is stuck elsewhere (a handler waiting on Redis).
                if not self.ws.closed:
                    with contextlib.suppress(TimeoutError, ConnectionError):
                        async with asyncio.timeout(CLOSE_TIMEOUT_S):
                            await self.ws.close(code=self._close_code,
                                                message=self._close_reason)
                reader.cancel()
        finally:
            # The counts first: nothing below may keep a closed socket counted
            # against its user's limit.
            counts = self.server.sockets_per_user
            for user in self.users:
                counts[user] -= 1
                if counts[user] <= 0:
                    del counts[user]
            for room in list(self.memberships):
                try:
                    await self._leave(room)
                except Exception:
                    log.exception("leaving %s after the socket closed failed", room)

    def _write_now(self, wire: bytes) -> bool:
        """Write whole frames straight to the socket while it keeps up.

        aiohttp writes its own frames (pings, close) to the same transport in
        one synchronous call each, so frames never interleave; nothing is
        written once the close handshake began.
        """
        transport = self._transport
        if (transport is None or self.ws.closed or self._done.is_set()
                or transport.is_closing()
                or transport.get_write_buffer_size() > DIRECT_WRITE_MAX_BYTES):
            return False
        try:
            transport.write(wire)
        except (OSError, RuntimeError):
            return False  # queued instead; the writer's send ends the socket
        return True

    async def _send_queued(self, frame: OutFrame) -> None:
        # aiohttp's writer waits for the peer when its buffer is full.
        await self.ws.send_frame(frame.payload, aiohttp.WSMsgType.TEXT)
        if frame.ts_ms:
            self.server.metrics.messages_out.inc()

    async def _write(self) -> None:
        try:
            await self.outbox.pump(self._send_queued)
        except (ConnectionError, RuntimeError):
            self._finish(aiohttp.WSCloseCode.OK, b"")

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                if message.type is aiohttp.WSMsgType.TEXT:
                    await self._handle(message.data)
                elif message.type is aiohttp.WSMsgType.BINARY:
                    await self._refuse(protocol.ProtocolError(
                        "bad_frame", "frames are JSON text, not binary"))
        finally:
            self._finish(aiohttp.WSCloseCode.OK, b"")

    async def _refuse(self, error: protocol.ProtocolError) -> None:
        self._bad_frames += 1
        await self.outbox.put(protocol.error_frame(error.code, error.detail,
                                                   error.cmid))
        if self._bad_frames > MAX_BAD_FRAMES:
            self._finish(protocol.CLOSE_PROTOCOL_ERROR, b"too many bad frames")

    async def _handle(self, raw: str) -> None:
        try:
            frame = protocol.parse_client_frame(raw)
        except protocol.ProtocolError as error:
            await self._refuse(error)
            return
        self._bad_frames = 0

        if isinstance(frame, protocol.Ping):
            await self.outbox.put(protocol.pong_frame(frame.token))
        elif isinstance(frame, protocol.Join):
            await self._join(frame)
        elif isinstance(frame, protocol.Leave):
            await self._leave(frame.room)
        else:
            await self._send(frame)

    async def _join(self, join: protocol.Join) -> None:
        secret = self.server.config.secret
        if secret is not None:
            try:
                if join.token is None:
                    raise protocol.ProtocolError(
                        "bad_token", "this server signs identities: join with "
                        "a token from POST /token")
                signed = tokens.verify(secret, join.token)
                if signed != join.user:
                    raise protocol.ProtocolError(
                        "bad_token", f"the token speaks for {signed!r}, "
                        f"not {join.user!r}")
            except protocol.ProtocolError as error:
                await self.outbox.put(protocol.error_frame(error.code,
                                                           error.detail))
                self._finish(protocol.CLOSE_BAD_TOKEN, b"bad token")
                return
        if join.room in self.memberships:
            await self.outbox.put(protocol.error_frame(
                "already_joined", f"already in room {join.room!r}; leave first"))
            return
        if not self._count_user(join.user):
            limit = self.server.config.max_connections_per_user
            await self.outbox.put(protocol.error_frame(
                "too_many_connections",
                f"user {join.user!r} already has {limit} sockets on this server"))
            self._finish(protocol.CLOSE_TOO_MANY_CONNECTIONS, b"too many connections")
            return
        try:
            subscription = await self.server.hub.subscribe(
                join.room, self.outbox, join.last_id, join.history)
        except (redis.exceptions.RedisError, OSError) as exc:
            await self.outbox.put(protocol.error_frame(
                "unavailable", f"cannot join: Redis {type(exc).__name__}"))
            return
        self.memberships[join.room] = (subscription, join.user)
        try:
            users = await self.server.presence.join(join.room, join.user)
        except (redis.exceptions.RedisError, OSError) as exc:
            log.debug("presence join failed: %s", exc)
            return
        self.outbox.offer(protocol.presence_frame(join.room, users))

    async def _leave(self, room: str) -> None:
        membership = self.memberships.pop(room, None)
        if membership is None:
            return
        subscription, user = membership
        self.server.hub.unsubscribe(subscription)
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            await self.server.presence.leave(room, user)

    def _count_user(self, user: str) -> bool:
        """Count this socket for ``user``; False when the user is at the limit."""
        if user in self.users:
            return True
        counts = self.server.sockets_per_user
        if counts.get(user, 0) >= self.server.config.max_connections_per_user:
            return False
        counts[user] = counts.get(user, 0) + 1
        self.users.add(user)
        return True

    def _take_send_token(self) -> bool:
        """Token bucket: ``send_rate_per_s`` refill, ``send_burst`` capacity."""
        config = self.server.config
        now = time.monotonic()
        self._allowance = min(float(config.send_burst), self._allowance
                              + (now - self._allowance_at) * config.send_rate_per_s)
        self._allowance_at = now
        if self._allowance < 1.0:
            return False
        self._allowance -= 1.0
        return True

    async def _send(self, send: protocol.Send) -> None:
        membership = self.memberships.get(send.room)
        if membership is None:
            await self.outbox.put(protocol.error_frame(
                "not_joined", f"join room {send.room!r} before sending", send.cmid))
            return
        if not self._take_send_token():
            await self.outbox.put(protocol.error_frame(
                "rate_limited", "too many sends; retry in a moment", send.cmid))
            return
        try:
            ack = await self.server.append(send.room, membership[1], send)
        except (redis.exceptions.RedisError, OSError) as exc:
            # Not acknowledged: the client retries with the same cmid.
            await self.outbox.put(protocol.error_frame(
                "unavailable", f"not stored: Redis {type(exc).__name__}", send.cmid))
            return
        await self.outbox.put(ack)


@dataclass
class RunningServer:
    """A chat server started in this process by ``start_server``."""

    server: ChatServer
    runner: web.AppRunner
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/ws"

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_server(config: ChatConfig) -> RunningServer:
    """Start a server on ``config.host:config.port`` (0 = a free port)."""
    server = ChatServer(config)
    runner = web.AppRunner(server.app(), handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    host, port = _bound_address(runner)
    return RunningServer(server, runner, host, port)


def _bound_address(runner: web.AppRunner) -> tuple[str, int]:
    for address in runner.addresses:
        if isinstance(address, tuple | list):
            return str(address[0]), int(address[1])
    raise RuntimeError("the chat server is not listening on a TCP address")
