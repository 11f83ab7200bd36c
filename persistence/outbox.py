"""Relay queries on an outbox collection: claim a batch, mark it sent, release it.

Two collections have the outbox shape (``_id``, ``topic``, ``key``, ``saga``,
``n``, ``body``, ``headers``, ``createdAt``, ``sent_at``): ``outbox``, written by
the saga store in the same transaction as each state change, and
``command_outbox``, written by Kafka steps (:mod:`persistence.command_outbox`).

Why claims: several gateways may relay the same collection.  A gateway claims
a batch with a lease (``claimed_by``/``claimed_until``); the others skip it
until the lease runs out, so a batch is normally published once, and a batch
whose gateway died is taken over when its lease expires.  Why the ordering
guard: one saga's rows must be published in ``n`` order, so a gateway never
keeps rows of a saga that has an earlier unsent row held by someone else.
"""
from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from typing import Any

from pymongo import ASCENDING, IndexModel
from pymongo.asynchronous.collection import AsyncCollection

#: publication order: oldest first, then each saga's rows by their sequence
RELAY_ORDER = [("createdAt", ASCENDING), ("saga", ASCENDING), ("n", ASCENDING)]

RELAY_INDEXES = [
    IndexModel([("sent_at", ASCENDING), *RELAY_ORDER], name="relay_order"),
    IndexModel([("claimed_by", ASCENDING), ("sent_at", ASCENDING)], name="relay_claims"),
]

_CLAIM = {"claimed_by": "", "claimed_until": ""}


def utcnow() -> datetime:
    """UTC, truncated to milliseconds (what MongoDB stores)."""
    now = datetime.now(timezone.utc)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def _free(now: datetime) -> dict[str, Any]:
    """Unsent and not claimed by anyone whose lease still runs."""
    return {"sent_at": None, "$or": [{"claimed_until": None}, {"claimed_until": {"$lt": now}}]}


class OutboxQueue:
    """The relay's view of one outbox collection, as gateway ``owner``."""

    def __init__(self, collection: AsyncCollection, owner: str) -> None:
        self.collection = collection
        self.owner = owner

    async def ensure_indexes(self) -> None:
        await self.collection.create_indexes(RELAY_INDEXES)

    async def claim(self, limit: int, lease: float) -> list[dict[str, Any]]:
        """Claim up to ``limit`` unsent rows for ``lease`` seconds; returns them in publication order."""
        now = utcnow()
        rows = await self.collection.find(_free(now)).sort(RELAY_ORDER).limit(limit).to_list()
        if not rows:
            return []
        until = now + timedelta(seconds=lease)
        ids = [r["_id"] for r in rows]
        result = await self.collection.update_many(
            {"_id": {"$in": ids}, **_free(now)}, {"$set": {"claimed_by": self.owner, "claimed_until": until}}
        )
        if result.modified_count != len(ids):  # lost some to another gateway: keep what is ours
            mine = {"_id": {"$in": ids}, "claimed_by": self.owner, "claimed_until": until, "sent_at": None}
            rows = await self.collection.find(mine).sort(RELAY_ORDER).to_list()
        return await self._yield_to_earlier(rows)

    async def _yield_to_earlier(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Give back rows of a saga whose earlier unsent row someone else holds (per-saga order)."""
        if not rows:
            return rows
        sagas = list({r["saga"] for r in rows})
        others = self.collection.find(
            {"saga": {"$in": sagas}, "sent_at": None, "claimed_by": {"$ne": self.owner}}, {"saga": 1, "n": 1}
        )
        first_other: dict[Any, int] = {}
        async for doc in others:
            n = doc.get("n", 0)
            if doc["saga"] not in first_other or n < first_other[doc["saga"]]:
                first_other[doc["saga"]] = n
        keep = [r for r in rows if r["saga"] not in first_other or r["n"] < first_other[r["saga"]]]
        if len(keep) != len(rows):
            kept = {r["_id"] for r in keep}
            await self.release(r["_id"] for r in rows if r["_id"] not in kept)
        return keep

    async def mark_sent(self, ids: Iterable[Any]) -> int:
        """Record Kafka's acknowledgement: these rows are never published again."""
        ids = list(ids)
        if not ids:
            return 0
        result = await self.collection.update_many(
            {"_id": {"$in": ids}}, {"$set": {"sent_at": utcnow()}, "$unset": _CLAIM}
        )
        return result.modified_count

    async def release(self, ids: Iterable[Any]) -> None:
        """Give unsent rows back (a failed publish) so the next round, here or elsewhere, retries them."""
        ids = list(ids)
        if ids:
            await self.collection.update_many(
                {"_id": {"$in": ids}, "claimed_by": self.owner, "sent_at": None}, {"$unset": _CLAIM}
            )

    async def release_all(self) -> int:
        """Drop every claim this owner holds: a restarted gateway resumes at once, not after the lease."""
        result = await self.collection.update_many({"claimed_by": self.owner, "sent_at": None}, {"$unset": _CLAIM})
        return result.modified_count

    async def pending(self) -> int:
        return await self.collection.count_documents({"sent_at": None})

    async def prune_sent(self, older_than: datetime) -> int:
        """Delete rows published before ``older_than`` (the outbox is a queue, not an archive)."""
        result = await self.collection.delete_many({"sent_at": {"$lt": older_than}})
        return result.deleted_count
