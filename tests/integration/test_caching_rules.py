"""RFC 9111 rules against a hostile origin of our own, over real loopback sockets.

The origin is a raw asyncio server, so it can send what aiohttp's server never would:
dates in near-miss forms, folded header lines, an ``Age`` with junk, fields named by
``Connection``, a hang or a reset. Each test counts the requests that reached it.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from proxy.sandbox import SandboxConfig, create_sandbox_app
from proxy.settings import CacheRule, CacheSettings, RetrySettings, Settings, UpstreamSettings
from tests.conftest import TOKEN, MakeProxy, proxy_settings, serve

Reply = Callable[[str], bytes | None]  # path -> raw answer; None: hang up at once


def answer(*headers: str, body: bytes = b'{"id": 1}') -> bytes:
    head = ["HTTP/1.1 200 OK", "Content-Type: application/json", *headers]
    head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


def http_date(at: float) -> str:
    return email.utils.formatdate(at, usegmt=True)


class Origin:
    """A raw upstream: ``reply(path)`` gives each answer's bytes; counts requests per path."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.hits: Counter[str] = Counter()
        self.hang = False
        self.server: asyncio.Server | None = None
        self.url = ""
        self._open: set[asyncio.StreamWriter] = set()

    async def start(self) -> Origin:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def stop(self) -> None:
        """Close the listener and every connection: the port now refuses."""
        assert self.server is not None
        self.server.close()
        for writer in list(self._open):
            writer.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                self.hits[path] += 1
                data = self.reply(path)
                if self.hang:
                    await asyncio.sleep(30)
                if data is None:
                    return  # a reset: the connection ends without an answer
                writer.write(data)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._open.discard(writer)
            writer.close()


@pytest.fixture
async def origin() -> AsyncIterator[Callable[[Reply], Any]]:
    made: list[Origin] = []

    async def make(reply: Reply) -> Origin:
        made.append(await Origin(reply).start())
        return made[-1]

    yield make
    for o in made:
        with contextlib.suppress(Exception):
            await o.stop()


def settings_for(url: str, tmp_path: Any, **cache: Any) -> Settings:
    # One try and a short read timeout: the failures below must be quick and counted once.
    return proxy_settings(
        url,
        tmp_path,
        cache=CacheSettings(**cache),
        retry=RetrySettings(attempts=1),
        upstream=UpstreamSettings(
            base_url=url, connect_timeout=1, read_timeout=0.3, total_timeout=2
        ),
    )


async def get(
    client: aiohttp.ClientSession, url: str, **headers: str
) -> tuple[int, CIMultiDictProxy[str], bytes]:
    async with client.get(url, headers=headers) as r:
        return r.status, r.headers, await r.read()


# --------------------------------------------------------------------------- Expires (16)


def expires_forms(at: float) -> dict[str, str]:
    """``at`` (an hour ahead) in forms that only look like an HTTP-date (RFC 9110 5.6.7)."""
    imf = http_date(at)  # "Tue, 14 Nov 2023 22:14:20 GMT"
    day, date, clock = imf[:3], imf[5:16], imf[17:25]
    d, mon, year = date.split(" ")
    hour = time.gmtime(at).tm_hour
    return {
        "zone UTC": imf.replace("GMT", "UTC"),
        "zone AEST": imf.replace("GMT", "AEST"),
        "two-digit year": f"{day}, {d} {mon} {year[2:]} {clock} GMT",
        "missing comma": imf.replace(",", ""),
        "extra spaces": imf.replace(" ", "  ", 1),
        "dashes": f"{day}, {d}-{mon}-{year} {clock} GMT",
        "dots in the time": imf.replace(clock, clock.replace(":", ".")),
        "one-digit hour": imf.replace(clock, f"{hour % 10}{clock[2:]}"),
        # obs-fold (RFC 9112 5.2): aiohttp keeps the tab / the doubled space when unfolding.
        "folded with a tab": f"{day}, {d} {mon} {year}\r\n\t{clock} GMT",
        "folded with spaces": f"{day}, {d} {mon} {year} \r\n {clock} GMT",
    }


async def test_an_invalid_expires_is_never_served_fresh(
    origin: Callable[[Reply], Any], make_proxy: MakeProxy, tmp_path: Any
) -> None:
    now = time.time()
    forms = {"valid (control)": http_date(now + 3600), **expires_forms(now + 3600)}
    paths = {f"/v1/expires/{i}": name for i, name in enumerate(forms)}
    by_path = {path: forms[name] for path, name in paths.items()}

    def reply(path: str) -> bytes:
        return answer(f"Date: {http_date(time.time())}", f"Expires: {by_path[path]}", 'ETag: "e"')

    o = await origin(reply)
    # A rule with heuristic freshness: an invalid Expires must not fall back to it either.
    p = await make_proxy(settings_for(o.url, tmp_path, rules=(CacheRule("/v1/*", 600),)))
    fresh: dict[str, str] = {}
    async with aiohttp.ClientSession() as client:
        for path, name in paths.items():
            status, _, _ = await get(client, p.url + path)
            assert status == 200, name
            status, headers, _ = await get(client, p.url + path)
            assert status == 200, name
            fresh[name] = headers["X-Cache"]
    assert fresh.pop("valid (control)") == "HIT"
    assert [name for name, cache in fresh.items() if cache == "HIT"] == []
    assert all(o.hits[path] == 2 for path, name in paths.items() if name in fresh)


# --------------------------------------------------------------------------- Age (17)


async def test_age_is_read_as_rfc_9111_says(
    origin: Callable[[Reply], Any], make_proxy: MakeProxy, tmp_path: Any
) -> None:
    ages = {
        "/v1/age/suffix": "30s",  # invalid: ignored, so fresh for its 60 s
        "/v1/age/junk": "30 junk",
        "/v1/age/superscript": "\xb2",  # "²": str.isdigit() says yes, float() raises
        "/v1/age/list": "90, 0",  # a list: the first member counts, so already stale
    }

    def reply(path: str) -> bytes:
        return answer("Cache-Control: max-age=60", f"Age: {ages[path]}", 'ETag: "a"')

    o = await origin(reply)
    p = await make_proxy(settings_for(o.url, tmp_path))
    seen: dict[str, tuple[int, str]] = {}
    async with aiohttp.ClientSession() as client:
        for path in ages:
            await get(client, p.url + path)
            status, headers, _ = await get(client, p.url + path)
            seen[path] = (status, headers.get("X-Cache", ""))
        # The caller's own delta-seconds: the same digits rule, never a 500.
        status, _, body = await get(
            client, p.url + "/v1/age/suffix", **{"Cache-Control": "max-age=\xb2"}
        )
    assert seen == {
        "/v1/age/suffix": (200, "HIT"),
        "/v1/age/junk": (200, "HIT"),
        "/v1/age/superscript": (200, "HIT"),
        "/v1/age/list": (200, "MISS"),  # asked again (this origin never answers 304)
    }
    assert status == 200, body


# --------------------------------------------------------------------------- Connection (18)


async def test_fields_named_by_connection_are_not_stored(
    origin: Callable[[Reply], Any], make_proxy: MakeProxy, tmp_path: Any
) -> None:
    def reply(path: str) -> bytes:
        return answer(
            "Cache-Control: max-age=60",
            "Connection: X-Backend-Node, X-Trace",
            "X-Backend-Node: node-17.internal",
            "X-Trace: t-1",
            "X-Kept: yes",
        )

    o = await origin(reply)
    p = await make_proxy(settings_for(o.url, tmp_path))
    async with aiohttp.ClientSession() as client:
        answers = [await get(client, p.url + "/v1/sites") for _ in range(2)]
    assert [h["X-Cache"] for _, h, _ in answers] == ["MISS", "HIT"]
    for _, headers, _ in answers:
        assert "X-Backend-Node" not in headers and "X-Trace" not in headers
        assert headers["X-Kept"] == "yes"
    assert o.hits["/v1/sites"] == 1


# --------------------------------------------------------------------------- stale-if-error (19)


def stored_answer(cache_control: str = "") -> Reply:
    headers = ['ETag: "v1"', "Date: " + http_date(time.time())]
    if cache_control:
        headers.append(f"Cache-Control: {cache_control}")
    return lambda path: answer(*headers, body=b'{"id": 7, "name": "kept"}')


async def fail(o: Origin, how: str) -> None:
    if how == "refused":
        await o.stop()
    elif how == "hang":
        o.hang = True
    else:
        o.reply = lambda path: None  # reset: hang up on every request


@pytest.mark.parametrize("how", ["refused", "hang", "reset"])
async def test_an_unreachable_origin_gets_the_stored_answer_by_default(
    origin: Callable[[Reply], Any], make_proxy: MakeProxy, tmp_path: Any, how: str
) -> None:
    o = await origin(stored_answer())
    p = await make_proxy(settings_for(o.url, tmp_path))  # cache.stale_if_error: default 300
    async with aiohttp.ClientSession() as client:
        _, first, body = await get(client, p.url + "/v1/sites/7")
        await fail(o, how)
        status, headers, stale = await get(client, p.url + "/v1/sites/7")
    assert (first["X-Cache"], status, headers["X-Cache"], stale) == ("MISS", 200, "STALE", body)
    assert headers["Warning"] == '111 - "Revalidation Failed"'
    cache_status = headers["Cache-Status"]  # one member of the proxy's, RFC 9211 tokens
    assert cache_status.startswith("kounta-proxy; fwd=stale; detail=upstream_")
    assert cache_status.count("kounta-proxy") == 1 and '"' not in cache_status
    assert int(headers["Age"]) >= 0


async def test_a_stopped_sandbox_still_answers_stored_gets(
    make_proxy: MakeProxy, tmp_path: Any
) -> None:
    app = create_sandbox_app(SandboxConfig(bearer_tokens=(TOKEN,)))
    runner, port = await serve(app)
    p = await make_proxy(settings_for(f"http://127.0.0.1:{port}", tmp_path))
    path = "/v1/companies/5001/customers.json"
    async with aiohttp.ClientSession() as client:
        _, _, body = await get(client, p.url + path)
        await runner.cleanup()
        status, headers, stale = await get(client, p.url + path)
        status2, _, _ = await get(client, p.url + "/v1/companies/5001/products.json")
    assert (status, headers["X-Cache"], stale) == (200, "STALE", body)
    assert status2 == 502  # nothing stored: the failure itself, as JSON


@pytest.mark.parametrize(
    "cache_control",
    ["must-revalidate", "proxy-revalidate", "no-cache", "s-maxage=60, stale-if-error=600"],
)
async def test_no_stale_answer_when_the_response_forbids_it(
    origin: Callable[[Reply], Any], make_proxy: MakeProxy, tmp_path: Any, cache_control: str
) -> None:
    o = await origin(stored_answer(f"max-age=0, {cache_control}"))
    p = await make_proxy(settings_for(o.url, tmp_path))
    async with aiohttp.ClientSession() as client:
        await get(client, p.url + "/v1/sites/7")
        await fail(o, "refused")
        status, headers, body = await get(client, p.url + "/v1/sites/7")
    assert status == 502
    assert json.loads(body)["error"] == "upstream_unreachable"
    assert "Warning" not in headers


@pytest.mark.parametrize(
    ("cache", "age", "stale"),
    [
        ({"stale_if_error": 0}, "0", False),  # 0 turns it off
        ({}, "299", True),  # within the default 300 s
        ({}, "400", False),  # past it
        ({"stale_if_error": 500}, "400", True),
        # A rule's window wins where set, also when it is the shorter one.
        ({"rules": (CacheRule("/v1/*", stale_if_error=100),)}, "200", False),
        ({"rules": (CacheRule("/v1/*", stale_if_error=100),)}, "50", True),
    ],
)
async def test_the_stale_if_error_window(
    origin: Callable[[Reply], Any],
    make_proxy: MakeProxy,
    tmp_path: Any,
    cache: dict[str, Any],
    age: str,
    stale: bool,
) -> None:
    # Age makes the stored answer that many seconds stale without a test waiting for it.
    o = await origin(lambda path: answer('ETag: "v1"', "Cache-Control: max-age=0", f"Age: {age}"))
    p = await make_proxy(settings_for(o.url, tmp_path, **cache))
    async with aiohttp.ClientSession() as client:
        await get(client, p.url + "/v1/sites/7")
        await fail(o, "refused")
        status, headers, _ = await get(client, p.url + "/v1/sites/7")
    assert (status, headers.get("X-Cache")) == ((200, "STALE") if stale else (502, None))


@pytest.mark.parametrize(
    ("status", "rule", "stale"),
    [
        (500, False, False),
        (503, False, False),
        (429, False, False),
        (500, True, True),
        (429, True, True),
    ],
)
async def test_error_answers_need_a_rules_window(
    origin: Callable[[Reply], Any],
    make_proxy: MakeProxy,
    tmp_path: Any,
    status: int,
    rule: bool,
    stale: bool,
) -> None:
    o = await origin(stored_answer())
    rules = (CacheRule("/v1/*", stale_if_error=60),) if rule else ()
    p = await make_proxy(settings_for(o.url, tmp_path, rules=rules))
    async with aiohttp.ClientSession() as client:
        await get(client, p.url + "/v1/sites/7")
        reason = {500: "Internal Server Error", 503: "Service Unavailable", 429: "Too Many"}
        o.reply = lambda path: (
            f"HTTP/1.1 {status} {reason[status]}\r\nContent-Type: text/plain\r\n"
            "Content-Length: 4\r\n\r\nboom"
        ).encode()
        got, headers, _ = await get(client, p.url + "/v1/sites/7")
    if stale:
        assert (got, headers["X-Cache"]) == (200, "STALE")
        # A 429 reaches the cache as the budget's rate_limited error (it pauses the account).
        expected = (
            "kounta-proxy; fwd=stale; detail=rate_limited"
            if status == 429
            else f"kounta-proxy; fwd=stale; fwd-status={status}; detail=upstream_{status}"
        )
        assert headers["Cache-Status"] == expected
    else:
        assert got == status
