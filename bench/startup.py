"""Start-up over a large disk cache (python -m bench.startup [--entries N] [--old DIR]).

One 8 KB entry is stored through a proxy in front of bench/origin.py, then copied under N
keys (products/0 .. N-1), written as ``CacheStore`` writes records but many in one
transaction (seconds, where filling through the proxy takes minutes). Then, in ``--rounds``
interleaved rounds, a proxy of this tree (and of ``--old DIR``'s, the way bench.ab runs it)
is started over them: seconds from ``serve`` to /readyz 200, to the first stored answer (a
HIT read from disk), for a purge of one path then; its RSS. The floor: the same proxy over an
empty cache.
Target (issue 21): ready in < 2 s over 100k entries.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench import sizes
from bench.cache_bench import free_port, process, rss_mb
from bench.workers_bench import wait_ready

HERE = str(Path(__file__).resolve().parent.parent)


def start(
    serve: list[str], cwd: str, base: str, port: int, admin: int, last: int
) -> dict[str, float]:
    """Seconds to ready, to the first answer from disk, to a purge answered; RSS then."""
    began = time.monotonic()
    proc = subprocess.Popen(serve, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_ready(admin, proc, 120.0)  # the listener up too
        ready = time.monotonic() - began
        with urllib.request.urlopen(base + sizes.PATH.format(7), timeout=30) as r:
            r.read()
            hit = r.headers.get("X-Cache", "") == "HIT"
        first = time.monotonic() - began
        purge = urllib.request.Request(
            # The last id: the one path with that prefix (a purge compares normalised paths)
            f"http://127.0.0.1:{admin}/cache/purge?prefix=/v1/companies/5001/products/{last}",
            method="POST",
        )
        with urllib.request.urlopen(purge, timeout=60) as r:
            purged = json.loads(r.read()).get("purged")
        took = time.monotonic() - began - first
        return {
            "ready": ready,
            "first": first if hit else float("nan"),
            "purge": took if purged == 1 else float("nan"),
            "rss": rss_mb(proc.pid) or 0.0,
            "anon": rss_mb(proc.pid, "RssAnon") or 0.0,
        }
    finally:
        proc.terminate()
        proc.wait(30)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.startup")
    p.add_argument("--entries", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--old", help="a directory holding another proxy package (as bench.ab)")
    args = p.parse_args(argv)
    directory = Path(tempfile.mkdtemp(prefix="kounta-startup-"))
    origin_port, port, admin = free_port(), free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    upstream = f"http://127.0.0.1:{origin_port}"
    config = sizes.config(directory, upstream, port, admin)
    serve = [sys.executable, "-m", "proxy", "serve", "--config", str(config)]
    # The floor: this tree over an empty cache (the process's own start-up, imports included).
    (directory / "empty").mkdir()
    empty = sizes.config(directory / "empty", upstream, port, admin)
    trees = [("this tree", HERE, serve)]
    trees += [("--old", args.old, serve)] if args.old else []
    trees += [("this tree, empty cache", HERE, [*serve[:-1], str(empty)])]
    results: dict[str, list[dict[str, float]]] = {}
    try:
        with contextlib.ExitStack() as stack:
            origin = [sys.executable, "-m", "bench.origin", "--port", str(origin_port)]
            stack.enter_context(process(origin, origin_port))
            with process(serve, port), urllib.request.urlopen(base + sizes.PATH.format(0)) as r:
                r.read()
            began = time.monotonic()
            asyncio.run(sizes.populate(directory / "state" / "cache", args.entries))
            print(f"{args.entries} entries in {time.monotonic() - began:.1f} s", file=sys.stderr)
            for round_no in range(args.rounds):
                for name, cwd, command in trees if round_no % 2 == 0 else trees[::-1]:
                    # A path of its own for each start's purge (the last ids: one path each)
                    last = args.entries - 1 - sum(map(len, results.values()))
                    found = start(command, cwd, base, port, admin, last)
                    print(name, found, file=sys.stderr, flush=True)
                    results.setdefault(name, []).append(found)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(f"\n## Start-up over {args.entries:,} stored entries of 8 KB ({args.rounds} rounds)\n")
    print("| proxy | ready s | first HIT s | purge of one path s | RSS MB (anon) |")
    print("| --- | --- | --- | --- | --- |")
    for name, runs in results.items():

        def span(field: str, runs: list[dict[str, float]] = runs) -> str:
            values = [r[field] for r in runs if r[field] == r[field]]  # not NaN
            return f"{min(values):.2f}-{max(values):.2f}" if values else "-"

        anon = statistics.median(r["anon"] for r in runs)
        print(
            f"| {name} | {span('ready')} | {span('first')} | {span('purge')} | "
            f"{statistics.median(r['rss'] for r in runs):.0f} ({anon:.0f}) |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
