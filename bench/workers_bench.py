"""Fresh hits with ``kounta-proxy serve --workers 1`` and ``--workers 2`` (python -m bench.run
--workers): N processes on one port (SO_REUSEPORT), sharing state in a Redis of the bench's
own. wrk shares the two cores with them, so the target is 1.3x, not 2x. Also counts the
Redis round trips per request from the workers' own ``kounta_proxy_shared_calls_total``.
"""

from __future__ import annotations

import contextlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from cryptography.fernet import Fernet

from bench import cache_bench
from bench.fleet import own_redis

ROUNDS = 3


def config(directory: Path, upstream: str, redis: str, port: int, admin: int) -> Path:
    path = directory / f"workers-{port}.toml"
    path.write_text(
        f'state_dir = "{directory / f"state-{port}"}"\n'
        f'[server]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[upstream]\nbase_url = "{upstream}"\n'
        '[log]\nlevel = "warning"\n'
        f'[admin]\nhost = "127.0.0.1"\nport = {admin}\n'
        '[[cache.rules]]\npath = "/v1/companies/*/products"\nfresh_for = 3600.0\n'
        f'[shared]\nbackend = "redis"\nurl = "{redis}"\nkey_prefix = "bench-{port}"\n'
        f'token_key = "{Fernet.generate_key().decode()}"\n'
        f'[accounts.main]\nmode = "static"\ntoken = "{cache_bench.TOKEN}"\n'
        "rate_per_minute = 100000000\n"
    )
    return path


def shared_calls(admin: int) -> float:
    """Redis round trips so far, from the admin listener (the parent's merges the workers)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(
        float(m) for m in re.findall(r"^kounta_proxy_shared_calls_total\{.*\} (\S+)$", text, re.M)
    )


def wait_ready(admin: int, proc: subprocess.Popen[bytes], seconds: float = 30.0) -> None:
    """Until /readyz says 200 (under --workers: every worker is ready)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the proxy exited with {proc.returncode}")
        url = f"http://127.0.0.1:{admin}/readyz"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                return
        time.sleep(0.1)
    raise SystemExit("the proxy did not get ready")


def measure(
    wrk: str, directory: Path, upstream: str, redis: str, workers: int
) -> tuple[float, float]:
    port, admin = cache_bench.free_port(), cache_bench.free_port() + 100
    path = config(directory, upstream, redis, port, admin)
    args = [
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--config",
        str(path),
        "--workers",
        str(workers),
    ]
    url = f"http://127.0.0.1:{port}{cache_bench.FRESH}"
    with cache_bench.process(args, port) as proc:
        wait_ready(admin, proc)  # every worker has started
        for _ in range(8 * workers):  # each worker stores the entry in its own memory tier
            cache_bench.fetch(url)
        subprocess.run([wrk, "-t1", "-c4", "-d1s", url], capture_output=True, check=True)
        before = shared_calls(admin)
        runs = [cache_bench.wrk(wrk, url, {}, None) for _ in range(ROUNDS)]
        calls = shared_calls(admin) - before
    rps = statistics.median(r.rps for r in runs)
    return rps, calls / max(1, sum(r.requests for r in runs))


def main() -> int:
    wrk = cache_bench.ensure_wrk()
    if wrk is None:
        print("--workers needs wrk", file=sys.stderr)
        return 1
    directory = Path(tempfile.mkdtemp(prefix="kounta-workers-"))
    sandbox_port = cache_bench.free_port()
    sandbox = [sys.executable, "-m", "proxy.sandbox", "--port", str(sandbox_port)]
    sandbox += ["--token", cache_bench.TOKEN, "--rate-bearer", "100000000"]
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        stack.enter_context(cache_bench.process(sandbox, sandbox_port))
        redis = stack.enter_context(own_redis(str(directory)))
        upstream = f"http://127.0.0.1:{sandbox_port}"
        results = {n: measure(wrk, directory, upstream, redis, n) for n in (1, 2)}
    (one, calls1), (two, calls2) = results[1], results[2]
    print(f"\n## Fresh hits by workers (wrk -t2 -c{cache_bench.CONNECTIONS}, median of {ROUNDS})\n")
    print("| workers | req/s | Redis round trips per request |")
    print("| --- | ---: | ---: |")
    print(f"| 1 | {one:.0f} | {calls1:.3f} |")
    print(f"| 2 | {two:.0f} | {calls2:.3f} |")
    print(f"\n2 workers / 1 worker: {two / one:.2f} (target 1.3)")
    print(f"\n(whole run {time.monotonic() - started:.0f} s)", file=sys.stderr)
    return 0
