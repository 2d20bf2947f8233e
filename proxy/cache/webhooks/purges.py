"""What a delivery invalidates (pure): a :class:`~proxy.cache.invalidation.Change` for the
cache's one invalidation path.

The built-in map, for a topic whose family (first word) is known, in every form the cache
may hold the company in (the numeric id and ``me``; ``*``, one segment, when the delivery
names none: one account is one company):

- each object: ``/v1/companies/{c}/{family}/{id}`` (with ``.json``, any query and variant)
  and everything below it (``.../{id}/*``); never ``{id}`` as a bare prefix, so a change
  to 12 leaves 123 alone;
- the family's lists wherever they appear: any path whose segment ``{family}`` is followed
  only by filter segments (``orders/complete``) or nothing, which covers
  ``/v1/companies/{c}/{family}``, the site lists ``sites/*/{family}`` and the lists that
  embed the family (a product's ``categories/*/products``);
- a delivery without objects (or with too many to list) purges every object of the family.

``[[webhooks.topics]]`` entries whose ``topic`` glob matches add their ``purge`` patterns
(``{company}``, ``{id}``, ``{site}`` placeholders; ``*`` one segment, a trailing ``*``
anything) or, with ``replace = true``, stand instead of the built-in map. A topic with an
unknown family (or none) and no entry purges the whole account.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase

from proxy.cache.invalidation import Change, Invalidation, Purge
from proxy.cache.webhooks.payload import FAMILIES, Delivery
from proxy.settings import WebhookTopic

ROOT = "/v1/companies"


@dataclass(frozen=True, slots=True)
class Plan:
    """The change to apply, and the family label it is counted under."""

    change: Change
    family: str  # a known family, or "other"
    whole_account: bool


def family_label(family: str) -> str:
    return family if family in FAMILIES else "other"


def plan(account: str, delivery: Delivery, topics: Iterable[WebhookTopic]) -> Plan:
    label = family_label(delivery.family)
    entries = [t for t in topics if delivery.topic and fnmatchcase(delivery.topic, t.topic)]
    builtin = label != "other" and not any(t.replace for t in entries)
    if not entries and not builtin:
        return Plan(Purge(account=account), label, True)
    companies = ("me", delivery.company) if delivery.company else ("*",)
    paths: set[str] = set()
    patterns: set[str] = set()
    lists: set[str] = set()
    ids = [o.id for o in delivery.objects] if not delivery.too_many else []
    if builtin:
        family = delivery.family
        lists.add(family)
        for company in companies:
            if not ids:
                patterns.add(f"{ROOT}/{company}/{family}/*")
            for id_ in ids:
                where = f"{ROOT}/{company}/{family}/{id_}"
                (paths if company != "*" else patterns).add(where)
                patterns.add(f"{where}/*")
                if company == "*":
                    patterns.add(f"{where}.json")
    for entry in entries:
        patterns.update(_expand(entry.purge, companies, delivery))
    inv = Invalidation(account, frozenset(paths), frozenset(lists), frozenset(patterns))
    return Plan(inv, label, False)


def _expand(templates: Iterable[str], companies: Iterable[str], delivery: Delivery) -> set[str]:
    objects = [(o.id, o.site or "*") for o in delivery.objects] or [("*", "*")]
    if delivery.too_many:
        objects = [("*", "*")]
    found: set[str] = set()
    for template in templates:
        for company in companies:
            for id_, site in objects:
                found.add(template.format_map({"company": company, "id": id_, "site": site}))
    return found
