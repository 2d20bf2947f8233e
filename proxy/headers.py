"""Which headers cross the proxy, in each direction (pure)."""

from __future__ import annotations

from collections.abc import Iterable

from multidict import CIMultiDict

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
# Set by the proxy itself for the upstream, never taken from the caller.
REQUEST_DROPPED = frozenset(
    {
        "host",
        "authorization",  # the account's credentials replace the caller's
        "content-length",  # recomputed from the body actually sent
        "accept-encoding",  # the client session negotiates and decodes compression
        "cookie",
        "expect",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-real-ip",
        "via",  # replaced by the proxy's own entry: internal host names stay internal
    }
)
# The body the proxy sends on is already decoded and re-framed.
RESPONSE_DROPPED = frozenset({"content-length", "content-encoding", "set-cookie"})


def connection_named(headers: Iterable[tuple[str, str]]) -> set[str]:
    """The lower-case field names a ``Connection`` header lists (RFC 9110 7.6.1)."""
    named: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
            named.update(t.strip().lower() for t in value.split(",") if t.strip())
    return named


def _filtered(
    headers: Iterable[tuple[str, str]], dropped: frozenset[str], extra: frozenset[str]
) -> CIMultiDict[str]:
    items = list(headers)
    named = connection_named(items)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in items:
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in dropped or lower in extra or lower in named:
            continue
        if lower.startswith("proxy-"):
            continue
        out.add(name, value)
    return out


def for_upstream(
    headers: Iterable[tuple[str, str]], also_drop: frozenset[str] = frozenset()
) -> CIMultiDict[str]:
    """The caller's headers that may go to Kounta, repeated ones kept repeated."""
    return _filtered(headers, REQUEST_DROPPED, also_drop)


def for_caller(headers: Iterable[tuple[str, str]]) -> CIMultiDict[str]:
    """The upstream's headers that may go back to the caller."""
    return _filtered(headers, RESPONSE_DROPPED, frozenset())


def has_bad_value(headers: Iterable[tuple[str, str]]) -> str | None:
    """The name of a header whose value holds CR, LF or NUL, if any."""
    for name, value in headers:
        if any(ch in value for ch in "\r\n\x00"):
            return name
    return None
