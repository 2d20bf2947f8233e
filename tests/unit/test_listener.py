"""The listener's own protocol (``proxy.listener.customise``) works: the app's handler
wrapper sees requests, unparsable requests answer JSON, heads keep their deadline, the
connection cap holds. The aiohttp private parts it relies on are pinned in
tests/unit/test_compat.py.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
from pathlib import Path
from typing import cast

import pytest
from aiohttp import web

from proxy import listener
from proxy.compat.aiohttp import site_server
from proxy.listener import LIMITS, WRAP_HANDLER, Handler, Limits, Runner, bound_port, start


async def raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return answer


async def test_the_wrapper_sees_requests_and_bad_requests_answer_json() -> None:
    seen: list[str] = []

    def wrap(app: web.Application, inner: Handler) -> Handler:
        async def front(request: web.BaseRequest) -> web.StreamResponse:
            seen.append(request.path)
            return await inner(request)

        return front

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/hello", hello)
    app[WRAP_HANDLER] = wrap
    runner = await start(app, "127.0.0.1", 0, 1.0)
    try:
        assert isinstance(runner, Runner)
        port = bound_port(runner)
        ok = await raw(port, b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200") and ok.endswith(b"hello")
        assert seen == ["/hello"]
        bad = await raw(port, b"GET /hello HTTP/1.1\r\nHost x\r\n\r\n")
        head, _, body = bad.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] == b"400"
        assert b"application/json" in head
        assert json.loads(body)["error"] == "invalid_request"
    finally:
        await runner.cleanup()


async def answer_of(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    data = await asyncio.wait_for(reader.read(), 5)
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"application/json" in head and b"Server: kounta-proxy" in head, head
    return int(head.split(b" ")[1]), json.loads(body)


async def test_slow_heads_get_408_silent_ones_close_and_answers_are_not_cut() -> None:
    drops: list[str] = []

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.5)  # longer than the head deadline: not a head
        return web.Response(text="done")

    app = web.Application()
    app.router.add_get("/slow", slow)
    app[LIMITS] = Limits(header_timeout=0.3, max_connections=10, on_drop=drops.append)
    runner = await start(app, "127.0.0.1", 0, 1.0)
    port = bound_port(runner)
    loop = asyncio.get_running_loop()
    try:
        # slowloris: a header line every 0.1 s never completes the head in time
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = loop.time()
        writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n")
        for i in range(3):
            await asyncio.sleep(0.1)
            writer.write(f"X-Line-{i}: 1\r\n".encode())
        status, body = await answer_of(reader)
        assert (status, body["error"]) == (408, "request_timeout")
        assert 0.25 < loop.time() - started < 1.5
        writer.close()
        # a connection that says nothing is closed without an answer
        quiet, quiet_writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(quiet.read(), 5) == b""
        quiet_writer.close()
        # a slow answer and an idle keep-alive pause longer than the deadline are fine
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(2):
            writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"done"), 5)
            assert head.startswith(b"HTTP/1.1 200")
            await asyncio.sleep(0.4)
        writer.close()
        assert drops == ["header_timeout", "header_timeout"]
    finally:
        await runner.cleanup()


async def test_connections_beyond_the_cap_get_503_and_close() -> None:
    drops: list[str] = []
    counts: list[int] = []
    app = web.Application()
    app[LIMITS] = Limits(
        header_timeout=5, max_connections=3, on_drop=drops.append, on_count=counts.append
    )
    runner = await start(app, "127.0.0.1", 0, 1.0)
    port = bound_port(runner)
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
    try:
        await asyncio.sleep(0.05)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        status, body = await answer_of(reader)
        assert (status, body["error"]) == (503, "temporarily_unavailable")
        writer.close()
        assert drops == ["max_connections"]
        assert max(counts) == 4
    finally:
        for _, w in held:
            w.close()
        await runner.cleanup()


async def keep_alive(
    port: int, count: int
) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    return [await asyncio.open_connection("127.0.0.1", port) for _ in range(count)]


async def ask(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> bytes:
    """One keep-alive request on an open connection; its answer (the body is 'hello')."""
    reader, writer = conn
    writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    return await asyncio.wait_for(reader.readuntil(b"hello"), 5)


def hello_app(limits: Limits) -> web.Application:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/hello", hello)
    app[LIMITS] = limits
    return app


async def test_at_the_cap_the_least_recently_used_idle_connection_makes_room() -> None:
    """Idle keep-alive connections filled the cap and locked callers out;
    as nginx reuses idle connections, the one idle longest is closed to admit a new one."""
    drops: list[str] = []
    app = hello_app(Limits(header_timeout=5, max_connections=3, on_drop=drops.append))
    runner = await start(app, "127.0.0.1", 0, 1.0)
    port = bound_port(runner)
    conns = await keep_alive(port, 3)
    try:
        for conn in (*conns, conns[0]):  # conns[1] is now the one idle longest
            assert (await ask(conn)).startswith(b"HTTP/1.1 200")
        newcomer = (await keep_alive(port, 1))[0]
        conns.append(newcomer)
        assert (await ask(newcomer)).startswith(b"HTTP/1.1 200")
        assert await asyncio.wait_for(conns[1][0].read(), 5) == b""  # closed, silently
        for conn in (conns[0], conns[2]):  # the others still serve
            assert (await ask(conn)).startswith(b"HTTP/1.1 200")
        assert drops == ["keepalive_evicted"]
    finally:
        for _, writer in conns:
            writer.close()
        await runner.cleanup()


async def test_at_the_cap_busy_connections_are_never_closed_for_a_newcomer() -> None:
    drops: list[str] = []
    app = hello_app(Limits(header_timeout=5, max_connections=3, on_drop=drops.append))
    runner = await start(app, "127.0.0.1", 0, 1.0)
    port = bound_port(runner)
    conns = await keep_alive(port, 3)
    try:
        await ask(conns[0])
        conns[0][1].write(b"GET /hello HTTP/1.1\r\n")  # idle no more: a head is arriving
        conns[1][1].write(b"GET /hel")  # a first request, still arriving
        await asyncio.sleep(0.05)  # conns[2] has sent nothing: not a keep-alive connection
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        status, body = await answer_of(reader)
        assert (status, body["error"]) == (503, "temporarily_unavailable")
        writer.close()
        assert drops == ["max_connections"]
        conns[0][1].write(b"Host: x\r\n\r\n")  # the head completes and is answered
        assert (await asyncio.wait_for(conns[0][0].readuntil(b"hello"), 5)).startswith(
            b"HTTP/1.1 200"
        )
    finally:
        for _, w in conns:
            w.close()
        await runner.cleanup()


async def test_keepalive_timeout_is_the_limits_own() -> None:
    app = hello_app(Limits(header_timeout=5, keepalive_timeout=0.3))
    runner = await start(app, "127.0.0.1", 0, 1.0)
    loop = asyncio.get_running_loop()
    conn = (await keep_alive(bound_port(runner), 1))[0]
    try:
        await ask(conn)
        idle = loop.time()
        assert await asyncio.wait_for(conn[0].read(), 5) == b""
        assert 0.2 < loop.time() - idle < 2.0
    finally:
        conn[1].close()
        await runner.cleanup()


async def test_each_head_on_a_busy_connection_gets_its_whole_deadline_and_no_more() -> None:
    # One timer per connection (not one per request): quick requests for longer than the
    # deadline are never cut, and a later slow head is cut header_timeout after its own first
    # byte, neither earlier (the deadline of the connection's first head, still armed) nor
    # never (that timer firing while the slow head is not yet due, and not arming again).
    drops: list[str] = []
    app = hello_app(Limits(header_timeout=0.3, on_drop=drops.append))
    runner = await start(app, "127.0.0.1", 0, 1.0)
    loop = asyncio.get_running_loop()
    busy = conn = (await keep_alive(bound_port(runner), 1))[0]
    try:
        until = loop.time() + 0.8
        while loop.time() < until:
            assert (await ask(busy)).startswith(b"HTTP/1.1 200")
            await asyncio.sleep(0.05)
        assert drops == []
        # A new connection: a quick request, then a slow head 0.1 s later, while the timer
        # armed when the connection opened is still due 0.2 s on.
        reader, writer = conn = await asyncio.open_connection("127.0.0.1", bound_port(runner))
        assert (await ask(conn)).startswith(b"HTTP/1.1 200")
        await asyncio.sleep(0.1)
        started = loop.time()
        writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n")
        await asyncio.sleep(0.25)
        writer.write(b"X-Slow: 1\r\n")  # never ends the head
        status, body = await answer_of(reader)
        assert (status, body["error"]) == (408, "request_timeout")
        assert 0.28 < loop.time() - started < 1.5
        assert drops == ["header_timeout"]
    finally:
        busy[1].close()
        conn[1].close()
        await runner.cleanup()


@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_on_uvloop_a_burst_of_connections_is_accepted_in_a_few_loop_turns(
    family: str, tmp_path: Path
) -> None:
    """libuv accepts one connection per loop turn (libuv#3696): 64 connections waiting in
    the listen queue took 64 turns, each as long as serving the open ones (a 300 ms wait
    for the last of 128 under load). The listener accepts all that wait when it wakes, on a
    port or a Unix socket (whose path stays while it serves); the connections it accepted
    are served, and once stopped the listener refuses."""
    uvloop = pytest.importorskip("uvloop")
    count = 64
    path = str(tmp_path / "listen.sock")

    def connect(port: int) -> socket.socket:
        if family == "tcp":
            return socket.create_connection(("127.0.0.1", port))
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        return sock

    async def main() -> None:
        unix_path = path if family == "unix" else ""
        runner = await start(hello_app(Limits()), "127.0.0.1", 0, 1.0, unix_path=unix_path)
        server = runner.server
        assert server is not None
        port = 0 if unix_path else bound_port(runner)
        clients = []
        try:
            for _ in range(count):  # connected by the kernel, not yet accepted
                clients.append(connect(port))
            loop, turns = asyncio.get_running_loop(), 0
            while len(server.connections) < count and turns < 10 * count:
                ticked = loop.create_future()
                loop.call_soon(ticked.set_result, None)
                await ticked
                turns += 1
            assert len(server.connections) == count
            assert turns <= 4, f"{count} waiting connections took {turns} loop turns"
            conns = [await asyncio.open_connection(sock=c) for c in clients]
            answers = await asyncio.gather(*(ask(c) for c in conns))
            assert all(a.startswith(b"HTTP/1.1 200") for a in answers)
            for _, writer in conns:
                writer.close()
        finally:
            await runner.cleanup()
        with pytest.raises(ConnectionRefusedError):
            connect(port).close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        r.run(main())


class _Failing:
    """A listening socket whose accept fails with each of ``codes`` in turn."""

    def __init__(self, *codes: int) -> None:
        self.codes = list(codes)

    def accept(self) -> tuple[socket.socket, object]:
        code = self.codes.pop(0)
        raise OSError(code, os.strerror(code))


def test_out_of_descriptors_the_listener_pauses_accepting_and_resumes_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    uvloop = pytest.importorskip("uvloop")
    monkeypatch.setattr(listener, "ACCEPT_RETRY_DELAY", 0.05)

    async def main() -> None:
        runner = await start(hello_app(Limits()), "127.0.0.1", 0, 1.0)
        try:
            (site,) = runner.sites
            accepting = site_server(site)
            assert isinstance(accepting, listener._BatchAccept)
            # One connection's own error (aborted, a network's): the next is accepted.
            failing = _Failing(errno.ECONNABORTED, errno.EPROTO, errno.EAGAIN)
            accepting._accept(cast(socket.socket, failing))
            assert accepting.is_serving() and not failing.codes
            accepting._accept(cast(socket.socket, _Failing(errno.EMFILE)))
            assert not accepting.is_serving()
            await asyncio.sleep(0.1)
            assert accepting.is_serving()
            conn = await asyncio.open_connection("127.0.0.1", bound_port(runner))
            assert (await ask(conn)).startswith(b"HTTP/1.1 200")
            conn[1].close()
        finally:
            await runner.cleanup()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        r.run(main())


def test_on_uvloop_serve_forever_returns_once_the_listener_closes() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        runner = await start(hello_app(Limits()), "127.0.0.1", 0, 1.0)
        (site,) = runner.sites
        accepting = site_server(site)
        assert isinstance(accepting, listener._BatchAccept)
        serving = asyncio.create_task(accepting.serve_forever())
        await asyncio.sleep(0.05)
        assert not serving.done() and accepting.is_serving()
        await runner.cleanup()
        await asyncio.wait_for(serving, 2)
        assert not accepting.is_serving() and accepting.sockets == ()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        r.run(main())
