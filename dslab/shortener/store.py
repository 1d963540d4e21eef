"""The shortener's Redis store: links, codes, reservations, visit totals.

Keys (the braces are a Cluster hash tag, so one link's keys share a slot)::

    dslab:url:{code}            JSON record: url, created, expiry, max visits
    dslab:url:{code}:visits     INCRBY total visits (flushed by visits.py)
    dslab:url:{code}:visitors   HyperLogLog of hashed client addresses
    dslab:url:{code}:uses       INCR per redirect, only for max-visit links
    dslab:url-target:{digest}   code of the plain link for a long URL ("reuse")

Guarantees:

- with ``reserve=True`` (the default) a code is taken with ``SET NX``: two
  links never share a code, whatever runs concurrently; after
  ``max_attempts`` collisions ``CodeSpaceExhausted`` is raised, never an
  overwrite. ``reserve=False`` is the naive ``SET`` that silently replaces
  whatever link held the code (kept for the collisions exercise);
- with a code pool (``code_pool > 0``, see ``CodePool``) codes are reserved
  ahead, in batches, with a placeholder record only this process knows;
  a create then writes its link over its own placeholder and nothing
  else (a Lua compare-and-set), so the pool keeps the guarantee above. A
  placeholder is not a link: redirect, info and delete answer "no such code";
- looking a code up for a redirect is one ``GET``;
- a link with a TTL answers "gone" after its expiry and its code stays
  reserved for ``EXPIRED_GRACE_MS`` more, so an old short link seen somewhere
  never points at a stranger's new link right away;
- every call is bounded by ``op_timeout_s``; Redis errors and timeouts become
  ``StoreUnavailable`` (HTTP 503), never a hang.

The client is built by the caller (``dslab.redisconn.async_client``), so the
same store works on standalone Redis, Sentinel and Cluster.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.exceptions import RedisError

from dslab.shortener.codes import DEFAULT_CODE_LENGTH, new_code
from dslab.shortener.errors import (
    AliasTaken,
    CodeSpaceExhausted,
    InvalidRequest,
    StoreUnavailable,
)

log = logging.getLogger(__name__)

KEY_PREFIX = "dslab:url:"
TARGET_INDEX_PREFIX = "dslab:url-target:"
INVALIDATION_CHANNEL = "dslab:shortener:invalidate"
# Draws before giving up: at 50% occupancy the chance that 16 draws all
# collide is 1.5e-5, so a 503 really means the space is (nearly) full.
DEFAULT_MAX_ATTEMPTS = 16
# How long a creation waits for replicas to confirm it (WAIT) before it
# answers anyway, saying how many did.
DEFAULT_REPLICAS_TIMEOUT_MS = 500
# One Redis call may take this long; a redirect or create that waits longer is
# better answered with a 503 the client can retry.
DEFAULT_OP_TIMEOUT_S = 1.5
# An expired link answers 410 (not 404) and keeps its code for this long.
EXPIRED_GRACE_MS = 24 * 3600 * 1000
MAX_TTL_S = 10 * 365 * 24 * 3600  # ten years: beyond that, say "forever"
# A placeholder record: a code reserved by a pool, not yet a link. Links are
# JSON objects, so no link record starts like this.
PLACEHOLDER_PREFIX = "reserved:"
# A placeholder left behind by a process that died frees its code after this;
# a live pool hands a code out only in the first half of it.
PLACEHOLDER_HOLD_MS = 10 * 60 * 1000
# Codes a server worker reserves ahead: a refill is one script call of this
# many SET NX (about 1 ms measured), and the next one starts after 32 creates.
DEFAULT_CODE_POOL = 64
# Refills one take() may wait for before it falls back to drawing and
# reserving a code itself (the pool cannot fill: the space is nearly full).
POOL_REFILLS_PER_TAKE = 2

# KEYS: the link. ARGV: this pool's placeholder, the link record, PX or "".
# Writes the link only over the caller's own placeholder.
CLAIM_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
if ARGV[3] == '' then
  redis.call('SET', KEYS[1], ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 1
"""
# KEYS: codes' link keys. ARGV: the placeholder, PX. Reserves every free one
# and returns their positions (1-based). One call instead of a pipeline of
# SETs: redis-py's cost per command, not Redis's, dominates a refill.
RESERVE_MANY_LUA = """
local won = {}
for i, key in ipairs(KEYS) do
  if redis.call('SET', key, ARGV[1], 'NX', 'PX', ARGV[2]) then
    won[#won + 1] = i
  end
end
return won
"""
# KEYS: the link. ARGV: the placeholder. Gives back an unused reservation.
RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# KEYS: the link and its counters (one hash tag, one slot). ARGV: the
# placeholder prefix. A placeholder is not a link, so it is not deleted.
DELETE_LUA = """
local record = redis.call('GET', KEYS[1])
if not record or string.sub(record, 1, #ARGV[1]) == ARGV[1] then
  return 0
end
redis.call('DEL', unpack(KEYS))
return 1
"""


def link_key(code: str) -> str:
    return f"{KEY_PREFIX}{{{code}}}"


def visits_key(code: str) -> str:
    return f"{link_key(code)}:visits"


def visitors_key(code: str) -> str:
    return f"{link_key(code)}:visitors"


def uses_key(code: str) -> str:
    return f"{link_key(code)}:uses"


def target_key(url: str) -> str:
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:32]
    return f"{TARGET_INDEX_PREFIX}{digest}"


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Link:
    """One short link as stored; times are Unix milliseconds."""

    code: str
    url: str
    created_ms: int
    expires_ms: int | None = None
    max_visits: int | None = None

    def expired(self, at_ms: int) -> bool:
        return self.expires_ms is not None and at_ms >= self.expires_ms

    @property
    def plain(self) -> bool:
        """No expiry and no visit limit: the kind of link "reuse" may return."""
        return self.expires_ms is None and self.max_visits is None

    def to_json(self) -> str:
        record = {
            "url": self.url,
            "created_ms": self.created_ms,
            "expires_ms": self.expires_ms,
            "max_visits": self.max_visits,
        }
        return json.dumps(record, separators=(",", ":"))

    @classmethod
    def from_json(cls, code: str, text: str | bytes) -> Link:
        record = json.loads(text)
        return cls(
            code=code,
            url=str(record["url"]),
            created_ms=int(record["created_ms"]),
            expires_ms=_optional_int(record.get("expires_ms")),
            max_visits=_optional_int(record.get("max_visits")),
        )


@dataclass(frozen=True)
class Created:
    link: Link
    reused: bool  # True when "reuse" returned an existing link
    attempts: int  # codes drawn; 0 for an alias or a reused link
    # With replica acknowledgement: replicas that confirmed the write (WAIT).
    replicas: int | None = None
    # Drawing random codes and reserving one in Redis, all attempts together;
    # 0 for an alias or a reused link.
    code_s: float = 0.0



@dataclass(frozen=True)
class LinkInfo:
    link: Link
    visits: int
    unique_visitors: int
    uses: int  # redirects counted against max_visits (0 when unlimited)


class LinkStore:
    """Create, read and delete links in Redis; see the module docstring."""

    def __init__(
        self,
        client: Any,
        *,
        code_length: int = DEFAULT_CODE_LENGTH,
        reserve: bool = True,
        replicas_ack: int = 0,
        replicas_timeout_ms: int = DEFAULT_REPLICAS_TIMEOUT_MS,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        op_timeout_s: float = DEFAULT_OP_TIMEOUT_S,
        clock_ms: Callable[[], int] = now_ms,
        code_pool: int = 0,
        on_refill: Callable[[float, int], None] | None = None,
    ) -> None:
        self.client = client
        self.code_length = code_length
        self.reserve = reserve
        self.replicas_ack = replicas_ack
        self.replicas_timeout_ms = replicas_timeout_ms
        self.max_attempts = max_attempts
        self.op_timeout_s = op_timeout_s
        self.clock_ms = clock_ms
        # The naive mode reserves nothing, so it has nothing to reserve ahead.
        self.pool = (CodePool(self, code_pool, on_refill=on_refill)
                     if code_pool and reserve else None)
        self._delete = client.register_script(DELETE_LUA)
        self._reserve_many = client.register_script(RESERVE_MANY_LUA)

    async def create(
        self,
        url: str,
        *,
        alias: str | None = None,
        ttl_s: int | None = None,
        max_visits: int | None = None,
        reuse: bool = False,
    ) -> Created:
        """Store a link for an already validated ``url`` and return it."""
        if ttl_s is not None and not 0 < ttl_s <= MAX_TTL_S:
            raise InvalidRequest(f"ttl_s {ttl_s} is outside 1..{MAX_TTL_S}")
        if max_visits is not None and max_visits < 1:
            raise InvalidRequest(f"max_visits {max_visits} must be at least 1")
        created_ms = self.clock_ms()
        expires_ms = created_ms + ttl_s * 1000 if ttl_s is not None else None
        plain = expires_ms is None and max_visits is None

        if reuse and plain and alias is None:
            existing = await self._find_by_target(url)
            if existing is not None:
                return Created(existing, reused=True, attempts=0)

        def link_for(code: str) -> Link:
            return Link(code, url, created_ms, expires_ms, max_visits)

        keep_ms = (
            expires_ms - created_ms + EXPIRED_GRACE_MS if expires_ms else None
        )
        if alias is not None:
            link = link_for(alias)
            reserved, replicas = await self._reserve(alias, link.to_json(), keep_ms,
                                                     nx=True)
            if not reserved:
                raise AliasTaken(
                    f"alias {alias!r} is already taken",
                    fix="pick another alias or leave it out for a random code",
                )
            created = Created(link, reused=False, attempts=0, replicas=replicas)
        else:
            created = await self._create_random(link_for, keep_ms)

        if plain:
            await self._remember_target(url, created.link.code)
        return created

    async def get(self, code: str) -> Link | None:
        """The link for ``code`` (also when expired), in one round trip."""
        async with self._call("get"):
            raw = await self.client.get(link_key(code))
        return None if _not_a_link(raw) else Link.from_json(code, raw)

    async def use(self, link: Link) -> int:
        """Count one redirect of a max-visit link; returns the count so far."""
        async with self._call("use"):
            pipe = self.client.pipeline(transaction=False)
            pipe.incr(uses_key(link.code))
            if link.expires_ms is not None:
                pipe.pexpireat(uses_key(link.code), link.expires_ms + EXPIRED_GRACE_MS)
            replies = await pipe.execute()
        return int(replies[0])

    async def info(self, code: str) -> LinkInfo | None:
        """The link with its visit totals, or None when no such code exists."""
        async with self._call("info"):
            pipe = self.client.pipeline(transaction=False)
            pipe.get(link_key(code))
            pipe.get(visits_key(code))
            # Through execute_command: redis-py's Cluster pipeline refuses its
            # pfcount() helper (multi-key in general), one key is fine.
            pipe.execute_command("PFCOUNT", visitors_key(code))
            pipe.get(uses_key(code))
            raw, visits, unique, uses = await pipe.execute()
        if _not_a_link(raw):
            return None

        return LinkInfo(
            Link.from_json(code, raw),
            visits=int(visits or 0),
            unique_visitors=int(unique or 0),
            uses=int(uses or 0),
        )

    async def delete(self, code: str) -> bool:
        """Remove the link and its counters; tell every near cache. True if found."""
        async with self._call("delete"):
            removed = await self._delete(
                keys=[link_key(code), visits_key(code), visitors_key(code),
                      uses_key(code)],
                args=[PLACEHOLDER_PREFIX])
            if removed:
                await self.client.publish(INVALIDATION_CHANNEL, code)
        return bool(removed)

    async def close(self) -> None:
        """Give back the codes the pool reserved and did not use."""
        if self.pool is not None:
            await self.pool.close()

    async def ping(self) -> bool:
        try:
            async with self._call("ping"):
                return bool(await self.client.ping())
        except StoreUnavailable:
            return False

    # -- internals ---------------------------------------------------------

    async def _create_random(
        self, link_for: Callable[[str], Link], keep_ms: int | None
    ) -> Created:
        began = time.perf_counter()
        if self.pool is not None:
            code = await self.pool.take()
            if code is not None:
                code_s = time.perf_counter() - began
                link = link_for(code)
                claimed, replicas = await self._write_claimed(
                    code, link.to_json(), keep_ms, self.pool.placeholder)
                if claimed:
                    return Created(link, reused=False, attempts=1,
                                   replicas=replicas, code_s=code_s)
                # Its placeholder expired (or was removed by hand) before use.
                log.warning("reserved code %s was gone before use", code)
            began = time.perf_counter()
        for attempt in range(1, self.max_attempts + 1):
            link = link_for(new_code(self.code_length))
            reserved, replicas = await self._reserve(link.code, link.to_json(),
                                                     keep_ms, nx=self.reserve)
            if reserved:
                return Created(link, reused=False, attempts=attempt,
                               replicas=replicas,
                               code_s=time.perf_counter() - began)
            log.debug("code collision: %s (attempt %d)", link.code, attempt)

        raise CodeSpaceExhausted(
            f"{self.max_attempts} random codes of length {self.code_length} "
            "were all taken",
            retry_after_s=None,
            fix="the code space is (nearly) full: restart with a larger "
            "--code-length",
        )

    async def _reserve(
        self, code: str, record: str, keep_ms: int | None, *, nx: bool
    ) -> tuple[bool, int | None]:
        """Whether ``code`` was reserved, and (with replica acknowledgement)
        how many replicas confirmed the write."""
        # nx=False is the naive mode: SET replaces whatever was there.
        return await self._write("reserve", lambda target: target.set(
            link_key(code), record, nx=nx, px=keep_ms))

    async def _write_claimed(
        self, code: str, record: str, keep_ms: int | None, placeholder: str
    ) -> tuple[bool, int | None]:
        """Write the link over this pool's own placeholder (and nothing else)."""
        args = [placeholder, record, "" if keep_ms is None else str(keep_ms)]
        # EVAL, not a registered script: it also goes into the WAIT pipeline,
        # where redis-py would check SCRIPT EXISTS on every execute.
        return await self._write("write the link", lambda target: target.eval(
            CLAIM_LUA, 1, link_key(code), *args))

    async def _write(
        self, what: str, issue: Callable[[Any], Any]
    ) -> tuple[bool, int | None]:
        """Send the one write ``issue`` makes on a client or pipeline; with
        replica acknowledgement, WAIT for it. Returns whether the write took
        effect and how many replicas confirmed it (None without WAIT)."""
        if not self.replicas_ack:
            async with self._call(what):
                return bool(await issue(self.client)), None
        # WAIT counts the writes of its own connection, so the write and the
        # WAIT travel together in one pipeline (one connection).
        async with (
            self._call(f"{what} and wait for replicas"),
            self.client.pipeline(transaction=False) as pipe,
        ):
            issue(pipe)
            pipe.wait(self.replicas_ack, self.replicas_timeout_ms)
            reply, confirmed = await pipe.execute()
        return bool(reply), int(confirmed)

    async def _find_by_target(self, url: str) -> Link | None:
        async with self._call("reuse lookup"):
            code = await self.client.get(target_key(url))
        if code is None:
            return None
        link = await self.get(_text(code))
        if link is None or link.url != url or not link.plain:
            return None
        return link

    async def _remember_target(self, url: str, code: str) -> None:
        async with self._call("reuse index"):
            await self.client.set(target_key(url), code)

    @contextlib.asynccontextmanager
    async def _call(self, what: str) -> AsyncIterator[None]:
        """Bound one Redis exchange and translate its failures at one place."""
        try:
            async with asyncio.timeout(self.op_timeout_s):
                yield
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(
                f"Redis did not complete {what}: {type(exc).__name__}: {exc}",
                retry_after_s=1,
                fix="check that Redis runs (`dslab lab status`); during a "
                "failover, retry in a few seconds",
            ) from exc


class CodePool:
    """Codes reserved ahead, so that a create does not wait for a reservation.

    A refill draws ``size`` random codes and reserves each with
    ``SET key placeholder NX PX PLACEHOLDER_HOLD_MS``, all in one Lua script
    call (a pipeline on a Cluster); the codes whose SET succeeded are this
    process's until their placeholders expire. ``take``
    hands them out (no Redis call while the pool is not empty) and starts the
    next refill in the background when half are gone. The link is then
    written over the placeholder by ``LinkStore._write_claimed``, which
    refuses any other value: a code is never given to two links, also when a
    placeholder expired in between.

    Costs, said plainly: one placeholder key per pooled code; a process that
    dies leaves up to ``size`` placeholders that free their codes only after
    ``PLACEHOLDER_HOLD_MS`` (``close`` gives them back on a clean stop); and
    in a small code space the pooled codes are taken, for everyone else,
    before any link uses them.
    """

    def __init__(self, store: LinkStore, size: int, *,
                 on_refill: Callable[[float, int], None] | None = None) -> None:
        if size < 1:
            raise ValueError(f"a code pool needs a size of at least 1, not {size}")
        self.store = store
        self.size = size
        # Unique to this pool: what its own placeholders hold.
        self.placeholder = PLACEHOLDER_PREFIX + secrets.token_hex(8)
        self.on_refill = on_refill  # (seconds, codes reserved) of each refill
        self._codes: collections.deque[tuple[str, float]] = collections.deque()
        self._refill: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._codes)

    async def take(self) -> str | None:
        """A code reserved for this process, or None when refills cannot find
        free codes (the caller then draws and reserves one itself)."""
        code = self._pop_fresh()
        refills = 0
        while code is None and refills < POOL_REFILLS_PER_TAKE:
            # Shared by every create that finds the pool empty; shielded, so a
            # create whose client went away does not cancel it for the others.
            await asyncio.shield(self._start_refill())
            refills += 1
            code = self._pop_fresh()
        if code is not None and len(self._codes) < self.size // 2:
            self._start_refill()
        return code

    async def close(self) -> None:
        """Stop refilling and release every unused reservation."""
        if self._refill is not None:
            self._refill.cancel()
            with contextlib.suppress(asyncio.CancelledError, StoreUnavailable):
                await self._refill
        codes = [code for code, _ in self._codes]
        self._codes.clear()
        if not codes:
            return
        try:
            async with self.store._call("release reserved codes"):
                await asyncio.gather(*(
                    self.store.client.eval(RELEASE_LUA, 1, link_key(code),
                                           self.placeholder)
                    for code in codes))
        except StoreUnavailable as exc:
            log.warning("%d reserved codes not released (they expire by "
                        "themselves): %s", len(codes), exc)

    def _pop_fresh(self) -> str | None:
        """The oldest code still young enough to write a link over."""
        young_s = PLACEHOLDER_HOLD_MS / 1000 / 2
        while self._codes:
            code, reserved_at = self._codes.popleft()
            if time.monotonic() - reserved_at < young_s:
                return code
        return None

    def _start_refill(self) -> asyncio.Task[None]:
        if self._refill is None or self._refill.done():
            self._refill = asyncio.create_task(self._fill(), name="code-pool")
            self._refill.add_done_callback(_log_refill_failure)
        return self._refill

    async def _fill(self) -> None:
        began = time.perf_counter()
        drawn = [new_code(self.store.code_length)
                 for _ in range(self.size - len(self._codes))]
        async with self.store._call("reserve codes ahead"):
            won = await self._reserve(drawn)
        reserved_at = time.monotonic()
        self._codes.extend((code, reserved_at) for code in won)
        if self.on_refill is not None:
            self.on_refill(time.perf_counter() - began, len(won))
        log.debug("code pool refilled: %d of %d drawn codes reserved",
                  len(won), len(drawn))

    async def _reserve(self, drawn: list[str]) -> list[str]:
        """SET NX every drawn code with this pool's placeholder; the won ones.
        One script call on one primary; on a Cluster the codes live in many
        slots, so a pipeline (redis-py sends each node its share)."""
        client, keys = self.store.client, [link_key(code) for code in drawn]
        if not isinstance(client, AsyncRedisCluster):
            positions = await self.store._reserve_many(
                keys=keys, args=[self.placeholder, PLACEHOLDER_HOLD_MS])
            return [drawn[int(i) - 1] for i in positions]
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.set(key, self.placeholder, nx=True, px=PLACEHOLDER_HOLD_MS)
        replies = await pipe.execute()
        return [code for code, reply in zip(drawn, replies, strict=True) if reply]


def _log_refill_failure(task: asyncio.Task[None]) -> None:
    """A background refill that failed: its error must not vanish; the next
    take() tries again (and answers 503 if Redis is still away)."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("code pool refill failed: %s", task.exception())


def _not_a_link(raw: str | bytes | None) -> bool:
    """Nothing stored, or a pool's placeholder for a code not yet used."""
    if raw is None:
        return True
    if isinstance(raw, bytes):
        return raw.startswith(PLACEHOLDER_PREFIX.encode())
    return raw.startswith(PLACEHOLDER_PREFIX)


def _optional_int(value: object) -> int | None:
    return None if value is None else int(str(value))


def _text(value: str | bytes) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value
