"""One exception tree and one error language.

Everything the proxy answers that is not 2xx/3xx is OAuth 2.0 style JSON::

    {"error": "<code>", "error_description": "<text>", ...}

with the status kept. The proxy's own errors carry ``X-Proxy-Error: 1`` so a
caller can tell them from Kounta's.

Exceptions::

    ProxyError                      status, code, description (safe to show)
    ├── ClosesConnection            the connection's remaining bytes cannot be trusted
    │   ├── FaultyFraming           400 invalid_request (e.g. Transfer-Encoding in HTTP/1.0)
    │   ├── NotImplementedCoding    501 not_implemented (a transfer coding other than chunked)
    │   ├── HttpVersionNotSupported 505 http_version_not_supported
    │   ├── ExpectationFailed       417 expectation_failed (an Expect other than 100-continue)
    │   └── BodyTimeout             408 request_timeout (a request body too slow or too late)
    ├── InvalidRequest              400 invalid_request
    │   └── InvalidTarget           400 invalid_request_target (proxy.target)
    ├── NotFound                    404 not_found
    ├── MethodNotAllowed            405 method_not_allowed
    ├── RequestTooLarge             413 request_too_large
    ├── CallerUnauthorized          401 invalid_client (missing or unknown caller key)
    ├── RateLimited                 429 rate_limited (+ retry_after)
    ├── TokenUnavailable            503 temporarily_unavailable (token endpoint down or slow)
    │   └── CredentialsRejected     502 invalid_grant / invalid_client (run `authorize`)
    ├── OnlyIfCachedMiss            504 only_if_cached
    ├── TooManyPages                422 too_many_pages (X-Proxy-All-Pages past paging.max_pages)
    ├── StoredBodyError             500 stored_body_corrupt (found mid-stream: connection cut)
    └── UpstreamError               the upstream could not be used
        ├── UpstreamUnreachable     502 upstream_unreachable (refused, DNS, reset)
        ├── UpstreamTLSError        502 upstream_tls_error
        ├── UpstreamTimeout         504 upstream_timeout
        ├── UpstreamBodyError       502 upstream_truncated (body cut short, gzip incomplete/corrupt)
        ├── UpstreamTooLarge        502 upstream_too_large (gzip inflates past the caps)
        ├── UpstreamInvalid         502 upstream_invalid (a status outside 100-599)
        ├── CircuitOpen             503 circuit_open (+ retry_after; failing fast)
        └── UpstreamBusy            503 upstream_busy (+ retry_after; the account's
                                    upstream connections all in use; no breaker counts it)
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Mapping

JSON_CONTENT_TYPE = "application/json; charset=utf-8"
PROXY_ERROR_HEADER = "X-Proxy-Error"
MAX_DESCRIPTION = 500
# Where non-error-shaped upstream JSON is kept inside a normalised body.
UPSTREAM_KEY = "upstream_body"


class ProxyError(Exception):
    status = 500
    code = "server_error"
    # Retryable failures: a GET may be answered from a stale cache entry instead.
    stale_ok = False

    def __init__(
        self, description: str, *, code: str | None = None, detail: str | None = None
    ) -> None:
        super().__init__(description)
        self.description = description
        # For the log only, never the caller: what went wrong underneath (an address, an
        # OS error), which could tell a caller about the proxy's network.
        self.detail = detail
        if code is not None:
            self.code = code

    def headers(self) -> dict[str, str]:
        return {}

    def body(self) -> dict[str, object]:
        return {"error": self.code, "error_description": self.description}


class InvalidRequest(ProxyError):
    status = 400
    code = "invalid_request"


class ClosesConnection(ProxyError):
    """A refusal after which the rest of the connection's bytes cannot be trusted."""


class FaultyFraming(ClosesConnection, InvalidRequest):
    pass


class NotImplementedCoding(ClosesConnection):
    status = 501
    code = "not_implemented"


class HttpVersionNotSupported(ClosesConnection):
    status = 505
    code = "http_version_not_supported"


class ExpectationFailed(ClosesConnection):
    status = 417
    code = "expectation_failed"


class BodyTimeout(ClosesConnection):
    status = 408
    code = "request_timeout"


class NotFound(ProxyError):
    status = 404
    code = "not_found"


class MethodNotAllowed(ProxyError):
    status = 405
    code = "method_not_allowed"

    def __init__(self, description: str, *, allow: tuple[str, ...] = ()) -> None:
        super().__init__(description)
        self.allow = allow

    def headers(self) -> dict[str, str]:
        # RFC 9110 15.5.6: a 405 MUST say which methods the target supports.
        return {"Allow": ", ".join(self.allow)} if self.allow else {}


class RequestTooLarge(ProxyError):
    status = 413
    code = "request_too_large"


class CallerUnauthorized(ProxyError):
    status = 401
    code = "invalid_client"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": f'Bearer error="{self.code}"'}


class _RetryAfter(ProxyError):
    """An error that tells the caller when to come back (``Retry-After`` + ``retry_after``)."""

    def __init__(self, description: str, *, retry_after: int) -> None:
        super().__init__(description)
        self.retry_after = max(1, retry_after)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}

    def body(self) -> dict[str, object]:
        return {**super().body(), "retry_after": self.retry_after}


class RateLimited(_RetryAfter):
    status = 429
    code = "rate_limited"
    stale_ok = True


class TokenUnavailable(ProxyError):
    status = 503
    code = "temporarily_unavailable"
    stale_ok = True


class CredentialsRejected(TokenUnavailable):
    """The token endpoint refused the account's refresh token or client credentials."""

    status = 502
    code = "invalid_grant"


class OnlyIfCachedMiss(ProxyError):
    status = 504
    code = "only_if_cached"


class UpstreamError(ProxyError):
    status = 502
    code = "bad_gateway"
    stale_ok = True


class UpstreamUnreachable(UpstreamError):
    code = "upstream_unreachable"


class UpstreamTLSError(UpstreamError):
    code = "upstream_tls_error"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class UpstreamBodyError(UpstreamError):
    code = "upstream_truncated"


class UpstreamTooLarge(UpstreamError):
    """A gzip body that inflates past ``upstream.max_inflated_size`` or its ratio cap."""

    code = "upstream_too_large"


class UpstreamInvalid(UpstreamError):
    """An answer no HTTP client may act on: a status outside 100-599 (RFC 9110 15)."""

    code = "upstream_invalid"


class CircuitOpen(_RetryAfter, UpstreamError):
    """Kounta failed too often in a row: the account's requests fail fast for a while."""

    status = 503
    code = "circuit_open"


class UpstreamBusy(_RetryAfter, UpstreamError):
    """Every upstream connection of the account's share stayed in use past the wait: the
    proxy's own limit, not a sign that Kounta is away (breakers do not count it)."""

    status = 503
    code = "upstream_busy"


class TooManyPages(ProxyError):
    """An ``X-Proxy-All-Pages`` list is longer than ``paging.max_pages``."""

    status = 422
    code = "too_many_pages"


class StoredBodyError(ProxyError):
    """A stored body no longer matches its record (size or CRC32) while it is streamed: the
    entry is dropped and the answer broken off, never sent as if whole."""

    code = "stored_body_corrupt"


# --------------------------------------------------------------------------- normalising

STATUS_CODES: Mapping[int, str] = {
    400: "invalid_request",
    401: "invalid_token",
    403: "access_denied",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    410: "gone",
    412: "precondition_failed",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    500: "server_error",
    501: "not_implemented",
    502: "bad_gateway",
    503: "temporarily_unavailable",
    504: "gateway_timeout",
}

_TAGS = re.compile(r"<(script|style)\b.*?</\1\s*>|<[^>]*>", re.IGNORECASE | re.DOTALL)
_SPACE = re.compile(r"\s+")
_TITLE = re.compile(r"<title[^>]*>(.*?)</title\s*>", re.IGNORECASE | re.DOTALL)


def code_for(status: int) -> str:
    """The documented ``error`` code for a status the upstream gave no code for."""
    if status in STATUS_CODES:
        return STATUS_CODES[status]
    return "invalid_request" if status < 500 else "server_error"


def normalise_error(
    status: int, headers: Mapping[str, str], body: bytes
) -> tuple[int, dict[str, str], bytes]:
    """Any error answer, as ``(status, headers, body)`` in the OAuth 2.0 error shape.

    - JSON already carrying string ``error`` (and ``error_description``) keeps all its keys.
    - Other JSON is kept whole under ``upstream_body``.
    - Text, HTML and empty bodies become a short, markup-free description.
    """
    content: dict[str, object] = {}
    parsed = _parse_json(body)
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str) and parsed["error"]:
        content = dict(parsed)
    elif parsed is not None:
        content[UPSTREAM_KEY] = parsed
    content["error"] = content.get("error") or code_for(status)
    description = content.get("error_description")
    if not isinstance(description, str) or not description:
        text = "" if parsed is not None else _describe(body, headers)
        content["error_description"] = text or _default_description(status)
    ordered = {"error": content.pop("error"), "error_description": content.pop("error_description")}
    ordered.update(content)
    out_headers = {"Content-Type": JSON_CONTENT_TYPE, "Cache-Control": "no-store"}
    if status == 401:
        out_headers["WWW-Authenticate"] = f'Bearer error="{_header_safe(str(ordered["error"]))}"'
    data = json.dumps(ordered, ensure_ascii=False, separators=(",", ":")).encode()
    return status, out_headers, data


def error_body(error: ProxyError) -> bytes:
    return json.dumps(error.body(), ensure_ascii=False, separators=(",", ":")).encode()


def _parse_json(body: bytes) -> object | None:
    if not body.strip():
        return None
    try:
        return json.loads(body.decode("utf-8"))  # type: ignore[no-any-return]
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None


def _describe(body: bytes, headers: Mapping[str, str]) -> str:
    text = body[: MAX_DESCRIPTION * 8].decode("utf-8", errors="replace")
    if "html" in headers.get("Content-Type", "").lower() or "<" in text:
        title = _TITLE.search(text)
        text = title.group(1) if title else _TAGS.sub(" ", text)
        text = html.unescape(text)
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    text = _SPACE.sub(" ", text).strip()
    if len(text) > MAX_DESCRIPTION:
        text = text[: MAX_DESCRIPTION - 1].rstrip() + "…"
    return text


def _default_description(status: int) -> str:
    from http import HTTPStatus

    try:
        return f"The upstream answered {status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"The upstream answered {status}"


def _header_safe(text: str) -> str:
    return "".join(ch for ch in text if ch.isprintable() and ch not in '"\\')[:100]
