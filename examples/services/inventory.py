"""Inventory service (database ``inventory``): stock levels per SKU.

``stocks``: ``{_id: sku, qty}`` – units available.  Reservations take units out
of ``qty`` (guarded so it never goes negative) and release puts them back, so
the sum of ``qty`` is the invariant a compensation must restore.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pymongo import UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession

from essential import StepFailed

from .db import collection, ensure_collections
from .ledger import apply_once, undo_once

STOCKS = "inventory.stocks"
LEDGER = "inventory.operations"


class StockConflict(RuntimeError):
    """Retryable: units to take back on undo are no longer there (sold meanwhile)."""


def _lines(items: Iterable[Any]) -> list[dict[str, Any]]:
    """Accept ``{"sku", "qty"}`` dicts or objects with ``sku``/``qty`` (payload models)."""
    out = []
    for item in items:
        sku, qty = (item["sku"], item["qty"]) if isinstance(item, Mapping) else (item.sku, item.qty)
        out.append({"sku": str(sku), "qty": int(qty)})
    return out


async def _take(session: AsyncClientSession, lines: list[dict[str, Any]], error: type[Exception]) -> None:
    stocks = collection(STOCKS)
    for line in lines:
        res = await stocks.update_one(
            {"_id": line["sku"], "qty": {"$gte": line["qty"]}}, {"$inc": {"qty": -line["qty"]}}, session=session
        )
        if res.matched_count == 0:
            raise error(f"insufficient stock for {line['sku']}: {line['qty']} unit(s) needed")


async def _give(session: AsyncClientSession, lines: list[dict[str, Any]]) -> None:
    stocks = collection(STOCKS)
    for line in lines:
        res = await stocks.update_one({"_id": line["sku"]}, {"$inc": {"qty": line["qty"]}}, session=session)
        if res.matched_count == 0:
            raise StepFailed(f"unknown sku {line['sku']!r}")


async def reserve(key: str, items: Iterable[Any]) -> dict[str, Any]:
    """Take the units out of stock; all lines or none. Not enough stock is a business failure."""
    lines = _lines(items)

    async def effect(session: AsyncClientSession) -> dict[str, Any]:
        await _take(session, lines, StepFailed)
        return {"items": lines}

    return await apply_once(LEDGER, key, "reserve", effect)


async def release(key: str) -> dict[str, Any]:
    """Compensation of :func:`reserve`: put the reserved units back."""

    async def reverse(session: AsyncClientSession, forward: dict[str, Any]) -> dict[str, Any]:
        await _give(session, forward["items"])
        return {"items": forward["items"]}

    return await undo_once(LEDGER, key, "release", reverse)


async def restock(key: str, items: Iterable[Any]) -> dict[str, Any]:
    """Returned goods go back on the shelf."""
    lines = _lines(items)

    async def effect(session: AsyncClientSession) -> dict[str, Any]:
        await _give(session, lines)
        return {"items": lines}

    return await apply_once(LEDGER, key, "restock", effect)


async def unrestock(key: str) -> dict[str, Any]:
    """Compensation of :func:`restock`; retried (then parked) if the units were sold meanwhile."""

    async def reverse(session: AsyncClientSession, forward: dict[str, Any]) -> dict[str, Any]:
        await _take(session, forward["items"], StockConflict)
        return {"items": forward["items"]}

    return await undo_once(LEDGER, key, "unrestock", reverse)


async def seed(stock: Mapping[str, int]) -> None:
    """Set the stock level of each SKU (creating it)."""
    if stock:
        await collection(STOCKS).bulk_write(
            [UpdateOne({"_id": sku}, {"$set": {"qty": int(qty)}}, upsert=True) for sku, qty in stock.items()]
        )


async def level(sku: str) -> int | None:
    doc = await collection(STOCKS).find_one({"_id": sku})
    return None if doc is None else int(doc["qty"])


async def total() -> int:
    rows = await (await collection(STOCKS).aggregate([{"$group": {"_id": None, "n": {"$sum": "$qty"}}}])).to_list()
    return int(rows[0]["n"]) if rows else 0


async def ensure_indexes() -> None:
    # the ledger's uniqueness is its _id; nothing is looked up by another field
    await ensure_collections(STOCKS, LEDGER)
