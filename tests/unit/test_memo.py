"""The memos out of the collector's walk (proxy.memo; docs/performance.md, "The memos out of
the collector's walk"): what they hold at their bounds is not walked by every full pass."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator

import aiohttp
import pytest
from yarl import URL

from proxy.cache.fastlook import webhook_rule
from proxy.cache.memory import HotEntries
from proxy.cache.refresh import busy_window
from proxy.cache.validation import _merged_304
from proxy.edge.known import known
from proxy.edge.rendered import Place, template
from proxy.memo import MOST_KEYS, MemoInfo, memoise
from proxy.pipeline.upstream import TARGETS, Upstream
from proxy.settings import CacheRule, UpstreamSettings
from proxy.target import Target

RULES = (
    CacheRule(path="/v1/companies/*/products*", fresh_for=3600, webhooks=True),
    CacheRule(path="/v1/companies/*/customers*", stale_while_busy=5.0),
)
ITEMS = (("Content-Type", "application/json"), ("ETag", '"a"'), ("Cache-Control", "max-age=60"))


def tracked_now() -> int:
    """The objects the cyclic collector walks, after a full pass (what it can untrack, such
    as tuples of strings, untracked)."""
    gc.collect()
    return len(gc.get_objects())


def test_the_memos_at_their_bounds_add_nothing_for_the_collector_to_walk() -> None:
    """Keys holding settings (the rules' tuple), a ``Place`` or a URL, and results holding a
    ``Target``: each a tracked tuple (and Target) per entry under ``functools.lru_cache``
    (~2 objects an entry, ~12,000 here), none now."""
    for memoised in (webhook_rule, busy_window, known, template, _merged_304):
        memoised.cache_clear()
    place = Place(URL("https://api.kounta.com"), "")
    asked(place, -1)  # what the first calls make once (the rendering's own memos, imports)
    before = tracked_now()
    for i in range(2000):
        asked(place, i)
    assert webhook_rule.cache_info().currsize == 2001
    assert known.cache_info().currsize == 2001
    assert tracked_now() - before < 200


def asked(place: Place, i: int) -> None:
    """What a fresh hit of key ``i`` and a 304's merge memoise."""
    path = f"/v1/companies/5/products/{i}.json"
    webhook_rule(path, RULES)
    busy_window(path, RULES, 1.0)
    found = known(path)
    assert found.target == Target(path, "") and not gc.is_tracked(found.target)
    assert not gc.is_tracked(found)
    items = (*ITEMS, ("Content-Length", str(i)))
    assert template(200, items, place, "http", "h", True, "HIT", "m", "", i) is not None
    _merged_304(ITEMS, (("ETag", f'"{i}"'),), f"/v1/companies/5/customers/{i}.json", RULES)


def test_a_memo_holds_its_bound_and_drops_the_least_recently_used() -> None:
    calls: list[tuple[object, ...]] = []

    def double(x: object, y: int) -> tuple[object, int]:
        calls.append((x, y))
        return (x, 2 * y)

    memo = memoise(double, 3)
    rule = RULES[0]
    assert memo(rule, 1) == (rule, 2)
    memo(rule, 2)
    memo(rule, 3)
    assert memo(rule, 1) == (rule, 2)  # a hit: now the most recently used
    memo(rule, 4)  # past the bound: (rule, 2), the least recently used, goes
    assert memo.cache_info() == MemoInfo(hits=1, misses=4, maxsize=3, currsize=3)
    memo(rule, 1)
    memo(rule, 2)
    assert calls == [(rule, 1), (rule, 2), (rule, 3), (rule, 4), (rule, 2)]
    assert memo.cache_info().currsize == 3
    memo.cache_clear()
    assert memo.cache_info() == MemoInfo(0, 0, 3, 0)


def test_a_memo_remembers_no_raise() -> None:
    calls = []

    def refuse(x: str) -> str:
        calls.append(x)
        raise ValueError(x)

    memo = memoise(refuse, 4)
    for _ in range(2):
        with pytest.raises(ValueError, match="a"):
            memo("a")
    assert calls == ["a", "a"] and memo.cache_info().currsize == 0


class Counted:
    """A key that counts how often it is hashed, equal to another of the same name; the
    hash given (default: the name's)."""

    hashed = 0

    def __init__(self, name: str, given: int | None = None) -> None:
        self.name, self.given = name, given

    def __hash__(self) -> int:
        Counted.hashed += 1
        return hash(self.name) if self.given is None else self.given

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Counted) and other.name == self.name


@pytest.mark.parametrize("arguments", [1, 2])
def test_a_memos_hit_hashes_its_arguments_once(arguments: int) -> None:
    """A hit hashed its argument tuple twice (the store's ``get``, then ``move_to_end``):
    a rendered head's key hashes every stored header each time. Once now, for a memo of one
    argument (called without a tuple) as for one of several."""

    def name(key: Counted, *more: object) -> str:
        return key.name

    def one(key: Counted) -> str:
        return key.name

    memo = memoise(one if arguments == 1 else name, 4)
    key = Counted("a")
    extra = ("place",) * (arguments - 1)
    assert memo(key, *extra) == "a"
    Counted.hashed = 0
    assert memo(key, *extra) == "a"
    assert memo(Counted("a"), *extra) == "a"  # equal, not the same object: a hit too
    assert Counted.hashed == 2 and memo.cache_info().hits == 2


@pytest.mark.parametrize("arguments", [1, 2])
def test_keys_of_one_hash_never_answer_for_each_other(arguments: int) -> None:
    """The store is keyed by the arguments' hash: a hit is one whose arguments are equal to
    the entry's, whatever shares its hash (two keys of one hash, rare with 64 bits of
    strings' hashes, share a slot: the later replaces the other)."""
    calls: list[str] = []

    def name(key: Counted, *more: object) -> str:
        calls.append(key.name)
        return key.name

    memo = memoise(name, 4) if arguments == 2 else memoise(lambda key: name(key), 4)
    extra = ("x",) * (arguments - 1)
    a, b = Counted("a", 7), Counted("b", 7)
    assert [memo(a, *extra), memo(b, *extra), memo(a, *extra), memo(a, *extra)] == list("abaa")
    assert calls[:2] == ["a", "b"] and set(calls) == {"a", "b"}


def test_a_one_argument_memo_holds_its_bound_and_untracks_what_it_keeps() -> None:
    """The memo of one argument (the entry's coding, by its stored headers' tuple): least
    recently used out past its bound, no raise remembered, nothing it keeps walked."""
    place = Place(URL("https://api.kounta.com"), "")

    def wrapped(i: int) -> tuple[Place, int]:
        if i < 0:
            raise ValueError(i)
        return (place, i)

    memo = memoise(wrapped, 3)
    keys = [(place, i) for i in range(3)]
    for key in keys:
        assert memo(key[1]) == key and not gc.is_tracked(memo(key[1]))
    memo(0)  # now the most recently used
    memo(3)  # past the bound: 1 goes
    hits = memo.cache_info().hits
    for i in (0, 2, 3):
        memo(i)
    assert memo.cache_info().hits == hits + 3
    memo(1)
    assert memo.cache_info().misses == 5
    with pytest.raises(ValueError):
        memo(-1)
    assert memo.cache_info().currsize == 3


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with aiohttp.ClientSession() as session:
        yield Upstream(UpstreamSettings(base_url="https://api.kounta.com"), session)


class _Request:
    def __init__(self, n: int) -> None:
        self.path, self.query = f"/v1/companies/5/products/{n}.json", ""
        self.path_qs = self.path


async def test_upstream_remembers_at_most_targets_urls(upstream: Upstream) -> None:
    """Each remembered URL (and its tuple) is walked by every full pass: 10,000 of them
    were ~20,000 objects."""
    for n in range(3 * TARGETS):
        url, _route = upstream._target(_Request(n))  # type: ignore[arg-type]
        assert url.path == f"/v1/companies/5/products/{n}.json"
    assert 0 < len(upstream._targets) <= TARGETS <= 1024


def test_the_per_key_memos_grow_to_the_keys_the_memory_tier_holds() -> None:
    """Fresh hits over more keys than a per-key memo held paid its miss on every answer
    (the least recently used key out each time: 0.6 of the rate over 5,000 keys); a memory
    tier of 64 MB holds ~8,000 answers of 8 KB, and as many targets are remembered."""
    HotEntries(64 * 1024**2)
    assert known.cache_info().maxsize >= 8192
    paths = [f"/v1/companies/5/customers/{i}.json" for i in range(5000)]
    for path in paths:
        known(path)
    hits = known.cache_info().hits
    for path in paths:  # the same keys again, in the same order
        known(path)
    assert known.cache_info().hits == hits + 5000
    HotEntries(10**12)
    assert template.cache_info().maxsize == MOST_KEYS == template.size
