"""The sandbox aiohttp application: middleware (counting, faults, auth, rate limit) and handlers."""

from __future__ import annotations

import asyncio
import json
from bisect import bisect_right
from typing import Any

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from .auth import AuthFailure, authenticate
from .config import SandboxConfig
from .controls import add_control_routes
from .data import Record
from .faults import Fault
from .listing import QUERY_FILTERS, apply_filters, decode_cursor, encode_cursor, page_count
from .negotiation import JSON_TYPE, accepts_json, error, etag_matches, wants_pretty
from .oauth import add_oauth_routes
from .routes import NotFound, Target, resolve
from .state import SANDBOX_STATE, SandboxState
from .store import Collection, ValidationError, dumps, etag_of
from .webhooks import SANDBOX_HOOKS, add_webhook_routes

CONTROL_PREFIX = "/_sandbox/"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def create_sandbox_app(config: SandboxConfig | None = None) -> web.Application:
    state = SandboxState(config)
    app = web.Application(middlewares=[api_middleware])
    app[SANDBOX_STATE] = state
    add_control_routes(app)
    add_oauth_routes(app, state)
    add_webhook_routes(app, state.config.company_id)
    # Only /v1/companies/ is claimed so that other /v1/ routes (e.g. an OAuth token endpoint)
    # can be added to the app later; unmatched paths become JSON 404s in the middleware.
    app.router.add_route("*", "/v1/companies/{tail:.*}", handle_api)
    return app


def origin_of(request: web.Request, config: SandboxConfig) -> str:
    return (config.origin or f"{request.scheme}://{request.host}").rstrip("/")


def json_response(
    request: web.Request, value: Any, compact: bytes | None = None, status: int = 200
) -> web.Response:
    if wants_pretty(request.headers.get("X-Pretty-Print")):
        body = json.dumps(value, ensure_ascii=False, indent=2).encode() + b"\n"
    else:
        body = compact if compact is not None else dumps(value)
    return web.Response(status=status, body=body, content_type=JSON_TYPE, charset="utf-8")


def _with_etag(
    request: web.Request, resp: web.Response, extra: dict[str, str], known: str | None = None
) -> web.Response:
    """Adds the ETag to a 200 GET answer, or replaces it with a 304 when If-None-Match matches.

    `known` is the cached ETag of the compact body; it is only used when that body was sent.
    """
    body = resp.body
    assert isinstance(body, bytes)
    pretty = wants_pretty(request.headers.get("X-Pretty-Print"))
    etag = known if known is not None and not pretty else etag_of(body)
    inm = request.headers.get(hdrs.IF_NONE_MATCH)
    if inm is not None and etag_matches(inm, etag):
        # Paging headers are repeated on the 304 so a cache can refresh what it stored.
        return web.Response(status=304, headers={hdrs.ETAG: etag, **extra})
    resp.headers[hdrs.ETAG] = etag
    resp.headers.update(extra)
    return resp


# --- middleware ---------------------------------------------------------------------------


@web.middleware
async def api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith(CONTROL_PREFIX):
        return await handler(request)
    state = request.app[SANDBOX_STATE]
    state.record_request(request.method, request.path)
    plan = state.faults.plan(request.path)
    if plan.latency:
        await asyncio.sleep(plan.latency)
    if plan.status is not None:
        resp: web.StreamResponse = _fault_response(plan.status)
    else:
        resp = await _guarded(request, handler, state)
    if plan.drop:
        return await _drop(request, resp)
    state.record_status(resp.status)
    return resp


def _fault_response(fault: Fault) -> web.Response:
    headers = dict(fault.headers)
    has_type = any(k.lower() == "content-type" for k in headers)
    return web.Response(
        status=fault.status,
        body=fault.body,
        headers=headers,
        content_type=None if has_type else fault.content_type,
    )


async def _guarded(
    request: web.Request, handler: Handler, state: SandboxState
) -> web.StreamResponse:
    public = request.method == "OPTIONS" or request.path in state.public_paths
    if not public:
        now = state.clock()
        who = authenticate(request.headers.get(hdrs.AUTHORIZATION), state.tokens, state.config, now)
        if isinstance(who, AuthFailure):
            return error(401, "invalid_token", who.description, {"WWW-Authenticate": "Bearer"})
        limit = state.config.rate_per_minute_bearer
        if who.kind == "basic":
            limit = state.config.rate_per_minute_basic
        if not state.limiter.allow(state.rate_key(who.client), limit, now):
            # Plain text and no Retry-After: what the real API was seen to send.
            return web.Response(status=429, body=b"Limit exceeded", content_type="text/plain")
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return error(404, "not_found", "Unknown endpoint")
    except web.HTTPMethodNotAllowed as exc:
        allow = ", ".join(sorted(exc.allowed_methods))
        return error(405, "method_not_allowed", "Method not allowed", {"Allow": allow})


async def _drop(request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
    """Sends the status, headers and half the body, then cuts the connection."""
    body = resp.body if isinstance(resp, web.Response) and isinstance(resp.body, bytes) else b""
    status = resp.status
    if len(body) < 2 or status in (204, 304) or request.method == "HEAD":
        # Nothing to truncate: send a body anyway, as a truncated 200.
        body, status = b'{"error":"connection_dropped"}', 200
    stream = web.StreamResponse(status=status)
    for key, value in resp.headers.items():
        if key.lower() not in ("content-length", "transfer-encoding"):
            stream.headers.add(key, value)
    stream.content_length = len(body)
    await stream.prepare(request)
    await stream.write(body[: len(body) // 2])
    if request.transport is not None:
        request.transport.close()
    request.app[SANDBOX_STATE].record_status(status)
    return stream


# --- API handler --------------------------------------------------------------------------


async def handle_api(request: web.Request) -> web.StreamResponse:
    state = request.app[SANDBOX_STATE]
    found = resolve(request.path, state.store)
    if isinstance(found, NotFound):
        return error(404, "not_found", found.description)
    target = found
    method = request.method
    allow = ", ".join(target.allow)
    if method == "OPTIONS":
        return web.Response(status=204, headers={"Allow": allow})
    if method not in target.allow:
        return error(405, "method_not_allowed", f"{method} is not allowed here", {"Allow": allow})
    if target.suffix != "json" and (
        target.suffix is not None or not accepts_json(request.headers.get(hdrs.ACCEPT))
    ):
        return error(406, "not_acceptable", "Use the .json extension or Accept: application/json")
    if target.is_me and state.config.me_redirect and method in ("GET", "HEAD"):
        return _me_redirect(request, state, target)
    body: Record = {}
    if method in _BODY_METHODS:
        parsed = await _read_json(request)
        if isinstance(parsed, web.Response):
            return parsed
        body = parsed
    coll = state.store[target.kind]
    try:
        if method in ("GET", "HEAD"):
            if target.record_id is None:
                return _list(request, state, target, coll)
            compact, etag = coll.full(target.record_id)
            resp = json_response(request, coll.records[target.record_id], compact)
            return _with_etag(request, resp, {}, etag)
        if method == "POST":
            record = state.store.create(target.kind, body)
            request.app[SANDBOX_HOOKS].emit(target.kind, "created", record)
            resp = json_response(request, record, coll.full(record["id"])[0], status=201)
            loc = f"{origin_of(request, state.config)}{target.collection_path}/{record['id']}.json"
            resp.headers[hdrs.LOCATION] = loc
            return resp
        assert target.record_id is not None
        if method == "DELETE":
            gone = dict(coll.records[target.record_id])
            state.store.delete(target.kind, target.record_id)
            request.app[SANDBOX_HOOKS].emit(target.kind, "deleted", gone)
            return web.Response(status=204)
        updated = state.store.update(target.kind, target.record_id, body)
        assert updated is not None
        request.app[SANDBOX_HOOKS].emit(target.kind, "updated", updated)
        return json_response(request, updated, coll.full(target.record_id)[0])
    except ValidationError as exc:
        return error(400, "invalid_request", str(exc))


def _me_redirect(request: web.Request, state: SandboxState, target: Target) -> web.Response:
    suffix = ".json" if target.suffix == "json" else ""
    location = f"{origin_of(request, state.config)}/v1/companies/{state.config.company_id}{suffix}"
    return web.Response(status=302, headers={hdrs.LOCATION: location})


async def _read_json(request: web.Request) -> Record | web.Response:
    # request.content_type drops parameters, so "application/json; charset=utf-8" passes.
    if request.content_type != JSON_TYPE:
        return error(400, "invalid_request", "Content-Type must be application/json")
    raw = await request.read()
    try:
        parsed = json.loads(raw)
    except ValueError:
        return error(400, "invalid_request", "The request body is not valid JSON")
    if not isinstance(parsed, dict):
        return error(400, "invalid_request", "The request body must be a JSON object")
    return parsed


def _list(
    request: web.Request, state: SandboxState, target: Target, coll: Collection
) -> web.Response:
    page_size = state.config.page_size
    filters = {k: v for k, v in request.query.items() if k in QUERY_FILTERS}
    try:
        cursor = request.query.get("cursor")
        after: int | None = None
        if cursor is not None:
            # The cursor carries its own filters, so a cursor URL is complete as it stands.
            after, filters = decode_cursor(cursor)
        query = apply_filters(target.query, filters, target.kind)
        ids = coll.view(query)
        if after is not None:
            start = bisect_right(ids, after)
        elif "X-Page" in request.headers:
            start = _non_negative(request.headers["X-Page"], "X-Page") * page_size
        else:
            start = _non_negative(request.query.get("start", "0"), "start")
    except ValueError as exc:
        return error(400, "invalid_request", str(exc))
    page = ids[start : start + page_size]
    extra = {"X-Pages": str(page_count(len(ids), page_size))}
    if page and start + page_size < len(ids):
        cursor = encode_cursor(page[-1], filters)
        extra["X-Next-Page"] = f"{origin_of(request, state.config)}{request.path}?cursor={cursor}"
    if wants_pretty(request.headers.get("X-Pretty-Print")):
        resp = json_response(request, [coll.abridged(i) for i in page])
    else:
        compact = b"[" + b",".join([coll.abridged_bytes(i) for i in page]) + b"]"
        resp = web.Response(body=compact, content_type=JSON_TYPE, charset="utf-8")
    return _with_etag(request, resp, extra)


def _non_negative(value: str, name: str) -> int:
    if not value.strip().isdigit():
        raise ValueError(f"{name} must be a non-negative integer")
    return int(value)
