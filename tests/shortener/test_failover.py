"""The shortener through a Sentinel failover: known links keep redirecting,
creation answers 503 with Retry-After (never a 500 or a hang), then recovers."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter

import aiohttp
import pytest

from dslab.redisconn import async_client
from dslab.settings import Topology
from dslab.shortener.server import ShortenerConfig, start_server
from tests.conftest import StartLab

LINKS = 20
# Long enough to cover Sentinel's detection (1 s) and promotion, with margin.
WATCH_S = 12.0


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_redirects_survive_a_primary_kill(start_lab: StartLab) -> None:
    """kill -9 of the primary under load: every redirect of a known code works,
    every failed create is a 503 with Retry-After, and creation works again
    once Sentinel has promoted a replica."""
    lab = start_lab(Topology.REPLICATED)
    server = await start_server(
        ShortenerConfig(create_per_minute=0),  # no rate limit in this test
        async_client(lab.redis_target()), close_client=True,
    )
    redirects: Counter[str] = Counter()
    creates: Counter[str] = Counter()
    last_create = ""
    try:
        async with aiohttp.ClientSession() as http:
            codes = {}
            for index in range(LINKS):
                url = f"https://example.com/page-{index}"
                async with http.post(f"{server.url}/api/links",
                                     json={"url": url}) as answer:
                    codes[(await answer.json())["code"]] = url
            for code in codes:  # warm the near cache
                async with http.get(f"{server.url}/{code}",
                                    allow_redirects=False) as answer:
                    assert answer.status == 302

            primary = lab.node("redis-1")
            os.kill(primary.pid, signal.SIGKILL)
            began = time.monotonic()
            while time.monotonic() - began < WATCH_S:
                for code, url in codes.items():
                    async with http.get(f"{server.url}/{code}",
                                        allow_redirects=False) as answer:
                        good = (answer.status == 302
                                and answer.headers["Location"] == url)
                        redirects["ok" if good else str(answer.status)] += 1
                async with asyncio.timeout(10):
                    async with http.post(f"{server.url}/api/links",
                                         json={"url": "https://example.com/new"}
                                         ) as answer:
                        last_create = str(answer.status)
                        creates[last_create] += 1
                        if answer.status == 503:
                            assert answer.headers.get("Retry-After")
                await asyncio.sleep(0.05)
    finally:
        await server.close()

    assert set(redirects) == {"ok"}, redirects
    assert set(creates) <= {"201", "503"}, creates
    assert lab.primary() in ("redis-2", "redis-3")
    assert last_create == "201", creates  # creation works again at the end
