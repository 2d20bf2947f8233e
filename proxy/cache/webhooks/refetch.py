"""Refetch (``webhooks.refetch``): an entry callers read lately is fetched again in the
background after a change dropped it, so the next reader gets a HIT instead of a MISS.

- :class:`Reads` (pure, the clock passed in) remembers the webhook-rule entries callers
  read (cache key -> when, and the request), at most :data:`READS`, and answers which of
  them a change covers among those read within ``webhooks.refetch_window`` seconds.
- :class:`Refetcher` hears every change the cache's invalidator applies in this process (a
  delivery received here, or told by another replica, a write through the proxy; not a purge
  of every account) and queues the covered keys: coalesced per key (a key queued once
  however many changes cover it; one covered again while its refetch runs is fetched once
  more afterwards, since what was fetched may predate the newer change), at most
  :data:`QUEUE` waiting (more are dropped and counted). One worker sends them, one at a time
  and only with spare budget (no request waiting for the account, fleet-wide on Redis, and
  at least 2 tokens at hand, so a caller's request is never delayed), through the cache
  layer as caller ``webhook-refetch`` at batch priority: the cache's single flight per key
  (across replicas on Redis) makes one upstream request of it however many replicas refetch,
  and its invalidation guard stores nothing a newer change covered meanwhile.

Counted apart from callers' requests: ``kounta_proxy_webhook_refetches_total{account,outcome}``
(``fetched``: Kounta was asked; ``hit``: already stored again, here or by another replica
in Redis, nothing sent; ``failed``; ``dropped``: the queue was full).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import replace

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.cache.invalidation import Change, Purge
from proxy.cache.validation import CALLER_CONDITIONALS
from proxy.cache.webhooks.metrics import WebhookMetrics
from proxy.errors import ProxyError
from proxy.logs import event
from proxy.messages import Layer, ProxyRequest
from proxy.settings import Settings

CALLER = "webhook-refetch"
READS = 10_000  # reads remembered per process (the oldest forgotten first)
QUEUE = 1000  # refetches waiting at most; more are dropped (counted)
POLL = 0.1  # seconds between looks for spare budget while refetches wait
TIMEOUT = 30.0
# Headers of the caller's read not sent with its refetch: conditionals (the refetch wants
# the body to store) and the caller's own cache directives.
DROPPED = (*CALLER_CONDITIONALS, "Cache-Control", "Pragma")


def background(
    read: ProxyRequest, caller: str, headers: CIMultiDict[str], timeout: float
) -> ProxyRequest:
    """``read`` sent again by background work (the refetcher, the verifier): a GET with
    ``headers`` as ``caller`` at batch priority, with a request id and deadline of its own."""
    return replace(
        read,
        method="GET",
        headers=CIMultiDictProxy(headers),
        caller=caller,
        priority="batch",
        request_id=f"{caller}-{uuid.uuid4().hex[:12]}",
        deadline=asyncio.get_running_loop().time() + timeout,
    )


class Reads:
    """Webhook-rule entries callers read (cache key -> (when, request)), oldest first."""

    def __init__(self, limit: int = READS) -> None:
        self.limit = limit
        self.at: OrderedDict[str, tuple[float, ProxyRequest]] = OrderedDict()

    def read(self, key: str, request: ProxyRequest, now: float) -> None:
        self.at[key] = (now, request)
        self.at.move_to_end(key)
        while len(self.at) > self.limit:
            self.at.popitem(last=False)

    def covered(self, change: Change, now: float, window: float) -> list[tuple[str, ProxyRequest]]:
        """The reads within ``window`` seconds before ``now`` that ``change`` covers (older
        ones are forgotten on the way)."""
        while self.at:
            key, (when, _) = next(iter(self.at.items()))
            if when >= now - window:
                break
            del self.at[key]
        return [(k, r) for k, (_, r) in self.at.items() if change.covers(r.account, r.path)]


class Refetcher:
    def __init__(
        self,
        current: Callable[[], Settings],
        spare: Callable[[str], Awaitable[bool]],
        metrics: WebhookMetrics,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.current = current
        self.spare = spare
        self.metrics = metrics
        self.now = now
        self.reads = Reads()
        # The cache layer the refetches go through (set once while services are built).
        self.layer: Layer | None = None
        self.pending: OrderedDict[str, ProxyRequest] = OrderedDict()
        self.running: set[str] = set()
        self.again: dict[str, ProxyRequest] = {}
        self.wake = asyncio.Event()

    def read(self, key: str, request: ProxyRequest) -> None:
        """A caller read the webhook-rule entry ``key`` (the refetcher's own reads don't
        count, or an entry nobody reads would be fetched again forever)."""
        if request.caller != CALLER and self.current().webhooks.refetch:
            self.reads.read(key, request, self.now())

    def changed(self, change: Change) -> None:
        """The invalidator applied ``change`` here: queue the recent reads it covers."""
        hooks = self.current().webhooks
        if not hooks.refetch or (isinstance(change, Purge) and change.account is None):
            return  # off, or an operator's purge of everything (or a gap): not refilled
        for key, request in self.reads.covered(change, self.now(), hooks.refetch_window):
            self.enqueue(key, request)

    def enqueue(self, key: str, request: ProxyRequest) -> bool:
        """Queue ``key``; False when the queue was full (dropped, counted)."""
        if key in self.running:
            self.again[key] = request  # what runs may predate this change: once more after
            return True
        if key in self.pending:
            return True  # coalesced
        if len(self.pending) >= QUEUE:
            self.metrics.refetches.labels(request.account, "dropped").inc()
            return False
        self.pending[key] = request
        self.wake.set()
        return True

    async def run(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.pending:
                picked = await self._next()
                if picked is None:
                    await asyncio.sleep(POLL)
                    continue
                key, request = picked
                self.running.add(key)
                try:
                    await self.fetch(request)
                finally:
                    self.running.discard(key)
                    again = self.again.pop(key, None)
                    if again is not None:
                        self.enqueue(key, again)

    async def _next(self) -> tuple[str, ProxyRequest] | None:
        """The oldest queued refetch of an account with spare budget (None: none has)."""
        checked: dict[str, bool] = {}
        for key, request in self.pending.items():
            account = request.account
            if account not in checked:
                checked[account] = await self.spare(account)
            if checked[account]:
                del self.pending[key]
                return key, request
        return None

    async def fetch(self, read: ProxyRequest) -> str:
        """Send the read again through the cache layer; returns the outcome counted."""
        headers = CIMultiDict(read.headers)
        for name in DROPPED:
            headers.popall(name, None)
        request = background(read, CALLER, headers, TIMEOUT)
        outcome = "failed"
        try:
            assert self.layer is not None, "the refetcher has no cache layer"
            response = await self.layer.send(request)
            await response.read()
            if response.status < 400:
                # Answered without asking Kounta: a hit, or another replica's fetch in Redis.
                outcome = "hit" if response.upstream_status is None else "fetched"
        except Exception as e:  # the worker goes on whatever happened to one refetch
            level = logging.INFO if isinstance(e, ProxyError) else logging.WARNING
            event("webhook_refetch_failed", level, account=read.account, error=type(e).__name__)
        self.metrics.refetches.labels(read.account, outcome).inc()
        return outcome
