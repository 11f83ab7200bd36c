"""Sales service (database ``sales``): the orders and their status.

``orders``: ``{_id: order, customer, amount, items, status: pending|paid|cancelled}``.
"""
from __future__ import annotations

from typing import Any

from pymongo.asynchronous.client_session import AsyncClientSession

from essential import StepFailed

from .db import collection, ensure_collections, now
from .ledger import apply_once, undo_once

ORDERS = "sales.orders"
LEDGER = "sales.operations"


async def place(order_id: str, customer: str, amount: int, items: list[dict[str, Any]]) -> None:
    """The shop's side: an order waiting for fulfillment (idempotent)."""
    await collection(ORDERS).update_one(
        {"_id": order_id},
        {"$setOnInsert": {"customer": customer, "amount": amount, "items": items,
                          "status": "pending", "placed_at": now()}},  # fmt: skip
        upsert=True,
    )


async def mark_paid(key: str, order_id: str, customer: str, amount: int, items: list[dict[str, Any]]) -> dict[str, Any]:
    """Mark the order paid (creating it if the shop did not place it first); paying twice is a business failure."""

    async def effect(session: AsyncClientSession) -> dict[str, Any]:
        orders = collection(ORDERS)
        current = await orders.find_one({"_id": order_id}, {"status": 1}, session=session)
        previous = current["status"] if current else None
        if previous not in (None, "pending"):
            raise StepFailed(f"order {order_id!r} is {previous}, not pending")
        await orders.update_one(
            {"_id": order_id},
            {"$set": {"customer": customer, "amount": amount, "items": items, "status": "paid", "paid_at": now()}},
            upsert=True,
            session=session,
        )
        return {"order": order_id, "status": "paid", "previous": previous}

    return await apply_once(LEDGER, key, "mark_paid", effect)


async def cancel(key: str) -> dict[str, Any]:
    """Compensation of :func:`mark_paid`: the order is cancelled."""

    async def undo(session: AsyncClientSession, forward: dict[str, Any]) -> dict[str, Any]:
        await collection(ORDERS).update_one(
            {"_id": forward["order"]}, {"$set": {"status": "cancelled", "cancelled_at": now()}}, session=session
        )
        return {"order": forward["order"], "status": "cancelled"}

    return await undo_once(LEDGER, key, "cancel", undo)


async def status(order_id: str) -> str | None:
    doc = await collection(ORDERS).find_one({"_id": order_id}, {"status": 1})
    return None if doc is None else doc["status"]


async def ensure_indexes() -> None:
    await ensure_collections(ORDERS, LEDGER)
    await collection(ORDERS).create_index([("customer", 1), ("status", 1)])
