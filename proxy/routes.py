"""Route templates for metric labels and logs (pure).

Labels must never hold ids, cursors or anything a caller chose freely, or one
client could create unbounded series. Known Kounta resource names are kept;
every other segment becomes ``{id}``; very deep paths are cut.
"""

from __future__ import annotations

RESOURCES = frozenset(
    {
        "v1",
        "accounts",
        "base",
        "categories",
        "companies",
        "complete",
        "customers",
        "inventory",
        "me",
        "orders",
        "payment_methods",
        "pending",
        "people",
        "price_lists",
        "products",
        "registers",
        "shifts",
        "sites",
        "staff",
        "taxes",
        "token",
        "webhooks",
    }
)
MAX_DEPTH = 8


def template(path: str) -> str:
    """``/v1/companies/5/products/9.json`` → ``/v1/companies/{id}/products/{id}``."""
    segments = path.split("?", 1)[0].strip("/").split("/")
    out: list[str] = []
    for segment in segments[:MAX_DEPTH]:
        name = segment.removesuffix(".json")
        out.append(name if name in RESOURCES else "{id}")
    if len(segments) > MAX_DEPTH:
        out.append("...")
    return "/" + "/".join(out)
