"""The lock-free request metrics expose exactly what prometheus-client's own would."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from proxy.metrics import BUCKETS, LoopCounter, LoopHistogram

VALUES = (0.0, 0.001, 0.0011, 0.003, 0.25, 0.26, 1, 29.9, 30, 31, 1e6)


def exposition(registry: CollectorRegistry) -> list[str]:
    text = generate_latest(registry).decode()
    return [line for line in text.splitlines() if "_created" not in line]


def test_the_histogram_exposes_what_prometheus_clients_does() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    a = LoopHistogram("x_seconds", "Help.", ["route", "cache"], BUCKETS, ours)
    b = Histogram("x_seconds", "Help.", ["route", "cache"], buckets=BUCKETS, registry=theirs)
    for i, value in enumerate(VALUES):
        labels = ("/v1/a", "HIT") if i % 3 else ("/v1/b", "MISS")
        a.labels(*labels).observe(value)
        b.labels(*labels).observe(value)
    assert exposition(ours) == exposition(theirs)
    assert (
        ours.get_sample_value("x_seconds_bucket", {"route": "/v1/a", "cache": "HIT", "le": "0.001"})
        == 1
    )
    assert ours.get_sample_value(
        "x_seconds_sum", {"route": "/v1/b", "cache": "MISS"}
    ) == pytest.approx(0.0 + 0.003 + 1 + 31)


def test_the_counter_exposes_what_prometheus_clients_does() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    a = LoopCounter("y", "Help.", ["method", "status_class"], ours)
    b = Counter("y", "Help.", ["method", "status_class"], registry=theirs)
    for method, status, amount in (("GET", 200, 1), ("GET", 200, 2.5), ("PUT", 500, 1)):
        a.labels(method, f"{status // 100}xx").inc(amount)
        b.labels(method, f"{status // 100}xx").inc(amount)
    assert exposition(ours) == exposition(theirs)
    assert ours.get_sample_value("y_total", {"method": "GET", "status_class": "2xx"}) == 3.5
    created = ours.get_sample_value("y_created", {"method": "PUT", "status_class": "5xx"})
    assert created is not None and created > 1_600_000_000


def test_families_without_children_are_still_described() -> None:
    registry = CollectorRegistry()
    LoopCounter("c", "Help.", ["a"], registry)
    LoopHistogram("h_seconds", "Help.", ["a"], BUCKETS, registry)
    assert {(m.name, m.type) for m in registry.collect()} == {
        ("c", "counter"),
        ("h_seconds", "histogram"),
    }
    with pytest.raises(ValueError, match=r"already|Duplicated"):
        LoopCounter("c", "Help.", ["a"], registry)  # one name, one metric, as ever


def test_labels_must_match_the_label_names() -> None:
    counter = LoopCounter("c", "Help.", ["a", "b"], CollectorRegistry())
    with pytest.raises(ValueError, match="labels"):
        counter.labels("only-one")
