"""The server's refusals: foreign Origin, send rate, sockets per user."""

from __future__ import annotations

import aiohttp
import pytest

from dslab.chat import protocol
from tests.chat.conftest import StartChat


async def test_foreign_origin_is_refused_and_own_origin_accepted(
    start_chat: StartChat,
) -> None:
    """A WebSocket handshake from another site's page gets 403; the server's
    own page and clients without Origin get in."""
    server = await start_chat()
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(server.ws_url, origin="http://evil.example")
        async with session.ws_connect(server.ws_url, origin=server.url) as ws:
            await ws.send_json({"type": "ping"})
            assert (await ws.receive_json())["type"] == "pong"

    assert refused.value.status == 403


async def test_sends_over_the_rate_are_refused_as_rate_limited(
    start_chat: StartChat,
) -> None:
    """With a burst of 3, the 4th and 5th immediate sends get rate_limited."""
    server = await start_chat(send_rate_per_s=0.5, send_burst=3)
    async with aiohttp.ClientSession() as session, \
            session.ws_connect(server.ws_url) as ws:
        await ws.send_json({"type": "join", "room": "r", "user": "spammer"})
        for n in range(5):
            await ws.send_json({"type": "send", "room": "r", "cmid": f"c{n}",
                                "text": "spam"})
        answers: dict[str, str] = {}
        for _ in range(50):
            frame = await ws.receive_json(timeout=5)
            if frame["type"] in ("ack", "error"):
                answers[frame["cmid"]] = frame.get("code", "ack")
            if len(answers) == 5:
                break

    assert answers == {"c0": "ack", "c1": "ack", "c2": "ack",
                       "c3": "rate_limited", "c4": "rate_limited"}


async def test_too_many_sockets_for_one_user_are_closed_with_4009(
    start_chat: StartChat,
) -> None:
    """Past the per-user socket limit a join is refused and the socket closed."""
    server = await start_chat(max_connections_per_user=1)
    async with aiohttp.ClientSession() as session, \
            session.ws_connect(server.ws_url) as first, \
            session.ws_connect(server.ws_url) as second:
        await first.send_json({"type": "join", "room": "r", "user": "ada"})
        assert (await first.receive_json(timeout=5))["type"] == "joined"
        await second.send_json({"type": "join", "room": "r", "user": "ada"})
        refusal = await second.receive_json(timeout=5)
        closing = await second.receive(timeout=5)

    assert refusal["code"] == "too_many_connections"
    assert closing.type is aiohttp.WSMsgType.CLOSE
    assert second.close_code == protocol.CLOSE_TOO_MANY_CONNECTIONS
