"""``dslab doctor``: what this machine can do, with a fix for each gap."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

import typer
from rich.table import Table

from dslab.cli.output import console, print_json
from dslab.errors import EXIT_ENVIRONMENT
from dslab.lab.doctor import run_checks


def doctor(
    redis_server: Annotated[
        str | None,
        typer.Option("--redis-server", envvar="DSLAB_REDIS_SERVER",
                     show_envvar=True, help="redis-server binary to check."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Check the Redis binary, root, namespaces, nftables, tc netem, chromium.

    Exits 0 when a usable Redis exists, even if optional features are
    missing; exits 3 when there is no usable redis-server.
    """
    checks = run_checks(redis_server)
    usable = all(check.ok for check in checks if check.required)
    if as_json:
        print_json({"usable": usable, "checks": [asdict(c) for c in checks]})
    else:
        table = Table(title="What this machine can do for dslab", title_justify="left")
        for column in ("", "item", "found", "fix"):
            table.add_column(column)
        for check in checks:
            mark = "[green]yes[/]" if check.ok else (
                "[red]NO[/]" if check.required else "[yellow]no[/]")
            table.add_row(mark, check.name, check.detail, check.fix)
        console.print(table)
        if not usable:
            console.print("[red]No usable redis-server: the lab cannot start.[/]")
    if not usable:
        raise typer.Exit(EXIT_ENVIRONMENT)
