"""Deterministic seeded records that look like Kounta's."""

from __future__ import annotations

import functools
import gc
import pickle
import random
from datetime import datetime, timedelta, timezone
from typing import Any

from .config import SandboxConfig

Record = dict[str, Any]

# Kounta reports local times with an offset; a fixed AEST offset keeps the data reproducible.
AEST = timezone(timedelta(hours=10))

# Above 2**53 so that id_str is the only exact form for JavaScript-style clients.
FIRST_ORDER_ID = 2**53 + 1
FIRST_PRODUCT_ID = 100_001
FIRST_CUSTOMER_ID = 300_001
FIRST_SITE_ID = 101

ORDER_STATUSES = ("complete", "pending", "on_hold", "cancelled", "refunded")
_STATUS_WEIGHTS = (70, 12, 8, 6, 4)

_CITIES = ("Sydney", "Melbourne", "Brisbane", "Perth", "Adelaide", "Hobart", "Darwin", "Canberra")
_ADJECTIVES = (
    "Flat", "Iced", "Large", "Small", "Organic", "Spiced", "Toasted", "Double", "Smoked",
    "Vegan", "Classic", "Crème", "Golden", "Wild", "Salted", "Honey",
)  # fmt: skip
_NOUNS = (
    "White", "Latte", "Mocha", "Chai", "Croissant", "Muffin", "Bagel", "Sourdough", "Brownie",
    "Frappé", "Banana Bread", "Quiche", "Salad", "Wrap", "Smoothie", "Tea", "Scone", "Pie",
)  # fmt: skip
_CATEGORIES = ("Coffee", "Tea", "Bakery", "Kitchen", "Cold Drinks", "Retail")
_FIRST = (
    "Olivia", "Jack", "Charlotte", "Noah", "Amelia", "William", "Zoë", "José", "Mia", "Liam",
    "Chloé", "Thomas", "Renée", "Aarav", "Mei", "Lachlan", "Isla", "Hamish", "Ngaio", "Ana",
)  # fmt: skip
_LAST = (
    "Smith", "Jones", "Williams", "Brown", "Wilson", "Taylor", "Nguyen", "O'Brien", "Müller",
    "Singh", "Kelly", "Martin", "Anderson", "White", "Chen", "García", "Walker", "Tran",
)  # fmt: skip


def iso(dt: datetime) -> str:
    return dt.astimezone(AEST).isoformat(timespec="seconds")


def _phone(rng: random.Random) -> str:
    # Australian mobiles start with 04: the leading zero must survive as a string.
    return f"04{rng.randint(0, 99):02d} {rng.randint(0, 999):03d} {rng.randint(0, 999):03d}"


def _money(value: float) -> float:
    return round(value + 1e-9, 2)


def generate(config: SandboxConfig) -> dict[str, list[Record]]:
    """All records by kind, each list sorted by id; same config gives the same data."""
    return {kind: records(config, kind) for kind in _generated(config)}


def records(config: SandboxConfig, kind: str) -> list[Record]:
    """A fresh copy of one kind's records (the sandbox edits its records), made from a pickle
    remembered per config and kind: unpickling is a fifth of generating, tests start many
    sandboxes, and most read one kind or two (the store unpickles a kind on first use).

    The garbage collector is paused meanwhile: the records hold no cycles, and their tens of
    thousands of new containers would otherwise set off collections that free nothing (more
    than half the time of a copy)."""
    pickled = _generated(config)[kind]
    paused = gc.isenabled()
    gc.disable()
    try:
        copy: list[Record] = pickle.loads(pickled)  # noqa: S301 - ours
    finally:
        if paused:
            gc.enable()
    return copy


@functools.lru_cache(maxsize=8)
def _generated(config: SandboxConfig) -> dict[str, bytes]:
    return {kind: pickle.dumps(found) for kind, found in _generate(config).items()}


def _generate(config: SandboxConfig) -> dict[str, list[Record]]:
    rng = random.Random(config.seed)
    epoch = datetime(2024, 1, 1, 8, 0, tzinfo=AEST)
    company_created = datetime(2021, 6, 1, 9, 0, tzinfo=AEST)
    company: Record = {
        "id": config.company_id,
        "id_str": str(config.company_id),
        "name": "Sandbox Coffee Co",
        "shop_name": "Sandbox Coffee",
        "business_name": "Sandbox Coffee Co Pty Ltd",
        "business_number": f"{rng.randint(10**10, 10**11 - 1)}",
        "email": "owner@sandbox-coffee.example",
        "phone": "02 9000 0000",
        "timezone": "Australia/Sydney",
        "currency": "AUD",
        "created_at": iso(company_created),
        "updated_at": iso(company_created),
    }

    sites: list[Record] = []
    for n in range(config.sites):
        site_id = FIRST_SITE_ID + n
        city = _CITIES[n % len(_CITIES)]
        created = company_created + timedelta(days=30 * n)
        sites.append(
            {
                "id": site_id,
                "id_str": str(site_id),
                "name": f"Sandbox {city}"
                + (f" {n // len(_CITIES) + 1}" if n >= len(_CITIES) else ""),
                "code": f"S{n + 1:03d}",
                "business_name": company["business_name"],
                "email": f"site{n + 1}@sandbox-coffee.example",
                "phone": f"0{rng.randint(2, 8)} {rng.randint(0, 9999):04d} "
                f"{rng.randint(0, 9999):04d}",
                "address": {
                    "address": f"{rng.randint(1, 400)} George Street",
                    "city": city,
                    "zone": "NSW",
                    "postal_code": f"{rng.randint(800, 7999):04d}",
                    "country": "AU",
                },
                "created_at": iso(created),
                "updated_at": iso(created),
            }
        )
    site_ids = [s["id"] for s in sites]

    products: list[Record] = []
    product_id = FIRST_PRODUCT_ID
    for _ in range(config.products):
        name = f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"
        price = _money(rng.uniform(2.5, 25.0))
        created = company_created + timedelta(minutes=rng.randint(0, 900_000))
        category = rng.randrange(len(_CATEGORIES))
        products.append(
            {
                "id": product_id,
                "id_str": str(product_id),
                "name": name,
                "code": f"SKU-{product_id}",
                "barcode": f"{rng.randint(0, 10**13 - 1):013d}",
                "description": f"{name}, made fresh daily.",
                "unit_price": price,
                "cost_price": _money(price * rng.uniform(0.25, 0.6)),
                "tax_inclusive": True,
                "category": {"id": 900 + category, "name": _CATEGORIES[category]},
                "tags": sorted(rng.sample(("popular", "seasonal", "gluten_free", "new"), 1)),
                "sites": sorted(rng.sample(site_ids, rng.randint(1, len(site_ids))))
                if site_ids
                else [],
                "created_at": iso(created),
                "updated_at": iso(created),
            }
        )
        product_id += rng.randint(1, 7)

    customers: list[Record] = []
    customer_id = FIRST_CUSTOMER_ID
    for _ in range(config.customers):
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        created = company_created + timedelta(minutes=rng.randint(0, 900_000))
        slug = f"{first}.{last}".lower().replace("'", "").replace(" ", "")
        customers.append(
            {
                "id": customer_id,
                "id_str": str(customer_id),
                "first_name": first,
                "last_name": last,
                "email": f"{slug}{customer_id % 1000}@example.com",
                "phone": _phone(rng),
                "reference_id": f"C{customer_id}",
                "address": {
                    "city": rng.choice(_CITIES),
                    "postal_code": f"{rng.randint(800, 7999):04d}",
                    "country": "AU",
                },
                "loyalty_points": rng.randint(0, 500),
                "created_at": iso(created),
                "updated_at": iso(created),
            }
        )
        customer_id += rng.randint(1, 5)

    orders: list[Record] = []
    order_id = FIRST_ORDER_ID
    created = epoch
    for _ in range(config.orders):
        # Ids grow with creation time, as with the real API, so id order is also date order.
        created += timedelta(seconds=rng.randint(30, 3_600))
        lines: list[Record] = []
        for _ in range(rng.randint(1, 4)):
            product = rng.choice(products) if products else None
            lines.append(
                {
                    "product_id": product["id"] if product else None,
                    "quantity": rng.randint(1, 3),
                    "unit_price": product["unit_price"] if product else 5.0,
                }
            )
        customer = rng.choice(customers) if customers and rng.random() < 0.4 else None
        status = rng.choices(ORDER_STATUSES, _STATUS_WEIGHTS)[0]
        orders.append(
            {
                "id": order_id,
                "id_str": str(order_id),
                "status": status,
                "sale_number": f"{len(orders) + 1:06d}",
                "site_id": rng.choice(site_ids) if site_ids else None,
                "customer_id": customer["id"] if customer else None,
                "on_account": bool(customer) and rng.random() < 0.2,
                "lines": lines,
                "value": _money(sum(ln["quantity"] * ln["unit_price"] for ln in lines)),
                "notes": "",
                "created_at": iso(created),
                "updated_at": iso(created),
            }
        )
        order_id += rng.randint(1, 1_000)

    return {
        "companies": [company],
        "sites": sites,
        "products": products,
        "customers": customers,
        "orders": orders,
    }
