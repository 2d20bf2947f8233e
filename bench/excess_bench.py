"""What tolerating bytes past Content-Length costs an upstream exchange (python -m
bench.excess_bench), two ways:

- parsing: one 4 KB answer handed to the response protocol (``ExcessTolerant`` against
  aiohttp's ``ResponseHandler``), as the connection does for every upstream answer, with
  no network: CPU only, so the difference shows even on a loaded machine;
- exchanges: the proxy's session against the same session on aiohttp's own connector,
  against a minimal aiohttp upstream in its own process (head + body read).

Interleaved rounds (alternating order), microseconds per answer: median (min, max)."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp.client_proto import ResponseHandler

from proxy.client import ExcessTolerant, create_session, ssl_context
from proxy.settings import UpstreamSettings


def plain_session(settings: UpstreamSettings) -> aiohttp.ClientSession:
    """create_session's session with aiohttp's own connector."""
    connector = aiohttp.TCPConnector(
        limit=settings.pool_size, ssl=ssl_context(settings), ttl_dns_cache=300
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(
            total=settings.total_timeout,
            sock_connect=settings.connect_timeout,
            sock_read=settings.read_timeout,
        ),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=("User-Agent",),
    )


async def exchanges(session: aiohttp.ClientSession, url: str, n: int, width: int) -> float:
    """Microseconds per exchange, ``width`` at a time."""

    async def one(k: int) -> None:
        for _ in range(k):
            async with session.get(url) as r:
                await r.read()

    started = time.perf_counter()
    await asyncio.gather(*(one(n // width) for _ in range(width)))
    return (time.perf_counter() - started) / n * 1e6


async def measure(url: str, rounds: int, n: int, width: int) -> dict[str, list[float]]:
    settings = UpstreamSettings(base_url=url.rsplit("/v1", 1)[0], pool_size=max(8, width))
    made = {"tolerant": create_session(settings), "plain": plain_session(settings)}
    found: dict[str, list[float]] = {name: [] for name in made}
    try:
        for session in made.values():
            await exchanges(session, url, 200, width)  # warm the pool
        for i in range(rounds):
            order = list(made.items())
            for name, session in order if i % 2 else reversed(order):  # no order bias
                found[name].append(await exchanges(session, url, n, width))
    finally:
        for session in made.values():
            await session.close()
    return found


class NullTransport(asyncio.Transport):
    def is_closing(self) -> bool:
        return False


def answer(size: int) -> bytes:
    body = b'{"a":"' + b"x" * max(0, size - 8) + b'"}'
    head = (
        "HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
        'ETag: "abc"\r\nDate: Sat, 05 Dec 2026 04:00:00 GMT\r\n'
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def parse(cls: type[ResponseHandler], data: bytes, n: int) -> float:
    """Per answer; a new protocol every 100 answers, so the answers it queues stay few."""
    loop, spent = asyncio.get_running_loop(), 0.0
    for _ in range(n // 100):
        protocol = cls(loop)
        protocol.connection_made(NullTransport())
        started = time.perf_counter()
        for _ in range(100):
            protocol.set_response_params(read_until_eof=False, auto_decompress=False)
            protocol.data_received(data)
        spent += time.perf_counter() - started
        protocol.connection_lost(None)
    return spent / (n // 100 * 100) * 1e6


async def parsing(size: int, rounds: int, n: int) -> dict[str, list[float]]:
    data, found = answer(size), {"tolerant": [], "plain": []}
    for i in range(rounds):
        pairs = [("tolerant", ExcessTolerant), ("plain", ResponseHandler)]
        for name, cls in pairs if i % 2 else reversed(pairs):
            found[name].append(await parse(cls, data, n))
    return found


def show(what: str, found: dict[str, list[float]]) -> None:
    line = ", ".join(
        f"{name} {statistics.median(v):.1f} us ({min(v):.1f}, {max(v):.1f})"
        for name, v in found.items()
    )
    print(f"{what}: {line}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--size", type=int, default=4096, help="body bytes")
    args = p.parse_args()
    found = asyncio.run(parsing(args.size, args.rounds, args.requests * 5))
    show(f"parsing, {args.size} B answers", found)
    with tempfile.TemporaryDirectory() as tmp:
        body = Path(tmp) / "body.json"
        body.write_bytes(b'{"a":"' + b"x" * max(0, args.size - 8) + b'"}')
        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        cmd = [sys.executable, "-m", "bench.minimal", "--port", str(port), "--file", str(body)]
        server = subprocess.Popen(cmd, env=env)
        try:
            time.sleep(1.5)
            url = f"http://127.0.0.1:{port}/v1/x"
            for width in (1, 8):
                found = asyncio.run(measure(url, args.rounds, args.requests, width))
                show(f"exchanges, {width} at a time, {args.size} B answers", found)
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
