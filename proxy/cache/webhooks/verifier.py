"""The verifier: does the account's feed still tell every change?

Every ``webhooks.verify_every`` seconds, for each account whose feed is trusted and whose
budget has room to spare (no request waiting and at least 2 tokens at hand, fleet-wide on
Redis, so a caller's request is never delayed), it sends one request to Kounta through the
layers below the cache, as caller ``webhook-verifier`` (so no cache tier answers for Kounta):

1. a suspect, if a list page named one: the record is revalidated (below). A list page
   callers read lately (webhook-fresh, from the cache: no request) is compared with its
   cached members first, so a record it contradicts is checked at once;
2. else a page of the list of a recently read record's family (:mod:`.witness`; the walk
   follows ``X-Next-Page`` one page a check while pages show cached members, then starts
   again from the first page): each cached member that shows another value than the page
   in a field both show becomes a suspect — one request checks a page of records where a
   revalidation checks one; after a page with no cached member, one check is step 3;
3. else a recently read webhook-fresh entry is revalidated (``If-None-Match``).

When a revalidation finds the entry changed and no delivery covering it arrived since the
entry was fetched or within ``webhooks.delivery_grace`` seconds of the check, a delivery was
missed: the entry is invalidated on every replica, the feed is distrusted for
``webhooks.distrust_for`` (in Redis too, so every replica distrusts it), counted
(``kounta_proxy_webhook_missed_total``) and logged once. A suspect found unchanged is not
named again by the same member as shown (a list may show a field in another form).

Once a second it also reads from Redis whether another replica distrusts a feed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.cache.invalidation import Invalidation, normalise_path
from proxy.cache.layer import Cache
from proxy.cache.webhooks import registration, witness
from proxy.cache.webhooks.metrics import WebhookMetrics
from proxy.cache.webhooks.refetch import DROPPED, background
from proxy.errors import ProxyError
from proxy.logs import event
from proxy.messages import Layer, ProxyRequest
from proxy.settings import Settings
from proxy.shared.base import SharedUnavailable

TICK = 1.0  # seconds between looks at the shared distrust marks
CALLER = "webhook-verifier"
VERIFY_TIMEOUT = 30.0
SUSPECTS = 256  # suspects remembered per account (the oldest forgotten first)


class Distrust(Protocol):
    async def webhook_distrust(self, account: str, ttl: float) -> None: ...

    async def webhook_distrusted(self, account: str) -> float: ...


class Verifier:
    def __init__(
        self,
        cache: Cache,
        current: Callable[[], Settings],
        spare: Callable[[str], Awaitable[bool]],
        metrics: WebhookMetrics,
        shared: Distrust | None = None,
        inner: Layer | None = None,
    ) -> None:
        """``inner``: the layers below the cache, for the registration check."""
        self.cache = cache
        self.feeds = cache.feeds
        self.current = current
        self.spare = spare
        self.metrics = metrics
        self.shared = shared
        self.inner = inner
        self.last: dict[str, float] = {}
        self.last_check: dict[str, float] = {}
        # Records a list page disagreed with, revalidated first (cache key -> request and
        # the member that named it).
        self.suspects: dict[str, OrderedDict[str, tuple[ProxyRequest, str]]] = {}
        # The next list page to fetch and the record read it is asked like, per account.
        self.walk: dict[str, tuple[str, ProxyRequest]] = {}
        # Whether the last list page fetched showed a cached member (see witness.choose).
        self.covered: dict[str, bool] = {}
        # Suspects a revalidation found unchanged, and the member that named them (oldest
        # first): the same member again is the list's form, not a change.
        self.cleared: OrderedDict[str, str] = OrderedDict()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            settings = self.current()
            for account in settings.accounts:
                await self._share(account)
                every = settings.webhooks.verify_every
                now = time.monotonic()
                if every > 0 and now - self.last.get(account, 0.0) >= every:
                    self.last[account] = now
                    try:
                        await self.verify(account)
                    except Exception as e:  # the verifier must go on whatever happened
                        event("webhook_verify_failed", logging.WARNING, account=account,
                              error=type(e).__name__)  # fmt: skip
                check = settings.webhooks.check_every
                due = now - self.last_check.get(account, -check) >= check
                if check > 0 and due and settings.webhooks.address and await self.spare(account):
                    self.last_check[account] = now
                    await self.check(account)

    async def check(self, account: str) -> int | None:
        """Count the account's webhooks at this proxy's address; none: the feed is
        distrusted until a check finds one. None when the check could not be made."""
        if self.inner is None:
            return None
        settings = self.current()
        try:
            address = registration.address_for(settings, account, None)
            found = await registration.Kounta(self.inner, account, CALLER, "batch").webhooks()
        except (registration.RegistrationError, ProxyError) as e:
            event("webhook_check_failed", logging.WARNING, account=account, error=str(e)[:200])
            return None
        count = sum(1 for hook in found if hook.get("address") == address)
        self.metrics.registered.labels(account).set(count)
        if self.feeds.registered(account, count > 0):
            level = logging.INFO if count else logging.WARNING
            event("webhook_registration", level, account=account, registered=count,
                  address=address)  # fmt: skip
        return count

    async def _share(self, account: str) -> None:
        if self.shared is None:
            return
        with contextlib.suppress(SharedUnavailable):
            self.feeds.distrusted_for(account, await self.shared.webhook_distrusted(account))

    async def verify(self, account: str) -> str:
        """One verification for ``account``; returns the result counted."""
        result = await self._verify(account)
        self.metrics.verifications.labels(account, result).inc()
        return result

    async def _verify(self, account: str) -> str:
        if not self.feeds.healthy(account) or not await self.spare(account):
            return "skipped"
        if self.inner is None:
            return "skipped"  # nothing to ask Kounta through
        await self._cached_lists(account)
        suspects = self.suspects.get(account)
        choice = witness.choose(bool(suspects), self.covered.pop(account, None))
        while suspects and choice == "suspect":  # one a delivery dropped since: the next
            key, (request, shown) = suspects.popitem(last=False)
            result = await self._revalidate(account, key, request)
            if result == "unchanged":  # the list's form differs: that member names it no more
                self.cleared[key] = shown
                while len(self.cleared) > SUSPECTS:
                    self.cleared.popitem(last=False)
            if result != "skipped" or not suspects:
                return result
        target = self._page(account) if choice == "list" else None
        if target is not None:
            return await self._witness(account, *target)
        picked = self.feeds.pick(account)
        if picked is None:
            return "skipped"
        return await self._revalidate(account, *picked)

    def _page(self, account: str) -> tuple[str, ProxyRequest] | None:
        """The list page to fetch next (path and query) and the record read to ask it like:
        the walk's next page, else the first page of the newest record read's family."""
        target = self.walk.pop(account, None)
        if target is not None:
            return target
        for request in self.feeds.recent(account):
            listing = witness.family_list(request.path)
            if listing is not None:
                return listing, request
        return None

    async def _witness(self, account: str, page: str, read: ProxyRequest) -> str:
        """Fetch one list page; its cached members that disagree with it become suspects."""
        path, _, query = page.partition("?")
        headers = CIMultiDict(read.headers)
        for name in (*DROPPED, "X-Page"):
            headers.popall(name, None)
        started = self.cache.clock()
        fetch = background(replace(read, path=path, query=query), CALLER, headers, VERIFY_TIMEOUT)
        assert self.inner is not None
        response = await self.inner.send(fetch)
        self.covered[account] = False
        if response.status != 200:
            await response.release()
            return "listed"
        body = witness.decoded(
            await response.read(witness.MAX_BODY + 1), response.headers.get("Content-Encoding")
        )
        covered, found = await self._compare(account, path, body or b"", started, read)
        self.covered[account] = covered
        after = witness.next_page(response.headers.get("X-Next-Page"), path)
        if after is not None and covered:
            # On to the next page while pages show cached members; past them, start again.
            self.walk[account] = (after, read)
        return "suspect" if found else "listed"

    async def _compare(
        self, account: str, path: str, body: bytes, as_of: float, read: ProxyRequest
    ) -> tuple[bool, int]:
        """Compare list page ``path`` (``body``, Kounta's as of ``as_of``) with its cached
        members stored before then; those that disagree become suspects. Returns whether
        any member was cached, and how many became suspects."""
        headers = CIMultiDict(read.headers)
        headers.popall("X-Page", None)  # a page's header, not its members'
        covered, found = False, 0
        for member_id, member in witness.members(body):
            record = witness.member_path(path, member_id)
            if record is None:
                continue
            key = self.cache.key(account, record, "", headers)
            stored = await self.cache.entries.lookup(account, key)
            if stored is None or stored.body is None or stored.entry.response_time >= as_of:
                continue  # not cached, stored apart, or newer than the page
            covered = True
            shown = witness.fingerprint(member)
            if self.cleared.get(key) == shown:
                continue  # this member named it before and it was unchanged
            cached = witness.decoded(stored.body, stored.entry.header("Content-Encoding"))
            if cached is not None and witness.disagrees(member, cached):
                request = replace(read, path=record, query="", headers=CIMultiDictProxy(headers))
                self._suspect(account, key, request, shown)
                found += 1
        return covered, found

    async def _cached_lists(self, account: str) -> None:
        """Compare the list pages callers read lately (webhook-fresh, so as current as the
        feed) with their cached members: no request, and a suspect is checked at once."""
        seen: set[str] = set()
        for read in self.feeds.recent(account):
            if read.path in seen or witness.LIST.match(read.path) is None:
                continue
            seen.add(read.path)
            key = self.cache.key(account, read.path, read.query, read.headers)
            stored = await self.cache.entries.lookup(account, key)
            if stored is None or stored.body is None:
                continue
            body = witness.decoded(stored.body, stored.entry.header("Content-Encoding"))
            await self._compare(account, read.path, body or b"", stored.entry.response_time, read)

    def _suspect(self, account: str, key: str, request: ProxyRequest, shown: str) -> None:
        suspects = self.suspects.setdefault(account, OrderedDict())
        suspects[key] = (request, shown)
        while len(suspects) > SUSPECTS:
            suspects.popitem(last=False)

    async def _revalidate(self, account: str, key: str, request: ProxyRequest) -> str:
        """Revalidate one entry: did it change without a delivery saying so?"""
        stored = await self.cache.entries.lookup(account, key)
        if stored is None:
            return "skipped"  # dropped since (a delivery, most likely)
        etag = stored.entry.etag
        if etag is None or self.inner is None:
            return "skipped"  # nothing to compare with
        fetched = stored.entry.request_time
        started = self.feeds.now()
        headers = CIMultiDict(request.headers)
        headers["If-None-Match"] = etag
        check = background(request, CALLER, headers, VERIFY_TIMEOUT)
        # Below the cache: neither this process's tiers nor Redis may answer for Kounta.
        response = await self.inner.send(check)
        await response.release()
        if response.status != 200 or response.headers.get("ETag") == etag:
            return "unchanged"  # 304 (or an answer that says nothing)
        path = stored.entry.path
        grace = self.current().webhooks.delivery_grace
        await asyncio.sleep(grace)
        # A delivery since the entry was fetched explains the change too (a list page changes
        # with each of its members: what the receiver applied for it counts, however early).
        if self.feeds.announced_since(account, min(started - grace, fetched), path):
            return "changed"
        # Missed: the stale entry goes everywhere at once, then the feed is distrusted.
        await self.cache.invalidator.apply(Invalidation(account, frozenset({normalise_path(path)})))
        await self._missed(account, path)
        return "missed"

    async def _missed(self, account: str, path: str) -> None:
        seconds = self.current().webhooks.distrust_for
        self.metrics.missed.labels(account).inc()
        if self.feeds.distrust(account, seconds):
            event("webhook_missed_change", logging.WARNING, account=account, path=path,
                  distrust_for=seconds)  # fmt: skip
        if self.shared is not None:
            with contextlib.suppress(SharedUnavailable):
                await self.shared.webhook_distrust(account, seconds)
