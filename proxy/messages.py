"""The request and response that travel through the proxy's layers.

Each layer (cache, budget, auth, upstream) is a :class:`Layer`: one ``send``
that takes a :class:`ProxyRequest` and returns a :class:`ProxyResponse`, usually
by calling the next layer. Headers are always in the upstream's form here;
rewriting for the caller happens once, when answering.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.coding import coding_of, inflate_prefix

# A body is held in memory (replayable), streamed once, or absent.
# Sizes shared by every layer: a read or write chunk, and how much of an error body is read.
CHUNK = 64 * 1024
ERROR_BODY_LIMIT = 64 * 1024

# What the cache did for an answer (the X-Cache header, the access log's ``cache`` field and
# the request metrics' ``cache`` label); "-" when no answer came from the pipeline.
CacheStatus = Literal["HIT", "MISS", "REVALIDATED", "STALE", "BYPASS", "-"]

Body = bytes | AsyncIterable[bytes] | None


@dataclass(slots=True)
class Prepaid:
    """A background request's budget token, taken ahead of its send (a cache refresh takes
    it before the key's fetch lock, so while it waits it holds nothing another replica's
    caller would wait on): the budget spends it on the first send instead of taking one."""

    paid: bool = False

    def spend(self) -> bool:
        """Whether a token was taken ahead; once (a resend takes its own)."""
        paid, self.paid = self.paid, False
        return paid


@dataclass(frozen=True, slots=True)
class ProxyRequest:
    method: str
    path: str  # raw, percent-encoded, under /v1/
    query: str  # raw, without "?"
    headers: CIMultiDictProxy[str]  # already filtered for the upstream
    body: Body = None
    account: str = "default"
    caller: str = "anonymous"
    # The budget class (interactive, standard, batch): the caller's, or lower if asked.
    priority: str = "standard"
    request_id: str = ""
    # Absolute event-loop time after which nobody waits for an answer any more.
    deadline: float = float("inf")
    # Asked (with the deadline) for the Authorization header at the moment of sending, after
    # the budget's wait: a short-lived token taken before that wait may expire in the queue.
    # None: the headers as they are. The auth layer sets it; the upstream layer calls it.
    authorize: Callable[[float], Awaitable[str]] | None = None
    # Set on background requests nobody waits for (a cache refresh): whether it is still
    # useful; the budget drops it instead of spending a token once this says False.
    wanted: Callable[[], bool] | None = None
    # Set on a background request that may take its budget token ahead (:class:`Prepaid`).
    prepaid: Prepaid | None = None

    @property
    def path_qs(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path

    @property
    def replayable(self) -> bool:
        return self.body is None or isinstance(self.body, bytes)

    def with_headers(self, **updates: str) -> ProxyRequest:
        headers = CIMultiDict(self.headers)
        for name, value in updates.items():
            headers[name.replace("_", "-")] = value
        return self.sent_as(self.method, CIMultiDictProxy(headers), self.authorize)

    def sent_as(
        self,
        method: str,
        headers: CIMultiDictProxy[str],
        authorize: Callable[[float], Awaitable[str]] | None,
    ) -> ProxyRequest:
        """This request with ``method``, ``headers`` and ``authorize``: ``dataclasses.replace``
        without its look at every field (a flight's request is remade in three layers)."""
        return ProxyRequest(
            method, self.path, self.query, headers, self.body, self.account, self.caller,
            self.priority, self.request_id, self.deadline, authorize, self.wanted, self.prepaid,
        )  # fmt: skip


async def _nothing() -> None:
    return None


@dataclass(slots=True)
class ProxyResponse:
    status: int
    headers: CIMultiDict[str]
    # bytes when held whole (cache hits, small answers), else a one-shot stream.
    body: bytes | AsyncIterator[bytes] = b""
    # Frees the upstream connection; safe to call more than once.
    release: Callable[[], Awaitable[None]] = field(default=_nothing)
    cache_status: CacheStatus = "BYPASS"
    # RFC 9211 Cache-Status parameters when the cache knows more than cache_status says
    # (e.g. "fwd=uri-miss", "hit; detail=stale-while-revalidate"); "" derives them.
    cache_detail: str = ""
    upstream_status: int | None = None
    age: int | None = None
    # Seconds spent waiting for upstream response headers for this answer, every attempt
    # (retries, auth resends) added; None when no upstream request was made. Access log only.
    upstream_seconds: float | None = None

    def add_upstream_time(self, earlier: float | None) -> None:
        """Count attempts made before this answer's own."""
        if earlier is not None:
            self.upstream_seconds = (self.upstream_seconds or 0.0) + earlier

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body (at most ``limit`` bytes are kept), releasing the stream."""
        if isinstance(self.body, bytes):
            return self.body if limit is None else self.body[:limit]
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in self.body:
                if limit is None or size < limit:
                    chunks.append(chunk)
                size += len(chunk)
        finally:
            await self.release()
        data = b"".join(chunks)
        self.body = data if limit is None else data[:limit]
        return self.body

    async def decoded(self, limit: int) -> bytes:
        """At most ``limit`` bytes of what the body says, for the proxy to read itself (error
        bodies, 401 reasons, pages): gzip inflated within ``limit``, an unknown coding as
        nothing. The body stays as it came, for the answer."""
        raw = await self.read(limit)
        return inflate_prefix(raw, coding_of(self.headers.items()), limit)


class Layer(Protocol):
    async def send(self, request: ProxyRequest) -> ProxyResponse: ...
