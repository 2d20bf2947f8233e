"""The shared budget's calls to Redis (:mod:`proxy.shared.scripts`), a part of
:class:`~proxy.shared.redis_backend.RedisBackend`: take a slot (plain or with budget classes),
give one back, share a pause, read the spare room. Keys: ``P:budget:ACCOUNT`` (and ``:log``,
``:demand``), described in :mod:`proxy.shared.redis_backend`.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from proxy.shared.base import ClassedAsk, Room, SlotAsk, Taken
from proxy.shared.piped import Script
from proxy.shared.wire import bulk

T = TypeVar("T")
# The longest pause a caller without a cap of its own honours (seconds).
NO_CAP = 1e9


class _Names(Protocol):
    """What a slot's keys and member are made of: the replica's id, its count of sends."""

    _replica: str
    _sent: int

    def key(self, kind: str, account: str, suffix: str = "") -> str: ...


class _Backend(_Names, Protocol):
    """What the budget's calls use of the backend: its scripts, replica id and error handling."""

    @property
    def client(self) -> Any: ...

    # Scripts on the pipelined connection (proxy.shared.piped), each called within the
    # timeout by itself (so run with no limit of _run's own).
    _take: Script
    _take_classed: Script
    _pause: Script
    _spare: Script
    _give_back: Script

    async def _run(
        self, op: str, call: Callable[[], Awaitable[T]], limit: float | None = 0.0
    ) -> T: ...


def classed(backend: _Names, slot: SlotAsk) -> tuple[list[Any], list[Any]]:
    """``TAKE_CLASSED``'s keys and arguments for ``slot`` (its member, a send of its own,
    is ``args[3]``)."""
    backend._sent += 1
    account, ask = slot.account, slot.ask
    keys = [backend.key("budget", account, s) for s in ("", "log", "demand")]
    ttl_ms, member = max(1, round(ask.demand_ttl * 1000)), f"{backend._replica}:{backend._sent}"
    args: list[Any] = [
        slot.per_window, slot.burst, repr(float(slot.period)), member, backend._replica,
        ask.klass, *ask.waiting, ttl_ms, repr(float(ask.reserve)),
        *(repr(float(w)) for w in ask.weights), *(repr(float(a)) for a in ask.ages),
        repr(float(min(ask.longest, NO_CAP))), max(0, int(ask.headroom)),
    ]  # fmt: skip
    return keys, args


def owned(backend: _Names, slot: SlotAsk, lock: str, owner: str) -> tuple[bytes, int, str]:
    """``TAKE_OWNED``'s keys and arguments for ``slot`` and the claim of ``lock`` by ``owner``
    (:func:`classed`'s, then the two), packed as :meth:`Script.__call__` packs them, for
    :meth:`Script.packed`: the tail, its count and the slot's member. What an account's asks
    share (its keys, rate, class, weights, ...) is packed once (:func:`_parts`); only the
    send's own values (its member, this replica's waiting requests and their ages, the
    lock and its owner) each time: ~3 µs against ~13 for classed's and their packing."""
    backend._sent += 1
    account, ask = slot.account, slot.ask
    member = f"{backend._replica}:{backend._sent}"
    keys, rate, names, hold, last = _parts(
        backend.key("budget", account), backend._replica, slot.per_window, slot.burst,
        slot.period, ask.klass, ask.demand_ttl, ask.reserve, ask.weights, ask.longest,
        ask.headroom,
    )  # fmt: skip
    waiting, ages = ask.waiting, ask.ages
    tail = b"".join(
        (
            keys, bulk(lock), rate, bulk(member), names,
            bulk(waiting[0]), bulk(waiting[1]), bulk(waiting[2]), hold,
            bulk(repr(float(ages[0]))), bulk(repr(float(ages[1]))), bulk(repr(float(ages[2]))),
            last, bulk(owner),
        )
    )  # fmt: skip
    return tail, 3 + 4 + 20, member  # EVALSHA, its SHA, the key count; 4 keys, 20 arguments


@functools.lru_cache(maxsize=256)
def _parts(
    budget: str,
    replica: str,
    per_window: int,
    burst: int,
    period: float,
    klass: str,
    demand_ttl: float,
    reserve: float,
    weights: tuple[float, float, float],
    longest: float,
    headroom: int,
) -> tuple[bytes, bytes, bytes, bytes, bytes]:
    """The packed pieces of :func:`owned`'s tail an account's asks share, in order: the key
    count and the budget's keys (the lock's follows); the rate (the member follows); the
    replica and the class (the waiting counts follow); the demand's TTL, the reserve and the
    weights (the ages follow); the longest pause and the headroom (the owner follows)."""
    ttl_ms = max(1, round(demand_ttl * 1000))
    return (
        b"".join(map(bulk, (4, budget, budget + ":log", budget + ":demand"))),
        b"".join(map(bulk, (per_window, burst, repr(float(period))))),
        bulk(replica) + bulk(klass),
        b"".join(map(bulk, (ttl_ms, repr(float(reserve)), *(repr(float(w)) for w in weights)))),
        bulk(repr(float(min(longest, NO_CAP)))) + bulk(max(0, int(headroom))),
    )


def taken_of(reply: Any, member: str) -> Taken | None:
    """``TAKE_CLASSED``'s (or ``TAKE_OWNED``'s) reply; None: ``TAKE_OWNED`` ran for a claim
    that did not take the lock (nothing taken, no demand told)."""
    taken, wait, *fleet = reply
    counts = (int(fleet[0]), int(fleet[1]), int(fleet[2]))
    if int(taken) == 1:
        return Taken(0.0, counts, member)
    return None if int(taken) == -1 else Taken(max(float(wait), 1e-3), counts)


class BudgetRecords:
    """Mixed into the Redis backend (its connection, keys and error handling)."""

    async def take(self: _Backend, account: str, per_window: int, burst: int, period: float,
                   longest: float = NO_CAP) -> float:  # fmt: skip
        self._sent += 1
        member = f"{self._replica}:{self._sent}"
        keys = [self.key("budget", account), self.key("budget", account, "log")]
        cap = repr(float(min(longest, NO_CAP)))
        args: list[Any] = [per_window, burst, repr(float(period)), member, cap]
        taken, wait = await self._run("budget", lambda: self._take(keys, args), None)
        return 0.0 if int(taken) == 1 else max(float(wait), 1e-3)

    async def take_classed(
        self: _Backend, account: str, per_window: int, burst: int, period: float, ask: ClassedAsk
    ) -> Taken:
        keys, args = classed(self, SlotAsk(account, per_window, burst, period, ask))
        reply = await self._run("budget", lambda: self._take_classed(keys, args), None)
        # TAKE_CLASSED answers a slot or a wait (-1 is TAKE_OWNED's): anything else, a wait.
        return taken_of(reply, args[3]) or Taken(1e-3, (0, 0, 0))

    async def pause(
        self: _Backend, account: str, seconds: float, per_window: int, burst: int, period: float
    ) -> float:
        keys = [self.key("budget", account)]
        args: list[Any] = [repr(float(seconds)), per_window, burst, repr(float(period))]
        left = await self._run("pause", lambda: self._pause(keys, args), None)
        return float(left)

    async def room(self: _Backend, account: str, per_window: int, burst: int, period: float,
                   longest: float = NO_CAP) -> Room:  # fmt: skip
        keys = [self.key("budget", account, s) for s in ("", "log", "demand")]
        args: list[Any] = [
            per_window,
            burst,
            repr(float(period)),
            repr(float(min(longest, NO_CAP))),
        ]
        tokens, *fleet, wait = await self._run("budget_room", lambda: self._spare(keys, args), None)
        return Room(float(tokens), (int(fleet[0]), int(fleet[1]), int(fleet[2])), float(wait))

    async def give_back(
        self: _Backend, account: str, member: str, per_window: int, period: float
    ) -> bool:
        """A slot taken (``member``, as :meth:`take_classed` answered) and not used goes back to
        the fleet: its send leaves the window's log and the pace moves back one interval.
        False when the send has already left the log."""
        keys = [self.key("budget", account), self.key("budget", account, "log")]
        args: list[Any] = [member, per_window, repr(float(period))]
        given = await self._run("budget", lambda: self._give_back(keys, args), None)
        return int(given) == 1

    async def drop_demand(self: _Backend, account: str) -> None:
        """This replica has nothing waiting any more: its entry leaves the demand hash."""
        key, field = self.key("budget", account, "demand"), f"r:{self._replica}"
        await self._run("budget", lambda: self.client.hdel(key, field))
