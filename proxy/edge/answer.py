"""The answer side: a :class:`~proxy.messages.ProxyResponse` rendered for the caller,
its paging and location URLs moved onto the proxy, errors in the OAuth 2.0 shape."""

from __future__ import annotations

import asyncio
import functools

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy.edge.inbound import exchange_of
from proxy.edge.rewrite import REWRITTEN_HEADERS, rewrite_url
from proxy.errors import (
    PROXY_ERROR_HEADER,
    ClosesConnection,
    ProxyError,
    RequestTooLarge,
    error_body,
    normalise_error,
)
from proxy.headers import SERVER_NAME, VIA, for_caller
from proxy.logs import event
from proxy.messages import ERROR_BODY_LIMIT, CacheStatus, ProxyResponse

# Upstream headers worth keeping on an error answer.
ERROR_KEPT_HEADERS = (
    "Retry-After",
    "X-Ratelimit-Reset",
    "X-Ratelimit-Limit",
    "X-Ratelimit-Remaining",
)


async def stamp_server(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every answer names the proxy, never a library version."""
    response.headers["Server"] = SERVER_NAME


def _origin_of(request: web.BaseRequest) -> URL:
    return _origin(request.scheme, request.host)


def _origin(scheme: str, host: str) -> URL:
    try:
        return URL.build(scheme=scheme, authority=host)
    except (ValueError, TypeError):
        return URL.build(scheme=scheme, host="localhost")


def public_url(request: web.BaseRequest, configured: str) -> URL:
    """The URL callers reach the proxy at: configured, else the request's own origin."""
    return URL(configured) if configured else _origin_of(request)


async def answer(
    request: web.Request, response: ProxyResponse, upstream: URL, public: str
) -> web.StreamResponse:
    info = exchange_of(request)
    if response.status >= 400:
        return await error_answer(request, response)
    view = caller_view(request, tuple(response.headers.items()), upstream, public)
    headers = answer_headers(
        view,
        info.request_id,
        response.cache_status,
        response.age,
        caller=caller_value(info.caller, info.account),
        cache=cache_status_value(
            response.cache_status, response.cache_detail, response.upstream_status
        ),
    )
    if isinstance(response.body, bytes):
        info.bytes_sent = len(response.body)
        out = web.Response(status=response.status, headers=headers, body=response.body or None)
        if request.method == "HEAD" and not response.body:
            _keep_head_length(out, response)
        return out
    return await stream_answer(request, response, headers)


HeaderItems = tuple[tuple[str, str], ...]


def answer_headers(
    view: HeaderItems,
    request_id: str,
    cache_status: CacheStatus,
    age: int | None,
    *,
    caller: str = "",
    cache: str = "",
) -> CIMultiDict[str]:
    """A successful answer's headers: the caller's view of the upstream's, then the proxy's."""
    headers = CIMultiDict(view)
    headers["X-Request-ID"] = request_id
    headers["X-Cache"] = cache_status
    add_cache_status(headers, cache or cache_status_value(cache_status))
    if caller:
        headers["X-Proxy-Caller"] = caller
    headers.add("Via", VIA)
    if age is not None:
        headers["Age"] = str(age)
    return headers


# RFC 9211: this cache's name in Cache-Status, and what each X-Cache value says there
# when the cache layer gave no detail of its own.
CACHE_NAME = SERVER_NAME
CACHE_PARAMS = {
    "HIT": "hit",
    "STALE": "hit; detail=stale",
    "REVALIDATED": "fwd=stale",
    "MISS": "fwd=miss",
    "BYPASS": "fwd=bypass",
}


def cache_status_value(
    cache_status: str, detail: str = "", upstream_status: int | None = None
) -> str:
    """This proxy's Cache-Status member (RFC 9211), e.g. ``kounta-proxy; fwd=stale;
    fwd-status=304``; ``fwd-status`` is the upstream's status when a request went there."""
    params = detail or CACHE_PARAMS.get(cache_status, "fwd=bypass")
    if upstream_status is not None and params.startswith("fwd=") and "fwd-status" not in params:
        kind, _, rest = params.partition(";")
        params = f"{kind}; fwd-status={upstream_status}" + (f";{rest}" if rest else "")
    return f"{CACHE_NAME}; {params}"


def add_cache_status(headers: CIMultiDict[str], member: str) -> None:
    """Caches closer to the caller add their member last (RFC 9211 2): after the upstream's."""
    earlier = headers.popall("Cache-Status", [])
    headers["Cache-Status"] = ", ".join([*earlier, member])


def caller_value(caller: str, account: str) -> str:
    """``X-Proxy-Caller``: who the proxy took the caller for, and on which account."""
    if caller in ("", "-"):
        return ""
    return f"{caller}; account={account}" if account not in ("", "-") else caller


def caller_view(
    request: web.BaseRequest, items: HeaderItems, upstream: URL, public: str
) -> HeaderItems:
    """The upstream headers a caller may see, paging/location URLs moved onto the proxy."""
    # The request's origin only matters when no public URL is configured.
    scheme, host = ("", "") if public else (request.scheme, request.host)
    return _view(items, upstream, public, scheme, host)


# Most answers repeat a few header sets (every fresh hit of an entry has the same one), so
# the filtering and URL rewriting are done once per set and place the caller reached.
@functools.lru_cache(maxsize=1024)
def _view(items: HeaderItems, upstream: URL, public: str, scheme: str, host: str) -> HeaderItems:
    headers = for_caller(items)
    for name in REWRITTEN_HEADERS:
        values = headers.getall(name, [])
        if values:
            del headers[name]
            base = URL(public) if public else _origin(scheme, host)
            for value in values:
                headers.add(name, rewrite_url(value, upstream, base))
    return tuple(headers.items())


async def stream_answer(
    request: web.Request, response: ProxyResponse, headers: CIMultiDict[str]
) -> web.StreamResponse:
    info = exchange_of(request)
    length = response.headers.get("Content-Length")
    out = web.StreamResponse(status=response.status, headers=headers)
    if length is not None and length.isdigit() and "Content-Encoding" not in response.headers:
        out.content_length = int(length)
    assert not isinstance(response.body, bytes)
    try:
        await out.prepare(request)
        async for chunk in response.body:
            await out.write(chunk)
            info.bytes_sent += len(chunk)
        await out.write_eof()
    except ProxyError as e:
        # Headers are gone already: the only honest signal left is a broken connection.
        event("upstream_body_failed", request_id=info.request_id, error=e.code)
        _abort(request)
    except (ConnectionResetError, asyncio.CancelledError):
        event("client_disconnected", request_id=info.request_id)
        _abort(request)
    finally:
        await response.release()
    return out


def _keep_head_length(out: web.Response, response: ProxyResponse) -> None:
    """HEAD says the length GET would send, as nginx does, when it is known.

    A compressed upstream length is not: the proxy would answer GET decoded.
    """
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and "Content-Encoding" not in response.headers:
        out.headers["Content-Length"] = length


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()


async def error_answer(request: web.Request, response: ProxyResponse) -> web.Response:
    info = exchange_of(request)
    raw = await response.read(limit=ERROR_BODY_LIMIT)
    status, headers, body = normalise_error(response.status, response.headers, raw)
    out = web.Response(status=status, headers=headers, body=body)
    for name in ERROR_KEPT_HEADERS:
        if name in response.headers:
            out.headers[name] = response.headers[name]
    out.headers["X-Request-ID"] = info.request_id
    out.headers["X-Cache"] = response.cache_status
    member = cache_status_value(
        response.cache_status, response.cache_detail, response.upstream_status
    )
    out.headers["Cache-Status"] = member
    caller = caller_value(info.caller, info.account)
    if caller:
        out.headers["X-Proxy-Caller"] = caller
    out.headers.add("Via", VIA)
    info.bytes_sent = len(body)
    return out


def proxy_error_answer(error: ProxyError, request_id: str, caller: str = "") -> web.Response:
    status, headers, body = normalise_error(error.status, {}, error_body(error))
    out = web.Response(status=status, headers=headers, body=body)
    out.headers.update(error.headers())
    out.headers[PROXY_ERROR_HEADER] = "1"
    out.headers["X-Request-ID"] = request_id
    if caller:
        out.headers["X-Proxy-Caller"] = caller
    if isinstance(error, ClosesConnection | RequestTooLarge):
        # The body was not read (or not trusted): close rather than parse it as a request.
        out.force_close()
    return out
