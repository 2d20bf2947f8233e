"""Which headers cross the proxy, in each direction (pure)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from multidict import CIMultiDict, CIMultiDictProxy

# What surrogateescape makes of a byte that is not UTF-8 (see not_utf8).
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
# Named without a version (nothing for a scanner to match); Via carries it both ways.
SERVER_NAME = "kounta-proxy"
VIA = f"1.1 {SERVER_NAME}"
# RFC 9110 7.6.1: connection-specific fields never cross a proxy.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Request headers that never reach Kounta, whatever ``upstream.forward_headers`` says: the
# proxy sets them itself, they are connection-specific, or they ask a server to route,
# rewrite or change the method (OWASP: "X-Original-URL"/"X-Rewrite-URL" bypasses).
NEVER_FORWARDED = HOP_BY_HOP | frozenset(
    {
        "host",
        "authorization",  # the account's credentials replace the caller's
        "content-length",  # recomputed from the body actually sent
        "accept-encoding",  # the proxy asks for gzip itself (proxy.pipeline.upstream)
        "cookie",
        "expect",
        "via",  # replaced by the proxy's own entry: internal host names stay internal
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-forwarded-server",
        "x-forwarded-scheme",
        "x-real-ip",
        "x-host",
        "x-original-host",
        "x-original-url",
        "x-original-uri",
        "x-rewrite-url",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "x-proxy-all-pages",  # the proxy's own paging helper
    }
)
# Forwarded always: the proxy's own layers act on them (cache keys and directives,
# conditionals) and Kounta needs them (Content-Type on writes), so removing one would
# change what the proxy means, not only what Kounta sees.
REQUIRED_FORWARDED = (
    "Accept",
    "Content-Type",
    "Cache-Control",
    "Pragma",
    "If-Match",
    "If-None-Match",
    "If-Modified-Since",
    "If-Unmodified-Since",
    "If-Range",
    "Range",
    "X-Page",
    "X-Pretty-Print",
)
# The default ``upstream.forward_headers``: the required ones plus what Kounta documents or
# clients send it. X-Request-ID is always the proxy's own (the caller's when sane).
DEFAULT_FORWARDED = (*REQUIRED_FORWARDED, "Content-Encoding", "User-Agent", "X-Request-ID")
DEFAULT_ALLOWED = frozenset(n.lower() for n in DEFAULT_FORWARDED)
# Framing is the proxy's own; Content-Encoding is set per caller when answering
# (proxy.edge.answer: gzip as stored, or inflated).
RESPONSE_DROPPED = frozenset({"content-length", "content-encoding", "set-cookie"})


def connection_named(headers: Iterable[tuple[str, str]]) -> set[str]:
    """The lower-case field names a ``Connection`` header lists (RFC 9110 7.6.1)."""
    named: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
            named.update(t.strip().lower() for t in value.split(",") if t.strip())
    return named


def for_upstream(
    headers: Iterable[tuple[str, str]], allowed: frozenset[str] = DEFAULT_ALLOWED
) -> CIMultiDict[str]:
    """The caller's headers that go to Kounta: only names in ``allowed`` (lower case, from
    ``upstream.forward_headers``), never one the caller's ``Connection`` names (RFC 9110
    7.6.1), repeated ones kept repeated."""
    items = list(headers)
    named = connection_named(items)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in items:
        lower = name.lower()
        if lower in allowed and lower not in named and lower not in NEVER_FORWARDED:
            out.add(name, value)
    return out


def proxied(
    headers: Iterable[tuple[str, str]], allowed: frozenset[str], request_id: str
) -> CIMultiDict[str]:
    """The headers of the request the proxy makes of a caller's (:func:`for_upstream`, its
    request id and ``Via``): what the cache selects a stored answer by."""
    out = for_upstream(headers, allowed)
    out["X-Request-ID"] = request_id
    out["Via"] = VIA
    return out


def for_caller(headers: Iterable[tuple[str, str]]) -> CIMultiDict[str]:
    """The upstream's headers that may go back to the caller."""
    items = list(headers)
    named = connection_named(items)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in items:
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in RESPONSE_DROPPED or lower in named:
            continue
        if lower.startswith("proxy-"):
            continue
        out.add(name, value)
    return out


def not_utf8(headers: Iterable[tuple[str, str]]) -> str | None:
    """The name of a header whose value was not UTF-8 on the wire, if any.

    aiohttp's parsers decode header bytes as UTF-8 with ``surrogateescape``: a byte that is
    not valid UTF-8 becomes a lone surrogate, which no client can encode again (such values
    used to reach Kounta empty). ASCII values, the common case, are not looked into.
    """
    for name, value in headers:
        if not value.isascii() and _ESCAPED_BYTE.search(value):
            return name
    return None


def repeated(headers: CIMultiDictProxy[str], names: Iterable[str]) -> str | None:
    """The first of ``names`` sent on more than one line, if any: a selecting header must
    select one thing, or the cache would key on one line while the upstream reads both."""
    for name in names:
        if name in headers and len(headers.getall(name)) > 1:
            return name
    return None


def has_bad_value(headers: Iterable[tuple[str, str]]) -> str | None:
    """The name of a header whose value holds CR, LF or NUL, if any."""
    for name, value in headers:
        if any(ch in value for ch in "\r\n\x00"):
            return name
    return None
