"""Many creator processes racing for codes in a small space never share one."""

from __future__ import annotations

import asyncio
import multiprocessing
from typing import Any

import pytest

from dslab.redisconn import async_client
from dslab.settings import RedisTarget
from dslab.shortener.store import LinkStore

PROCESSES = 4
LINKS_PER_PROCESS = 150
# 62**2 = 3844 codes for 600 links: collisions are frequent, so the race is real.
CODE_LENGTH = 2


def _create_links(url: str, worker: int, results: Any) -> None:
    """One creator process: make its links concurrently, report the codes."""
    async def create() -> list[tuple[str, str]]:
        client = async_client(RedisTarget.parse(url))
        try:
            store = LinkStore(client, code_length=CODE_LENGTH)
            made = await asyncio.gather(*(
                store.create(f"https://example.com/{worker}/{n}")
                for n in range(LINKS_PER_PROCESS)
            ))
        finally:
            await client.aclose()
        return [(item.link.code, item.link.url) for item in made]

    results.put(asyncio.run(create()))


@pytest.mark.timeout(120)
async def test_creator_processes_never_get_the_same_code(
    redis_target: RedisTarget, redis_client: object
) -> None:
    """Four processes create 600 links at once in a 2-character space: every
    code is handed out once, and each code still leads to its creator's URL."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [
        context.Process(target=_create_links,
                        args=(redis_target.url(with_password=True), index, results))
        for index in range(PROCESSES)
    ]
    for process in workers:
        process.start()
    created = []
    for _ in workers:
        created += await asyncio.to_thread(results.get, True, 100)
    for process in workers:
        process.join(timeout=30)

    codes = [code for code, _ in created]
    assert len(created) == PROCESSES * LINKS_PER_PROCESS
    assert len(set(codes)) == len(codes)
    store = LinkStore(redis_client, code_length=CODE_LENGTH)
    for code, url in created:
        link = await store.get(code)
        assert link is not None and link.url == url
