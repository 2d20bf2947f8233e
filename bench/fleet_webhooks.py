"""Webhooks at fleet scale (issue 19): freshness pushed by Kounta instead of revalidation.

    python -m bench.fleet --webhooks [--seconds 60] [--callers 20] [--replicas 3]
                                     [--demand 10] [--change-every 5] [--drop 0]
                                     [--verify-every 0] [--distrust-for 600]
                                     [--delivery-grace 10] [--fallback-fresh-for 0]
                                     [--products 200] [--refetch]

Workload: the sandbox (180 requests a minute, as Kounta) with a webhook registered for
``products/updated`` at replica 0's webhook listener; ``--replicas`` proxies sharing one
budget and cache in a redis-server of the bench's own, each with the rule
``/v1/companies/*/products*`` ``fresh_for = 3600``, ``webhooks = true`` (``verify_every =
0``: every upstream request below is a caller's). 200 products are read once through every
replica first (warm-up, excluded from the figures). Then ``--callers`` callers ask
``--demand`` times the sandbox's limit in all, spread over the replicas, reading single
products (and one list page in ten, measured apart), while one product is changed at a
till (``/_sandbox/touch``: no proxy sees it) every ``--change-every`` seconds. A prober
reads each changed product through every replica until all show the change.

With ``--drop`` (the sandbox drops that share of deliveries) and ``--verify-every`` (the
verifier's period; 0: off), it also measures feed health: when every replica marked the
feed unhealthy (from the start of the measured window), and, from then on, the answers
older than ``--fallback-fresh-for`` allows (a version older than the newest one changed
more than fallback_fresh_for + 2 s before; target 0), and prints the bound a user can rely
on (detection time + fallback_fresh_for). The verifier's requests are counted apart, and
so are the refetcher's with ``--refetch`` (``webhooks.refetch``: a changed product read lately
is fetched again in the background, so the next reader gets a HIT). ``--no-probe`` leaves the
prober out: its reads make a changed product the newest read, which a verifier picking the
newest read checks first, so it would find a lost change by luck.

Prints, over the measured window: upstream requests per caller request, caller latency
(records and list pages apart), time from each change to the first answer showing it
through every replica (p50/p99/max) and from its delivery to that (p99), and the answers
that showed a version older than the newest one changed more than 2 s before (target 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from cryptography.fernet import Fernet
from prometheus_client import CollectorRegistry

from bench.fleet import own_redis
from proxy.edge.app import create_app
from proxy.edge.services import SERVICES
from proxy.listener import bound_port, start
from proxy.logs import configure
from proxy.ops.lifecycle import start_webhooks
from proxy.sandbox import SANDBOX_STATE, SandboxConfig, SandboxState, create_sandbox_app
from proxy.sandbox.webhooks import SANDBOX_HOOKS
from proxy.settings import (
    AccountSettings,
    CacheRule,
    CacheSettings,
    LogSettings,
    Secret,
    ServerSettings,
    Settings,
    SharedSettings,
    UpstreamSettings,
    WebhookSettings,
)

TOKEN = "sandbox-token"
COMPANY = "/v1/companies/5001"
PRODUCTS = 200
SECRET = "fleet-webhook-secret-0123456789"
# Every replica of one run shares it (Redis records are authenticated with a key from it).
TOKEN_KEY = Fernet.generate_key().decode()
TOLERANCE = 2.0  # seconds: a change older than this must be visible in every answer


@dataclass
class Figures:
    record_waits: list[float] = field(default_factory=list)
    list_waits: list[float] = field(default_factory=list)
    callers: int = 0
    stale: int = 0
    # product -> [(changed at, updated_at)], oldest first
    changes: dict[int, list[tuple[float, str]]] = field(default_factory=dict)
    visible: list[float] = field(default_factory=list)  # change -> every replica shows it
    delivered: list[float] = field(default_factory=list)  # delivery -> every replica shows it
    # Feed health (--drop): when every replica distrusted the feed (monotonic; 0: not yet),
    # and the record answers read after that which fallback_fresh_for does not allow.
    unhealthy_at: float = 0.0
    stale_after: int = 0
    answers_after: int = 0
    cache: dict[str, int] = field(default_factory=dict)


def arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet --webhooks")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--callers", type=int, default=20)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--demand", type=float, default=10.0, help="times the sandbox limit")
    parser.add_argument("--limit", type=int, default=180)
    parser.add_argument("--change-every", type=float, default=5.0)
    parser.add_argument(
        "--drop", "--drop-rate", dest="drop_rate", type=float, default=0.0,
        help="the share of deliveries the sandbox drops (0..1)",
    )  # fmt: skip
    parser.add_argument("--verify-every", type=float, default=0.0, help="0: no verifier")
    parser.add_argument("--distrust-for", type=float, default=600.0)
    parser.add_argument("--delivery-grace", type=float, default=10.0)
    parser.add_argument("--fallback-fresh-for", type=float, default=0.0)
    parser.add_argument("--refetch", action="store_true", help="webhooks.refetch = true")
    parser.add_argument("--products", type=int, default=PRODUCTS, help="pre-warmed and read")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--no-probe", dest="probe", action="store_false",
        help="no prober (its reads make a changed product the newest read, the verifier's pick)",
    )  # fmt: skip
    return parser.parse_args(argv)


def settings_for(
    upstream: str, state_dir: str, redis_url: str, prefix: str, n: int, args: argparse.Namespace
) -> Settings:
    rule = CacheRule(
        path="/v1/companies/*/products*", fresh_for=3600, webhooks=True,
        fallback_fresh_for=args.fallback_fresh_for,
    )  # fmt: skip
    return Settings(
        state_dir=state_dir,
        server=ServerSettings(host="127.0.0.1", port=0),
        upstream=UpstreamSettings(base_url=upstream),
        log=LogSettings(level="warning"),
        accounts={"main": AccountSettings(mode="static", token=Secret(TOKEN))},
        cache=CacheSettings(rules=(rule,)),
        shared=SharedSettings(
            backend="redis",
            url=redis_url,
            key_prefix=prefix,
            replicas=n,
            token_key=Secret(TOKEN_KEY),
        ),
        webhooks=WebhookSettings(
            enabled=True,
            port=0,
            secret=Secret(SECRET),
            verify_every=args.verify_every,
            distrust_for=args.distrust_for,
            refetch=args.refetch,
            delivery_grace=args.delivery_grace,
        ),
    )


async def read(session: aiohttp.ClientSession, url: str) -> tuple[str, Any]:
    async with session.get(url) as r:
        body = await r.read()
        return r.headers.get("X-Cache", "-"), json.loads(body) if r.status == 200 else None


async def caller(
    session: aiohttp.ClientSession, base: str, ids: list[int], i: int, until: float,
    pause: float, figures: Figures, fallback: float,
) -> None:  # fmt: skip
    rnd = random.Random(i)
    await asyncio.sleep(rnd.uniform(0, pause))
    while time.monotonic() < until:
        listing = rnd.random() < 0.1
        product = rnd.choice(ids)
        path = f"{COMPANY}/products.json" if listing else f"{COMPANY}/products/{product}.json"
        started = time.monotonic()
        cache, body = await read(session, base + path)
        waited = time.monotonic() - started
        figures.callers += 1
        figures.cache[cache] = figures.cache.get(cache, 0) + 1
        if listing:
            figures.list_waits.append(waited)
        else:
            figures.record_waits.append(waited)
            shown = str(body.get("updated_at")) if body is not None else None
            if shown is not None and _older(figures, product, shown, started):
                figures.stale += 1
            if shown is not None and figures.unhealthy_at and started > figures.unhealthy_at:
                figures.answers_after += 1
                if _older(figures, product, shown, started, fallback + TOLERANCE):
                    figures.stale_after += 1
        await asyncio.sleep(rnd.uniform(0.5, 1.5) * pause)


def _older(
    figures: Figures, product: int, shown: str, asked: float, tolerance: float = TOLERANCE
) -> bool:
    """Whether ``shown`` is older than the newest version changed ``tolerance`` s before."""
    due = [v for at, v in figures.changes.get(product, []) if at < asked - tolerance]
    return bool(due) and shown < due[-1]


async def changer(
    session: aiohttp.ClientSession, sandbox: str, bases: list[str], ids: list[int],
    until: float, every: float, figures: Figures, state: SandboxState, log: list[dict[str, Any]],
    probing: bool = True,
) -> None:  # fmt: skip
    rnd = random.Random(99)
    probes: list[asyncio.Task[None]] = []
    while time.monotonic() + every < until:
        await asyncio.sleep(every)
        product = rnd.choice(ids)
        changed = time.monotonic()
        wall = time.time()
        async with session.post(
            f"{sandbox}/_sandbox/touch", json={"kind": "products", "id": product}
        ) as r:
            assert r.status == 204
        version = str(state.store["products"].records[product]["updated_at"])
        figures.changes.setdefault(product, []).append((changed, version))
        if probing:
            probes.append(
                asyncio.create_task(
                    probe(session, bases, product, version, (changed, wall), figures, log)
                )
            )
    await asyncio.gather(*probes)


async def probe(
    session: aiohttp.ClientSession, bases: list[str], product: int, version: str,
    when: tuple[float, float], figures: Figures, log: list[dict[str, Any]],
) -> None:  # fmt: skip
    """Read the changed product through every replica until all show ``version``; ``when``:
    the change's monotonic and wall times."""
    changed, wall = when
    path = f"{COMPANY}/products/{product}.json"
    pending = set(bases)
    while pending and time.monotonic() - changed < 30:
        for base in list(pending):
            _, body = await read(session, base + path)
            if body is not None and body.get("updated_at") == version:
                pending.discard(base)
        await asyncio.sleep(0.01)
    if pending:
        figures.visible.append(float("inf"))
        return
    figures.visible.append(time.monotonic() - changed)
    seen = time.time()
    sent = [
        e["at"]
        for e in log
        if e.get("id") == product and e["at"] >= wall - 0.01 and e["outcome"] == "delivered"
    ]
    if sent:  # the sandbox logs when it sent each delivery
        figures.delivered.append(seen - min(sent))


async def health(apps: list[web.Application], until: float, figures: Figures) -> None:
    """Note when every replica distrusts the feed (each reads the mark in Redis once a
    second), polled every 50 ms."""
    feeds = [app[SERVICES].cache.feeds for app in apps]  # type: ignore[union-attr]
    while time.monotonic() < until and not figures.unhealthy_at:
        if not any(f.healthy("main") for f in feeds):
            figures.unhealthy_at = time.monotonic()
        await asyncio.sleep(0.05)


async def run(args: argparse.Namespace) -> Figures:
    configure(level=os.environ.get("FLEET_LOG", "error"))
    sandbox_app = create_sandbox_app(SandboxConfig(rate_per_minute_bearer=args.limit))
    state = sandbox_app[SANDBOX_STATE]
    hooks_state = sandbox_app[SANDBOX_HOOKS]
    hooks_state.behaviour.drop_rate = args.drop_rate
    sandbox = await start(sandbox_app, "127.0.0.1", 0, 1.0)
    upstream = f"http://127.0.0.1:{bound_port(sandbox)}"
    ids = sorted(state.store["products"].records)[: args.products]
    figures = Figures()
    prefix = f"fleet-webhooks-{time.time_ns()}"
    runners: list[web.AppRunner] = []
    with tempfile.TemporaryDirectory() as state_dir, contextlib.ExitStack() as stack:
        redis_url = stack.enter_context(own_redis(state_dir))
        apps = []
        for i in range(args.replicas):
            settings = settings_for(
                upstream, f"{state_dir}/r{i}", redis_url, prefix, args.replicas, args
            )
            app = create_app(settings, registry=CollectorRegistry())
            runners.append(await start(app, "127.0.0.1", 0, 1))
            apps.append(app)
        listener = await start_webhooks(apps[0][SERVICES])
        assert listener is not None
        runners.append(listener)
        bases = [f"http://127.0.0.1:{bound_port(r)}" for r in runners[: args.replicas]]
        try:
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=args.callers * 3)
            ) as session:
                address = f"http://127.0.0.1:{bound_port(listener)}/webhooks/kounta/main"
                async with session.post(
                    f"{upstream}{COMPANY}/webhooks",
                    json={"topic": "products/updated", "address": address,
                          "headers": {"Authorization": f"Bearer {SECRET}"}},
                    headers={"Authorization": f"Bearer {TOKEN}"},
                ) as r:  # fmt: skip
                    assert r.status == 201, await r.text()
                for base in bases:  # warm-up, excluded
                    for product in ids:
                        await read(session, f"{base}{COMPANY}/products/{product}.json")
                    await read(session, f"{base}{COMPANY}/products.json")
                before = state.served()
                checks_before = verifications(apps)
                refetched_before = refetches(apps)
                started = time.monotonic()
                until = started + args.seconds
                per_second = args.demand * args.limit / 60
                pause = args.callers / per_second
                tasks = [
                    caller(session, bases[i % len(bases)], ids, i, until, pause, figures,
                           args.fallback_fresh_for)
                    for i in range(args.callers)
                ]  # fmt: skip
                tasks.append(health(apps, until, figures))
                tasks.append(
                    changer(session, upstream, bases, ids, until, args.change_every, figures,
                            state, hooks_state.log, args.probe)
                )  # fmt: skip
                await asyncio.gather(*tasks)
                figures.cache["upstream"] = state.served() - before
                figures.cache["verifier"] = verifications(apps) - checks_before
                figures.cache["refetch"] = refetches(apps) - refetched_before
                figures.cache["dropped"] = sum(
                    1 for e in hooks_state.log if e.get("outcome") == "dropped"
                )
                if figures.unhealthy_at:
                    figures.unhealthy_at -= started
        finally:
            for runner in reversed(runners):
                await runner.cleanup()
            await sandbox.cleanup()
    report(args, figures)
    return figures


def verifications(apps: list[web.Application]) -> int:
    """The verifiers' upstream requests so far (their checks that asked Kounta)."""
    name = "kounta_proxy_webhook_verifications_total"
    return _sum(apps, name, "result", ("unchanged", "changed", "missed", "listed", "suspect"))


def refetches(apps: list[web.Application]) -> int:
    """The refetchers' upstream requests so far (webhooks.refetch)."""
    return _sum(apps, "kounta_proxy_webhook_refetches_total", "outcome", ("fetched",))


def _sum(apps: list[web.Application], name: str, label: str, values: tuple[str, ...]) -> int:
    total = 0.0
    for app in apps:
        registry = app[SERVICES].metrics.registry
        for value in values:
            total += registry.get_sample_value(name, {"account": "main", label: value}) or 0.0
    return int(total)


def _pct(values: list[float], pct: int) -> float:
    ordered = sorted(values) or [0.0]
    return ordered[min(len(ordered) - 1, len(ordered) * pct // 100)]


def report(args: argparse.Namespace, f: Figures) -> None:
    upstream = f.cache.pop("upstream", 0)
    checks = f.cache.pop("verifier", 0)
    refetched = f.cache.pop("refetch", 0)
    dropped = f.cache.pop("dropped", 0)
    upstream -= checks + refetched  # the verifier's and the refetcher's, counted apart
    print(
        f"webhooks fleet: {args.callers} callers over {args.replicas} replicas asking "
        f"{args.demand:g}x the sandbox limit ({args.limit}/min), {args.products} products "
        f"pre-warmed, a change every {args.change_every:g}s, drop rate {args.drop_rate:g}, "
        f"{args.seconds:g}s"
    )
    ratio = upstream / f.callers if f.callers else 0.0
    print(f"caller requests:          {f.callers} ({f.callers / args.seconds * 60:.0f}/min)")
    print(f"upstream requests:        {upstream} ({ratio:.3f} per caller request)")
    if args.verify_every:
        print(f"verifier requests:        {checks} (apart; every {args.verify_every:g}s)")
    if args.refetch:
        print(f"refetch requests:         {refetched} (apart; webhooks.refetch)")
    print(f"served as (X-Cache):      {dict(sorted(f.cache.items()))}")
    for name, waits in (("records", f.record_waits), ("list pages", f.list_waits)):
        print(
            f"caller latency, {name + ' (ms):':14}p50 {_pct(waits, 50) * 1000:.1f}, "
            f"p99 {_pct(waits, 99) * 1000:.1f}"
        )
    p50, p99, top = _pct(f.visible, 50), _pct(f.visible, 99), max(f.visible, default=0)
    print(
        f"change -> every replica:  p50 {p50:.3f}s, p99 {p99:.3f}s, max {top:.3f}s "
        f"over {len(f.visible)} changes"
    )
    print(
        f"delivery -> visible:      p99 {_pct(f.delivered, 99):.3f}s ({len(f.delivered)} delivered)"
    )
    print(f"answers older than a change {TOLERANCE:g}s old: {f.stale}")
    if args.drop_rate:
        health_report(args, f, dropped)


def health_report(args: argparse.Namespace, f: Figures, dropped: int) -> None:
    print(f"deliveries dropped:       {dropped}")
    if not f.unhealthy_at:
        print(f"feed marked unhealthy:    not within {args.seconds:g}s")
        return
    fallback = args.fallback_fresh_for
    print(f"feed marked unhealthy:    {f.unhealthy_at:.1f}s into the window (every replica)")
    print(
        f"answers after that older than fallback_fresh_for ({fallback:g}s) + {TOLERANCE:g}s "
        f"allow: {f.stale_after} of {f.answers_after}"
    )
    print(
        f"bound a user can rely on (this run): detection {f.unhealthy_at:.1f}s + "
        f"fallback_fresh_for {fallback:g}s = {f.unhealthy_at + fallback:.1f}s "
        f"(verify_every {args.verify_every:g}s, distrust_for {args.distrust_for:g}s)"
    )


def main(argv: list[str]) -> int:
    args = arguments(argv)
    figures = asyncio.run(run(args))
    if args.drop_rate:  # stale answers before detection are what is measured
        return 1 if figures.stale_after or not figures.unhealthy_at else 0
    return 1 if figures.stale else 0
