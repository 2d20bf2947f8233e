"""A fleet of callers polling Kounta through the proxy, against the sandbox's real limit.

    python -m bench.fleet [--seconds 120] [--callers 12] [--interval 2.0] [--fresh-for 5]

Starts the sandbox (180 requests a minute per token, as Kounta) and the proxy in
front of it on loopback ports, then lets ``--callers`` simulated services poll list
pages and single records, each waiting about ``--interval`` seconds between
requests, for ``--seconds``. Together they ask for more than Kounta allows; the
proxy's cache and rate budget have to make that work. Prints:

- upstream requests per minute (each full minute, and the most in any 60 s window),
- 429s seen by callers (target 0) and 429s Kounta itself answered,
- the age of the data callers got (the ``Age`` header; 0 for answers fresh from Kounta),
- how the answers were served (X-Cache) and how long callers waited.

Exits 1 when any caller saw a 429. Also ``python -m bench.run --fleet [options]``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp

from proxy.edge.app import create_app
from proxy.listener import bound_port, start
from proxy.logs import configure
from proxy.sandbox import SANDBOX_STATE, SandboxConfig, create_sandbox_app
from proxy.settings import (
    AccountSettings,
    CacheRule,
    CacheSettings,
    CallerSettings,
    LogSettings,
    Secret,
    ServerSettings,
    Settings,
    UpstreamSettings,
)

TOKEN = "sandbox-token"  # the sandbox's well-known dummy token
COMPANY = "/v1/companies/5001"
LISTS = ("products", "customers", "orders")
HOT_RECORDS = 40  # records per kind that the fleet keeps asking about


@dataclass
class Tally:
    statuses: Counter[int] = field(default_factory=Counter)
    cache: Counter[str] = field(default_factory=Counter)
    ages: list[float] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)


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
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.callers < 1 or args.interval <= 0:
        parser.error("--seconds, --callers and --interval must be positive")
    return args


def settings_for(upstream: str, state_dir: str, args: argparse.Namespace) -> Settings:
    rules = (CacheRule(path="/v1/*", fresh_for=args.fresh_for, stale_if_error=300.0),)
    return Settings(
        state_dir=state_dir,
        server=ServerSettings(host="127.0.0.1", port=0),
        upstream=UpstreamSettings(base_url=upstream),
        log=LogSettings(level="warning"),
        accounts={"main": AccountSettings(mode="static", token=Secret(TOKEN))},
        callers={
            f"service{i}": CallerSettings(key=Secret(key(i)), account="main")
            for i in range(args.callers)
        },
        cache=CacheSettings(rules=rules),
    )


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
        if rnd.random() < 0.4:
            path = f"{COMPANY}/{kind}.json"
        else:
            path = f"{COMPANY}/{kind}/{rnd.choice(ids[kind][:HOT_RECORDS])}.json"
        started = time.monotonic()
        async with session.get(base + path, headers=headers) as r:
            await r.read()
            tally.statuses[r.status] += 1
            tally.cache[r.headers.get("X-Cache", "-")] += 1
            tally.ages.append(float(r.headers.get("Age", "0") or 0))
        tally.waits.append(time.monotonic() - started)
        await asyncio.sleep(rnd.uniform(0.5, 1.5) * args.interval)


async def sample(counts: list[int], served: object, until: float) -> None:
    """The sandbox's request count once a second (for per-minute and sliding-window rates)."""
    while time.monotonic() < until + 1:
        counts.append(served())  # type: ignore[operator]
        await asyncio.sleep(1.0)


async def run(args: argparse.Namespace) -> Tally:
    configure(level="error")
    sandbox_app = create_sandbox_app(SandboxConfig(rate_per_minute_bearer=args.limit))
    state = sandbox_app[SANDBOX_STATE]
    sandbox = await start(sandbox_app, "127.0.0.1", 0, 1.0)
    upstream = f"http://127.0.0.1:{bound_port(sandbox)}"
    ids = {kind: sorted(state.store[kind].records) for kind in LISTS}
    tally = Tally()
    counts: list[int] = []
    with tempfile.TemporaryDirectory() as state_dir:
        proxy = await start(
            create_app(settings_for(upstream, state_dir, args)), "127.0.0.1", 0, 1.0
        )
        base = f"http://127.0.0.1:{bound_port(proxy)}"
        until = time.monotonic() + args.seconds
        connector = aiohttp.TCPConnector(limit=args.callers * 2)
        try:
            async with aiohttp.ClientSession(connector=connector) as session:
                sampler = asyncio.create_task(sample(counts, state.served, until))
                await asyncio.gather(
                    *(poll(session, base, i, ids, until, args, tally) for i in range(args.callers))
                )
                await sampler
        finally:
            await proxy.cleanup()
            await sandbox.cleanup()
    report(args, tally, counts, state.statuses())
    return tally


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
        f"sandbox limit {args.limit}/min, cache fresh_for {args.fresh_for:g}s"
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
        f"max {waits[-1]:.3f}"
    )


def _pct(values: list[float], pct: int) -> float:
    return values[min(len(values) - 1, len(values) * pct // 100)]


def main(argv: list[str] | None = None) -> int:
    tally = asyncio.run(run(arguments(argv)))
    return 1 if tally.statuses.get(429, 0) else 0


if __name__ == "__main__":
    raise SystemExit(main())
