"""The Redis store on a real Redis: reservation, collisions, aliases, reuse."""

from __future__ import annotations

from typing import Any

import pytest

from dslab.shortener.codes import ALPHABET
from dslab.shortener.errors import AliasTaken, CodeSpaceExhausted
from dslab.shortener.store import LinkStore, link_key

TARGET = "https://example.com/page"


async def _fill_code_space(client: Any) -> None:
    """Take every 2-symbol code with SET NX, in pipelined batches."""
    codes = [a + b for a in ALPHABET for b in ALPHABET]
    for start in range(0, len(codes), 1000):
        pipe = client.pipeline(transaction=False)
        for code in codes[start : start + 1000]:
            pipe.set(link_key(code), f'{{"url":"https://taken/{code}",'
                     '"created_ms":0}', nx=True)
        await pipe.execute()


async def test_full_code_space_raises_and_never_overwrites(redis_client: Any) -> None:
    """With every 2-symbol code taken, create raises CodeSpaceExhausted; no
    existing link changes."""
    await _fill_code_space(redis_client)
    store = LinkStore(redis_client, code_length=2)

    with pytest.raises(CodeSpaceExhausted) as refused:
        await store.create(TARGET)

    assert refused.value.status == 503
    stored = await redis_client.mget([link_key(a + "z") for a in ALPHABET])
    assert all(TARGET not in value for value in stored)


async def test_no_reserve_mode_overwrites_a_taken_code(redis_client: Any) -> None:
    """The naive mode hands out a taken code and the old link is lost."""
    await _fill_code_space(redis_client)
    store = LinkStore(redis_client, code_length=2, reserve=False)

    created = await store.create(TARGET)

    link = await store.get(created.link.code)
    assert link is not None and link.url == TARGET


async def test_alias_conflict_raises_alias_taken(redis_client: Any) -> None:
    """A second link with the same alias is refused and the first survives."""
    store = LinkStore(redis_client)
    await store.create(TARGET, alias="my-page")

    with pytest.raises(AliasTaken):
        await store.create("https://other.example/", alias="my-page")

    link = await store.get("my-page")
    assert link is not None and link.url == TARGET


async def test_reuse_returns_the_existing_plain_link(redis_client: Any) -> None:
    """reuse=True returns the code already made for the URL; without it, a
    new code."""
    store = LinkStore(redis_client)
    first = await store.create(TARGET)

    again = await store.create(TARGET, reuse=True)
    fresh = await store.create(TARGET)

    assert again.reused and again.link.code == first.link.code
    assert not fresh.reused and fresh.link.code != first.link.code


async def test_concurrent_creates_never_share_a_code(redis_client: Any) -> None:
    """300 creates, 50 at a time, in a 3-symbol space get distinct codes."""
    import asyncio

    store = LinkStore(redis_client, code_length=3)
    created = []
    # 50 in flight: redis-py's asyncio pool refuses more than 100 connections.
    for start in range(0, 300, 50):
        created += await asyncio.gather(
            *(store.create(f"https://example.com/{n}")
              for n in range(start, start + 50))
        )

    codes = [item.link.code for item in created]
    assert len(set(codes)) == len(codes)
    for item in created:
        link = await store.get(item.link.code)
        assert link is not None and link.url == item.link.url
