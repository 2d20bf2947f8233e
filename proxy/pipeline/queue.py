"""Who gets an account's next token: the queue discipline, pure (no I/O, no clock of its own).

Requests wait in three classes, ``interactive``, ``standard`` and ``batch``. Between classes
the tokens go by weighted fair queuing (``budget.weights``, default 6 : 3 : 1): each class has a
*start tag*, the virtual time of its next service; the backlogged class whose *finish tag*
(start + 1 / weight) is smallest is served, and its start moves on by 1 / weight. So classes
that all wait get tokens in proportion to their weights, and a class that was idle joins at the
current virtual time (never with credit saved up while it had nothing to send): an idle class's
share goes to the others, and a lone batch job gets the whole rate. A class of weight 0 is
served only when no class with a weight waits.

Within a class, tokens go round robin over callers (one per caller a round). A caller with
``max_share`` below 1 that has had that share of its class's tokens in the last window yields
its turn to callers of the class under their share (it is still served when only callers over
their share wait: the cap never leaves a token unused).

:func:`decide` is a function of a :class:`QueueState` and the time; :func:`served` is the state
after a grant, and :func:`order` the grants to come.
:class:`proxy.pipeline.account_budget.AccountBudget` drives them with the real waiters and the
real bucket.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from proxy.settings import ClassWeights

CLASSES: tuple[str, ...] = ("interactive", "standard", "batch")
RANK = {name: i for i, name in enumerate(CLASSES)}
DEFAULT_CLASS = "standard"
# How far (in turns of its own) the other classes may go ahead of a class its headroom holds
# back before it is owed a turn (:func:`owed`). One or two turns (6 or 12 interactive tokens at
# 6 : 1) cut into bursts of interactive requests often enough to show in their tail (modelled:
# bench.classes_model); four bound batch's wait at 30 tokens of the others when they use the
# whole rate (about 10 s at 180 a minute), and batch keeps its weight's share.
OWED_TURNS = 4


def weights_of(weights: ClassWeights) -> dict[str, float]:
    return {name: float(getattr(weights, name)) for name in CLASSES}


def lowered(own: str, asked: str | None) -> str:
    """A request's class: its caller's, or a lower one the request asks for (never higher)."""
    if asked is None or RANK[asked] <= RANK[own]:
        return own
    return asked


@dataclass(frozen=True, slots=True)
class Grant:
    """The next token goes to ``caller``'s first waiting request of class ``klass``."""

    klass: str
    caller: str


@dataclass(frozen=True, slots=True)
class ClassQueue:
    """One class: its weight, its start tag, and its callers in round-robin order with how
    many requests each has waiting."""

    weight: float
    start: float = 0.0
    callers: tuple[tuple[str, int], ...] = ()

    @property
    def waiting(self) -> int:
        return sum(n for _, n in self.callers)

    @property
    def finish(self) -> float:
        return self.start + 1 / self.weight if self.weight > 0 else math.inf


@dataclass(frozen=True, slots=True)
class QueueState:
    classes: Mapping[str, ClassQueue]
    # Where a class that was idle joins (see :func:`served`).
    vtime: float = 0.0
    # Recent grants (time, class, caller) for max_share, and the span they count over.
    recent: tuple[tuple[float, str, str], ...] = ()
    window: float = 60.0
    max_share: Mapping[str, float] = field(default_factory=dict)


def decide(state: QueueState, now: float, blocked: frozenset[str] = frozenset()) -> Grant | None:
    """The grant for the next token, None when no request waits (in classes not ``blocked``):
    the smallest finish tag; ties go to the larger weight, then to the higher class."""
    waiting = [(q.finish, -q.weight, RANK[k], k) for k, q in state.classes.items() if q.waiting]
    waiting = [w for w in waiting if w[3] not in blocked]
    if not waiting:
        return None
    klass = min(waiting)[3]
    return Grant(klass, _caller(state, klass, now))


def owed(state: QueueState, klass: str) -> bool:
    """Whether waiting ``klass`` is owed a turn: every other waiting class has its next turn
    more than :data:`OWED_TURNS` turns of ``klass`` past its own (they went ahead while
    ``klass`` was held back: ``budget.headroom``), or has no weight. It then takes a token
    without its headroom, so headroom never starves a class with a weight (its lag stays
    within those turns). Alone it is owed nothing: the headroom stays for whoever comes."""
    queue = state.classes[klass]
    others = [q.finish for k, q in state.classes.items() if k != klass and q.waiting]
    if not queue.waiting or queue.weight <= 0 or not others:
        return False
    return min(others) > queue.finish + OWED_TURNS / queue.weight


def _caller(state: QueueState, klass: str, now: float) -> str:
    """The first caller of the round, skipping those over their ``max_share`` while a caller
    under it waits."""
    callers = [name for name, n in state.classes[klass].callers if n > 0]
    capped = [name for name in callers if state.max_share.get(name, 1.0) < 1.0]
    if capped:
        over = over_share(state, klass, now)
        under = [name for name in callers if name not in over]
        if under:
            return under[0]
    return callers[0]


def over_share(state: QueueState, klass: str, now: float) -> frozenset[str]:
    """Callers of ``klass`` whose grants in the last window reach their ``max_share`` of the
    class's (counting the next one: a share is a cap, not a target)."""
    horizon = now - state.window
    counts: dict[str, int] = {}
    total = 0
    for at, k, caller in state.recent:
        if k == klass and at > horizon:
            counts[caller] = counts.get(caller, 0) + 1
            total += 1
    return frozenset(
        name for name, n in counts.items() if n + 1 > state.max_share.get(name, 1.0) * (total + 1)
    )


def activated(state: QueueState, klass: str) -> QueueState:
    """A class that had nothing waiting gets a request: it joins at the current virtual time
    (no credit for the time it was idle)."""
    queue = state.classes[klass]
    if queue.waiting or queue.start >= state.vtime:
        return state
    return _with(state, klass, replace(queue, start=state.vtime))


def served(state: QueueState, grant: Grant, now: float) -> QueueState:
    """The state after ``grant``: the class's start tag moves on by 1 / weight, the caller
    goes to the back of its class's round, one request fewer waits."""
    queue = state.classes[grant.klass]
    start = queue.start + (1 / queue.weight if queue.weight > 0 else 0.0)
    callers = [(name, n) for name, n in queue.callers if name != grant.caller]
    left = dict(queue.callers).get(grant.caller, 0) - 1
    if left > 0:
        callers.append((grant.caller, left))
    recent = state.recent
    if state.max_share:  # only caps look back
        horizon = now - state.window
        recent = (*(r for r in recent if r[0] > horizon), (now, grant.klass, grant.caller))
    state = _with(state, grant.klass, replace(queue, start=start, callers=tuple(callers)))
    # The virtual time: the start tag of the least advanced class that still waits (the one
    # served, when none waits). A class that joins starts there: no credit, no penalty.
    starts = [q.start for q in state.classes.values() if q.waiting and q.weight > 0]
    vtime = min(starts) if starts else start
    return replace(state, vtime=max(state.vtime, vtime), recent=recent)


def order(state: QueueState, now: float, limit: int | None = None) -> list[Grant]:
    """The grants to come, in order, if no other request joined (at most ``limit``)."""
    grants: list[Grant] = []
    while limit is None or len(grants) < limit:
        grant = decide(state, now)
        if grant is None:
            break
        grants.append(grant)
        state = served(state, grant, now)
    return grants


def _with(state: QueueState, klass: str, queue: ClassQueue) -> QueueState:
    return replace(state, classes={**state.classes, klass: queue})
