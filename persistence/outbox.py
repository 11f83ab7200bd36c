"""Relay queries on an outbox collection: the relay lease, the next batch, marking rows sent.

Two collections have the outbox shape (``_id``, ``topic``, ``key``, ``saga``,
``n``, ``body``, ``headers``, ``createdAt``, ``sent_at``): ``outbox``, written by
the saga store in the same transaction as each state change, and
``command_outbox``, written by Kafka steps (:mod:`essential.persistence.command_outbox`).

A row leaves the queue when Kafka acknowledged it (``sent_at``), when Kafka
refused it for good (``refused_at``: too large, invalid topic; set aside so it
cannot block the relay) or when it was withdrawn before it was sent
(``withdrawn_at``: a participant command whose step is already being
compensated).  Each of them is deleted once older than the retention.

Why a lease per collection rather than claims per row: several gateways may
run, but one saga's rows must be published in ``n`` order, and marking each
row claimed costs a write per row (measured on the dev MongoDB: that write
doubled the relay's cost).  So one gateway at a time relays a collection: it
holds a lease in ``relay_leases`` (owner + expiry) and renews it while it
works; the others stand by and take over when the lease runs out.  A gateway
restarted under the same name takes its lease back at once.
"""
from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from typing import Any

from pymongo import ASCENDING, IndexModel, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

LEASES = "relay_leases"

#: publication order: oldest first, then each saga's rows by their sequence
RELAY_ORDER = [("createdAt", ASCENDING), ("saga", ASCENDING), ("n", ASCENDING)]

RELAY_INDEXES = [IndexModel([("sent_at", ASCENDING), *RELAY_ORDER], name="relay_order")]

_UNSENT = {"sent_at": None, "refused_at": None, "withdrawn_at": None}


def utcnow() -> datetime:
    """UTC, truncated to milliseconds (what MongoDB stores)."""
    now = datetime.now(timezone.utc)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


class OutboxQueue:
    """The relay's view of one outbox collection, as gateway ``owner``."""

    def __init__(self, collection: AsyncCollection, owner: str) -> None:
        self.collection = collection
        self.owner = owner
        self.leases = collection.database[LEASES]
        self._held_until: datetime | None = None

    async def ensure_indexes(self) -> None:
        await self.collection.create_indexes(RELAY_INDEXES)

    # -- the relay lease ---------------------------------------------------------------------
    async def hold(self, lease: float) -> bool:
        """True while this owner holds the collection's relay lease (renewed once a fifth of it is used)."""
        now = utcnow()
        if self._held_until is not None and self._held_until - now > timedelta(seconds=lease * 0.8):
            return True
        until = now + timedelta(seconds=lease)
        try:
            doc = await self.leases.find_one_and_update(
                {"_id": self.collection.name, "$or": [{"owner": self.owner}, {"until": {"$lt": now}}]},
                {"$set": {"owner": self.owner, "until": until}},
                upsert=True,
                return_document=ReturnDocument.AFTER,
            )
        except DuplicateKeyError:  # another owner's lease still runs
            doc = None
        self._held_until = until if doc is not None else None
        return doc is not None

    async def release_lease(self) -> None:
        """Hand the lease over at once (a clean stop) instead of letting it expire."""
        self._held_until = None
        await self.leases.update_one(
            {"_id": self.collection.name, "owner": self.owner}, {"$set": {"until": utcnow()}}
        )

    # -- rows ------------------------------------------------------------------------------------
    async def next_batch(self, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` unsent rows in publication order (rows Kafka refused for good excepted)."""
        return await self.collection.find(_UNSENT).sort(RELAY_ORDER).limit(limit).to_list()

    async def mark_sent(self, ids: Iterable[Any]) -> int:
        """Record Kafka's acknowledgement: these rows are not published again."""
        ids = list(ids)
        if not ids:
            return 0
        result = await self.collection.update_many(
            {"_id": {"$in": ids}, "sent_at": None}, {"$set": {"sent_at": utcnow()}}
        )
        return result.modified_count

    async def mark_refused(self, errors: dict[Any, str]) -> None:
        """Set aside rows Kafka will never take (too large, invalid topic), so they cannot block the relay."""
        now = utcnow()
        for row_id, error in errors.items():
            await self.collection.update_one({"_id": row_id}, {"$set": {"refused_at": now, "relay_error": error}})

    async def refused(self) -> int:
        """Rows Kafka refused for good, still kept (until the retention) for an operator to look at."""
        return await self.collection.count_documents({"sent_at": None, "refused_at": {"$ne": None}})

    async def withdrawn(self) -> int:
        return await self.collection.count_documents({"sent_at": None, "withdrawn_at": {"$ne": None}})

    async def rewind(self, since: datetime) -> int:
        """Mark rows sent since ``since`` unsent again: the broker lost them (see essential.actors.kafka.broker_watch)."""
        result = await self.collection.update_many({"sent_at": {"$gte": since}}, {"$set": {"sent_at": None}})
        return result.modified_count

    async def pending(self) -> int:
        return await self.collection.count_documents(_UNSENT)

    async def prune_sent(self, older_than: datetime) -> int:
        """Delete rows published before ``older_than`` (the outbox is a queue, not an archive)."""
        result = await self.collection.delete_many({"sent_at": {"$lt": older_than}})
        return result.deleted_count

    async def prune_set_aside(self, older_than: datetime) -> int:
        """Delete rows refused or withdrawn before ``older_than``: they were reported and are never sent."""
        result = await self.collection.delete_many(
            {"sent_at": None, "$or": [{"refused_at": {"$lt": older_than}}, {"withdrawn_at": {"$lt": older_than}}]}
        )
        return result.deleted_count
