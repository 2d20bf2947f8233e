"""TLS to the upstream is always verified; only the trust anchors are configurable."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import web

from proxy.client import ssl_context
from proxy.sandbox import SandboxConfig, create_sandbox_app
from proxy.settings import UpstreamSettings
from tests.conftest import TOKEN, MakeProxy, proxy_settings


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def serve_https(cert: trustme.LeafCert) -> tuple[web.AppRunner, str]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    app = create_sandbox_app(SandboxConfig(bearer_tokens=(TOKEN,)))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx).start()
    return runner, f"https://127.0.0.1:{runner.addresses[0][1]}"


@pytest.fixture
async def https_sandbox(ca: trustme.CA) -> AsyncIterator[str]:
    runner, url = await serve_https(ca.issue_cert("127.0.0.1", "localhost"))
    yield url
    await runner.cleanup()


async def test_configured_ca_bundle_is_trusted(
    make_proxy: MakeProxy,
    https_sandbox: str,
    ca: trustme.CA,
    tmp_path: Path,
    client: aiohttp.ClientSession,
) -> None:
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    upstream = UpstreamSettings(base_url=https_sandbox, ca_bundle=str(bundle))
    proxy = await make_proxy(proxy_settings(https_sandbox, tmp_path, upstream=upstream))
    async with client.get(f"{proxy.url}/v1/companies/5001/products.json") as r:
        assert r.status == 200
        # the upstream origin is https://127.0.0.1:port; the caller still gets proxy URLs
        assert r.headers["X-Next-Page"].startswith(proxy.url + "/v1/")


async def test_unknown_ca_is_refused_with_502(
    make_proxy: MakeProxy, https_sandbox: str, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(proxy_settings(https_sandbox, tmp_path))
    async with client.get(f"{proxy.url}/v1/companies/me.json") as r:
        assert r.status == 502
        body = await r.json()
        assert body["error"] == "upstream_tls_error"
        assert (
            "certificate" in body["error_description"].lower()
            or "tls" in body["error_description"].lower()
        )


async def test_wrong_host_name_is_refused(
    make_proxy: MakeProxy, ca: trustme.CA, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    runner, url = await serve_https(ca.issue_cert("other.example"))
    try:
        bundle = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(bundle))
        proxy = await make_proxy(
            proxy_settings(
                url, tmp_path, upstream=UpstreamSettings(base_url=url, ca_bundle=str(bundle))
            )
        )
        async with client.get(f"{proxy.url}/v1/companies/me.json") as r:
            assert r.status == 502
            assert (await r.json())["error"] == "upstream_tls_error"
    finally:
        await runner.cleanup()


def test_a_bundle_is_loaded_once_and_again_when_it_changes_on_disk(tmp_path: Path) -> None:
    """The verifying context is shared while the bundle is the same file unchanged; a bundle
    replaced (new CA) is read again, not served from the memo."""
    bundle = tmp_path / "ca.pem"
    first, second = trustme.CA(), trustme.CA()
    first.cert_pem.write_to_path(str(bundle))
    settings = UpstreamSettings(base_url="https://127.0.0.1:1", ca_bundle=str(bundle))
    ctx = ssl_context(settings)
    assert ssl_context(settings) is ctx
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    before = ctx.get_ca_certs()
    replaced = tmp_path / "ca.pem.new"
    second.cert_pem.write_to_path(str(replaced))
    replaced.replace(bundle)  # as a package manager or a mounted secret swaps the file
    again = ssl_context(settings)
    assert again is not ctx and again.get_ca_certs() != before
    assert ssl_context(UpstreamSettings(base_url="https://127.0.0.1:1")) is not again
