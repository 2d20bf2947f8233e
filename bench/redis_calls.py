"""Client CPU per Redis command of a flight (python -m bench.redis_calls [--old DIR]): the
backend's fetch-lock claim, budget slot and release (``RedisBackend`` through ``_run``, as a
flight calls them), one flight at a time and eight at once, on a redis-server of the bench's
own; with ``--old DIR`` (``git archive REV proxy | tar -x -C DIR``, as bench.ab) DIR's package
in alternating rounds. Prints µs of the client's CPU (process time) and of wall time per
command.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time

from bench.fleet import own_redis

FLIGHTS = 3000
KEY = "G6lVdQ8yOXcSi9q3IPa7dxUiZ1r9JTJOOjRbySCXGHs="  # a bench key, not a secret


async def measure(url: str) -> None:
    """In the child: this package's backend, its flights' commands timed."""
    from prometheus_client import CollectorRegistry

    from proxy.settings import Secret, SharedSettings
    from proxy.shared.metrics import SharedMetrics
    from proxy.shared.redis_backend import RedisBackend

    settings = SharedSettings(
        backend="redis", url=url, key_prefix=f"calls{os.getpid()}", token_key=Secret(KEY)
    )
    backend = RedisBackend(settings, SharedMetrics(CollectorRegistry()))
    await backend.start()

    async def flight(i: int) -> None:
        await backend.cache_claim("main", f"d{i}", f"o{i}", 5.0, 1000, peek=8192)
        await backend.take("main", 10**9, 10**6, 60.0)
        await backend.cache_release("main", f"d{i}", f"o{i}", b"note")

    import proxy

    print(f"package: {os.path.dirname(proxy.__file__)}")
    for i in range(200):  # connected, scripts loaded
        await flight(i)
    for together in (1, 8):
        cpu, wall = time.process_time(), time.perf_counter()
        for j in range(FLIGHTS // together):
            await asyncio.gather(*(flight(j * together + k) for k in range(together)))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        commands = 3 * (FLIGHTS // together) * together
        print(f"{together} at once: {cpu / commands * 1e6:.1f} µs CPU, "
              f"{wall / commands * 1e6:.1f} µs wall per command")  # fmt: skip
    await backend.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.redis_calls")
    p.add_argument("--old", help="a directory holding another proxy package (as bench.ab)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--url", help=argparse.SUPPRESS)  # the child's
    args = p.parse_args(argv)
    if args.url:
        asyncio.run(measure(args.url))
        return 0
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = [("this tree", root)] + ([("--old", os.path.abspath(args.old))] if args.old else [])
    with tempfile.TemporaryDirectory() as directory, own_redis(directory) as url:
        for round_no in range(1, args.rounds + 1):
            for label, tree in trees:
                env = {**os.environ, "PYTHONPATH": os.pathsep.join((tree, root))}
                child = [sys.executable, "-m", "bench.redis_calls", "--url", url]
                # cwd: the tree's own proxy first on sys.path (python -m puts cwd there)
                done = subprocess.run(
                    child, env=env, cwd=tree, capture_output=True, text=True, check=True
                )
                for line in done.stdout.splitlines():
                    print(f"round {round_no}, {label}: {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
