"""Answers given in a connection's protocol as each request head is parsed: no aiohttp
request object, no handler task, no ``StreamResponse`` (for :mod:`proxy.listener`).

A request handler that can answer some requests at once (:class:`AnswersNow`) is offered
each leading message of a feed while the connection is idle; what it answers is written
with one ``transport.write``; the first message it does not answer, and every one after it,
goes to aiohttp in order. It may instead answer later (a :class:`Later`, or a plain entry
whose :class:`Host` answers it: the request waits in the protocol, later messages held back in
order) and then either give the bytes or hand the request to aiohttp after all
(:func:`handed_over`). aiohttp's private parts this needs are
reached through :mod:`proxy.compat.aiohttp`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol, cast, runtime_checkable

from aiohttp.http import RawRequestMessage
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from proxy.compat.aiohttp import (
    Message,
    answer_in_protocol,
    answering,
    close_later,
    closing,
    enqueue,
    hold_keepalive,
    hold_reading,
    idle,
    plain,
    protocol_loop,
    release_keepalive,
    release_reading,
    taken,
)
from proxy.logs import log


class Later(Protocol):
    """An answer given once something it waits for is done: ``then(done)`` calls ``done``
        once, from the loop, with the answer's bytes or None (the request goes to the handler,
        which finds this object with :func:`handed_over`); ``cancel()``: the connection closed
        first, ``done`` is never called; ``dropped()``: handed to the handler, but the connection
    closed before the handler took it."""

    def then(self, done: Callable[[bytes | None], None]) -> None: ...
    def cancel(self) -> None: ...
    def dropped(self) -> None: ...


class Host(Protocol):
    """Where a request waiting as a plain entry (a tuple, :data:`Plain`, its host first: no
    object of its own) waits: ``park(protocol, entry)`` once the protocol holds it;
    ``unpark(protocol, entry)``: the connection closed first. The host answers it with
    :meth:`AnsweringProtocol.woken` while the protocol is still :meth:`~AnsweringProtocol.
    parked_on` it."""

    def park(self, protocol: AnsweringProtocol, entry: Plain) -> None: ...
    def unpark(self, protocol: AnsweringProtocol, entry: Plain) -> None: ...


# A request waiting as a plain entry: its Host, then what the host keeps of it.
Plain = tuple[Any, ...]
AnswerNow = Callable[[RawRequestMessage, str | None, str], bytes | Later | Plain | None]
# Bytes held back behind a parked request before reading pauses (aiohttp's read size).
MAX_UNREAD = 2**16


def handed_over(request: BaseRequest) -> Later | None:
    """The :class:`Later` whose request this is, when the protocol waited for it and then
    handed it to the handler (the first request the handler sees after that)."""
    protocol = request.protocol
    if not isinstance(protocol, AnsweringProtocol) or protocol._handed is None:
        return None
    later, protocol._handed = protocol._handed, None
    return later


@runtime_checkable
class AnswersNow(Protocol):
    """A request handler that can also answer a request as soon as its head is parsed,
    without a request object or a task: ``answer_now(message, remote, scheme)`` gives the
    whole answer's bytes (as aiohttp would write its response on a kept-alive HTTP/1.1
    connection), or None: the request goes to the handler as usual. Offered only GETs and
    the like without a body over HTTP/1.1 that keep the connection, while the connection has
    nothing else to answer first; it must count and log what it answers."""

    def answer_now(
        self, message: RawRequestMessage, remote: str | None, scheme: str
    ) -> bytes | Later | Plain | None: ...


class AnsweringProtocol(RequestHandler):
    """aiohttp's request protocol, answering at once what ``answer`` answers
    (:class:`AnswersNow`); with no ``answer``, aiohttp's own."""

    def __init__(self, manager: Server, *, answer: AnswerNow | None, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        # Who the caller is (as BaseRequest.remote and .scheme say); _took: in this feed.
        self._answer = answer
        self._remote: str | None = None
        self._scheme = "http"
        self._took = False
        # A request waiting in the protocol for its answer (a Later or a plain entry), the
        # messages parsed from it on (held back, in order), and a Later whose request went
        # to aiohttp.
        self._parked: Later | Plain | None = None
        self._held: list[Message] = []
        self._handed: Later | None = None
        # Bytes that came while a request waited here: parsed once it is answered (so a
        # malformed or upgrading request behind it cannot be answered before it).
        self._unread = b""
        if answer is not None:
            answer_in_protocol(self, self._take)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._answer is not None:
            peer = transport.get_extra_info("peername")
            self._remote = str(peer[0]) if isinstance(peer, list | tuple) else peer and str(peer)
            self._scheme = "https" if transport.get_extra_info("sslcontext") else "http"

    def connection_lost(self, exc: BaseException | None) -> None:
        parked, self._parked = self._parked, None
        if parked is not None:
            self._held = []
            answering(self, False)
            if type(parked) is tuple:
                parked[0].unpark(self, parked)
            else:
                cast(Later, parked).cancel()
        handed, self._handed = self._handed, None
        if handed is not None:  # queued for aiohttp, which drops it now: nobody read it
            handed.dropped()
        super().connection_lost(exc)

    def close(self) -> None:
        if self._parked is None:
            super().close()
        else:  # a shutdown closing idle connections: this one owes an answer first
            close_later(self)

    def data_received(self, data: bytes) -> None:
        if self._parked is None:
            super().data_received(data)
            return
        self._unread += data
        if len(self._unread) >= MAX_UNREAD:
            hold_reading(self)

    def parked(self) -> bool:
        """Whether a request waits in the protocol for its answer."""
        return self._parked is not None

    def parked_on(self, entry: Plain) -> bool:
        """Whether ``entry`` is the request waiting in the protocol (its caller still there)."""
        return self._parked is entry

    def _take(self, messages: list[Message]) -> list[Message]:
        """Answer the leading messages of a feed that the handler answers at once
        (:class:`AnswersNow`), while the connection is idle and the transport takes writes;
        the rest, from the first it does not answer, go to aiohttp in order. Parked already on an
        earlier message of the feed (the parser stops at aiohttp's queue limit, then parses
        what it kept): held behind it, in order."""
        if self._parked is not None:
            self._held.extend(messages)
            hold_reading(self)  # (what the parser kept is parsed on release_reading)
            return []
        if not idle(self):
            return messages
        answer, transport = self._answer, self.transport
        assert answer is not None
        assert transport is not None
        count = 0
        for message, payload in messages:
            if not plain(message, payload) or self.writing_paused:
                break  # a caller not reading fills the buffer: aiohttp's send timeout
            try:
                out = answer(message, self._remote, self._scheme)
            except Exception:  # a bug there must not cost the caller its answer
                log.exception("answer_now_failed")
                out = None
            if out is None:
                break
            if not isinstance(out, bytes):  # answered once what it waits for is done
                if count:  # a park answers nothing itself (most parks lead their feed)
                    self._answered(count)
                self._park(out, messages[count:])  # after: its keep-alive clock stops
                return []
            transport.write(out)
            count += 1
        if not count:
            return messages
        self._answered(count)
        return messages[count:]

    def _answered(self, count: int) -> None:
        now = protocol_loop(self).time()
        taken(self, count, now)
        self._took = True
        self.answered(count, now)

    def answered(self, count: int, now: float) -> None:
        """``count`` requests were answered here at ``now`` (loop time)."""

    def _park(self, later: Later | Plain, messages: list[Message]) -> None:
        """Wait in the protocol for ``later``, the first of ``messages``; the rest and the
        bytes that come meanwhile are held back until it is answered or handed to aiohttp."""
        self._parked, self._held = later, messages
        if len(messages) > 1:  # pipelined: the parser may have stopped at aiohttp's queue
            hold_reading(self)  # limit, keeping the rest: parsed again by release_reading
        answering(self, True)  # a graceful shutdown waits for it as for a handler
        hold_keepalive(self)  # not idle: aiohttp's keep-alive check must not close it
        if type(later) is tuple:  # a plain entry: its host holds it
            later[0].park(self, later)
        else:
            cast(Later, later).then(self.woken)

    def woken(self, out: bytes | None, handed: Later | None = None) -> None:
        """The parked request's answer (None: aiohttp answers it, :func:`handed_over` finds
        ``handed``, or the parked :class:`Later` itself)."""
        later, self._parked = self._parked, None
        held, self._held = self._held, []
        unread, self._unread = self._unread, b""
        answering(self, False)
        if later is None or self.transport is None:
            return
        release_keepalive(self, handed=out is None)
        if out is None:
            self._handed = handed if handed is not None else cast(Later, later)
            enqueue(self, held[:1] if closing(self) else held)  # closing: aiohttp's loop
        else:  # answers that one, then closes; what came behind it is not read
            self.transport.write(out)
            self._answered(1)
            if closing(self):
                super().close()
                return
            rest = self._take(held[1:]) if len(held) > 1 else []
            if rest:
                enqueue(self, rest)
            elif self._parked is not None:  # the next one waits here too
                self._unread = unread
                return
        if unread:
            self.data_received(unread)
        release_reading(self)
