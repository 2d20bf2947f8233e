"""What a revalidation's flight does once per exchange, and no more (issue 21,
docs/performance.md "A revalidation's flight, part by part"): the upstream layer against a
real Kounta of our own on loopback (raw asyncio: a 304 without a body to a conditional GET,
else a body of the size asked), through the real aiohttp client session."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import fields, replace
from types import SimpleNamespace
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.cache.memory import Stored
from proxy.client import create_session
from proxy.messages import ProxyRequest
from proxy.pipeline import upstream as upstream_module
from proxy.pipeline.upstream import SMALL_BODY, Upstream
from proxy.settings import UpstreamSettings
from tests.integration.test_direct_upstream import loopback


class Kounta:
    """Answers 304 to a request carrying If-None-Match, else 200 with ``size`` bytes
    (``size`` from a ``?size=N`` query, default 2). Records every request line."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.connections = 0
        self.url = ""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                line = head.split("\r\n", 1)[0]
                self.lines.append(line)
                if "if-none-match:" in head.lower():
                    writer.write(b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n')
                else:
                    target = line.split(" ")[1]
                    size = int(target.split("size=")[1]) if "size=" in target else 2
                    writer.write(
                        f'HTTP/1.1 200 OK\r\nETag: "v1"\r\nContent-Length: {size}\r\n\r\n'.encode()
                        + b"x" * size
                    )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def kounta() -> AsyncIterator[Kounta]:
    found = Kounta()
    async with loopback(found.serve) as found.url:
        yield found


def counting(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[object]:
    """Calls of ``owner.name`` from now on (each still calls the real one)."""
    calls: list[object] = []
    real: Callable[..., Any] = getattr(owner, name)

    def count(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, count)
    return calls


def conditional(path: str, query: str = "") -> ProxyRequest:
    headers = CIMultiDictProxy(CIMultiDict({"If-None-Match": '"v1"', "Accept": "*/*"}))
    return ProxyRequest("GET", path, query, headers, account="main")


async def test_a_304_is_over_when_it_is_returned_no_finaliser_no_second_release(
    kounta: Kounta, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bodiless answer gives its connection back at its head: the layer registers no
    garbage-collection safety net for it (one per streamed answer still), the account's slot
    is free again and every exchange reuses the one pooled connection."""
    # The layer's own finalisers only (aiohttp registers some of its own).
    monkeypatch.setattr(upstream_module, "weakref", SimpleNamespace(finalize=weakref.finalize))
    finalisers = counting(monkeypatch, upstream_module.weakref, "finalize")
    settings = UpstreamSettings(base_url=kounta.url)
    session = create_session(settings)
    upstream = Upstream(settings, session)
    try:
        for _ in range(3):
            response = await upstream.send(conditional("/v1/companies/1/customers/1.json"))
            assert response.status == 304
            assert [chunk async for chunk in response.body] == []  # type: ignore[union-attr]
            await response.release()
        assert finalisers == []
        assert not upstream.slots.accounts["main"].locked()
        plain = ProxyRequest("GET", "/v1/companies/1/big/1.json", f"size={SMALL_BODY * 2}",
                             CIMultiDictProxy(CIMultiDict()), account="main")  # fmt: skip
        streamed = await upstream.send(plain)
        assert len(finalisers) == 1  # a streamed answer keeps its safety net
        body = b"".join([chunk async for chunk in streamed.body])  # type: ignore[union-attr]
        await streamed.release()
    finally:
        await session.close()
    assert len(body) == SMALL_BODY * 2
    assert kounta.connections == 1
    assert len(kounta.lines) == 4


async def test_the_upstream_url_and_route_are_made_once_per_path_and_query(
    kounta: Kounta, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A revalidated key asks for the same path again and again: its URL and its metrics'
    route template are made the first time only, and each path and query is asked as sent."""
    templates = counting(monkeypatch, upstream_module, "template")
    urls = counting(monkeypatch, upstream_module, "upstream_url")
    settings = UpstreamSettings(base_url=kounta.url)
    session = create_session(settings)
    upstream = Upstream(settings, session)
    asked = [("/v1/companies/1/customers/1.json", "")] * 3
    asked += [("/v1/companies/1/customers/2.json", ""), ("/v1/companies/1/customers/1.json", "a=1")]
    try:
        for path, query in asked:
            response = await upstream.send(conditional(path, query))
            await response.release()
    finally:
        await session.close()
    assert len(templates) == len(urls) == 3
    assert kounta.lines == [
        f"GET {path}{'?' + query if query else ''} HTTP/1.1" for path, query in asked
    ]


def test_a_requests_fast_copy_keeps_every_field_replace_would() -> None:
    """``ProxyRequest.sent_as`` (and the freshened ``Stored`` the exchange builds) name every
    field: one added later and left out would be dropped silently."""
    headers = CIMultiDictProxy(CIMultiDict({"A": "1"}))

    async def authorize(deadline: float) -> str:
        return "Bearer x"

    values = {
        "method": "HEAD", "path": "/v1/x", "query": "q=1", "headers": headers, "body": b"b",
        "account": "acct", "caller": "c", "priority": "batch", "request_id": "r",
        "deadline": 5.0, "authorize": authorize, "wanted": lambda: True, "prepaid": None,
    }  # fmt: skip
    assert set(values) == {f.name for f in fields(ProxyRequest)}
    request = ProxyRequest(**values)  # type: ignore[arg-type]
    other = CIMultiDictProxy(CIMultiDict({"B": "2"}))
    assert request.sent_as("GET", other, None) == replace(
        request, method="GET", headers=other, authorize=None
    )
    assert [f.name for f in fields(Stored)] == ["entry", "body", "body_key", "crc"]
