"""The long way against the short way, under both event loops, and against nginx.

Four scenarios on one upstream (bench/origin.py): a fresh hit of 8 KB (a cache rule), a
revalidated 8 KB answer (no rule: every request asks the upstream with If-None-Match,
coalesced), a revalidated 500 KB answer, and a caller's own If-None-Match on the revalidated
path answered 304. Each is measured through a proxy on asyncio's loop, a proxy on uvloop and,
when nginx is there (installed with apt like wrk), nginx ``proxy_cache`` configured by
bench/nginx.conf. Every server is started first, pinned to one core (wrk and the upstream on
the other: cache_bench.pin); then ROUNDS interleaved rounds (:func:`round_order`), and per row
the round with the median requests/s (cache_bench's reasoning). The ratios are the result:
revalidated / fresh and INM / fresh within one server (the median of each round's own ratio,
:func:`paired`), upstream requests per caller request, uvloop / asyncio, and req/s and p99
against nginx's.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench import cache_bench
from bench.cache_bench import (
    LOAD,
    SERVER,
    TOKEN,
    Result,
    cpu_seconds,
    free_port,
    process,
    rss_mb,
    wrk,
)

COMPANY = "/v1/companies/5001"
FRESH = f"{COMPANY}/products/1.json"  # fresh for an hour (the proxy's rule, nginx's location)
REVALIDATED = f"{COMPANY}/customers/1.json"  # no rule: asks the upstream every time
LARGE = f"{COMPANY}/big/1.json"  # 500 KB, revalidated
NGINX_CONF = Path(__file__).with_name("nginx.conf")
LOOPS = ("asyncio", "uvloop")
DEFAULT_CONNECTIONS = 32
# Rounds of the comparison: its ratios are medians of each round's own ratio (paired), and
# five pairs move less between runs than three (docs/performance.md, "A steadier comparison").
ROUNDS = 5


@dataclass(frozen=True)
class Scenario:
    key: str
    label: str
    path: str
    inm: bool = False  # send the stored ETag as If-None-Match


SCENARIOS = (
    Scenario("fresh", "fresh hit, 8 KB", FRESH),
    Scenario("reval", "revalidated, 8 KB", REVALIDATED),
    Scenario("large", "revalidated, 500 KB", LARGE),
    Scenario("inm", "caller If-None-Match → 304", REVALIDATED, inm=True),
)


def ensure_nginx() -> str | None:
    """nginx from Debian packages, installed if missing (as root with apt); None: skip it."""
    found = shutil.which("nginx") or (os.path.exists("/usr/sbin/nginx") and "/usr/sbin/nginx")
    if found:
        return found
    if shutil.which("apt-get") and os.geteuid() == 0 and os.environ.get("KOUNTA_DEV_APT") != "0":
        # policy-rc.d or not, the package may start a system nginx; the bench runs its own.
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", "nginx"],
            capture_output=True,
            check=False,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    return (
        shutil.which("nginx") or (os.path.exists("/usr/sbin/nginx") and "/usr/sbin/nginx") or None
    )


def proxy_config(
    directory: Path, upstream: str, port: int, loop: str, log_level: str = "warning"
) -> Path:
    """A proxy on ``loop`` whose rule makes products/* (FRESH) fresh for an hour."""
    return cache_bench.proxy_config(
        directory, upstream, port, True, rule="/v1/companies/*/products/*", event_loop=loop,
        log_level=log_level,
    )  # fmt: skip


def nginx_config(directory: Path, port: int, origin_port: int) -> Path:
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)  # as root nginx's worker is nobody: it must reach its cache
    directory.parent.chmod(0o755)
    text = NGINX_CONF.read_text()
    for name, value in (
        ("DIR", str(directory)),
        ("PORT", str(port)),
        ("ORIGIN_PORT", str(origin_port)),
        ("TOKEN", TOKEN),
    ):
        text = text.replace(f"@{name}@", value)
    path = directory / "nginx.conf"
    path.write_text(text)
    return path


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:  # loopback only
            r.read()
            return r.status, {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}


def served(origin: str) -> int:
    with urllib.request.urlopen(f"{origin}/_stats", timeout=10) as r:
        return int(json.load(r)["served"])


@dataclass
class Row:
    scenario: Scenario
    server: str
    result: Result  # the round with the median req/s
    # Each round's req/s and CPU µs per request over the same server's fresh hit in that round
    # (paired: the two measured seconds apart, so the machine's load drifts less between them).
    by_rps: list[float] = field(default_factory=list)
    by_cpu: list[float] = field(default_factory=list)

    @property
    def own_fresh(self) -> float:
        """The median of the rounds' own ratios to the fresh hit, by req/s."""
        return statistics.median(self.by_rps)


def run(connections: int, rounds: int = ROUNDS) -> tuple[list[Row], str]:
    """Every (scenario, server) once per round; per pair the round with the median req/s."""
    wrk_binary = shutil.which("wrk")
    if wrk_binary is None:
        raise SystemExit("bench: the comparison needs wrk (apt-get install wrk)")
    nginx = ensure_nginx()
    directory = Path(tempfile.mkdtemp(prefix="kounta-compare-"))
    origin_port = free_port()
    origin = f"http://127.0.0.1:{origin_port}"
    py = sys.executable
    auth = {"Authorization": f"Bearer {TOKEN}"}
    servers: dict[str, tuple[str, int]] = {}
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(
                process(
                    [py, "-m", "bench.origin", "--port", str(origin_port)], origin_port, role=LOAD
                )
            )
            for loop in LOOPS:
                port = free_port()
                config = proxy_config(directory, origin, port, loop)
                proc = stack.enter_context(
                    process(
                        [py, "-m", "proxy", "serve", "--config", str(config)], port, role=SERVER
                    )
                )
                servers[f"proxy, {loop}"] = (f"http://127.0.0.1:{port}", proc.pid)
            if nginx:
                port = free_port()
                config = nginx_config(directory / "nginx", port, origin_port)
                args = [
                    nginx,
                    "-p",
                    str(config.parent),
                    "-c",
                    str(config),
                    "-e",
                    str(config.parent / "error.log"),
                ]
                proc = stack.enter_context(process(args, port, role=SERVER))
                servers["nginx proxy_cache"] = (f"http://127.0.0.1:{port}", proc.pid)
            etags = warm(servers, auth)
            rows = measure(wrk_binary, servers, etags, origin, connections, rounds)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    note = "" if nginx else "nginx: not installed (apt-get install nginx), no reference column"
    return rows, note


def warm(servers: dict[str, tuple[str, int]], auth: dict[str, str]) -> dict[str, str]:
    """Store every path in every server (twice: nginx stores on the first, answers the second);
    the ETag of the revalidated path per server, for the If-None-Match scenario."""
    etags = {}
    for name, (url, _) in servers.items():
        for s in SCENARIOS:
            for _ in range(2):
                status, _ = get(url + s.path, auth)
                if status != 200:
                    raise SystemExit(f"bench: {name} answered {status} for {s.path}")
        etags[name] = get(url + REVALIDATED, auth)[1]["etag"]
        status, _ = get(url + REVALIDATED, {**auth, "If-None-Match": etags[name]})
        if status != 304:
            raise SystemExit(f"bench: {name} answered {status}, not 304, to its own ETag")
    return etags


def measure(
    wrk_binary: str,
    servers: dict[str, tuple[str, int]],
    etags: dict[str, str],
    origin: str,
    connections: int,
    rounds: int = ROUNDS,
) -> list[Row]:
    """Each round measures one server's four scenarios back to back, server after server;
    the order of the servers and of the scenarios turns by one each round, so that no row is
    always first, or always after the 500 KB one. Per row: the round with the median req/s,
    and each round's ratio to the same server's fresh hit of that round."""
    runs: dict[tuple[str, str], list[Result]] = {}
    print("warm-up", file=sys.stderr, flush=True)
    for url, _ in servers.values():
        for s in SCENARIOS:
            subprocess.run(
                [wrk_binary, "-t1", "-c4", "-d1s", url + s.path], capture_output=True, check=True
            )
    for round_no in range(rounds):
        print(f"round {round_no + 1} of {rounds} (c={connections})", file=sys.stderr, flush=True)
        for name, s in round_order(round_no, list(servers)):
            url, pid = servers[name]
            headers = {"Authorization": f"Bearer {TOKEN}"}
            if s.inm:
                headers["If-None-Match"] = etags[name]
            before, cpu = served(origin), cpu_seconds(pid)
            result = wrk(wrk_binary, url + s.path, headers, None, connections, role=LOAD)
            result.upstream_per_request = (served(origin) - before) / max(1, result.requests)
            if name.startswith("proxy"):  # nginx's pid is its master, not the worker
                spent = cpu_seconds(pid) - cpu
                result.cpu_us = spent * 1e6 / max(1, result.requests)
            result.rss_mb = rss_mb(pid) if name.startswith("proxy") else None
            runs.setdefault((s.key, name), []).append(result)
            print(
                f"  {s.label:<28} {name:<18} {result.rps:>8.0f} req/s",
                file=sys.stderr,
                flush=True,
            )
    rows = []
    for s in SCENARIOS:
        for name in servers:
            each, fresh = runs[(s.key, name)], runs[("fresh", name)]
            row = Row(s, name, sorted(each, key=lambda r: r.rps)[len(each) // 2])
            row.by_rps, row.by_cpu = paired(each, fresh)
            median = row.result
            sent = sum(r.requests for r in each)
            upstream = sum((r.upstream_per_request or 0.0) * r.requests for r in each)
            median.upstream_per_request = upstream / max(1, sent)
            median.rss_mb = max(r.rss_mb or 0.0 for r in each) or None
            if all(r.cpu_us is not None for r in each):  # over every round, as upstream/req
                spent = sum((r.cpu_us or 0.0) * r.requests for r in each)
                median.cpu_us = spent / max(1, sent)
            rows.append(row)
    return rows


def round_order(round_no: int, names: list[str]) -> list[tuple[str, Scenario]]:
    """Round ``round_no``'s runs: server after server, each server's scenarios back to back;
    both orders turned by one each round (over as many rounds as there are servers and
    scenarios, each is first, second, ... alike)."""
    turn, first = round_no % len(names), round_no % len(SCENARIOS)
    scenarios = SCENARIOS[first:] + SCENARIOS[:first]
    return [(name, s) for name in names[turn:] + names[:turn] for s in scenarios]


def paired(each: list[Result], fresh: list[Result]) -> tuple[list[float], list[float]]:
    """Each round's ratio to the same server's fresh hit of that round: by req/s, and by
    CPU µs per request (fresh over this; empty where the CPU was not read)."""
    by_rps = [r.rps / f.rps for r, f in zip(each, fresh, strict=True)]
    by_cpu = [
        f.cpu_us / r.cpu_us
        for r, f in zip(each, fresh, strict=True)
        if f.cpu_us is not None and r.cpu_us  # nginx: its worker's CPU is not read
    ]
    return by_rps, by_cpu if len(by_cpu) == len(each) else []


# --------------------------------------------------------------------------- report


def table(rows: list[Row]) -> str:
    by = {(r.scenario.key, r.server): r.result for r in rows}
    nginx = "nginx proxy_cache"
    lines = [
        "| scenario | server | req/s | p50 ms | p99 ms | upstream/req | CPU µs/req | / own fresh "
        "| req/s vs nginx | p99 vs nginx | = rate * shape | RSS MB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        r = row.result
        ref = by.get((row.scenario.key, nginx))
        vs = f"{r.rps / ref.rps:.2f}" if ref and row.server != nginx else ""
        p99 = split = ""
        if ref and row.server != nginx and ref.p99_ms:
            rate, shape = p99_split(r, ref)
            p99, split = f"{r.p99_ms / ref.p99_ms:.1f}x", f"{rate:.2f} * {shape:.2f}"
        rss = "" if r.rss_mb is None else f"{r.rss_mb:.0f}"
        cpu = "" if r.cpu_us is None else f"{r.cpu_us:.0f}"
        lines.append(
            f"| {row.scenario.label} | {row.server} | {r.rps:.0f} | {r.p50_ms:.2f} | "
            f"{r.p99_ms:.2f} | {r.upstream_per_request or 0:.3f} | {cpu} | "
            f"{row.own_fresh:.2f} | {vs} | {p99} | {split} | {rss} |"
        )
    return "\n".join(lines)


def p99_split(result: Result, ref: Result) -> tuple[float, float]:
    """The p99 over the reference's, as (rate, shape) whose product it is. wrk's connections
    are a closed loop, so each server's mean latency is connections / req/s (Little's law):
    ``rate`` is the reference's req/s over this one's (how much longer this server's mean
    latency is), ``shape`` the p99 / mean of this server over the reference's (how much longer
    its tail is beyond its mean). A shape near 1 means the p99 ratio is the rate's, and only a
    higher rate moves it (docs/performance.md, "The p99 against nginx's at 32 connections")."""
    rate = ref.rps / result.rps
    return rate, (result.p99_ms / ref.p99_ms) / rate


def ratios(rows: list[Row]) -> str:
    """The proxy's own ratios per loop (targets from issue 21), and uvloop / asyncio. Each is
    the median of the rounds' own ratios (each round's row over the same server's fresh hit in
    that round), with their min-max."""
    by = {(r.scenario.key, r.server): r for r in rows}
    loops = [f"proxy, {loop}" for loop in LOOPS]
    lines = [
        "| ratio (median of the rounds; min-max) | " + " | ".join(loops) + " | target |",
        "| --- | " + " | ".join("---:" for _ in loops) + " | ---: |",
    ]

    def cell(values: list[float]) -> str:
        if not values:
            return ""
        return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"

    for key, label in (
        ("reval", "revalidated 8 KB / fresh"),
        ("inm", "INM 304 / fresh"),
        ("large", "revalidated 500 KB / fresh"),
    ):
        target = "≥ 0.8" if key != "large" else ""
        cells = [cell(by[(key, loop)].by_rps) for loop in loops]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {target} |")
    for key, label in (("reval", "revalidated 8 KB"), ("inm", "INM 304")):
        # The rate the CPU per request allows, over the fresh hit's: steadier than req/s on
        # a shared machine (each round's rate moves with the load, the CPU cost much less).
        cells = [cell(by[(key, loop)].by_cpu) for loop in loops]
        lines.append(f"| {label} / fresh, by CPU µs per request | " + " | ".join(cells) + " | |")
    for key, label in (
        ("reval", "upstream/req, revalidated 8 KB"),
        ("inm", "upstream/req, INM 304"),
    ):
        values = [by[(key, loop)].result.upstream_per_request or 0.0 for loop in loops]
        lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in values) + " | unchanged |")
    lines.append("")
    lines.append("| scenario | uvloop / asyncio req/s | uvloop / asyncio p99 |")
    lines.append("| --- | ---: | ---: |")
    for s in SCENARIOS:
        a, u = by[(s.key, loops[0])].result, by[(s.key, loops[1])].result
        lines.append(f"| {s.label} | {u.rps / a.rps:.2f} | {u.p99_ms / a.p99_ms:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The comparison alone (python -m bench.compare [--connections N] [--rounds R])."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.compare")
    p.add_argument("--connections", type=int, default=DEFAULT_CONNECTIONS)
    p.add_argument("--rounds", type=int, default=ROUNDS)
    args = p.parse_args(argv)
    rows, note = run(args.connections, args.rounds)
    print(table(rows))
    print()
    print(ratios(rows))
    if note:
        print(f"\n{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
