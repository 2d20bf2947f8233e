"""The cache benchmark: the proxy against the sandbox on loopback, driven by wrk.

Every server runs as its own process (sandbox, proxy with cache, proxy without cache,
minimal aiohttp handlers), all started before the first measurement. The scenarios are
then measured in ROUNDS interleaved rounds (every scenario once per round), and each row
reports the round with the median requests/s: this machine's speed drifts by tens of
percent within a minute, and interleaving exposes every scenario to the same drift, so
the ratios compare like with like. One table: requests/s, p50, p99, upstream requests per
client request, and the proxy's RSS after each scenario; then the target ratios.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp

TOKEN = "bench-token"
COMPANY = "/v1/companies/5001"
FRESH = f"{COMPANY}/products.json"  # a rule makes it fresh for an hour
REVALIDATED = f"{COMPANY}/customers.json"  # no rule: revalidated every time
DURATION = 3
CONNECTIONS = 32
ROUNDS = 3


@dataclass
class Result:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    upstream_per_request: float | None = None
    rss_mb: float | None = None
    cpu_us: float | None = None  # the server process's CPU time per request (µs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_wrk() -> str | None:
    """wrk from Debian packages, installed if missing; None: use the aiohttp generator."""
    found = shutil.which("wrk")
    if found:
        return found
    if shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], capture_output=True, check=False)
    return shutil.which("wrk")


# Pinning (``KOUNTA_BENCH_PIN=0`` turns it off): every measured server (proxies, nginx, the
# minimal handlers) on the last core, the load (wrk) and the upstream on the other cores, the
# same for every scenario and every server. Unpinned, the scheduler moves wrk's two threads,
# the upstream and the server between the cores as it likes, and how soon the upstream's 304
# gets a core moves the revalidating rows' rate from one run to the next (docs/performance.md,
# "A steadier comparison"). With fewer than two cores nothing is pinned.
SERVER, LOAD = "server", "load"


def cpu_sets() -> dict[str, set[int]] | None:
    """The cores of each role, or None: not pinned."""
    if os.environ.get("KOUNTA_BENCH_PIN", "1") == "0" or not hasattr(os, "sched_getaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return None
    return {SERVER: {cores[-1]}, LOAD: set(cores[:-1])}


def pin(role: str | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` that pins the child (and what it starts) to ``role``'s cores."""
    sets = cpu_sets()
    if role is None or sets is None:
        return None
    cores = sets[role]
    return lambda: os.sched_setaffinity(0, cores)


@contextmanager
def process(
    args: list[str],
    port: int,
    cwd: str | None = None,
    role: str | None = None,
    stderr: int = subprocess.PIPE,
) -> Iterator[subprocess.Popen[bytes]]:
    """A server subprocess (run in ``cwd``: ``python -m`` imports from there first), pinned
    to ``role``'s cores when given (``pin``); ``stderr``: DEVNULL for a server that logs a
    line a request (nobody reads the pipe while it runs)."""
    proc = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=stderr, cwd=cwd, preexec_fn=pin(role)
    )
    try:
        wait_port(port, proc)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise SystemExit(f"bench: a server exited at start:\n{err[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"bench: nothing listens on port {port}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc; 0.0 where unreadable).
    Less sensitive than req/s to what else runs on a shared machine."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int, field: str = "VmRSS") -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def proxy_config(
    directory: Path,
    upstream: str,
    port: int,
    cache: bool,
    *,
    rule: str = "/v1/companies/*/products",
    event_loop: str = "auto",
    log_level: str = "warning",
) -> Path:
    """A proxy's settings file: static token, no budget to speak of, ``rule`` fresh for an hour
    (``log_level``: "info" writes an access line a request)."""
    path = directory / f"proxy-{port}.toml"
    path.write_text(
        f'state_dir = "{directory / f"state-{port}"}"\n'
        f'[server]\nhost = "127.0.0.1"\nport = {port}\nevent_loop = "{event_loop}"\n'
        f'[upstream]\nbase_url = "{upstream}"\n'
        f'[log]\nlevel = "{log_level}"\n'
        "[admin]\nenabled = false\n"
        f"[cache]\nenabled = {'true' if cache else 'false'}\n"
        f'[[cache.rules]]\npath = "{rule}"\nfresh_for = 3600.0\n'
        f'[accounts.main]\nmode = "static"\ntoken = "{TOKEN}"\nrate_per_minute = 100000000\n'
    )
    return path


# --------------------------------------------------------------------------- load


def wrk(
    binary: str,
    url: str,
    headers: dict[str, str],
    script: Path | None,
    connections: int | None = None,
    role: str | None = None,
) -> Result:
    """wrk against ``url``; pinned to ``role``'s cores when given (``pin``: LOAD)."""
    args = [binary, "-t2", f"-c{connections or CONNECTIONS}", f"-d{DURATION}s", "--latency"]
    for name, value in headers.items():
        args += ["-H", f"{name}: {value}"]
    if script is not None:
        args += ["-s", str(script)]
    out = subprocess.run(
        [*args, url], capture_output=True, text=True, check=True, preexec_fn=pin(role)
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    for problem in re.findall(r"^\s*(Non-2xx or 3xx responses: \d+|Socket errors: .*)$", out, re.M):
        print(f"  wrk: {url}: {problem}", file=sys.stderr)  # a scenario that fails is no number
    return Result("", rps, _pct(out, "50%"), _pct(out, "99%"), total)


def _pct(out: str, label: str) -> float:
    match = re.search(rf"{re.escape(label)}\s+([\d.]+)(us|ms|s)", out)
    if match is None:
        return float("nan")
    value, unit = float(match.group(1)), match.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


async def aio_load(url: str, headers: dict[str, str], unique: bool, run: int = 0) -> Result:
    """Fallback generator when wrk is unavailable (slower: compare ratios, not absolutes)."""
    latencies: list[float] = []
    stop = time.monotonic() + DURATION
    counter = iter(range(run * 10**9, 10**13))

    async def worker(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < stop:
            target = f"{url}?start={next(counter) + 10**6}" if unique else url
            started = time.perf_counter()
            async with session.get(target, headers=headers) as r:
                await r.read()
            latencies.append(time.perf_counter() - started)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(CONNECTIONS)))
    latencies.sort()
    n = len(latencies)
    return Result("", n / DURATION, latencies[n // 2] * 1000, latencies[int(n * 0.99)] * 1000, n)


# Unique queries: BASE differs per run, so a later round misses as the first did.
MISS_SCRIPT = """
local threads = 0
function setup(thread) threads = threads + 1; thread:set("tid", threads) end
local n = 0
function request()
  n = n + 1
  return wrk.format(nil, wrk.path .. "?start=" .. (BASE + tid * 100000000 + n))
end
"""


# --------------------------------------------------------------------------- scenarios


class Bench:
    def __init__(self, directory: Path, wrk_binary: str | None) -> None:
        self.directory = directory
        self.wrk = wrk_binary
        self.sandbox_port = free_port()
        self.sandbox = f"http://127.0.0.1:{self.sandbox_port}"
        self.miss_script = directory / "miss.lua"
        self.miss_runs = 0

    def load(self, url: str, headers: dict[str, str] | None = None, unique: bool = False) -> Result:
        headers = headers or {}
        if unique:
            self.miss_runs += 1
            base = 1_000_000 + self.miss_runs * 1_000_000_000
            self.miss_script.write_text(f"local BASE = {base}\n{MISS_SCRIPT}")
        if self.wrk is not None:
            script = self.miss_script if unique else None
            return wrk(self.wrk, url, headers, script, role=LOAD)
        return asyncio.run(aio_load(url, headers, unique, self.miss_runs))

    def served(self) -> int:
        import urllib.request

        with urllib.request.urlopen(f"{self.sandbox}/_sandbox/stats") as r:  # loopback only
            return int(json.load(r)["served"])

    def measure(
        self,
        name: str,
        url: str,
        headers: dict[str, str] | None = None,
        unique: bool = False,
        pid: int | None = None,
        count_upstream: bool = True,
    ) -> Result:
        before = self.served()
        result = self.load(url, headers, unique)
        result.name = name
        if count_upstream:
            result.upstream_per_request = (self.served() - before) / max(1, result.requests)
        if pid is not None:
            result.rss_mb = rss_mb(pid)
        print(f"  {name:<34} {result.rps:>9.0f} req/s", file=sys.stderr, flush=True)
        return result


def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[bytes, dict[str, str]]:
    import urllib.request

    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request) as r:
        return r.read(), {k.lower(): v for k, v in r.headers.items()}


def big_product(sandbox: str) -> str:
    """A 500 KB record in the sandbox (a product with a long description)."""
    import urllib.request

    body = json.dumps({"name": "bench", "description": "x" * 500_000}).encode()
    request = urllib.request.Request(
        f"{sandbox}{COMPANY}/products.json",
        data=body,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
        method="POST",
    )
    with urllib.request.urlopen(request) as r:
        created = json.load(r)
    return f"{COMPANY}/products/{created['id']}.json"


@dataclass
class Scenario:
    name: str
    url: str
    headers: dict[str, str] | None = None
    unique: bool = False
    pid: int | None = None  # the process whose RSS is shown
    count_upstream: bool = True


def run() -> list[Result]:
    binary = ensure_wrk()
    print(f"load generator: {binary or 'aiohttp (wrk unavailable)'}", file=sys.stderr)
    directory = Path(tempfile.mkdtemp(prefix="kounta-bench-"))
    bench = Bench(directory, binary)
    py = sys.executable
    sandbox_args = [py, "-m", "proxy.sandbox", "--port", str(bench.sandbox_port)]
    sandbox_args += ["--token", TOKEN, "--rate-bearer", "100000000"]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        with contextlib.ExitStack() as servers:
            servers.enter_context(process(sandbox_args, bench.sandbox_port, role=LOAD))
            big = big_product(bench.sandbox)
            small_body, _ = fetch(bench.sandbox + FRESH, auth)
            large_body, _ = fetch(bench.sandbox + big, auth)
            (directory / "small.json").write_bytes(small_body)
            (directory / "large.json").write_bytes(large_body)
            scenarios, cached_pid = start_servers(servers, bench, py, big)
            results = measure_rounds(bench, scenarios)
            peak = rss_mb(cached_pid, "VmHWM")
            results.insert(5, Result("proxy: peak RSS (VmHWM)", 0, 0, 0, 0, None, peak))
            sandbox = bench.sandbox
            results.append(bench.measure("sandbox direct: small", sandbox + FRESH, auth))
            results.append(bench.measure("sandbox direct: 500 KB", sandbox + big, auth))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return results


def start_servers(
    servers: contextlib.ExitStack, bench: Bench, py: str, big: str
) -> tuple[list[Scenario], int]:
    """Start the proxies and the minimal handlers, warm them; the scenarios, in order."""
    proxies: dict[bool, tuple[str, int]] = {}
    for cache in (True, False):
        port = free_port()
        config = proxy_config(bench.directory, bench.sandbox, port, cache=cache)
        args = [py, "-m", "proxy", "serve", "--config", str(config)]
        proc = servers.enter_context(process(args, port, role=SERVER))
        proxies[cache] = (f"http://127.0.0.1:{port}", proc.pid)
    minimal: dict[str, tuple[str, int]] = {}
    for file in ("small.json", "large.json"):
        port = free_port()
        args = [py, "-m", "bench.minimal", "--port", str(port)]
        args += ["--file", str(bench.directory / file)]
        proc = servers.enter_context(process(args, port, role=SERVER))
        minimal[file] = (f"http://127.0.0.1:{port}/x", proc.pid)
    (base, pid), (plain, plain_pid) = proxies[True], proxies[False]
    _, headers = fetch(base + FRESH)  # warm: stored from here on
    for url in (base + REVALIDATED, base + big, plain + REVALIDATED):
        fetch(url)
    inm = {"If-None-Match": headers["etag"]}
    scenarios = [
        Scenario("proxy: fresh hit", base + FRESH, pid=pid),
        Scenario("proxy: revalidated hit", base + REVALIDATED, pid=pid),
        Scenario("proxy: miss", base + REVALIDATED, unique=True, pid=pid),
        Scenario("proxy: caller 304", base + FRESH, inm, pid=pid),
        Scenario("proxy: 500 KB revalidated hit", base + big, pid=pid),
        Scenario("pass-through: small", plain + REVALIDATED, pid=plain_pid),
        Scenario("pass-through: 500 KB", plain + big, pid=plain_pid),
    ]
    for name, file in (("small", "small.json"), ("500 KB", "large.json")):
        url, mpid = minimal[file]
        scenarios.append(Scenario(f"minimal aiohttp: {name}", url, pid=mpid, count_upstream=False))
    return scenarios, pid


def measure_rounds(bench: Bench, scenarios: list[Scenario]) -> list[Result]:
    """Every scenario once per round; per scenario, the round with the median req/s."""
    runs: dict[str, list[Result]] = {s.name: [] for s in scenarios}
    print("warm-up", file=sys.stderr, flush=True)
    for s in scenarios:  # first requests fill memos and warm the interpreter
        if bench.wrk is not None and not s.unique:
            subprocess.run(
                [bench.wrk, "-t1", "-c4", "-d1s", s.url], capture_output=True, check=True
            )
    for round_no in range(1, ROUNDS + 1):
        print(f"round {round_no} of {ROUNDS}", file=sys.stderr, flush=True)
        for s in scenarios:
            runs[s.name].append(
                bench.measure(s.name, s.url, s.headers, s.unique, s.pid, s.count_upstream)
            )
    results = []
    for s in scenarios:
        ordered = sorted(runs[s.name], key=lambda r: r.rps)
        median = ordered[len(ordered) // 2]
        if s.count_upstream:  # over every round: more requests, a steadier ratio
            sent = sum(r.requests for r in ordered)
            upstream = sum((r.upstream_per_request or 0.0) * r.requests for r in ordered)
            median.upstream_per_request = upstream / max(1, sent)
        median.rss_mb = max((r.rss_mb or 0.0) for r in ordered) or None
        results.append(median)
    return results


# --------------------------------------------------------------------------- report


def table(results: list[Result]) -> str:
    lines = [
        "| scenario | req/s | p50 ms | p99 ms | upstream/req | RSS MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        up = "" if r.upstream_per_request is None else f"{r.upstream_per_request:.3f}"
        rss = "" if r.rss_mb is None else f"{r.rss_mb:.0f}"
        if r.requests == 0:
            lines.append(f"| {r.name} | | | | | {rss} |")
            continue
        lines.append(f"| {r.name} | {r.rps:.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {up} | {rss} |")
    return "\n".join(lines)


def ratios(results: list[Result]) -> str:
    by = {r.name: r.rps for r in results}
    rows = [
        ("fresh hit / minimal aiohttp (small)", "proxy: fresh hit", "minimal aiohttp: small", 0.7),
        (
            "revalidated hit / pass-through (small)",
            "proxy: revalidated hit",
            "pass-through: small",
            0.9,
        ),
        (
            "500 KB revalidated hit / pass-through (500 KB)",
            "proxy: 500 KB revalidated hit",
            "pass-through: 500 KB",
            0.9,
        ),
    ]
    lines = ["| ratio | value | target | met |", "| --- | ---: | ---: | --- |"]
    for label, a, b, target in rows:
        value = by[a] / by[b] if by.get(b) else float("nan")
        lines.append(f"| {label} | {value:.2f} | {target} | {'yes' if value >= target else 'NO'} |")
    return "\n".join(lines)
