"""One logging setup for every dslab command and server.

Loggers live under ``dslab.`` (``dslab.lab.supervisor``). Commands are quiet
by default: warnings and errors only; ``-v`` shows lifecycle events (INFO),
``-vv`` everything (DEBUG). Nothing is logged per message or per request above
DEBUG. Lifecycle lines have one fixed, greppable form, for example
``node started: redis-1 pid=123 port=7000``.
"""

from __future__ import annotations

import logging

from rich.console import Console
from rich.logging import RichHandler

LOGGER_ROOT = "dslab"


def level_for(verbosity: int) -> int:
    if verbosity >= 2:
        return logging.DEBUG
    if verbosity == 1:
        return logging.INFO
    return logging.WARNING


def setup_logging(verbosity: int = 0, *, console: Console | None = None) -> None:
    """Send ``dslab.*`` records to stderr through rich; safe to call twice."""
    root = logging.getLogger(LOGGER_ROOT)
    root.setLevel(level_for(verbosity))
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = RichHandler(
        console=console or Console(stderr=True),
        show_path=False,
        rich_tracebacks=verbosity >= 2,
        markup=False,
    )
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    root.addHandler(handler)
    root.propagate = False


def setup_server_logging(verbosity: int = 1) -> None:
    """Plain one-line records for detached servers whose stderr is a log file."""
    root = logging.getLogger(LOGGER_ROOT)
    root.setLevel(level_for(verbosity))
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root.addHandler(handler)
    root.propagate = False
