"""Secret rotation without downtime: after a reload changes a caller's key, the previous key
is still accepted for ``inbound.key_overlap`` seconds (and counted), then refused; a caller
removed from the settings loses its key at once."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.edge.callers import AdminToken, Callers
from proxy.edge.services import SERVICES
from proxy.ops.reload import reload
from proxy.settings import CallerSettings, InboundSettings, Secret, Settings, live_of
from tests.conftest import MakeProxy, Sandbox, proxy_settings

OLD = "old-key-0123456789abcdef"
NEW = "new-key-0123456789abcdef"


def with_key(settings: Settings, key: str, overlap: float, **more: CallerSettings) -> Settings:
    return dataclasses.replace(
        settings,
        inbound=InboundSettings(key_overlap=overlap),
        callers={"app": CallerSettings(key=Secret(key)), **more},
    )


async def status(client: aiohttp.ClientSession, url: str, key: str) -> int:
    async with client.get(f"{url}/v1/companies/me", headers={"X-Proxy-Key": key}) as r:
        await r.read()
        return r.status


async def test_the_old_key_works_for_the_overlap_then_is_refused(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    first = with_key(proxy_settings(sandbox.url, tmp_path), OLD, overlap=1.0)
    proxy = await make_proxy(first)
    services = proxy.app[SERVICES]
    assert await status(client, proxy.url, OLD) == 200
    assert await status(client, proxy.url, NEW) == 401

    assert await reload(services, lambda: with_key(first, NEW, overlap=1.0))
    # Both work during the overlap: callers switch one by one, none is refused.
    assert [await status(client, proxy.url, k) for k in (OLD, NEW, OLD)] == [200, 200, 200]
    used = proxy.registry.get_sample_value(
        "kounta_proxy_caller_retired_key_requests_total", {"caller": "app"}
    )
    assert used == 2
    await asyncio.sleep(1.1)
    assert await status(client, proxy.url, OLD) == 401  # the overlap is over
    assert await status(client, proxy.url, NEW) == 200


async def test_no_overlap_and_a_removed_caller_are_refused_at_once(
    make_proxy: MakeProxy, sandbox: Sandbox, tmp_path: Any, client: aiohttp.ClientSession
) -> None:
    other = CallerSettings(key=Secret("other-key-0123456789abcd"))
    first = with_key(proxy_settings(sandbox.url, tmp_path), OLD, overlap=0.0, other=other)
    proxy = await make_proxy(first)
    services = proxy.app[SERVICES]
    assert await reload(services, lambda: with_key(first, NEW, overlap=0.0))
    assert await status(client, proxy.url, OLD) == 401  # key_overlap = 0
    assert await status(client, proxy.url, "other-key-0123456789abcd") == 401  # removed


def headers(key: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict({"X-Proxy-Key": key}))


def test_rotating_twice_within_the_overlap_keeps_both_earlier_keys_until_their_end(
    tmp_path: Any,
) -> None:
    now = [100.0]
    base = proxy_settings("http://127.0.0.1:9", tmp_path)
    callers = Callers(with_key(base, "k1-0123456789abcdef", 60), clock=lambda: now[0])
    callers = callers.rotated(live_of(with_key(base, "k2-0123456789abcdef", 60)))
    now[0] = 130.0
    callers = callers.rotated(live_of(with_key(base, "k3-0123456789abcdef", 60)))
    names = [callers.find(headers(f"k{i}-0123456789abcdef")) for i in (1, 2, 3)]
    assert [c.name if c else None for c in names] == ["app", "app", "app"]
    now[0] = 161.0  # k1's overlap (from 100) is over, k2's (from 130) is not
    names = [callers.find(headers(f"k{i}-0123456789abcdef")) for i in (1, 2, 3)]
    assert [c.name if c else None for c in names] == [None, "app", "app"]


def test_the_admin_token_rotates_with_an_overlap_and_an_emptied_one_is_revoked() -> None:
    now = [100.0]
    first, second, third = (f"admin-token-{n}-0123456789".encode() for n in (1, 2, 3))
    token = AdminToken(Secret(first.decode()), clock=lambda: now[0])
    assert token.matches(first) and not token.matches(second)
    token = token.rotated(Secret(second.decode()), 60)
    assert token.matches(first) and token.matches(second)
    now[0] = 130.0
    token = token.rotated(Secret(second.decode()), 60)  # unchanged: the overlap runs on
    now[0] = 161.0
    assert not token.matches(first) and token.matches(second)
    token = token.rotated(Secret(third.decode()), 0)  # no overlap: refused at once
    assert not token.matches(second) and token.matches(third)
    token = token.rotated(Secret(second.decode()), 60).rotated(Secret(""), 60)
    assert not token and not any(token.matches(t) for t in (first, second, third, b""))
