"""Visit counting that adds no Redis round trip to a redirect.

A redirect only bumps an in-process counter (``record``). A background task
(``run``) flushes everything counted about once a second in ONE pipeline per
flush: ``INCRBY`` of the code's total and ``PFADD`` of hashed client
addresses into its HyperLogLog of unique visitors. ``close`` flushes what is
left, so a clean shutdown (SIGTERM) loses nothing.

Guarantees and limits:

- totals are exact for visits whose flush succeeded; a worker killed with
  SIGKILL loses at most one interval of counts;
- while Redis is down counts are kept and retried, up to
  ``MAX_PENDING_CODES`` distinct codes; beyond that new codes are dropped
  (and counted in ``dropped``), so an outage cannot exhaust memory;
- unique visitors are approximate (HyperLogLog, ~0.8% error) and keyed by a
  hash of the client address, never the address itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from dslab.shortener.store import (
    DEFAULT_OP_TIMEOUT_S,
    EXPIRED_GRACE_MS,
    visitors_key,
    visits_key,
)

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 1.0  # the brief's "visits show up within about a second"
MAX_PENDING_CODES = 100_000  # bounds memory while Redis is unreachable
# Distinct visitors kept per code between flushes; more only undercounts
# unique visitors of a code that is being hammered.
MAX_VISITORS_PER_FLUSH = 1_000
VISITOR_HASH_KEY = b"dslab-shortener-visitor"  # same in every worker


def visitor_id(client_address: str) -> str:
    """A stable, non-reversible id for a client address."""
    return hashlib.blake2b(
        client_address.encode("utf-8"), digest_size=8, key=VISITOR_HASH_KEY
    ).hexdigest()


@dataclass
class _Pending:
    visits: int = 0
    visitors: set[str] = field(default_factory=set)
    expires_ms: int | None = None


class VisitCounter:
    """Counts visits in memory and flushes them to Redis in batches."""

    def __init__(
        self,
        client: Any,
        *,
        interval_s: float = FLUSH_INTERVAL_S,
        op_timeout_s: float = DEFAULT_OP_TIMEOUT_S,
    ) -> None:
        self.client = client
        self.interval_s = interval_s
        self.op_timeout_s = op_timeout_s
        self.dropped = 0
        self.flushed = 0
        self._pending: dict[str, _Pending] = {}

    @property
    def pending_visits(self) -> int:
        return sum(entry.visits for entry in self._pending.values())

    def record(
        self, code: str, client_address: str, expires_ms: int | None = None
    ) -> None:
        """Count one visit; costs a dict update, no I/O."""
        entry = self._pending.get(code)
        if entry is None:
            if len(self._pending) >= MAX_PENDING_CODES:
                self.dropped += 1
                return
            entry = self._pending[code] = _Pending(expires_ms=expires_ms)
        entry.visits += 1
        if len(entry.visitors) < MAX_VISITORS_PER_FLUSH:
            entry.visitors.add(visitor_id(client_address))

    async def flush(self) -> int:
        """Write everything counted so far; returns the visits written.

        On failure the counts go back into the pending set and the error
        (``RedisError``, ``OSError`` or ``TimeoutError``) is raised.
        """
        if not self._pending:
            return 0
        batch, self._pending = self._pending, {}
        try:
            async with asyncio.timeout(self.op_timeout_s):
                pipe = self.client.pipeline(transaction=False)
                for code, entry in batch.items():
                    pipe.incrby(visits_key(code), entry.visits)
                    pipe.pfadd(visitors_key(code), *entry.visitors)
                    if entry.expires_ms is not None:
                        # Counters go when the link's code is released.
                        until_ms = entry.expires_ms + EXPIRED_GRACE_MS
                        pipe.pexpireat(visits_key(code), until_ms)
                        pipe.pexpireat(visitors_key(code), until_ms)
                await pipe.execute()
        except BaseException:
            self._merge_back(batch)
            raise

        written = sum(entry.visits for entry in batch.values())
        self.flushed += written
        return written

    async def run(self) -> None:
        """Flush every ``interval_s`` until cancelled."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.flush()
            except (RedisError, OSError, TimeoutError) as exc:
                log.debug("visit flush failed, kept for the next one: %s", exc)

    async def close(self) -> None:
        """Last flush at shutdown; what cannot be written is reported once."""
        try:
            await self.flush()
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning(
                "visits lost at shutdown: %d (Redis unreachable: %s)",
                self.pending_visits, exc,
            )

    def _merge_back(self, batch: dict[str, _Pending]) -> None:
        for code, old in batch.items():
            entry = self._pending.get(code)
            if entry is None:
                if len(self._pending) >= MAX_PENDING_CODES:
                    self.dropped += old.visits
                    continue
                self._pending[code] = old
                continue
            entry.visits += old.visits
            room = MAX_VISITORS_PER_FLUSH - len(entry.visitors)
            entry.visitors.update(list(old.visitors)[: max(room, 0)])
