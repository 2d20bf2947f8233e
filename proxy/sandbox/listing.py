"""List paging (cursor, X-Page and start= schemes) and query filters."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import replace

from .store import ListQuery, parse_time

QUERY_FILTERS = ("created_gte", "created_lt", "value_gt")


def encode_cursor(after: int, filters: Mapping[str, str]) -> str:
    """Opaque cursor: the last id seen plus the filters, so it is reusable in any order."""
    raw = json.dumps({"a": after, "f": dict(filters)}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(token: str) -> tuple[int, dict[str, str]]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        after, filters = data["a"], data["f"]
    except (binascii.Error, ValueError, TypeError, KeyError) as exc:
        raise ValueError("invalid cursor") from exc
    if not isinstance(after, int) or not isinstance(filters, dict):
        raise ValueError("invalid cursor")
    if not all(k in QUERY_FILTERS and isinstance(v, str) for k, v in filters.items()):
        raise ValueError("invalid cursor")
    return after, filters


def apply_filters(base: ListQuery, filters: Mapping[str, str], kind: str) -> ListQuery:
    """Add query-string filters to the path's; raises ValueError with a message for the client."""
    query = base
    try:
        if "created_gte" in filters:
            query = replace(query, created_gte=parse_time(filters["created_gte"]))
        if "created_lt" in filters:
            query = replace(query, created_lt=parse_time(filters["created_lt"]))
    except ValueError as exc:
        raise ValueError("created_gte/created_lt must be ISO 8601 dates or date-times") from exc
    if "value_gt" in filters and kind == "orders":
        try:
            query = replace(query, value_gt=float(filters["value_gt"]))
        except ValueError as exc:
            raise ValueError("value_gt must be a number") from exc
    return query


def page_count(total: int, page_size: int) -> int:
    # An empty list still has one (empty) page 0.
    return max(1, -(-total // page_size))
