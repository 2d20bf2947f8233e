"""A listener's life: start listening, wait for a signal, drain, stop.

Generic: the proxy, its admin port, the sandbox and ``authorize`` all listen through
:func:`start`. An application may hand the listener a request-handler wrapper under
:data:`WRAP_HANDLER` (the proxy's fresh-hit fast path); the listener knows nothing else
of what it serves. A handler that also answers some requests without a task
(:class:`AnswersNow`) gets them straight from the connection's protocol, as each is parsed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import re
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from proxy.answering import AnsweringProtocol, AnswerNow, AnswersNow
from proxy.compat.aiohttp import (
    HookedRunner,
    make_protocol,
    protocol_loop,
    set_site_server,
    site_server,
    site_sockets,
    swap_server_class,
    waiting_for_request,
)
from proxy.errors import JSON_CONTENT_TYPE, PROXY_ERROR_HEADER, code_for
from proxy.headers import SERVER_NAME
from proxy.logs import event, log


class StartupError(Exception):
    """The server cannot start; the message is one line for the operator."""


# How long an idle keep-alive connection stays open after an answer (nginx's default); a
# connection that sends nothing at all is closed after header_timeout instead.
KEEPALIVE_TIMEOUT = 75.0
# The listen queue: connections the kernel completes before the server accepts them.
BACKLOG = 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """What one connection may take: a deadline for each request head (slowloris), a cap on
    open connections, and how long it may idle between requests. At the cap, the keep-alive
    connection idle longest is closed to admit a new one (as nginx reuses idle connections);
    only when none is idle is the new one refused. ``on_drop(reason)`` hears each connection
    closed for these (``header_timeout``, ``max_connections``, ``keepalive_evicted``);
    ``on_count(n)`` the open connections."""

    header_timeout: float = 10.0
    max_connections: int = 1000
    on_drop: Callable[[str], None] | None = None
    on_count: Callable[[int], None] | None = None
    keepalive_timeout: float = KEEPALIVE_TIMEOUT


# Set by an application that wants limits other than the defaults.
LIMITS: web.AppKey[Limits] = web.AppKey("limits", Limits)
HEADER_TIMEOUT, MAX_CONNECTIONS = "header_timeout", "max_connections"
KEEPALIVE_EVICTED = "keepalive_evicted"
# Set on an answer after which the connection closes as soon as it is written, without
# aiohttp's lingering read of an unread request body (up to 10 s): for a caller too slow
# to send its body, whose remaining bytes are not worth waiting for.
CLOSE_AT_ONCE: web.ResponseKey[bool] = web.ResponseKey("close_at_once", bool)


def _raw_answer(status: int, reason: str, code: str, description: str) -> bytes:
    """A complete JSON error answer, written before (or instead of) any request."""
    body = json.dumps({"error": code, "error_description": description}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {JSON_CONTENT_TYPE}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\nCache-Control: no-store\r\n"
        f"{PROXY_ERROR_HEADER}: 1\r\nServer: {SERVER_NAME}\r\n\r\n"
    )
    return head.encode() + body


class _JsonErrorHandler(AnsweringProtocol):
    """aiohttp answers unparsable requests itself; make those answers JSON too. Also keeps
    :class:`Limits`: a request head must arrive within ``header_timeout`` (else 408 when some
    of it came, or a silent close when nothing did, as nginx does), and a connection beyond
    ``max_connections`` closes the keep-alive connection idle longest, or when none is idle
    is answered 503 and closed before anything is read."""

    def __init__(self, manager: Server, *, limits: Limits, **kwargs: Any) -> None:
        super().__init__(manager, answer=cast(_JsonErrorServer, manager).answer_now, **kwargs)
        self.limits = limits
        self.server = manager
        # One timer per connection, not one per request: _head_since is when the pending
        # request head began (loop time; None: none pending), and the timer, when it fires,
        # drops the connection or sleeps again until that head's own deadline.
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_since: float | None = None
        self._head_bytes = False
        # Requests whose head arrived, and when the last answer was written ("idle longest").
        self._requests = 0
        self._answered_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        count = len(self.server.connections)
        if self.limits.on_count is not None:
            self.limits.on_count(count)
        if count > self.limits.max_connections and not self._make_room():
            self._drop(MAX_CONNECTIONS, _TOO_MANY)
            return
        self._head_since = protocol_loop(self).time()
        self._arm(self._head_since)

    def _make_room(self) -> bool:
        """Whether this connection fits under the cap once the keep-alive connection idle
        longest is closed (connections closed but not yet gone do not count)."""
        others = [c for c in self.server.connections if c is not self and c.transport is not None]
        if len(others) < self.limits.max_connections:
            return True
        idle = [c for c in others if isinstance(c, _JsonErrorHandler) and c._idle()]
        if not idle:
            return False
        min(idle, key=lambda c: c._answered_at)._drop(KEEPALIVE_EVICTED, b"")
        return True

    def _idle(self) -> bool:
        """Between requests on a kept-alive connection: one was answered, no byte of the
        next has come (RFC 9112 9.3: such a connection may be closed at any time)."""
        return self._requests > 0 and self._waiting() and not self._head_bytes

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        server = self.server
        super().connection_lost(exc)
        if self.limits.on_count is not None:
            self.limits.on_count(len(server.connections))

    def data_received(self, data: bytes) -> None:
        if data and self._waiting():
            # Bytes of a new request head: its deadline runs from the first of them.
            self._head_bytes = True
            if self._head_since is None:
                self._head_since = protocol_loop(self).time()
                if self._head_timer is None:
                    self._arm(self._head_since)
        self._took = False
        super().data_received(data)
        if not self._head_bytes:
            return
        if not self._waiting():
            # The head is complete: a request is being answered. The timer stays; when it
            # fires it finds no head pending (cheaper than cancelling it for every request).
            self._head_since = None
            self._head_bytes = False
            self._requests += 1
        elif self._took:
            # Answered here (_take), and waiting again: a head is pending only when these
            # bytes end inside one, and its deadline runs from now.
            if data.endswith(b"\r\n\r\n"):
                self._head_since = None
                self._head_bytes = False
            else:
                self._head_since = protocol_loop(self).time()

    def _waiting(self) -> bool:
        """Whether the connection waits for a request head (none is being answered)."""
        return waiting_for_request(self) and not self.parked()

    def answered(self, count: int, now: float) -> None:
        self._requests += count
        self._answered_at = now
        self.server.requests_count += count

    def _arm(self, since: float) -> None:
        self._head_timer = protocol_loop(self).call_at(
            since + self.limits.header_timeout, self._timed_out
        )

    def _disarm(self) -> None:
        self._head_since = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _timed_out(self) -> None:
        self._head_timer = None
        since = self._head_since
        if since is None:
            return  # no head pending: the next one's first bytes arm the timer again
        if protocol_loop(self).time() < since + self.limits.header_timeout:
            self._arm(since)  # a later head than the one this timer was armed for
        elif self._waiting():
            self._drop(HEADER_TIMEOUT, _TIMED_OUT if self._head_bytes else b"")
        else:  # a request is being answered: its head came in time
            self._head_since = None

    async def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        finished = await super().finish_response(request, resp, start_time)
        self._answered_at = protocol_loop(self).time()
        if resp.get(CLOSE_AT_ONCE):
            self.force_close()  # the answer is written: the transport flushes it, then closes
        return finished

    def _drop(self, reason: str, answer: bytes) -> None:
        event("connection_dropped", reason=reason)
        if self.limits.on_drop is not None:
            self.limits.on_drop(reason)
        if answer and self.transport is not None:
            self.transport.write(answer)
        self.force_close()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        reason = type(exc).__name__ if exc is not None else "error"
        if status >= 500:
            log.error("unhandled_error", exc_info=exc)
        else:
            event("bad_http_request", status=status, reason=reason)
        code, description = "", "Internal proxy error"
        if status == 400:
            status, code, description = _parse_failure(exc, reason)
        body = {"error": code or code_for(status), "error_description": description}
        response = web.Response(
            status=status,
            body=json.dumps(body).encode(),
            headers={
                "Content-Type": JSON_CONTENT_TYPE,
                "Cache-Control": "no-store",
                PROXY_ERROR_HEADER: "1",
                # No library versions; on_response_prepare does not run for these answers.
                "Server": SERVER_NAME,
            },
        )
        response.force_close()
        return response


_TIMED_OUT = _raw_answer(
    408, "Request Timeout", "request_timeout", "The request head did not arrive in time"
)
_TOO_MANY = _raw_answer(
    503,
    "Service Unavailable",
    "temporarily_unavailable",
    "The proxy has too many open connections; try again shortly",
)
# What aiohttp's parser raises for each limit (max_line_size, max_field_size, max_headers).
_TOO_MANY_HEADERS = "Too many headers received"
# A LineTooLong excerpt that starts like a request line (C parser: the URL; pure-Python
# parser: the whole line) rather than like a header.
_REQUEST_LINE = re.compile(rb"[A-Z]+ |/|\*|[A-Za-z][A-Za-z0-9+.\-]*://")


def _parse_failure(exc: BaseException | None, reason: str) -> tuple[int, str, str]:
    """Status, code and description for a request aiohttp could not parse.

    Over-long targets get 414 and over-large header sections 431 (RFC 9110 15.5.15,
    RFC 6585 5) instead of a bare 400, so a caller knows what to shorten.
    """
    if isinstance(exc, LineTooLong):
        excerpt = (
            bytes(exc.args[0]) if exc.args and isinstance(exc.args[0], bytes | bytearray) else b""
        )
        if _REQUEST_LINE.match(excerpt):
            return 414, "uri_too_long", "The request target is longer than the proxy accepts"
        return 431, "request_header_fields_too_large", "A request header line is too long"
    if isinstance(exc, BadHttpMessage) and exc.message == _TOO_MANY_HEADERS:
        return 431, "request_header_fields_too_large", "The request has too many header lines"
    return 400, "", f"The request could not be parsed as HTTP ({reason})"


Handler = Callable[[BaseRequest], Awaitable[web.StreamResponse]]
Wrapper = Callable[[web.Application, Handler], Handler]
# Set by an application that wants a handler in front of its own (called once it started).
WRAP_HANDLER: web.AppKey[Wrapper] = web.AppKey("wrap_handler")


class _JsonErrorServer(Server):
    limits = Limits()
    answer_now: AnswerNow | None = None

    def __call__(self) -> RequestHandler:
        return make_protocol(self, _JsonErrorHandler, limits=self.limits)


def customise(server: Server, app: web.Application) -> Server:
    """Our protocol in place of aiohttp's, for what its public API cannot do: answer
    unparsable requests as JSON (the protocol's ``handle_error``), keep a deadline on request
    heads (whether the protocol waits for a request), close a connection right after an
    answer marked :data:`CLOSE_AT_ONCE` (the protocol's ``finish_response``, which also tells
    when a connection went idle; ``force_close`` skips the lingering read); put a handler
    in front of the application's once its startup built what it needs; and let that handler
    answer what it answers at once from the protocol (:class:`AnswersNow`). Every private part
    this touches is reached through :mod:`proxy.compat.aiohttp` (pinned by
    tests/unit/test_compat.py)."""
    swap_server_class(server, _JsonErrorServer)
    cast(_JsonErrorServer, server).limits = app.get(LIMITS, Limits())
    wrap = app.get(WRAP_HANDLER)
    if wrap is not None:
        handler = server.request_handler = wrap(app, server.request_handler)
        if isinstance(handler, AnswersNow):
            cast(_JsonErrorServer, server).answer_now = handler.answer_now
    return server


# How long accepting pauses when the process is out of descriptors or memory (asyncio's own).
ACCEPT_RETRY_DELAY = 1.0
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class _BatchAccept(asyncio.AbstractServer):
    """A site's listening sockets, accepted from by this object: every connection waiting
    when a socket turns readable (up to ``backlog``), as asyncio's own loop does.

    For uvloop: libuv accepts one connection per loop turn since 1.45 (libuv#3696), so a
    burst of connections (a client opening 128 at once) is accepted over 128 turns, each as
    long as it takes to serve the connections already open: the last one waited 300 ms
    (docs/performance.md, "uvloop's connection start"). Each accepted socket becomes
    the loop's own transport (``connect_accepted_socket``) with the site's protocol."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        factory: Callable[[], asyncio.Protocol],
        sockets: list[socket.socket],
        backlog: int,
    ) -> None:
        self._loop, self._factory, self._backlog = loop, factory, backlog
        self._sockets = sockets
        self._starting: set[asyncio.Task[Any]] = set()
        self._serving = False
        self._closed = asyncio.Event()
        for sock in sockets:
            sock.setblocking(False)
            sock.listen(backlog)
        self._watch()

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._sockets)

    def _watch(self) -> None:
        if self._sockets and not self._serving:
            self._serving = True
            for sock in self._sockets:
                self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _unwatch(self) -> None:
        if self._serving:
            self._serving = False
            for sock in self._sockets:
                self._loop.remove_reader(sock.fileno())

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(self._backlog):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno not in _OUT_OF_RESOURCES:
                    continue  # this connection's own error (aborted, a network's: accept(2))
                # Out of descriptors or memory: stop accepting for a while, as asyncio does.
                event("accept_paused", logging.ERROR, error=e.strerror or str(e))
                self._unwatch()
                self._loop.call_later(ACCEPT_RETRY_DELAY, self._watch)
                return
            conn.setblocking(False)
            start = self._loop.connect_accepted_socket(self._factory, conn)
            task = self._loop.create_task(start)
            self._starting.add(task)
            task.add_done_callback(self._started)

    def _started(self, task: asyncio.Task[Any]) -> None:
        self._starting.discard(task)
        if not task.cancelled():
            task.exception()  # a connection reset while its transport was made: nothing to do

    def close(self) -> None:
        self._unwatch()
        for sock in self._sockets:
            sock.close()
        self._sockets = []
        self._closed.set()

    def is_serving(self) -> bool:
        return self._serving

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    async def wait_closed(self) -> None:
        return None

    async def start_serving(self) -> None:
        self._watch()

    async def serve_forever(self) -> None:
        """Serve until closed (a site's listener serves from the start; nothing calls this)."""
        self._watch()
        await self._closed.wait()


async def _accept_in_batches(site: web.BaseSite, server: Server, backlog: int) -> None:
    """Take over accepting from the loop's own server of a started ``site``: its listening
    sockets (bound by the loop as for any site) stay open through copies, watched by a
    :class:`_BatchAccept` making the same protocols."""
    loop = asyncio.get_running_loop()
    own, listening = site_server(site), site_sockets(site)
    if own is None or not listening:
        return
    copies = [
        socket.socket(s.family, s.type, s.proto, fileno=os.dup(s.fileno())) for s in listening
    ]
    own.close()
    factory = cast(Callable[[], asyncio.Protocol], server)
    set_site_server(site, _BatchAccept(loop, factory, copies, backlog))


class Runner(HookedRunner):
    def customise(self, server: Server) -> Server:
        return customise(server, self.app)


async def start(
    app: web.Application,
    host: str,
    port: int,
    grace: float,
    reuse_port: bool = False,
    *,
    unix_path: str = "",
) -> Runner:
    """Start listening (on ``unix_path`` instead of host:port when given); a busy port or
    bad address becomes one :class:`StartupError` line."""
    # handler_cancellation: a caller that hangs up cancels its handler, and with it the
    # upstream request it was waiting on (shared cache fetches run in their own tasks).
    runner = Runner(
        app,
        access_log=None,
        shutdown_timeout=grace,
        handle_signals=False,
        handler_cancellation=True,
        keepalive_timeout=app.get(LIMITS, Limits()).keepalive_timeout,
    )
    try:
        await runner.setup()
    except OSError as e:
        # A cleanup context could not open its files (cache, tokens): one line, no traceback.
        where = f" ({e.filename})" if e.filename else ""
        raise StartupError(f"cannot start: {e.strerror or e}{where}") from None
    site: web.BaseSite
    if unix_path:
        site = web.UnixSite(runner, unix_path, backlog=BACKLOG)
    else:
        site = web.TCPSite(
            runner, host, port, backlog=BACKLOG, reuse_address=True, reuse_port=reuse_port or None
        )
    where = unix_path or f"{host}:{port}"
    try:
        await site.start()
        if not isinstance(asyncio.get_running_loop(), asyncio.BaseEventLoop):
            # uvloop: accept every waiting connection per turn, not one (_BatchAccept); a
            # Unix socket's path stays (the loop's server does not unlink it on close).
            await _accept_in_batches(site, cast(Server, runner.server), BACKLOG)
    except OSError as e:
        await runner.cleanup()
        if e.errno == errno.EADDRINUSE:
            raise StartupError(f"cannot listen on {where}: the port is already in use") from None
        raise StartupError(f"cannot listen on {where}: {e.strerror or e}") from None
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The port actually bound (useful when 0 asked the kernel to choose)."""
    for site in runner.sites:
        for sock in site_sockets(site):
            return int(sock.getsockname()[1])
    raise RuntimeError("not listening")


async def wait_for_signal(
    signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
) -> str:
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[str] = loop.create_future()

    def on_signal(sig: signal.Signals) -> None:
        if not stop.done():
            stop.set_result(sig.name)

    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await stop
    finally:
        for sig in signals:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)


async def run_until_signal(
    runners: Sequence[web.AppRunner],
    on_signal: Callable[[str], None] | None = None,
    drain_delay: float = 0.0,
) -> None:
    """Serve until SIGTERM/SIGINT, then stop the runners one after the other.

    ``on_signal`` runs first (readiness turns false at once). For ``drain_delay`` seconds
    every runner goes on serving new requests as before (load balancers and a sidecar's
    neighbour catch up with the readiness change meanwhile). Each runner then stops
    accepting, gives in-flight requests its ``shutdown_timeout`` to finish, and runs its
    cleanup contexts (sessions, cache, token files). Runners later in the list keep
    serving meanwhile: put the admin listener last so /readyz can say "shutting down".
    A second signal during the drain is not caught and ends the process at once.
    """
    name = await wait_for_signal()
    if on_signal is not None:
        on_signal(name)
    started = time.monotonic()
    event("shutdown", signal=name, drain_delay=drain_delay)
    if drain_delay > 0:
        await asyncio.sleep(drain_delay)
        event("drain_delay_over", seconds=round(time.monotonic() - started, 3))
    for runner in runners:
        await runner.cleanup()
    event("stopped", seconds=round(time.monotonic() - started, 3))
