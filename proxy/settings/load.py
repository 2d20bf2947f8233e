"""Loading: defaults, then a TOML file, then ``KOUNTA_PROXY_*`` variables.

The loader walks the sections' type hints (:mod:`proxy.settings.sections`). Problems surface
as one :class:`ConfigError` naming the key, never as a traceback.

Environment variables name the key path with double underscores::

    KOUNTA_PROXY_SERVER__PORT=8081
    KOUNTA_PROXY_ACCOUNTS__DEFAULT__CLIENT_SECRET=...
    KOUNTA_PROXY_ACCOUNTS__DEFAULT__CLIENT_SECRET_FILE=/run/secrets/kounta

Any :class:`Secret` field may instead be read from a file named by ``<key>_file``
(in TOML or the environment), which is how Docker secrets are mounted.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from proxy.files import read_regular
from proxy.settings.base import (
    DEFAULT_CONFIG_PATH,
    ENV_PREFIX,
    ConfigError,
    ConfigErrors,
    Invalid,
    Secret,
)
from proxy.settings.sections import Settings


def load(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Defaults, then the TOML file (``path`` or ``./kounta-proxy.toml`` if present), then env."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_toml(path)
    elif DEFAULT_CONFIG_PATH.is_file():
        raw = read_toml(DEFAULT_CONFIG_PATH)
    variables = merge_env(raw, env)
    problems: list[ConfigError] = []
    settings = build(Settings, raw, "", problems)
    if problems or not isinstance(settings, Settings):
        problems = [_from_variable(p, variables) for p in problems]
        raise ConfigErrors(problems) if len(problems) > 1 else problems[0]
    return settings


# Larger files are refused (a config or secret file is small; /dev/zero is endless).
CONFIG_FILE_LIMIT = 16 * 1024**2
SECRET_FILE_LIMIT = 1024**2


def read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(read_regular(path, CONFIG_FILE_LIMIT).decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError("", f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or e
        raise ConfigError("", f"cannot read config file {path}: {reason}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("", f"{path} is not valid TOML: {e}") from None


def merge_env(raw: dict[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """Fold ``KOUNTA_PROXY_A__B=v`` into ``raw["a"]["b"] = "v"`` (typed later); returns each
    folded key's path ("a.b") and the variable that set it."""
    variables: dict[str, str] = {}
    for name, value in sorted(env.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if not all(parts):
            raise ConfigError(name, "malformed variable name (empty part between '__')")
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(name, f"conflicts with the scalar key {part!r}")
            node = child
        node[parts[-1]] = _EnvValue(value)
        variables[".".join(parts)] = name
    return variables


def _from_variable(problem: ConfigError, variables: dict[str, str]) -> ConfigError:
    """A problem with a key an environment variable set, told with the variable's name."""
    names = [name for path, name in variables.items() if f"{path}.".startswith(f"{problem.key}.")]
    if not names:
        return problem
    if not problem.problem.startswith("unknown key"):
        label = f"{', '.join(names)} ({problem.key})"
        return ConfigError(problem.key, problem.problem, label=label)
    hints = [f"did you mean {ENV_PREFIX}{'__'.join(p).upper()}?" for p in map(_meant, names) if p]
    unknown = "unknown setting" + (f" ({hints[0]})" if hints else "")
    return ConfigError(problem.key, unknown, label=", ".join(names))


def _meant(name: str) -> list[str] | None:
    """The setting a variable with a mistaken ``_``/``__`` split names, as path parts, if any."""
    words = [w for w in name[len(ENV_PREFIX) :].lower().split("_") if w]
    return _path_in(Settings, words)


def _path_in(tp: Any, words: list[str]) -> list[str] | None:
    if dataclasses.is_dataclass(tp) or typing.get_origin(tp) is dict:
        fields: dict[str, Any] = {}
        if dataclasses.is_dataclass(tp):
            fields = typing.get_type_hints(tp)
            fields |= {f"{k}_file": str for k, v in fields.items() if v is Secret}
        for i in range(1, len(words) + 1):
            key = "_".join(words[:i])
            inner = fields.get(key) if fields else typing.get_args(tp)[1]
            rest = _path_in(inner, words[i:]) if inner is not None else None
            if rest is not None:
                return [key, *rest]
        return None
    return [] if not words else None


class _EnvValue(str):
    """A string from the environment: converted to the field's type when built."""


class _Broken:
    """What a table with a problem builds to; its parent leaves the key out."""


BROKEN = _Broken()


def build(cls: type[Any], raw: Any, path: str, problems: list[ConfigError] | None = None) -> Any:
    """``cls`` from a raw table. With ``problems``, every problem is recorded there and the
    walk goes on (a broken table builds to :data:`BROKEN`); without, the first is raised."""
    if not isinstance(raw, dict):
        return _problem(problems, ConfigError(path, f"must be a table, got {_kind(raw)}"))
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    failed: set[str] = set()  # keys refused here (their field keeps its default)
    broken = False  # a table below is broken: checks across fields could only mislead
    for key, value in raw.items():
        key_path = f"{path}.{key}" if path else key
        try:
            name, built = _build_key(hints, names, raw, key, value, key_path, problems)
        except ConfigError as e:
            _problem(problems, e)
            failed.add(key.removesuffix("_file"))
            meant = difflib.get_close_matches(key, [f"{n}_file" for n in names] + [*names], 1, 0.6)
            if meant and meant[0].removesuffix("_file") not in raw:
                failed.add(meant[0].removesuffix("_file"))  # its default stands in: no checks
            continue
        if built is BROKEN:
            broken = True
        else:
            kwargs[name] = built
    if broken:
        return BROKEN
    try:
        made = cls(**kwargs)
    except Invalid as e:
        # With a key refused above, the table's own checks still run (every problem at once,
        # e.g. a misspelt key and a negative fresh_for in one rule); not one about that key.
        if e.key in failed:
            return BROKEN
        return _problem(problems, ConfigError(f"{path}.{e.key}" if path else e.key, e.problem))
    return BROKEN if failed else made


def _problem(problems: list[ConfigError] | None, error: ConfigError) -> _Broken:
    if problems is None:
        raise error
    problems.append(error)
    return BROKEN


def _build_key(
    hints: dict[str, Any],
    names: set[str],
    raw: dict[str, Any],
    key: str,
    value: Any,
    key_path: str,
    problems: list[ConfigError] | None,
) -> tuple[str, Any]:
    if key.endswith("_file") and key[:-5] in names and hints[key[:-5]] is Secret:
        if key[:-5] in raw:
            raise ConfigError(key_path, f"set either {key[:-5]} or {key}, not both")
        return key[:-5], Secret(_read_secret_file(key_path, value), source=str(value))
    if key not in names:
        raise ConfigError(key_path, "unknown key" + _did_you_mean(key, names, hints))
    return key, convert(hints[key], value, key_path, problems)


def _did_you_mean(key: str, names: set[str], hints: dict[str, Any]) -> str:
    known = sorted(names | {f"{n}_file" for n in names if hints[n] is Secret})
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _read_secret_file(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, "must be a file path")
    try:
        return read_regular(Path(value), SECRET_FILE_LIMIT).decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(
            key, f"cannot read secret file {value}: {getattr(e, 'strerror', None) or e}"
        ) from None


def convert(tp: Any, value: Any, path: str, problems: list[ConfigError] | None = None) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if value == "" and isinstance(value, _EnvValue):
            return None
        return convert(options[0], value, path, problems)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            choices = ", ".join(repr(a) for a in allowed)
            raise ConfigError(path, f"must be one of {choices}, got {value!r}")
        return str(value)
    if origin is dict:
        _, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(path, f"must be a table, got {_kind(value)}")
        items = {k: convert(value_type, v, f"{path}.{k}", problems) for k, v in value.items()}
        return BROKEN if any(v is BROKEN for v in items.values()) else items
    if origin is tuple:
        (item_type, _) = typing.get_args(tp)
        if isinstance(value, _EnvValue):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(path, f"must be an array, got {_kind(value)}")
        built = tuple(convert(item_type, v, f"{path}[{i}]", problems) for i, v in enumerate(value))
        return BROKEN if any(v is BROKEN for v in built) else built
    if dataclasses.is_dataclass(tp):
        return build(typing.cast(type[Any], tp), value, path, problems)
    if tp is Secret:
        return Secret(_scalar(str, value, path))
    if tp in (str, int, float, bool):
        return _scalar(tp, value, path)
    raise ConfigError(path, f"unsupported setting type {tp!r}")  # pragma: no cover


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _scalar(tp: type[Any], value: Any, path: str) -> Any:
    if isinstance(value, _EnvValue):
        return _from_env(tp, str(value), path)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not tp:
        raise ConfigError(path, f"must be {_TYPE_NAMES[tp]}, got {_kind(value)}")
    return value


def _from_env(tp: type[Any], text: str, path: str) -> Any:
    if tp is str:
        return text
    if tp is bool:
        if text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise ConfigError(path, f"must be true or false, got {text!r}")
    try:
        return tp(text)
    except ValueError:
        raise ConfigError(path, f"must be {_TYPE_NAMES[tp]}, got {text!r}") from None


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _kind(value: Any) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        dict: "a table",
        list: "an array",
    }.get(type(value), type(value).__name__)
