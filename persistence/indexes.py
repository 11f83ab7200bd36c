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
    # supervisor: waiting sagas that are due (signal came, timer fired, TTL)
    IndexModel([("state", ASCENDING), ("wake_at", ASCENDING)], name="state_wake"),
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


SIGNAL_INDEXES = [
    IndexModel([("saga", ASCENDING), ("name", ASCENDING), ("at", ASCENDING)], name="saga_name_at"),
    # a signal redelivered with the same key (Kafka, HTTP retries) is stored once
    IndexModel(
        [("saga", ASCENDING), ("name", ASCENDING), ("key", ASCENDING)],
        name="saga_name_key_unique",
        unique=True,
        partialFilterExpression={"key": {"$type": "string"}},
    ),
]

LOCK_INDEXES = [
    # one holder per business key of a bucket
    IndexModel([("bucket", ASCENDING), ("key", ASCENDING)], name="bucket_key_unique", unique=True),
    IndexModel([("saga", ASCENDING)], name="holder"),
]


async def ensure_indexes(db: AsyncDatabase) -> None:
    await db["sagas"].create_indexes(SAGA_INDEXES)
    await db["stages"].create_indexes(STAGE_INDEXES)
    await db["outbox"].create_indexes(OUTBOX_INDEXES)
    await db["signals"].create_indexes(SIGNAL_INDEXES)
    await db["locks"].create_indexes(LOCK_INDEXES)
