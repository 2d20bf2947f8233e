"""The cache's answers: a stored entry, a flight's outcome or a stale stand-in, made into
the :class:`~proxy.messages.ProxyResponse` a caller gets (the caller's own conditionals
honoured, HEAD given the GET's length, large bodies streamed from the store)."""

from __future__ import annotations

import logging

from multidict import CIMultiDict, CIMultiDictProxy

from proxy import errors
from proxy.cache.entry import Entry
from proxy.cache.fields import HeaderItems, Headers
from proxy.cache.flight import Flights, Outcome
from proxy.cache.lookup import stale_on_error
from proxy.cache.memory import Stored
from proxy.cache.metrics import CacheMetrics
from proxy.cache.tiers import Entries
from proxy.cache.validation import CALLER_CONDITIONALS, not_modified, not_modified_headers
from proxy.clock import WallClock
from proxy.errors import ProxyError
from proxy.logs import debug, log, trace
from proxy.messages import CacheStatus, ProxyRequest, ProxyResponse

# Says a stored answer stands in for one the upstream failed to give (RFC 7234 5.5.2).
STALE_WARNING = '111 - "Revalidation Failed"'
# The caller's conditionals the cache answers, named once (checked on every answer).
_NONE_MATCH, _MODIFIED_SINCE = CALLER_CONDITIONALS


def refuse_repeated_vary(entry: Entry, headers: CIMultiDictProxy[str]) -> None:
    """A header the stored answer varies on must come once: with two lines the upstream may
    read the other one than the one the entry was selected by (the edge refuses repeated
    Accept, X-Page and X-Pretty-Print the same way)."""
    for name, _ in entry.vary:
        if len(headers.getall(name, ())) > 1:
            raise errors.InvalidRequest(
                f"Header {name} is sent more than once; it selects the answer, so send it once",
                code="repeated_header",
            )


class Answers:
    def __init__(
        self,
        entries: Entries,
        flights: Flights,
        metrics: CacheMetrics,
        clock: WallClock,
        stale_if_error: float,
    ) -> None:
        self.entries = entries
        self.flights = flights
        self.metrics = metrics
        self.clock = clock
        self.stale_if_error = stale_if_error

    def count(self, result: str, reason: str) -> None:
        self.metrics.cache_lookups.labels(result, reason).inc()
        if log.isEnabledFor(logging.DEBUG):  # the trace looked up only when someone reads it
            debug("cache_lookup", request_id=trace().request_id, result=result, reason=reason)

    def caller_304(self, status: int, stored: HeaderItems, headers: Headers) -> bool:
        """Whether the caller's own conditionals make the answer a 304 (the lookup is
        counted once, by what the cache did: one answer, one lookup)."""
        if _NONE_MATCH not in headers and _MODIFIED_SINCE not in headers:
            return False  # the common case, without parsing anything
        return not_modified(status, stored, headers)

    def from_store(
        self, request: ProxyRequest, stored: Stored, status: CacheStatus, age: float | None
    ) -> ProxyResponse:
        entry = stored.entry
        age = None if age is None else int(age)
        return self.respond(request, entry.status, entry.headers, stored, status, age)

    def respond(
        self,
        request: ProxyRequest,
        status: int,
        headers: HeaderItems,
        stored: Stored | None,
        cache_status: CacheStatus,
        age: int | None,
        upstream_status: int | None = None,
    ) -> ProxyResponse:
        if self.caller_304(status, headers, request.headers):
            return ProxyResponse(
                status=304,
                headers=CIMultiDict(not_modified_headers(headers)),
                body=b"",
                cache_status=cache_status,
                upstream_status=upstream_status,
                age=age,
            )
        response = ProxyResponse(
            status=status,
            headers=CIMultiDict(headers),
            cache_status=cache_status,
            upstream_status=upstream_status,
            age=age,
        )
        if stored is None:
            return response
        if request.method == "HEAD":
            # HEAD answers with the headers a GET would get, the body's length included.
            response.headers["Content-Length"] = str(stored.entry.size)
        elif stored.body is not None:
            response.body = stored.body
        else:
            stream = self.entries.body(stored)
            # release() (the answer's finally) closes the file if the caller left early.
            response.body, response.release = stream, stream.aclose
            response.headers["Content-Length"] = str(stored.entry.size)
        return response

    def stale_ok(self, stale: Stored, error: ProxyError | None) -> bool:
        """Whether ``stale`` may answer for a failed fetch: ``error`` raised, or (None) an
        error status. An :class:`~proxy.errors.UpstreamError` (refused, reset, timed out,
        the breaker open) means the origin could not be reached, which
        ``cache.stale_if_error`` covers for every stored GET (lookup.stale_on_error)."""
        unreachable = isinstance(error, errors.UpstreamError)
        return stale_on_error(
            stale.entry, self.clock(), unreachable=unreachable, default=self.stale_if_error
        )

    def stale(
        self, request: ProxyRequest, stale: Stored, why: str, status: int | None = None
    ) -> ProxyResponse:
        """The stored answer for a failed fetch, saying so: Warning 111 (RFC 7234 5.5.2) and
        the RFC 9211 parameters of the proxy's one Cache-Status member, which the edge adds
        (``fwd=stale``, the upstream's status if it answered, and ``detail`` = the failure's
        code, e.g. ``upstream_unreachable`` or ``upstream_503``, as the lookup metrics say)."""
        response = self.from_store(request, stale, "STALE", stale.entry.age(self.clock()))
        response.headers["Warning"] = STALE_WARNING
        forwarded = "fwd=stale" if status is None else f"fwd=stale; fwd-status={status}"
        response.cache_detail = f"{forwarded}; detail={why}"
        return response

    def outcome(self, request: ProxyRequest, outcome: Outcome) -> ProxyResponse:
        age = None
        if outcome.entry is not None and outcome.cache_status != "MISS":
            age = int(outcome.entry.age(self.clock()))
        if outcome.stream is not None:
            stream = outcome.stream
            stream.cache_status = outcome.cache_status
            if request.method != "HEAD" and not not_modified(
                outcome.status, outcome.headers, request.headers
            ):
                return stream
            self.flights.spawn(stream.release())
        return self.respond(
            request,
            outcome.status,
            outcome.headers,
            outcome.stored,
            outcome.cache_status,
            age,
            outcome.upstream_status,
        )
