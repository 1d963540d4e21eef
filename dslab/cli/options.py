"""Options that several command groups share, spelled and explained once."""

from __future__ import annotations

from typing import Annotated

import typer

JsonOption = Annotated[
    bool, typer.Option("--json", help="Print one JSON document instead of text.")
]
RedisOption = Annotated[
    str | None,
    typer.Option("--redis", help="Redis URL (redis://, redis+sentinel://, "
                 "redis+cluster://) [default: the running lab]."),
]
