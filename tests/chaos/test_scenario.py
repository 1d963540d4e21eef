"""Scenario files: parsed strictly, planned reproducibly, applied for real."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dslab.chaos.journal import Journal
from dslab.chaos.scenario import Nemesis, load, parse, plan
from dslab.errors import UsageError
from dslab.lab.probe import answers
from tests.conftest import StartLab
from tests.helpers import eventually

EXAMPLE = """
name = "chat server crash"
seed = 7

[lab]
topology = "standalone"

[[services]]
kind = "chat"
instances = 2

[workload]
kind = "idle"
duration = "30s"

[[faults]]
at = "10s"
action = "kill"
target = "random:chat"

[[faults]]
every = "5s"
start = "2s"
stop = "20s"
action = "pause"
target = "redis-1"
for = "1s"

[[faults]]
random = ["5s", "25s"]
count = 3
action = "restart"
target = "chat-1"

[constraints]
slo = ["lost==0"]
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scenario.toml"
    path.write_text(text)
    return path


def test_example_parses_into_its_parts(tmp_path: Path) -> None:
    """Every table of the documented example lands where it should."""
    scenario = load(_write(tmp_path, EXAMPLE))

    assert scenario.name == "chat server crash"
    assert scenario.seed == 7
    assert scenario.services[0].instances == 2
    assert scenario.duration_s == 30.0
    assert scenario.slo == ("lost==0",)
    assert [rule.action for rule in scenario.faults] == ["kill", "pause", "restart"]


def test_plan_expands_every_and_random_in_time_order(tmp_path: Path) -> None:
    """`every` gives one fault per period inside [start, stop); `random` gives
    `count` faults inside its bounds; the list is sorted by time."""
    scenario = load(_write(tmp_path, EXAMPLE))

    faults = plan(scenario, seed=7)

    pauses = [f.at_s for f in faults if f.action == "pause"]
    assert pauses == [2.0, 7.0, 12.0, 17.0]
    restarts = [f.at_s for f in faults if f.action == "restart"]
    assert len(restarts) == 3 and all(5.0 <= at <= 25.0 for at in restarts)
    assert [f.at_s for f in faults] == sorted(f.at_s for f in faults)


@given(st.integers(min_value=0, max_value=2**31))
def test_same_seed_same_schedule(seed: int) -> None:
    """The schedule is a function of the file and the seed, nothing else."""
    scenario = parse(_parsed(EXAMPLE), Path("s.toml"))

    assert plan(scenario, seed) == plan(scenario, seed)


def _parsed(text: str) -> dict[str, object]:
    import tomllib

    return tomllib.loads(text)


@pytest.mark.parametrize(("text", "complaint"), [
    ('[workload]\nkind = "bogus"', "workload.kind"),
    ('[lab]\ntopology = "mesh"', "lab.topology"),
    ('[[faults]]\naction = "kill"\ntarget = "chat-1"', "exactly one of at"),
    ('[[faults]]\nat = "1s"\naction = "explode"\ntarget = "x"', "action"),
    ('[[faults]]\nat = "1s"\naction = "kill"\ntarget = "x"\nfor = "2s"', "pause"),
    ('[[faults]]\nrandom = ["9s", "2s"]\naction = "kill"\ntarget = "x"', "latest"),
    ('[workload]\nduration = "2h"', "duration"),
    ("this is = not toml [", "TOML"),
])
def test_bad_files_are_refused_naming_the_problem(
    tmp_path: Path, text: str, complaint: str
) -> None:
    """A mistake is a usage error that names the key at fault."""
    with pytest.raises(UsageError, match=complaint):
        load(_write(tmp_path, text))


@pytest.mark.timeout(60)
def test_nemesis_applies_the_schedule_to_a_real_lab(
    start_lab: StartLab, tmp_path: Path
) -> None:
    """A pause at 0.3 s for 0.5 s really stops redis-1 answering, is journaled,
    and is healed by its timer; an impossible fault is reported, not fatal."""
    lab = start_lab()
    scenario = load(_write(tmp_path, """
[workload]
duration = "5s"
[[faults]]
at = "0.3s"
action = "pause"
target = "redis-1"
for = "500ms"
[[faults]]
at = "0.4s"
action = "restart"
target = "no-such-node"
"""))
    node = lab.node("redis-1")
    nemesis = Nemesis(lab, plan(scenario, seed=1), seed=1)

    nemesis.start()
    eventually(lambda: not answers(node, timeout_s=0.1), timeout_s=5)
    eventually(lambda: answers(node), timeout_s=10)
    time.sleep(0.5)  # past the impossible fault's moment
    nemesis.stop()

    assert nemesis.applied[0][1] == "pause redis-1"
    assert len(nemesis.errors) == 1 and "no-such-node" in nemesis.errors[0]
    journal = Journal(lab.home)
    assert journal.active_faults() == []
