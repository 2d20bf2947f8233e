"""Fresh hits answered in the connection's protocol (proxy.listener.AnswersNow,
proxy.edge.fast.FastPath.answer_now): no request object, no handler task, the same bytes.

Each test talks to a real proxy over raw sockets and counts the requests that reached the
request handler (a task each); the others were answered as their heads were parsed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import socket
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.http_parser import HttpRequestParser

from proxy.edge.fast import FastPath
from proxy.edge.rendered import template
from proxy.settings import CacheSettings, RetrySettings, ServerSettings
from tests.conftest import MakeProxy, Proxy, Sandbox, proxy_settings
from tests.integration.test_fast_joiners import PATH as JOINED
from tests.integration.test_fast_joiners import (
    Setup,
    server_settings,  # noqa: F401 (a fixture)
    setup,  # noqa: F401 (a fixture)
)
from tests.integration.test_fast_path import FRESH, LIST, get

HOST = "Host: x\r\n"
# As aiohttp's client sends them: the stored variant the client's requests are.
GZIP = "Accept: */*\r\nAccept-Encoding: gzip, deflate\r\n"


class Handlers:
    """Counts the requests handed to the request handler (one task each) on connections
    opened from now on."""

    def __init__(self, proxy: Proxy) -> None:
        server: Any = proxy.runner.server
        inner = server.request_handler
        self.count = 0

        async def counted(request: web.BaseRequest) -> web.StreamResponse:
            self.count += 1
            return await inner(request)

        server.request_handler = counted


def ask(rid: str, *extra: str, version: str = "1.1", path: str = LIST) -> bytes:
    return (
        f"GET {path} HTTP/{version}\r\n{HOST}X-Request-ID: {rid}\r\n{''.join(extra)}\r\n".encode()
    )


async def answer(reader: asyncio.StreamReader) -> bytes:
    """One whole answer, as sent."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = re.search(rb"\r\nContent-Length: (\d+)\r\n", head)
    body = await reader.readexactly(int(length.group(1))) if length else b""
    return head + body


def steady(raw: bytes) -> bytes:
    """An answer without what differs between two answers of the same entry."""
    raw = re.sub(rb"\r\n(Date|Age): [^\r]*", rb"\r\n\1: -", raw)
    return re.sub(rb"\r\nX-Request-ID: [^\r]*", b"\r\nX-Request-ID: -", raw)


def field(raw: bytes, name: bytes) -> bytes:
    found = re.search(rb"\r\n" + name + rb": ([^\r]*)\r\n", raw, re.IGNORECASE)
    assert found is not None, name
    return found.group(1)


Reader, Writer = asyncio.StreamReader, asyncio.StreamWriter


async def start(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, **server: Any
) -> tuple[Proxy, Handlers, Reader, Writer]:
    """A proxy with the entry stored, its handler counted, and a connection to it."""
    base = ServerSettings(host="127.0.0.1", port=0)
    settings = proxy_settings(
        sandbox.url,
        tmp_path,
        cache=CacheSettings(rules=FRESH),
        retry=RetrySettings(attempts=1),
        server=dataclasses.replace(base, **server),
    )
    p = await make_proxy(settings)
    handlers = Handlers(p)
    reader, writer = await connect(p)
    writer.write(ask("warm"))
    assert field(await answer(reader), b"X-Cache") == b"MISS"
    writer.close()
    assert handlers.count == 1
    return p, handlers, *await connect(p)


Opened = tuple[Proxy, Handlers, Reader, Writer]


@pytest.fixture
async def opened(make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any) -> Opened:
    return await start(make_proxy, sandbox, tmp_path)


async def connect(p: Proxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = p.url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def test_fresh_hits_are_answered_without_a_handler_task_and_the_same_bytes(
    opened: Opened,
) -> None:
    _p, handlers, reader, writer = opened
    # Pipelined in one write: fast, forced the long way by a header that changes nothing
    # in the answer, fast; answered in order.
    writer.write(ask("r1") + ask("r2", "Pragma: x-whatever\r\n") + ask("r3"))
    got = [await answer(reader) for _ in range(3)]
    assert [field(a, b"X-Request-ID") for a in got] == [b"r1", b"r2", b"r3"]
    # r1 in the protocol; r2 the long way, and r3, queued behind it, too (order).
    assert handlers.count == 3
    assert got[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert steady(got[0]) == steady(got[1]) == steady(got[2])
    assert field(got[0], b"X-Cache") == b"HIT" and field(got[0], b"Server") == b"kounta-proxy"
    # The caller's own 304, both ways.
    etag = field(got[0], b"ETag").decode()
    writer.write(ask("r4", f"If-None-Match: {etag}\r\n"))
    fast = await answer(reader)
    writer.write(ask("r5", f"If-None-Match: {etag}\r\n", "Pragma: x-whatever\r\n"))
    slow = await answer(reader)
    assert fast.startswith(b"HTTP/1.1 304 Not Modified\r\n")
    assert steady(fast) == steady(slow)
    assert handlers.count == 4
    writer.close()


async def test_fresh_hits_in_the_protocol_fill_in_one_rendered_head(opened: Opened) -> None:
    """The head is rendered once for the entry (proxy.edge.rendered), and kept on its record
    in the memory tier alone (proxy.cache.memory.Kept: neither answer asks the head memo,
    which held each such head a second time); each answer has its own request id, and a
    Date and Age as the long way's."""
    _p, handlers, reader, writer = opened
    template.cache_clear()
    writer.write(ask("a%1") + ask("a2"))  # not a sane id: a new one, 32 hex digits
    got = [await answer(reader) for _ in range(2)]
    assert (template.cache_info().misses, template.cache_info().hits) == (0, 0)
    assert re.fullmatch(rb"[0-9a-f]{32}", field(got[0], b"X-Request-ID"))
    assert field(got[1], b"X-Request-ID") == b"a2"
    assert re.fullmatch(rb"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT", field(got[1], b"Date"))
    assert field(got[1], b"Age").isdigit()
    writer.write(ask("a3", "Pragma: x-whatever\r\n"))  # the long way, for comparison
    slow = await answer(reader)
    assert handlers.count == 2  # the warming request and this one
    assert steady(got[0]) == steady(got[1]) == steady(slow)
    writer.close()


async def test_what_the_protocol_does_not_answer_goes_to_the_handler(opened: Opened) -> None:
    _p, handlers, reader, writer = opened
    # A GET with a body, then a fast one behind it: both the long way, in order.
    body = ask("b1", "Content-Length: 3\r\n") + b"abc"
    writer.write(body + ask("b2"))
    got = [await answer(reader) for _ in range(2)]
    assert [field(a, b"X-Request-ID") for a in got] == [b"b1", b"b2"]
    assert handlers.count == 3
    writer.write(ask("h1").replace(b"GET", b"HEAD", 1))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert field(head, b"X-Request-ID") == b"h1" and handlers.count == 4
    # HTTP/1.0 (kept alive), then Connection: close: the long way, which closes after.
    writer.write(ask("v1", "Connection: keep-alive\r\n", version="1.0"))
    old = await answer(reader)
    assert old.startswith(b"HTTP/1.0 200 OK\r\n") and handlers.count == 5
    writer.write(ask("c1", "Connection: close\r\n"))
    closing = await answer(reader)
    assert field(closing, b"Connection") == b"close" and handlers.count == 6
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_a_malformed_request_after_a_fast_one_is_refused_as_json(opened: Opened) -> None:
    _p, handlers, reader, writer = opened
    writer.write(ask("m1"))
    assert field(await answer(reader), b"X-Request-ID") == b"m1"
    writer.write(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
    refused = await answer(reader)
    assert refused.startswith(b"HTTP/1.0 400 Bad Request\r\n")  # as aiohttp words it
    assert b'"invalid_request"' in refused
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert handlers.count == 1
    writer.close()


async def test_fast_hits_count_and_log_as_the_long_way(
    opened: Opened, caplog: pytest.LogCaptureFixture
) -> None:
    p, handlers, reader, writer = opened
    caplog.set_level(logging.INFO, logger="kounta_proxy")
    sample = p.registry.get_sample_value
    labels = {
        "method": "GET",
        "route": "/v1/companies/{id}/customers",
        "status_class": "2xx",
        "cache": "HIT",
        "account": "main",
    }
    writer.write(
        ask("a1", "User-Agent: t/1\r\n") + ask("a2", "User-Agent: t/1\r\n", "Pragma: x\r\n")
    )
    fast, slow = await answer(reader), await answer(reader)
    assert handlers.count == 2
    assert sample("kounta_proxy_requests_total", labels) == 2
    assert sample("kounta_proxy_cache_lookups_total", {"result": "hit", "reason": "fresh"}) == 2
    assert sample("kounta_proxy_requests_in_flight") == 0
    lines = [r.fields for r in caplog.records if r.getMessage() == "request"]  # type: ignore[attr-defined]
    assert [line["request_id"] for line in lines] == ["a1", "a2"]
    for line in lines:
        line.pop("request_id"), line.pop("ms")
    assert lines[0] == lines[1]
    assert lines[0]["client"] == "127.0.0.1" and lines[0]["user_agent"] == "t/1"
    assert lines[0]["bytes"] == len(fast.partition(b"\r\n\r\n")[2]) > 0
    assert steady(fast) == steady(slow)
    writer.close()


async def test_a_connection_busy_with_fast_hits_is_not_idle_and_an_idle_one_closes(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any
) -> None:
    p, handlers, reader, writer = await start(
        make_proxy, sandbox, tmp_path, header_timeout=0.3, keepalive_timeout=0.5
    )
    # Longer than both deadlines, a request every 0.1 s: each answered, none dropped.
    for i in range(12):
        writer.write(ask(f"k{i}"))
        assert field(await answer(reader), b"X-Request-ID") == f"k{i}".encode()
        await asyncio.sleep(0.1)
    # A head split over two writes still has its deadline (a 408 when it runs out).
    writer.write(ask("k12")[:20])
    assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 408 ")
    writer.close()
    # Idle after fast hits: closed by the keep-alive timeout, silently.
    reader, writer = await connect(p)
    writer.write(ask("i1"))
    await answer(reader)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert handlers.count == 1
    writer.close()


async def test_a_caller_that_never_reads_does_not_fill_the_proxys_memory(opened: Opened) -> None:
    p, handlers, _, first = opened
    first.close()
    host, port = p.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock)
    many = 3000
    writer.write(b"".join(ask(f"n{i}") for i in range(many)))
    await asyncio.sleep(0.5)
    (protocol,) = [c for c in p.runner.server.connections if c.transport is not None]  # type: ignore[union-attr]
    held = protocol.transport.get_write_buffer_size()
    one = len(one_answer(p))
    assert held < 64 * 1024 + 40 * one  # the high-water mark, and what was being written
    assert handlers.count > 1  # once the transport held back, the long way took over
    got = [await answer(reader) for _ in range(many)]  # in order, all of them
    assert [field(a, b"X-Request-ID") for a in got] == [f"n{i}".encode() for i in range(many)]
    writer.close()


def one_answer(p: Proxy) -> bytes:
    """One fast answer's bytes, rendered as the protocol renders it."""
    fast: Any = p.runner.server
    assert isinstance(fast.answer_now.__self__, FastPath)
    parser = HttpRequestParser(None, asyncio.get_running_loop(), 2**16)  # type: ignore[arg-type]
    (message, _), *_ = parser.feed_data(ask("one"))[0]
    out = fast.answer_now(message, "127.0.0.1", "http")
    assert out is not None
    return bytes(out)


async def test_no_fast_answer_once_the_listener_shuts_down(opened: Opened) -> None:
    p, _, reader, writer = opened
    writer.write(ask("s1"))
    await answer(reader)
    stopping = asyncio.create_task(p.runner.cleanup())
    await asyncio.sleep(0)
    writer.write(ask("s2"))
    assert await asyncio.wait_for(reader.read(), 5) == b""
    await stopping
    writer.close()


@dataclasses.dataclass
class Held:
    """A revalidation held at the upstream (its starter through aiohttp's client), and a
    raw connection whose requests join it."""

    s: Setup
    starter: asyncio.Future[Any]
    handlers: Handlers
    reader: Reader
    writer: Writer


@pytest.fixture
async def held(setup: Setup, client: aiohttp.ClientSession) -> Held:  # noqa: F811
    url = setup.hold()
    starter = asyncio.ensure_future(get(client, url))
    await asyncio.wait_for(setup.origin.asked.wait(), 10)
    handlers = Handlers(setup.proxy)
    return Held(setup, starter, handlers, *await connect(setup.proxy))


async def test_a_joiner_waits_in_the_protocol_and_what_follows_it_waits_in_order(
    held: Held,
) -> None:
    s, handlers, reader, writer = held.s, held.handlers, held.reader, held.writer
    before = s.long_way.count
    # A joiner, a request that goes the long way, another joiner: one write; then a
    # malformed request.
    writer.write(
        ask("j1", GZIP, path=JOINED)
        + ask("j2", GZIP, "Pragma: x\r\n", path=JOINED)
        + ask("j3", GZIP, path=JOINED)
    )
    await s.waiting(2)  # the starter and j1; j2 and j3 held back behind j1
    writer.write(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")  # refused, but after those
    await asyncio.sleep(0.1)
    assert s.long_way.count == before
    s.origin.gate.set()
    got = [await answer(reader) for _ in range(4)]
    assert got.pop().startswith(b"HTTP/1.0 400 Bad Request\r\n")
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert [field(a, b"X-Request-ID") for a in got] == [b"j1", b"j2", b"j3"]
    assert field(got[0], b"X-Cache") == b"REVALIDATED"
    assert all(a.startswith(b"HTTP/1.1 200 OK\r\n") for a in got)
    # j2 the long way; j3, queued behind it, reached the handler (a flight of its own).
    assert s.long_way.count - before == 1
    assert s.origin.ids[-2:] == ["j2", "j3"]
    assert handlers.count == 2  # j1 had no handler task
    assert (await held.starter)[0] == 200
    writer.close()


@pytest.mark.parametrize("changed", [False, True], ids=["freshened", "changed"])
async def test_a_joiner_waiting_in_the_protocol_is_answered_through_a_graceful_shutdown(
    held: Held, changed: bool
) -> None:
    """Freshened: answered from the protocol; changed: handed to the long way, whose request
    loop the shutdown's close of idle connections must not have ended."""
    s, reader, writer = held.s, held.reader, held.writer
    if changed:
        s.origin.reply = (200, '"v2"')
    writer.write(ask("g1", GZIP, path=JOINED))
    await s.waiting(2)
    stopping = asyncio.ensure_future(s.proxy.runner.cleanup())
    await asyncio.sleep(0.2)  # idle connections are closed by now; the two wait
    assert not stopping.done()
    s.origin.gate.set()
    got = await answer(reader)
    assert got.startswith(b"HTTP/1.1 200 OK\r\n") and field(got, b"X-Request-ID") == b"g1"
    assert field(got, b"X-Cache") == (b"MISS" if changed else b"REVALIDATED")
    assert (b'"new"' in got) is changed
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert (await held.starter)[0] == 200
    await stopping
    writer.close()


@pytest.mark.parametrize("server_settings", [{"keepalive_timeout": 0.3}])
async def test_a_request_waiting_in_the_protocol_outlasts_the_keepalive_timeout(
    held: Held,
) -> None:
    s, reader, writer = held.s, held.reader, held.writer
    writer.write(ask("w1", GZIP, path=JOINED))
    await s.waiting(2)
    await asyncio.sleep(0.9)  # three keep-alive timeouts, the flight still out
    s.origin.gate.set()
    got = await answer(reader)
    assert (field(got, b"X-Request-ID"), field(got, b"X-Cache")) == (b"w1", b"REVALIDATED")
    assert (await held.starter)[0] == 200
    # Idle once answered: the keep-alive timeout closes it again.
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_a_starter_that_left_lets_its_flights_stream_go_and_a_joiner_is_answered(
    setup: Setup,  # noqa: F811
) -> None:
    s = setup
    # The revalidation brings a changed body too large for memory: its starter would
    # stream it while the flight stores it, and its joiners wait for the store.
    s.origin.body = b'{"things": [' + b'"thing", ' * 200_000 + b'"last"]}'
    s.origin.reply = (200, '"v2"')
    s.hold()
    _, gone = await connect(s.proxy)
    gone.write(ask("st", GZIP, path=JOINED))  # the starter, waiting in the protocol
    await asyncio.wait_for(s.origin.asked.wait(), 10)
    reader, writer = await connect(s.proxy)
    writer.write(ask("jn", GZIP, path=JOINED))
    await s.waiting(2)
    gone.close()  # the starter's caller leaves before the flight's answer
    await asyncio.sleep(0.2)
    s.origin.gate.set()
    # Answered once the flight stored the body: not after the upstream's read timeout
    # (the flight waiting for a starter that will never read) nor coalesce_wait.
    got = await answer(reader)
    assert field(got, b"X-Request-ID") == b"jn"
    assert got.startswith(b"HTTP/1.1 200 OK\r\n") and got.endswith(b'"new"]}')
    writer.close()
