"""One account's waiting requests, and what is estimated from them without taking anything.

:class:`Waiter` is one request in an account's queue. :class:`Estimates` is the part of
:class:`proxy.pipeline.account_budget.AccountBudget` that reads its queue and changes nothing:
the queue as the pure discipline (:mod:`proxy.pipeline.queue`) sees it (:meth:`Estimates.state`),
where a new request would stand (:meth:`Estimates.ahead_of`) and how long it would wait for its
token (:meth:`Estimates.expected_wait`). Shared, the other replicas' waiting requests count too,
as one caller, :data:`OTHERS`, first in each class's round."""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, replace

from proxy.clock import Clock
from proxy.pipeline.bucket import Rate
from proxy.pipeline.gates import Gate, SharedGate
from proxy.pipeline.queue import (
    CLASSES,
    DEFAULT_CLASS,
    ClassQueue,
    Grant,
    QueueState,
    activated,
    order,
)

# In estimates, the other replicas' waiting requests of a class (no caller name has a "~").
OTHERS = "~others"

# A background request's test: is it still useful (False: drop it instead of sending it)?
Wanted = Callable[[], bool]


@dataclass(slots=True)
class Waiter:
    future: asyncio.Future[None]
    limit: float
    started: float = 0.0
    klass: str = DEFAULT_CLASS
    # A background request (nobody waits for its answer): whether it is still worth a token.
    wanted: Wanted | None = None

    def unwanted(self) -> bool:
        return self.wanted is not None and not self.wanted()


class Estimates:
    """The read-only estimates over an account's queue (the account budget sets the state)."""

    rate: Rate
    clock: Clock
    gate: Gate
    shares: Callable[[str], float]  # a caller's max_share
    # class -> caller -> its waiting requests; the order of callers is the round robin.
    queues: dict[str, OrderedDict[str, deque[Waiter]]]
    weights: dict[str, float]
    starts: dict[str, float]  # the classes' start tags
    vtime: float  # virtual time
    recent: deque[tuple[float, str, str]]  # grants, for max_share
    waiting: int

    def expected_wait(self, caller: str, klass: str = DEFAULT_CLASS) -> float:
        """Seconds a new request of ``caller`` in ``klass`` would wait for its token, estimated
        as :meth:`proxy.pipeline.account_budget.AccountBudget.acquire` does before queueing it,
        without taking anything or asking Redis: this process's queue in the discipline's
        order, and (shared) the other replicas' waiting requests and the next slot as the last
        take or read of the fleet said (``TAKE_CLASSED``, or
        :meth:`proxy.pipeline.account_budget.AccountBudget.estimate`'s ``SPARE``)."""
        now = self.clock.now()
        ahead = self.ahead_of(caller, klass) if self.waiting or any(self._others().values()) else 0
        return max(0.0, self.gate.ready_after(now, ahead) - now)

    def state(self, now: float, fleet: bool = False) -> QueueState:
        """The queue as the pure discipline sees it (live waiters only). With ``fleet``, for
        estimates: other replicas' waiting requests (shared) stand first in each class's round
        as one caller, :data:`OTHERS`."""
        classes = {}
        caps: dict[str, float] = {}
        others = self._others() if fleet else {}
        for klass, queues in self.queues.items():
            callers = [(OTHERS, others[klass])] if others.get(klass) else []
            for caller, queue in queues.items():
                live = sum(1 for w in queue if not w.future.done())
                if live:
                    callers.append((caller, live))
                    if (share := self.shares(caller)) < 1.0:
                        caps[caller] = share
            classes[klass] = ClassQueue(self.weights[klass], self.starts[klass], tuple(callers))
        recent = tuple(self.recent) if caps else ()
        return QueueState(classes, self.vtime, recent, self._span(), caps)

    def _others(self) -> dict[str, int]:
        if not isinstance(self.gate, SharedGate) or self.gate.mode() != "shared":
            return {}
        mine = self.gate.mine  # what this replica told Redis when it said the fleet's
        return {k: max(0, self.gate.fleet[i] - mine[i]) for i, k in enumerate(CLASSES)}

    def _span(self) -> float:
        return self.rate.window + self.rate.margin

    def ahead_of(self, caller: str, klass: str = DEFAULT_CLASS) -> int:
        """Waiters served before a new request of ``caller`` in ``klass``, in the order the
        discipline would serve them if no one else joined. Shared, the fleet's queue counts:
        other replicas' requests of the class all came first (the fleet is first come, first
        served within a class), and those of other classes as the weights interleave them."""
        now = self.clock.now()
        state = activated(self.state(now, fleet=True), klass)
        queue = state.classes[klass]
        others = dict(queue.callers).get(OTHERS, 0)
        own = dict(queue.callers).get(caller, 0)
        callers = (*queue.callers, (caller, 1))
        if own:  # keep the caller's place in the round
            callers = tuple((c, n + 1 if c == caller else n) for c, n in queue.callers)
        state = replace(state, classes={**state.classes, klass: replace(queue, callers=callers)})
        mine = 0
        for position, grant in enumerate(order(state, now)):
            if grant == Grant(klass, OTHERS):
                others -= 1
            elif grant == Grant(klass, caller):
                mine += 1
                if mine > own:
                    return position + others
        return self.waiting  # not reached: the new request is in the state
