"""A tiny blocking JSON-over-HTTP client for commands that talk to dslab's
own servers on loopback. It ignores ``http_proxy`` settings (the servers are
local) and turns connection failures into errors that say what to do."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from dslab.errors import EnvironmentProblem

TIMEOUT_S = 10.0
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class NoRedirect(urllib.request.HTTPRedirectHandler):
    """Keep 3xx answers as answers: a shortener's redirect is the result."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_NO_REDIRECT_OPENER = urllib.request.build_opener(
    urllib.request.ProxyHandler({}), NoRedirect()
)


def request(
    method: str,
    url: str,
    body: dict[str, Any] | None = None,
    *,
    headers: dict[str, str] | None = None,
    follow_redirects: bool = True,
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Send ``body`` as JSON; return status, the JSON answer ({} if none), headers."""
    data = json.dumps(body).encode() if body is not None else None
    sent = urllib.request.Request(url, data=data, method=method,
                                  headers={"Content-Type": "application/json",
                                           **(headers or {})})
    opener = _OPENER if follow_redirects else _NO_REDIRECT_OPENER
    try:
        with opener.open(sent, timeout=TIMEOUT_S) as response:
            return response.status, _json(response.read()), dict(response.headers)
    except urllib.error.HTTPError as answer:
        return answer.code, _json(answer.read()), dict(answer.headers)
    except (urllib.error.URLError, OSError) as exc:
        raise EnvironmentProblem(
            f"cannot reach {url}: {getattr(exc, 'reason', exc)}",
            fix="check that the server runs (`dslab lab status`)",
        ) from exc


def _json(raw: bytes) -> dict[str, Any]:
    try:
        document = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return {"body": raw.decode(errors="replace")}
    return document if isinstance(document, dict) else {"body": document}
