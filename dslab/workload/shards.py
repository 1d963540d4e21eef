"""Load generators spread over processes ("shards"), for both benches.

One Python process cannot drive every load on its own, so a bench starts
``count`` shard processes, waits until each says ``ready``, sends them all
one common start instant (``time.monotonic`` is one clock for every process
of a machine), and waits for their reports. Each shard publishes live
counters in a small shared array for the progress line.

The protocol on each shard's pipe is ``(message, payload)`` tuples: the
shard sends ``ready``, then whatever its bench expects (``sent``, ``done``),
or ``failed`` with the reason; the parent sends ``start`` and bench-specific
instructions. A shard that dies or stays silent past a deadline ends the run
with an error that says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import selectors
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import uvloop

from dslab.errors import DslabError, EnvironmentProblem

JOIN_TIMEOUT_S = 5.0  # for a shard to exit once told to, before it is killed
POLL_S = 0.02
PROGRESS_INTERVAL_S = 0.25
# Where a bench writes the wall-clock instant its load starts, when asked.
LOAD_START_FILE_ENV = "DSLAB_LOAD_START_FILE"


@dataclass
class Shard:
    index: int
    process: BaseProcess
    channel: Connection
    progress: Any  # a shared array of counters, one slot per field
    answer: Any = None  # the payload of the last expected message


@contextlib.asynccontextmanager
async def running_shards(
    target: Callable[..., None],
    args: Callable[[int], tuple[Any, ...]],
    count: int,
    *,
    name: str,
    progress_fields: int,
) -> AsyncIterator[list[Shard]]:
    """Start ``count`` processes running ``target(*args(i), pipe, progress)``;
    they are terminated (if still running) and joined on exit."""
    context = multiprocessing.get_context("spawn")
    shards: list[Shard] = []
    try:
        for index in range(count):
            parent_end, child_end = context.Pipe()
            progress = context.Array("q", progress_fields, lock=False)
            process = context.Process(
                target=target, args=(*args(index), child_end, progress),
                name=f"{name}-{index}", daemon=True,
            )
            process.start()
            child_end.close()
            shards.append(Shard(index, process, parent_end, progress))
        yield shards
    finally:
        for shard in shards:
            if shard.process.is_alive():
                shard.process.terminate()
            shard.process.join(timeout=JOIN_TIMEOUT_S)
            shard.channel.close()


def start_all(shards: Sequence[Shard], start_delay_s: float) -> float:
    """Tell every shard the common start instant; return it.

    With ``LOAD_START_FILE_ENV`` set (``dslab chaos run`` sets it), the
    instant is also written there, as wall-clock seconds, so that a fault
    schedule can count from the moment load begins rather than from the
    bench's start-up (connecting a thousand users takes seconds).
    """
    started_at = time.monotonic() + start_delay_s
    for shard in shards:
        shard.channel.send(("start", started_at))
    mark_load_started(time.time() + start_delay_s)
    return started_at


def mark_load_started(wall_s: float) -> None:
    """Write ``wall_s`` to the file named by ``LOAD_START_FILE_ENV``, if set."""
    marker = os.environ.get(LOAD_START_FILE_ENV)
    if marker:
        partial = Path(f"{marker}.partial")
        partial.write_text(f"{wall_s:.6f}\n", encoding="utf-8")
        partial.replace(marker)  # atomic: a reader never sees half a number


async def await_all(
    shards: Sequence[Shard],
    expected: str,
    deadline: float,
    *,
    what: str,
    fix: str,
    on_tick: Callable[[float], None] | None = None,
) -> None:
    """Wait until every shard sent ``expected`` (its payload lands in
    ``shard.answer``); ``on_tick(now)`` runs about every PROGRESS_INTERVAL_S.
    A shard that failed, died or stayed silent past ``deadline`` ends the run;
    ``what`` names the shards and ``fix`` says what to try in the error."""
    waiting = {shard.index for shard in shards}
    next_tick = 0.0
    while waiting:
        for shard in shards:
            if shard.index not in waiting:
                continue
            if shard.channel.poll():
                try:
                    message, payload = shard.channel.recv()
                except EOFError:
                    message, payload = "failed", "it exited without a word"
                if message == "failed":
                    raise EnvironmentProblem(
                        f"{what} {shard.index} failed: {payload}", fix=fix)
                if message == expected:
                    shard.answer = payload
                    waiting.discard(shard.index)
            elif not shard.process.is_alive():
                raise EnvironmentProblem(
                    f"{what} {shard.index} died (exit {shard.process.exitcode})",
                    fix=f"run with -vv to see why; {fix}")
        now = time.monotonic()
        if on_tick is not None and now >= next_tick:
            on_tick(now)
            next_tick = now + PROGRESS_INTERVAL_S
        if now > deadline:
            raise DslabError(f"the {what}s did not report {expected!r} in time",
                             fix=f"the machine may be overloaded; {fix}")
        if waiting:
            await asyncio.sleep(POLL_S)


def precise_loop() -> asyncio.AbstractEventLoop:
    """An event loop whose timers fire within microseconds, not milliseconds.

    epoll waits in whole milliseconds, so asyncio's default loop wakes a send
    timer up to 1 ms late and that delay lands in every measured latency.
    select() takes microseconds; with at most a few hundred sockets per
    process its cost per wake-up is small (it cannot watch more than 1023).
    """
    return asyncio.SelectorEventLoop(selectors.SelectSelector())


def fast_loop() -> asyncio.AbstractEventLoop:
    """uvloop: socket reads, writes and polling in C, and no limit of 1023
    sockets. Its timers fire to the whole millisecond, so it suits a shard
    whose cost is receiving (the chat generator's, measured in
    docs/performance.md) more than one whose cost is timing sends."""
    return uvloop.new_event_loop()


def run_shard(
    main: Coroutine[Any, Any, Any],
    channel: Connection,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = precise_loop,
) -> None:
    """The body of a shard process: run ``main``, send its result as ``done``,
    or its failure as ``failed`` (the parent turns it into an error)."""
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            result = runner.run(main)
    except KeyboardInterrupt:
        return
    except BaseException as exc:  # reported to the parent
        with contextlib.suppress(OSError):
            channel.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    if result is not None:
        channel.send(("done", result))
