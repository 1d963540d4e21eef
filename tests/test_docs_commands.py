"""Every `dslab ...` command shown in a ```sh block of the docs, the README or
an exercise README names a real command and only options that command has;
a chosen set of cheap ones is executed for real."""

from __future__ import annotations

import re
import shlex
from functools import cache
from pathlib import Path

import pytest
import typer.main
from typer.core import TyperGroup
from typer.testing import CliRunner

from dslab.cli.app import app
from tests.helpers import run_dslab

REPO = Path(__file__).resolve().parent.parent
DOC_FILES = sorted([*REPO.glob("docs/*.md"), REPO / "README.md",
                    *REPO.glob("dslab/exercises/*/README.md")])
SH_BLOCK = re.compile(r"^```sh\n(.*?)^```", re.MULTILINE | re.DOTALL)
# Shell operators that start a new command on the same line.
SEPARATORS = re.compile(r"\s(?:&&|\|\||\||;)\s")
ROOT = typer.main.get_command(app)
assert isinstance(ROOT, TyperGroup)


def documented_commands() -> list[tuple[str, str]]:
    """(file, command) for every dslab command in a ```sh block."""
    found = []
    for path in DOC_FILES:
        if not path.exists():
            continue
        text = path.read_text(encoding="utf-8")
        for block in SH_BLOCK.findall(text):
            joined = re.sub(r"\\\n\s*", " ", block)
            for line in joined.splitlines():
                for part in SEPARATORS.split(line.strip()):
                    command = part.strip().removeprefix("sudo ")
                    if command.startswith("dslab "):
                        found.append((str(path.relative_to(REPO)), command))
    return found


COMMANDS = documented_commands()


def words_of(command: str) -> list[str]:
    return shlex.split(command, comments=True)[1:]


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


def _chosen(prefix: str) -> list[str]:
    return sorted({command for _, command in COMMANDS if command.startswith(prefix)})


@pytest.mark.parametrize("command", _chosen("dslab exercise list")
                         + _chosen("dslab exercise show"))
def test_documented_exercise_listing_commands_run(
    command: str, lab_env: dict[str, str]
) -> None:
    """`dslab exercise list` and `show N` as documented exit 0 with output."""
    done = run_dslab(*words_of(command), env=lab_env, timeout_s=30)

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


@pytest.mark.parametrize("command", [c for c in _chosen("dslab chaos run ")
                                     if (REPO / words_of(c)[2]).exists()])
def test_documented_scenario_runs_plan_their_faults(
    command: str, lab_env: dict[str, str]
) -> None:
    """Each documented `chaos run` of a shipped scenario is executed with
    --dry-run (the real run takes 20 s and more): the file exists and plans."""
    words = words_of(command)
    done = run_dslab(*words, "--dry-run", env=lab_env, timeout_s=30)

    assert done.returncode == 0, done.stderr
    assert "fault(s)" in done.stdout


def test_documented_lab_lifecycle_runs(lab_env: dict[str, str]) -> None:
    """`dslab lab up`, `lab status` and `lab down`, as the docs show them, work."""
    for command in ("dslab lab up", "dslab lab status", "dslab lab down"):
        assert command in {c for _, c in COMMANDS}, command
    try:
        for command in ("dslab lab up", "dslab lab status"):
            done = run_dslab(*words_of(command), env=lab_env, timeout_s=60)
            assert done.returncode == 0, done.stderr
    finally:
        down = run_dslab("lab", "down", env=lab_env, timeout_s=60)
    assert down.returncode == 0, down.stderr
