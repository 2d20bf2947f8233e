"""The listener's one reach into aiohttp's private parts (``proxy.listener.customise``)
still works: the app's handler wrapper sees requests, unparsable requests answer JSON.

If aiohttp renames ``AppRunner._make_server``, ``Server.request_handler``, how ``Server``
builds its protocol, or ``RequestHandler.handle_error``, these fail before anything else.
"""

from __future__ import annotations

import asyncio
import inspect
import json

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

from proxy.listener import WRAP_HANDLER, Handler, Runner, bound_port, start


def test_the_private_hooks_still_exist() -> None:
    assert inspect.iscoroutinefunction(web.AppRunner._make_server)
    params = list(inspect.signature(RequestHandler.handle_error).parameters)
    assert params[:5] == ["self", "request", "status", "exc", "message"]
    assert "request_handler" in Server.__init__.__code__.co_names
    assert "_kwargs" in Server.__init__.__code__.co_names


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
