"""The two middlewares every request passes: the access log and metrics, then errors."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from functools import lru_cache

from aiohttp import web

from proxy.edge.answer import caller_value, proxy_error_answer
from proxy.edge.inbound import (
    ASTERISK,
    METHODS,
    Exchange,
    Incoming,
    exchange_of,
    guard,
    options_answer,
    request_id,
)
from proxy.edge.services import SERVICES
from proxy.errors import ProxyError, code_for
from proxy.logs import Fixed, begin_trace, continue_trace, log
from proxy.routes import OTHER, REFUSED, template

# Logged (never sent) when the caller hung up before the answer was complete, as nginx does.
CLIENT_CLOSED_REQUEST = 499
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as OAuth 2.0 JSON; nothing leaves as a traceback."""
    info = exchange_of(request)
    try:
        info.target = guard(request)
        if info.target is ASTERISK:  # OPTIONS *: no route matches "*"; answered here
            return options_answer()
        return await handler(request)
    except ProxyError as e:
        info.error, info.error_detail = e.code, e.detail
        return proxy_error_answer(e, info.request_id, caller_value(info.caller, info.account))
    except web.HTTPException as e:
        if e.status < 400:
            raise
        description = e.reason if e.text is None or e.text.startswith(str(e.status)) else e.text
        error = ProxyError(description or e.reason, code=code_for(e.status))
        error.status = e.status
        info.error = error.code
        return proxy_error_answer(error, info.request_id)
    except Exception:
        log.exception("unhandled_error", extra={"fields": {"request_id": info.request_id}})
        error = ProxyError(f"Internal proxy error (request id {info.request_id})")
        info.error = error.code
        return proxy_error_answer(error, info.request_id)


@lru_cache(maxsize=4096)  # most traffic repeats a few paths
def route_of(path: str) -> str:
    """The metric/log route label of ``path`` (:func:`proxy.routes.template`)."""
    return template(path) if path.startswith("/v1/") else OTHER


def labels_of(request: web.BaseRequest, info: Exchange, status: int) -> tuple[str, str]:
    """Method and route labels, both from fixed sets: a request refused before its caller
    was known counts under ``refused`` (whatever path it named), a method the proxy does
    not serve under ``OTHER``."""
    method = request.method if request.method in METHODS else "OTHER"
    if info.caller == "-" and status >= 400:
        return method, REFUSED
    return method, route_of(request.path)


@web.middleware
async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One log line and the request metrics for every request."""
    services = request.app[SERVICES]
    metrics, in_flight = services.metrics, services.metric_groups.edge.in_flight
    info = exchange_of(request)
    if info.started:  # handed over by the fast path, which gave it its id and trace
        continue_trace(info.trace)
    else:
        info.request_id = request_id(request.headers)
        info.trace = begin_trace(info.request_id)
    started = info.started or time.perf_counter()
    status = 500
    in_flight.inc()
    try:
        response = await handler(request)
        status = response.status
        if not info.bytes_sent:
            info.bytes_sent = body_size(request, response)
        return response
    except asyncio.CancelledError:
        status = CLIENT_CLOSED_REQUEST
        raise
    finally:
        in_flight.dec()
        elapsed = time.perf_counter() - started
        method, route = labels_of(request, info, status)
        metrics.request_done(
            method, route, status, info.cache_status, elapsed, info.caller, info.account
        )
        if log.isEnabledFor(logging.INFO):  # skip building the line when nobody reads it
            access_line(request, info, route, status, elapsed)


def body_size(request: web.BaseRequest, response: web.StreamResponse) -> int:
    """Bytes of a whole body the handler returned (the proxy's own errors, OPTIONS): what
    the access log reports when nothing streamed counted them."""
    body = response.body if isinstance(response, web.Response) else None
    if request.method == "HEAD" or not isinstance(body, bytes):
        return 0
    return len(body)


# The query string as logged: the target's, cut to this many characters.
QUERY_LOGGED = 1024


# The access line's fields, in the order written (one for each value access_line passes).
ACCESS = Fixed(
    "request",
    (
        "request_id",
        "caller",
        "account",
        "method",
        "client",
        "user_agent",
        "route",
        "path",
        "query",
        "status",
        "cache",
        "error",
        "error_detail",
        "upstream_status",
        "bytes",
        "ms",
        "upstream_ms",
        "budget_wait_ms",
        "retries",
        "fetched_by",
    ),
)


# The line of a request nothing below the edge noted anything for (plain_line): what an
# untouched Exchange and trace give in access_line, encoded once; the other values' types
# are plain_line's parameters', so each is encoded without a test of its type.
PLAIN = ACCESS.knowing(
    error=None,
    error_detail=None,
    upstream_status=None,
    upstream_ms=None,
    budget_wait_ms=0.0,
    retries=0,
    fetched_by=None,
).typed(
    request_id=str,
    caller=str,
    account=str,
    method=str,
    client=str | None,
    user_agent=str | None,
    route=str,
    path=str,
    query=str | None,
    status=int,
    cache=str,
    bytes=int,
    ms=float,
)


def access_line(request: Incoming, info: Exchange, route: str, status: int, elapsed: float) -> None:
    """The access log line (nginx's ``$upstream_response_time`` and Envoy's response flags
    are the models: ``upstream_ms`` whenever an upstream answer was used, ``error`` the
    proxy's own error code, or the upstream failure a stale answer stood in for)."""
    spent = info.upstream_seconds
    trace = info.trace
    query = request.query_string
    ACCESS.write(
        info.request_id,
        info.caller,
        info.account,
        request.method,
        request.remote,
        request.headers.get("User-Agent"),
        route,
        request.path,
        query[:QUERY_LOGGED] if query else None,
        status,
        info.cache_status,
        info.error or trace.failure,
        info.error_detail or trace.failure_detail,
        info.upstream_status,
        info.bytes_sent,
        round(elapsed * 1000, 2),
        None if spent is None else round(spent * 1000, 2),
        round(trace.budget_wait * 1000, 2),
        trace.retries,
        trace.fetched_by,
    )


def plain_line(
    request: Incoming,
    request_id: str,
    caller: str,
    account: str,
    route: str,
    status: int,
    cache_status: str,
    sent: int,
    elapsed: float,
) -> None:
    """:func:`access_line`'s line for a request nothing below the edge noted anything for
    (a fresh hit on the fast path: no error, no upstream, an untouched trace), from the
    values the fast path holds: no :class:`Exchange` or trace made for it."""
    query = request.query_string
    PLAIN.write(
        request_id, caller, account, request.method, request.remote,
        request.headers.get("User-Agent"), route, request.path,
        query[:QUERY_LOGGED] if query else None, status, cache_status, sent,
        round(elapsed * 1000, 2),
    )  # fmt: skip
