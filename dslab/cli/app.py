"""The ``dslab`` command: one Typer app, one sub-app per command group.

Command modules are thin: they parse options, call into the library and
render the result. Errors are caught once, here: a ``DslabError`` prints
``Error: ...`` (with its fix) on stderr and exits with its documented code.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from dslab import __version__
from dslab.cli import chaos, chat, demo, doctor, exercise, lab, report, shorten
from dslab.cli.context import CliContext
from dslab.cli.output import err_console
from dslab.errors import DslabError
from dslab.logs import setup_logging

HELP = """\
dslab: a lab for learning distributed systems on Redis.

Define a constraint, implement a system that meets it, then break it on
purpose and measure what happens. Start with `dslab doctor`, then
`dslab lab up`.

Exit codes: 0 success; 1 a check or SLO failed; 2 usage error;
3 this machine or the lab cannot do it (the message says why and how to fix
it); 130 interrupted (after cleaning up).
"""

app = typer.Typer(
    help=HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dslab {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    verbose: Annotated[
        int,
        typer.Option("--verbose", "-v", count=True,
                     help="Show lifecycle events (-v) or everything (-vv)."),
    ] = 0,
    home: Annotated[
        Path | None,
        typer.Option("--home", envvar="DSLAB_HOME", show_envvar=True,
                     help="Folder holding the lab's state [default: ./.dslab]."),
    ] = None,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True,
                     help="Print the version and exit."),
    ] = False,
) -> None:
    setup_logging(verbose)
    ctx.obj = CliContext(home=home, verbosity=verbose)


app.add_typer(lab.app, name="lab")
app.add_typer(chat.app, name="chat")
app.add_typer(shorten.app, name="shorten")
app.add_typer(report.app, name="report")
app.add_typer(chaos.app, name="chaos")
app.command("doctor")(doctor.doctor)
app.command("demo")(demo.demo)
app.add_typer(exercise.app, name="exercise")


def main() -> None:
    """Entry point of the console script; maps every outcome to an exit code.

    Typer itself exits 2 on usage errors and 130 on Ctrl-C (after the
    command's own cleanup ran); dslab's errors are reported here.
    """
    try:
        app()
    except DslabError as exc:
        err_console.print(f"Error: {exc}", markup=False, soft_wrap=True)
        sys.exit(exc.exit_code)
