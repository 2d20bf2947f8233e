"""Put upstream URLs in response headers back onto the proxy (pure).

Kounta's ``X-Next-Page`` cursors and ``Location`` headers are absolute URLs on
the upstream origin. A caller that followed them would leave the proxy (and
need the credentials it does not have), so each one that points at the
upstream is moved onto the proxy's public URL; any other URL is left alone.
"""

from __future__ import annotations

import re

from yarl import URL

REWRITTEN_HEADERS = ("X-Next-Page", "Location", "Content-Location")
_NOT_URL = re.compile(r"[\x00-\x20\x7f]")


def rewrite_url(value: str, upstream: URL, public: URL) -> str:
    """``value`` moved from ``upstream`` onto ``public`` if it points at ``upstream``."""
    if not value or _NOT_URL.search(value):
        return value  # not a URL a header could carry; leave it as it came
    try:
        url = URL(value, encoded=True)
    except ValueError:
        return value
    if not url.is_absolute() and not value.startswith("//"):
        return value
    if not _same_origin(url, upstream):
        return value
    base_path = upstream.raw_path.rstrip("/")
    path = url.raw_path
    if base_path and not (path == base_path or path.startswith(base_path + "/")):
        return value
    rest = path[len(base_path) :] or "/"
    query = f"?{url.raw_query_string}" if url.raw_query_string else ""
    fragment = f"#{url.raw_fragment}" if url.raw_fragment else ""
    return str(public.origin()) + public.raw_path.rstrip("/") + rest + query + fragment


def _same_origin(url: URL, upstream: URL) -> bool:
    """Same host and port; the scheme alone does not make another server.

    An upstream behind a TLS terminator may name itself ``http://`` (or ``https://``)
    whatever ``upstream.base_url`` says; such a link left alone would send the caller,
    and whatever credentials it holds, straight past the proxy.
    """
    scheme = url.scheme or upstream.scheme
    if scheme not in ("http", "https") or upstream.scheme not in ("http", "https"):
        return False
    if (url.host or "").lower() != (upstream.host or "").lower():
        return False
    if url.explicit_port is None and upstream.explicit_port is None:
        return True  # both on their scheme's default port
    return (url.port or _default_port(scheme)) == (upstream.port or _default_port(upstream.scheme))


def _default_port(scheme: str) -> int | None:
    return {"http": 80, "https": 443}.get(scheme)
