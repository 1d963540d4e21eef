"""The chat wire protocol: JSON text frames over one WebSocket, version 1.

This module is the single definition of every frame the chat server and its
clients exchange; ``docs/chat-protocol.md`` describes the same thing for
someone writing a server or client in another language. It guarantees that
a frame which passes ``parse_client_frame`` is well formed: known type,
valid room/user/cmid names, text within ``MAX_TEXT_BYTES``. Anything else
raises ``ProtocolError`` carrying the error code the server sends back.

The version is negotiated with the WebSocket subprotocol ``SUBPROTOCOL``; a
client that offers no subprotocol gets version 1.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

try:  # several times faster: a load generator decodes 10,000s of frames a second
    import orjson

    _loads: Callable[[str | bytes], Any] = orjson.loads
except ImportError:  # pragma: no cover - the standard library decodes the same
    _loads = json.loads

PROTOCOL_VERSION = 1
SUBPROTOCOL = "dslab.chat.v1"

# A whole frame, JSON included; larger frames close the socket with 1009.
# Twice the text limit leaves room for JSON escaping of non-ASCII text.
MAX_FRAME_BYTES = 16 * 1024
# The text of one message, UTF-8 encoded: a long paragraph, not a file.
MAX_TEXT_BYTES = 4 * 1024
# A client may ask for the newest N messages when it joins without a cursor.
MAX_HISTORY = 100
# A user name, an expiry and a 64-digit signature fit well within this.
MAX_TOKEN_CHARS = 256

# Room names become part of Redis keys, so braces and colons are refused:
# braces would break the Cluster hash tag, colons the key layout.
ROOM_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
USER_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,32}")
CMID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
ENTRY_ID_PATTERN = re.compile(r"\d{1,20}-\d{1,20}")

# Close codes the server uses besides the standard 1000/1001/1009.
CLOSE_BAD_TOKEN = 4001  # the join's identity token is missing or invalid
CLOSE_SLOW_CONSUMER = 4008  # the socket fell behind: reconnect and resume
CLOSE_PROTOCOL_ERROR = 4002  # too many malformed frames in a row
CLOSE_TOO_MANY_CONNECTIONS = 4009  # this user has too many sockets on this server

CLIENT_TYPES = frozenset({"join", "send", "leave", "ping"})


class ProtocolError(Exception):
    """A client frame is malformed; ``code`` is the error code sent back."""

    def __init__(self, code: str, detail: str, cmid: str | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.cmid = cmid


@dataclass(frozen=True)
class Join:
    room: str
    user: str
    last_id: str | None = None
    history: int = 0
    token: str | None = None  # required when the server signs identities


@dataclass(frozen=True)
class Send:
    room: str
    cmid: str
    text: str


@dataclass(frozen=True)
class Leave:
    room: str


@dataclass(frozen=True)
class Ping:
    token: str | int | None = None


ClientFrame = Join | Send | Leave | Ping


def parse_entry_id(entry_id: str) -> tuple[int, int]:
    """``"1700000000000-3"`` -> ``(1700000000000, 3)``, for ordering IDs."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def entry_ms(entry_id: str) -> int:
    """The millisecond part of a stream entry ID (Redis's clock at append)."""
    return parse_entry_id(entry_id)[0]


def parse_client_frame(raw: str | bytes) -> ClientFrame:
    """Decode and validate one client frame or raise ``ProtocolError``."""
    size = len(raw.encode() if isinstance(raw, str) else raw)
    if size > MAX_FRAME_BYTES:
        raise ProtocolError("too_large", f"frame of {size} bytes > {MAX_FRAME_BYTES}")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("bad_json", "frame is not valid JSON") from None
    if not isinstance(data, dict):
        raise ProtocolError("bad_frame", "frame must be a JSON object")

    kind = data.get("type")
    cmid = data.get("cmid") if isinstance(data.get("cmid"), str) else None
    if kind not in CLIENT_TYPES:
        raise ProtocolError("unknown_type", f"unknown frame type {kind!r}", cmid)
    if kind == "ping":
        token = data.get("t")
        return Ping(token if isinstance(token, str | int) else None)

    room = _name(data, "room", ROOM_PATTERN, cmid)
    if kind == "leave":
        return Leave(room)
    if kind == "join":
        return _join(data, room)
    return _send(data, room)


def _join(data: dict[str, Any], room: str) -> Join:
    user = _name(data, "user", USER_PATTERN, None)
    last_id = data.get("last_id")
    if last_id is not None and (
        not isinstance(last_id, str) or not ENTRY_ID_PATTERN.fullmatch(last_id)
    ):
        raise ProtocolError("bad_field", "last_id must look like '1700000000000-0'")
    history = data.get("history", 0)
    if not isinstance(history, int) or not 0 <= history <= MAX_HISTORY:
        raise ProtocolError("bad_field", f"history must be 0..{MAX_HISTORY}")
    token = data.get("token")
    if token is not None and (not isinstance(token, str)
                              or len(token) > MAX_TOKEN_CHARS):
        raise ProtocolError("bad_token", "token must be a string from POST /token")

    return Join(room, user, last_id, history, token)


def _send(data: dict[str, Any], room: str) -> Send:
    cmid = _name(data, "cmid", CMID_PATTERN, None)
    text = data.get("text")
    if not isinstance(text, str) or not text:
        raise ProtocolError("bad_field", "text must be a non-empty string", cmid)
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_TEXT_BYTES:
        raise ProtocolError(
            "too_large", f"text of {size} bytes > {MAX_TEXT_BYTES}", cmid
        )

    return Send(room, cmid, text)


def _name(
    data: dict[str, Any], field: str, pattern: re.Pattern[str], cmid: str | None
) -> str:
    value = data.get(field)
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ProtocolError(
            "bad_field", f"{field} must match {pattern.pattern}", cmid
        )
    return value


# -- server frames -------------------------------------------------------------
# Built as compact JSON text once, then sent as-is to every socket.


def _dump(frame: dict[str, Any]) -> str:
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False)


def joined_frame(room: str, cursor: str | None, mode: str) -> str:
    return _dump({"type": "joined", "room": room, "cursor": cursor, "mode": mode})


def message_frame(
    room: str, entry_id: str, cmid: str, user: str, text: str, ts: int
) -> str:
    return _dump({"type": "message", "room": room, "id": entry_id, "cmid": cmid,
                  "user": user, "text": text, "ts": ts})


def ack_frame(
    room: str, cmid: str, entry_id: str, *, duplicate: bool,
    replicas: int | None = None, replicas_met: bool | None = None,
) -> str:
    frame: dict[str, Any] = {"type": "ack", "room": room, "cmid": cmid,
                             "id": entry_id, "duplicate": duplicate}
    if replicas is not None:
        frame["replicas"] = replicas
        frame["replicas_met"] = replicas_met
    return _dump(frame)


def error_frame(code: str, detail: str, cmid: str | None = None) -> str:
    frame: dict[str, Any] = {"type": "error", "code": code, "detail": detail}
    if cmid is not None:
        frame["cmid"] = cmid
    return _dump(frame)


def gap_frame(room: str, after: str, through: str) -> str:
    return _dump({"type": "gap", "room": room, "from": after, "to": through,
                  "reason": "trimmed"})


def presence_frame(room: str, users: list[str]) -> str:
    return _dump({"type": "presence", "room": room, "users": users})


def pong_frame(token: str | int | None) -> str:
    frame: dict[str, Any] = {"type": "pong"}
    if token is not None:
        frame["t"] = token
    return _dump(frame)


def decode_server_frame(raw: str) -> dict[str, Any]:
    """For clients: a server frame as a dict (the server only sends objects)."""
    data = _loads(raw)  # orjson's error is a json.JSONDecodeError, as before
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise ProtocolError("bad_frame", "server frame without a type")
    return data
