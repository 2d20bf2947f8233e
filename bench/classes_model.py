"""The budget-classes workload as a model: how often a run's interactive tail passes 1 s.

    python -m bench.classes_model [--runs 2000] [--seconds 60] [--slots]

No proxy, no Redis, no machine. The account's real bucket (:class:`proxy.pipeline.bucket.Bucket`:
pace, burst, the window's cap and the burst's spread, batch's ``budget.reserve`` and
``budget.headroom``) at 180 a minute, a burst of 9, starting full; two batch walkers always
waiting (their pages' own time left out); three interactive callers each asking again an
exponential pause (mean 2 s: 90 a minute in all, half the limit) after their answer, as
``bench.fleet --batch 2 --interactive 3`` does. Each token goes by weighted fair queuing between
the classes (start tags, finish = start + 1 / weight, a class idle joins at the virtual time:
:mod:`proxy.pipeline.queue`), within interactive to the oldest request; a class its discipline
picks that the bucket holds back (batch's headroom or reserve) lets the next class go, as the
account's dispatcher does. ``promote`` is the rule "a request waiting past a bound goes ahead of
lower-weight classes, at most one lower-weight turn early"; ``owed`` waives batch's headroom
once the other classes are that many batch turns ahead of it (:func:`proxy.pipeline.queue.owed`:
without it a class held back by headroom starves when the others use the whole rate; see
``--callers 10 --pause 0.5``).

Prints, per candidate, the share of runs whose interactive wait p99 (nearest rank) and slowest
wait pass 1 s (with ~80 requests a 60 s run, p99 is the slowest; with ~250 in 180 s, the third
slowest), the waits' p50 / p99 / p99.9 over all runs, the upstream sends
a minute and batch's share of them, and batch's longest gap between two tokens (starvation).
``--lone`` runs batch alone: the share of the rate a lone batch job gets. ``--slots`` runs the
older model instead (a slot every 61/171 s, no bucket: the discipline alone).
"""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import dataclass

from proxy.pipeline.bucket import Bucket, Rate

RATE = Rate(per_window=180, burst=9, window=60.0, margin=1.0)
MEAN_PAUSE = 2.0  # seconds between an interactive caller's answer and its next request


@dataclass(frozen=True)
class Candidate:
    name: str
    interactive: float = 6.0  # weights
    batch: float = 1.0
    headroom: int = 0  # tokens of the burst batch leaves (budget.headroom)
    reserve: float = 0.0  # budget.reserve
    promote: float = math.inf  # seconds: an interactive request waiting this long goes first
    owed: float = 0.0  # batch's headroom waived once the others are this many batch turns ahead


@dataclass
class Result:
    waits: list[float]
    sent: int = 0
    batch: int = 0
    batch_gap: float = 0.0


def token_run(
    seed: int, seconds: float, c: Candidate, callers: int = 3, pause: float = MEAN_PAUSE
) -> Result:
    """One run against the real bucket; the discipline's tags as in proxy.pipeline.queue."""
    rnd = random.Random(seed)
    bucket = Bucket(RATE, 0.0)
    arrive = [rnd.expovariate(1 / pause) for _ in range(callers)]
    waiting: dict[int, float] = {}
    s_i = s_b = vtime = 0.0
    out = Result([])
    last_batch = now = 0.0
    while now < seconds:
        for caller in range(callers):
            if caller not in waiting and arrive[caller] <= now:
                if not waiting:
                    s_i = max(s_i, vtime)  # joins at the virtual time
                waiting[caller] = arrive[caller]
        order, headroom = ["batch"], c.headroom
        if waiting:
            f_i, f_b = s_i + 1 / c.interactive, s_b + 1 / c.batch
            aged = now - min(waiting.values()) >= c.promote and f_i <= f_b + 1 / c.batch
            order = ["interactive", "batch"] if f_i <= f_b or aged else ["batch", "interactive"]
            if c.owed and f_i > f_b + c.owed / c.batch:  # batch owed a turn: no headroom
                headroom = 0
        soonest = math.inf
        for klass in order:
            held = klass == "batch"
            at = bucket.ready_at(now, c.reserve if held else 0.0, headroom if held else 0)
            if at <= now:
                bucket.take(now)
                out.sent += 1
                if klass == "batch":
                    out.batch += 1
                    out.batch_gap = max(out.batch_gap, now - last_batch)
                    last_batch = now
                    s_b += 1 / c.batch
                else:
                    caller = min(waiting, key=waiting.__getitem__)
                    out.waits.append(now - waiting.pop(caller))
                    arrive[caller] = now + rnd.expovariate(1 / pause)
                    s_i += 1 / c.interactive
                vtime = max(vtime, min(s_i, s_b) if waiting else s_b)
                break
            soonest = min(soonest, at)
        else:
            later = [a for k, a in enumerate(arrive) if k not in waiting and a > now]
            promote_at = min(waiting.values()) + c.promote if waiting else math.inf
            step = min(soonest, *later, promote_at if promote_at > now else math.inf)
            now = max(step, now + 1e-6)
    out.batch_gap = max(out.batch_gap, seconds - last_batch)
    return out


def slot_run(seed: int, seconds: float, slot: float, c: Candidate) -> list[float]:
    """The older model: a slot every ``slot`` seconds, batch always waiting (no bucket)."""
    rnd = random.Random(seed)
    s_i = s_b = vtime = 0.0
    active = False
    arrive = [rnd.expovariate(1 / MEAN_PAUSE) for _ in range(3)]
    waiting: dict[int, float] = {}
    waits: list[float] = []
    now = slot
    while now < seconds:
        for caller in range(3):
            if caller not in waiting and arrive[caller] <= now:
                waiting[caller] = arrive[caller]
        if waiting and not active:
            s_i, active = max(s_i, vtime), True
        if waiting and s_i + 1 / c.interactive <= s_b + 1 / c.batch:
            caller = min(waiting, key=waiting.__getitem__)
            waits.append(now - waiting.pop(caller))
            arrive[caller] = now + rnd.expovariate(1 / MEAN_PAUSE)
            s_i += 1 / c.interactive
            active = bool(waiting)
        else:
            s_b += 1 / c.batch
        vtime = max(vtime, min(s_i, s_b) if waiting else s_b)
        now += slot
    return waits


CANDIDATES = (
    Candidate("6:1 (before: no headroom)"),
    Candidate("strict priority", interactive=1e9),
    Candidate("promote after 0.34 s", promote=0.34),
    Candidate("promote after 0.5 s", promote=0.5),
    Candidate("reserve 0.05", reserve=0.05),
    Candidate("reserve 0.1", reserve=0.1),
    Candidate("headroom 1", headroom=1),
    Candidate("headroom 2", headroom=2),
    Candidate("headroom 3", headroom=3),
    Candidate("headroom 2 + promote 0.34 s", headroom=2, promote=0.34),
    Candidate("headroom 2, owed after 1", headroom=2, owed=1),
    Candidate("headroom 2, owed after 2", headroom=2, owed=2),
    Candidate("headroom 2, owed after 4", headroom=2, owed=4),
    Candidate("headroom 3, owed after 2", headroom=3, owed=2),
    Candidate("headroom 3, owed after 4 (chosen)", headroom=3, owed=4),
)


def _pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(len(values) * q))] if values else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.classes_model")
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--lone", action="store_true", help="batch alone (no interactive)")
    parser.add_argument("--callers", type=int, default=3, help="interactive callers")
    parser.add_argument("--pause", type=float, default=MEAN_PAUSE, help="their mean pause (s)")
    parser.add_argument("--slots", action="store_true", help="the older slot model")
    parser.add_argument("--slot", type=float, default=61 / 171)
    parser.add_argument("--only", default="", help="candidates whose name has this text")
    args = parser.parse_args(argv)
    for c in (c for c in CANDIDATES if args.only in c.name):
        over, slowest, every, sent, batch, gap = 0, 0, [], 0, 0, 0.0
        for seed in range(args.runs):
            if args.slots:
                waits = slot_run(seed, args.seconds, args.slot, c)
            else:
                r = token_run(seed, args.seconds, c, 0 if args.lone else args.callers, args.pause)
                waits, sent, batch = r.waits, sent + r.sent, batch + r.batch
                gap = max(gap, r.batch_gap)
            every += waits
            ranked = sorted(waits) or [0.0]
            over += ranked[math.ceil(0.99 * len(ranked)) - 1] > 1.0  # p99 by nearest rank
            slowest += ranked[-1] > 1.0
        every.sort()
        minute = args.runs * args.seconds / 60
        print(f"{c.name:34} runs p99 / max over 1 s: {over / args.runs:5.1%} /"
              f" {slowest / args.runs:5.1%}; wait p50 {_pct(every, 0.5):.3f}"
              f" p99 {_pct(every, 0.99):.3f} p99.9 {_pct(every, 0.999):.3f} s; upstream"
              f" {sent / minute / RATE.per_window:6.1%} of the rate, batch"
              f" {batch / max(1, sent):5.1%} of it; longest batch gap {gap:.2f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
