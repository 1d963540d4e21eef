"""Every command shown in a ```sh block of the docs, the README or an exercise
README is executed: each document is walked through in order in a private
lab, and each command must exit as the document promises. Beside that, a
cheap check: every `dslab ...` line names a real command and only options that
command has. How each command is run is declared in tests/doc_walkthroughs.py.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import typer.main
from typer.core import TyperGroup
from typer.testing import CliRunner

from dslab.cli.app import app
from tests import doc_walkthroughs as walk
from tests.helpers import run_dslab

_ROOT = typer.main.get_command(app)
assert isinstance(_ROOT, TyperGroup)
ROOT: TyperGroup = _ROOT

DOC_COMMANDS = walk.documented_commands()
COMMANDS = [(c.doc, c.text) for c in DOC_COMMANDS if walk.dslab_words(c.text)]
DOCS = sorted({c.doc for c in DOC_COMMANDS})


def words_of(command: str) -> list[str]:
    words = walk.dslab_words(command)
    assert words is not None, command
    return words


def command_path(words: list[str]) -> list[str]:
    """The group and sub-command a documented line runs, e.g. [chaos, run]."""
    group = ROOT.commands.get(words[0])
    assert group is not None, f"no command group {words[0]!r}"
    if not isinstance(group, TyperGroup):
        return words[:1]
    if len(words) > 1 and words[1] in group.commands:
        return words[:2]
    # `dslab shorten URL` is `dslab shorten create URL`.
    assert words[0] == "shorten", f"no sub-command {words[1:2]} of {words[0]}"
    return [words[0], "create"]


@cache
def help_text(path: tuple[str, ...]) -> str:
    result = CliRunner().invoke(app, [*path, "--help"], terminal_width=200,
                                env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, f"dslab {' '.join(path)} --help: {result.output}"
    return result.output


def test_the_docs_show_commands_to_check() -> None:
    """The collection finds commands in docs and in the exercise READMEs."""
    files = {name for name, _ in COMMANDS}

    assert len(COMMANDS) > 40
    assert "docs/exercises.md" in files
    assert any(name.startswith("dslab/exercises/") for name in files)


@pytest.mark.parametrize(("source", "command"), COMMANDS,
                         ids=[f"{s}:{c[:50]}" for s, c in COMMANDS])
def test_every_documented_command_and_option_exists(source: str, command: str) -> None:
    """Its group and sub-command answer --help, and each long option on the
    line appears in that help text."""
    words = words_of(command)
    path = command_path(words)
    text = help_text(tuple(path))
    options = [word.split("=")[0] for word in words if word.startswith("--")]

    for option in options:
        assert re.search(rf"{re.escape(option)}\b", text), (
            f"{source}: `{command}` uses {option}, which `dslab "
            f"{' '.join(path)}` does not have")


@pytest.mark.parametrize("command", DOC_COMMANDS, ids=[c.where for c in DOC_COMMANDS])
def test_every_documented_command_has_a_way_to_run(command: walk.DocCommand) -> None:
    """Each command is executed by the walkthroughs, run by a named test, or
    listed as not executed with a reason: nothing slips by."""
    assert walk.how_run(command.text), f"{command.where}: `{command.text}`: " \
        f"{walk.NOT_COVERED}"


@pytest.mark.parametrize("command", sorted(walk.EXECUTED_ELSEWHERE))
def test_commands_run_elsewhere_are_run_there(command: str) -> None:
    """The test named for a command too long for a walkthrough exists and
    invokes that command."""
    path, needle = walk.EXECUTED_ELSEWHERE[command]

    assert needle in (walk.REPO / path).read_text(encoding="utf-8")


@pytest.mark.parametrize(("words", "expected"), [
    ("chat bench --users 100 --rooms 5 --duration 20s --warmup 2s",
     "chat bench --users 10 --rooms 5 --duration 2s --warmup 0.5s"),
    ("shorten bench --rate 10000/s --duration 15s --codes 1000",
     "shorten bench --rate 200/s --duration 2s --codes 50"),
    ("shorten bench --rate 100/s --duration 1s --codes 1",
     "shorten bench --rate 100/s --duration 1s --codes 1"),
    ("exercise check 04 --seed 11", "exercise check 04 --seed 11 --duration 3s"),
    ("exercise check 2 --scenario pubsub",
     "exercise check 2 --scenario pubsub --duration 5s"),
    ("chaos partition host redis-1 --for 5s", "chaos partition host redis-1 --for 5s"),
])
def test_shortening_lowers_values_and_keeps_the_command(
    words: str, expected: str
) -> None:
    """Caps only lower values; sub-command and options stay (a quick-check
    --duration is the one addition); fault timers are left alone."""
    assert shlex.join(walk.shorten(shlex.split(words))) == expected


def test_commands_are_read_from_sh_blocks_and_transcript_prompts(
    tmp_path: Path
) -> None:
    """Continuations join, comments go, and only `$ ` lines of a transcript
    count (its output and synopsis lines do not)."""
    doc = tmp_path / "doc.md"
    doc.write_text(
        "```sh\ndslab lab up \\\n    --topology cluster   # six nodes\n```\n"
        "```\ndslab chaos pause TARGET [--for 10s]\n```\n"
        "```console\n$ dslab lab status\nredis-1 ok\n```\n", encoding="utf-8")

    found = walk.documented_commands([doc])

    assert [(c.line, c.text) for c in found] == [
        (2, "dslab lab up --topology cluster"), (9, "dslab lab status")]


@pytest.mark.parametrize(("command", "codes"), [
    ("dslab exercise check 02 --scenario pubsub", {1}),
    ("dslab exercise check 1 --duration 5s", {0}),
    ("dslab exercise check 04 --seed 11", {0, 1}),
    ("dslab lab up", {0}),
])
def test_exercise_checks_expect_what_their_scenario_declares(
    command: str, codes: set[int]
) -> None:
    """`expect = "fail"` in a scenario means exit 1 is the documented outcome;
    "varies" admits 0 and 1; other commands must exit 0."""
    assert walk.expected_codes("any.md", command)[0] == codes


def test_a_process_left_in_the_lab_folder_is_found(tmp_path: Path) -> None:
    """The after-walkthrough check sees a process working in the lab's folder,
    and no longer once it is gone."""
    node = tmp_path / "redis-1"
    node.mkdir()
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                               cwd=node)
    try:
        assert any(str(process.pid) in line
                   for line in walk.leftover_processes(tmp_path))
    finally:
        process.kill()
        process.wait(timeout=10)

    assert not walk.leftover_processes(tmp_path)


def test_a_command_nobody_runs_is_reported(tmp_path: Path) -> None:
    """A new doc line the harness does not know fails with the fix to apply."""
    doc = tmp_path / "new.md"
    doc.write_text("```sh\nmake-coffee --strong\n```\n", encoding="utf-8")
    found = walk.documented_commands([doc])
    outing = walk.Walk(str(doc), {"DSLAB_HOME": str(tmp_path)}, tmp_path)

    assert [c.text for c in found] == ["make-coffee --strong"]
    with pytest.raises(AssertionError, match="not executed by any test"):
        walk.run_step(outing, found[0].text)


def _set_up_before(outing: walk.Walk, command: str) -> None:
    """What the document takes for granted before this command (SETUP_BEFORE)."""
    actions, why = walk.SETUP_BEFORE.get((outing.doc, command), ((), ""))
    for action in actions:
        if action == "LEARNER-CHAT":
            walk.start_learner_chat(outing)
            continue
        done = walk.run_step(outing, action)
        assert done.returncode == 0, f"set-up `{action}` ({why}): {done.output}"


# A walkthrough runs several commands of up to ~20 s each (an exercise check
# is a lab, servers, a workload and a grade): more than the suite's 120 s.
WALKTHROUGH_TIMEOUT_S = 420
# Documents whose labs are multi-node (replicated or cluster).
MULTI_NODE = re.compile(r"--topology (replicated|cluster)")


def _doc_param(doc: str) -> object:
    multi_node = any(MULTI_NODE.search(c.text) for c in DOC_COMMANDS if c.doc == doc)
    return pytest.param(doc, marks=[pytest.mark.slow] if multi_node else [])


@pytest.mark.timeout(WALKTHROUGH_TIMEOUT_S)
@pytest.mark.parametrize("doc", [_doc_param(doc) for doc in DOCS])
def test_documented_walkthrough_runs(
    doc: str, lab_env: dict[str, str], tmp_path: Path
) -> None:
    """Every command of the document, in its order, in a private lab, exits
    as the document promises; afterwards no process or namespace is left."""
    workdir = tmp_path / "reader"
    workdir.mkdir()
    walk.prepare_workdir(workdir)
    outing = walk.Walk(doc, lab_env, workdir)
    failures: list[str] = []
    steps = [c.text for c in DOC_COMMANDS if c.doc == doc]
    set_up: set[str] = set()
    try:
        with walk.static_server() as baseline:
            outing.static_server = baseline
            for command in steps:
                if command not in set_up:
                    set_up.add(command)
                    _set_up_before(outing, command)
                try:
                    outcome = walk.run_step(outing, command)
                except AssertionError as broken:  # e.g. a placeholder not found
                    failures.append(f"`{command}`: {broken}")
                    continue
                if outcome.output in ("elsewhere",) or outcome.output.startswith(
                        "not executed"):
                    continue  # run by another test, or declared not run
                outing.outputs.append((command, outcome.output))
                unsettled = walk.settle(outing, command)
                if unsettled:
                    failures.append(f"after `{command}`: {unsettled}")
                codes, why = walk.expected_codes(doc, command)
                problem = (
                    f"exited {outcome.returncode}, expected {sorted(codes)} ({why})"
                    if outcome.returncode not in codes
                    else walk.missing_grades(outcome.command, outcome.output))
                if problem:
                    failures.append(f"`{command}` (ran `{outcome.command}`) "
                                    f"{problem}:\n{outcome.output[-1500:]}")
    finally:
        for process in outing.foreground:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)
        down = run_dslab("lab", "down", env=lab_env, cwd=workdir, timeout_s=60)
    home = outing.home
    leftovers = walk.leftover_processes(home, workdir) + walk.leftover_network(home)

    assert down.returncode == 0, down.stdout + down.stderr
    assert not leftovers, f"left running after `lab down`: {leftovers}"
    assert not failures, f"{doc}:\n\n" + "\n\n".join(failures)
