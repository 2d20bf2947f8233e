"""The documentation keeps up with the code.

Every setting is in the example file and in the settings table of docs/configuration.md
(and nothing there is made up), the shipped config files load, every metric is in
docs/operations.md and every ``kounta-proxy`` subcommand somewhere in the docs, the
README's two commands are the ones CI runs, the README stays a front door (at most 200
lines), and every relative link in README.md and docs/*.md leads to a file and heading
that exist.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import importlib
import inspect
import io
import re
import subprocess
import tokenize
import tomllib
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from proxy.cli import parser
from proxy.edge.metrics import PackageMetrics
from proxy.metrics import Metrics
from proxy.ops.metrics import WorkersMetrics
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
    Metrics(registry)
    PackageMetrics.on(registry).cache.watch_store(lambda: (0, 0))  # (only with a store)
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


def test_dev_help_names_every_command() -> None:
    text = DEV.read_text(encoding="utf-8")
    case = text.split("case $command in", 1)[1].split("esac", 1)[0]
    commands = set(re.findall(r"^    ([a-z-]+)\)", case, re.M))
    assert {"check", "venv", "lock"} <= commands
    usage = subprocess.run([str(DEV), "help"], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 0
    listed = set(re.findall(r"^  \./dev ([a-z-]+)", usage.stdout, re.M))
    assert listed == commands


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


# --------------------------------------------------------------------------- code references
# Names of code in docstrings, comments and the docs must name code that exists: a dotted
# reference (`proxy.edge.fast`, `answer.stamp_server`, `Flight.head`; backticks optional), a
# path (`proxy/auth/layer.py`, `cache/flight.py`) and, in the code, a Sphinx role's bare name
# (:class:`Authenticator` must be a name of the module it is written in, or of one of its
# classes). `module.attr` must be defined in that module (not merely imported there); a
# package may re-export. Setting paths (`server.port`, `accounts.NAME.token`) and file names
# (`layer.py`) are not code references; a first name that is neither a module of the proxy nor
# one of its classes (`os.environ`, `web.Request`) is left alone.

MODULE_FILES = {
    ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
    for p in sorted((ROOT / "proxy").rglob("*.py"))
}
# Every dotted tail of a module's name, so `fast`, `edge.fast` and `proxy.edge.fast` all work.
MODULE_TAILS: dict[str, set[str]] = {}
for _name in MODULE_FILES:
    _parts = _name.split(".")
    for _i in range(len(_parts)):
        MODULE_TAILS.setdefault(".".join(_parts[_i:]), set()).add(_name)
CLASS_HOMES: dict[str, set[str]] = {}
for _name, _path in MODULE_FILES.items():
    for _node in ast.walk(ast.parse(_path.read_text(encoding="utf-8"))):
        if isinstance(_node, ast.ClassDef):
            CLASS_HOMES.setdefault(_node.name, set()).add(_name)
FILE_SUFFIXES = {"py", "md", "toml", "yml", "yaml", "json", "lock", "txt", "conf", "db", "sh"}
DOTTED = re.compile(r"(?<![\w./@:~-])~?([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?![\w/-])")
ROLE = re.compile(r":(?:class|func|meth|attr|data|exc|obj):`~?([A-Za-z_]\w*)`")
PATH_REF = re.compile(r"(?<![\w./~-])((?:[\w-]+/)+[\w.-]+\.(?:py|md|toml|yml|yaml|json|lock))\b")


def is_setting(ref: str) -> bool:
    """``ref`` is a settings path or a section of one (``cache``, ``accounts.main.token``)."""
    parts = ref.split(".")
    for key in SETTING_KEYS:
        names = key.replace(ITEM, "").split(".")
        if len(parts) <= len(names) and all(
            n in (r, ANY_NAME) or r == f"{n}_file" for n, r in zip(names, parts, strict=False)
        ):
            return True
    return False


def class_attributes(cls: type[Any]) -> set[str]:
    """What ``cls.x`` may name: class attributes, annotations and ``self.x = ...`` targets."""
    names = set(dir(cls))
    for base in cls.__mro__:
        names |= set(getattr(base, "__annotations__", {}))
        if base.__module__ in MODULE_FILES:
            tree = ast.parse(MODULE_FILES[base.__module__].read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef) and node.name == base.__name__:
                    names |= {
                        n.attr
                        for n in ast.walk(node)
                        if isinstance(n, ast.Attribute)
                        and isinstance(n.ctx, ast.Store)
                        and isinstance(n.value, ast.Name)
                        and n.value.id == "self"
                    }
    return names


def defines(owner: Any, name: str) -> bool:
    """``owner.name`` exists: for a module, defined there (a package may re-export), or an
    attribute of one of its classes (an instance named after its module: ``services.x``)."""
    if inspect.isclass(owner):
        return name in class_attributes(owner)
    if hasattr(owner, name):
        value = getattr(owner, name)
        home = getattr(value, "__module__", None)
        if not (inspect.isclass(value) or inspect.isroutine(value)) or hasattr(owner, "__path__"):
            return True
        return home == owner.__name__
    own_classes = [
        v for v in vars(owner).values() if inspect.isclass(v) and v.__module__ == owner.__name__
    ]
    return any(name in class_attributes(c) for c in own_classes)


def resolves(owner: Any, names: list[str]) -> bool:
    """``owner.a.b...`` exists; past an instance attribute its type is not followed."""
    for name in names:
        if not defines(owner, name):
            return False
        owner = getattr(owner, name, None)
        if not (inspect.ismodule(owner) or inspect.isclass(owner)):
            return True
    return True


def dotted_problem(ref: str) -> str | None:
    """Why a dotted name in the text names no code, or None."""
    parts = ref.split(".")
    if parts[-1] in FILE_SUFFIXES or is_setting(ref):
        return None
    for i in range(len(parts) - 1, 0, -1):
        homes = MODULE_TAILS.get(".".join(parts[:i]))
        if homes:
            if any(resolves(importlib.import_module(m), parts[i:]) for m in homes):
                return None
            return f"no {'.'.join(parts[i:])} in {' or '.join(sorted(homes))}"
    for home in sorted(CLASS_HOMES.get(parts[0], ())):
        if resolves(getattr(importlib.import_module(home), parts[0]), parts[1:]):
            return None
    return f"no such attribute of class {parts[0]}" if parts[0] in CLASS_HOMES else None


def reference_problems(text: str, where: Path, module: str | None = None) -> list[str]:
    """The dotted names, paths and (in ``module``'s text) role names that name nothing."""
    found = []
    for match in DOTTED.finditer(text):
        problem = dotted_problem(match.group(1))
        if problem:
            found.append(f"{match.group(1)}: {problem}")
    for match in PATH_REF.finditer(text):
        bases = (ROOT, ROOT / "proxy", where.parent)
        if not any((base / match.group(1)).exists() for base in bases):
            found.append(f"{match.group(1)}: no such file")
    if module is not None:
        owner = importlib.import_module(module)
        for match in ROLE.finditer(text):
            name = match.group(1)
            if (
                not hasattr(owner, name)
                and not hasattr(builtins, name)
                and not defines(owner, name)
            ):
                found.append(f"{name}: not a name in {module}")
    return found


def commentary(path: Path) -> Iterator[str]:
    """A module's docstrings and comments; a page's text outside fenced code."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".md":
        yield prose(text)
        return
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type == tokenize.COMMENT:
            yield token.string
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            yield ast.get_docstring(node, clean=False) or ""


@pytest.mark.parametrize(
    "path",
    [*MODULE_FILES.values(), *pages()],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_code_references_name_code_that_exists(path: Path) -> None:
    module = {p: m for m, p in MODULE_FILES.items()}.get(path)
    found = [p for text in commentary(path) for p in reference_problems(text, path, module)]
    assert found == []


@pytest.mark.parametrize(
    ("text", "module", "named"),
    [
        ("recorded by app.access_middleware", None, "access_middleware"),  # imported there
        ("the long way: handlers.stamp_server", None, "stamp_server"),
        ("see `proxy.cache.flight.Pump`", None, "Pump"),
        ("see proxy/auth.py", None, "proxy/auth.py"),
        (":class:`Authenticator` puts it on", "proxy.auth.providers", "Authenticator"),
        ("``Flight.nonsense`` is set", None, "nonsense"),
    ],
)
def test_the_reference_check_finds_stale_names(text: str, module: str | None, named: str) -> None:
    [problem] = reference_problems(text, ROOT / "proxy" / "x.py", module)
    assert named in problem


def test_the_reference_check_passes_real_names_settings_and_files() -> None:
    text = (
        "`proxy.edge.middlewares.access_middleware`, answer.stamp_server, `Flight.head`,"
        " :class:`OAuthProvider`, `server.port`, `accounts.main.client_secret_file`,"
        " `cache.rules`, layer.py, `os.environ`, proxy/auth/layer.py, cache/flight.py,"
        " services.admin_routes, proxy.sandbox.SandboxConfig"
    )
    assert reference_problems(text, ROOT / "proxy" / "x.py", "proxy.auth.providers") == []
