"""Scenario files: parsed strictly, planned reproducibly, applied for real."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis
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


# -- delay, partition and heal faults, and the lab's network ------------------

NETWORK_FAULTS = """
name = "slow then cut"
seed = 11

[lab]
network = "netns"

[workload]
duration = "30s"

[[faults]]
random = ["1s", "9s"]
count = 2
action = "delay"
target = "random:redis"
ms = 150
jitter = 20
rate = "1mbit"
backend = "proxy"
for = "2s"

[[faults]]
at = "12s"
action = "partition"
sides = [["redis-1", "sentinel-1"], ["redis-2", "host"]]
one_way = true
for = "3s"

[[faults]]
every = "10s"
start = "15s"
action = "partition"
target = "primary"

[[faults]]
at = "28s"
action = "heal"
"""


def test_network_faults_parse_plan_and_print_plainly() -> None:
    """delay, partition (sides or isolate) and heal land in the rules with
    their options, the same seed plans the same list, and each planned fault
    reads as what it does."""
    scenario = parse(_parsed(NETWORK_FAULTS), Path("s.toml"))

    first, second = plan(scenario, seed=11), plan(scenario, seed=11)

    assert scenario.network.value == "netns"
    delay_rule = scenario.faults[0]
    assert delay_rule.delay is not None and delay_rule.backend == "proxy"
    assert (delay_rule.delay.ms, delay_rule.delay.jitter_ms) == (150.0, 20.0)
    assert delay_rule.delay.rate == "1mbit" and delay_rule.for_s == 2.0
    assert scenario.faults[1].sides == (("redis-1", "sentinel-1"),
                                        ("redis-2", "host"))
    assert first == second
    lines = [fault.describe() for fault in first]
    assert sum("delay random:redis 150ms+-20ms rate 1mbit (proxy) for 2s" in line
               for line in lines) == 2
    assert "  12.00s  partition redis-1,sentinel-1 -> redis-2,host for 3s" in lines
    assert "  15.00s  partition: isolate primary" in lines
    assert "  25.00s  partition: isolate primary" in lines
    assert lines[-1] == "  28.00s  heal every active fault"


def test_delay_backend_defaults_to_auto_and_network_to_loopback() -> None:
    """Without backend a delay is `auto`; without [lab] network the lab is
    the loopback one."""
    scenario = parse(_parsed('[[faults]]\nat = "1s"\naction = "delay"\n'
                             'target = "redis-1"\nms = 5'), Path("s.toml"))

    assert scenario.faults[0].backend == "auto"
    assert scenario.network.value == "loopback"


_DELAY = '[[faults]]\nat = "1s"\naction = "delay"\ntarget = "redis-1"\n'
_PARTITION = ('[lab]\nnetwork = "netns"\n[[faults]]\nat = "1s"\n'
              'action = "partition"\n')


@pytest.mark.parametrize(("text", "complaint"), [
    (_DELAY + 'ms = "fast"', r"faults\[0\]\.ms must be a number"),
    (_DELAY + "ms = 10\njitter = 30", r"faults\[0\]: jitter 30 is larger"),
    (_DELAY + "ms = -1", r"faults\[0\]: ms and jitter must be >= 0"),
    (_DELAY + 'ms = 10\nrate = "fast"', r"faults\[0\]: rate 'fast'"),
    (_DELAY + 'ms = 10\nbackend = "tc"', r"faults\[0\]\.backend is 'tc'"),
    (_DELAY + 'ms = 10\nbackend = "proxy"\nloss = "1%"', r"faults\[0\]\.loss"),
    (_DELAY, "nothing to do"),
    (_DELAY + "ms = 10\nsides = []", r"faults\[0\]\.sides is not a key of a delay"),
    (_PARTITION + 'target = "redis-1"\nsides = [["redis-1"], ["host"]]',
     "both target and sides"),
    (_PARTITION + 'sides = [["redis-1"]]', r"faults\[0\]\.sides must be two"),
    (_PARTITION + 'sides = [["redis-1"], []]', r"faults\[0\]\.sides must be two"),
    (_PARTITION + 'sides = [["redis-1"], ["redis-1"]]', "on both sides"),
    (_PARTITION + 'target = "redis-1"\none_way = "yes"', r"faults\[0\]\.one_way"),
    (_PARTITION + 'target = "redis-1"\nms = 5', r"faults\[0\]\.ms is not a key"),
    (_PARTITION, r"faults\[0\]\.target is missing"),
    ('[[faults]]\nat = "1s"\naction = "partition"\ntarget = "redis-1"',
     "lab.network is 'loopback'"),
    ('[[faults]]\nat = "1s"\naction = "heal"\nfor = "1s"', "not heal"),
    ('[[faults]]\nat = "1s"\naction = "heal"\ntarget = "redis-1"',
     r"faults\[0\]\.target is not a key of a heal"),
    ('[[faults]]\nat = "1s"\naction = "pause"\ntarget = "x"\nsignal = "TERM"',
     r"faults\[0\]\.signal is not a key of a pause"),
    ('[lab]\nnetwork = "wifi"', "lab.network is 'wifi'"),
])
def test_bad_network_faults_are_refused_naming_the_key(
    tmp_path: Path, text: str, complaint: str
) -> None:
    """A bad delay, partition or heal fault, or an unknown network, is a
    usage error naming the key at fault, before anything starts."""
    with pytest.raises(UsageError, match=complaint):
        load(_write(tmp_path, text))


def test_every_shipped_exercise_scenario_still_loads() -> None:
    """The stricter key checks refuse nothing the shipped exercises use."""
    shipped = sorted(Path(__file__).resolve().parents[2]
                     .glob("dslab/exercises/*/scenario*.toml"))

    loaded = [load(path) for path in shipped]

    assert len(loaded) >= 10


@pytest.mark.timeout(60)
def test_nemesis_delays_through_the_proxy_and_undoes_it(
    start_lab: StartLab, tmp_path: Path
) -> None:
    """A proxy-backed delay of 300 ms really slows a PING through the proxy
    the nemesis started, is journaled, and its `for` timer heals it (long
    before the heal fault, which then finds nothing left)."""
    lab = start_lab()
    scenario = load(_write(tmp_path, """
[workload]
duration = "10s"
[[faults]]
at = "0.1s"
action = "delay"
target = "redis-1"
ms = 300
backend = "proxy"
for = "1s"
[[faults]]
at = "6s"
action = "heal"
"""))
    nemesis = Nemesis(lab, plan(scenario, seed=1), seed=1)
    journal = Journal(lab.home)

    nemesis.start()
    try:
        eventually(lambda: bool(journal.active_faults()), timeout_s=10)
        fault = journal.active_faults()[0]
        host, port = str(fault.params["proxy_address"]).rsplit(":", 1)
        client = redis.Redis(host=host, port=int(port), socket_timeout=5)
        try:
            began = time.monotonic()
            client.ping()
            slowed_s = time.monotonic() - began
        finally:
            client.close()
        eventually(lambda: journal.active_faults() == [], timeout_s=10)
        eventually(lambda: len(nemesis.applied) == 2, timeout_s=10)
    finally:
        nemesis.stop()

    assert fault.kind == "delay" and fault.params["backend"] == "proxy"
    assert slowed_s >= 0.25
    assert nemesis.applied[0][1].startswith("delay 300ms on redis-1 via proxy")
    assert nemesis.applied[1][1] == "heal: nothing was active"
    assert nemesis.errors == []


@pytest.mark.timeout(30)
def test_fault_times_count_from_when_the_load_began(
    start_lab: StartLab, tmp_path: Path
) -> None:
    """With a load-start file, a fault at 0.2 s waits for the workload to
    write that its load began (here 1 s after the nemesis started) and comes
    0.2 s after that instant, not 0.2 s after the nemesis started."""
    lab = start_lab()
    scenario = load(_write(tmp_path, """
[workload]
duration = "10s"
[[faults]]
at = "0.2s"
action = "heal"
"""))
    marker = tmp_path / "load-started"
    nemesis = Nemesis(lab, plan(scenario, seed=1), seed=1, load_start_file=marker)

    began = time.monotonic()
    nemesis.start()
    try:
        time.sleep(1.0)
        assert nemesis.applied == [], "the fault came before the load began"
        load_began = time.time()
        marker.write_text(f"{load_began:.6f}\n")
        eventually(lambda: len(nemesis.applied) == 1, timeout_s=10)
    finally:
        nemesis.stop()

    at_s, what = nemesis.applied[0]
    assert what.startswith("heal")
    assert 0.2 <= at_s < 2.0
    assert time.monotonic() - began >= 1.2
    assert nemesis.errors == []
