"""`dslab chaos run`: a scenario's workload under its fault schedule, judged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dslab.chaos.journal import Journal
from dslab.report.runfile import RunFile
from tests.helpers import run_dslab

SHORTENER_SCENARIO = """
name = "shortener pause"
seed = 3

[[services]]
kind = "shortener"
options = ["--create-per-minute", "0"]

[workload]
kind = "shortener"
duration = "4s"
options = ["--rate", "200/s", "--codes", "20"]

[[faults]]
at = "2s"
action = "pause"
target = "shortener-1"
for = "500ms"

[constraints]
slo = ["errors<1%"]
"""


@pytest.fixture
def scenario_env(lab_env: dict[str, str]) -> dict[str, str]:
    """The test's lab folder; whatever the scenario starts is downed after."""
    try:
        yield lab_env
    finally:
        run_dslab("lab", "down", env=lab_env)


def test_dry_run_prints_the_schedule_and_starts_nothing(
    scenario_env: dict[str, str], tmp_path: Path
) -> None:
    """--dry-run shows every planned fault and leaves no lab behind."""
    path = tmp_path / "s.toml"
    path.write_text(SHORTENER_SCENARIO.replace('at = "2s"', 'every = "1s"'))

    done = run_dslab("chaos", "run", str(path), "--dry-run", env=scenario_env,
                     check=True)

    assert done.stdout.count("pause shortener-1 for 0.5s") == 4
    assert not Path(scenario_env["DSLAB_HOME"], "state.json").exists()


@pytest.mark.timeout(120)
def test_a_scenario_runs_heals_and_writes_its_timeline(
    scenario_env: dict[str, str], tmp_path: Path
) -> None:
    """The shortener is paused mid-load by the schedule; the run file holds
    the pause and its heal, the SLO results, and nothing is left applied."""
    path = tmp_path / "s.toml"
    path.write_text(SHORTENER_SCENARIO)
    out = tmp_path / "run.json"

    done = run_dslab("chaos", "run", str(path), "--out", str(out),
                     env=scenario_env, timeout_s=110)

    assert done.returncode == 0, done.stderr
    run = RunFile.load(out)
    assert [f.action for f in run.faults] == ["pause", "heal"]
    assert run.faults[1].at - run.faults[0].at == pytest.approx(0.5, abs=0.3)
    assert run.slo is not None and all(result["ok"] for result in run.slo)
    assert Journal(Path(scenario_env["DSLAB_HOME"])).active_faults() == []
    assert "SLOs: 2 of 2 passed" in done.stdout


@pytest.mark.timeout(120)
def test_a_failed_constraint_exits_1(
    scenario_env: dict[str, str], tmp_path: Path
) -> None:
    """An SLO the run cannot meet (a 500 ms pause against p99.9 under 1 ms)
    fails the scenario with exit 1 and says which rule."""
    path = tmp_path / "s.toml"
    path.write_text(SHORTENER_SCENARIO)

    done = run_dslab("chaos", "run", str(path), "--slo", "redirect:p99.9<1ms",
                     "--out", str(tmp_path / "run.json"), env=scenario_env,
                     timeout_s=110)

    assert done.returncode == 1
    assert "redirect:p99.9<1ms" in done.stderr
    document = json.loads((tmp_path / "run.json").read_text())
    assert any(not result["ok"] for result in document["slo"])


def test_a_broken_scenario_is_a_usage_error(
    scenario_env: dict[str, str], tmp_path: Path
) -> None:
    """A scenario with a mistake exits 2 naming it, before anything starts."""
    path = tmp_path / "s.toml"
    path.write_text('[workload]\nkind = "video"\n')

    done = run_dslab("chaos", "run", str(path), env=scenario_env)

    assert done.returncode == 2
    assert "workload.kind" in done.stderr


CHAT_CRASH_SCENARIO = """
name = "chat killed twice"
seed = 5

[[services]]
kind = "chat"
instances = 2
options = ["--delivery", "{delivery}"]

[workload]
kind = "chat"
duration = "8s"
options = ["--users", "20", "--rate", "5/s"]

[[faults]]
at = "3s"
action = "kill"
target = "chat-1"

[[faults]]
at = "4s"
action = "restart"
target = "chat-1"

[[faults]]
at = "6s"
action = "kill"
target = "chat-2"

[constraints]
slo = ["lost==0", "duplicated==0", "reordered==0"]
"""


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize(("delivery", "exit_code"), [("streams", 0), ("pubsub", 1)])
def test_chat_servers_killed_twice(
    scenario_env: dict[str, str], tmp_path: Path, delivery: str, exit_code: int
) -> None:
    """Two kills during a chat run: with streams nothing is lost (exit 0); the
    naive pubsub mode loses messages and the scenario fails (exit 1)."""
    path = tmp_path / "s.toml"
    path.write_text(CHAT_CRASH_SCENARIO.replace("{delivery}", delivery))
    out = tmp_path / "run.json"

    done = run_dslab("chaos", "run", str(path), "--out", str(out),
                     env=scenario_env, timeout_s=170)

    assert done.returncode == exit_code, done.stderr[-3000:]
    run = RunFile.load(out)
    assert [f.action for f in run.faults if f.action == "kill"] == ["kill", "kill"]
    assert run.verdict is not None
    lost = run.verdict["total"]["lost"]
    assert (lost == 0) if delivery == "streams" else (lost > 0)
