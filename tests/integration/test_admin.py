"""The admin listener and the metrics, over real sockets."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import json
import re
import socket
from asyncio.subprocess import PIPE, STDOUT
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.edge.services import SERVICES, Services
from proxy.ops.admin import create_admin_app, exposure_warning
from proxy.settings import AccountSettings, AdminSettings, Secret, UpstreamSettings
from tests.conftest import TOKEN, MakeProxy, Proxy, Sandbox, proxy_settings, serve
from tests.ops_tools import prometheus_tool

CALLER_SECRET = "caller-secret-0123456789"
ROUTE_LABEL = re.compile(r"(/(v1|[a-z_]+|\{id\}|\.\.\.))+|other")

StartAdmin = Callable[[Proxy], Awaitable[str]]


@pytest.fixture
async def start_admin() -> AsyncIterator[StartAdmin]:
    runners: list[web.AppRunner] = []

    async def start(proxy: Proxy) -> str:
        runner, port = await serve(create_admin_app(proxy.app[SERVICES]))
        runners.append(runner)
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def admin(proxy: Proxy, start_admin: StartAdmin) -> str:
    return await start_admin(proxy)


def series(registry: CollectorRegistry, prefix: str = "kounta_proxy_") -> set[tuple[Any, ...]]:
    return {
        (s.name, tuple(sorted(s.labels.items())))
        for family in registry.collect()
        for s in family.samples
        if s.name.startswith(prefix)
    }


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


# --------------------------------------------------------------------------- endpoints


async def test_healthz_and_readyz(admin: str, client: aiohttp.ClientSession) -> None:
    async with client.get(f"{admin}/healthz") as r:
        assert r.status == 200
        assert (await r.json())["status"] == "alive"
    async with client.get(f"{admin}/readyz") as r:
        assert r.status == 200
        body = await r.json()
    assert body["status"] == "ready"
    assert body["failing"] == []
    assert body["checks"]["shutdown"] == "ok"
    assert body["checks"]["token:main"] == "ok"


async def test_readyz_fails_without_a_usable_token(
    proxy: Proxy, admin: str, client: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    checks = proxy.app[SERVICES].checks
    monkeypatch.setitem(checks, "token:main", lambda: "no usable token: run kounta-proxy authorize")
    async with client.get(f"{admin}/readyz") as r:
        assert r.status == 503  # the only account: the proxy can serve nothing
        body = await r.json()
    assert body["failing"] == ["accounts"]
    assert body["degraded"] == ["token:main"]
    assert body["checks"]["token:main"] == "no usable token: run kounta-proxy authorize"


async def test_readyz_names_degraded_checks_without_failing(
    proxy: Proxy, admin: str, client: aiohttp.ClientSession
) -> None:
    ctx: Services = proxy.app[SERVICES]

    def broken() -> str | None:
        raise RuntimeError("boom")

    ctx.checks["token:other"] = lambda: "no usable token\nfor account other"
    ctx.checks["cache"] = lambda: None
    ctx.checks["broken"] = broken
    async with client.get(f"{admin}/readyz") as r:
        assert r.status == 200  # token:main still serves
        assert r.headers["Content-Type"].startswith("application/json")
        body = await r.json()
    assert (body["status"], body["failing"]) == ("ready", [])
    assert body["degraded"] == ["broken", "token:other"]
    assert body["checks"]["token:other"] == "no usable token for account other"
    assert body["checks"]["cache"] == "ok"
    assert "RuntimeError" in body["checks"]["broken"]


async def test_readyz_fails_once_shutting_down(
    proxy: Proxy, admin: str, client: aiohttp.ClientSession
) -> None:
    proxy.app[SERVICES].state.shutting_down = True
    async with client.get(f"{admin}/readyz") as r:
        assert r.status == 503
        assert (await r.json())["failing"] == ["shutdown"]
    async with client.get(f"{admin}/healthz") as r:
        assert r.status == 200


async def test_feature_admin_routes_are_served_with_the_shared_services(
    proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    async def stats(request: web.Request) -> web.Response:
        services = request.app[SERVICES]
        return web.json_response({"accounts": sorted(services.settings.accounts)})

    built = proxy.app[SERVICES]
    assert {r.path for r in built.admin_routes} == {"/budget", "/cache/stats", "/cache/purge"}
    extended = dataclasses.replace(
        built, admin_routes=(*built.admin_routes, web.get("/test/accounts", stats))
    )
    runner, port = await serve(create_admin_app(extended))
    try:
        async with client.get(f"http://127.0.0.1:{port}/test/accounts") as r:
            assert r.status == 200
            assert await r.json() == {"accounts": ["main"]}
    finally:
        await runner.cleanup()


async def test_each_port_serves_only_its_own_paths(
    proxy: Proxy, admin: str, sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    for path in ("/metrics", "/healthz", "/readyz"):
        async with client.get(f"{proxy.url}{path}") as r:
            assert r.status == 404, path
            assert (await r.json())["error"] == "not_found"
    async with client.get(f"{admin}/v1/companies/me.json") as r:
        assert r.status == 404
        assert (await r.json())["error"] == "not_found"
    async with client.post(f"{admin}/healthz") as r:
        assert r.status == 405
        assert (await r.json())["error"] == "method_not_allowed"
    assert sandbox.state.served() == 0


async def test_metrics_content_negotiation(admin: str, client: aiohttp.ClientSession) -> None:
    async with client.get(f"{admin}/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await r.text()
    assert "# TYPE kounta_proxy_requests_total counter" in text
    openmetrics = "application/openmetrics-text; version=1.0.0; charset=utf-8"
    async with client.get(f"{admin}/metrics", headers={"Accept": openmetrics}) as r:
        assert r.headers["Content-Type"].startswith("application/openmetrics-text")
        assert (await r.text()).rstrip().endswith("# EOF")
    async with (
        aiohttp.ClientSession(auto_decompress=False) as raw,
        raw.get(f"{admin}/metrics", headers={"Accept-Encoding": "gzip"}) as r,
    ):
        assert r.headers["Content-Encoding"] == "gzip"
        assert b"kounta_proxy_build_info" in gzip.decompress(await r.read())


# --------------------------------------------------------------------------- metric values


async def test_requests_and_upstream_are_counted(
    proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    async with client.get(f"{proxy.url}/v1/companies/5001/products.json") as r:
        first = (await r.json())[0]["id"]
    async with client.get(f"{proxy.url}/v1/companies/5001/products/{first}.json") as r:
        assert r.status == 200
    async with client.get(f"{proxy.url}/v1/companies/5001/products/999999999.json") as r:
        assert r.status == 404
    reg = proxy.registry
    route = "/v1/companies/{id}/products/{id}"
    counted = {
        (labels["status_class"], labels["cache"]): s.value
        for family in reg.collect()
        for s in family.samples
        if s.name == "kounta_proxy_requests_total"
        for labels in [s.labels]
        if labels["route"] == route and labels["method"] == "GET"
    }
    # The cache status label is whatever the cache layer reports (a miss here).
    assert sorted((k[0], v) for k, v in counted.items()) == [("2xx", 1), ("4xx", 1)]
    upstream = "kounta_proxy_upstream_requests_total"
    assert value(reg, upstream, method="GET", route=route, status="200", account="main") == 1
    assert value(reg, upstream, method="GET", route=route, status="404", account="main") == 1
    assert value(reg, "kounta_proxy_upstream_duration_seconds_count", route=route) == 2
    duration = "kounta_proxy_request_duration_seconds_count"
    for status_class, cache in counted:
        labels = {"method": "GET", "route": route, "status_class": status_class}
        assert value(reg, duration, **labels, cache=cache) == 1
    # Every caller-facing request is labelled with its account (anonymous on loopback here).
    accounts = {
        s.labels["account"]
        for family in reg.collect()
        for s in family.samples
        if s.name == "kounta_proxy_requests_total"
    }
    assert accounts == {"main"}
    callers = "kounta_proxy_caller_requests_total"
    assert value(reg, callers, caller="anonymous", account="main", status_class="4xx") == 1
    assert value(reg, callers, caller="anonymous", account="main", status_class="2xx") == 2
    assert value(reg, "kounta_proxy_requests_in_flight") == 0
    info = [s for s in series(reg) if s[0] == "kounta_proxy_build_info"]
    assert len(info) == 1
    assert {k for k, _ in info[0][1]} == {"version", "python", "aiohttp", "event_loop"}
    assert dict(info[0][1])["event_loop"] == "asyncio"  # pytest's loop (e2e: test_event_loop)


class TinyUpstream(asyncio.Protocol):
    """A keep-alive HTTP/1.1 server that answers every request with a JSON 404 at once.

    Far cheaper than the sandbox, so 10,000 requests through the real proxy stay quick.
    """

    ANSWER = (
        b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            _, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            self.transport.write(self.ANSWER)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def pipelined(port: int, paths: list[str], connections: int) -> list[int]:
    """GET every path over a few keep-alive connections, HTTP/1.1-pipelined.

    A bare client keeps the cost of 10,000 requests on the proxy's side, not the client's.
    """

    async def over_one_connection(chunk: list[str]) -> list[int]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        auth = f"Authorization: Bearer {CALLER_SECRET}"
        writer.write(
            b"".join(f"GET {p} HTTP/1.1\r\nHost: t\r\n{auth}\r\n\r\n".encode() for p in chunk)
        )
        statuses = []
        for _ in chunk:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = re.search(rb"(?im)^content-length: *(\d+)", head)
            assert length is not None, head
            await reader.readexactly(int(length.group(1)))
            statuses.append(int(head.split(b" ", 2)[1]))
        writer.close()
        await writer.wait_closed()
        return statuses

    chunks = [paths[i::connections] for i in range(connections)]
    results = await asyncio.gather(*(over_one_connection(c) for c in chunks))
    return [status for result in results for status in result]


# A load test: thousands of requests down paths other tests cover too, so coverage (which
# more than doubles its CPU time) is not traced while it runs (pytest-cov's no_cover).
@pytest.mark.no_cover
@pytest.mark.slow
async def test_series_stay_bounded_over_10000_distinct_ids(
    make_proxy: MakeProxy, tmp_path: Any
) -> None:
    loop = asyncio.get_running_loop()
    tiny = await loop.create_server(TinyUpstream, "127.0.0.1", 0)
    port = tiny.sockets[0].getsockname()[1]
    # The whole rate as burst: the budget keeps no spread log to walk per send (at 10,000
    # sends in the window that walk was most of the test's time), and the test is of labels.
    unpaced = AccountSettings(
        mode="static", token=Secret(TOKEN), rate_per_minute=100_000, burst=100_000
    )
    settings = proxy_settings(f"http://127.0.0.1:{port}", tmp_path, accounts={"main": unpaced})
    proxy = await make_proxy(settings)
    templates = (
        "/v1/companies/5001/products/{}.json",
        "/v1/companies/{}/customers/{}.json",
        "/v1/companies/5001/orders/{}",
        "/v1/{}/x{}",
    )
    paths = [f"{templates[i % len(templates)].format(i, i)}?cursor={i}" for i in range(10_000)]
    try:
        statuses = await pipelined(port_of(proxy.url), paths[:40], connections=4)
        early = len(series(proxy.registry))
        statuses += await pipelined(port_of(proxy.url), paths[40:], connections=16)
    finally:
        tiny.close()
    assert statuses.count(404) == 10_000
    late = series(proxy.registry)
    assert len(late) == early, "new series appeared for new ids"
    assert len(late) < 1000
    # The configuration's hash (kounta_proxy_config_info) is 16 hex digits: no id, but it
    # may hold four decimal digits in a row.
    labels = {v for _, pairs in late for k, v in pairs if k != "hash"}
    routes = {v for _, pairs in late for k, v in pairs if k == "route"}
    assert all(ROUTE_LABEL.fullmatch(r) for r in routes), routes
    assert not [v for v in labels if re.search(r"\d{4,}", v) and "." not in v]
    for secret in (TOKEN, CALLER_SECRET, "Bearer"):
        assert not [v for v in labels if secret in v]


@pytest.mark.parametrize("kind", ["connect", "timeout", "reset", "tls"])
async def test_upstream_errors_by_kind(
    make_proxy: MakeProxy,
    sandbox: Sandbox,
    tmp_path: Any,
    client: aiohttp.ClientSession,
    kind: str,
) -> None:
    base = sandbox.url
    if kind == "connect":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again: refused
    elif kind == "tls":
        base = sandbox.url.replace("http://", "https://")  # TLS to a plain-HTTP port
    elif kind == "timeout":
        sandbox.state.inject_latency(0.6, count=None)  # retries fail too
    else:
        sandbox.state.inject_drop(count=None)
    upstream = UpstreamSettings(base_url=base, connect_timeout=2, read_timeout=0.2, total_timeout=5)
    proxy = await make_proxy(
        dataclasses.replace(proxy_settings(sandbox.url, tmp_path), upstream=upstream)
    )
    async with client.get(f"{proxy.url}/v1/companies/me.json") as r:
        assert r.status in (502, 504)
        assert r.headers["X-Proxy-Error"] == "1"
    errors = "kounta_proxy_upstream_errors_total"
    assert value(proxy.registry, errors, kind=kind, account="main") >= 1
    others = [k for k in ("connect", "timeout", "reset", "tls") if k != kind]
    assert all(value(proxy.registry, errors, kind=k, account="main") == 0 for k in others)


# --------------------------------------------------------------------------- promtool


async def test_promtool_accepts_a_real_scrape(
    proxy: Proxy, admin: str, client: aiohttp.ClientSession
) -> None:
    promtool = prometheus_tool("promtool")
    async with client.get(f"{proxy.url}/v1/companies/5001/products.json") as r:
        await r.read()
    async with client.get(f"{admin}/metrics") as r:
        scrape = await r.read()
    assert b"kounta_proxy_requests_total{" in scrape
    check = await asyncio.create_subprocess_exec(
        promtool, "check", "metrics", stdin=PIPE, stdout=PIPE, stderr=STDOUT
    )
    out, _ = await asyncio.wait_for(check.communicate(scrape), 30)
    assert check.returncode == 0, out.decode()


async def test_cache_purge_refuses_an_unknown_account(
    admin: str, client: aiohttp.ClientSession
) -> None:
    async with client.post(f"{admin}/cache/purge?account=mian") as r:
        assert r.status == 400
        body = await r.json()
    assert body["error"] == "invalid_request"
    assert body["error_description"] == ("no account named 'mian' in the settings (accounts: main)")
    async with client.post(f"{admin}/cache/purge?account=main") as r:
        assert (r.status, await r.json()) == (200, {"purged": 0})


async def test_cache_gauges_are_current_at_scrape_time(
    proxy: Proxy, admin: str, client: aiohttp.ClientSession
) -> None:
    async def scraped() -> dict[str, float]:
        async with client.get(f"{admin}/metrics") as r:
            text = await r.text()
        found = {}
        for line in text.splitlines():
            name, _, number = line.partition(" ")
            if name in ("kounta_proxy_cache_entries", "kounta_proxy_cache_bytes"):
                found[name] = float(number)
        assert "_created" not in text and "process_open_fds" in text
        return found

    assert (await scraped())["kounta_proxy_cache_entries"] == 0
    for path in ("/v1/companies/me.json", "/v1/companies/5001/sites.json"):
        async with client.get(f"{proxy.url}{path}") as r:
            assert r.status == 200
    for _ in range(100):  # the store writes behind the answer, on its own thread
        now = await scraped()
        if now["kounta_proxy_cache_entries"] == 2:
            break
        await asyncio.sleep(0.02)
    assert now["kounta_proxy_cache_entries"] == 2  # no /cache/stats call needed
    assert now["kounta_proxy_cache_bytes"] > 0
    async with client.post(f"{admin}/cache/purge") as r:
        assert r.status == 200
    assert (await scraped())["kounta_proxy_cache_entries"] == 0


# --------------------------------------------------------------------------- hostile browsers


async def admin_raw(url: str, method: str, path: str, *lines: str, body: bytes = b"") -> Any:
    """One request with exactly the Host/Origin a browser would send (aiohttp sets its own)."""
    port = int(url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = [f"{method} {path} HTTP/1.1", *lines, f"Content-Length: {len(body)}"]
    writer.write(("\r\n".join([*head, "Connection: close"]) + "\r\n\r\n").encode() + body)
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head_bytes, _, payload = data.partition(b"\r\n\r\n")
    status = int(head_bytes.split(b" ")[1])
    assert b"\r\nServer: kounta-proxy\r\n" in head_bytes, head_bytes
    return status, payload


async def stored_entries(admin: str) -> int:
    status, payload = await admin_raw(admin, "GET", "/cache/stats", "Host: localhost")
    assert status == 200
    return int(json.loads(payload)["entries"])


@pytest.mark.parametrize(
    "host", ["localhost", "localhost:9464", "127.0.0.1:1", "[::1]:9464", "LOCALHOST"]
)
async def test_loopback_hosts_are_answered(admin: str, host: str) -> None:
    for path in ("/metrics", "/budget", "/readyz"):
        status, _ = await admin_raw(admin, "GET", path, f"Host: {host}")
        assert status == 200, (path, host)


@pytest.mark.parametrize("host", ["evil.example", "evil.example:9464", "127.0.0.1.evil.example"])
async def test_a_foreign_host_is_refused_dns_rebinding(admin: str, host: str) -> None:
    for path in ("/budget", "/cache/stats"):  # probes and /metrics answer any Host
        status, payload = await admin_raw(admin, "GET", path, f"Host: {host}")
        assert status == 403
        assert json.loads(payload)["error"] == "access_denied"


@pytest.mark.parametrize(
    "lines",
    [
        ("Origin: http://evil.example",),
        ("Origin: null",),
        ("Content-Type: application/x-www-form-urlencoded",),
        ("Content-Type: multipart/form-data; boundary=x",),
        ("Content-Type: text/plain;charset=UTF-8",),
        ("Sec-Fetch-Site: cross-site",),
        ("Host: evil.example",),
    ],
    ids=["origin", "null-origin", "urlencoded", "multipart", "text-plain", "fetch-site", "host"],
)
async def test_cross_site_purges_are_refused(
    proxy: Proxy, admin: str, client: aiohttp.ClientSession, lines: tuple[str, ...]
) -> None:
    async with client.get(f"{proxy.url}/v1/companies/5001/products.json") as r:
        assert r.status == 200
    entries = await stored_entries(admin)
    assert entries >= 1
    headers = lines if any(line.startswith("Host") for line in lines) else ("Host: 127.0.0.1",)
    headers = (*headers, *(line for line in lines if not line.startswith("Host")))
    status, payload = await admin_raw(admin, "POST", "/cache/purge", *headers, body=b"prefix=/")
    assert status == 403
    assert json.loads(payload)["error"] == "access_denied"
    assert await stored_entries(admin) == entries
    # The same purge from a local tool (curl -X POST) works.
    status, payload = await admin_raw(
        admin, "POST", "/cache/purge", "Host: 127.0.0.1:9464", "Origin: http://127.0.0.1:9464"
    )
    assert (status, json.loads(payload)["purged"]) == (200, entries)


async def test_configured_host_names_are_answered(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, start_admin: StartAdmin
) -> None:
    admin_settings = AdminSettings(allowed_hosts=("localhost", "kounta-proxy", "10.0.0.0/8"))
    proxy = await make_proxy(proxy_settings(sandbox.url, tmp_path, admin=admin_settings))
    admin = await start_admin(proxy)
    assert (await admin_raw(admin, "GET", "/budget", "Host: kounta-proxy:9464"))[0] == 200
    assert (await admin_raw(admin, "GET", "/budget", "Host: [::1]"))[0] == 403
    assert (await admin_raw(admin, "GET", "/budget", "Host: 127.0.0.1"))[0] == 200  # admin.host
    assert (await admin_raw(admin, "GET", "/budget", "Host: 10.1.2.3:9464"))[0] == 200
    assert (await admin_raw(admin, "GET", "/budget", "Host: 11.1.2.3:9464"))[0] == 403
    assert exposure_warning(admin_settings) is None
    warning = exposure_warning(AdminSettings(host="0.0.0.0"))
    assert warning is not None and "beyond loopback" in warning
