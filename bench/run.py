"""``./dev bench``: run the benchmarks and print their tables (python -m bench.run).

Each scenario module has ``run() -> results`` and its own table; add yours here.
``--connections N`` sets wrk's connections for the comparison (default 32); ``--sizes`` runs
the cache-size series instead (bench/sizes.py, several minutes); ``--startup`` start-up over
100k stored entries (bench/startup.py); ``--redis-tier`` a Redis hit against a memory hit;
``--workers`` ``serve --workers 1`` and ``2`` against one process; ``--fleet`` the rate
budget's fleet scenario. Each mode takes its own options (its module's docstring).
"""

from __future__ import annotations

import sys
import time

from bench import cache_bench, compare

USAGE = (
    "usage: ./dev bench [--connections N] | --sizes | --startup | --redis-tier | --workers"
    " | --fleet [their options]"
)


def main() -> int:
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(f"{USAGE}\n\n{__doc__}")
        return 0
    if "--fleet" in sys.argv[1:]:
        # The rate-budget scenario instead (two minutes by default; see bench/fleet.py):
        # python -m bench.run --fleet [--seconds N --callers N --interval S --fresh-for S]
        from bench import fleet

        return fleet.main([a for a in sys.argv[1:] if a != "--fleet"])
    if "--workers" in sys.argv[1:]:
        # Fresh hits with serve --workers 1 and 2, on a Redis of its own (bench/workers_bench)
        from bench import workers_bench

        return workers_bench.main([a for a in sys.argv[1:] if a != "--workers"])
    if "--redis-tier" in sys.argv[1:]:
        # A memory-tier miss answered from Redis against a memory hit (bench/redis_tier.py)
        from bench import redis_tier

        return redis_tier.main([a for a in sys.argv[1:] if a != "--redis-tier"])
    if "--startup" in sys.argv[1:]:
        # Start-up over 100k stored entries (bench/startup.py: --entries N --rounds R --old DIR)
        from bench import startup

        return startup.main([a for a in sys.argv[1:] if a != "--startup"])
    if "--sizes" in sys.argv[1:]:
        # Fresh hits and misses with 1k, 10k and 100k stored entries; start-up; RSS
        from bench import sizes

        return sizes.main([a for a in sys.argv[1:] if a != "--sizes"])
    connections = _connections(sys.argv[1:])
    if connections is None:
        return 2
    started = time.monotonic()
    results = cache_bench.run()
    print(
        f"\n## Cache benchmark (loopback, wrk -t2 -c{cache_bench.CONNECTIONS} "
        f"-d{cache_bench.DURATION}s, median of {cache_bench.ROUNDS} interleaved rounds; "
        "the proxy on its default loop)\n"
    )
    print(cache_bench.table(results))
    print()
    print(cache_bench.ratios(results))
    rows, note = compare.run(connections)
    print(
        f"\n## The long way, both event loops, nginx (wrk -t2 -c{connections} "
        f"-d{cache_bench.DURATION}s, {compare.ROUNDS} interleaved rounds: the round with the "
        "median req/s, ratios the median of each round's own)\n"
    )
    print(compare.table(rows))
    print()
    print(compare.ratios(rows))
    if note:
        print(f"\n{note}")
    print(f"\n(whole run {time.monotonic() - started:.0f} s)", file=sys.stderr)
    return 0


def _connections(args: list[str]) -> int | None:
    """The comparison's wrk connections from ``--connections N`` (the only option of the
    default run); None, after one line on stderr, for anything else."""
    if not args:
        return compare.DEFAULT_CONNECTIONS
    if len(args) == 2 and args[0] == "--connections" and args[1].isdigit() and int(args[1]) > 0:
        return int(args[1])
    print(f"bench: unknown or incomplete options {' '.join(args)!r}; {USAGE}", file=sys.stderr)
    return None


if __name__ == "__main__":
    sys.exit(main())
