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
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

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
    ) -> None:
        self.client = client
        self.code_length = code_length
        self.reserve = reserve
        self.replicas_ack = replicas_ack
        self.replicas_timeout_ms = replicas_timeout_ms
        self.max_attempts = max_attempts
        self.op_timeout_s = op_timeout_s
        self.clock_ms = clock_ms

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
        return None if raw is None else Link.from_json(code, raw)

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
        if raw is None:
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
            pipe = self.client.pipeline(transaction=False)
            pipe.delete(link_key(code))
            pipe.delete(visits_key(code), visitors_key(code), uses_key(code))
            removed, _ = await pipe.execute()
            if removed:
                await self.client.publish(INVALIDATION_CHANNEL, code)
        return bool(removed)

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
        if not self.replicas_ack:
            async with self._call("reserve"):
                # nx=False is the naive mode: SET replaces whatever was there.
                reply = await self.client.set(link_key(code), record, nx=nx,
                                              px=keep_ms)
            return bool(reply), None

        # WAIT counts the writes of its own connection, so the SET and the WAIT
        # travel together in one pipeline (one connection).
        async with (
            self._call("reserve and wait for replicas"),
            self.client.pipeline(transaction=False) as pipe,
        ):
            pipe.set(link_key(code), record, nx=nx, px=keep_ms)
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


def _optional_int(value: object) -> int | None:
    return None if value is None else int(str(value))


def _text(value: str | bytes) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value
