"""Which upstream URL a request target may reach (pure).

The upstream host is fixed: a request target is accepted only in origin form
(``/v1/...``), and anything that could make a path mean something else once a
server decodes it is refused rather than "cleaned". Path and query are then
passed on byte for byte, because Kounta's paging cursors are opaque.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from yarl import URL

from proxy.errors import InvalidRequest, NotFound

API_PREFIX = "/v1/"
# RFC 3986 pchar plus "/" and "%" (escapes are checked separately).
_PATH_CHARS = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*")
_QUERY_CHARS = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/?%\[\]|{}^`\"<> ]*")
_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_FORBIDDEN_ESCAPES = re.compile(r"%(2f|5c|00|0a|0d|2e)", re.IGNORECASE)
# "%25" is an encoded "%": "%252e" decodes once to "%2e" and twice to ".".
_ENCODED_PERCENT = re.compile(r"%25", re.IGNORECASE)
_ESCAPED_BYTE = re.compile(r"%([0-9A-Fa-f]{2})")
# Where a segment's path parameters begin (RFC 3986 3.3): servlet stacks drop them before
# resolving dot segments, so "..;x" (or "..%3bx", decoded first by some) means "..".
_PARAMETERS = re.compile(r";|%3b", re.IGNORECASE)
# Decoding rounds checked; more nested "%25" than this is refused outright.
_MAX_DECODES = 4


# RFC 9112 3.2 / RFC 3986 3.2.2: uri-host [ ":" port ]; empty is allowed (RFC 9112 3.2).
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(:[0-9]*)?")


@functools.lru_cache(maxsize=256)
def valid_host(value: str | None) -> bool:
    """Whether a Host field value is ``host[:port]`` or absent (callers send a handful:
    remembered)."""
    return value is None or _HOST.fullmatch(value) is not None


class InvalidTarget(InvalidRequest):
    code = "invalid_request_target"


@dataclass(frozen=True, slots=True)
class Target:
    path: str  # raw, still percent-encoded
    query: str  # raw, without "?"; "" when absent

    @property
    def path_qs(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path


def parse_target(raw: str) -> Target:
    """Accept an origin-form target under ``/v1/``, or raise a 400/404
    :class:`~proxy.errors.ProxyError`."""
    if not raw.startswith("/"):
        raise InvalidTarget("Only origin-form request targets (/v1/...) are accepted")
    if raw.startswith("//"):
        raise InvalidTarget("The request target must not start with '//'")
    path, sep, query = raw.partition("?")
    _check_path(path)
    if sep:
        _check_query(query)
    if not path.startswith(API_PREFIX):
        raise NotFound(f"No such endpoint: only {API_PREFIX}... is proxied")
    return Target(path=path, query=query)


def _check_path(path: str) -> None:
    if "\\" in path:
        raise InvalidTarget("Backslashes are not allowed in the path")
    if "//" in path:
        raise InvalidTarget("Empty path segments ('//') are not allowed")
    if not _PATH_CHARS.fullmatch(path):
        raise InvalidTarget("The path contains characters that must be percent-encoded")
    if _ESCAPE.search(path):
        raise InvalidTarget("The path contains a malformed percent-escape")
    if _FORBIDDEN_ESCAPES.search(path):
        raise InvalidTarget("Encoded '/', '\\', '.', NUL, CR or LF are not allowed in the path")
    if _ENCODED_PERCENT.search(path):
        _check_nested_escapes(path)
    if "%" in path and not _utf8(path):
        raise InvalidTarget(
            "The path's percent-escapes are not valid UTF-8 (overlong or malformed sequences)"
        )
    if _dot_segment(path):
        raise InvalidTarget(
            "Dot segments ('.' or '..', also with path parameters such as '..;') are not "
            "allowed in the path"
        )


def _dot_segment(path: str) -> bool:
    """Whether a segment is '.' or '..', also once its path parameters are dropped."""
    return any(_PARAMETERS.split(segment, 1)[0] in (".", "..") for segment in path.split("/"))


def _check_nested_escapes(path: str) -> None:
    """Refuse what a server that decodes twice (or more) would read as '/', '\\', '.' or a
    control character: ``%252e``, ``%25252f``, any case."""
    text = path
    for _ in range(_MAX_DECODES):
        text = _ENCODED_PERCENT.sub("%", text)
        if _FORBIDDEN_ESCAPES.search(text) or _dot_segment(text) or not _utf8(text):
            raise InvalidTarget(
                "Double-encoded '/', '\\', '.', ';' after a dot segment, NUL, CR, LF or invalid "
                "UTF-8 are not allowed in the path"
            )
        if not _ENCODED_PERCENT.search(text):
            return
    raise InvalidTarget("The path nests percent-encoding too deeply")


def _utf8(path: str) -> bool:
    """Whether the path's escaped bytes form valid UTF-8: strict decoding refuses overlong
    forms (``%c0%ae`` for '.', ``%e0%80%af`` for '/'), surrogates and stray bytes."""
    raw = _ESCAPED_BYTE.sub(lambda m: chr(int(m.group(1), 16)), path).encode("latin-1")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _check_query(query: str) -> None:
    if not _QUERY_CHARS.fullmatch(query) or " " in query:
        raise InvalidTarget("The query contains characters that must be percent-encoded")
    if _ESCAPE.search(query):
        raise InvalidTarget("The query contains a malformed percent-escape")
    if re.search(r"%(00|0a|0d)", query, re.IGNORECASE):
        raise InvalidTarget("Encoded NUL, CR or LF are not allowed in the query")


# RFC 3986 2.3: an escape of one of these means the character itself.
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def normal_escapes(text: str) -> str:
    """``text`` with its percent-escapes normalised as RFC 3986 6.2.2.1-2 says: an escaped
    unreserved character decoded (``%31`` -> ``1``, ``%7e`` -> ``~``), every other escape's
    hex upper-cased (``%2f`` -> ``%2F``). Equivalent spellings of one URI become one; the
    bytes a server decodes are unchanged. For cache keys: targets are still forwarded as sent.
    Text with a malformed escape is not a URI and is returned as it is (decoding ``%A%41``
    would make a new escape, ``%AA``)."""
    if "%" not in text or _ESCAPE.search(text):
        return text
    return _ESCAPED_BYTE.sub(_normal_escape, text)


def _normal_escape(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else match.group(0).upper()


def upstream_url(base: URL, target: Target) -> URL:
    """``base`` + path + query, without re-encoding anything the caller sent."""
    prefix = str(base.origin()) + base.raw_path.rstrip("/")
    return URL(prefix + target.path_qs, encoded=True)
