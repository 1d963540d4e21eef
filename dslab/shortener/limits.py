"""Per-client abuse controls: a creation rate limit and a cap on 404s.

Both are token buckets kept in the worker's memory, keyed by the client's
address as the socket reports it (``X-Forwarded-For`` is not trusted: behind
a proxy every client would share one bucket, which is the safe failure).

Limits: buckets are per worker process, so with ``--workers N`` a client that
spreads its connections over the workers gets up to N times the rate. That
keeps the check off Redis (a create already costs a round trip and a 404
flood should cost Redis nothing); a shared limit would be one ``INCR`` with
``EXPIRE`` per request.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

# Clients remembered per bucket; the least recently seen are forgotten first,
# which only ever gives a forgotten client a fresh (full) bucket.
MAX_CLIENTS = 50_000


@dataclass
class _Bucket:
    tokens: float
    updated: float


class TokenBuckets:
    """``per_minute`` tokens a minute per client, bursts up to ``burst``."""

    def __init__(
        self,
        per_minute: float,
        burst: float | None = None,
        *,
        max_clients: int = MAX_CLIENTS,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate_per_s = per_minute / 60.0
        self.burst = burst if burst is not None else max(per_minute / 6.0, 1.0)
        self.max_clients = max_clients
        self.monotonic = monotonic
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0

    def retry_after_s(self, client: str) -> int:
        """0 if ``client`` has a token now, else whole seconds until it has one."""
        if not self.enabled:
            return 0
        bucket = self._refill(client)
        if bucket.tokens >= 1.0:
            return 0
        return max(1, math.ceil((1.0 - bucket.tokens) / self.rate_per_s))

    def blocked_for_s(self, client: str) -> int:
        """Like ``retry_after_s`` but free for a client never seen: the redirect
        path calls it on every request and must not grow the table."""
        if not self.enabled or client not in self._buckets:
            return 0
        return self.retry_after_s(client)

    def take(self, client: str) -> int:
        """Spend one token; returns 0 on success, else the seconds to wait."""
        wait_s = self.retry_after_s(client)
        if wait_s == 0 and self.enabled:
            self._buckets[client].tokens -= 1.0
        return wait_s

    def _refill(self, client: str) -> _Bucket:
        now = self.monotonic()
        bucket = self._buckets.get(client)
        if bucket is None:
            bucket = self._buckets[client] = _Bucket(self.burst, now)
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        else:
            elapsed = now - bucket.updated
            bucket.tokens = min(self.burst, bucket.tokens + elapsed * self.rate_per_s)
            bucket.updated = now
            self._buckets.move_to_end(client)
        return bucket
