"""The one invalidation vocabulary and the one order every change is applied in."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from proxy.cache.invalidation import Change, Invalidation, Invalidator, Purge

SITE_LISTS = "/v1/companies/5/sites/*/products*"


@pytest.mark.parametrize(
    ("path", "covered"),
    [
        ("/v1/companies/5/sites/7/products.json", True),
        ("/v1/companies/5/sites/7/products", True),
        ("/v1/companies/5/sites/7/products/onsale.json", True),
        ("/v1/companies/5/sites/7/8/products.json", False),  # one segment for a mid '*'
        ("/v1/companies/5/sites/products.json", False),
        ("/v1/companies/6/sites/7/products.json", False),
        ("/v1/companies/5/products/100.json", True),  # the object itself
        ("/v1/companies/5/products/101.json", False),
    ],
)
def test_an_object_and_its_familys_lists_mid_path_patterns_included(
    path: str, covered: bool
) -> None:
    change = Invalidation(
        "main",
        frozenset({"/v1/companies/5/products/100"}),
        frozenset(),
        frozenset({SITE_LISTS}),
    )
    assert change.covers("main", path) is covered
    assert not change.covers("other", "/v1/companies/5/products/100.json")


def test_a_prefix_everything_of_an_account_and_everything() -> None:
    assert Purge("/v1/companies/5/").covers("any", "/v1/companies/5/x")
    assert not Purge("/v1/companies/5/").covers("any", "/v1/companies/6/x")
    assert Purge(account="main").covers("main", "/v1/anything")
    assert not Purge(account="main").covers("other", "/v1/anything")
    assert Purge().everything and not Purge(account="main").everything


class Part:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    async def apply(self, change: Change) -> int:
        self.log.append(f"local {change.account}")
        return 3

    async def drop(
        self,
        account: str | None,
        covers: Callable[[str, str], bool],
        resend: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.log.append(f"shared {account} {covers('main', '/v1/x')}")
        assert resend is not None
        await resend()

    async def catch_up(self) -> None:
        self.log.append("catch_up")

    async def publish(self, change: Change) -> None:
        self.log.append(f"broadcast {change.account}")


async def test_apply_runs_local_then_shared_then_broadcast() -> None:
    log: list[str] = []
    part = Part("x", log)
    invalidator = Invalidator(part, part, part)
    assert await invalidator.apply(Purge("/v1/", "main")) == 3
    # The shared tier's resend (after Redis was away) is the same broadcast.
    assert log == ["local main", "shared main True", "broadcast main", "broadcast main"]
    log.clear()
    await invalidator.received(Purge())
    assert log == ["local None"]
    log.clear()
    await invalidator.gap("test")
    assert log == ["local None", "catch_up"]
