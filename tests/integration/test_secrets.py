"""No secret ever shows: logs at every level, /metrics, error bodies, check-config, repr."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import generate_latest
from yarl import URL

from proxy.auth import authorize
from proxy.cli import check_config
from proxy.logs import LOGGER, configure
from proxy.sandbox import SandboxConfig
from proxy.sandbox.oauth import SANDBOX_OAUTH
from proxy.settings import CallerSettings, InboundSettings, Secret, load
from tests.conftest import MakeProxy, Sandbox
from tests.integration.test_credentials import SEED_REFRESH, FakeClock, settings_for

CLIENT_SECRET = "client-SECRET-value-7f3a9"
CALLER_KEY = "caller-KEY-value-0c81d2e4"


@pytest.fixture
def sandbox_config() -> SandboxConfig:
    return SandboxConfig(
        rate_per_minute_bearer=100_000,
        refresh_tokens=(SEED_REFRESH,),
        client_secret=CLIENT_SECRET,
        rotate_refresh_tokens=True,
    )


@contextlib.contextmanager
def captured_logs() -> Iterator[io.StringIO]:
    """Every log line the proxy and aiohttp write, at debug level, as the proxy formats it."""
    names = (LOGGER, "aiohttp.server", "aiohttp.web", "aiohttp.client", "asyncio")
    saved = {
        n: (
            logging.getLogger(n).handlers[:],
            logging.getLogger(n).level,
            logging.getLogger(n).propagate,
        )
        for n in names
    }
    stream = io.StringIO()
    configure("debug", "json", stream)
    for name in names[1:]:
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        for name, (handlers, level, propagate) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers[:] = handlers
            logger.setLevel(level)
            logger.propagate = propagate


async def test_no_secret_in_logs_metrics_bodies_or_config_output(
    make_proxy: MakeProxy,
    sandbox: Sandbox,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = sandbox.app[SANDBOX_OAUTH]
    clock = FakeClock()
    settings = settings_for(
        sandbox,
        tmp_path,
        client_secret=Secret(CLIENT_SECRET),
        authorize_url=f"{sandbox.url}/authorize",
    )
    settings = dataclasses.replace(
        settings,
        callers={"svc": CallerSettings(key=Secret(CALLER_KEY))},
        inbound=InboundSettings(),
    )
    seen: list[str] = []
    with captured_logs() as logs:
        p = await make_proxy(settings, clock=clock)
        async with aiohttp.ClientSession() as client:

            async def call(method: str, path: str, **kw: object) -> int:
                headers = {"X-Proxy-Key": CALLER_KEY}
                async with client.request(method, p.url + path, headers=headers, **kw) as r:  # type: ignore[arg-type]
                    seen.append(json.dumps(dict(r.headers)) + await r.text())
                    return r.status

            # demo-like traffic (the first request gets the first token)
            assert await call("GET", "/v1/companies/me.json") == 200
            assert await call("GET", "/v1/companies/5001/products.json") == 200
            assert (
                await call(
                    "POST",
                    "/v1/companies/5001/customers.json",
                    json={"first_name": "A", "last_name": "B"},
                )
                == 201
            )
            assert await call("GET", "/v1/companies/5001/nothing.json") == 404
            async with client.get(
                p.url + "/v1/companies/me.json", headers={"X-Proxy-Key": "wrong-" + CALLER_KEY}
            ) as r:
                assert r.status == 401
                seen.append(await r.text())
            # a refresh (rotating), then a failed refresh
            clock.now += 7200
            assert await call("GET", "/v1/companies/5001/sites.json") == 200
            server.revoke_all_refresh_tokens()
            clock.now += 7200
            assert await call("GET", "/v1/companies/5001/customers.json") == 502
            # an authorize, in-process, with its printed output captured
            out = io.StringIO()
            url = authorize.authorize_url(settings.accounts["main"], "s")
            async with client.get(url, allow_redirects=False) as r:
                code = URL(r.headers["Location"]).query["code"]
            await authorize.run(
                settings, "main", code=code, paste=False, open_browser=False, wait=5, out=out
            )
            assert await call("GET", "/v1/companies/5001/registers.json") in (200, 404)
        metrics = generate_latest(p.registry).decode()
    config = tmp_path / "c.toml"
    config.write_text(
        f'[accounts.main]\nmode = "basic"\nclient_id = "x"\n'
        f'client_secret = "{CLIENT_SECRET}"\n[callers.svc]\nkey = "{CALLER_KEY}"\n'
    )
    assert check_config(config, as_json=False) == 0
    assert check_config(config, as_json=True) == 0
    printed = capsys.readouterr()

    secrets = {CLIENT_SECRET, CALLER_KEY, SEED_REFRESH, *server.by_access, *server.by_refresh}
    secrets.discard("")
    assert len(secrets) >= 7  # the seed, and at least three access + refresh token pairs
    text = logs.getvalue()
    assert "token_refreshed" in text and "token_state" in text and "request" in text
    assert "kounta_proxy_token_requests_total" in metrics
    places = {
        "logs": text,
        "metrics": metrics,
        "answers": "\n".join(seen),
        "authorize output": out.getvalue(),
        "check-config": printed.out + printed.err,
        "repr(settings)": repr(settings) + repr(load(config, env={})),
        "repr(providers)": repr(p.app),
    }
    for where, content in places.items():
        for secret in secrets:
            assert secret not in content, f"a secret appears in {where}"
