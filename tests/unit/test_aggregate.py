"""The merge of the workers' expositions (``serve --workers N``): what adds up is summed,
what every worker reports alike is not multiplied."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.ops.aggregate import combiner, merge

WORKER0 = """\
# HELP kounta_proxy_requests_total Requests answered.
# TYPE kounta_proxy_requests_total counter
kounta_proxy_requests_total{status="200",route="product"} 7.0
kounta_proxy_requests_total{status="404",route="product"} 1.0
# HELP kounta_proxy_requests_created Requests answered.
# TYPE kounta_proxy_requests_created gauge
kounta_proxy_requests_created{status="200",route="product"} 1700000100.0
# HELP kounta_proxy_request_duration_seconds Time to answer.
# TYPE kounta_proxy_request_duration_seconds histogram
kounta_proxy_request_duration_seconds_bucket{le="0.1"} 3.0
kounta_proxy_request_duration_seconds_bucket{le="+Inf"} 8.0
kounta_proxy_request_duration_seconds_sum 1.5
kounta_proxy_request_duration_seconds_count 8.0
# HELP kounta_proxy_build_info The proxy's version.
# TYPE kounta_proxy_build_info gauge
kounta_proxy_build_info{version="1.2.3"} 1.0
# HELP kounta_proxy_budget_limit_per_minute The account's limit.
# TYPE kounta_proxy_budget_limit_per_minute gauge
kounta_proxy_budget_limit_per_minute{account="main"} 180.0
# HELP kounta_proxy_requests_in_flight Requests being answered.
# TYPE kounta_proxy_requests_in_flight gauge
kounta_proxy_requests_in_flight 2.0
# HELP process_start_time_seconds Start time of the process.
# TYPE process_start_time_seconds gauge
process_start_time_seconds 1700000100.0
# HELP process_max_fds Maximum number of open file descriptors.
# TYPE process_max_fds gauge
process_max_fds 1024.0
"""

WORKER1 = """\
# HELP kounta_proxy_requests_total Requests answered.
# TYPE kounta_proxy_requests_total counter
kounta_proxy_requests_total{route="product",status="200"} 5.0
kounta_proxy_requests_total{status="502",route="product"} 2.0
# HELP kounta_proxy_requests_created Requests answered.
# TYPE kounta_proxy_requests_created gauge
kounta_proxy_requests_created{status="200",route="product"} 1700000050.0
# HELP kounta_proxy_request_duration_seconds Time to answer.
# TYPE kounta_proxy_request_duration_seconds histogram
kounta_proxy_request_duration_seconds_bucket{le="0.1"} 4.0
kounta_proxy_request_duration_seconds_bucket{le="+Inf"} 4.0
kounta_proxy_request_duration_seconds_sum 0.25
kounta_proxy_request_duration_seconds_count 4.0
# HELP kounta_proxy_build_info The proxy's version.
# TYPE kounta_proxy_build_info gauge
kounta_proxy_build_info{version="1.2.3"} 1.0
# HELP kounta_proxy_budget_limit_per_minute The account's limit.
# TYPE kounta_proxy_budget_limit_per_minute gauge
kounta_proxy_budget_limit_per_minute{account="main"} 180.0
# HELP kounta_proxy_requests_in_flight Requests being answered.
# TYPE kounta_proxy_requests_in_flight gauge
kounta_proxy_requests_in_flight 3.0
# HELP process_start_time_seconds Start time of the process.
# TYPE process_start_time_seconds gauge
process_start_time_seconds 1700000000.0
# HELP process_max_fds Maximum number of open file descriptors.
# TYPE process_max_fds gauge
process_max_fds 1024.0
"""


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return found[(name, frozenset(labels.items()))]


def test_counters_and_histograms_are_summed_by_name_and_labels() -> None:
    found = samples(merge([WORKER0, WORKER1]).decode())
    # Label order differs between the workers; the series is still one.
    assert value(found, "kounta_proxy_requests_total", status="200", route="product") == 12
    assert value(found, "kounta_proxy_requests_total", status="404", route="product") == 1
    assert value(found, "kounta_proxy_requests_total", status="502", route="product") == 2
    hist = "kounta_proxy_request_duration_seconds"
    assert value(found, f"{hist}_bucket", le="0.1") == 7
    assert value(found, f"{hist}_bucket", le="+Inf") == 12
    assert value(found, f"{hist}_count") == 12
    assert value(found, f"{hist}_sum") == pytest.approx(1.75)
    assert value(found, "kounta_proxy_requests_in_flight") == 5


def test_configuration_gauges_are_not_multiplied_and_starts_are_the_earliest() -> None:
    text = merge([WORKER0, WORKER1]).decode()
    found = samples(text)
    assert text.count("kounta_proxy_build_info{") == 1
    assert value(found, "kounta_proxy_build_info", version="1.2.3") == 1
    assert value(found, "kounta_proxy_budget_limit_per_minute", account="main") == 180
    assert value(found, "process_max_fds") == 1024
    assert value(found, "process_start_time_seconds") == 1700000000
    created = value(found, "kounta_proxy_requests_created", status="200", route="product")
    assert created == 1700000050


def test_help_and_type_lines_are_kept_once() -> None:
    text = merge([WORKER0, WORKER1]).decode()
    assert text.count("# HELP kounta_proxy_requests_total Requests answered.\n") == 1
    assert text.count("# TYPE kounta_proxy_requests_total counter\n") == 1
    assert text.count("# TYPE kounta_proxy_request_duration_seconds histogram\n") == 1


def test_one_worker_is_passed_through_and_none_is_empty() -> None:
    assert samples(merge([WORKER0]).decode()) == samples(WORKER0)
    assert merge([]) == b""


def test_a_malformed_exposition_is_refused() -> None:
    with pytest.raises(ValueError):
        merge([WORKER0, "kounta_proxy_requests_total{status=200 oops\n"])


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("kounta_proxy_token_expiry_timestamp_seconds", 2.0),
        ("kounta_proxy_shared_backend_up", 2.0),
        ("python_info", 2.0),
        ("process_resident_memory_bytes", 3.0),
        ("process_cpu_seconds_total", 3.0),
        ("kounta_proxy_cache_lookups_total", 3.0),
        ("kounta_proxy_config_loaded_timestamp_seconds", 2.0),  # the latest, not a sum
        ("kounta_proxy_config_reloads_total", 3.0),  # each worker reloads on its own
    ],
)
def test_combiner_by_name(name: str, expected: float) -> None:
    assert combiner(name)(1.0, 2.0) == expected
