"""Maps a /v1/ path onto a record or list of the store."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .data import ORDER_STATUSES
from .store import ALL, WRITABLE_KINDS, ListQuery, Store

_SUFFIX = re.compile(r"\.([A-Za-z0-9]+)$")
_ORDER_SEGMENTS = frozenset(ORDER_STATUSES) | {"accounts"}
_NOUNS = {"companies": "Company", "sites": "Site", "products": "Product"}
_NOUNS |= {"customers": "Customer", "orders": "Order"}


@dataclass(frozen=True)
class Target:
    kind: str
    record_id: int | None  # None: a list
    query: ListQuery
    suffix: str | None  # "json", another extension, or None
    allow: tuple[str, ...]
    collection_path: str  # where POST creates records, for Location
    is_me: bool = False


@dataclass(frozen=True)
class NotFound:
    description: str


def _int(segment: str) -> int | None:
    return int(segment) if segment.isdigit() and len(segment) < 20 else None


def resolve(path: str, store: Store) -> Target | NotFound:
    if not path.startswith("/v1/"):
        return NotFound("Unknown endpoint")
    rest = path[len("/v1/") :]
    suffix = None
    match = _SUFFIX.search(rest)
    if match:
        suffix = match.group(1).lower()
        rest = rest[: match.start()]
    segs = rest.split("/")
    if len(segs) < 2 or segs[0] != "companies":
        return NotFound("Unknown endpoint")
    company_id = store.config.company_id
    read_only = ("GET", "HEAD", "OPTIONS")
    base = f"/v1/companies/{company_id}"

    def target(kind: str, record_id: int | None, query: ListQuery = ALL, **kw: bool) -> Target:
        if record_id is not None and store[kind].get(record_id) is None:
            raise LookupError(f"{_NOUNS[kind]} {record_id} not found")
        allow: tuple[str, ...]
        if record_id is not None and kind in WRITABLE_KINDS:
            allow = ("GET", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS")
        elif record_id is None and kind in WRITABLE_KINDS and query == ALL:
            allow = ("GET", "HEAD", "POST", "OPTIONS")
        else:
            allow = read_only
        return Target(kind, record_id, query, suffix, allow, f"{base}/{kind}", kw.get("me", False))

    try:
        if segs == ["companies", "me"]:
            return target("companies", company_id, me=True)
        if _int(segs[1]) != company_id:
            return NotFound(f"Company {segs[1]} not found")
        tail = segs[2:]
        if not tail:
            return target("companies", company_id)
        site: int | None = None
        if tail[0] == "sites":
            if len(tail) == 1:
                return target("sites", None)
            site = _int(tail[1])
            if site is None or store["sites"].get(site) is None:
                return NotFound(f"Site {tail[1]} not found")
            if len(tail) == 2:
                return target("sites", site)
            tail = tail[2:]
            if tail[0] not in ("orders", "products"):
                return NotFound("Unknown endpoint")
        kind = tail[0]
        if kind not in WRITABLE_KINDS:
            return NotFound("Unknown endpoint")
        if len(tail) == 1:
            return target(kind, None, ListQuery(site=site))
        record_id = _int(tail[1])
        if len(tail) == 2 and record_id is not None and site is None:
            return target(kind, record_id)
        if kind == "orders" and all(s in _ORDER_SEGMENTS for s in tail[1:]):
            statuses = frozenset(tail[1:]) - {"accounts"}
            query = ListQuery(site=site, statuses=statuses, accounts="accounts" in tail[1:])
            return target(kind, None, query)
        return NotFound("Unknown endpoint")
    except LookupError as exc:
        return NotFound(str(exc))
