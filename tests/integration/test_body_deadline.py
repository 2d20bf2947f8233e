"""Deadlines on request bodies, over real sockets.

A keyed caller that sent a POST head with ``Content-Length`` and then nothing (or a byte
every few seconds) kept its connection forever: 30 of them filled ``max_connections``.
``server.body_timeout`` bounds the wait for a whole body, ``server.body_min_rate`` the pace
after the first second; both answer ``408 request_timeout`` and close.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from proxy.settings import CallerSettings, Secret, ServerSettings, Settings
from tests.conftest import MakeProxy, Proxy, proxy_settings, serve

KEY = "body-deadline-key-0123456789abc"
DROPPED = "kounta_proxy_connections_dropped_total"


class Upstream:
    """Reads each request body whole and answers how many bytes it got."""

    def __init__(self) -> None:
        self.started = 0
        self.completed: list[int] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.started += 1
        body = await request.read()
        self.completed.append(len(body))
        return web.json_response({"got": len(body)})


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    recorder = Upstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recorder.handle)
    runner, port = await serve(app)
    recorder.url = f"http://127.0.0.1:{port}"
    yield recorder
    await runner.cleanup()


def settings_for(upstream: Upstream, tmp_path: Any, **server: Any) -> Settings:
    settings = proxy_settings(
        upstream.url, tmp_path, callers={"svc": CallerSettings(key=Secret(KEY), account="main")}
    )
    fields = {"host": "127.0.0.1", "port": 0, **server}
    return dataclasses.replace(settings, server=ServerSettings(**fields))


async def open_post(proxy: Proxy, framing: str) -> tuple[asyncio.StreamReader, Any]:
    port = int(proxy.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"POST /v1/companies/5/orders HTTP/1.1\r\nHost: t\r\nX-Proxy-Key: {KEY}\r\n"
        f"Content-Type: application/json\r\n{framing}\r\n\r\n"
    )
    writer.write(head.encode())
    return reader, writer


def parse(data: bytes) -> tuple[int, str, dict[str, Any]]:
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), head.decode("latin-1"), json.loads(body)


async def test_a_head_whose_body_never_comes_gets_408_and_is_closed(
    make_proxy: MakeProxy, upstream: Upstream, tmp_path: Any
) -> None:
    proxy = await make_proxy(settings_for(upstream, tmp_path))  # the defaults
    loop = asyncio.get_running_loop()
    reader, writer = await open_post(proxy, "Content-Length: 100")
    started = loop.time()
    data = await asyncio.wait_for(reader.read(), 10)  # the whole answer, then the close
    took = loop.time() - started
    writer.close()
    status, head, body = parse(data)
    assert (status, body["error"]) == (408, "request_timeout")
    assert "Connection: close" in head and "X-Proxy-Error: 1" in head
    assert 0.8 < took < 3.0  # 0 bytes by the end of the first second: too slow
    assert upstream.started == 0  # the body was still in memory: Kounta never saw it
    assert proxy.registry.get_sample_value(DROPPED, {"reason": "body_timeout"}) == 1


async def test_a_body_trickled_a_byte_at_a_time_is_cut(
    make_proxy: MakeProxy, upstream: Upstream, tmp_path: Any
) -> None:
    proxy = await make_proxy(settings_for(upstream, tmp_path))  # the defaults
    loop = asyncio.get_running_loop()
    reader, writer = await open_post(proxy, "Content-Length: 100")
    started = loop.time()

    async def trickle() -> None:
        for _ in range(100):
            await asyncio.sleep(0.3)
            writer.write(b" ")

    dripping = asyncio.ensure_future(trickle())
    try:
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        dripping.cancel()
        writer.close()
    assert parse(data)[0] == 408
    assert loop.time() - started < 4.0  # 100 bytes at 3 a second would take 30 s
    assert upstream.started == 0


async def test_the_total_deadline_cuts_a_streamed_body_and_spares_the_breaker(
    make_proxy: MakeProxy, upstream: Upstream, tmp_path: Any
) -> None:
    """A steady chunked body larger than replay_body_size streams to Kounta as it comes;
    past body_timeout the upstream exchange is abandoned (Kounta never gets a complete
    body) and the caller gets 408. The caller's fault counts against no breaker."""
    settings = settings_for(
        upstream, tmp_path, body_timeout=1.0, body_min_rate=0, replay_body_size=256
    )
    proxy = await make_proxy(settings)
    loop = asyncio.get_running_loop()
    reader, writer = await open_post(proxy, "Transfer-Encoding: chunked")
    started = loop.time()

    async def stream() -> None:
        for _ in range(40):  # 64 bytes every 0.1 s: 4 s in all
            writer.write(b"40\r\n" + b"x" * 64 + b"\r\n")
            await asyncio.sleep(0.1)
        writer.write(b"0\r\n\r\n")

    sending = asyncio.ensure_future(stream())
    try:
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        sending.cancel()
        writer.close()
    took = loop.time() - started
    status, _, body = parse(data)
    assert (status, body["error"]) == (408, "request_timeout")
    assert 0.9 < took < 2.5
    assert upstream.started == 1 and upstream.completed == []  # streamed, never completed
    registry = proxy.registry
    assert registry.get_sample_value(DROPPED, {"reason": "body_timeout"}) == 1
    errors = registry.get_sample_value(
        "kounta_proxy_upstream_errors_total", {"kind": "reset", "account": "main"}
    )
    assert not errors
    assert registry.get_sample_value(
        "kounta_proxy_breaker_state", {"account": "main", "state": "closed"}
    ) in (None, 1.0)


@pytest.mark.parametrize("size", [600, 3000], ids=["in_memory", "streamed"])
async def test_a_body_within_the_limits_goes_through(
    make_proxy: MakeProxy, upstream: Upstream, tmp_path: Any, size: int
) -> None:
    proxy = await make_proxy(settings_for(upstream, tmp_path, replay_body_size=1024))
    reader, writer = await open_post(proxy, f"Content-Length: {size}\r\nConnection: close")
    piece = size // 4
    for _ in range(4):  # a pause of 0.4 s between pieces: slow, but within the limits
        await asyncio.sleep(0.4)
        writer.write(b"y" * piece)
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    status, _, body = parse(data)
    assert (status, body) == (200, {"got": size})
    assert proxy.registry.get_sample_value(DROPPED, {"reason": "body_timeout"}) in (None, 0)
