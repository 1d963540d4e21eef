"""The Redis store: idempotent appends, paged replay, trimmed gaps, WAIT."""

from __future__ import annotations

from typing import Any

from dslab.chat import store
from dslab.chat.store import ChatEntry, ChatStore, Gap


async def replay_all(chat_store: ChatStore, room: str, after: str) -> list[Any]:
    return [item async for item in chat_store.replay(room, after)]


async def test_retried_send_returns_the_original_entry(redis_client: Any) -> None:
    """The same cmid twice gives the same entry ID and exactly one entry."""
    chat_store = ChatStore(redis_client)
    first = await chat_store.append("r1", "ada", "cmid-1", "hello")
    again = await chat_store.append("r1", "ada", "cmid-1", "hello")

    assert (again.entry_id, again.duplicate) == (first.entry_id, True)
    assert first.duplicate is False
    assert await chat_store.count("r1") == 1


async def test_cmid_marker_expires(redis_client: Any) -> None:
    """The cmid marker carries the documented expiry, so it cannot grow forever."""
    chat_store = ChatStore(redis_client)
    await chat_store.append("r1", "ada", "c", "x")
    ttl = await redis_client.ttl(store.cmid_key("r1", "c"))
    assert 0 < ttl <= store.CMID_TTL_S


async def test_replay_is_exclusive_and_crosses_pages(redis_client: Any) -> None:
    """Replay after a cursor yields every later entry once, across pages."""
    chat_store = ChatStore(redis_client)
    total = store.REPLAY_PAGE_ENTRIES + 7
    ids = [(await chat_store.append("r", "u", f"c{i}", f"m{i}")).entry_id
           for i in range(total)]

    items = await replay_all(chat_store, "r", ids[3])

    assert [item.entry_id for item in items] == ids[4:]
    assert all(isinstance(item, ChatEntry) for item in items)


async def test_trimmed_resume_reports_the_gap(redis_client: Any) -> None:
    """A cursor older than what retention removed yields a Gap, then the rest."""
    chat_store = ChatStore(redis_client, max_entries=10)
    ids = [(await chat_store.append("r", "u", f"c{i}", f"m{i}")).entry_id
           for i in range(10 + store.TRIM_BATCH_ENTRIES)]
    kept = await chat_store.count("r")
    assert kept == 10

    items = await replay_all(chat_store, "r", ids[0])

    first_kept = len(ids) - kept
    assert items[0] == Gap("r", ids[0], ids[first_kept - 1])
    assert [item.entry_id for item in items[1:]] == ids[first_kept:]


async def test_no_gap_when_the_cursor_is_still_retained(redis_client: Any) -> None:
    """Resuming from a retained entry reports no gap, even after trimming."""
    chat_store = ChatStore(redis_client, max_entries=10)
    ids = [(await chat_store.append("r", "u", f"c{i}", f"m{i}")).entry_id
           for i in range(10 + store.TRIM_BATCH_ENTRIES)]

    items = await replay_all(chat_store, "r", ids[-5])

    assert [item.entry_id for item in items] == ids[-4:]


async def test_wait_reports_replicas_not_met(redis_client: Any) -> None:
    """With replicas_ack=1 on a lone primary the ack says WAIT saw 0 replicas."""
    chat_store = ChatStore(redis_client, replicas_ack=1, replicas_timeout_ms=50)
    result = await chat_store.append("r", "u", "c1", "x")

    assert (result.replicas, result.replicas_met) == (0, False)
    assert await chat_store.count("r") == 1


async def test_history_cursor_selects_the_newest_entries(redis_client: Any) -> None:
    """history_cursor(n) makes replay yield exactly the newest n entries."""
    chat_store = ChatStore(redis_client)
    ids = [(await chat_store.append("r", "u", f"c{i}", "m")).entry_id
           for i in range(8)]

    cursor = await chat_store.history_cursor("r", 3)

    assert [item.entry_id for item in await replay_all(chat_store, "r", cursor)] \
        == ids[-3:]
    assert await chat_store.history_cursor("r", 50) == "0-0"
