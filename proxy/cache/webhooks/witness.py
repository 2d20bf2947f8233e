"""List pages as witnesses: one request that checks many cached records at once.

A record a lost delivery left stale stays stale until its next change, but one request can
check only one record. A list page (``/v1/companies/{c}/products.json``) shows an abridged
copy of each of its members (Kounta's lists: a bare JSON array of objects with ``id``), so
one fetched page says which cached members disagree with Kounta on a field both show. Such a
record is only a suspect (a list may show a field in another form): the verifier then
revalidates it, and that check alone decides whether a delivery was missed.

Pure functions (table-tested): the paths, the page walk and the comparison.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Iterator, Mapping
from typing import Any, Literal

from yarl import URL

# A record: /v1/companies/{c}/{family}/{id}[.json]
RECORD = re.compile(r"^(/v1/companies/[^/]+/)([a-z_]+)/(\d+)(\.json)?$")
# A list: /v1/companies/{c}/{family}[.json], or one under another record (sites/{s}/...).
LIST = re.compile(r"^(/v1/companies/[^/]+/)(?:[a-z_]+/\d+/)?([a-z_]+)(\.json)?$")
# Fields every member and record show that say nothing about a change.
IDENTITY = frozenset({"id", "id_str"})
MAX_BODY = 4 * 1024 * 1024  # decoded bytes compared at most (a larger body: not compared)


Choice = Literal["suspect", "list", "record"]


def choose(suspects: bool, covered: bool | None) -> Choice:
    """What the verifier's next request checks: a suspect first; else a list page, unless
    the last one it fetched showed no cached member (``covered`` False: then one record is
    revalidated, and the list is tried again after it)."""
    if suspects:
        return "suspect"
    return "record" if covered is False else "list"


def family_list(record: str) -> str | None:
    """The list page of ``record``'s family (same company, same ``.json`` spelling)."""
    m = RECORD.match(record)
    if m is None:
        return None
    return f"{m[1]}{m[2]}{m[4] or ''}"


def member_path(listing: str, member: str) -> str | None:
    """The record path of the list member whose id is ``member``."""
    m = LIST.match(listing)
    if m is None or not member.isdigit():
        return None
    return f"{m[1]}{m[2]}/{member}{m[3] or ''}"


def next_page(header: str | None, listing: str) -> str | None:
    """The path and query of the page after ``listing`` (``X-Next-Page``, absolute or not);
    None at the end, or when the header names another resource."""
    if not header:
        return None
    try:
        url = URL(header.strip())
    except ValueError:
        return None
    if url.raw_path != listing.split("?", 1)[0]:
        return None
    return url.raw_path_qs


def decoded(body: bytes, encoding: str | None) -> bytes | None:
    """The body without its content coding (identity or gzip), at most MAX_BODY bytes;
    None when it cannot be read or is larger."""
    coding = (encoding or "identity").strip().lower()
    if coding in ("", "identity"):
        return body if len(body) <= MAX_BODY else None
    if coding not in ("gzip", "x-gzip"):
        return None
    try:
        inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        out = inflate.decompress(body, MAX_BODY + 1)
    except zlib.error:
        return None
    return out if len(out) <= MAX_BODY else None


def members(body: bytes) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(id, member) for each object with an ``id`` or ``id_str`` in a list page's JSON (a
    bare array, or one under ``data``); nothing for anything else."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return
    if isinstance(parsed, dict):
        parsed = parsed.get("data")
    if not isinstance(parsed, list):
        return
    for item in parsed:
        if isinstance(item, dict):
            ident = item.get("id", item.get("id_str"))
            if isinstance(ident, int | str) and not isinstance(ident, bool):
                yield str(ident), item


def fingerprint(member: Mapping[str, Any]) -> str:
    """The member as the page showed it (to know it again)."""
    return json.dumps(member, sort_keys=True, separators=(",", ":"), default=str)


def disagrees(member: Mapping[str, Any], record: bytes) -> bool:
    """Whether the cached ``record`` (JSON bytes) shows another value than the list
    ``member`` in a field both show (ids aside); False when the record is not an object."""
    try:
        parsed = json.loads(record)
    except ValueError:
        return False
    if not isinstance(parsed, dict):
        return False
    return any(
        name in parsed and parsed[name] != value
        for name, value in member.items()
        if name not in IDENTITY
    )
