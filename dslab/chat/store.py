"""The chat's Redis storage: one stream per room, idempotent appends, replay.

Keys of a room all carry the Cluster hash tag ``{room}`` so that they live in
one slot and the append script may touch them together:

- ``dslab:chat:{room}:log``       the stream; an entry ID is a message's
  identity and its position in the room's total order;
- ``dslab:chat:{room}:cmid:<c>``  the entry ID a client message ID got, kept
  ``CMID_TTL_S`` so that a retried send returns the original entry;
- ``dslab:chat:{room}:trimmed``   the newest entry ID retention removed, so a
  resume that reaches back past it is told about the gap;
- ``dslab:chat:{room}:presence``  see ``presence.py``.

Guarantees: an append with a cmid seen in the last ``CMID_TTL_S`` seconds
returns the original entry ID and appends nothing (one Lua script, atomic);
``replay`` yields every retained entry after a cursor in order, and a
``Gap`` wherever retention removed entries the caller asked for, so nothing
is skipped silently.

Attention: trimming done outside dslab (a manual XTRIM or XDEL) does not move
the ``trimmed`` marker and is therefore not reported as a gap.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from dslab.chat.protocol import entry_ms, message_frame, parse_entry_id

log = logging.getLogger(__name__)

# Retention per room: enough for a long disconnect in a busy room (100
# messages/s for ~100 s) while a room stays a few MB.
MAX_ENTRIES = 10_000
# Trimming runs once the stream is this many entries over MAX_ENTRIES, so its
# cost (one XRANGE of the trimmed entries) is paid once per batch of appends.
TRIM_BATCH_ENTRIES = 100
# How long a retried send is recognised; a client retries within seconds, and
# at hundreds of sends per second the markers stay a few hundred thousand keys.
CMID_TTL_S = 300
# Entries per XRANGE during replay: bounds one reply's size and the time the
# Redis server spends on one command.
REPLAY_PAGE_ENTRIES = 500
# Entries per XREAD of a room's tail.
TAIL_BATCH_ENTRIES = 500
# Appends and replay pages in flight at once: beyond this, callers queue in
# the process instead of opening ever more Redis connections.
MAX_CONCURRENT_COMMANDS = 64

# Atomic idempotent append. KEYS: log, cmid marker, trimmed marker.
# ARGV: user, cmid, text, max entries, trim batch, cmid ttl.
# Retention trims by hand instead of with XADD MAXLEN ~ so that the newest
# removed ID is known exactly: Redis 6.2 does not report it (7.0 does).
APPEND_LUA = """
local existing = redis.call('GET', KEYS[2])
if existing then
  return {existing, 1}
end
local id = redis.call('XADD', KEYS[1], '*', 'user', ARGV[1], 'cmid', ARGV[2],
                      'text', ARGV[3])
redis.call('SET', KEYS[2], id, 'EX', tonumber(ARGV[6]))
local keep = tonumber(ARGV[4])
local length = redis.call('XLEN', KEYS[1])
if length >= keep + tonumber(ARGV[5]) then
  local doomed = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', length - keep)
  redis.call('SET', KEYS[3], doomed[#doomed][1])
  redis.call('XTRIM', KEYS[1], 'MAXLEN', keep)
end
return {id, 0}
"""


def log_key(room: str) -> str:
    return f"dslab:chat:{{{room}}}:log"


def cmid_key(room: str, cmid: str) -> str:
    return f"dslab:chat:{{{room}}}:cmid:{cmid}"


def trimmed_key(room: str) -> str:
    return f"dslab:chat:{{{room}}}:trimmed"


def pubsub_channel(room: str) -> str:
    return f"dslab:chat:{{{room}}}:pubsub"


@dataclass(frozen=True)
class ChatEntry:
    """One message as stored: its entry ID, who sent it and what."""

    room: str
    entry_id: str
    user: str
    cmid: str
    text: str

    @property
    def ts(self) -> int:
        return entry_ms(self.entry_id)

    def frame(self) -> str:
        return message_frame(self.room, self.entry_id, self.cmid, self.user,
                             self.text, self.ts)


@dataclass(frozen=True)
class Gap:
    """Entries with ``after < id <= through`` were removed by retention."""

    room: str
    after: str
    through: str


@dataclass(frozen=True)
class AppendResult:
    entry_id: str
    duplicate: bool  # the cmid was seen before: nothing was appended
    replicas: int | None = None  # replicas WAIT saw, when one was asked for
    replicas_met: bool | None = None


def id_after(left: str, right: str) -> bool:
    """True when entry ID ``left`` comes after ``right`` in a stream."""
    return parse_entry_id(left) > parse_entry_id(right)


class ChatStore:
    """Typed chat operations over one redis-py asyncio client (decoded).

    ``replicas_ack`` > 0 makes every append wait (``WAIT``) for that many
    replicas, at most ``replicas_timeout_ms``; the result says whether they
    were reached. WAIT is sent on the append's own connection (a pipeline),
    because it only counts that connection's writes.
    """

    def __init__(
        self, client: Any, *, replicas_ack: int = 0, replicas_timeout_ms: int = 500,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self.client = client
        self.replicas_ack = replicas_ack
        self.replicas_timeout_ms = replicas_timeout_ms
        self.max_entries = max_entries
        self._append = client.register_script(APPEND_LUA)
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_COMMANDS)

    def _append_args(self, room: str, user: str, cmid: str, text: str) -> tuple[
        list[str], list[str | int]
    ]:
        keys = [log_key(room), cmid_key(room, cmid), trimmed_key(room)]
        args: list[str | int] = [user, cmid, text, self.max_entries,
                                 TRIM_BATCH_ENTRIES, CMID_TTL_S]
        return keys, args

    async def append(self, room: str, user: str, cmid: str, text: str) -> AppendResult:
        """Append once per cmid; a repeat returns the original entry ID."""
        keys, args = self._append_args(room, user, cmid, text)
        if self.replicas_ack <= 0:
            async with self._slots:
                reply = await self._append(keys=keys, args=args)
            return AppendResult(str(reply[0]), bool(int(reply[1])))

        async with self._slots, self.client.pipeline(transaction=False) as pipe:
            await self._append(keys=keys, args=args, client=pipe)
            pipe.execute_command("WAIT", self.replicas_ack, self.replicas_timeout_ms)
            reply, replicas = await pipe.execute()
        seen = int(replicas)
        return AppendResult(str(reply[0]), bool(int(reply[1])), seen,
                            seen >= self.replicas_ack)

    async def last_id(self, room: str) -> str:
        """The newest entry ID of the room, ``"0-0"`` when it has none."""
        newest = await self.client.xrevrange(log_key(room), "+", "-", count=1)
        return str(newest[0][0]) if newest else "0-0"

    async def history_cursor(self, room: str, count: int) -> str:
        """A cursor from which a replay yields the newest ``count`` entries."""
        if count <= 0:
            return await self.last_id(room)
        newest = await self.client.xrevrange(log_key(room), "+", "-", count=count + 1)
        return str(newest[-1][0]) if len(newest) > count else "0-0"

    async def replay(self, room: str, after: str) -> AsyncIterator[ChatEntry | Gap]:
        """Every retained entry after ``after`` in order, with the gaps.

        Each page is read together with the trimmed marker in one MULTI, so
        a trim racing with the replay is seen as a gap, never as a silent
        jump.
        """
        cursor = after
        while True:
            async with self._slots, self.client.pipeline(transaction=True) as pipe:
                pipe.xrange(log_key(room), f"({cursor}", "+",
                            count=REPLAY_PAGE_ENTRIES)
                pipe.get(trimmed_key(room))
                page, trimmed = await pipe.execute()
            if trimmed is not None and id_after(str(trimmed), cursor):
                yield Gap(room, cursor, str(trimmed))
            for entry_id, fields in page:
                cursor = str(entry_id)
                yield _entry(room, cursor, fields)
            if len(page) < REPLAY_PAGE_ENTRIES:
                return

    async def read_new(
        self, room: str, after: str, block_ms: int
    ) -> list[ChatEntry]:
        """Entries after ``after``, waiting up to ``block_ms`` for the first."""
        reply = await self.client.xread(
            {log_key(room): after}, count=TAIL_BATCH_ENTRIES, block=block_ms
        )
        return [_entry(room, str(entry_id), fields)
                for entry_id, fields in _stream_entries(reply)]

    async def count(self, room: str) -> int:
        return int(await self.client.xlen(log_key(room)))

    async def publish(self, room: str, frame: str) -> int:
        """The naive mode's only write: fire and forget, receivers counted."""
        return int(await self.client.publish(pubsub_channel(room), frame))


def _entry(room: str, entry_id: str, fields: dict[str, str]) -> ChatEntry:
    return ChatEntry(room, entry_id, fields.get("user", "?"),
                     fields.get("cmid", ""), fields.get("text", ""))


def _stream_entries(reply: Any) -> list[tuple[str, dict[str, str]]]:
    """XREAD's RESP2 reply for one stream: ``[[key, [(id, fields), ...]]]``."""
    if not reply:
        return []
    return list(reply[0][1])
