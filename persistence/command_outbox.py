"""Commands that Kafka steps send to participants, queued durably for the gateway's relay.

Why a queue in MongoDB and not a direct produce: the step's command must
survive the step's actor dying, and a re-run of the step (same saga, same stage
sequence) must find the command it already sent instead of sending a different
one.  The row's id is ``<saga>:<seq>:<kind>``, so the first write wins and
every re-run reads it back.  Rows have the outbox shape (see
:mod:`essential.persistence.outbox`), with ``n`` counting the saga's commands in the
order they were queued.

Why a counter document per saga (``command_counters``) rather than counting
rows: rows are pruned once sent, and a count would hand out a number again.
The counter only grows; it is read, advanced and the row inserted in one
transaction, so two commands never share a number.  It is deleted only when its
saga has ended (:mod:`essential.persistence.kafka_retention`), after which the saga sends
nothing more.

A ``compensate`` command withdraws the ``run`` command of the same step if Kafka
never took it: a participant must not receive an operation whose undo is
already on its way.  One that was sent stays sent; the relay then delivers the
compensation after it (one row per saga in flight, in ``n`` order).
"""
from __future__ import annotations

from typing import Any

from pymongo import ASCENDING, IndexModel
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from essential.orchestration.errors import CommandNotQueued
from essential.persistence.documents import oid
from essential.persistence.outbox import utcnow

COLLECTION = "command_outbox"
COUNTERS = "command_counters"
#: attempts at numbering a command while concurrent writers of the same saga collide
ATTEMPTS = 10

INDEXES = [IndexModel([("saga", ASCENDING), ("n", ASCENDING)], name="saga_command_seq_unique", unique=True)]
COUNTER_INDEXES = [IndexModel([("at", ASCENDING)], name="at")]


class _Collision(Exception):
    """Another writer advanced the saga's counter between our read and our write."""


def command_id(saga_id: str, seq: int, kind: str) -> str:
    return f"{saga_id}:{seq}:{kind}"


async def ensure_indexes(db: AsyncDatabase) -> None:
    await db[COLLECTION].create_indexes(INDEXES)
    await db[COUNTERS].create_indexes(COUNTER_INDEXES)


async def enqueue(
    db: AsyncDatabase,
    *,
    saga_id: str,
    seq: int,
    kind: str,
    topic: str,
    body: dict[str, Any],
    headers: dict[str, str],
) -> dict[str, Any]:
    """Queue the command for ``(saga_id, seq, kind)`` unless one is queued already; return the stored row."""
    commands = db[COLLECTION]
    _id = command_id(saga_id, seq, kind)
    if kind == "compensate":
        await withdraw(db, command_id(saga_id, seq, "run"))
    existing = await commands.find_one({"_id": _id})
    if existing is not None:
        return existing
    await _seed_counter(db, saga_id)
    for _ in range(ATTEMPTS):
        try:
            async with db.client.start_session() as session:

                async def insert(s: AsyncClientSession) -> dict[str, Any]:
                    return await _insert_numbered(db, s, _id, saga_id, seq, kind, topic, body, headers)

                return await session.with_transaction(insert)
        except (DuplicateKeyError, _Collision):
            existing = await commands.find_one({"_id": _id})
            if existing is not None:
                return existing  # the same command, queued by a concurrent run: first write wins
    raise CommandNotQueued(_id, ATTEMPTS)


async def withdraw(db: AsyncDatabase, row_id: str) -> bool:
    """Keep the relay from ever sending ``row_id`` if it has not been sent; True when withdrawn now."""
    result = await db[COLLECTION].update_one(
        {"_id": row_id, "sent_at": None, "withdrawn_at": None},
        {"$set": {"withdrawn_at": utcnow(), "relay_error": "withdrawn: its step was compensated before Kafka took it"}},
    )
    return result.modified_count == 1


async def _seed_counter(db: AsyncDatabase, saga_id: str) -> None:
    """Create the saga's counter if missing, past any number its rows already carry (rows queued before
    counters existed)."""
    saga = oid(saga_id)
    if await db[COUNTERS].find_one({"_id": saga}, {"_id": 1}) is not None:
        return
    top = await db[COLLECTION].find_one({"saga": saga}, {"n": 1}, sort=[("n", -1)])
    try:
        await db[COUNTERS].update_one(
            {"_id": saga}, {"$setOnInsert": {"n": int(top["n"]) if top else 0, "at": utcnow()}}, upsert=True
        )
    except DuplicateKeyError:
        pass  # a concurrent first command created it


async def _insert_numbered(
    db: AsyncDatabase,
    session: AsyncClientSession,
    _id: str,
    saga_id: str,
    seq: int,
    kind: str,
    topic: str,
    body: dict[str, Any],
    headers: dict[str, str],
) -> dict[str, Any]:
    saga = oid(saga_id)
    counter = await db[COUNTERS].find_one({"_id": saga}, session=session)
    if counter is None:
        raise _Collision(saga_id)
    n = int(counter["n"]) + 1
    now = utcnow()
    advanced = await db[COUNTERS].update_one(
        {"_id": saga, "n": counter["n"]}, {"$set": {"n": n, "at": now}}, session=session
    )
    if advanced.modified_count != 1:
        raise _Collision(saga_id)
    row = {
        "_id": _id,
        "topic": topic,
        "key": saga_id,
        "saga": saga,
        "n": n,
        "seq": seq,
        "kind": kind,
        "body": {**body, "id": _id, "n": n},
        "headers": {k: v for k, v in headers.items() if v},
        "createdAt": now,
        "sent_at": None,
    }
    await db[COLLECTION].insert_one(row, session=session)
    return row
