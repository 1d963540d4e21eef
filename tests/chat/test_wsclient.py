"""The lean WebSocket client against real servers on loopback: aiohttp's
WebSocket server for the ordinary paths, and a tiny asyncio server writing
raw frames for what aiohttp never sends (fragments, masked or broken
frames, pings on demand)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import uvloop
from aiohttp import WSMsgType, web
from hypothesis import given
from hypothesis import strategies as st

from dslab.chat import wsclient
from dslab.chat.protocol import SUBPROTOCOL
from dslab.chat.wsclient import HandshakeFailed, LeanSocket

# Every wait in these tests; loopback answers in milliseconds.
WAIT_S = 5.0
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Inbox:
    """Collects the text messages a socket hands to ``on_text``."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[str] = asyncio.Queue()

    def on_text(self, text: str) -> None:
        self.queue.put_nowait(text)

    async def next(self) -> str:
        async with asyncio.timeout(WAIT_S):
            return await self.queue.get()


# -- a real aiohttp WebSocket server -------------------------------------------


class AiohttpServer:
    def __init__(self) -> None:
        self.url = ""
        self.close_frames: asyncio.Queue[int] = asyncio.Queue()


SERVER_KEY = web.AppKey("server", AiohttpServer)


async def _echo(request: web.Request) -> web.WebSocketResponse:
    """Echo text; ``close NNNN`` closes with that code; ``big N`` answers
    with N bytes; records the close code the client sends."""
    server = request.app[SERVER_KEY]
    ws = web.WebSocketResponse(protocols=(SUBPROTOCOL,), max_msg_size=1 << 20)
    await ws.prepare(request)
    async for message in ws:
        if message.type is not WSMsgType.TEXT:
            break
        if message.data.startswith("close "):
            await ws.close(code=int(message.data.split()[1]))
        elif message.data.startswith("big "):
            await ws.send_str("x" * int(message.data.split()[1]))
        else:
            await ws.send_str(message.data)
    if ws.close_code is not None:
        server.close_frames.put_nowait(ws.close_code)
    return ws


async def _forbidden(request: web.Request) -> web.Response:
    raise web.HTTPForbidden(text="origin not allowed\n")


@pytest.fixture
async def aiohttp_server() -> AsyncIterator[AiohttpServer]:
    """aiohttp's WebSocket server on 127.0.0.1:0; cleaned up after the test."""
    server = AiohttpServer()
    app = web.Application()
    app[SERVER_KEY] = server
    app.router.add_get("/ws", _echo)
    app.router.add_get("/forbidden", _forbidden)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        server.url = f"ws://127.0.0.1:{runner.addresses[0][1]}/ws"
        yield server
    finally:
        await runner.cleanup()


async def _open(url: str, inbox: Inbox, **options: int) -> LeanSocket:
    return await wsclient.connect(url, on_text=inbox.on_text,
                                  protocols=(SUBPROTOCOL,), timeout_s=WAIT_S,
                                  **options)


async def test_handshake_agrees_on_the_chat_subprotocol(
    aiohttp_server: AiohttpServer,
) -> None:
    """The upgrade succeeds and records the subprotocol the server chose."""
    socket = await _open(aiohttp_server.url, Inbox())
    try:
        assert socket.protocol == SUBPROTOCOL
    finally:
        await socket.close()


@pytest.mark.parametrize("text", [
    "héllo wörld ✓ 🚀 日本",  # multi-byte UTF-8, 7-bit length
    "é" * 100,  # 200 bytes: the 16-bit length path
    "ab✓" * 14_000,  # 70,000 bytes: the 64-bit length path
])
async def test_text_round_trips_through_the_server(
    aiohttp_server: AiohttpServer, text: str,
) -> None:
    """A masked text frame reaches the server intact and its echo comes back."""
    inbox = Inbox()
    socket = await _open(aiohttp_server.url, inbox)
    try:
        socket.send_text(text)
        await socket.drain()
        assert await inbox.next() == text
    finally:
        await socket.close()


async def test_many_frames_arrive_in_order(aiohttp_server: AiohttpServer) -> None:
    """Frames that share a read are all handed over, in order."""
    inbox = Inbox()
    socket = await _open(aiohttp_server.url, inbox)
    try:
        for n in range(200):
            socket.send_text(f"m{n}")
        assert [await inbox.next() for _ in range(200)] == [f"m{n}"
                                                            for n in range(200)]
    finally:
        await socket.close()


async def test_the_server_close_code_is_kept_and_echoed(
    aiohttp_server: AiohttpServer,
) -> None:
    """A close from the server ends the socket with its code, echoed back."""
    socket = await _open(aiohttp_server.url, Inbox())
    socket.send_text("close 4008")
    async with asyncio.timeout(WAIT_S):
        await socket.closed
        server_saw = await aiohttp_server.close_frames.get()

    assert socket.close_code == 4008
    assert server_saw == 4008


async def test_close_sends_the_code_and_waits_for_the_end(
    aiohttp_server: AiohttpServer,
) -> None:
    """``close()`` sends a close frame and returns once the connection ended."""
    socket = await _open(aiohttp_server.url, Inbox())
    await socket.close(4000)
    async with asyncio.timeout(WAIT_S):
        server_saw = await aiohttp_server.close_frames.get()

    assert socket.closed.done()
    assert socket.close_code == 4000
    assert server_saw == 4000
    with pytest.raises(ConnectionError):
        socket.send_text("too late")


async def test_a_refused_upgrade_reports_the_http_status(
    aiohttp_server: AiohttpServer,
) -> None:
    """A 403 answer is a HandshakeFailed carrying 403 and the server's words."""
    url = aiohttp_server.url.replace("/ws", "/forbidden")
    with pytest.raises(HandshakeFailed) as refused:
        await _open(url, Inbox())

    assert refused.value.status == 403
    assert "403" in str(refused.value)
    assert "origin not allowed" in str(refused.value)
    assert isinstance(refused.value, ConnectionError)


async def test_a_message_over_the_limit_closes_with_1009(
    aiohttp_server: AiohttpServer,
) -> None:
    """A message above max_message_bytes closes the socket with 1009."""
    inbox = Inbox()
    socket = await _open(aiohttp_server.url, inbox, max_message_bytes=1000)
    socket.send_text("big 1000")
    assert await inbox.next() == "x" * 1000
    socket.send_text("big 1001")
    async with asyncio.timeout(WAIT_S):
        await socket.closed
        server_saw = await aiohttp_server.close_frames.get()

    assert socket.close_code == wsclient.CLOSE_MESSAGE_TOO_BIG
    assert server_saw == wsclient.CLOSE_MESSAGE_TOO_BIG
    assert inbox.queue.empty()


async def test_an_error_in_the_callback_closes_and_surfaces(
    aiohttp_server: AiohttpServer,
) -> None:
    """If on_text raises, the socket closes and ``closed`` raises that error."""

    def explode(text: str) -> None:
        raise LookupError(f"cannot handle {text}")

    socket = await wsclient.connect(aiohttp_server.url, on_text=explode,
                                    timeout_s=WAIT_S)
    socket.send_text("boom")
    with pytest.raises(LookupError, match="cannot handle boom"):
        async with asyncio.timeout(WAIT_S):
            await socket.closed


# -- a raw frame server ----------------------------------------------------------

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def frame(opcode: int, payload: bytes, *, fin: bool = True,
          mask: bytes | None = None) -> bytes:
    """One frame as a server (unmasked) or a misbehaving one (masked) writes it."""
    first = (0x80 if fin else 0) | opcode
    size = len(payload)
    mask_bit = 0x80 if mask else 0
    if size < 126:
        head = struct.pack("!BB", first, mask_bit | size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", first, mask_bit | 126, size)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, size)
    if mask:
        return head + mask + wsclient.mask_payload(payload, mask)
    return head + payload


async def read_client_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The next (opcode, unmasked payload) from the client; it must be masked."""
    first, second = await reader.readexactly(2)
    assert second & 0x80, "client frames must be masked"
    size = second & 0x7F
    if size == 126:
        size = struct.unpack("!H", await reader.readexactly(2))[0]
    elif size == 127:
        size = struct.unpack("!Q", await reader.readexactly(8))[0]
    mask = await reader.readexactly(4)
    payload = await reader.readexactly(size)
    return first & 0x0F, wsclient.mask_payload(payload, mask)


async def read_close_code(reader: asyncio.StreamReader) -> int:
    """Skip to the client's close frame and return its code."""
    for _ in range(100):
        opcode, payload = await read_client_frame(reader)
        if opcode == wsclient.OP_CLOSE:
            return int.from_bytes(payload[:2], "big")
    raise AssertionError("no close frame from the client")


@asynccontextmanager
async def raw_server(script: Script, *, accept_ok: bool = True,
                     answer: bool = True) -> AsyncIterator[str]:
    """A one-connection server on 127.0.0.1:0 that upgrades by hand, then
    runs ``script``; yields the ws:// URL. The script's failures fail the test."""
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if not answer:
                await reader.read()  # until the client gives up and hangs up
                return
            key = next(line.split(b":", 1)[1].strip()
                       for line in head.split(b"\r\n")
                       if line.lower().startswith(b"sec-websocket-key:"))
            accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
            if not accept_ok:
                accept = base64.b64encode(b"not the right digest")
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket"
                         b"\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: "
                         + accept + b"\r\n\r\n")
            await script(reader, writer)
            if not done.done():
                done.set_result(None)
        except Exception as exc:
            if not done.done():
                done.set_exception(exc)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"ws://127.0.0.1:{port}/ws"
        if answer and accept_ok:
            async with asyncio.timeout(WAIT_S):
                await done  # the script ran to its end without failing
    finally:
        server.close()
        await server.wait_closed()


async def test_a_fragmented_message_is_reassembled_around_a_ping() -> None:
    """Fragments (a character split between two) make one message; a ping
    between them is answered with the same payload."""
    pongs: list[bytes] = []
    text = "hello wörld"
    encoded = text.encode()
    split = encoded.index("ö".encode()) + 1  # inside the two-byte character

    async def script(reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        writer.write(frame(wsclient.OP_TEXT, encoded[:4], fin=False)
                     + frame(wsclient.OP_PING, b"are you there")
                     + frame(wsclient.OP_CONTINUATION, encoded[4:split], fin=False))
        await writer.drain()
        opcode, payload = await read_client_frame(reader)
        if opcode == wsclient.OP_PONG:
            pongs.append(payload)
        writer.write(frame(wsclient.OP_CONTINUATION, encoded[split:]))
        await writer.drain()
        assert await read_close_code(reader) == 1000

    inbox = Inbox()
    async with raw_server(script) as url:
        socket = await _open(url, inbox)
        assert await inbox.next() == text
        await socket.close()

    assert pongs == [b"are you there"]
    assert inbox.queue.empty()


async def test_frames_split_across_reads_are_put_back_together() -> None:
    """A frame that arrives a byte at a time, or in chunks, is parsed whole."""
    small, large = "s" * 200, "L" * 70_000

    async def script(reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        for byte in frame(wsclient.OP_TEXT, small.encode()):
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0)
        data = frame(wsclient.OP_TEXT, large.encode()) + frame(wsclient.OP_TEXT, b"!")
        for start in range(0, len(data), 4096):
            writer.write(data[start:start + 4096])
            await writer.drain()
        assert await read_close_code(reader) == 1000

    inbox = Inbox()
    async with raw_server(script) as url:
        socket = await _open(url, inbox)
        assert [await inbox.next() for _ in range(3)] == [small, large, "!"]
        await socket.close()


@pytest.mark.parametrize(("bad_frame", "expected_code"), [
    (frame(wsclient.OP_TEXT, b"hidden", mask=b"\x01\x02\x03\x04"), 1002),
    (frame(wsclient.OP_TEXT, b"caf\xc3"), 1007),
    (frame(wsclient.OP_TEXT, b"ok", fin=False) + frame(wsclient.OP_TEXT, b"again"),
     1002),
    (frame(wsclient.OP_CONTINUATION, b"orphan"), 1002),
    (frame(0x3, b"reserved opcode"), 1002),
    (frame(wsclient.OP_TEXT, b"a" * 600, fin=False)
     + frame(wsclient.OP_CONTINUATION, b"b" * 600), 1009),
])
async def test_a_broken_server_frame_closes_with_the_rfc_code(
    bad_frame: bytes, expected_code: int,
) -> None:
    """Masked frames, bad UTF-8, misplaced or unknown frames and oversized
    fragmented messages each close the socket with the RFC 6455 code."""
    server_saw: list[int] = []

    async def script(reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        writer.write(frame(wsclient.OP_TEXT, b"before") + bad_frame)
        await writer.drain()
        server_saw.append(await read_close_code(reader))

    inbox = Inbox()
    async with raw_server(script) as url:
        socket = await _open(url, inbox, max_message_bytes=1000)
        assert await inbox.next() == "before"
        async with asyncio.timeout(WAIT_S):
            await socket.closed

    assert socket.close_code == expected_code
    assert server_saw == [expected_code]
    assert inbox.queue.empty()


async def test_a_server_close_without_a_code_is_answered() -> None:
    """An empty close frame gets an empty close back; the code reads 1005."""
    replies: list[bytes] = []

    async def script(reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        writer.write(frame(wsclient.OP_CLOSE, b""))
        await writer.drain()
        opcode, payload = await read_client_frame(reader)
        assert opcode == wsclient.OP_CLOSE
        replies.append(payload)

    async with raw_server(script) as url:
        socket = await _open(url, Inbox())
        async with asyncio.timeout(WAIT_S):
            await socket.closed

    assert replies == [b""]
    assert socket.close_code == wsclient.CLOSE_NO_STATUS


async def test_a_dropped_connection_reads_as_1006() -> None:
    """A connection that ends without a close frame has close code 1006."""

    async def script(reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        writer.write(frame(wsclient.OP_TEXT, b"bye"))
        await writer.drain()

    inbox = Inbox()
    async with raw_server(script) as url:
        socket = await _open(url, inbox)
        assert await inbox.next() == "bye"
        async with asyncio.timeout(WAIT_S):
            await socket.closed

    assert socket.close_code == wsclient.CLOSE_ABNORMAL


async def test_a_wrong_accept_value_is_refused() -> None:
    """A 101 whose Sec-WebSocket-Accept does not match our key is refused."""

    async def script(reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async with raw_server(script, accept_ok=False) as url:
        with pytest.raises(HandshakeFailed, match="Sec-WebSocket-Accept") as refused:
            await _open(url, Inbox())

    assert refused.value.status == 101


async def test_a_silent_server_times_out_the_handshake() -> None:
    """A server that never answers the upgrade fails it within timeout_s."""

    async def script(reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        return

    async with raw_server(script, answer=False) as url:
        with pytest.raises(HandshakeFailed, match=r"within 0\.2 s"):
            await wsclient.connect(url, on_text=Inbox().on_text, timeout_s=0.2)


def test_works_on_uvloop_whose_transports_are_not_asyncio_s() -> None:
    """On uvloop (the load generator's loop) frames go out and come back."""

    async def round_trip() -> tuple[str, int | None]:
        async def script(reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
            opcode, payload = await read_client_frame(reader)
            writer.write(frame(opcode, payload[::-1]))
            await writer.drain()
            await read_close_code(reader)

        inbox = Inbox()
        async with raw_server(script) as url:
            socket = await _open(url, inbox)
            socket.send_text("uvloop")
            echoed = await inbox.next()
            await socket.close()
        return echoed, socket.close_code

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(round_trip()) == ("poolvu", 1000)


@given(payload=st.binary(max_size=300), mask=st.binary(min_size=4, max_size=4))
def test_masking_matches_the_byte_by_byte_definition(
    payload: bytes, mask: bytes,
) -> None:
    """The big-integer XOR equals RFC 6455's per-byte masking, for any input."""
    expected = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    assert wsclient.mask_payload(payload, mask) == expected
