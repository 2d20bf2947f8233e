"""The webhook feature's records in Redis (:mod:`proxy.cache.webhooks`), a part of
:class:`~proxy.shared.redis_backend.RedisBackend`: event ids seen and feeds distrusted.

Keys (``P`` is ``shared.key_prefix``; both with a TTL)::

    P:webhook:ACCOUNT:seen:D    a delivery applied (D: sha256 of its event id and body)
    P:webhook:ACCOUNT:distrusted  the account's feed is distrusted until the key expires
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class _Backend(Protocol):
    """What these records use of the backend."""

    @property
    def client(self) -> Any: ...

    def key(self, kind: str, account: str, suffix: str = "") -> str: ...

    async def _run(self, op: str, call: Callable[[], Awaitable[T]], limit: float = 0.0) -> T: ...


class WebhookRecords:
    """Mixed into the Redis backend (its connection, keys and error handling)."""

    async def webhook_seen(self: _Backend, account: str, digest: str) -> bool:
        """Whether the delivery ``digest`` (a sha256 hex, never an id in clear) was applied."""
        key = self.key("webhook", account, f"seen:{digest}")
        return bool(await self._run("webhook_seen", lambda: self.client.exists(key)))

    async def webhook_remember(self: _Backend, account: str, digest: str, ttl: float) -> None:
        key = self.key("webhook", account, f"seen:{digest}")
        ttl_ms = max(1, int(ttl * 1000))
        await self._run("webhook_remember", lambda: self.client.set(key, b"1", px=ttl_ms))

    async def webhook_distrust(self: _Backend, account: str, ttl: float) -> None:
        """Every replica distrusts the account's feed for ``ttl`` seconds (a missed change)."""
        key = self.key("webhook", account, "distrusted")
        ttl_ms = max(1, int(ttl * 1000))
        await self._run("webhook_distrust", lambda: self.client.set(key, b"1", px=ttl_ms))

    async def webhook_distrusted(self: _Backend, account: str) -> float:
        """Seconds the account's feed is still distrusted for (0: not)."""
        key = self.key("webhook", account, "distrusted")
        left = await self._run("webhook_distrusted", lambda: self.client.pttl(key))
        return max(0.0, int(left) / 1000)
