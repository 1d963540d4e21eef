"""`dslab chaos` as a person runs it: real processes, exit codes, text and JSON.

Every command runs as its own process, so a fault applied by one command is
seen, listed and healed by others only through the journal on disk.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from dslab.chaos import netem
from dslab.cli import app as cli_app
from dslab.lab.lab import Lab
from tests.conftest import StartLab
from tests.helpers import eventually, run_dslab

# A paused node gets this long to answer before the test calls it silent.
SILENT_TIMEOUT_S = 0.3
HEAL_WAIT_S = 10.0
DSLAB_TIMEOUT_S = 60.0

# Until `chaos` is registered in dslab.cli.app, run the sub-app under the real
# root callback and error handling, exactly as `dslab chaos` will.
_MOUNT_CHAOS = """
import typer
from dslab.cli import app as cli
from dslab.cli.chaos import app as chaos
root = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
root.callback()(cli.root)
root.add_typer(chaos, name="chaos")
cli.app = root
cli.main()
"""


def _chaos_registered() -> bool:
    return any(group.name == "chaos" for group in cli_app.app.registered_groups)


def chaos(
    *args: str, env: dict[str, str], verbose: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run `dslab [-v] chaos ARGS...` as a real process."""
    words = ["-v", "chaos", *args] if verbose else ["chaos", *args]
    if _chaos_registered():
        return run_dslab(*words, env=env, timeout_s=DSLAB_TIMEOUT_S)
    return subprocess.run(
        [sys.executable, "-c", _MOUNT_CHAOS, *words], env=env,
        capture_output=True, text=True, timeout=DSLAB_TIMEOUT_S, check=False,
    )


def ok(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


def _answers(lab: Lab, name: str) -> bool:
    record = lab.node(name)
    client = redis.Redis(host=record.host, port=record.port,
                         socket_timeout=SILENT_TIMEOUT_S,
                         socket_connect_timeout=SILENT_TIMEOUT_S,
                         retry=Retry(NoBackoff(), 0))
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def test_pause_then_heal_from_a_new_process(
    start_lab: StartLab, lab_env: dict[str, str]
) -> None:
    """`chaos pause redis-1` silences it after the command exited (logging one
    fixed line); `chaos heal` in another process revives it; a second heal is
    harmless."""
    lab = start_lab()

    pid = lab.node("redis-1").pid
    paused = ok(chaos("pause", "redis-1", env=lab_env, verbose=True))

    assert "Paused redis-1" in paused.stdout and "dslab chaos heal f1" in paused.stdout
    assert (f"fault applied: pause on redis-1 pid={pid} (undo: dslab chaos heal f1)"
            in paused.stderr)
    assert not _answers(lab, "redis-1")
    healed = ok(chaos("heal", env=lab_env, verbose=True))
    assert "Healed f1: pause on redis-1" in healed.stdout
    assert f"fault healed: pause on redis-1 pid={pid}" in healed.stderr
    assert _answers(lab, "redis-1")
    again = ok(chaos("heal", env=lab_env))
    assert "nothing to heal" in again.stdout


def test_pause_for_heals_after_the_command_exited(
    start_lab: StartLab, lab_env: dict[str, str]
) -> None:
    """`--for 2s` is undone by the detached healer, not by the exited command."""
    lab = start_lab()

    done = ok(chaos("pause", "primary", "--for", "2s", "--json", env=lab_env))

    fault = json.loads(done.stdout)["faults"][0]
    assert fault["target"] == "redis-1" and fault["until"] is not None
    assert not _answers(lab, "redis-1")
    eventually(lambda: _answers(lab, "redis-1"), timeout_s=HEAL_WAIT_S)
    status = json.loads(ok(chaos("status", "--json", env=lab_env)).stdout)
    assert status["faults"] == []


def test_status_json_lists_exactly_the_active_faults(
    start_lab: StartLab, lab_env: dict[str, str]
) -> None:
    """A pause and a proxy delay are listed; after healing one, only the other."""
    start_lab()
    ok(chaos("pause", "redis-1", env=lab_env))
    delayed = ok(chaos("delay", "redis-1", "--ms", "20", "--backend", "proxy",
                       env=lab_env))
    assert "Only clients that connect through the proxy" in delayed.stdout

    listed = json.loads(ok(chaos("status", "--json", env=lab_env)).stdout)
    assert [(f["id"], f["kind"]) for f in listed["faults"]] == [("f1", "pause"),
                                                               ("f2", "delay")]
    assert listed["faults"][0]["undo"]["action"] == "sigcont"

    ok(chaos("heal", "f1", env=lab_env))
    listed = json.loads(ok(chaos("status", "--json", env=lab_env)).stdout)
    assert [f["id"] for f in listed["faults"]] == ["f2"]
    table = ok(chaos("status", env=lab_env)).stdout
    assert "delay 20ms on redis-1" in table and "dslab chaos heal f2" in table


def test_delay_netem_without_netem_exits_3_with_the_proxy_hint(
    start_lab: StartLab, lab_env: dict[str, str]
) -> None:
    """Where the kernel lacks netem: exit 3 suggesting --backend proxy, and
    nothing journaled. Where it has netem: the delay is applied and healed."""
    start_lab()
    available, _ = netem.netem_available()

    done = chaos("delay", "redis-1", "--ms", "50", "--backend", "netem", env=lab_env)

    if not available:
        assert done.returncode == 3
        assert "use --backend proxy" in done.stderr
        listed = json.loads(ok(chaos("status", "--json", env=lab_env)).stdout)
        assert listed["faults"] == []
    else:
        ok(done)
        assert "Healed f1" in ok(chaos("heal", env=lab_env)).stdout


def test_delay_dry_run_prints_the_tc_commands(
    start_lab: StartLab, lab_env: dict[str, str]
) -> None:
    """--dry-run prints the apply and undo tc commands for the node's port."""
    lab = start_lab()
    port = lab.node("redis-1").port

    done = ok(chaos("delay", "redis-1", "--ms", "150", "--jitter", "20", "--loss",
                    "1%", "--rate", "1mbit", "--dry-run", env=lab_env))

    assert "tc qdisc add dev lo root handle d5: prio bands 4" in done.stdout
    assert ("netem delay 150ms 20ms loss 1% rate 1mbit") in done.stdout
    assert f"match ip dport {port} 0xffff" in done.stdout
    assert "tc qdisc del dev lo root handle d5:" in done.stdout


def test_kill_and_restart(start_lab: StartLab, lab_env: dict[str, str]) -> None:
    """kill -9 stops redis-1 and names the remedy; restart brings it back."""
    lab = start_lab()

    killed = ok(chaos("kill", "redis-1", env=lab_env))

    assert "with SIGKILL" in killed.stdout
    assert "dslab chaos restart redis-1" in killed.stdout
    assert not lab.node("redis-1").is_alive()
    ok(chaos("restart", "redis-1", env=lab_env))
    assert _answers(lab, "redis-1")


@pytest.mark.parametrize("args", [
    ("pause", "redis-9"),
    ("kill", "redis-1", "--signal", "NOPE"),
    ("pause", "redis-1", "--for", "soon"),
    ("heal", "f42"),
])
def test_usage_errors_exit_2(
    start_lab: StartLab, lab_env: dict[str, str], args: tuple[str, ...]
) -> None:
    """An unknown target, signal, duration or fault id exits 2 with a fix."""
    start_lab()

    done = chaos(*args, env=lab_env)

    assert done.returncode == 2, done.stderr
    assert "Error:" in done.stderr and "Fix:" in done.stderr


def test_no_lab_exits_3(lab_env: dict[str, str]) -> None:
    """Without a running lab a fault command exits 3 saying how to start one."""
    done = chaos("pause", "redis-1", env=lab_env)

    assert done.returncode == 3
    assert "dslab lab up" in done.stderr
