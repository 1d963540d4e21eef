"""The wire protocol: what is accepted, what is refused and with which code."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dslab.chat import protocol
from dslab.chat.protocol import (
    MAX_TEXT_BYTES,
    Join,
    Leave,
    Ping,
    ProtocolError,
    Send,
    parse_client_frame,
)

room_names = st.from_regex(protocol.ROOM_PATTERN, fullmatch=True)
user_names = st.from_regex(protocol.USER_PATTERN, fullmatch=True)
entry_ids = st.tuples(st.integers(0, 2**48), st.integers(0, 2**20)).map(
    lambda pair: f"{pair[0]}-{pair[1]}")


def refused(frame: object) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        parse_client_frame(json.dumps(frame))
    return caught.value


@given(room=room_names, user=user_names, last_id=st.none() | entry_ids)
def test_valid_join_round_trips(room: str, user: str, last_id: str | None) -> None:
    """Any join with valid names and cursor parses to the same values."""
    frame = {"type": "join", "room": room, "user": user}
    if last_id is not None:
        frame["last_id"] = last_id
    assert parse_client_frame(json.dumps(frame)) == Join(room, user, last_id)


@given(text=st.text(min_size=1, max_size=200))
def test_any_unicode_text_is_accepted(text: str) -> None:
    """Message text may be any non-empty Unicode within the byte limit."""
    frame = {"type": "send", "room": "r", "cmid": "c1", "text": text}
    assert parse_client_frame(json.dumps(frame)) == Send("r", "c1", text)


@given(room=st.text(min_size=1, max_size=80).filter(
    lambda name: not protocol.ROOM_PATTERN.fullmatch(name)))
def test_bad_room_names_are_refused(room: str) -> None:
    """Room names outside the pattern (braces, colons, spaces...) are refused."""
    assert refused({"type": "leave", "room": room}).code == "bad_field"


def test_hash_tag_characters_are_refused_in_rooms() -> None:
    """A brace in a room name would break the Cluster hash tag: refused."""
    assert refused({"type": "join", "room": "a{b}", "user": "u"}).code == "bad_field"


def test_text_over_the_limit_is_too_large_and_names_the_cmid() -> None:
    """Text one byte over MAX_TEXT_BYTES is refused as too_large for that cmid."""
    error = refused({"type": "send", "room": "r", "cmid": "c9",
                     "text": "é" * (MAX_TEXT_BYTES // 2) + "x"})
    assert (error.code, error.cmid) == ("too_large", "c9")


def test_text_at_the_limit_is_accepted() -> None:
    """Text of exactly MAX_TEXT_BYTES bytes is accepted."""
    text = "x" * MAX_TEXT_BYTES
    frame = {"type": "send", "room": "r", "cmid": "c", "text": text}
    assert parse_client_frame(json.dumps(frame)) == Send("r", "c", text)


@pytest.mark.parametrize(("raw", "code"), [
    ("not json", "bad_json"),
    ("[1, 2]", "bad_frame"),
    ('{"type": "shout"}', "unknown_type"),
    ('{"type": "send", "room": "r", "cmid": "c", "text": ""}', "bad_field"),
    ('{"type": "join", "room": "r", "user": "u", "last_id": "12"}', "bad_field"),
    ('{"type": "join", "room": "r", "user": "u", "history": 101}', "bad_field"),
])
def test_malformed_frames_get_their_error_code(raw: str, code: str) -> None:
    """Each kind of malformed frame maps to its documented error code."""
    with pytest.raises(ProtocolError) as caught:
        parse_client_frame(raw)
    assert caught.value.code == code


def test_ping_and_leave_parse() -> None:
    """ping carries its optional token back; leave names the room."""
    assert parse_client_frame('{"type": "ping", "t": 7}') == Ping(7)
    assert parse_client_frame('{"type": "leave", "room": "r"}') == Leave("r")


def test_server_frames_are_compact_json_objects() -> None:
    """Server frames decode to objects with the documented fields."""
    frame = protocol.decode_server_frame(protocol.gap_frame("r", "1-0", "5-2"))
    assert frame == {"type": "gap", "room": "r", "from": "1-0", "to": "5-2",
                     "reason": "trimmed"}
    ack = protocol.decode_server_frame(protocol.ack_frame(
        "r", "c", "9-0", duplicate=True, replicas=1, replicas_met=False))
    assert ack["replicas_met"] is False and ack["duplicate"] is True


@given(left=entry_ids, right=entry_ids)
def test_entry_ids_order_numerically(left: str, right: str) -> None:
    """Entry IDs compare as (ms, seq) numbers, not as strings."""
    lms, lseq = (int(part) for part in left.split("-"))
    rms, rseq = (int(part) for part in right.split("-"))
    assert (protocol.parse_entry_id(left) < protocol.parse_entry_id(right)) == (
        (lms, lseq) < (rms, rseq))
