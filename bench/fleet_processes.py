"""``python -m bench.fleet --processes``: the budget-classes fleet in its real shape.

Each replica is a ``kounta-proxy serve`` process of its own (``serve --workers W`` with
``--workers``), configured by a TOML file as a deployment would be, and the sandbox runs in a
process of its own too (``python -m proxy.sandbox``): the callers' process holds only the
callers. What the default run measures is the same workload with every part in one event loop
(the replicas, the sandbox and the callers), which is cheaper to start and to profile but puts
each replica's wake-ups behind everyone else's work. The interactive wait's histogram comes
from each replica's ``/metrics`` (its admin listener), the upstream counts from the sandbox's
``/_sandbox/stats``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bench.fleet import (
    TOKEN,
    Tally,
    class_key,
    own_redis,
    processes,
    read_new,
    report_classes,
    walk,
)
from proxy.sandbox import SANDBOX_STATE, SandboxConfig, create_sandbox_app

READY_SECONDS = 30.0  # a process that is not answering by then fails the run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def replica_config(
    args: argparse.Namespace, upstream: str, redis_url: str, state_dir: Path, port: int, admin: int
) -> str:
    """One replica's settings file: the budget-classes workload of :func:`bench.fleet.
    classes_settings` (no cache rule; batch and interactive callers), shared in Redis."""
    callers = []
    for name, n, priority in (("batch", args.batch, "batch"), ("till", args.interactive,
                                                                "interactive")):  # fmt: skip
        for i in range(n):
            callers.append(
                f'[callers.{name}{i}]\nkey = "{class_key(name, i)}"\naccount = "main"\n'
                f'priority = "{priority}"\n'
            )
    level = os.environ.get("FLEET_LOG", "warning")
    return (
        f'state_dir = "{state_dir}"\n\n'
        f'[server]\nhost = "127.0.0.1"\nport = {port}\nshutdown_grace = 1.0\n\n'
        f'[upstream]\nbase_url = "{upstream}"\n\n'
        f'[log]\nlevel = "{level}"\n\n'
        f'[admin]\nhost = "127.0.0.1"\nport = {admin}\n\n'
        f'[accounts.main]\nmode = "static"\ntoken = "{TOKEN}"\n\n'
        f"[budget]\nreserve = {args.reserve!r}\n"
        + (f"headroom = {args.headroom}\n" if args.headroom is not None else "")
        + "\n"
        f'[shared]\nbackend = "redis"\nurl = "{redis_url}"\nkey_prefix = "{args.key_prefix}"\n'
        f'replicas = {processes(args)}\ntoken_key = "{args.token_key}"\n\n' + "\n".join(callers)
    )


async def _ready(session: aiohttp.ClientSession, urls: list[str], procs: list[Popen]) -> None:
    """Until every URL answers 200 (a process that exits first fails the run)."""
    deadline = time.monotonic() + READY_SECONDS
    pending = list(urls)
    while pending:
        for proc in procs:
            if proc.poll() is not None:
                raise SystemExit(
                    f"bench.fleet --processes: {proc.args!r} exited ({proc.returncode})"
                )
        if time.monotonic() > deadline:
            raise SystemExit(f"bench.fleet --processes: no answer from {pending}")
        url = pending[0]
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with session.get(url) as r:
                if r.status == 200:
                    pending.pop(0)
                    continue
        await asyncio.sleep(0.1)


Popen = subprocess.Popen[bytes]


def _spawn(command: list[str], log: Path) -> Popen:
    with log.open("wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)


def _stop(procs: list[Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def _sample(
    session: aiohttp.ClientSession, stats: str, until: float, counts: list[int]
) -> dict[int, int]:
    """The sandbox's upstream count once a second until a second past the end (as the
    in-process run samples it); its statuses at the last sample."""
    statuses: dict[int, int] = {}
    while time.monotonic() < until + 1:
        async with session.get(stats) as r:
            body = await r.json()
        counts.append(int(body["served"]))
        statuses = {int(k): int(v) for k, v in body["by_status"].items()}
        await asyncio.sleep(1.0)
    return statuses


async def _scrape(session: aiohttp.ClientSession, admins: list[str], tally: Tally) -> None:
    """The interactive class's budget-wait buckets summed over the replicas' /metrics, and
    their Redis round trips."""
    summed: dict[float, float] = {}
    for admin in admins:
        async with session.get(f"{admin}/metrics") as r:
            text = await r.text()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "kounta_proxy_budget_wait_seconds_bucket" and (
                    s.labels.get("class") == "interactive"
                ):
                    bound = float(s.labels["le"])
                    summed[bound] = summed.get(bound, 0.0) + s.value
                elif s.name == "kounta_proxy_shared_calls_total":
                    tally.redis_calls += s.value
    tally.wait_buckets = sorted(summed.items())


def _tails(root: Path) -> None:
    """The end of each process's log (a run that failed)."""
    for log in sorted(root.glob("*.log")):
        sys.stderr.write(f"--- {log.name}\n{log.read_text(errors='replace')[-2000:]}")


async def run_processes(args: argparse.Namespace) -> Tally:
    if not (args.batch or args.interactive) or args.token_ttl or args.stale_while_busy:
        raise SystemExit(
            "bench.fleet --processes runs the budget-classes workload (--batch/--interactive) "
            "with a static token and no stale-while-busy"
        )
    tally = Tally()
    counts: list[int] = []
    # The sandbox's orders (its data is seeded: the process serves the same ones).
    sandbox = SandboxConfig(rate_per_minute_bearer=args.limit)
    orders = sorted(create_sandbox_app(sandbox)[SANDBOX_STATE].store["orders"].records)
    procs: list[Popen] = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        redis_url = args.redis_url or stack.enter_context(own_redis(tmp))
        stack.callback(_stop, procs)
        sandbox_port = free_port()
        upstream = f"http://127.0.0.1:{sandbox_port}"
        procs.append(_spawn([sys.executable, "-m", "proxy.sandbox", "--port", str(sandbox_port),
                             "--rate-bearer", str(args.limit)], root / "sandbox.log"))  # fmt: skip
        bases, admins = [], []
        for i in range(args.replicas):
            port, admin = free_port(), free_port()
            config = root / f"replica{i}.toml"
            config.write_text(
                replica_config(args, upstream, redis_url, root / f"r{i}", port, admin)
            )
            command = [sys.executable, "-m", "proxy", "serve", "--config", str(config)]
            if args.workers > 1:
                command += ["--workers", str(args.workers)]
            procs.append(_spawn(command, root / f"replica{i}.log"))
            bases.append(f"http://127.0.0.1:{port}")
            admins.append(f"http://127.0.0.1:{admin}")
        connector = aiohttp.TCPConnector(limit=(args.batch + args.interactive) * 2)
        async with aiohttp.ClientSession(connector=connector) as session:
            try:
                await _ready(
                    session,
                    [f"{upstream}/_sandbox/stats", *(f"{a}/readyz" for a in admins)],
                    procs,
                )
                began = time.monotonic()
                until = began + args.seconds
                sampler = asyncio.create_task(
                    _sample(session, f"{upstream}/_sandbox/stats", until, counts)
                )
                waiting = list(reversed(orders))
                await asyncio.gather(
                    *(walk(session, bases[i % len(bases)], i, until, tally)
                      for i in range(args.batch)),
                    *(read_new(session, bases[(args.batch + i) % len(bases)], i, waiting, until,
                               args, tally)
                      for i in range(args.interactive)),
                )  # fmt: skip
                statuses = await sampler
                tally.elapsed = time.monotonic() - began
                await _scrape(session, admins, tally)
            except BaseException:
                _tails(root)
                raise
    print("(each replica a `kounta-proxy serve` process, the sandbox a process of its own)")
    report_classes(args, tally, counts, statuses)
    return tally
