"""The inbound side: checks before routing (version, method, framing, Host, target),
the per-request :class:`Exchange` record, request ids and the request body."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import web
from aiohttp.http import HttpVersion, RawRequestMessage
from multidict import CIMultiDictProxy

from proxy.errors import (
    JSON_CONTENT_TYPE,
    BodyTimeout,
    ExpectationFailed,
    FaultyFraming,
    HttpVersionNotSupported,
    InvalidRequest,
    MethodNotAllowed,
    NotImplementedCoding,
    RequestTooLarge,
)
from proxy.logs import Trace
from proxy.messages import CHUNK, Body, CacheStatus, ProxyResponse
from proxy.target import Target, parse_target, valid_host

VERSIONS = ((1, 1), (1, 0))


METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
ALLOWED = tuple(sorted(METHODS))


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


@dataclass(slots=True)
class Exchange:
    """What the access log and metrics learn about one request while it is answered."""

    request_id: str = ""
    caller: str = "-"
    account: str = "-"
    cache_status: CacheStatus = "-"
    target: Target | None = None
    upstream_status: int | None = None
    upstream_seconds: float | None = None
    bytes_sent: int = 0
    # The proxy's own error code when it answered one (and its log-only detail).
    error: str | None = None
    error_detail: str | None = None
    trace: Trace = field(default_factory=Trace)
    # perf_counter() when the request began, if before the middlewares (the fast path
    # waited on a flight first); 0: when the access middleware saw it.
    started: float = 0.0

    def took(self, response: ProxyResponse) -> None:
        """What the pipeline's answer tells the access log."""
        self.cache_status = response.cache_status
        self.upstream_status = response.upstream_status
        self.upstream_seconds = response.upstream_seconds


EXCHANGE = web.RequestKey("exchange", Exchange)


class Incoming(Protocol):
    """What the fast path and the access line read of a request: an aiohttp request, or
    a :class:`Head` the connection's protocol parsed (no request object made)."""

    @property
    def method(self) -> str: ...
    @property
    def version(self) -> HttpVersion: ...
    @property
    def headers(self) -> CIMultiDictProxy[str]: ...
    @property
    def raw_path(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def query_string(self) -> str: ...
    @property
    def remote(self) -> str | None: ...
    @property
    def scheme(self) -> str: ...
    @property
    def host(self) -> str: ...


class Head:
    """A parsed request head read as an aiohttp request reads it (``BaseRequest``'s path,
    query string, host, remote and scheme), without making one."""

    __slots__ = ("headers", "message", "method", "raw_path", "remote", "scheme", "version")

    def __init__(self, message: RawRequestMessage, remote: str | None, scheme: str) -> None:
        self.message = message
        self.method: str = message.method
        self.version: HttpVersion = message.version
        self.headers: CIMultiDictProxy[str] = message.headers
        self.raw_path: str = message.path
        self.remote = remote
        self.scheme = scheme

    @property
    def path(self) -> str:
        return self.message.url.path

    @property
    def query_string(self) -> str:
        return self.message.url.query_string

    @property
    def host(self) -> str:
        return self.headers.get("Host", "")


def exchange_of(request: web.Request) -> Exchange:
    found = request.get(EXCHANGE)
    if found is None:
        found = request[EXCHANGE] = Exchange()
    return found


# Generated ids: 32 hex digits, as uuid4().hex, but a random per-process prefix and a
# counter, unique without a system call per request: the prefix is the top 64 bits of
# the counter's start (one number formatted, not two joined).
_ID_NUMBERS = itertools.count((int.from_bytes(os.urandom(8)) << 64) + 1)


def request_id(headers: CIMultiDictProxy[str]) -> str:
    """The caller's X-Request-ID when it is sane, else a new one."""
    given = headers.get("X-Request-ID")
    if given is not None and _REQUEST_ID.fullmatch(given):
        return given
    return "%032x" % next(_ID_NUMBERS)  # noqa: UP031 (the cheapest way to format it)


def guard(request: web.Request) -> Target:
    """The checks that come before routing: version, method, framing and request target."""
    if request.version not in VERSIONS:
        raise HttpVersionNotSupported("Only HTTP/1.0 and HTTP/1.1 are served")
    if request.method not in METHODS:
        raise MethodNotAllowed(f"Method {request.method} is not proxied", allow=ALLOWED)
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


def too_large(limit: int) -> str:
    return f"The request body is larger than the limit of {limit} bytes"


class Readable(Protocol):
    async def read(self, n: int = -1) -> bytes: ...


class BodyDeadline:
    """Reads a request body for as long as the caller keeps its pace (slowloris on bodies).

    Only the time spent waiting for the caller's bytes counts (from the end of the head):
    while the proxy is busy elsewhere (queued for a budget token, or Kounta slow to take
    the bytes) the caller's bytes queue up and the next read returns at once. The wait may
    last ``timeout`` seconds in all; past the first second, the caller must have sent
    ``min_rate`` bytes for every second waited beyond it (0: no minimum). Either miss is a
    :class:`~proxy.errors.BodyTimeout` (408, the connection closed).
    """

    def __init__(self, timeout: float, min_rate: float) -> None:
        self.timeout = timeout
        self.min_rate = min_rate
        self.waited = 0.0
        self.received = 0
        self.timed_out = False

    async def read(self, content: Readable) -> bytes:
        """The next chunk of the body (b"" at its end) from ``content`` (``request.content``)."""
        allowed = self._allowed()
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            if allowed <= 0:
                raise TimeoutError
            async with asyncio.timeout(allowed):
                chunk = await content.read(CHUNK)
        except TimeoutError:
            self.timed_out = True
            raise BodyTimeout(self.description()) from None
        finally:
            self.waited += loop.time() - started
        self.received += len(chunk)
        return chunk

    def _allowed(self) -> float:
        """Seconds the next read may wait."""
        limit = self.timeout
        if self.min_rate > 0:
            limit = min(limit, 1.0 + self.received / self.min_rate)
        return limit - self.waited

    def description(self) -> str:
        pace = f", at least {self.min_rate:g} bytes a second" if self.min_rate > 0 else ""
        return f"The request body did not arrive in time ({self.timeout:g} s at most{pace})"


async def read_body(
    request: web.Request, limit: int, replay_limit: int, deadline: BodyDeadline
) -> Body:
    """The body in memory when it is small (replayable), else a capped stream; both read
    within ``deadline``."""
    if not request.body_exists:
        return None
    length = request.content_length
    if length is not None and length > limit:
        raise RequestTooLarge(too_large(limit))
    if "Expect" in request.headers and request.version >= (1, 1):
        # Checked and accepted: only now invite the body (RFC 9110 10.1.1).
        await request.writer.write(CONTINUE)
    head = bytearray()
    while len(head) <= replay_limit:
        chunk = await deadline.read(request.content)
        if not chunk:
            return bytes(head)
        head += chunk
        if len(head) > limit:
            raise RequestTooLarge(too_large(limit))
    return CappedStream(bytes(head), request, limit, deadline)


class CappedStream:
    """A one-shot body stream that stops at ``limit`` bytes or at its ``deadline`` and
    remembers why (``exceeded``, ``deadline.timed_out``)."""

    def __init__(self, head: bytes, request: web.Request, limit: int, deadline: BodyDeadline):
        self.head = head
        self.request = request
        self.limit = limit
        self.deadline = deadline
        self.exceeded = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        size = len(self.head)
        yield self.head
        while chunk := await self.deadline.read(self.request.content):
            size += len(chunk)
            if size > self.limit:
                self.exceeded = True
                raise RequestTooLarge(too_large(self.limit))
            yield chunk
