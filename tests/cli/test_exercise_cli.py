"""`dslab exercise list|show|check`: exit codes, and real checks of short runs,
also of a "learner's" server started with --target-cmd or given by --target."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dslab import exercise as exercises
from dslab.chaos import scenario as scenarios
from dslab.report.runfile import RunFile
from tests.helpers import run_dslab

# dslab's own chat server, started the way a learner's would be.
LEARNER_CMD = f"{sys.executable} -m dslab.chat --port {{port}} --redis {{redis}}"


@pytest.fixture
def env(lab_env: dict[str, str]) -> Iterator[dict[str, str]]:
    """The test's lab folder; whatever a check leaves running is downed after."""
    try:
        yield lab_env
    finally:
        run_dslab("lab", "down", env=lab_env)


def _state(env: dict[str, str]) -> Path:
    return Path(env["DSLAB_HOME"]) / "state.json"


def test_list_shows_every_exercise(env: dict[str, str]) -> None:
    """`list` exits 0 with all ten exercises, and --json gives the same ten."""
    table = run_dslab("exercise", "list", env=env, check=True)
    listed = json.loads(run_dslab("exercise", "list", "--json", env=env,
                                  check=True).stdout)

    assert "Chat server crash" in table.stdout and "Sharding" in table.stdout
    assert [item["number"] for item in listed] == list(range(1, 11))
    assert listed[1]["variants"] == ["pubsub"]


def test_show_renders_the_readme(env: dict[str, str]) -> None:
    """`show 2` prints the README's parts and the scenario paths; `show 99` is 2."""
    shown = run_dslab("exercise", "show", "2", env=env, check=True)
    missing = run_dslab("exercise", "show", "99", env=env)

    assert "Define" in shown.stdout and "Questions to answer" in shown.stdout
    assert "scenario-pubsub.toml" in shown.stdout
    assert missing.returncode == 2
    assert "exercise list" in missing.stderr


@pytest.mark.parametrize(
    "args",
    [["99"], ["2", "--scenario", "nope"], ["2", "--duration", "1s"],
     ["2", "--target", "http://127.0.0.1:1", "--target-cmd", "x {port}"]],
    ids=["unknown", "bad-variant", "too-short", "both-targets"],
)
def test_check_refuses_bad_usage_before_starting_anything(
    env: dict[str, str], args: list[str]
) -> None:
    """Usage mistakes exit 2 and start no lab."""
    done = run_dslab("exercise", "check", *args, env=env)

    assert done.returncode == 2, done.stderr
    assert not _state(env).exists()


def test_check_refuses_to_grade_inside_a_running_lab(env: dict[str, str]) -> None:
    """A lab already running in the same home is not reused: exit 3, with the fix."""
    run_dslab("lab", "up", env=env, check=True)

    done = run_dslab("exercise", "check", "1", "--duration", "3s", env=env)

    assert done.returncode == 3
    assert "dslab lab down" in done.stderr


@pytest.mark.timeout(90)
def test_a_quick_check_of_the_baseline_passes_and_cleans_up(
    env: dict[str, str], tmp_path: Path
) -> None:
    """`check 1 --duration 3s` runs for real and grades every constraint; the
    correctness ones pass, the exit code agrees with the grades (latency is
    graded, not asserted here: this machine is shared), no lab is left."""
    out = tmp_path / "run.json"

    done = run_dslab("exercise", "check", "1", "--duration", "3s", "--out",
                     str(out), env=env, timeout_s=80)

    run = RunFile.load(out)
    assert run.slo is not None and len(run.slo) >= 5, done.stdout + done.stderr
    grades = {result["rule"]: result["ok"] for result in run.slo}
    assert grades["lost==0"] and grades["duplicated==0"] and grades["reordered==0"]
    assert done.returncode == (0 if all(grades.values()) else 1)
    assert not _state(env).exists()


@pytest.mark.timeout(90)
def test_a_scenario_designed_to_fail_fails_with_exit_1(
    env: dict[str, str], tmp_path: Path
) -> None:
    """2-character codes without SET NX send redirects to the wrong link: exit 1,
    and the output says the failure is by design."""
    done = run_dslab("exercise", "check", "8", "--scenario", "no-reserve",
                     "--duration", "3s", "--out", str(tmp_path / "run.json"),
                     env=env, timeout_s=80)

    assert done.returncode == 1, done.stdout + done.stderr
    assert "redirect:errors==0" in done.stdout
    assert "designed to fail" in done.stderr


@pytest.mark.timeout(90)
def test_target_cmd_grades_the_learners_process_and_faults_hit_it(
    env: dict[str, str], tmp_path: Path
) -> None:
    """--target-cmd starts the learner's command as the lab's chat servers; the
    scenario's kill lands on one of them and the check still passes."""
    out = tmp_path / "run.json"

    done = run_dslab("exercise", "check", "2", "--duration", "4s",
                     "--target-cmd", LEARNER_CMD, "--out", str(out), env=env,
                     timeout_s=80)

    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr.count("(your server)") == 2
    kills = [fault for fault in RunFile.load(out).faults if fault.action == "kill"]
    assert len(kills) == 1 and kills[0].target.startswith("chat-")


@pytest.mark.timeout(90)
def test_target_url_skips_faults_on_dslabs_servers_with_a_note(
    env: dict[str, str], tmp_path: Path
) -> None:
    """--target URL grades a server already running on the lab; the kill of
    dslab's chat server is skipped and said so, and the lab keeps running."""
    run_dslab("lab", "up", env=env, check=True)
    served = run_dslab("chat", "serve", env=env, check=True)
    url = next(word for word in served.stdout.split()
               if word.startswith("http://127.0.0.1:"))
    out = tmp_path / "run.json"

    done = run_dslab("exercise", "check", "2", "--duration", "3s", "--target",
                     url.rstrip("/"), "--out", str(out), env=env, timeout_s=80)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "skipped kill random:chat" in done.stdout
    assert [fault.action for fault in RunFile.load(out).faults] == []
    assert _state(env).exists()


NAIVE_SERVER = Path(__file__).resolve().parents[1] / "fixtures" / "naive_chat_server.py"


@pytest.mark.timeout(90)
def test_an_incomplete_learner_server_fails_the_check(
    env: dict[str, str], tmp_path: Path
) -> None:
    """A learner's server that keeps messages in memory (no Redis, no replay)
    is graded through --target-cmd on the baseline's two instances: users on
    one never see the other's messages, so lost==0 fails, exit 1."""
    out = tmp_path / "run.json"
    command = f"{sys.executable} {NAIVE_SERVER} --port {{port}} --redis {{redis}}"

    done = run_dslab("exercise", "check", "1", "--duration", "3s",
                     "--target-cmd", command, "--out", str(out), env=env,
                     timeout_s=80)

    assert done.returncode == 1, done.stdout + done.stderr
    run = RunFile.load(out)
    assert run.verdict is not None and run.verdict["total"]["lost"] > 0
    grades = {result["rule"]: result["ok"] for result in run.slo or []}
    assert grades["lost==0"] is False


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize(("number", "duration"), [("2", "5s"), ("5", "8s")])
def test_correctness_exercises_pass_in_a_quick_check(
    env: dict[str, str], tmp_path: Path, number: str, duration: str
) -> None:
    """The chat crash (02) and the frozen Redis (05) exercises, shortened: their
    faults happen (scaled to the duration) and nothing is lost, doubled or
    reordered, so the check passes with exit 0."""
    out = tmp_path / "run.json"

    done = run_dslab("exercise", "check", number, "--duration", duration,
                     "--out", str(out), env=env, timeout_s=110)

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = RunFile.load(out)
    assert run.faults, "the exercise's fault did not happen"
    assert run.verdict is not None and run.verdict["total"]["lost"] == 0


# Every shipped scenario not graded by a test above, shortened. The durations
# are the shortest at which the scaled faults still land inside the measured
# window (a failover needs a few seconds to happen and be seen).
QUICK_CHECKS = [
    ("2", "pubsub", "5s"),
    ("3", None, "4s"),
    ("4", None, "10s"),
    ("4", "wait", "10s"),
    ("4", "always", "10s"),
    ("6", None, "5s"),
    ("7", None, "4s"),
    ("7", "workers", "4s"),
    ("8", None, "3s"),
    ("9", None, "8s"),
    ("10", None, "4s"),
]


# Every (exercise, variant) some test in this file runs in a quick check: the
# docs' walkthroughs leave `dslab exercise check N` to these tests.
QUICK_CHECKED = frozenset(
    {(number, variant) for number, variant, _ in QUICK_CHECKS}
    | {("1", None),  # test_a_quick_check_of_the_baseline_passes_and_cleans_up
       ("2", None), ("5", None),  # test_correctness_exercises_pass_in_a_quick_check
       ("8", "no-reserve")}  # test_a_scenario_designed_to_fail_fails_with_exit_1
)


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize(("number", "variant", "duration"), QUICK_CHECKS,
                         ids=[f"{n}-{v or 'default'}" for n, v, _ in QUICK_CHECKS])
def test_every_other_scenario_reaches_its_expected_verdict(
    env: dict[str, str], tmp_path: Path, number: str, variant: str | None,
    duration: str,
) -> None:
    """Shortened, each scenario runs its faults and reaches the verdict its
    exercise declares: exit 0 for "pass", exit 1 for "fail"; for "varies" (a
    race, e.g. what a failover loses) the exit code agrees with the grades."""
    item = exercises.find(number)
    expect = item.expectation(variant)
    scenario = scenarios.load(item.scenario_path(variant))
    out = tmp_path / "run.json"
    args = ["--scenario", variant] if variant else []

    done = run_dslab("exercise", "check", number, *args, "--duration", duration,
                     "--out", str(out), env=env, timeout_s=110)

    report = done.stdout[-3000:] + done.stderr[-3000:]
    assert done.returncode in (0, 1), report
    run = RunFile.load(out)
    grades = [result["ok"] for result in run.slo or []]
    assert grades, "the run was not graded"
    assert done.returncode == (0 if all(grades) else 1), report
    if expect in ("pass", "fail"):
        assert done.returncode == (0 if expect == "pass" else 1), report
    if scenario.faults:
        assert run.faults, "the scenario's faults did not happen"
    assert not _state(env).exists()


def test_every_shipped_scenario_is_quick_checked_by_a_test_here() -> None:
    """No scenario file is left out of the quick checks (the docs rely on it)."""
    shipped = {(str(item.number), variant)
               for item in exercises.load_all()
               for variant in (None, *item.variants)}

    assert shipped == QUICK_CHECKED
