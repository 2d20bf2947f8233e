"""Hostile callers against a real proxy and a recording upstream: metric labels that stay bounded,
slow and idle connections, the header allowlist, path tricks, repeated or undecodable headers.

The upstream records every request it gets and answers a fresh, cacheable JSON body that
names the page it was asked for, so a test can tell both what reached Kounta and which
answer a caller got (from the cache's long way or from the fast path).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from proxy.edge.services import SERVICES
from proxy.headers import DEFAULT_FORWARDED
from proxy.ops.admin import create_admin_app
from proxy.routes import LABELS
from proxy.settings import (
    AccountSettings,
    CallerSettings,
    Secret,
    ServerSettings,
    Settings,
    UpstreamSettings,
)
from tests.conftest import TOKEN, MakeProxy, Proxy, proxy_settings, serve

KEY = "hostile-callers-key-0123456789"
WORDS = ("v1", "companies", "me", "orders", "sites", "products", "complete", "accounts", "base")


@dataclasses.dataclass
class Recorded:
    method: str
    path_qs: str
    headers: CIMultiDictProxy[str]


class Upstream:
    """Records requests; answers 200 JSON naming X-Page, fresh for a minute (``/nostore``
    paths: no-store; ``/vary`` paths: Vary: X-Shop)."""

    def __init__(self) -> None:
        self.seen: list[Recorded] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(Recorded(request.method, request.path_qs, request.headers))
        headers = {"Cache-Control": "no-store" if "nostore" in request.path_qs else "max-age=60"}
        headers["ETag"] = f'"{request.headers.get("X-Page", "-")}"'
        if "vary" in request.path:
            headers["Vary"] = "X-Shop"
        body = {"page": request.headers.get("X-Page"), "shop": request.headers.get("X-Shop")}
        return web.json_response(body, headers=headers)


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    recorder = Upstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recorder.handle)
    runner, port = await serve(app)
    recorder.url = f"http://127.0.0.1:{port}"
    yield recorder
    await runner.cleanup()


def settings_for(upstream: Upstream, tmp_path: Any, **upstream_fields: Any) -> Settings:
    """Two accounts and one caller key: a request without the key is refused. X-Shop is
    forwarded (the upstream varies on it)."""
    upstream_fields.setdefault("forward_headers", (*DEFAULT_FORWARDED, "X-Shop"))
    static = AccountSettings(mode="static", token=Secret(TOKEN), rate_per_minute=100_000)
    return proxy_settings(
        upstream.url,
        tmp_path,
        upstream=UpstreamSettings(base_url=upstream.url, **upstream_fields),
        accounts={"main": static, "second": static},
        default_account="main",
        callers={"svc": CallerSettings(key=Secret(KEY), account="main")},
    )


@pytest.fixture
async def proxy(make_proxy: MakeProxy, upstream: Upstream, tmp_path: Any) -> Proxy:
    return await make_proxy(settings_for(upstream, tmp_path))


async def raw(port: int, request: bytes) -> tuple[int, dict[str, Any]]:
    """One request over its own connection, byte for byte as given."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body) if body else {}


def port_of(proxy: Proxy) -> int:
    return int(proxy.url.rsplit(":", 1)[1])


def get(target: str, *lines: str, key: bool = True) -> bytes:
    auth = [f"X-Proxy-Key: {KEY}"] if key else []
    head = [f"GET {target} HTTP/1.1", "Host: t", *auth, *lines, "Connection: close"]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")


# --------------------------------------------------------------------------- metric labels


async def pipelined(port: int, requests: list[bytes], connections: int = 8) -> list[int]:
    """Send every request over a few keep-alive connections, HTTP/1.1-pipelined."""

    async def one(chunk: list[bytes]) -> list[int]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"".join(chunk))
        statuses = []
        for _ in chunk:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = re.search(rb"(?im)^content-length: *(\d+)", head)
            assert length is not None, head
            await reader.readexactly(int(length.group(1)))
            statuses.append(int(head.split(b" ", 2)[1]))
        writer.close()
        return statuses

    chunks = [requests[i::connections] for i in range(connections)]
    return [s for result in await asyncio.gather(*(one(c) for c in chunks)) for s in result]


def keep_alive(method: str, target: str, key: str | None) -> bytes:
    auth = f"X-Proxy-Key: {key}\r\n" if key else ""
    return f"{method} {target} HTTP/1.1\r\nHost: t\r\n{auth}\r\n".encode()


def hostile_requests(rng: random.Random, n: int) -> list[bytes]:
    """Keyless, wrong-key, odd-method and keyed requests for paths made of Kounta's words."""

    def words(depth: int) -> str:
        return "/".join(rng.choice([*WORDS, str(rng.randrange(10**9))]) for _ in range(depth))

    out = []
    for i in range(n):
        kind = i % 5
        if kind == 0:  # no key: refused
            out.append(keep_alive("GET", f"/v1/{words(rng.randrange(1, 10))}", None))
        elif kind == 1:  # a wrong key: refused
            out.append(keep_alive("GET", f"/v1/{words(rng.randrange(1, 10))}", "x" * 20))
        elif kind == 2:  # a method the proxy does not serve: refused before the caller is known
            method = rng.choice(["TRACE", "PROPFIND", "MKCOL", "LOCK", "PURGE", "SEARCH"])
            out.append(keep_alive(method, f"/v1/{words(3)}", KEY))
        elif kind == 3:  # keyed, known words in an undocumented shape
            target = f"/v1/companies/{rng.randrange(10**6)}/x/{words(rng.randrange(1, 6))}/nostore"
            out.append(keep_alive("GET", target, KEY))
        else:  # keyed, one documented route with fresh ids each time
            target = f"/v1/companies/{rng.randrange(10**6)}/products/{rng.randrange(10**9)}.json"
            out.append(keep_alive("GET", target + "?nostore=1", KEY))
    return out


async def scrape(admin: str) -> list[str]:
    async with aiohttp.ClientSession() as session, session.get(f"{admin}/metrics") as r:
        text = await r.text()
    return [line for line in text.splitlines() if line and not line.startswith("#")]


# A load test: thousands of requests down paths other tests cover too, so coverage (which
# more than doubles its CPU time) is not traced while it runs (pytest-cov's no_cover).
@pytest.mark.no_cover
async def test_random_paths_keyed_or_not_leave_the_series_count_unchanged(
    proxy: Proxy,
) -> None:
    runner, admin_port = await serve(create_admin_app(proxy.app[SERVICES]))
    admin = f"http://127.0.0.1:{admin_port}"
    rng = random.Random(11)
    try:
        warm = await pipelined(port_of(proxy), hostile_requests(rng, 10), connections=1)
        before = await scrape(admin)
        statuses = await pipelined(port_of(proxy), hostile_requests(rng, 3000))
        after = await scrape(admin)
    finally:
        await runner.cleanup()
    assert sorted(set(warm)) == sorted(set(statuses)) == [200, 401, 405]
    requests = [line for line in after if line.startswith("kounta_proxy_requests_total")]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in requests) >= 3010
    names = lambda lines: [line.rsplit(" ", 1)[0] for line in lines]  # noqa: E731
    assert len(after) == len(before), set(names(after)) - set(names(before))
    routes = set(re.findall(r'route="([^"]*)"', "\n".join(after)))
    methods = set(re.findall(r'method="([^"]*)"', "\n".join(after)))
    assert routes <= LABELS, routes - LABELS
    assert {"refused", "other", "/v1/companies/{id}/products/{id}"} <= routes
    assert methods == {"GET", "OTHER"}


# --------------------------------------------------------------------------- header allowlist

OVERRIDES = (
    "X-Original-URL",
    "X-Rewrite-URL",
    "X-Host",
    "X-Forwarded-Host",
    "X-Forwarded-Server",
    "X-HTTP-Method-Override",
    "X-Method-Override",
    "X-Forwarded-For",
    "Forwarded",
)
ALLOWED = {
    "Accept": "application/json",
    "X-Page": "2",
    "X-Pretty-Print": "1",
    "User-Agent": "pos-sync/1.0",
    "If-Match": '"x"',
    "Cache-Control": "no-cache",
}


async def test_only_allowlisted_headers_reach_kounta(proxy: Proxy, upstream: Upstream) -> None:
    lines = [f"{k}: {v}" for k, v in ALLOWED.items()]
    lines += [f"{name}: /admin" for name in OVERRIDES] + ["X-Custom: 1", "Cookie: a=b"]
    status, _ = await raw(port_of(proxy), get("/v1/companies/5/nostore", *lines))
    assert status == 200
    sent = upstream.seen[-1].headers
    for name in (*OVERRIDES, "X-Custom", "Cookie", "X-Proxy-Key"):
        assert name not in sent, name
    for name, value in ALLOWED.items():
        assert sent[name] == value
    assert sent["Authorization"] == f"Bearer {TOKEN}"
    assert upstream.seen[-1].method == "GET"
    assert upstream.seen[-1].path_qs == "/v1/companies/5/nostore"


async def test_kounta_is_asked_for_gzip_whatever_the_caller_accepts(
    proxy: Proxy, upstream: Upstream
) -> None:
    """The proxy's own Accept-Encoding replaces the caller's (never forwarded as is), and a
    range is asked plain (a range of a gzip stream can be neither checked nor inflated)."""
    for accept in ("br", "identity", "gzip;q=0", "x-evil, deflate", "gzip"):
        lines = ("Accept-Encoding: zstd", f"Accept-Encoding: {accept}")
        status, _ = await raw(port_of(proxy), get("/v1/companies/5/nostore", *lines))
        assert status == 200
        assert upstream.seen[-1].headers.getall("Accept-Encoding") == ["gzip"], accept
    ranged = get("/v1/companies/5/nostore", "Range: bytes=0-3", "Accept-Encoding: gzip")
    await raw(port_of(proxy), ranged)
    assert upstream.seen[-1].headers.getall("Accept-Encoding") == ["identity"]
    assert upstream.seen[-1].headers["Range"] == "bytes=0-3"


async def test_a_configured_header_is_forwarded_and_a_post_keeps_its_body(
    make_proxy: MakeProxy, upstream: Upstream, tmp_path: Any
) -> None:
    wider = (*DEFAULT_FORWARDED, "X-Custom")
    proxy = await make_proxy(settings_for(upstream, tmp_path, forward_headers=wider))
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{proxy.url}/v1/companies/5/orders",
            json={"a": 1},
            headers={"X-Proxy-Key": KEY, "X-Custom": "yes", "X-HTTP-Method-Override": "DELETE"},
        ) as r,
    ):
        assert r.status == 200
    sent = upstream.seen[-1]
    assert (sent.method, sent.headers["X-Custom"]) == ("POST", "yes")
    assert sent.headers["Content-Type"] == "application/json"
    assert "X-HTTP-Method-Override" not in sent.headers


# --------------------------------------------------------------------------- path tricks


@pytest.mark.parametrize(
    "target",
    [
        "/v1/%252e%252e/admin",
        "/v1/a%252Fb",
        "/v1/a%255c",
        "/v1/%c0%ae%c0%ae/x",
        "/v1/%e0%80%af",
        # dot segments with path parameters (servlet stacks drop ";...")
        "/v1/companies/..;/admin",
        "/v1/companies/5/.;/orders",
        "/v1/companies/..;x=1/admin",
        "/v1/companies/%2e%2e;/admin",
    ],
)
async def test_encoded_path_tricks_are_refused_before_kounta(
    proxy: Proxy, upstream: Upstream, target: str
) -> None:
    status, body = await raw(port_of(proxy), get(target))
    assert (status, body["error"]) == (400, "invalid_request_target")
    assert upstream.seen == []


# --------------------------------------------------------------------------- repeated headers


async def fill(proxy: Proxy, path: str, *lines: str) -> dict[str, Any]:
    """Store a fresh answer (twice: the second is served from memory) and return it."""
    for _ in range(2):
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy))
        writer.write(get(path, *lines))
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    assert b"X-Cache: HIT" in data, data
    return dict(json.loads(data.partition(b"\r\n\r\n")[2]))


@pytest.mark.parametrize("stored", [False, True], ids=["long_way", "fast_path"])
@pytest.mark.parametrize(
    "lines",
    [
        ("X-Page: 1", "X-Page: 9"),
        ("Accept: application/json", "Accept: text/html"),
        ("X-Pretty-Print: 1", "x-pretty-print: 0"),
    ],
)
async def test_repeated_selecting_headers_are_refused(
    proxy: Proxy, upstream: Upstream, stored: bool, lines: tuple[str, str]
) -> None:
    if stored:
        assert (await fill(proxy, "/v1/companies/5/orders", lines[0]))["page"] in (None, "1")
    seen = len(upstream.seen)
    status, body = await raw(port_of(proxy), get("/v1/companies/5/orders", *lines))
    assert (status, body["error"]) == (400, "repeated_header")
    assert lines[0].split(":")[0].lower() in body["error_description"].lower()
    assert len(upstream.seen) == seen
    if stored:  # the stored answer is still the one for its own single value
        assert (await fill(proxy, "/v1/companies/5/orders", lines[0]))["page"] in (None, "1")


async def test_a_repeated_header_the_stored_answer_varies_on_is_refused(
    proxy: Proxy, upstream: Upstream
) -> None:
    assert (await fill(proxy, "/v1/companies/5/vary", "X-Shop: a"))["shop"] == "a"
    seen = len(upstream.seen)
    status, body = await raw(port_of(proxy), get("/v1/companies/5/vary", "X-Shop: a", "X-Shop: b"))
    assert (status, body["error"]) == (400, "repeated_header")
    assert len(upstream.seen) == seen


@pytest.mark.parametrize("stored", [False, True], ids=["long_way", "fast_path"])
@pytest.mark.parametrize("value", [b"caf\xe9", b"\xc0\xae", b"\xff\xfe"])
async def test_header_values_that_are_not_utf8_are_refused(
    proxy: Proxy, upstream: Upstream, stored: bool, value: bytes
) -> None:
    if stored:
        await fill(proxy, "/v1/companies/5/products")
    seen = len(upstream.seen)
    request = get("/v1/companies/5/products", "User-Agent: X").replace(b": X", b": " + value)
    status, body = await raw(port_of(proxy), request)
    assert (status, body["error"]) == (400, "invalid_header_value")
    assert "User-Agent" in body["error_description"]
    assert len(upstream.seen) == seen


# --------------------------------------------------------------------------- slowloris


async def test_trickling_connections_are_cut_and_capped(
    make_proxy: MakeProxy, upstream: Upstream, tmp_path: Any
) -> None:
    server = ServerSettings(host="127.0.0.1", port=0, header_timeout=0.4, max_connections=40)
    proxy = await make_proxy(dataclasses.replace(settings_for(upstream, tmp_path), server=server))
    port = port_of(proxy)
    loop = asyncio.get_running_loop()

    async def trickle() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /v1/companies/5/orders HTTP/1.1\r\nHost: t\r\n")
            for i in range(20):  # a header line every 0.1 s: never a complete head in time
                try:
                    answer = await asyncio.wait_for(reader.read(), 0.1)
                except TimeoutError:
                    writer.write(f"X-Slow-{i}: 1\r\n".encode())
                    continue
                return answer
            return b"still open"
        except ConnectionError:
            return b"reset"
        finally:
            writer.close()

    started = loop.time()
    answers = await asyncio.gather(*(trickle() for _ in range(50)))
    took = loop.time() - started
    statuses = sorted(a.split(b" ", 2)[1] if a.startswith(b"HTTP/1.1") else a for a in answers)
    assert statuses.count(b"408") == 40, statuses
    assert len(statuses) - statuses.count(b"408") == 10  # 503 at once (or reset mid-write)
    assert took < 2.0  # 20 lines at 0.1 s would take 2 s if the trickle kept them open
    dropped = "kounta_proxy_connections_dropped_total"
    registry = proxy.registry
    assert registry.get_sample_value(dropped, {"reason": "header_timeout"}) == 40
    assert registry.get_sample_value(dropped, {"reason": "max_connections"}) == 10
    # The listener is free again for real callers.
    status, _ = await raw(port, get("/v1/companies/5/nostore"))
    assert status == 200
    assert registry.get_sample_value("kounta_proxy_connections_open") == 0


# --------------------------------------------------------------------------- idle keep-alives


async def test_idle_keyless_keep_alives_cannot_lock_callers_out(
    make_proxy: MakeProxy, upstream: Upstream, tmp_path: Any
) -> None:
    """Connections that sent `OPTIONS *` (no key needed) and then idled on
    keep-alive filled max_connections; a keyed caller now takes the oldest idle one's place."""
    server = ServerSettings(host="127.0.0.1", port=0, max_connections=6)
    proxy = await make_proxy(dataclasses.replace(settings_for(upstream, tmp_path), server=server))
    port = port_of(proxy)
    idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(6)]
    try:
        for reader, writer in idle:
            writer.write(b"OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n")
            answer = await asyncio.wait_for(reader.readuntil(b"]}"), 5)
            assert answer.startswith(b"HTTP/1.1 200"), answer
        for _ in range(3):  # each newcomer that stays closes one idle connection, oldest first
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            idle.append((reader, writer))
            writer.write(get("/v1/companies/5/nostore").replace(b"close", b"keep-alive"))
            answer = await asyncio.wait_for(reader.readuntil(b"}"), 5)
            assert answer.startswith(b"HTTP/1.1 200"), answer
        for reader, _ in idle[:3]:
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed without a word
        for reader, _ in idle[3:]:
            with pytest.raises(TimeoutError):  # still open, newcomers included
                await asyncio.wait_for(reader.read(), 0.1)
    finally:
        for _, writer in idle:
            writer.close()
    dropped = "kounta_proxy_connections_dropped_total"
    assert proxy.registry.get_sample_value(dropped, {"reason": "keepalive_evicted"}) == 3
    assert proxy.registry.get_sample_value(dropped, {"reason": "max_connections"}) == 0
