"""`dslab shorten bench` as typed at a terminal, against a real lab and shortener."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dslab.lab.lab import Lab
from dslab.report.runfile import RunFile
from dslab.settings import LabSettings
from tests.helpers import DSLAB, run_dslab


@pytest.fixture
def shortener(lab_env: dict[str, str]) -> Iterator[dict[str, str]]:
    """A running standalone lab with one shortener; downed after the test."""
    run_dslab("lab", "up", env=lab_env, check=True)
    try:
        run_dslab("shorten", "serve", env=lab_env, check=True)
        yield lab_env
    finally:
        run_dslab("lab", "down", env=lab_env)


def test_bench_writes_a_run_file_that_round_trips(
    shortener: dict[str, str], tmp_path: Path
) -> None:
    """A short 200/s run exits 0, holds its rate, finds no wrong redirect and
    writes a run file that loads back identical."""
    out = tmp_path / "bench.json"
    done = run_dslab("shorten", "bench", "--rate", "200/s", "--duration", "2s",
                     "--codes", "20", "--mix", "90:10", "--seed", "3",
                     "--out", str(out), "--json", env=shortener, check=True)
    printed = json.loads(done.stdout)
    run = RunFile.load(out)

    assert printed["verdict"]["rate_held"] is True
    assert run.verdict is not None and run.verdict["wrong_location"] == 0
    assert set(run.verdict["status_counts"]) == {"redirect", "create"}
    assert run.verdict["status_counts"]["redirect"] == {
        "302": run.histograms["redirect"].count}
    assert run.histograms["redirect"].count + run.histograms["create"].count == 400
    assert run.meta.seed == 3
    assert RunFile.from_json(run.to_json()) == run


def test_rate_not_held_is_said_and_fails_the_run(
    shortener: dict[str, str], lab_settings: LabSettings, tmp_path: Path
) -> None:
    """50k/s on one connection to a shortener paused for 1 s cannot be held: the
    run exits 1, says "rate not held" and records rate_held false."""
    state = Lab(lab_settings).state()
    assert state is not None
    [server] = state.of_kind("shortener")
    out = tmp_path / "stalled.json"
    bench = subprocess.Popen(
        [*DSLAB, "shorten", "bench", "--rate", "50000/s", "--duration", "2s",
         "--connections", "1", "--processes", "1", "--codes", "20",
         "--out", str(out)],
        env=shortener, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(2.0)  # links created, load under way
        os.kill(server.pid, signal.SIGSTOP)
        time.sleep(1.0)
    finally:
        os.kill(server.pid, signal.SIGCONT)
    stdout, stderr = bench.communicate(timeout=60)

    assert bench.returncode == 1, stderr
    assert "rate not held: sent" in stdout
    verdict = RunFile.load(out).verdict
    assert verdict is not None and verdict["rate_held"] is False
    assert verdict["achieved_rate"] < 45_000


def test_a_server_off_loopback_is_refused(lab_env: dict[str, str]) -> None:
    """--server outside 127.0.0.0/8 exits 2 before sending anything."""
    done = run_dslab("shorten", "bench", "--server", "http://192.0.2.1:80",
                     env=lab_env)

    assert done.returncode == 2
    assert "not on loopback" in done.stderr


def test_wrk_engine_without_wrk_exits_3(lab_env: dict[str, str]) -> None:
    """--engine wrk on a machine without wrk says how to install it (exit 3)."""
    env = {**lab_env, "PATH": "/nonexistent"}
    done = run_dslab("shorten", "bench", "--engine", "wrk", "--server",
                     "http://127.0.0.1:9", "--static-path", "/r", env=env)

    assert done.returncode == 3
    assert "apt-get install wrk" in done.stderr
