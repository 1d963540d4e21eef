"""A lean WebSocket client on ``asyncio.Protocol``: the chat load generator's
transport, where a received frame costs as little generator CPU as it can.

A frame is parsed inside ``data_received`` and its text handed to the
caller's ``on_text`` callback right there, synchronously: no reader task to
wake, no queue, and every frame that arrived in one ``recv`` handled in one
pass. That makes ``on_text`` part of the hot path: it must be quick and must
not block. If it raises, the socket is closed and the exception is set on
``LeanSocket.closed``, so the owner sees it.

What it implements of RFC 6455, client side:

- the opening handshake (``ws://``, and ``wss://`` through an SSL context):
  key, version 13, offered subprotocols; a non-101 answer or a wrong
  ``Sec-WebSocket-Accept`` is a ``HandshakeFailed`` carrying the HTTP
  status; the answer's head is bounded and connect + handshake is timed;
- frames in: all three length encodings, text, binary, fragmented messages
  (reassembled, bounded by ``max_message_bytes`` -> close 1009), ping
  (answered with a pong of the same payload), pong (ignored), close
  (answered with the same code, then the connection is closed); a masked
  server frame, reserved bits, unknown opcodes or bad control frames ->
  close 1002; invalid UTF-8 in a text message -> close 1007;
- frames out: every frame masked with four fresh random bytes.

What it deliberately does not do: extensions (permessage-deflate is not
offered, and an answer that turns one on is refused), automatic pings or
keep-alive (the chat server pings; we answer), cookies, proxies, redirects,
or streaming a message before it is complete. Writes do not wait: call
``drain()`` to respect back-pressure.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import ssl
import struct
from collections.abc import Callable, Sequence
from typing import cast
from urllib.parse import urlsplit

from dslab.errors import DslabError, UsageError

log = logging.getLogger(__name__)

# RFC 6455 section 1.3: the server hashes our key with this GUID.
ACCEPT_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# A 101 answer is a few hundred bytes; a head this long is not a WebSocket
# server, and reading on would let it make us buffer without end.
MAX_HANDSHAKE_BYTES = 16 * 1024
# TCP connect plus the upgrade round trip, on a LAN or loopback.
CONNECT_TIMEOUT_S = 5.0
# How long ``close()`` waits for the server's close frame before hanging up.
CLOSE_TIMEOUT_S = 2.0
# Default bound on one reassembled message: far above any chat frame.
MAX_MESSAGE_BYTES = 1024 * 1024
# RFC 6455 section 5.5: control frames carry at most 125 bytes.
MAX_CONTROL_PAYLOAD_BYTES = 125
# How much of a refusal's body goes into the error message.
REFUSAL_BODY_CHARS = 200

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_NO_STATUS = 1005  # never sent: the close frame carried no code
CLOSE_ABNORMAL = 1006  # never sent: the connection ended without a close frame
CLOSE_INVALID_DATA = 1007
CLOSE_MESSAGE_TOO_BIG = 1009
# Codes a peer may put in a close frame (RFC 6455 7.4 and the IANA registry).
_SENDABLE_CLOSE_CODES = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009,
                                   1010, 1011, 1012, 1013, 1014})
# First byte of an unfragmented text frame: FIN set, no reserved bits.
_FIN_TEXT = 0x80 | OP_TEXT


class HandshakeFailed(DslabError, ConnectionError):
    """The server did not upgrade the connection; ``status`` is its HTTP
    status (None when it did not answer HTTP at all). A ``ConnectionError``
    too, so code that retries on connection errors retries on it."""

    def __init__(self, message: str, *, status: int | None = None,
                 fix: str | None = None) -> None:
        super().__init__(message, fix=fix or "check that the URL is the "
                         "server's WebSocket endpoint and the server is up")
        self.status = status


class SocketClosed(DslabError, ConnectionError):
    """A send on a socket that is closing or closed."""

    def __init__(self) -> None:
        super().__init__("the WebSocket is closed",
                         fix="reconnect before sending")


class LeanSocket(asyncio.Protocol):
    """One client WebSocket. Made by ``connect``; not meant to be built alone.

    ``closed`` is done once the connection has ended for any reason: with
    the exception ``on_text`` raised, else with None. ``close_code`` is the
    code of the close handshake: the one the server sent first, or the one
    we sent first; ``CLOSE_ABNORMAL`` if the connection ended without one.
    """

    def __init__(
        self, *, url: str, request: bytes, accept: str,
        protocols: Sequence[str], max_message_bytes: int,
        on_text: Callable[[str], None],
        on_binary: Callable[[bytes], None] | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        self.url = url
        self.closed: asyncio.Future[None] = loop.create_future()
        self.close_code: int | None = None
        self.protocol: str | None = None  # the subprotocol the server chose
        self.handshake: asyncio.Future[None] = loop.create_future()
        self._loop = loop
        self._request = request
        self._accept = accept
        self._protocols = tuple(protocols)
        self._max_message_bytes = max_message_bytes
        self._on_text = on_text
        self._on_binary = on_binary
        self._transport: asyncio.Transport | None = None
        self._head = bytearray()  # the server's answer, until the blank line
        self._upgraded = False
        self._reading = True  # False once we stopped taking frames
        self._tail = bytearray()  # bytes of a frame not complete yet
        self._tail_needed = 0  # how long _tail must be before parsing again
        self._fragments: list[bytes] | None = None
        self._fragment_opcode = OP_TEXT
        self._fragment_bytes = 0
        self._close_sent = False
        self._close_timer: asyncio.TimerHandle | None = None
        self._error: BaseException | None = None
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's does not subclass asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)
        self._transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        if self._upgraded:
            if self._reading:
                self._feed(data)
            return

        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if (end < 0 and len(self._head) > MAX_HANDSHAKE_BYTES) \
                or end > MAX_HANDSHAKE_BYTES:
            self._refuse(HandshakeFailed(f"{self.url}: the handshake answer is "
                                         f"longer than {MAX_HANDSHAKE_BYTES} bytes"))
            return
        if end < 0:
            return  # the rest of the answer is on its way

        head, rest = bytes(self._head[:end]), bytes(self._head[end + 4:])
        self._head = bytearray()
        problem = self._check_answer(head, rest)
        if problem is not None:
            self._refuse(problem)
            return

        self._upgraded = True
        self.handshake.set_result(None)
        if rest:
            self._feed(rest)

    def eof_received(self) -> bool | None:
        return False  # let the transport close: a half-open socket is useless

    def connection_lost(self, exc: Exception | None) -> None:
        if self._close_timer is not None:
            self._close_timer.cancel()
        self._reading = False
        if not self.handshake.done():
            self.handshake.set_exception(HandshakeFailed(
                f"{self.url}: the connection closed during the handshake"
                + (f" ({exc})" if exc else "")))
        if self.close_code is None:
            self.close_code = CLOSE_ABNORMAL
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        if not self.closed.done():
            if self._error is not None:
                self.closed.set_exception(self._error)
            else:
                self.closed.set_result(None)
        log.debug("websocket closed: %s code %s", self.url, self.close_code)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # -- the public API ------------------------------------------------------

    def send_text(self, text: str) -> None:
        """Queue one text message; raises ``SocketClosed`` once closing."""
        if self._close_sent or self._transport is None \
                or self._transport.is_closing():
            raise SocketClosed()
        self._write_frame(OP_TEXT, text.encode())

    async def drain(self) -> None:
        """Wait while the transport's write buffer is above its high mark."""
        if not self._write_paused or self.closed.done():
            return
        if self._drained is None or self._drained.done():
            self._drained = self._loop.create_future()
        await asyncio.shield(self._drained)

    async def close(self, code: int = CLOSE_NORMAL) -> None:
        """Start the close handshake and wait (at most CLOSE_TIMEOUT_S) for
        the connection to end. Never raises what ``closed`` holds."""
        self._send_close(code)
        await asyncio.wait([self.closed])

    def hang_up(self, code: int = CLOSE_NORMAL) -> None:
        """Send a close frame if none was sent and close the connection
        without waiting for the server's answer."""
        self._send_close(code)
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Drop the connection at once: no close frame, unsent data lost."""
        if self._transport is not None:
            self._transport.abort()

    # -- the handshake -------------------------------------------------------

    def _check_answer(self, head: bytes, rest: bytes) -> HandshakeFailed | None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") \
                or not parts[1].isdigit():
            return HandshakeFailed(f"{self.url}: not an HTTP answer: "
                                   f"{lines[0][:80]!r}")
        status = int(parts[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon:
                return HandshakeFailed(f"{self.url}: malformed header line "
                                       f"{line[:80]!r}", status=status)
            name, value = name.strip().lower(), value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value

        if status != 101:
            return _refusal(self.url, status, parts[2] if len(parts) > 2 else "",
                            rest)
        connection = {token.strip().lower()
                      for token in headers.get("connection", "").split(",")}
        if headers.get("upgrade", "").lower() != "websocket" \
                or "upgrade" not in connection:
            return HandshakeFailed(f"{self.url}: answered 101 without upgrading "
                                   "to websocket", status=status)
        if headers.get("sec-websocket-accept") != self._accept:
            return HandshakeFailed(f"{self.url}: wrong Sec-WebSocket-Accept: not "
                                   "a WebSocket server, or a broken proxy",
                                   status=status)
        if headers.get("sec-websocket-extensions"):
            return HandshakeFailed(f"{self.url}: the server turned on extensions "
                                   "we did not offer", status=status)
        chosen = headers.get("sec-websocket-protocol")
        if chosen is not None and chosen not in self._protocols:
            return HandshakeFailed(f"{self.url}: the server chose subprotocol "
                                   f"{chosen!r}, not one of {self._protocols}",
                                   status=status)
        self.protocol = chosen
        return None

    def _refuse(self, problem: HandshakeFailed) -> None:
        self._reading = False
        if not self.handshake.done():
            self.handshake.set_exception(problem)
        if self._transport is not None:
            self._transport.close()

    # -- frames in -----------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        """Parse and handle every complete frame in ``data`` (after what is
        left of an earlier one); keep the incomplete rest for later."""
        if self._tail:
            self._tail += data
            if len(self._tail) < self._tail_needed:
                return  # a long frame still arriving: do not re-parse it
            data = bytes(self._tail)
            self._tail = bytearray()

        end, pos, needed = len(data), 0, 0
        on_text = self._on_text
        while pos < end:
            if end - pos < 2:
                needed = 2
                break
            first, second = data[pos], data[pos + 1]
            length, start = second & 0x7F, pos + 2
            if length > 125:
                start += 2 if length == 126 else 8
                if start > end:
                    needed = start - pos
                    break
                length = int.from_bytes(data[pos + 2:start], "big")
            if second & 0x80:
                self._fail(CLOSE_PROTOCOL_ERROR, "masked frame from the server")
                return
            if length > self._max_message_bytes:
                self._fail(CLOSE_MESSAGE_TOO_BIG, f"frame of {length} bytes")
                return
            stop = start + length
            if stop > end:
                needed = stop - pos
                break

            if first == _FIN_TEXT and self._fragments is None:
                # The hot path: one whole text message in one frame.
                try:
                    text = data[start:stop].decode()
                except UnicodeDecodeError:
                    self._fail(CLOSE_INVALID_DATA, "invalid UTF-8 in a text frame")
                    return
                try:
                    on_text(text)
                except Exception as exc:
                    self._fail_callback(exc)
                    return
                if not self._reading:
                    return  # the callback hung up
            else:
                self._frame(first, data[start:stop])
                if not self._reading:
                    return
            pos = stop

        if pos < end:
            self._tail = bytearray(data[pos:])
            self._tail_needed = needed

    def _frame(self, first: int, payload: bytes) -> None:
        """Every frame but a whole text message: control frames, binary
        messages and fragments."""
        fin, opcode = first & 0x80, first & 0x0F
        if first & 0x70:
            self._fail(CLOSE_PROTOCOL_ERROR, "reserved bits set, no extension")
            return
        if opcode >= OP_CLOSE:
            if not fin or len(payload) > MAX_CONTROL_PAYLOAD_BYTES:
                self._fail(CLOSE_PROTOCOL_ERROR, "fragmented or long control frame")
            elif opcode == OP_CLOSE:
                self._close_received(payload)
            elif opcode == OP_PING:
                self._write_frame(OP_PONG, payload)
            elif opcode != OP_PONG:
                self._fail(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
            return

        if opcode == OP_CONTINUATION:
            if self._fragments is None:
                self._fail(CLOSE_PROTOCOL_ERROR, "continuation without a start")
                return
            self._fragment_bytes += len(payload)
            if self._fragment_bytes > self._max_message_bytes:
                self._fail(CLOSE_MESSAGE_TOO_BIG,
                           f"message of over {self._max_message_bytes} bytes")
                return
            self._fragments.append(payload)
            if fin:
                message, opcode = b"".join(self._fragments), self._fragment_opcode
                self._fragments = None
                self._deliver(opcode, message)
        elif opcode in (OP_TEXT, OP_BINARY):
            if self._fragments is not None:
                self._fail(CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one")
            elif fin:
                self._deliver(opcode, payload)
            else:
                self._fragments, self._fragment_opcode = [payload], opcode
                self._fragment_bytes = len(payload)
        else:
            self._fail(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")

    def _deliver(self, opcode: int, message: bytes) -> None:
        try:
            if opcode == OP_TEXT:
                try:
                    text = message.decode()
                except UnicodeDecodeError:
                    self._fail(CLOSE_INVALID_DATA, "invalid UTF-8 in a text message")
                    return
                self._on_text(text)
            elif self._on_binary is not None:
                self._on_binary(message)
            else:
                log.debug("binary message of %d bytes dropped: %s",
                          len(message), self.url)
        except Exception as exc:
            self._fail_callback(exc)

    def _close_received(self, payload: bytes) -> None:
        self._reading = False
        if len(payload) == 1:
            self._fail(CLOSE_PROTOCOL_ERROR, "close frame with a 1-byte payload")
            return
        code = int.from_bytes(payload[:2], "big") if payload else CLOSE_NO_STATUS
        if payload and not (code in _SENDABLE_CLOSE_CODES or 3000 <= code <= 4999):
            self._fail(CLOSE_PROTOCOL_ERROR, f"close code {code} is not sendable")
            return
        try:
            payload[2:].decode()
        except UnicodeDecodeError:
            self._fail(CLOSE_INVALID_DATA, "invalid UTF-8 in the close reason")
            return

        if self.close_code is None:
            self.close_code = code
        if not self._close_sent:  # the server started it: answer in kind
            self._send_close(code)
        if self._transport is not None:
            self._transport.close()

    def _fail(self, code: int, why: str) -> None:
        """The server broke the protocol: close with ``code`` and stop."""
        log.debug("websocket protocol error from %s: %s (closing %d)",
                  self.url, why, code)
        self.hang_up(code)

    def _fail_callback(self, exc: Exception) -> None:
        """``on_text`` raised: hang up and let ``closed`` carry the error."""
        if self._error is None:
            self._error = exc
        self.hang_up(CLOSE_NORMAL)

    # -- frames out ----------------------------------------------------------

    def _send_close(self, code: int) -> None:
        """Send our close frame once; abort if the connection outlives the
        timeout. 1005 is never put on the wire: it means "no code"."""
        self._reading = False
        if self._close_sent or self._transport is None \
                or self._transport.is_closing():
            return
        if self.close_code is None:
            self.close_code = code
        self._close_sent = True
        payload = b"" if code == CLOSE_NO_STATUS else code.to_bytes(2, "big")
        self._write_frame(OP_CLOSE, payload)
        self._close_timer = self._loop.call_later(CLOSE_TIMEOUT_S, self.abort)

    def _write_frame(self, opcode: int, payload: bytes) -> None:
        assert self._transport is not None
        mask, size = os.urandom(4), len(payload)
        if size < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
        elif size < 1 << 16:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
        self._transport.write(header + mask + mask_payload(payload, mask))


def mask_payload(payload: bytes, mask: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte ``mask`` repeated: one big-integer XOR
    over the whole payload instead of a Python loop per byte. Its own
    inverse, so it also unmasks."""
    size = len(payload)
    if size == 0:
        return b""
    repeated = (mask * (size // 4 + 1))[:size]
    masked = int.from_bytes(payload, "little") ^ int.from_bytes(repeated, "little")
    return masked.to_bytes(size, "little")


async def connect(
    url: str, *, on_text: Callable[[str], None],
    protocols: Sequence[str] = (), timeout_s: float = CONNECT_TIMEOUT_S,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    on_binary: Callable[[bytes], None] | None = None,
    origin: str | None = None, ssl_context: ssl.SSLContext | None = None,
) -> LeanSocket:
    """Open a WebSocket to ``url`` (``ws://`` or ``wss://``) and return it
    once upgraded. ``on_text`` gets each text message, from inside the
    event loop's read callback; it may be called before this returns.

    Raises ``HandshakeFailed`` (a ConnectionError) for a refused or broken
    upgrade or a timeout, and OSError if the TCP connection fails.
    """
    target = urlsplit(url)
    if target.scheme not in ("ws", "wss") or not target.hostname:
        raise UsageError(f"not a WebSocket URL: {url!r}",
                         fix="use ws://host:port/path or wss://host:port/path")
    secure = target.scheme == "wss"
    host = target.hostname
    port = target.port or (443 if secure else 80)
    key = base64.b64encode(os.urandom(16)).decode()
    accept = base64.b64encode(
        hashlib.sha1((key + ACCEPT_GUID).encode()).digest()).decode()
    request = _upgrade_request(target.netloc.rpartition("@")[2],
                               _path(target.path, target.query), key,
                               protocols, origin)
    context = (ssl_context or ssl.create_default_context()) if secure else None

    def build() -> LeanSocket:
        return LeanSocket(url=url, request=request, accept=accept,
                          protocols=protocols, max_message_bytes=max_message_bytes,
                          on_text=on_text, on_binary=on_binary)

    loop = asyncio.get_running_loop()
    socket: LeanSocket | None = None
    try:
        async with asyncio.timeout(timeout_s):
            _, socket = await loop.create_connection(
                build, host, port, ssl=context,
                server_hostname=host if secure else None)
            await socket.handshake
    except TimeoutError as exc:
        if socket is not None:
            socket.abort()
        raise HandshakeFailed(f"{url}: no WebSocket handshake within "
                              f"{timeout_s:g} s") from exc
    except BaseException:
        if socket is not None:
            socket.abort()
        raise
    return socket


def _path(path: str, query: str) -> str:
    return (path or "/") + (f"?{query}" if query else "")


def _upgrade_request(host: str, path: str, key: str, protocols: Sequence[str],
                     origin: str | None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Key: {key}",
             "Sec-WebSocket-Version: 13"]
    if protocols:
        lines.append("Sec-WebSocket-Protocol: " + ", ".join(protocols))
    if origin is not None:
        lines.append(f"Origin: {origin}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _refusal(url: str, status: int, reason: str, body: bytes) -> HandshakeFailed:
    """A non-101 answer, with what the server said and the likely fix."""
    said = body[:REFUSAL_BODY_CHARS].decode("utf-8", "replace").strip()
    message = f"{url}: the server refused the WebSocket upgrade: HTTP {status}"
    message += f" {reason}".rstrip() + (f": {said}" if said else "")
    if status == 403:
        fix = "the server refused this client (Origin or identity): check its " \
              "allowed origins"
    elif status == 404:
        fix = "check the URL's path: it is not a WebSocket endpoint"
    else:
        fix = "check the URL and the server's log"
    return HandshakeFailed(message, status=status, fix=fix)
