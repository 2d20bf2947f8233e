"""The documentation keeps up with the code.

Every setting is in the example file and in the settings table of docs/configuration.md
(and nothing there is made up), the shipped config files load, every metric is in
docs/operations.md and every ``kounta-proxy`` subcommand somewhere in the docs, the
README's two commands are the ones CI runs, the README stays a front door (at most 200
lines), and every relative link in README.md and docs/*.md leads to a file and heading
that exist.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from proxy.cli import parser
from proxy.metrics import Metrics, WorkersMetrics
from proxy.settings import Secret, Settings, load

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
CONFIGURATION = DOCS / "configuration.md"
OPERATIONS = DOCS / "operations.md"
DEV = ROOT / "dev"
CI_RUN = ROOT / ".ci" / "run"
README_MAX_LINES = 200
EXAMPLE = ROOT / "config" / "kounta-proxy.example.toml"
SHIPPED_CONFIGS = sorted((ROOT / "config").glob("*.toml"))
# Names standing for the keys of dict sections ([accounts.NAME]) and items of lists
# ([[cache.rules]]) in the settings table and in the flattened key paths below.
ANY_NAME = "NAME"
ITEM = "[]"


def setting_keys(cls: type[Any] = Settings, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every leaf key of the settings tree with its type, e.g. ``accounts.NAME.mode``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            yield from setting_keys(typing.cast(type[Any], tp), f"{key}.")
        elif origin is dict and dataclasses.is_dataclass(args[1]):
            yield from setting_keys(typing.cast(type[Any], args[1]), f"{key}.{ANY_NAME}.")
        elif origin is tuple and dataclasses.is_dataclass(args[0]):
            yield key, tp
            yield from setting_keys(typing.cast(type[Any], args[0]), f"{key}{ITEM}.")
        else:
            yield key, tp


SETTING_KEYS = {key for key, _ in setting_keys()}
SECRET_KEYS = {key for key, tp in setting_keys() if tp is Secret}
# Sections whose keys are names the user picks, and sections that are arrays of tables.
NAMED_SECTIONS = {k.split(f".{ANY_NAME}.")[0] for k in SETTING_KEYS if f".{ANY_NAME}." in k}
LIST_SECTIONS = {k.split(f"{ITEM}.")[0] for k in SETTING_KEYS if f"{ITEM}." in k}


def flatten(raw: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """Key paths of parsed TOML in the notation of :func:`setting_keys`."""
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if prefix.rstrip(".") in NAMED_SECTIONS:
            path = f"{prefix}{ANY_NAME}"
        if path in SECRET_KEYS or (path.endswith("_file") and path[:-5] in SECRET_KEYS):
            yield path.removesuffix("_file") if path[:-5] in SECRET_KEYS else path
        elif isinstance(value, dict):
            yield from flatten(value, f"{path}.")
        elif path in LIST_SECTIONS and isinstance(value, list):
            yield path
            for item in value:
                yield from flatten(item, f"{path}{ITEM}.")
        else:
            yield path


# A commented-out key or table header: "# token_url = ...", "#   [callers.orders-service]".
COMMENTED_SETTING = re.compile(r"^#\s*(\[\[?[\w.-]+\]\]?\s*(#.*)?|[a-z_]+\s*=.*)$")


def uncommented(text: str) -> str:
    """The example file with its commented-out keys and tables switched on."""
    lines = text.splitlines()
    return "\n".join(COMMENTED_SETTING.sub(r"\1", line) for line in lines)


def example_keys() -> set[str]:
    return set(flatten(tomllib.loads(uncommented(EXAMPLE.read_text(encoding="utf-8")))))


def pages() -> list[Path]:
    """README.md and every page under docs/."""
    found = sorted(DOCS.glob("*.md"))
    assert found, "docs/ has no pages"
    return [README, *found]


def all_docs_text() -> str:
    return "\n".join(page.read_text(encoding="utf-8") for page in pages())


def section(path: Path, title: str) -> str:
    """The text under ``## title`` up to the next ``## `` heading."""
    text = path.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"{path.name} has no '## {title}' section"
    return match.group(1)


def table_keys() -> set[str]:
    """Keys in the first column of the settings table in docs/configuration.md.

    A cell may hold several keys: `server.host` / `server.port`, or
    `accounts.NAME.client_id` / `client_secret` (a bare name continues the previous key's
    section).
    """
    keys: set[str] = set()
    for line in section(CONFIGURATION, "Settings").splitlines():
        if not line.startswith("| `"):
            continue
        section_name = ""
        for name in re.findall(r"`([^`]+)`", line.split("|")[1]):
            key = name if "." in name or not section_name else f"{section_name}.{name}"
            section_name = key.rpartition(".")[0]
            keys.add(key)
    return keys


def test_the_example_file_names_every_setting() -> None:
    assert SETTING_KEYS - example_keys() == set()


def test_the_example_file_names_no_unknown_setting() -> None:
    assert example_keys() - SETTING_KEYS == set()


def test_the_settings_table_names_every_setting() -> None:
    assert SETTING_KEYS - table_keys() == set()


def test_the_settings_table_names_no_unknown_setting() -> None:
    assert table_keys() - SETTING_KEYS == set()


def test_the_key_walk_covers_named_and_list_sections() -> None:
    # Guards the two helpers above: were they to miss these, every test would pass vacuously.
    assert {"accounts.NAME.mode", "callers.NAME.key", "cache.rules[].fresh_for"} <= SETTING_KEYS
    assert {"accounts.NAME.mode", "cache.rules", "cache.rules[].path"} <= set(
        flatten({"accounts": {"x": {"mode": "oauth"}}, "cache": {"rules": [{"path": "/v1/*"}]}})
    )
    assert "accounts.NAME.client_secret" in set(
        flatten({"accounts": {"x": {"client_secret_file": "/run/secrets/s"}}})
    )


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_each_shipped_config_file_loads(path: Path) -> None:
    settings = load(path, env={})
    assert settings.accounts, f"{path.name} configures no account: serve would refuse it"


def test_the_example_file_still_loads_with_its_optional_tables_switched_on(
    tmp_path: Path,
) -> None:
    # Secret files named in comments do not exist here: point them at a real one.
    secret = tmp_path / "secret"
    secret.write_text("a-secret-of-at-least-16-chars\n")
    text = re.sub(r'(_file = )"[^"]*"', rf'\1"{secret}"', uncommented(EXAMPLE.read_text()))
    path = tmp_path / "all.toml"
    path.write_text(text)
    settings = load(path, env={})
    assert settings.cache.rules and settings.callers


def registered_metric_names() -> set[str]:
    """Exposition names: counters with ``_total``, info with ``_info``."""
    suffix = {"counter": "_total", "info": "_info"}
    registry = CollectorRegistry()
    Metrics(registry).watch_store(lambda: (0, 0))  # the cache gauges (only with a store)
    WorkersMetrics(registry, 1)  # the serve --workers parent's own
    return {m.name + suffix.get(m.type, "") for m in registry.collect()}


def test_every_metric_is_in_the_operations_page() -> None:
    text = OPERATIONS.read_text(encoding="utf-8")
    missing = {name for name in registered_metric_names() if f"`{name}`" not in text}
    assert missing == set()


def test_no_page_names_an_unknown_metric() -> None:
    # A name followed by "*" is a family ("the kounta_proxy_cache_* metrics"), not a metric.
    pattern = r"\bkounta_proxy_[a-z0-9_]*[a-z0-9](?![a-z0-9_*])"
    named = set(re.findall(pattern, all_docs_text()))
    assert named - registered_metric_names() == set()


def subcommands() -> set[str]:
    actions = [a for a in parser()._actions if a.choices and a.dest == "command"]
    assert len(actions) == 1
    return set(typing.cast(dict[str, Any], actions[0].choices))


def test_every_subcommand_is_in_the_docs() -> None:
    text = all_docs_text()
    assert {"serve", "check-config", "cache"} <= subcommands()
    assert {c for c in subcommands() if f"kounta-proxy {c}" not in text} == set()


def two_commands() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", section(README, "Two commands"), re.S)
    return [b.strip() for b in blocks]


def test_the_two_commands_are_dev_demo_and_dev_check() -> None:
    assert two_commands() == ["./dev demo", "./dev check"]


def test_ci_runs_the_readmes_test_command() -> None:
    lines = CI_RUN.read_text(encoding="utf-8").splitlines()
    commands = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert two_commands()[1] in commands


def shell_function(name: str) -> str:
    """The body of ``name() { ... }`` in the dev script."""
    match = re.search(rf"^{name}\(\) \{{\n(.*?)^\}}", DEV.read_text(encoding="utf-8"), re.M | re.S)
    assert match, f"dev has no function {name}"
    return match.group(1)


def dispatched(command: str) -> str:
    """What ``./dev COMMAND`` runs: its line in the dev script's case statement."""
    match = re.search(rf"^\s+{re.escape(command)}\) (.*);;$", DEV.read_text(encoding="utf-8"), re.M)
    assert match, f"dev has no command {command}"
    return match.group(1)


def test_dev_demo_runs_the_demo_command() -> None:
    assert "cmd_demo" in dispatched("demo")
    assert re.search(r'kounta-proxy"? demo', shell_function("cmd_demo"))


def test_dev_check_runs_everything_and_tests_with_the_coverage_floor() -> None:
    assert "cmd_check" in dispatched("check")
    steps = re.findall(r"^\s+(\w+)", shell_function("cmd_check"), re.M)
    expected = ["system_packages", "venv", "run_lint", "run_types", "run_ops_lint", "run_tests"]
    assert [s for s in steps if s in expected] == expected
    assert "--cov-fail-under=80" in shell_function("run_tests")


def test_the_dev_script_installs_the_system_packages_the_tests_need() -> None:
    missing = shell_function("missing_packages")
    assert {"prometheus", "redis-server"} <= set(re.findall(r"packages\+=\(([\w-]+)\)", missing))
    assert "apt-get update -qq" in shell_function("system_packages")


def test_the_makefile_only_forwards_to_dev() -> None:
    recipes = re.findall(r"^\t(.*)$", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M)
    assert recipes and set(recipes) == {"./dev $@"}


def test_the_readme_is_a_front_door() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES


# Markdown links: [text](target) or [text](target "title"); targets with a scheme are left out.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```[^\n]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def prose(text: str) -> str:
    """Markdown without fenced code blocks (whose "# comments" are not headings)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a page; repeated headings get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    text = prose(path.read_text(encoding="utf-8"))
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[str]:
    text = INLINE_CODE.sub("``", prose(path.read_text(encoding="utf-8")))
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in links(path):
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.is_relative_to(ROOT) or not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (linked.suffix != ".md" or anchor not in anchors(linked)):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    return broken


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.name)
def test_every_relative_link_leads_somewhere(page: Path) -> None:
    assert broken_links(page) == []


def test_the_link_check_sees_links_and_anchors() -> None:
    # Guards the helpers: were they to find no links or anchors, the test above would pass.
    assert "docs/configuration.md" in links(README)
    assert {"two-commands", "a-five-minute-tour"} <= anchors(README)
    assert slug("oauth: tokens that do not lapse") == "oauth-tokens-that-do-not-lapse"
    assert slug("Why not `aiohttp-cache`") == "why-not-aiohttp-cache"
    assert "settings" in anchors(CONFIGURATION)


KEEP_A_CHANGELOG_KINDS = ("Added", "Changed", "Deprecated", "Removed", "Fixed", "Security")


def test_the_changelog_has_one_unreleased_section_in_keep_a_changelog_form() -> None:
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert re.findall(r"^## .*$", text, re.M)[0] == "## [Unreleased]"
    assert text.count("## [Unreleased]") == 1
    unreleased = text.split("## [Unreleased]")[1].split("\n## ")[0]
    kinds = re.findall(r"^### (.*)$", unreleased, re.M)
    assert kinds and len(kinds) == len(set(kinds))
    assert set(kinds) <= set(KEEP_A_CHANGELOG_KINDS)
    bullets = re.findall(r"^- (.*)$", unreleased, re.M)
    assert len(bullets) == len(set(bullets))
