"""The proxy in front of the sandbox, over real sockets."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.headers import DEFAULT_FORWARDED
from proxy.settings import ServerSettings, UpstreamSettings
from tests.conftest import MakeProxy, Proxy, Sandbox, proxy_settings, serve, serve_handler


async def get_json(
    client: aiohttp.ClientSession, url: str, **kw: Any
) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with client.get(url, **kw) as r:
        return r.status, await r.json(content_type=None), r


async def test_get_is_forwarded_with_the_accounts_token(
    proxy: Proxy, sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    status, body, r = await get_json(
        client, f"{proxy.url}/v1/companies/me.json", headers={"Authorization": "Bearer caller-own"}
    )
    assert status == 200, body
    assert body["id"] == 5001
    assert r.headers["ETag"]
    assert r.headers["X-Request-ID"]
    assert sandbox.state.served("GET", "/v1/companies/me.json") == 1


async def test_paging_urls_point_back_at_the_proxy(
    proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    url = f"{proxy.url}/v1/companies/5001/customers.json"
    seen: list[int] = []
    pages = 0
    while url:
        async with client.get(url) as r:
            assert r.status == 200
            seen.extend(item["id"] for item in await r.json())
            url = r.headers.get("X-Next-Page", "")
            if url:
                assert url.startswith(proxy.url + "/v1/"), url
        pages += 1
    assert pages > 2
    assert len(seen) == len(set(seen)) == 1000


async def test_public_url_setting_is_used_for_rewriting(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    settings = proxy_settings(
        sandbox.url,
        tmp_path,
        server=ServerSettings(host="127.0.0.1", port=0, public_url="https://kounta-proxy.internal"),
    )
    p = await make_proxy(settings)
    async with client.get(f"{p.url}/v1/companies/5001/products.json") as r:
        assert r.headers["X-Next-Page"].startswith(
            "https://kounta-proxy.internal/v1/companies/5001/products"
        )


async def test_post_location_is_rewritten(proxy: Proxy, client: aiohttp.ClientSession) -> None:
    async with client.post(
        f"{proxy.url}/v1/companies/5001/customers.json",
        json={"first_name": "Ada", "last_name": "L"},
    ) as r:
        assert r.status == 201
        location = r.headers["Location"]
    assert location.startswith(proxy.url + "/v1/companies/5001/customers/")
    async with client.get(location) as r:
        assert r.status == 200
        assert (await r.json())["first_name"] == "Ada"


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
async def test_partial_update_and_delete(
    proxy: Proxy, client: aiohttp.ClientSession, method: str
) -> None:
    url = f"{proxy.url}/v1/companies/5001/customers/"
    async with client.get(f"{proxy.url}/v1/companies/5001/customers.json") as r:
        first = (await r.json())[0]["id"]
    async with client.request(method, f"{url}{first}.json", json={"first_name": "Grace"}) as r:
        assert r.status == 200
        assert (await r.json())["first_name"] == "Grace"
    async with client.delete(f"{url}{first}.json") as r:
        assert r.status == 204
    async with client.get(f"{url}{first}.json") as r:
        assert r.status == 404
        body = await r.json()
        assert body["error"] == "not_found"


async def test_repeated_headers_and_hop_by_hop(
    make_proxy: MakeProxy, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    seen: list[list[tuple[str, str]]] = []

    async def echo(request: web.Request) -> web.Response:
        seen.append(list(request.headers.items()))
        resp = web.Response(text="[]", content_type="application/json")
        resp.headers.add("X-Multi", "1")
        resp.headers.add("X-Multi", "2")
        resp.headers["Keep-Alive"] = "timeout=5"
        return resp

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    runner, port = await serve(app)
    try:
        base = f"http://127.0.0.1:{port}"
        # Both allowed, so that only repetition and Connection decide here.
        forward = (*DEFAULT_FORWARDED, "X-Tag", "X-Drop")
        upstream = UpstreamSettings(base_url=base, forward_headers=forward)
        p = await make_proxy(proxy_settings(base, tmp_path, upstream=upstream))
        headers = [
            ("X-Tag", "a"),
            ("X-Tag", "b"),
            ("Connection", "X-Drop"),
            ("X-Drop", "1"),
            ("Authorization", "Bearer mine"),
            ("Proxy-Authorization", "x"),
        ]
        async with client.get(f"{p.url}/v1/x", headers=headers) as r:
            assert r.headers.getall("X-Multi") == ["1", "2"]
            assert "Keep-Alive" not in r.headers
        sent = seen[0]
        names = [n.lower() for n, _ in sent]
        assert [v for n, v in sent if n == "X-Tag"] == ["a", "b"]
        assert "x-drop" not in names and "proxy-authorization" not in names
        assert dict(sent)["Authorization"] == "Bearer sandbox-token"
        assert dict(sent)["Host"] == f"127.0.0.1:{port}"
        assert dict(sent)["X-Request-ID"]
    finally:
        await runner.cleanup()


async def test_request_id_is_kept_or_made(proxy: Proxy, client: aiohttp.ClientSession) -> None:
    async with client.get(
        f"{proxy.url}/v1/companies/me.json", headers={"X-Request-ID": "abc-123"}
    ) as r:
        assert r.headers["X-Request-ID"] == "abc-123"
    async with client.get(
        f"{proxy.url}/v1/companies/me.json", headers={"X-Request-ID": "bad id with spaces"}
    ) as r:
        assert r.headers["X-Request-ID"] != "bad id with spaces"
        assert len(r.headers["X-Request-ID"]) == 32


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/", 404, "not_found"),
        ("/v2/companies", 404, "not_found"),
        ("/v1/../etc/passwd", 400, "invalid_request_target"),
        ("/v1/a%2Fb", 400, "invalid_request_target"),
        ("/v1//evil.example/x", 400, "invalid_request_target"),
        ("/v1/a%00", 400, "invalid_request_target"),
    ],
)
async def test_bad_targets_get_json_errors(
    proxy: Proxy, sandbox: Sandbox, client: aiohttp.ClientSession, path: str, status: int, code: str
) -> None:
    async with client.get(aiohttp.client.URL(proxy.url + path, encoded=True)) as r:
        assert r.status == status
        assert r.headers["Content-Type"].startswith("application/json")
        assert r.headers["X-Proxy-Error"] == "1"
        body = await r.json()
        assert body["error"] == code
        assert body["error_description"]
    assert sandbox.state.served() == 0


async def raw_exchange(url: str, payload: bytes) -> tuple[int, dict[str, Any], bytes]:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(payload)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
    return status, headers, body


@pytest.mark.parametrize(
    "request_line",
    [
        b"GET http://evil.example/v1/companies/me.json HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
        b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\nConnection: close\r\n\r\n",
        b"GET /v1/companies/me.json HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\nConnection: close\r\n\r\n",
        b"GET /v1/companies/me.json HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\nConnection: close\r\n\r\n",
    ],
)
async def test_smuggling_attempts_get_400_json(
    proxy: Proxy, sandbox: Sandbox, request_line: bytes
) -> None:
    status, headers, body = await raw_exchange(proxy.url, request_line)
    assert status in (400, 405)
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(body)["error"] in (
        "invalid_request_target",
        "invalid_request",
        "method_not_allowed",
    )
    assert sandbox.state.served() == 0


async def test_body_over_the_cap_gets_413(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    p = await make_proxy(
        proxy_settings(
            sandbox.url,
            tmp_path,
            server=ServerSettings(
                host="127.0.0.1", port=0, max_body_size=1000, replay_body_size=100
            ),
        )
    )
    async with client.post(
        f"{p.url}/v1/companies/5001/customers.json",
        data=b"x" * 5000,
        headers={"Content-Type": "application/json"},
    ) as r:
        assert r.status == 413
        assert (await r.json())["error"] == "request_too_large"

    async def chunks() -> Any:
        for _ in range(50):
            yield b"y" * 100

    async with client.post(
        f"{p.url}/v1/companies/5001/customers.json",
        data=chunks(),
        headers={"Content-Type": "application/json"},
    ) as r:
        assert r.status == 413
        assert (await r.json())["error"] == "request_too_large"
    assert sandbox.state.served("POST") == 0


async def test_streamed_body_under_the_cap_is_forwarded(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    p = await make_proxy(
        proxy_settings(
            sandbox.url,
            tmp_path,
            server=ServerSettings(
                host="127.0.0.1", port=0, max_body_size=100_000, replay_body_size=10
            ),
        )
    )
    body = json.dumps({"first_name": "Streamed", "last_name": "x" * 2000}).encode()

    async def chunks() -> Any:
        for i in range(0, len(body), 300):
            yield body[i : i + 300]

    async with client.post(
        f"{p.url}/v1/companies/5001/customers.json",
        data=chunks(),
        headers={"Content-Type": "application/json"},
    ) as r:
        assert r.status == 201
        assert (await r.json())["first_name"] == "Streamed"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_connection_refused_is_502(
    make_proxy: MakeProxy, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    p = await make_proxy(proxy_settings(f"http://127.0.0.1:{free_port()}", tmp_path))
    async with client.get(f"{p.url}/v1/companies/me.json") as r:
        assert r.status == 502
        body = await r.json()
        assert body["error"] == "upstream_unreachable"
        assert (
            "Connection refused" in body["error_description"]
            or "connect" in body["error_description"].lower()
        )
        assert r.headers["X-Proxy-Error"] == "1"


async def test_read_timeout_is_504(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    from proxy.settings import UpstreamSettings

    sandbox.state.inject_latency(2.0)
    p = await make_proxy(
        proxy_settings(
            sandbox.url,
            tmp_path,
            upstream=UpstreamSettings(base_url=sandbox.url, read_timeout=0.3, total_timeout=5),
        )
    )
    async with client.get(f"{p.url}/v1/companies/me.json") as r:
        assert r.status == 504
        body = await r.json()
        assert body["error"] == "upstream_timeout"
        assert "read timeout" in body["error_description"]


async def test_upstream_errors_are_normalised(
    proxy: Proxy, sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    # count=None: a GET's 503 is retried (proxy/retry.py), so it must keep failing.
    sandbox.state.inject_status(
        503,
        body=b"<html><title>Service Unavailable</title></html>",
        content_type="text/html",
        count=None,
    )
    async with client.get(f"{proxy.url}/v1/companies/me.json") as r:
        assert r.status == 503
        assert "X-Proxy-Error" not in r.headers
        assert await r.json() == {
            "error": "temporarily_unavailable",
            "error_description": "Service Unavailable",
        }


async def test_truncated_small_body_becomes_502(
    proxy: Proxy, sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    sandbox.state.inject_drop()
    async with client.get(f"{proxy.url}/v1/companies/5001/products.json") as r:
        assert r.status == 502
        body = await r.json()
        assert body["error"] == "upstream_truncated"
    # the proxy is still healthy afterwards
    async with client.get(f"{proxy.url}/v1/companies/me.json") as r:
        assert r.status == 200


async def test_truncated_streamed_body_breaks_the_answer(
    make_proxy: MakeProxy, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    async def big_then_cut(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = 4 * 1024 * 1024
        await resp.prepare(request)
        await resp.write(b"[" + b"0," * 300_000)
        assert request.transport is not None
        request.transport.abort()
        return resp

    runner, upstream = await serve_handler(big_then_cut)
    try:
        p = await make_proxy(proxy_settings(upstream, tmp_path))
        async with client.get(f"{p.url}/v1/big") as r:
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()
    finally:
        await runner.cleanup()


async def test_caller_hanging_up_cancels_its_upstream_request(
    proxy: Proxy, sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    sandbox.state.inject_latency(5.0, count=1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    task = asyncio.create_task(
        client.get(
            f"{proxy.url}/v1/companies/5001/products.json", headers={"Cache-Control": "no-store"}
        ).__aenter__()
    )
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    def sample(name: str, labels: dict[str, str] | None = None) -> float:
        return proxy.registry.get_sample_value(name, labels or {}) or 0.0

    while sample("kounta_proxy_requests_in_flight") > 0:
        assert loop.time() - started < 2.0, "the handler kept waiting on the upstream"
        await asyncio.sleep(0.02)
    # counted as nginx's 499 "client closed request", not as a proxy failure
    closed = sample(
        "kounta_proxy_requests_total",
        {
            "method": "GET",
            "route": "/v1/companies/{id}/products",
            "status_class": "4xx",
            "cache": "-",
            "account": "main",
        },
    )
    assert closed == 1
    async with client.get(f"{proxy.url}/v1/companies/me.json") as r:
        assert r.status == 200


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS"])
async def test_head_and_options(proxy: Proxy, client: aiohttp.ClientSession, method: str) -> None:
    async with client.request(method, f"{proxy.url}/v1/companies/me.json") as r:
        assert r.status in (200, 204)
        assert await r.read() == b""


async def test_method_not_proxied(proxy: Proxy, client: aiohttp.ClientSession) -> None:
    async with client.request("TRACE", f"{proxy.url}/v1/companies/me.json") as r:
        assert r.status == 405
        assert (await r.json())["error"] == "method_not_allowed"
