"""In-memory record store with cached serialisations and memoised list views."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .config import SandboxConfig
from .data import AEST, ORDER_STATUSES, Record, records

KINDS = ("companies", "sites", "products", "customers", "orders")
WRITABLE_KINDS = ("products", "customers", "orders")
_SINGULAR = {"company": "companies", "site": "sites", "product": "products"}
_SINGULAR |= {"customer": "customers", "order": "orders"}

# updated_at is in every abridged record so that a list page changes (and so does its ETag)
# whenever one of its records changes, even in a field the list does not show.
ABRIDGED_FIELDS: dict[str, tuple[str, ...]] = {
    "companies": ("id", "id_str", "name", "updated_at"),
    "sites": ("id", "id_str", "name", "code", "updated_at"),
    "products": ("id", "id_str", "name", "code", "updated_at"),
    "customers": ("id", "id_str", "first_name", "last_name", "email", "updated_at"),
    "orders": ("id", "id_str", "status", "value", "site_id", "created_at", "updated_at"),
}
READ_ONLY_FIELDS = frozenset({"id", "id_str", "created_at", "updated_at"})


class ValidationError(ValueError):
    pass


@dataclass(frozen=True)
class ListQuery:
    """Which records of a collection a list shows; hashable so views can be memoised."""

    site: int | None = None
    statuses: frozenset[str] = frozenset()
    accounts: bool = False
    created_gte: float | None = None
    created_lt: float | None = None
    value_gt: float | None = None


ALL = ListQuery()


def dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def etag_of(body: bytes) -> str:
    return '"' + hashlib.sha1(body, usedforsecurity=False).hexdigest() + '"'


def parse_time(value: str) -> float:
    dt = datetime.fromisoformat(value)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=AEST)
    return dt.timestamp()


class Collection:
    def __init__(self, kind: str, records: list[Record]) -> None:
        self.kind = kind
        self.records: dict[int, Record] = {r["id"]: r for r in records}
        # Kept sorted so list pages are slices and cursors are bisections.
        self.ids: list[int] = sorted(self.records)
        self.next_id = (self.ids[-1] + 1) if self.ids else 1
        self._full: dict[int, tuple[bytes, str]] = {}
        self._abridged: dict[int, bytes] = {}
        self._created: dict[int, float] = {}
        self._views: dict[ListQuery, list[int]] = {}

    def get(self, record_id: int) -> Record | None:
        return self.records.get(record_id)

    def full(self, record_id: int) -> tuple[bytes, str]:
        """Compact JSON bytes of the record and their ETag."""
        cached = self._full.get(record_id)
        if cached is None:
            body = dumps(self.records[record_id])
            cached = self._full[record_id] = (body, etag_of(body))
        return cached

    def abridged(self, record_id: int) -> Record:
        record = self.records[record_id]
        return {k: record.get(k) for k in ABRIDGED_FIELDS[self.kind]}

    def abridged_bytes(self, record_id: int) -> bytes:
        cached = self._abridged.get(record_id)
        if cached is None:
            cached = self._abridged[record_id] = dumps(self.abridged(record_id))
        return cached

    def view(self, query: ListQuery) -> list[int]:
        """Sorted ids matching `query`; callers must not mutate the result."""
        if query == ALL:
            return self.ids
        found = self._views.get(query)
        if found is None:
            if len(self._views) > 256:
                self._views.clear()
            found = self._views[query] = [i for i in self.ids if self._matches(i, query)]
        return found

    def _created_ts(self, record_id: int) -> float:
        ts = self._created.get(record_id)
        if ts is None:
            ts = self._created[record_id] = parse_time(self.records[record_id]["created_at"])
        return ts

    def _matches(self, record_id: int, q: ListQuery) -> bool:
        r = self.records[record_id]
        if q.site is not None:
            if self.kind == "products" and q.site not in r.get("sites", ()):
                return False
            if self.kind == "orders" and r.get("site_id") != q.site:
                return False
        if q.statuses and r.get("status") not in q.statuses:
            return False
        if q.accounts and not r.get("on_account"):
            return False
        if q.created_gte is not None and self._created_ts(record_id) < q.created_gte:
            return False
        if q.created_lt is not None and self._created_ts(record_id) >= q.created_lt:
            return False
        return q.value_gt is None or float(r.get("value") or 0) > q.value_gt

    def changed(self, record_id: int) -> None:
        self._full.pop(record_id, None)
        self._abridged.pop(record_id, None)
        self._created.pop(record_id, None)
        # Any write may move a record in or out of a filtered view.
        self._views.clear()

    def insert(self, record: Record) -> None:
        record_id: int = record["id"]
        self.records[record_id] = record
        # New ids are always above existing ones, so appending keeps the list sorted.
        self.ids.append(record_id)
        self.next_id = record_id + 1
        self.changed(record_id)

    def remove(self, record_id: int) -> bool:
        if self.records.pop(record_id, None) is None:
            return False
        self.ids.remove(record_id)
        self.changed(record_id)
        return True


def _compatible(old: Any, new: Any) -> bool:
    if old is None or new is None:
        return True
    if isinstance(old, bool) or isinstance(new, bool):
        return isinstance(old, bool) and isinstance(new, bool)
    if isinstance(old, int | float):
        return isinstance(new, int | float)
    return type(old) is type(new)


def normalise_kind(kind: str) -> str:
    kind = _SINGULAR.get(kind, kind)
    if kind not in KINDS:
        raise KeyError(f"unknown kind {kind!r}")
    return kind


class _Collections(dict[str, Collection]):
    """The store's collections by kind, each made from the seeded records on first use."""

    def __init__(self, config: SandboxConfig) -> None:
        super().__init__()
        self.config = config

    def __missing__(self, kind: str) -> Collection:
        if kind not in KINDS:
            raise KeyError(kind)
        made = self[kind] = Collection(kind, records(self.config, kind))
        return made


class Store:
    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.collections = _Collections(config)
        self._last_stamp = 0

    def __getitem__(self, kind: str) -> Collection:
        return self.collections[kind]

    @property
    def company(self) -> Record:
        return self.collections["companies"].records[self.config.company_id]

    def _stamp(self) -> str:
        # Strictly increasing whole seconds: two writes within one second must still give
        # different bodies, hence different ETags.
        self._last_stamp = max(int(time.time()), self._last_stamp + 1)
        return datetime.fromtimestamp(self._last_stamp, AEST).isoformat(timespec="seconds")

    def touch(self, kind: str, record_id: int) -> Record:
        coll = self.collections[normalise_kind(kind)]
        record = coll.get(record_id)
        if record is None:
            raise KeyError(f"{kind} {record_id} not found")
        record["updated_at"] = self._stamp()
        coll.changed(record_id)
        return record

    def create(self, kind: str, body: Record) -> Record:
        coll = self.collections[kind]
        record = self._template(kind)
        self._apply(kind, record, body)
        if kind == "products" and not record["name"]:
            raise ValidationError("name is required")
        if kind == "customers" and not (
            record["first_name"] or record["last_name"] or record["email"]
        ):
            raise ValidationError("first_name, last_name or email is required")
        record_id = coll.next_id
        stamp = self._stamp()
        record = {"id": record_id, "id_str": str(record_id), **record}
        record["created_at"] = record["updated_at"] = stamp
        if kind == "orders" and not record["sale_number"]:
            record["sale_number"] = f"{len(coll.ids) + 1:06d}"
        if kind == "products" and not record["code"]:
            record["code"] = f"SKU-{record_id}"
        coll.insert(record)
        return record

    def update(self, kind: str, record_id: int, body: Record) -> Record | None:
        coll = self.collections[kind]
        record = coll.get(record_id)
        if record is None:
            return None
        staged = dict(record)
        self._apply(kind, staged, body)
        staged["updated_at"] = self._stamp()
        record.clear()
        record.update(staged)
        coll.changed(record_id)
        return record

    def delete(self, kind: str, record_id: int) -> bool:
        return self.collections[kind].remove(record_id)

    def _template(self, kind: str) -> Record:
        site_ids = list(self.collections["sites"].ids)
        if kind == "products":
            return {
                "name": "", "code": "", "barcode": "", "description": "",
                "unit_price": 0.0, "cost_price": 0.0, "tax_inclusive": True,
                "category": None, "tags": [], "sites": site_ids,
            }  # fmt: skip
        if kind == "customers":
            return {
                "first_name": "", "last_name": "", "email": "", "phone": "",
                "reference_id": "", "address": {}, "loyalty_points": 0,
            }  # fmt: skip
        return {
            "status": "pending", "sale_number": "",
            "site_id": site_ids[0] if site_ids else None, "customer_id": None,
            "on_account": False, "lines": [], "value": 0.0, "notes": "",
        }  # fmt: skip

    def _apply(self, kind: str, record: Record, body: Record) -> None:
        """Partial update of `record` from `body`; unknown and read-only fields are ignored."""
        for key, value in body.items():
            if key in READ_ONLY_FIELDS or key not in record:
                continue
            if not _compatible(record[key], value):
                raise ValidationError(f"{key} has the wrong type")
            record[key] = value
        self._check(kind, record, body)

    def _check(self, kind: str, record: Record, body: Record) -> None:
        sites = self.collections["sites"].records
        if kind == "products":
            if not all(isinstance(s, int) and s in sites for s in record["sites"]):
                raise ValidationError("sites must list existing site ids")
            if not isinstance(record["name"], str):
                raise ValidationError("name must be a string")
        if kind != "orders":
            return
        if record["status"] not in ORDER_STATUSES:
            raise ValidationError("status must be one of " + ", ".join(ORDER_STATUSES))
        if record["site_id"] is not None and record["site_id"] not in sites:
            raise ValidationError("site_id is not a site of this company")
        customer = record["customer_id"]
        if customer is not None and customer not in self.collections["customers"].records:
            raise ValidationError("customer_id is not a customer of this company")
        total = 0.0
        for line in record["lines"]:
            if not isinstance(line, dict):
                raise ValidationError("lines must be objects")
            qty, price = line.get("quantity", 1), line.get("unit_price", 0)
            if not _compatible(0.0, qty) or not _compatible(0.0, price) or qty is None:
                raise ValidationError("line quantity and unit_price must be numbers")
            total += qty * (price or 0)
        if "lines" in body and "value" not in body:
            record["value"] = round(total + 1e-9, 2)
