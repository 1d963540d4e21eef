"""``dslab exercise``: list the exercises, read one, grade one.

``check`` runs the exercise's scenario through ``dslab.experiment`` (the
same runner as ``dslab chaos run``) in a lab of its own, grades every
constraint PASS or FAIL and exits 0 or 1. With ``--target`` or
``--target-cmd`` it grades the learner's own server instead of dslab's.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markdown import Markdown
from rich.table import Table

from dslab import exercise as exercises
from dslab.chaos import scenario as scenarios
from dslab.cli.context import lab_of
from dslab.cli.output import console, note, print_json
from dslab.errors import CheckFailed, LabAlreadyRunning, UsageError
from dslab.experiment import ServerTarget
from dslab.lab.lab import Lab
from dslab.report.html import write_html
from dslab.report.tables import NamedRun, render_report
from dslab.units import parse_duration

app = typer.Typer(
    help="The define / implement / break exercises: list them, read one, "
    "and let dslab grade it (also against your own server).",
    no_args_is_help=True,
)

ExerciseArg = Annotated[
    str, typer.Argument(help="Exercise number (2, 02) or name (02-chat-crash).",
                        metavar="N")
]


@app.command("list")
def list_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Every exercise: number, title, what it teaches, whether it needs root."""
    found = exercises.load_all()
    if as_json:
        print_json([{"number": e.number, "name": e.name, "title": e.title,
                     "teaches": e.teaches, "needs_root": e.needs_root,
                     "root_note": e.root_note,
                     "variants": list(e.variants)} for e in found])
        return
    table = Table(title=f"{len(found)} exercises", title_justify="left")
    for column in ("#", "title", "what it teaches", "root?", "variants"):
        table.add_column(column)
    for item in found:
        root = "yes" if item.needs_root else "no"
        table.add_row(f"{item.number:02d}", item.title, item.teaches,
                      item.root_note or root,
                      ", ".join(item.variants) or "-")
    console.print(table)
    console.print("Read one: dslab exercise show N. Grade it: dslab exercise "
                  "check N (quick: --duration 5s).")


@app.command()
def show(
    number: ExerciseArg,
    raw: Annotated[bool, typer.Option("--raw", help="Print the Markdown source "
                                      "instead of rendering it.")] = False,
) -> None:
    """Print an exercise's README: define, implement, break, measure, questions."""
    item = exercises.find(number)
    text = item.readme.read_text(encoding="utf-8")
    if raw:
        console.print(text, markup=False, highlight=False, soft_wrap=True)
    else:
        console.print(Markdown(text))
    console.print(f"\nScenario: {item.scenario_path()}", markup=False)
    for variant in item.variants:
        console.print(f"Variant {variant}: {item.scenario_path(variant)}",
                      markup=False)


@app.command()
def check(
    ctx: typer.Context,
    number: ExerciseArg,
    variant: Annotated[
        str | None, typer.Option("--scenario", help="A variant of the exercise, "
                                 "e.g. pubsub for scenario-pubsub.toml.")
    ] = None,
    target: Annotated[
        list[str] | None,
        typer.Option("--target", help="URL of YOUR running server (any language, "
                     "speaking the documented protocol), graded instead of "
                     "dslab's. Repeatable for chat."),
    ] = None,
    target_cmd: Annotated[
        str | None,
        typer.Option("--target-cmd", help="Command that starts YOUR server, with "
                     "{port} and {redis} filled in; the lab runs it in place of "
                     "dslab's servers, so the exercise's faults hit it."),
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Seed of the fault schedule and "
                                 "the workload [default: the scenario's].")
    ] = None,
    duration: Annotated[
        str | None, typer.Option("--duration", help="A quick check: run this long "
                                 "(e.g. 5s); fault times are scaled to fit.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Run file [default: "
                                  "runs/scenario-NAME-TIME.json].")
    ] = None,
    html: Annotated[
        Path | None, typer.Option("--html", help="Also write the report as HTML.")
    ] = None,
    keep: Annotated[
        bool, typer.Option("--keep", help="Leave the lab and servers running "
                           "afterwards, to look around.")
    ] = False,
) -> None:
    """Run the exercise's scenario and grade every constraint: exit 0 when all
    pass, 1 when one fails.

    The check starts a lab of its own and stops it afterwards (unless --keep),
    so no server left from earlier experiments changes the verdict; only with
    --target, whose server already uses the running lab, is that lab reused
    and left running.
    """
    item = exercises.find(number)
    scenario = scenarios.load(item.scenario_path(variant))
    duration_s = None if duration is None else parse_duration(
        duration, what="--duration", max_s=scenarios.MAX_DURATION_S)
    server_target = _server_target(scenario.workload, target, target_cmd)
    lab = lab_of(ctx)
    reuse = bool(target)
    started_here = not _lab_running(lab)
    if not started_here and not reuse:
        raise LabAlreadyRunning(
            f"a lab is already running in {lab.home}; `exercise check` starts "
            "its own so that no server left from earlier changes the verdict",
            fix="stop it with `dslab lab down` (or point --home elsewhere)",
        )

    began = time.monotonic()

    def event(what: str) -> None:
        note(f"[{time.monotonic() - began:6.1f}s] {what}")

    title = f"{item.name}" + (f" ({variant})" if variant else "")
    note(f"Checking exercise {title}: {scenario.name!r}"
         + (f", shortened to {duration_s:g} s" if duration_s else ""))
    try:
        outcome = exercises.check(item, lab, variant=variant, seed=seed,
                                  duration_s=duration_s, out=out,
                                  target=server_target, on_event=event)
    finally:
        if started_here and not keep:
            lab.down(force=True)
    result = outcome.result

    named = [NamedRun(str(result.run_path), result.run)]
    results = [(str(result.run_path), r) for r in result.slo]
    render_report(console, named, results)
    if html is not None:
        write_html(html, named, results)
        note(f"HTML report written to {html}")
    console.print(_grade_table(outcome))
    for fault in result.skipped:
        console.print(f"Note: skipped {fault.action} {fault.target} at "
                      f"{fault.at_s:g}s: it targets dslab's own servers, which "
                      "--target replaced. Use --target-cmd to have it applied "
                      "to your server.", markup=False)
    for error in result.fault_errors:
        console.print(f"Note: {error}", markup=False)
    note(f"Run file: {result.run_path}")
    if keep or not started_here:
        note("The lab is still running: `dslab lab status`; `dslab lab down` "
             "when done.")

    expected = item.expectation(variant)
    if not outcome.passed:
        failed = [g for g in outcome.grades if not g.passed]
        designed = {
            "fail": " This scenario is designed to fail with dslab's own "
                    "servers: read its README for why.",
            "varies": " This scenario's outcome is a race: try other --seed "
                      "values and read its README.",
        }.get(expected, "")
        raise CheckFailed(
            f"exercise {title}: {len(failed)} of {len(outcome.grades)} checks "
            f"FAILED.{designed}",
            fix=f"see the report above and `dslab report latency {result.run_path}`",
        )
    if expected == "fail":
        console.print("This scenario was expected to fail, and passed: the fault "
                      "may not have hit anything; try another --seed.")
    console.print(f"Exercise {title}: all {len(outcome.grades)} checks PASS.")


def _grade_table(outcome: exercises.CheckOutcome) -> Table:
    verdict = "PASS" if outcome.passed else "FAIL"
    table = Table(title=f"Exercise {outcome.exercise.name}: {verdict}",
                  title_justify="left")
    for column in ("check", "operation", "result", "measured"):
        table.add_column(column)
    for grade in outcome.grades:
        table.add_row(grade.rule, grade.operation,
                      "PASS" if grade.passed else "FAIL", grade.detail)
    return table


def _server_target(
    workload: str, urls: list[str] | None, command: str | None
) -> ServerTarget | None:
    if not urls and command is None:
        return None
    if urls and command is not None:
        raise UsageError("give --target or --target-cmd, not both",
                         fix="--target for a server you run yourself, "
                         "--target-cmd for one the lab should start")
    if workload not in ("chat", "shortener"):
        raise UsageError("this exercise runs no workload against a server, so "
                         "there is nothing to grade your server on",
                         fix="pick an exercise with a chat or shortener workload")
    split = tuple(url.strip() for item in urls or [] for url in item.split(",")
                  if url.strip())
    return ServerTarget(workload, split, command)


def _lab_running(lab: Lab) -> bool:
    state = lab.state()
    return state is not None and any(r.is_alive() for r in state.processes)
