"""``X-Proxy-All-Pages: 1``: a whole Kounta list as one JSON array.

Kounta lists come 25 records a page, each page naming the next in ``X-Next-Page``.
On request the proxy follows that chain itself, through its own pipeline (so each
page is cached and takes a token from the budget like any other request), and
streams the records out as one JSON array. A list whose first page has no
``X-Next-Page`` but an ``X-Pages`` count (the older scheme) is gathered by asking
for ``X-Page: 1, 2, ...`` instead.

A list longer than ``paging.max_pages`` is an error, never a silent cut: 422
``too_many_pages`` when the first page already tells the count (``X-Pages``); else
the connection is broken off when the cap is reached, so the array can never look
complete. The same goes for a later page that fails.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.edge.answer import answer, caller_value, in_time
from proxy.edge.inbound import exchange_of
from proxy.edge.rewrite import rewrite_url
from proxy.edge.services import Services
from proxy.errors import InvalidRequest, ProxyError, TooManyPages, UpstreamError
from proxy.logs import event
from proxy.messages import ProxyRequest, ProxyResponse
from proxy.target import parse_target

HEADER = "X-Proxy-All-Pages"
X_PAGE = "X-Page"
# One page is 25 abridged records; anything near this is not a Kounta page.
PAGE_LIMIT = 32 * 1024 * 1024
_MARK = URL("http://all-pages.invalid")
_ON = ("1", "true", "yes")
_OFF = ("", "0", "false", "no")


def wanted(request: web.Request) -> bool:
    """Whether the caller asked for all pages (a bad value or method is a 400)."""
    value = request.headers.get(HEADER, "").strip().lower()
    if value in _OFF:
        return False
    if value not in _ON:
        raise InvalidRequest(f"{HEADER} must be 1 (or absent), got {value[:20]!r}")
    if request.method != "GET":
        raise InvalidRequest(f"{HEADER} works with GET only, not {request.method}")
    return True


def next_request(first: ProxyRequest, url: str, upstream: URL, deadline: float) -> ProxyRequest:
    """The request for an upstream ``X-Next-Page`` URL, which must be on the upstream.

    The reference promises an absolute URL but not its format: a path (``/v1/...``) is
    taken as one on the upstream's origin."""
    if url.startswith("/") and not url.startswith("//"):
        url = str(upstream.origin()) + url
    moved = _rewrite(url, upstream)
    prefix = str(_MARK) + "/"
    if not moved.startswith(prefix):
        raise UpstreamError("Kounta's X-Next-Page points outside the upstream; not followed")
    target = parse_target("/" + moved[len(prefix) :].partition("#")[0])
    return replace(first, path=target.path, query=target.query, deadline=deadline)


def numbered_request(first: ProxyRequest, page: ProxyResponse, number: int) -> ProxyRequest | None:
    """The older scheme: page ``number`` (0-based ``X-Page``) if ``page``'s ``X-Pages`` says
    the list has it, else None."""
    total = page.headers.get("X-Pages", "").strip()
    if not total.isdigit() or number >= int(total):
        return None
    return first.with_headers(X_Page=str(number))


def _rewrite(url: str, upstream: URL) -> str:
    return rewrite_url(url, upstream, _MARK)


def records_of(body: bytes) -> bytes:
    """The bytes between the brackets of a page's JSON array (checked to be one)."""
    try:
        parsed = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise UpstreamError("A page of the list is not valid JSON") from None
    if not isinstance(parsed, list):
        raise InvalidRequest(f"{HEADER} needs a list endpoint; this one answered a JSON object")
    return body.strip()[1:-1].strip()


def without_header(request: ProxyRequest) -> ProxyRequest:
    headers = CIMultiDict(request.headers)
    headers.popall(HEADER, None)
    return replace(request, headers=CIMultiDictProxy(headers))


async def all_pages(
    request: web.Request, first: ProxyRequest, services: Services
) -> web.StreamResponse:
    """Answer a ``X-Proxy-All-Pages`` request: the streamed array, or the first page's own
    answer (an error, a redirect, a 304) when that is not a 200."""
    upstream = services.settings.upstream.url
    gatherer = AllPages(request, first, services)
    response = await services.pipeline.send(gatherer.first)
    exchange_of(request).took(response)
    if response.status != 200:
        return await answer(request, response, upstream, services.settings.server.public_url)
    return await gatherer.answer(response)


class AllPages:
    """Gathers one caller's list, page by page, and streams it out."""

    def __init__(self, request: web.Request, first: ProxyRequest, services: Services) -> None:
        self.services = services
        self.request = request
        # A walk over a whole list is batch work: it never holds up interactive requests.
        self.first = replace(without_header(first), priority="batch")
        self.upstream = services.settings.upstream.url
        self.max_pages = self.services.settings.paging.max_pages

    async def answer(self, response: ProxyResponse) -> web.StreamResponse:
        """Stream the records of ``response`` (page one, a 200) and of every page after it."""
        try:
            self._check_announced(response)
            records = records_of(await response.decoded(PAGE_LIMIT))
        finally:
            await response.release()
        out = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "application/json; charset=utf-8",
                "Cache-Control": "no-store",
                "X-Request-ID": self.first.request_id,
                "X-Proxy-Caller": caller_value(self.first.caller, self.first.account),
            },
        )
        await out.prepare(self.request)
        try:
            await self._stream(out, response, records)
        except (ProxyError, ConnectionResetError, asyncio.CancelledError) as e:
            code = e.code if isinstance(e, ProxyError) else type(e).__name__
            event("all_pages_failed", request_id=self.first.request_id, error=code)
            if self.request.transport is not None:
                self.request.transport.abort()
        return out

    async def _write(self, out: web.StreamResponse, data: bytes) -> None:
        await in_time(self.request, out.write(data))
        exchange_of(self.request).bytes_sent += len(data)  # the access log's bytes

    def _next(
        self, page: ProxyResponse, done: int, by_number: bool, deadline: float
    ) -> ProxyRequest | None:
        """The request for the page after ``page`` (``done`` pages so far), None at the end."""
        if not by_number:
            next_url = page.headers.get("X-Next-Page", "")
            return next_request(self.first, next_url, self.upstream, deadline) if next_url else None
        start = self.first.headers.get(X_PAGE, "0").strip()
        return numbered_request(self.first, page, int(start) + done if start.isdigit() else done)

    def _check_announced(self, response: ProxyResponse) -> None:
        pages = response.headers.get("X-Pages", "")
        if pages.isdigit() and int(pages) > self.max_pages:
            raise TooManyPages(self._too_many(f"has {pages} pages"))

    def _too_many(self, what: str) -> str:
        return (
            f"The list {what}, more than paging.max_pages ({self.max_pages}); "
            "fetch it page by page or raise the cap"
        )

    async def _stream(self, out: web.StreamResponse, page: ProxyResponse, records: bytes) -> None:
        await self._write(out, b"[" + records)
        written = bool(records)
        pages = 1
        # Lists without X-Next-Page may still be paged the older way (X-Page in, X-Pages out).
        by_number = "X-Next-Page" not in page.headers
        seen = {(self.first.path_qs, self.first.headers.get(X_PAGE))}
        loop = asyncio.get_running_loop()
        while True:
            deadline = loop.time() + self.services.settings.upstream.total_timeout
            request = self._next(page, pages, by_number, deadline)
            if request is None:
                break
            if pages >= self.max_pages:
                raise TooManyPages(self._too_many(f"goes on past {pages} pages"))
            if (request.path_qs, request.headers.get(X_PAGE)) in seen:
                raise UpstreamError("Kounta's X-Next-Page chain loops back on itself")
            seen.add((request.path_qs, request.headers.get(X_PAGE)))
            page = await self.services.pipeline.send(request)
            if page.status != 200:
                await page.release()
                raise UpstreamError(f"Page {pages + 1} of the list answered {page.status}")
            previous, records = records, records_of(await page.decoded(PAGE_LIMIT))
            if by_number and records and records == previous:
                raise UpstreamError("Kounta ignored X-Page: two pages came back the same")
            if records:
                await self._write(out, (b"," if written else b"") + records)
                written = True
            pages += 1
        await self._write(out, b"]")
        await in_time(self.request, out.write_eof())
        self.services.metric_groups.edge.paging_pages.inc(pages)
        event("all_pages", request_id=self.first.request_id, pages=pages)
