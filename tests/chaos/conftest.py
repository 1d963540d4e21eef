"""Fixtures for the chaos tests: a real echo server and a running fault proxy."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from dslab.chaos.proxy import FaultProxy

# Seed shared by the proxy fixtures, so a failing run can be repeated.
PROXY_SEED = 20240601


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@pytest.fixture
async def echo_server() -> AsyncIterator[tuple[str, int]]:
    """A real TCP echo server on a free loopback port; yields (host, port)."""
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    try:
        yield host, port
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def echo_proxy(echo_server: tuple[str, int]) -> AsyncIterator[FaultProxy]:
    """A started fault proxy in front of the echo server; stopped afterwards."""
    async with FaultProxy(echo_server, seed=PROXY_SEED) as proxy:
        yield proxy
