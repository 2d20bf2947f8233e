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
    scheme = url.scheme or upstream.scheme
    if scheme != upstream.scheme or (url.host or "").lower() != (upstream.host or "").lower():
        return False
    return (url.port or _default_port(scheme)) == (upstream.port or _default_port(scheme))


def _default_port(scheme: str) -> int | None:
    return {"http": 80, "https": 443}.get(scheme)
