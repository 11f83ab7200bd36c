"""Indexes the store relies on for correctness (unique) and for its sweeps."""
from __future__ import annotations

from pymongo import ASCENDING, IndexModel
from pymongo.asynchronous.database import AsyncDatabase

# Every index of the saga collection is paid on each checkpoint (a saga document is updated
# once per step, and the dev server rewrites each index's entries on every update), so only
# indexes a query uses are kept.  The supervisor's sweeps read live sagas by state and check
# their TTL themselves, so there is no index on ``expiresAt``.
SAGA_INDEXES = [
    # admission in arrival order, the sweeps' reads by state, listings
    IndexModel([("state", ASCENDING), ("createdAt", ASCENDING)], name="state_created"),
    IndexModel([("job", ASCENDING), ("state", ASCENDING)], name="job_state"),
    # supervisor: waiting sagas that are due (signal came, timer fired, TTL)
    IndexModel([("state", ASCENDING), ("wake_at", ASCENDING)], name="state_wake"),
]
# A repeated start with the same idempotency key returns the existing saga: the keys live in
# their own collection (``saga_keys``, the key as ``_id``), written once at the start, rather
# than behind a partial unique index on the saga collection that every checkpoint would pay.

STAGE_INDEXES = [
    # one stage per sequence number: a re-run can never record a step twice
    IndexModel([("saga", ASCENDING), ("seq", ASCENDING)], name="saga_seq_unique", unique=True),
]

# the relay's order index (essential.persistence.outbox.RELAY_INDEXES) also serves unsent reads
OUTBOX_INDEXES = [
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


#: indexes earlier versions created that no query uses any more: dropped, since each costs every write
RETIRED_INDEXES = {"sagas": ["state_expiry", "idempotency_key_unique"], "outbox": ["unsent"]}
KEYS = "saga_keys"


async def ensure_indexes(db: AsyncDatabase) -> None:
    existing = set(await db.list_collection_names())
    for collection, names in RETIRED_INDEXES.items():
        if collection not in existing:
            continue
        present = {ix["name"] async for ix in await db[collection].list_indexes()}
        if collection == "sagas" and "idempotency_key_unique" in present:
            await _move_keys_out(db)
        for name in present.intersection(names):
            await db[collection].drop_index(name)
    await db["sagas"].create_indexes(SAGA_INDEXES)
    await db["stages"].create_indexes(STAGE_INDEXES)
    await db["outbox"].create_indexes(OUTBOX_INDEXES)
    await db["signals"].create_indexes(SIGNAL_INDEXES)
    await db["locks"].create_indexes(LOCK_INDEXES)


async def _move_keys_out(db: AsyncDatabase) -> None:
    """A database of an earlier version kept its idempotency keys in the saga documents only:
    copy them to ``saga_keys`` before the unique index that guarded them is dropped."""
    rows = [
        {"_id": doc["idempotency_key"], "saga": doc["_id"]}
        async for doc in db["sagas"].find({"idempotency_key": {"$type": "string"}}, {"idempotency_key": 1})
    ]
    for row in rows:
        await db[KEYS].update_one({"_id": row["_id"]}, {"$setOnInsert": row}, upsert=True)
