"""An asyncio chat client that resumes and retries: for tests, benchmarks and
``dslab chat connect``.

``ChatClient`` keeps one WebSocket to one of several servers and one room.
When the socket drops (server killed, slow-consumer close) it reconnects to
the next server with backoff and joins with the last entry ID it saw, so the
server replays exactly what it missed. ``send`` returns only once the send
is acknowledged; until then it re-sends with the same ``cmid`` after every
reconnect and after every ``unavailable`` error, which the server's
idempotent append turns into one entry.

The socket is ``dslab.chat.wsclient``'s lean WebSocket: each received frame
is decoded and handled inside the event loop's read callback, with no reader
task to wake (a load generator runs hundreds of these clients). Only the
identity-token POST uses aiohttp.

Guarantee (streams mode): ``received`` holds the room's messages in stream
order without duplicates; anything retention removed in between is recorded
in ``gaps``. In pubsub mode messages are kept as they come.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NamedTuple

import aiohttp

from dslab.chat import protocol, wsclient
from dslab.errors import DslabError

log = logging.getLogger(__name__)

# Reconnect backoff: the first retry is quick (another server is probably
# up), later ones spread out so a dead cluster is not hammered.
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 2.0
# How long a send keeps retrying before giving up.
SEND_TIMEOUT_S = 15.0
# Pause before re-sending after the server said Redis was unavailable.
UNAVAILABLE_RETRY_S = 0.1
# Pause before re-sending a rate-limited send: the bucket refills at 20/s.
RATE_LIMITED_RETRY_S = 0.25
# TCP connect plus the upgrade (and separately the token POST).
CONNECT_TIMEOUT_S = 2.0
# The server caps client frames at MAX_FRAME_BYTES; its own frames (a
# message with its envelope) can be larger, never twice as large.
MAX_SERVER_MESSAGE_BYTES = protocol.MAX_FRAME_BYTES * 2
# A join answers with "joined" before any replay, so this is generous; past
# it the server is stuck and the client moves on to the next one.
JOIN_TIMEOUT_S = 5.0
# Error codes a retry cannot fix.
FINAL_ERRORS = frozenset({"bad_json", "bad_frame", "bad_field", "too_large",
                          "unknown_type", "not_joined", "too_many_connections"})


class SendRejected(DslabError):
    """The server refused a send for a reason a retry cannot fix."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"send refused: {code}: {detail}",
                         fix="check the room, cmid and text against the protocol")
        self.code = code


class _JoinFailed(Exception):
    """The server could not join us to the room (Redis unavailable)."""


class Message(NamedTuple):
    """One delivered message. A named tuple: a load generator makes 10,000s
    a second, and a frozen dataclass costs several times more to build."""

    room: str
    entry_id: str
    cmid: str
    user: str
    text: str
    ts: int


@dataclass(frozen=True)
class Ack:
    cmid: str
    entry_id: str
    duplicate: bool
    replicas: int | None = None
    replicas_met: bool | None = None


class _PendingSend:
    def __init__(self, text: str) -> None:
        self.text = text
        self.acked: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        self.retry = asyncio.Event()


class ChatClient:
    """One user in one room over one socket, reconnecting across ``urls``.

    Use as ``async with ChatClient([...], "lobby", "ada") as client``.
    """

    def __init__(
        self, urls: Sequence[str], room: str, user: str, *,
        last_id: str | None = None, history: int = 0, keep: bool = True,
        on_message: Callable[[Message], None] | None = None,
        reconnect: bool = True, start_index: int = 0,
        backoff_first_s: float = BACKOFF_FIRST_S,
    ) -> None:
        if not urls:
            raise ValueError("ChatClient needs at least one server URL")
        self.urls = [_ws_url(url) for url in urls]
        self.room = room
        self.user = user
        self.last_id = last_id
        # last_id parsed, so that each message's ID is parsed once, not twice.
        self._last_key = (protocol.parse_entry_id(last_id) if last_id is not None
                          else None)
        self.history = history
        self.keep = keep
        self.on_message = on_message
        self.reconnect = reconnect
        self.backoff_first_s = backoff_first_s
        self.received: list[Message] = []
        self.gaps: list[tuple[str, str]] = []
        self.users: list[str] = []
        self.close_codes: list[int | None] = []
        self.duplicates_dropped = 0
        self.joins = 0
        self.mode = "streams"
        self.url: str | None = None
        self.joined = asyncio.Event()
        self._index = start_index
        self._ws: wsclient.LeanSocket | None = None
        self._pending: dict[str, _PendingSend] = {}
        self._task: asyncio.Task[None] | None = None
        self._count_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._token: str | None = None
        self._unsigned = False  # the servers trust names: no token needed

    async def __aenter__(self) -> ChatClient:
        self._task = asyncio.create_task(self._run(), name=f"chat-client:{self.user}")
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def wait_joined(self, timeout_s: float = 10.0) -> None:
        async with asyncio.timeout(timeout_s):
            await self.joined.wait()

    async def wait_for_count(self, count: int, timeout_s: float = 10.0) -> None:
        """Wait until ``received`` holds at least ``count`` messages."""
        if len(self.received) >= count:
            return
        reached: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = (count, reached)
        self._count_waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout_s):
                await reached
        finally:
            self._count_waiters.remove(waiter)

    async def send(
        self, text: str, cmid: str | None = None, *,
        timeout_s: float = SEND_TIMEOUT_S,
    ) -> Ack:
        """Send until acknowledged (same cmid on every try) or ``timeout_s``."""
        cmid = cmid or uuid.uuid4().hex
        pending = self._pending.setdefault(cmid, _PendingSend(text))
        try:
            async with asyncio.timeout(timeout_s):
                while not pending.acked.done():
                    pending.retry.clear()
                    await self._try_send(cmid, text)
                    retry = asyncio.ensure_future(pending.retry.wait())
                    waited: list[asyncio.Future[Any]] = [pending.acked, retry]
                    try:
                        await asyncio.wait(waited,
                                           return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        retry.cancel()
                return pending.acked.result()
        finally:
            self._pending.pop(cmid, None)

    async def _try_send(self, cmid: str, text: str) -> None:
        ws = self._ws
        if ws is None or not self.joined.is_set():
            return  # the next join sets `retry`
        frame = {"type": "send", "room": self.room, "cmid": cmid, "text": text}
        with contextlib.suppress(ConnectionError, RuntimeError):
            ws.send_text(_dump(frame))
            await ws.drain()

    # -- the connection loop --------------------------------------------------

    async def _run(self) -> None:
        backoff = self.backoff_first_s
        while True:
            url = self.urls[self._index % len(self.urls)]
            try:
                await self._ensure_token(url)
                socket = await wsclient.connect(
                    url, on_text=self._on_text, protocols=(protocol.SUBPROTOCOL,),
                    timeout_s=CONNECT_TIMEOUT_S,
                    max_message_bytes=MAX_SERVER_MESSAGE_BYTES)
                joins = self.joins
                try:
                    self._ws, self.url = socket, url
                    socket.send_text(_dump(self._join_frame()))
                    await self._until_closed(socket)
                finally:
                    if self.joins > joins:  # this server took us
                        backoff = self.backoff_first_s
                self.close_codes.append(socket.close_code)
            except (aiohttp.ClientError, OSError, TimeoutError, _JoinFailed) as exc:
                log.debug("chat connection failed: %s %s", url, exc)
            finally:
                self._ws = None
                self.joined.clear()
            if not self.reconnect:
                return
            self._index += 1
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _until_closed(self, socket: wsclient.LeanSocket) -> None:
        """Wait while frames are handled in the socket's read callback, until
        the connection ends; raises what ``_handle`` raised (``_JoinFailed``).
        Cancelled (``close()``), it sends a close frame and hangs up."""
        watchdog = asyncio.create_task(self._join_watchdog(socket),
                                       name=f"chat-join-watchdog:{self.user}")
        try:
            await asyncio.shield(socket.closed)
        finally:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
            if not socket.closed.done():
                socket.hang_up()
                # One loop turn: the transport reports itself closed.
                await asyncio.wait([socket.closed], timeout=wsclient.CLOSE_TIMEOUT_S)

    def _on_text(self, raw: str) -> None:
        """The socket's text callback: the hot path of a load generator."""
        self._handle(protocol.decode_server_frame(raw))

    async def _ensure_token(self, url: str) -> None:
        """Get an identity token once, from any server (they share a secret);
        a server that answers 404 does not sign identities. A session per
        fetch: it happens once per client, or after a ``bad_token``."""
        if self._token is not None or self._unsigned:
            return
        token_url = _http_base(url) + "/token"
        async with aiohttp.ClientSession() as session, session.post(
            token_url, json={"user": self.user},
            timeout=aiohttp.ClientTimeout(total=CONNECT_TIMEOUT_S),
        ) as answer:
            if answer.status == 404:
                self._unsigned = True
                return
            answer.raise_for_status()
            self._token = str((await answer.json())["token"])

    async def _join_watchdog(self, socket: wsclient.LeanSocket) -> None:
        """A join the server never answers must not hang the client: give up on
        this connection after JOIN_TIMEOUT_S and try the next server."""
        try:
            async with asyncio.timeout(JOIN_TIMEOUT_S):
                await self.joined.wait()
        except TimeoutError:
            log.debug("join not answered in %.0f s: %s", JOIN_TIMEOUT_S, self.url)
            await socket.close()

    def _join_frame(self) -> dict[str, Any]:
        frame: dict[str, Any] = {"type": "join", "room": self.room, "user": self.user}
        if self._token is not None:
            frame["token"] = self._token
        if self.last_id is not None:
            frame["last_id"] = self.last_id
        elif self.history:
            frame["history"] = self.history
        return frame

    def _handle(self, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        if kind == "message":
            self._on_message(frame)
        elif kind == "ack":
            pending = self._pending.get(frame["cmid"])
            if pending is not None and not pending.acked.done():
                pending.acked.set_result(Ack(
                    frame["cmid"], frame["id"], bool(frame.get("duplicate")),
                    frame.get("replicas"), frame.get("replicas_met")))
        elif kind == "joined":
            self._on_joined(frame)
        elif kind == "error":
            self._on_error(frame)
        elif kind == "gap":
            self.gaps.append((frame["from"], frame["to"]))
        elif kind == "presence":
            self.users = list(frame["users"])

    def _on_joined(self, frame: dict[str, Any]) -> None:
        self.mode = frame.get("mode", "streams")
        # Remember where the first join started, so that a reconnect before
        # any message arrived still resumes from there.
        if self.last_id is None and frame.get("cursor") and self.mode == "streams":
            self.last_id = frame["cursor"]
            self._last_key = protocol.parse_entry_id(self.last_id)
        self.joins += 1
        self.joined.set()
        for pending in self._pending.values():
            pending.retry.set()

    def _on_error(self, frame: dict[str, Any]) -> None:
        if frame.get("code") == "bad_token":
            # Expired, or signed with another secret: fetch a fresh one on the
            # reconnect that follows the server's close.
            self._token = None
        if not self.joined.is_set() and frame.get("code") == "unavailable":
            # The join itself failed: drop this socket and try the next server.
            raise _JoinFailed(str(frame.get("detail")))
        pending = self._pending.get(frame.get("cmid") or "")
        if pending is None or pending.acked.done():
            log.debug("chat error: %s %s", frame.get("code"), frame.get("detail"))
            return
        code = str(frame.get("code"))
        if code in FINAL_ERRORS:
            pending.acked.set_exception(SendRejected(code, str(frame.get("detail"))))
            return
        pause = RATE_LIMITED_RETRY_S if code == "rate_limited" else UNAVAILABLE_RETRY_S
        asyncio.get_running_loop().call_later(pause, pending.retry.set)

    def _on_message(self, frame: dict[str, Any]) -> None:
        entry_id = frame["id"]
        if self.mode == "streams":
            key = protocol.parse_entry_id(entry_id)
            if self._last_key is not None and key <= self._last_key:
                self.duplicates_dropped += 1
                return
            self.last_id, self._last_key = entry_id, key
        message = Message(frame["room"], entry_id, frame["cmid"], frame["user"],
                          frame["text"], int(frame["ts"]))
        if self.keep:
            self.received.append(message)
        if self.on_message is not None:
            self.on_message(message)
        for count, reached in self._count_waiters:
            if len(self.received) >= count and not reached.done():
                reached.set_result(None)


def _dump(frame: dict[str, Any]) -> str:
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False)


def _ws_url(url: str) -> str:
    """Accept ``http://host:port`` as well as the full ``ws://host:port/ws``."""
    if url.startswith("http://"):
        url = "ws://" + url.removeprefix("http://")
    elif url.startswith("https://"):
        url = "wss://" + url.removeprefix("https://")
    if not url.rstrip("/").endswith("/ws"):
        url = url.rstrip("/") + "/ws"
    return url


def http_url(url: str) -> str:
    """A chat server's HTTP base (``http://host:port``) from any form of its
    URL that the client accepts."""
    return _http_base(_ws_url(url))


def _http_base(ws_url: str) -> str:
    """``ws://host:port/ws`` -> ``http://host:port``."""
    base = ws_url.removesuffix("/").removesuffix("/ws")
    if base.startswith("ws://"):
        return "http://" + base.removeprefix("ws://")
    return "https://" + base.removeprefix("wss://")
