"""``dslab demo``: the whole define → implement → break loop in about a minute.

It starts a lab, two chat servers and a shortener; runs 100 chat users while
it kills a chat server; runs a burst of shortener traffic; grades both
against their constraints; says where the web pages are; and cleans up
(or keeps everything running with ``--keep``). Both experiments are ordinary
scenarios run by ``dslab.experiment``, the same way ``dslab chaos run`` runs
a file.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from dslab import experiment
from dslab.chaos.scenario import Scenario, parse
from dslab.cli.context import lab_of
from dslab.cli.output import console, note
from dslab.errors import CheckFailed
from dslab.lab import services
from dslab.lab.lab import Lab

CHAT_USERS = 100
CHAT_SECONDS = 20
SHORTENER_RATE_PER_S = 2000
SHORTENER_SECONDS = 10

CHAT_SCENARIO: dict[str, Any] = {
    "name": "demo chat crash",
    "description": "100 users chat through two servers; one is killed with "
                   "SIGKILL and brought back; nothing may be lost",
    "seed": 1,
    "services": [{"kind": "chat", "instances": 2}],
    "workload": {"kind": "chat", "duration": f"{CHAT_SECONDS}s",
                 "options": ["--users", str(CHAT_USERS), "--rooms", "1",
                             "--rate", "1/s", "--warmup", "2s"]},
    "faults": [
        {"at": "8s", "action": "kill", "target": "chat-1"},
        {"at": "13s", "action": "restart", "target": "chat-1"},
    ],
    "constraints": {"slo": ["deliver:p99<200ms", "lost==0", "duplicated==0",
                            "reordered==0"]},
}
SHORTENER_SCENARIO: dict[str, Any] = {
    "name": "demo shortener",
    "description": "a burst of redirects and creations at a constant rate",
    "seed": 1,
    "services": [{"kind": "shortener", "instances": 1,
                  "options": ["--workers", "2", "--create-per-minute", "0"]}],
    "workload": {"kind": "shortener", "duration": f"{SHORTENER_SECONDS}s",
                 "options": ["--rate", f"{SHORTENER_RATE_PER_S}/s",
                             "--warmup", "1s", "--codes", "200"]},
    "constraints": {"slo": ["redirect:p99<100ms", "create:p50<10ms",
                            "errors<0.1%"]},
}


def demo(
    ctx: typer.Context,
    keep: Annotated[
        bool, typer.Option("--keep", help="Leave the lab and servers running "
                           "afterwards, to explore them.")
    ] = False,
) -> None:
    """Run dslab's tour: a chat that survives a crash, a fast shortener, graded.

    Takes about a minute on two cores. Exit 0 when every constraint held, 1
    when one did not (the report says which).
    """
    lab = lab_of(ctx)
    began = time.monotonic()

    def event(what: str) -> None:
        note(f"  [{time.monotonic() - began:5.1f}s] {what}")

    results: list[tuple[str, experiment.ExperimentResult]] = []
    try:
        for label, spec in (("chat", CHAT_SCENARIO), ("shortener",
                                                      SHORTENER_SCENARIO)):
            scenario = _scenario(spec)
            console.print(f"\n[bold]{scenario.name}[/]: {scenario.description}.")
            result = experiment.run(scenario, lab, out=_out(label), on_event=event)
            results.append((label, result))
        _summary(results)
        _where(lab, keep)
    finally:
        if not keep:
            down = lab.down()
            note(f"\nCleaned up: stopped {len(down.stopped)} processes "
                 "(run with --keep to explore them instead).")

    failed = [name for name, result in results if not result.passed]
    if failed:
        raise CheckFailed(f"the {' and '.join(failed)} demo missed a constraint",
                          fix="see the table above; run files are in runs/")


def _scenario(spec: dict[str, Any]) -> Scenario:
    return parse(spec, Path(f"<demo:{spec['name']}>"))


def _out(label: str) -> Path:
    return Path("runs") / f"demo-{label}-{time.strftime('%Y%m%d-%H%M%S')}.json"


def _summary(results: list[tuple[str, experiment.ExperimentResult]]) -> None:
    table = Table(title="What was promised, and what happened",
                  title_justify="left")
    for column in ("experiment", "constraint", "result", "measured"):
        table.add_column(column)
    for label, result in results:
        for slo in result.slo:
            verdict = "[green]PASS[/]" if slo.passed else "[red]FAIL[/]"
            table.add_row(label, slo.constraint.text, verdict, slo.detail)
        if result.workload_exit:
            table.add_row(label, "workload finished cleanly", "[red]FAIL[/]",
                          f"exit {result.workload_exit}")
    console.print()
    console.print(table)
    for label, result in results:
        console.print(f"{label}: run file {result.run_path} "
                      f"(`dslab report latency {result.run_path}`)")


def _where(lab: Lab, keep: bool) -> None:
    if not keep:
        console.print("The web pages of the chat and the shortener go away with "
                      "the clean-up: `dslab demo --keep` keeps them to open.")
        return
    for kind in ("chat", "shortener"):
        for record in services.running(lab, kind):
            console.print(f"{record.name}: open {record.extra['url']}/ in a browser")
    console.print("Stop everything with `dslab lab down`.")
