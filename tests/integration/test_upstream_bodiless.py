"""An upstream answer with no body (a revalidation's 304, a 204, any answer to HEAD) ends
the exchange at its head: its slot and connection go back at once, before the answer is
released (the long way's flights hold nothing while their 304 is merged and answered); an
answer with a body still holds both until it is released."""

from __future__ import annotations

import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.client import create_session
from proxy.errors import UpstreamBusy
from proxy.messages import ProxyRequest
from proxy.pipeline.upstream import Upstream
from proxy.settings import UpstreamSettings
from tests.conftest import serve_handler

ETAG = '"v1"'
BIG = b"x" * (200 * 1024)  # above SMALL_BODY: streamed


async def handler(request: web.Request) -> web.StreamResponse:
    if request.path == "/v1/none":
        return web.Response(status=204)
    if request.headers.get("If-None-Match") == ETAG:
        return web.Response(status=304, headers={"ETag": ETAG})  # no Content-Length
    return web.Response(body=BIG, headers={"ETag": ETAG, "Content-Type": "application/json"})


def sent(method: str, path: str, **headers: str) -> ProxyRequest:
    return ProxyRequest(method, path, "", CIMultiDictProxy(CIMultiDict(headers)), account="main")


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("GET", "/v1/p/1", {"If-None-Match": ETAG}, 304),
        ("GET", "/v1/none", {}, 204),
        ("HEAD", "/v1/p/1", {}, 200),
    ],
)
async def test_a_bodiless_answer_gives_its_slot_and_connection_back_before_it_is_released(
    method: str, path: str, headers: dict[str, str], status: int
) -> None:
    runner, url = await serve_handler(handler)
    # One connection for the account: a second request needs the first one's slot.
    settings = UpstreamSettings(base_url=url, account_pool_size=1, connect_timeout=0.2)
    session = create_session(settings)
    upstream = Upstream(settings, session)
    try:
        first = await upstream.send(sent(method, path, **headers))
        second = await upstream.send(sent(method, path, **headers))  # first not released
        assert (first.status, second.status) == (status, status)
        for answer in (first, second):
            assert [chunk async for chunk in answer.body] == []  # type: ignore[union-attr]
            await answer.release()
        if method == "HEAD":  # its framing as it came, for the caller's HEAD answer
            assert first.headers["Content-Length"] == str(len(BIG))
        assert first.headers.get("ETag") == (ETAG if status != 204 else None)
        connector = session.connector
        assert connector is not None
        # Both exchanges went over the one pooled connection (given back after each head).
        assert sum(len(c) for c in connector._conns.values()) == 1
    finally:
        await session.close()
        await runner.cleanup()


async def test_an_answer_with_a_body_holds_its_slot_until_it_is_released() -> None:
    runner, url = await serve_handler(handler)
    settings = UpstreamSettings(base_url=url, account_pool_size=1, connect_timeout=0.2)
    session = create_session(settings)
    upstream = Upstream(settings, session)
    try:
        first = await upstream.send(sent("GET", "/v1/p/1"))
        with pytest.raises(UpstreamBusy):
            await upstream.send(sent("GET", "/v1/p/1"))
        await first.release()
        second = await upstream.send(sent("GET", "/v1/p/1"))
        assert b"".join([c async for c in second.body]) == BIG  # type: ignore[union-attr]
        await second.release()
    finally:
        await session.close()
        await runner.cleanup()
