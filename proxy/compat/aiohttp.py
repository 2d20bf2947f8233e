"""Every touch of aiohttp's private parts, for what its public API cannot do.

Server side (:mod:`proxy.listener`): build our own request protocol (a subclass answering
unparsable requests as JSON, keeping head deadlines and the connection cap) in place of
aiohttp's, which means swapping the class of the ``Server`` an ``AppRunner`` makes and
building the protocol with the server's loop and keyword arguments; read whether a protocol
waits for a request head (its ``_waiter``, which aiohttp's own keep-alive timer reads too);
read the bound sockets of a site. Answer a request in the protocol itself, as each is parsed
(:func:`answer_in_protocol`): the protocol's parser is wrapped so that the leading messages
of each feed are offered to the listener first while the protocol is idle (its ``_waiter``,
``_messages``, ``_close``, ``_force_close``, ``_upgraded``, ``_payload_parser``); an answered
message frees its parser slot (``message_consumed``) and restarts aiohttp's keep-alive clock
(``_next_keepalive_close_time``, ``_keepalive_handle``); a request answered later is marked in
progress for the graceful shutdown (``_request_in_progress``, ``_handler_waiter``) and
its keep-alive close put off meanwhile (:func:`hold_keepalive`, :func:`release_keepalive`;
aiohttp's ``_process_keepalive`` reschedules itself when fired early), a shutdown's close of idle
connections left for after its answer (:func:`close_later`, ``_close``), what
comes behind it is held (``_pause_reading_for_buffer``) and then queued as aiohttp queues
(``_messages``, ``_request_count``, ``_waiter``); the answer's bytes are the ones aiohttp
writes for a ``web.Response`` (:func:`render_response`, :func:`render_head`: its header
rules, its ``_serialize_headers`` and Date).

Client side (:mod:`proxy.client`, :mod:`proxy.pipeline.direct`): a response protocol that
recovers a complete response followed by excess bytes stands in the connector's protocol
factory, wraps the protocol's parser, and reads its current payload and whether the response
has no body (HEAD). A connector checks each pooled connection before it is handed out again
(:class:`CheckedReuse`, over the connector's ``_get``), and the session's own resend of a
request whose connection failed is turned off (:func:`no_hidden_resends`), so the retry
layer alone decides resends. A flight's conditional GET may take a kept-alive connection
from the connector's pool itself (:func:`pooled`, the connector's ``_get`` under the key a
session's request uses, :func:`connection_key`) and read its answer with the connection's
own protocol, set up as the session sets it up (:func:`response_params`: the session's
defaults and the connector's ``_timeout_ceil_threshold``).

Besides these names, the subclasses override methods aiohttp does not document as hooks
(:data:`OVERRIDES`). :data:`PINS` lists every assumption; ``tests/unit/test_compat.py``
checks each and names :data:`WRITTEN_AGAINST` when one fails after an upgrade.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import socket
from collections.abc import Callable
from typing import Any, TypeVar, cast

import aiohttp
from aiohttp import web
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ClientRequest, ConnectionKey
from aiohttp.connector import Connection
from aiohttp.helpers import must_be_empty_body, rfc822_formatted_time, should_remove_content_length
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11, RawRequestMessage
from aiohttp.http_writer import _serialize_headers
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.tracing import Trace
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_response import REASON_PHRASES
from aiohttp.web_server import Server
from multidict import CIMultiDict
from yarl import URL

WRITTEN_AGAINST = "3.14.5"

P = TypeVar("P", bound=RequestHandler)

# --- server side


def waiting_for_request(protocol: RequestHandler) -> bool:
    """Whether the protocol waits for a request head (none is being answered)."""
    waiter = protocol._waiter
    return waiter is not None and not waiter.done()


def protocol_loop(protocol: RequestHandler) -> asyncio.AbstractEventLoop:
    return protocol._loop


def make_protocol(server: Server, cls: type[P], **extra: Any) -> P:
    """A protocol of class ``cls`` made as ``server`` makes its own (``Server.__call__``)."""
    return cls(server, loop=server._loop, **server._kwargs, **extra)


Message = tuple[RawRequestMessage, StreamReader]
# Offered the leading messages of a feed; gives back those aiohttp must handle (a tail).
Take = Callable[[list[Message]], list[Message]]


class _Answering:
    """A protocol's request parser whose parsed messages pass through ``take`` first."""

    __slots__ = ("limit", "parser", "take")

    def __init__(self, parser: Any, take: Take, limit: int) -> None:
        self.parser, self.take, self.limit = parser, take, limit

    def feed_data(self, data: bytes) -> tuple[Any, bool, bytes]:
        while True:
            messages, upgraded, tail = self.parser.feed_data(data)
            if not messages or upgraded:
                return messages, upgraded, tail
            rest = self.take(list(messages))
            if rest or len(messages) < self.limit:
                return rest, upgraded, tail
            # All taken, and the parser stopped at its queue limit: parse what it kept.
            data = b""

    def message_consumed(self) -> None:
        self.parser.message_consumed()

    def set_upgraded(self, val: bool) -> None:
        self.parser.set_upgraded(val)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.parser, name)


def answer_in_protocol(protocol: RequestHandler, take: Take) -> None:
    """Offer every parsed message of ``protocol`` to ``take`` before aiohttp queues it.
    ``take`` must only take messages while :func:`idle` says so, and call :func:`taken`
    for what it took."""
    protocol._parser = cast(Any, _Answering(protocol._parser, take, protocol._max_msg_queue_size))


def idle(protocol: RequestHandler) -> bool:
    """Whether a message parsed now would be the next one aiohttp handles, at once and in
    the open: waiting for a request head, none queued, not closing, no upgrade or body
    parser, and the transport not holding back writes."""
    waiter = protocol._waiter
    return (
        waiter is not None
        and not waiter.done()
        and not protocol._messages
        and not protocol._close
        and not protocol._force_close
        and not protocol._upgraded
        and protocol._payload_parser is None
        and not protocol.writing_paused
    )


def plain(message: RawRequestMessage, payload: StreamReader) -> bool:
    """A request over HTTP/1.1 that keeps the connection, without a body or an upgrade."""
    return (
        payload is EMPTY_PAYLOAD
        and message.version == HttpVersion11
        and not message.should_close
        and not message.upgrade
        and not message.chunked
    )


def taken(protocol: RequestHandler, count: int, now: float) -> None:
    """``count`` messages were answered outside aiohttp at ``now`` (loop time): their parser
    slots are free, and the keep-alive clock runs from now, as after aiohttp's own answers
    (``start()``)."""
    parser = cast(Any, protocol._parser)
    for _ in range(count):
        parser.message_consumed()
    timeout = protocol._keepalive_timeout
    if timeout > 0 and protocol._keepalive:
        close_time = now + timeout
        protocol._next_keepalive_close_time = close_time
        if protocol._keepalive_handle is None:
            protocol._keepalive_handle = protocol._loop.call_at(
                close_time, protocol._process_keepalive
            )


# A parked request's keep-alive close time (loop time, seconds): later than any park lasts,
# and small enough for libuv's millisecond timers (uvloop). aiohttp's keep-alive check, if it
# fires meanwhile, finds it not yet due and reschedules itself there.
HELD = 1e12


def hold_keepalive(protocol: RequestHandler) -> None:
    """No keep-alive close while a request of ``protocol`` waits outside a handler task (the
    connection is not idle, though aiohttp's ``start()`` waits for a head): its close time is
    put off (:data:`HELD`), the timer left armed (no cancel and no new timer per park); the
    clock starts again with :func:`release_keepalive`, then :func:`taken`."""
    protocol._next_keepalive_close_time = HELD


def release_keepalive(protocol: RequestHandler, handed: bool) -> None:
    """The request held by :func:`hold_keepalive` is over: answered here (:func:`taken` sets
    the close time next) or ``handed`` to aiohttp (whose ``start()`` sets it after its
    answer). A timer that fired during the hold (rescheduled at :data:`HELD`), or any timer
    when handed over (the long way may outlast its old deadline, which would then reschedule
    it at :data:`HELD`), is dropped, so that the next close time arms a new one."""
    handle = cast(asyncio.TimerHandle | None, protocol._keepalive_handle)  # made by call_at
    if handle is not None and (handed or handle.when() >= HELD):
        handle.cancel()
        protocol._keepalive_handle = None


def closing(protocol: RequestHandler) -> bool:
    """Whether ``protocol`` was asked to close once its requests are answered."""
    return bool(protocol._close)


def close_later(protocol: RequestHandler) -> None:
    """``RequestHandler.close()`` for a protocol whose request is answered outside a handler
    task: closing, but its ``start()`` loop left waiting (``close()`` would cancel it), so
    that the request can still be handed to it; it closes the connection once that is
    answered, or :meth:`RequestHandler.close` ends it once the answer is written."""
    protocol._close = True


def enqueue(protocol: RequestHandler, messages: list[Message]) -> None:
    """Hand ``messages`` to aiohttp as its ``data_received`` does with what it parsed:
    queued in order, the waiting ``start()`` woken, reading paused on a full queue."""
    queue = protocol._messages
    protocol._request_count += len(messages)
    queue.extend(messages)
    waiter = protocol._waiter
    if messages and waiter is not None and not waiter.done():
        waiter.set_result(None)
    if not protocol._buffer_paused and len(queue) >= protocol._max_msg_queue_size:
        protocol._pause_reading_for_buffer()


def hold_reading(protocol: RequestHandler) -> None:
    """Stop reading from the transport, as aiohttp does when its queue is full; undone by
    :func:`release_reading` (or by ``start()`` once aiohttp's queue drains)."""
    if not protocol._buffer_paused:
        protocol._pause_reading_for_buffer()


def release_reading(protocol: RequestHandler) -> None:
    """Parse what the parser kept and read again, unless aiohttp's queue is still full."""
    if protocol._buffer_paused:
        protocol._resume_reading_if_drained()


def answering(protocol: RequestHandler, busy: bool) -> None:
    """Tell aiohttp's graceful shutdown that a request of ``protocol`` is being answered
    outside a handler task (``busy``: it waits for it, as for a handler's), or no longer."""
    protocol._request_in_progress = busy
    waiter = protocol._handler_waiter
    if not busy and waiter is not None and not waiter.done():
        waiter.set_result(None)


def render_response(
    status: int, headers: CIMultiDict[str], body: bytes, date: str | None = None
) -> bytes:
    """The bytes aiohttp writes for ``web.Response(status=status, headers=headers, body=body or
    None)`` answering a GET on a kept-alive HTTP/1.1 connection, with no on_response_prepare
    hook (the caller applies its own first); ``headers`` is changed; ``date``: the Date it
    adds when ``headers`` has none (default: aiohttp's, now)."""
    head, with_body = render_head(status, headers, len(body), date)
    return head + body if with_body else head


def render_head(
    status: int, headers: CIMultiDict[str], length: int, date: str | None = None
) -> tuple[bytes, bool]:
    """:func:`render_response`'s head for a body of ``length`` bytes (none made), and whether
    the body follows it (for a GET, aiohttp drops Content-Length where the body is empty)."""
    empty = must_be_empty_body("GET", status)
    if "Content-Length" in headers:
        if should_remove_content_length("GET", status):
            del headers["Content-Length"]
    elif (length or status != 304) and not should_remove_content_length("GET", status):
        headers["Content-Length"] = str(length)
    if empty:
        headers.popall("Transfer-Encoding", None)
    elif int(headers["Content-Length"]) != 0:
        headers.setdefault("Content-Type", "application/octet-stream")
    if "Date" not in headers:
        headers["Date"] = rfc822_formatted_time() if date is None else date
    headers.setdefault("Server", SERVER_SOFTWARE)
    head: bytes = _serialize_headers(f"HTTP/1.1 {status} {REASON_PHRASES.get(status, '')}", headers)
    return head, not empty and length > 0


_date: tuple[str, bytes] = ("", b"")


def http_date() -> bytes:
    """The Date :func:`render_response` adds now, encoded (once a second)."""
    global _date
    now = rfc822_formatted_time()
    if now != _date[0]:
        _date = (now, now.encode())
    return _date[1]


class HookedRunner(web.AppRunner):
    """An ``AppRunner`` whose server passes through :meth:`customise` once made."""

    def customise(self, server: Server) -> Server:
        return server

    async def _make_server(self) -> Server:
        return self.customise(await super()._make_server())


def swap_server_class(server: Server, cls: type[Server]) -> None:
    """Make ``server`` an instance of ``cls`` (a subclass adding no state of its own but
    class attributes), so that it builds ``cls``'s protocols."""
    server.__class__ = cls


def site_sockets(site: web.BaseSite) -> list[socket.socket]:
    server = getattr(site, "_server", None)
    return list(getattr(server, "sockets", None) or [])


def site_server(site: web.BaseSite) -> asyncio.AbstractServer | None:
    """The asyncio server a started site listens through (closed by ``site.stop()``)."""
    return site._server


def set_site_server(site: web.BaseSite, server: asyncio.AbstractServer) -> None:
    """Make ``server`` the one ``site`` reports sockets of and closes when it stops."""
    site._server = server


# --- client side


def response_parser(protocol: ResponseHandler) -> Any:
    return protocol._parser


def set_response_parser(protocol: ResponseHandler, parser: Any) -> None:
    protocol._parser = parser


def response_payload(protocol: ResponseHandler) -> Any:
    """The body stream of the response being read (or the last one)."""
    return protocol._payload


def skips_payload(protocol: ResponseHandler) -> bool:
    """Whether the response being read has no body whatever its head says (HEAD)."""
    return bool(protocol._skip_payload)


def set_protocol_factory(
    connector: aiohttp.TCPConnector, factory: Callable[..., ResponseHandler]
) -> None:
    """New connections of ``connector`` speak ``factory(loop=...)``'s protocol."""
    connector._factory = cast(Any, functools.partial(factory, loop=connector._loop))


def no_hidden_resends(session: aiohttp.ClientSession) -> None:
    """``session`` never sends a request again by itself when its connection fails.

    aiohttp resends GET, HEAD, OPTIONS, TRACE, PUT and DELETE once on a closed or reset
    connection, even after the request was written (so possibly applied), without the budget
    token, the metric or ``retry.methods`` (where PUT and DELETE are opt-in) that the retry
    layer applies. aiohttp's own test client turns it off the same way."""
    session._retry_connection = False


class CheckedReuse(aiohttp.TCPConnector):
    """A TCP connector that asks :meth:`reusable` before it hands out a pooled connection
    again; one that is not is closed (nothing was written to it) and the next pooled one, or
    a new connection, is taken instead."""

    def reusable(self, connection: Connection) -> bool:
        return True

    async def _get(self, key: ConnectionKey, traces: list[Trace]) -> Connection | None:
        while True:
            found = await super()._get(key, traces)
            if found is None or self.reusable(found):
                return found
            found.close()


def connection_key(url: URL) -> ConnectionKey:
    """The key a request of our session to ``url`` pools its connection under: no proxy,
    the connector's own TLS context (``ssl=True``), no server_hostname override."""
    host = url.raw_host or ""
    return ConnectionKey(host, url.port, url.scheme == "https", True, None, None, None)


async def pooled(connector: aiohttp.BaseConnector, key: ConnectionKey) -> Connection | None:
    """A kept-alive connection for ``key`` from ``connector``'s pool, counted as acquired
    against its limits and checked as its ``_get`` checks (:class:`CheckedReuse`), or None
    when none is pooled. Its ``release()`` gives it back, ``close()`` closes it."""
    return await connector._get(key, [])


def response_params(connector: aiohttp.BaseConnector, read_timeout: float | None) -> dict[str, Any]:
    """The keyword arguments ``ClientSession._request`` passes ``set_response_params`` for a
    GET of a session made with the defaults (:func:`proxy.client.create_session`), no total
    timer (the caller keeps its own), no decompression."""
    return {
        "timer": None,
        "skip_payload": False,
        "read_until_eof": False,
        "auto_decompress": False,
        "read_timeout": read_timeout,
        "read_bufsize": SESSION_DEFAULTS["read_bufsize"],
        "timeout_ceil_threshold": connector._timeout_ceil_threshold,
        "max_line_size": SESSION_DEFAULTS["max_line_size"],
        "max_field_size": SESSION_DEFAULTS["max_field_size"],
        "max_headers": SESSION_DEFAULTS["max_headers"],
    }


def request_head(line: str, headers: CIMultiDict[str]) -> bytes:
    """A request's line and header section as aiohttp's writer serialises them (a control
    character in a name or value is refused with ValueError, as there)."""
    head: bytes = _serialize_headers(line, headers)
    return head


# ClientSession's defaults for what the response parser takes (checked by a pin).
SESSION_DEFAULTS = {
    "read_bufsize": 2**18,
    "max_line_size": 8190,
    "max_field_size": 8190,
    "max_headers": 128,
}


# --- what the tests pin

# Methods our subclasses override that aiohttp does not document as hooks, with the
# parameters we rely on.
OVERRIDES: dict[str, tuple[Callable[..., Any], tuple[str, ...]]] = {
    "RequestHandler.handle_error": (
        RequestHandler.handle_error,
        ("self", "request", "status", "exc", "message"),
    ),
    "RequestHandler.finish_response": (
        RequestHandler.finish_response,
        ("self", "request", "resp", "start_time"),
    ),
    "RequestHandler.data_received": (RequestHandler.data_received, ("self", "data")),
    "RequestHandler.connection_made": (RequestHandler.connection_made, ("self", "transport")),
    "RequestHandler.connection_lost": (RequestHandler.connection_lost, ("self", "exc")),
    "ResponseHandler.set_response_params": (ResponseHandler.set_response_params, ("self",)),
    "ResponseHandler.data_received": (ResponseHandler.data_received, ("self", "data")),
    "BaseConnector._get": (aiohttp.BaseConnector._get, ("self", "key", "traces")),
}


def _names(function: Callable[..., Any]) -> tuple[str, ...]:
    code = getattr(function, "__code__", None)
    return tuple(code.co_names) if code is not None else ()


def _slots(cls: type) -> set[str]:
    return {name for klass in cls.__mro__ for name in getattr(klass, "__slots__", ())}


def _pins() -> dict[str, Callable[[], bool]]:
    def params(function: Callable[..., Any], names: tuple[str, ...]) -> bool:
        return tuple(inspect.signature(function).parameters)[: len(names)] == names

    return {
        "AppRunner._make_server is a coroutine function": lambda: inspect.iscoroutinefunction(
            web.AppRunner._make_server
        ),
        "Server.__call__ makes RequestHandler(self, loop=self._loop, **self._kwargs)": lambda: (
            {
                "_loop",
                "_kwargs",
            }
            <= set(_names(Server.__call__))
        ),
        "Server.__init__ sets request_handler, _loop and _kwargs": lambda: (
            {
                "request_handler",
                "_loop",
                "_kwargs",
            }
            <= set(_names(Server.__init__))
        ),
        "Server.connections lists the open protocols": lambda: isinstance(
            Server.connections, property
        ),
        "RequestHandler._waiter is awaited by start() and read by _process_keepalive": lambda: (
            "_waiter" in _slots(RequestHandler)
            and "_waiter" in _names(RequestHandler.start)
            and "_waiter" in _names(RequestHandler._process_keepalive)
        ),
        "RequestHandler.start() checks _force_close before lingering": lambda: (
            "_force_close" in _names(RequestHandler.start)
        ),
        "RequestHandler has _loop, transport and keepalive_timeout": lambda: (
            "keepalive_timeout" in inspect.signature(RequestHandler.__init__).parameters
            and "_loop" in _slots(RequestHandler)
            and "transport" in _slots(RequestHandler)
        ),
        "RequestHandler keeps the state answer_in_protocol reads and writes": lambda: (
            {
                "_parser",
                "_messages",
                "_close",
                "_force_close",
                "_upgraded",
                "_payload_parser",
                "_max_msg_queue_size",
                "_keepalive",
                "_keepalive_timeout",
                "_keepalive_handle",
                "_next_keepalive_close_time",
            }
            <= _slots(RequestHandler)
        ),
        "RequestHandler keeps the queue, pause and shutdown state enqueue/answering use": lambda: (
            {"_request_count", "_request_in_progress", "_handler_waiter"} <= _slots(RequestHandler)
            and {"_buffer_paused"} <= _slots(RequestHandler)
            and callable(getattr(RequestHandler, "_pause_reading_for_buffer", None))
            and callable(getattr(RequestHandler, "_resume_reading_if_drained", None))
            and {"_request_in_progress", "_handler_waiter"} <= set(_names(RequestHandler.shutdown))
            and {"_request_in_progress", "_handler_waiter"}
            <= set(_names(RequestHandler._handle_request))
        ),
        "RequestHandler.data_received stops on _close/_force_close, feeds _parser": lambda: (
            {"_close", "_force_close", "_parser", "feed_data", "_messages", "_waiter"}
            <= set(_names(RequestHandler.data_received))
        ),
        "RequestHandler._process_keepalive reschedules itself (call_at, _keepalive_handle) "
        "while _next_keepalive_close_time is not yet due": lambda: (
            {"call_at", "_keepalive_handle", "_next_keepalive_close_time"}
            <= set(_names(RequestHandler._process_keepalive))
        ),
        "RequestHandler.start() frees parser slots and restarts the keep-alive clock": lambda: (
            {"message_consumed", "_next_keepalive_close_time", "_keepalive_handle"}
            <= set(_names(RequestHandler.start))
            and "_next_keepalive_close_time" in _names(RequestHandler._process_keepalive)
        ),
        "BaseSite keeps its asyncio server in _server": lambda: "_server" in _slots(web.BaseSite),
        "ResponseHandler has _parser, _payload, _skip_payload and _loop": lambda: (
            {
                "_parser",
                "_payload",
                "_skip_payload",
                "_loop",
            }
            <= set(_names(ResponseHandler.__init__)) | _slots(ResponseHandler)
        ),
        "ResponseHandler.data_received feeds self._parser and sets self._payload": lambda: (
            {
                "_parser",
                "_payload",
                "_skip_payload",
            }
            <= set(_names(ResponseHandler.data_received))
        ),
        "TCPConnector makes protocols with self._factory (a partial taking loop)": lambda: (
            "_factory" in _names(aiohttp.BaseConnector.__init__)
            and "_factory" in _names(aiohttp.TCPConnector._create_direct_connection)
        ),
        "BaseConnector.connect takes a pooled connection with _get, a coroutine": lambda: (
            "_get" in _names(aiohttp.BaseConnector.connect)
            and inspect.iscoroutinefunction(aiohttp.BaseConnector._get)
        ),
        "ConnectionKey is (host, port, is_ssl, ssl, proxy, proxy_auth, proxy_headers_hash, "
        "server_hostname) and a request's key is built from those": lambda: (
            ConnectionKey._fields
            == (
                "host",
                "port",
                "is_ssl",
                "ssl",
                "proxy",
                "proxy_auth",
                "proxy_headers_hash",
                "server_hostname",
            )
            and {"raw_host", "port", "scheme", "_ssl", "proxy", "proxy_auth", "server_hostname"}
            <= set(_names(ClientRequest.connection_key.fget))  # type: ignore[attr-defined]
        ),
        "ClientSession's parser defaults are SESSION_DEFAULTS (set_response_params's)": lambda: (
            all(
                inspect.signature(aiohttp.ClientSession.__init__).parameters[name].default == value
                for name, value in SESSION_DEFAULTS.items()
            )
            and set(SESSION_DEFAULTS) | {"timeout_ceil_threshold", "read_timeout", "timer"}
            <= set(inspect.signature(ResponseHandler.set_response_params).parameters)
        ),
        "BaseConnector keeps _timeout_ceil_threshold; _get gives an acquired Connection": lambda: (
            "_timeout_ceil_threshold" in _names(aiohttp.BaseConnector.__init__)
            and "Connection" in _names(aiohttp.BaseConnector._get)
            and "_acquired" in _names(aiohttp.BaseConnector._get)
        ),
        "ClientSession._request resends only while _retry_connection (in ATTRS) says so": lambda: (
            "_retry_connection" in _names(aiohttp.ClientSession._request)
            and "_retry_connection" in aiohttp.ClientSession.ATTRS
        ),
        **{
            f"{name}{names}": functools.partial(params, function, names)
            for name, (function, names) in OVERRIDES.items()
        },
    }


PINS = _pins()
