"""What a running proxy's /metrics exposes, against the list in metrics_exposition.txt: every
family's name, type, label names and help text, and the series that exist before the first
request (the pre-initialised label sets). Where a metric is declared (which package's group)
may change; what Prometheus, the alerts and the dashboard see must not, unless on purpose:
then regenerate the list (``KOUNTA_PROXY_WRITE_EXPOSITION=1``) and say so in the CHANGELOG.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from proxy.edge.services import SERVICES
from proxy.ops.admin import create_admin_app
from proxy.settings import AccountSettings, Secret, WebhookSettings
from tests.conftest import TOKEN, MakeProxy, Sandbox, proxy_settings, serve

LISTED = Path(__file__).with_name("metrics_exposition.txt")


def label_names(registry: CollectorRegistry) -> dict[str, tuple[str, ...]]:
    """Each declared family's label names (a family without series shows none in the text)."""
    found: dict[str, tuple[str, ...]] = {}
    for collector in list(registry._collector_to_names):  # test only: no public accessor
        labels = getattr(collector, "_labelnames", None) or getattr(collector, "labelnames", None)
        for family in collector.describe() if hasattr(collector, "describe") else ():
            found[family.name] = tuple(labels or ())
    return found


def listing(text: str, registry: CollectorRegistry) -> list[str]:
    """One line per family (name, type, label names, help), then one per series it has."""
    declared = label_names(registry)
    lines: list[str] = []
    for family in sorted(text_string_to_metric_families(text), key=lambda f: f.name):
        labels = ",".join(declared.get(family.name, ()))
        lines.append(f"{family.name} {family.type} [{labels}] {family.documentation}")
        if not family.name.startswith("kounta_proxy_"):
            continue  # process_*: their values, not their series, vary
        for sample in family.samples:
            # An info's values (versions, the configuration's hash) are the machine's and run's.
            masked = sample.name.endswith("_info")
            pairs = ",".join(
                f'{k}="{"*" if masked else v}"' for k, v in sorted(sample.labels.items())
            )
            lines.append(f"  {sample.name}{{{pairs}}}")
    return lines


async def test_the_exposition_of_a_running_proxy_is_the_listed_one(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any
) -> None:
    # Two accounts and the webhooks on: every per-account series that exists from the start.
    base = proxy_settings(sandbox.url, tmp_path)
    other = AccountSettings(mode="static", token=Secret(TOKEN), rate_per_minute=600)
    hooks = WebhookSettings(enabled=True, port=0, secret=Secret("a-webhook-secret-0123456789"))
    settings = dataclasses.replace(base, accounts={**base.accounts, "other": other}, webhooks=hooks)
    proxy = await make_proxy(settings)
    runner, port = await serve(create_admin_app(proxy.app[SERVICES]))
    try:
        async with (
            aiohttp.ClientSession() as client,
            client.get(f"http://127.0.0.1:{port}/metrics") as r,
        ):
            assert r.status == 200
            text = await r.text()
    finally:
        await runner.cleanup()
    lines = listing(text, proxy.registry)
    if os.environ.get("KOUNTA_PROXY_WRITE_EXPOSITION"):
        LISTED.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert lines == LISTED.read_text(encoding="utf-8").splitlines()
