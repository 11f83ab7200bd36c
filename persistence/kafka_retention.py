"""Retention of what the Kafka boundary stores beside the outboxes: participants' replies and command counters.

Why only for ended sagas: a saga still running (or parked, or compensating)
may run its Kafka step again after a crash and must find the reply it got, and
may still queue commands, whose numbers must keep growing.  Once the saga has
ended, neither is read again, so both are deleted after the retention; a reply
for a saga that does not exist is deleted then too.  Outbox rows have their own
pruning (:class:`essential.persistence.outbox.OutboxQueue`), the command log its own
(:class:`essential.persistence.inbox.CommandLog`).
"""
from __future__ import annotations

from datetime import datetime
from typing import Any

from bson import ObjectId
from bson.errors import InvalidId
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from essential.orchestration.states import TERMINAL_STATES
from essential.persistence.command_outbox import COUNTERS
from essential.persistence.inbox import INBOX

#: rows looked at per round trip
CHUNK = 500


async def prune_replies(db: AsyncDatabase, older_than: datetime) -> int:
    """Delete replies received before ``older_than`` whose saga has ended or is unknown."""
    return await _prune_ended(db, db[INBOX], {"received_at": {"$lt": older_than}}, saga_of=lambda row: row.get("saga"))


async def prune_counters(db: AsyncDatabase, older_than: datetime) -> int:
    """Delete the command counters of sagas that ended, last used before ``older_than``."""
    return await _prune_ended(db, db[COUNTERS], {"at": {"$lt": older_than}}, saga_of=lambda row: row["_id"])


async def _prune_ended(db: AsyncDatabase, rows: AsyncCollection, old: dict[str, Any], *, saga_of: Any) -> int:
    deleted = 0
    last: Any = None
    while True:
        query = dict(old) if last is None else {**old, "_id": {"$gt": last}}
        chunk = await rows.find(query, {"_id": 1, "saga": 1}).sort("_id", 1).limit(CHUNK).to_list()
        if not chunk:
            return deleted
        last = chunk[-1]["_id"]
        ids = {row["_id"]: _as_oid(saga_of(row)) for row in chunk}
        wanted = [s for s in set(ids.values()) if s is not None]
        live = {d["_id"] async for d in db["sagas"].find(
            {"_id": {"$in": wanted}, "state": {"$nin": [s.value for s in TERMINAL_STATES]}}, {"_id": 1})}  # fmt: skip
        ended = [row_id for row_id, saga in ids.items() if saga not in live]
        if ended:
            deleted += (await rows.delete_many({"_id": {"$in": ended}})).deleted_count


def _as_oid(value: Any) -> ObjectId | None:
    if isinstance(value, ObjectId):
        return value
    try:
        return ObjectId(str(value))
    except (InvalidId, TypeError):
        return None
