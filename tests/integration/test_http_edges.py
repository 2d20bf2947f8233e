"""HTTP/1.1 edge cases at the proxy's two edges, probed over raw loopback sockets.

A client library would normalise most of these bytes away, so each test writes the
request itself with ``asyncio.open_connection`` and reads the answer as it came.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from proxy.settings import CacheRule, CacheSettings, ServerSettings
from tests.conftest import MakeProxy, Proxy, Sandbox, proxy_settings


@dataclass
class Answer:
    status: int
    version: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        found = [v for n, v in self.headers if n.lower() == name.lower()]
        return found[0] if found else None

    def all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)


def parse(data: bytes) -> Answer:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    version, status = lines[0].split(" ")[:2]
    headers = [tuple(line.split(": ", 1)) for line in lines[1:]]
    return Answer(int(status), version, headers, body)  # type: ignore[arg-type]


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def exchange(url: str, payload: bytes, wait: float = 3.0) -> bytes:
    """Everything the proxy sends until it closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(url))
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), wait)
    finally:
        writer.close()


async def answer_of(url: str, payload: bytes) -> Answer:
    return parse(await exchange(url, payload))


def request(
    method: str, target: str, *headers: str, body: bytes = b"", version: str = "1.1"
) -> bytes:
    lines = [f"{method} {target} HTTP/{version}", "Host: x", *headers, "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


POST_CUSTOMERS = "/v1/companies/5001/customers.json"


# -- raw upstream ---------------------------------------------------------------------------


@dataclass
class RawUpstream:
    """An upstream that answers each request with the next scripted bytes."""

    replies: list[bytes]
    seen: list[bytes] = field(default_factory=list)
    url: str = ""
    connections: int = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.replies:
                head = await reader.readuntil(b"\r\n\r\n")
                self.seen.append(head)
                writer.write(self.replies.pop(0))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def start_raw(replies: list[bytes]) -> tuple[RawUpstream, asyncio.Server]:
    upstream = RawUpstream(replies)
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    upstream.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    return upstream, server


@pytest.fixture
async def scripted(make_proxy: MakeProxy, tmp_path: Any) -> AsyncIterator[Callable[..., Any]]:
    """A proxy in front of a raw upstream that answers with the given bytes."""
    servers: list[asyncio.Server] = []

    async def make(*replies: bytes) -> tuple[RawUpstream, Proxy]:
        upstream, server = await start_raw(list(replies))
        servers.append(server)
        return upstream, await make_proxy(proxy_settings(upstream.url, tmp_path))

    yield make
    for server in servers:
        server.close()
        await server.wait_closed()


def ok(body: bytes = b"{}", *headers: str) -> bytes:
    head = ["HTTP/1.1 200 OK", "Content-Type: application/json", *headers]
    head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


# -- framing and smuggling ------------------------------------------------------------------


AMBIGUOUS = [
    # both framings at once (RFC 9112 6.1: a classic smuggling vector)
    b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}x",
    b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 2, 2\r\n\r\n{}",
    b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: +2\r\n\r\n{}",
    b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"POST /v1/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    b"POST /v1/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\n{}\r\n0\r\n\r\n",
    b"POST /v1/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n2\r\n{}\r\n",
    b"POST /v1/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    b"GET /v1/x HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",  # obs-fold
    b"GET /v1/x HTTP/1.1\r\nHost: x\r\nX A: a\r\n\r\n",  # space in a name
    b"GET /v1/x HTTP/1.1\r\nHost: x\r\nX-A : a\r\n\r\n",  # space before the colon
    b"GET /v1/x HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
    b"GET /v1/x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
]


async def test_ambiguous_framing_is_refused_with_json_400(proxy: Proxy, sandbox: Sandbox) -> None:
    # One proxy for all cases: each case closes its own connection.
    for payload in AMBIGUOUS:
        got = await answer_of(proxy.url, payload)
        assert got.status == 400, payload
        assert got.header("Content-Type") == "application/json; charset=utf-8", payload
        assert got.json()["error"] == "invalid_request", payload
    assert sandbox.state.served() == 0


async def test_an_invalid_host_is_400_the_fast_way_and_the_long_way(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any
) -> None:
    # RFC 9112 3.2 (nginx: "client sent invalid host header"). The target is stored fresh,
    # so with a good Host the same request is a fresh hit on the fast path.
    cache = CacheSettings(rules=(CacheRule("/v1/*", fresh_for=600),))
    p = await make_proxy(proxy_settings(sandbox.url, tmp_path, cache=cache))
    fresh = request("GET", "/v1/companies/me.json")
    assert (await answer_of(p.url, fresh)).status == 200
    assert (await answer_of(p.url, fresh)).header("X-Cache") == "HIT"
    for host in ("a b", "a/b", "x@evil"):
        got = await answer_of(p.url, fresh.replace(b"Host: x", f"Host: {host}".encode()))
        assert got.status == 400, host
        assert got.json()["error"] == "invalid_request", host
        assert "Host" in got.json()["error_description"], host
    assert sandbox.state.served() == 1


async def test_unknown_transfer_coding_is_501_like_nginx(proxy: Proxy, sandbox: Sandbox) -> None:
    # aiohttp frames "gzip, chunked" as chunked and would hand on the gzip bytes unlabelled.
    got = await answer_of(
        proxy.url,
        request("POST", POST_CUSTOMERS, "Transfer-Encoding: gzip, chunked", body=b"0\r\n\r\n"),
    )
    assert got.status == 501
    assert got.json()["error"] == "not_implemented"
    assert sandbox.state.served() == 0


async def test_transfer_encoding_in_http_1_0_is_refused(proxy: Proxy, sandbox: Sandbox) -> None:
    # RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing.
    got = await answer_of(
        proxy.url,
        request(
            "POST",
            POST_CUSTOMERS,
            "Transfer-Encoding: chunked",
            body=b"2\r\n{}\r\n0\r\n\r\n",
            version="1.0",
        ),
    )
    assert got.status == 400
    assert got.json()["error"] == "invalid_request"
    assert sandbox.state.served() == 0


async def test_http_0_9_is_not_served(proxy: Proxy, sandbox: Sandbox) -> None:
    data = await exchange(proxy.url, b"GET /v1/companies/me.json\r\n\r\n")
    assert b"Sandbox Coffee" not in data
    # 505 from the proxy (C parser) or 400 from aiohttp's pure-Python parser
    assert b'"http_version_not_supported"' in data or b'"invalid_request"' in data
    assert sandbox.state.served() == 0


async def test_over_long_request_line_is_414(proxy: Proxy, sandbox: Sandbox) -> None:
    got = await answer_of(proxy.url, request("GET", "/v1/companies/me.json?q=" + "a" * 9000))
    assert got.status == 414
    assert got.json()["error"] == "uri_too_long"
    assert got.header("X-Proxy-Error") == "1"
    assert sandbox.state.served() == 0


@pytest.mark.parametrize(
    "headers",
    [
        ["X-Long: " + "a" * 9000],
        [f"X-{i}: {'a' * 50}" for i in range(200)],
    ],
    ids=["one-long-header", "too-many-headers"],
)
async def test_over_large_headers_are_431(
    proxy: Proxy, sandbox: Sandbox, headers: list[str]
) -> None:
    got = await answer_of(proxy.url, request("GET", "/v1/companies/me.json", *headers))
    assert got.status == 431
    assert got.json()["error"] == "request_header_fields_too_large"
    assert sandbox.state.served() == 0


async def test_unparsable_requests_do_not_advertise_versions(proxy: Proxy) -> None:
    got = await answer_of(proxy.url, b"GET /v1/x HTTP/1.1\r\nHost: x\r\nX A: a\r\n\r\n")
    assert got.header("Server") == "kounta-proxy"


# -- request bodies ------------------------------------------------------------------------


async def test_chunked_request_body_is_forwarded(proxy: Proxy, sandbox: Sandbox) -> None:
    body = json.dumps({"first_name": "Chunky", "last_name": "C"}).encode()
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 7]), body[i : i + 7]) for i in range(0, len(body), 7)
    )
    got = await answer_of(
        proxy.url,
        request(
            "POST",
            POST_CUSTOMERS,
            "Content-Type: application/json",
            "Transfer-Encoding: chunked",
            body=chunks + b"0\r\nX-Trailer: t\r\n\r\n",
        ),
    )
    assert got.status == 201, got.body
    assert got.json()["first_name"] == "Chunky"


@pytest.mark.parametrize("length", [None, "0"])
async def test_empty_post_reaches_the_upstream(
    proxy: Proxy, sandbox: Sandbox, length: str | None
) -> None:
    headers = ["Content-Type: application/json"]
    if length is not None:
        headers.append(f"Content-Length: {length}")
    got = await answer_of(proxy.url, request("POST", POST_CUSTOMERS, *headers))
    # Kounta's own answer to an empty body, not a proxy failure
    assert got.status == 400
    assert got.header("X-Proxy-Error") is None
    assert sandbox.state.served("POST") == 1


async def _read_some(reader: asyncio.StreamReader, wait: float = 2.0) -> bytes:
    return await asyncio.wait_for(reader.read(4096), wait)


async def test_expect_continue_over_the_cap_is_refused_before_the_body(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any
) -> None:
    server = ServerSettings(host="127.0.0.1", port=0, max_body_size=1000, replay_body_size=100)
    p = await make_proxy(proxy_settings(sandbox.url, tmp_path, server=server))
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(p.url))
    try:
        writer.write(
            request(
                "POST",
                POST_CUSTOMERS,
                "Content-Type: application/json",
                "Content-Length: 5000",
                "Expect: 100-continue",
            )
        )
        first = await _read_some(reader)
    finally:
        writer.close()
    # nothing may invite the body: the first thing back is the final 413
    assert first.startswith(b"HTTP/1.1 413 "), first[:60]
    assert b'"request_too_large"' in first
    assert sandbox.state.served() == 0


async def test_expect_continue_under_the_cap_gets_100_then_the_answer(
    proxy: Proxy, sandbox: Sandbox
) -> None:
    body = json.dumps({"first_name": "Expecting"}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy.url))
    try:
        writer.write(
            request(
                "POST",
                POST_CUSTOMERS,
                "Content-Type: application/json",
                f"Content-Length: {len(body)}",
                "Expect: 100-continue",
            )
        )
        interim = await _read_some(reader)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        final = parse(await asyncio.wait_for(reader.read(), 3))
    finally:
        writer.close()
    assert final.status == 201
    assert final.json()["first_name"] == "Expecting"


async def test_unknown_expectation_is_417(proxy: Proxy, sandbox: Sandbox) -> None:
    got = await answer_of(proxy.url, request("GET", "/v1/companies/me.json", "Expect: magic"))
    assert got.status == 417
    assert got.json()["error"] == "expectation_failed"
    assert sandbox.state.served() == 0


# -- connections ---------------------------------------------------------------------------


async def test_pipelined_requests_are_answered_in_order(proxy: Proxy) -> None:
    one = b"GET /v1/companies/me.json HTTP/1.1\r\nHost: x\r\nX-Request-ID: r%d\r\n\r\n"
    last = b"GET /v1/companies/me.json HTTP/1.1\r\nHost: x\r\nX-Request-ID: r3\r\nConnection: close\r\n\r\n"
    data = await exchange(proxy.url, one % 0 + one % 1 + one % 2 + last)
    assert data.count(b"HTTP/1.1 200 OK") == 4
    ids = [line for line in data.split(b"\r\n") if line.startswith(b"X-Request-ID")]
    assert ids == [
        b"X-Request-ID: r0",
        b"X-Request-ID: r1",
        b"X-Request-ID: r2",
        b"X-Request-ID: r3",
    ]


async def test_upstream_connection_close_does_not_reach_the_caller(
    scripted: Callable[..., Any],
) -> None:
    _, p = await scripted(ok(b"{}", "Connection: close"), ok(b"[]"))
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(p.url))
    try:
        writer.write(b"GET /v1/a HTTP/1.1\r\nHost: x\r\n\r\n")
        first = parse(await _read_some(reader))
        assert first.status == 200
        assert first.header("Connection") is None
        # the caller's connection stays open for a second request
        writer.write(b"GET /v1/b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        second = parse(await asyncio.wait_for(reader.read(), 3))
    finally:
        writer.close()
    assert second.status == 200
    assert second.body == b"[]"


# -- HEAD, 204, OPTIONS * ------------------------------------------------------------------


async def test_head_has_the_get_headers_and_no_body(proxy: Proxy) -> None:
    target = "/v1/companies/5001/products.json"
    get = await answer_of(proxy.url, request("GET", target, "Cache-Control: no-store"))
    head = await answer_of(proxy.url, request("HEAD", target, "Cache-Control: no-store"))
    assert head.status == get.status == 200
    assert head.body == b""
    assert get.header("Content-Length") == str(len(get.body))
    assert head.header("Content-Length") == get.header("Content-Length")
    assert head.header("Content-Type") == get.header("Content-Type")
    assert head.header("ETag") == get.header("ETag")


async def test_204_from_upstream_has_no_body_framing(scripted: Callable[..., Any]) -> None:
    _, p = await scripted(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
    got = await answer_of(p.url, request("DELETE", "/v1/x"))
    assert got.status == 204
    assert got.body == b""
    assert got.header("Content-Length") is None
    assert got.header("Transfer-Encoding") is None


async def test_options_asterisk_lists_the_methods(proxy: Proxy, sandbox: Sandbox) -> None:
    got = await answer_of(proxy.url, request("OPTIONS", "*"))
    assert got.status == 200
    allowed = {m.strip() for m in (got.header("Allow") or "").split(",")}
    assert allowed == {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
    assert got.header("Content-Type") == "application/json; charset=utf-8"
    assert set(got.json()["allow"]) == allowed
    assert sandbox.state.served() == 0


async def test_asterisk_target_with_another_method_is_400(proxy: Proxy) -> None:
    got = await answer_of(proxy.url, request("GET", "*"))
    assert got.status == 400
    # refused by aiohttp's parser or by proxy.target, JSON either way
    assert got.json()["error"] in ("invalid_request", "invalid_request_target")


# -- headers the proxy adds ----------------------------------------------------------------


async def test_via_date_and_server(scripted: Callable[..., Any]) -> None:
    upstream, p = await scripted(ok(b"{}", "Server: Kounta/9.1", "Via: 1.1 edge"))
    got = await answer_of(p.url, request("GET", "/v1/a", "Via: 1.0 internal-lb.corp"))
    assert got.status == 200
    # RFC 9110 7.6.3: the proxy adds itself to Via, both ways; no internal names upstream
    assert got.all("Via") == ["1.1 edge", "1.1 kounta-proxy"]
    sent = upstream.seen[0].decode()
    assert "Via: 1.1 kounta-proxy\r\n" in sent
    assert "internal-lb" not in sent
    assert got.header("Server") == "kounta-proxy"
    assert got.header("Date")


async def test_proxy_errors_say_server_without_a_version(proxy: Proxy) -> None:
    got = await answer_of(proxy.url, request("GET", "/v2/nothing"))
    assert got.status == 404
    assert got.header("Server") == "kounta-proxy"
    assert got.header("Date")
    assert got.header("Via") is None  # the proxy's own answer was not forwarded


async def test_content_type_passes_through_unchanged(scripted: Callable[..., Any]) -> None:
    reply = b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.kounta+json; charset=latin1\r\nContent-Length: 2\r\n\r\n{}"
    _, p = await scripted(reply)
    got = await answer_of(p.url, request("GET", "/v1/a"))
    assert got.header("Content-Type") == "application/vnd.kounta+json; charset=latin1"


# -- upstream behaviour --------------------------------------------------------------------


async def test_interim_1xx_from_upstream_is_not_relayed(scripted: Callable[..., Any]) -> None:
    _, p = await scripted(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + ok(b"[1]")
    )
    data = await exchange(p.url, request("GET", "/v1/a"))
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert parse(data).body == b"[1]"


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("/v1/companies/5001", "/v1/companies/5001"),
        ("{upstream}/v1/companies/5001", "http://x/v1/companies/5001"),
        ("https://elsewhere.example/v1/x", "https://elsewhere.example/v1/x"),
    ],
)
async def test_redirect_is_passed_back_with_location_on_the_proxy(
    scripted: Callable[..., Any], location: str, expected: str
) -> None:
    upstream, p = await scripted(b"")
    upstream.replies[:] = [
        f"HTTP/1.1 302 Found\r\nLocation: {location.format(upstream=upstream.url)}\r\n"
        "Content-Length: 0\r\n\r\n".encode()
    ]
    got = await answer_of(p.url, request("GET", "/v1/companies/me"))
    assert got.status == 302
    assert got.header("Location") == expected
    assert len(upstream.seen) == 1  # not followed by the proxy


async def test_gzip_from_upstream_goes_as_is_to_gzip_callers_and_inflated_to_others(
    scripted: Callable[..., Any],
) -> None:
    import gzip

    packed = gzip.compress(b'{"a":1}')
    _, p = await scripted(*[ok(packed, "Content-Encoding: gzip")] * 2)
    got = await answer_of(p.url, request("GET", "/v1/a", "Accept-Encoding: gzip"))
    assert got.body == packed
    assert got.header("Content-Encoding") == "gzip"
    assert got.header("Content-Length") == str(len(packed))
    assert got.header("Vary") == "Accept-Encoding"
    got = await answer_of(p.url, request("GET", "/v1/a"))
    assert got.body == b'{"a":1}'
    assert got.header("Content-Encoding") is None
    assert got.header("Content-Length") == "7"
    assert got.header("Vary") == "Accept-Encoding"


async def test_upstream_set_cookies_are_dropped(scripted: Callable[..., Any]) -> None:
    _, p = await scripted(ok(b"{}", "Set-Cookie: a=1", "Set-Cookie: b=2"))
    got = await answer_of(p.url, request("GET", "/v1/a"))
    assert got.status == 200
    assert got.all("Set-Cookie") == []


async def test_upstream_header_too_large_is_a_clear_502(scripted: Callable[..., Any]) -> None:
    big = ok(b"{}", "X-Big: " + "a" * 9000)
    _, p = await scripted(big, big, big, big)
    got = await answer_of(p.url, request("GET", "/v1/a"))
    assert got.status == 502
    assert "not valid HTTP" in got.json()["error_description"]


# -- callers that hang up ------------------------------------------------------------------


async def test_caller_hanging_up_mid_upload_is_a_quiet_499(
    proxy: Proxy, sandbox: Sandbox, caplog: pytest.LogCaptureFixture
) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy.url))
    writer.write(
        request("POST", POST_CUSTOMERS, "Content-Type: application/json", "Content-Length: 500000")
        + b"1" * 20_000
    )
    await writer.drain()
    await asyncio.sleep(0.05)  # let the proxy start reading the body
    writer.transport.abort()

    def sample(name: str) -> float:
        return proxy.registry.get_sample_value(name, {}) or 0.0

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2
    while sample("kounta_proxy_requests_in_flight") > 0:
        assert loop.time() < deadline, "the handler kept waiting for the body"
        await asyncio.sleep(0.02)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    got = await answer_of(proxy.url, request("GET", "/v1/companies/me.json"))
    assert got.status == 200


@pytest.mark.parametrize(
    "refused",
    [
        b"POST /v1/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n",
    ],
    ids=["unknown-coding", "over-the-cap"],
)
async def test_a_refused_body_closes_the_connection(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, refused: bytes
) -> None:
    server = ServerSettings(host="127.0.0.1", port=0, max_body_size=1000, replay_body_size=100)
    p = await make_proxy(proxy_settings(sandbox.url, tmp_path, server=server))
    # what follows the refused request must never be served as a second request
    smuggled = b"GET /v1/companies/me.json HTTP/1.1\r\nHost: x\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(p.url))
    try:
        writer.write(refused + smuggled)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        got = parse(head)
        await reader.readexactly(int(got.header("Content-Length") or 0))
        # closed at once, or aiohttp lingers to drain an unread body: no second answer
        with pytest.raises((TimeoutError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(reader.readuntil(b"HTTP/1.1 "), 0.3)
    finally:
        writer.close()
    assert got.status in (413, 501)
    assert got.header("Connection") == "close"
    assert sandbox.state.served() == 0
