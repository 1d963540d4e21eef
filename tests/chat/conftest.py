"""Fixtures for the chat tests: a real Redis from the lab, real chat servers
on free loopback ports, started in this process and always stopped."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from dslab.chat.server import ChatConfig, RunningServer, start_server
from dslab.settings import RedisTarget

StartChat = Callable[..., Awaitable[RunningServer]]


@pytest.fixture
async def start_chat(redis_target: RedisTarget) -> AsyncIterator[StartChat]:
    """Factory: an in-process chat server on 127.0.0.1:0; closed after the test."""
    running: list[RunningServer] = []

    async def start(**options: Any) -> RunningServer:
        config = ChatConfig(redis=redis_target, name=f"chat-{len(running) + 1}",
                            **options)
        server = await start_server(config)
        running.append(server)
        return server

    try:
        yield start
    finally:
        for server in running:
            await server.close()
