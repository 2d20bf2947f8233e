"""The lock-free request metrics expose exactly what prometheus-client's own would."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from proxy.cache.metrics import CacheMetrics
from proxy.collectors import LoopCounter, LoopGauge, LoopHistogram
from proxy.edge.metrics import PackageMetrics
from proxy.metrics import BUCKETS, Metrics, Registry
from proxy.pipeline.metrics import PipelineMetrics

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
    # No _created series: nothing reads them (proxy.metrics.Registry drops prometheus-client's).
    assert ours.get_sample_value("y_created", {"method": "PUT", "status_class": "5xx"}) is None


def test_the_gauge_exposes_what_prometheus_clients_does() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    a = LoopGauge("z_in_flight", "Help.", ours)
    b = Gauge("z_in_flight", "Help.", registry=theirs)
    assert exposition(ours) == exposition(theirs)  # 0 before any change
    for change in (1, 1, -1, 2.5, -3.5, 1):
        for gauge in (a, b):
            gauge.inc(change) if change > 0 else gauge.dec(-change)
    assert exposition(ours) == exposition(theirs)
    assert ours.get_sample_value("z_in_flight") == 1
    with pytest.raises(ValueError, match=r"already|Duplicated"):
        LoopGauge("z_in_flight", "Help.", ours)


def test_the_proxy_registry_exposes_no_created_series_but_process_metrics() -> None:
    registry = Registry()
    metrics, pipeline = Metrics(registry), PipelineMetrics(registry)
    pipeline.upstream_requests.labels("GET", "/v1/companies/me", 200, "main").inc()
    pipeline.budget_wait.labels("main", "standard").observe(0.1)
    metrics.request_done("GET", "/v1/companies/me", 404, "MISS", 0.01, "app", "main")
    text = generate_latest(registry).decode()
    assert "_created" not in text
    assert "kounta_proxy_upstream_requests_total{" in text
    for name in ("process_resident_memory_bytes", "process_open_fds", "process_cpu_seconds_total"):
        assert registry.get_sample_value(name) is not None, name
    labels = {"caller": "app", "account": "main", "status_class": "4xx"}
    assert registry.get_sample_value("kounta_proxy_caller_requests_total", labels) == 1
    # A plain registry keeps prometheus-client's own behaviour (the switch is per registry).
    plain = CollectorRegistry()
    PipelineMetrics(plain).budget_rejections.labels("main", "deadline").inc()
    assert "kounta_proxy_budget_rejections_created" in generate_latest(plain).decode()


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


def test_counters_start_with_every_known_label_set_at_zero() -> None:
    """A counter with no series loses its first event to increase() and leaves
    a dashboard panel empty; every label set known from the configuration starts at 0."""
    from proxy.edge.services import describe
    from proxy.settings import AccountSettings, Secret, Settings

    oauth = AccountSettings(
        mode="oauth", client_id="c", client_secret=Secret("s"), refresh_token=Secret("r")
    )
    static = AccountSettings(mode="static", token=Secret("t"))
    settings = Settings(accounts={"shop": oauth, "main": static})
    registry = Registry()
    describe(settings, PackageMetrics.on(registry))
    sample = registry.get_sample_value
    for op in ("read", "write", "delete", "full"):
        assert sample("kounta_proxy_cache_store_errors_total", {"op": op}) == 0, op
    for result in ("ok", "unavailable", "rejected", "adopted"):
        assert (
            sample("kounta_proxy_token_requests_total", {"account": "shop", "result": result}) == 0
        )
    assert sample("kounta_proxy_token_request_duration_seconds_count", {"account": "shop"}) == 0
    for outcome in ("resent", "not_replayable", "refresh_floor"):
        labels = {"account": "shop", "outcome": outcome}
        assert sample("kounta_proxy_auth_resends_total", labels) == 0, labels
    # A static account requests no tokens and never resends: no series for it.
    assert sample("kounta_proxy_token_requests_total", {"account": "main", "result": "ok"}) is None
    assert (
        sample("kounta_proxy_auth_resends_total", {"account": "main", "outcome": "resent"}) is None
    )


def test_every_revalidations_upstream_and_budget_metrics_are_lock_free_and_expose_the_same() -> (
    None
):
    """What each upstream exchange updates (its duration and count, the budget's wait and
    served count) takes no lock (issue 21: a revalidation's flight), exposed as before."""
    ours = Registry()
    pipeline = PipelineMetrics(ours)
    each = {
        "upstream_duration": ("route",),
        "upstream_requests": ("method", "route", "status", "account"),
        "budget_wait": ("account", "class"),
        "budget_served": ("account", "class"),
    }
    theirs = Registry()
    reference: dict[str, Counter | Histogram] = {}
    for name, labels in each.items():
        family = getattr(pipeline, name)
        assert isinstance(family, LoopCounter | LoopHistogram), name
        assert tuple(family.labelnames) == labels
        if isinstance(family, LoopHistogram):
            reference[name] = Histogram(
                family.name, family.documentation, labels, buckets=BUCKETS, registry=theirs
            )
            assert family.bounds == tuple(float(b) for b in BUCKETS)
        else:
            reference[name] = Counter(family.name, family.documentation, labels, registry=theirs)
    for value in VALUES:
        for ours_or_theirs in (pipeline.__dict__, reference):
            ours_or_theirs["upstream_duration"].labels("/v1/companies/{id}").observe(value)
            ours_or_theirs["upstream_requests"].labels("GET", "/v1/x", 304, "main").inc()
            ours_or_theirs["budget_wait"].labels("main", "standard").observe(value)
            ours_or_theirs["budget_served"].labels("main", "standard").inc()
    names = tuple(getattr(pipeline, name).name for name in each)
    mine = sorted(line for line in exposition(ours) if line.startswith(names))
    assert mine == sorted(line for line in exposition(theirs) if line.startswith(names))
    assert len(mine) == 2 * (len(BUCKETS) + 3) + 2
    labels = {"method": "GET", "route": "/v1/x", "status": "304", "account": "main"}
    assert ours.get_sample_value("kounta_proxy_upstream_requests_total", labels) == len(VALUES)


def test_a_flights_store_count_is_lock_free_and_exposes_the_same() -> None:
    """Every revalidation's 304 counts one store (``cache_stores``, "stored"): on the
    loop-owned counter, exposed as prometheus-client's own would (issue 21: the flight)."""
    ours = Registry()
    cache = CacheMetrics(ours)
    assert isinstance(cache.cache_stores, LoopCounter)
    theirs = Registry()
    reference = Counter(
        cache.cache_stores.name, cache.cache_stores.documentation, ["result"], registry=theirs
    )
    for result in ("stored", "stored", "invalidated", "stored", "too_large"):
        cache.cache_stores.labels(result).inc()
        reference.labels(result).inc()
    name = "kounta_proxy_cache_stores"
    mine = sorted(line for line in exposition(ours) if line.startswith(name))
    assert mine == sorted(line for line in exposition(theirs) if line.startswith(name))
    assert ours.get_sample_value(f"{name}_total", {"result": "stored"}) == 3
