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
    """An encrypted token record as stored: ``version`` grows with every write (by one, or
    to a writer's floor: a record written back after a restore, ``authorize``)."""

    version: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ClassedAsk:
    """A request for a send slot with budget classes: its class, this replica's waiting
    requests by class (interactive, standard, batch; this one included), the fraction batch
    leaves untouched, the classes' weights, how long the demand stands unrefreshed, and how
    long each class's oldest request here has waited, and the longest pause it honours."""

    klass: str
    waiting: tuple[int, int, int]
    reserve: float
    weights: tuple[float, float, float]
    demand_ttl: float
    # Seconds the oldest waiting request of each class has waited here (0: none, or this one).
    ages: tuple[float, float, float] = (0.0, 0.0, 0.0)
    # The longest pause this replica honours (``budget.retry_after_max``): a shared pause, or
    # a pace read back, counts for at most this long (as with :meth:`SharedBudget.take`).
    longest: float = 1e9
    # Tokens of the burst batch leaves (``budget.headroom``; the script ignores it otherwise).
    headroom: int = 0


@dataclass(frozen=True, slots=True)
class Taken:
    """The answer: 0.0 when a slot was taken, else the seconds to wait; and the whole fleet's
    waiting requests by class."""

    wait: float
    fleet: tuple[int, int, int]
    # The send logged for a slot taken (to give it back unused, ``give_back``); "" for none.
    member: str = ""


@dataclass(frozen=True, slots=True)
class SlotAsk:
    """A budget slot asked in the same round trip as a fetch lock's claim (the lock's owner
    only: Redis takes it only when that claim took the lock, :meth:`SharedCache.cache_claim`),
    for ``account`` at its rate (per window, burst, period), as :meth:`SharedBudget.take_classed`
    asks."""

    account: str
    per_window: int
    burst: int
    period: float
    ask: ClassedAsk


@dataclass(frozen=True, slots=True)
class Room:
    """The shared bucket's slots at hand now and the fleet's waiting requests by class
    (interactive, standard, batch): what background work may spend (:meth:`SharedBudget.room`)."""

    tokens: float
    fleet: tuple[int, int, int]
    # Seconds until the shared bucket grants its next slot (0: one at hand).
    ready_in: float = 0.0


class SharedBudget(Protocol):
    """One account's rate shared by every replica."""

    async def take(
        self, account: str, per_window: int, burst: int, period: float, longest: float = ...
    ) -> float:
        """Take one send slot if the account has room: 0.0, else the seconds to wait (no slot
        taken); a shared pause counts for at most ``longest`` seconds (the caller's
        ``budget.retry_after_max``). Raises :class:`SharedUnavailable`."""
        ...

    async def take_classed(
        self, account: str, per_window: int, burst: int, period: float, ask: ClassedAsk
    ) -> Taken:
        """:meth:`take` with budget classes fleet-wide: the slot goes to the class weighted
        fair queuing picks among those the fleet has waiting. Raises
        :class:`SharedUnavailable`."""
        ...

    async def pause(
        self, account: str, seconds: float, per_window: int, burst: int, period: float
    ) -> float:
        """Kounta said 429: pause the account for every replica; returns the pause left."""
        ...

    async def room(
        self, account: str, per_window: int, burst: int, period: float, longest: float = ...
    ) -> Room:
        """The account's spare room fleet-wide, read only (nothing taken, nothing registered).
        Raises :class:`SharedUnavailable`."""
        ...

    async def give_back(self, account: str, member: str, per_window: int, period: float) -> bool:
        """A slot taken (``Taken.member``) and not used goes back to the fleet; False when its
        send has already left the window. Raises :class:`SharedUnavailable`."""
        ...

    async def drop_demand(self, account: str) -> None:
        """Nothing waits on this replica any more: the fleet stops counting its requests.
        Raises :class:`SharedUnavailable`."""
        ...


class SharedTokens(Protocol):
    """Versioned, encrypted token records and a lock per account."""

    async def read_token(self, account: str) -> TokenRecord | None:
        """The record or None; raises :class:`~proxy.shared.records.BadRecord` for a
        malformed one."""
        ...

    async def write_token(
        self, account: str, data: bytes, expected: int, floor: int = ...
    ) -> int | None:
        """Write if the stored version is still ``expected`` (0: none stored, -1: a malformed
        record); the new version is ``expected + 1`` or ``floor`` if higher. Returns it, or
        None when another writer came first."""
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
        """Call ``on_message`` for each message another replica sends on ``topic``; after a
        break, the messages missed meanwhile when they can be replayed (Redis: the
        invalidation log), else ``on_gap`` (messages may have been missed)."""
        ...


@dataclass(frozen=True, slots=True)
class Claim:
    """A fetch lock request's answer: ``owner`` is set when this replica took the lock,
    ``gen`` is the account's invalidation count read in the same round trip (a store made
    later is refused when an invalidation came in between), and ``data`` the entry found
    under the key once the lock was taken (the last owner's, stored before it let go). When
    another replica holds the lock: ``holder``, its owner token, and ``noted``, whether this
    replica was named among its waiters (the owner's release then publishes its note here).
    ``head``: ``data`` is only the first bytes of an entry larger than the claim's ``peek``
    (its MAC not checked: enough to read its entry's header, never to answer from)."""

    owner: str | None
    gen: str
    data: bytes | None = None
    holder: str | None = None
    noted: bool = False
    head: bool = False
    # The budget slot asked with the claim (``slot``), when the claim took the lock and Redis
    # answered it (None: not asked, not the lock's owner, or the ask failed).
    taken: Taken | None = None


class SharedCache(Protocol):
    """Cache entries shared by every replica (opaque records), a fetch lock per key and the
    per-account invalidation count. Every method raises :class:`SharedUnavailable`."""

    async def cache_get(self, account: str, digest: str, limit: int) -> bytes | memoryview | None:
        """The record (verified; a view of the reply it came in, or bytes), or None; raises
        :class:`~proxy.shared.records.BadRecord` for one whose MAC does not verify or whose
        body part is over ``limit`` bytes (its size is checked before it is read)."""
        ...

    async def cache_read(
        self, account: str, digest: str, limit: int
    ) -> tuple[bytes, bytes | memoryview] | None:
        """:meth:`cache_get`, with the record's MAC tag as verified (empty: a record of the
        previous format, no MAC): the same tag names the same record."""
        ...

    async def cache_put(
        self, account: str, digest: str, path: str, data: bytes, ttl: float, gen: str
    ) -> bool:
        """Store record and body (one script: all or nothing) with a TTL, unless the
        account's invalidation count is no longer ``gen``; returns whether it was stored."""
        ...

    async def cache_claim(
        self,
        account: str,
        digest: str,
        owner: str,
        ttl: float,
        limit: int,
        wait: bool = False,
        peek: int = 0,
        slot: SlotAsk | None = None,
    ) -> Claim:
        """Take the key's fetch lock; the entry found once it is taken is verified and at
        most ``limit`` bytes of body (else none); one larger than ``peek`` bytes (0: none)
        comes as its first ``peek`` bytes (``Claim.head``). ``wait``: when another replica
        holds it, be named among its waiters (to hear its note: :meth:`cache_note`).
        ``slot``: a budget slot asked in the same round trip, taken only if this claim took
        the lock (``Claim.taken``)."""
        ...

    async def cache_poll(self, account: str, digest: str, limit: int) -> tuple[bytes | None, bool]:
        """The stored record (or None) and whether the fetch lock is still held; raises as
        :meth:`cache_get`."""
        ...

    async def cache_release(
        self, account: str, digest: str, owner: str, note: bytes | None = None
    ) -> None:
        """Let go of the lock (its owner only) and publish ``note`` to its waiters."""
        ...

    def cache_let_go(self, account: str, digest: str, owner: str, note: bytes | None) -> None:
        """:meth:`cache_release` written now, within this call, with no task or coroutine:
        its reply only counted when it comes (nobody waits on it); raises
        :class:`SharedUnavailable` at once when the shared store is away."""
        ...

    async def cache_note(
        self, account: str, digest: str, holder: str, seconds: float
    ) -> bytes | None:
        """The note the lock's ``holder`` left on letting go, within ``seconds`` (None: none
        heard); raises :class:`~proxy.shared.records.BadRecord` for one that fails its MAC."""
        ...

    async def cache_drop(self, account: str, covers: Callable[[str], bool]) -> int:
        """Count an invalidation, then delete every entry whose path ``covers`` names."""
        ...


class Backend(Protocol):
    kind: str  # "local" or "redis": shared.backend

    @property
    def budget(self) -> SharedBudget | None: ...

    @property
    def tokens(self) -> SharedTokens | None: ...

    @property
    def events(self) -> SharedEvents | None: ...

    @property
    def cache(self) -> SharedCache | None: ...

    @property
    def up(self) -> bool:
        """Whether the shared store answers now (always True for local)."""
        ...

    def detail(self) -> str | None:
        """A readiness detail that does not fail readiness ("shared: degraded")."""
        ...

    @property
    def back_since(self) -> float:
        """When (``time.monotonic()``) the store last came back after being away; 0 if it
        never was away. Records read soon after may be older than before (a restore)."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...
