"""The chat history checker: what a run did to each user's view of each room.

``check_history`` is a pure function. It takes what the workload saw (sends
with their acknowledgements, deliveries to each user, when each user was a
member of a room and when it was disconnected) and returns a ``Verdict`` with
per-room and total counts of lost, duplicated and reordered messages, plus a
few concrete examples of each. It reads no clock and talks to no server, so
the same history always gives the same verdict.

The definitions, precisely (docs/checker.md says the same in plain words):

- Entry IDs ``"<ms>-<seq>"`` order a room's messages by ``(ms, seq)`` as
  integers.
- A user must receive an acknowledged message when one of its membership
  intervals ``[joined_at, left_at]`` contains the whole send: the message was
  due no earlier than the join (``intended_at >= joined_at``) and its
  acknowledgement arrived no later than the leave (``acked_at <= left_at``).
  Reconnects inside a membership resume from the last entry seen and excuse
  nothing. A message whose send straddles a join or a leave may or may not be
  delivered; either is fine.
- **lost**: (message, user) pairs that the user had to receive and never did.
- **duplicated**: deliveries of an entry the same user already had in that room.
- **reordered**: first deliveries of an entry whose ID is lower than the
  highest ID already delivered to that user in that room. Duplicates are
  counted as duplicates only, never also as reorderings.
- **unacked_delivered**: messages whose sender never got an acknowledgement
  but that reached at least one user. Legal (the ack can be lost after the
  append), counted so the learner can see it.
- **double_appended**: extra stream entries for one client message ID, i.e.
  a retried send that was appended again instead of being recognised.

Deliveries of one user in one room are taken in ``received_at`` order; ties
keep the order of the input list. The whole check is a few passes over the
input plus sorting: O(n log n) in the number of sends and deliveries.
"""

from __future__ import annotations

import logging
import math
from bisect import bisect_left, bisect_right
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from dslab.errors import UsageError

log = logging.getLogger(__name__)

# Enough concrete cases to recognise a pattern without flooding a report.
DEFAULT_MAX_EXAMPLES = 10

ANOMALY_KINDS = (
    "lost",
    "duplicated",
    "reordered",
    "unacked_delivered",
    "double_appended",
)

EntryKey = tuple[int, int]


def entry_key(entry_id: str) -> EntryKey:
    """The sortable ``(ms, seq)`` of a stream entry ID such as ``"1700000-3"``."""
    ms_text, dash, seq_text = entry_id.partition("-")
    if not dash or not ms_text.isdigit() or not seq_text.isdigit():
        raise UsageError(
            f"{entry_id!r} is not a Redis stream entry ID",
            fix="pass IDs exactly as XADD returned them, in the form '<ms>-<seq>'",
        )

    return int(ms_text), int(seq_text)


@dataclass(frozen=True, slots=True)
class Send:
    """One message a sender tried to post; ``acked`` means it got an entry ID back.

    Times are seconds on one clock shared by the whole workload (for example
    ``time.monotonic()``). ``intended_at`` is when the schedule wanted the send
    to happen, ``acked_at`` when the entry ID arrived.
    """

    room: str
    sender: str
    client_msg_id: str
    intended_at: float
    acked: bool
    entry_id: str | None = None
    acked_at: float | None = None

    def __post_init__(self) -> None:
        if self.acked and (self.entry_id is None or self.acked_at is None):
            raise UsageError(
                f"send {self.client_msg_id!r} in room {self.room!r} is acknowledged "
                "but has no entry_id or acked_at",
                fix="record the entry ID and the time the acknowledgement arrived",
            )


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message as one user received it."""

    room: str
    user: str
    entry_id: str
    client_msg_id: str
    received_at: float


@dataclass(frozen=True, slots=True)
class Membership:
    """A span during which ``user`` belonged to ``room``; ``left_at`` None = to the end.

    ``joined_at`` is when the join was confirmed; ``left_at`` when the user
    asked to leave. Reconnects with resume are not leaves: record them as
    ``Gap``\\ s inside one membership.
    """

    room: str
    user: str
    joined_at: float
    left_at: float | None = None

    def __post_init__(self) -> None:
        if self.left_at is not None and self.left_at < self.joined_at:
            raise UsageError(
                f"membership of {self.user!r} in {self.room!r} ends before it starts",
                fix="left_at must be at or after joined_at, on the same clock",
            )


@dataclass(frozen=True, slots=True)
class Gap:
    """A span during which ``user`` was disconnected from ``room`` (for reporting)."""

    room: str
    user: str
    disconnected_at: float
    reconnected_at: float

    def __post_init__(self) -> None:
        if self.reconnected_at < self.disconnected_at:
            raise UsageError(
                f"gap of {self.user!r} in {self.room!r} ends before it starts",
                fix="reconnected_at must be at or after disconnected_at",
            )

    @property
    def duration_s(self) -> float:
        return self.reconnected_at - self.disconnected_at


@dataclass(frozen=True, slots=True)
class Anomaly:
    """One concrete case of an anomaly, for a person to go and look at."""

    kind: str
    room: str
    user: str
    entry_id: str
    client_msg_id: str


@dataclass(frozen=True, slots=True)
class RoomCounts:
    """What happened in one room (or, summed, in all rooms)."""

    sends: int = 0
    acked: int = 0
    deliveries: int = 0
    expected: int = 0  # (message, user) pairs that had to be delivered
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0
    unacked_delivered: int = 0
    double_appended: int = 0
    unknown: int = 0  # deliveries whose client message ID no send used
    lost_during_gaps: int = 0  # lost pairs acknowledged while the user was away
    gaps: int = 0
    gap_total_s: float = 0.0
    gap_max_s: float = 0.0

    def plus(self, other: RoomCounts) -> RoomCounts:
        """Counts added together; the longest gap is the longer of the two."""
        summed: dict[str, Any] = {}
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if f.name == "gap_max_s":
                summed[f.name] = max(mine, theirs)
            else:
                summed[f.name] = mine + theirs

        return RoomCounts(**summed)


@dataclass(frozen=True)
class Verdict:
    """The checker's answer; ``ok`` is true when nothing was lost, doubled or
    reordered."""

    rooms: Mapping[str, RoomCounts]
    total: RoomCounts
    examples: Mapping[str, tuple[Anomaly, ...]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        t = self.total
        return t.lost == t.duplicated == t.reordered == t.double_appended == 0

    def summary(self) -> str:
        t = self.total
        state = "ok" if self.ok else "FAILED"
        return (
            f"{state}: lost={t.lost} duplicated={t.duplicated} "
            f"reordered={t.reordered} unacked_delivered={t.unacked_delivered} "
            f"double_appended={t.double_appended} of {t.expected} expected "
            f"deliveries in {len(self.rooms)} room(s)"
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, the form the run file stores."""
        return {
            "ok": self.ok,
            "total": asdict(self.total),
            "rooms": {room: asdict(c) for room, c in sorted(self.rooms.items())},
            "examples": {
                kind: [asdict(a) for a in cases]
                for kind, cases in self.examples.items()
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Verdict:
        """The inverse of ``to_dict``; a damaged dict raises ``UsageError``."""
        try:
            return cls(
                rooms={r: RoomCounts(**c) for r, c in data["rooms"].items()},
                total=RoomCounts(**data["total"]),
                examples={
                    kind: tuple(Anomaly(**a) for a in cases)
                    for kind, cases in data.get("examples", {}).items()
                },
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise UsageError(
                f"the checker verdict is damaged ({exc!r})",
                fix="re-run the workload to write a fresh run file",
            ) from exc


_SECONDS_FIELDS = frozenset({"gap_total_s", "gap_max_s"})


class _Tally:
    """Mutable per-room counters while the check runs."""

    def __init__(self) -> None:
        self.counts: dict[str, float] = defaultdict(float)

    def add(self, name: str, amount: float = 1) -> None:
        self.counts[name] += amount

    def frozen(self) -> RoomCounts:
        values: dict[str, Any] = {}
        for f in fields(RoomCounts):
            value = self.counts.get(f.name, 0)
            values[f.name] = float(value) if f.name in _SECONDS_FIELDS else int(value)

        return RoomCounts(**values)


class _Examples:
    """Keeps the first ``limit`` anomalies of each kind."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.cases: dict[str, list[Anomaly]] = {kind: [] for kind in ANOMALY_KINDS}

    def note(
        self, kind: str, room: str, user: str, entry_id: str, client_msg_id: str
    ) -> None:
        cases = self.cases[kind]
        if len(cases) < self.limit:
            cases.append(Anomaly(kind, room, user, entry_id, client_msg_id))

    def frozen(self) -> dict[str, tuple[Anomaly, ...]]:
        return {kind: tuple(cases) for kind, cases in self.cases.items() if cases}


@dataclass
class _UserView:
    """What one user got in one room: first delivery of each entry -> client ID."""

    first_client_id: dict[EntryKey, str] = field(default_factory=dict)


def check_history(
    sends: Iterable[Send],
    deliveries: Iterable[Delivery],
    memberships: Iterable[Membership],
    gaps: Iterable[Gap] = (),
    *,
    max_examples: int = DEFAULT_MAX_EXAMPLES,
) -> Verdict:
    """Count lost, duplicated and reordered messages in a chat history.

    Raises ``UsageError`` for input that cannot describe a real run: two sends
    with one client message ID in a room, or entry IDs not in Redis form.
    """
    tallies: dict[str, _Tally] = defaultdict(_Tally)
    examples = _Examples(max_examples)
    keys: dict[str, EntryKey] = {}

    def key_of(entry_id: str) -> EntryKey:
        # Many users receive the same entry: parse each ID once.
        key = keys.get(entry_id)
        if key is None:
            key = keys[entry_id] = entry_key(entry_id)
        return key

    sends_by_room = _index_sends(sends, tallies)
    views = _replay_deliveries(deliveries, sends_by_room, tallies, examples, key_of)
    absences = _tally_gaps(gaps, tallies)
    _count_lost(
        sends_by_room,
        views,
        _merged_memberships(memberships),
        absences,
        tallies,
        examples,
        key_of,
    )

    rooms = {room: tallies[room].frozen() for room in sorted(tallies)}
    total = RoomCounts()
    for counts in rooms.values():
        total = total.plus(counts)
    verdict = Verdict(rooms=rooms, total=total, examples=examples.frozen())
    log.debug("history checked: %s", verdict.summary())

    return verdict


def _index_sends(
    sends: Iterable[Send], tallies: dict[str, _Tally]
) -> dict[str, dict[str, Send]]:
    by_room: dict[str, dict[str, Send]] = defaultdict(dict)
    for send in sends:
        room_sends = by_room[send.room]
        if send.client_msg_id in room_sends:
            raise UsageError(
                f"two sends in room {send.room!r} share client message ID "
                f"{send.client_msg_id!r}",
                fix="record one Send per message, with its retries folded into it",
            )
        room_sends[send.client_msg_id] = send
        tallies[send.room].add("sends")
        if send.acked:
            tallies[send.room].add("acked")

    return by_room


def _replay_deliveries(
    deliveries: Iterable[Delivery],
    sends_by_room: Mapping[str, Mapping[str, Send]],
    tallies: dict[str, _Tally],
    examples: _Examples,
    key_of: Callable[[str], EntryKey],
) -> dict[tuple[str, str], _UserView]:
    """Duplicates, reorderings and unexpected entries, one user at a time."""
    streams: dict[tuple[str, str], list[Delivery]] = defaultdict(list)
    for delivery in deliveries:
        streams[(delivery.room, delivery.user)].append(delivery)

    views: dict[tuple[str, str], _UserView] = {}
    # (room, client ID) -> entry IDs seen for it, to find double appends.
    entries_of_message: dict[tuple[str, str], set[str]] = {}
    unacked_seen: set[tuple[str, str]] = set()

    for (room, user), received in sorted(streams.items()):
        received.sort(key=lambda d: d.received_at)  # stable: ties keep input order
        tally = tallies[room]
        room_sends = sends_by_room.get(room, {})
        view = views[(room, user)] = _UserView()
        highest: EntryKey | None = None

        for d in received:
            tally.add("deliveries")
            key = key_of(d.entry_id)
            if key in view.first_client_id:
                tally.add("duplicated")
                examples.note("duplicated", room, user, d.entry_id, d.client_msg_id)
                continue

            view.first_client_id[key] = d.client_msg_id
            if highest is not None and key < highest:
                tally.add("reordered")
                examples.note("reordered", room, user, d.entry_id, d.client_msg_id)
            else:
                highest = key

            send = room_sends.get(d.client_msg_id)
            if send is None:
                tally.add("unknown")
                continue
            if not send.acked and (room, d.client_msg_id) not in unacked_seen:
                unacked_seen.add((room, d.client_msg_id))
                tally.add("unacked_delivered")
                examples.note(
                    "unacked_delivered", room, user, d.entry_id, d.client_msg_id
                )

            message = (room, d.client_msg_id)
            known = entries_of_message.get(message)
            if known is None:
                known = entries_of_message[message] = set()
                if send.entry_id is not None:
                    known.add(send.entry_id)
            if d.entry_id not in known:
                if known:
                    tally.add("double_appended")
                    examples.note(
                        "double_appended", room, user, d.entry_id, d.client_msg_id
                    )
                known.add(d.entry_id)

    return views


class _Absences:
    """One user's gaps in one room, to ask "was the user away at time t?"."""

    def __init__(self, gaps: list[Gap]) -> None:
        gaps.sort(key=lambda g: g.disconnected_at)
        self.starts = [g.disconnected_at for g in gaps]
        # Longest reach of any gap so far, so overlapping gaps need no scan.
        self.reach: list[float] = []
        for gap in gaps:
            previous = self.reach[-1] if self.reach else -math.inf
            self.reach.append(max(previous, gap.reconnected_at))

    def away_at(self, at: float) -> bool:
        index = bisect_right(self.starts, at)
        return index > 0 and self.reach[index - 1] >= at


def _tally_gaps(
    gaps: Iterable[Gap], tallies: dict[str, _Tally]
) -> dict[tuple[str, str], _Absences]:
    by_user: dict[tuple[str, str], list[Gap]] = defaultdict(list)
    for gap in gaps:
        tally = tallies[gap.room]
        tally.add("gaps")
        tally.add("gap_total_s", gap.duration_s)
        tally.counts["gap_max_s"] = max(tally.counts["gap_max_s"], gap.duration_s)
        by_user[(gap.room, gap.user)].append(gap)

    return {user: _Absences(user_gaps) for user, user_gaps in by_user.items()}


def _merged_memberships(
    memberships: Iterable[Membership],
) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """room -> user -> disjoint, sorted ``(joined_at, left_at)``; open end = inf."""
    spans: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for m in memberships:
        end = math.inf if m.left_at is None else m.left_at
        spans[(m.room, m.user)].append((m.joined_at, end))

    merged: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(dict)
    for (room, user), raw in spans.items():
        raw.sort()
        joined: list[tuple[float, float]] = [raw[0]]
        for start, end in raw[1:]:
            last_start, last_end = joined[-1]
            if start <= last_end:  # overlapping spans would count a message twice
                joined[-1] = (last_start, max(last_end, end))
            else:
                joined.append((start, end))
        merged[room][user] = joined

    return merged


def _count_lost(
    sends_by_room: Mapping[str, Mapping[str, Send]],
    views: Mapping[tuple[str, str], _UserView],
    memberships: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]],
    absences: Mapping[tuple[str, str], _Absences],
    tallies: dict[str, _Tally],
    examples: _Examples,
    key_of: Callable[[str], EntryKey],
) -> None:
    """Every acknowledged message against every user that had to receive it."""
    no_view = _UserView()
    for room in sorted(memberships):
        # (intended_at, acked_at, entry key, entry ID, client ID), by due time.
        acked = sorted(
            (s.intended_at, s.acked_at, key_of(s.entry_id), s.entry_id, s.client_msg_id)
            for s in sends_by_room.get(room, {}).values()
            if s.acked_at is not None and s.entry_id is not None
        )
        due_times = [a[0] for a in acked]
        tally = tallies[room]

        for user, spans in sorted(memberships[room].items()):
            view = views.get((room, user), no_view)
            absence = absences.get((room, user))
            for joined_at, left_at in spans:
                # Sends due after the leave cannot have been acked before it.
                first = bisect_left(due_times, joined_at)
                stop = bisect_right(due_times, left_at)
                for _, acked_at, key, entry_id, client_id in acked[first:stop]:
                    if acked_at > left_at:
                        continue
                    tally.add("expected")
                    if view.first_client_id.get(key) == client_id:
                        continue
                    tally.add("lost")
                    examples.note("lost", room, user, entry_id, client_id)
                    if absence is not None and absence.away_at(acked_at):
                        tally.add("lost_during_gaps")
