"""The fresh-hit fast path: a plain GET of a fresh, stored answer, without the long way.

Most reads a busy proxy answers are fresh hits on a few entries. The long way
(:func:`~proxy.edge.middlewares.access_middleware` → ``error_middleware`` →
:func:`proxy.edge.handlers.handle` → the cache layer) spends most of such a request in
machinery it does not need: routing, middleware calls, building a
:class:`~proxy.messages.ProxyRequest` for the upstream, awaiting layers.

This path sits in front of the application (:func:`wrap`, installed by
:class:`proxy.listener.Runner`) and answers only the plainest requests: GET over HTTP/1.x,
no body, no Cache-Control or Pragma, no If-Match, If-Unmodified-Since or Range, no
all-pages paging, no Connection options, a Host, target and caller the long way accepts,
and an entry in the memory tier that is fresh, a 200, and without extra Vary names. The
caller's own If-None-Match and If-Modified-Since are answered here too (304). A stored
gzip body goes as it is to a caller that accepts gzip; for one that does not it is inflated
here when it inflates to at most 1 MiB (:func:`~proxy.coding.inflate_whole`), else the long
way streams it inflated. Its answer
is the one the long way gives (same headers from the same functions, same metrics, same
access line). Anything else goes the long way, untouched: nothing here refuses or counts
a request it does not answer.

A fresh hit runs without an ``await``, so it cannot be cancelled half-way, and a scrape of
the in-flight gauge (on the same event loop) could never see it: that gauge is not touched.

The same plain GET of a stored 200 that a flight in progress is revalidating (no rule, or
past its freshness) is a *joiner* (:meth:`FastPath.join`): it waits for the flight here,
counted in flight meanwhile, and is answered here when the flight freshened the entry (the
stored body, or the caller's 304 from the entry's headers), as the long way answers a
joiner. Any other outcome goes the long way, which goes on from that outcome
(:func:`~proxy.cache.fastlook.handing_over`): nothing is waited for or fetched twice.

Fresh hits and joiners are answered in the connection's protocol as their heads are parsed
(:meth:`FastPath.answer_now`; a joiner waits there as a plain entry of its flight's wake-up
list, :class:`~proxy.edge.parked.Joiners`, a starter as a :class:`Parked`, with no task) when
the connection has nothing else to answer first; else here, in a task.

A plain GET the memory tier has nothing for looks the tier up once (the disk, or Redis then
the disk: :meth:`~proxy.cache.fastlook.FastLook.tier_hit`, promoting what it finds as the
long way's lookup does), counted in flight meanwhile, in the protocol
(:class:`~proxy.edge.looking.Looking`) or else here (:class:`Cold`); a fresh entry the long
way would answer as a plain HIT is answered here; anything else goes the long way with what
was found, which decides from it without looking up again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar, cast

from aiohttp import web
from aiohttp.http import RawRequestMessage
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.answering import handed_over
from proxy.cache.fastlook import (
    FastAnswer,
    Joined,
    Looked,
    Pending,
    Startable,
    Unheld,
    handing_over,
)
from proxy.cache.fields import HeaderItems
from proxy.cache.flight import Outcome
from proxy.cache.keys import SELECTING
from proxy.cache.layer import Cache
from proxy.cache.lookup import UNHANDLED_CONDITIONALS
from proxy.cache.validation import Last
from proxy.coding import GZIP, Caps, accepts_gzip, coding_of, inflate_whole
from proxy.compat.aiohttp import http_date, render_response
from proxy.edge.answer import answer_headers, caller_value, caller_view
from proxy.edge.callers import PRIORITY_HEADER
from proxy.edge.handlers import pipeline_request
from proxy.edge.inbound import EXCHANGE, VERSIONS, Exchange, Head, Incoming, request_id
from proxy.edge.known import known
from proxy.edge.looking import Looking, Tier
from proxy.edge.middlewares import CLIENT_CLOSED_REQUEST, access_line, plain_line
from proxy.edge.paging import HEADER as ALL_PAGES
from proxy.edge.parked import Answer, Asked, Joiners, Joining, Parked, traced, waited
from proxy.edge.rendered import Place, fill, render_template, template
from proxy.edge.services import SERVICES, Services
from proxy.edge.together import Make, Path, Together, together
from proxy.errors import ProxyError
from proxy.headers import SERVER_NAME, not_utf8, proxied
from proxy.logs import Trace, begin_trace, log
from proxy.messages import CacheStatus, ProxyRequest
from proxy.target import valid_host

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
Found = FastAnswer | Pending | Startable | Unheld
Waiter = asyncio.Future[None]
T = TypeVar("T")

# Any of these sends a request the long way.
LONG_WAY_HEADERS = (
    "Content-Length",
    "Transfer-Encoding",
    "Expect",
    "Cache-Control",
    "Pragma",
    *UNHANDLED_CONDITIONALS,
    ALL_PAGES,
    PRIORITY_HEADER,
)
LONG_WAY_NAMES = frozenset(name.lower() for name in LONG_WAY_HEADERS)
SELECTING_NAMES = frozenset(name.lower() for name in SELECTING)
SELECTING_LOWER = tuple(name.lower() for name in SELECTING)
NONE_SELECTED: tuple[str | None, ...] = (None,) * len(SELECTING)
# Connection values that name no other header (anything else may hide a selecting header).
PLAIN_CONNECTION = frozenset({"keep-alive", "close"})


@dataclass(slots=True)
class Joiner:
    """A plain GET whose stored entry a flight in progress revalidates: :meth:`FastPath.join`."""

    asked: Asked
    pending: Pending


@dataclass(slots=True)
class Starter:
    """A plain GET whose stored entry must be revalidated, no flight out: :meth:`FastPath.start`."""

    asked: Asked
    startable: Startable


@dataclass(slots=True)
class Cold:
    """A plain GET the memory tier has nothing for: its tier looked up (:meth:`FastPath.look`)."""

    asked: Asked
    key: str


def _response(status: int, headers: CIMultiDict[str], body: bytes) -> web.Response:
    return web.Response(status=status, headers=headers, body=body or None)


class FastPath:
    """The request handler in front of the application's own (``inner``)."""

    def __init__(self, services: Services, cache: Cache, inner: Handler) -> None:
        self.services = services
        self.cache = cache
        self.inner = inner
        self.upstream = self.services.settings.upstream.url
        self.public = self.services.settings.server.public_url
        self.place = Place(self.upstream, self.public)
        upstream = self.services.settings.upstream
        self.caps = Caps(upstream.max_inflated_size, upstream.max_inflate_ratio)
        self.forwarded = upstream.forwarded
        self.in_flight = services.metric_groups.edge.in_flight
        self.joiners = Joiners(self, cache.fast, self.in_flight)

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        parked = handed_over(request)
        if isinstance(parked, Parked):  # waited in the protocol; the long way goes on
            return await self._hand_over(
                request, parked.asked, parked.pending, parked.result, parked.noted
            )
        if isinstance(parked, Looking):  # looked the tier up in the protocol
            return await self._went_on(request, parked.asked, parked.found)
        try:
            found = self.answer(request)
        except Exception:  # a bug here must not cost the caller its answer
            log.exception("fast_path_failed")
            found = None
        if found is None:
            return await self.inner(request)
        if isinstance(found, Joiner):
            return await self.join(request, found)
        if isinstance(found, Starter):
            return await self.start(request, found)
        if isinstance(found, Cold):
            return await self.look(request, found.asked, found.key)
        return found

    def answer(self, request: web.BaseRequest) -> web.Response | Joiner | Starter | Cold | None:
        """The fresh hit's answer, a joiner of a revalidation in flight, the starter of one,
        a request to look the tier up for, or None: the long way must answer."""
        looked = self._find(request)
        if looked is None:
            return None
        asked, found = looked
        if isinstance(found, Pending):
            return Joiner(asked, found)
        if isinstance(found, Startable):
            return Starter(asked, found)
        if isinstance(found, Unheld):
            return Cold(asked, found.key)
        return self._respond(request, asked, found, "HIT", "", None, _response)

    def answer_now(
        self, message: RawRequestMessage, remote: str | None, scheme: str
    ) -> bytes | Parked | Joining | Looking | None:
        """A fresh hit's whole answer as the connection's protocol writes it, as soon as the
        head is parsed (:class:`proxy.answering.AnswersNow`): no request object, no task. The
        same bytes, counts and access line as :meth:`answer`'s; None: anything else (a
        joiner, a cold entry, not a plain GET), which aiohttp hands to :meth:`__call__`."""
        head = Head(message, remote, scheme)
        try:
            looked = self._find(head)
            if looked is None:
                return None
            asked, found = looked
            if isinstance(found, Pending):
                return self._park(head, asked, found)
            if isinstance(found, Startable):
                return self._start_now(head, asked, found)
            if isinstance(found, Unheld):  # the tier looked up in a task, answered here
                return Looking(self, head, asked, found.key)
            if not isinstance(found, tuple):
                return None
            return self._respond(head, asked, found, "HIT", "", None, render_response)
        except Exception:  # a bug here must not cost the caller its answer
            log.exception("fast_path_failed")
            return None

    def _park(self, head: Head, asked: Asked, pending: Pending) -> Joining | bytes | None:
        """A joiner waiting in the protocol for its flight's wake-up (a plain entry of it,
        :class:`Joiners`); when the flight is over already, its answer at once (None: the
        long way, as for a starter)."""
        fast = self.cache.fast
        if fast.waits(pending):  # answered by the flight's wake-up itself
            return self.joiners.entry(head, asked, pending)
        result = fast.result(pending)
        if pending.starter or not isinstance(result, Outcome):
            return None
        context, noted = traced(asked.request_id)
        return context.run(
            self._joined, head, asked, pending, result, noted, render_response
        )  # fmt: skip

    def begin(self, parked: Parked) -> None:
        """A request starts waiting in the protocol (:class:`Parked`)."""
        self.in_flight.inc()  # a scrape may come meanwhile

    def settled(self, parked: Parked) -> bytes | None:
        """A parked starter's answer once its flight's head is there, as :meth:`start`
        answers it; None, counting nothing: the long way goes on from ``parked.result``
        (:meth:`__call__`)."""
        self.in_flight.dec()
        head, asked, pending = parked.head, parked.asked, parked.pending
        parked.result = result = self.cache.fast.result(pending)
        return self._joined(head, asked, pending, result, parked.noted, render_response)

    def together(self, pending: Pending, outcome: Outcome, info: bool) -> Answer | None:
        """A wake-up's joiners' answer from what they share (:mod:`proxy.edge.together`)."""
        shared = self._together(pending, outcome, info, render_response)
        return None if shared is None else shared.answer

    def _together(
        self, pending: Pending, outcome: Outcome, info: bool, make: Make[T]
    ) -> Together[T] | None:
        note = self.services.callers.note
        path: Path[T] = self.place, self.public, note, self._done, self._respond
        return together(self.cache.fast, pending, outcome, info, path, make)

    def left(self, parked: Parked, waiting: bool = True) -> None:
        """A parked request's caller left (``waiting``: before its flight was done, else
        once handed to the long way but before it began): logged as the long way logs it;
        what the flight brings for a starter is let go."""
        if waiting:
            self.in_flight.dec()
        self.cache.fast.abandon(parked.pending)
        self.gone(parked.head, parked.asked, parked.noted)

    def gone(self, head: Incoming, asked: Asked, noted: Trace) -> None:
        """A waiting request's caller left: logged as the long way logs it."""
        self._done(head, asked, CLIENT_CLOSED_REQUEST, "-", waited(asked, noted))

    def _start_now(self, head: Head, asked: Asked, startable: Startable) -> Parked:
        """The revalidation :meth:`start` would start, started here (in the request's own
        context: the flight's task shares its trace), its answer awaited in the protocol."""
        context, noted = traced(asked.request_id)
        pending = context.run(self.cache.fast.start, startable, self._sent(head, asked))
        return Parked(self, head, asked, pending, pending.flight.head, (context, noted))

    def _sent(self, request: Incoming, asked: Asked) -> ProxyRequest:
        """The pipeline request the long way's starter sends for ``request`` (its caller's
        own class: a request naming one, X-Proxy-Priority, goes the long way)."""
        caller = asked.caller
        return pipeline_request(
            request, self.services.settings, asked.target, None, caller, caller.priority,
            asked.request_id,
        )  # fmt: skip

    def _find(
        self, request: Incoming
    ) -> tuple[Asked, FastAnswer | Pending | Startable | Unheld] | None:
        """A plain GET and what the memory tier has for it; None: the long way answers."""
        looked = self.asked(request)
        if looked is None:
            return None
        asked, key = looked
        target = asked.target
        found = self.cache.fast.find(
            asked.caller.account, target.path, target.query, request.headers, asked.body_for,
            asked.selecting, key,
        )  # fmt: skip
        return None if found is None else (asked, found)

    def asked(self, request: Incoming) -> tuple[Asked, str] | None:
        """What a plain GET the long way would accept asks for, and its cache key (one
        record per raw target: :func:`~proxy.edge.known.known`); None: not one."""
        started = time.perf_counter()
        if request.method != "GET" or request.version not in VERSIONS:
            return None
        headers = request.headers
        selecting = _plain_headers(headers)
        if selecting is None or not valid_host(headers.get("Host")):
            return None
        connection = headers.get("Connection")
        if connection is not None and connection.strip().lower() not in PLAIN_CONNECTION:
            return None
        try:
            record = known(request.raw_path)
        except ProxyError:  # the long way refuses it
            return None
        caller = self.services.callers.find(headers)
        if caller is None:
            return None
        accepts = accepts_gzip(headers.getall("Accept-Encoding", ()))
        rid = request_id(headers)
        if log.isEnabledFor(logging.DEBUG):
            begin_trace(rid)  # the cache's debug events name the request
        body_for = None if accepts else self._plain
        target, route = record.target, record.route
        asked = Asked(started, rid, caller, target, route, accepts, body_for, selecting)
        return asked, record.key_for(caller.account, selecting)

    def join(self, request: web.BaseRequest, joiner: Joiner) -> Awaitable[web.StreamResponse]:
        """Wait for the flight a joiner would join the long way; answer from its outcome
        when it freshened the stored 200 (the long way's answer, headers, counts and access
        line), else hand the outcome to the long way, which goes on from it. (Not a
        coroutine of its own: one frame less for every joiner to suspend and resume.)"""
        asked = joiner.asked
        # The flight's id goes in fetched_by; the access line's record is made when logged.
        return self._settle(request, asked, joiner.pending, begin_trace(asked.request_id))

    async def start(self, request: web.BaseRequest, starter: Starter) -> web.StreamResponse:
        """Start the revalidation the long way would start for this request (the same
        pipeline request, :func:`~proxy.edge.handlers.pipeline_request`) and await its
        answer as the long way's starter does; answer here when it freshened the stored 200,
        as a joiner is answered, else hand the outcome to the long way, which goes on from it
        as the flight's starter."""
        asked = starter.asked
        # Before the flight: its task shares the trace (budget wait, retries, failures).
        noted = begin_trace(asked.request_id)
        try:
            pending = self.cache.fast.start(starter.startable, self._sent(request, asked))
        except Exception:  # a bug here must not cost the caller its answer
            log.exception("fast_path_failed")
            return await self.inner(request)
        return await self._settle(request, asked, pending, noted)

    async def _settle(
        self, request: web.BaseRequest, asked: Asked, pending: Pending, noted: Trace
    ) -> web.StreamResponse:
        in_flight, fast = self.in_flight, self.cache.fast
        in_flight.inc()  # an await: a scrape may come meanwhile
        try:
            waiter = fast.waiter(pending)
            if waiter is None:
                result = await fast.wait(pending)
            else:  # a joiner: its wake-up awaited here, one frame to suspend and resume
                await waiter
                result = fast.result(pending)
        except asyncio.CancelledError:  # the caller left: logged as the long way logs it
            self._done(request, asked, CLIENT_CLOSED_REQUEST, "-", waited(asked, noted))
            raise
        finally:
            in_flight.dec()
        response = self._joined(request, asked, pending, result, noted, _response)
        if response is not None:
            return response
        return await self._hand_over(request, asked, pending, result, noted)

    async def _hand_over(
        self,
        request: web.BaseRequest,
        asked: Asked,
        pending: Pending,
        result: Outcome | Exception,
        noted: Trace,
    ) -> web.StreamResponse:
        """The long way from where a joiner's wait ended; its access line counts the wait
        and keeps the request's id and trace (what the flight noted in it)."""
        request[EXCHANGE] = Exchange(asked.request_id, trace=noted, started=asked.started)
        with handing_over(Joined(pending, result)):
            return await self.inner(request)

    async def look(self, request: web.BaseRequest, asked: Asked, key: str) -> web.StreamResponse:
        """Look the tier up once (:meth:`tier`); answer a fresh entry as the long way answers
        a HIT (headers, counts, access line), else the long way goes on from what was found."""
        found: FastAnswer | Looked | None = None
        self.in_flight.inc()  # an await: a scrape may come meanwhile
        try:
            found = await self.tier(request, asked, key)
        except asyncio.CancelledError:  # the caller left: logged as the long way logs it
            self.gone(request, asked, begin_trace(asked.request_id))
            raise
        except Exception:  # a bug here must not cost the caller its answer
            log.exception("fast_path_failed")
        finally:
            self.in_flight.dec()
        if found is None or isinstance(found, Looked):
            return await self._went_on(request, asked, found)
        try:
            return self._respond(request, asked, found, "HIT", "", None, _response)
        except Exception:
            log.exception("fast_path_failed")
            return await self.inner(request)

    def tier(self, request: Incoming, asked: Asked, key: str) -> Tier:
        target, headers = asked.target, request.headers  # (Looking's too)
        proxied = functools.partial(self._proxied, headers, asked.request_id)
        return self.cache.fast.tier_hit(
            asked.caller.account, target.path, target.query, headers, asked.body_for, proxied, key
        )

    def hit(self, head: Head, asked: Asked, found: FastAnswer) -> bytes:  # (Looking's)
        return self._respond(head, asked, found, "HIT", "", None, render_response)

    async def _went_on(
        self, request: web.BaseRequest, asked: Asked, found: Looked | None
    ) -> web.StreamResponse:
        """The long way after the tier's lookup: from what it found (None: it looks again)."""
        if found is None:
            return await self.inner(request)
        # The access line counts the lookup; the request keeps its id.
        trace = begin_trace(asked.request_id)
        request[EXCHANGE] = Exchange(asked.request_id, trace=trace, started=asked.started)
        with handing_over(found):
            return await self.inner(request)

    def _joined(
        self,
        request: Incoming,
        asked: Asked,
        pending: Pending,
        result: Outcome | Exception,
        noted: Trace | None,
        make: Make[T],
    ) -> T | None:
        """One request's answer from its flight's ``result`` (a joiner, or the starter) as a
        wake-up answers its joiners (:mod:`proxy.edge.together`): a wake-up of one; None,
        counting nothing: the long way goes on from the result."""
        if not isinstance(result, Outcome):
            return None
        try:
            shared = self._together(pending, result, log.isEnabledFor(logging.INFO), make)
            return None if shared is None else shared.answer(request, asked, noted)
        except Exception:  # a bug here must not cost the caller its answer
            log.exception("fast_path_failed")
            return None

    def _respond(
        self,
        request: Incoming,
        asked: Asked,
        answer: FastAnswer,
        cache_status: CacheStatus,
        member: str,
        info: Exchange | None,
        make: Make[T],
    ) -> T:
        """The answer as the long way renders it (edge.answer; ``make``: a web.Response, or
        its bytes in the protocol), counted and logged (``info``: what the access line says,
        made only when logged if None)."""
        status, items, body, age, kept = answer
        caller = asked.caller
        self.services.callers.note(caller)
        named = caller_value(caller.name, caller.account)
        if make is render_response:  # its head rendered once per shape (edge.rendered)
            scheme, host = ("", "") if self.public else (request.scheme, request.host)
            accepts = asked.accepts
            # a held entry's fresh hit (``kept``; None: any other answer): its last shape's
            # head is kept on its record (the rest of the head is the entry's)
            of = (status, scheme, host, accepts, named)
            if kept is not None and kept.shape_of == of:
                shape = kept.shape
            else:
                # a held entry's first shape is kept on its record alone (no memo entry)
                render = render_template if kept is not None and kept.shape_of is None else template
                shape = render(
                    status, items, self.place, scheme, host, accepts, cache_status, member,
                    named, len(body),
                )  # fmt: skip
                if kept is not None:
                    kept.shape_of, kept.shape = of, shape
            if shape is not None:
                out = fill(shape, asked.request_id, age, http_date(), body)
                self._done(request, asked, status, cache_status, info, len(body))
                return cast(T, out)
        shown, _ = caller_view(request, items, self.upstream, self.public, asked.accepts)
        out_headers = answer_headers(
            shown, asked.request_id, cache_status, age, caller=named, cache=member
        )
        out_headers["Server"] = SERVER_NAME  # the long way: answer.stamp_server
        response = make(status, out_headers, body)
        self._done(request, asked, status, cache_status, info, len(body))
        return response

    def _done(
        self,
        request: Incoming,
        asked: Asked,
        status: int,
        cache_status: CacheStatus,
        info: Exchange | None,
        sent: int = 0,
    ) -> None:
        """The request metrics and access line, as the long way's access_middleware."""
        elapsed = time.perf_counter() - asked.started
        caller = asked.caller
        self.services.metrics.request_done(
            "GET", asked.route, status, cache_status, elapsed, caller.name, caller.account
        )
        if log.isEnabledFor(logging.INFO):  # the line's record only when someone reads it
            if info is None:  # nothing noted below the edge: the values held here
                plain_line(
                    request, asked.request_id, caller.name, caller.account, asked.route,
                    status, cache_status, sent, elapsed,
                )  # fmt: skip
                return
            info.bytes_sent = sent
            access_line(request, info, asked.route, status, elapsed)

    def _proxied(self, headers: CIMultiDictProxy[str], rid: str) -> CIMultiDictProxy[str]:
        """The headers of the request the long way would make (the handler's)."""
        return CIMultiDictProxy(proxied(headers.items(), self.forwarded, rid))

    def _plain(self, items: HeaderItems, body: bytes) -> bytes | None:
        """A stored body for a caller that does not take gzip: inflated here when small
        (:func:`~proxy.coding.inflate_whole`, as the long way does), else None."""
        if _coding(items) != GZIP:
            return body
        return inflate_whole(body, self.caps)


def _plain_headers(headers: CIMultiDictProxy[str]) -> tuple[str | None, ...] | None:
    """Whether a GET's headers may take the fast path, looked through once: none of
    :data:`LONG_WAY_HEADERS`, every value UTF-8 on the wire, no selecting header on two
    lines (the long way refuses those: :func:`~proxy.headers.not_utf8`,
    :func:`~proxy.headers.repeated`). No CR, LF or NUL check on values here: aiohttp's
    parsers (C and pure Python) refuse them before any handler runs; the long way checks
    again. Returns the selecting headers' values in :data:`SELECTING`'s order (what
    looking each name up gives: the cache key's), None when not plain."""
    selecting: dict[str, str] = {}
    for name, value in headers.items():
        lower = name.lower()
        if lower in LONG_WAY_NAMES:
            return None
        if not value.isascii() and not_utf8(((name, value),)) is not None:
            return None
        if lower in SELECTING_NAMES:
            if lower in selecting:
                return None
            selecting[lower] = value
    if not selecting:
        return NONE_SELECTED
    return tuple(map(selecting.get, SELECTING_LOWER))


# The content coding of a stored entry's headers, the last tuple's known by identity (a
# flight's joiners' answers all carry the entry's one tuple; a fresh hit of a held entry
# finds it on the entry's record, proxy.cache.memory.Kept).
_coding = Last(coding_of)


def wrap(app: web.Application, inner: Handler) -> Handler:
    """``inner`` with the fast path in front, once the app's services are built; as is when
    the cache is disabled."""
    services = app[SERVICES]
    if services.cache is None:
        return inner
    return FastPath(services, services.cache, inner)
