"""The shortener's refusals, each mapped to the HTTP status it answers with.

They extend dslab's tree (``dslab.errors``), so the CLI can report them like
any other error, and carry ``status`` so the server can answer without a table
of its own::

    UsageError
    └── ShortenerRefusal            (400 unless stated)
        ├── InvalidURL              400 the long URL is refused
        ├── InvalidAlias            400 the alias is refused
        ├── InvalidRequest          400 the request body is malformed
        ├── Unauthorized            401 API key missing or wrong
        ├── LinkNotFound            404
        ├── AliasTaken              409
        ├── LinkGone                410 expired or used up
        └── TooManyRequests         429 rate limit; ``retry_after_s``
    EnvironmentProblem
    └── ShortenerUnavailable        503 ``retry_after_s``
        ├── StoreUnavailable        503 Redis did not answer in time
        └── CodeSpaceExhausted      503 every try collided with a taken code
"""

from __future__ import annotations

from dslab.errors import EnvironmentProblem, UsageError


class ShortenerRefusal(UsageError):
    """A request the shortener refuses; ``reason`` is a short machine word."""

    status = 400
    reason = "bad_request"

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        super().__init__(message, fix=fix)


class InvalidURL(ShortenerRefusal):
    reason = "invalid_url"


class InvalidAlias(ShortenerRefusal):
    reason = "invalid_alias"


class InvalidRequest(ShortenerRefusal):
    reason = "invalid_request"


class Unauthorized(ShortenerRefusal):
    status = 401
    reason = "unauthorized"


class LinkNotFound(ShortenerRefusal):
    status = 404
    reason = "not_found"


class AliasTaken(ShortenerRefusal):
    status = 409
    reason = "alias_taken"


class LinkGone(ShortenerRefusal):
    status = 410
    reason = "gone"


class TooManyRequests(ShortenerRefusal):
    status = 429
    reason = "rate_limited"

    def __init__(
        self, message: str, *, retry_after_s: int, fix: str | None = None
    ) -> None:
        super().__init__(message, fix=fix)
        self.retry_after_s = retry_after_s


class ShortenerUnavailable(EnvironmentProblem):
    """The shortener cannot do it right now; a client may retry later."""

    status = 503
    reason = "unavailable"

    def __init__(
        self, message: str, *, retry_after_s: int | None = 1, fix: str | None = None
    ) -> None:
        super().__init__(message, fix=fix)
        self.retry_after_s = retry_after_s


class StoreUnavailable(ShortenerUnavailable):
    reason = "redis_unavailable"


class CodeSpaceExhausted(ShortenerUnavailable):
    reason = "code_space_exhausted"
