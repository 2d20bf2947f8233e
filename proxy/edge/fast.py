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

It runs without an ``await``, so it cannot be cancelled half-way, and a scrape of the
in-flight gauge (on the same event loop) could never see it: that gauge is not touched.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from proxy.cache.layer import Cache
from proxy.cache.policy import SELECTING, UNHANDLED_CONDITIONALS, HeaderItems
from proxy.coding import GZIP, Caps, accepts_gzip, coding_of, inflate_whole
from proxy.edge.answer import answer_headers, caller_value, caller_view
from proxy.edge.callers import PRIORITY_HEADER
from proxy.edge.inbound import VERSIONS, Exchange, request_id
from proxy.edge.middlewares import access_line, route_of
from proxy.edge.paging import HEADER as ALL_PAGES
from proxy.edge.services import SERVICES, Services
from proxy.errors import ProxyError
from proxy.headers import SERVER_NAME, not_utf8, repeated
from proxy.logs import begin_trace, log
from proxy.target import Target, parse_target, valid_host

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

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
# Connection values that name no other header (anything else may hide a selecting header).
PLAIN_CONNECTION = frozenset({"keep-alive", "close"})


class FastPath:
    """The request handler in front of the application's own (``inner``)."""

    def __init__(self, services: Services, cache: Cache, inner: Handler) -> None:
        self.services = services
        self.cache = cache
        self.inner = inner
        self.upstream = self.services.settings.upstream.url
        self.public = self.services.settings.server.public_url
        upstream = self.services.settings.upstream
        self.caps = Caps(upstream.max_inflated_size, upstream.max_inflate_ratio)

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            response = self.answer(request)
        except Exception:  # a bug here must not cost the caller its answer
            log.exception("fast_path_failed")
            response = None
        if response is None:
            return await self.inner(request)
        return response

    def answer(self, request: web.BaseRequest) -> web.Response | None:
        """The fresh hit's answer, or None: the long way must answer."""
        started = time.perf_counter()
        if request.method != "GET" or request.version not in VERSIONS:
            return None
        headers = request.headers
        for name in LONG_WAY_HEADERS:
            if name in headers:
                return None
        if not valid_host(headers.get("Host")):
            return None
        connection = headers.get("Connection")
        if connection is not None and connection.strip().lower() not in PLAIN_CONNECTION:
            return None
        # No CR, LF or NUL check on header values here: aiohttp's parsers (C and pure
        # Python) refuse them before any handler runs; the long way checks again. Values
        # that were not UTF-8 and repeated selecting headers: the long way refuses them.
        if not_utf8(headers.items()) is not None or repeated(headers, SELECTING) is not None:
            return None
        known = self._target(request)
        if known is None:
            return None
        target, route = known
        services = self.services
        caller = services.callers.find(headers)
        if caller is None:
            return None
        accepts = accepts_gzip(headers.getall("Accept-Encoding", ()))
        body_for = None if accepts else self._plain
        rid = request_id(headers)
        if log.isEnabledFor(logging.DEBUG):
            begin_trace(rid)  # the cache's debug events name the request
        hit = self.cache.fresh_hit(caller.account, target.path, target.query, headers, body_for)
        if hit is None:
            return None
        status, items, body, age = hit
        services.callers.note(caller)
        view, _ = caller_view(request, items, self.upstream, self.public, accepts)
        out_headers = answer_headers(
            view, rid, "HIT", age, caller=caller_value(caller.name, caller.account)
        )
        out_headers["Server"] = SERVER_NAME  # the long way: answer.stamp_server
        response = web.Response(status=status, headers=out_headers, body=body or None)
        elapsed = time.perf_counter() - started
        services.metrics.request_done(
            "GET", route, status, "HIT", elapsed, caller.name, caller.account
        )
        if log.isEnabledFor(logging.INFO):
            info = Exchange(rid, caller.name, caller.account, "HIT", target)
            info.bytes_sent = len(body)
            access_line(request, info, route, status, elapsed)
        return response

    def _plain(self, items: HeaderItems, body: bytes) -> bytes | None:
        """A stored body for a caller that does not take gzip: inflated here when small
        (:func:`~proxy.coding.inflate_whole`, as the long way does), else None."""
        if coding_of(items) != GZIP:
            return body
        return inflate_whole(body, self.caps)

    def _target(self, request: web.BaseRequest) -> tuple[Target, str] | None:
        """The request's target and route label; None when the long way must refuse it."""
        try:
            return _known_target(request.raw_path, request.path)
        except ProxyError:
            return None


@functools.lru_cache(maxsize=4096)
def _known_target(raw: str, path: str) -> tuple[Target, str]:
    """An accepted target and its route label, remembered by raw target (a refusal raises,
    so it is never remembered: the long way words it)."""
    return parse_target(raw), route_of(path)


def wrap(app: web.Application, inner: Handler) -> Handler:
    """``inner`` with the fast path in front, once the app's services are built; as is when
    the cache is disabled."""
    services = app[SERVICES]
    if services.cache is None:
        return inner
    return FastPath(services, services.cache, inner)
