"""The shortener's HTTP service: one aiohttp application per worker process.

Routes::

    GET    /                            the web page (form, copy button, QR code)
    GET    /static/{app.js,style.css}   its script and style
    POST   /api/links                   {url, alias?, ttl_s?, max_visits?, reuse?}
    GET    /api/links/{code}            target, created, expiry, visits
    DELETE /api/links/{code}            X-API-Key when one is configured
    GET    /api/links/{code}/qr.svg     QR code of the short URL
    GET    /healthz                     liveness and whether Redis answers
    GET    /metrics                     Prometheus text format
    GET    /{code}                      the redirect

Guarantees: every refusal is JSON ``{"error", "detail", "fix"}`` with its
status (400/401/404/409/410/429/503); Redis trouble is a 503 with
``Retry-After`` within ``op_timeout_s``, never a hang or a 500; a redirect of
a code in the near cache needs no Redis at all; visits are counted in memory
and flushed in batches (``visits.py``).
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from typing import Any, TypeVar

import segno
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from yarl import URL

from dslab.settings import LOOPBACK_HOST
from dslab.shortener.cache import (
    DEFAULT_MAX_AGE_S,
    DEFAULT_MAX_ENTRIES,
    Invalidator,
    NearCache,
)
from dslab.shortener.codes import DEFAULT_CODE_LENGTH, is_code_shaped
from dslab.shortener.errors import (
    InvalidRequest,
    LinkGone,
    LinkNotFound,
    ShortenerRefusal,
    ShortenerUnavailable,
    StoreUnavailable,
    TooManyRequests,
    Unauthorized,
)
from dslab.shortener.limits import TokenBuckets
from dslab.shortener.store import (
    DEFAULT_CODE_POOL,
    DEFAULT_OP_TIMEOUT_S,
    Link,
    LinkStore,
    now_ms,
)
from dslab.shortener.validation import (
    DEFAULT_MAX_URL_LENGTH,
    validate_alias,
    validate_url,
)
from dslab.shortener.visits import FLUSH_INTERVAL_S, VisitCounter

log = logging.getLogger(__name__)

REDIRECT_STATUSES = (301, 302, 307, 308)
MAX_BODY_BYTES = 16 * 1024  # a create request is a URL and four small fields
API_KEY_HEADER = "X-API-Key"
# Buckets in seconds around the targets: p99 10 ms redirects, 1 ms codes.
LATENCY_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5,
)
# Finer below a millisecond: the question is whether code generation stays
# under 1 ms, and a Redis round trip on loopback is about 0.1 ms.
CODE_BUCKETS_S = (
    0.00001, 0.00002, 0.00005, 0.0001, 0.00015, 0.0002, 0.0003, 0.0005,
    0.00075, 0.001, 0.002, 0.005, 0.01, 0.1, 1.0,
)
WEB_FILES = {
    "app.js": "application/javascript",
    "style.css": "text/css",
}
PAGE_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; "
        "img-src 'self'; connect-src 'self'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@dataclass(frozen=True)
class ShortenerConfig:
    """Everything a worker needs besides the Redis client."""

    # Base of every short URL (http://sho.rt); None: the address listened on.
    public_url: str | None = None
    redirect_status: int = 302
    code_length: int = DEFAULT_CODE_LENGTH
    reserve: bool = True  # False: the naive overwrite-on-collision mode
    # Codes each worker reserves ahead (store.CodePool); 0: reserve per create.
    code_pool: int = DEFAULT_CODE_POOL
    # Replicas that must confirm a creation (WAIT) for it to count as durable.
    replicas_ack: int = 0
    api_key: str | None = None
    create_requires_key: bool = False
    own_hosts: tuple[str, ...] = ()
    blocklist: tuple[str, ...] = ()
    max_url_length: int = DEFAULT_MAX_URL_LENGTH
    allow_private_targets: bool = False
    create_per_minute: float = 600.0  # per client and worker; 0 disables
    not_found_per_minute: float = 600.0  # 404s per client and worker; 0 disables
    cache_max_entries: int = DEFAULT_MAX_ENTRIES
    cache_max_age_s: float = DEFAULT_MAX_AGE_S
    visit_flush_s: float = FLUSH_INTERVAL_S
    op_timeout_s: float = DEFAULT_OP_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.redirect_status not in REDIRECT_STATUSES:
            raise InvalidRequest(
                f"redirect status {self.redirect_status} is not a redirect",
                fix="use 301, 302, 307 or 308",
            )


class Metrics:
    """Prometheus metrics of one worker, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "dslab_shortener_requests", "HTTP requests by route and status",
            ["route", "status"], registry=self.registry,
        )
        self.redirect_seconds = Histogram(
            "dslab_shortener_redirect_seconds", "Time to answer a redirect",
            buckets=LATENCY_BUCKETS_S, registry=self.registry,
        )
        self.create_seconds = Histogram(
            "dslab_shortener_create_seconds", "Time to create a link",
            buckets=LATENCY_BUCKETS_S, registry=self.registry,
        )
        self.code_seconds = Histogram(
            "dslab_shortener_code_seconds",
            "Time a create waits for a code reserved in Redis: a take from "
            "the code pool, or drawing and reserving one (SET NX) with "
            "collisions and retries",
            buckets=CODE_BUCKETS_S, registry=self.registry,
        )
        self.code_refill_seconds = Histogram(
            "dslab_shortener_code_refill_seconds",
            "Time of one code-pool refill (SET NX of every drawn code in one "
            "call), off the create's path",
            buckets=LATENCY_BUCKETS_S, registry=self.registry,
        )
        self.codes_reserved = Counter(
            "dslab_shortener_codes_reserved",
            "Codes reserved ahead by the code pool", registry=self.registry,
        )
        self.cache = Counter(
            "dslab_shortener_near_cache", "Near cache lookups by result",
            ["result"], registry=self.registry,
        )
        self.cache_hits = self.cache.labels("hit")
        self.cache_misses = self.cache.labels("miss")
        self.cache_stale_served = self.cache.labels("stale_served")


@dataclass
class Shortener:
    """The parts one worker owns; attached to the aiohttp app."""

    config: ShortenerConfig
    store: LinkStore
    near_cache: NearCache
    invalidator: Invalidator
    visits: VisitCounter
    creates: TokenBuckets
    not_found: TokenBuckets
    metrics: Metrics = field(default_factory=Metrics)
    public_url: str = "http://127.0.0.1"  # set from config or the bound address

    def short_url(self, code: str) -> str:
        return f"{self.public_url.rstrip('/')}/{code}"

    def own_hosts(self) -> tuple[str, ...]:
        """Hosts a long URL may not point at: ours, so links cannot loop."""
        host = URL(self.public_url).host
        return (*self.config.own_hosts, host) if host else self.config.own_hosts


SHORTENER: web.AppKey[Shortener] = web.AppKey("shortener", Shortener)


def build_app(
    config: ShortenerConfig, client: Any, *, close_client: bool = False
) -> web.Application:
    """The aiohttp app for one worker; ``client`` is a redis-py asyncio client."""
    near_cache = NearCache(config.cache_max_entries, config.cache_max_age_s)
    metrics = Metrics()

    def refilled(seconds: float, codes: int) -> None:
        metrics.code_refill_seconds.observe(seconds)
        metrics.codes_reserved.inc(codes)

    shortener = Shortener(
        config=config,
        store=LinkStore(
            client, code_length=config.code_length, reserve=config.reserve,
            op_timeout_s=config.op_timeout_s, replicas_ack=config.replicas_ack,
            code_pool=config.code_pool, on_refill=refilled,
        ),
        metrics=metrics,
        near_cache=near_cache,
        invalidator=Invalidator(client, near_cache),
        visits=VisitCounter(
            client, interval_s=config.visit_flush_s,
            op_timeout_s=config.op_timeout_s,
        ),
        creates=TokenBuckets(config.create_per_minute),
        not_found=TokenBuckets(config.not_found_per_minute),
    )
    app = web.Application(
        client_max_size=MAX_BODY_BYTES,
        middlewares=[_count_requests, _json_errors],
    )
    app[SHORTENER] = shortener
    app.router.add_get("/", _page, name="page")
    app.router.add_get("/static/{name}", _static, name="static")
    app.router.add_get("/healthz", _healthz, name="healthz")
    app.router.add_get("/metrics", _metrics, name="metrics")
    app.router.add_post("/api/links", _create, name="create")
    app.router.add_get("/api/links/{code}", _info, name="info")
    app.router.add_delete("/api/links/{code}", _delete, name="delete")
    app.router.add_get("/api/links/{code}/qr.svg", _qr, name="qr")
    app.router.add_get("/{code}", _redirect, name="redirect")
    if config.public_url:
        shortener.public_url = config.public_url
    app.cleanup_ctx.append(_background(shortener, client, close_client))
    return app


@dataclass
class RunningServer:
    """A started worker: ``url`` is where it listens."""

    url: str
    app: web.Application
    runner: web.AppRunner

    @property
    def shortener(self) -> Shortener:
        return self.app[SHORTENER]

    async def close(self) -> None:
        """Stop listening, stop the background tasks, flush the visits."""
        await self.runner.cleanup()


async def start_server(
    config: ShortenerConfig,
    client: Any,
    *,
    host: str = LOOPBACK_HOST,
    port: int = 0,
    reuse_port: bool = False,
    close_client: bool = False,
) -> RunningServer:
    """Build the app, listen on ``host:port`` (0: any free port) and return."""
    app = build_app(config, client, close_client=close_client)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None)
        await site.start()
        bound_port = _bound_port(runner, port)
    except BaseException:
        await runner.cleanup()
        raise

    url = f"http://{host}:{bound_port}"
    if not config.public_url:
        app[SHORTENER].public_url = url
    return RunningServer(url, app, runner)


def _bound_port(runner: web.AppRunner, asked: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return asked


def _background(
    shortener: Shortener, client: Any, close_client: bool
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def run(app: web.Application) -> AsyncIterator[None]:
        tasks = [
            asyncio.create_task(shortener.invalidator.run(), name="invalidator"),
            asyncio.create_task(shortener.visits.run(), name="visit-flusher"),
        ]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await shortener.visits.close()
            await shortener.store.close()
            if close_client:
                await client.aclose()

    return run


# -- middlewares -------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics = request.app[SHORTENER].metrics
    route = request.match_info.route.name or "other"
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        metrics.requests.labels(route, str(exc.status)).inc()
        raise
    metrics.requests.labels(route, str(response.status)).inc()
    return response


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every refusal into the JSON error body, at one place."""
    try:
        return await handler(request)
    except ShortenerRefusal as exc:
        retry = exc.retry_after_s if isinstance(exc, TooManyRequests) else None
        return _error(exc.status, exc.reason, exc.message, exc.fix, retry)
    except ShortenerUnavailable as exc:
        return _error(exc.status, exc.reason, exc.message, exc.fix, exc.retry_after_s)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason)
    except Exception:
        # A bug, not a refusal: keep the traceback, still answer in JSON.
        log.exception("shortener request failed: %s %s", request.method,
                      request.path)
        return _error(500, "internal_error", "the shortener failed on this request")


def _error(
    status: int,
    reason: str,
    detail: str,
    fix: str | None = None,
    retry_after_s: int | None = None,
) -> web.Response:
    body: dict[str, str] = {"error": reason, "detail": detail}
    if fix:
        body["fix"] = fix
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s else None
    return web.json_response(body, status=status, headers=headers)


# -- the redirect ------------------------------------------------------------


async def _redirect(request: web.Request) -> web.StreamResponse:
    began = time.perf_counter()
    shortener = request.app[SHORTENER]
    code = request.match_info["code"]
    client = request.remote or "unknown"

    wait_s = shortener.not_found.blocked_for_s(client)
    if wait_s:
        raise TooManyRequests(
            "too many unknown codes from this client", retry_after_s=wait_s
        )
    target, expires_ms = await _resolve(shortener, code, client)

    shortener.visits.record(code, client, expires_ms)
    response = web.Response(
        status=shortener.config.redirect_status, headers={"Location": target}
    )
    shortener.metrics.redirect_seconds.observe(time.perf_counter() - began)
    return response


async def _resolve(
    shortener: Shortener, code: str, client: str
) -> tuple[str, int | None]:
    """The target of ``code``: near cache first, then one Redis GET."""
    metrics = shortener.metrics
    cached = shortener.near_cache.get(code)
    if cached is not None and shortener.near_cache.is_fresh(cached):
        metrics.cache_hits.inc()
        return cached.url, cached.expires_ms
    metrics.cache_misses.inc()

    if not is_code_shaped(code):
        shortener.not_found.take(client)
        raise LinkNotFound(f"no short link {code!r}")
    epoch = shortener.near_cache.epoch
    try:
        link = await shortener.store.get(code)
    except StoreUnavailable:
        if cached is None:
            raise
        metrics.cache_stale_served.inc()  # older than max age, Redis is away
        return cached.url, cached.expires_ms

    if link is None or link.expired(now_ms()):
        shortener.near_cache.invalidate(code)  # a stale entry may still be there
    if link is None:
        shortener.not_found.take(client)
        raise LinkNotFound(f"no short link {code!r}")
    _refuse_unusable(link)
    if link.max_visits is not None:
        uses = await shortener.store.use(link)
        if uses > link.max_visits:
            raise LinkGone(f"short link {code!r} reached its {link.max_visits} visits")
    shortener.near_cache.put(link, epoch=epoch)
    return link.url, link.expires_ms


def _refuse_unusable(link: Link) -> None:
    if link.expired(now_ms()):
        raise LinkGone(f"short link {link.code!r} expired at "
                       f"{_iso(link.expires_ms)}")


# -- the API -----------------------------------------------------------------


async def _create(request: web.Request) -> web.Response:
    began = time.perf_counter()
    shortener = request.app[SHORTENER]
    config = shortener.config
    if config.create_requires_key:
        _require_key(request, config.api_key)
    wait_s = shortener.creates.take(request.remote or "unknown")
    if wait_s:
        raise TooManyRequests("too many links created by this client",
                              retry_after_s=wait_s)

    body = await _json_body(request)
    url = validate_url(
        _field(body, "url", str, required=True) or "",
        own_hosts=shortener.own_hosts(),
        blocklist=config.blocklist,
        max_length=config.max_url_length,
        allow_private=config.allow_private_targets,
    )
    alias = _field(body, "alias", str)
    created = await shortener.store.create(
        url,
        alias=validate_alias(alias) if alias is not None else None,
        ttl_s=_field(body, "ttl_s", int),
        max_visits=_field(body, "max_visits", int),
        reuse=bool(_field(body, "reuse", bool)),
    )

    link = created.link
    shortener.metrics.create_seconds.observe(time.perf_counter() - began)
    if created.attempts:
        shortener.metrics.code_seconds.observe(created.code_s)
    return web.json_response(
        {
            "code": link.code,
            "short_url": shortener.short_url(link.code),
            "url": link.url,
            "expires_at": _iso(link.expires_ms),
            "max_visits": link.max_visits,
            "reused": created.reused,
            **_replica_fields(config.replicas_ack, created.replicas),
        },
        status=200 if created.reused else 201,
    )


def _replica_fields(asked: int, confirmed: int | None) -> dict[str, Any]:
    """How many replicas confirmed a creation: with ``replicas_met`` false the
    link exists on the primary but may not survive its failover."""
    if not asked or confirmed is None:
        return {}
    return {"replicas": confirmed, "replicas_met": confirmed >= asked}


async def _info(request: web.Request) -> web.Response:
    shortener = request.app[SHORTENER]
    code = request.match_info["code"]
    info = await shortener.store.info(code) if is_code_shaped(code) else None
    if info is None:
        raise LinkNotFound(f"no short link {code!r}")

    link = info.link
    return web.json_response(
        {
            "code": code,
            "url": link.url,
            "short_url": shortener.short_url(code),
            "created_at": _iso(link.created_ms),
            "expires_at": _iso(link.expires_ms),
            "expired": link.expired(now_ms()),
            "max_visits": link.max_visits,
            "uses": info.uses,
            "visits": info.visits,
            "unique_visitors": info.unique_visitors,
        }
    )


async def _delete(request: web.Request) -> web.Response:
    shortener = request.app[SHORTENER]
    _require_key(request, shortener.config.api_key)
    code = request.match_info["code"]
    found = await shortener.store.delete(code) if is_code_shaped(code) else False
    # This worker forgets at once; the others hear it on the channel.
    shortener.near_cache.invalidate(code)
    if not found:
        raise LinkNotFound(f"no short link {code!r}")
    return web.Response(status=204)


async def _qr(request: web.Request) -> web.Response:
    shortener = request.app[SHORTENER]
    code = request.match_info["code"]
    link = await shortener.store.get(code) if is_code_shaped(code) else None
    if link is None:
        raise LinkNotFound(f"no short link {code!r}")

    buffer = io.BytesIO()
    segno.make(shortener.short_url(code), error="m").save(
        buffer, kind="svg", scale=4, border=2
    )
    return web.Response(
        body=buffer.getvalue(),
        content_type="image/svg+xml",
        headers={"Content-Security-Policy": "default-src 'none'",
                 "Cache-Control": "no-cache"},
    )


# -- page, health, metrics ---------------------------------------------------


async def _page(request: web.Request) -> web.Response:
    return web.Response(
        text=_web_file("index.html"), content_type="text/html",
        headers=PAGE_SECURITY_HEADERS,
    )


async def _static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in WEB_FILES:
        raise web.HTTPNotFound()
    return web.Response(text=_web_file(name), content_type=WEB_FILES[name],
                        headers={"X-Content-Type-Options": "nosniff"})


async def _healthz(request: web.Request) -> web.Response:
    shortener = request.app[SHORTENER]
    redis_up = await shortener.store.ping()
    return web.json_response(
        {
            "status": "ok",
            "redis": "up" if redis_up else "down",
            "invalidation": (
                "subscribed" if shortener.invalidator.subscribed.is_set()
                else "reconnecting"
            ),
            "near_cache_entries": len(shortener.near_cache),
            "pending_visits": shortener.visits.pending_visits,
        }
    )


async def _metrics(request: web.Request) -> web.Response:
    registry = request.app[SHORTENER].metrics.registry
    response = web.Response(body=generate_latest(registry))
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


# -- helpers -----------------------------------------------------------------


def _require_key(request: web.Request, api_key: str | None) -> None:
    if api_key is None:
        return
    given = request.headers.get(API_KEY_HEADER, "")
    if not hmac.compare_digest(given.encode(), api_key.encode()):
        raise Unauthorized(
            f"missing or wrong {API_KEY_HEADER} header",
            fix=f"send the server's API key in {API_KEY_HEADER}",
        )


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json(loads=json.loads)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest(
            "the request body is not JSON",
            fix='send {"url": "https://..."} with Content-Type: application/json',
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body


T = TypeVar("T")


def _field(
    body: dict[str, Any], name: str, kind: type[T], *, required: bool = False
) -> T | None:
    value = body.get(name)
    if value is None:
        if required:
            raise InvalidRequest(f"field {name!r} is missing")
        return None
    # bool is an int in Python; a JSON true must not pass as a TTL.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidRequest(
            f"field {name!r} must be a {kind.__name__}, got {type(value).__name__}"
        )
    return value


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="seconds")


_WEB_CACHE: dict[str, str] = {}


def _web_file(name: str) -> str:
    if name not in _WEB_CACHE:
        package = resources.files("dslab.shortener") / "web" / name
        _WEB_CACHE[name] = package.read_text(encoding="utf-8")
    return _WEB_CACHE[name]
