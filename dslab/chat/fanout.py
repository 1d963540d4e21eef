"""Fan-out: deliver a room's messages to this server's sockets.

One ``RoomTail`` task per room that has local subscribers reads the room's
stream with ``XREAD BLOCK`` (or, in the naive mode, its pub/sub channel) and
offers every message to each subscriber's ``Outbox``. Each message is
encoded once per server (``OutFrame``: its JSON text and its whole WebSocket
frame) and the same bytes go to every socket. A socket that keeps up gets the
frame written at once, in the tail's own task (no queue, no task switch per
socket); one whose kernel buffer is backing up, or whose queue is not empty,
gets it queued behind the earlier frames, in order, for that socket's writer.
The queue is bounded and offering never waits, so one slow socket cannot
stall a room: when its queue is full, the outbox calls ``on_overflow`` once
and the server closes that socket with ``CLOSE_SLOW_CONSUMER``; the client
resumes.

Join and resume guarantee *no gap and no duplicate* between replay and live:
the subscription is registered with the tail (buffering live messages) before
the replay reads the stream, so every entry is either already in Redis when
the replay reads or is dispatched later into the buffer; buffered entries at
or below the replay's last ID are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from enum import StrEnum
from types import TracebackType

import redis.exceptions

from dslab.chat.protocol import gap_frame, joined_frame
from dslab.chat.store import ChatEntry, ChatStore, Gap, id_after, pubsub_channel

log = logging.getLogger(__name__)

# XREAD BLOCK must return well within the Redis client's 2 s socket timeout.
TAIL_BLOCK_MS = 1000
# Frames waiting for one socket; at 100 messages/s that is 10 s of backlog
# before the socket counts as a slow consumer.
OUTBOX_FRAMES = 1024
# Live entries buffered for one socket while its replay runs.
MAX_PENDING_ENTRIES = 10_000
# Backoff of a tail whose Redis connection failed: first and largest wait.
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 1.0


class Delivery(StrEnum):
    STREAMS = "streams"  # XADD + XREAD: ordered, replayable, resumable
    PUBSUB = "pubsub"  # PUBLISH only: the naive design that loses messages


def websocket_text_frame(payload: bytes) -> bytes:
    """A whole unmasked, uncompressed, final WebSocket text frame (RFC 6455
    5.2) carrying ``payload``: what a server sends for one text message."""
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", 0x81, size)
    elif size < 65536:
        header = struct.pack("!BBH", 0x81, 126, size)
    else:
        header = struct.pack("!BBQ", 0x81, 127, size)
    return header + payload


class OutFrame:
    """One server frame, encoded once and shared by every socket it goes to.

    ``ts_ms`` is when Redis appended the message (0 when unknown).
    """

    __slots__ = ("payload", "ts_ms", "wire")

    def __init__(self, text: str, ts_ms: int = 0) -> None:
        self.payload = text.encode("utf-8")
        self.wire = websocket_text_frame(self.payload)
        self.ts_ms = ts_ms


# Writes one whole frame (or several, concatenated) to the socket now; False
# when it cannot (the kernel buffer is backing up, the socket is closing), and
# then the frames are queued instead.
WriteNow = Callable[[bytes], bool]


class Outbox:
    """The frames of one socket that could not be written at once.

    A frame is written directly (``write_now``) only while nothing is queued
    or being sent by the writer, so frames always leave in the order offered.
    The queue is bounded by ``capacity`` frames.
    """

    def __init__(
        self, on_overflow: Callable[[], None], *, capacity: int = OUTBOX_FRAMES,
        write_now: WriteNow | None = None,
    ) -> None:
        self.queue: asyncio.Queue[OutFrame] = asyncio.Queue(capacity)
        self._on_overflow = on_overflow
        self._write_now = write_now
        self._sending = False  # the writer holds a frame it took off the queue
        self.overflowed = False

    def _direct(self, wire: bytes) -> bool:
        return (self._write_now is not None and not self._sending
                and self.queue.empty() and self._write_now(wire))

    def offer(self, frame: OutFrame | str) -> bool:
        """Write or queue without waiting; a full queue marks the socket slow,
        once. True when the frame was written at once."""
        if self.overflowed:
            return False
        if isinstance(frame, str):
            frame = OutFrame(frame)
        if self._direct(frame.wire):
            return True
        try:
            self.queue.put_nowait(frame)
        except asyncio.QueueFull:
            self.overflow()
        return False

    def offer_all(self, frames: Sequence[OutFrame]) -> bool:
        """``offer`` each frame, in one write when they can all go at once."""
        if len(frames) == 1:
            return self.offer(frames[0])
        if self.overflowed or not frames:
            return False
        if self._direct(b"".join(frame.wire for frame in frames)):
            return True
        for frame in frames:
            self.offer(frame)
        return False

    async def put(self, frame: OutFrame | str) -> None:
        """Write or queue, waiting for room: used by replay, which the socket
        paces."""
        if self.overflowed:
            return
        if isinstance(frame, str):
            frame = OutFrame(frame)
        if not self._direct(frame.wire):
            await self.queue.put(frame)

    async def pump(self, send: Callable[[OutFrame], Awaitable[None]]) -> None:
        """The socket's writer: send queued frames in order, forever."""
        while True:
            frame = await self.queue.get()
            self._sending = True
            try:
                await send(frame)
            finally:
                self._sending = False

    def overflow(self) -> None:
        if not self.overflowed:
            self.overflowed = True
            self._on_overflow()


class Subscription:
    """One socket's membership of one room."""

    def __init__(self, room: str, outbox: Outbox) -> None:
        self.room = room
        self.outbox = outbox
        self.live = False
        self.pending: deque[ChatEntry] = deque()

    def deliver(self, entries: Sequence[ChatEntry],
                frames: Sequence[OutFrame]) -> bool:
        """Offer a batch of the room's entries; True if written at once."""
        if self.live:
            return self.outbox.offer_all(frames)
        self.pending.extend(entries)
        if len(self.pending) > MAX_PENDING_ENTRIES:
            self.outbox.overflow()
        return False

    def deliver_raw(self, frame: OutFrame) -> None:
        if self.live:
            self.outbox.offer(frame)


# Told after each batch of entries went out to this server's sockets: the
# entries' Redis timestamps (ms) and how many frames were written at once.
FanoutObserver = Callable[[Sequence[int], int], None]


class RoomTail:
    """The task that follows one room for this server."""

    def __init__(self, room: str, store: ChatStore, delivery: Delivery,
                 observer: FanoutObserver | None = None) -> None:
        self.room = room
        self.store = store
        self.delivery = delivery
        self.observer = observer
        self.subscribers: set[Subscription] = set()
        self.cursor = "0-0"
        self.ready = asyncio.Event()
        self.stopping = False
        self.task: asyncio.Task[None] | None = None

    def stop(self) -> None:
        """Ask the tail to end after its current read (at most TAIL_BLOCK_MS).

        Tails are not cancelled: redis-py's Cluster client can swallow the
        cancellation of a blocked XREAD and leave the task hanging.
        """
        self.stopping = True

    async def run(self) -> None:
        if self.delivery is Delivery.PUBSUB:
            await self._follow_channel()
        else:
            await self._follow_stream()

    async def _follow_stream(self) -> None:
        backoff = RETRY_FIRST_S
        while not self.stopping:
            try:
                if not self.ready.is_set():
                    self.cursor = await self.store.last_id(self.room)
                    self.ready.set()
                entries = await self.store.read_new(self.room, self.cursor,
                                                    TAIL_BLOCK_MS)
                backoff = RETRY_FIRST_S
            except (redis.exceptions.RedisError, OSError) as exc:
                log.warning("room tail retrying: %s after %s", self.room,
                            type(exc).__name__)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX_S)
                continue
            except Exception:
                # A tail must never die: it shares its task group with every
                # other room's tail, and its subscribers would wait forever.
                log.exception("room tail failed unexpectedly, retrying: %s",
                              self.room)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX_S)
                continue
            if not entries:
                continue
            try:
                self._fan_out(entries)
            except Exception:
                # Same rule as above (encoding failed: a bug); move on.
                log.exception("room fan-out failed: %s", self.room)
                self.cursor = entries[-1].entry_id

    def _fan_out(self, entries: list[ChatEntry]) -> None:
        """Every subscriber gets the whole batch, encoded once for all."""
        stamps = [entry.ts for entry in entries]
        frames = [OutFrame(entry.frame(), ts)
                  for entry, ts in zip(entries, stamps, strict=True)]
        written = 0
        for subscription in list(self.subscribers):
            try:
                if subscription.deliver(entries, frames):
                    written += len(frames)
            except Exception:
                # Its socket broke in a way the write did not expect: close
                # it as a slow consumer, so that it resumes without a gap.
                log.exception("delivery failed: %s", self.room)
                subscription.outbox.overflow()
        self.cursor = entries[-1].entry_id
        if self.observer is not None:
            self.observer(stamps, written)

    async def _follow_channel(self) -> None:
        backoff = RETRY_FIRST_S
        while not self.stopping:
            pubsub = self.store.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(pubsub_channel(self.room))
                self.ready.set()
                while not self.stopping:
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=TAIL_BLOCK_MS / 1000
                    )
                    if message is None:
                        continue
                    frame = OutFrame(str(message["data"]))
                    for subscription in list(self.subscribers):
                        subscription.deliver_raw(frame)
                    backoff = RETRY_FIRST_S
            except (redis.exceptions.RedisError, OSError) as exc:
                log.warning("room channel retrying: %s after %s", self.room,
                            type(exc).__name__)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX_S)
            except Exception:
                log.exception("room channel failed unexpectedly, retrying: %s",
                              self.room)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX_S)
            finally:
                with contextlib.suppress(redis.exceptions.RedisError, OSError):
                    await pubsub.aclose()


class Hub:
    """This server's tails, started on the first local subscriber of a room
    and stopped with the last. Use as ``async with Hub(...) as hub``."""

    def __init__(self, store: ChatStore, delivery: Delivery,
                 observer: FanoutObserver | None = None) -> None:
        self.store = store
        self.delivery = delivery
        self.observer = observer
        self.tails: dict[str, RoomTail] = {}
        self._group = asyncio.TaskGroup()

    async def __aenter__(self) -> Hub:
        await self._group.__aenter__()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for tail in self.tails.values():
            tail.stop()
        self.tails.clear()
        await self._group.__aexit__(kind, exc, tb)

    def rooms(self) -> list[str]:
        return list(self.tails)

    async def subscribe(
        self, room: str, outbox: Outbox, last_id: str | None = None,
        history: int = 0,
    ) -> Subscription:
        """Join ``room``: joined frame, replay (with gaps), then live."""
        subscription = Subscription(room, outbox)
        tail = self.tails.get(room)
        if tail is None:
            tail = RoomTail(room, self.store, self.delivery, self.observer)
            tail.task = self._group.create_task(tail.run(), name=f"tail:{room}")
            self.tails[room] = tail
        # Registered before anything is read: from here on, nothing is missed.
        tail.subscribers.add(subscription)
        try:
            await tail.ready.wait()
            if self.delivery is Delivery.PUBSUB:
                await outbox.put(joined_frame(room, None, self.delivery.value))
                subscription.live = True
                return subscription
            await self._catch_up(subscription, tail, last_id, history)
        except BaseException:
            self.unsubscribe(subscription)
            raise
        return subscription

    async def _catch_up(
        self, subscription: Subscription, tail: RoomTail, last_id: str | None,
        history: int,
    ) -> None:
        room, outbox = subscription.room, subscription.outbox
        if last_id is not None:
            cursor = last_id
        elif history > 0:
            cursor = await self.store.history_cursor(room, history)
        else:
            cursor = tail.cursor
        await outbox.put(joined_frame(room, cursor, self.delivery.value))

        replayed = buffered = overlap = 0
        async for item in self.store.replay(room, cursor):
            if isinstance(item, Gap):
                await outbox.put(gap_frame(room, item.after, item.through))
                continue
            await outbox.put(OutFrame(item.frame(), item.ts))
            cursor = item.entry_id
            replayed += 1

        # Live entries that came during the replay: drop what it already sent.
        while subscription.pending:
            entry = subscription.pending.popleft()
            if id_after(entry.entry_id, cursor):
                await outbox.put(OutFrame(entry.frame(), entry.ts))
                cursor = entry.entry_id
                buffered += 1
            else:
                overlap += 1
        subscription.live = True
        log.debug("join caught up: %s replayed=%d buffered=%d overlap=%d", room,
                  replayed, buffered, overlap)

    def unsubscribe(self, subscription: Subscription) -> None:
        tail = self.tails.get(subscription.room)
        if tail is None:
            return
        tail.subscribers.discard(subscription)
        if not tail.subscribers:
            del self.tails[subscription.room]
            tail.stop()

    def local_subscribers(self, room: str) -> list[Subscription]:
        tail = self.tails.get(room)
        return list(tail.subscribers) if tail else []

