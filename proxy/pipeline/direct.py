"""A flight's conditional GET on a kept-alive connection, without the session's per-request
machinery (issue 21, docs/performance.md "The flight's conditional GET without the session").

aiohttp's ``ClientSession.request`` builds a ``ClientRequest``, a ``ClientResponse``, a
stream writer, a timeout handle and a timer context, traces and cookie handling for every
request: about 40 % of a revalidation's flight. For a conditional GET without a body, when
the connector holds a kept-alive connection for the upstream, :class:`Direct` does only what
that exchange needs: it takes the pooled connection from the connector (:func:`pooled`: the
connector's limits count it, and :class:`proxy.client.Connector` checks it is still usable
first), writes the request head aiohttp would write (same fields, same order, the same
serialisation and its refusal of control characters), and reads the answer with the
connection's own response protocol, set up as the session sets it up (the same C parser and
its header limits, the read timeout, :class:`proxy.client.ExcessTolerant`'s recovery and
``Keep-Alive`` hint). Any answer is handled (a 304 most often, but a 200 with its body, an
error status): :class:`DirectResponse` is the part of aiohttp's ``ClientResponse`` the
upstream layer reads. Errors are aiohttp's own exceptions, mapped by the layer as before.

With no pooled connection (the first request, or after the upstream closed them) the
request takes the session's way, which opens one (the connect timeout, TLS verification).
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from typing import Any

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.compat.aiohttp import connection_key, pooled, request_head, response_params

CONDITIONALS = ("If-None-Match", "If-Modified-Since")


def direct_candidate(method: str, body: object, headers: CIMultiDict[str]) -> bool:
    """Whether a request may go :class:`Direct`'s way: a conditional GET without a body
    (the flight's revalidation) and without a range."""
    if method != "GET" or body is not None or "Range" in headers:
        return False
    return CONDITIONALS[0] in headers or CONDITIONALS[1] in headers


class DirectResponse:
    """What the upstream layer reads of aiohttp's ``ClientResponse``, for an answer read on
    a pooled connection: the connection goes back to the pool at the body's end (at once
    for an answer without one), or is closed when released before it."""

    __slots__ = (
        "__weakref__",
        "_connection",
        "_timer",
        "content",
        "content_length",
        "headers",
        "status",
    )

    def __init__(self, connection: Any, until: float) -> None:
        self._connection = connection
        # The exchange's total time: one timer, from the request's write to its body's end.
        # It holds the answer weakly: one dropped unreleased is collected (and its
        # connection let go, as aiohttp's are) without waiting for the timer.
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_at(
            until, _expire, weakref.ref(self)
        )
        self.status = 0
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
        self.content: StreamReader = EMPTY_PAYLOAD
        self.content_length: int | None = None

    def _answered(self, message: Any, payload: StreamReader) -> None:
        self.status = message.code
        self.headers = message.headers
        self.content = payload
        length = message.headers.get("Content-Length")
        self.content_length = int(length) if length is not None else None
        if payload is EMPTY_PAYLOAD or payload.is_eof():
            self._end(close=False)
        else:
            payload.on_eof(self.release)

    def __del__(self) -> None:
        # Dropped before its end (a caller that left a streamed body): the connection goes
        # back, which closes it, its body unread (aiohttp's ClientResponse.__del__).
        if self._connection is not None:
            with contextlib.suppress(Exception):  # the loop may be closed already
                self._end(close=False)

    @property
    def closed(self) -> bool:
        return self._connection is None

    def expire(self) -> None:
        """The exchange's total time is up: what waits for its head or body hears a
        timeout, and the connection is closed."""
        self._timer = None
        error = aiohttp.ServerTimeoutError("The upstream exchange took too long")
        connection = self._connection
        if connection is None:
            return
        protocol = connection.protocol
        if self.status == 0:  # no head yet
            if protocol is not None:
                protocol.set_exception(error)
        elif not self.content.is_eof():
            self.content.set_exception(error)
        self._end(close=True)

    def _end(self, close: bool) -> None:
        timer = self._timer
        if timer is not None:
            self._timer = None
            timer.cancel()
        connection = self._connection
        if connection is not None:
            self._connection = None
            if close:
                connection.close()
            else:
                # The connector closes it instead when its body was not read to the end
                # (the protocol's should_close), as for aiohttp's own release().
                connection.release()

    async def read(self) -> bytes:
        body: bytes = await self.content.read()
        return body

    def release(self) -> None:
        self._end(close=False)

    def close(self) -> None:
        self._end(close=True)


def _expire(answer: weakref.ref[DirectResponse]) -> None:
    found = answer()
    if found is not None:
        found.expire()


class Direct:
    """Sends conditional GETs to one upstream on the session's pooled connections."""

    def __init__(self, session: aiohttp.ClientSession, base: URL, read_timeout: float) -> None:
        connector = session.connector
        assert connector is not None
        self.connector = connector
        self.key = connection_key(base)
        host = base.host_port_subcomponent
        assert host is not None
        self.host = host
        self.params = response_params(connector, read_timeout)

    def head(self, url: URL, headers: CIMultiDict[str]) -> bytes:
        """The bytes aiohttp writes for ``GET url`` with ``headers`` in our session
        (``ClientRequest.update_headers``, ``update_auto_headers`` with User-Agent
        skipped, ``send``). ``headers`` has its Accept-Encoding (the upstream layer sets it
        always, so aiohttp's default never applies)."""
        fields: CIMultiDict[str] = CIMultiDict()
        fields["Host"] = self.host
        for name, value in headers.items():
            if name.lower() == "host":
                fields[name] = value
            else:
                fields.add(name, value)
        if "Accept" not in fields:
            fields["Accept"] = "*/*"
        return request_head(f"GET {url.raw_path_qs} HTTP/1.1", fields)

    async def send(
        self, url: URL, headers: CIMultiDict[str], until: float
    ) -> DirectResponse | None:
        """The answer's head to ``GET url`` on a pooled connection, or None when none is
        pooled (nothing was sent). ``until``: loop time by which the whole exchange ends."""
        if self.connector.force_close:
            return None
        head = self.head(url, headers)  # a ValueError before any connection is taken
        connection = await pooled(self.connector, self.key)
        if connection is None:
            return None
        protocol = connection.protocol
        transport = None if protocol is None else protocol.transport
        if protocol is None or transport is None:
            connection.close()
            return None
        response = DirectResponse(connection, until)
        try:
            protocol.set_response_params(**self.params)
            transport.write(head)
            protocol.start_timeout()
            while True:
                try:
                    message, payload = await protocol.read()
                except HttpProcessingError as e:
                    raise aiohttp.ClientResponseError(
                        aiohttp.RequestInfo(url, "GET", CIMultiDictProxy(headers), url),
                        (),
                        status=e.code,
                        message=e.message,
                    ) from e
                if not 100 <= message.code <= 199 or message.code == 101:
                    break
        except BaseException:
            response.close()
            raise
        response._answered(message, payload)
        return response
