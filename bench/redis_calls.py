"""Client CPU and wall time of a flight's Redis calls (python -m bench.redis_calls [--old DIR]
[--busy N]): the backend's fetch-lock claim, budget slot (with budget classes, as the proxy
takes it) and release (``RedisBackend`` through ``_run``, as a flight calls them), one flight
at a time and eight at once, on a redis-server of the bench's own; with ``--old DIR`` (``git
archive REV proxy | tar -x -C DIR``, as bench.ab) DIR's package in alternating rounds. A
package whose claim takes the slot with it (``SlotAsk``) asks both in one round trip, as its
flights do. ``--busy N``: N processes spin on the machine's cores meanwhile (a loaded
machine, as under wrk, where every round trip waits for redis-server to be scheduled). Prints
µs of the client's CPU (process time) per command and per flight, and the wall time from a
flight's start until it may send its upstream request (claim and slot answered: the part of
its Redis calls on the critical path), median and p90.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

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

    from proxy.shared import base

    ask = base.ClassedAsk("standard", (0, 1, 0), 0.0, (6.0, 3.0, 1.0), 5.0)
    slot_ask = getattr(base, "SlotAsk", None)  # None: a package before the slot came with it
    ready: list[float] = []  # each flight's start until it may send upstream

    async def flight(i: int) -> None:
        started = time.perf_counter()
        if slot_ask is not None:
            slot = slot_ask("main", 10**9, 10**6, 60.0, ask)
            claim = await backend.cache_claim(
                "main", f"d{i}", f"o{i}", 5.0, 1000, False, 8192, slot
            )
            if claim.taken is None:  # (the first call connects: the slot is asked alone)
                await backend.take_classed("main", 10**9, 10**6, 60.0, ask)
        else:
            await backend.cache_claim("main", f"d{i}", f"o{i}", 5.0, 1000, peek=8192)
            await backend.take_classed("main", 10**9, 10**6, 60.0, ask)
        ready.append(time.perf_counter() - started)
        await backend.cache_release("main", f"d{i}", f"o{i}", b"note")

    import proxy

    print(f"package: {os.path.dirname(proxy.__file__)}")
    for i in range(200):  # connected, scripts loaded
        await flight(i)
    for together in (1, 8):
        ready.clear()
        cpu, wall = time.process_time(), time.perf_counter()
        for j in range(FLIGHTS // together):
            base_i = 1000 + (together * FLIGHTS) + j * together
            await asyncio.gather(*(flight(base_i + k) for k in range(together)))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        flights = (FLIGHTS // together) * together
        commands = 3 * flights
        ready.sort()
        median, p90 = ready[len(ready) // 2], ready[len(ready) * 9 // 10]
        print(f"{together} at once: {cpu / commands * 1e6:.1f} µs CPU, "
              f"{wall / commands * 1e6:.1f} µs wall per command; "
              f"{cpu / flights * 1e6:.1f} µs CPU a flight; until it may send "
              f"{median * 1e6:.0f} µs (p90 {p90 * 1e6:.0f})")  # fmt: skip
    await backend.close()


@contextlib.contextmanager
def spinning(count: int) -> Iterator[None]:
    """``count`` processes busy on the CPU until the block ends."""
    spin = "while True: pass"
    procs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(count)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.redis_calls")
    p.add_argument("--old", help="a directory holding another proxy package (as bench.ab)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--busy", type=int, default=0, help="processes spinning meanwhile")
    p.add_argument("--url", help=argparse.SUPPRESS)  # the child's
    args = p.parse_args(argv)
    if args.url:
        asyncio.run(measure(args.url))
        return 0
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = [("this tree", root)] + ([("--old", os.path.abspath(args.old))] if args.old else [])
    with (
        tempfile.TemporaryDirectory() as directory,
        own_redis(directory) as url,
        spinning(args.busy),
    ):
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
