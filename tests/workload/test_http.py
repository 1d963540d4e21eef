"""Tests for the open-loop HTTP load generator: its timetable, its answer parser,
honest latency against a stalling server, and the Location check against a
real shortener on a real lab Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from dslab.errors import UsageError
from dslab.redisconn import async_client
from dslab.shortener.server import ShortenerConfig, start_server
from dslab.workload.http import (
    BadAnswer,
    HttpTarget,
    LoadPlan,
    create_links,
    parse_answer,
    run_load,
)
from dslab.workload.schedule import Mix, Picker, Timetable
from tests.conftest import StartLab

STALL_S = 1.0


@given(
    rate=st.floats(min_value=1, max_value=2_000),
    duration=st.floats(min_value=0.01, max_value=2),
    shards=st.integers(min_value=1, max_value=8),
)
def test_shards_together_send_every_request_once_at_a_constant_rate(
    rate: float, duration: float, shards: int
) -> None:
    """Shards own disjoint requests that together are i/rate for i = 0..N-1."""
    tables = [Timetable(rate, duration, 100.0, s, shards) for s in range(shards)]
    times = sorted(t.intended_at(k) for t in tables for k in range(t.requests))

    assert len(times) == tables[0].total_requests
    assert all(abs(t - (100.0 + i / rate)) < 1e-9 for i, t in enumerate(times))
    assert all(t < 100.0 + duration + 1e-9 for t in times)
    end = 100.0 + duration + 1.0
    assert sum(t.due_by(end) for t in tables) == len(times)


def test_due_by_counts_only_requests_whose_time_has_come() -> None:
    """A request is due exactly from its intended instant, not before."""
    table = Timetable(10.0, 1.0, 50.0)

    assert table.due_by(49.99) == 0
    assert table.due_by(50.0) == 1
    assert table.due_by(50.25) == 3
    assert table.due_by(60.0) == 10


def test_picker_follows_the_mix_and_is_reproducible() -> None:
    """The same seed picks the same requests; 80:20 gives about 20% creates."""
    def picks(seed: int) -> list[str]:
        picker = Picker(links=10, mix=Mix(80, 20), zipf_s=1.0, seed=seed)
        return [f"{picker.operation()}:{picker.link()}" for _ in range(5000)]

    first = picks(7)
    creates = sum(pick.startswith("create") for pick in first)

    assert first == picks(7)
    assert first != picks(8)
    assert 800 < creates < 1200


def test_answer_parser_waits_for_whole_answers_and_reads_chunks() -> None:
    """Split, keep-alive, chunked and closing answers parse to the right length."""
    redirect = (b"HTTP/1.1 302 Found\r\nLocation: https://a.example/x\r\n"
                b"Content-Length: 3\r\n\r\nabc")
    assert parse_answer(redirect[:-1]) is None
    answer, length = parse_answer(redirect + b"HTTP/1.1") or (None, 0)
    assert answer is not None and length == len(redirect)
    assert (answer.status, answer.location, answer.close) == (
        302, b"https://a.example/x", False)

    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
               b"Connection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert parse_answer(chunked[:-2]) is None
    answer, length = parse_answer(chunked) or (None, 0)
    assert answer is not None and answer.close and length == len(chunked)

    with pytest.raises(BadAnswer):
        parse_answer(b"SSH-2.0-OpenSSH\r\n\r\n")


@pytest.mark.parametrize("url", ["http://10.0.0.1:80", "http://example.com",
                                 "https://127.0.0.1:443"])
def test_only_plain_http_on_loopback_is_driven(url: str) -> None:
    """Non-loopback or non-http servers are refused as usage errors (exit 2)."""
    with pytest.raises(UsageError) as refused:
        HttpTarget.parse(url)

    assert refused.value.exit_code == 2
    assert HttpTarget.parse("http://localhost:8080") == HttpTarget("127.0.0.1", 8080)


@pytest.fixture
async def stalling_server() -> AsyncIterator[tuple[HttpTarget, list[float]]]:
    """A real HTTP server on loopback that answers /r with a 302, except that
    every answer waits while ``stall[0]`` (a monotonic instant) is ahead."""
    stall = [0.0]

    async def redirect(request: web.Request) -> web.Response:
        wait_s = stall[0] - time.monotonic()
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        return web.Response(status=302, headers={"Location": "https://x.example/"})

    app = web.Application()
    app.router.add_get("/r", redirect)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        yield HttpTarget("127.0.0.1", port), stall
    finally:
        await runner.cleanup()


async def test_a_stall_is_charged_to_every_request_it_delayed(
    stalling_server: tuple[HttpTarget, list[float]],
) -> None:
    """A 1 s stall in a 2 s run at 200/s puts p90 near 0.8 s and max near 1 s:
    the requests that should have gone out during the stall count their wait,
    not only the four that were in flight."""
    target, stall = stalling_server
    plan = LoadPlan(target, 200.0, 2.0, connections=4, static_path="/r",
                    grace_s=3.0)
    stall_armed = False

    def arm_stall(progress: object) -> None:
        nonlocal stall_armed
        # Stall from about 0.5 s into the run, once the first sends went out.
        if not stall_armed and getattr(progress, "sent", 0) >= 100:
            stall[0] = time.monotonic() + STALL_S
            stall_armed = True

    result = await run_load(plan, arm_stall)
    histogram = result.histograms["redirect"]

    assert stall_armed
    assert histogram.count == 400
    assert histogram.max_us >= 0.9 * STALL_S * 1e6
    assert histogram.percentile_us(90.0) >= 0.5 * STALL_S * 1e6
    assert result.rate_held  # the generator itself kept the timetable


async def test_a_redirect_to_the_wrong_url_is_counted(start_lab: StartLab) -> None:
    """A link deleted and re-created elsewhere mid-run shows as wrong_location."""
    redis = start_lab().redis_target()
    server = await start_server(
        ShortenerConfig(allow_private_targets=False), async_client(redis),
        close_client=True,
    )
    await server.shortener.invalidator.subscribed.wait()
    try:
        target = HttpTarget.parse(server.url)
        links = await create_links(target, 3, seed=5)
        victim = links[0]
        plan = LoadPlan(target, 200.0, 2.0, connections=4, links=links, seed=5,
                        grace_s=3.0)
        load = asyncio.create_task(run_load(plan))
        await asyncio.sleep(1.5)  # spawning takes ~0.5 s; the run is under way
        async with aiohttp.ClientSession() as session:
            gone = await session.delete(f"{server.url}/api/links/{victim.code}")
            again = await session.post(
                f"{server.url}/api/links",
                json={"url": "https://elsewhere.example/", "alias": victim.code},
            )
        result = await load
    finally:
        await server.close()

    assert (gone.status, again.status) == (204, 201)
    assert result.wrong_location > 0
    assert result.wrong_examples[0] == {
        "code": victim.code, "expected": victim.url,
        "location": "https://elsewhere.example/",
    }
    assert result.verdict()["wrong_location"] == result.wrong_location
