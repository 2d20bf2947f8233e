"""What Kounta's bodies may be, and what the proxy makes of them: compressed bodies cut short,
corrupt or explosive, unknown codings, and more bytes than the Content-Length said. Each
upstream is a raw asyncio server on loopback that answers with scripted bytes; callers are raw
sockets too, so nothing is normalised."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import random
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from proxy.auth.endpoint import request_token
from proxy.client import create_session, message_end
from proxy.coding import Caps, inflate_whole
from proxy.settings import AccountSettings, RetrySettings, Secret, UpstreamSettings
from tests.conftest import MakeProxy, Proxy, proxy_settings, serve
from tests.integration.test_http_edges import RawUpstream, answer_of, request, start_raw

FRESH = "Cache-Control: max-age=600"
GZ = "Content-Encoding: gzip"
DOC = json.dumps([{"id": i, "name": f"customer {i}"} for i in range(40)]).encode()


def reply(body: bytes, *headers: str, status: str = "200 OK") -> bytes:
    head = [f"HTTP/1.1 {status}", "Content-Type: application/json", *headers]
    head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def noise(size: int, seed: int = 7) -> bytes:
    """JSON-ish text that compresses poorly (so a compressed body is large)."""
    rng = random.Random(seed)
    return bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(size))


Scripted = Callable[..., Any]


@pytest.fixture
async def scripted(make_proxy: MakeProxy, tmp_path: Any) -> AsyncIterator[Scripted]:
    """A proxy (no retries) in front of a raw upstream that answers with the given bytes."""
    servers: list[asyncio.Server] = []

    async def make(*replies: bytes, **upstream: Any) -> tuple[RawUpstream, Proxy]:
        raw, server = await start_raw(list(replies))
        servers.append(server)
        settings = proxy_settings(
            raw.url,
            tmp_path,
            upstream=UpstreamSettings(base_url=raw.url, read_timeout=5, **upstream),
            retry=RetrySettings(attempts=1, breaker_failures=0),
        )
        return raw, await make_proxy(settings)

    yield make
    for server in servers:
        server.close()


def stores(p: Proxy, result: str) -> float:
    return p.registry.get_sample_value("kounta_proxy_cache_stores_total", {"result": result}) or 0


# -- 9: gzip end to end --------------------------------------------------------------------


def cut(packed: bytes) -> bytes:
    return packed[:-9]  # no trailer (CRC32, ISIZE) and no end marker


def bad_crc(packed: bytes) -> bytes:
    return packed[:-8] + bytes([packed[-8] ^ 0xFF]) + packed[-7:]


@pytest.mark.parametrize(
    "damage",
    [cut, bad_crc],
    ids=["cut-short", "wrong-crc32"],
)
@pytest.mark.parametrize("size", [len(DOC), 300_000], ids=["small", "streamed"])
async def test_an_incomplete_or_corrupt_gzip_body_is_502_and_never_stored(
    scripted: Scripted, damage: Callable[[bytes], bytes], size: int
) -> None:
    plain = DOC if size == len(DOC) else noise(size)
    packed = gzip.compress(plain)
    raw, p = await scripted(reply(damage(packed), GZ, FRESH), reply(packed, GZ, FRESH))
    got = await answer_of(p.url, request("GET", "/v1/a", "Accept-Encoding: gzip"))
    assert got.status == 502
    assert got.json()["error"] == "upstream_truncated"
    assert stores(p, "stored") == 0
    # Nothing was stored: the next request fetches again, and that good body is kept.
    got = await answer_of(p.url, request("GET", "/v1/a", "Accept-Encoding: gzip"))
    assert (got.status, got.header("X-Cache"), gzip.decompress(got.body)) == (200, "MISS", plain)
    got = await answer_of(p.url, request("GET", "/v1/a"))
    assert (got.status, got.header("X-Cache"), got.body) == (200, "HIT", plain)
    assert len(raw.seen) == 2
    errors = p.registry.get_sample_value(
        "kounta_proxy_upstream_errors_total", {"kind": "truncated", "account": "main"}
    )
    assert errors == 1


def bomb(inflated: int) -> bytes:
    return gzip.compress(b"\0" * inflated, compresslevel=9)


@pytest.mark.parametrize("status", ["200 OK", "500 Internal Server Error"])
async def test_a_gzip_bomb_is_502_too_large_on_every_path(scripted: Scripted, status: str) -> None:
    packed = bomb(20 * 1024 * 1024)  # ~20 KB inflating to 20 MiB: a ratio of ~1000
    raw, p = await scripted(*[reply(packed, GZ, FRESH, status=status)] * 2)
    for accept in ("Accept-Encoding: gzip", "Accept-Encoding: identity"):
        got = await answer_of(p.url, request("GET", "/v1/a", accept))
        assert got.status == 502, got.body[:200]
        assert got.json()["error"] == "upstream_too_large"
        assert "max_inflate_ratio" in got.json()["error_description"]
    assert stores(p, "stored") == 0
    assert len(raw.seen) == 2


async def test_the_inflated_size_cap_holds_for_bodies_that_compress_poorly(
    scripted: Scripted,
) -> None:
    packed = gzip.compress(noise(200_000))
    _, p = await scripted(reply(packed, GZ, FRESH), max_inflated_size=100_000)
    got = await answer_of(p.url, request("GET", "/v1/a", "Accept-Encoding: gzip"))
    assert (got.status, got.json()["error"]) == (502, "upstream_too_large")
    assert "max_inflated_size" in got.json()["error_description"]


async def test_a_stored_gzip_entry_is_answered_in_each_callers_coding(
    scripted: Scripted,
) -> None:
    packed = gzip.compress(DOC)
    raw, p = await scripted(reply(packed, GZ, FRESH, 'ETag: "v1"'))
    first = await answer_of(p.url, request("GET", "/v1/a", "Accept-Encoding: gzip, deflate"))
    assert (first.status, first.header("X-Cache"), first.body) == (200, "MISS", packed)
    assert first.header("Content-Encoding") == "gzip"
    assert first.header("Vary") == "Accept-Encoding"
    assert "accept-encoding: gzip" in raw.seen[0].decode().lower()
    cases = {
        "": False,
        "Accept-Encoding: identity": False,
        "Accept-Encoding: gzip;q=0, identity": False,
        "Accept-Encoding: br;q=1, *;q=0.5": True,
        "Accept-Encoding: GZIP;q=0.001": True,
        "Accept-Encoding: gzip;q=2": False,  # an invalid q-value is no acceptance
        "Accept-Encoding: x-gzip": True,
    }
    for accept, takes_gzip in cases.items():
        for extra in ((), ("Pragma: x-long-way",)):  # the fast path, then the long way
            got = await answer_of(p.url, request("GET", "/v1/a", *filter(None, [accept]), *extra))
            assert (got.status, got.header("X-Cache")) == (200, "HIT"), accept
            assert got.body == (packed if takes_gzip else DOC), accept
            assert got.header("Content-Encoding") == ("gzip" if takes_gzip else None), accept
            assert got.header("Content-Length") == str(len(got.body))
            assert got.header("Vary") == "Accept-Encoding"
            # The inflated body is another representation: its strong ETag turns weak.
            assert got.header("ETag") == ('"v1"' if takes_gzip else 'W/"v1"'), accept
    plain_304 = await answer_of(p.url, request("GET", "/v1/a", 'If-None-Match: W/"v1"'))
    assert (plain_304.status, plain_304.body) == (304, b"")
    head = await answer_of(p.url, request("HEAD", "/v1/a", "Accept-Encoding: gzip"))
    assert (head.header("Content-Length"), head.header("Content-Encoding")) == (
        str(len(packed)),
        "gzip",
    )
    head = await answer_of(p.url, request("HEAD", "/v1/a"))
    assert (head.header("Content-Length"), head.header("Content-Encoding")) == (None, None)
    assert len(raw.seen) == 1


async def test_a_stale_gzip_entry_is_answered_in_each_callers_coding(scripted: Scripted) -> None:
    """stale-if-error (cache.stale_if_error) and gzip storing together: the stored gzip body
    stands in for an unreachable Kounta, inflated for a caller that does not take gzip, with
    the Warning and the one Cache-Status member a stale answer carries."""
    packed = gzip.compress(DOC)
    raw, p = await scripted(reply(packed, GZ, "Cache-Control: max-age=0", 'ETag: "v1"'))
    first = await answer_of(p.url, request("GET", "/v1/a", "Accept-Encoding: gzip"))
    assert (first.status, first.header("X-Cache"), first.body) == (200, "MISS", packed)
    # No more replies: Kounta closes every connection now.
    for accept, body, coding in (("Accept-Encoding: gzip", packed, "gzip"), ("", DOC, None)):
        got = await answer_of(p.url, request("GET", "/v1/a", *filter(None, [accept])))
        assert (got.status, got.header("X-Cache"), got.body) == (200, "STALE", body), accept
        assert got.header("Content-Encoding") == coding
        assert got.header("Vary") == "Accept-Encoding"
        assert (got.header("Warning") or "").startswith("111 ")
        status = got.header("Cache-Status") or ""
        assert status.startswith("kounta-proxy; fwd=stale; detail=upstream_"), status
        assert "," not in status  # one member, the proxy's own
    assert len(raw.seen) == 1


async def test_a_large_stored_gzip_body_is_inflated_while_streamed(scripted: Scripted) -> None:
    plain = (
        b"[" + b",".join(b'{"id":%d,"note":"%s"}' % (i, b"x" * 40) for i in range(60_000)) + b"]"
    )
    assert len(plain) > 2 * 1024 * 1024  # past INFLATE_WHOLE: no Content-Length is known
    packed = gzip.compress(plain)
    raw, p = await scripted(reply(packed, GZ, FRESH))
    for extra in ((), ("Accept-Encoding: gzip",), ()):
        got = await answer_of(p.url, request("GET", "/v1/a", *extra))
        assert got.status == 200
        if extra:
            assert (got.body, got.header("Content-Length")) == (packed, str(len(packed)))
        else:
            assert got.header("Transfer-Encoding") == "chunked"
            assert dechunk(got.body) == plain
    assert len(raw.seen) == 1


def dechunk(data: bytes) -> bytes:
    out = bytearray()
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return bytes(out)
        out += data[:size]
        data = data[size + 2 :]


@pytest.mark.parametrize("coding", ["br", "x-foo", "gzip, br"])
async def test_an_unknown_coding_passes_through_with_its_header_and_is_not_stored(
    scripted: Scripted, coding: str
) -> None:
    opaque = bytes(range(256)) * 4
    raw, p = await scripted(*[reply(opaque, f"Content-Encoding: {coding}", FRESH)] * 2)
    for _ in range(2):
        got = await answer_of(p.url, request("GET", "/v1/a", "Accept-Encoding: gzip, br"))
        assert (got.status, got.body) == (200, opaque)
        assert got.header("X-Cache") in ("MISS", "BYPASS")  # never a HIT
        assert got.header("Content-Encoding") == coding
        assert got.header("Content-Length") == str(len(opaque))
    assert len(raw.seen) == 2
    assert stores(p, "not_storable") == 2


async def test_gzip_error_bodies_are_read_inflated_and_normalised(scripted: Scripted) -> None:
    body = json.dumps({"error": "not_found", "error_description": "No such sale"}).encode()
    _, p = await scripted(reply(gzip.compress(body), GZ, status="404 Not Found"))
    got = await answer_of(p.url, request("GET", "/v1/a", "Accept-Encoding: gzip"))
    assert got.status == 404
    assert got.header("Content-Encoding") is None
    assert got.json()["error_description"] == "No such sale"


async def test_a_401_with_a_gzip_body_is_read_inflated(scripted: Scripted) -> None:
    # The auth layer reads why: a plain 401 (not an invalid token) is passed on, not resent.
    body = json.dumps({"error": "access_denied", "error_description": "Not your store"}).encode()
    raw, p = await scripted(reply(gzip.compress(body), GZ, status="401 Unauthorized"))
    got = await answer_of(p.url, request("GET", "/v1/a"))
    assert (got.status, got.json()["error_description"]) == (401, "Not your store")
    assert len(raw.seen) == 1


def test_the_inflater_takes_members_and_padding_and_refuses_junk() -> None:
    two = gzip.compress(b"[1,") + gzip.compress(b"2]")
    assert inflate_whole(two, Caps()) == b"[1,2]"
    assert inflate_whole(gzip.compress(b"[]") + b"\0" * 8, Caps()) == b"[]"
    assert inflate_whole(gzip.compress(b"[]") + b"junk", Caps()) is None
    assert inflate_whole(zlib.compress(b"[]"), Caps()) is None  # zlib is not gzip


# -- 20: more bytes than Content-Length ------------------------------------------------------


async def test_bytes_past_the_content_length_are_dropped_and_the_connection_not_reused(
    scripted: Scripted,
) -> None:
    excess = b'{"a":1234}' + b"<excess bytes past the length>"[:26]
    assert len(excess) == 36
    head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 10\r\n"
    stored = (head + FRESH + "\r\n\r\n").encode() + excess
    again = (head + "Cache-Control: no-store\r\n\r\n").encode() + excess
    raw, p = await scripted(stored, again, again)
    got = await answer_of(p.url, request("GET", "/v1/a"))
    assert (got.status, got.body, got.header("Content-Length")) == (200, b'{"a":1234}', "10")
    got = await answer_of(p.url, request("GET", "/v1/a"))
    assert (got.status, got.header("X-Cache"), got.body) == (200, "HIT", b'{"a":1234}')
    for _ in range(2):  # not storable: each goes upstream, each on a new connection
        got = await answer_of(p.url, request("GET", "/v1/b"))
        assert (got.status, got.body) == (200, b'{"a":1234}')
    assert len(raw.seen) == 3
    assert raw.connections == 3


async def test_a_304_carrying_a_body_revalidates_like_a_bare_one(scripted: Scripted) -> None:
    # aiohttp alone reads the body as the next answer's status line and fails (a 502).
    stored = reply(b'{"a":1234}', 'ETag: "v1"', "Cache-Control: max-age=0")
    not_modified = b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 10\r\n\r\n'
    raw, p = await scripted(stored, not_modified + b'{"a":1234}')
    got = await answer_of(p.url, request("GET", "/v1/a"))
    assert (got.status, got.body) == (200, b'{"a":1234}')
    got = await answer_of(p.url, request("GET", "/v1/a"))
    assert (got.status, got.body, got.header("X-Cache")) == (200, b'{"a":1234}', "REVALIDATED")
    assert 'if-none-match: "v1"' in raw.seen[1].decode().lower()


async def test_a_range_is_asked_plain_and_a_gzip_range_passes_through_labelled(
    scripted: Scripted,
) -> None:
    piece = gzip.compress(DOC)[:100]  # a range of a gzip stream is no whole stream
    raw, p = await scripted(
        reply(piece, GZ, "Content-Range: bytes 0-99/999", status="206 Partial Content")
    )
    got = await answer_of(p.url, request("GET", "/v1/a", "Range: bytes=0-99"))
    assert (got.status, got.body, got.header("Content-Encoding")) == (206, piece, "gzip")
    assert "accept-encoding: identity" in raw.seen[0].decode().lower()


async def test_a_gzip_token_answer_is_read_inflated() -> None:
    token = json.dumps({"access_token": "fresh", "token_type": "Bearer", "expires_in": 60})

    async def endpoint(request: web.Request) -> web.Response:
        assert request.headers["Accept-Encoding"] == "gzip"
        packed = gzip.compress(token.encode())
        return web.Response(body=packed, headers={"Content-Encoding": "gzip"})

    app = web.Application()
    app.router.add_post("/v1/token", endpoint)
    runner, port = await serve(app)
    url = f"http://127.0.0.1:{port}"
    account = AccountSettings(
        mode="oauth", client_id="c", client_secret=Secret("s"), token_url=f"{url}/v1/token"
    )
    session = create_session(UpstreamSettings(base_url=url))
    try:
        got = await request_token(session, account, "refresh_token", 0.0, refresh_token="r")
    finally:
        await session.close()
        await runner.cleanup()
    assert (got["access_token"], got["expires_at"]) == ("fresh", 60.0)


@pytest.mark.parametrize("name", ["max_inflated_size", "max_inflate_ratio"])
def test_the_caps_must_be_positive(name: str) -> None:
    with pytest.raises(ValueError, match=name):
        UpstreamSettings(**{name: 0})


async def test_excess_bytes_arriving_with_the_end_of_a_body_are_dropped_too(
    make_proxy: MakeProxy, tmp_path: Any
) -> None:
    # The head and the body's start in one read, the body's end and the excess in the next.
    async def serve_split(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{"a":1')
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.write(b"234}" + b"x" * 26)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve_split, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        p = await make_proxy(proxy_settings(url, tmp_path, retry=RetrySettings(attempts=1)))
        for _ in range(3):
            got = await answer_of(p.url, request("GET", "/v1/a"))
            assert (got.status, got.body) == (200, b'{"a":1234}')
    finally:
        server.close()


OK_3 = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n"
INTERIM = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length:3\r\n\r\n"
NO_CONTENT = b"HTTP/1.1 204 No Content\r\nContent-Length: 3\r\n\r\n"


@pytest.mark.parametrize(
    ("head", "end"),
    [
        (OK_3, len(OK_3) + 3),
        (INTERIM, len(INTERIM) + 3),
        (NO_CONTENT, len(NO_CONTENT)),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", None),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", None),
        (b"HTTP/1.1 200 OK\r\n\r\n", None),
        (b"junk\r\n\r\n", None),
    ],
)
def test_where_a_length_framed_response_ends(head: bytes, end: int | None) -> None:
    assert message_end(head + b"abcdef", skip_payload=False) == end
