"""A fleet of callers polling Kounta through the proxy, against the sandbox's real limit.

    python -m bench.fleet [--seconds 120] [--callers 12] [--interval 2.0] [--fresh-for 5]
                          [--replicas 1] [--workers 1] [--redis-url redis://...]

Starts the sandbox (180 requests a minute per token, as Kounta) and the proxy in
front of it on loopback ports, then lets ``--callers`` simulated services poll list
pages and single records, each waiting about ``--interval`` seconds between
requests, for ``--seconds``. Together they ask for more than Kounta allows; the
proxy's cache and rate budget have to make that work. Prints:

- upstream requests per minute (each full minute, and the most in any 60 s window),
- 429s seen by callers (target 0) and 429s Kounta itself answered,
- the age of the data callers got (the ``Age`` header; 0 for answers fresh from Kounta),
- how the answers were served (X-Cache) and how long callers waited.

With ``--replicas N`` (N > 1) it runs N proxies sharing one budget in Redis
(``[shared] backend = "redis"``; a ``redis-server`` of its own on a free loopback port unless
``--redis-url`` names one), callers spread over them, and also prints the Redis round trips
per upstream request.

``--workers W`` stands for ``serve --workers W`` on each replica: the bench runs its proxies
in its own process, so it runs ``replicas x workers`` of them, each counted as one replica of
the shared backend (``[shared] replicas = replicas x workers``, exactly what ``serve
--workers`` sets for its workers), callers spread over them as the kernel spreads
connections over the workers of one port. What it measures — the shared budget and cache
across processes — is the same; per-core throughput is ``./dev bench --workers``'s job.

With ``--batch N`` and/or ``--interactive M`` it runs the budget-classes workload instead:
N callers (priority batch) walking all customers with ``X-Proxy-All-Pages`` in a loop, and M
callers (priority interactive) reading orders not yet cached (no cache rule) at
``--interactive-rate`` requests a minute between them (default: half the limit). It prints the
interactive wait p50/p99 (the ``kounta_proxy_budget_wait_seconds{class="interactive"}`` metric
and the callers' own clock), the upstream requests as a share of the limit, and Kounta's 429s.
``--reserve`` sets ``budget.reserve``, ``--headroom`` ``budget.headroom``.
With ``--processes`` each replica is a ``kounta-proxy serve`` process of its own and the
sandbox too, as a deployment runs them (:mod:`bench.fleet_processes`); by default they all
share the callers' event loop. On a proxy without budget classes (the code before them)
the same workload runs class-blind: the "before" numbers.

``--token-ttl SECONDS`` runs the account in ``oauth`` mode against the sandbox's OAuth server,
whose access tokens live that long (``--rotate-refresh``: each refresh answer carries a new
refresh token and the old one dies); replicas share the token in Redis. It also prints the
upstream 401s (each 10 s of the run) and the token requests.
With ``--stale-while-busy S`` the proxies set ``cache.stale_while_busy = S`` (where they know
it): a record stored and stale answers at once while the budget is busy. The report then also
gives the callers' wait and the data age for single records, and the longest gap between two
upstream requests for a hot record (how often a revalidation reaches it). ``--hot N`` sets
how many records of each kind the callers read (default 40).

Exits 1 when any caller saw a 429. Also ``python -m bench.run --fleet [options]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import math
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from cryptography.fernet import Fernet
from prometheus_client import CollectorRegistry

from proxy.edge.app import create_app
from proxy.listener import bound_port, start
from proxy.logs import configure
from proxy.sandbox import SANDBOX_STATE, SandboxConfig, SandboxState, create_sandbox_app
from proxy.sandbox.oauth import SANDBOX_OAUTH, SandboxAuthServer
from proxy.settings import (
    AccountSettings,
    BudgetSettings,
    CacheRule,
    CacheSettings,
    CallerSettings,
    LogSettings,
    Secret,
    ServerSettings,
    Settings,
    SharedSettings,
    UpstreamSettings,
)

TOKEN = "sandbox-token"  # the sandbox's well-known dummy token
REFRESH_TOKEN = "fleet-refresh"  # seeded in the bench's own sandbox
COMPANY = "/v1/companies/5001"
LISTS = ("products", "customers", "orders")
HOT_RECORDS = 40  # records per kind that the fleet keeps asking about


@dataclass
class Tally:
    statuses: Counter[int] = field(default_factory=Counter)
    cache: Counter[str] = field(default_factory=Counter)
    ages: list[float] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)
    redis_calls: float = 0.0
    batch_statuses: Counter[int] = field(default_factory=Counter)
    # The interactive class's budget wait, from the metric's buckets: (upper bound, count).
    wait_buckets: list[tuple[float, float]] = field(default_factory=list)
    elapsed: float = 0.0  # from the first caller request to the last answer
    # Single records only: the callers' wait and the data's age; and the sandbox's requests
    # by path once a second (when each record reached Kounta).
    record_waits: list[float] = field(default_factory=list)
    record_ages: list[float] = field(default_factory=list)
    by_path: list[dict[str, int]] = field(default_factory=list)


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fleet", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=120.0, help="how long the fleet polls")
    parser.add_argument("--callers", type=int, default=12, help="simulated services")
    parser.add_argument("--interval", type=float, default=2.0, help="mean seconds between polls")
    parser.add_argument("--limit", type=int, default=180, help="the sandbox's requests a minute")
    parser.add_argument(
        "--fresh-for", type=float, default=5.0, help="cache rule: seconds served without asking"
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--replicas", type=int, default=1, help="proxies sharing one budget")
    parser.add_argument(
        "--workers", type=int, default=1, help="serve --workers per replica (see the docstring)"
    )
    parser.add_argument(
        "--redis-url", default="", help="Redis for replicas x workers > 1 (default: own)"
    )
    parser.add_argument("--batch", type=int, default=0, help="callers walking all pages")
    parser.add_argument(
        "--interactive", type=int, default=0, help="callers reading records not yet cached"
    )
    parser.add_argument(
        "--interactive-rate",
        type=float,
        default=0.0,
        help="requests a minute the interactive callers ask in all (default: limit / 2)",
    )
    parser.add_argument("--reserve", type=float, default=0.0, help="budget.reserve")
    parser.add_argument("--headroom", type=int, help="budget.headroom (default: the proxy's)")
    parser.add_argument(
        "--token-ttl", type=float, default=0.0, help="oauth account: access-token lifetime (s)"
    )
    parser.add_argument(
        "--rotate-refresh", action="store_true", help="oauth account: refresh tokens rotate"
    )
    parser.add_argument(
        "--stale-while-busy", type=float, default=0.0, help="cache.stale_while_busy (0: off)"
    )
    parser.add_argument(
        "--hot", type=int, default=HOT_RECORDS, help="records per kind the callers read"
    )
    parser.add_argument(
        "--processes",
        action="store_true",
        help="each replica a `kounta-proxy serve` process, the sandbox one too "
        "(bench/fleet_processes.py; budget-classes workload)",
    )
    args = parser.parse_args(argv)
    # One prefix for the whole run: every replica must find the same budget keys.
    args.key_prefix = f"fleet-{time.time_ns()}"
    # And one token key: cache records and messages are authenticated with it.
    args.token_key = Fernet.generate_key().decode()
    if (
        args.seconds <= 0
        or args.callers < 1
        or args.interval <= 0
        or args.replicas < 1
        or args.workers < 1
        or args.token_ttl < 0
        or args.hot < 1
    ):
        parser.error(
            "--seconds, --callers, --interval, --replicas, --workers and --hot must be positive"
        )
    if args.rotate_refresh and not args.token_ttl:
        parser.error("--rotate-refresh needs --token-ttl")
    return args


def processes(args: argparse.Namespace) -> int:
    """Proxies the bench runs: every worker of every replica is one."""
    return int(args.replicas * args.workers)


def settings_for(
    upstream: str, state_dir: str, args: argparse.Namespace, redis_url: str = ""
) -> Settings:
    rules = (CacheRule(path="/v1/*", fresh_for=args.fresh_for, stale_if_error=300.0),)
    shared = SharedSettings()
    if redis_url:
        shared = SharedSettings(
            backend="redis", url=redis_url, key_prefix=args.key_prefix,
            replicas=processes(args), token_key=Secret(args.token_key),
        )  # fmt: skip
    return Settings(
        shared=shared,
        state_dir=state_dir,
        server=ServerSettings(host="127.0.0.1", port=0),
        upstream=UpstreamSettings(base_url=upstream),
        log=LogSettings(level="warning"),
        accounts={"main": account_for(upstream, args)},
        callers={
            f"service{i}": CallerSettings(key=Secret(key(i)), account="main")
            for i in range(args.callers)
        },
        cache=CacheSettings(rules=rules, **_stale_while_busy(args)),
    )


def account_for(upstream: str, args: argparse.Namespace) -> AccountSettings:
    """The static sandbox token, or with ``--token-ttl`` an oauth account on the sandbox's
    OAuth server (bootstrapped with a refresh token the sandbox accepts as issued earlier)."""
    if not args.token_ttl:
        return AccountSettings(mode="static", token=Secret(TOKEN))
    return AccountSettings(
        mode="oauth",
        client_id=SandboxConfig.client_id,
        client_secret=Secret(SandboxConfig.client_secret),
        token_url=f"{upstream}/v1/token",
        refresh_token=Secret(REFRESH_TOKEN),
    )


def sandbox_config(args: argparse.Namespace) -> SandboxConfig:
    if not args.token_ttl:
        return SandboxConfig(rate_per_minute_bearer=args.limit)
    return SandboxConfig(
        rate_per_minute_bearer=args.limit,
        access_token_lifetime=args.token_ttl,
        rotate_refresh_tokens=args.rotate_refresh,
        refresh_tokens=(REFRESH_TOKEN,),
    )


def _stale_while_busy(args: argparse.Namespace) -> dict[str, float]:
    """``cache.stale_while_busy`` where asked and this proxy knows it (the code before it
    runs the same workload without)."""
    known = {f.name for f in dataclasses.fields(CacheSettings)}
    if args.stale_while_busy and "stale_while_busy" in known:
        return {"stale_while_busy": args.stale_while_busy}
    return {}


def classes_settings(
    upstream: str, state_dir: str, args: argparse.Namespace, redis_url: str = ""
) -> Settings:
    """The budget-classes workload: no cache rule, batch and interactive callers (their
    priority and the reserve only where this proxy knows them: the code before classes runs
    the same workload class-blind)."""
    base = settings_for(upstream, state_dir, args, redis_url)
    fields = {f.name for f in dataclasses.fields(CallerSettings)}
    callers = {}
    for name, n, priority in (
        ("batch", args.batch, "batch"),
        ("till", args.interactive, "interactive"),
    ):
        for i in range(n):
            extra = {"priority": priority} if "priority" in fields else {}
            callers[f"{name}{i}"] = CallerSettings(
                key=Secret(class_key(name, i)),
                account="main",
                **extra,  # type: ignore[arg-type]
            )
    known = {f.name for f in dataclasses.fields(BudgetSettings)}
    budget = BudgetSettings()
    if args.reserve and "reserve" in known:
        budget = BudgetSettings(reserve=args.reserve)
    if args.headroom is not None and "headroom" in known:
        budget = dataclasses.replace(budget, headroom=args.headroom)
    return dataclasses.replace(base, callers=callers, cache=CacheSettings(rules=()), budget=budget)


def class_key(name: str, i: int) -> str:
    return f"fleet-{name}-key-{i:03d}-0000"


async def walk(
    session: aiohttp.ClientSession, base: str, i: int, until: float, tally: Tally
) -> None:
    """A nightly sync: the whole customer list, again and again."""
    headers = {
        "X-Proxy-Key": class_key("batch", i),
        "X-Proxy-All-Pages": "1",
        "X-Proxy-Priority": "batch",
    }
    while time.monotonic() < until:
        pause = 0.1
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with session.get(f"{base}{COMPANY}/customers.json", headers=headers) as r:
                await r.read()
                tally.batch_statuses[r.status] += 1
                if r.status == 429:  # as a well-behaved sync would: wait as told
                    pause = max(pause, float(r.headers.get("Retry-After", "1") or 1))
        await asyncio.sleep(min(pause, max(0.0, until - time.monotonic())))


async def read_new(
    session: aiohttp.ClientSession,
    base: str,
    i: int,
    orders: list[int],
    until: float,
    args: argparse.Namespace,
    tally: Tally,
) -> None:
    """A till: one order it has not seen before, at random intervals (Poisson arrivals)."""
    rnd = random.Random(args.seed * 1000 + 500 + i)
    per_caller = (args.interactive_rate or args.limit / 2) / 60 / args.interactive
    headers = {"X-Proxy-Key": class_key("till", i)}
    await asyncio.sleep(rnd.expovariate(per_caller))
    while time.monotonic() < until:
        order = orders.pop()
        started = time.monotonic()
        async with session.get(f"{base}{COMPANY}/orders/{order}.json", headers=headers) as r:
            await r.read()
            tally.statuses[r.status] += 1
        tally.waits.append(time.monotonic() - started)
        await asyncio.sleep(rnd.expovariate(per_caller))


def key(i: int) -> str:
    return f"fleet-caller-key-{i:03d}"


async def poll(
    session: aiohttp.ClientSession,
    base: str,
    caller: int,
    ids: dict[str, list[int]],
    until: float,
    args: argparse.Namespace,
    tally: Tally,
) -> None:
    rnd = random.Random(args.seed * 1000 + caller)
    headers = {"X-Proxy-Key": key(caller)}
    await asyncio.sleep(rnd.uniform(0, args.interval))
    while time.monotonic() < until:
        kind = rnd.choice(LISTS)
        record = rnd.random() >= 0.4
        if not record:
            path = f"{COMPANY}/{kind}.json"
        else:
            path = f"{COMPANY}/{kind}/{rnd.choice(ids[kind][: args.hot])}.json"
        started = time.monotonic()
        async with session.get(base + path, headers=headers) as r:
            await r.read()
            tally.statuses[r.status] += 1
            tally.cache[r.headers.get("X-Cache", "-")] += 1
            age = float(r.headers.get("Age", "0") or 0)
            tally.ages.append(age)
        tally.waits.append(time.monotonic() - started)
        if record:
            tally.record_waits.append(tally.waits[-1])
            tally.record_ages.append(age)
        await asyncio.sleep(rnd.uniform(0.5, 1.5) * args.interval)


async def sample(
    counts: list[int],
    served: object,
    until: float,
    state: SandboxState,
    refused: list[int],
    by_path: object = None,
    tally: Any = None,
) -> None:
    """The sandbox's request count (and its 401s) once a second (for per-minute and
    sliding-window rates), and with ``by_path`` its counts by path (when each record reached
    Kounta)."""
    while time.monotonic() < until + 1:
        counts.append(served())  # type: ignore[operator]
        refused.append(state.statuses().get(401, 0))
        if by_path is not None:
            tally.by_path.append(by_path())  # type: ignore[operator]
        await asyncio.sleep(1.0)


def record_gaps(snapshots: list[dict[str, int]]) -> tuple[list[float], int]:
    """For each single record that reached Kounta at least twice: the longest time (s, at the
    one-second sampling) between two of its upstream requests; and how many reached it once
    (within the run)."""
    gaps, once = [], 0
    paths = {p for snap in snapshots for p in snap if p.startswith("GET ") and _is_record(p)}
    for path in paths:
        seen = [i for i in range(1, len(snapshots)) if
                snapshots[i].get(path, 0) > snapshots[i - 1].get(path, 0)]  # fmt: skip
        if len(seen) < 2:
            once += len(seen)
            continue
        gaps.append(float(max(b - a for a, b in itertools.pairwise(seen))))
    return sorted(gaps), once


def _is_record(key: str) -> bool:
    tail = key.rsplit("/", 1)[-1].removesuffix(".json")
    return tail.isdigit()


@contextlib.contextmanager
def own_redis(directory: str, unix: str | None = None, nice: int = 0) -> Iterator[str]:
    """A redis-server of the bench's own on a free loopback port, without persistence (and
    on the Unix socket ``unix`` too, when given), at ``nice`` (below 0: before the others)."""
    found = shutil.which("redis-server")
    if found is None:
        raise SystemExit("--replicas needs redis-server (apt-get install redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [found, "--port", str(port), "--bind", "127.0.0.1", "--dir", directory,
            "--save", "", "--appendonly", "no"]  # fmt: skip
    if unix is not None:
        args += ["--unixsocket", unix, "--unixsocketperm", "700"]
    if nice:
        args = ["nice", "-n", str(nice), *args]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            time.sleep(0.025)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


async def run(args: argparse.Namespace) -> Tally:
    configure(level=os.environ.get("FLEET_LOG", "error"))
    sandbox_app = create_sandbox_app(sandbox_config(args))
    state = sandbox_app[SANDBOX_STATE]
    sandbox = await start(sandbox_app, "127.0.0.1", 0, 1.0)
    upstream = f"http://127.0.0.1:{bound_port(sandbox)}"
    ids = {kind: sorted(state.store[kind].records) for kind in LISTS}
    tally = Tally()
    counts: list[int] = []
    refused: list[int] = []
    with tempfile.TemporaryDirectory() as state_dir, contextlib.ExitStack() as stack:
        redis_url = args.redis_url
        if processes(args) > 1 and not redis_url:
            redis_url = stack.enter_context(own_redis(state_dir))
        registries = [CollectorRegistry() for _ in range(processes(args))]
        proxies: list[web.AppRunner] = []
        make = classes_settings if classes(args) else settings_for
        for i, registry in enumerate(registries):
            settings = make(upstream, f"{state_dir}/replica{i}", args, redis_url)
            proxies.append(await start(create_app(settings, registry=registry), "127.0.0.1", 0, 1))
        bases = [f"http://127.0.0.1:{bound_port(p)}" for p in proxies]
        began = time.monotonic()
        until = began + args.seconds
        connector = aiohttp.TCPConnector(limit=args.callers * 2)
        try:
            async with aiohttp.ClientSession(connector=connector) as session:
                by_path = None if classes(args) else state.served_by_path
                sampler = asyncio.create_task(
                    sample(counts, state.served, until, state, refused, by_path, tally)
                )
                if classes(args):
                    orders = list(reversed(ids["orders"]))
                    await asyncio.gather(
                        *(walk(session, bases[i % len(bases)], i, until, tally)
                          for i in range(args.batch)),
                        *(read_new(session, bases[(args.batch + i) % len(bases)], i, orders,
                                   until, args, tally)
                          for i in range(args.interactive)),
                    )  # fmt: skip
                else:
                    await asyncio.gather(
                        *(
                            poll(session, bases[i % len(bases)], i, ids, until, args, tally)
                            for i in range(args.callers)
                        )
                    )
                await sampler
                tally.elapsed = time.monotonic() - began  # callers' last requests included
        finally:
            tally.redis_calls = sum(_redis_calls(r) for r in registries)
            tally.wait_buckets = _wait_buckets(registries)
            for proxy in proxies:
                await proxy.cleanup()
            await sandbox.cleanup()
    if classes(args):
        report_classes(args, tally, counts, state.statuses())
    else:
        report(args, tally, counts, state.statuses())
    if args.token_ttl:
        report_tokens(args, refused, sandbox_app[SANDBOX_OAUTH], tally.elapsed)
    return tally


def classes(args: argparse.Namespace) -> bool:
    return bool(args.batch or args.interactive)


def _wait_buckets(registries: list[CollectorRegistry]) -> list[tuple[float, float]]:
    """The interactive class's budget-wait buckets over every replica (cumulative counts);
    empty on a proxy without classes."""
    summed: dict[float, float] = {}
    for registry in registries:
        for metric in registry.collect():
            if metric.name != "kounta_proxy_budget_wait_seconds":
                continue
            for s in metric.samples:
                if s.name.endswith("_bucket") and s.labels.get("class") == "interactive":
                    bound = float(s.labels["le"])
                    summed[bound] = summed.get(bound, 0.0) + s.value
    return sorted(summed.items())


def bucket_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """histogram_quantile over cumulative buckets (linear within a bucket), as Prometheus."""
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (
                (rank - below) / (count - below) if count > below else 0
            )
        lower, below = bound, count
    return lower


def report_classes(
    args: argparse.Namespace, tally: Tally, counts: list[int], upstream: dict[int, int]
) -> None:
    sent = counts[-1] if counts else 0
    allowed = args.limit * args.seconds / 60
    waits = sorted(tally.waits) or [0.0]
    asked = args.interactive_rate or args.limit / 2
    p50, p99 = bucket_quantile(tally.wait_buckets, 0.5), bucket_quantile(tally.wait_buckets, 0.99)
    metric = f"p50 {p50:.3f}, p99 {p99:.3f}" if p50 is not None and p99 is not None else "n/a"
    print(
        f"classes: {args.batch} batch walker(s), {args.interactive} interactive caller(s) asking "
        f"{asked:g}/min, {args.seconds:g}s, sandbox limit {args.limit}/min, reserve "
        f"{args.reserve:g}, headroom {'default' if args.headroom is None else args.headroom}, "
        f"{args.replicas} replica(s) x {args.workers} worker(s)"
    )
    print(f"interactive requests:   {len(tally.waits)} {dict(sorted(tally.statuses.items()))}")
    print(f"interactive wait (metric, budget):  {metric}")
    print(
        f"interactive wait (callers' clock):  p50 {_pct(waits, 50):.3f}, "
        f"p99 {_pct(waits, 99):.3f}, max {waits[-1]:.3f}"
    )
    print(f"batch walks:            {dict(sorted(tally.batch_statuses.items()))}")
    print(
        f"upstream requests:      {sent} ({sent / allowed:.1%} of the limit over the run, "
        f"{sent / args.seconds * 60:.0f}/min)"
    )
    print(f"429s from the sandbox:  {upstream.get(429, 0)}")


def report_tokens(
    args: argparse.Namespace, refused: list[int], oauth: SandboxAuthServer, elapsed: float
) -> None:
    """Upstream 401s (in all, and per 10 s of the run) and token requests."""
    per = [b - a for a, b in zip(refused[:-10:10], refused[10::10], strict=True)]
    ideal = elapsed / (args.token_ttl / 2)
    rotation = "rotating" if args.rotate_refresh else "fixed"
    print(f"access tokens:          live {args.token_ttl:g}s, {rotation} refresh tokens")
    print(f"upstream 401s:          {refused[-1] if refused else 0} (per 10 s: {per or '-'})")
    print(
        f"token requests:         {oauth.token_requests} (run time {elapsed:.0f}s / half the "
        f"lifetime: {ideal:.1f}; spent refresh tokens presented: {oauth.counters.spent_refresh})"
    )


def _redis_calls(registry: CollectorRegistry) -> float:
    return sum(
        sample.value
        for metric in registry.collect()
        if metric.name == "kounta_proxy_shared_calls"
        for sample in metric.samples
        if sample.name.endswith("_total")
    )


def report(
    args: argparse.Namespace, tally: Tally, counts: list[int], upstream: dict[int, int]
) -> None:
    total = sum(tally.statuses.values())
    sent = counts[-1] if counts else 0
    minutes = [counts[i + 60] - counts[i] for i in range(0, len(counts) - 60, 60)]
    windows = [counts[i + 60] - counts[i] for i in range(len(counts) - 60)]
    busiest = max(windows) if windows else sent
    ages = sorted(tally.ages) or [0.0]
    waits = sorted(tally.waits) or [0.0]
    print(
        f"fleet: {args.callers} callers, one poll each ~{args.interval:g}s, {args.seconds:g}s, "
        f"sandbox limit {args.limit}/min, cache fresh_for {args.fresh_for:g}s, "
        f"{args.replicas} replica(s) x {args.workers} worker(s)"
    )
    print(f"caller requests:        {total} ({total / args.seconds * 60:.0f}/min asked)")
    print(f"upstream requests:      {sent} ({sent / args.seconds * 60:.0f}/min on average)")
    print(f"  per full minute:      {minutes or '-'}")
    print(f"  most in any 60 s:     {busiest} (limit {args.limit})")
    print(f"429s seen by callers:   {tally.statuses.get(429, 0)}")
    print(f"429s from the sandbox:  {upstream.get(429, 0)}")
    print(f"caller statuses:        {dict(sorted(tally.statuses.items()))}")
    print(f"served as (X-Cache):    {dict(tally.cache.most_common())}")
    print(
        f"data age (Age, s):      mean {statistics.fmean(ages):.1f}, "
        f"p50 {_pct(ages, 50):.0f}, p95 {_pct(ages, 95):.0f}, max {ages[-1]:.0f}"
    )
    print(
        f"caller wait (s):        p50 {_pct(waits, 50):.3f}, p95 {_pct(waits, 95):.3f}, "
        f"p99 {_pct(waits, 99):.3f}, max {waits[-1]:.3f}"
    )
    if tally.record_waits:
        rw, ra = sorted(tally.record_waits), sorted(tally.record_ages)
        print(
            f"records: caller wait:  p50 {_pct(rw, 50):.3f}, p99 {_pct(rw, 99):.3f} s; "
            f"data age p50 {_pct(ra, 50):.0f}, p99 {_pct(ra, 99):.0f}, max {ra[-1]:.0f} s "
            f"(stale_while_busy {args.stale_while_busy:g}, fresh_for {args.fresh_for:g})"
        )
    gaps, once = record_gaps(tally.by_path)
    if gaps:
        print(
            f"records' longest gap between two upstream requests: p50 {_pct(gaps, 50):.0f}, "
            f"p99 {_pct(gaps, 99):.0f}, max {gaps[-1]:.0f} s ({len(gaps)} records reached "
            f"Kounta twice or more, {once} once)"
        )
    if processes(args) > 1:
        per = tally.redis_calls / total if total else 0.0
        per_upstream = tally.redis_calls / sent if sent else 0.0
        print(
            f"redis round trips:      {tally.redis_calls:.0f} ({per:.2f} per caller request, "
            f"{per_upstream:.2f} per upstream request; token/health probes included)"
        )


def _pct(values: list[float], pct: int) -> float:
    return values[min(len(values) - 1, len(values) * pct // 100)]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--webhooks" in argv:  # the webhooks scenario (bench/fleet_webhooks.py)
        from bench import fleet_webhooks

        return fleet_webhooks.main([a for a in argv if a != "--webhooks"])
    args = arguments(argv)
    if args.processes:  # the fleet in its real shape
        from bench import fleet_processes

        tally = asyncio.run(fleet_processes.run_processes(args))
    else:
        tally = asyncio.run(run(args))
    return 1 if tally.statuses.get(429, 0) else 0


if __name__ == "__main__":
    raise SystemExit(main())
