"""Who is online in a room: eventually consistent, no lasting ghosts.

Each room has a sorted set ``dslab:chat:{room}:presence`` of user -> time of
the last heartbeat (Unix ms). The server holding a user's socket refreshes
that user every ``HEARTBEAT_S``; anyone reading ignores and removes entries
older than ``PRESENCE_TTL_S``. So when a server is killed, its users vanish
from every other server's view within ``PRESENCE_TTL_S + HEARTBEAT_S``.

Attention: scores come from each server's wall clock, so servers must share
a clock (true on one machine; NTP-close elsewhere). A user connected to two
servers who leaves one may disappear for up to one heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import redis.exceptions

log = logging.getLogger(__name__)

# How often a server refreshes its users and re-reads each room's list.
HEARTBEAT_S = 1.0
# An entry this old is a ghost: its server missed several heartbeats.
PRESENCE_TTL_S = 4.0


def presence_key(room: str) -> str:
    return f"dslab:chat:{{{room}}}:presence"


class Presence:
    """This server's users per room, and the room's list as last read.

    ``on_change(room, users)`` is called whenever a room's list changes.
    """

    def __init__(
        self, client: Any, on_change: Callable[[str, list[str]], None]
    ) -> None:
        self.client = client
        self.on_change = on_change
        self.local: dict[str, Counter[str]] = {}
        self.known: dict[str, list[str]] = {}

    async def join(self, room: str, user: str) -> list[str]:
        """Count one more local socket of ``user`` in ``room``; the room's list."""
        self.local.setdefault(room, Counter())[user] += 1
        now_ms = _now_ms()
        await self.client.zadd(presence_key(room), {user: now_ms})
        return await self._refresh(room, now_ms)

    async def leave(self, room: str, user: str) -> None:
        """Count one socket of ``user`` out of ``room``.

        The local bookkeeping happens before the first ``await``: two sockets
        of a room closing at once (a crashed server's users all leave
        together) must not interleave between "is the room empty" and
        "forget the room", and a join arriving meanwhile must not be lost.
        """
        users = self.local.get(room)
        if users is None or users[user] <= 0:
            return
        users[user] -= 1
        gone = users[user] <= 0
        if gone:
            del users[user]
        if not users:
            del self.local[room]
            self.known.pop(room, None)

        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            if gone:
                await self.client.zrem(presence_key(room), user)
            if room in self.local:
                await self._refresh(room, _now_ms())

    async def run(self) -> None:
        """Heartbeat forever; Redis trouble is logged and retried next beat."""
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            now_ms = _now_ms()
            for room in list(self.local):
                try:
                    users = self.local.get(room)
                    if users:
                        await self.client.zadd(presence_key(room),
                                               dict.fromkeys(users, now_ms))
                        await self._refresh(room, now_ms)
                except (redis.exceptions.RedisError, OSError) as exc:
                    log.debug("presence heartbeat failed: %s %s", room, exc)

    async def _refresh(self, room: str, now_ms: int) -> list[str]:
        key = presence_key(room)
        oldest_ms = now_ms - int(PRESENCE_TTL_S * 1000)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zremrangebyscore(key, "-inf", f"({oldest_ms}")
            pipe.zrangebyscore(key, oldest_ms, "+inf")
            _, members = await pipe.execute()
        users = sorted(str(member) for member in members)
        if room in self.local and users != self.known.get(room):
            self.known[room] = users
            self.on_change(room, users)
        return users


def _now_ms() -> int:
    return int(time.time() * 1000)
