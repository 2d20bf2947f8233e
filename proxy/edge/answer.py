"""The answer side: a :class:`~proxy.messages.ProxyResponse` rendered for the caller,
its paging and location URLs moved onto the proxy, errors in the OAuth 2.0 shape.

A gzip body (as Kounta sent it, or as stored) goes as it is to a caller whose
``Accept-Encoding`` takes gzip, and is inflated for any other (whole, with a
Content-Length, up to :data:`~proxy.coding.INFLATE_WHOLE`; streamed in bounded pieces
beyond); either way the answer says ``Vary: Accept-Encoding``. A coding the proxy does not
know passes through with its ``Content-Encoding``.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy.coding import GZIP, Caps, accepts_gzip, coding_of, inflate_whole, inflated
from proxy.edge.inbound import Incoming, exchange_of
from proxy.edge.rewrite import REWRITTEN_HEADERS, rewrite_url
from proxy.edge.services import SERVICES
from proxy.errors import (
    PROXY_ERROR_HEADER,
    BodyTimeout,
    ClosesConnection,
    ProxyError,
    RequestTooLarge,
    error_body,
    normalise_error,
)
from proxy.headers import SERVER_NAME, VIA, for_caller
from proxy.listener import CLOSE_AT_ONCE
from proxy.logs import event
from proxy.memo import memo
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
    # A 206 range of a gzip stream cannot be inflated: it goes as it came, labelled.
    accepts = response.status == 206 or caller_accepts_gzip(request)
    items = tuple(response.headers.items())
    view, inflate = caller_view(request, items, upstream, public, accepts)
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
    if inflate and response.body:
        if isinstance(response.body, bytes):
            whole = inflate_whole(response.body, caps_of(request))
            if whole is None:  # large (or broken): inflated while streamed
                response.body = _once(response.body)
            else:
                response.body = whole
                inflate = False
        if not isinstance(response.body, bytes):
            response.body = inflated(response.body, caps_of(request))
    if isinstance(response.body, bytes):
        info.bytes_sent = len(response.body)
        out = web.Response(status=response.status, headers=headers, body=response.body or None)
        if request.method == "HEAD" and not response.body and not inflate:
            _keep_head_length(out, response)
        return out
    return await stream_answer(request, response, headers, framed=not inflate)


def caller_accepts_gzip(request: web.BaseRequest) -> bool:
    return accepts_gzip(request.headers.getall("Accept-Encoding", ()))


def caps_of(request: web.Request) -> Caps:
    upstream = request.app[SERVICES].settings.upstream
    return Caps(upstream.max_inflated_size, upstream.max_inflate_ratio)


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


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


@functools.lru_cache(maxsize=256)  # a few dozen distinct members: build each once
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
    if "Cache-Status" not in headers:  # the common case: Kounta sends none
        headers["Cache-Status"] = member
        return
    earlier = headers.popall("Cache-Status", [])
    headers["Cache-Status"] = ", ".join([*earlier, member])


@functools.lru_cache(maxsize=1024)  # bounded: callers and accounts come from the settings
def caller_value(caller: str, account: str) -> str:
    """``X-Proxy-Caller``: who the proxy took the caller for, and on which account."""
    if caller in ("", "-"):
        return ""
    return f"{caller}; account={account}" if account not in ("", "-") else caller


def caller_view(
    request: Incoming, items: HeaderItems, upstream: URL, public: str, accepts: bool
) -> tuple[HeaderItems, bool]:
    """The upstream headers a caller may see, paging/location URLs moved onto the proxy,
    and whether the body must be inflated for it (gzip, and ``accepts`` is False)."""
    # The request's origin only matters when no public URL is configured.
    scheme, host = ("", "") if public else (request.scheme, request.host)
    return _view(items, upstream, public, scheme, host, accepts)


def header_view(
    items: HeaderItems, upstream: URL, public: str, scheme: str, host: str, accepts: bool
) -> tuple[HeaderItems, bool]:
    """:func:`caller_view` of a caller that reached ``scheme://host`` (both "" when
    ``public`` is configured), made anew: for a caller that remembers what it makes from it
    (:func:`proxy.edge.rendered.template`), whose every call would miss :func:`_view`'s memo
    and push out a view the long way asks again."""
    return _shown(items, upstream, public, scheme, host, accepts)


def _shown(
    items: HeaderItems, upstream: URL, public: str, scheme: str, host: str, accepts: bool
) -> tuple[HeaderItems, bool]:
    headers = for_caller(items)
    for name in REWRITTEN_HEADERS:
        values = headers.getall(name, [])
        if values:
            del headers[name]
            base = URL(public) if public else _origin(scheme, host)
            for value in values:
                headers.add(name, rewrite_url(value, upstream, base))
    coding = coding_of(items)
    if coding == GZIP:
        _add_vary(headers, "Accept-Encoding")
        if accepts:
            headers["Content-Encoding"] = GZIP
        else:
            _weaken_etags(headers)
    elif coding:
        headers["Content-Encoding"] = coding  # not the proxy's to decode: as it came
    return tuple(headers.items()), coding == GZIP and not accepts


# Upstream headers (plus where the caller reached the proxy and whether it takes gzip) ->
# what the caller is shown, and whether the body must be inflated for it. Most answers
# repeat a few header sets (every fresh hit of an entry has the same one), so the filtering
# and URL rewriting are done once per set, place the caller reached and gzip or not.
_view = memo(1024)(_shown)


def _weaken_etags(headers: CIMultiDict[str]) -> None:
    """An inflated body is another representation: its ETag can only be weak (RFC 9110
    8.8.1), as nginx's gunzip makes it. Conditionals compare weakly, so 304s still match."""
    tags = headers.getall("ETag", [])
    if tags:
        del headers["ETag"]
        for tag in tags:
            headers.add("ETag", tag if tag.startswith("W/") else f"W/{tag}")


def _add_vary(headers: CIMultiDict[str], name: str) -> None:
    """RFC 9110 12.5.5: the answer depends on ``name`` (unless Vary says so already)."""
    listed = {v.strip().lower() for line in headers.getall("Vary", []) for v in line.split(",")}
    if name.lower() not in listed and "*" not in listed:
        headers.add("Vary", name)


async def stream_answer(
    request: web.Request, response: ProxyResponse, headers: CIMultiDict[str], framed: bool = True
) -> web.StreamResponse:
    """Stream the body; ``framed``: it is sent as it came, so its Content-Length holds."""
    info = exchange_of(request)
    length = response.headers.get("Content-Length")
    out = web.StreamResponse(status=response.status, headers=headers)
    if framed and length is not None and length.isdigit():
        out.content_length = int(length)
    assert not isinstance(response.body, bytes)
    chunks = aiter(response.body)
    try:
        # Decided before the head goes out: a body refused at its first chunk (a gzip body
        # past the caps, a stored body that fails its check) is still a clean error answer.
        first = await anext(chunks, b"")
    except BaseException:
        await response.release()
        raise
    try:
        await in_time(request, out.prepare(request))
        if first:
            await in_time(request, out.write(first))
            info.bytes_sent += len(first)
        async for chunk in chunks:
            await in_time(request, out.write(chunk))
            info.bytes_sent += len(chunk)
        await in_time(request, out.write_eof())
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


class CallerStalled(ConnectionResetError):
    """A caller stopped reading for ``server.send_timeout``: handled as a caller that left
    (its connection is cut, the upstream connection let go)."""


async def in_time(request: web.Request, writing: Awaitable[object]) -> None:
    """One write to the caller, within ``server.send_timeout`` (nginx's send_timeout: the
    time one write may wait, not the whole answer's)."""
    services = request.app[SERVICES]
    try:
        async with asyncio.timeout(services.settings.server.send_timeout):
            await writing
    except TimeoutError:
        services.metric_groups.edge.connections_dropped.labels("send_timeout").inc()
        event("client_send_timeout", request_id=exchange_of(request).request_id)
        raise CallerStalled("The caller stopped reading") from None


def _keep_head_length(out: web.Response, response: ProxyResponse) -> None:
    """HEAD says the length GET would send, as nginx does, when it is known (not when GET
    would be inflated for this caller: the caller of this only asks when it would not)."""
    length = response.headers.get("Content-Length", "")
    if length.isdigit():
        out.headers["Content-Length"] = length


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()


async def error_answer(request: web.Request, response: ProxyResponse) -> web.Response:
    info = exchange_of(request)
    raw = await response.decoded(ERROR_BODY_LIMIT)
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
    if isinstance(error, BodyTimeout):
        out[CLOSE_AT_ONCE] = True  # and do not wait for the rest of a body too slow
    return out
