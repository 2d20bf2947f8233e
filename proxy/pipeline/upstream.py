"""The one client session to Kounta, and the edge where aiohttp errors become ours.

Each account holds at most its share of the upstream connections at once
(``upstream.account_pool_size``, :class:`Slots`), from sending a request until its answer is
released (an answer without a body: until its head came), so callers of one account that
stop reading cannot take the connections every other account needs. A request that cannot
get a slot within ``connect_timeout`` is ``503 upstream_busy``: the proxy's own limit, which
no circuit breaker counts.

Kounta is asked for gzip (``Accept-Encoding: gzip``) and its bodies are passed up as they
came, ``Content-Encoding`` kept: a gzip body is checked as it arrives (complete, CRC32 and
ISIZE right, within ``upstream.max_inflated_size`` and ``max_inflate_ratio``), so a body
that fails never reaches the cache whole (:mod:`proxy.coding`).
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from proxy.coding import GZIP, Caps, check, checked, coding_of
from proxy.collectors import Count, Observations
from proxy.errors import (
    ProxyError,
    UpstreamBodyError,
    UpstreamBusy,
    UpstreamError,
    UpstreamInvalid,
    UpstreamTimeout,
    UpstreamTLSError,
    UpstreamTooLarge,
    UpstreamUnreachable,
)
from proxy.messages import CHUNK, ProxyRequest, ProxyResponse
from proxy.pipeline.direct import Direct, DirectResponse, direct_candidate
from proxy.pipeline.metrics import PipelineMetrics
from proxy.routes import template
from proxy.settings import UpstreamSettings
from proxy.target import Target, upstream_url

# Bodies announced up to this size (as sent: compressed, for gzip) are read whole instead
# of streamed; a gzip body is never held inflated.
SMALL_BODY = 64 * 1024
# Statuses whose body is not a whole gzip stream to check: none (RFC 9110 6.4.1), a range.
NO_BODY = frozenset({204, 206, 304})
# Answers that never carry a body (RFC 9110 6.4.1): 204, 304, and any answer to HEAD.
BODILESS = frozenset({204, 304})


def _ignore(kind: str) -> None:
    pass


@contextmanager
def mapped_errors(
    settings: UpstreamSettings, failed: Callable[[str], None] = _ignore
) -> Iterator[None]:
    """Translate aiohttp's exceptions into :mod:`proxy.errors` (no secrets, no URLs).

    ``failed`` hears the kind of each failure (timeout, connect, tls, reset) for the metrics.
    """
    try:
        yield
    except Exception as e:
        found = mapped(settings, e, failed)
        if found is None:
            raise
        raise found from None


def mapped(
    settings: UpstreamSettings, error: Exception, failed: Callable[[str], None] = _ignore
) -> ProxyError | None:
    """What :func:`mapped_errors` raises for ``error`` (None: ``error`` itself)."""
    if isinstance(error, UpstreamBodyError):
        failed("truncated")
    elif isinstance(error, UpstreamTooLarge):
        failed("too_large")
    elif isinstance(error, aiohttp.ClientError | OSError):
        if isinstance(error.__cause__, ProxyError):
            # The caller's streamed body failed (too large, too slow): not Kounta's fault.
            return error.__cause__
        failed(error_kind(error))
        return translate(settings, error)
    return None


def error_kind(error: BaseException) -> str:
    """The metric label for an aiohttp/OS failure: timeout, tls, connect or reset."""
    if isinstance(error, TimeoutError | aiohttp.ServerTimeoutError):
        return "timeout"
    if isinstance(error, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return "tls"
    if isinstance(error, aiohttp.ClientConnectorError):
        return "connect"
    return "reset"


def translate(settings: UpstreamSettings, error: BaseException) -> UpstreamError:
    """The proxy's own error for an aiohttp/OS failure (most specific class first)."""
    if isinstance(error, aiohttp.ConnectionTimeoutError):
        return UpstreamTimeout(
            f"Connecting to the upstream took longer than {settings.connect_timeout:g}s "
            "(connect timeout)"
        )
    if isinstance(error, aiohttp.SocketTimeoutError):
        return UpstreamTimeout(
            f"The upstream sent nothing for {settings.read_timeout:g}s (read timeout)"
        )
    if isinstance(error, TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamTimeout(
            f"The upstream exchange took longer than {settings.total_timeout:g}s (total timeout)"
        )
    # The OS's words (an address, a certificate's names) go to the log only (``detail``):
    # a caller hears the code and a generic description.
    if isinstance(error, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return UpstreamTLSError("TLS with the upstream failed", detail=_reason(error))
    if isinstance(error, aiohttp.ClientPayloadError):
        return UpstreamBodyError("The upstream closed the connection before the body ended")
    if isinstance(error, aiohttp.ClientConnectorError):
        return UpstreamUnreachable("Cannot connect to the upstream", detail=_reason(error))
    if isinstance(error, aiohttp.ClientResponseError):
        # Raised by the response parser (raise_for_status is never used): an over-large
        # header section (aiohttp's 8190-byte line limit) or broken framing.
        return UpstreamUnreachable(
            "The upstream sent a response that is not valid HTTP (a header too large or malformed)"
        )
    if isinstance(error, aiohttp.ServerDisconnectedError):
        return UpstreamUnreachable("The upstream closed the connection without answering")
    return UpstreamUnreachable("The upstream connection failed", detail=_reason(error))


def _reason(error: BaseException) -> str:
    """What the log hears: the exception and its words (an address, a certificate name)."""
    text = str(error) or type(error).__name__
    return f"{type(error).__name__}: {text}"[:500]


def _is_small(response: Answer) -> bool:
    length = response.content_length
    return length is not None and length <= SMALL_BODY


Release = Callable[[], None]
# An answer as the layer reads it: aiohttp's, or one read on a pooled connection directly.
Answer = aiohttp.ClientResponse | DirectResponse


class Slots:
    """Each account's share of the upstream connections: a slot is held from the request
    until its answer is released (read, closed, or at the latest garbage collected)."""

    def __init__(self, share: int, wait: float) -> None:
        self.share = share
        self.wait = wait
        self.accounts: dict[str, asyncio.Semaphore] = {}

    async def take(self, account: str, deadline: float) -> Release:
        """A slot of ``account``'s share (its release, safe to call more than once), or
        :class:`UpstreamBusy` when none came free in time."""
        semaphore = self.accounts.get(account)
        if semaphore is None:
            semaphore = self.accounts[account] = asyncio.Semaphore(self.share)
        if semaphore.locked():
            wait = min(self.wait, deadline - asyncio.get_running_loop().time())
            try:
                async with asyncio.timeout(max(0.0, wait)):
                    await semaphore.acquire()
            except TimeoutError:
                raise UpstreamBusy(
                    f"All {self.share} upstream connections of account {account!r} stayed in "
                    f"use for {max(0.0, wait):g}s (upstream.account_pool_size)",
                    retry_after=1,
                ) from None
        else:
            await semaphore.acquire()
        held = [True]

        def release() -> None:
            if held:
                held.clear()
                semaphore.release()

        return release


# Label children remembered by Upstream at most.
LABELLED_MAX = 10_000
# Paths (with query) whose upstream URL is remembered: each URL and its tuple are walked by
# every full garbage collection, and a URL costs ~3 µs to build again (once a flight).
TARGETS = 1024


class Upstream:
    """The bottom layer: sends a request to the fixed upstream and streams the answer."""

    def __init__(
        self,
        settings: UpstreamSettings,
        session: aiohttp.ClientSession,
        metrics: PipelineMetrics | None = None,
        accounts: int = 1,
    ) -> None:
        self.settings = settings
        self.base = settings.url
        self.session = session
        self.metrics = metrics
        self.caps = Caps(settings.max_inflated_size, settings.max_inflate_ratio)
        self.slots = Slots(settings.account_share(accounts), settings.connect_timeout)
        # The metrics' label children per (method, route, status, account): prometheus
        # client's labels() takes a lock and builds its key every time. Bounded like the
        # series (templates, enumerations, configured accounts); cleared past the bound.
        self._labelled: dict[tuple[str, str, int, str], tuple[Observations, Count]] = {}
        # Per path and query: its URL and route template (a revalidated key asks for the
        # same path over and over). The base is fixed for the session's life.
        self._targets: dict[str, tuple[URL, str]] = {}
        # Per account: what hears its request's failures (the error metric's kind).
        self._counters: dict[str, Callable[[str], None]] = {}
        # A flight's conditional GET on a pooled connection, without the session's
        # per-request machinery (proxy.pipeline.direct).
        self.direct = Direct(session, self.base, settings.read_timeout)

    def _children(
        self, method: str, route: str, status: int, request: ProxyRequest
    ) -> tuple[Observations, Count]:
        key = (method, route, status, request.account)
        found = self._labelled.get(key)
        if found is None:
            assert self.metrics is not None
            found = (
                self.metrics.upstream_duration.labels(route),
                self.metrics.upstream_requests.labels(method, route, status, request.account),
            )
            if len(self._labelled) >= LABELLED_MAX:
                self._labelled.clear()
            self._labelled[key] = found
        return found

    def _target(self, request: ProxyRequest) -> tuple[URL, str]:
        """The request's upstream URL and route template, made once per path and query."""
        path_qs = request.path_qs
        found = self._targets.get(path_qs)
        if found is None:
            url = upstream_url(self.base, Target(request.path, request.query))
            found = (url, template(request.path))
            if len(self._targets) >= TARGETS:
                self._targets.clear()
            self._targets[path_qs] = found
        return found

    async def send(self, request: ProxyRequest) -> ProxyResponse:
        url, route = self._target(request)
        headers = CIMultiDict(request.headers)
        # A range of a gzip stream cannot be checked or inflated: ranges are asked plain.
        headers["Accept-Encoding"] = "identity" if "Range" in headers else GZIP
        count_error = self._error_counter(request.account)
        slot = await self._slot(request, count_error)
        try:
            if request.authorize is not None:  # the token as of now, after every wait
                headers["Authorization"] = await request.authorize(request.deadline)
        except BaseException:
            slot()
            raise
        started = time.perf_counter()  # the slot wait is not Kounta's time
        begun = asyncio.get_running_loop().time()
        response: Answer | None = None
        try:  # mapped_errors without a context manager's generator per request
            timeout = self._timeout(request.deadline)  # what is left after the slot wait
            if direct_candidate(request.method, request.body, headers):
                until = min(request.deadline, begun + self.settings.total_timeout)
                response = await self.direct.send(url, headers, until)
            if response is None:
                response = await self.session.request(
                    request.method,
                    url,
                    headers=headers,
                    data=request.body,
                    allow_redirects=False,
                    timeout=timeout,
                    auto_decompress=False,
                )
        except BaseException as e:
            slot()
            found = mapped(self.settings, e, count_error) if isinstance(e, Exception) else None
            if found is None:
                raise
            raise found from None
        took = time.perf_counter() - started
        if not 100 <= response.status <= 599:
            # RFC 9110 15: no client may act on it. Never passed on, never stored.
            response.close()
            slot()
            count_error("invalid")
            raise UpstreamInvalid(
                f"The upstream answered with status {response.status}, outside 100-599"
            )
        if self.metrics is not None:
            duration, count = self._children(request.method, route, response.status, request)
            duration.observe(took)
            count.inc()
        gzip = _has_gzip_body(request.method, response)
        if _is_small(response):
            # One read and one write beat a stream for the common small JSON answer.
            with mapped_errors(self.settings, count_error):
                try:
                    body = await response.read()
                finally:
                    response.release()
                    slot()
                if gzip:
                    check(body, self.caps)
            return ProxyResponse(
                status=response.status,
                headers=CIMultiDict(response.headers),
                body=body,
                upstream_status=response.status,
                upstream_seconds=took,
            )
        if response.status in BODILESS or request.method == "HEAD":
            # Nothing follows the head (a revalidation's 304 from Kounta, most often): the
            # exchange is over, so the connection and the slot go back now, with no watchdog
            # timer and no stream reader. The answer keeps a stream's shape (an empty one)
            # and its framing headers as they came, as a streamed answer does. At its end
            # aiohttp gave the connection back already (closed): release() would only mark
            # a body stream nobody reads.
            if not response.closed:
                response.release()
            slot()
            return ProxyResponse(
                status=response.status,
                headers=CIMultiDict(response.headers),
                body=_no_body(),
                upstream_status=response.status,
                upstream_seconds=took,
            )
        # A safety net: an answer dropped without being released still frees its slot (the
        # answers above are over before anyone could drop them).
        weakref.finalize(response, slot)
        ended = self._watch(
            response, slot, min(request.deadline, begun + self.settings.total_timeout)
        )
        return ProxyResponse(
            status=response.status,
            headers=CIMultiDict(response.headers),
            body=self._stream(response, gzip, count_error, ended),
            release=_releaser(response, ended),
            upstream_status=response.status,
            upstream_seconds=took,
        )

    def _timeout(self, deadline: float) -> aiohttp.ClientTimeout:
        left = deadline - asyncio.get_running_loop().time()
        if left >= self.settings.total_timeout:
            # The session's own (total, connect and read timeouts). Not None: aiohttp reads
            # ``timeout=None`` as ClientTimeout(total=None), no timeout at all.
            return self.session.timeout
        if left <= 0:
            raise UpstreamTimeout("The request's deadline passed before it could be sent")
        return aiohttp.ClientTimeout(
            total=left,
            sock_connect=self.settings.connect_timeout,
            sock_read=self.settings.read_timeout,
        )

    def _watch(self, response: Answer, slot: Release, deadline: float) -> Release:
        """The exchange never outlives ``deadline`` (total_timeout, or the request's), even
        while its answer waits on a caller that stopped reading: the connection is closed
        then and the slot freed. Returns what ends the watch (and frees the slot)."""

        def expire() -> None:
            response.close()
            slot()

        watchdog = asyncio.get_running_loop().call_at(deadline, expire)

        def ended() -> None:
            watchdog.cancel()
            slot()

        return ended

    async def _slot(self, request: ProxyRequest, count_error: Callable[[str], None]) -> Release:
        try:
            return await self.slots.take(request.account, request.deadline)
        except UpstreamBusy:
            count_error("busy")
            raise

    def _error_counter(self, account: str) -> Callable[[str], None]:
        """The account's error counter, made once per account (not once per request)."""
        found = self._counters.get(account)
        if found is None:

            def found(kind: str) -> None:
                if self.metrics is not None:
                    self.metrics.upstream_errors.labels(kind, account).inc()

            if len(self._counters) >= LABELLED_MAX:
                self._counters.clear()
            self._counters[account] = found
        return found

    async def _stream(
        self,
        response: Answer,
        gzip: bool,
        count_error: Callable[[str], None],
        slot: Release,
    ) -> AsyncIterator[bytes]:
        chunks: AsyncIterator[bytes] = response.content.iter_chunked(CHUNK)
        if gzip:
            chunks = checked(chunks, self.caps)
        try:
            with mapped_errors(self.settings, count_error):
                async for chunk in chunks:
                    yield chunk
        finally:
            response.release()
            slot()


async def _no_body() -> AsyncIterator[bytes]:
    """The body of an answer that has none: an empty stream."""
    return
    yield  # pragma: no cover - makes this an async generator


def _has_gzip_body(method: str, response: Answer) -> bool:
    """Whether the response carries a gzip body to check (not HEAD, 204 or 304)."""
    if method == "HEAD" or response.status in NO_BODY:
        return False
    return coding_of(response.headers.items()) == GZIP


def _releaser(response: Answer, slot: Release) -> Callable[[], Awaitable[None]]:
    async def release() -> None:
        # close(), not release(): a half-read body must not go back to the pool.
        if not response.content.at_eof():
            response.close()
        else:
            response.release()
        slot()

    return release
