# ruff: noqa: F811 - the fixtures of test_admin.py are imported, then named as parameters
"""Who may use the admin listener (DESIGN.md Resolutions "Admin access"), over real sockets.

Probes answer any Host (the kubelet and pod scrapes send the pod IP); reads keep the Host
check unless the admin token is presented; state-changing routes on a non-loopback admin
host need the admin token and are off without a token file; a same-origin Origin is the
admin listener's own, exactly.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from proxy.edge.services import SERVICES
from proxy.ops.admin import HEARTBEAT, LOOP_STALL, create_admin_app, exposure_warning
from proxy.settings import AdminSettings, Secret
from tests.conftest import MakeProxy, Proxy, Sandbox, proxy_settings, serve
from tests.integration.test_admin import (  # noqa: F401 - fixtures
    StartAdmin,
    admin,
    admin_raw,
    start_admin,
    stored_entries,
)

POD_IP = "Host: 10.244.1.7:9464"
ADMIN_TOKEN = "admin-token-5b1f0c9e7d2a4c36"
PURGE = "/cache/purge"


async def cached_once(proxy: Proxy, admin: str) -> int:
    """Fill the cache with one entry; the number of stored entries."""
    url = f"{proxy.url}/v1/companies/5001/products.json"
    async with aiohttp.ClientSession() as client, client.get(url) as r:
        assert r.status == 200
    entries = await stored_entries(admin)
    assert entries >= 1
    return entries


@pytest.fixture
async def exposed(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, start_admin: StartAdmin
) -> tuple[Proxy, str]:
    """A proxy whose admin.host is 0.0.0.0 (the image's), no admin token file."""
    settings = proxy_settings(sandbox.url, tmp_path, admin=AdminSettings(host="0.0.0.0"))
    proxy = await make_proxy(settings)
    return proxy, await start_admin(proxy)


@pytest.fixture
async def tokened(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, start_admin: StartAdmin
) -> tuple[Proxy, str]:
    """As ``exposed``, with an admin token (admin.token_file in a real configuration)."""
    admin = AdminSettings(host="0.0.0.0", token=Secret(ADMIN_TOKEN, source="/run/secrets/admin"))
    proxy = await make_proxy(proxy_settings(sandbox.url, tmp_path, admin=admin))
    return proxy, await start_admin(proxy)


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/livez", "/metrics"])
@pytest.mark.parametrize("host", [POD_IP, "Host: kounta-proxy.default.svc:9464", "Host: [fd00::7]"])
async def test_probes_answer_any_host(exposed: tuple[Proxy, str], path: str, host: str) -> None:
    status, _ = await admin_raw(exposed[1], "GET", path, host)
    assert status == 200


async def test_probes_answer_a_pod_ip_on_a_loopback_admin_host_too(admin: str) -> None:
    for path in ("/healthz", "/readyz", "/livez", "/metrics"):
        assert (await admin_raw(admin, "GET", path, POD_IP))[0] == 200, path


@pytest.mark.parametrize("path", ["/budget", "/cache/stats"])
async def test_reads_keep_the_host_check_unless_the_token_is_presented(
    tokened: tuple[Proxy, str], path: str
) -> None:
    admin = tokened[1]
    status, payload = await admin_raw(admin, "GET", path, POD_IP)
    assert (status, json.loads(payload)["error"]) == (403, "access_denied")
    bearer = f"Authorization: Bearer {ADMIN_TOKEN}"
    assert (await admin_raw(admin, "GET", path, POD_IP, bearer))[0] == 200
    wrong = f"Authorization: Bearer {ADMIN_TOKEN}x"
    assert (await admin_raw(admin, "GET", path, POD_IP, wrong))[0] == 403
    assert (await admin_raw(admin, "GET", path, POD_IP, "Authorization: Bearer \xff\u00e9"))[
        0
    ] == 403
    assert (await admin_raw(admin, "GET", path, "Host: localhost:9464"))[0] == 200


async def test_a_forged_localhost_cannot_purge_an_exposed_admin_without_a_token_file(
    exposed: tuple[Proxy, str],
) -> None:
    proxy, admin = exposed
    entries = await cached_once(proxy, admin)
    for lines in (
        ("Host: localhost",),
        ("Host: 127.0.0.1:9464", "Origin: http://127.0.0.1:9464"),
        (POD_IP, "Authorization: Bearer anything"),
    ):
        status, payload = await admin_raw(admin, "POST", PURGE, *lines)
        body = json.loads(payload)
        assert (status, body["error"]) == (403, "access_denied"), lines
        assert "admin.token_file" in body["error_description"]
        assert "\n" not in body["error_description"]
    assert await stored_entries(admin) == entries
    warning = exposure_warning(proxy.settings.admin)
    assert warning is not None and "admin.token_file" in warning


async def test_an_exposed_admin_purges_with_the_token_only(tokened: tuple[Proxy, str]) -> None:
    proxy, admin = tokened
    entries = await cached_once(proxy, admin)
    refused = [
        ("Host: localhost",),
        (POD_IP, f"Authorization: Bearer {ADMIN_TOKEN[:-1]}"),
        (POD_IP, f"Authorization: Basic {ADMIN_TOKEN}"),
        # The token does not lift the browser checks.
        (POD_IP, f"Authorization: Bearer {ADMIN_TOKEN}", "Origin: http://evil.example"),
        (POD_IP, f"Authorization: Bearer {ADMIN_TOKEN}", "Sec-Fetch-Site: cross-site"),
    ]
    for lines in refused:
        status, payload = await admin_raw(admin, "POST", PURGE, *lines)
        assert (status, json.loads(payload)["error"]) == (403, "access_denied"), lines
    assert await stored_entries(admin) == entries
    status, payload = await admin_raw(
        admin, "POST", PURGE, POD_IP, f"Authorization: Bearer {ADMIN_TOKEN}"
    )
    assert (status, json.loads(payload)["purged"]) == (200, entries)
    assert exposure_warning(proxy.settings.admin) is None or "off" not in str(
        exposure_warning(proxy.settings.admin)
    )


@pytest.mark.parametrize(
    "origin",
    [
        "http://[::1",  # unparsable: was a 500
        "http://localhost:3000",  # another port on the same machine
        "http://localhost",  # port 80
        "https://localhost:9464",  # another scheme
        "http://localhost:9464/",  # not an origin
        "http://localhost:9464.evil.example",
        "http://user@localhost:9464",
        "http://127.0.0.1:9464",  # another name for the same address: another origin
        "null",
        "",
    ],
)
async def test_only_the_listeners_own_origin_is_same_origin(
    proxy: Proxy, admin: str, origin: str
) -> None:
    entries = await cached_once(proxy, admin)
    status, payload = await admin_raw(
        admin, "POST", PURGE, "Host: localhost:9464", f"Origin: {origin}"
    )
    assert (status, json.loads(payload)["error"]) == (403, "access_denied")
    assert await stored_entries(admin) == entries


@pytest.mark.parametrize(
    ("host", "origin"),
    [
        ("localhost:9464", "http://localhost:9464"),
        ("LOCALHOST:9464", "http://localhost:9464"),
        ("[::1]:9464", "http://[::1]:9464"),
        ("127.0.0.1", "http://127.0.0.1:80"),
    ],
)
async def test_the_listeners_own_origin_may_purge(
    proxy: Proxy, admin: str, host: str, origin: str
) -> None:
    status, _ = await admin_raw(admin, "POST", PURGE, f"Host: {host}", f"Origin: {origin}")
    assert status == 200


async def test_livez_fails_when_the_event_loop_stops_turning(
    proxy: Proxy, start_admin: StartAdmin
) -> None:
    app = create_admin_app(proxy.app[SERVICES])
    runner, port = await serve(app)
    try:
        url = f"http://127.0.0.1:{port}"
        status, payload = await admin_raw(url, "GET", "/livez", POD_IP)
        assert (status, json.loads(payload)["status"]) == (200, "alive")
        # The heartbeat's last tick long ago: what a loop blocked for that long leaves.
        app[HEARTBEAT].last -= LOOP_STALL + 5
        status, payload = await admin_raw(url, "GET", "/livez", POD_IP)
        assert (status, json.loads(payload)["status"]) == (503, "stalled")
        assert json.loads(payload)["loop_late"] > LOOP_STALL
    finally:
        await runner.cleanup()


async def test_an_undecodable_token_is_refused_not_a_500(tokened: tuple[Proxy, str]) -> None:
    port = int(tokened[1].rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"GET /budget HTTP/1.1\r\nHost: 10.244.1.7\r\nAuthorization: Bearer \xc3\xff\r\n"
        b"Connection: close\r\n\r\n"
    )
    head = (await asyncio.wait_for(reader.read(), 5)).split(b"\r\n", 1)[0]
    writer.close()
    assert head == b"HTTP/1.1 403 Forbidden"
