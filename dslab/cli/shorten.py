"""``dslab shorten``: shorten a URL, run the shortener, inspect links.

``dslab shorten https://example.com`` works as typed: a first argument that
is not a sub-command is the URL to shorten.
"""

from __future__ import annotations

import asyncio
import webbrowser
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from dslab.cli import services
from dslab.cli.http import request
from dslab.cli.output import console, note, print_json
from dslab.errors import DslabError, EnvironmentProblem, UsageError
from dslab.lab.lab import Lab
from dslab.redisconn import async_client
from dslab.settings import RedisTarget
from dslab.shortener.codes import DEFAULT_CODE_LENGTH
from dslab.shortener.server import API_KEY_HEADER
from dslab.shortener.store import LinkStore
from dslab.shortener.validation import validate_alias, validate_url
from dslab.units import parse_duration

# The shortener listens from here up unless --port says otherwise.
DEFAULT_PORT = 8080
SUBCOMMANDS = {"create", "serve", "info", "open", "delete", "bench"}


class ShortenGroup(TyperGroup):
    """Treat `dslab shorten URL ...` as `dslab shorten create URL ...`."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["create", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=ShortenGroup,
    help="Shorten URLs (`dslab shorten https://...`), run the shortener, "
    "inspect and delete links.",
    no_args_is_help=True,
)

RedisOption = Annotated[
    str | None,
    typer.Option("--redis", help="Redis URL (redis://, redis+sentinel://, "
                 "redis+cluster://) [default: the running lab]."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _lab(ctx: typer.Context) -> Lab:
    return Lab(ctx.obj.lab_settings())


def _server_url(lab: Lab, server: str | None) -> str | None:
    if server:
        return server.rstrip("/")
    found = services.running(lab, "shortener")
    return str(found[0].extra["url"]) if found else None


@app.command()
def create(
    ctx: typer.Context,
    url: Annotated[str, typer.Argument(help="The long URL (http or https).")],
    alias: Annotated[str | None, typer.Option("--alias", help="Your own code.")] = None,
    ttl: Annotated[
        str | None, typer.Option("--ttl", help="Lifetime, e.g. 10m, 7d.")
    ] = None,
    max_visits: Annotated[
        int | None, typer.Option("--max-visits", help="Stop after N redirects.")
    ] = None,
    reuse: Annotated[
        bool, typer.Option("--reuse", help="Return the existing code for this URL.")
    ] = False,
    server: Annotated[
        str | None, typer.Option("--server", help="Shortener base URL "
                                 "[default: the lab's shortener, if one runs].")
    ] = None,
    redis_url: RedisOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a short link and print it.

    Through a running shortener when there is one (the lab's, or --server);
    otherwise straight into Redis, which the output says.
    """
    ttl_s = int(parse_duration(ttl, what="--ttl")) if ttl else None
    lab = _lab(ctx)
    base = None if redis_url else _server_url(lab, server)
    if base is not None:
        body: dict[str, Any] = {"url": url, "alias": alias, "ttl_s": ttl_s,
                                "max_visits": max_visits, "reuse": reuse}
        status, answer, _ = request(
            "POST", f"{base}/api/links",
            {key: value for key, value in body.items() if value is not None},
        )
        _raise_for(status, answer)
        via = f"shortener at {base}"
    else:
        target = services.redis_target(lab, redis_url)
        answer = asyncio.run(_create_in_redis(target, url, alias, ttl_s,
                                              max_visits, reuse))
        via = f"Redis directly at {target} (no shortener is running)"

    if as_json:
        print_json({**answer, "via": via})
        return
    note(f"Created via {via}.")
    console.print(answer.get("short_url") or answer["code"], soft_wrap=True)


async def _create_in_redis(
    target: RedisTarget, url: str, alias: str | None, ttl_s: int | None,
    max_visits: int | None, reuse: bool,
) -> dict[str, Any]:
    clean = validate_url(url, own_hosts=(), blocklist=())
    client = async_client(target)
    try:
        store = LinkStore(client, code_length=DEFAULT_CODE_LENGTH)
        created = await store.create(
            clean, alias=validate_alias(alias) if alias else None,
            ttl_s=ttl_s, max_visits=max_visits, reuse=reuse,
        )
    finally:
        await client.aclose()
    link = created.link
    return {"code": link.code, "url": link.url, "short_url": None,
            "expires_ms": link.expires_ms, "reused": created.reused}


@app.command()
def serve(
    ctx: typer.Context,
    port: Annotated[
        int | None, typer.Option("--port", help="Port [default: first free from "
                                 f"{DEFAULT_PORT}].")
    ] = None,
    workers: Annotated[
        int, typer.Option("--workers", "-w", help="Worker processes sharing the "
                          "port (SO_REUSEPORT).")
    ] = 1,
    redis_url: RedisOption = None,
    redirect_status: Annotated[
        int, typer.Option("--redirect-status", help="301, 302, 307 or 308.")
    ] = 302,
    code_length: Annotated[
        int, typer.Option("--code-length", help="Characters in a random code.")
    ] = DEFAULT_CODE_LENGTH,
    no_reserve: Annotated[
        bool, typer.Option("--no-reserve", help="Naive mode: a colliding code "
                           "overwrites the older link (to watch links get lost).")
    ] = False,
    api_key: Annotated[
        str | None, typer.Option("--api-key", envvar="DSLAB_SHORTENER_API_KEY",
                                 help="Key required to delete links.")
    ] = None,
    allow_private_targets: Annotated[
        bool, typer.Option("--allow-private-targets", help="Accept loopback and "
                           "private hosts as link targets.")
    ] = False,
    foreground: Annotated[
        bool, typer.Option("--foreground", help="Run in this terminal instead of "
                           "as a lab service; Ctrl-C stops it.")
    ] = False,
) -> None:
    """Run the URL shortener (web page at /, API under /api/links).

    By default it runs detached as a lab service (`shortener-1`), shown by
    `dslab lab status` and stopped by `dslab lab down`.
    """
    lab = _lab(ctx)
    target = services.redis_target(lab, redis_url)
    args = ["--redis", target.url(with_password=True), "--workers", str(workers),
            "--redirect-status", str(redirect_status),
            "--code-length", str(code_length)]
    args += ["--no-reserve"] if no_reserve else []
    args += ["--api-key", api_key] if api_key else []
    args += ["--allow-private-targets"] if allow_private_targets else []
    [chosen] = services.choose_ports(1, port, DEFAULT_PORT)

    if foreground:
        from dslab.shortener.serve import main as serve_main

        raise typer.Exit(serve_main(["--port", str(chosen), *args]))
    record = services.launch(lab, "shortener", "dslab.shortener", args, chosen)
    console.print(f"{record.name} serves {record.extra['url']} "
                  f"({workers} worker{'s' if workers != 1 else ''}, Redis {target}).")
    console.print(f"Open {record.extra['url']}/ in a browser; stop it with "
                  "`dslab lab down`.")


@app.command()
def info(
    ctx: typer.Context,
    code: Annotated[str, typer.Argument(help="The short code.")],
    server: Annotated[str | None, typer.Option("--server")] = None,
    as_json: JsonOption = False,
) -> None:
    """Show a link's target, creation, expiry and visits."""
    base = _require_server(ctx, server)
    status, answer, _ = request("GET", f"{base}/api/links/{code}")
    _raise_for(status, answer)
    if as_json:
        print_json(answer)
        return
    for key in ("code", "url", "short_url", "created_at", "expires_at", "visits",
                "unique_visitors", "max_visits"):
        if answer.get(key) is not None:
            console.print(f"{key:>16}  {answer[key]}", soft_wrap=True)


@app.command("open")
def open_link(
    ctx: typer.Context,
    code: Annotated[str, typer.Argument(help="The short code.")],
    server: Annotated[str | None, typer.Option("--server")] = None,
    browser: Annotated[
        bool, typer.Option("--browser", help="Also open the target in a browser.")
    ] = False,
) -> None:
    """Follow a short link once (counts as a visit) and print where it goes."""
    base = _require_server(ctx, server)
    status, answer, headers = request("GET", f"{base}/{code}",
                                      follow_redirects=False)
    if status not in (301, 302, 307, 308):
        _raise_for(status, answer)
    location = headers.get("Location", "")
    console.print(f"{status} -> {location}", soft_wrap=True)
    if browser:
        webbrowser.open(location)


@app.command()
def delete(
    ctx: typer.Context,
    code: Annotated[str, typer.Argument(help="The short code.")],
    server: Annotated[str | None, typer.Option("--server")] = None,
    api_key: Annotated[
        str | None, typer.Option("--api-key", envvar="DSLAB_SHORTENER_API_KEY")
    ] = None,
) -> None:
    """Delete a link; every shortener process forgets it at once."""
    base = _require_server(ctx, server)
    headers = {API_KEY_HEADER: api_key} if api_key else {}
    status, answer, _ = request("DELETE", f"{base}/api/links/{code}",
                                headers=headers)
    _raise_for(status, answer)
    console.print(f"Deleted {code}.")


def _require_server(ctx: typer.Context, server: str | None) -> str:
    base = _server_url(_lab(ctx), server)
    if base is None:
        raise EnvironmentProblem(
            "no shortener is running in the lab",
            fix="start one with `dslab shorten serve`, or pass --server URL",
        )
    return base


def _raise_for(status: int, answer: dict[str, Any]) -> None:
    """Turn an error answer of the shortener into the matching dslab error."""
    if status < 400:
        return
    message = (f"the shortener answered {status} {answer.get('error', '')}: "
               f"{answer.get('detail', answer)}")
    fix = answer.get("fix")
    if status in (400, 404, 409, 410):
        raise UsageError(message, fix=str(fix) if fix else None)
    raise DslabError(message, fix=str(fix) if fix else None)
