"""Route labels for metrics and logs, from a fixed, finite set (pure).

A label never holds an id, a cursor or anything a caller chose freely, and it is always
one of :data:`LABELS`: Kounta's documented route templates (``/v1/companies/{id}/products``),
:data:`OTHER` for any other path, and :data:`REFUSED` for requests the proxy refused before it
knew the caller (counted by :mod:`proxy.edge.middlewares`). Matching walks a tree built once
from :data:`TEMPLATES`, so a path that only *looks* like Kounta's (known words at any depth)
cannot invent a label: 15,000 such requests used to create 228,000 series.
"""

from __future__ import annotations

from dataclasses import dataclass, field

OTHER = "other"
REFUSED = "refused"
# Kounta's order filters: extra path segments that combine (orders/pending/accounts).
ORDER_FILTERS = frozenset(
    {"complete", "pending", "on_hold", "cancelled", "refunded", "accounts", "open", "closed"}
)
# Company resources (see shared/reference): each has a list and, where Kounta has them, records.
_LISTS = (
    "sites",
    "products",
    "categories",
    "customers",
    "people",
    "price_lists",
    "taxes",
    "registers",
    "staff",
    "shifts",
    "webhooks",
    "orders",
    "payment_methods",
)
_RECORDS = tuple(r for r in _LISTS if r != "payment_methods")
_COMPANY = "/v1/companies/{id}"
_SITE = _COMPANY + "/sites/{id}"
TEMPLATES: tuple[str, ...] = (
    "/v1/token",
    "/v1/companies/me",
    _COMPANY,
    *(f"{_COMPANY}/{r}" for r in _LISTS),
    *(f"{_COMPANY}/{r}/{{id}}" for r in _RECORDS),
    f"{_COMPANY}/categories/{{id}}/products",
    f"{_COMPANY}/price_lists/base",
    *(f"{_COMPANY}/orders/{f}" for f in sorted(ORDER_FILTERS)),
    f"{_COMPANY}/orders/{{filters}}",  # two or more filter segments
    *(f"{_SITE}/{r}" for r in ("products", "categories", "orders", "inventory")),
    f"{_SITE}/orders/{{filters}}",  # one or more filter segments
)
LABELS = frozenset((*TEMPLATES, OTHER, REFUSED))
# A wildcard segment in TEMPLATES: any one path segment.
_ANY = "{id}"
_FILTERS = "{filters}"


@dataclass
class _Node:
    literal: dict[str, _Node] = field(default_factory=dict)
    wildcard: _Node | None = None
    filters: str | None = None  # the label when the rest is one or more order filters
    label: str | None = None  # the label when the path ends here


def _tree(templates: tuple[str, ...]) -> _Node:
    root = _Node()
    for template in templates:
        node = root
        for segment in template.strip("/").split("/"):
            if segment == _FILTERS:
                node.filters = template
                break
            if segment == _ANY:
                node.wildcard = node.wildcard or _Node()
                node = node.wildcard
            else:
                node = node.literal.setdefault(segment, _Node())
        else:
            node.label = template
    return root


_ROOT = _tree(TEMPLATES)


def template(path: str) -> str:
    """``/v1/companies/5/products/9.json`` → ``/v1/companies/{id}/products/{id}``; a path
    matching no documented route → ``other``. Always a member of :data:`LABELS`."""
    segments = path.split("?", 1)[0].strip("/").split("/")
    segments[-1] = segments[-1].removesuffix(".json")
    return _match(_ROOT, segments) or OTHER


def _match(node: _Node, segments: list[str]) -> str | None:
    """The label of the first template matching ``segments`` (literals before wildcards)."""
    if not segments:
        return node.label
    head, rest = segments[0], segments[1:]
    child = node.literal.get(head)
    found = _match(child, rest) if child is not None else None
    if found is None and node.wildcard is not None and head:
        found = _match(node.wildcard, rest)
    if found is None and node.filters is not None and all(s in ORDER_FILTERS for s in segments):
        found = node.filters
    return found


# A caller-chosen segment in a breaker key is cut to this many characters.
KEY_SEGMENT_MAX = 64


def breaker_key(path: str) -> str:
    """What a route's circuit breaker watches: the template when one matches; else the part
    of the path the templates know (ids as ``{id}``) and the next segment, so
    ``/v1/novel/5`` → ``/v1/novel`` and ``/v1/companies/5/novel/7`` →
    ``/v1/companies/{id}/novel``. Failures of one undocumented path fail that one fast,
    not every other one. Not a metric label: it may hold a segment a caller chose."""
    found = template(path)
    if found != OTHER:
        return found
    segments = path.split("?", 1)[0].strip("/").split("/")
    known: list[str] = []
    node = _ROOT
    for segment in segments:
        segment = segment.removesuffix(".json")
        child = node.literal.get(segment)
        if child is not None:
            known.append(segment)
        elif node.wildcard is not None and segment:
            known.append(_ANY)
            child = node.wildcard
        else:
            known.append(_ANY if segment.isdigit() else segment[:KEY_SEGMENT_MAX])
            break
        node = child
    return "/" + "/".join(known)
