"""HTTP test controls under /_sandbox/, for end-to-end tests against a sandbox subprocess."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from .oauth import SANDBOX_OAUTH
from .state import SANDBOX_STATE, SandboxState
from .store import normalise_kind
from .webhooks import SANDBOX_HOOKS


def add_control_routes(app: web.Application) -> None:
    app.router.add_get("/_sandbox/stats", stats)
    app.router.add_post("/_sandbox/reset", reset)
    app.router.add_get("/_sandbox/faults", list_faults)
    app.router.add_post("/_sandbox/faults", add_faults)
    app.router.add_delete("/_sandbox/faults", clear_faults)
    app.router.add_post("/_sandbox/tokens", add_token)
    app.router.add_delete("/_sandbox/tokens/{token}", revoke_token)
    app.router.add_post("/_sandbox/touch", touch)


def _bad(description: str) -> web.Response:
    return web.json_response(
        {"error": "invalid_request", "error_description": description}, status=400
    )


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    data = json.loads(raw) if raw.strip() else {}
    if not isinstance(data, dict):
        raise ValueError("body must be a JSON object")
    return data


def _stats(state: SandboxState) -> dict[str, Any]:
    return {
        "served": state.served(),
        "by_path": state.served_by_path(),
        "not_modified": state.not_modified(),
        "by_status": {str(k): v for k, v in sorted(state.statuses().items())},
        "faults": [f.describe() for f in state.faults.active()],
        "rate_limited": dict(state.limiter.refused),
    }


async def stats(request: web.Request) -> web.Response:
    body = _stats(request.app[SANDBOX_STATE])
    oauth = request.app.get(SANDBOX_OAUTH)
    if oauth is not None:
        body["token_requests"] = dict(oauth.counters.by_client)
        body["spent_refresh_tokens"] = oauth.counters.spent_refresh
    return web.json_response(body)


async def reset(request: web.Request) -> web.Response:
    """Clears counters, faults and rate-limit windows; `?data=1` also re-seeds the records."""
    state = request.app[SANDBOX_STATE]
    state.reset(data=request.query.get("data", "") in ("1", "true"))
    return web.json_response(_stats(state))


async def list_faults(request: web.Request) -> web.Response:
    return web.json_response([f.describe() for f in request.app[SANDBOX_STATE].faults.active()])


async def add_faults(request: web.Request) -> web.Response:
    """One body may add a latency, a status and a drop fault together, sharing count/path_prefix."""
    state = request.app[SANDBOX_STATE]
    try:
        spec = await _body(request)
        prefix = str(spec.get("path_prefix", "/"))
        has_count = "count" in spec
        count = spec.get("count")
        if count is not None and not isinstance(count, int):
            raise ValueError("count must be an integer or null")
        added = 0
        if spec.get("latency") is not None:
            state.inject_latency(float(spec["latency"]), count if has_count else None, prefix)
            added += 1
        if spec.get("status") is not None:
            headers = spec.get("headers") or {}
            if not isinstance(headers, dict):
                raise ValueError("headers must be an object")
            state.inject_status(
                int(spec["status"]),
                str(spec.get("body", "")).encode(),
                str(spec.get("content_type", "text/plain")),
                count if has_count else 1,
                prefix,
                {str(k): str(v) for k, v in headers.items()},
            )
            added += 1
        if spec.get("drop"):
            state.inject_drop(count if has_count else 1, prefix)
            added += 1
        if not added:
            raise ValueError("give at least one of latency, status, drop")
    except (ValueError, TypeError) as exc:
        return _bad(str(exc))
    return web.json_response([f.describe() for f in state.faults.active()], status=201)


async def clear_faults(request: web.Request) -> web.Response:
    request.app[SANDBOX_STATE].clear_faults()
    return web.Response(status=204)


async def add_token(request: web.Request) -> web.Response:
    """{"token": "...", "expires_at": epoch seconds | null} or {"token", "expires_in": s}."""
    state = request.app[SANDBOX_STATE]
    try:
        spec = await _body(request)
        token = spec.get("token")
        if not isinstance(token, str) or not token:
            raise ValueError("token must be a non-empty string")
        expires_at = spec.get("expires_at")
        if spec.get("expires_in") is not None:
            expires_at = state.clock() + float(spec["expires_in"])
        state.add_bearer_token(token, None if expires_at is None else float(expires_at))
    except (ValueError, TypeError) as exc:
        return _bad(str(exc))
    return web.json_response({"token": token, "expires_at": expires_at}, status=201)


async def revoke_token(request: web.Request) -> web.Response:
    request.app[SANDBOX_STATE].revoke_bearer_token(request.match_info["token"])
    return web.Response(status=204)


async def touch(request: web.Request) -> web.Response:
    state = request.app[SANDBOX_STATE]
    try:
        spec = await _body(request)
        kind = normalise_kind(str(spec.get("kind")))
        record = state.store.touch(kind, int(spec.get("id")))  # type: ignore[arg-type]
        # A change at a till: Kounta tells the webhooks, the proxy never saw it.
        request.app[SANDBOX_HOOKS].emit(kind, "updated", record)
    except KeyError as exc:
        return web.json_response({"error": "not_found", "error_description": str(exc)}, status=404)
    except (ValueError, TypeError) as exc:
        return _bad(str(exc))
    return web.Response(status=204)
