"""The one aiohttp client session: TLS always verified, timeouts, no cookies.

Upstream requests and token requests share it; ``kounta-proxy authorize`` makes its own.
"""

from __future__ import annotations

import ssl

import aiohttp

from proxy.settings import UpstreamSettings


def ssl_context(settings: UpstreamSettings) -> ssl.SSLContext:
    """Verification is always on; only the trust anchors are configurable."""
    ctx = ssl.create_default_context(cafile=settings.ca_bundle or None)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def create_session(settings: UpstreamSettings) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=settings.pool_size,
        ssl=ssl_context(settings),
        ttl_dns_cache=300,
        enable_cleanup_closed=False,
    )
    timeout = aiohttp.ClientTimeout(
        total=settings.total_timeout,
        sock_connect=settings.connect_timeout,
        sock_read=settings.read_timeout,
    )
    # No cookie jar: Kounta is stateless and one caller's cookies must not reach another's.
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=True,
        skip_auto_headers=("User-Agent",),
    )
