"""The shared-state interface the budget and the token store use, and its one error."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol


class SharedUnavailable(Exception):
    """The shared backend cannot answer now; the caller falls back to this process.

    The message names the operation and the kind of failure, never a key's contents."""


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """An encrypted token record as stored: ``version`` grows by one with every write."""

    version: int
    data: bytes


class SharedBudget(Protocol):
    """One account's rate shared by every replica."""

    async def take(self, account: str, per_window: int, burst: int, period: float) -> float:
        """Take one send slot if the account has room: 0.0, else the seconds to wait (no slot
        taken). Raises :class:`SharedUnavailable`."""
        ...

    async def pause(
        self, account: str, seconds: float, per_window: int, burst: int, period: float
    ) -> float:
        """Kounta said 429: pause the account for every replica; returns the pause left."""
        ...


class SharedTokens(Protocol):
    """Versioned, encrypted token records and a lock per account."""

    async def read_token(self, account: str) -> TokenRecord | None: ...

    async def write_token(self, account: str, data: bytes, expected: int) -> int | None:
        """Write if the stored version is still ``expected`` (0: none stored); returns the new
        version, or None when another writer came first."""
        ...

    def token_lock(
        self, account: str, ttl: float, patience: float
    ) -> AbstractAsyncContextManager[bool]:
        """Hold the account's refresh lock (owner + TTL); yields False if it was not taken."""
        ...


class SharedEvents(Protocol):
    """Broadcasts between replicas (Redis pub/sub): fire and forget, at most once."""

    async def publish(self, topic: str, data: bytes) -> None:
        """Send to every other replica listening on ``topic``; raises SharedUnavailable."""
        ...

    def listen(
        self, topic: str, on_message: Callable[[bytes], None], on_gap: Callable[[], None]
    ) -> None:
        """Call ``on_message`` for each message another replica sends on ``topic``, and
        ``on_gap`` when listening resumes after a break (messages may have been missed)."""
        ...


class Backend(Protocol):
    kind: str
    # Whether state is shared with other processes at all (False for local).
    shared: bool

    @property
    def budget(self) -> SharedBudget | None: ...

    @property
    def tokens(self) -> SharedTokens | None: ...

    @property
    def events(self) -> SharedEvents | None: ...

    @property
    def up(self) -> bool:
        """Whether the shared store answers now (always True for local)."""
        ...

    def detail(self) -> str | None:
        """A readiness detail that does not fail readiness ("shared: degraded")."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...
