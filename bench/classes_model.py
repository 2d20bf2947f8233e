"""The budget-classes workload as a model: how often a 60 s run's interactive tail passes 1 s.

    python -m bench.classes_model [--runs 2000] [--slot 0.357] [--seconds 60]

No proxy, no Redis, no machine: slots every ``--slot`` seconds (61/171 s is the pace in a
run's first window once the burst was spent at its start; 61/180 later), batch always waiting,
three interactive callers each asking again an exponential pause (mean 2 s: 90 a minute in
all, half the limit) after their answer. Each slot goes by weighted fair queuing between
interactive and batch (start tags, finish = start + 1 / weight, a class idle joins at the
virtual time: :mod:`proxy.pipeline.queue`), within interactive to the oldest request, or to
any request within ``slack`` seconds of the oldest (the fleet's margin before 2026-12-05 was
half a pacing interval). Prints, per discipline, the share of runs whose slowest interactive
wait passes 1 s (with ~80 requests a run, p99 is about the slowest) and the waits' p99/p99.9.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Discipline:
    name: str
    interactive: float = 6.0  # weights
    batch: float = 1.0
    slack: float = 0.0  # seconds: a request this much younger than the oldest may go first


def one_run(seed: int, seconds: float, slot: float, d: Discipline) -> list[float]:
    rnd = random.Random(seed)
    s_i = s_b = vtime = 0.0
    active = False
    arrive = [rnd.expovariate(0.5) for _ in range(3)]
    waiting: dict[int, float] = {}
    waits: list[float] = []
    now = slot
    while now < seconds:
        for caller in range(3):
            if caller not in waiting and arrive[caller] <= now:
                waiting[caller] = arrive[caller]
        if waiting and not active:
            s_i, active = max(s_i, vtime), True
        if waiting and s_i + 1 / d.interactive <= s_b + 1 / d.batch:
            oldest = min(waiting.values())
            caller = rnd.choice([c for c, at in waiting.items() if at <= oldest + d.slack])
            waits.append(now - waiting.pop(caller))
            arrive[caller] = now + rnd.expovariate(0.5)
            s_i += 1 / d.interactive
            active = bool(waiting)
        else:
            s_b += 1 / d.batch
        vtime = max(vtime, min(s_i, s_b) if waiting else s_b)
        now += slot
    return waits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.classes_model")
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--slot", type=float, default=61 / 171)
    args = parser.parse_args(argv)
    for d in (
        Discipline("6:1, first come first served"),
        Discipline("6:1, within half a slot (before)", slack=args.slot / 2),
        Discipline("strict priority", interactive=1e9),
    ):
        over, every = 0, []
        for seed in range(args.runs):
            waits = one_run(seed, args.seconds, args.slot, d)
            every += waits
            over += max(waits, default=0.0) > 1.0
        every.sort()
        p99, p999 = every[int(len(every) * 0.99)], every[int(len(every) * 0.999)]
        share, per_run = over / args.runs, len(every) / args.runs
        print(f"{d.name:38} runs with a wait over 1 s: {share:5.1%}; "
              f"p99 {p99:.3f} s, p99.9 {p999:.3f} s, {per_run:.0f} a run")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
