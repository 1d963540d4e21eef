"""`python -m dslab.shortener` as a real process with two SO_REUSEPORT workers."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from typing import Any

import aiohttp
import pytest

from dslab.errors import UsageError
from dslab.settings import RedisTarget
from dslab.shortener.serve import parse_args
from dslab.shortener.store import visits_key

READY_LINE = re.compile(r"shortener ready: (http://127\.0\.0\.1:\d+) \(workers=2\)")
START_TIMEOUT_S = 40.0  # two spawned workers import dslab on a busy 2-core box


async def _wait_ready(process: asyncio.subprocess.Process) -> str:
    assert process.stderr is not None
    seen: list[str] = []
    async with asyncio.timeout(START_TIMEOUT_S):
        while True:
            line = (await process.stderr.readline()).decode()
            if not line:
                raise AssertionError(f"exited before ready: {''.join(seen)}")
            seen.append(line)
            found = READY_LINE.search(line)
            if found:
                return found.group(1)


async def test_two_workers_serve_and_sigterm_flushes_and_stops(
    redis_target: RedisTarget, redis_client: Any
) -> None:
    """The process announces itself, serves create and redirect, and on
    SIGTERM flushes the visits counted so far and exits 0."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dslab.shortener", "--port", "0", "--workers", "2",
        "--redis", redis_target.url(with_password=True),
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        base = await _wait_ready(process)
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{base}/api/links", json={"url": "https://example.com/"}
            ) as reply:
                assert reply.status == 201
                code = (await reply.json())["code"]
            for _ in range(10):
                async with http.get(f"{base}/{code}", allow_redirects=False) as reply:
                    assert reply.status == 302

        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            returncode = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert returncode == 0
    assert int(await redis_client.get(visits_key(code)) or 0) == 10


def test_code_pool_option_reaches_the_config_and_refuses_nonsense() -> None:
    """--code-pool N sets each worker's pool; a negative size is a usage
    error (exit 2) that says the default."""
    options = parse_args(["--redis", "redis://127.0.0.1:7000", "--code-pool", "8"])
    assert options.config.code_pool == 8
    assert parse_args(["--redis", "redis://127.0.0.1:7000"]).config.code_pool == 64

    with pytest.raises(UsageError) as refused:
        parse_args(["--redis", "redis://127.0.0.1:7000", "--code-pool", "-1"])
    assert refused.value.exit_code == 2 and "64" in str(refused.value.fix)
