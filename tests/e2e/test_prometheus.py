"""A real Prometheus server scrapes a running proxy with the repository's configuration."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest

from proxy.edge.services import SERVICES
from proxy.ops.admin import create_admin_app
from proxy.settings import RetrySettings
from tests.conftest import MakeProxy, Proxy, proxy_settings, serve
from tests.e2e.test_demo import free_port
from tests.ops_tools import prometheus_tool
from tests.promql import rules

CONFIG = Path(__file__).resolve().parents[2] / "config"
DEADLINE = 25.0  # seconds for the whole exchange with Prometheus
ALERT = "KountaProxyUpstreamErrorRatio"


def adapted_config(tmp_path: Path, admin_port: int) -> Path:
    """config/prometheus.yml with the test's admin port and 1 s intervals; alerts beside it."""
    text = (CONFIG / "prometheus.yml").read_text()
    for old, new in (
        ('"kounta-proxy:9464"', f'"127.0.0.1:{admin_port}"'),
        ("scrape_interval: 15s", "scrape_interval: 1s"),
        ("evaluation_interval: 15s", "evaluation_interval: 1s"),
    ):
        assert old in text, f"config/prometheus.yml no longer has {old}; update this test"
        text = text.replace(old, new)
    (tmp_path / "prometheus.yml").write_text(text)
    shutil.copy(CONFIG / "alerts.yml", tmp_path / "alerts.yml")
    return tmp_path / "prometheus.yml"


async def poll(
    client: aiohttp.ClientSession, url: str, ready: Any, deadline: float
) -> dict[str, Any]:
    last: Any = None
    while time.monotonic() < deadline:
        try:
            async with client.get(url) as r:
                last = await r.json()
                if r.status == 200 and ready(last["data"]):
                    return dict(last["data"])
        except (aiohttp.ClientError, ValueError) as e:
            last = e
        await asyncio.sleep(0.25)
    raise AssertionError(f"Prometheus did not answer as expected at {url}: {last}")


@pytest.mark.slow
async def test_prometheus_scrapes_the_proxy_and_loads_the_alerts(
    proxy: Proxy, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    binary = prometheus_tool("prometheus")
    runner, admin_port = await serve(create_admin_app(proxy.app[SERVICES]))
    for path in ("/v1/companies/me.json", "/v1/companies/5001/products/1.json"):
        async with client.get(f"{proxy.url}{path}") as r:
            await r.read()
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    prom = await asyncio.create_subprocess_exec(
        binary,
        f"--config.file={adapted_config(tmp_path, admin_port)}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=log,
    )
    api = f"http://127.0.0.1:{port}/api/v1"
    deadline = time.monotonic() + DEADLINE
    try:
        query = f"{api}/query?query=kounta_proxy_requests_total"
        data = await poll(client, query, lambda d: len(d["result"]) > 0, deadline)
        labels = [r["metric"] for r in data["result"]]
        routes = {m["route"] for m in labels}
        assert "/v1/companies/me" in routes
        assert "/v1/companies/{id}/products/{id}" in routes
        for m in labels:
            assert m["job"] == "kounta-proxy"
            assert m["instance"] == f"127.0.0.1:{admin_port}"
            assert {"method", "route", "status_class", "cache"} <= m.keys()
        rules = await poll(
            client,
            f"{api}/rules",
            lambda d: d["groups"] and all(r["health"] == "ok" for r in d["groups"][0]["rules"]),
            deadline,
        )
        names = {r["name"] for g in rules["groups"] for r in g["rules"]}
        assert {
            "KountaProxyTokenExpiringSoon",
            "KountaProxyTokenRefreshFailing",
            "KountaProxyBudgetExhausted",
            "KountaProxyUpstreamErrorRatio",
            "KountaProxyCacheStoreErrors",
        } <= names
        up = await poll(client, f"{api}/query?query=up", lambda d: len(d["result"]) > 0, deadline)
        assert up["result"][0]["value"][1] == "1"
    finally:
        prom.terminate()
        try:
            await asyncio.wait_for(prom.wait(), 10)
        except TimeoutError:
            prom.kill()
            await prom.wait()
        log.close()
        await runner.cleanup()


@pytest.mark.slow
async def test_the_error_ratio_alert_sees_a_pure_connect_error_outage(
    make_proxy: MakeProxy, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Live: Kounta refuses every connection from the start, so the proxy has
    connect errors and no upstream request series at all; the shipped rule's expression must
    still say 100 % (the old one was empty: `A + B` with B missing)."""
    binary = prometheus_tool("prometheus")
    # No breaker: every request tries Kounta, so the errors go on growing between scrapes
    # (with one, they grow once per probe, every breaker_cooldown).
    retry = RetrySettings(breaker_failures=0)
    proxy = await make_proxy(
        proxy_settings(f"http://127.0.0.1:{free_port()}", tmp_path, retry=retry)
    )
    runner, admin_port = await serve(create_admin_app(proxy.app[SERVICES]))
    expr = next(r["expr"] for r in rules(CONFIG / "alerts.yml") if r.get("alert") == ALERT)

    async def outage() -> None:
        while True:
            async with client.get(f"{proxy.url}/v1/companies/me.json") as r:
                assert r.status in (502, 503)
            await asyncio.sleep(0.2)

    sending = asyncio.ensure_future(outage())
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    prom = await asyncio.create_subprocess_exec(
        binary,
        f"--config.file={adapted_config(tmp_path, admin_port)}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=log,
    )
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        data = await poll(
            client,
            f"{api}/query?{urlencode({'query': expr})}",
            lambda d: len(d["result"]) > 0,
            time.monotonic() + DEADLINE,
        )
        assert [float(r["value"][1]) for r in data["result"]] == [1.0]
        assert (
            proxy.registry.get_sample_value(
                "kounta_proxy_upstream_requests_total",
                {"method": "GET", "route": "/v1/companies/me", "status": "200", "account": "main"},
            )
            is None
        )  # no request series: the case the old rule missed
    finally:
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        prom.terminate()
        try:
            await asyncio.wait_for(prom.wait(), 10)
        except TimeoutError:
            prom.kill()
            await prom.wait()
        log.close()
        await runner.cleanup()
