"""The settings' vocabulary: the errors a load reports, :class:`Secret`, and the small
checks the sections share."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from yarl import URL

ENV_PREFIX = "KOUNTA_PROXY_"
DEFAULT_CONFIG_PATH = Path("kounta-proxy.toml")
MASK = "********"


class ConfigError(Exception):
    """A configuration problem, phrased for one line on a terminal. ``key`` is the setting's
    path; ``label``, if given, is what the line names instead (an environment variable)."""

    def __init__(self, key: str, problem: str, *, label: str = "") -> None:
        self.key = key
        self.problem = problem
        self.label = label
        shown = label or key
        super().__init__(f"{shown}: {problem}" if shown else problem)


class ConfigErrors(ConfigError):
    """Every problem found in one load, so an operator fixes them all in one go."""

    def __init__(self, problems: list[ConfigError]) -> None:
        self.problems = problems
        first = problems[0]
        super().__init__(first.key, first.problem, label=first.label)

    def lines(self) -> list[str]:
        return [str(p) for p in self.problems]


class Invalid(ValueError):
    """Raised by a section's ``__post_init__``; the loader adds the section path."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}")


class Secret:
    """A string that never shows itself in ``repr``, ``str`` or logs.

    ``source`` names the ``*_file`` it was read from (shown by check-config; not secret).
    """

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str = "") -> None:
        self._value = value
        self.source = source

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return f"Secret({MASK!r})" if self._value else "Secret('')"

    __str__ = __repr__


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_http_url(key: str, value: str, *, https_unless_loopback: bool) -> None:
    url = URL(value)
    if url.scheme not in ("http", "https") or not url.host:
        raise Invalid(key, f"must be an absolute http(s) URL, got {value!r}")
    if url.query_string or url.fragment:
        raise Invalid(key, "must not carry a query or fragment")
    if https_unless_loopback and url.scheme != "https" and not is_loopback_host(url.host):
        raise Invalid(key, "must use https (plain http is only allowed for loopback hosts)")


def _not_negative(section: object, *names: str) -> None:
    for name in names:
        if getattr(section, name) < 0:
            raise Invalid(name, "must not be negative")


def _positive(section: object, *names: str) -> None:
    for name in names:
        if getattr(section, name) <= 0:
            raise Invalid(name, "must be greater than 0")
