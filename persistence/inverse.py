"""Applying a recorded stage's inverse to the MongoDB collection of its bucket.

An inverse is state, not a delta: delete these ``_id``s, put these documents
back as they were (replace by ``_id``, inserting when missing).  Applying it a
second time therefore changes nothing more - what makes a compensation
re-run after a crash harmless.  :class:`essential.persistence.recorded_store.RecordedStore`
applies it inside the transaction that also records the ``compensate`` stage,
so a stage is undone and marked undone together, or neither.
"""
from __future__ import annotations

from typing import Any

from pymongo import DeleteMany, ReplaceOne
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection

from essential.orchestration.recorded import Inverse


async def apply_inverse(
    collection: AsyncCollection, inverse: Inverse, session: AsyncClientSession | None = None
) -> dict[str, Any]:
    """Delete, then put back, in one ordered bulk write; returns what it changed."""
    ops: list[Any] = []
    if inverse.delete:
        ops.append(DeleteMany({"_id": {"$in": list(inverse.delete)}}))
    ops += [ReplaceOne({"_id": doc["_id"]}, doc, upsert=True) for doc in inverse.put]
    if not ops:
        return {"deleted": 0, "replaced": 0, "inserted": 0}
    result = await collection.bulk_write(ops, ordered=True, session=session)
    return {"deleted": result.deleted_count, "replaced": result.matched_count, "inserted": result.upserted_count}
