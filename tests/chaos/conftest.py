"""Fixtures for the chaos tests: a real echo server and a running fault proxy."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dslab.chaos.journal import HEALED, Fault, Journal
from dslab.chaos.proxy import FaultProxy

# Seed shared by the proxy fixtures, so a failing run can be repeated.
PROXY_SEED = 20240601
# A `--for` fault's detached healer wakes at the fault's `until`; it may be
# this much later on a loaded machine (its process start, the journal lock).
HEALER_SLACK_S = 3.0


def healed_after(home: Path, fault: Fault) -> float:
    """Seconds from a fault's application to its heal event in the journal."""
    for event in Journal(home).events():
        if event["event"] == HEALED and event["id"] == fault.id:
            return float(event["at"]) - fault.started_at
    raise AssertionError(f"fault {fault.id} has no heal event in the journal")


def assert_healed_on_time(home: Path, fault: Fault, duration_s: float) -> None:
    """Healed by its timer: not before ``duration_s``, and not much after."""
    took = healed_after(home, fault)
    assert duration_s <= took <= duration_s + HEALER_SLACK_S, (
        f"{fault.id} ({fault.kind}) for {duration_s} s was healed after {took:.2f} s")


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@pytest.fixture
async def echo_server() -> AsyncIterator[tuple[str, int]]:
    """A real TCP echo server on a free loopback port; yields (host, port)."""
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    try:
        yield host, port
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def echo_proxy(echo_server: tuple[str, int]) -> AsyncIterator[FaultProxy]:
    """A started fault proxy in front of the echo server; stopped afterwards."""
    async with FaultProxy(echo_server, seed=PROXY_SEED) as proxy:
        yield proxy
