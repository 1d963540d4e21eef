"""The fan-out's write path: frames encoded once per server, written at once
while a socket keeps up, queued in order (and bounded) when it does not."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from dslab.chat.client import ChatClient
from dslab.chat.fanout import Outbox, OutFrame, websocket_text_frame
from tests.chat.conftest import StartChat

WAIT_S = 10.0
# Payload sizes on both sides of each WebSocket length-encoding boundary.
FRAME_SIZES = (0, 1, 125, 126, 65535, 65536, 70000)


async def test_text_frames_are_read_intact_by_an_independent_client() -> None:
    """aiohttp's client parses every length encoding the server writes raw."""
    payloads = [("é" * (size // 2) + "x" * (size % 2)).encode() for size in
                FRAME_SIZES]

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        transport = request.transport
        assert transport is not None
        for payload in payloads:
            transport.write(websocket_text_frame(payload))
        await ws.receive()  # until the client closes
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as session, session.ws_connect(
            f"ws://127.0.0.1:{port}/ws", max_msg_size=1 << 20,
        ) as ws:
            received = []
            async with asyncio.timeout(WAIT_S):
                for _ in payloads:
                    message = await ws.receive()
                    assert message.type is aiohttp.WSMsgType.TEXT
                    received.append(message.data.encode())
    finally:
        await runner.cleanup()
    assert received == payloads


async def test_outbox_keeps_offer_order_across_direct_and_queued_writes() -> None:
    """Once a frame is queued, later frames queue behind it even when the
    socket could take them at once; the writer sends them in order."""
    wire: list[bytes] = []
    socket_keeps_up = True

    def write_now(data: bytes) -> bool:
        if socket_keeps_up:
            wire.append(data)
        return socket_keeps_up

    async def send(frame: OutFrame) -> None:
        wire.append(frame.wire)

    overflows: list[bool] = []
    outbox = Outbox(lambda: overflows.append(True), capacity=8,
                    write_now=write_now)
    frames = [OutFrame(f"m{n}") for n in range(5)]
    assert outbox.offer(frames[0]) is True
    socket_keeps_up = False
    assert outbox.offer_all(frames[1:3]) is False
    socket_keeps_up = True
    assert outbox.offer(frames[3]) is False  # behind the queued ones
    writer = asyncio.create_task(outbox.pump(send))
    try:
        async with asyncio.timeout(WAIT_S):
            while not outbox.queue.empty():
                await asyncio.sleep(0)
        assert outbox.offer(frames[4]) is True
    finally:
        writer.cancel()
    assert wire == [frame.wire for frame in frames]
    assert overflows == []


def test_a_full_outbox_reports_its_socket_slow_once() -> None:
    """Past capacity the outbox calls on_overflow once and drops the rest."""
    overflows: list[bool] = []
    outbox = Outbox(lambda: overflows.append(True), capacity=2,
                    write_now=lambda data: False)
    for n in range(5):
        outbox.offer(f"m{n}")
    assert overflows == [True]
    assert outbox.queue.qsize() == 2


async def test_one_batch_reaches_every_socket_in_stream_order(
    start_chat: StartChat,
) -> None:
    """Messages sent back to back reach all members once, in the same order."""
    server = await start_chat(send_rate_per_s=1e6, send_burst=1_000_000)
    members = [ChatClient([server.url], "batch", f"u{n}") for n in range(5)]
    for member in members:
        await member.__aenter__()
    try:
        for member in members:
            await member.wait_joined()
        async with asyncio.TaskGroup() as group:
            for n in range(40):
                group.create_task(members[n % 5].send(f"n{n}", f"c{n}"))
        for member in members:
            await member.wait_for_count(40, WAIT_S)
    finally:
        for member in members:
            await member.close()
    orders = [[message.entry_id for message in member.received]
              for member in members]
    assert len(set(orders[0])) == 40
    assert all(order == orders[0] for order in orders)
