"""Where the budget-classes fleet's slow interactive requests lose their time.

    python -m bench.fleet_trace [bench.fleet options] [--trace-out FILE.json]

Runs ``bench.fleet`` in-process (the default shape: replicas, sandbox and callers on one event
loop) with every Redis slot request (``take_classed``), every budget wait (``acquire``) and the
event loop's lag (a 10 ms sleeper) recorded, then prints: the Redis round trips, the loop's
lag, the gaps between slots granted, how soon a slot refused to one replica ("another class's
or an older request's: ask again shortly") was taken by the replica it belongs to, how many
interactive slots went to a younger request while an older one waited on another replica,
and for each interactive request that waited over 0.6 s the slots granted meanwhile (batch,
older or younger interactive requests).
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import json
import sys
import time
from typing import Any

from bench import fleet
from proxy.pipeline import account_budget
from proxy.shared import redis_budget

REFUSED = 0.05  # TAKE_CLASSED's "ask again" wait at this pace: the slot was free, not ours
Take = tuple[float, float, str, str, tuple[int, ...], tuple[float, ...], float]
Wait = tuple[float, float, str, str, float]


def install(takes: list[Take], waits: list[Wait]) -> None:
    """Wrap the backend's slot requests and the budget's waits to record them."""
    take = redis_budget.BudgetRecords.take_classed
    acquire = account_budget.AccountBudget.acquire

    async def traced_take(self: Any, *args: Any) -> Any:
        started = time.monotonic()
        taken = await take(self, *args)
        ask = args[-1]
        takes.append((started, time.monotonic(), self._replica, ask.klass, ask.waiting,
                      ask.ages, taken.wait))  # fmt: skip
        return taken

    async def traced_acquire(self: Any, caller: str, limit: float, klass: str = "standard",
                             wanted: Any = None) -> float:  # fmt: skip
        started = time.monotonic()
        waited = await acquire(self, caller, limit, klass, wanted)
        replica = getattr(getattr(self.gate, "backend", None), "_replica", "local")
        waits.append((started, time.monotonic(), replica, klass, waited))
        return waited

    redis_budget.BudgetRecords.take_classed = traced_take  # type: ignore[method-assign,assignment]
    account_budget.AccountBudget.acquire = traced_acquire  # type: ignore[method-assign]


def _q(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, int(len(values) * p))] if values else 0.0


def analyse(takes: list[Take], waits: list[Wait], lags: list[float]) -> None:
    takes = sorted(takes, key=lambda t: t[1])
    grants = [t for t in takes if t[6] == 0]
    rtt = sorted(t[1] - t[0] for t in takes)
    lag = sorted(lags)
    print(f"redis slot requests: {len(takes)}, granted {len(grants)}; round trip p50 "
          f"{_q(rtt, .5) * 1000:.1f} ms, p99 {_q(rtt, .99) * 1000:.1f} ms, max "
          f"{rtt[-1] * 1000 if rtt else 0:.1f} ms")  # fmt: skip
    print(f"event-loop lag: p50 {_q(lag, .5) * 1000:.1f} ms, p99 {_q(lag, .99) * 1000:.1f} ms, "
          f"max {lag[-1] * 1000 if lag else 0:.1f} ms")  # fmt: skip
    at = [g[1] for g in grants]
    gaps = sorted(b - a for a, b in itertools.pairwise(at))
    print(f"gaps between slots: p10 {_q(gaps, .1):.3f}, p50 {_q(gaps, .5):.3f}, p90 "
          f"{_q(gaps, .9):.3f}, max {_q(gaps, 1):.3f} s")  # fmt: skip
    refused = [t for t in takes if abs(t[6] - REFUSED) < 1e-9]
    taken_after = sorted(
        at[i] - t[0] for t in refused if (i := bisect.bisect_left(at, t[0])) < len(at)
    )
    print(f"slots refused as another's: {len(refused)}; taken by their owner p50 "
          f"{_q(taken_after, .5) * 1000:.1f} ms, p90 {_q(taken_after, .9) * 1000:.1f} ms, max "
          f"{_q(taken_after, 1) * 1000:.1f} ms later")  # fmt: skip
    inter = [w for w in waits if w[3] == "interactive"]

    def granted_to(g: Take) -> Wait | None:
        return next((w for w in inter if w[2] == g[2] and abs(w[1] - g[1]) < 0.02), None)

    younger = 0
    for w in inter:
        g = next((g for g in grants if g[2] == w[2] and g[3] == "interactive"
                  and abs(g[1] - w[1]) < 0.02), None)  # fmt: skip
        if g and any(o[2] != w[2] and o[0] < w[0] - 0.005 and o[1] > g[1] + 0.005 for o in inter):
            younger += 1
    print(f"interactive slots to a younger request while an older one waited: {younger} of "
          f"{len(inter)}")  # fmt: skip
    for w in sorted(inter, key=lambda w: -w[4]):
        if w[4] < 0.6:
            break
        kinds: dict[str, int] = {}
        for g in grants:
            if w[0] < g[1] < w[1] - 0.003:
                if g[3] != "interactive":
                    kind = g[3]
                else:
                    other = granted_to(g)
                    kind = (
                        "older interactive" if other and other[0] < w[0] else "younger interactive"
                    )
                kinds[kind] = kinds.get(kind, 0) + 1
        print(f"  interactive wait {w[4]:.3f} s: slots meanwhile {kinds}")


def main(argv: list[str]) -> int:
    out = ""
    if "--trace-out" in argv:
        i = argv.index("--trace-out")
        out, argv = argv[i + 1], argv[:i] + argv[i + 2 :]
    takes: list[Take] = []
    waits: list[Wait] = []
    lags: list[float] = []
    install(takes, waits)
    run = fleet.run

    async def traced(args: Any) -> fleet.Tally:
        async def sleeper() -> None:
            while True:
                started = time.monotonic()
                await asyncio.sleep(0.01)
                lags.append(time.monotonic() - started - 0.01)

        task = asyncio.create_task(sleeper())
        try:
            return await run(args)
        finally:
            task.cancel()

    fleet.run = traced
    code = fleet.main(argv)
    analyse(takes, waits, lags)
    if out:
        with open(out, "w") as f:
            json.dump({"takes": takes, "waits": waits, "lags": lags}, f)
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
