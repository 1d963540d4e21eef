"""The Redis store on a real Redis: reservation, collisions, aliases, reuse."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from dslab.shortener.codes import ALPHABET
from dslab.shortener.errors import AliasTaken, CodeSpaceExhausted
from dslab.shortener.store import KEY_PREFIX, LinkStore, link_key

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


@pytest.mark.parametrize("code_pool", [0, 8])
async def test_full_code_space_raises_and_never_overwrites(
    redis_client: Any, code_pool: int
) -> None:
    """With every 2-symbol code taken, create raises CodeSpaceExhausted; no
    existing link changes (also when the pool's refills find nothing free)."""
    await _fill_code_space(redis_client)
    store = LinkStore(redis_client, code_length=2, code_pool=code_pool)

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


@pytest.mark.parametrize("code_pool", [0, 16])
async def test_concurrent_creates_never_share_a_code(
    redis_client: Any, code_pool: int
) -> None:
    """300 creates, 50 at a time, in a 3-symbol space get distinct codes,
    drawn one by one or taken from a pool that refills while they run."""
    store = LinkStore(redis_client, code_length=3, code_pool=code_pool)
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
    await store.close()


async def _placeholders(client: Any, placeholder: str) -> list[str]:
    """Codes whose key holds ``placeholder``, from a SCAN of every link key."""
    codes = []
    async for key in client.scan_iter(match=link_key("*"), count=1000):
        if await client.get(key) == placeholder:
            codes.append(key.removeprefix(KEY_PREFIX + "{").removesuffix("}"))
    return sorted(codes)


async def test_pooled_codes_are_not_links_until_used_and_are_given_back(
    redis_client: Any,
) -> None:
    """A pooled code is reserved in Redis yet answers like no link (get, info,
    delete); close() releases the unused ones, and the link stays."""
    store = LinkStore(redis_client, code_pool=8)
    assert store.pool is not None
    created = await store.create(TARGET)

    pooled = await _placeholders(redis_client, store.pool.placeholder)
    assert len(pooled) == len(store.pool) == 7
    assert created.link.code not in pooled
    for code in pooled:
        assert await store.get(code) is None
        assert await store.info(code) is None
        assert await store.delete(code) is False
    assert await _placeholders(redis_client, store.pool.placeholder) == pooled

    await store.close()

    assert await _placeholders(redis_client, store.pool.placeholder) == []
    link = await store.get(created.link.code)
    assert link is not None and link.url == TARGET
    assert await redis_client.pttl(link_key(created.link.code)) == -1  # no expiry


async def test_a_pooled_code_taken_over_meanwhile_is_never_overwritten(
    redis_client: Any,
) -> None:
    """If a pooled code's placeholder expired and another writer took the
    code, create leaves that link alone and uses a fresh code."""
    store = LinkStore(redis_client, code_pool=4)
    assert store.pool is not None
    first = await store.create(TARGET)
    pooled = await _placeholders(redis_client, store.pool.placeholder)
    assert len(pooled) == 3
    for code in pooled:  # as another process would after the expiry
        await redis_client.set(link_key(code), f'{{"url":"https://other/{code}",'
                               '"created_ms":0}')

    again = await store.create("https://example.com/second")

    assert again.link.code not in {first.link.code, *pooled}
    for code in pooled:
        other = await store.get(code)
        assert other is not None and other.url == f"https://other/{code}"
    await store.close()
