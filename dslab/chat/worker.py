"""The chat worker pool: consumer groups where they fit.

Workers share the consumer group ``WORKER_GROUP`` on each room's stream, so
every message goes to one worker, not to all. The job: per-room statistics
(``dslab:chat:{room}:stats``: total and per-user message counts) and a
mention index (``dslab:chat:{room}:mentions:<user>``: entry IDs of messages
that contain ``@user``).

Guarantee: each message's effects are applied exactly once across the pool,
even when a worker is killed. The effects and the ``XACK`` run in one Lua
script that applies the effects only if its ``XACK`` acknowledged the entry
(returned 1); a message claimed from a dead worker with ``XAUTOCLAIM`` and
processed again is therefore counted once. Entries a killed worker had read
but not acknowledged are claimed by a survivor after ``CLAIM_IDLE_MS``.

Run with ``python -m dslab.chat.worker --redis URL --room lobby [--room ...]``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal
import sys
from typing import Any

import redis.exceptions

from dslab.chat.protocol import entry_ms
from dslab.chat.store import log_key
from dslab.logs import setup_server_logging
from dslab.redisconn import async_client
from dslab.settings import RedisTarget

# Named explicitly: run with -m, this module is `__main__`.
log = logging.getLogger("dslab.chat.worker")

WORKER_GROUP = "dslab-chat-workers"
# An entry pending this long belongs to a worker presumed dead; long enough
# that a live worker finishes its batch first.
CLAIM_IDLE_MS = 2000
# How often a worker looks for entries of dead workers.
CLAIM_EVERY_S = 1.0
# Entries per XREADGROUP / XAUTOCLAIM.
BATCH_ENTRIES = 10
# Under the Redis client's 2 s socket timeout.
BLOCK_MS = 1000
MENTION = re.compile(r"@([A-Za-z0-9_.-]{1,32})")

# KEYS: log, stats, mention keys...; ARGV: group, entry id, user, worker, ms.
PROCESS_LUA = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return 0
end
redis.call('HINCRBY', KEYS[2], 'messages', 1)
redis.call('HINCRBY', KEYS[2], 'user:' .. ARGV[3], 1)
redis.call('HINCRBY', KEYS[2], 'worker:' .. ARGV[4], 1)
for i = 3, #KEYS do
  redis.call('ZADD', KEYS[i], ARGV[5], ARGV[2])
end
return 1
"""


def stats_key(room: str) -> str:
    return f"dslab:chat:{{{room}}}:stats"


def mentions_key(room: str, user: str) -> str:
    return f"dslab:chat:{{{room}}}:mentions:{user}"


class ChatWorker:
    """One consumer of the pool; ``run`` processes ``rooms`` until cancelled."""

    def __init__(
        self, client: Any, rooms: list[str], name: str, *, work_ms: int = 0
    ) -> None:
        self.client = client
        self.rooms = rooms
        self.name = name
        self.work_ms = work_ms  # simulated work per message, for demos and tests
        self.processed = 0
        self._process = client.register_script(PROCESS_LUA)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for room in self.rooms:
                group.create_task(self._follow(room), name=f"worker:{room}")

    async def _follow(self, room: str) -> None:
        await self._ensure_group(room)
        loop = asyncio.get_running_loop()
        next_claim = loop.time()
        while True:
            try:
                if loop.time() >= next_claim:
                    await self._claim_dead(room)
                    next_claim = loop.time() + CLAIM_EVERY_S
                reply = await self.client.xreadgroup(
                    WORKER_GROUP, self.name, {log_key(room): ">"},
                    count=BATCH_ENTRIES, block=BLOCK_MS,
                )
                for entry_id, fields in reply[0][1] if reply else []:
                    await self._handle(room, str(entry_id), fields)
            except (redis.exceptions.RedisError, OSError) as exc:
                log.warning("worker retrying: %s %s", room, type(exc).__name__)
                await asyncio.sleep(0.5)

    async def _ensure_group(self, room: str) -> None:
        try:
            await self.client.xgroup_create(log_key(room), WORKER_GROUP, id="0",
                                            mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _claim_dead(self, room: str) -> None:
        """Take over entries other workers read long ago and never acked."""
        cursor = "0-0"
        for _ in range(100):  # bounded: 100 pages of BATCH_ENTRIES
            reply = await self.client.xautoclaim(
                log_key(room), WORKER_GROUP, self.name, CLAIM_IDLE_MS,
                start_id=cursor, count=BATCH_ENTRIES,
            )
            cursor, claimed = str(reply[0]), reply[1]
            for entry_id, fields in claimed:
                if fields is not None:  # None: deleted by trimming meanwhile
                    await self._handle(room, str(entry_id), fields)
            if cursor == "0-0":
                return

    async def _handle(self, room: str, entry_id: str, fields: dict[str, str]) -> None:
        if self.work_ms:
            await asyncio.sleep(self.work_ms / 1000)
        user = fields.get("user", "?")
        mentioned = sorted(set(MENTION.findall(fields.get("text", ""))))
        keys = [log_key(room), stats_key(room),
                *(mentions_key(room, name) for name in mentioned)]
        applied = await self._process(
            keys=keys,
            args=[WORKER_GROUP, entry_id, user, self.name, entry_ms(entry_id)])
        if int(applied):
            self.processed += 1


async def serve(target: RedisTarget, rooms: list[str], name: str, work_ms: int) -> None:
    client = async_client(target)
    worker = ChatWorker(client, rooms, name, work_ms=work_ms)
    task = asyncio.create_task(worker.run())
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    log.info("chat worker ready: %s rooms=%s", name, ",".join(rooms))
    try:
        await task
    except asyncio.CancelledError:
        log.info("chat worker stopping: %s processed=%d", name, worker.processed)
    finally:
        await client.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dslab.chat.worker")
    parser.add_argument("--redis", required=True)
    parser.add_argument("--room", action="append", required=True)
    parser.add_argument("--name", default="worker")
    parser.add_argument("--work-ms", type=int, default=0,
                        help="simulated work per message (demos, tests)")
    args = parser.parse_args(argv)
    setup_server_logging(1)
    asyncio.run(serve(RedisTarget.parse(args.redis), args.room, args.name,
                      args.work_ms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
