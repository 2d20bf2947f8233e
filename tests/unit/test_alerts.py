"""config/alerts.yml: tested both ways, documented, and written against the proxy's real metrics."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

from proxy.metrics import BUCKETS
from tests.ops_tools import prometheus_tool
from tests.promql import (
    ROOT,
    known_metrics,
    load_yaml,
    promtool_parse_errors,
    recorded_metrics,
    rules,
    unknown_names,
    usage,
)

ALERTS = ROOT / "config" / "alerts.yml"
ALERT_TESTS = ROOT / "config" / "alerts.test.yml"
RUNBOOK = ROOT / "docs" / "runbook.md"
RUNBOOK_URL = "https://github.com/kounta-proxy/kounta-proxy/blob/main/docs/runbook.md#"


def alerts() -> dict[str, dict[str, object]]:
    return {r["alert"]: r for r in rules(ALERTS) if "alert" in r}


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a Markdown heading: lower case, punctuation dropped."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def runbook_anchors() -> set[str]:
    headings = re.findall(r"^#{1,6} (.+)$", RUNBOOK.read_text(), flags=re.MULTILINE)
    return {github_anchor(h) for h in headings}


def test_every_alert_has_a_case_that_fires_and_one_that_does_not() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in load_yaml(ALERT_TESTS)["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = set(alerts())
    assert names, "no alerts found"
    # A misspelt name in a test "passes" with exp_alerts: [] while testing nothing.
    assert (firing | quiet) <= names, f"tests name unknown alerts: {(firing | quiet) - names}"
    assert names - firing == set(), "alerts with no firing case"
    assert names - quiet == set(), "alerts with no case where they must not fire"


def test_every_alert_says_what_happened_and_links_its_runbook_section() -> None:
    anchors = runbook_anchors()
    for name, rule in alerts().items():
        notes = rule.get("annotations")
        assert isinstance(notes, dict), name
        assert notes.get("summary") and notes.get("description"), name
        url = str(notes.get("runbook_url", ""))
        assert url.startswith(RUNBOOK_URL), f"{name}: runbook_url {url!r}"
        anchor = url.removeprefix(RUNBOOK_URL)
        assert anchor == name.lower(), f"{name}: runbook anchor {anchor!r}"
        assert anchor in anchors, f"{name}: docs/runbook.md has no section #{anchor}"
        assert rule.get("labels", {}).get("severity") in ("critical", "warning"), name


def test_the_runbook_has_no_section_for_an_alert_that_is_gone() -> None:
    sections = {a for a in runbook_anchors() if a.startswith("kountaproxy")}
    assert sections == {name.lower() for name in alerts()}


def test_alert_expressions_parse_and_name_only_exported_metrics(tmp_path: Path) -> None:
    exprs = {r.get("alert") or r["record"]: r["expr"] for r in rules(ALERTS)}
    assert promtool_parse_errors(exprs, tmp_path) == ""
    known = known_metrics(recorded_metrics())
    problems = {name: unknown_names(expr, known) for name, expr in exprs.items()}
    assert {name: p for name, p in problems.items() if p} == {}


def test_the_check_finds_a_wrong_name_a_wrong_label_and_bad_syntax(tmp_path: Path) -> None:
    known = known_metrics()
    assert unknown_names("rate(kounta_proxy_requests_total[5m])", known) == []
    assert unknown_names("rate(kounta_proxy_request_total[5m])", known) == [
        "unknown metric kounta_proxy_request_total"
    ]
    assert unknown_names('kounta_proxy_breaker_state{acount="a"}', known) == [
        "kounta_proxy_breaker_state has no label acount"
    ]
    assert unknown_names("sum by (acount) (kounta_proxy_breaker_state)", known) == [
        "no metric here has a label acount"
    ]
    assert unknown_names("kounta_proxy_paging_pages_created", known) == [
        "unknown metric kounta_proxy_paging_pages_created"
    ]
    assert "check:expr_0" in promtool_parse_errors({"x": "sum by (job (up)"}, tmp_path)


def test_the_tokenizer_sees_selectors_and_grouping_labels() -> None:
    used = usage(
        'sum by (job) (rate(a_total{x="1", y=~"b,c"}[5m] offset 1h)) / on (instance) '
        "group_left () histogram_quantile(0.9, b_bucket) > bool 1e3 and c:d:e"
    )
    assert used.selectors == [("a_total", {"x", "y"}), ("b_bucket", set()), ("c:d:e", set())]
    assert used.grouping == {"job", "instance"}
    assert used.problems == []


def test_promtool_accepts_the_rules_and_their_unit_tests() -> None:
    promtool = prometheus_tool("promtool")
    for args in (["check", "rules", str(ALERTS)], ["test", "rules", str(ALERT_TESTS)]):
        done = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr


def test_bucket_bounds_in_the_rules_are_bounds_the_histograms_have() -> None:
    # le="1" would match nothing: the proxy writes bounds as Python floats (le="1.0").
    bounds = {repr(float(b)) for b in BUCKETS}
    used = set(re.findall(r'le="([^"]*)"', ALERTS.read_text()))
    assert used, "no bucket bounds used"
    assert used <= bounds, f"not bucket bounds: {used - bounds}"


# The input an alert is about: without it there is nothing to fire on.
SUBJECT = {"KountaProxyTokenExpiringSoon": {"kounta_proxy_token_expiry_timestamp_seconds"}}


def _family(series_name: str) -> str:
    """A histogram's ``_bucket``/``_count``/``_sum`` series belong to one input."""
    for suffix in ("_bucket", "_count", "_sum"):
        if series_name.endswith(suffix):
            return series_name.removesuffix(suffix)
    return series_name


def _inputs(expr: str) -> set[str]:
    return {_family(name) for name, _ in usage(expr).selectors}


def _case_inputs(case: dict[str, Any]) -> set[str]:
    return {_family(s["series"].partition("{")[0]) for s in case.get("input_series", [])}


def test_every_alert_fires_with_each_of_its_other_inputs_absent() -> None:
    """A series that does not exist yet (no 5xx ever, no request sent) must not silence an
    alert whose condition another input shows: a case fires it with that series absent."""
    cases = load_yaml(ALERT_TESTS)["tests"]
    missing = []
    for name, rule in alerts().items():
        inputs = _inputs(str(rule["expr"]))
        if len(inputs) < 2 or not inputs <= {_family(m) for m in known_metrics()}:
            continue  # one input, or recorded series (the SLO rules)
        for absent in sorted(inputs - SUBJECT.get(name, set())):
            fired = any(
                check["alertname"] == name and check.get("exp_alerts")
                for case in cases
                if absent not in _case_inputs(case) and _case_inputs(case) & inputs
                for check in case.get("alert_rule_test", [])
            )
            if not fired:
                missing.append(f"{name} without {absent}")
    assert missing == []


def test_every_alert_of_the_proxy_resolves_within_5_minutes_of_recovery() -> None:
    """The recovery case: every alert of the first group fires at 19m, is quiet at 25m (all
    conditions recover at 20m)."""
    case = next(
        c for c in load_yaml(ALERT_TESTS)["tests"] if "resolves within 5 minutes" in c["name"]
    )
    checks = case["alert_rule_test"]
    first_group = {r["alert"] for r in load_yaml(ALERTS)["groups"][0]["rules"] if "alert" in r}
    fired = {c["alertname"] for c in checks if c["eval_time"] == "19m" and c["exp_alerts"]}
    quiet = {c["alertname"] for c in checks if c["eval_time"] == "25m" and not c["exp_alerts"]}
    assert fired == first_group
    assert quiet == first_group


def test_a_failed_probe_is_no_new_opening_and_no_rule_window_is_longer_than_5m() -> None:
    """Long windows keep an alert firing after recovery (the old breaker rule: 15 minutes)."""
    for rule in load_yaml(ALERTS)["groups"][0]["rules"]:
        windows = re.findall(r"\[(\d+)m\]", str(rule["expr"]))
        assert all(int(w) <= 5 for w in windows), (rule.get("alert"), windows)
