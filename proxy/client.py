"""The one aiohttp client session: TLS always verified, timeouts, no cookies, no decoding.

Upstream requests and token requests share it; ``kounta-proxy authorize`` makes its own.
Bodies come as Kounta sent them (``auto_decompress`` off): the proxy checks and inflates
gzip itself, within bounds (:mod:`proxy.coding`).

An upstream that sends more bytes than its ``Content-Length`` gets nginx's reading: the
first Content-Length bytes are the response, the rest is dropped and the connection is
closed rather than reused (:class:`ExcessTolerant`). aiohttp's parser would otherwise fail
the whole response on the bytes after it.

Idle connections (docs/http-contract.md, "Idle upstream connections"): a pooled connection
is reused only within ``upstream.keepalive_timeout`` of its last answer, shorter by default
than common servers keep one, so the proxy, not the upstream, closes it; and only when the
upstream has not closed it meanwhile (:func:`peer_closed`, a check before anything is
written), nor outlived the idle limit the upstream announced (``Keep-Alive: timeout=N``, less
a margin: :func:`keepalive_hint`, as undici does). aiohttp's own resend of a failed request
is off: the retry layer decides.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import select
import ssl
import time
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.connector import Connection
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader

from proxy.compat.aiohttp import (
    CheckedReuse,
    no_hidden_resends,
    response_parser,
    response_payload,
    set_protocol_factory,
    set_response_parser,
    skips_payload,
)
from proxy.logs import event
from proxy.settings import UpstreamSettings

# A response head (status line and fields) longer than this is never buffered for recovery.
HEAD_LIMIT = 64 * 1024
# An upstream's announced idle limit (Keep-Alive: timeout=N) is trusted less this much (at
# most half of it): its clock starts when it sent an answer, ours when the head arrived here,
# a network delay later. undici takes off 1-2 s the same way.
HINT_MARGIN = 1.0


def keepalive_hint(values: Iterable[str]) -> float | None:
    """Seconds the upstream says it keeps an idle connection (the smallest ``timeout=N`` of
    its ``Keep-Alive`` fields), or None when it says nothing readable."""
    found: float | None = None
    for value in values:
        for part in value.split(","):
            name, _, number = part.partition("=")
            number = number.strip()
            digits = number.isascii() and number.isdigit() and len(number) <= 9
            if name.strip().lower() == "timeout" and digits:
                found = int(number) if found is None else min(found, int(number))
    return found


def ssl_context(settings: UpstreamSettings) -> ssl.SSLContext:
    """Verification is always on; only the trust anchors are configurable.

    One context per trust-anchor file as it is on disk (its inode, size and mtime): loading a
    CA bundle takes ~30 ms and every upstream session made its own (each worker, each proxy
    of the tests). A bundle replaced or edited is loaded again."""
    cafile = settings.ca_bundle or None
    return _verifying_context(cafile, _file_stamp(cafile or ssl.get_default_verify_paths().cafile))


def _file_stamp(path: str | None) -> tuple[int, int, int] | None:
    try:
        found = os.stat(path) if path else None
    except OSError:
        found = None
    return None if found is None else (found.st_ino, found.st_size, found.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _verifying_context(cafile: str | None, stamp: tuple[int, int, int] | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class ExcessTolerant(ResponseHandler):
    """A response handler that keeps a complete response followed by bytes that are not one.

    Nothing changes for well-framed responses: the parser is only second-guessed after it
    has failed (:class:`_ExcessGuard`).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self._params: dict[str, Any] = {}
        self.discarding = False
        # time.monotonic() past which the upstream may have closed the idle connection.
        self.reuse_until = float("inf")

    def heard(self, messages: Iterable[tuple[Any, Any]]) -> None:
        """Response heads arrived: note the idle limit the last one announced, if any."""
        for message, _ in messages:
            hint = keepalive_hint(message.headers.getall("Keep-Alive", ()))
            self.reuse_until = (
                float("inf")
                if hint is None
                else time.monotonic() + hint - min(HINT_MARGIN, hint / 2)
            )

    def set_response_params(self, **params: Any) -> None:
        self._params = params
        self.discarding = False
        super().set_response_params(**params)
        set_response_parser(self, _ExcessGuard(self, response_parser(self)))

    def fresh_parser(self) -> Any:
        """A new parser made like the current one (the current one has failed)."""
        ResponseHandler.set_response_params(self, **self._params)
        return response_parser(self)

    def data_received(self, data: bytes) -> None:
        if self.discarding:
            return  # more excess after the response: the connection closes when released
        super().data_received(data)


class _ExcessGuard:
    """Stands in for the response parser and recovers the response it failed on, when the
    failure is only bytes after a complete response."""

    def __init__(self, handler: ExcessTolerant, parser: Any) -> None:
        self.handler = handler
        self.parser = parser
        self.head = bytearray()  # bytes of a response whose head was not parsed yet

    def __getattr__(self, name: str) -> Any:
        return getattr(self.parser, name)

    def feed_data(self, data: bytes) -> Any:
        payload = response_payload(self.handler)
        body_under_way = isinstance(payload, StreamReader) and not payload.is_eof()
        try:
            result = self.parser.feed_data(data)
        except HttpProcessingError:
            recovered = self._recover(data, payload if body_under_way else None)
            if recovered is None:
                raise
            return recovered
        if result[0]:
            self.head.clear()
            self.handler.heard(result[0])
        elif not body_under_way and len(self.head) + len(data) <= HEAD_LIMIT:
            self.head += data
        return result

    def _recover(self, data: bytes, payload: Any) -> Any:
        if payload is not None:
            # The body under way ended in this data; the parser failed on what followed.
            if not payload.is_eof():
                return None
            self._excess(len(data))  # at most this much; the body's end is inside
            return ((), False, b"")
        buf = bytes(self.head) + data
        end = message_end(buf, skips_payload(self.handler))
        if end is None or end >= len(buf):
            return None
        fresh = self.handler.fresh_parser()
        self.parser = fresh
        set_response_parser(self.handler, self)
        self.head.clear()
        result = fresh.feed_data(buf[:end])
        self._excess(len(buf) - end)
        return result

    def _excess(self, size: int) -> None:
        self.handler.force_close()
        self.handler.discarding = True
        event("upstream_excess_bytes", logging.WARNING, bytes=size, action="connection_closed")


def message_end(buf: bytes, skip_payload: bool) -> int | None:
    """Where the first final response in ``buf`` ends when framed by Content-Length (interim
    1xx heads skipped); None when it is not (chunked, no length, a broken head)."""
    pos = 0
    while True:
        end = buf.find(b"\r\n\r\n", pos)
        if end < 0:
            return None
        lines = buf[pos:end].split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            return None
        status, body_at = int(parts[1]), end + 4
        if 100 <= status < 200 and status != 101:
            pos = body_at
            continue
        lengths = set()
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            lowered = name.strip().lower()
            if lowered == b"transfer-encoding" or status == 101:
                return None
            if lowered == b"content-length":
                lengths.add(value.strip())
        if skip_payload or status in (204, 304):
            return body_at
        if len(lengths) != 1:
            return None
        length = lengths.pop()
        return body_at + int(length) if length.isdigit() else None


def peer_closed(transport: asyncio.BaseTransport | None) -> bool:
    """Whether an idle connection's socket has something to read: the peer's FIN or RST, or
    bytes nobody asked for. Either way it cannot carry another request.

    The event loop learns of a close only on its next turn; a request taken from the pool in
    between would be written to a connection the upstream has already closed, and for a POST
    nobody could then tell whether it was applied. A poll that waits for nothing sees what the
    kernel already holds (urllib3's and curl's check before they reuse a connection)."""
    if transport is None or transport.is_closing():
        return True
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False  # not a socket transport: nothing to look at
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN | select.POLLPRI)
    return bool(poller.poll(0))


def _nothing() -> None:
    pass


class Connector(CheckedReuse):
    """aiohttp's TCP connector with :class:`ExcessTolerant` responses, handing out a pooled
    connection only while the upstream has not closed it (:func:`peer_closed`) and its
    announced idle limit has not passed; ``dropped`` hears each one the upstream had closed."""

    def __init__(self, dropped: Callable[[], None] = _nothing, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dropped = dropped
        set_protocol_factory(self, ExcessTolerant)

    def reusable(self, connection: Connection) -> bool:
        protocol = connection.protocol
        if isinstance(protocol, ExcessTolerant) and time.monotonic() >= protocol.reuse_until:
            return False  # past the upstream's own announced limit
        if peer_closed(connection.transport):
            self.dropped()
            return False
        return True


def create_session(
    settings: UpstreamSettings, accounts: int = 1, dropped: Callable[[], None] = _nothing
) -> aiohttp.ClientSession:
    """``accounts``: how many accounts share the pool; the connector holds every account's
    share (``upstream.account_pool_size``) at once, and one token request per account
    besides, so a request within its account's share never waits in the connector, where a
    wait could not be told from a slow connect (and would count for a breaker). ``dropped``
    hears each pooled connection found closed by the upstream (:class:`Connector`)."""
    shares = max(settings.pool_size, settings.account_share(accounts) * accounts)
    idle = settings.keepalive_timeout
    connector = Connector(
        dropped,
        limit=shares + accounts,
        ssl=ssl_context(settings),
        ttl_dns_cache=300,
        enable_cleanup_closed=False,
        # 0: a new connection for every request (aiohttp wants None with force_close).
        force_close=idle == 0,
        keepalive_timeout=idle or None,
    )
    timeout = aiohttp.ClientTimeout(
        total=settings.total_timeout,
        sock_connect=settings.connect_timeout,
        sock_read=settings.read_timeout,
    )
    # No cookie jar: Kounta is stateless and one caller's cookies must not reach another's.
    session = aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=("User-Agent",),
    )
    no_hidden_resends(session)
    return session
