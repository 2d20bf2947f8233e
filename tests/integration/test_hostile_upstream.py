"""A Kounta that misbehaves: statuses outside HTTP's range, error bodies that
echo the account's own secrets, gzip bodies refused at their first chunk, 503s on
undocumented paths, and callers that stop reading a streamed answer. Upstreams are raw
asyncio servers or one-handler aiohttp apps on loopback; callers are raw sockets.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import web

from proxy.edge.services import SERVICES
from proxy.settings import (
    AccountSettings,
    CacheSettings,
    CallerSettings,
    RetrySettings,
    Secret,
    ServerSettings,
    UpstreamSettings,
)
from tests.conftest import TOKEN, MakeProxy, Proxy, proxy_settings, serve_handler
from tests.integration.test_http_edges import RawUpstream, answer_of, request, start_raw
from tests.integration.test_upstream_bodies import GZ, noise, reply

FRESH = "Cache-Control: max-age=600"


@pytest.fixture
async def raw_proxy(make_proxy: MakeProxy, tmp_path: Any) -> AsyncIterator[Any]:
    """A proxy (no retries, no breaker unless asked) in front of a scripted raw upstream."""
    servers: list[asyncio.Server] = []

    async def make(
        *replies: bytes, upstream: dict[str, Any] | None = None, **sections: Any
    ) -> tuple[RawUpstream, Proxy]:
        raw, server = await start_raw(list(replies))
        servers.append(server)
        sections.setdefault("retry", RetrySettings(attempts=1, breaker_failures=0))
        given = {"read_timeout": 5, **(upstream or {})}
        sections["upstream"] = UpstreamSettings(base_url=raw.url, **given)
        return raw, await make_proxy(proxy_settings(raw.url, tmp_path, **sections))

    yield make
    for server in servers:
        server.close()


def sample(p: Proxy, name: str, labels: dict[str, str]) -> float:
    return p.registry.get_sample_value(name, labels) or 0.0


# -- 15: a status outside 100-599 ------------------------------------------------------------


@pytest.mark.parametrize("status", ["600 Odd", "999 Nonsense", "099 Low"])
@pytest.mark.parametrize("size", [200, 300_000], ids=["small", "streamed"])
async def test_an_upstream_status_outside_http_is_502_upstream_invalid_and_never_stored(
    raw_proxy: Any, status: str, size: int
) -> None:
    body = b'{"x":"' + b"y" * size + b'"}'
    good = reply(b"{}", FRESH)
    raw, p = await raw_proxy(reply(body, FRESH, status=status), good)
    got = await answer_of(p.url, request("GET", "/v1/a"))
    assert got.status == 502, got.body[:200]
    assert got.json()["error"] == "upstream_invalid"
    assert got.header("X-Proxy-Error") == "1"
    # Not stored: the next request goes upstream again and is answered as Kounta answers.
    got = await answer_of(p.url, request("GET", "/v1/a"))
    assert (got.status, got.header("X-Cache"), got.body) == (200, "MISS", b"{}")
    assert len(raw.seen) == 2
    assert sample(p, "kounta_proxy_upstream_errors_total", {"kind": "invalid", "account": "main"})
    counted = [
        s.labels["status"]
        for m in p.registry.collect()
        if m.name == "kounta_proxy_upstream_requests"
        for s in m.samples
    ]
    assert not [s for s in counted if not 100 <= int(s) <= 599]


# -- 20: route breakers of undocumented paths ------------------------------------------------


async def test_503s_on_one_undocumented_path_leave_the_other_undocumented_paths_alone(
    make_proxy: MakeProxy, tmp_path: Any
) -> None:
    async def handler(request: web.Request) -> web.Response:
        if request.path.startswith("/v1/broken"):
            return web.json_response({"error": "down"}, status=503)
        return web.json_response({"path": request.path})

    runner, url = await serve_handler(handler)
    retry = RetrySettings(attempts=1, breaker_failures=3, breaker_cooldown=60)
    cache = CacheSettings(enabled=False)
    p = await make_proxy(proxy_settings(url, tmp_path, retry=retry, cache=cache))
    try:
        for _ in range(7):
            await answer_of(p.url, request("GET", "/v1/broken/thing.json"))
        got = await answer_of(p.url, request("GET", "/v1/broken/thing.json"))
        assert (got.status, got.json()["error"]) == (503, "circuit_open")
        for path in ("/v1/elsewhere.json", "/v1/elsewhere/7.json", "/v1/companies/5/novel"):
            got = await answer_of(p.url, request("GET", path))
            assert got.status == 200, (path, got.body)
        # An id is no new route: the same undocumented resource shares its breaker.
        got = await answer_of(p.url, request("GET", "/v1/broken/other/9"))
        assert (got.status, got.json()["error"]) == (503, "circuit_open")
    finally:
        await runner.cleanup()


# -- 17: a streamed gzip body refused at its first chunk --------------------------------------


@pytest.mark.parametrize("accept", ["Accept-Encoding: gzip", "Accept-Encoding: identity"])
@pytest.mark.parametrize("storable", [False, True], ids=["no-store", "past-max_entry_size"])
async def test_a_streamed_gzip_body_refused_at_its_first_chunk_is_a_clean_502(
    raw_proxy: Any, caplog: pytest.LogCaptureFixture, accept: str, storable: bool
) -> None:
    packed = gzip.compress(noise(400_000))
    assert len(packed) > 128 * 1024  # streamed, not read whole
    caplog.set_level(logging.INFO, logger="kounta_proxy")
    headers = (GZ, FRESH) if storable else (GZ, "Cache-Control: no-store")
    cache = CacheSettings(max_entry_size=64 * 1024)
    _, p = await raw_proxy(
        reply(packed, *headers), upstream={"max_inflated_size": 50_000}, cache=cache
    )
    got = await answer_of(p.url, request("GET", "/v1/a", accept))
    assert got.status == 502, (got.status, got.headers)
    assert got.json()["error"] == "upstream_too_large"
    assert "max_inflated_size" in got.json()["error_description"]
    logged = [r.fields for r in caplog.records if r.getMessage() == "request"]  # type: ignore[attr-defined]
    assert [line["status"] for line in logged] == [502]


# -- 16: an upstream that echoes the account's secrets ----------------------------------------

SECRET = "client-secret-0123456789"


def echo_app(status: int, coding: str = "") -> Any:
    """An upstream that echoes the Authorization it got (decoded too, for Basic) in its
    body, in a header, and in a Location query, as a debugging gateway might."""

    async def handler(request: web.Request) -> web.Response:
        sent = request.headers.get("Authorization", "")
        credentials = sent.partition(" ")[2]
        if sent.startswith("Basic "):
            credentials += " " + base64.b64decode(credentials).decode()
        body = json.dumps(
            {"error": "echo", "error_description": f"you sent {sent} ({credentials})"}
        ).encode()
        headers = {
            "X-Debug-Auth": sent,
            "Location": f"https://api.kounta.com/v1/x?access_token={quote(credentials)}",
            "Content-Type": "application/json",
        }
        if coding:
            body, headers["Content-Encoding"] = gzip.compress(body), coding
        return web.Response(status=status, body=body, headers=headers)

    return handler


@pytest.mark.parametrize("mode", ["static", "basic"])
@pytest.mark.parametrize("coding", ["", "gzip"])
@pytest.mark.parametrize("status", [400, 500, 302])
async def test_the_accounts_secrets_never_reach_a_caller_from_an_upstream_echo(
    make_proxy: MakeProxy,
    tmp_path: Any,
    caplog: pytest.LogCaptureFixture,
    mode: str,
    coding: str,
    status: int,
) -> None:
    caplog.set_level(logging.DEBUG)
    runner, url = await serve_handler(echo_app(status, coding))
    if mode == "static":
        account = AccountSettings(mode="static", token=Secret(TOKEN), rate_per_minute=100_000)
        secrets = [TOKEN]
    else:
        account = AccountSettings(
            mode="basic", client_id="add-on", client_secret=Secret(SECRET), rate_per_minute=100_000
        )
        pair = base64.b64encode(f"add-on:{SECRET}".encode()).decode()
        secrets = [SECRET, pair]
    settings = proxy_settings(url, tmp_path, accounts={"main": account})
    p = await make_proxy(settings)
    try:
        for accept in ("Accept-Encoding: gzip", "Accept-Encoding: identity"):
            got = await answer_of(p.url, request("GET", "/v1/a", accept))
            assert got.status == status
            wire = b"\r\n".join(f"{n}: {v}".encode() for n, v in got.headers) + got.body
            if got.header("Content-Encoding") == "gzip":
                wire += gzip.decompress(got.body)
            for secret in secrets:
                assert secret.encode() not in wire, (secret, wire[:600])
                assert quote(secret, safe="").encode() not in wire
            assert b"[redacted]" in wire
    finally:
        await runner.cleanup()
    logged = "\n".join(r.getMessage() + repr(getattr(r, "fields", "")) for r in caplog.records)
    for secret in secrets:
        assert secret not in logged


async def test_a_2xx_body_passes_untouched_even_when_it_holds_the_token(
    make_proxy: MakeProxy, tmp_path: Any
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"note": f"token {TOKEN}"}, headers={"X-Echo": TOKEN})

    runner, url = await serve_handler(handler)
    p = await make_proxy(proxy_settings(url, tmp_path))
    try:
        got = await answer_of(p.url, request("GET", "/v1/a"))
    finally:
        await runner.cleanup()
    assert (got.status, got.json()) == (200, {"note": f"token {TOKEN}"})
    assert got.header("X-Echo") == "[redacted]"


# -- 6: callers that stop reading, and the pool the accounts share -----------------------------

KEY_A = "caller-a-key-0123456789"
KEY_B = "caller-b-key-0123456789"
BIG = 48 * 1024 * 1024  # far more than loopback socket buffers hold


class Streamer:
    """An upstream: /v1/big streams BIG bytes (no-store) as fast as it is read; anything
    else is a small JSON answer. Remembers when each big stream ended."""

    def __init__(self) -> None:
        self.open = 0
        self.peak = 0  # streams open at once, at most
        self.ended: list[float] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if not request.path.startswith("/v1/big"):
            return web.json_response({"path": request.path})
        out = web.StreamResponse(headers={"Cache-Control": "no-store"})
        out.content_length = BIG
        self.open += 1
        self.peak = max(self.peak, self.open)
        try:
            await out.prepare(request)
            piece = b"x" * 65536
            for _ in range(BIG // len(piece)):
                await out.write(piece)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.open -= 1
            self.ended.append(asyncio.get_running_loop().time())
        return out


async def stalled_reader(
    url: str, key: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    """A caller that asks for /v1/big, reads the head (its status is returned), then stops
    reading."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", int(url.rsplit(":", 1)[1])))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
    writer.write(request("GET", "/v1/big", f"X-Proxy-Key: {key}"))
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    return reader, writer, int(head.split(b" ", 2)[1])


def two_accounts(url: str, tmp_path: Any, **sections: Any) -> Any:
    token = "main-token-0123456789"
    accounts = {
        name: AccountSettings(mode="static", token=Secret(token), rate_per_minute=100_000)
        for name in ("main", "shop")
    }
    callers = {
        "a": CallerSettings(key=Secret(KEY_A), account="main"),
        "b": CallerSettings(key=Secret(KEY_B), account="shop"),
    }
    return proxy_settings(url, tmp_path, accounts=accounts, callers=callers, **sections)


async def test_stalled_readers_of_one_account_neither_pin_kounta_nor_starve_another(
    make_proxy: MakeProxy, tmp_path: Any
) -> None:
    """A pool-pinning attack, scaled down: pool_size 5, five callers of account A stop
    reading a streamed answer; B's requests still go through at once, B's breaker stays
    closed, and A's upstream connections are let go after server.send_timeout."""
    upstream = Streamer()
    runner, url = await serve_handler(upstream.handle)
    settings = two_accounts(
        url,
        tmp_path,
        upstream=UpstreamSettings(
            base_url=url, pool_size=5, total_timeout=4, read_timeout=3, connect_timeout=1
        ),
        retry=RetrySettings(attempts=1, breaker_failures=2, breaker_cooldown=30),
        server=ServerSettings(host="127.0.0.1", port=0, send_timeout=1.0),
    )
    p = await make_proxy(settings)
    loop = asyncio.get_running_loop()
    stalled = []
    try:
        for _ in range(5):
            stalled.append(await stalled_reader(p.url, KEY_A))
        for i in range(3):
            started = loop.time()
            got = await answer_of(p.url, request("GET", f"/v1/small/{i}", f"X-Proxy-Key: {KEY_B}"))
            assert got.status == 200
            assert loop.time() - started < 1.0  # it did not wait for a pool slot
        # A held its share of the pool (5 // 2 accounts) at most; a caller past it waited for
        # a slot to come free (as send_timeout cut the others off) or got 503 upstream_busy.
        assert upstream.peak == 2
        streamed = [status for *_, status in stalled if status == 200]
        assert {status for *_, status in stalled} <= {200, 503}
        assert len(streamed) >= 2
        # server.send_timeout: each stalled caller is cut off, and its upstream let go.
        for _ in range(100):
            if len(upstream.ended) == len(streamed):
                break
            await asyncio.sleep(0.1)
        assert (len(upstream.ended), upstream.open) == (len(streamed), 0)
        for reader, *_ in stalled:
            # The caller's connection is closed: what is left in buffers, then EOF.
            while await asyncio.wait_for(reader.read(1 << 20), 10):
                pass
        dropped = sample(p, "kounta_proxy_connections_dropped_total", {"reason": "send_timeout"})
        assert dropped == len(streamed)
        shop = sample(p, "kounta_proxy_breaker_state", {"account": "shop", "state": "closed"})
        assert shop == 1
    finally:
        for _, writer, _ in stalled:
            writer.close()
        await runner.cleanup()


async def test_waiting_for_a_pool_slot_is_503_upstream_busy_and_no_breaker_counts_it(
    make_proxy: MakeProxy, tmp_path: Any
) -> None:
    upstream = Streamer()
    runner, url = await serve_handler(upstream.handle)
    settings = two_accounts(
        url,
        tmp_path,
        upstream=UpstreamSettings(
            base_url=url, pool_size=4, account_pool_size=1, connect_timeout=0.5, read_timeout=5
        ),
        retry=RetrySettings(attempts=2, backoff_initial=0.01, breaker_failures=1),
        server=ServerSettings(host="127.0.0.1", port=0, send_timeout=30),
        cache=CacheSettings(enabled=False),
    )
    p = await make_proxy(settings)
    stalled = [await stalled_reader(p.url, KEY_A)]
    try:
        for _ in range(3):
            got = await answer_of(p.url, request("GET", "/v1/small", f"X-Proxy-Key: {KEY_A}"))
            assert (got.status, got.json()["error"]) == (503, "upstream_busy"), got.body
            assert got.header("Retry-After") is not None
        got = await answer_of(p.url, request("GET", "/v1/small", f"X-Proxy-Key: {KEY_B}"))
        assert got.status == 200  # the other account has its own share
        main = sample(p, "kounta_proxy_breaker_state", {"account": "main", "state": "closed"})
        assert main == 1
        assert sample(p, "kounta_proxy_breaker_routes_open", {"account": "main"}) == 0
    finally:
        for _, writer, _ in stalled:
            writer.close()
        await runner.cleanup()


# -- 12: one account's reads do not evict another's entries --------------------------------------


@pytest.mark.parametrize("tier", ["disk", "memory"])
async def test_one_accounts_large_reads_do_not_evict_another_accounts_entries(
    make_proxy: MakeProxy, tmp_path: Any, tier: str
) -> None:
    sent: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        sent.append(request.path)
        body = json.dumps({"path": request.path, "pad": "x" * 100_000}).encode()
        return web.Response(
            body=body, content_type="application/json", headers={"Cache-Control": "max-age=600"}
        )

    runner, url = await serve_handler(handler)
    if tier == "disk":  # no memory tier: every hit comes from disk
        cache = CacheSettings(max_size=3 * 1024**2, max_entry_size=256 * 1024, memory_size=0)
    else:  # a disk far larger than the memory tier: memory alone decides (the fast path)
        cache = CacheSettings(max_size=512 * 1024**2, memory_size=3 * 1024**2)
    p = await make_proxy(two_accounts(url, tmp_path, cache=cache))
    try:
        for i in range(5):
            got = await answer_of(p.url, request("GET", f"/v1/b/{i}", f"X-Proxy-Key: {KEY_B}"))
            assert (got.status, got.header("X-Cache")) == (200, "MISS")
        for i in range(60):  # 6 MB of account A: twice what the whole tier holds
            got = await answer_of(p.url, request("GET", f"/v1/a/{i}", f"X-Proxy-Key: {KEY_A}"))
            assert got.status == 200
        if tier == "memory":
            # Hits from disk look the same to a caller: the memory tier itself must hold them.
            store = p.app[SERVICES].store
            assert store is not None
            held = [k for k in store.hot.items if "/v1/b/" in k]
            assert len(held) == 5, len(held)
        upstream_before = len(sent)
        for i in range(5):
            got = await answer_of(p.url, request("GET", f"/v1/b/{i}", f"X-Proxy-Key: {KEY_B}"))
            assert (got.status, got.header("X-Cache")) == (200, "HIT"), i
        assert len(sent) == upstream_before
        # A still has its share: its most recent entries are hits.
        got = await answer_of(p.url, request("GET", "/v1/a/59", f"X-Proxy-Key: {KEY_A}"))
        assert got.header("X-Cache") == "HIT"
    finally:
        await runner.cleanup()


async def test_a_stalled_reader_never_holds_kounta_past_total_timeout(
    make_proxy: MakeProxy, tmp_path: Any
) -> None:
    """Even with a long server.send_timeout, the upstream exchange ends at total_timeout."""
    upstream = Streamer()
    runner, url = await serve_handler(upstream.handle)
    settings = two_accounts(
        url,
        tmp_path,
        upstream=UpstreamSettings(base_url=url, total_timeout=2, read_timeout=2),
        server=ServerSettings(host="127.0.0.1", port=0, send_timeout=60),
    )
    p = await make_proxy(settings)
    loop = asyncio.get_running_loop()
    started = loop.time()
    reader, writer, status = await stalled_reader(p.url, KEY_A)
    try:
        assert status == 200
        for _ in range(60):
            if upstream.ended:
                break
            await asyncio.sleep(0.1)
        assert upstream.ended and upstream.ended[0] - started < 3.5, upstream.ended
        # The caller then finds its answer broken off (never complete-looking).
        received = 0
        while chunk := await asyncio.wait_for(reader.read(1 << 20), 10):
            received += len(chunk)
        assert received < BIG
    finally:
        writer.close()
        await runner.cleanup()
