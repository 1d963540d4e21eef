"""Identity tokens: who a socket speaks for, signed by the chat servers.

A client asks any server for a token (``POST /token {"user": "ada"}``) and
joins with it; the servers of one lab share a secret, so a token from one is
accepted by all, and a client cannot speak as someone else by writing another
name into its frames. The form is ``<user>.<expires unix s>.<HMAC-SHA256 hex>``.

Attention: issuing is open (the lab has no passwords): a token proves that a
server named the user, not who is at the keyboard. What it rules out is a
client changing its identity on its own, as with an ``X-User-Id`` header.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from pathlib import Path

from dslab.chat.protocol import USER_PATTERN, ProtocolError

# A day: long enough that a chat tab survives a working day of reconnects,
# short enough that a leaked token does not work forever.
TOKEN_TTL_S = 24 * 3600
SECRET_BYTES = 32


def issue(secret: bytes, user: str, *, ttl_s: int = TOKEN_TTL_S,
          now: float | None = None) -> tuple[str, int]:
    """A token for ``user`` and the Unix second it expires."""
    if not USER_PATTERN.fullmatch(user):
        raise ProtocolError("bad_field", f"user must match {USER_PATTERN.pattern}")
    expires = int(now if now is not None else time.time()) + ttl_s
    payload = f"{user}.{expires}"

    return f"{payload}.{_sign(secret, payload)}", expires


def verify(secret: bytes, token: str, *, now: float | None = None) -> str:
    """The user a valid token speaks for; ``bad_token`` for anything else."""
    payload, dot, signature = token.rpartition(".")
    user, dot2, expires = payload.rpartition(".")
    if not (dot and dot2 and expires.isdigit() and USER_PATTERN.fullmatch(user)):
        raise ProtocolError("bad_token", "the token is malformed: get a new one")
    if not hmac.compare_digest(signature, _sign(secret, payload)):
        raise ProtocolError("bad_token", "the token's signature does not match")
    if int(expires) < (now if now is not None else time.time()):
        raise ProtocolError("bad_token", "the token has expired: get a new one")

    return user


def load_or_create_secret(path: Path) -> bytes:
    """The lab's shared secret, made on first use (readable by its owner only)."""
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_bytes(SECRET_BYTES)
    path.touch(mode=0o600)
    path.write_text(secret.hex() + "\n")
    return secret


def _sign(secret: bytes, payload: str) -> str:
    return hmac.new(secret, payload.encode(), hashlib.sha256).hexdigest()
