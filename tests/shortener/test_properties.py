"""Properties of the running service, checked with hypothesis against a real
`python -m dslab.shortener` process over real HTTP."""

from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.provisional import urls

from dslab.settings import RedisTarget
from dslab.shortener.validation import InvalidURL, validate_url

READY_LINE = re.compile(r"shortener ready: http://127\.0\.0\.1:(\d+)")
START_TIMEOUT_S = 30.0


@pytest.fixture
def shortener_port(redis_target: RedisTarget) -> Iterator[int]:
    """A one-worker shortener process without rate limits; SIGTERM after."""
    process = subprocess.Popen(
        [sys.executable, "-m", "dslab.shortener", "--port", "0",
         "--redis", redis_target.url(with_password=True),
         "--create-per-minute", "0", "--not-found-per-minute", "0"],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        assert process.stderr is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        port = 0
        while not port and time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            found = READY_LINE.search(line)
            port = int(found.group(1)) if found else 0
        assert port, "the shortener did not announce itself"
        yield port
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _request(port: int, method: str, path: str, body: Any = None) -> Any:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        payload = None if body is None else json.dumps(body).encode()
        connection.request(method, path, body=payload,
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.getheader("Location"), response.read()
    finally:
        connection.close()


CANDIDATES = st.one_of(
    urls(),
    st.text(max_size=120),
    st.tuples(urls(), st.text(max_size=30)).map("".join),
    st.tuples(st.sampled_from(["http://", "HTTPS://", " http://", "javascript:"]),
              st.text(max_size=60)).map("".join),
)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(CANDIDATES)
def test_accepted_urls_redirect_exactly_and_refusals_are_400(
    shortener_port: int, raw: str
) -> None:
    """An accepted URL redirects with Location == the stored URL (no CR/LF);
    a refused one is a 400 with JSON, never a 5xx."""
    try:
        expected: str | None = validate_url(raw, own_hosts=("127.0.0.1",))
    except InvalidURL:
        expected = None

    status, _, body = _request(shortener_port, "POST", "/api/links", {"url": raw})

    if expected is None:
        assert status == 400
        assert json.loads(body)["error"] == "invalid_url"
        return
    assert status == 201
    created = json.loads(body)
    assert created["url"] == expected
    status, location, _ = _request(shortener_port, "GET", f"/{created['code']}")
    assert status == 302
    assert location == expected
    assert "\r" not in location and "\n" not in location
