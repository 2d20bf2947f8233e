"""``make bench``: run the benchmarks and print their tables (python -m bench.run).

Each scenario module has ``run() -> results`` and its own table; add yours here.
"""

from __future__ import annotations

import sys
import time

from bench import cache_bench


def main() -> int:
    if "--fleet" in sys.argv[1:]:
        # The rate-budget scenario instead (two minutes by default; see bench/fleet.py):
        # python -m bench.run --fleet [--seconds N --callers N --interval S --fresh-for S]
        from bench import fleet

        return fleet.main([a for a in sys.argv[1:] if a != "--fleet"])
    if "--workers" in sys.argv[1:]:
        # Fresh hits with serve --workers 1 and 2, on a Redis of its own (bench/workers_bench)
        from bench import workers_bench

        return workers_bench.main()
    started = time.monotonic()
    results = cache_bench.run()
    print(
        f"\n## Cache benchmark (loopback, wrk -t2 -c{cache_bench.CONNECTIONS} "
        f"-d{cache_bench.DURATION}s, median of {cache_bench.ROUNDS} interleaved rounds)\n"
    )
    print(cache_bench.table(results))
    print()
    print(cache_bench.ratios(results))
    print(f"\n(whole run {time.monotonic() - started:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
