"""What the fast path (:mod:`proxy.edge.fast`) and the cache layer hand each other.

The fast path answers a plain GET without the long way when it can; when it had to wait for
something first (a revalidation in flight, or the tier's lookup on a memory-tier miss) and
cannot answer, it hands what it got to the long way, which goes on from there instead of
waiting or looking up again (:func:`handing_over`, :func:`taken`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Protocol

from multidict import CIMultiDictProxy

from proxy.cache.answers import Answers, refuse_repeated_vary
from proxy.cache.entry import Entry
from proxy.cache.fields import NO_CONTROL, HeaderItems, Headers
from proxy.cache.flight import Flight, Flights, Outcome
from proxy.cache.keys import SELECTING, cache_key
from proxy.cache.lookup import FreshHit, Revalidate, fresh_age, lookup
from proxy.cache.memory import Kept, Stored
from proxy.cache.storable import rule_for
from proxy.cache.tiers import Entries
from proxy.cache.validation import not_modified_headers
from proxy.cache.webhooks.health import Feeds
from proxy.clock import WallClock
from proxy.coding import GZIP, coding_of
from proxy.errors import ProxyError
from proxy.memo import memo
from proxy.messages import ProxyRequest
from proxy.settings import CacheRule

# The body a fresh hit sends, from the stored headers and body (None: not here).
BodyFor = Callable[[HeaderItems, bytes], bytes | None]
# Status, upstream headers, body and age of an answer the fast path sends, and what the
# fast path made of its entry while the memory tier holds it (None: not a held entry's).
FastAnswer = tuple[int, HeaderItems, bytes, int, Kept | None]


@dataclass(frozen=True, slots=True)
class Pending:
    """A plain GET whose stored entry a flight in progress revalidates: the long way would
    join that flight (:meth:`~proxy.cache.fastlook.FastLook.find`), at the point its lookup
    and decision left; ``starter``: the request started that flight at the edge
    (:meth:`~proxy.cache.fastlook.FastLook.start`), where the long way would have started it."""

    key: str
    flight: Flight
    stale: Stored
    decision: Revalidate
    starter: bool = False


@dataclass(frozen=True, slots=True)
class Startable:
    """A plain GET whose stored 200 in memory must be revalidated and no flight is out for:
    the long way would start one (:meth:`~proxy.cache.fastlook.FastLook.find`)."""

    key: str
    stale: Stored
    decision: Revalidate


@dataclass(frozen=True, slots=True)
class Joined:
    """What the edge got waiting on a pending request's flight, for the long way to go on
    from: the outcome, or what waiting raised."""

    pending: Pending
    result: Outcome | Exception


@dataclass(frozen=True, slots=True)
class Looked:
    """What the tier's lookup of ``key`` found (None: nothing) on a memory-tier miss the
    fast path could not answer (:meth:`~proxy.cache.fastlook.FastLook.tier_hit`): the long way
    decides from it instead of looking up again."""

    key: str
    stored: Stored | None


class Unheld:
    """The memory tier holds nothing for a plain GET (:meth:`FastLook.find`): the tier may be
    looked up (:meth:`FastLook.tier_hit`) under ``key``, the one :meth:`FastLook.find` made
    (not made twice)."""

    __slots__ = ("key",)

    def __init__(self, key: str) -> None:
        self.key = key


# What the memory tier gives a plain GET (:meth:`FastLook.find`); None: the long way.
Found = FastAnswer | Pending | Startable | Unheld | None


class Counted(Protocol):
    """A counter's child (the coalesced count)."""

    def inc(self, amount: float = 1.0) -> None: ...


# Starts a caller's flight for (key, request, stale entry): the long way's own starter.
Start = Callable[[str, ProxyRequest, Stored | None], Flight]
# Whether stale-while-busy may answer a stale entry of this path (then the long way decides).
MayBeBusy = Callable[[str], bool]

# What a request already got at the edge, for the long way in the same task.
_HANDED: ContextVar[Joined | Looked | None] = ContextVar("kounta_proxy_handed", default=None)


@contextmanager
def handing_over(handed: Joined | Looked) -> Iterator[None]:
    """While the long way answers a request the edge waited for: the cache layer's
    ``send`` goes on from ``handed`` (:func:`taken`)."""
    token = _HANDED.set(handed)
    try:
        yield
    finally:
        _HANDED.reset(token)


def taken(key: str, method: str) -> Joined | Looked | None:
    """What the edge handed over for this request's ``key`` (a GET), once: None after."""
    handed = _HANDED.get()
    if handed is None:
        return None
    _HANDED.set(None)  # once: for this request only
    on = handed.pending.key if isinstance(handed, Joined) else handed.key
    return handed if on == key and method == "GET" else None


def plain_answer(
    answers: Answers,
    entry: Entry,
    body: bytes,
    age: int,
    headers: Headers,
    body_for: BodyFor | None,
    kept: Kept | None = None,
) -> FastAnswer | None:
    """A fresh 200's answer to a plain GET (the caller's own 304, or the body in the
    caller's coding), counted as the long way counts a fresh hit; None, counting nothing,
    when ``body_for`` gives no body (the long way streams it). ``kept``: the memory tier's
    record of the entry (its coding found once there)."""
    if answers.caller_304(200, entry.headers, headers):
        answers.count("hit", "fresh")  # the caller's own 304 is still one hit
        return 304, not_modified_headers(entry.headers), b"", age, kept
    if body_for is None:
        sent: bytes | None = body
    elif kept is None:
        sent = body_for(entry.headers, body)
    else:  # only a gzip body is for body_for to inflate
        coding = kept.coding
        if coding is None:
            coding = kept.coding = coding_of(entry.headers)
        sent = body if coding != GZIP else body_for(entry.headers, body)
    if sent is None:
        return None
    answers.count("hit", "fresh")
    return 200, entry.headers, sent, age, kept


@memo(4096, per_key=True)
def webhook_rule(path: str, rules: tuple[CacheRule, ...]) -> CacheRule | None:
    """The rule for ``path`` if it opts in to webhooks (``webhooks = true``)."""
    rule = rule_for(path, rules)
    return rule if rule is not None and rule.webhooks else None


def webhook_fresh(
    feeds: Feeds, rules: tuple[CacheRule, ...], account: str, stored: Stored | None
) -> tuple[Stored | None, str]:
    """A webhook rule's entry as :func:`held` holds it, and the Cache-Status detail saying
    which ("": no webhook rule)."""
    if stored is None:
        return None, ""
    if webhook_rule(stored.entry.path, rules) is None:
        return stored, ""
    kept = held(feeds, rules, account, stored.entry)
    if kept is stored.entry:
        return stored, "webhooks"
    return replace(stored, entry=kept), "webhooks-fallback"


def held(feeds: Feeds, rules: tuple[CacheRule, ...], account: str, entry: Entry) -> Entry:
    """A webhook rule's entry keeps its ``fresh_for`` while the account's feed is healthy
    and was trusted when the entry was stored; otherwise (distrusted now, or stored before a
    distrust ended: a lost delivery may have left it stale) it is fresh for
    ``fallback_fresh_for`` at most. Entries of other rules: unchanged."""
    rule = webhook_rule(entry.path, rules)
    if rule is None:
        return entry
    if feeds.healthy(account) and entry.response_time >= feeds.trusted_since(account):
        return entry
    return replace(entry, fresh_for=min(entry.fresh_for, rule.fallback_fresh_for))


class FastLook:
    """The cache as the fast path (:mod:`proxy.edge.fast`) asks it: a fresh hit in memory,
    a flight to join, the tier's lookup on a memory-tier miss; the long way's decisions,
    without its I/O, counted as it counts."""

    def __init__(
        self,
        key: Callable[[str, str, str, Headers], str],
        entries: Entries,
        flights: Flights,
        answers: Answers,
        clock: WallClock,
        rules: Callable[[], tuple[CacheRule, ...]],
        feeds: Feeds,
        coalesce_wait: float,
        coalesced: Counted,
        start: Start,
        may_be_busy: MayBeBusy,
    ) -> None:
        """``start``: the cache's flight starter; ``may_be_busy``: whether stale-while-busy
        may answer a path's stale entries (the long way asks the budget then)."""
        self.key = key
        self.entries = entries
        self.flights = flights
        self.answers = answers
        self.clock = clock
        self.rules = rules
        self.feeds = feeds
        self.coalesce_wait = coalesce_wait
        self.coalesced = coalesced
        self._start = start
        self.may_be_busy = may_be_busy

    def find(
        self,
        account: str,
        path: str,
        query: str,
        headers: Headers,
        body_for: BodyFor | None = None,
        selecting: tuple[str | None, ...] | None = None,
        key: str | None = None,
    ) -> Found:
        """What the memory tier gives a plain GET (no Cache-Control; If-None-Match and
        If-Modified-Since allowed), with one key and one look: a fresh hit's answer (status,
        upstream headers, body and age of a fresh 200 held in memory; None when ``body_for``
        gives no body in the caller's coding), a flight in progress to join (a
        :class:`Pending`: where the long way would be when it joins, its lookup and decision
        made without I/O), one to start (a :class:`Startable`; never where stale-while-busy
        may answer the entry: the long way asks the budget first), :class:`Unheld` (the
        memory tier has nothing: :meth:`tier_hit` may look), or None: the long way answers.
        Counts only what a fresh hit counts. :meth:`~proxy.cache.layer.Cache.send` reaches
        the same answers the long way. ``selecting``: ``headers``' values of
        :data:`~proxy.cache.keys.SELECTING`, in its order, when the caller read them already
        (no name on two lines); the key is then made from them. ``key``: the request's key,
        when the caller made it already (the fast path's :mod:`proxy.edge.known`)."""
        if key is None:
            if selecting is None:
                key = self.key(account, path, query, headers)
            else:
                key = cached_key(account, path, query, *selecting)
        entries = self.entries
        stored = entries.hot(key)
        if stored is None:
            return Unheld(key)
        kept = entries.kept(key, stored)
        found = self._usable(stored, kept)
        if found is None:
            return None
        now = self.clock()
        fresh = fresh_age(stored.entry, now)
        if fresh is not None:
            entry = stored.entry
            return plain_answer(self.answers, entry, found, int(fresh), headers, body_for, kept)
        flight = self.flights.get(key)
        if flight is not None:
            return self._pending(key, flight, stored, headers, now)
        return self._startable(key, stored, headers, now)

    def _usable(self, stored: Stored, kept: Kept) -> bytes | None:
        """The body of a stored entry the fast path may answer from: a 200 with its body in
        memory, no extra Vary names (compared the long way), no webhook rule (the feed's
        health decides, and Cache-Status says so: the long way); else None. Whether the
        entry's path has a webhook rule is kept on its record (``kept``) for the rules it was
        found under: a reload's new rules are asked at once."""
        entry, body = stored.entry, stored.body
        if body is None or entry.status != 200 or entry.vary:
            return None
        rules = self.rules()
        if kept.rules is not rules:
            kept.webhook = webhook_rule(entry.path, rules) is not None
            kept.rules = rules
        if kept.webhook:
            return None
        return body

    def _pending(
        self, key: str, flight: Flight, stored: Stored, headers: Headers, now: float
    ) -> Pending | None:
        """A joiner of ``flight`` for ``stored`` (usable, :meth:`_usable`), or None. The
        decision (a stale entry, no Vary names, no request directives) is the same for every
        joiner of a flight when the entry allows no stale-while-revalidate, so then it is
        made once per flight and stored entry (kept on the flight: ``Flight.joining``)."""
        held = flight.joining
        if isinstance(held, Pending) and held.stale is stored:
            return held
        decision = lookup(stored.entry, headers, NO_CONTROL, now)
        if not isinstance(decision, Revalidate):
            return None
        pending = Pending(key, flight, stored, decision)
        if stored.entry.stale_while_revalidate <= 0:  # else the decision depends on the time
            flight.joining = pending
        return pending

    def _startable(
        self, key: str, stored: Stored, headers: Headers, now: float
    ) -> Startable | None:
        decision = lookup(stored.entry, headers, NO_CONTROL, now)
        if not isinstance(decision, Revalidate) or self.may_be_busy(stored.entry.path):
            return None
        return Startable(key, stored, decision)

    def start(self, startable: Startable, request: ProxyRequest) -> Pending:
        """The long way's flight for ``request`` (the one the handler would make), started
        here: the request is its starter (:meth:`wait` awaits its answer)."""
        flight = self._start(startable.key, request, startable.stale)
        return Pending(startable.key, flight, startable.stale, startable.decision, True)

    async def wait(self, pending: Pending) -> Outcome | Exception:
        """The pending request's flight's outcome, or what waiting for it raised (the long
        way's :meth:`~proxy.cache.layer.Cache._wait` decides what that means, see
        :func:`~proxy.cache.fastlook.handing_over`); a starter's answer (a stream only it
        may read) as the long way's starter awaits it, without a deadline of its own."""
        try:
            if pending.starter:
                return await asyncio.shield(pending.flight.head)
            return await self.flights.join(pending.flight, self.coalesce_wait)
        except Exception as e:
            return e

    def waiter(self, pending: Pending) -> asyncio.Future[None] | None:
        """A joiner's wake-up while its flight is out (:meth:`Flight.waiter`, its
        ``coalesce_wait``), for the request's own task to await (no coroutine of ours in
        between to suspend and resume), then :meth:`result`; None: a starter, or the flight
        is over (:meth:`wait`)."""
        flight = pending.flight
        if pending.starter or flight.done.done():
            return None
        return flight.waiter(self.coalesce_wait)

    def waits(self, pending: Pending) -> bool:
        """Whether ``pending`` is a joiner whose flight is still out (it may wait in the
        flight's wake-up list, :meth:`~proxy.cache.flight.Flight.park`, for its
        ``coalesce_wait``); False: a starter, or the flight is over (:meth:`result` at once)."""
        return not pending.starter and not pending.flight.done.done()

    def abandon(self, pending: Pending) -> None:
        """The request waiting for ``pending`` left before reading the flight's answer: a
        starter's stream is let go (:meth:`~proxy.cache.flight.Flights.abandon`); a joiner
        holds nothing."""
        if pending.starter:
            self.flights.abandon(pending.flight)

    def result(self, pending: Pending) -> Outcome | Exception:
        """A joiner's outcome once its :meth:`waiter` woke, or a starter's once its flight's
        head is there, as :meth:`wait` gives it (a TimeoutError: a joiner's ``coalesce_wait``
        ran out first)."""
        flight = pending.flight
        future = flight.head if pending.starter else flight.done
        if not future.done() or future.cancelled():
            return TimeoutError()
        try:
            return future.result()
        except Exception as e:
            return e

    def sharing(self, pending: Pending, outcome: Outcome) -> Sharing:
        """What every answer from ``pending``'s flight's ``outcome`` shares, made once per
        flight and outcome (``Flight.answering``): whether it can be answered here (the
        stored 200 in memory freshened), the lookups' count, the 304's headers; for every
        wake-up's :class:`~proxy.edge.together.Together` (its joiners, or the starter)."""
        flight = pending.flight
        sharing = flight.answering
        if not isinstance(sharing, Sharing) or sharing.outcome is not outcome:
            sharing = flight.answering = self._sharing(outcome)
        return sharing

    def _sharing(self, outcome: Outcome) -> Sharing:
        """What every answer from ``outcome`` shares (:meth:`sharing`)."""
        stored, entry = outcome.stored, outcome.entry
        if (
            outcome.cache_status != "REVALIDATED"
            or outcome.status != 200
            or outcome.stream is not None
            or stored is None
            or stored.body is None
            or entry is None
        ):
            return Sharing(outcome, None, None, None)
        counted = self.answers.metrics.cache_lookups.labels("revalidated", outcome.reason)
        return Sharing(outcome, stored.body, entry, counted)

    async def tier_hit(
        self,
        account: str,
        path: str,
        query: str,
        headers: Headers,
        body_for: BodyFor | None,
        proxied: Callable[[], CIMultiDictProxy[str]],
        key: str | None = None,
    ) -> FastAnswer | Looked:
        """For a plain GET (as :meth:`find` takes) the memory tier has nothing for: the
        tier's lookup (disk, Redis: promoted as the long way's lookup promotes), and the
        answer when it is a fresh 200 the long way would send as a plain HIT (same decision:
        the webhook hold, Vary, :func:`lookup`); else what was found, counting nothing, for
        the long way (:func:`~proxy.cache.fastlook.handing_over`). ``proxied``: the headers
        of the request the long way would make (what a stored Vary selects by), only made
        when needed; ``key``: the request's key when :meth:`find` made it already."""
        if key is None:
            key = self.key(account, path, query, headers)
        found = await self.entries.lookup(account, key)
        stored, hooks = webhook_fresh(self.feeds, self.rules(), account, found)
        if stored is None or stored.body is None or hooks or stored.entry.status != 200:
            return Looked(key, found)
        entry = stored.entry
        if entry.vary:  # selected by the request made of the caller's, as in send()
            try:
                refuse_repeated_vary(entry, selecting := proxied())
            except ProxyError:
                return Looked(key, found)  # the long way refuses it
            decision = lookup(entry, selecting, NO_CONTROL, self.clock())
            fresh = decision.age if isinstance(decision, FreshHit) else None
        else:  # what lookup() decides without Vary names or request directives
            fresh = fresh_age(entry, self.clock())
        if fresh is None:
            return Looked(key, found)
        answer = plain_answer(self.answers, entry, stored.body, int(fresh), headers, body_for)
        return Looked(key, found) if answer is None else answer


class Sharing:
    """What the answers of a flight's joiners and starter share (:meth:`FastLook.sharing`),
    made once per flight and outcome: the stored body to answer from and its entry (None:
    the long way answers), the lookups' count, and the 304's headers once one is asked for."""

    __slots__ = ("_304", "body", "counted", "entry", "outcome")

    def __init__(
        self,
        outcome: Outcome,
        body: bytes | None,
        entry: Entry | None,
        counted: Counted | None,
    ) -> None:
        self.outcome, self.body, self.entry, self.counted = outcome, body, entry, counted
        self._304: HeaderItems | None = None

    def not_modified(self) -> HeaderItems:
        """The caller's own 304's headers (:func:`not_modified_headers`), made once."""
        made = self._304
        if made is None:
            made = self._304 = not_modified_headers(self.outcome.headers)
        return made


def selected_key(account: str, path: str, query: str, selecting: tuple[str | None, ...]) -> str:
    """:func:`~proxy.cache.keys.cache_key` from the selecting headers' values in
    :data:`~proxy.cache.keys.SELECTING`'s order."""
    sent = {n: v for n, v in zip(SELECTING, selecting, strict=True) if v is not None}
    return cache_key(account, path, query, sent)


@memo(4096)
def cached_key(account: str, path: str, query: str, *selecting: str | None) -> str:
    """:func:`selected_key`, remembered for the long way (the fast path keeps its keys on
    its per-target records, :mod:`proxy.edge.known`, so this memo is not one per key)."""
    return selected_key(account, path, query, selecting)
