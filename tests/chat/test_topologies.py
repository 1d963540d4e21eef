"""The chat on the lab's other topologies: Redis Cluster (hash tags keep a
room's keys in one slot) and a replicated primary with WAIT."""

from __future__ import annotations

import pytest

from dslab.chat.client import ChatClient
from dslab.chat.server import ChatConfig, start_server
from dslab.settings import Topology
from tests.conftest import StartLab

WAIT_S = 10.0


@pytest.mark.slow
async def test_cluster_two_servers_resume_and_retry(start_lab: StartLab) -> None:
    """On a Cluster: delivery across two servers, replay and idempotent retry."""
    target = start_lab(Topology.CLUSTER).redis_target()
    one = await start_server(ChatConfig(redis=target))
    two = await start_server(ChatConfig(redis=target))
    try:
        async with ChatClient([one.url], "r", "ada") as ada:
            await ada.wait_joined()
            acks = [await ada.send(f"m{n}") for n in range(10)]
            retried = await ada.send("m0", cmid="fixed")
            again = await ada.send("m0", cmid="fixed")
            async with ChatClient([two.url], "r", "bob", last_id="0-0") as bob:
                await bob.wait_for_count(11, WAIT_S)
    finally:
        await one.close()
        await two.close()

    assert (again.entry_id, again.duplicate) == (retried.entry_id, True)
    assert [m.entry_id for m in bob.received] == \
        [ack.entry_id for ack in acks] + [retried.entry_id]


@pytest.mark.slow
async def test_replicas_ack_is_met_on_a_replicated_lab(start_lab: StartLab) -> None:
    """With --replicas-ack 1 behind Sentinel, acks report the replica confirmed."""
    target = start_lab(Topology.REPLICATED).redis_target()
    server = await start_server(ChatConfig(redis=target, replicas_ack=1))
    try:
        async with ChatClient([server.url], "r", "ada") as ada:
            await ada.wait_joined()
            ack = await ada.send("durable-ish")
    finally:
        await server.close()

    assert ack.replicas is not None and ack.replicas >= 1
    assert ack.replicas_met is True
