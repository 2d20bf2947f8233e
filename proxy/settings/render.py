"""Showing settings: as plain data with every secret masked (:func:`masked`), and as TOML
that loads back the same (:func:`to_toml`, what ``check-config`` prints)."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any

from proxy.settings.base import MASK, Secret


def masked(settings: Any, *, files: bool = False) -> Any:
    """The settings as plain data with every secret replaced by a mask. With ``files``, a
    secret read from a file is ``NAME_file = PATH`` instead, so the data loads back the same."""
    if isinstance(settings, Secret):
        if settings and settings.source:
            return f"{MASK} (from {settings.source})"
        return MASK if settings else ""
    if dataclasses.is_dataclass(settings) and not isinstance(settings, type):
        data = {}
        for f in dataclasses.fields(settings):
            value = getattr(settings, f.name)
            if files and isinstance(value, Secret) and value and value.source:
                data[f"{f.name}_file"] = value.source
            else:
                data[f.name] = masked(value, files=files)
        return data
    if isinstance(settings, dict):
        return {k: masked(v, files=files) for k, v in settings.items()}
    if isinstance(settings, tuple | list):
        return [masked(v, files=files) for v in settings]
    return settings


def to_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """Render :func:`masked` output as TOML (tables after scalars, as TOML requires); a
    setting that is not set (None) is a comment, so the text loads back as the same settings."""
    lines: list[str] = []
    tables: list[tuple[str, Any]] = []
    for key, value in ((_toml_key(k), v) for k, v in data.items()):
        if value is None:
            lines.append(f"# {key}: not set")
        elif isinstance(value, dict):
            tables.append((key, value))
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            tables.extend((f"[{key}]", item) for item in value)
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for key, value in tables:
        if key.startswith("["):
            name = f"{prefix}{key[1:-1]}"
            lines.append(f"\n[[{name}]]")
            lines.append(to_toml(value, f"{name}.").strip("\n"))
        else:
            name = f"{prefix}{key}"
            body = to_toml(value, f"{name}.")
            if not body.lstrip("\n").startswith("["):
                lines.append(f"\n[{name}]")
            if body.strip():
                lines.append(body.rstrip("\n") if body.startswith("\n") else body.strip("\n"))
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    # JSON's string escapes are TOML's; TOML also wants DEL escaped.
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)
