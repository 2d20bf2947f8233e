"""The budget's queue discipline (pure): weighted fair queuing between classes, round robin
over callers within one, max_share; tables of classes x waiting x weights -> order, and
properties that no class with a weight is starved."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.pipeline.queue import (
    CLASSES,
    OWED_TURNS,
    ClassQueue,
    Grant,
    QueueState,
    activated,
    decide,
    lowered,
    order,
    owed,
    served,
)

W = {"interactive": 6.0, "standard": 3.0, "batch": 1.0}


def state_of(
    waiting: dict[str, list[tuple[str, int]]],
    weights: dict[str, float] = W,
    max_share: dict[str, float] | None = None,
    recent: tuple[tuple[float, str, str], ...] = (),
) -> QueueState:
    classes = {k: ClassQueue(weights[k], 0.0, tuple(waiting.get(k, []))) for k in CLASSES}
    return QueueState(classes, 0.0, recent, 60.0, max_share or {})


def letters(grants: list[Grant]) -> str:
    """One letter per grant: I, S, B by class."""
    return "".join(g.klass[0].upper() for g in grants)


@pytest.mark.parametrize(
    ("waiting", "weights", "expected"),
    [
        # All three compete: 6 : 3 : 1 in every ten tokens.
        ({"interactive": 20, "standard": 20, "batch": 20}, W, "IISIISIISB"),
        # A lone class gets every token, whatever its weight.
        ({"batch": 5}, W, "BBBBB"),
        ({"standard": 3}, W, "SSS"),
        # An idle class's share goes to the others, still by their weights.
        ({"standard": 20, "batch": 20}, W, "SSSBSSSB"),
        ({"interactive": 20, "batch": 20}, W, "IIIIIIBIIIIIIB"),
        # Equal weights alternate (ties go to the higher class).
        ({"interactive": 3, "batch": 3}, {**W, "batch": 6.0}, "IBIBIB"),
        # Weight 0: only when no class with a weight waits.
        ({"standard": 2, "batch": 3}, {**W, "batch": 0.0}, "SSBBB"),
        # Few waiting: served as they are, the class that runs dry drops out.
        ({"interactive": 1, "standard": 1, "batch": 1}, W, "ISB"),
        ({"interactive": 2, "batch": 8}, W, "IIBBBBBBBB"),
    ],
)
def test_order_between_classes(
    waiting: dict[str, int], weights: dict[str, float], expected: str
) -> None:
    state = state_of({k: [("c", n)] for k, n in waiting.items()}, weights)
    assert letters(order(state, 0.0, len(expected))) == expected


@pytest.mark.parametrize(
    ("waiting", "starts", "weights", "expected"),
    [
        # Batch held back by the headroom while interactive went ahead: owed a turn only once
        # interactive's next turn is more than four batch turns (4 / 1) past batch's.
        ({"interactive": 1, "batch": 1}, {}, W, False),
        ({"interactive": 1, "batch": 1}, {"interactive": 4.0}, W, False),
        ({"interactive": 1, "batch": 1}, {"interactive": 4.9}, W, True),
        ({"interactive": 1, "standard": 1, "batch": 1}, {"interactive": 4.9}, W, False),
        ({"interactive": 1, "standard": 1, "batch": 1}, {"interactive": 5, "standard": 5}, W, True),
        # Alone it is owed nothing: the headroom holds (a lone batch job keeps it for whoever
        # comes); with only a class of weight 0 beside it, always (that class waits for it);
        # with no weight itself, never.
        ({"batch": 3}, {"interactive": 5.0}, W, False),
        ({"standard": 1, "batch": 1}, {}, {**W, "standard": 0.0}, True),
        ({"interactive": 1, "batch": 1}, {"interactive": 9.0}, {**W, "batch": 0.0}, False),
        # With equal weights a turn is a sixth: owed sooner.
        ({"interactive": 1, "batch": 1}, {"interactive": 0.7}, {**W, "batch": 6.0}, True),
    ],
)
def test_a_held_back_class_is_owed_a_turn(
    waiting: dict[str, int], starts: dict[str, float], weights: dict[str, float], expected: bool
) -> None:
    state = state_of({k: [("c", n)] for k, n in waiting.items()}, weights)
    classes = {
        k: ClassQueue(q.weight, starts.get(k, 0.0), q.callers) for k, q in state.classes.items()
    }
    assert owed(QueueState(classes), "batch") is expected


def test_round_robin_over_callers_within_a_class() -> None:
    state = state_of({"standard": [("a", 3), ("b", 1), ("c", 2)]})
    assert [g.caller for g in order(state, 0.0)] == ["a", "b", "c", "a", "c", "a"]


def test_classes_and_callers_together() -> None:
    state = state_of(
        {"interactive": [("till1", 1), ("till2", 1)], "batch": [("sync", 3), ("export", 3)]}
    )
    assert [(g.klass[0], g.caller) for g in order(state, 0.0)] == [
        ("i", "till1"),
        ("i", "till2"),
        ("b", "sync"),
        ("b", "export"),
        ("b", "sync"),
        ("b", "export"),
        ("b", "sync"),
        ("b", "export"),
    ]


def test_an_idle_class_saves_no_credit() -> None:
    """Batch alone for a long time, then interactive joins: it is served next and then gets
    its weight's share, not every token until it has 'caught up' with batch."""
    state = state_of({"batch": [("sync", 100)]})
    for grant in order(state, 0.0, 50):
        state = served(state, grant, 0.0)
    state = activated(state, "interactive")
    classes = dict(state.classes)
    classes["interactive"] = ClassQueue(6.0, classes["interactive"].start, (("till", 20),))
    state = QueueState(classes, state.vtime)
    assert letters(order(state, 0.0, 14)) == "IIIIIIBIIIIIIB"


def test_max_share_yields_to_callers_under_their_share() -> None:
    # "big" had the class's last ten tokens alone; "small" now waits too.
    recent = tuple((float(t), "standard", "big") for t in range(10))
    waiting = {"standard": [("big", 10), ("small", 5)]}
    capped = state_of(waiting, max_share={"big": 0.5}, recent=recent)
    assert [g.caller for g in order(capped, 20.0, 6)] == ["small"] * 5 + ["big"]
    # Without the cap: round robin.
    plain = state_of(waiting, recent=recent)
    assert [g.caller for g in order(plain, 20.0, 4)] == ["big", "small", "big", "small"]
    # Grants older than the window do not count.
    assert decide(capped, 100.0) == Grant("standard", "big")


def test_a_capped_caller_alone_is_still_served() -> None:
    state = state_of({"batch": [("sync", 3)]}, max_share={"sync": 0.1})
    assert letters(order(state, 0.0)) == "BBB"


def test_blocked_classes_are_passed_over() -> None:
    state = state_of({"interactive": [("a", 1)], "batch": [("b", 1)]}, {**W, "batch": 100.0})
    assert decide(state, 0.0) == Grant("batch", "b")
    assert decide(state, 0.0, frozenset({"batch"})) == Grant("interactive", "a")
    assert decide(state_of({"batch": [("b", 1)]}), 0.0, frozenset({"batch"})) is None


@pytest.mark.parametrize(
    ("own", "asked", "result"),
    [
        ("interactive", "batch", "batch"),
        ("standard", "batch", "batch"),
        ("batch", "interactive", "batch"),  # never raised
        ("standard", "interactive", "standard"),
        ("interactive", None, "interactive"),
    ],
)
def test_a_request_can_only_lower_its_class(own: str, asked: str | None, result: str) -> None:
    assert lowered(own, asked) == result


weights_st = st.fixed_dictionaries({k: st.integers(0, 12).map(float) for k in CLASSES}).filter(
    lambda w: any(v > 0 for v in w.values())
)


@pytest.mark.no_cover  # generated cases: coverage's tracing would triple their time
@settings(max_examples=200, deadline=None)
@given(weights=weights_st, n=st.integers(1, 120))
def test_backlogged_classes_get_their_weighted_share(weights: dict[str, float], n: int) -> None:
    """Every class always waiting: after n grants each class with a weight has at least its
    share (rounded down) less one, so none is starved."""
    state = state_of({k: [("c", 10_000)] for k in CLASSES}, weights)
    got = Counter(g.klass for g in order(state, 0.0, n))
    total = sum(weights.values())
    for klass, weight in weights.items():
        if weight > 0:
            assert got[klass] >= int(n * weight / total) - 1, (weights, n, got)


ops_st = st.lists(st.one_of(st.sampled_from(CLASSES), st.just("grant")), min_size=1, max_size=300)


def one_more_waiting(state: QueueState, klass: str) -> QueueState:
    """``klass`` with one more request waiting (activated first, as a join does)."""
    state = activated(state, klass)
    queue = state.classes[klass]
    waiting = ClassQueue(queue.weight, queue.start, (("c", queue.waiting + 1),))
    return QueueState({**state.classes, klass: waiting}, state.vtime)


@pytest.mark.no_cover  # generated cases: coverage's tracing would triple their time
@settings(max_examples=200, deadline=None)
@given(weights=weights_st, ops=ops_st)
def test_a_waiting_class_with_a_weight_is_served_within_a_bound(
    weights: dict[str, float], ops: list[str]
) -> None:
    """Requests join at random between grants: a class with weight w > 0 that waits is served
    within sum over the other classes of (their weight / w + 1) grants, plus one."""
    state = state_of({}, weights)
    since: dict[str, int] = {}  # grants since each waiting class was last served or joined
    for op in ops + ["grant"] * 600:
        if op != "grant":
            state = one_more_waiting(state, op)
            since.setdefault(op, 0)
            continue
        grant = decide(state, 0.0)
        if grant is None:
            continue
        state = served(state, grant, 0.0)
        since.pop(grant.klass)
        if state.classes[grant.klass].waiting:
            since[grant.klass] = 0
        for klass in since:
            if klass == grant.klass:
                continue
            since[klass] += 1
            weight = weights[klass]
            if weight > 0:
                bound = sum(w / weight + 1 for k, w in weights.items() if k != klass) + 1
                assert since[klass] <= bound, (weights, klass, since)
    assert not any(q.waiting for q in state.classes.values())


@pytest.mark.no_cover  # generated cases: coverage's tracing would triple their time
@settings(max_examples=200, deadline=None)
@given(weights=weights_st, ops=ops_st, held=st.sampled_from(CLASSES))
def test_a_class_held_back_by_headroom_is_owed_a_turn_within_a_bound(
    weights: dict[str, float], ops: list[str], held: str
) -> None:
    """One class is held back (``budget.headroom``: its token goes to any other class that
    waits) unless :func:`owed` says the others went OWED_TURNS of its turns past it: while it
    waits with weight w > 0, it is served within sum over the other classes of ((1 + lag) x
    their weight / w + 1) grants, plus one (the plain bound with its lag of turns on top)."""
    state = state_of({}, weights)
    since: int | None = None  # grants since the held class was last served or joined
    for op in ops + ["grant"] * 600:
        if op != "grant":
            state = one_more_waiting(state, op)
            if op == held and since is None:
                since = 0
            continue
        blocked = frozenset() if owed(state, held) else frozenset({held})
        grant = decide(state, 0.0, blocked) or decide(state, 0.0)  # alone, it goes
        if grant is None:
            continue
        state = served(state, grant, 0.0)
        if grant.klass == held:
            since = 0 if state.classes[held].waiting else None
        elif since is not None:
            since += 1
            weight = weights[held]
            if weight > 0:
                lag = 1 + OWED_TURNS
                bound = sum(lag * w / weight + 1 for k, w in weights.items() if k != held) + 1
                assert since <= bound, (weights, held, since)
