"""Fixtures for the shortener: a real standalone Redis from the lab and real
shortener servers on free loopback ports, always closed after the test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from dslab.redisconn import async_client
from dslab.settings import RedisTarget
from dslab.shortener.server import RunningServer, ShortenerConfig, start_server

StartServer = Callable[..., Awaitable[RunningServer]]


@pytest.fixture
async def start_shortener(redis_target: RedisTarget) -> AsyncIterator[StartServer]:
    """Factory: a shortener server (own Redis client) on 127.0.0.1:0."""
    servers: list[RunningServer] = []

    async def start(**config: Any) -> RunningServer:
        config.setdefault("allow_private_targets", False)
        server = await start_server(
            ShortenerConfig(**config), async_client(redis_target), close_client=True
        )
        servers.append(server)
        await server.shortener.invalidator.subscribed.wait()
        return server

    try:
        yield start
    finally:
        for server in servers:
            await server.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client that does not follow redirects by itself."""
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=10)
    ) as session:
        yield session
