"""The admin listener: metrics, liveness, readiness and the features' admin routes.

It is a second aiohttp application on its own port (``[admin]``, default
``127.0.0.1:9464``), over the proxy's own :class:`~proxy.edge.services.Services`, so admin
routes see the same cache, budget and token state. The main port never serves any of
this: it answers only ``/v1/...``.

- ``GET /metrics``: the Prometheus exposition of ``services.metrics.registry`` (text or
  OpenMetrics, as the scraper's ``Accept`` asks; gzip if it accepts it).
- ``GET /healthz``: 200 while the process runs its event loop.
- ``GET /livez``: 200 while the event loop turns (a heartbeat task ticks); 503 when the
  heartbeat is late by more than ``LOOP_STALL`` seconds (the loop is blocked or starved).
- ``GET /readyz``: 503 only when the proxy can serve nothing: shutting down (``shutdown``)
  or no account with a usable token (``accounts``); the listener is up before this one
  starts. Every other check in ``services.checks`` (one account's token, the cache) that
  fails is named under ``degraded``; ``details`` says how the proxy runs (``shared``:
  ``degraded`` while Redis is away).
- every route in ``services.admin_routes`` (cache stats and purge, budget status).

Access (DESIGN.md Resolutions, "Admin access"), each refusal a JSON 403:

- the probes (``/healthz``, ``/readyz``, ``/livez``, ``/metrics``) answer any ``Host``: the
  kubelet and pod scrapes send the pod IP, and they change nothing;
- other reads (``/budget``, ``/cache/stats``) answer a ``Host`` that is a loopback name or in
  ``admin.allowed_hosts`` (DNS rebinding), or a request with the admin token
  (``Authorization: Bearer``, ``admin.token_file``, compared in constant time);
- state-changing requests (POST, PUT, PATCH, DELETE): on a loopback ``admin.host``, the same
  Host check; on any other, the admin token, and while no token is set they are off (a
  ``Host: localhost`` is not access control). Either way a foreign ``Origin`` (anything but
  the listener's own origin, exactly; unparsable is foreign), a cross-site
  ``Sec-Fetch-Site`` or a form content type (what a cross-site form can send without a CORS
  preflight) is refused.

The admin token is live: a SIGHUP that changes ``admin.token_file``'s content switches to the
new token, and the previous one is still accepted for ``inbound.key_overlap`` seconds
(:class:`~proxy.edge.callers.AdminToken`); the ``serve --workers`` parent's listener reads
the file again on SIGHUP too (:mod:`proxy.ops.workers`).

Every answer says ``Server: kounta-proxy``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from proxy.edge.answer import stamp_server
from proxy.edge.app import limits
from proxy.edge.callers import AdminToken
from proxy.edge.services import SERVICES, Services
from proxy.errors import JSON_CONTENT_TYPE, ProxyError, code_for
from proxy.listener import LIMITS, StartupError, bound_port, start
from proxy.logs import event, log
from proxy.settings import AdminSettings

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
SHUTDOWN_CHECK = "shutdown"
# Fails readiness when every account's token check (``token:NAME``) fails.
ACCOUNTS_CHECK = "accounts"
ACCOUNT_CHECK_PREFIX = "token:"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# What an HTML form (or a "simple" cross-site fetch) can send without a CORS preflight.
FORM_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data", "text/plain"})
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})  # noqa: S104 - names, not binds
# The heartbeat behind /livez: its period, and how late a tick may be before the loop
# counts as stalled (long enough that a busy but turning loop never fails liveness).
LOOP_TICK = 1.0
LOOP_STALL = 10.0
# Answer any Host: probes and scrapes address the pod IP, and these change nothing.
PROBES = frozenset({"/healthz", "/readyz", "/livez", "/metrics"})
# An RFC 6454 serialised origin: scheme, host (a name or a bracketed IPv6 literal), port.
ORIGIN = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<host>\[[0-9a-f:.]+\]|[a-z0-9._-]+)"
                    r"(?::(?P<port>[0-9]{1,5}))?", re.IGNORECASE)  # fmt: skip
DEFAULT_PORTS = {"http": 80, "https": 443}
TURN_ON = (
    "State-changing admin routes are off because admin.host is not loopback and no admin "
    "token is set; set admin.token_file and send Authorization: Bearer <token> to turn them on"
)


def create_admin_app(services: Services) -> web.Application:
    """The admin application over the proxy's own services.

    On a Unix socket (``admin.socket``: a ``serve --workers`` worker, reached only by its
    parent through a 0700 directory) the Host/Origin guard is left to the parent's
    listener, which applies it before forwarding: a browser cannot reach a Unix socket."""
    admin = services.settings.admin
    live = services.live
    # The admin token is live: a reload may change it (the previous one kept for a while).
    guards = [] if admin.socket else [_guard(access_for(admin, lambda: live.current.admin_token))]
    app = web.Application(middlewares=[_json_errors, *guards])
    app[SERVICES] = services
    app[LIMITS] = limits(services.settings)
    app.on_response_prepare.append(stamp_server)
    app.router.add_get("/metrics", make_aiohttp_handler(services.metrics.registry))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    add_livez(app)
    app.router.add_routes(services.admin_routes)
    return app


async def healthz(request: web.Request) -> web.Response:
    return _json(200, {"status": "alive"})


class Heartbeat:
    """A task that ticks every LOOP_TICK seconds: how late its last tick is tells whether
    the event loop turns (a blocking call or a starved loop makes it late)."""

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.worst = 0.0  # the largest lag seen, for the answer

    async def run(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(LOOP_TICK)
            self.last = time.monotonic()
            self.worst = max(self.worst, self.last - before - LOOP_TICK)

    def late(self) -> float:
        """Seconds past the tick that should have come by now (0: on time)."""
        return max(0.0, time.monotonic() - self.last - LOOP_TICK)


HEARTBEAT = web.AppKey("heartbeat", Heartbeat)


def add_livez(app: web.Application) -> None:
    """``GET /livez`` and the heartbeat behind it (for any admin application)."""

    async def beating(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.ensure_future(app[HEARTBEAT].run())
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    app[HEARTBEAT] = Heartbeat()
    app.cleanup_ctx.append(beating)
    app.router.add_get("/livez", livez)


async def livez(request: web.Request) -> web.Response:
    """Liveness: the process answers and its event loop turns (the heartbeat is on time).
    Nothing else (no account, no disk, no Redis): a restart would not mend those."""
    late = request.app[HEARTBEAT].late()
    body = {"status": "alive" if late <= LOOP_STALL else "stalled", "loop_late": round(late, 3)}
    return _json(200 if late <= LOOP_STALL else 503, body)


async def readyz(request: web.Request) -> web.Response:
    """Readiness (DESIGN.md Resolutions): 503 only when the proxy can serve nothing, i.e.
    it is shutting down or no account can get a token. A failing account, a cache that
    cannot store, a degraded Redis: the proxy still serves, so they are named under
    ``degraded`` (and in metrics), never a 503 that would take the pod out of its Service."""
    services = request.app[SERVICES]
    results = run_checks(services)
    accounts = {name: p for name, p in results.items() if name.startswith(ACCOUNT_CHECK_PREFIX)}
    results[ACCOUNTS_CHECK] = (
        "no account can get a token" if accounts and all(accounts.values()) else None
    )
    failing = sorted(n for n in (SHUTDOWN_CHECK, ACCOUNTS_CHECK) if results[n] is not None)
    degraded = sorted(
        name for name, problem in results.items() if problem is not None and name not in failing
    )
    body: dict[str, Any] = {
        "status": "not_ready" if failing else "ready",
        "failing": failing,
        "degraded": degraded,
        "checks": {name: problem or "ok" for name, problem in sorted(results.items())},
    }
    # Details say how the proxy runs without failing readiness (e.g. shared: degraded).
    details = {name: note() for name, note in services.details.items()}
    body["details"] = {name: note for name, note in sorted(details.items()) if note}
    return _json(503 if failing else 200, body)


def run_checks(services: Services) -> dict[str, str | None]:
    """Every check by name: None when fine, else one line saying what is wrong."""
    results: dict[str, str | None] = {
        SHUTDOWN_CHECK: "the proxy is shutting down" if services.state.shutting_down else None
    }
    for name, check in services.checks.items():
        try:
            problem = check()
        except Exception as e:
            # A broken check is a problem of its part, not of the endpoint.
            log.exception("readiness_check_failed", extra={"fields": {"check": name}})
            problem = f"the check raised {type(e).__name__}"
        results[name] = None if problem is None else " ".join(str(problem).split())
    return results


@dataclass(frozen=True, slots=True)
class AllowedHosts:
    """Host names the admin listener answers (lower case, without port or brackets), and
    networks whose IP-address Hosts it answers (an IP literal cannot be DNS-rebound)."""

    names: frozenset[str]
    networks: tuple[IPNetwork, ...] = ()

    def __contains__(self, host: object) -> bool:
        if host in self.names:
            return True
        try:
            address = ipaddress.ip_address(str(host))
        except ValueError:
            return False
        return any(address in network for network in self.networks)


def allowed_hosts(services: Services) -> AllowedHosts:
    """``admin.allowed_hosts``, and ``admin.host`` itself unless it is a wildcard address."""
    return hosts_for(services.settings.admin)


def hosts_for(admin: AdminSettings) -> AllowedHosts:
    """``admin.allowed_hosts``, and ``admin.host`` itself unless it is a wildcard address."""
    names = {_bare(h) for h in admin.allowed_hosts if "/" not in h}
    if admin.host not in WILDCARD_HOSTS:
        names.add(_bare(admin.host))
    networks = tuple(ipaddress.ip_network(h, strict=False) for h in admin.allowed_hosts if "/" in h)
    return AllowedHosts(frozenset(names), networks)


def _bare(host: str) -> str:
    return host.strip().lower().removeprefix("[").removesuffix("]")


def host_name(value: str) -> str:
    """``example:9464`` → ``example``; ``[::1]:9464`` → ``::1`` (lower case)."""
    value = value.strip()
    if value.startswith("["):
        return _bare(value.partition("]")[0])
    if value.count(":") == 1:
        value = value.partition(":")[0]
    return _bare(value)


@dataclass(frozen=True, slots=True)
class Access:
    """What the guard needs: the Host names answered, whether ``admin.host`` is loopback,
    and the current admin token (read per request: a reload may change it)."""

    allowed: AllowedHosts
    loopback: bool
    tokens: Callable[[], AdminToken]


def access_for(admin: AdminSettings, tokens: Callable[[], AdminToken] | None = None) -> Access:
    """The guard's view of ``admin``; ``tokens``: the live admin token (else the one
    ``admin`` was loaded with, for good)."""
    if tokens is None:
        fixed = AdminToken(admin.token)
        tokens = lambda: fixed  # noqa: E731
    return Access(hosts_for(admin), not admin.exposed, tokens)


def _token_presented(token: AdminToken, request: web.Request) -> bool | None:
    """True: the admin token was presented; False: a wrong one; None: none (or none set)."""
    scheme, _, presented = request.headers.get("Authorization", "").strip().partition(" ")
    if not token or scheme.lower() != "bearer":
        return None
    # aiohttp keeps undecodable header bytes as surrogates: give them back, never raise.
    return token.matches(presented.strip().encode("utf-8", "surrogateescape"))


def _refusal(access: Access, request: web.Request) -> str | None:
    """Why the request is refused, or None."""
    safe = request.method in SAFE_METHODS
    if safe and request.path in PROBES:
        return None
    tokens = access.tokens()
    token = _token_presented(tokens, request)
    if token is False:
        return "The admin token presented does not match admin.token_file"
    if not safe and not access.loopback and not token:
        if not tokens:
            return TURN_ON
        return "State-changing admin routes need the admin token (Authorization: Bearer)"
    host = request.headers.get("Host")
    if not token and host is not None and host_name(host) not in access.allowed:
        return "The admin listener does not answer this Host (see admin.allowed_hosts)"
    if safe:
        return None
    origin = request.headers.get("Origin")
    if origin is not None and not same_origin(origin, host):
        return "Cross-origin requests may not change the admin state"
    if request.headers.get("Sec-Fetch-Site", "").lower() == "cross-site":
        return "Cross-site requests may not change the admin state"
    media = request.headers.get("Content-Type", "").partition(";")[0].strip().lower()
    if media in FORM_TYPES:
        return f"Requests with Content-Type {media} may not change the admin state"
    return None


def _origin_of(value: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of ``scheme://host[:port]``, exactly that; None otherwise."""
    found = ORIGIN.fullmatch(value.strip())
    if found is None:
        return None
    scheme = found["scheme"].lower()
    port = int(found["port"]) if found["port"] else DEFAULT_PORTS.get(scheme)
    if port is None or not 0 < port <= 65535:
        return None
    return scheme, _bare(found["host"]), port


def same_origin(origin: str, host: str | None) -> bool:
    """Whether ``Origin`` is the admin listener's own origin, ``http://`` + the request's
    ``Host`` (RFC 6454: scheme, host and port all equal). Another port on the same machine,
    another name for the same address, ``null`` and anything unparsable are foreign."""
    if host is None:
        return False
    theirs = _origin_of(origin)
    ours = _origin_of(f"http://{host.strip()}")
    return theirs is not None and theirs == ours


def _guard(access: Access) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        """DNS rebinding, cross-site forms and unauthenticated writes on an exposed admin
        port never reach an admin route."""
        problem = _refusal(access, request)
        if problem is not None:
            event("admin_refused", logging.WARNING, method=request.method, reason=problem)
            return _json(403, {"error": "access_denied", "error_description": problem})
        return await handler(request)

    return guard


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Unknown paths and wrong methods answer JSON here too."""
    try:
        return await handler(request)
    except ProxyError as e:  # a feature route's refusal (e.g. a purge of an unknown account)
        return _json(e.status, e.body())
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _json(e.status, {"error": code_for(e.status), "error_description": e.reason})


def _json(status: int, body: dict[str, Any]) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        headers={"Content-Type": JSON_CONTENT_TYPE, "Cache-Control": "no-store"},
    )


def middlewares(
    admin: AdminSettings, tokens: Callable[[], AdminToken] | None = None
) -> list[Callable[..., Awaitable[web.StreamResponse]]]:
    """The admin listener's JSON errors and Host/Origin guard, for another admin application
    (the ``serve --workers`` parent's) to answer and refuse exactly as this one does."""
    return [_json_errors, _guard(access_for(admin, tokens))]


def json_answer(status: int, body: dict[str, Any]) -> web.Response:
    """A JSON answer that is never cached, as every admin answer."""
    return _json(status, body)


async def start_admin(services: Services, grace: float = 5.0) -> web.AppRunner | None:
    """Start the admin listener if enabled; a busy port is a :class:`StartupError`."""
    settings = services.settings.admin
    if not settings.enabled:
        event("admin_disabled")
        return None
    try:
        runner = await start(
            create_admin_app(services), settings.host, settings.port, grace,
            unix_path=settings.socket,
        )  # fmt: skip
    except StartupError as e:
        raise StartupError(f"admin listener: {e}") from None
    where = (
        f"unix:{settings.socket}" if settings.socket else f"{settings.host}:{bound_port(runner)}"
    )
    event("admin_started", listen=where)
    warning = exposure_warning(services.settings.admin)
    if warning is not None:
        event("admin_exposed", logging.WARNING, warning=warning)
    return runner


def exposure_warning(admin: AdminSettings) -> str | None:
    """One line for the operator when the admin listener is reachable beyond loopback."""
    if not admin.exposed:
        return None
    if not admin.token:
        return (
            f"admin.host {admin.host!r} is reachable beyond loopback: probes and /metrics "
            "answer any Host, and state-changing admin routes (cache purge) are off until "
            "admin.token_file is set"
        )
    return (
        f"admin.host {admin.host!r} is reachable beyond loopback: probes and /metrics answer "
        "any Host; /budget and /cache/stats answer the Host names in admin.allowed_hosts "
        f"({', '.join(admin.allowed_hosts)}) or the admin token; writes need the admin token"
    )
