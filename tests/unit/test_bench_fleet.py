"""bench.fleet's own arithmetic (the bench prints numbers; nothing here asserts a rate)."""

from __future__ import annotations

import math

from bench.fleet import arguments, bucket_quantile, classes, classes_settings


def test_bucket_quantile_interpolates_as_prometheus_does() -> None:
    # 10 observations: 4 at or under 0.1 s, 9 at or under 0.5 s, 1 above 1 s.
    buckets = [(0.1, 4.0), (0.5, 9.0), (1.0, 9.0), (math.inf, 10.0)]
    assert bucket_quantile(buckets, 0.2) == 0.05  # rank 2 of 4 in (0, 0.1]
    assert bucket_quantile(buckets, 0.5) == 0.1 + 0.4 * (1 / 5)
    assert bucket_quantile(buckets, 0.99) == 1.0  # in +Inf: the highest finite bound
    assert bucket_quantile([], 0.5) is None
    assert bucket_quantile([(0.1, 0.0), (math.inf, 0.0)], 0.5) is None


def test_the_classes_workload_has_no_cache_rule_and_classed_callers(tmp_path: object) -> None:
    args = arguments(["--batch", "2", "--interactive", "3", "--reserve", "0.2"])
    assert classes(args) and not classes(arguments([]))
    settings = classes_settings("http://127.0.0.1:1", str(tmp_path), args)
    assert settings.cache.rules == ()
    assert settings.budget.reserve == 0.2
    priorities = sorted((n, c.priority) for n, c in settings.callers.items())
    assert priorities == [
        ("batch0", "batch"),
        ("batch1", "batch"),
        ("till0", "interactive"),
        ("till1", "interactive"),
        ("till2", "interactive"),
    ]
