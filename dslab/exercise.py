"""The define / implement / break exercises: find them, describe them, grade them.

Each exercise is a folder ``dslab/exercises/NN-name/`` shipped inside the
package (the top-level ``exercises/`` of a checkout is a symlink to it):
``README.md`` for the person, ``scenario.toml`` for ``dslab chaos run``, and
optionally variants such as ``scenario-pubsub.toml``. A scenario file may
carry an ``[exercise]`` table that the scenario runner ignores::

    [exercise]
    title = "Chat baseline"
    teaches = "latency percentiles of a healthy chat under 100 users"
    needs_root = false
    root_note = ""         # when root helps but is not required
    expect = "pass"        # pass | fail | varies, with dslab's own servers

Guarantees: exercises are listed in number order and every one found is
loaded completely (a broken folder is a ``UsageError`` naming it, never
skipped); ``check`` grades every constraint of the scenario, also when the
run fails, and heals every fault it applied (``dslab.experiment``).
"""

from __future__ import annotations

import logging
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dslab import experiment
from dslab.chaos import scenario as scenarios
from dslab.chaos.scenario import FaultRule, Scenario
from dslab.errors import UsageError
from dslab.lab.lab import Lab
from dslab.units import parse_duration

log = logging.getLogger(__name__)

EXERCISES_DIR = Path(__file__).parent / "exercises"
FOLDER_PATTERN = re.compile(r"^(\d{2})-([a-z0-9-]+)$")
VARIANT_PATTERN = re.compile(r"^scenario-([a-z0-9-]+)\.toml$")
# "varies": the outcome is a race (a failover), so no single run is wrong.
EXPECTATIONS = ("pass", "fail", "varies")
# Below this a chat workload barely gets its users connected; a quick check
# shorter than that says nothing.
MIN_QUICK_S = 2.0


@dataclass(frozen=True)
class Exercise:
    """One exercise folder, with what ``dslab exercise list`` shows of it."""

    number: int
    slug: str
    folder: Path
    title: str
    teaches: str
    needs_root: bool
    root_note: str
    variants: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def readme(self) -> Path:
        return self.folder / "README.md"

    def scenario_path(self, variant: str | None = None) -> Path:
        """``scenario.toml``, or ``scenario-VARIANT.toml``."""
        if variant is None:
            return self.folder / "scenario.toml"
        if variant not in self.variants:
            choices = ", ".join(self.variants) or "none"
            raise UsageError(f"exercise {self.number:02d} has no scenario "
                             f"variant {variant!r}",
                             fix=f"variants of this exercise: {choices}")
        return self.folder / f"scenario-{variant}.toml"

    def scenario_paths(self) -> list[Path]:
        return [self.scenario_path(), *(self.scenario_path(v) for v in self.variants)]

    def expectation(self, variant: str | None = None) -> str:
        """The verdict dslab's own servers are meant to reach: pass or fail."""
        return str(_exercise_table(self.scenario_path(variant)).get("expect", "pass"))


def load_all(folder: Path = EXERCISES_DIR) -> list[Exercise]:
    """Every exercise under ``folder``, in number order."""
    found = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = FOLDER_PATTERN.match(path.name)
        if match is None or not path.is_dir():
            continue
        found.append(_load(path, int(match.group(1)), match.group(2)))
    return found


def find(text: str, folder: Path = EXERCISES_DIR) -> Exercise:
    """The exercise called ``text``: ``2``, ``02``, ``02-chat-crash`` or
    ``chat-crash``."""
    wanted = text.strip().lower()
    for exercise in load_all(folder):
        if wanted.isdigit() and int(wanted) == exercise.number:
            return exercise
        if wanted in (exercise.name, exercise.slug):
            return exercise
    raise UsageError(f"no exercise {text!r}",
                     fix="`dslab exercise list` shows their numbers")


def _load(path: Path, number: int, slug: str) -> Exercise:
    readme = path / "README.md"
    scenario_file = path / "scenario.toml"
    for needed in (readme, scenario_file):
        if not needed.is_file():
            raise UsageError(f"exercise folder {path} has no {needed.name}",
                             fix="every exercise needs README.md and scenario.toml")
    table = _exercise_table(scenario_file)
    variants = tuple(sorted(match.group(1) for item in path.iterdir()
                            if (match := VARIANT_PATTERN.match(item.name))))
    for variant in (None, *variants):
        name = "scenario.toml" if variant is None else f"scenario-{variant}.toml"
        expect = _exercise_table(path / name).get("expect", "pass")
        if expect not in EXPECTATIONS:
            raise UsageError(f"{path / name}: exercise.expect is {expect!r}",
                             fix=f"use one of {list(EXPECTATIONS)}")
    return Exercise(
        number=number, slug=slug, folder=path,
        title=str(table.get("title", slug.replace("-", " "))),
        teaches=str(table.get("teaches", "")),
        needs_root=bool(table.get("needs_root", False)),
        root_note=str(table.get("root_note", "")),
        variants=variants,
    )


def _exercise_table(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    table = data.get("exercise", {})
    if not isinstance(table, dict):
        raise UsageError(f"{path}: [exercise] must be a table")
    return table


def quick(scenario: Scenario, duration_s: float) -> Scenario:
    """The same experiment squeezed into ``duration_s`` of measurement.

    Fault moments count from the moment the workload's load began, its
    ``--warmup`` first; the warmup is kept whole and only the measured part
    is scaled, so a kill a third into the measured run still comes a third
    into it (scaling the warmup too would move faults into it, where nobody
    measures them). Intervals (``every``, ``for``) scale by the same factor.
    """
    if duration_s < MIN_QUICK_S:
        raise UsageError(f"--duration {duration_s:g}s is too short to judge anything",
                         fix=f"give at least {MIN_QUICK_S:g}s")
    factor = duration_s / scenario.duration_s
    warmup_s = _warmup_s(scenario)
    faults = tuple(_scaled(rule, factor, warmup_s) for rule in scenario.faults)
    return replace(scenario, duration_s=duration_s, faults=faults)


def _warmup_s(scenario: Scenario) -> float:
    """The workload's ``--warmup``, 0 when not given (the benches' default)."""
    options = list(scenario.workload_options)
    for index, option in enumerate(options):
        if option == "--warmup" and index + 1 < len(options):
            return parse_duration(options[index + 1], what="--warmup")
        if option.startswith("--warmup="):
            return parse_duration(option.partition("=")[2], what="--warmup")
    return 0.0


def _scaled(rule: FaultRule, factor: float, warmup_s: float) -> FaultRule:
    def moment(value: float) -> float:
        if value <= warmup_s:
            return value
        return round(warmup_s + (value - warmup_s) * factor, 3)

    def interval(value: float | None) -> float | None:
        return None if value is None else round(value * factor, 3)

    between = (None if rule.between_s is None
               else (moment(rule.between_s[0]), moment(rule.between_s[1])))
    return replace(
        rule,
        at_s=None if rule.at_s is None else moment(rule.at_s),
        every_s=interval(rule.every_s),
        start_s=moment(rule.start_s),
        stop_s=None if rule.stop_s is None else moment(rule.stop_s),
        between_s=between,
        for_s=interval(rule.for_s),
    )


@dataclass(frozen=True)
class Grade:
    """One line of a check: a constraint (or the workload itself) and its verdict."""

    rule: str
    operation: str
    passed: bool
    detail: str


@dataclass
class CheckOutcome:
    exercise: Exercise
    variant: str | None
    result: experiment.ExperimentResult
    grades: list[Grade]

    @property
    def passed(self) -> bool:
        return all(grade.passed for grade in self.grades)


def check(
    exercise: Exercise,
    lab: Lab,
    *,
    variant: str | None = None,
    seed: int | None = None,
    duration_s: float | None = None,
    out: Path | None = None,
    target: experiment.ServerTarget | None = None,
    on_event: Callable[[str], None] | None = None,
) -> CheckOutcome:
    """Run the exercise's scenario (optionally shortened, optionally against
    the learner's server) and grade every constraint."""
    scenario = scenarios.load(exercise.scenario_path(variant))
    if duration_s is not None:
        scenario = quick(scenario, duration_s)
    log.info("exercise check: %s%s for %g s", exercise.name,
             f" ({variant})" if variant else "", scenario.duration_s)

    result = experiment.run(scenario, lab, seed=seed, out=out, on_event=on_event,
                            target=target)

    grades = [Grade(r.constraint.text, r.operation or "(run)", r.passed, r.detail)
              for r in result.slo]
    grades.append(Grade("workload finished cleanly", "(run)",
                        result.workload_exit == 0,
                        f"the bench exited {result.workload_exit}"))
    return CheckOutcome(exercise, variant, result, grades)
