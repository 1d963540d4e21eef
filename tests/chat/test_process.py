"""Chat servers as real processes (``python -m dslab.chat``): readiness,
SIGTERM, and SIGKILL of one server while clients keep sending."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dslab.chat.client import ChatClient
from dslab.chat.presence import HEARTBEAT_S, PRESENCE_TTL_S
from dslab.chat.store import log_key
from dslab.settings import RedisTarget

READY_TIMEOUT_S = 15.0
READY_LINE = re.compile(r"chat ready: (http://127\.0\.0\.1:\d+)")
SENDS_PER_CLIENT = 40
WAIT_S = 15.0


@dataclass
class ChatProcess:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def spawn_chat(
    target: RedisTarget, log: Path, *extra: str
) -> ChatProcess:
    """Start ``python -m dslab.chat`` on a free port; wait for its ready line."""
    handle = log.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "dslab.chat", "--port", "0",
         "--redis", target.url(with_password=True), *extra],
        stdout=subprocess.DEVNULL, stderr=handle, cwd=Path(__file__).parents[2],
    )
    handle.close()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        found = READY_LINE.search(log.read_text(encoding="utf-8", errors="replace"))
        if found:
            return ChatProcess(process, found.group(1), log)
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    process.wait()
    raise AssertionError(f"chat server not ready: {log.read_text()}")


@pytest.fixture
def chat_processes(
    redis_target: RedisTarget, tmp_path: Path
) -> Iterator[Any]:
    """Factory of chat server processes, all killed after the test."""
    started: list[ChatProcess] = []

    def start(*extra: str) -> ChatProcess:
        name = f"chat-{len(started) + 1}"
        chat = spawn_chat(redis_target, tmp_path / f"{name}.log", "--name", name,
                          *extra)
        started.append(chat)
        return chat

    try:
        yield start
    finally:
        for chat in started:
            if chat.process.poll() is None:
                chat.process.kill()
            chat.process.wait(timeout=10)


def count_lost(clients: list[ChatClient], acknowledged: list[str]) -> int:
    """(client, acknowledged message) pairs the client never received."""
    return sum(len(set(acknowledged) - {m.entry_id for m in client.received})
               for client in clients)


async def test_ready_line_and_clean_stop_on_sigterm(chat_processes: Any) -> None:
    """The process logs its ready line and exits 0 on SIGTERM, saying so."""
    chat = chat_processes()
    async with ChatClient([chat.url], "r", "ada") as client:
        await client.wait_joined()
        chat.process.send_signal(signal.SIGTERM)
        returncode = await asyncio.to_thread(chat.process.wait, 10)

    assert returncode == 0
    assert "chat stopping" in chat.log_text()
    assert "Traceback" not in chat.log_text()


@pytest.mark.parametrize("delivery", ["streams", "pubsub"])
async def test_sigkill_of_a_server_while_clients_send(
    chat_processes: Any, redis_client: Any, delivery: str,
) -> None:
    """kill -9 of one of two servers mid-chat: with streams every acknowledged
    message reaches every client once and in order; with pubsub some are lost."""
    first = chat_processes("--delivery", delivery)
    second = chat_processes("--delivery", delivery)
    urls = [first.url, second.url]
    # A slow first reconnect widens the window in which pubsub loses messages;
    # streams must not lose any whatever the window.
    clients = [ChatClient(urls, "r", f"user{n}", start_index=n % 2,
                          backoff_first_s=0.5) for n in range(4)]
    acknowledged: list[str] = []
    enough_sent = asyncio.Event()

    async def chatter(client: ChatClient) -> None:
        for n in range(SENDS_PER_CLIENT):
            ack = await client.send(f"{client.user} #{n}")
            acknowledged.append(ack.entry_id)
            if len(acknowledged) >= len(clients) * SENDS_PER_CLIENT // 3:
                enough_sent.set()
            await asyncio.sleep(0.01)

    async def kill_first() -> None:
        await enough_sent.wait()
        first.process.send_signal(signal.SIGKILL)

    try:
        for client in clients:
            await client.__aenter__()
            await client.wait_joined()
        async with asyncio.timeout(60), asyncio.TaskGroup() as group:
            group.create_task(kill_first())
            for client in clients:
                group.create_task(chatter(client))
        if delivery == "streams":
            for client in clients:
                await client.wait_for_count(len(acknowledged), WAIT_S)
        else:
            await asyncio.sleep(0.5)
    finally:
        for client in clients:
            await client.close()

    assert first.process.wait(timeout=5) == -signal.SIGKILL
    assert all(client.joins >= 2 for client in clients[0::2])
    lost = count_lost(clients, acknowledged)
    if delivery == "pubsub":
        assert lost > 0
        return
    stream = [str(entry_id) for entry_id, _ in
              await redis_client.xrange(log_key("r"), "-", "+")]
    assert lost == 0
    assert len(stream) == len(set(acknowledged)) == len(clients) * SENDS_PER_CLIENT
    for client in clients:
        assert [m.entry_id for m in client.received] == stream


async def test_presence_forgets_users_of_a_killed_server(
    chat_processes: Any,
) -> None:
    """After kill -9 of a server its users leave everyone's presence list
    within the presence TTL plus a heartbeat or two."""
    first, second = chat_processes(), chat_processes()
    async with ChatClient([second.url], "r", "watcher") as watcher, \
            ChatClient([first.url], "r", "ghost", reconnect=False):

        async def users_become(wanted: list[str], timeout_s: float) -> None:
            async with asyncio.timeout(timeout_s):
                while watcher.users != wanted:
                    await asyncio.sleep(0.05)

        await users_become(["ghost", "watcher"], WAIT_S)
        os.kill(first.process.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        await users_become(["watcher"], PRESENCE_TTL_S + 3 * HEARTBEAT_S)

    assert time.monotonic() - killed_at >= PRESENCE_TTL_S - HEARTBEAT_S
