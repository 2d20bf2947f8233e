"""The verifier: does the account's feed still tell every change?

Every ``webhooks.verify_every`` seconds, for each account whose feed is trusted and whose
budget has room to spare (no request waiting and at least 2 tokens at hand, fleet-wide on
Redis, so a caller's request is never delayed), it revalidates one recently read
webhook-fresh entry with Kounta (``If-None-Match`` through the layers below the cache, as
caller ``webhook-verifier``, so no cache tier answers for Kounta). When Kounta says the entry
changed and no delivery covering it arrives within ``webhooks.delivery_grace`` seconds of
the check, a delivery was missed: the entry is invalidated on every replica, the feed is
distrusted for ``webhooks.distrust_for`` (in Redis too, so every replica distrusts it),
counted (``kounta_proxy_webhook_missed_total``) and logged once.

Once a second it also reads from Redis whether another replica distrusts a feed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from multidict import CIMultiDict

from proxy.cache.invalidation import Invalidation, normalise_path
from proxy.cache.layer import Cache
from proxy.cache.webhooks import registration
from proxy.cache.webhooks.metrics import WebhookMetrics
from proxy.cache.webhooks.refetch import background
from proxy.errors import ProxyError
from proxy.logs import event
from proxy.messages import Layer
from proxy.settings import Settings
from proxy.shared.base import SharedUnavailable

TICK = 1.0  # seconds between looks at the shared distrust marks
CALLER = "webhook-verifier"
VERIFY_TIMEOUT = 30.0


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
        picked = self.feeds.pick(account)
        if picked is None:
            return "skipped"
        key, request = picked
        stored = await self.cache.entries.lookup(account, key)
        if stored is None:
            return "skipped"  # dropped since (a delivery, most likely)
        etag = stored.entry.etag
        if etag is None or self.inner is None:
            return "skipped"  # nothing to compare with
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
        if self.feeds.announced_since(account, started - grace, path):
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
