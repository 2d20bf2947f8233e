"""What the fast path (:mod:`proxy.edge.fast`) and the cache layer hand each other.

The fast path answers a plain GET without the long way when it can; when it had to wait for
something first (a revalidation in flight, or the tier's lookup on a memory-tier miss) and
cannot answer, it hands what it got to the long way, which goes on from there instead of
waiting or looking up again (:func:`handing_over`, :func:`taken`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from proxy.cache.answers import Answers
from proxy.cache.flight import Flight, Outcome
from proxy.cache.memory import Stored
from proxy.cache.policy import Entry, HeaderItems, Headers, Revalidate, not_modified_headers

# The body a fresh hit sends, from the stored headers and body (None: not here).
BodyFor = Callable[[HeaderItems, bytes], bytes | None]
# Status, upstream headers, body and age of an answer the fast path sends.
FastAnswer = tuple[int, HeaderItems, bytes, int]


@dataclass(frozen=True, slots=True)
class Pending:
    """A plain GET whose stored entry a flight in progress revalidates: the long way would
    join that flight (:meth:`~proxy.cache.layer.Cache.joinable`), at the point its lookup
    and decision left."""

    key: str
    flight: Flight
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
    fast path could not answer (:meth:`~proxy.cache.layer.Cache.tier_hit`): the long way
    decides from it instead of looking up again."""

    key: str
    stored: Stored | None


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
) -> FastAnswer | None:
    """A fresh 200's answer to a plain GET (the caller's own 304, or the body in the
    caller's coding), counted as the long way counts a fresh hit; None, counting nothing,
    when ``body_for`` gives no body (the long way streams it)."""
    if answers.caller_304(200, entry.headers, headers):
        answers.count("hit", "fresh")  # the caller's own 304 is still one hit
        return 304, not_modified_headers(entry.headers), b"", age
    sent = body if body_for is None else body_for(entry.headers, body)
    if sent is None:
        return None
    answers.count("hit", "fresh")
    return 200, entry.headers, sent, age
