"""The documentation keeps up with the code.

Every setting is in the example file and the README's configuration table (and nothing
there is made up), both shipped config files load, every metric and every ``kounta-proxy``
subcommand is in the README, and the README's two commands are the ones CI runs.
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
from proxy.metrics import Metrics
from proxy.settings import Secret, Settings, load

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
EXAMPLE = ROOT / "config" / "kounta-proxy.example.toml"
SHIPPED_CONFIGS = sorted((ROOT / "config").glob("*.toml"))
# Names standing for the keys of dict sections ([accounts.NAME]) and items of lists
# ([[cache.rules]]) in the README and in the flattened key paths below.
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


def readme_section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def readme_table_keys() -> set[str]:
    """Keys in the first column of the configuration table.

    A cell may hold several keys: `server.host` / `server.port`, or
    `accounts.NAME.client_id` / `client_secret` (a bare name continues the previous key's
    section).
    """
    keys: set[str] = set()
    for line in readme_section("Configuration").splitlines():
        if not line.startswith("| `"):
            continue
        section = ""
        for name in re.findall(r"`([^`]+)`", line.split("|")[1]):
            key = name if "." in name or not section else f"{section}.{name}"
            section = key.rpartition(".")[0]
            keys.add(key)
    return keys


def test_the_example_file_names_every_setting() -> None:
    assert SETTING_KEYS - example_keys() == set()


def test_the_example_file_names_no_unknown_setting() -> None:
    assert example_keys() - SETTING_KEYS == set()


def test_the_readme_table_names_every_setting() -> None:
    assert SETTING_KEYS - readme_table_keys() == set()


def test_the_readme_table_names_no_unknown_setting() -> None:
    assert readme_table_keys() - SETTING_KEYS == set()


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
    Metrics(registry)
    return {m.name + suffix.get(m.type, "") for m in registry.collect()}


def test_every_metric_is_in_the_readme() -> None:
    text = README.read_text(encoding="utf-8")
    missing = {name for name in registered_metric_names() if f"`{name}`" not in text}
    assert missing == set()


def test_the_readme_names_no_unknown_metric() -> None:
    # A name followed by "*" is a family ("the kounta_proxy_cache_* metrics"), not a metric.
    pattern = r"\bkounta_proxy_[a-z0-9_]*[a-z0-9](?![a-z0-9_*])"
    named = set(re.findall(pattern, README.read_text(encoding="utf-8")))
    assert named - registered_metric_names() == set()


def subcommands() -> set[str]:
    actions = [a for a in parser()._actions if a.choices and a.dest == "command"]
    assert len(actions) == 1
    return set(typing.cast(dict[str, Any], actions[0].choices))


def test_every_subcommand_is_in_the_readme() -> None:
    text = README.read_text(encoding="utf-8")
    assert {"serve", "check-config", "cache"} <= subcommands()
    assert {c for c in subcommands() if f"kounta-proxy {c}" not in text} == set()


def test_the_two_commands_are_make_demo_and_make_check() -> None:
    blocks = re.findall(r"```sh\n(.*?)```", readme_section("Two commands"), re.S)
    assert [b.strip() for b in blocks] == ["make demo", "make check"]


def test_ci_runs_make_check() -> None:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert commands[-1] == "make check"


def test_the_make_targets_do_what_the_readme_says() -> None:
    makefile = (ROOT / "Makefile").read_text()
    demo = re.search(r"^demo:.*\n((?:\t.*\n)+)", makefile, re.M)
    check = re.search(r"^check:(.*)$", makefile, re.M)
    assert demo and "kounta-proxy demo" in demo.group(1)
    assert check and set(check.group(1).split()) >= {"lint", "types", "test"}


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
