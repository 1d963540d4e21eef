"""Tests for the chat history checker: hand-written cases and generated histories."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dslab.errors import UsageError
from dslab.workload.checker import (
    Delivery,
    Gap,
    Membership,
    Send,
    Verdict,
    check_history,
    entry_key,
)

ROOM = "lobby"


def acked(cmid: str, entry_id: str, at: float = 1.0, ack_s: float = 0.01) -> Send:
    return Send(ROOM, "alice", cmid, at, True, entry_id, at + ack_s)


def got(user: str, entry_id: str, cmid: str, at: float) -> Delivery:
    return Delivery(ROOM, user, entry_id, cmid, at)


def member(
    user: str, joined_at: float = 0.0, left_at: float | None = None
) -> Membership:
    return Membership(ROOM, user, joined_at, left_at)


THREE = [
    acked("m1", "100-0", 1.0),
    acked("m2", "100-1", 2.0),
    acked("m3", "101-0", 3.0),
]


def test_clean_history_is_ok() -> None:
    """Every message delivered once, in order, to every member: zero anomalies."""
    deliveries = [
        got(u, s.entry_id or "", s.client_msg_id, 5.0 + i)
        for u in ("bob", "carol")
        for i, s in enumerate(THREE)
    ]
    verdict = check_history(THREE, deliveries, [member("bob"), member("carol")])

    assert verdict.ok
    assert verdict.total.expected == 6
    assert verdict.total.deliveries == 6
    assert (
        verdict.total.lost == verdict.total.duplicated == verdict.total.reordered == 0
    )


def test_missing_delivery_is_lost_with_example() -> None:
    """An acknowledged message a present member never got counts as lost."""
    deliveries = [got("bob", "100-0", "m1", 5.0), got("bob", "101-0", "m3", 6.0)]
    verdict = check_history(THREE, deliveries, [member("bob")])

    assert not verdict.ok
    assert verdict.rooms[ROOM].lost == 1
    (example,) = verdict.examples["lost"]
    assert (example.room, example.user, example.entry_id, example.client_msg_id) == (
        ROOM,
        "bob",
        "100-1",
        "m2",
    )


def test_send_straddling_join_or_leave_is_not_required() -> None:
    """A send due before the join, or acked after the leave, may be missed."""
    sends = [
        acked("early", "100-0", at=0.9, ack_s=0.5),  # due before join at 1.0
        acked("inside", "100-1", at=1.5, ack_s=0.1),
        acked("late", "100-2", at=2.9, ack_s=0.5),  # acked after leave at 3.0
    ]
    verdict = check_history(
        sends, [got("bob", "100-1", "inside", 4.0)], [member("bob", 1.0, 3.0)]
    )

    assert verdict.ok
    assert verdict.total.expected == 1


def test_message_between_memberships_is_not_required() -> None:
    """A user who left and joined again owes nothing sent while it was away."""
    sends = [acked("a", "1-0", 1.0), acked("away", "2-0", 5.0), acked("b", "3-0", 9.0)]
    memberships = [member("bob", 0.0, 2.0), member("bob", 8.0, None)]
    deliveries = [got("bob", "1-0", "a", 1.5), got("bob", "3-0", "b", 9.5)]
    verdict = check_history(sends, deliveries, memberships)

    assert verdict.ok
    assert verdict.total.expected == 2


def test_overlapping_memberships_count_each_message_once() -> None:
    """Two overlapping spans for one user do not expect a message twice."""
    memberships = [member("bob", 0.0, 10.0), member("bob", 0.5, None)]
    verdict = check_history(THREE, [], memberships)

    assert verdict.total.expected == 3
    assert verdict.total.lost == 3


def test_duplicate_deliveries_count_each_extra_copy() -> None:
    """An entry delivered three times to one user counts two duplicates."""
    deliveries = [got("bob", "100-0", "m1", t) for t in (5.0, 6.0, 7.0)]
    verdict = check_history(THREE[:1], deliveries, [member("bob")])

    assert verdict.total.duplicated == 2
    assert verdict.total.reordered == 0
    assert not verdict.ok
    assert [a.entry_id for a in verdict.examples["duplicated"]] == ["100-0", "100-0"]


def test_same_entry_to_two_users_is_not_a_duplicate() -> None:
    """Duplicates are per user: one entry reaching two users is normal."""
    deliveries = [got("bob", "100-0", "m1", 5.0), got("carol", "100-0", "m1", 5.0)]
    verdict = check_history(THREE[:1], deliveries, [member("bob"), member("carol")])

    assert verdict.ok


def test_reordered_counts_deliveries_below_the_highest_seen() -> None:
    """Order 3,1,2 has two deliveries below the highest already delivered."""
    order = [("101-0", "m3"), ("100-0", "m1"), ("100-1", "m2")]
    deliveries = [got("bob", e, c, 5.0 + i) for i, (e, c) in enumerate(order)]
    verdict = check_history(THREE, deliveries, [member("bob")])

    assert verdict.total.reordered == 2
    assert verdict.total.lost == 0
    assert [a.entry_id for a in verdict.examples["reordered"]] == ["100-0", "100-1"]


def test_late_duplicate_is_not_also_a_reordering() -> None:
    """Order 1,2,1 is one duplicate and no reordering."""
    order = [("100-0", "m1"), ("100-1", "m2"), ("100-0", "m1")]
    deliveries = [got("bob", e, c, 5.0 + i) for i, (e, c) in enumerate(order)]
    verdict = check_history(THREE[:2], deliveries, [member("bob")])

    assert verdict.total.duplicated == 1
    assert verdict.total.reordered == 0


def test_entry_ids_compare_as_integers() -> None:
    """'10-0' follows '9-5' and '5-10' follows '5-9', unlike string order."""
    assert entry_key("10-0") > entry_key("9-5")
    assert entry_key("5-10") > entry_key("5-9")

    sends = [acked("a", "5-9", 1.0), acked("b", "5-10", 2.0), acked("c", "10-0", 3.0)]
    deliveries = [
        got("bob", s.entry_id or "", s.client_msg_id, 5.0 + i)
        for i, s in enumerate(sends)
    ]
    assert check_history(sends, deliveries, [member("bob")]).ok


def test_received_at_decides_order_not_list_position() -> None:
    """Deliveries listed out of order but received in order are not reordered."""
    deliveries = [got("bob", "100-1", "m2", 6.0), got("bob", "100-0", "m1", 5.0)]
    verdict = check_history(THREE[:2], deliveries, [member("bob")])

    assert verdict.ok


def test_unacked_but_delivered_is_counted_once_and_legal() -> None:
    """A message whose ack was lost but reached two users counts once, still ok."""
    sends = [Send(ROOM, "alice", "m1", 1.0, False)]
    deliveries = [got("bob", "100-0", "m1", 5.0), got("carol", "100-0", "m1", 5.0)]
    verdict = check_history(sends, deliveries, [member("bob"), member("carol")])

    assert verdict.ok
    assert verdict.total.unacked_delivered == 1
    assert verdict.total.expected == 0


def test_retried_send_appended_twice_is_double_appended() -> None:
    """A client message ID seen under a second entry ID fails the check."""
    deliveries = [got("bob", "100-0", "m1", 5.0), got("bob", "100-5", "m1", 6.0)]
    verdict = check_history(THREE[:1], deliveries, [member("bob")])

    assert verdict.total.double_appended == 1
    assert verdict.examples["double_appended"][0].entry_id == "100-5"
    assert not verdict.ok


def test_delivery_of_unknown_message_is_counted_not_failed() -> None:
    """A delivery no send explains (another client's message) is only counted."""
    verdict = check_history([], [got("bob", "1-0", "stranger", 1.0)], [member("bob")])

    assert verdict.ok
    assert verdict.total.unknown == 1


def test_gaps_are_reported_and_excuse_nothing() -> None:
    """Reconnect gaps give stats; a loss inside a gap is still lost."""
    gaps = [Gap(ROOM, "bob", 1.5, 2.5), Gap(ROOM, "bob", 4.0, 4.5)]
    deliveries = [got("bob", "100-0", "m1", 1.2), got("bob", "101-0", "m3", 3.5)]
    verdict = check_history(THREE, deliveries, [member("bob")], gaps)

    counts = verdict.rooms[ROOM]
    assert counts.gaps == 2
    assert counts.gap_total_s == pytest.approx(1.5)
    assert counts.gap_max_s == pytest.approx(1.0)
    assert counts.lost == 1  # m2 acked at 2.01, while bob was away
    assert counts.lost_during_gaps == 1


def test_examples_are_capped() -> None:
    """No more than max_examples cases of one kind are kept."""
    deliveries = [got("bob", "100-0", "m1", float(t)) for t in range(20)]
    verdict = check_history(THREE[:1], deliveries, [member("bob")], max_examples=3)

    assert verdict.total.duplicated == 19
    assert len(verdict.examples["duplicated"]) == 3


def test_counts_are_kept_per_room_and_summed() -> None:
    """Per-room counts add up to the total."""
    other = Send("other", "alice", "x", 1.0, True, "7-0", 1.1)
    sends = [*THREE, other]
    memberships = [member("bob"), Membership("other", "bob", 0.0)]
    verdict = check_history(sends, [got("bob", "100-0", "m1", 2.0)], memberships)

    assert verdict.rooms[ROOM].lost == 2
    assert verdict.rooms["other"].lost == 1
    assert verdict.total.lost == 3
    assert verdict.total.sends == 4


@pytest.mark.parametrize("bad", ["100", "abc-1", "1-", "-1", "1-2-3", "1.5-0"])
def test_malformed_entry_id_is_a_usage_error(bad: str) -> None:
    """Entry IDs not in '<ms>-<seq>' form are refused with a fix."""
    with pytest.raises(UsageError) as caught:
        check_history([], [got("bob", bad, "m", 1.0)], [])
    assert caught.value.fix


def test_impossible_input_is_a_usage_error() -> None:
    """Two sends with one client ID, or an ack without entry ID, are refused."""
    with pytest.raises(UsageError):
        check_history([THREE[0], replace(THREE[1], client_msg_id="m1")], [], [])
    with pytest.raises(UsageError):
        Send(ROOM, "alice", "m1", 1.0, True, None, None)
    with pytest.raises(UsageError):
        Membership(ROOM, "bob", 5.0, 4.0)
    with pytest.raises(UsageError):
        Gap(ROOM, "bob", 5.0, 4.0)


def test_verdict_round_trips_through_json() -> None:
    """to_dict is JSON-ready and from_dict gives the same verdict back."""
    deliveries = [got("bob", "100-1", "m2", 1.0), got("bob", "100-0", "m1", 2.0)]
    verdict = check_history(
        THREE, deliveries, [member("bob")], [Gap(ROOM, "bob", 1, 2)]
    )

    data = json.loads(json.dumps(verdict.to_dict()))
    again = Verdict.from_dict(data)

    assert again == verdict
    assert data["ok"] is False
    with pytest.raises(UsageError):
        Verdict.from_dict({"rooms": {}})


# --- generated histories -------------------------------------------------------


@dataclass
class History:
    sends: list[Send]
    memberships: list[Membership]
    gaps: list[Gap]
    # One list per (room, user), in the order the user received them.
    streams: dict[tuple[str, str], list[Delivery]]
    required: list[tuple[str, str, int]]  # (room, user, index in its stream)
    unacked_delivered: int

    def deliveries(self, rng: random.Random) -> list[Delivery]:
        """All users' deliveries interleaved at random, as a workload sees them."""
        everything = [d for stream in self.streams.values() for d in stream]
        rng.shuffle(everything)
        return everything


def _must_receive(send: Send, spans: list[tuple[float, float | None]]) -> bool:
    """The documented rule, written out the slow, obvious way."""
    if not send.acked or send.acked_at is None:
        return False
    return any(
        send.intended_at >= joined and (left is None or send.acked_at <= left)
        for joined, left in spans
    )


@st.composite
def histories(draw: st.DrawFn) -> History:
    """Clean histories: every required message delivered once, in stream order."""
    times = st.floats(0.0, 10.0, allow_nan=False)
    sends: list[Send] = []
    memberships: list[Membership] = []
    gaps: list[Gap] = []
    streams: dict[tuple[str, str], list[Delivery]] = {}
    required: list[tuple[str, str, int]] = []
    unacked_seen: set[tuple[str, str]] = set()

    for room in draw(st.lists(st.sampled_from("abc"), min_size=1, unique=True)):
        stream: list[tuple[str, Send]] = []  # (entry ID, send) in stream order
        ms, seq = 1000, 0
        for i in range(draw(st.integers(0, 30))):
            step = draw(st.integers(0, 2))
            ms, seq = (ms, seq + 1) if step == 0 else (ms + step, 0)
            entry_id = f"{ms}-{seq}"
            intended_at = i * 0.3 + draw(st.floats(0.0, 0.5))  # not monotonic
            fate = draw(
                st.sampled_from(["acked", "acked", "acked", "lost-ack", "gone"])
            )
            if fate == "acked":
                ack_s = draw(st.floats(0.001, 0.6))
                send = Send(
                    room,
                    "s",
                    f"{room}{i}",
                    intended_at,
                    True,
                    entry_id,
                    intended_at + ack_s,
                )
            else:
                send = Send(room, "s", f"{room}{i}", intended_at, False)
            sends.append(send)
            if fate != "gone":
                stream.append((entry_id, send))

        for user in draw(st.lists(st.sampled_from("uvwx"), min_size=1, unique=True)):
            joined = draw(times)
            spans: list[tuple[float, float | None]] = [
                (joined, draw(st.none() | st.floats(joined, 12.0)))
            ]
            if spans[0][1] is not None and draw(st.booleans()):
                rejoin = draw(st.floats(spans[0][1] + 0.01, spans[0][1] + 3.0))
                spans.append(
                    (rejoin, draw(st.none() | st.floats(rejoin, rejoin + 5.0)))
                )
            memberships += [Membership(room, user, j, left) for j, left in spans]
            for _ in range(draw(st.integers(0, 2))):
                start = draw(times)
                gaps.append(Gap(room, user, start, start + draw(st.floats(0, 2))))

            received: list[Delivery] = []
            for entry_id, send in stream:
                must = _must_receive(send, spans)
                if must or draw(st.booleans()):  # optional ones come or not
                    if must:
                        required.append((room, user, len(received)))
                    elif not send.acked:
                        unacked_seen.add((room, send.client_msg_id))
                    at = 20.0 + len(received) * 0.01
                    received.append(
                        Delivery(room, user, entry_id, send.client_msg_id, at)
                    )
            streams[(room, user)] = received

    return History(sends, memberships, gaps, streams, required, len(unacked_seen))


GENERATED = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def _check(history: History, seed: int) -> Verdict:
    return check_history(
        history.sends,
        history.deliveries(random.Random(seed)),
        history.memberships,
        history.gaps,
    )


@GENERATED
@given(histories(), st.integers(0, 2**16))
def test_generated_clean_histories_have_no_anomalies(
    history: History, seed: int
) -> None:
    """A history delivered in stream order without gaps in it reports zero."""
    verdict = _check(history, seed)

    assert verdict.ok
    assert verdict.total.lost == 0
    assert verdict.total.duplicated == 0
    assert verdict.total.reordered == 0
    assert verdict.total.double_appended == 0
    assert verdict.total.expected == len(history.required)
    assert verdict.total.unacked_delivered == history.unacked_delivered


@GENERATED
@given(histories(), st.data())
def test_dropping_k_required_deliveries_counts_exactly_k_lost(
    history: History, data: st.DataObject
) -> None:
    """Removing k deliveries that had to happen reports exactly k lost."""
    drops = data.draw(
        st.sets(st.sampled_from(history.required), max_size=8)
        if history.required
        else st.just(set())
    )
    for room, user, index in sorted(drops, reverse=True):
        del history.streams[(room, user)][index]

    verdict = _check(history, 0)

    assert verdict.total.lost == len(drops)
    assert verdict.total.duplicated == verdict.total.reordered == 0
    assert verdict.ok == (not drops)


@GENERATED
@given(histories(), st.data())
def test_duplicating_k_deliveries_counts_exactly_k_duplicates(
    history: History, data: st.DataObject
) -> None:
    """Delivering k extra copies (possibly of one entry) reports exactly k."""
    slots = [(key, i) for key, s in history.streams.items() for i in range(len(s))]
    copies = data.draw(
        st.lists(st.sampled_from(slots), max_size=8) if slots else st.just([])
    )
    for key, index in sorted(copies, key=lambda c: c[1], reverse=True):
        stream = history.streams[key]
        stream.insert(index + 1, stream[index])  # same received_at: stays after

    verdict = _check(history, 1)

    assert verdict.total.duplicated == len(copies)
    assert verdict.total.lost == verdict.total.reordered == 0


@GENERATED
@given(histories(), st.data())
def test_swapping_k_adjacent_pairs_counts_exactly_k_reordered(
    history: History, data: st.DataObject
) -> None:
    """k swaps of disjoint adjacent pairs report exactly k reorderings."""
    pairs = [(key, j) for key, s in history.streams.items() for j in range(len(s) // 2)]
    swaps = data.draw(
        st.sets(st.sampled_from(pairs), max_size=8) if pairs else st.just(set())
    )
    for key, j in swaps:
        stream = history.streams[key]
        first, second = stream[2 * j], stream[2 * j + 1]
        # Swap what arrived, keep when: the user saw the later entry first.
        stream[2 * j] = replace(second, received_at=first.received_at)
        stream[2 * j + 1] = replace(first, received_at=second.received_at)

    verdict = _check(history, 2)

    assert verdict.total.reordered == len(swaps)
    assert verdict.total.lost == verdict.total.duplicated == 0
