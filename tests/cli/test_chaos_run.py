"""`dslab chaos run`: a scenario's workload under its fault schedule, judged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dslab.chaos import netem
from dslab.chaos.journal import Journal
from dslab.lab import netns
from dslab.report.runfile import RunFile
from tests.helpers import run_dslab
from tests.lab.test_netns import needs_netns, traces_of

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


# -- delay and partition faults, and the lab's network --------------------------

PROXY_DELAY_SCENARIO = """
name = "slow redis through the proxy"
seed = 4

[workload]
kind = "idle"
duration = "4s"

[[faults]]
at = "500ms"
action = "delay"
target = "redis-1"
ms = 100
jitter = 10
backend = "proxy"
for = "1s"
"""


@pytest.mark.timeout(60)
def test_a_proxy_delay_is_applied_and_undone_after_its_for(
    scenario_env: dict[str, str], tmp_path: Path
) -> None:
    """A delay fault through the proxy backend on a loopback lab is in the
    run file's timeline, applied and then healed by its 1 s timer."""
    path = tmp_path / "s.toml"
    path.write_text(PROXY_DELAY_SCENARIO)
    out = tmp_path / "run.json"

    done = run_dslab("chaos", "run", str(path), "--out", str(out),
                     env=scenario_env, timeout_s=50)

    assert done.returncode == 0, done.stderr
    assert "delay redis-1 100ms+-10ms (proxy) for 1s" in done.stdout
    assert "delay 100ms+-10ms on redis-1 via proxy" in done.stderr
    run = RunFile.load(out)
    assert [(f.action, f.target) for f in run.faults] == [("delay", "redis-1"),
                                                          ("heal", "redis-1")]
    assert "proxy faults cleared" in run.faults[1].detail
    # Not before its `for`; well before the run's end, when `chaos run` heals
    # whatever is left (a loaded machine starts the healer late).
    assert 0.95 <= run.faults[1].at - run.faults[0].at < 2.5
    assert Journal(Path(scenario_env["DSLAB_HOME"])).active_faults() == []


def test_a_partition_on_a_loopback_lab_is_refused_before_the_run(
    scenario_env: dict[str, str], tmp_path: Path
) -> None:
    """A partition fault without `[lab] network` can never work: exit 2 naming
    lab.network, even for --dry-run, and no lab is started."""
    path = tmp_path / "s.toml"
    path.write_text('[[faults]]\nat = "1s"\naction = "partition"\n'
                    'target = "redis-1"\n')

    done = run_dslab("chaos", "run", str(path), "--dry-run", env=scenario_env)

    assert done.returncode == 2
    assert "lab.network is 'loopback'" in done.stderr
    assert 'set network = one of' in done.stderr
    assert not Path(scenario_env["DSLAB_HOME"], "state.json").exists()


def test_a_netem_delay_without_netem_exits_3_before_the_lab_starts(
    scenario_env: dict[str, str], tmp_path: Path
) -> None:
    """Where the kernel lacks netem, a `backend = "netem"` delay stops the run
    before anything starts (exit 3, naming the proxy as the way out)."""
    available, _ = netem.netem_available()
    if available:
        pytest.skip("this machine has netem; the refusal cannot happen here")
    path = tmp_path / "s.toml"
    path.write_text(PROXY_DELAY_SCENARIO.replace('backend = "proxy"',
                                                 'backend = "netem"'))

    done = run_dslab("chaos", "run", str(path), env=scenario_env)

    assert done.returncode == 3
    assert 'backend = "proxy"' in done.stderr
    assert not Path(scenario_env["DSLAB_HOME"], "state.json").exists()


NETNS_PARTITION_SCENARIO = """
name = "redis cut off"
seed = 9

[lab]
network = "netns"
persistence = "off"

[workload]
kind = "idle"
duration = "6s"

[[faults]]
at = "1s"
action = "partition"
target = "redis-1"
for = "2s"
"""


@needs_netns
@pytest.mark.skipif(shutil.which("nft") is None, reason="needs nftables (nft)")
@pytest.mark.timeout(90)
def test_a_partition_on_a_netns_lab_is_applied_healed_and_leaves_nothing(
    scenario_env: dict[str, str], tmp_path: Path
) -> None:
    """On a `network = "netns"` lab the scenario isolates redis-1 with real
    nftables rules for 2 s: the timeline holds the partition and its heal,
    no partition table is left after the run, no namespace after lab down."""
    home = Path(scenario_env["DSLAB_HOME"])
    tag = netns.lab_tag(home)
    path = tmp_path / "s.toml"
    path.write_text(NETNS_PARTITION_SCENARIO)
    out = tmp_path / "run.json"

    try:
        done = run_dslab("chaos", "run", str(path), "--out", str(out),
                         env=scenario_env, timeout_s=80)
        namespace = netns.namespace_name(tag, "redis-1")
        tables_after_run = netns.list_tables(namespace)
        existed_during_lab = netns.namespace_exists(namespace)
        run_dslab("lab", "down", env=scenario_env, check=True)
        left_after_down = traces_of(tag)
    finally:
        netns.teardown(tag)

    assert done.returncode == 0, done.stderr
    assert "partition: isolate redis-1 for 2s" in done.stdout
    assert "partition redis-1 <-> host" in done.stderr
    run = RunFile.load(out)
    assert [(f.action, f.target) for f in run.faults] == [("partition", "redis-1"),
                                                          ("heal", "redis-1")]
    assert "dslab_partition_" in run.faults[1].detail
    assert 1.95 <= run.faults[1].at - run.faults[0].at < 4.0
    assert existed_during_lab
    assert not any("dslab_partition_" in table for table in tables_after_run)
    assert left_after_down == []


LONE_WORKER_SCENARIO = """
name = "the only worker dies"
seed = 2

[[services]]
kind = "chat"

[[services]]
kind = "worker"
options = ["--all-rooms", "--work-ms", "50"]

[workload]
kind = "chat"
duration = "3s"
options = ["--users", "10", "--rooms", "1", "--rate", "2/s"]

[[faults]]
at = "1500ms"
action = "kill"
target = "random:worker"

[constraints]
slo = ["worker_missed==0", "worker_pending==0", "lost==0"]
"""


@pytest.mark.timeout(120)
def test_a_worker_pool_with_no_survivor_fails_its_exactly_once_check(
    scenario_env: dict[str, str], tmp_path: Path
) -> None:
    """Kill the only worker: nobody claims its entries nor reads the rest, so
    the audit finds entries missed or pending and the run exits 1, while the
    broadcast side (lost==0) still passes."""
    path = tmp_path / "s.toml"
    path.write_text(LONE_WORKER_SCENARIO)
    out = tmp_path / "run.json"

    done = run_dslab("chaos", "run", str(path), "--out", str(out),
                     env=scenario_env, timeout_s=110)

    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    run = RunFile.load(out)
    assert run.verdict is not None
    total = run.verdict["total"]
    assert total["worker_entries"] > 0
    assert total["worker_missed"] + total["worker_pending"] > 0
    grades = {result["rule"]: result["ok"] for result in run.slo or []}
    assert grades["lost==0"] is True
    assert [fault.target for fault in run.faults if fault.action == "kill"] == [
        "worker-1"]
