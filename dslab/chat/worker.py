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

Run with ``python -m dslab.chat.worker --redis URL --room lobby [--room ...]``,
or with ``--all-rooms`` to follow every room's stream, including rooms created
after the worker started (found by scanning for stream keys every
``DISCOVER_EVERY_S``; a room found late is processed from its first entry).

``audit`` answers the exactly-once question from Redis alone: per room, the
stream's entries, the messages the pool counted, and the entries still
pending. ``dslab chaos run`` uses it to grade scenarios that run workers.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import sys
from dataclasses import dataclass
from typing import Any

import redis.exceptions
from aiohttp import web

from dslab.chat.protocol import entry_ms
from dslab.chat.store import log_key
from dslab.logs import setup_server_logging
from dslab.redisconn import async_client
from dslab.settings import LOOPBACK_HOST, RedisTarget

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
# After Ctrl-C or SIGTERM, how long the worker may take to stop before it
# exits anyway. Nothing is lost either way: an entry in hand stays pending and
# a surviving worker claims it, as after a crash.
STOP_GRACE_S = 5.0
MENTION = re.compile(r"@([A-Za-z0-9_.-]{1,32})")
# How often --all-rooms looks for new rooms' streams.
DISCOVER_EVERY_S = 1.0
# Every room's stream, whatever its name: the hash tag braces hold the room.
LOG_KEY_PATTERN = "dslab:chat:{*}:log"
ROOM_OF_LOG_KEY = re.compile(r"^dslab:chat:\{(.+)\}:log$")

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
    """One consumer of the pool; ``run`` processes ``rooms`` (or, with
    ``all_rooms``, every room that has or gets a stream) until cancelled."""

    def __init__(
        self, client: Any, rooms: list[str], name: str, *, work_ms: int = 0,
        all_rooms: bool = False,
    ) -> None:
        self.client = client
        self.rooms = rooms
        self.name = name
        self.work_ms = work_ms  # simulated work per message, for demos and tests
        self.all_rooms = all_rooms
        self.processed = 0
        self.stopping = False
        self._process = client.register_script(PROCESS_LUA)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            followed = set(self.rooms)
            for room in self.rooms:
                group.create_task(self._follow(room), name=f"worker:{room}")
            while self.all_rooms and not self.stopping:
                for room in await rooms_with_streams(self.client):
                    if room not in followed:
                        followed.add(room)
                        log.info("worker following room %s", room)
                        group.create_task(self._follow(room), name=f"worker:{room}")
                await asyncio.sleep(DISCOVER_EVERY_S)

    async def _follow(self, room: str) -> None:
        await self._ensure_group(room)
        loop = asyncio.get_running_loop()
        next_claim = loop.time()
        # The flag, besides cancellation: every read returns within BLOCK_MS,
        # so a cancellation lost inside the client library cannot keep a
        # stopping worker alive.
        while not self.stopping:
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


@dataclass(frozen=True)
class RoomAudit:
    """What Redis says the pool did with one room's stream."""

    room: str
    entries: int  # in the stream now
    processed: int  # counted in the room's stats, exactly once each if all is well
    pending: int  # delivered to a worker and never acknowledged

    @property
    def missed(self) -> int:
        return max(self.entries - self.processed - self.pending, 0)

    @property
    def duplicated(self) -> int:
        return max(self.processed - self.entries, 0)


async def rooms_with_streams(client: Any) -> list[str]:
    """Every room that has a stream, from a SCAN of the stream keys."""
    rooms = set()
    async for key in client.scan_iter(match=LOG_KEY_PATTERN, count=500,
                                      _type="stream"):
        found = ROOM_OF_LOG_KEY.match(_text(key))
        if found:
            rooms.add(found.group(1))
    return sorted(rooms)


async def audit(client: Any, rooms: list[str] | None = None) -> list[RoomAudit]:
    """Entries, processed and pending messages per room (all rooms by default).

    Attention: ``entries`` is the stream's length now; a stream trimmed by
    retention during the run makes ``processed`` exceed it. dslab's retention
    (see store.py) is far above what a scenario appends.
    """
    audits = []
    for room in rooms if rooms is not None else await rooms_with_streams(client):
        entries = int(await client.xlen(log_key(room)))
        processed = int(await client.hget(stats_key(room), "messages") or 0)
        try:
            summary = await client.xpending(log_key(room), WORKER_GROUP)
            pending = int(summary["pending"])
        except redis.exceptions.ResponseError:  # NOGROUP: no worker ever came
            pending = 0
        audits.append(RoomAudit(room, entries, processed, pending))
    return audits


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def serve(target: RedisTarget, rooms: list[str], name: str, work_ms: int,
                *, all_rooms: bool = False, host: str = LOOPBACK_HOST,
                port: int | None = None) -> None:
    """Run one worker until SIGTERM/SIGINT; with ``port``, answer
    ``GET /healthz`` there, so the lab can supervise it like its servers."""
    client = async_client(target)
    worker = ChatWorker(client, rooms, name, work_ms=work_ms, all_rooms=all_rooms)
    task = asyncio.create_task(worker.run())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runner = None if port is None else await _health_server(worker, host, port)
    log.info("chat worker ready: %s rooms=%s", name,
             "all" if all_rooms else ",".join(rooms))
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # the worker failed on its own: raise its error
            return
        log.info("chat worker stopping: %s processed=%d", name, worker.processed)
        worker.stopping = True
        task.cancel()
        await asyncio.wait({task}, timeout=STOP_GRACE_S)
        if not task.done():
            _exit_now(worker)
    finally:
        stopped.cancel()
        if runner is not None:
            await runner.cleanup()
        await client.aclose()


def _exit_now(worker: ChatWorker) -> None:
    """The last resort of a stop that did not finish: say where it hung, then
    exit. The entries in hand stay pending for the pool to claim."""
    for hung in asyncio.all_tasks():
        log.error("still running after %.0f s: %r", STOP_GRACE_S, hung)
        for frame in hung.get_stack():
            log.error("  at %s:%d", frame.f_code.co_filename, frame.f_lineno)
    log.error("chat worker %s did not stop within %.0f s; exiting with its "
              "entries in hand left pending", worker.name, STOP_GRACE_S)
    logging.shutdown()
    os._exit(1)


async def _health_server(worker: ChatWorker, host: str, port: int) -> web.AppRunner:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "name": worker.name,
                                  "processed": worker.processed})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dslab.chat.worker")
    parser.add_argument("--redis", required=True)
    rooms = parser.add_mutually_exclusive_group(required=True)
    rooms.add_argument("--room", action="append")
    rooms.add_argument("--all-rooms", action="store_true",
                       help="follow every room's stream, also rooms created later")
    parser.add_argument("--name", default="worker")
    parser.add_argument("--work-ms", type=int, default=0,
                        help="simulated work per message (demos, tests)")
    parser.add_argument("--host", default=LOOPBACK_HOST)
    parser.add_argument("--port", type=int, default=None,
                        help="answer GET /healthz here (how the lab supervises it)")
    args = parser.parse_args(argv)
    setup_server_logging(1)
    asyncio.run(serve(RedisTarget.parse(args.redis), args.room or [], args.name,
                      args.work_ms, all_rooms=args.all_rooms, host=args.host,
                      port=args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
