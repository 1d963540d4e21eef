"""`dslab chat bench` as a person runs it: real lab, real chat servers, exit codes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import run_dslab


@pytest.fixture
def chat_lab(lab_env: dict[str, str]) -> Iterator[dict[str, str]]:
    """A lab with two chat servers started by `dslab chat serve -n 2`."""
    run_dslab("lab", "up", env=lab_env, check=True)
    try:
        run_dslab("chat", "serve", "-n", "2", env=lab_env, check=True)
        yield lab_env
    finally:
        run_dslab("lab", "down", env=lab_env)


@pytest.mark.timeout(120)
def test_bench_writes_a_run_file_that_report_reads(
    chat_lab: dict[str, str], tmp_path: Path
) -> None:
    """A short clean bench exits 0, passes lost==0, and `report latency` reads it."""
    out = tmp_path / "chat.json"
    done = run_dslab("chat", "bench", "--users", "6", "--rooms", "2", "--rate",
                     "2/s", "--duration", "2s", "--seed", "5", "--out", str(out),
                     "--slo", "lost==0", "--slo", "deliver:p99<60s", "--json",
                     env=chat_lab)

    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["ok"] is True
    assert answer["verdict"]["total"]["lost"] == 0
    assert answer["operations"]["deliver"]["count"] > 0
    assert [s["ok"] for s in answer["slo"]] == [True, True]
    # CPU of both sides over the load: the two servers' from their /metrics,
    # each at most one core (the window between the scrapes is a little
    # longer than the load); the generator's own from its processes.
    cpu = answer["verdict"]["cpu"]
    assert cpu["servers_measured"] == cpu["servers_total"] == 2, cpu
    assert 1.5 <= cpu["window_s"] < 2.0 + 15, cpu  # the last sends: 1.5-2 s
    assert 0 < cpu["servers_s"] <= 2 * (cpu["window_s"] + 1), cpu
    assert 0 < cpu["generator_s"] <= 2 * (cpu["window_s"] + 1), cpu
    # Both rounded to 3 places: compare within what rounding can move.
    assert abs(cpu["servers_cores"] - cpu["servers_s"] / cpu["window_s"]) < 0.002

    report = run_dslab("report", "latency", str(out), env=chat_lab)
    assert report.returncode == 0, report.stderr
    assert "deliver" in report.stdout and "ack" in report.stdout
    assert "seed 5" in report.stdout


@pytest.mark.timeout(120)
def test_failed_slo_exits_1_with_the_report(
    chat_lab: dict[str, str], tmp_path: Path
) -> None:
    """An SLO no chat can meet (p99 under 1 us) fails the run with exit 1."""
    out = tmp_path / "chat.json"
    done = run_dslab("chat", "bench", "--users", "4", "--duration", "1s",
                     "--out", str(out), "--slo", "deliver:p99<1us", env=chat_lab)

    assert done.returncode == 1
    assert "FAIL" in done.stdout
    assert "CPU over the" in done.stdout and "load generator" in done.stdout
    assert "SLO checks failed" in done.stderr
    assert out.exists()


@pytest.mark.parametrize(
    "options",
    [
        ["--users", "0"],
        ["--users", "2001"],
        ["--duration", "11m"],
        ["--rate", "fast"],
        ["--rate", "50/s"],
        ["--slo", "p99 about 200ms"],
        ["--servers", "http://192.0.2.1:8100"],
    ],
)
def test_bad_input_exits_2(lab_env: dict[str, str], options: list[str]) -> None:
    """Out-of-bounds or malformed options, or a server off loopback: exit 2."""
    done = run_dslab("chat", "bench", "--servers", "http://127.0.0.1:9",
                     *options, env=lab_env)

    assert done.returncode == 2, done.stderr
    assert "Error" in done.stderr


def test_no_chat_server_exits_3(lab_env: dict[str, str]) -> None:
    """Without --servers and with no chat server in the lab: exit 3 and the fix."""
    done = run_dslab("chat", "bench", "--duration", "1s", env=lab_env)

    assert done.returncode == 3
    assert "dslab chat serve" in done.stderr
