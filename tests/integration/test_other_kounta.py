"""The proxy against a Kounta look-alike that is not our sandbox.

``proxy/sandbox`` was written with the proxy and shares its assumptions. The fake below
follows the same public reference (kounta-api-overview.txt, kounta-facts.md) but makes the
other choice wherever the reference leaves one open:

- OAuth token endpoint only at ``/v1/token.json``; ``expires_in`` as a string,
  ``token_type: "bearer"``, refresh tokens rotated once and then omitted (keep the old one);
  client credentials only in the form body.
- Weak ETags only (``W/"..."``) and some endpoints with no ETag at all, or only
  ``Last-Modified``; ``Cache-Control: private, max-age=0`` / ``no-cache``; ``Vary: Accept``;
  304s that do not repeat the paging headers.
- Lists paged by absolute ``X-Next-Page`` URLs whose cursor holds ``%2F``, ``%2B``, ``%3D``
  and a raw ``+`` and ``=`` (accepted only byte for byte as issued); or by the older
  ``X-Page`` / ``X-Pages`` scheme with no ``X-Next-Page``; or with the cursor in the path.
- ``/v1/companies/me`` answers 302 (absolute Location) or 301 (relative Location).
- 429 as plain text ``Limit exceeded`` with ``X-Ratelimit-Reset`` (epoch seconds) or nothing.
- 401 bodies in JSON with or without ``error``, or as an HTML page; 5xx HTML pages;
  406 without ``.json``/Accept; 400 on a POST that is not ``application/json``.
- ``X-Pretty-Print`` with 4-space indentation; 201 with absolute Location; 204 on DELETE;
  gzip-encoded, chunked (no Content-Length) and slow answers.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate, parsedate_to_datetime
from typing import Any
from urllib.parse import parse_qs, quote

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from proxy.auth.endpoint import parse_token_response
from proxy.settings import (
    AccountSettings,
    BudgetSettings,
    RetrySettings,
    Secret,
    Settings,
)
from tests.conftest import MakeProxy, Proxy, proxy_settings, serve

CLIENT_ID = "other-client"
CLIENT_SECRET = "other-secret-0123456789"
FIRST_REFRESH = "refresh-0"
COMPANY = 5_000_000_000_123  # a 64-bit id: comes with id_str
C = f"/v1/companies/{COMPANY}"
PAGE = 25
LIMIT_TEXT = b"Limit exceeded"
EPOCH = 1_700_000_000  # Last-Modified of version 0 of a collection


# --------------------------------------------------------------------------- the fake


@dataclass
class Fake:
    """What the other Kounta knows and counts."""

    now: Callable[[], float] = time.time
    # access token -> expiry (fake clock); refresh tokens that still work
    tokens: dict[str, float] = field(default_factory=dict)
    refresh_tokens: set[str] = field(default_factory=lambda: {FIRST_REFRESH})
    token_requests: list[dict[str, str]] = field(default_factory=list)
    issued = 0
    # How the token endpoint answers: lifetime (as JSON value) and whether to rotate.
    expires_in: Any = "3600"
    rotate_first_only: bool = True
    # How a 401 for a bad token looks: "json", "description_only" or "html".
    unauthorized_style: str = "json"
    calls: Counter[tuple[str, str]] = field(default_factory=Counter)
    not_modified: int = 0
    statuses: list[int] = field(default_factory=list)
    cursors: set[str] = field(default_factory=set)
    # 429 answers still to give on GET .../orders: each the headers to send with it.
    limits: list[dict[str, str]] = field(default_factory=list)
    products: list[dict[str, Any]] = field(default_factory=list)
    customers: dict[int, dict[str, Any]] = field(default_factory=dict)
    customers_version: int = 0
    categories: list[dict[str, Any]] = field(default_factory=list)
    taxes_version: int = 0

    def __post_init__(self) -> None:
        self.products = [
            {"id": 9_000_000_000_000 + i, "id_str": str(9_000_000_000_000 + i), "name": f"P{i}"}
            for i in range(60)
        ]
        self.customers = {i: {"id": i, "first_name": f"C{i}", "email": None} for i in range(1, 31)}
        self.categories = [{"id": i, "name": f"Cat{i}"} for i in range(30)]

    def served(self, method: str, path: str) -> int:
        return self.calls[(method, path)]

    def issue(self) -> dict[str, Any]:
        self.issued += 1
        access = f"access-{self.issued}"
        self.tokens[access] = self.now() + float(self.expires_in)
        answer: dict[str, Any] = {
            "access_token": access,
            "token_type": "bearer",
            "expires_in": self.expires_in,
            "scope": "",
        }
        if self.issued == 1 or not self.rotate_first_only:
            rotated = f"refresh-{self.issued}"
            self.refresh_tokens = {rotated}  # the old one dies: strict rotation
            answer["refresh_token"] = rotated
        return answer

    def expire_all(self) -> None:
        for token in self.tokens:
            self.tokens[token] = self.now() - 1

    def change_customer(self, cid: int, **fields: Any) -> None:
        self.customers[cid].update(fields)
        self.customers_version += 1


FAKE = web.AppKey("fake", Fake)


def _json_bytes(request: web.Request, value: Any) -> bytes:
    if request.headers.get("X-Pretty-Print") == "1":
        return json.dumps(value, indent=4).encode()
    return json.dumps(value, separators=(",", ":")).encode()


def _weak_etag(value: Any) -> str:
    digest = hashlib.sha1(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]
    return f'W/"{digest}"'


def _error(status: int, code: str, description: str) -> web.Response:
    body = json.dumps({"error": code, "error_description": description, "status": status})
    return web.Response(status=status, text=body, content_type="application/json")


def _html(status: int, title: str) -> web.Response:
    page = f"<html><head><title>{title}</title></head><body><h1>{title}</h1><hr>nginx</body></html>"
    return web.Response(status=status, text=page, content_type="text/html")


def _unauthorized(style: str, text: str) -> web.Response:
    if style == "html":
        return _html(401, text)
    body = {"error_description": text}
    if style == "json":
        body = {"error": "invalid_grant", **body}  # not invalid_token: only the words say it
    return web.Response(status=401, text=json.dumps(body), content_type="application/json")


def _inm_matches(request: web.Request, etag: str) -> bool:
    given = request.headers.get("If-None-Match", "")
    tags = [t.strip().removeprefix("W/") for t in given.split(",")]
    return etag.removeprefix("W/") in tags


async def _send(
    request: web.Request,
    value: Any,
    headers: dict[str, str],
    *,
    etag: bool = True,
    chunked: bool = False,
    gzipped: bool = False,
    trickle: float = 0.0,
) -> web.StreamResponse:
    """A JSON answer (or a 304) with this fake's header habits."""
    out = {"Vary": "Accept", **headers}
    if etag:
        tag = _weak_etag(value)
        if _inm_matches(request, tag):
            request.app[FAKE].not_modified += 1
            # No paging headers on a 304: only what RFC 9110 15.4.5 requires.
            keep = {k: v for k, v in out.items() if k in ("Cache-Control", "Vary")}
            return web.Response(status=304, headers={"ETag": tag, **keep})
        out["ETag"] = tag
    body = _json_bytes(request, value)
    if not chunked:
        return web.Response(body=body, headers=out, content_type="application/json")
    wants_gzip = "gzip" in request.headers.get("Accept-Encoding", "")
    if gzipped and wants_gzip:
        body = gzip.compress(body)
        out["Content-Encoding"] = "gzip"
    response = web.StreamResponse(headers={**out, "Content-Type": "application/json"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    for i in range(0, len(body), 500):
        await response.write(body[i : i + 500])
        if trickle:
            await asyncio.sleep(trickle)
    await response.write_eof()
    return response


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def kounta_rules(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count; then format (406), content type (400) and authentication (401), in that order."""
    fake = request.app[FAKE]
    fake.calls[(request.method, request.path)] += 1
    response = await _checked(request, handler, fake)
    fake.statuses.append(response.status)
    return response


async def _checked(request: web.Request, handler: Handler, fake: Fake) -> web.StreamResponse:
    if request.path == "/v1/token.json":
        return await handler(request)
    accept = request.headers.get("Accept", "")
    if not request.path.endswith(".json") and "application/json" not in accept:
        return _error(406, "not_acceptable", "Use the .json extension or Accept: application/json")
    if request.method in ("POST", "PUT") and request.content_type != "application/json":
        return _error(400, "invalid_request", "Content-Type must be application/json")
    authorization = request.headers.get("Authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme == "Basic":
        pair = base64.b64decode(credentials).decode()
        if pair != f"{CLIENT_ID}:{CLIENT_SECRET}":
            return web.Response(status=401, text="Invalid client credentials")
        return await handler(request)
    if scheme.lower() != "bearer" or credentials not in fake.tokens:
        return _unauthorized(fake.unauthorized_style, "The access token provided is invalid")
    if fake.now() >= fake.tokens[credentials]:
        return _unauthorized(fake.unauthorized_style, "The access token provided has expired")
    return await handler(request)


async def token(request: web.Request) -> web.Response:
    fake = request.app[FAKE]
    form = {k: str(v) for k, v in (await request.post()).items()}
    fake.token_requests.append(form)
    if (form.get("client_id"), form.get("client_secret")) != (CLIENT_ID, CLIENT_SECRET):
        return _error(401, "invalid_client", "Client authentication failed")
    if form.get("grant_type") != "refresh_token":
        return _error(400, "unsupported_grant_type", "Only refresh_token is offered here")
    if form.get("refresh_token") not in fake.refresh_tokens:
        return _error(400, "invalid_grant", "Invalid refresh token")
    # Served as text/plain: a client must not rely on the content type.
    return web.Response(text=json.dumps(fake.issue()), content_type="text/plain")


def _bare(path: str) -> str:
    return path.removesuffix(".json")


async def me(request: web.Request) -> web.StreamResponse:
    target = f"{C}.json"
    if request.query.get("style") == "relative":
        raise web.HTTPMovedPermanently(target)
    raise web.HTTPFound(f"http://{request.host}{target}")


async def company(request: web.Request) -> web.StreamResponse:
    value = {"id": COMPANY, "id_str": str(COMPANY), "name": "Other Café"}
    return await _send(request, value, {"Cache-Control": "private, max-age=0"})


async def taxes(request: web.Request) -> web.StreamResponse:
    version = request.app[FAKE].taxes_version
    value = [{"id": 1, "code": "GST", "rate": 0.1, "v": version}]
    return await _send(request, value, {"Cache-Control": "private, max-age=60"})


def _cursor_query(fake: Fake, after: int) -> str:
    opaque = base64.b64encode(f"after={after}?/>>".encode()).decode() + "/+="
    query = f"cursor={quote(opaque, safe='')}&t=x+y=z"
    fake.cursors.add(query)
    return query


async def products(request: web.Request) -> web.StreamResponse:
    fake = request.app[FAKE]
    raw_query = request.raw_path.partition("?")[2]
    start = 0
    if raw_query:
        if raw_query not in fake.cursors:
            return _error(400, "invalid_cursor", "The cursor was altered")
        opaque = parse_qs(raw_query)["cursor"][0].removesuffix("/+=")
        start = int(base64.b64decode(opaque).decode().split("=")[1].split("?")[0])
    page = fake.products[start : start + PAGE]
    headers = {"Cache-Control": "no-cache"}
    if start + PAGE < len(fake.products):
        headers["X-Next-Page"] = f"http://{request.host}{request.path}?" + _cursor_query(
            fake, start + PAGE
        )
    return await _send(request, page, headers, chunked=True, gzipped=True)


def _last_modified(version: int) -> str:
    return formatdate(EPOCH + version, usegmt=True)


async def customers(request: web.Request) -> web.StreamResponse:
    """Older paging (X-Page in, X-Pages out), Last-Modified and no ETag."""
    fake = request.app[FAKE]
    if request.method == "POST":
        data = await request.json()
        cid = max(fake.customers) + 1
        fake.customers[cid] = {"id": cid, **data}
        fake.customers_version += 1
        location = f"http://{request.host}{C}/customers/{cid}.json"
        return web.json_response(fake.customers[cid], status=201, headers={"Location": location})
    modified = _last_modified(fake.customers_version)
    since = request.headers.get("If-Modified-Since")
    if since and parsedate_to_datetime(since).timestamp() >= EPOCH + fake.customers_version:
        fake.not_modified += 1
        return web.Response(status=304, headers={"Last-Modified": modified})
    records = list(fake.customers.values())
    pages = max(1, -(-len(records) // PAGE))
    number = int(request.headers.get("X-Page", "0"))
    page = records[number * PAGE : (number + 1) * PAGE]
    headers = {"X-Pages": str(pages), "Last-Modified": modified}
    return await _send(request, page, headers, etag=False)


async def customer(request: web.Request) -> web.StreamResponse:
    """No validator at all, and no-cache: a cache must never answer this from memory."""
    fake = request.app[FAKE]
    cid = int(request.match_info["id"])
    if cid not in fake.customers:
        return _error(404, "not_found", "No such customer")
    if request.method == "DELETE":
        del fake.customers[cid]
        fake.customers_version += 1
        return web.Response(status=204)
    if request.method == "PUT":
        fake.change_customer(cid, **(await request.json()))
        return web.json_response(fake.customers[cid])
    value = fake.customers[cid]
    return await _send(request, value, {"Cache-Control": "no-cache"}, etag=False)


async def categories(request: web.Request) -> web.StreamResponse:
    """The cursor lives in the path (the reference does not promise a format)."""
    fake = request.app[FAKE]
    start = 0
    token = request.match_info.get("cursor")
    if token is not None:
        opaque = token.removesuffix(".json").removesuffix("/z")
        start = int(base64.b64decode(opaque).decode().split("/")[0])
    headers: dict[str, str] = {}
    if start + PAGE < len(fake.categories):
        opaque = quote(base64.b64encode(f"{start + PAGE}/??".encode()).decode() + "/z", safe="")
        headers["X-Next-Page"] = f"http://{request.host}{C}/categories/after/{opaque}.json"
    return await _send(request, fake.categories[start : start + PAGE], headers)


async def staff(request: web.Request) -> web.StreamResponse:
    """Cursor paging with a relative X-Next-Page, or (``?tls=1``) one that says https
    although the request came over http (a TLS-terminating balancer in front)."""
    start = int(request.query.get("from", "0"))
    headers: dict[str, str] = {}
    if start + PAGE < 40:
        tls = request.query.get("tls") == "1"
        path = f"{request.path}?from={start + PAGE}" + ("&tls=1" if tls else "")
        headers["X-Next-Page"] = f"https://{request.host}{path}" if tls else path
    value = [{"id": i} for i in range(start, min(start + PAGE, 40))]
    return await _send(request, value, headers)


async def orders(request: web.Request) -> web.StreamResponse:
    fake = request.app[FAKE]
    if fake.limits:
        headers = fake.limits.pop(0)
        return web.Response(status=429, body=LIMIT_TEXT, headers=headers)
    if request.method == "POST":
        return web.json_response({"id": 1}, status=201)
    return await _send(request, [{"id": 1, "status": "COMPLETE"}], {})


async def broken(request: web.Request) -> web.StreamResponse:
    status = int(request.match_info["status"])
    return _html(status, f"{status} {'Service Unavailable' if status == 503 else 'Server Error'}")


async def slow(request: web.Request) -> web.StreamResponse:
    await asyncio.sleep(0.2)
    value = [{"id": i, "note": "x" * 40} for i in range(100)]
    return await _send(request, value, {}, etag=False, chunked=True, trickle=0.02)


def create_other_kounta(fake: Fake) -> web.Application:
    app = web.Application(middlewares=[kounta_rules])
    app[FAKE] = fake
    app.router.add_post("/v1/token.json", token)
    routes: list[tuple[str, Handler]] = [
        ("/v1/companies/me", me),
        (C, company),
        (f"{C}/taxes", taxes),
        (f"{C}/products", products),
        (f"{C}/customers", customers),
        (f"{C}/customers/{{id:\\d+}}", customer),
        (f"{C}/categories", categories),
        (f"{C}/categories/after/{{cursor}}", categories),
        (f"{C}/orders", orders),
        (f"{C}/staff", staff),
        (f"{C}/broken/{{status:\\d+}}", broken),
        (f"{C}/slow", slow),
    ]
    for path, handler in routes:
        app.router.add_route("*", path, handler)
        if "{cursor}" not in path:
            app.router.add_route("*", path + ".json", handler)
    return app


# --------------------------------------------------------------------------- fixtures


@dataclass
class Upstream:
    url: str
    fake: Fake


@pytest.fixture
def fake() -> Fake:
    return Fake()


@pytest.fixture
async def other(fake: Fake) -> AsyncIterator[Upstream]:
    runner, port = await serve(create_other_kounta(fake))
    yield Upstream(f"http://127.0.0.1:{port}", fake)
    await runner.cleanup()


def oauth_account(upstream: Upstream, **overrides: Any) -> AccountSettings:
    values: dict[str, Any] = {
        "mode": "oauth",
        "client_id": CLIENT_ID,
        "client_secret": Secret(CLIENT_SECRET),
        "token_url": f"{upstream.url}/v1/token.json",
        "refresh_token": Secret(FIRST_REFRESH),
        "rate_per_minute": 100_000,
        # This look-alike expires tokens the moment a test says so, so a token is "expired"
        # seconds after it was issued: the refresh floor (tested on its own in
        # test_credentials.py) would rightly refuse to refresh it again.
        "refresh_floor": 0.0,
        **overrides,
    }
    return AccountSettings(**values)


def settings_for(upstream: Upstream, tmp_path: Any, account: AccountSettings) -> Settings:
    return proxy_settings(
        upstream.url,
        tmp_path,
        accounts={"main": account},
        retry=RetrySettings(backoff_initial=0.01, backoff_max=0.02),
        budget=BudgetSettings(backoff_initial=0.05, backoff_max=0.1),
    )


@pytest.fixture
async def proxy(make_proxy: MakeProxy, other: Upstream, tmp_path: Any) -> Proxy:
    return await make_proxy(settings_for(other, tmp_path, oauth_account(other)))


async def fetch(
    client: aiohttp.ClientSession, method: str, url: str | URL, **kw: Any
) -> tuple[int, Any, bytes]:
    async with client.request(method, url, **kw) as response:
        return response.status, response.headers, await response.read()


JSON = {"Accept": "application/json"}


# --------------------------------------------------------------------------- tokens


async def test_tokens_come_from_token_json_and_a_missing_refresh_token_keeps_the_old_one(
    proxy: Proxy, other: Upstream, client: aiohttp.ClientSession
) -> None:
    fake = other.fake
    status, _, body = await fetch(client, "GET", f"{proxy.url}{C}.json")
    assert status == 200, body
    assert json.loads(body)["id_str"] == str(COMPANY)
    assert [r["refresh_token"] for r in fake.token_requests] == [FIRST_REFRESH]
    # Kounta rotated to refresh-1 and killed refresh-0; the next answers carry none at all.
    for expected in ("refresh-1", "refresh-1"):
        fake.expire_all()
        status, _, body = await fetch(client, "GET", f"{proxy.url}{C}.json")
        assert status == 200, body
        assert fake.token_requests[-1]["refresh_token"] == expected
    assert len(fake.token_requests) == 3
    assert all(r["client_secret"] == CLIENT_SECRET for r in fake.token_requests)


@pytest.mark.parametrize("style", ["json", "description_only", "html"])
async def test_an_expired_token_401_in_any_shape_is_refreshed_and_resent(
    proxy: Proxy, other: Upstream, client: aiohttp.ClientSession, style: str
) -> None:
    fake = other.fake
    fake.unauthorized_style = style
    assert (await fetch(client, "GET", f"{proxy.url}{C}/taxes.json"))[0] == 200
    fake.expire_all()
    fake.taxes_version += 1  # a new body, so the answer cannot come from the cache
    status, _, body = await fetch(
        client, "GET", f"{proxy.url}{C}/taxes.json", headers={"Cache-Control": "no-cache"}
    )
    assert status == 200, body
    assert json.loads(body)[0]["v"] == 1
    assert len(fake.token_requests) == 2
    assert fake.statuses.count(401) == 1


class ShiftedClock:
    """A proxy clock that does not start at the wall clock's epoch."""

    def __init__(self) -> None:
        self.offset = -1_000_000_000.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.mark.parametrize("expires_in", ["3600", "3600.0", 3600])
async def test_expires_in_as_a_string_still_expires_the_token_on_the_proxys_clock(
    make_proxy: MakeProxy,
    other: Upstream,
    tmp_path: Any,
    client: aiohttp.ClientSession,
    expires_in: Any,
) -> None:
    fake = other.fake
    clock = ShiftedClock()
    fake.now = clock
    fake.expires_in = expires_in
    settings = settings_for(other, tmp_path, oauth_account(other))
    proxy = await make_proxy(settings, clock=clock)
    status, _, body = await fetch(client, "GET", f"{proxy.url}{C}.json")
    assert status == 200, body
    clock.offset += 3601  # the first token is past its lifetime
    status, _, body = await fetch(client, "GET", f"{proxy.url}{C}.json")
    assert status == 200, body
    # Refreshed because the proxy knew the token had expired, not after Kounta said 401.
    assert len(fake.token_requests) == 2
    assert 401 not in fake.statuses


@pytest.mark.parametrize(
    ("expires_in", "lifetime"),
    [("3600", 3600.0), (" 90.5 ", 90.5), (3600, 3600.0), ("soon", None), ("", None), (None, None)],
)
def test_expires_in_is_read_as_seconds_whatever_its_json_type(
    expires_in: Any, lifetime: float | None
) -> None:
    body = json.dumps({"access_token": "a", "token_type": "bearer", "expires_in": expires_in})
    token = parse_token_response(200, body.encode(), now=1000.0)
    assert token.get("expires_at") == (None if lifetime is None else 1000.0 + lifetime)


async def test_basic_mode_reaches_the_owners_company(
    make_proxy: MakeProxy, other: Upstream, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    account = AccountSettings(
        mode="basic",
        client_id=CLIENT_ID,
        client_secret=Secret(CLIENT_SECRET),
        rate_per_minute=100_000,
    )
    proxy = await make_proxy(settings_for(other, tmp_path, account))
    status, _, body = await fetch(client, "GET", f"{proxy.url}{C}.json")
    assert status == 200, body
    assert json.loads(body)["id"] == COMPANY
    assert other.fake.token_requests == []


async def test_wrong_basic_credentials_come_back_as_a_normalised_401(
    make_proxy: MakeProxy, other: Upstream, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    account = AccountSettings(
        mode="basic", client_id=CLIENT_ID, client_secret=Secret("wrong"), rate_per_minute=100_000
    )
    proxy = await make_proxy(settings_for(other, tmp_path, account))
    status, headers, body = await fetch(client, "GET", f"{proxy.url}{C}.json")
    assert status == 401
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(body) == {
        "error": "invalid_token",
        "error_description": "Invalid client credentials",
    }


# --------------------------------------------------------------------------- redirects


async def test_companies_me_redirect_with_absolute_location_comes_back_onto_the_proxy(
    proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    status, headers, _ = await fetch(
        client, "GET", f"{proxy.url}/v1/companies/me.json", allow_redirects=False
    )
    assert status == 302
    assert headers["Location"] == f"{proxy.url}{C}.json"
    status, _, body = await fetch(client, "GET", f"{proxy.url}/v1/companies/me.json")
    assert status == 200
    assert json.loads(body)["id"] == COMPANY


async def test_companies_me_redirect_with_relative_location_is_followed_through_the_proxy(
    proxy: Proxy, other: Upstream, client: aiohttp.ClientSession
) -> None:
    url = f"{proxy.url}/v1/companies/me.json?style=relative"
    status, headers, _ = await fetch(client, "GET", url, allow_redirects=False)
    assert status == 301
    assert headers["Location"] == f"{C}.json"
    status, _, body = await fetch(client, "GET", url)
    assert status == 200
    assert json.loads(body)["id_str"] == str(COMPANY)
    assert other.fake.served("GET", f"{C}.json") == 1


# --------------------------------------------------------------------------- paging


async def test_cursor_pages_with_escaped_slash_plus_and_equals_work_through_the_proxy(
    proxy: Proxy, other: Upstream, client: aiohttp.ClientSession
) -> None:
    seen: list[int] = []
    url: str | None = f"{proxy.url}{C}/products.json"
    while url:
        status, headers, body = await fetch(client, "GET", URL(url, encoded=True))
        assert status == 200, body
        seen += [p["id"] for p in json.loads(body)]
        url = headers.get("X-Next-Page")
        if url:
            assert url.startswith(f"{proxy.url}{C}/products.json?cursor=")
            assert "%2F" in url and "%2B" in url and "%3D" in url and url.endswith("&t=x+y=z")
    assert seen == [p["id"] for p in other.fake.products]
    assert other.fake.statuses.count(400) == 0


async def test_all_pages_follows_the_escaped_cursors(
    proxy: Proxy, other: Upstream, client: aiohttp.ClientSession
) -> None:
    headers = {"X-Proxy-All-Pages": "1"}
    status, _, body = await fetch(client, "GET", f"{proxy.url}{C}/products.json", headers=headers)
    assert status == 200, body
    assert json.loads(body) == other.fake.products


async def test_older_x_page_scheme_pages_are_kept_apart_in_the_cache(
    proxy: Proxy, other: Upstream, client: aiohttp.ClientSession
) -> None:
    url = f"{proxy.url}{C}/customers.json"
    status, headers, body = await fetch(client, "GET", url)
    assert (status, headers["X-Pages"]) == (200, "2")
    first = json.loads(body)
    status, _, body = await fetch(client, "GET", url, headers={"X-Page": "1"})
    second = json.loads(body)
    assert [c["id"] for c in first + second] == list(range(1, 31))


async def test_all_pages_gathers_a_list_paged_only_by_x_pages(
    proxy: Proxy, other: Upstream, client: aiohttp.ClientSession
) -> None:
    headers = {"X-Proxy-All-Pages": "1"}
    status, _, body = await fetch(client, "GET", f"{proxy.url}{C}/customers.json", headers=headers)
    assert status == 200, body
    assert [c["id"] for c in json.loads(body)] == list(range(1, 31))


async def test_a_relative_x_next_page_is_followed_and_gathered(
    proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    url = f"{proxy.url}{C}/staff.json"
    status, headers, body = await fetch(client, "GET", url)
    assert status == 200
    next_url = URL(proxy.url).join(URL(headers["X-Next-Page"]))
    status, _, body = await fetch(client, "GET", next_url)
    assert [s["id"] for s in json.loads(body)] == list(range(25, 40))
    status, _, body = await fetch(client, "GET", url, headers={"X-Proxy-All-Pages": "1"})
    assert status == 200, body
    assert [s["id"] for s in json.loads(body)] == list(range(40))


async def test_an_x_next_page_whose_scheme_differs_still_points_at_the_proxy(
    proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    url = f"{proxy.url}{C}/staff.json?tls=1"
    status, headers, _ = await fetch(client, "GET", url)
    assert status == 200
    assert headers["X-Next-Page"].startswith(f"{proxy.url}{C}/staff.json?from=25")


async def test_a_cursor_in_the_path_with_an_escaped_slash_is_refused_by_design(
    proxy: Proxy, other: Upstream, client: aiohttp.ClientSession
) -> None:
    """Encoded slashes in the path are refused (the rule against path tricks), even
    though it costs a Kounta that kept its cursor in the path; the README says so."""
    status, headers, body = await fetch(client, "GET", f"{proxy.url}{C}/categories.json")
    assert status == 200, body
    next_url = headers["X-Next-Page"]
    assert next_url.startswith(f"{proxy.url}{C}/categories/after/") and "%2F" in next_url
    calls = sum(other.fake.calls.values())
    status, _, body = await fetch(client, "GET", URL(next_url, encoded=True))
    assert status == 400
    assert json.loads(body)["error"] == "invalid_request_target"
    assert sum(other.fake.calls.values()) == calls


# --------------------------------------------------------------------------- cache


async def test_weak_etag_with_max_age_0_is_revalidated_and_served_whole(
    proxy: Proxy, other: Upstream, client: aiohttp.ClientSession
) -> None:
    url = f"{proxy.url}{C}.json"
    _, first_headers, first = await fetch(client, "GET", url)
    status, headers, body = await fetch(client, "GET", url)
    assert (status, body) == (200, first)
    assert headers["X-Cache"] == "REVALIDATED"
    assert headers["ETag"].startswith('W/"') and headers["ETag"] == first_headers["ETag"]
    assert other.fake.not_modified == 1
    # The caller's own weak validator gets a 304 from the proxy.
    status, _, body = await fetch(client, "GET", url, headers={"If-None-Match": headers["ETag"]})
    assert (status, body) == (304, b"")


async def test_weak_etag_with_max_age_is_answered_without_an_upstream_call(
    proxy: Proxy, other: Upstream, client: aiohttp.ClientSession
) -> None:
    url = f"{proxy.url}{C}/taxes.json"
    _, _, first = await fetch(client, "GET", url)
    status, headers, body = await fetch(client, "GET", url)
    assert (status, body, headers["X-Cache"]) == (200, first, "HIT")
    assert other.fake.served("GET", f"{C}/taxes.json") == 1


async def test_gzip_chunked_no_cache_list_is_stored_decoded_and_revalidated(
    proxy: Proxy, other: Upstream, client: aiohttp.ClientSession
) -> None:
    url = f"{proxy.url}{C}/products.json"
    status, headers, first = await fetch(client, "GET", url)
    assert status == 200
    assert json.loads(first) == other.fake.products[:PAGE]
    status, headers, body = await fetch(client, "GET", url)
    assert (body, headers["X-Cache"]) == (first, "REVALIDATED")
    # The 304 did not repeat X-Next-Page: the stored one (rewritten) is still there.
    assert headers["X-Next-Page"].startswith(f"{proxy.url}{C}/products.json?cursor=")
    other.fake.products[0]["name"] = "renamed"
    status, headers, body = await fetch(client, "GET", url)
    assert json.loads(body)[0]["name"] == "renamed"
    assert headers["X-Cache"] == "MISS"


async def test_last_modified_without_etag_revalidates_and_sees_changes(
    proxy: Proxy, other: Upstream, client: aiohttp.ClientSession
) -> None:
    url = f"{proxy.url}{C}/customers.json"
    _, _, first = await fetch(client, "GET", url)
    status, headers, body = await fetch(client, "GET", url)
    assert (status, body, headers["X-Cache"]) == (200, first, "REVALIDATED")
    assert other.fake.not_modified == 1
    other.fake.change_customer(1, first_name="Changed elsewhere")  # not through the proxy
    status, headers, body = await fetch(client, "GET", url)
    assert json.loads(body)[0]["first_name"] == "Changed elsewhere"


async def test_no_validator_is_never_answered_from_the_cache(
    proxy: Proxy, other: Upstream, client: aiohttp.ClientSession
) -> None:
    url = f"{proxy.url}{C}/customers/3.json"
    _, _, body = await fetch(client, "GET", url)
    assert json.loads(body)["first_name"] == "C3"
    other.fake.change_customer(3, first_name="Changed elsewhere")
    _, headers, body = await fetch(client, "GET", url)
    assert json.loads(body)["first_name"] == "Changed elsewhere"
    assert headers["X-Cache"] in ("MISS", "BYPASS")  # never HIT, STALE or REVALIDATED
    assert other.fake.served("GET", f"{C}/customers/3.json") == 2


async def test_pretty_and_compact_answers_are_cached_apart(
    proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    url = f"{proxy.url}{C}/taxes.json"
    _, _, compact = await fetch(client, "GET", url)
    _, _, pretty = await fetch(client, "GET", url, headers={"X-Pretty-Print": "1"})
    _, headers, again = await fetch(client, "GET", url)
    assert b"\n    " in pretty and b"\n" not in compact
    assert json.loads(pretty) == json.loads(compact)
    assert (again, headers["X-Cache"]) == (compact, "HIT")


# --------------------------------------------------------------------------- writes


async def test_post_201_location_comes_back_onto_the_proxy_and_the_list_is_current(
    proxy: Proxy, other: Upstream, client: aiohttp.ClientSession
) -> None:
    list_url = f"{proxy.url}{C}/customers.json"
    await fetch(client, "GET", list_url, headers={"X-Page": "1"})
    status, headers, body = await fetch(
        client, "POST", list_url, json={"first_name": "New", "email": "n@example.com"}
    )
    assert status == 201, body
    created = json.loads(body)
    assert headers["Location"] == f"{proxy.url}{C}/customers/{created['id']}.json"
    status, _, body = await fetch(client, "GET", headers["Location"])
    assert json.loads(body)["first_name"] == "New"
    _, _, body = await fetch(client, "GET", list_url, headers={"X-Page": "1"})
    assert json.loads(body)[-1]["id"] == created["id"]


async def test_put_and_delete_204_go_through_and_the_next_read_is_current(
    proxy: Proxy, other: Upstream, client: aiohttp.ClientSession
) -> None:
    url = f"{proxy.url}{C}/customers/5.json"
    status, _, body = await fetch(client, "PUT", url, json={"first_name": "Put"})
    assert (status, json.loads(body)["first_name"]) == (200, "Put")
    status, _, body = await fetch(client, "DELETE", url)
    assert (status, body) == (204, b"")
    status, _, body = await fetch(client, "GET", url)
    assert status == 404
    assert json.loads(body)["error"] == "not_found"


async def test_post_without_json_content_type_gets_kounta_400_kept(
    proxy: Proxy, other: Upstream, client: aiohttp.ClientSession
) -> None:
    status, headers, body = await fetch(
        client,
        "POST",
        f"{proxy.url}{C}/customers.json",
        data=b'{"first_name": "x"}',
        headers={"Content-Type": "text/plain"},
    )
    assert status == 400
    assert json.loads(body) == {
        "error": "invalid_request",
        "error_description": "Content-Type must be application/json",
        "status": 400,
    }
    assert "X-Proxy-Error" not in headers


# --------------------------------------------------------------------------- errors and limits


async def test_406_without_suffix_or_accept_is_kept_and_accept_json_works(
    proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    url = f"{proxy.url}{C}"
    status, headers, body = await fetch(client, "GET", url)
    assert status == 406
    assert json.loads(body)["error"] == "not_acceptable"
    assert headers["Content-Type"].startswith("application/json")
    status, _, body = await fetch(client, "GET", url, headers=JSON)
    assert (status, json.loads(body)["id"]) == (200, COMPANY)


@pytest.mark.parametrize(("status", "tries"), [(500, 1), (503, 3)])
async def test_5xx_html_pages_come_back_as_json_with_the_status_kept(
    proxy: Proxy, other: Upstream, client: aiohttp.ClientSession, status: int, tries: int
) -> None:
    path = f"{C}/broken/{status}.json"
    got, headers, body = await fetch(client, "GET", f"{proxy.url}{path}")
    assert got == status
    assert headers["Content-Type"].startswith("application/json")
    data = json.loads(body)
    assert data["error"] == ("server_error" if status == 500 else "temporarily_unavailable")
    assert "<" not in data["error_description"] and str(status) in data["error_description"]
    assert other.fake.served("GET", path) == tries


async def test_plain_text_429_with_epoch_reset_is_absorbed_for_a_get(
    proxy: Proxy, other: Upstream, client: aiohttp.ClientSession
) -> None:
    other.fake.limits = [{"X-Ratelimit-Reset": str(int(time.time()) + 1)}]
    status, _, body = await fetch(client, "GET", f"{proxy.url}{C}/orders.json")
    assert status == 200, body
    assert json.loads(body) == [{"id": 1, "status": "COMPLETE"}]
    assert other.fake.served("GET", f"{C}/orders.json") == 2


async def test_plain_text_429_without_any_hint_is_absorbed_with_backoff(
    proxy: Proxy, other: Upstream, client: aiohttp.ClientSession
) -> None:
    other.fake.limits = [{}, {}]
    status, _, body = await fetch(client, "GET", f"{proxy.url}{C}/orders.json")
    assert status == 200, body
    assert other.fake.served("GET", f"{C}/orders.json") == 3


async def test_plain_text_429_on_a_post_is_not_resent_and_comes_back_as_json(
    proxy: Proxy, other: Upstream, client: aiohttp.ClientSession
) -> None:
    other.fake.limits = [{}]
    status, headers, body = await fetch(client, "POST", f"{proxy.url}{C}/orders.json", json={})
    assert status == 429
    data = json.loads(body)
    assert data["error"] == "rate_limited" and int(headers["Retry-After"]) >= 1
    assert other.fake.served("POST", f"{C}/orders.json") == 1


async def test_slow_chunked_answer_without_content_length_arrives_whole(
    proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    status, headers, body = await fetch(client, "GET", f"{proxy.url}{C}/slow.json")
    assert status == 200
    data = json.loads(body)
    assert [d["id"] for d in data] == list(range(100))
    assert "Content-Length" not in headers or int(headers["Content-Length"]) == len(body)


def test_every_cursor_the_fake_issues_really_has_the_awkward_characters() -> None:
    query = _cursor_query(Fake(), 25)
    assert re.search("%2F", query) and "%2B" in query and "%3D" in query and "+" in query
