"""The one client session to Kounta, and the edge where aiohttp errors become ours."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager

import aiohttp
from multidict import CIMultiDict

from proxy.errors import (
    UpstreamBodyError,
    UpstreamError,
    UpstreamTimeout,
    UpstreamTLSError,
    UpstreamUnreachable,
)
from proxy.messages import ProxyRequest, ProxyResponse
from proxy.settings import UpstreamSettings
from proxy.target import Target, upstream_url

CHUNK = 64 * 1024


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


@contextmanager
def mapped_errors(settings: UpstreamSettings) -> Iterator[None]:
    """Translate aiohttp's exceptions into :mod:`proxy.errors` (no secrets, no URLs)."""
    try:
        yield
    except UpstreamError:
        raise
    except aiohttp.ConnectionTimeoutError:
        raise UpstreamTimeout(
            f"Connecting to the upstream took longer than {settings.connect_timeout:g}s "
            "(connect timeout)"
        ) from None
    except aiohttp.SocketTimeoutError:
        raise UpstreamTimeout(
            f"The upstream sent nothing for {settings.read_timeout:g}s (read timeout)"
        ) from None
    except (TimeoutError, aiohttp.ServerTimeoutError):
        raise UpstreamTimeout(
            f"The upstream exchange took longer than {settings.total_timeout:g}s (total timeout)"
        ) from None
    except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError) as e:
        raise UpstreamTLSError(f"TLS with the upstream failed: {_reason(e)}") from None
    except aiohttp.ClientPayloadError:
        raise UpstreamBodyError(
            "The upstream closed the connection before the body ended"
        ) from None
    except aiohttp.ClientConnectorError as e:
        raise UpstreamUnreachable(f"Cannot connect to the upstream: {_reason(e)}") from None
    except aiohttp.ServerDisconnectedError:
        raise UpstreamUnreachable("The upstream closed the connection without answering") from None
    except (aiohttp.ClientError, OSError) as e:
        raise UpstreamUnreachable(f"The upstream connection failed: {_reason(e)}") from None


def _reason(error: BaseException) -> str:
    os_error = getattr(error, "os_error", None)
    if isinstance(os_error, OSError) and os_error.strerror:
        return os_error.strerror
    return type(error).__name__


class Upstream:
    """The bottom layer: sends a request to the fixed upstream and streams the answer."""

    def __init__(self, settings: UpstreamSettings, session: aiohttp.ClientSession) -> None:
        self.settings = settings
        self.base = settings.url
        self.session = session

    async def send(self, request: ProxyRequest) -> ProxyResponse:
        url = upstream_url(self.base, Target(request.path, request.query))
        headers = CIMultiDict(request.headers)
        timeout = self._timeout(request.deadline)
        with mapped_errors(self.settings):
            response = await self.session.request(
                request.method,
                url,
                headers=headers,
                data=request.body,
                allow_redirects=False,
                timeout=timeout,
            )
        return ProxyResponse(
            status=response.status,
            headers=CIMultiDict(response.headers),
            body=self._stream(response),
            release=_releaser(response),
            upstream_status=response.status,
        )

    def _timeout(self, deadline: float) -> aiohttp.ClientTimeout | None:
        left = deadline - asyncio.get_running_loop().time()
        if left >= self.settings.total_timeout:
            return None
        if left <= 0:
            raise UpstreamTimeout("The request's deadline passed before it could be sent")
        return aiohttp.ClientTimeout(
            total=left,
            sock_connect=self.settings.connect_timeout,
            sock_read=self.settings.read_timeout,
        )

    async def _stream(self, response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        try:
            with mapped_errors(self.settings):
                async for chunk in response.content.iter_chunked(CHUNK):
                    yield chunk
        finally:
            response.release()


def _releaser(response: aiohttp.ClientResponse) -> Callable[[], Awaitable[None]]:
    async def release() -> None:
        # close(), not release(): a half-read body must not go back to the pool.
        if not response.content.at_eof():
            response.close()
        else:
            response.release()

    return release
