"""Constant-rate timetables and the choice of what each request does.

A workload run is a list of requests ``i = 0, 1, 2, ...`` each *intended* to
go out at ``started_at + i / rate``, whatever happened to the ones before it.
That fixed timetable is what makes latency honest: a request is late from its
intended time, so a server that stalls is charged for every request that
should have gone out meanwhile (coordinated omission, docs/checker.md).

Several load-generator processes share one timetable by striding over it:
shard ``s`` of ``n`` owns the requests ``i`` with ``i % n == s``. The shards
together send every request exactly once, and their merged stream is the
same constant rate. Everything here is pure: no clock is read, no I/O done.
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass
from enum import StrEnum

from dslab.errors import UsageError


@dataclass(frozen=True)
class Timetable:
    """When each request of one shard is intended to go out.

    ``k`` numbers this shard's own requests (0, 1, ...); the global index of
    its ``k``-th request is ``shard + k * shards``.
    """

    rate_per_s: float
    duration_s: float
    started_at: float  # a time.monotonic() instant, shared by every shard
    shard: int = 0
    shards: int = 1

    def __post_init__(self) -> None:
        if not self.rate_per_s > 0 or not self.duration_s > 0:
            raise UsageError(
                f"a timetable needs a positive rate and duration, got "
                f"{self.rate_per_s}/s for {self.duration_s} s"
            )
        if not 0 <= self.shard < self.shards:
            raise UsageError(f"shard {self.shard} is not one of 0..{self.shards - 1}")

    @property
    def total_requests(self) -> int:
        """All requests of every shard: one each 1/rate s within the duration."""
        return math.ceil(self.rate_per_s * self.duration_s - 1e-9)

    @property
    def requests(self) -> int:
        """This shard's share of ``total_requests``."""
        return self._owned_below(self.total_requests)

    def global_index(self, k: int) -> int:
        return self.shard + k * self.shards

    def intended_at(self, k: int) -> float:
        """The instant this shard's ``k``-th request is due."""
        return self.started_at + self.global_index(k) / self.rate_per_s

    def due_by(self, now: float) -> int:
        """How many of this shard's requests are due at ``now`` (intended <= now)."""
        elapsed_s = now - self.started_at
        if elapsed_s < 0:
            return 0
        # Due global indices are 0..floor(elapsed * rate); clamp to the run.
        due_global = math.floor(elapsed_s * self.rate_per_s) + 1
        due_global = min(self.total_requests, due_global)

        return self._owned_below(due_global)

    def _owned_below(self, global_count: int) -> int:
        """How many of the global indices 0..global_count-1 this shard owns."""
        if global_count <= self.shard:
            return 0
        return (global_count - self.shard + self.shards - 1) // self.shards


class Operation(StrEnum):
    REDIRECT = "redirect"
    CREATE = "create"


@dataclass(frozen=True)
class Mix:
    """The share of redirects and creates, as typed: ``95:5``."""

    redirect: int
    create: int

    @classmethod
    def parse(cls, text: str) -> Mix:
        parts = text.split(":")
        fix = "write redirect:create weights, e.g. 95:5, 100:0 or 0:100"
        if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
            raise UsageError(f"--mix {text!r} is not redirect:create", fix=fix)
        redirect, create = (int(part) for part in parts)
        if redirect + create == 0:
            raise UsageError(f"--mix {text!r} asks for nothing", fix=fix)

        return cls(redirect, create)

    @property
    def create_share(self) -> float:
        return self.create / (self.redirect + self.create)

    def __str__(self) -> str:
        return f"{self.redirect}:{self.create}"


class Picker:
    """Chooses each request's operation and link, reproducibly from a seed.

    Links are ranked 0..n-1; with ``zipf_s`` > 0 rank r is picked with weight
    1 / (r + 1) ** zipf_s (a few hot links, a long tail, as real traffic),
    with 0 every link is equally likely. Calls must come in send order: the
    same seed, shard and call sequence give the same choices.
    """

    def __init__(
        self, *, links: int, mix: Mix, zipf_s: float, seed: int, shard: int = 0
    ) -> None:
        if zipf_s < 0:
            raise UsageError(f"--zipf {zipf_s} is negative", fix="use 0 or more")
        self._random = random.Random(f"{seed}:{shard}")
        self._create_share = mix.create_share
        weights = [1.0 / (rank + 1) ** zipf_s for rank in range(max(links, 0))]
        total = sum(weights)
        running = 0.0
        self._cumulative: list[float] = []
        for weight in weights:
            running += weight / total
            self._cumulative.append(running)

    def operation(self) -> Operation:
        if self._create_share and self._random.random() < self._create_share:
            return Operation.CREATE
        return Operation.REDIRECT

    def link(self) -> int:
        """The rank of the link to follow (0 is the hottest)."""
        rank = bisect.bisect_left(self._cumulative, self._random.random())
        # Rounding can leave the last cumulative weight a hair below 1.0.
        return min(rank, len(self._cumulative) - 1)
