"""Links acknowledged with replica confirmation survive the primary's crash."""

from __future__ import annotations

import os
import signal

import aiohttp
import pytest

from dslab.redisconn import async_client
from dslab.settings import Persistence, Topology
from dslab.shortener.store import LinkStore
from tests.conftest import StartLab
from tests.helpers import eventually
from tests.shortener.conftest import StartServer

LINKS = 50


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_replica_confirmed_links_survive_a_primary_kill(
    start_lab: StartLab,
) -> None:
    """With --persistence always and WAIT for one replica, every link whose
    creation reported a confirming replica is still there, pointing at the
    same URL, after kill -9 of the primary and a Sentinel failover."""
    lab = start_lab(Topology.REPLICATED, Persistence.ALWAYS)
    client = async_client(lab.redis_target())
    try:
        store = LinkStore(client, replicas_ack=1)
        created = [await store.create(f"https://example.com/durable/{n}")
                   for n in range(LINKS)]
    finally:
        await client.aclose()
    assert all(item.replicas is not None and item.replicas >= 1
               for item in created)

    os.kill(lab.node("redis-1").pid, signal.SIGKILL)
    eventually(lambda: lab.primary() in ("redis-2", "redis-3"), timeout_s=30)

    client = async_client(lab.redis_target())
    try:
        store = LinkStore(client)
        for item in created:
            link = await store.get(item.link.code)
            assert link is not None and link.url == item.link.url
    finally:
        await client.aclose()


async def test_replica_count_is_reported_without_replicas(start_lab: StartLab) -> None:
    """A standalone node has no replica: WAIT answers 0 after its timeout and
    the creation says so instead of pretending."""
    lab = start_lab()
    client = async_client(lab.redis_target())
    try:
        store = LinkStore(client, replicas_ack=1, replicas_timeout_ms=50)
        created = await store.create("https://example.com/alone")
    finally:
        await client.aclose()

    assert created.replicas == 0


async def test_the_answer_says_whether_replicas_confirmed(
    start_shortener: StartServer, http: aiohttp.ClientSession
) -> None:
    """POST /api/links with --replicas-ack reports the confirming replicas;
    on a lone node `replicas_met` is false, so a client knows the link may
    not survive a failover."""
    server = await start_shortener(replicas_ack=1)

    async with http.post(f"{server.url}/api/links",
                         json={"url": "https://example.com/said"}) as answer:
        body = await answer.json()

    assert answer.status == 201
    assert body["replicas"] == 0
    assert body["replicas_met"] is False
