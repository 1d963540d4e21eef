"""Identity from a token signed by the servers, never from the client's say-so."""

from __future__ import annotations

import aiohttp
import pytest

from dslab.chat import protocol, tokens
from dslab.chat.client import ChatClient
from tests.chat.conftest import StartChat

SECRET = b"lab secret for tests, 32 bytes.."


def test_a_token_names_its_user_until_it_expires() -> None:
    """A fresh token verifies to its user; after its expiry it is refused."""
    token, expires = tokens.issue(SECRET, "ada", ttl_s=60, now=1000.0)

    assert expires == 1060
    assert tokens.verify(SECRET, token, now=1059.0) == "ada"
    with pytest.raises(protocol.ProtocolError, match="expired"):
        tokens.verify(SECRET, token, now=1061.0)


@pytest.mark.parametrize("forge", [
    lambda t: t.replace("ada", "bob", 1),             # another name, old signature
    lambda t: t[:-1] + ("0" if t[-1] != "0" else "1"),  # a changed signature
    lambda t: t.rsplit(".", 1)[0],                    # no signature at all
    lambda t: "garbage",
])
def test_forged_tokens_are_refused(forge: object) -> None:
    """Any change to a token, or another secret, makes it worthless."""
    token, _ = tokens.issue(SECRET, "ada")

    with pytest.raises(protocol.ProtocolError) as caught:
        tokens.verify(SECRET, forge(token))  # type: ignore[operator]
    assert caught.value.code == "bad_token"
    with pytest.raises(protocol.ProtocolError):
        tokens.verify(b"another secret", token)


async def _join(session: aiohttp.ClientSession, url: str,
                **fields: object) -> list[dict[str, object]]:
    """Join room r and collect frames until the server answers or closes."""
    frames = []
    async with session.ws_connect(url) as ws:
        await ws.send_json({"type": "join", "room": "r", **fields})
        async for message in ws:
            frames.append(message.json())
            if frames[-1]["type"] in ("joined", "error"):
                break
        if frames and frames[-1]["type"] == "error":
            await ws.receive()  # the close that follows
            frames.append({"close": ws.close_code})
    return frames


async def test_joins_need_a_token_the_servers_signed(start_chat: StartChat) -> None:
    """With a secret: no token, a forged one, or someone else's is refused
    with bad_token and close 4001; a token from server A works on server B."""
    first = await start_chat(secret=SECRET)
    second = await start_chat(secret=SECRET)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{first.url}/token", json={"user": "ada"}) as got:
            assert got.status == 200
            token = (await got.json())["token"]

        missing = await _join(session, second.ws_url, user="ada")
        stolen = await _join(session, second.ws_url, user="bob", token=token)
        forged = await _join(session, second.ws_url, user="ada", token=token + "0")
        good = await _join(session, second.ws_url, user="ada", token=token)

    for refused in (missing, stolen, forged):
        assert refused[0]["code"] == "bad_token"
        assert refused[-1] == {"close": protocol.CLOSE_BAD_TOKEN}
    assert good[-1]["type"] == "joined"


async def test_servers_without_a_secret_say_so(start_chat: StartChat) -> None:
    """A server that does not sign identities answers /token with 404."""
    server = await start_chat()
    async with aiohttp.ClientSession() as session, session.post(
        f"{server.url}/token", json={"user": "ada"}
    ) as answer:
        assert answer.status == 404


async def test_the_client_fetches_its_token_by_itself(start_chat: StartChat) -> None:
    """ChatClient asks for a token before joining and can then talk."""
    server = await start_chat(secret=SECRET)

    async with ChatClient([server.url], "lobby", "ada") as ada:
        await ada.wait_joined()
        ack = await ada.send("signed hello")

    assert ack.entry_id
