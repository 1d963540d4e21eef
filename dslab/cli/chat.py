"""``dslab chat``: run chat servers, talk to them from a terminal."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Annotated

import typer

from dslab.chat.client import ChatClient, Message
from dslab.cli.context import lab_of
from dslab.cli.output import console, note
from dslab.errors import EnvironmentProblem, UsageError
from dslab.lab import services

# Chat servers listen from here up unless --port says otherwise.
DEFAULT_PORT = 8100
MAX_INSTANCES = 16

app = typer.Typer(
    help="Run the WebSocket chat (several servers sharing Redis Streams) and "
    "talk to it.",
    no_args_is_help=True,
)

RedisOption = Annotated[
    str | None,
    typer.Option("--redis", help="Redis URL (redis://, redis+sentinel://, "
                 "redis+cluster://) [default: the running lab]."),
]


@app.command()
def serve(
    ctx: typer.Context,
    instances: Annotated[
        int, typer.Option("--instances", "-n", help="Server processes, each on "
                          "its own port, all sharing one Redis.")
    ] = 1,
    port: Annotated[
        int | None, typer.Option("--port", help="First port [default: first free "
                                 f"block from {DEFAULT_PORT}].")
    ] = None,
    redis_url: RedisOption = None,
    delivery: Annotated[
        str, typer.Option("--delivery", help="streams (ordered, resumable) or "
                          "pubsub (the naive design: PUBLISH only, loses messages "
                          "when a server or client drops).")
    ] = "streams",
    replicas_ack: Annotated[
        int, typer.Option("--replicas-ack", help="WAIT for N replicas before "
                          "acknowledging a send.")
    ] = 0,
) -> None:
    """Start chat servers as lab services (`chat-1`, `chat-2`, ...).

    Each serves the web UI at / and WebSockets at /ws; `dslab lab status`
    shows them, `dslab chaos kill chat-1` breaks one, `dslab lab down` stops
    them.
    """
    if not 1 <= instances <= MAX_INSTANCES:
        raise UsageError(f"--instances {instances} is outside 1-{MAX_INSTANCES}")
    if delivery not in ("streams", "pubsub"):
        raise UsageError(f"--delivery {delivery!r} is not streams or pubsub")
    if replicas_ack < 0:
        raise UsageError(f"--replicas-ack {replicas_ack} must not be negative")
    lab = lab_of(ctx)
    target = services.redis_target(lab, redis_url)
    args = ["--redis", target.url(with_password=True), "--delivery", delivery,
            "--replicas-ack", str(replicas_ack)]

    for chosen in services.choose_ports(instances, port, DEFAULT_PORT):
        record = services.launch(lab, "chat", "dslab.chat", args, chosen,
                                 name_flag="--name")
        console.print(f"{record.name} serves {record.extra['url']} "
                      f"({delivery}, Redis {target}).")
    console.print("Open one in a browser, or `dslab chat connect --room lobby "
                  "--user ada`.")


@app.command()
def connect(
    ctx: typer.Context,
    room: Annotated[str, typer.Option("--room", "-r", help="Room to join.")],
    user: Annotated[str, typer.Option("--user", "-u", help="Your name.")],
    server: Annotated[
        list[str] | None, typer.Option("--server", help="Chat server URL; "
                                       "repeat for failover [default: the lab's "
                                       "chat servers].")
    ] = None,
    history: Annotated[
        int, typer.Option("--history", help="Recent messages to show on join.")
    ] = 20,
) -> None:
    """A terminal chat client: lines you type are sent, messages are printed.

    It reconnects to another server when one dies and resumes from the last
    message it saw, so nothing is missed or shown twice. Ctrl-D or Ctrl-C
    leaves.
    """
    urls = server or [str(r.extra["url"]) for r in
                      services.running(lab_of(ctx), "chat")]
    if not urls:
        raise EnvironmentProblem(
            "no chat server is running in the lab",
            fix="start some with `dslab chat serve --instances 2`, or pass --server",
        )
    asyncio.run(_converse(urls, room, user, history))


def _show(message: Message) -> None:
    stamp = time.strftime("%H:%M:%S", time.localtime(message.ts / 1000))
    console.print(f"[dim]{stamp}[/] [bold]{message.user}[/]: ", end="")
    console.print(message.text, markup=False, highlight=False, soft_wrap=True)


async def _converse(urls: list[str], room: str, user: str, history: int) -> None:
    async with ChatClient(urls, room, user, history=history,
                          on_message=_show) as client:
        await client.wait_joined()
        note(f"Joined {room!r} as {user!r} via {client.url}. Type and press "
             "Enter; Ctrl-D leaves.")
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            text = line.rstrip("\n")
            if text:
                await client.send(text)
