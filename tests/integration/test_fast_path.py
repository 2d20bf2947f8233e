"""The fresh-hit fast path (proxy.edge.fast): same answers as the long way, taken only when safe.

Each test runs a real proxy in front of the sandbox and watches the application's own
handler (the long way) behind the fast path, so it can tell which way a request went.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy
from yarl import URL

from proxy.cache.fastlook import cached_key, webhook_rule
from proxy.edge.fast import FastPath
from proxy.edge.rendered import template
from proxy.edge.services import SERVICES
from proxy.headers import DEFAULT_FORWARDED
from proxy.ops.admin import create_admin_app
from proxy.settings import (
    CacheRule,
    CacheSettings,
    CallerSettings,
    RetrySettings,
    Secret,
    UpstreamSettings,
)
from tests.conftest import MakeProxy, Proxy, Sandbox, proxy_settings, serve, serve_handler

LIST = "/v1/companies/5001/customers.json"
FRESH = (CacheRule("/v1/*", fresh_for=600),)
# Headers every answer has with a value of its own.
PER_ANSWER = {"x-request-id", "date", "age"}


class LongWay:
    """Counts the requests the fast path handed to the application."""

    def __init__(self, proxy: Proxy) -> None:
        fast = proxy.runner.server.request_handler  # type: ignore[union-attr]
        assert isinstance(fast, FastPath)
        self.fast = fast
        self.count = 0
        inner = fast.inner

        async def counted(request: web.BaseRequest) -> web.StreamResponse:
            self.count += 1
            return await inner(request)

        fast.inner = counted


async def get(
    client: aiohttp.ClientSession, url: str, method: str = "GET", **headers: str
) -> tuple[int, CIMultiDictProxy[str], bytes]:
    async with client.request(method, url, headers=headers) as r:
        return r.status, r.headers, await r.read()


def steady(headers: CIMultiDictProxy[str]) -> list[tuple[str, str]]:
    return [(k.lower(), v) for k, v in headers.items() if k.lower() not in PER_ANSWER]


async def fresh_proxy(make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, **kw: Any) -> Proxy:
    cache = CacheSettings(rules=FRESH)
    settings = proxy_settings(
        sandbox.url, tmp_path, cache=cache, retry=RetrySettings(attempts=1), **kw
    )
    return await make_proxy(settings)


@dataclass
class Warm:
    """A proxy whose LIST entry is stored (that first request went the long way)."""

    proxy: Proxy
    long_way: LongWay
    headers: CIMultiDictProxy[str]
    body: bytes


@pytest.fixture
async def warm(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> Warm:
    p = await fresh_proxy(make_proxy, sandbox, tmp_path)
    long_way = LongWay(p)
    status, headers, body = await get(client, p.url + LIST)
    assert (status, headers["X-Cache"], long_way.count) == (200, "MISS", 1)
    return Warm(p, long_way, headers, body)


async def test_a_plain_fresh_hit_skips_the_long_way_and_answers_the_same(
    warm: Warm, sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    p, long_way, first = warm.proxy, warm.long_way, warm.body
    fast = [await get(client, p.url + LIST) for _ in range(3)]
    assert long_way.count == 1  # none of the three went the long way
    # An unknown Pragma changes nothing in the answer, but sends the request the long way.
    slow = await get(client, p.url + LIST, Pragma="x-whatever")
    assert long_way.count == 2
    for status, headers, body in [*fast, slow]:
        assert (status, headers["X-Cache"], body) == (200, "HIT", first)
        assert int(headers["Age"]) >= 0
        assert len(headers["X-Request-ID"]) == 32
        assert headers["Server"] == "kounta-proxy"
        assert headers["X-Next-Page"].startswith(p.url)  # rewritten onto the proxy
    assert steady(fast[0][1]) == steady(slow[1])  # same headers, same order
    ids = {headers["X-Request-ID"] for _, headers, _ in [*fast, slow]}
    assert len(ids) == 4
    assert sandbox.state.served("GET", LIST) == 1


async def test_fast_hits_are_counted_like_the_long_way(
    warm: Warm, client: aiohttp.ClientSession
) -> None:
    p, long_way = warm.proxy, warm.long_way
    sample = p.registry.get_sample_value

    def counts() -> tuple[float | None, ...]:
        return (
            sample(
                "kounta_proxy_requests_total",
                {
                    "method": "GET",
                    "route": "/v1/companies/{id}/customers",
                    "status_class": "2xx",
                    "cache": "HIT",
                    "account": "main",
                },
            ),
            sample(
                "kounta_proxy_request_duration_seconds_count",
                {
                    "method": "GET",
                    "route": "/v1/companies/{id}/customers",
                    "status_class": "2xx",
                    "cache": "HIT",
                },
            ),
            sample("kounta_proxy_cache_lookups_total", {"result": "hit", "reason": "fresh"}),
            sample(
                "kounta_proxy_caller_requests_total",
                {"caller": "anonymous", "account": "main", "status_class": "2xx"},
            ),
        )

    await get(client, p.url + LIST)  # fast
    after_fast = counts()
    await get(client, p.url + LIST, Pragma="x-whatever")  # long way
    after_slow = counts()
    await get(client, p.url + LIST)  # fast
    assert long_way.count == 2
    assert after_fast == (1.0, 1.0, 1.0, 2.0)
    assert after_slow == (2.0, 2.0, 2.0, 3.0)
    assert counts() == (3.0, 3.0, 3.0, 4.0)
    assert sample("kounta_proxy_requests_in_flight") == 0


async def test_a_fresh_hit_asks_no_per_key_memo_once_its_entry_was_answered(
    warm: Warm, client: aiohttp.ClientSession
) -> None:
    """Its target, route and key come from one record per raw target (proxy.edge.known),
    its entry's webhook flag, coding and rendered head from the entry's record in the memory
    tier (proxy.cache.memory.Kept): the memos of the key, the head and the webhook rule are
    not asked (each hashed its arguments on every fresh hit)."""
    p = warm.proxy
    assert (await get(client, p.url + LIST))[1]["X-Cache"] == "HIT"  # the records made
    memos = (cached_key, template, webhook_rule)
    before = [memo.cache_info() for memo in memos]
    for _ in range(3):
        status, headers, body = await get(client, p.url + LIST)
        assert (status, headers["X-Cache"], body) == (200, "HIT", warm.body)
    assert [memo.cache_info() for memo in memos] == before
    assert warm.long_way.count == 1


async def test_an_escaped_targets_fast_hit_is_labelled_as_the_long_way_labels_it(
    warm: Warm, client: aiohttp.ClientSession
) -> None:
    """The route label is the decoded path's (the long way's ``request.path``), though the
    fast path's record is keyed by the raw target."""
    p = warm.proxy
    escaped = URL(p.url + LIST.replace("customers", "cust%6Fmers"), encoded=True)
    async with client.get(escaped) as r:
        assert (r.status, r.headers["X-Cache"], await r.read()) == (200, "HIT", warm.body)
    assert warm.long_way.count == 1  # the same entry (the key's escapes normalised), fast
    labels = {"method": "GET", "route": "/v1/companies/{id}/customers", "status_class": "2xx"}
    hits = {**labels, "cache": "HIT", "account": "main"}
    assert p.registry.get_sample_value("kounta_proxy_requests_total", hits) == 1.0


@pytest.mark.parametrize(
    ("method", "headers", "expected"),
    [
        ("GET", {"Cache-Control": "no-cache"}, (200, "REVALIDATED")),
        ("GET", {"Cache-Control": "max-age=0"}, (200, "REVALIDATED")),
        ("GET", {"Pragma": "no-cache"}, (200, "REVALIDATED")),
        ("GET", {"Range": "bytes=0-10"}, (200, "BYPASS")),
        ("GET", {"If-Match": "*"}, (200, "BYPASS")),
        ("GET", {"X-Proxy-All-Pages": "1"}, (200, "-")),
        ("GET", {"X-Proxy-All-Pages": "yes please"}, (400, "-")),
        ("GET", {"Connection": "X-Page"}, (200, "HIT")),
        ("HEAD", {}, (200, "HIT")),
        ("OPTIONS", {}, (204, "BYPASS")),
    ],
)
async def test_anything_but_a_plain_get_goes_the_long_way(
    warm: Warm,
    client: aiohttp.ClientSession,
    method: str,
    headers: dict[str, str],
    expected: tuple[int, str],
) -> None:
    status, got, _ = await get(client, warm.proxy.url + LIST, method, **headers)
    assert (status, got.get("X-Cache", "-")) == expected
    assert warm.long_way.count == 2


def combinations(etag: str, count: int) -> list[tuple[str, dict[str, str]]]:
    """Seeded, so a failure repeats: targets and request headers the fast path must read
    exactly as the long way does (or leave to it)."""
    rng = random.Random(20261128)
    choices: dict[str, list[str | None]] = {
        "Accept": [None, "*/*", "application/json", "text/html", "application/json, */*"],
        "If-None-Match": [None] * 6 + [etag, f"W/{etag}", '"nope"', "*", f'"nope", {etag}', "x"],
        "If-Modified-Since": [
            None,
            "Sat, 28 Nov 2099 00:00:00 GMT",
            "Mon, 01 Jan 1990 00:00:00 GMT",
            "x",
        ],
        "X-Pretty-Print": [None, "1"],
        "X-Page": [None, "2"],
        "Connection": [None, "keep-alive", "X-Page"],
        "X-Request-ID": [None, "given-id-1", "bad id"],
        "Authorization": [None, "Bearer somebody-elses-kounta-token"],
    }
    targets = [LIST, "/v1/companies/5001/customers", LIST + "?x=1", "/v1/companies/me.json"]
    out = []
    for _ in range(count):
        headers = {}
        for name, values in choices.items():
            value = rng.choice(values)
            if value is not None:
                headers[name] = value
        out.append((rng.choice(targets), headers))
    return out


async def test_the_fast_way_and_the_long_way_give_the_same_answers(
    warm: Warm, client: aiohttp.ClientSession
) -> None:
    await same_answers(warm.proxy, warm.long_way, warm.headers["ETag"], client)


async def same_answers(
    p: Proxy, long_way: LongWay, etag: str, client: aiohttp.ClientSession
) -> None:
    """Over seeded request shapes: the plain request (the fast path where it may) and the
    same with an unknown Pragma (the long way) get the same answer."""
    fast: collections.Counter[int] = collections.Counter()
    for target, headers in combinations(etag, 150):
        first = await get(client, p.url + target, **headers)  # stores what can be stored
        before = long_way.count
        plain = await get(client, p.url + target, **headers)
        went_fast = long_way.count == before
        if went_fast:
            fast[plain[0]] += 1
        slow = await get(client, p.url + target, Pragma="x-whatever", **headers)
        assert long_way.count > before, (target, headers)  # the Pragma one went the long way
        assert (plain[0], plain[2]) == (slow[0], slow[2]), (target, headers)
        assert steady(plain[1]) == steady(slow[1]), (target, headers)
        assert ("X-Request-ID" in plain[1]) == ("X-Request-ID" in slow[1])
        if plain[1].get("X-Cache") == "HIT" and "Connection" not in headers:
            assert went_fast, (target, headers)  # a plain fresh hit never takes the long way
        if "X-Request-ID" in headers and headers["X-Request-ID"] == "given-id-1":
            assert plain[1]["X-Request-ID"] == slow[1]["X-Request-ID"] == "given-id-1"
        assert first[0] == plain[0] or first[1].get("X-Cache") == "MISS"
    assert fast[200] >= 10 and fast[304] >= 5  # both kinds of fast answer were compared


async def test_callers_conditionals_get_the_long_ways_304_on_the_fast_path(
    warm: Warm, client: aiohttp.ClientSession
) -> None:
    p, long_way, body = warm.proxy, warm.long_way, warm.body
    etag = warm.headers["ETag"]
    fast = await get(client, p.url + LIST, **{"If-None-Match": f'"nope", W/{etag}'})
    assert long_way.count == 1
    slow = await get(client, p.url + LIST, **{"If-None-Match": etag, "Pragma": "x-whatever"})
    assert long_way.count == 2
    for status, got, content in (fast, slow):
        assert (status, got["X-Cache"], got["ETag"], content) == (304, "HIT", etag, b"")
        assert "Content-Type" not in got
    assert steady(fast[1]) == steady(slow[1])
    cases = [
        ({"If-None-Match": '"nope"'}, 200),
        ({"If-None-Match": "*"}, 304),
        ({"If-Modified-Since": "Sat, 28 Nov 2099 00:00:00 GMT"}, 304),
        ({"If-Modified-Since": "Sat, 28 Nov 1999 00:00:00 GMT"}, 200),
        ({"If-Modified-Since": "not a date"}, 200),
        # If-None-Match wins over If-Modified-Since (RFC 9110 13.2.2)
        ({"If-None-Match": '"nope"', "If-Modified-Since": "Sat, 28 Nov 2099 00:00:00 GMT"}, 200),
    ]
    for conditionals, expected in cases:
        status, got, content = await get(client, p.url + LIST, **conditionals)
        assert (status, got["X-Cache"]) == (expected, "HIT"), conditionals
        assert content == (body if expected == 200 else b"")
    assert long_way.count == 2
    sample = p.registry.get_sample_value
    # A caller's 304 is one lookup, a hit: no second "not_modified" count.
    labels = {"result": "not_modified", "reason": "caller_conditional"}
    assert sample("kounta_proxy_cache_lookups_total", labels) is None
    route = {
        "method": "GET",
        "route": "/v1/companies/{id}/customers",
        "cache": "HIT",
        "account": "main",
    }
    assert sample("kounta_proxy_requests_total", {**route, "status_class": "3xx"}) == 4
    assert sample("kounta_proxy_requests_total", {**route, "status_class": "2xx"}) == 4


async def test_a_failure_in_the_fast_path_leaves_the_answer_to_the_long_way(
    warm: Warm, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any) -> None:
        raise RuntimeError("a bug")

    warm.long_way.fast.cache.fast.find = broken  # type: ignore[method-assign]
    status, headers, again = await get(client, warm.proxy.url + LIST)
    assert (status, headers["X-Cache"], again) == (200, "HIT", warm.body)
    assert warm.long_way.count == 2
    # Once in the connection's protocol (answer_now), once in front of the handler.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "fast_path_failed"
    ] * 2


async def test_bad_requests_are_refused_by_the_long_way_once(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    callers = {"shop": CallerSettings(key=Secret("shop-key-0123456789abcdef"))}
    p = await fresh_proxy(make_proxy, sandbox, tmp_path, callers=callers)
    long_way = LongWay(p)
    key = {"X-Proxy-Key": "shop-key-0123456789abcdef"}
    status, _, _ = await get(client, p.url + LIST, **key)
    status, headers, _ = await get(client, p.url + LIST, **key)
    assert (status, headers["X-Cache"], long_way.count) == (200, "HIT", 1)
    # A wrong key: refused once (not counted twice), in the long way's words.
    status, headers, body = await get(client, p.url + LIST, **{"X-Proxy-Key": "wrong"})
    assert status == 401 and b"not known" in body
    sample = p.registry.get_sample_value
    assert sample("kounta_proxy_caller_rejections_total", {"reason": "unknown"}) == 1
    # A target the long way refuses, even though a similar one is stored.
    odd = URL(p.url + "/v1/companies/5001%2Fcustomers.json", encoded=True)
    async with client.get(odd, headers=key) as r:
        status, body = r.status, await r.read()
    assert status == 400 and b"invalid_request_target" in body
    assert long_way.count == 3


async def test_vary_goes_the_long_way_and_a_stale_entry_revalidates_at_the_edge(
    make_proxy: MakeProxy, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    hits: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        hits.append(request.path)
        headers = {"ETag": '"v1"', "Cache-Control": "max-age=600"}
        if request.path == "/v1/varied":
            headers["Vary"] = "X-Shop"
        if request.path == "/v1/short":
            headers["Cache-Control"] = "max-age=3"
        if request.headers.get("If-None-Match") == '"v1"':
            return web.Response(status=304, headers=headers)
        return web.json_response({"path": request.path}, headers=headers)

    runner, upstream = await serve_handler(handler)
    try:
        # X-Shop reaches the upstream only when allowed (a header Kounta never sees cannot
        # change its answer, so the cache would rightly ignore it).
        forward = (*DEFAULT_FORWARDED, "X-Shop")
        p = await make_proxy(
            proxy_settings(
                upstream,
                tmp_path,
                upstream=UpstreamSettings(base_url=upstream, forward_headers=forward),
            )
        )
        long_way = LongWay(p)
        await get(client, p.url + "/v1/varied", **{"X-Shop": "a"})
        stored = time.monotonic()  # /v1/short is stored no earlier than this
        await get(client, p.url + "/v1/short", **{"X-Shop": "a"})
        assert long_way.count == 2
        status, headers, _ = await get(client, p.url + "/v1/varied", **{"X-Shop": "a"})
        assert (status, headers["X-Cache"], long_way.count) == (200, "HIT", 3)
        status, headers, _ = await get(client, p.url + "/v1/varied", **{"X-Shop": "b"})
        assert (status, headers["X-Cache"], long_way.count) == (200, "MISS", 4)
        status, headers, _ = await get(client, p.url + "/v1/short")
        assert (headers["X-Cache"], long_way.count) == ("HIT", 4)  # fresh: the fast path
        # Room for a loaded machine between storing and the fresh hit above; now past it.
        await asyncio.sleep(max(0.0, stored + 3.2 - time.monotonic()))
        status, headers, _ = await get(client, p.url + "/v1/short")
        # Stale: revalidated, the flight started and answered at the edge (fast path).
        assert (headers["X-Cache"], long_way.count) == ("REVALIDATED", 4)
        assert hits == ["/v1/varied", "/v1/short", "/v1/varied", "/v1/short"]
    finally:
        await runner.cleanup()


async def test_a_write_through_the_proxy_ends_fast_hits_at_once(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    p = await fresh_proxy(make_proxy, sandbox, tmp_path)
    customer = sorted(sandbox.state.store["customers"].records)[0]
    one = f"/v1/companies/5001/customers/{customer}.json"
    _, _, before = await get(client, p.url + one)
    assert (await get(client, p.url + one))[1]["X-Cache"] == "HIT"
    async with client.put(p.url + one, json={"first_name": "Renamed"}) as r:
        assert r.status in (200, 204)
    status, headers, after = await get(client, p.url + one)
    assert (status, headers["X-Cache"]) == (200, "MISS")
    assert b"Renamed" in after and after != before


async def test_fast_hits_write_the_access_line(
    warm: Warm, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kounta_proxy")
    url = warm.proxy.url + LIST
    _, headers, body = await get(client, url, **{"X-Request-ID": "trace-42"})
    assert headers["X-Request-ID"] == "trace-42"
    lines = [r.fields for r in caplog.records if r.getMessage() == "request"]  # type: ignore[attr-defined]
    last = lines[-1]
    assert last["request_id"] == "trace-42"
    assert (last["status"], last["cache"], last["method"]) == (200, "HIT", "GET")
    assert (last["caller"], last["account"], last["bytes"]) == ("anonymous", "main", len(body))
    assert last["route"] == "/v1/companies/{id}/customers"
    assert last["path"] == LIST and last["upstream_status"] is None


async def test_keep_alive_and_http_1_0_over_one_connection(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any
) -> None:
    p = await fresh_proxy(make_proxy, sandbox, tmp_path)
    host, port = p.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    request = f"GET {LIST} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    writer.write(request * 3)  # pipelined: the first is a miss, then two fast hits
    answers = [await read_answer(reader) for _ in range(3)]
    assert [a[0] for a in answers] == [b"HTTP/1.1 200 OK"] * 3
    assert [a[1][b"x-cache"] for a in answers] == [b"MISS", b"HIT", b"HIT"]
    assert answers[1][2] == answers[0][2] == answers[2][2]
    writer.write(f"GET {LIST} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n".encode())
    status, headers, body = await read_answer(reader)
    assert (status, headers[b"x-cache"]) == (b"HTTP/1.0 200 OK", b"HIT")
    assert body == answers[0][2]
    writer.write(f"GET {LIST} HTTP/1.0\r\n\r\n".encode())
    status, headers, _ = await read_answer(reader)
    assert (status, headers[b"x-cache"]) == (b"HTTP/1.0 200 OK", b"HIT")
    assert await asyncio.wait_for(reader.read(), 5) == b""  # HTTP/1.0 without keep-alive
    writer.close()


async def test_control_characters_in_headers_never_reach_the_fast_path(warm: Warm) -> None:
    # The fast path does not look for CR, LF or NUL in header values: the parser refuses
    # them first (JSON, via proxy.listener), which this pins down.
    host, port = warm.proxy.url.removeprefix("http://").split(":")
    for bad in (b"a\x00b", b"a\rb", b"a\x01b"):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET " + LIST.encode() + b" HTTP/1.1\r\nHost: x\r\nX-A: " + bad + b"\r\n\r\n")
        status, headers, body = await read_answer(reader)
        writer.close()
        assert status.endswith(b" 400 Bad Request"), bad
        assert headers[b"content-type"].startswith(b"application/json"), bad
        assert b'"invalid_request"' in body, bad
    assert warm.long_way.count == 1


async def read_answer(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status, *lines = head[:-4].split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(b":") for x in lines)}
    body = await reader.readexactly(int(headers[b"content-length"]))
    return status, headers, body


async def test_the_admin_listener_never_answers_from_the_cache(
    warm: Warm, client: aiohttp.ClientSession
) -> None:
    runner, port = await serve(create_admin_app(warm.proxy.app[SERVICES]))
    try:
        assert not isinstance(runner.server.request_handler, FastPath)  # type: ignore[union-attr]
        status, _, body = await get(client, f"http://127.0.0.1:{port}{LIST}")
        assert status == 404 and body != warm.body
        status, headers, _ = await get(client, warm.proxy.url + LIST)
        assert (status, headers["X-Cache"]) == (200, "HIT")  # stored and fresh all along
    finally:
        await runner.cleanup()
