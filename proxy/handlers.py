"""The aiohttp side: turn an inbound request into a ProxyRequest and the answer back."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy import paging
from proxy.errors import (
    JSON_CONTENT_TYPE,
    PROXY_ERROR_HEADER,
    ClosesConnection,
    ExpectationFailed,
    FaultyFraming,
    HttpVersionNotSupported,
    InvalidRequest,
    MethodNotAllowed,
    NotImplementedCoding,
    ProxyError,
    RequestTooLarge,
    error_body,
    normalise_error,
)
from proxy.headers import SERVER_NAME, VIA, for_caller, for_upstream, has_bad_value
from proxy.logs import event
from proxy.messages import Body, ProxyRequest, ProxyResponse
from proxy.rewrite import REWRITTEN_HEADERS, rewrite_url
from proxy.target import Target, parse_target, valid_host

VERSIONS = ((1, 1), (1, 0))
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
CHUNK = 64 * 1024
ERROR_BODY_LIMIT = 64 * 1024
# Upstream headers worth keeping on an error answer.
ERROR_KEPT_HEADERS = (
    "Retry-After",
    "X-Ratelimit-Reset",
    "X-Ratelimit-Limit",
    "X-Ratelimit-Remaining",
)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


@dataclass(slots=True)
class Exchange:
    """What the access log and metrics learn about one request while it is answered."""

    request_id: str = ""
    caller: str = "-"
    account: str = "-"
    cache_status: str = "-"
    target: Target | None = None
    upstream_status: int | None = None
    bytes_sent: int = 0


EXCHANGE = web.RequestKey("exchange", Exchange)


def exchange_of(request: web.Request) -> Exchange:
    found = request.get(EXCHANGE)
    if found is None:
        found = request[EXCHANGE] = Exchange()
    return found


# Generated ids: 32 hex digits, as uuid4().hex, but a random per-process prefix and a
# counter, unique without a system call per request.
_ID_PREFIX = os.urandom(8).hex()
_ID_NUMBERS = itertools.count(1)


def request_id(headers: CIMultiDictProxy[str]) -> str:
    """The caller's X-Request-ID when it is sane, else a new one."""
    given = headers.get("X-Request-ID")
    if given is not None and _REQUEST_ID.fullmatch(given):
        return given
    return f"{_ID_PREFIX}{next(_ID_NUMBERS):016x}"


def guard(request: web.Request) -> Target:
    """The checks that come before routing: version, method, framing and request target."""
    if request.version not in VERSIONS:
        raise HttpVersionNotSupported("Only HTTP/1.0 and HTTP/1.1 are served")
    if request.method not in METHODS:
        raise MethodNotAllowed(f"Method {request.method} is not proxied")
    check_framing(request)
    if not valid_host(request.headers.get("Host")):
        # RFC 9112 3.2: a server MUST answer 400 to an invalid Host (missing or repeated
        # in HTTP/1.1 is refused by aiohttp's parser already).
        raise InvalidRequest("The Host header is not a valid host[:port]")
    if request.raw_path == "*" and request.method == "OPTIONS":
        return ASTERISK
    return parse_target(request.raw_path)


# OPTIONS * (RFC 9110 9.3.7) asks about the server itself; it is answered, never forwarded.
ASTERISK = Target(path="*", query="")


def check_framing(request: web.Request) -> None:
    """Refuse what aiohttp's parser lets through but a careful proxy must not pass on."""
    codings = request.headers.getall("Transfer-Encoding", [])
    if codings and request.version < (1, 1):
        # RFC 9112 6.1: Transfer-Encoding in an HTTP/1.0 message means faulty framing.
        raise FaultyFraming("Transfer-Encoding is not allowed in an HTTP/1.0 request")
    tokens = [t.strip().lower() for value in codings for t in value.split(",") if t.strip()]
    if tokens and tokens != ["chunked"]:
        # aiohttp frames "gzip, chunked" as chunked but does not undo the gzip (nginx: 501).
        raise NotImplementedCoding("Only the chunked transfer coding is supported")
    expect = request.headers.get("Expect")
    if expect is not None and expect.strip().lower() != "100-continue":
        raise ExpectationFailed("Only 'Expect: 100-continue' is supported")


async def expect_nothing(request: web.Request) -> None:
    """aiohttp would send 100 Continue before any check; :func:`read_body` sends it later."""


def options_answer() -> web.Response:
    allow = sorted(METHODS)
    body = json.dumps({"allow": allow}).encode()
    return web.Response(
        status=200,
        body=body,
        headers={"Allow": ", ".join(allow), "Content-Type": JSON_CONTENT_TYPE},
    )


async def stamp_server(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every answer names the proxy, never a library version."""
    response.headers["Server"] = SERVER_NAME


async def handle(request: web.Request) -> web.StreamResponse:
    from proxy.app import CONTEXT  # the context is created by the app; import late to avoid a cycle

    ctx = request.app[CONTEXT]
    info = exchange_of(request)
    target = info.target or guard(request)
    bad = has_bad_value(request.headers.items())
    if bad is not None:
        raise InvalidRequest(f"Header {bad} contains CR, LF or NUL")
    caller = ctx.callers.identify(request.headers)
    info.caller, info.account = caller.name, caller.account
    server = ctx.settings.server
    body = await read_body(request, server.max_body_size, server.replay_body_size)
    loop = asyncio.get_running_loop()
    headers = for_upstream(request.headers.items(), ctx.callers.header_names)
    headers["X-Request-ID"] = info.request_id
    headers["Via"] = VIA
    proxy_request = ProxyRequest(
        method=request.method,
        path=target.path,
        query=target.query,
        headers=CIMultiDictProxy(headers),
        body=body,
        account=caller.account,
        caller=caller.name,
        request_id=info.request_id,
        deadline=loop.time() + ctx.settings.upstream.total_timeout,
    )
    if paging.wanted(request):
        upstream = ctx.settings.upstream.url
        return await paging.all_pages(request, proxy_request, upstream, server.public_url)
    try:
        response = await ctx.pipeline.send(proxy_request)
    except ProxyError:
        if isinstance(body, _CappedStream) and body.exceeded:
            raise RequestTooLarge(_too_large(server.max_body_size)) from None
        raise
    info.cache_status = response.cache_status
    info.upstream_status = response.upstream_status
    return await answer(request, response, ctx.settings.upstream.url, server.public_url)


def _origin_of(request: web.BaseRequest) -> URL:
    try:
        return URL.build(scheme=request.scheme, authority=request.host)
    except (ValueError, TypeError):
        return URL.build(scheme=request.scheme, host="localhost")


def _too_large(limit: int) -> str:
    return f"The request body is larger than the limit of {limit} bytes"


async def read_body(request: web.Request, limit: int, replay_limit: int) -> Body:
    """The body in memory when it is small (replayable), else a capped stream."""
    if not request.body_exists:
        return None
    length = request.content_length
    if length is not None and length > limit:
        raise RequestTooLarge(_too_large(limit))
    if "Expect" in request.headers and request.version >= (1, 1):
        # Checked and accepted: only now invite the body (RFC 9110 10.1.1).
        await request.writer.write(CONTINUE)
    head = bytearray()
    while len(head) <= replay_limit:
        chunk = await request.content.read(CHUNK)
        if not chunk:
            return bytes(head)
        head += chunk
        if len(head) > limit:
            raise RequestTooLarge(_too_large(limit))
    return _CappedStream(bytes(head), request, limit)


class _CappedStream:
    """A one-shot body stream that stops at ``limit`` bytes and remembers why."""

    def __init__(self, head: bytes, request: web.Request, limit: int) -> None:
        self.head = head
        self.request = request
        self.limit = limit
        self.exceeded = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        size = len(self.head)
        yield self.head
        while chunk := await self.request.content.read(CHUNK):
            size += len(chunk)
            if size > self.limit:
                self.exceeded = True
                raise RequestTooLarge(_too_large(self.limit))
            yield chunk


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
    headers = answer_headers(view, info.request_id, response.cache_status, response.age)
    if isinstance(response.body, bytes):
        info.bytes_sent = len(response.body)
        out = web.Response(status=response.status, headers=headers, body=response.body or None)
        if request.method == "HEAD" and not response.body:
            _keep_head_length(out, response)
        return out
    return await stream_answer(request, response, headers)


HeaderItems = tuple[tuple[str, str], ...]
# Upstream headers (plus where the caller reached the proxy) -> what the caller is shown.
# Most answers repeat a few header sets (every fresh hit of an entry has the same one),
# so the filtering and URL rewriting are done once per set; bounded by clearing.
_VIEWS: dict[tuple[HeaderItems, URL, str, str, str], HeaderItems] = {}
VIEWS_MAX = 1024


def answer_headers(
    view: HeaderItems, request_id: str, cache_status: str, age: int | None
) -> CIMultiDict[str]:
    """A successful answer's headers: the caller's view of the upstream's, then the proxy's."""
    headers = CIMultiDict(view)
    headers["X-Request-ID"] = request_id
    headers["X-Cache"] = cache_status
    headers.add("Via", VIA)
    if age is not None:
        headers["Age"] = str(age)
    return headers


def caller_view(
    request: web.BaseRequest, items: HeaderItems, upstream: URL, public: str
) -> HeaderItems:
    """The upstream headers a caller may see, paging/location URLs moved onto the proxy."""
    # The request's origin only matters when no public URL is configured.
    scheme, host = ("", "") if public else (request.scheme, request.host)
    key = (items, upstream, public, scheme, host)
    view = _VIEWS.get(key)
    if view is None:
        if len(_VIEWS) >= VIEWS_MAX:
            _VIEWS.clear()
        view = _VIEWS[key] = _filter_and_rewrite(request, items, upstream, public)
    return view


def _filter_and_rewrite(
    request: web.BaseRequest, items: HeaderItems, upstream: URL, public: str
) -> HeaderItems:
    headers = for_caller(items)
    for name in REWRITTEN_HEADERS:
        values = headers.getall(name, [])
        if values:
            del headers[name]
            base = public_url(request, public)
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
    out.headers.add("Via", VIA)
    info.bytes_sent = len(body)
    return out


def proxy_error_answer(error: ProxyError, request_id: str) -> web.Response:
    status, headers, body = normalise_error(error.status, {}, error_body(error))
    out = web.Response(status=status, headers=headers, body=body)
    out.headers.update(error.headers())
    out.headers[PROXY_ERROR_HEADER] = "1"
    out.headers["X-Request-ID"] = request_id
    if isinstance(error, ClosesConnection | RequestTooLarge):
        # The body was not read (or not trusted): close rather than parse it as a request.
        out.force_close()
    return out
