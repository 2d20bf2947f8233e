"""A flight's conditional GET on a kept-alive connection without the session's per-request
machinery (proxy.pipeline.direct; docs/performance.md "The flight's conditional GET without
the session"): the upstream layer against a scripted Kounta of our own on loopback (raw
asyncio), through the real aiohttp session and connector. The first request of a session
opens its connection the session's way; the conditional GETs after it go the direct way.
Every hardening of the session's way holds on the direct one: the same bytes on the wire,
the same errors for a malformed or over-large head, timeouts, an excess body, a body."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import gzip
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.client import create_session
from proxy.errors import UpstreamBodyError, UpstreamTimeout, UpstreamUnreachable
from proxy.messages import ProxyRequest, ProxyResponse
from proxy.pipeline.upstream import SMALL_BODY, Upstream
from proxy.settings import UpstreamSettings

NOT_MODIFIED = b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nCache-Control: max-age=5\r\n\r\n'

Answer = Callable[[asyncio.StreamWriter], Awaitable[bool]]  # False: close the connection


def sends(data: bytes, close: bool = False) -> Answer:
    async def answer(writer: asyncio.StreamWriter) -> bool:
        writer.write(data)
        await writer.drain()
        return not close

    return answer


def hangs(seconds: float) -> Answer:
    async def answer(writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(seconds)
        return False

    return answer


def trickles(data: bytes, pause: float) -> Answer:
    async def answer(writer: asyncio.StreamWriter) -> bool:
        for i in range(len(data)):
            writer.write(data[i : i + 1])
            await writer.drain()
            await asyncio.sleep(pause)
        return True

    return answer


def gzipped(packed: bytes) -> bytes:
    """A 200 carrying ``packed`` as its gzip body."""
    head = (
        f'HTTP/1.1 200 OK\r\nETag: "v2"\r\nContent-Encoding: gzip\r\nContent-Length: {len(packed)}'
    )
    return head.encode() + b"\r\n\r\n" + packed


class Kounta:
    """Answers each request with the next of ``answers`` (then 304s); records every
    request head as it came, byte for byte, and counts connections."""

    def __init__(self) -> None:
        self.answers: list[Answer] = []
        self.heads: list[bytes] = []
        self.connections = 0
        self.url = ""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.closing(writer), contextlib.suppress(EOFError, ConnectionError):
            keep = True
            while keep:
                self.heads.append(await reader.readuntil(b"\r\n\r\n"))
                answer = self.answers.pop(0) if self.answers else sends(NOT_MODIFIED)
                keep = await answer(writer)


@contextlib.asynccontextmanager
async def loopback(
    serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any],
    tls: ssl.SSLContext | None = None,
) -> AsyncIterator[str]:
    """A raw asyncio server on loopback running ``serve`` per connection (over TLS with
    ``tls``): its base URL."""
    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=tls)
    scheme = "https" if tls is not None else "http"
    async with server:
        yield f"{scheme}://127.0.0.1:{server.sockets[0].getsockname()[1]}"


@pytest.fixture
async def kounta() -> AsyncIterator[Kounta]:
    found = Kounta()
    async with loopback(found.serve) as found.url:
        yield found


def conditional(path: str = "/v1/companies/1/customers/1.json", **extra: str) -> ProxyRequest:
    headers = CIMultiDict({"If-None-Match": '"v1"', **extra})
    return ProxyRequest("GET", path, "", CIMultiDictProxy(headers), account="main")


async def body_of(response: ProxyResponse) -> bytes:
    if isinstance(response.body, bytes):
        return response.body
    assert response.body is not None
    return b"".join([chunk async for chunk in response.body])


class Counted:
    """The upstream layer over a real session whose ``request`` calls are counted."""

    def __init__(self, settings: UpstreamSettings, monkeypatch: pytest.MonkeyPatch) -> None:
        self.session = create_session(settings)
        self.upstream = Upstream(settings, self.session)
        self.session_requests = 0
        real = self.session.request

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.session_requests += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(self.session, "request", counting)

    async def opened(self) -> None:
        """One exchange the session's way, so that a connection is pooled."""
        response = await self.upstream.send(conditional())
        assert response.status == 304
        await response.release()
        assert self.session_requests == 1

    async def serves_again(self, kounta: Kounta, connections: int, session_requests: int) -> None:
        """The account's slot is free, and a conditional GET is answered 304 with this many
        connections and session requests made so far."""
        assert not self.upstream.slots.accounts["main"].locked()
        again = await self.upstream.send(conditional())
        assert again.status == 304
        assert (kounta.connections, self.session_requests) == (connections, session_requests)


@pytest.fixture
async def counted(kounta: Kounta, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Counted]:
    settings = UpstreamSettings(
        base_url=kounta.url, read_timeout=0.5, total_timeout=1.5, account_pool_size=1
    )
    made = Counted(settings, monkeypatch)
    try:
        await made.opened()
        yield made
    finally:
        await made.session.close()


async def test_conditional_gets_on_a_pooled_connection_skip_the_session(
    kounta: Kounta, counted: Counted
) -> None:
    """After the first exchange, each conditional GET is written on the pooled connection
    directly: no session request, one connection, the slot free again, the 304's head."""
    for _ in range(3):
        response = await counted.upstream.send(conditional())
        assert response.status == 304
        assert response.headers["ETag"] == '"v1"'
        assert await body_of(response) == b""
        await response.release()
    assert counted.session_requests == 1
    assert kounta.connections == 1
    assert len(kounta.heads) == 4
    assert not counted.upstream.slots.accounts["main"].locked()


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"Accept": "application/json"},
        {"Host": "api.kounta.com"},
        {"If-Modified-Since": "Sun, 06 Nov 1994 08:49:37 GMT", "X-Custom": "ä, b"},
    ],
    ids=["plain", "accept", "host", "more"],
)
async def test_the_direct_request_head_is_the_sessions_byte_for_byte(
    kounta: Kounta, monkeypatch: pytest.MonkeyPatch, extra: dict[str, str]
) -> None:
    settings = UpstreamSettings(base_url=kounta.url)
    made = Counted(settings, monkeypatch)
    try:
        for _ in range(2):
            response = await made.upstream.send(conditional(**extra))
            await response.release()
    finally:
        await made.session.close()
    assert made.session_requests == 1  # the first the session's way, the second direct
    assert len(kounta.heads) == 2
    assert kounta.heads[1] == kounta.heads[0]


async def test_a_control_character_in_a_header_is_refused_before_anything_is_written(
    kounta: Kounta, counted: Counted
) -> None:
    with pytest.raises(ValueError, match="Forbidden control character"):
        await counted.upstream.send(conditional(**{"X-Bad": "a\r\nInjected: yes"}))
    assert len(kounta.heads) == 1
    assert not counted.upstream.slots.accounts["main"].locked()
    response = await counted.upstream.send(conditional())  # the connection still serves
    assert response.status == 304
    assert kounta.connections == 1


@pytest.mark.parametrize("size", [11, SMALL_BODY * 3])
async def test_a_200_with_a_body_answers_whole_and_the_connection_serves_again(
    kounta: Kounta, counted: Counted, size: int
) -> None:
    """A changed entry: the direct way reads the body (whole when small, streamed when
    large) and gives the connection back at its end."""
    raw = os.urandom(size)  # incompressible: the large one is streamed
    packed = gzip.compress(raw)
    kounta.answers.append(sends(gzipped(packed)))
    response = await counted.upstream.send(conditional())
    assert response.status == 200
    assert gzip.decompress(await body_of(response)) == raw
    await response.release()
    await counted.serves_again(kounta, connections=1, session_requests=1)


async def test_a_broken_gzip_body_on_the_direct_way_is_refused(
    kounta: Kounta, counted: Counted
) -> None:
    packed = gzip.compress(b"z" * 100)[:-4] + b"\0\0\0\0"  # ISIZE wrong
    kounta.answers.append(sends(gzipped(packed)))
    with pytest.raises(UpstreamBodyError):
        await counted.upstream.send(conditional())
    assert not counted.upstream.slots.accounts["main"].locked()


async def test_an_excess_body_after_a_304_is_dropped_and_the_connection_not_reused(
    kounta: Kounta, counted: Counted
) -> None:
    kounta.answers.append(sends(NOT_MODIFIED + b"garbage that is no response"))
    response = await counted.upstream.send(conditional())
    assert response.status == 304
    await response.release()
    # The dirty connection is not used again: a new one, the session's way.
    await counted.serves_again(kounta, connections=2, session_requests=2)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 304 Not Modified\r\nBroken header line\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
        b"NOT HTTP AT ALL\r\n\r\n",
    ],
    ids=["malformed", "field-too-large", "not-http"],
)
async def test_an_invalid_head_on_the_direct_way_is_the_sessions_clean_error(
    kounta: Kounta, counted: Counted, answer: bytes
) -> None:
    kounta.answers.append(sends(answer))
    with pytest.raises(UpstreamUnreachable, match="not valid HTTP"):
        await counted.upstream.send(conditional())
    await counted.serves_again(kounta, connections=2, session_requests=2)


@pytest.mark.parametrize(
    ("answer", "error", "match"),
    [
        (
            lambda: sends(b"", close=True),
            UpstreamUnreachable,
            "closed the connection without answering",
        ),
        (lambda: hangs(3), UpstreamTimeout, "read timeout"),
    ],
    ids=["closed-unanswered", "silent-past-read-timeout"],
)
async def test_an_upstream_that_does_not_answer_is_the_sessions_error(
    kounta: Kounta, counted: Counted, answer: Any, error: type[Exception], match: str
) -> None:
    """Closed without a word, or silent past the read timeout: the session's own error, and
    the account's slot free again."""
    kounta.answers.append(answer())
    with pytest.raises(error, match=match):
        await counted.upstream.send(conditional())
    assert not counted.upstream.slots.accounts["main"].locked()


async def test_a_trickling_head_past_the_total_timeout_is_a_total_timeout(
    kounta: Kounta, counted: Counted
) -> None:
    """Each byte within the read timeout, the head as a whole past total_timeout."""
    kounta.answers.append(trickles(NOT_MODIFIED, 0.1))
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(UpstreamTimeout, match="total timeout"):
        await counted.upstream.send(conditional())
    assert loop.time() - began < 2.5
    assert not counted.upstream.slots.accounts["main"].locked()


async def test_an_interim_100_before_the_304_is_skipped(kounta: Kounta, counted: Counted) -> None:
    kounta.answers.append(sends(b"HTTP/1.1 100 Continue\r\n\r\n" + NOT_MODIFIED))
    response = await counted.upstream.send(conditional())
    assert response.status == 304
    assert response.headers["ETag"] == '"v1"'


async def test_a_direct_exchange_counts_against_the_connectors_limit(
    kounta: Kounta, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a direct exchange waits for its head, its connection is the connector's
    acquired one: a second request with a limit of one waits for it."""
    settings = UpstreamSettings(base_url=kounta.url, pool_size=1, account_pool_size=0)
    made = Counted(settings, monkeypatch)
    connector = made.session.connector
    assert isinstance(connector, aiohttp.TCPConnector)
    try:
        await made.opened()
        kounta.answers.append(trickles(NOT_MODIFIED, 0.005))
        first = asyncio.create_task(made.upstream.send(conditional()))
        await asyncio.sleep(0.05)
        assert not first.done()
        assert len(connector._acquired) == 1  # counted against limit (total and per host)
        assert made.upstream.slots.accounts["main"].locked()  # the account's one share
        assert (await first).status == 304
        assert len(connector._acquired) == 0
        assert made.session_requests == 1
    finally:
        await made.session.close()


def test_only_a_bodiless_conditional_get_goes_direct() -> None:
    from proxy.pipeline.direct import direct_candidate as candidate

    assert candidate("GET", None, CIMultiDict({"If-None-Match": '"a"'}))
    assert candidate("GET", None, CIMultiDict({"If-Modified-Since": "x"}))
    assert not candidate("GET", None, CIMultiDict())
    assert not candidate("HEAD", None, CIMultiDict({"If-None-Match": '"a"'}))
    assert not candidate("GET", b"", CIMultiDict({"If-None-Match": '"a"'}))
    assert not candidate("GET", None, CIMultiDict({"If-None-Match": '"a"', "Range": "bytes=0-1"}))


@pytest.mark.parametrize("path", ["unconditional", "first"])
async def test_the_sessions_way_keeps_its_timeouts_for_a_request_without_deadline(
    kounta: Kounta, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """A request whose deadline is further than total_timeout (none at all here) still
    has the session's read and total timeouts on the session's way (main passed
    ``timeout=None``, which aiohttp reads as no timeout at all)."""
    settings = UpstreamSettings(base_url=kounta.url, read_timeout=0.5, total_timeout=1.5)
    made = Counted(settings, monkeypatch)
    kounta.answers.append(hangs(3))
    request = conditional()
    if path == "unconditional":
        request = ProxyRequest("GET", request.path, "", CIMultiDictProxy(CIMultiDict()))
    try:
        with pytest.raises(UpstreamTimeout, match="read timeout"):
            await made.upstream.send(request)
    finally:
        await made.session.close()
    assert made.session_requests == 1


async def test_conditional_gets_over_verified_tls_go_direct_on_the_pooled_connection(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Over TLS (the certificate verified against the configured bundle by the session's
    connect), the direct way writes the same head on the pooled TLS connection."""
    ca = trustme.CA()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(tls)
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    found = Kounta()
    async with loopback(found.serve, tls) as url:
        settings = UpstreamSettings(base_url=url, ca_bundle=str(bundle))
        made = Counted(settings, monkeypatch)
        try:
            await made.opened()
            for _ in range(2):
                response = await made.upstream.send(conditional())
                assert response.status == 304
        finally:
            await made.session.close()
    assert made.session_requests == 1
    assert found.connections == 1
    assert found.heads[2] == found.heads[1] == found.heads[0]


async def test_a_streamed_direct_answer_dropped_unread_lets_its_slot_and_connection_go(
    kounta: Kounta, counted: Counted
) -> None:
    """A caller that leaves a streamed body unread: the account's slot is freed by the
    layer's watchdog at the total timeout, as for an aiohttp answer; the body had all
    arrived (within the protocol's buffer), so the connection went back to the pool clean
    at its end and serves again (an answer collected before then lets its connection go:
    tests/integration/test_fast_protocol.py's starter that left failed on an unclosed
    connection before DirectResponse.__del__)."""
    packed = gzip.compress(os.urandom(SMALL_BODY * 3))
    kounta.answers.append(sends(gzipped(packed)))
    response = await counted.upstream.send(conditional())
    assert response.status == 200
    assert counted.upstream.slots.accounts["main"].locked()
    del response
    gc.collect()
    await asyncio.sleep(1.6)  # total_timeout 1.5
    await counted.serves_again(kounta, connections=1, session_requests=1)
