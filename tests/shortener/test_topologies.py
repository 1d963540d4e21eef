"""Create, redirect, info, delete and cross-server invalidation on the
replicated (Sentinel) and Cluster topologies."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from dslab.redisconn import async_client
from dslab.settings import Topology
from dslab.shortener.server import ShortenerConfig, start_server
from tests.conftest import StartLab

TARGET = "https://example.com/topology"


@pytest.mark.slow
@pytest.mark.parametrize("topology", [Topology.REPLICATED, Topology.CLUSTER])
async def test_link_lifecycle_on_topology(
    start_lab: StartLab, topology: Topology
) -> None:
    """Through two servers on one deployment: create on A, redirect on B,
    visits flushed, info on A, delete on A; B forgets its cached copy (404)."""
    target = start_lab(topology).redis_target()
    servers = [
        await start_server(ShortenerConfig(), async_client(target), close_client=True)
        for _ in range(2)
    ]
    try:
        server_a, server_b = servers
        async with asyncio.timeout(10):
            for server in servers:
                await server.shortener.invalidator.subscribed.wait()
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{server_a.url}/api/links",
                                 json={"url": TARGET}) as reply:
                assert reply.status == 201
                code = (await reply.json())["code"]
            async with http.get(f"{server_b.url}/{code}",
                                allow_redirects=False) as reply:
                assert reply.status == 302 and reply.headers["Location"] == TARGET
            assert await server_b.shortener.visits.flush() == 1
            async with http.get(f"{server_a.url}/api/links/{code}") as reply:
                info = await reply.json()
            assert info["url"] == TARGET and info["visits"] == 1
            assert info["unique_visitors"] == 1
            async with http.delete(f"{server_a.url}/api/links/{code}") as reply:
                assert reply.status == 204

            deadline = time.monotonic() + 3.0
            while (server_b.shortener.near_cache.get(code) is not None
                   and time.monotonic() < deadline):
                await asyncio.sleep(0.05)
            async with http.get(f"{server_b.url}/{code}",
                                allow_redirects=False) as reply:
                assert reply.status == 404
    finally:
        for server in servers:
            await server.close()
