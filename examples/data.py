"""Seed the example services, sum their invariants, and make sample payloads.

``totals()`` is what a compensated saga must leave exactly as it found it: units
in stock, cents across all wallets, free cargo space and available vehicles and
drivers.  Tests, the demo and the benchmarks share these helpers.
"""
from __future__ import annotations

import random
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from .services import db, identity, inventory, invoicing, logistics, notifications, orders, wallet

SERVICES = (inventory, wallet, invoicing, notifications, logistics, identity, orders)


async def ensure_indexes() -> None:
    """Create every service's collections and indexes (idempotent; run before the first saga)."""
    for service in SERVICES:
        await service.ensure_indexes()


async def seed(
    *,
    stock: Mapping[str, int] = {},
    wallets: Mapping[str, int] = {},
    users: Mapping[str, str] = {},
    routes: Mapping[str, int] = {},
    vehicles: Mapping[str, int] = {},
    drivers: Iterable[str] = (),
) -> None:
    """Set levels (re-seeding overwrites them).

    ``stock`` sku → units; ``wallets`` wallet id → cents; ``users`` user id →
    e-mail; ``routes`` route → free cargo units; ``vehicles`` id → capacity;
    ``drivers`` ids.
    """
    await inventory.seed(stock)
    await wallet.seed(wallets)
    await identity.seed(users)
    await logistics.seed(routes, vehicles, drivers)


async def totals() -> dict[str, int]:
    """The invariants: ``stock`` units, ``money`` cents, ``cargo_free`` units,
    ``vehicles_available`` and ``drivers_available``."""
    return {"stock": await inventory.total(), "money": await wallet.total(), **await logistics.totals()}


async def reset() -> None:
    """Drop every service database under the prefix and recreate the indexes."""
    await db.drop_all()
    await ensure_indexes()


# --------------------------------------------------------------------------- demo data
# Many customers and SKUs: sagas on one wallet or one SKU serialise on that
# document (write conflicts, retried), which is the data's limit, not Essential's.
DEMO_CUSTOMERS = [f"cust-{i:03d}" for i in range(50)]
DEMO_SKUS = [f"sku-{i:03d}" for i in range(20)]
DEMO_BROKE = "carol"  # cannot pay: declined subscriptions, failed orders
DEMO_ROUTES = ["north", "south", "east", "west"]


async def seed_demo(fleet: int = 100) -> None:
    """Data that :func:`sample_payload` payloads run against; ``fleet`` vehicles and drivers (one per shipment)."""
    await ensure_indexes()
    people = [*DEMO_CUSTOMERS, DEMO_BROKE]
    await seed(
        stock={sku: 1_000_000 for sku in DEMO_SKUS},
        wallets={**{c: 1_000_000_000 for c in DEMO_CUSTOMERS}, DEMO_BROKE: 0},
        users={u: f"{u}@example.com" for u in people},
        routes={r: 1_000_000_000 for r in DEMO_ROUTES},
        vehicles={f"truck-{i:05d}": 40 for i in range(fleet)},
        drivers=[f"driver-{i:05d}" for i in range(fleet)],
    )


async def seed_demo_once(fleet: int = 100) -> bool:
    """:func:`seed_demo` unless the example data is already there (never resets what sagas changed)."""
    await ensure_indexes()
    if await wallet.balance(DEMO_CUSTOMERS[0]) is not None:
        return False
    await seed_demo(fleet)
    return True


def sample_payload(job: str, **overrides: Any) -> dict[str, Any]:
    """A valid payload for ``job`` against :func:`seed_demo` data, with fresh unique ids."""
    uid = uuid.uuid4().hex[:12]
    pick = random.Random(uid)
    customer, other = pick.sample(DEMO_CUSTOMERS, 2)
    items = [{"sku": sku, "qty": pick.randint(1, 3)} for sku in pick.sample(DEMO_SKUS, 2)]
    samples: dict[str, dict[str, Any]] = {
        "order:fulfillment": {"order_id": f"o-{uid}", "customer": customer, "amount": 1250, "items": items},
        "bank:transfer": {"transfer_id": f"t-{uid}", "source": customer, "target": other, "amount": 500},
        "payment:subscription": {"user_id": customer, "wallet": customer, "plan": "pro", "amount": 900},
        "logistic:shipment": {"shipment_id": f"s-{uid}", "route": pick.choice(DEMO_ROUTES), "volume": 10},
        "user:onboarding": {"user_id": f"u-{uid}", "email": f"u-{uid}@example.com", "name": "New User",
                            "welcome_credit": 500},
        "order:refund": {"refund_id": f"r-{uid}", "order_id": f"o-{uid}", "customer": customer, "amount": 1250,
                         "items": items},
    }  # fmt: skip
    if job not in samples:
        raise KeyError(f"no sample payload for job {job!r}; known: {', '.join(sorted(samples))}")
    return {**samples[job], **overrides}
