"""The HTTP service end to end: real Redis, real servers, real sockets."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from dslab.lab.lab import Lab
from tests.conftest import StartLab
from tests.shortener.conftest import StartServer

TARGET = "https://example.com/landing?x=1"


async def _create(http: aiohttp.ClientSession, base: str, **body: Any) -> Any:
    body.setdefault("url", TARGET)
    async with http.post(f"{base}/api/links", json=body) as reply:
        return reply.status, await reply.json(), dict(reply.headers)


async def _get(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, str]]:
    async with http.get(url, allow_redirects=False) as reply:
        await reply.read()
        return reply.status, dict(reply.headers)


async def _eventually(check: Any, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.05)
    return False


async def test_create_redirect_info_delete(
    start_shortener: StartServer, http: aiohttp.ClientSession
) -> None:
    """Create gives 201 + code, the code redirects (302), info shows it,
    delete gives 204 and then 404."""
    server = await start_shortener()
    status, body, _ = await _create(http, server.url)
    assert status == 201
    code = body["code"]
    assert len(code) == 7 and body["short_url"] == f"{server.url}/{code}"

    status, headers = await _get(http, body["short_url"])
    assert status == 302 and headers["Location"] == TARGET

    async with http.get(f"{server.url}/api/links/{code}") as reply:
        info = await reply.json()
    assert reply.status == 200 and info["url"] == TARGET and info["expires_at"] is None

    async with http.delete(f"{server.url}/api/links/{code}") as reply:
        assert reply.status == 204
    status, _ = await _get(http, body["short_url"])
    assert status == 404


async def test_alias_conflict_is_409_and_redirect_status_is_configurable(
    start_shortener: StartServer, http: aiohttp.ClientSession
) -> None:
    """A taken alias answers 409 JSON; the redirect uses the configured 308."""
    server = await start_shortener(redirect_status=308)
    status, _, _ = await _create(http, server.url, alias="docs-home")
    assert status == 201

    status, body, _ = await _create(http, server.url, alias="docs-home")
    assert status == 409 and body["error"] == "alias_taken"
    status, headers = await _get(http, f"{server.url}/docs-home")
    assert status == 308 and headers["Location"] == TARGET


async def test_refusals_are_400_json(
    start_shortener: StartServer, http: aiohttp.ClientSession
) -> None:
    """Bad URLs, own-host links, bad aliases and bad bodies get 400 JSON."""
    server = await start_shortener(public_url="https://sho.rt")
    bad_bodies = [
        {"url": "javascript:alert(1)"},
        {"url": "http://example.com/%0d%0aX: y"},
        {"url": "https://sho.rt/abc"},
        {"url": TARGET, "alias": "api"},
        {"url": TARGET, "ttl_s": "soon"},
        {"url": TARGET, "ttl_s": True},
        {"url": 5},
        {},
    ]
    for body in bad_bodies:
        async with http.post(f"{server.url}/api/links", json=body) as reply:
            answer = await reply.json()
            assert reply.status == 400, body
            assert answer["error"] and answer["detail"], body
    async with http.post(f"{server.url}/api/links", data=b"not json") as reply:
        assert reply.status == 400 and (await reply.json())["error"]


async def test_expired_link_is_410_also_from_the_near_cache(
    start_shortener: StartServer, http: aiohttp.ClientSession
) -> None:
    """A 1 s TTL link redirects, then answers 410 and leaves the near cache."""
    server = await start_shortener()
    _, body, _ = await _create(http, server.url, ttl_s=1)
    code = body["code"]
    assert body["expires_at"] is not None
    status, _ = await _get(http, body["short_url"])
    assert status == 302
    assert server.shortener.near_cache.get(code) is not None

    await asyncio.sleep(1.1)

    status, _ = await _get(http, body["short_url"])
    assert status == 410
    assert server.shortener.near_cache.get(code) is None


async def test_max_visits_then_410(
    start_shortener: StartServer, http: aiohttp.ClientSession
) -> None:
    """A link with max_visits=2 redirects twice and then answers 410."""
    server = await start_shortener()
    _, body, _ = await _create(http, server.url, max_visits=2)

    statuses = [(await _get(http, body["short_url"]))[0] for _ in range(3)]

    assert statuses == [302, 302, 410]


async def test_delete_invalidates_another_servers_near_cache(
    start_shortener: StartServer, http: aiohttp.ClientSession
) -> None:
    """Server B caches a code; a delete through server A makes B answer 404."""
    server_a = await start_shortener()
    server_b = await start_shortener()
    _, body, _ = await _create(http, server_a.url)
    code = body["code"]
    status, _ = await _get(http, f"{server_b.url}/{code}")
    assert status == 302
    assert server_b.shortener.near_cache.get(code) is not None

    async with http.delete(f"{server_a.url}/api/links/{code}") as reply:
        assert reply.status == 204

    async def gone_from_b() -> bool:
        return server_b.shortener.near_cache.get(code) is None

    assert await _eventually(gone_from_b, timeout_s=2.0)
    status, _ = await _get(http, f"{server_b.url}/{code}")
    assert status == 404


async def test_visits_are_counted_after_a_flush(
    start_shortener: StartServer, http: aiohttp.ClientSession
) -> None:
    """Five redirects show up as 5 visits, 1 unique visitor, after the flush."""
    server = await start_shortener(visit_flush_s=0.2)
    _, body, _ = await _create(http, server.url)
    for _ in range(5):
        await _get(http, body["short_url"])

    async def counted() -> bool:
        async with http.get(f"{server.url}/api/links/{body['code']}") as reply:
            info = await reply.json()
        return bool(info["visits"] == 5 and info["unique_visitors"] == 1)

    assert await _eventually(counted, timeout_s=5.0)


async def test_redis_down_creates_503_but_cached_redirects_work(
    start_shortener: StartServer,
    start_lab: StartLab,
    http: aiohttp.ClientSession,
) -> None:
    """With Redis stopped, creation is 503 + Retry-After, a cached code still
    redirects and an uncached one is 503, all without hanging."""
    server = await start_shortener()
    _, body, _ = await _create(http, server.url)
    await _get(http, body["short_url"])  # now in the near cache
    lab: Lab = start_lab()  # the same lab folder: returns the running lab
    lab.down()

    status, answer, headers = await _create(http, server.url)
    assert status == 503 and answer["error"] == "redis_unavailable"
    assert headers["Retry-After"] == "1"
    status, headers = await _get(http, body["short_url"])
    assert status == 302 and headers["Location"] == TARGET
    status, _ = await _get(http, f"{server.url}/Zz9Zz9Z")
    assert status == 503


async def test_create_rate_limit_and_404_cap_answer_429(
    start_shortener: StartServer, http: aiohttp.ClientSession
) -> None:
    """Past the burst, creates and unknown-code lookups get 429 + Retry-After."""
    server = await start_shortener(create_per_minute=12, not_found_per_minute=12)
    create_statuses = [(await _create(http, server.url))[0] for _ in range(3)]
    assert create_statuses == [201, 201, 429]

    lookups = [(await _get(http, f"{server.url}/nope{n}"))[0] for n in range(3)]
    assert lookups == [404, 404, 429]


async def test_delete_needs_the_api_key_when_configured(
    start_shortener: StartServer, http: aiohttp.ClientSession
) -> None:
    """Without the key a delete is 401 and the link stays; with it, 204."""
    server = await start_shortener(api_key="s3cret")
    _, body, _ = await _create(http, server.url)
    url = f"{server.url}/api/links/{body['code']}"

    async with http.delete(url) as reply:
        assert reply.status == 401
    async with http.delete(url, headers={"X-API-Key": "s3cret"}) as reply:
        assert reply.status == 204


async def test_page_qr_health_and_metrics(
    start_shortener: StartServer, http: aiohttp.ClientSession
) -> None:
    """The page, its script, the QR SVG, /healthz and /metrics all answer."""
    server = await start_shortener()
    _, body, _ = await _create(http, server.url)
    await _get(http, body["short_url"])

    async with http.get(f"{server.url}/") as reply:
        assert reply.status == 200 and "shorten-form" in await reply.text()
    async with http.get(f"{server.url}/static/app.js") as reply:
        assert reply.status == 200 and "fetch" in await reply.text()
    async with http.get(f"{server.url}/api/links/{body['code']}/qr.svg") as reply:
        assert reply.status == 200 and "<svg" in await reply.text()
    async with http.get(f"{server.url}/healthz") as reply:
        assert (await reply.json())["redis"] == "up"
    async with http.get(f"{server.url}/metrics") as reply:
        text = await reply.text()
    assert 'dslab_shortener_requests_total{route="create",status="201"} 1.0' in text
    assert "dslab_shortener_redirect_seconds_count 1.0" in text


async def test_code_generation_is_timed_apart_for_random_codes_only(
    start_shortener: StartServer, http: aiohttp.ClientSession
) -> None:
    """dslab_shortener_code_seconds counts the two random-code creations and
    not the alias one: an alias draws no code."""
    server = await start_shortener()
    await _create(http, server.url)
    await _create(http, server.url, url="https://example.org/two")
    await _create(http, server.url, url="https://example.org/3", alias="mine")

    async with http.get(f"{server.url}/metrics") as reply:
        text = await reply.text()
    assert "dslab_shortener_code_seconds_count 2.0" in text
    assert 'dslab_shortener_create_seconds_count 3.0' in text


async def test_pooled_codes_404_until_used_and_are_released_on_stop(
    start_shortener: StartServer, http: aiohttp.ClientSession, redis_client: Any
) -> None:
    """With the code pool (the default), codes reserved ahead redirect to
    nothing (404), the refill shows on /metrics, and a clean stop gives the
    unused codes back."""
    server = await start_shortener(code_pool=16)
    pool = server.shortener.store.pool
    assert pool is not None
    status, body, _ = await _create(http, server.url)
    assert status == 201, body

    pooled = [key.removeprefix("dslab:url:{").removesuffix("}")
              async for key in redis_client.scan_iter(match="dslab:url:{*}")
              if await redis_client.get(key) == pool.placeholder]
    assert len(pooled) == 15
    for code in pooled[:3]:
        assert (await _get(http, f"{server.url}/{code}"))[0] == 404
    async with http.get(f"{server.url}/metrics") as reply:
        text = await reply.text()
    assert "dslab_shortener_codes_reserved_total 16.0" in text
    assert "dslab_shortener_code_refill_seconds_count 1.0" in text

    await server.close()

    for code in pooled:
        assert await redis_client.get(f"dslab:url:{{{code}}}") is None
    assert (await redis_client.get(f"dslab:url:{{{body['code']}}}")) is not None
