"""The consumer-group worker pool: every message processed exactly once,
also when a worker is killed with entries in hand."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.exceptions

from dslab.chat.store import ChatStore, log_key
from dslab.chat.worker import (
    STOP_GRACE_S,
    WORKER_GROUP,
    audit,
    mentions_key,
    stats_key,
)
from dslab.settings import RedisTarget

MESSAGES = 200
WAIT_S = 30.0


@pytest.fixture
def start_worker(redis_target: RedisTarget, tmp_path: Path) -> Iterator[Any]:
    """Factory of worker processes; every one is killed after the test."""
    started: list[subprocess.Popen[bytes]] = []

    def start(name: str, *rooms: str, work_ms: int = 10) -> subprocess.Popen[bytes]:
        log = tmp_path / f"{name}.log"
        room_args = ["--room", "r"] if not rooms else [
            arg for room in rooms for arg in ("--room", room)]
        with log.open("wb") as handle:
            process = subprocess.Popen(
                [sys.executable, "-m", "dslab.chat.worker", "--redis",
                 redis_target.url(with_password=True), *room_args,
                 "--name", name, "--work-ms", str(work_ms)],
                stdout=subprocess.DEVNULL, stderr=handle,
                cwd=Path(__file__).parents[2],
            )
        started.append(process)
        deadline = time.monotonic() + 15
        while "chat worker ready" not in log.read_text():
            assert time.monotonic() < deadline and process.poll() is None, \
                log.read_text()
            time.sleep(0.05)
        return process

    try:
        yield start
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)


async def has_pending(redis_client: Any, consumer: str) -> bool:
    try:
        rows = await redis_client.xpending_range(
            log_key("r"), WORKER_GROUP, min="-", max="+", count=1000)
    except redis.exceptions.ResponseError as exc:  # the worker has not yet
        assert "NOGROUP" in str(exc)  # created its group: "ready" comes first
        return False
    return any(row["consumer"] == consumer for row in rows)


async def _start_all_rooms_worker(
    redis_target: RedisTarget, tmp_path: Path, name: str
) -> subprocess.Popen[bytes]:
    log = tmp_path / f"{name}.log"
    with log.open("wb") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "dslab.chat.worker", "--redis",
             redis_target.url(with_password=True), "--all-rooms", "--name", name],
            stdout=subprocess.DEVNULL, stderr=handle, cwd=Path(__file__).parents[2],
        )
    async with asyncio.timeout(15):
        while "chat worker ready" not in log.read_text():
            assert process.poll() is None, log.read_text()
            await asyncio.sleep(0.05)
    return process


async def test_killed_worker_entries_are_processed_once_by_the_survivor(
    redis_client: Any, start_worker: Any,
) -> None:
    """kill -9 of a worker holding unacknowledged entries: the survivor claims
    them, and every message is counted exactly once."""
    chat_store = ChatStore(redis_client)
    for n in range(MESSAGES):
        text = f"hello @ada #{n}" if n % 4 == 0 else f"plain #{n}"
        await chat_store.append("r", f"user{n % 3}", f"c{n}", text)

    doomed = start_worker("w1")
    start_worker("w2")
    async with asyncio.timeout(WAIT_S):
        while not await has_pending(redis_client, "w1"):
            await asyncio.sleep(0.01)
    doomed.send_signal(signal.SIGKILL)

    async with asyncio.timeout(WAIT_S):
        while int(await redis_client.hget(stats_key("r"), "messages") or 0) \
                < MESSAGES or await has_pending(redis_client, "w1"):
            await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)  # nothing may be counted twice afterwards
    stats = await redis_client.hgetall(stats_key("r"))
    pending = await redis_client.xpending(log_key("r"), WORKER_GROUP)

    assert int(stats["messages"]) == MESSAGES
    assert int(stats["worker:w1"]) > 0 and int(stats["worker:w2"]) > 0
    assert pending["pending"] == 0
    assert await redis_client.zcard(mentions_key("r", "ada")) == MESSAGES // 4


async def test_ctrl_c_stops_a_worker_in_the_middle_and_loses_nothing(
    redis_client: Any, start_worker: Any,
) -> None:
    """SIGINT while entries are in hand: the worker exits 0 within its grace
    period, and what it held is left pending for the next worker, which
    claims it; every message is then counted once."""
    chat_store = ChatStore(redis_client)
    for n in range(MESSAGES):
        await chat_store.append("r", "ana", f"c{n}", f"plain #{n}")
    # 300 ms a message: a batch of 10 takes 3 s, so the signal lands in it
    # even on a loaded machine, and the stop must not wait for its end.
    stopped = start_worker("w1", work_ms=300)
    async with asyncio.timeout(WAIT_S):
        while not await has_pending(redis_client, "w1"):
            await asyncio.sleep(0.01)
    stopped.send_signal(signal.SIGINT)
    code = await asyncio.to_thread(stopped.wait, STOP_GRACE_S + 5)

    assert code == 0
    (before,) = await audit(redis_client, ["r"])
    assert before.pending > 0  # left for the pool, not acknowledged unprocessed
    assert before.processed < MESSAGES  # it really stopped in the middle

    start_worker("w2")
    async with asyncio.timeout(WAIT_S):
        while True:
            (after,) = await audit(redis_client, ["r"])
            if after.processed == MESSAGES and after.pending == 0:
                break
            await asyncio.sleep(0.1)


async def test_all_rooms_follows_rooms_created_later_and_the_audit_agrees(
    redis_client: Any, redis_target: RedisTarget, tmp_path: Path,
) -> None:
    """A worker started with --all-rooms before any room exists processes the
    messages of two rooms created afterwards, and `audit` then reports, per
    room, entries == processed and nothing pending."""
    worker = await _start_all_rooms_worker(redis_target, tmp_path, "scout")
    try:
        chat_store = ChatStore(redis_client)
        for n in range(30):
            await chat_store.append("early" if n % 2 else "late", "ana",
                                    f"c{n}", f"#{n}")

        async with asyncio.timeout(WAIT_S):
            while True:
                audits = await audit(redis_client)
                if len(audits) == 2 and all(
                        a.processed == a.entries and not a.pending for a in audits):
                    break
                await asyncio.sleep(0.1)
    finally:
        worker.kill()
        worker.wait(timeout=10)

    assert [(a.room, a.entries, a.missed, a.duplicated) for a in audits] == [
        ("early", 15, 0, 0), ("late", 15, 0, 0)]


async def test_the_audit_counts_what_no_worker_processed(redis_client: Any) -> None:
    """Without any worker, every entry of a room is counted as missed."""
    await ChatStore(redis_client).append("idle", "ana", "c1", "hello")

    [room] = await audit(redis_client)

    assert (room.room, room.entries, room.processed, room.missed) == ("idle", 1, 0, 1)
