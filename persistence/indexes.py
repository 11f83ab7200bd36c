"""Indexes the store relies on for correctness (unique) and for its sweeps."""
from __future__ import annotations

from pymongo import ASCENDING, IndexModel
from pymongo.asynchronous.database import AsyncDatabase

SAGA_INDEXES = [
    # supervisor: TTL expiry and restore sweeps
    IndexModel([("state", ASCENDING), ("expiresAt", ASCENDING)], name="state_expiry"),
    # admission in arrival order, listings
    IndexModel([("state", ASCENDING), ("createdAt", ASCENDING)], name="state_created"),
    IndexModel([("job", ASCENDING), ("state", ASCENDING)], name="job_state"),
    # a repeated start with the same key returns the existing saga
    IndexModel(
        [("idempotency_key", ASCENDING)],
        name="idempotency_key_unique",
        unique=True,
        partialFilterExpression={"idempotency_key": {"$type": "string"}},
    ),
]

STAGE_INDEXES = [
    # one stage per sequence number: a re-run can never record a step twice
    IndexModel([("saga", ASCENDING), ("seq", ASCENDING)], name="saga_seq_unique", unique=True),
]

OUTBOX_INDEXES = [
    IndexModel([("sent_at", ASCENDING), ("createdAt", ASCENDING)], name="unsent"),
    IndexModel([("saga", ASCENDING), ("n", ASCENDING)], name="saga_event_seq_unique", unique=True),
]


async def ensure_indexes(db: AsyncDatabase) -> None:
    await db["sagas"].create_indexes(SAGA_INDEXES)
    await db["stages"].create_indexes(STAGE_INDEXES)
    await db["outbox"].create_indexes(OUTBOX_INDEXES)
