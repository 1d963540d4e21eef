"""Command groups of the design that are not built yet.

They are listed in ``dslab --help`` so the whole surface is visible, and each
says plainly that it is not available yet (exit 3) instead of pretending.
"""

from __future__ import annotations

from collections.abc import Callable

import typer

from dslab.errors import NotAvailable

PLANNED = {
    "chat": "Run the WebSocket chat, connect to it, benchmark it.",
    "shorten": "Shorten URLs, run the shortener, benchmark its redirects.",
    "chaos": "Kill, pause, partition and slow parts of the lab; heal them.",
    "report": "Latency tables, SLO verdicts and HTML reports from run files.",
    "exercise": "The define / implement / break exercises.",
}


def _not_yet(group: str) -> Callable[[typer.Context], None]:
    def unavailable(ctx: typer.Context) -> None:
        raise NotAvailable(
            f"`dslab {group}` is not available yet in this version of dslab",
            fix="see `dslab --help` for what works today: `dslab doctor` and "
            "`dslab lab ...` are ready",
        )

    unavailable.__doc__ = f"{PLANNED[group]} (not yet available)"
    return unavailable


def register(app: typer.Typer, only: list[str] | None = None) -> None:
    for group in only or list(PLANNED):
        app.command(
            group,
            context_settings={"allow_extra_args": True,
                              "ignore_unknown_options": True},
        )(_not_yet(group))
