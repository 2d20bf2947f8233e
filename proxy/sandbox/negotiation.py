"""Content negotiation, conditional requests and JSON error bodies."""

from __future__ import annotations

import json

from aiohttp import web

JSON_TYPE = "application/json"
_JSON_RANGES = frozenset({"application/json", "application/*", "*/*"})


def accepts_json(accept: str | None) -> bool:
    if not accept:
        return False
    for part in accept.split(","):
        media, *params = part.split(";")
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if q > 0 and media.strip().lower() in _JSON_RANGES:
            return True
    return False


def etag_matches(if_none_match: str, etag: str) -> bool:
    """Weak comparison (RFC 9110 13.1.2): W/ prefixes are ignored on both sides."""
    wanted = etag.removeprefix("W/")
    for candidate in if_none_match.split(","):
        candidate = candidate.strip()
        if candidate == "*" or candidate.removeprefix("W/") == wanted:
            return True
    return False


def wants_pretty(value: str | None) -> bool:
    return value is not None and value.strip().lower() not in ("", "0", "false", "no")


def error(
    status: int, code: str, description: str, headers: dict[str, str] | None = None
) -> web.Response:
    body = json.dumps({"error": code, "error_description": description}).encode()
    return web.Response(
        status=status, body=body, content_type=JSON_TYPE, charset="utf-8", headers=headers
    )
