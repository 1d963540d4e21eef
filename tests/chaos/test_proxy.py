"""The fault proxy against a real echo server, a real Redis and a real process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from dslab.chaos.proxy import (
    BURST_S,
    CHUNK_BYTES,
    Direction,
    FaultProxy,
    Faults,
    ProxyControl,
    ProxyUnreachable,
    _TokenBucket,
    main,
)
from dslab.errors import EXIT_USAGE, UsageError
from dslab.settings import Topology
from tests.chaos.conftest import PROXY_SEED
from tests.conftest import StartLab

# Generous bound on any single wait in these tests; only a hang reaches it.
STEP_TIMEOUT_S = 10.0
# How long a blackholed client waits before the test calls it silent.
SILENCE_S = 0.3
READY_TIMEOUT_S = 15.0


async def _connect(
    proxy: FaultProxy,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(*proxy.address)


async def _round_trip(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> bytes:
    writer.write(data)
    await writer.drain()
    async with asyncio.timeout(STEP_TIMEOUT_S):
        return await reader.readexactly(len(data))


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


def _redis_address(start_lab: StartLab) -> tuple[str, int]:
    return start_lab().redis_target().addresses[0]


def _async_client(proxy: FaultProxy, *, socket_timeout: float) -> aioredis.Redis:
    """A client that fails at once: no retries hiding what the fault did."""
    host, port = proxy.address
    return aioredis.Redis(
        host=host,
        port=port,
        socket_timeout=socket_timeout,
        retry=AsyncRetry(NoBackoff(), 0),
    )


# -- faults as data --------------------------------------------------------


def test_faults_refuse_probability_outside_unit_interval() -> None:
    """A probability above 1 is a usage error, not silently clamped."""
    with pytest.raises(UsageError, match="probability"):
        Faults(probability=1.5)


def test_faults_from_dict_refuses_unknown_keys_and_wrong_types() -> None:
    """Control input with a typo or a string for a bool is refused."""
    with pytest.raises(UsageError, match="unknown fault"):
        Faults.from_dict({"latency": 100})
    with pytest.raises(UsageError, match="true or false"):
        Faults.from_dict({"blackhole": "yes"})


@given(
    latency_ms=st.floats(0, 10_000),
    jitter_ms=st.floats(0, 1_000),
    bandwidth=st.none() | st.integers(1, 10**9),
    blackhole=st.booleans(),
    reset=st.booleans(),
    close_after=st.none() | st.integers(0, 10**9),
    probability=st.floats(0, 1),
)
def test_faults_round_trip_through_json(
    latency_ms: float,
    jitter_ms: float,
    bandwidth: int | None,
    blackhole: bool,
    reset: bool,
    close_after: int | None,
    probability: float,
) -> None:
    """Any valid Faults survives to_dict -> JSON -> from_dict unchanged."""
    faults = Faults(
        latency_ms, jitter_ms, bandwidth, blackhole, reset, close_after, probability
    )

    assert Faults.from_dict(json.loads(json.dumps(faults.to_dict()))) == faults


def test_proxy_refuses_non_loopback_listen_address() -> None:
    """Listening on 0.0.0.0 needs an explicit opt-in (the network rule)."""
    with pytest.raises(UsageError, match="not loopback"):
        FaultProxy(("127.0.0.1", 6379), listen=("0.0.0.0", 0))

    FaultProxy(("127.0.0.1", 6379), listen=("0.0.0.0", 0), allow_non_loopback=True)


def test_entry_point_refuses_non_loopback_with_usage_exit_code() -> None:
    """`python -m dslab.chaos.proxy --listen 0.0.0.0:0` exits 2 before binding."""
    code = main(["--listen", "0.0.0.0:0", "--upstream", "127.0.0.1:6379"])

    assert code == EXIT_USAGE


# -- against the echo server -----------------------------------------------


async def test_healthy_proxy_forwards_bytes_and_counts_them(
    echo_proxy: FaultProxy,
) -> None:
    """Without faults bytes come back unchanged and the stats count them."""
    reader, writer = await _connect(echo_proxy)
    payload = os.urandom(1000)

    echoed = await _round_trip(reader, writer, payload)
    await _close(writer)

    assert echoed == payload
    assert echo_proxy.stats.connections_total == 1
    assert echo_proxy.stats.bytes_upstream == 1000
    assert echo_proxy.stats.bytes_downstream == 1000


async def test_blackhole_silences_live_connection_and_clear_releases_held_bytes(
    echo_proxy: FaultProxy,
) -> None:
    """A blackhole holds bytes of an open connection; clearing delivers them."""
    reader, writer = await _connect(echo_proxy)
    await _round_trip(reader, writer, b"before")

    echo_proxy.set_faults(None, Faults(blackhole=True))
    writer.write(b"held")
    await writer.drain()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(SILENCE_S):
            await reader.readexactly(4)
    echo_proxy.clear()
    async with asyncio.timeout(STEP_TIMEOUT_S):
        released = await reader.readexactly(4)
    await _close(writer)

    assert released == b"held"


async def test_reset_aborts_live_connection_with_rst(echo_proxy: FaultProxy) -> None:
    """Setting reset kills open connections with RST, not an orderly close."""
    reader, writer = await _connect(echo_proxy)
    await _round_trip(reader, writer, b"ping")

    echo_proxy.set_faults(Direction.DOWNSTREAM, Faults(reset=True))
    with pytest.raises(ConnectionResetError):
        async with asyncio.timeout(STEP_TIMEOUT_S):
            await reader.read(1)
    writer.close()

    assert echo_proxy.stats.resets == 1


async def test_close_after_bytes_forwards_exactly_n_bytes_then_closes(
    echo_proxy: FaultProxy,
) -> None:
    """close_after_bytes=10 downstream: the client gets 10 bytes, then EOF."""
    echo_proxy.set_faults(Direction.DOWNSTREAM, Faults(close_after_bytes=10))
    reader, writer = await _connect(echo_proxy)
    payload = bytes(range(100))

    writer.write(payload)
    await writer.drain()
    async with asyncio.timeout(STEP_TIMEOUT_S):
        received = await reader.read()
    await _close(writer)

    assert received == payload[:10]
    assert echo_proxy.stats.closed_after_bytes == 1


async def test_jitter_never_reorders_bytes_of_a_large_payload(
    echo_proxy: FaultProxy,
) -> None:
    """4 MiB through latency 2ms +/- 2ms both ways comes back byte for byte."""
    echo_proxy.set_faults(None, Faults(latency_ms=2, jitter_ms=2))
    reader, writer = await _connect(echo_proxy)
    payload = os.urandom(4 * 1024 * 1024)

    async def send() -> None:
        for start in range(0, len(payload), 8192):
            writer.write(payload[start : start + 8192])
            await writer.drain()

    async with asyncio.timeout(60), asyncio.TaskGroup() as group:
        group.create_task(send())
        received = group.create_task(reader.readexactly(len(payload)))
    await _close(writer)

    assert received.result() == payload


async def test_latency_change_reaches_bytes_already_queued(
    echo_proxy: FaultProxy,
) -> None:
    """Lowering the latency re-times queued chunks instead of keeping 60 s."""
    reader, writer = await _connect(echo_proxy)
    echo_proxy.set_faults(Direction.UPSTREAM, Faults(latency_ms=60_000))
    writer.write(b"late")
    await writer.drain()
    await asyncio.sleep(0.05)

    echo_proxy.set_faults(Direction.UPSTREAM, Faults())
    async with asyncio.timeout(STEP_TIMEOUT_S):
        echoed = await reader.readexactly(4)
    await _close(writer)

    assert echoed == b"late"


async def test_bandwidth_limit_spreads_transfer_over_time(
    echo_proxy: FaultProxy,
) -> None:
    """At 100 kB/s downstream, 50 kB take at least (50 kB - one burst) / rate."""
    rate = 100_000
    size = 50_000
    echo_proxy.set_faults(Direction.DOWNSTREAM, Faults(bandwidth_bytes_per_s=rate))
    reader, writer = await _connect(echo_proxy)

    started = time.monotonic()
    echoed = await _round_trip(reader, writer, b"b" * size)
    elapsed = time.monotonic() - started
    await _close(writer)

    assert echoed == b"b" * size
    assert elapsed >= (size - rate * BURST_S) / rate


@pytest.mark.parametrize("late_s", [0.0, 0.002, 0.010, 0.030])
def test_bucket_keeps_its_rate_when_every_wake_up_is_late(late_s: float) -> None:
    """Simulated time: the writer wakes ``late_s`` after each wait it was
    given, as on a busy machine. Up to most of a burst of lateness, the tokens
    it missed are still in the bucket, so the rate holds."""
    rate = 100_000
    bucket = _TokenBucket()
    now = sent = 0.0
    while now < 10.0:
        size, wait_s = bucket.take(rate, CHUNK_BYTES, now)
        sent += size
        if not size:
            now += wait_s + late_s
    assert sent / now >= 0.99 * rate
    assert sent <= rate * (now + BURST_S)  # never more than rate plus a burst


@pytest.mark.timeout(60)
async def test_bandwidth_limit_holds_its_rate_within_ten_percent(
    echo_proxy: FaultProxy,
) -> None:
    """The rate a limited transfer gets, after the first burst, is the rate
    asked for within 10 % (median of three 1.5 s transfers): wake-ups that
    come late must not cost throughput."""
    rate = 100_000
    size = 150_000 + int(rate * BURST_S)
    echo_proxy.set_faults(Direction.DOWNSTREAM, Faults(bandwidth_bytes_per_s=rate))
    reader, writer = await _connect(echo_proxy)
    rates = []
    for _ in range(3):
        started = time.monotonic()
        assert await _round_trip(reader, writer, b"r" * size) == b"r" * size
        rates.append((size - rate * BURST_S) / (time.monotonic() - started))
        await asyncio.sleep(BURST_S * 2)  # the bucket fills up again
    await _close(writer)

    assert abs(statistics.median(rates) - rate) <= 0.10 * rate, rates


async def _reset_pattern(
    upstream: tuple[str, int], seed: int, connections: int
) -> list[bool]:
    """Which of `connections` sequential connections a 50% reset hits."""
    pattern = []
    async with FaultProxy(upstream, seed=seed) as proxy:
        proxy.set_faults(Direction.UPSTREAM, Faults(reset=True, probability=0.5))
        for _ in range(connections):
            reader, writer = await _connect(proxy)
            try:
                await _round_trip(reader, writer, b"?")
                pattern.append(False)
            except (ConnectionResetError, asyncio.IncompleteReadError):
                pattern.append(True)
            writer.close()
    return pattern


async def test_probability_is_reproducible_with_the_same_seed(
    echo_server: tuple[str, int],
) -> None:
    """The same seed hits the same connections; 50% hits some and spares some."""
    first = await _reset_pattern(echo_server, PROXY_SEED, 16)
    second = await _reset_pattern(echo_server, PROXY_SEED, 16)

    assert first == second
    assert any(first)
    assert not all(first)


async def test_probability_zero_spares_every_connection(
    echo_proxy: FaultProxy,
) -> None:
    """A fault with probability 0 hits no connection."""
    echo_proxy.set_faults(None, Faults(reset=True, probability=0.0))

    for _ in range(5):
        reader, writer = await _connect(echo_proxy)
        assert await _round_trip(reader, writer, b"ok") == b"ok"
        await _close(writer)


# -- in front of a real Redis ------------------------------------------------


async def test_redis_ping_through_proxy(start_lab: StartLab) -> None:
    """A Redis client pointed at the proxy reaches redis-1."""
    async with FaultProxy(_redis_address(start_lab)) as proxy:
        client = _async_client(proxy, socket_timeout=STEP_TIMEOUT_S)
        try:
            assert await client.ping() is True
        finally:
            await client.aclose()


@pytest.mark.timeout(60)
async def test_redis_latency_is_the_configured_delay_within_ten_percent(
    start_lab: StartLab,
) -> None:
    """A PING through 150 ms of upstream latency takes 150 ms plus the PING
    itself: the median of nine is within 10 % of what was asked."""
    async with FaultProxy(_redis_address(start_lab)) as proxy:
        client = _async_client(proxy, socket_timeout=STEP_TIMEOUT_S)
        try:
            await client.ping()  # connect first: time the command only
            proxy.set_faults(Direction.UPSTREAM, Faults(latency_ms=150))
            took = []
            for _ in range(9):
                started = time.monotonic()
                await client.ping()
                took.append(time.monotonic() - started)
        finally:
            await client.aclose()

    assert min(took) >= 0.150, took
    assert statistics.median(took) <= 0.165, took


async def test_redis_blackhole_times_client_out_while_another_node_answers(
    start_lab: StartLab,
) -> None:
    """A proxy in front of each of two nodes: the blackholed one times its
    client out while the other node answers at the same time; after clear the
    first answers again."""
    lab = start_lab(Topology.REPLICATED)
    first, second = lab.node("redis-1"), lab.node("redis-2")
    async with FaultProxy((first.host, first.port)) as cut, \
            FaultProxy((second.host, second.port)) as spared:
        cut.set_faults(None, Faults(blackhole=True))
        silenced = _async_client(cut, socket_timeout=SILENCE_S * 2)
        other = _async_client(spared, socket_timeout=STEP_TIMEOUT_S)
        try:
            waiting = asyncio.create_task(silenced.ping())
            assert await other.ping() is True  # while the first one hangs
            assert not waiting.done()
            with pytest.raises(redis.TimeoutError):
                await waiting
        finally:
            await silenced.aclose()
            await other.aclose()

        cut.clear()
        healed = _async_client(cut, socket_timeout=STEP_TIMEOUT_S)
        try:
            assert await healed.ping() is True
        finally:
            await healed.aclose()


async def test_redis_reset_gives_connection_error(start_lab: StartLab) -> None:
    """With reset set, a Redis client gets ConnectionError, not a hang."""
    async with FaultProxy(_redis_address(start_lab)) as proxy:
        proxy.set_faults(None, Faults(reset=True))
        client = _async_client(proxy, socket_timeout=STEP_TIMEOUT_S)
        try:
            with pytest.raises(redis.ConnectionError):
                await client.ping()
        finally:
            await client.aclose()


# -- as a separate process, driven over HTTP ---------------------------------


@pytest.fixture
def proxy_process(
    start_lab: StartLab, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[str], dict[str, object]]]:
    """`python -m dslab.chaos.proxy` in front of redis-1; yields (process, ready)."""
    host, port = _redis_address(start_lab)
    stderr = (tmp_path / "proxy.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dslab.chaos.proxy",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            f"{host}:{port}",
            "--control",
            "127.0.0.1:0",
        ],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    try:
        assert process.stdout is not None
        readable, _, _ = select.select([process.stdout], [], [], READY_TIMEOUT_S)
        assert readable, "the proxy printed no ready line"
        ready = json.loads(process.stdout.readline())
        yield process, ready
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=READY_TIMEOUT_S)
        if process.stdout is not None:
            process.stdout.close()
        stderr.close()


def test_control_api_from_another_process_and_sigterm_stops_it(
    proxy_process: tuple[subprocess.Popen[str], dict[str, object]],
) -> None:
    """Faults set over HTTP act on a proxy process; SIGTERM ends it with 0."""
    process, ready = proxy_process
    host, _, port = str(ready["listen"]).rpartition(":")
    control = ProxyControl(str(ready["control"]))

    def ping(timeout_s: float) -> object:
        client = redis.Redis(
            host=host,
            port=int(port),
            socket_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            return client.ping()
        finally:
            client.close()

    assert ping(STEP_TIMEOUT_S) is True
    faults = control.set_faults("both", Faults(blackhole=True))
    assert faults[Direction.UPSTREAM].blackhole
    with pytest.raises(redis.TimeoutError):
        ping(SILENCE_S)
    assert control.stats().connections_total == 2
    control.clear()
    assert control.faults() == {direction: Faults() for direction in Direction}
    assert ping(STEP_TIMEOUT_S) is True

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=READY_TIMEOUT_S) == 0


@pytest.mark.parametrize(("path", "body", "error"), [
    ("/faults", b'{"upstream": {"latency": 5}}', "unknown fault"),
    ("/faults", b"latency_ms=5", "not JSON"),
    ("/faults", b'["upstream"]', "JSON object"),
    ("/faults", b"{}", "name directions"),
    ("/faults", b'{"sideways": {"latency_ms": 5}}', "sideways"),
    # One good direction beside a bad one: neither is applied.
    ("/faults", b'{"upstream": {"latency_ms": 5}, "downstream": {"x": 1}}',
     "unknown fault"),
    ("/cuts/f1", b'{"source": ["127.0.0.11"]}', "exactly the cut's sources"),
    ("/cuts/f1", b'{"sources": ["not-an-ip"]}', "not-an-ip"),
])
def test_control_api_answers_bad_requests_with_400_and_applies_nothing(
    proxy_process: tuple[subprocess.Popen[str], dict[str, object]],
    path: str, body: bytes, error: str,
) -> None:
    """Each refusal is a 400 whose JSON names the problem and a fix, and the
    proxy's faults and cuts are as before."""
    _, ready = proxy_process
    control = ProxyControl(str(ready["control"]))
    before = (control.faults(), control.cuts())
    request = urllib.request.Request(f"{ready['control']}{path}", data=body,
                                     method="PUT")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    with pytest.raises(urllib.error.HTTPError) as raised:
        opener.open(request, timeout=STEP_TIMEOUT_S)

    assert raised.value.code == 400
    answer = json.loads(raised.value.read())
    assert error in answer["error"], answer
    assert answer["fix"], answer
    assert (control.faults(), control.cuts()) == before


def test_control_client_reports_unreachable_proxy(
    closed_port: int,
) -> None:
    """ProxyControl against a closed port raises ProxyUnreachable (exit 3)."""
    control = ProxyControl(f"http://127.0.0.1:{closed_port}", timeout_s=2)

    with pytest.raises(ProxyUnreachable) as raised:
        control.faults()

    assert raised.value.exit_code == 3


@pytest.fixture
def closed_port() -> int:
    """A loopback port that was free a moment ago and has no listener."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- per-source cuts -------------------------------------------------------

# Two client addresses inside 127.0.0.0/8 that no lab plan uses.
CUT_SOURCE = "127.0.0.21"
SPARED_SOURCE = "127.0.0.22"


async def _connect_from(
    proxy: FaultProxy, source: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the proxy whose source address is ``source``."""
    return await asyncio.open_connection(*proxy.address, local_addr=(source, 0))


async def _is_silent(reader: asyncio.StreamReader, size: int) -> bool:
    try:
        async with asyncio.timeout(SILENCE_S):
            await reader.readexactly(size)
    except TimeoutError:
        return True
    return False


async def test_cut_holds_one_source_and_spares_another(
    echo_proxy: FaultProxy,
) -> None:
    """A cut on 127.0.0.21 holds its live and its new connections (bytes kept,
    nothing lost) while 127.0.0.22 still echoes; lifting the cut delivers
    every held byte in order."""
    live_reader, live_writer = await _connect_from(echo_proxy, CUT_SOURCE)
    await _round_trip(live_reader, live_writer, b"before")

    echo_proxy.set_cut("f1", [CUT_SOURCE])
    live_writer.write(b"held-live")
    new_reader, new_writer = await _connect_from(echo_proxy, CUT_SOURCE)
    new_writer.write(b"held-new")
    spared_reader, spared_writer = await _connect_from(echo_proxy, SPARED_SOURCE)

    assert await _round_trip(spared_reader, spared_writer, b"spared") == b"spared"
    assert await _is_silent(live_reader, len(b"held-live"))
    assert await _is_silent(new_reader, len(b"held-new"))
    assert echo_proxy.remove_cut("f1") is True
    async with asyncio.timeout(STEP_TIMEOUT_S):
        assert await live_reader.readexactly(9) == b"held-live"
        assert await new_reader.readexactly(8) == b"held-new"
    for writer in (live_writer, new_writer, spared_writer):
        await _close(writer)


async def test_cuts_compose_by_name_and_repeat_harmlessly(
    echo_proxy: FaultProxy,
) -> None:
    """Two cuts of one source hold it until both are lifted; setting a cut
    twice or lifting it twice changes nothing."""
    reader, writer = await _connect_from(echo_proxy, CUT_SOURCE)
    echo_proxy.set_cut("f1", [CUT_SOURCE])
    echo_proxy.set_cut("f1", [CUT_SOURCE])
    echo_proxy.set_cut("f2", [CUT_SOURCE, SPARED_SOURCE])
    writer.write(b"x")

    assert echo_proxy.remove_cut("f1") is True
    assert echo_proxy.remove_cut("f1") is False
    assert await _is_silent(reader, 1)
    assert echo_proxy.cuts() == {"f2": frozenset({CUT_SOURCE, SPARED_SOURCE})}
    assert echo_proxy.remove_cut("f2") is True
    async with asyncio.timeout(STEP_TIMEOUT_S):
        assert await reader.readexactly(1) == b"x"
    await _close(writer)


def test_control_api_sets_and_lifts_cuts_idempotently(
    proxy_process: tuple[subprocess.Popen[str], dict[str, object]],
) -> None:
    """PUT /cuts/NAME twice is one cut, DELETE twice lifts it once; a client
    from a cut source times out, and works again once the cut is lifted."""
    _, ready = proxy_process
    host, _, port = str(ready["listen"]).rpartition(":")
    control = ProxyControl(str(ready["control"]))

    def ping_from(source: str, timeout_s: float) -> bytes:
        """An inline PING to Redis through the proxy, sent from ``source``."""
        with socket.create_connection((host, int(port)), timeout_s,
                                      source_address=(source, 0)) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64)

    assert control.set_cut("f7", [CUT_SOURCE]) == {"f7": frozenset({CUT_SOURCE})}
    assert control.set_cut("f7", [CUT_SOURCE]) == {"f7": frozenset({CUT_SOURCE})}
    with pytest.raises(TimeoutError):
        ping_from(CUT_SOURCE, SILENCE_S)
    assert ping_from(SPARED_SOURCE, STEP_TIMEOUT_S) == b"+PONG\r\n"
    assert control.remove_cut("f7") is True
    assert control.remove_cut("f7") is False
    assert control.cuts() == {}
    assert ping_from(CUT_SOURCE, STEP_TIMEOUT_S) == b"+PONG\r\n"


def test_cut_names_and_sources_are_checked() -> None:
    """A cut name with a slash or a source that is no IP address is a usage
    error before anything is sent."""
    control = ProxyControl("http://127.0.0.1:1")

    with pytest.raises(UsageError, match="cut name"):
        control.set_cut("f1/../x", [CUT_SOURCE])
    with pytest.raises(UsageError, match="not an IP address"):
        control.set_cut("f1", ["redis-1"])
