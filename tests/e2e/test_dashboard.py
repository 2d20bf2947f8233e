"""config/grafana: the dashboard's PromQL parses and names only what the proxy exports, and
its provisioning files point at what docker-compose.yml mounts."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.promql import (
    AGGREGATIONS,
    ROOT,
    known_metrics,
    load_yaml,
    promtool_parse_errors,
    recorded_metrics,
    unknown_names,
    usage,
)

GRAFANA = ROOT / "config" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "kounta-proxy.json"
COMPOSE = ROOT / "docker-compose.yml"
# Grafana's own variables, replaced by a value of the right kind before parsing.
BUILTIN_VARIABLES = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}
VARIABLE = re.compile(r"\$\{?(\w+)\}?")
LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\)$")


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def panels(items: list[dict[str, Any]] | None = None) -> Iterator[dict[str, Any]]:
    for panel in dashboard()["panels"] if items is None else items:
        yield panel
        yield from panels(panel.get("panels", []))  # a collapsed row keeps its panels inside


def targets() -> Iterator[tuple[str, dict[str, Any]]]:
    for panel in panels():
        for target in panel.get("targets", []):
            yield f"{panel['title']} / {target['refId']}", target


def variables() -> list[dict[str, Any]]:
    return list(dashboard()["templating"]["list"])


def promql(expr: str) -> str:
    """The expression as Grafana sends it: its variables replaced ("All" is .* here)."""
    return VARIABLE.sub(lambda m: BUILTIN_VARIABLES.get(m[1], ".*"), expr)


def expressions() -> dict[str, str]:
    exprs = {where: promql(t["expr"]) for where, t in targets()}
    for var in variables():
        if var["type"] == "query":
            found = LABEL_VALUES.match(var["query"]["query"])
            assert found, f"variable {var['name']}: not label_values(selector, label)"
            exprs[f"variable {var['name']}"] = promql(found["selector"])
    return exprs


def output_labels(expr: str, known: dict[str, frozenset[str]]) -> set[str]:
    """Labels a result can carry: the grouping of an aggregation, else the selectors' own."""
    used = usage(expr)
    names = {name for name, _ in used.selectors}
    if any(word in AGGREGATIONS for word in re.findall(r"\w+(?=\s*(?:by|without)?\s*\()", expr)):
        return set(used.grouping)
    return set().union(*(known.get(name, frozenset()) for name in names))


def test_the_dashboard_has_queries() -> None:
    assert len(list(targets())) >= 30
    assert {v["name"] for v in variables()} >= {"datasource", "job", "instance", "account", "route"}


def test_every_expression_parses(tmp_path: Path) -> None:
    assert promtool_parse_errors(expressions(), tmp_path) == ""


def test_every_expression_names_only_exported_metrics_and_labels() -> None:
    known = known_metrics(recorded_metrics())
    problems = {where: unknown_names(expr, known) for where, expr in expressions().items()}
    assert {where: p for where, p in problems.items() if p} == {}
    for var in variables():
        if var["type"] == "query":
            found = LABEL_VALUES.match(var["query"]["query"])
            assert found
            (name, _), *_ = usage(promql(found["selector"])).selectors
            assert found["label"] in known[name], f"variable {var['name']}"


def test_legends_name_labels_the_query_keeps() -> None:
    known = known_metrics(recorded_metrics())
    for where, target in targets():
        wanted = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
        missing = wanted - output_labels(promql(target["expr"]), known)
        assert not missing, f"{where}: legend names {missing}, which the query drops"


def test_variables_are_matched_as_regular_expressions() -> None:
    # Multi-value and "All" (.*) variables only work in =~ matchers.
    for where, target in targets():
        for found in VARIABLE.finditer(target["expr"]):
            if found[1] not in BUILTIN_VARIABLES:
                before = target["expr"][: found.start()]
                assert before.endswith('=~"'), f"{where}: ${found[1]} outside a =~ matcher"


def test_the_dashboard_covers_what_operators_watch() -> None:
    used = {name for expr in expressions().values() for name, _ in usage(expr).selectors}
    needed = {
        "kounta_proxy_requests_total",  # RED per route
        "kounta_proxy_request_duration_seconds_bucket",
        "kounta_proxy_caller_requests_total",  # per account
        "kounta_proxy_cache_lookups_total",
        "kounta_proxy_budget_tokens",
        "kounta_proxy_budget_queue_length",
        "kounta_proxy_budget_wait_seconds_bucket",
        "kounta_proxy_budget_wait_seconds_count",  # upstream requests per minute
        "kounta_proxy_budget_limit_per_minute",  # against the limit
        "kounta_proxy_token_expiry_timestamp_seconds",
        "kounta_proxy_breaker_state",
        "kounta_proxy_shared_backend_up",
        "kounta_proxy_shared_degraded",
        "kounta_proxy_shared_call_duration_seconds_bucket",  # Redis latency
        "kounta_proxy_shared_calls_total",  # Redis errors
        "kounta_proxy_workers_up",
        "kounta_proxy_connections_open",
        "kounta_proxy_connections_dropped_total",
        "kounta_proxy_token_failures_total",
        "kounta_proxy_config_reloads_total",
    }
    assert needed - used == set()


def test_panels_are_laid_out_without_overlap_and_use_the_variable_datasource() -> None:
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    taken: set[tuple[int, int]] = set()
    for panel in panels():
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(box["x"], box["x"] + box["w"])
            for y in range(box["y"], box["y"] + box["h"])
        }
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]


def test_provisioning_matches_the_compose_stack() -> None:
    compose = load_yaml(COMPOSE)
    grafana = compose["services"]["grafana"]
    mounts = {}
    for volume in grafana["volumes"]:
        source, target, *_ = volume.split(":")
        mounts[target] = source
    assert mounts["/etc/grafana/provisioning"] == "./config/grafana/provisioning"
    provider = load_yaml(GRAFANA / "provisioning" / "dashboards" / "kounta-proxy.yml")
    path = provider["providers"][0]["options"]["path"]
    assert mounts[path] == "./config/grafana/dashboards"
    assert (ROOT / mounts[path] / DASHBOARD.name).is_file()
    # The data source: the compose Prometheus, with the uid the dashboard defaults to.
    source = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    (datasource,) = source["datasources"]
    default = next(v for v in variables() if v["name"] == "datasource")
    assert default["current"]["value"] == datasource["uid"]
    url = urlsplit(datasource["url"])
    assert url.hostname in compose["services"]
    listen = compose["services"][url.hostname]["command"]
    assert f"--web.listen-address=0.0.0.0:{url.port}" in listen
    assert grafana["ports"] == ["127.0.0.1:3000:3000"]
