"""The Redis tier's cost (python -m bench.run --redis-tier): a memory-tier miss answered from
Redis against a memory hit.

Two proxies share one Redis of the bench's own (same key prefix and ``shared.token_key``, so
each verifies what the other stored): *memory* has a memory tier that holds the whole set,
*redis* one too small to hold any 8 KB entry (``cache.memory_size`` 16 KiB: an entry above an
eighth of it is never held), so each of its requests misses the memory tier and is answered
from Redis (its disk is empty: it never fetches). KEYS (``--keys``) products, fetched once through
*memory* (stored in Redis), are then asked at random through each in ROUNDS interleaved
rounds: req/s, the proxy's CPU µs per request, p99, and Redis round trips per request (its
own ``kounta_proxy_shared_calls_total``, as ``--workers`` counts them). Goal (issue 21): a
Redis hit at most 1.5x a memory hit, record MACs included. Each tree has its own key prefix
(the other tree may write records of another format). ``--profile PREFIX``: after the rounds,
this tree's two proxies recorded by ``py-spy record -f raw`` (PREFIX-memory.txt,
PREFIX-redis.txt) under one more wrk run each.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cryptography.fernet import Fernet

from bench import cache_bench, sizes
from bench.cache_bench import cpu_seconds, free_port, process, wrk
from bench.fleet import own_redis
from bench.tail import profiled
from bench.workers_bench import shared_calls, wait_ready

KEYS = 200
ROUNDS = 3
HERE = str(Path(__file__).resolve().parent.parent)


def config(
    directory: Path,
    upstream: str,
    redis: str,
    key: str,
    port: int,
    admin: int,
    memory: int,
    prefix: str = "bench-tier",
) -> Path:
    """One proxy of the pair: its own directory, the shared Redis, prefix and key."""
    own = directory / str(port)
    own.mkdir()
    shared = f'[shared]\nbackend = "redis"\nurl = "{redis}"\nkey_prefix = "{prefix}"\n'
    return sizes.config(own, upstream, port, admin, memory, f'{shared}token_key = "{key}"\n')


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run --redis-tier")
    p.add_argument("--old", help="a directory holding another proxy package (as bench.ab)")
    p.add_argument(
        "--keys",
        type=int,
        default=KEYS,
        help=f"products asked at random (default {KEYS}; fewer: more lookups of one key at "
        "once share a read, more: fewer do)",
    )
    p.add_argument("--rounds", type=int, default=ROUNDS, help=f"default {ROUNDS}")
    p.add_argument("--profile", help="PREFIX: py-spy's raw output of this tree's two proxies")
    args = p.parse_args(argv)
    rounds = args.rounds
    keys = args.keys
    binary = shutil.which("wrk")
    if binary is None:
        raise SystemExit("bench: needs wrk (apt-get install wrk)")
    began = time.monotonic()
    directory = Path(tempfile.mkdtemp(prefix="kounta-tier-"))
    script = directory / "random.lua"
    script.write_text(sizes.RANDOM_SCRIPT.replace("{n}", str(keys)))
    origin_port = free_port()
    upstream = f"http://127.0.0.1:{origin_port}"
    key = Fernet.generate_key().decode()
    trees = [("this tree", HERE)] + ([("--old", args.old)] if args.old else [])
    results: dict[str, list[tuple[float, float, float, float]]] = {}
    try:
        with contextlib.ExitStack() as stack:
            origin = [sys.executable, "-m", "bench.origin", "--port", str(origin_port)]
            stack.enter_context(process(origin, origin_port))
            redis = stack.enter_context(own_redis(str(directory)))
            proxies: dict[str, tuple[str, int, int]] = {}
            firsts = []
            for number, (tree, cwd) in enumerate(trees):
                prefix = f"bench-tier{number}"
                for name, memory in (("memory hit", 64 * 1024**2), ("Redis hit", 16 * 1024)):
                    port, admin = free_port(), free_port()
                    path = config(directory, upstream, redis, key, port, admin, memory, prefix)
                    serve = [sys.executable, "-m", "proxy", "serve", "--config", str(path)]
                    proc = stack.enter_context(process(serve, port, cwd=cwd))
                    wait_ready(admin, proc)
                    proxies[f"{name}, {tree}"] = (f"http://127.0.0.1:{port}", admin, proc.pid)
                firsts.append(proxies[f"memory hit, {tree}"][0])
            for first in firsts:  # stored in Redis (and that proxy's memory tier)
                for n in range(keys):
                    cache_bench.fetch(first + sizes.PATH.format(n))
            for url, _, _ in proxies.values():  # each: its memory tier filled, if it holds any
                for n in range(keys):
                    cache_bench.fetch(url + sizes.PATH.format(n))
            for round_no in range(rounds):
                order = list(proxies.items())
                for name, (url, admin, pid) in order if round_no % 2 == 0 else order[::-1]:
                    cpu, calls = cpu_seconds(pid), shared_calls(admin)
                    r = wrk(binary, url + sizes.PATH.format(0), {}, script)
                    spent = (cpu_seconds(pid) - cpu) * 1e6 / max(1, r.requests)
                    trips = (shared_calls(admin) - calls) / max(1, r.requests)
                    results.setdefault(name, []).append((r.rps, spent, r.p99_ms, trips))
                    print(
                        f"{name}: {r.rps:.0f}/s {spent:.0f} µs {trips:.2f} trips", file=sys.stderr
                    )
            if args.profile:
                for name, suffix in (("memory hit", "memory"), ("Redis hit", "redis")):
                    url, _, pid = proxies[f"{name}, this tree"]
                    with profiled(pid, args, f"{args.profile}-{suffix}.txt", None):
                        r = wrk(binary, url + sizes.PATH.format(0), {}, script)
                    print(f"profiled {name}: {r.rps:.0f}/s", file=sys.stderr)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(
        f"\n## The Redis tier against the memory tier ({keys} keys of 8 KB at random, wrk -t2 "
        f"-c{cache_bench.CONNECTIONS} -d{cache_bench.DURATION}s, min-max of {rounds} "
        "interleaved rounds)\n"
    )
    print("| answered from | req/s | CPU µs/req | p99 ms | Redis round trips/req |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, runs in results.items():
        cells = [f"{min(c):.0f}-{max(c):.0f}" for c in list(zip(*runs, strict=True))[:3]]
        trips = statistics.median(r[3] for r in runs)
        print(f"| {name} | {' | '.join(cells)} | {trips:.2f} |")
    print()
    for tree, _ in trees:
        hit, tier = results[f"memory hit, {tree}"], results[f"Redis hit, {tree}"]
        cpu = statistics.median(r[1] for r in tier) / statistics.median(r[1] for r in hit)
        rate = statistics.median(r[0] for r in hit) / statistics.median(r[0] for r in tier)
        print(f"- {tree}: Redis hit / memory hit, CPU per request {cpu:.2f}x, time {rate:.2f}x")
    print(f"\n(whole run {time.monotonic() - began:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
