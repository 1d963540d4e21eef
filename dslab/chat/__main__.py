"""Run one chat server process: ``python -m dslab.chat --port N --redis URL``.

Logs ``chat ready: http://HOST:PORT`` on stderr once it accepts connections
(the line supervisors wait for) and stops cleanly on SIGTERM or Ctrl-C.
Binds to 127.0.0.1 unless told otherwise. Runs on uvloop: its transports
write in C, which is most of a server's work when fanning out to hundreds of
sockets.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from pathlib import Path

import uvloop

from dslab.chat import tokens
from dslab.chat.fanout import Delivery
from dslab.chat.server import ChatConfig, start_server
from dslab.errors import DslabError
from dslab.logs import setup_server_logging
from dslab.settings import LOOPBACK_HOST, RedisTarget

log = logging.getLogger("dslab.chat.server")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dslab.chat",
                                     description="Run one dslab chat server.")
    parser.add_argument("--host", default=LOOPBACK_HOST)
    parser.add_argument("--port", type=int, default=8080,
                        help="0 picks a free port (printed in the ready line)")
    parser.add_argument("--redis", required=True, help="redis://, redis+sentinel:// "
                        "or redis+cluster:// URL")
    parser.add_argument("--delivery", choices=[d.value for d in Delivery],
                        default=Delivery.STREAMS.value)
    parser.add_argument("--replicas-ack", type=int, default=0, metavar="N",
                        help="WAIT for N replicas before acknowledging a send")
    parser.add_argument("--name", default="chat")
    parser.add_argument("--secret-file", type=Path, default=None,
                        help="the lab's shared secret for identity tokens "
                        "(made if missing); without it, joins are trusted")
    parser.add_argument("-v", "--verbose", action="count", default=1)
    return parser.parse_args(argv)


async def serve(config: ChatConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    running = await start_server(config)
    # Modules and the app live as long as the process: a full garbage
    # collection need not walk them, which keeps its pauses off deliveries.
    gc.freeze()
    log.info("chat ready: %s", running.url)
    try:
        await stop.wait()
    finally:
        log.info("chat stopping: %s", config.name)
        await running.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_server_logging(args.verbose)
    try:
        config = ChatConfig(
            redis=RedisTarget.parse(args.redis), host=args.host, port=args.port,
            delivery=Delivery(args.delivery), replicas_ack=args.replicas_ack,
            name=args.name,
            secret=(tokens.load_or_create_secret(args.secret_file)
                    if args.secret_file else None),
        )
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(config))
    except DslabError as error:
        print(f"Error: {error}", file=sys.stderr)
        return error.exit_code
    except OSError as error:
        print(f"Error: cannot listen on {args.host}:{args.port}: {error}",
              file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
