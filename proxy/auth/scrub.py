"""The account's own secrets taken out of what Kounta answers, before a caller or a log sees it.

An upstream that echoes the request (a debugging gateway, an error page quoting the
``Authorization`` header) would hand the account's bearer token to every caller of the
account. So every header value of every answer, and the body of every answer that is not
2xx (error bodies, which the proxy reads and rewrites anyway, up to :data:`ERROR_BODY_LIMIT`;
3xx bodies that small), have
the account's current access token, refresh token and client secret replaced by
:data:`REDACTED`, in the spellings an echo would use (as is, JSON-escaped,
percent-encoded). 2xx bodies are the account's data and pass untouched.
"""

from __future__ import annotations

import functools
import json
from urllib.parse import quote

from multidict import CIMultiDict

from proxy.messages import ERROR_BODY_LIMIT, ProxyResponse

REDACTED = "[redacted]"
# Shorter values are not looked for: they would match ordinary text (and are no secret).
MIN_SECRET = 8
# Statuses without a body to look at (RFC 9110 6.4.1).
_NO_BODY = frozenset({204, 304})


def credentials(authorization: str) -> str:
    """The secret part of an ``Authorization`` value (``Bearer abc`` → ``abc``)."""
    return authorization.partition(" ")[2].strip()


@functools.lru_cache(maxsize=256)  # a few secrets per account, asked on every request
def spellings(secrets: tuple[str, ...]) -> tuple[str, ...]:
    """Each secret as it may appear in an echo, longest first (so no part is left)."""
    found: set[str] = set()
    for secret in secrets:
        if len(secret) < MIN_SECRET:
            continue
        found.add(secret)
        found.add(json.dumps(secret)[1:-1])
        found.add(json.dumps(secret)[1:-1].replace("/", "\\/"))
        found.add(quote(secret, safe=""))
    return tuple(sorted(found, key=len, reverse=True))


def scrub_text(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def scrub_bytes(data: bytes, secrets: tuple[str, ...]) -> bytes:
    """``data`` itself when it holds no secret, else a copy with each one replaced."""
    clean = data
    for secret in secrets:
        encoded = secret.encode("utf-8", "surrogateescape")
        if encoded in clean:
            clean = clean.replace(encoded, REDACTED.encode())
    return clean


def scrub_headers(headers: CIMultiDict[str], secrets: tuple[str, ...]) -> CIMultiDict[str]:
    """``headers`` itself when no value holds a secret (the common case), else a copy."""
    # One string to look through (a value holds no newline; a secret across two values only
    # costs the copy below, which then replaces nothing).
    joined = "\n".join(headers.values())
    if not any(secret in joined for secret in secrets):
        return headers
    return CIMultiDict((name, scrub_text(value, secrets)) for name, value in headers.items())


def scrubbed_now(response: ProxyResponse, secrets: tuple[str, ...], method: str) -> bool:
    """Whether ``response`` is scrubbed without reading anything: its headers are, and its
    body is not looked at (2xx, no body); False: :func:`scrubbed` reads its body (an error's,
    a redirect's), headers and all. What the auth layer does for most answers without a
    coroutine."""
    status = response.status
    if not (200 <= status < 300 or status in _NO_BODY or method == "HEAD"):
        return False  # an error's or a redirect's body is read
    if secrets:
        response.headers = scrub_headers(response.headers, secrets)
    return True


async def scrubbed(response: ProxyResponse, secrets: tuple[str, ...], method: str) -> ProxyResponse:
    """``response`` with ``secrets`` taken out of its headers and, unless 2xx, its body."""
    if not secrets or scrubbed_now(response, secrets, method):
        return response
    response.headers = scrub_headers(response.headers, secrets)
    if response.status < 400 and not isinstance(response.body, bytes):
        # A redirect body over 64 KiB streams through as it came: reading a prefix of it
        # would cut it short (error bodies are read that far anyway).
        return response
    # Read as the error answer reads it: inflated, within ERROR_BODY_LIMIT.
    raw = await response.decoded(ERROR_BODY_LIMIT)
    clean = scrub_bytes(raw, secrets)
    if clean is raw:
        return response  # nothing to take out: the body stays as it came (as read)
    response.body = clean
    response.headers.popall("Content-Encoding", None)
    response.headers["Content-Length"] = str(len(clean))
    return response
