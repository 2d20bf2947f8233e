"""A Kounta that closes idle keep-alive connections sooner than the proxy's pool keeps them.

The upstreams are raw asyncio servers on loopback that count what they applied (answered)
and what they dropped unanswered, so each test can say that an unsafe request reached the
upstream at most once. The proxy's side (docs/http-contract.md, "Idle upstream
connections"): connections idle longer than ``upstream.keepalive_timeout``, or than the
upstream's own ``Keep-Alive: timeout=N`` less a margin, are never reused; a pooled connection the upstream has already closed is found before anything is
written to it; a request written to a connection that then closes unanswered is resent only
when its method is in ``retry.methods``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.client import create_session, keepalive_hint, peer_closed
from proxy.errors import UpstreamUnreachable
from proxy.messages import ProxyRequest
from proxy.pipeline.upstream import Upstream
from proxy.settings import CacheSettings, RetrySettings, UpstreamSettings
from tests.conftest import MakeProxy, Proxy, proxy_settings
from tests.integration.test_http_edges import POST_CUSTOMERS, answer_of, request


@dataclass
class IdleCloser:
    """Answers each request, unless it arrives on a connection idle longer than ``idle``
    seconds since its last answer: then it is read and dropped unanswered, the connection
    closed (the server's idle close and the request crossed on the wire). ``drop_all``:
    every request is read and dropped so. ``hint``: a Keep-Alive field on each answer.
    :meth:`cut` closes every open connection now."""

    idle: float = 60.0
    drop_all: bool = False
    hint: str = ""
    applied: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    connections: int = 0
    open: list[asyncio.StreamWriter] = field(default_factory=list)
    url: str = ""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open.append(writer)
        loop = asyncio.get_running_loop()
        answered: float | None = None
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(_length(head))
                line = head.split(b"\r\n", 1)[0].decode("latin-1")
                idle = answered is not None and loop.time() - answered > self.idle
                if self.drop_all or idle:
                    self.dropped.append(line)
                    return
                self.applied.append(line)
                status = "201 Created" if line.startswith("POST") else "200 OK"
                hint = f"Keep-Alive: {self.hint}\r\n" if self.hint else ""
                writer.write(
                    f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{hint}"
                    "Content-Length: 2\r\n\r\n{}".encode()
                )
                await writer.drain()
                answered = loop.time()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open.remove(writer)
            writer.close()

    def cut(self) -> None:
        """Close every open connection at once, from this side (FIN sent before returning)."""
        for writer in self.open:
            shut(writer)


def shut(writer: asyncio.StreamWriter) -> None:
    """Close the connection now (the FIN is sent before this returns), the loop unaware. On a
    duplicate: uvloop's transport sockets refuse shutdown(), the connection does not."""
    with socket.socket(fileno=os.dup(writer.get_extra_info("socket").fileno())) as sock:
        sock.shutdown(socket.SHUT_RDWR)


def _length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


@pytest.fixture
async def idle_closer() -> AsyncIterator[Callable[..., Any]]:
    servers: list[asyncio.Server] = []

    async def start(**kwargs: Any) -> IdleCloser:
        upstream = IdleCloser(**kwargs)
        server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
        servers.append(server)
        upstream.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        return upstream

    yield start
    for server in servers:
        server.close()


async def start_proxy(
    make_proxy: MakeProxy, tmp_path: Any, url: str, retry: RetrySettings | None = None, **up: Any
) -> Proxy:
    upstream = UpstreamSettings(base_url=url, connect_timeout=2, read_timeout=5, **up)
    sections: dict[str, Any] = {"upstream": upstream, "cache": CacheSettings(enabled=False)}
    if retry is not None:
        sections["retry"] = retry
    return await make_proxy(proxy_settings(url, tmp_path, **sections))


def post(path: str = POST_CUSTOMERS) -> bytes:
    return request("POST", path, "Content-Type: application/json", "Content-Length: 2", body=b"{}")


def put(path: str = "/v1/companies/5001/customers/7.json") -> bytes:
    return request("PUT", path, "Content-Type: application/json", "Content-Length: 2", body=b"{}")


def count(p: Proxy, name: str, labels: dict[str, str]) -> float:
    return p.registry.get_sample_value(name, labels) or 0.0


async def test_a_post_after_a_pause_longer_than_the_upstream_keeps_connections_is_applied_once(
    make_proxy: MakeProxy, tmp_path: Any, idle_closer: Callable[..., Any]
) -> None:
    # The upstream keeps an idle connection 0.2 s; the proxy 0.1 s: after a 0.3 s pause the
    # proxy opens a new connection instead of writing the POST onto one the upstream drops.
    kounta = await idle_closer(idle=0.2)
    p = await start_proxy(make_proxy, tmp_path, kounta.url, keepalive_timeout=0.1)
    assert (await answer_of(p.url, post())).status == 201
    await asyncio.sleep(0.3)  # the pause itself is what is tested
    got = await answer_of(p.url, post())
    assert got.status == 201, got.body
    assert kounta.applied == [f"POST {POST_CUSTOMERS} HTTP/1.1"] * 2
    assert (kounta.dropped, kounta.connections) == ([], 2)


async def test_a_pooled_connection_the_upstream_already_closed_is_never_written_to(
    idle_closer: Callable[..., Any],
) -> None:
    # The race itself, made deterministic: the upstream closes the pooled connection and the
    # next request is sent before the event loop has run (so before aiohttp has read the
    # close). Nothing was written to the dead connection: the POST goes on a new one, once.
    kounta = await idle_closer()
    closed: list[None] = []
    settings = UpstreamSettings(base_url=kounta.url, keepalive_timeout=60)
    session = create_session(settings, dropped=lambda: closed.append(None))
    upstream = Upstream(UpstreamSettings(base_url=kounta.url), session)
    headers = CIMultiDictProxy(CIMultiDict({"Content-Type": "application/json"}))
    sent = ProxyRequest("POST", "/v1/orders", "", headers, body=b"{}", account="main")
    try:
        first = await upstream.send(sent)
        await first.release()
        kounta.cut()
        time.sleep(0.02)  # noqa: ASYNC251 - on purpose: the loop must not see the close
        second = await upstream.send(sent)
        await second.release()
    finally:
        await session.close()
    assert (first.status, second.status) == (201, 201)
    assert kounta.applied == ["POST /v1/orders HTTP/1.1"] * 2
    assert (kounta.dropped, kounta.connections) == ([], 2)
    assert len(closed) == 1  # kounta_proxy_upstream_closed_idle_connections_total


async def test_a_get_dropped_on_a_stale_connection_is_resent_by_the_retry_layer(
    make_proxy: MakeProxy, tmp_path: Any, idle_closer: Callable[..., Any]
) -> None:
    # The proxy keeps connections longer than the upstream (a misconfiguration, or a server
    # that closes early): the GET is written, dropped unanswered, and resent once by the
    # retry layer (counted, with a budget token), not behind its back by the client library.
    kounta = await idle_closer(idle=0.2)
    retry = RetrySettings(attempts=2, backoff_initial=0.01, backoff_max=0.01)
    p = await start_proxy(make_proxy, tmp_path, kounta.url, retry, keepalive_timeout=60)
    assert (await answer_of(p.url, request("GET", "/v1/a"))).status == 200
    await asyncio.sleep(0.3)
    got = await answer_of(p.url, request("GET", "/v1/b"))
    assert got.status == 200, got.body
    assert kounta.dropped == ["GET /v1/b HTTP/1.1"]
    assert kounta.applied == ["GET /v1/a HTTP/1.1", "GET /v1/b HTTP/1.1"]
    labels = {"method": "GET", "reason": "connect"}
    assert count(p, "kounta_proxy_retries_total", labels) == 1


async def test_a_post_dropped_unanswered_after_it_was_written_is_never_resent(
    make_proxy: MakeProxy, tmp_path: Any, idle_closer: Callable[..., Any]
) -> None:
    # What no client can tell apart from "applied, then the connection died": 502, sent once.
    kounta = await idle_closer(idle=0.2)
    p = await start_proxy(make_proxy, tmp_path, kounta.url, keepalive_timeout=60)
    assert (await answer_of(p.url, post())).status == 201
    await asyncio.sleep(0.3)
    got = await answer_of(p.url, post())
    assert got.status == 502, got.body
    assert got.json()["error"] == "upstream_unreachable"
    assert len(kounta.applied) == 1
    assert kounta.dropped == [f"POST {POST_CUSTOMERS} HTTP/1.1"]


@pytest.mark.parametrize(("methods", "sent"), [(("GET",), 1), (("GET", "PUT"), 2)])
async def test_a_put_dropped_unanswered_is_resent_only_when_retry_methods_name_put(
    make_proxy: MakeProxy,
    tmp_path: Any,
    idle_closer: Callable[..., Any],
    methods: tuple[str, ...],
    sent: int,
) -> None:
    # aiohttp would resend a PUT or DELETE once on its own (its idempotent methods); the
    # proxy turns that off, so retry.methods alone decides (PUT and DELETE are opt-in).
    kounta = await idle_closer(drop_all=True)
    retry = RetrySettings(methods=methods, attempts=2, backoff_initial=0.01, backoff_max=0.01)
    p = await start_proxy(make_proxy, tmp_path, kounta.url, retry)
    got = await answer_of(p.url, put())
    assert got.status == 502, got.body
    assert (len(kounta.dropped), kounta.applied) == (sent, [])


async def test_a_delete_closed_unanswered_is_sent_once_by_the_upstream_layer(
    idle_closer: Callable[..., Any],
) -> None:
    # The layer's own error for a connection closed unanswered, and no hidden resend below it.
    kounta = await idle_closer(drop_all=True)
    session = create_session(UpstreamSettings(base_url=kounta.url))
    upstream = Upstream(UpstreamSettings(base_url=kounta.url), session)
    headers = CIMultiDictProxy(CIMultiDict({"Content-Type": "application/json"}))
    try:
        with pytest.raises(UpstreamUnreachable, match="closed the connection without answering"):
            await upstream.send(ProxyRequest("DELETE", "/v1/x/1", "", headers, account="main"))
    finally:
        await session.close()
    assert kounta.dropped == ["DELETE /v1/x/1 HTTP/1.1"]


async def test_keepalive_timeout_0_opens_a_new_connection_for_every_request(
    make_proxy: MakeProxy, tmp_path: Any, idle_closer: Callable[..., Any]
) -> None:
    kounta = await idle_closer()
    p = await start_proxy(make_proxy, tmp_path, kounta.url, keepalive_timeout=0)
    for _ in range(3):
        assert (await answer_of(p.url, post())).status == 201
    assert (len(kounta.applied), kounta.connections) == (3, 3)


async def test_peer_closed_tells_a_closed_or_dirty_idle_connection_from_a_usable_one() -> None:
    sides: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()
    server = await asyncio.start_server(lambda _, w: sides.put_nowait(w), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    opened = []
    try:
        for _ in range(3):
            opened.append((await asyncio.open_connection("127.0.0.1", port))[1])
        quiet, dirty, closed = [await sides.get() for _ in range(3)]
        # With no await in between, so that the client's event loop reads none of it first.
        dirty.write(b"HTTP/1.1 408 Request Timeout\r\n\r\n")  # bytes nobody asked for
        shut(closed)
        time.sleep(0.02)  # noqa: ASYNC251 - on purpose: the loop must not run
        found = [peer_closed(w.transport) for w in opened]
    finally:
        for w in opened:
            w.close()
        for w in (quiet, dirty, closed):
            w.close()
        server.close()
    assert found == [False, True, True]
    assert peer_closed(None)


async def test_a_connection_is_not_reused_past_the_idle_limit_the_upstream_announced(
    make_proxy: MakeProxy, tmp_path: Any, idle_closer: Callable[..., Any]
) -> None:
    # Keep-Alive: timeout=1 (kept 0.8 s in truth): trusted less half of it, so after a 0.9 s
    # pause the POST goes on a new connection although upstream.keepalive_timeout is 60 s.
    kounta = await idle_closer(idle=0.8, hint="timeout=1, max=100")
    p = await start_proxy(make_proxy, tmp_path, kounta.url, keepalive_timeout=60)
    assert (await answer_of(p.url, post())).status == 201
    await asyncio.sleep(0.9)
    got = await answer_of(p.url, post())
    assert got.status == 201, got.body
    assert (len(kounta.applied), kounta.dropped, kounta.connections) == (2, [], 2)


@pytest.mark.parametrize(
    ("values", "seconds"),
    [
        (["timeout=5, max=100"], 5),
        (["max=100,timeout=2"], 2),
        ([" TIMEOUT = 3 "], 3),
        (["timeout=5", "timeout=2"], 2),
        (["timeout=0"], 0),
        (["max=3"], None),
        ([], None),
        (["timeout=abc", "timeout=-1", "timeout=1.5", "timeout=\u00b2", "timeout="], None),
        (["timeout=" + "9" * 10], None),
    ],
)
def test_keepalive_hint_reads_only_a_plain_timeout(values: list[str], seconds: int | None) -> None:
    assert keepalive_hint(values) == seconds
