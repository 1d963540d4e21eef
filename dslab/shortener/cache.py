"""The per-worker near cache of hot codes and the invalidation that keeps it right.

Every worker keeps the links it redirected recently in a bounded LRU, so a hot
code costs no Redis round trip and keeps redirecting while Redis is down.

How it stays correct:

- delete: ``LinkStore.delete`` publishes the code on
  ``dslab:shortener:invalidate``; every worker's ``Invalidator`` listens and
  drops it. A fill that raced with an invalidation is discarded (the cache's
  ``epoch`` moved while the lookup was in flight);
- expiry: an entry carries the link's own expiry and is never served past it;
- missed messages: pub/sub is at-most-once. Whenever the subscription is
  (re)established the whole cache is cleared, because anything may have been
  deleted while nobody listened; a silent connection is noticed by a PING
  that gets no answer within ``SILENCE_LIMIT_S``;
- as a last safety net an entry older than ``max_age_s`` is looked up again
  when Redis answers (and still served while it does not).

Limits: between a delete and the arrival of its message (normally well under
a millisecond on one machine) a worker may still redirect the deleted code.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from dslab.shortener.store import INVALIDATION_CHANNEL, Link, now_ms

log = logging.getLogger(__name__)

# Enough for the hot set of a large shortener at ~200 bytes an entry (~2 MB).
DEFAULT_MAX_ENTRIES = 10_000
# Safety net against an invalidation lost in a way the PING check missed.
DEFAULT_MAX_AGE_S = 60.0
PING_EVERY_S = 1.0  # how often the subscriber proves its connection is alive
# No message and no PONG for this long: the connection is dead or Redis is
# paused; reconnect (and clear) rather than trust the cache.
SILENCE_LIMIT_S = 3.0
RECONNECT_DELAY_S = 0.2  # first wait before resubscribing; doubles to 2 s
RECONNECT_DELAY_MAX_S = 2.0


@dataclass(frozen=True)
class CachedLink:
    url: str
    expires_ms: int | None
    cached_at: float  # monotonic seconds

    def expired(self, at_ms: int) -> bool:
        return self.expires_ms is not None and at_ms >= self.expires_ms


class NearCache:
    """A bounded LRU of code -> target, never serving a link past its expiry."""

    def __init__(
        self,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] = now_ms,
    ) -> None:
        self.max_entries = max_entries
        self.max_age_s = max_age_s
        self.monotonic = monotonic
        self.wall_ms = wall_ms
        self.epoch = 0  # moves on every invalidation; see ``put``
        self._entries: OrderedDict[str, CachedLink] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, code: str) -> CachedLink | None:
        """The entry for ``code`` unless it is missing or its link expired."""
        entry = self._entries.get(code)
        if entry is None:
            return None
        if entry.expired(self.wall_ms()):
            del self._entries[code]
            return None

        self._entries.move_to_end(code)
        return entry

    def is_fresh(self, entry: CachedLink) -> bool:
        return self.monotonic() - entry.cached_at < self.max_age_s

    def put(self, link: Link, *, epoch: int) -> None:
        """Cache ``link`` read when the epoch was ``epoch``; ignored if it moved."""
        if epoch != self.epoch or link.max_visits is not None:
            # An invalidation arrived while the lookup was in flight, or the
            # link must count every redirect in Redis: do not cache.
            return
        if link.expired(self.wall_ms()):
            return
        self._entries[link.code] = CachedLink(
            link.url, link.expires_ms, self.monotonic()
        )
        self._entries.move_to_end(link.code)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def invalidate(self, code: str) -> None:
        self.epoch += 1
        self._entries.pop(code, None)

    def clear(self) -> None:
        self.epoch += 1
        self._entries.clear()


class Invalidator:
    """Listens on the invalidation channel and applies it to one NearCache."""

    def __init__(self, client: Any, cache: NearCache) -> None:
        self.client = client
        self.cache = cache
        self.subscribed = asyncio.Event()
        self.received = 0  # invalidation messages applied, for tests and metrics

    async def run(self) -> None:
        """Subscribe, listen, resubscribe after any failure; until cancelled."""
        delay_s = RECONNECT_DELAY_S
        while True:
            try:
                await self._listen_once()
            except (RedisError, OSError, TimeoutError) as exc:
                log.debug("invalidation subscriber lost: %s", exc)
            except Exception as exc:
                # redis-py raises plain KeyErrors and the like mid-failover; a
                # dead subscriber would silently leave the cache uninvalidated.
                log.warning("invalidation subscriber failed, retrying: %r", exc)
            if self.subscribed.is_set():
                delay_s = RECONNECT_DELAY_S  # it worked for a while: retry soon
            self.subscribed.clear()
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, RECONNECT_DELAY_MAX_S)

    async def _listen_once(self) -> None:
        # A Cluster client must know the slot map before it can pick the
        # node for SUBSCRIBE; for the other clients this is a no-op.
        await self.client.initialize()
        pubsub = self.client.pubsub()
        try:
            await pubsub.subscribe(INVALIDATION_CHANNEL)
            last_heard = time.monotonic()
            last_ping = last_heard
            while True:
                message = await pubsub.get_message(timeout=PING_EVERY_S / 2)
                now = time.monotonic()
                if message is not None:
                    last_heard = now
                    self._apply(message)
                if now - last_ping >= PING_EVERY_S:
                    await pubsub.ping()
                    last_ping = now
                if now - last_heard > SILENCE_LIMIT_S:
                    raise TimeoutError(
                        f"no answer on the invalidation channel for "
                        f"{SILENCE_LIMIT_S} s"
                    )
        finally:
            try:
                async with asyncio.timeout(1.0):
                    await pubsub.aclose()
            except (RedisError, OSError, TimeoutError):
                pass

    def _apply(self, message: dict[str, Any]) -> None:
        kind = _text(message.get("type", ""))
        if kind == "subscribe":
            # Anything may have been deleted while nobody listened.
            self.cache.clear()
            self.subscribed.set()
            log.debug("invalidation subscriber ready, near cache cleared")
        elif kind == "message":
            self.cache.invalidate(_text(message.get("data", "")))
            self.received += 1


def _text(value: object) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
