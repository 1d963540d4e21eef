"""How commands talk to the person at the terminal (and to scripts).

Tables and messages go to stdout through one rich ``Console``; errors and logs
go to stderr. ``--json`` prints a single JSON document on stdout and nothing
else there, so ``dslab lab status --json | jq`` always works.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def print_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")
    sys.stdout.flush()


def note(message: str) -> None:
    """A line of progress for a person; kept off stdout for --json users."""
    err_console.print(message)
