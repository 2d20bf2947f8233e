"""How soon the webhook verifier finds a lossy feed: a Monte Carlo model (issue 19).

    python -m bench.verifier_model [--verify-every 60] [--records 200] [--page 25]
                                   [--drop 0.1] [--change-every 5] [--runs 2000]

``--records`` cached records, read evenly, on the first pages of their family's list
(``--page`` members a page); one of them changes every ``--change-every`` seconds on
average (Poisson), and its delivery is lost with the chance ``--drop``: it stays stale until
its next change is delivered. Every ``--verify-every`` seconds the verifier makes one check:

- ``records`` (before): it revalidates one record read lately (any of them, evenly);
- ``pages`` (now, proxy/cache/webhooks/verifier.py): a suspect first; else the next list
  page (each stale cached member on it becomes a suspect); after the page past the cached
  ones, one record, then the walk starts again.

A check that revalidates a stale record detects the loss. Prints, for each, the median and
95th percentile of the detection time (seconds from the first change; add
``delivery_grace`` + 1 s for every replica) and the share found within 10 minutes.
"""

from __future__ import annotations

import argparse
import random


def detect(pages: bool, v: float, n: int, p: int, d: float, c: float, seed: int) -> float:
    """Seconds until a check finds a stale record (capped at 4 hours)."""
    rnd = random.Random(seed)
    stale: set[int] = set()
    t, change, check = 0.0, rnd.expovariate(c), rnd.uniform(0, v)
    suspects: list[int] = []
    page, covered = 0, True
    while t < 4 * 3600:
        if change < check:
            t = change
            record = rnd.randrange(n)
            if rnd.random() < d:
                stale.add(record)
            else:
                stale.discard(record)
            change = t + rnd.expovariate(c)
            continue
        t, check = check, check + v
        if pages and suspects:
            if suspects.pop(0) in stale:
                return t
        elif not pages or not covered:
            covered = True
            if rnd.randrange(n) in stale:
                return t
        else:
            members = [r for r in range(page * p, page * p + p) if r < n]
            covered = bool(members)
            suspects = [r for r in members if r in stale]
            page = page + 1 if members else 0
    return t


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.verifier_model")
    parser.add_argument("--verify-every", type=float, default=60.0)
    parser.add_argument("--records", type=int, default=200)
    parser.add_argument("--page", type=int, default=25)
    parser.add_argument("--drop", type=float, default=0.1)
    parser.add_argument("--change-every", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=2000)
    a = parser.parse_args(argv)
    for name, pages in (("records (before)", False), ("pages (now)", True)):
        times = sorted(
            detect(pages, a.verify_every, a.records, a.page, a.drop, 1 / a.change_every, seed)
            for seed in range(a.runs)
        )
        within = sum(1 for x in times if x <= 600) / len(times)
        print(
            f"{name:17} median {times[len(times) // 2]:6.0f} s  "
            f"p95 {times[len(times) * 95 // 100]:6.0f} s  within 10 min {within:.0%}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
