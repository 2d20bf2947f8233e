"""A webhook delivery read tolerantly (pure: no I/O, and never an exception but
:class:`Unreadable`).

Kounta documents neither the body's shape nor a delivery id (shared/reference/
kounta-facts.md), so every plausible shape is accepted:

- the topic from the body's ``topic``, ``event`` or ``type`` (a string), else an
  ``X-*-Topic`` header; its words separated by ``/`` (``orders/completed``, seen) or ``.``
  (``product.updated``); lower-cased, joined with ``/``; a singular family is made plural
  when that names a known one (``product`` -> ``products``, ``category`` -> ``categories``);
- the changed objects as one object or a list, at the top level or under ``data``,
  ``object``, ``objects`` or ``payload`` (nested up to three levels), each with ``id_str``
  or ``id``; an id that is not a plain token (letters, digits, ``_``, ``-``) is ignored;
- the company from ``company_id`` or ``company.id`` (on the body or an object);
- the site from an object's ``site_id`` or ``site.id``;
- an event id from ``event_id`` / ``delivery_id`` / ``webhook_event_id`` on the body, else
  an ``X-*-Event-Id``, ``X-*-Delivery-Id`` or ``X-*-Delivery`` header. A top-level ``id``
  beside an envelope key is *not* taken for one: it may be the webhook's own id, the same
  for every delivery.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# The resource families the built-in map knows (the topic's first word); others: "other".
FAMILIES = (
    *("products", "categories", "customers", "orders", "inventory", "sites"),
    *("price_lists", "staff", "registers", "payment_methods", "taxes", "shifts"),
)
ENVELOPES = ("data", "object", "objects", "payload")
EVENT_KEYS = ("event_id", "delivery_id", "webhook_event_id")
TOPIC_KEYS = ("topic", "event", "type")
MAX_OBJECTS = 1000  # beyond that, the delivery purges the family (see purges.py)
MAX_DEPTH = 3
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TOPIC_WORD = re.compile(r"[a-z0-9_-]{1,64}")
_TOPIC_HEADER = re.compile(r"x-(.+-)?topic", re.IGNORECASE)
_EVENT_HEADER = re.compile(r"x-(.+-)?(event-id|delivery-id|delivery)", re.IGNORECASE)


class Unreadable(ValueError):
    """Not a delivery at all (not JSON, not an object or list): one line for a 400."""


@dataclass(frozen=True, slots=True)
class Changed:
    id: str
    site: str | None = None


@dataclass(frozen=True, slots=True)
class Delivery:
    topic: str  # "products/updated"; "" when none was found
    family: str  # the topic's first word, plural; "" when no topic
    objects: tuple[Changed, ...]
    company: str | None
    event_id: str | None
    too_many: bool = False  # more than MAX_OBJECTS objects: treat as "the family changed"


def parse(body: bytes, headers: Mapping[str, str]) -> Delivery:
    """The delivery ``body`` (raw JSON) and its ``headers`` describe."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise Unreadable("the body is not JSON") from None
    if not isinstance(data, dict | list):
        raise Unreadable("the body is neither a JSON object nor a list")
    top = data if isinstance(data, dict) else {}
    topic = normal_topic(_first_text(top, TOPIC_KEYS) or _header(headers, _TOPIC_HEADER))
    objects = list(_objects(data))
    company = _token(_id_of(top, "company")) or next(
        (c for c in (_token(_id_of(o, "company")) for o in objects) if c), None
    )
    changed = tuple(dict.fromkeys(c for c in map(_changed, objects) if c is not None))
    event_id = _first_text(top, EVENT_KEYS, numbers=True) or _header(headers, _EVENT_HEADER)
    return Delivery(
        topic=topic,
        family=topic.split("/", 1)[0],
        objects=changed[:MAX_OBJECTS],
        company=company,
        event_id=event_id[:200] if event_id else None,
        too_many=len(changed) > MAX_OBJECTS,
    )


def normal_topic(text: str) -> str:
    """``Product.Updated`` -> ``products/updated``; "" when it is no topic."""
    words = [w for w in re.split(r"[/.]", text.strip().lower()) if w]
    if not words or not all(_TOPIC_WORD.fullmatch(w) for w in words):
        return ""
    words[0] = plural(words[0])
    return "/".join(words)


def plural(word: str) -> str:
    if word in FAMILIES:
        return word
    for candidate in (f"{word}s", f"{word[:-1]}ies" if word.endswith("y") else ""):
        if candidate in FAMILIES:
            return candidate
    return word


def _first_text(data: Mapping[str, Any], keys: Iterable[str], numbers: bool = False) -> str:
    for key in keys:
        value = data.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
        if numbers and isinstance(value, int) and not isinstance(value, bool):
            return str(value)
    return ""


def _header(headers: Mapping[str, str], name: re.Pattern[str]) -> str:
    for key, value in headers.items():
        if name.fullmatch(key) and value.strip():
            return value.strip()
    return ""


def _objects(data: Any, depth: int = 0) -> Iterable[dict[str, Any]]:
    """The changed objects: those under an envelope key if the body has one, else the body
    itself (an object with an id, or a list of them)."""
    if depth > MAX_DEPTH:
        return
    if isinstance(data, list):
        for item in data[: MAX_OBJECTS + 1]:
            yield from _objects(item, depth + 1)
        return
    if not isinstance(data, dict):
        return
    inner = [data[k] for k in ENVELOPES if isinstance(data.get(k), dict | list)]
    if inner:
        for value in inner:
            yield from _objects(value, depth + 1)
    elif "id" in data or "id_str" in data:
        yield data


def _token(value: object) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        value = str(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        value = str(int(value))
    return value if isinstance(value, str) and _TOKEN.fullmatch(value) else None


def _id_of(data: Mapping[str, Any], name: str) -> object:
    """``{name}_id``, else ``{name}.id_str`` / ``{name}.id``."""
    direct = data.get(f"{name}_id")
    if direct is not None:
        return direct
    nested = data.get(name)
    if isinstance(nested, dict):
        return nested.get("id_str", nested.get("id"))
    return None


def _changed(data: Mapping[str, Any]) -> Changed | None:
    found = _token(data.get("id_str")) or _token(data.get("id"))
    if found is None:
        return None
    return Changed(found, _token(_id_of(data, "site")))
