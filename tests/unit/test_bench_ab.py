"""bench.ab's order: no tree and loop always measured first or last in a scenario."""

from __future__ import annotations

from bench.ab import turned

NAMES = ["old, asyncio", "old, uvloop", "new, asyncio", "new, uvloop"]


def test_each_round_measures_every_server_once() -> None:
    for round_no in range(9):
        assert sorted(turned(NAMES, round_no)) == sorted(NAMES)


def test_over_as_many_rounds_as_servers_each_takes_every_place_once() -> None:
    places: dict[str, set[int]] = {name: set() for name in NAMES}
    for round_no in range(len(NAMES)):
        for place, name in enumerate(turned(NAMES, round_no)):
            places[name].add(place)
    assert all(p == set(range(len(NAMES))) for p in places.values())
