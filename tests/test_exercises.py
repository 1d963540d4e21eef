"""The exercises as data: every folder loads, its scenarios parse and plan,
and the quick-check and target helpers behave."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from dslab import exercise as exercises
from dslab.chaos import scenario as scenarios
from dslab.errors import UsageError
from dslab.experiment import ServerTarget, target_flags
from tests.helpers import run_dslab

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("## Define", "## Implement", "## Break", "## Measure",
            "## Questions to answer")
ALL = exercises.load_all()
SCENARIO_FILES = [path for item in ALL for path in item.scenario_paths()]


def test_the_ten_exercises_are_numbered_without_gaps() -> None:
    """Exercises 01-10 exist, in number order, each with a title and a lesson."""
    assert [item.number for item in ALL] == list(range(1, 11))
    assert all(item.title and item.teaches for item in ALL)


@pytest.mark.parametrize("item", ALL, ids=[item.name for item in ALL])
def test_every_readme_has_the_five_parts(item: exercises.Exercise) -> None:
    """Each README has Define, Implement, Break, Measure and Questions, in order."""
    text = item.readme.read_text(encoding="utf-8")
    positions = [text.find(section) for section in SECTIONS]

    assert -1 not in positions, item.name
    assert positions == sorted(positions)


@pytest.mark.parametrize("path", SCENARIO_FILES,
                         ids=[f"{p.parent.name}/{p.name}" for p in SCENARIO_FILES])
def test_every_scenario_parses_with_constraints_and_a_modest_duration(
    path: Path,
) -> None:
    """Each scenario loads, has constraints, runs 10-30 s, and plans its faults."""
    scenario = scenarios.load(path)

    assert scenario.slo
    assert 10 <= scenario.duration_s <= 30
    assert len(scenarios.plan(scenario, scenario.seed)) == len(scenario.faults)


@pytest.mark.parametrize("path", SCENARIO_FILES,
                         ids=[f"{p.parent.name}/{p.name}" for p in SCENARIO_FILES])
def test_chaos_run_dry_run_accepts_every_scenario(
    path: Path, lab_env: dict[str, str]
) -> None:
    """`dslab chaos run FILE --dry-run` prints the schedule of every scenario."""
    done = run_dslab("chaos", "run", str(path), "--dry-run", env=lab_env,
                     timeout_s=30)

    assert done.returncode == 0, done.stderr
    assert "Scenario" in done.stdout


def test_the_designed_failures_say_so() -> None:
    """The pubsub and no-reserve variants are marked as expected to fail."""
    assert exercises.find("2").expectation("pubsub") == "fail"
    assert exercises.find("08").expectation("no-reserve") == "fail"
    assert exercises.find("01").expectation() == "pass"


def test_exercises_are_found_by_number_name_or_slug() -> None:
    """2, 02, 02-chat-crash and chat-crash all name the same exercise."""
    names = {exercises.find(text).name
             for text in ("2", "02", "02-chat-crash", "chat-crash")}

    assert names == {"02-chat-crash"}
    with pytest.raises(UsageError):
        exercises.find("99")


def test_an_unknown_variant_lists_the_real_ones() -> None:
    """Asking for a variant that does not exist names those that do."""
    with pytest.raises(UsageError, match="pubsub"):
        exercises.find("2").scenario_path("nope")


def test_a_broken_exercise_folder_is_refused_by_name(tmp_path: Path) -> None:
    """A folder without its README is an error naming it, never skipped."""
    (tmp_path / "01-broken").mkdir()
    (tmp_path / "01-broken" / "scenario.toml").write_text('name = "x"\n')
    (tmp_path / "notes").mkdir()

    with pytest.raises(UsageError, match="01-broken"):
        exercises.load_all(tmp_path)


def test_the_top_level_exercises_folder_is_the_packaged_one() -> None:
    """`exercises/` in a checkout is a symlink to the folder shipped in the wheel."""
    link = REPO / "exercises"

    assert link.is_symlink()
    assert link.resolve() == exercises.EXERCISES_DIR.resolve()


def test_a_quick_check_scales_the_measured_part_and_keeps_the_warmup() -> None:
    """Exercise 02 kills at 8 s of a 2 s warmup + 20 s run, 6 s into the
    measurement; in a 5 s quick check that is 1.5 s into it, at 3.5 s."""
    scenario = scenarios.load(exercises.find("02").scenario_path())

    shorter = exercises.quick(scenario, 5.0)

    assert shorter.duration_s == 5.0
    assert [fault.at_s for fault in scenarios.plan(shorter, 1)] == [3.5]


def test_a_fault_during_the_warmup_stays_where_it_was() -> None:
    """Only moments after the warmup move: a fault at 1 s of a 2 s warmup
    is still at 1 s; its `for` interval scales."""
    scenario = scenarios.load(exercises.find("05").scenario_path())
    early = replace(scenario, faults=(replace(scenario.faults[0], at_s=1.0),))

    shorter = exercises.quick(early, scenario.duration_s / 2)

    assert shorter.faults[0].at_s == 1.0
    assert shorter.faults[0].for_s == scenario.faults[0].for_s / 2


def test_a_quick_check_too_short_to_mean_anything_is_refused() -> None:
    """Under two seconds a chat run has barely connected: refused."""
    scenario = scenarios.load(exercises.find("01").scenario_path())

    with pytest.raises(UsageError):
        exercises.quick(scenario, 1.0)


@pytest.mark.parametrize(
    ("fault_target", "hit"),
    [("random:chat", True), ("all:chat", True), ("chat-2", True),
     ("redis-1", False), ("primary", False), ("random:shortener", False)],
)
def test_a_url_target_replaces_only_faults_on_its_own_kind(
    fault_target: str, hit: bool
) -> None:
    """Faults aimed at dslab's chat servers are the ones a --target replaces."""
    target = ServerTarget("chat", urls=("http://127.0.0.1:9000",))
    fault = scenarios.PlannedFault(1.0, "kill", fault_target)

    assert target.hits(fault) is hit


def test_a_target_needs_exactly_one_of_urls_or_command() -> None:
    """Both or neither of --target and --target-cmd is a usage error."""
    with pytest.raises(UsageError):
        ServerTarget("chat")
    with pytest.raises(UsageError):
        ServerTarget("chat", urls=("http://127.0.0.1:1",), command="x {port}")


def test_target_flags_point_each_bench_at_the_servers() -> None:
    """chat bench gets --servers (all), shorten bench --server (exactly one)."""
    assert target_flags("chat", ["http://a:1", "http://b:2"]) == [
        "--servers", "http://a:1,http://b:2"]
    assert target_flags("shortener", ["http://a:1"]) == ["--server", "http://a:1"]
    with pytest.raises(UsageError):
        target_flags("shortener", ["http://a:1", "http://b:2"])
