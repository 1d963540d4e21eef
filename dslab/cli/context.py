"""What every command receives from the root callback: global options, and
the one way to get the lab (so that `lab down` always heals faults first)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import typer

from dslab.chaos.heal import heal_all
from dslab.lab.lab import Lab
from dslab.settings import LabSettings


@dataclass
class CliContext:
    home: Path | None
    verbosity: int

    def lab_settings(self, redis_server: str | None = None) -> LabSettings:
        return LabSettings.build(home=self.home, redis_server=redis_server)

    def lab(self, redis_server: str | None = None) -> Lab:
        """The lab as commands see it: `lab down` heals every journaled fault."""
        return Lab(self.lab_settings(redis_server), heal_faults=_heal_faults)


def _heal_faults(home: Path) -> list[str]:
    return [result.fault.describe() for result in heal_all(home)]


def lab_of(ctx: typer.Context, redis_server: str | None = None) -> Lab:
    """The lab of the command being run."""
    obj: CliContext = ctx.obj
    return obj.lab(redis_server)
