"""Delivery through real chat servers on one real Redis: order, resume, gaps,
slow consumers, the naive pub/sub mode, presence and the HTTP endpoints."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from dslab.chat import protocol
from dslab.chat.client import ChatClient
from dslab.chat.fanout import Delivery
from dslab.chat.store import ChatStore, log_key
from tests.chat import rawws
from tests.chat.conftest import StartChat

WAIT_S = 10.0
# For tests that send as fast as they can: no rate limit in the way.
UNLIMITED: dict[str, Any] = {"send_rate_per_s": 1e6, "send_burst": 1_000_000}
# Enough 4 KB messages to fill loopback socket buffers (about 4 MB).
MAX_SLOW_TEST_SENDS = 4000


async def stream_ids(redis_client: Any, room: str) -> list[str]:
    entries = await redis_client.xrange(log_key(room), "-", "+")
    return [str(entry_id) for entry_id, _ in entries]


def ids(client: ChatClient) -> list[str]:
    return [message.entry_id for message in client.received]


async def test_two_servers_deliver_every_message_once_in_room_order(
    start_chat: StartChat, redis_client: Any,
) -> None:
    """Clients on two servers each get every message of their room once, in
    stream order, and nothing from the other room."""
    one, two = await start_chat(), await start_chat()
    rooms = ["red", "blue"]
    clients = [ChatClient([server.url], room, f"u{i}")
               for i, (server, room) in enumerate(
                   (s, r) for s in (one, two) for r in rooms for _ in range(2))]
    for client in clients:
        await client.__aenter__()
    try:
        for client in clients:
            await client.wait_joined()

        async def chatter(client: ChatClient) -> None:
            for n in range(10):
                await client.send(f"{client.user} says {n}")

        async with asyncio.TaskGroup() as group:
            for client in clients:
                group.create_task(chatter(client))

        for room in rooms:
            expected = await stream_ids(redis_client, room)
            assert len(expected) == 40
            for client in (c for c in clients if c.room == room):
                await client.wait_for_count(40, WAIT_S)
                assert ids(client) == expected
                assert client.duplicates_dropped == 0
    finally:
        for client in clients:
            await client.close()


async def test_retried_send_is_acknowledged_with_the_original_id(
    start_chat: StartChat,
) -> None:
    """Sending the same cmid twice acks the same ID and delivers one message."""
    server = await start_chat()
    async with ChatClient([server.url], "r", "ada") as client:
        await client.wait_joined()
        first = await client.send("once", cmid="fixed-cmid")
        second = await client.send("once", cmid="fixed-cmid")
        marker = await client.send("after")
        await client.wait_for_count(2, WAIT_S)

    assert (second.entry_id, second.duplicate) == (first.entry_id, True)
    assert ids(client) == [first.entry_id, marker.entry_id]


async def test_resume_replays_exactly_the_missed_messages(
    start_chat: StartChat,
) -> None:
    """A client that rejoins with its last ID gets exactly what it missed."""
    one, two = await start_chat(), await start_chat()
    async with ChatClient([two.url], "r", "sender") as sender:
        async with ChatClient([one.url], "r", "reader") as reader:
            await reader.wait_joined()
            seen = [await sender.send(f"before {n}") for n in range(5)]
            await reader.wait_for_count(5, WAIT_S)
            last_id = reader.last_id
        missed = [await sender.send(f"while away {n}") for n in range(30)]

        async with ChatClient([one.url], "r", "reader", last_id=last_id) as back:
            await back.wait_for_count(30, WAIT_S)
            later = await sender.send("live again")
            await back.wait_for_count(31, WAIT_S)

    assert last_id == seen[-1].entry_id
    assert ids(back) == [ack.entry_id for ack in [*missed, later]]
    assert back.duplicates_dropped == 0


async def test_messages_sent_during_the_replay_are_not_lost_or_doubled(
    start_chat: StartChat, redis_client: Any,
) -> None:
    """A join replaying a long history while others keep sending ends with
    the whole stream once, in order, with no duplicate from the server."""
    one, two = await start_chat(), await start_chat(**UNLIMITED)
    chat_store = ChatStore(redis_client)
    for batch in range(30):
        await asyncio.gather(*(chat_store.append("busy", "bot", f"h{batch}-{i}", "x")
                               for i in range(50)))
    stop = asyncio.Event()

    async def keep_sending(sender: ChatClient) -> int:
        sent = 0
        while not stop.is_set() and sent < 2000:
            await sender.send(f"live {sent}")
            sent += 1
        return sent

    async with ChatClient([two.url], "busy", "sender") as sender:
        await sender.wait_joined()
        async with asyncio.TaskGroup() as group:
            sending = group.create_task(keep_sending(sender))
            await asyncio.sleep(0.05)
            async with ChatClient([one.url], "busy", "late", last_id="0-0") as late:
                await late.wait_for_count(1600, WAIT_S)
                stop.set()
                await sending
                expected = await stream_ids(redis_client, "busy")
                await late.wait_for_count(len(expected), WAIT_S)

    assert sending.result() > 0
    assert ids(late) == expected
    assert late.duplicates_dropped == 0


async def test_resume_past_retention_reports_the_gap(
    start_chat: StartChat, redis_client: Any,
) -> None:
    """Joining from a trimmed cursor yields a gap frame, then what is kept."""
    server = await start_chat(max_entries=10)
    chat_store = ChatStore(redis_client, max_entries=10)
    first = await chat_store.append("r", "bot", "c0", "gone soon")
    for n in range(1, 150):
        await chat_store.append("r", "bot", f"c{n}", "filler")
    kept = await stream_ids(redis_client, "r")

    async with ChatClient([server.url], "r", "late", last_id=first.entry_id) as late:
        await late.wait_for_count(len(kept), WAIT_S)

    assert len(late.gaps) == 1
    gap_from, gap_to = late.gaps[0]
    assert gap_from == first.entry_id
    assert protocol.parse_entry_id(gap_to) < protocol.parse_entry_id(kept[0])
    assert ids(late) == kept


async def test_slow_consumer_is_closed_while_others_keep_receiving(
    start_chat: StartChat,
) -> None:
    """A socket that stops reading is closed with 4008; the room goes on."""
    server = await start_chat(outbox_frames=8, **UNLIMITED)
    metrics = server.server.metrics
    # The raw socket blocks: its calls run in a thread, off the event loop.
    slow = await asyncio.to_thread(rawws.connect, server.host, server.port)
    text = "y" * (protocol.MAX_TEXT_BYTES - 16)
    senders = [ChatClient([server.url], "r", f"sender{n}") for n in range(4)]

    async def send_until_slow_is_closed(sender: ChatClient) -> int:
        # Kernel buffers on loopback hold a few MB: fill them, within a cap.
        for n in range(MAX_SLOW_TEST_SENDS // len(senders)):
            if metrics.slow_consumers._value.get() > 0:
                return n
            await sender.send(f"{n} {text}")
        return MAX_SLOW_TEST_SENDS // len(senders)

    try:
        await asyncio.to_thread(rawws.send_json, slow,
                                {"type": "join", "room": "r", "user": "sloth"})
        async with ChatClient([server.url], "r", "reader") as reader:
            await reader.wait_joined()
            async with asyncio.TaskGroup() as group:
                for sender in senders:
                    await sender.__aenter__()
                counts = [group.create_task(send_until_slow_is_closed(sender))
                          for sender in senders]
            total = sum(task.result() for task in counts)
            await reader.wait_for_count(total, WAIT_S)
        code = await asyncio.to_thread(rawws.drain_until_close, slow)
    finally:
        slow.close()
        for sender in senders:
            await sender.close()

    assert metrics.slow_consumers._value.get() == 1
    assert code == protocol.CLOSE_SLOW_CONSUMER
    assert reader.close_codes == []


async def test_pubsub_mode_has_no_replay(start_chat: StartChat) -> None:
    """In pubsub mode a join with an old cursor replays nothing: history is lost."""
    server = await start_chat(delivery=Delivery.PUBSUB)
    async with ChatClient([server.url], "r", "early") as early:
        await early.wait_joined()
        for n in range(5):
            await early.send(f"early {n}")
        await early.wait_for_count(5, WAIT_S)

        async with ChatClient([server.url], "r", "late", last_id="0-0") as late:
            await late.wait_joined()
            await early.send("live")
            await late.wait_for_count(1, WAIT_S)
            await asyncio.sleep(0.2)

    assert late.mode == "pubsub"
    assert [message.text for message in late.received] == ["live"]


async def test_presence_lists_users_of_both_servers_and_drops_leavers(
    start_chat: StartChat,
) -> None:
    """Presence shows users connected to either server; one who leaves goes."""
    one, two = await start_chat(), await start_chat()

    async def users_become(client: ChatClient, wanted: list[str]) -> None:
        async with asyncio.timeout(WAIT_S):
            while client.users != wanted:
                await asyncio.sleep(0.05)

    async with ChatClient([one.url], "r", "ada") as ada:
        async with ChatClient([two.url], "r", "bob"):
            await users_become(ada, ["ada", "bob"])
        await users_become(ada, ["ada"])


async def test_protocol_errors_are_answered_with_their_codes(
    start_chat: StartChat,
) -> None:
    """Bad frames get error frames; a frame over the limit closes with 1009."""
    server = await start_chat()
    async with aiohttp.ClientSession() as session, \
            session.ws_connect(server.ws_url) as ws:
        await ws.send_str("{nope")
        assert (await ws.receive_json())["code"] == "bad_json"
        await ws.send_json({"type": "send", "room": "r", "cmid": "c", "text": "hi"})
        reply = await ws.receive_json()
        assert (reply["code"], reply["cmid"]) == ("not_joined", "c")
        await ws.send_json({"type": "ping", "t": 1})
        assert await ws.receive_json() == {"type": "pong", "t": 1}
        await ws.send_str(json.dumps({"type": "ping", "t": "x" * 20_000}))
        closing = await ws.receive()
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG


async def test_health_metrics_and_page_are_served(start_chat: StartChat) -> None:
    """/healthz says ok, /metrics counts sends, / serves the web UI."""
    server = await start_chat()
    async with ChatClient([server.url], "r", "ada") as client:
        await client.wait_joined()
        await client.send("counted")
        await client.wait_for_count(1, WAIT_S)
        async with aiohttp.ClientSession() as session:
            async with session.get(server.url + "/healthz") as response:
                health = await response.json()
            async with session.get(server.url + "/metrics") as response:
                metrics = await response.text()
            async with session.get(server.url + "/") as response:
                page = await response.text()

    assert health["status"] == "ok" and health["rooms"] == {"r": 1}
    assert "dslab_chat_messages_in_total 1.0" in metrics
    assert "dslab_chat_delivery_seconds_count 1.0" in metrics
    assert "textContent" in page and "innerHTML" not in page
