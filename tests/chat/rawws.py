"""A deliberately minimal WebSocket client on a plain socket, for the tests
that need to control the socket itself: a reader that stops reading, with a
tiny receive buffer, to play a slow consumer."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
from typing import Any

OP_TEXT = 0x1
OP_CLOSE = 0x8


def connect(host: str, port: int, *, receive_buffer_bytes: int = 4096) -> socket.socket:
    """Open /ws and complete the upgrade; the socket's buffer is kept small."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer_bytes)
    sock.settimeout(5.0)
    sock.connect((host, port))
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    )
    sock.sendall(request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError("server closed during the upgrade")
        head += chunk
    if b" 101 " not in head.split(b"\r\n", 1)[0]:
        raise ConnectionError(f"upgrade refused: {head!r}")
    return sock


def send_json(sock: socket.socket, frame: dict[str, Any]) -> None:
    """One masked text frame, as RFC 6455 requires of clients."""
    payload = json.dumps(frame).encode()
    mask = os.urandom(4)
    header = bytes([0x80 | OP_TEXT])
    if len(payload) < 126:
        header += bytes([0x80 | len(payload)])
    else:
        header += bytes([0x80 | 126]) + struct.pack("!H", len(payload))
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    sock.sendall(header + mask + masked)


def _exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("connection closed mid-frame")
        data += chunk
    return data


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    """The next (opcode, payload) from the server (unmasked, unfragmented)."""
    first, second = _exactly(sock, 2)
    length = second & 0x7F
    if length == 126:
        length = struct.unpack("!H", _exactly(sock, 2))[0]
    elif length == 127:
        length = struct.unpack("!Q", _exactly(sock, 8))[0]
    return first & 0x0F, _exactly(sock, length)


def drain_until_close(sock: socket.socket, max_frames: int = 100_000) -> int | None:
    """Read frames until a close frame; its status code (None if EOF first)."""
    for _ in range(max_frames):
        try:
            opcode, payload = read_frame(sock)
        except ConnectionError:
            return None
        if opcode == OP_CLOSE:
            return int(struct.unpack("!H", payload[:2])[0]) if payload else None
    raise AssertionError(f"no close frame within {max_frames} frames")
