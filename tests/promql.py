"""PromQL in the repository's alert rules and dashboard: does it parse, does it name real metrics?

Parsing is promtool's (every expression becomes a recording rule in a temporary file and
``promtool check rules`` reads it). Names come from a small tokenizer here: metric selectors,
their matcher labels and the labels of ``by``/``without``/``on``/``ignoring``/``group_*``,
checked against what :class:`proxy.metrics.Metrics` and every package's group
(:class:`proxy.edge.metrics.PackageMetrics`) register.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from ruamel.yaml import YAML

from proxy.edge.metrics import PackageMetrics
from proxy.metrics import Metrics
from proxy.ops.metrics import WorkersMetrics
from tests.ops_tools import prometheus_tool

ROOT = Path(__file__).resolve().parents[1]

# Metrics (and labels on existing metrics) that the dashboard and alerts use before the proxy
# exports them. Remove an entry once a metrics module declares it: the test then checks the real one.
ASSUMED_METRICS: dict[str, frozenset[str]] = {}
ASSUMED_LABELS: dict[str, frozenset[str]] = {}
# Labels Prometheus adds to every scraped series, and its own series.
TARGET_LABELS = frozenset({"job", "instance"})
BUILTIN_METRICS: dict[str, frozenset[str]] = {
    "up": frozenset(),
    "scrape_duration_seconds": frozenset(),
}

_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
}


def exported_metrics() -> dict[str, frozenset[str]]:
    """Every series name the proxy exposes, with its labels (``_created`` left out)."""
    metrics = Metrics(CollectorRegistry())
    groups = PackageMetrics.on(metrics.registry)  # every package's own group
    groups.cache.watch_store(lambda: (0, 0))  # the cache gauges (only with a store)
    declared: dict[str, set[str]] = {}
    for value in [v for group in (metrics, *groups.groups()) for v in vars(group).values()]:
        name = getattr(value, "_name", None) or getattr(value, "name", None)
        labels = getattr(value, "_labelnames", None) or getattr(value, "labelnames", None)
        if isinstance(name, str) and labels is not None:
            declared[name] = set(labels)
    names: dict[str, frozenset[str]] = {}
    # The `serve --workers N` parent's own two, beside the workers' merged ones.
    parent = WorkersMetrics(CollectorRegistry(), 1)
    families = [*metrics.registry.collect(), *parent.registry.collect()]
    declared |= {"kounta_proxy_workers_scrape_errors": {"worker"}}
    for family in families:
        labels = declared.get(family.name, set()) | {
            k for s in family.samples for k in s.labels if k != "le"
        }
        for suffix in _SUFFIXES[family.type]:
            extra = {"le"} if suffix == "_bucket" else set()
            names[family.name + suffix] = frozenset(labels | extra)
    return names


def known_metrics(recorded: Mapping[str, frozenset[str]] = {}) -> dict[str, frozenset[str]]:
    known = {**BUILTIN_METRICS, **exported_metrics(), **recorded}
    for name, labels in ASSUMED_METRICS.items():
        assert name not in known, f"{name} is exported now: remove it from ASSUMED_METRICS"
        known[name] = labels
    for name, labels in ASSUMED_LABELS.items():
        assert name in known, f"ASSUMED_LABELS names {name}, which is not exported"
        assert not labels & known[name], f"{name} has {labels & known[name]}: drop the assumption"
        known[name] = known[name] | labels
    return {name: labels | TARGET_LABELS for name, labels in known.items()}


# --------------------------------------------------------------------------- tokenizer

_TOKEN = re.compile(
    r"""
      (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
    | (?P<range>\[[^\]]*\])
    | (?P<duration>\d+(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*(?![\w.]))
    | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^<>=(){},])
    | (?P<space>\s+)
    | (?P<bad>.)
    """,
    re.VERBOSE,
)
AGGREGATIONS = frozenset(
    [
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ]
)
GROUPING = frozenset(["by", "without", "on", "ignoring", "group_left", "group_right"])
KEYWORDS = frozenset(["and", "or", "unless", "bool", "offset", "inf", "nan"]) | GROUPING


@dataclass
class Usage:
    """What one expression refers to."""

    selectors: list[tuple[str, set[str]]] = field(default_factory=list)  # (metric, matcher labels)
    grouping: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)


def _tokens(expr: str) -> list[tuple[str, str]]:
    found = [(m.lastgroup or "", m.group()) for m in _TOKEN.finditer(expr)]
    return [(kind, text) for kind, text in found if kind != "space"]


def usage(expr: str) -> Usage:
    used = Usage()
    tokens = _tokens(expr)
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        after = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if kind == "bad":
            used.problems.append(f"unexpected character {text!r}")
        elif kind == "ident" and text in GROUPING:
            if after == "(":
                close = next(j for j in range(i + 2, len(tokens)) if tokens[j][1] == ")")
                used.grouping |= {t for k, t in tokens[i + 2 : close] if k == "ident"}
                i = close
        elif kind == "ident" and text not in KEYWORDS and text not in AGGREGATIONS:
            if after == "(":
                pass  # a function
            elif after == "{":
                close = next(j for j in range(i + 2, len(tokens)) if tokens[j][1] == "}")
                inner = tokens[i + 2 : close]
                labels = {t for j, (k, t) in enumerate(inner) if k == "ident" and j % 4 == 0}
                used.selectors.append((text, labels))
                i = close
            else:
                used.selectors.append((text, set()))
        elif text == "{":
            used.problems.append("a selector without a metric name")
        i += 1
    return used


def unknown_names(expr: str, known: Mapping[str, frozenset[str]]) -> list[str]:
    """What in ``expr`` is not among ``known`` metrics and their labels (empty: all fine)."""
    used = usage(expr)
    problems = list(used.problems)
    if not used.selectors:
        problems.append("names no metric")
    every_label: set[str] = set(TARGET_LABELS)
    for name, labels in used.selectors:
        if name not in known:
            problems.append(f"unknown metric {name}")
            continue
        every_label |= known[name]
        problems += [f"{name} has no label {label}" for label in sorted(labels - known[name])]
    problems += [
        f"no metric here has a label {label}" for label in sorted(used.grouping - every_label)
    ]
    return problems


# --------------------------------------------------------------------------- promtool


def promtool_parse_errors(exprs: Mapping[str, str], tmp_path: Path) -> str:
    """promtool's complaint about the expressions (as recording rules), or "" when all parse."""
    rules = {"groups": [{"name": "check", "rules": []}]}
    names = {}
    for n, (where, expr) in enumerate(exprs.items()):
        record = f"check:expr_{n}"
        names[record] = where
        rules["groups"][0]["rules"].append({"record": record, "expr": expr})
    path = tmp_path / "exprs.rules.yml"
    with path.open("w") as f:
        YAML(typ="safe").dump(rules, f)
    done = subprocess.run(
        [prometheus_tool("promtool"), "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode == 0:
        return ""
    out = done.stdout + done.stderr
    return "\n".join([out, *(f"{r}: {w}" for r, w in names.items() if f'"{r}"' in out)])


def load_yaml(path: Path) -> Any:
    return YAML(typ="safe").load(path.read_text())


def rules(path: Path = ROOT / "config" / "alerts.yml") -> Iterator[dict[str, Any]]:
    for group in load_yaml(path)["groups"]:
        yield from group["rules"]


def recorded_metrics() -> dict[str, frozenset[str]]:
    """Series the alert file records, with the labels they keep (``by (...)``)."""
    return {r["record"]: frozenset(usage(r["expr"]).grouping) for r in rules() if "record" in r}
