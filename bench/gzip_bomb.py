"""The proxy's memory under gzip bombs: ``python -m bench.gzip_bomb [--source DIR]``.

A hostile upstream on loopback answers every GET with the same ~60 KB gzip body that
inflates to 60 MB of zeros (cacheable, with a correct Content-Length). The proxy (a real
``kounta-proxy serve`` subprocess) is asked for ``--rounds`` rounds of ``--concurrency``
different paths at once, by callers that do and do not accept gzip. Printed: the proxy's
RSS before, its peak RSS (VmHWM) after, and the answers it gave.

``--source DIR`` runs the proxy from another checkout (for example the main branch's) with
this interpreter (``python -m proxy`` in that directory), to compare before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gzip
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from bench.cache_bench import TOKEN, free_port, process, rss_mb

INFLATED = 60 * 1000 * 1000


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gzip_bomb")
    parser.add_argument("--source", help="run the proxy from this checkout instead")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--allow",
        action="store_true",
        help="raise the caps so the bombs pass: stored compressed, inflated while streamed",
    )
    return parser.parse_args(argv)


async def hostile_upstream(bomb: bytes) -> tuple[web.AppRunner, int]:
    async def handler(request: web.Request) -> web.Response:
        headers = {
            "Content-Encoding": "gzip",
            "Content-Type": "application/json",
            "Cache-Control": "max-age=600",
        }
        return web.Response(body=bomb, headers=headers)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


def config(directory: Path, upstream: int, port: int, allow: bool) -> Path:
    path = directory / "proxy.toml"
    caps = "max_inflated_size = 100000000\nmax_inflate_ratio = 100000\n" if allow else ""
    path.write_text(
        f'state_dir = "{directory / "state"}"\n'
        f'[server]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[upstream]\nbase_url = "http://127.0.0.1:{upstream}"\n{caps}'
        "[retry]\nattempts = 1\nbreaker_failures = 0\n"
        '[log]\nlevel = "error"\n'
        "[admin]\nenabled = false\n"
        f'[accounts.main]\nmode = "static"\ntoken = "{TOKEN}"\nrate_per_minute = 100000000\n'
    )
    return path


async def attack(url: str, rounds: int, concurrency: int) -> collections.Counter[str]:
    """Every request's answer as ``status error`` (or the exception's name)."""
    seen: collections.Counter[str] = collections.Counter()
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as client:

        async def one(path: str, accept: str) -> None:
            try:
                async with client.get(url + path, headers={"Accept-Encoding": accept}) as r:
                    first = b""
                    async for chunk in r.content.iter_chunked(1 << 20):
                        first = first or chunk[:500]
                    label = str(r.status)
                    if r.status >= 400:
                        with contextlib.suppress(ValueError, KeyError, TypeError):
                            label += " " + json.loads(first)["error"]
                    seen[f"{label} ({'gzip' if 'gzip' in accept else 'plain'} caller)"] += 1
            except (aiohttp.ClientError, TimeoutError) as e:
                seen[type(e).__name__] += 1

        for n in range(rounds):
            paths = [f"/v1/companies/5001/bomb-{n}-{i}.json" for i in range(concurrency)]
            accepts = ["gzip" if i % 2 else "identity" for i in range(concurrency)]
            await asyncio.gather(*(one(p, a) for p, a in zip(paths, accepts, strict=True)))
    return seen


async def run(args: argparse.Namespace) -> int:
    bomb = gzip.compress(b"\0" * INFLATED, compresslevel=9)
    directory = Path(tempfile.mkdtemp(prefix="kounta-bomb-"))
    runner, upstream = await hostile_upstream(bomb)
    port = free_port()
    settings = config(directory, upstream, port, args.allow)
    command = [sys.executable, "-m", "proxy", "serve", "--config", str(settings)]
    try:
        with contextlib.ExitStack() as stack:
            proc = stack.enter_context(process(command, port, cwd=args.source))
            await asyncio.sleep(0.5)
            before = rss_mb(proc.pid)
            started = time.monotonic()
            seen = await attack(f"http://127.0.0.1:{port}", args.rounds, args.concurrency)
            took = time.monotonic() - started
            after, peak = rss_mb(proc.pid), rss_mb(proc.pid, "VmHWM")
    finally:
        await runner.cleanup()
        shutil.rmtree(directory, ignore_errors=True)
    where = (args.source or "this checkout") + (", caps raised" if args.allow else "")
    print(
        f"\n## gzip bombs: {len(bomb) / 1000:.0f} KB inflating to {INFLATED / 1e6:.0f} MB, "
        f"{args.rounds} rounds of {args.concurrency} at once ({where})\n"
    )
    print("| proxy RSS before | RSS after | peak RSS (VmHWM) | time |")
    print("|---:|---:|---:|---:|")
    print(f"| {mb(before)} | {mb(after)} | {mb(peak)} | {took:.2f} s |")
    print("\nanswers: " + ", ".join(f"{k}: {v}" for k, v in sorted(seen.items())))
    return 0


def mb(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f} MB"


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(run(arguments(argv)))


if __name__ == "__main__":
    sys.exit(main())
