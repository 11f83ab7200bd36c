"""Commands that Kafka steps send to participants, queued durably for the gateway's relay.

Why a queue in MongoDB and not a direct produce: the step's command must
survive the step's actor dying, and a re-run of the step (same saga, same stage
sequence) must find the command it already sent instead of sending a different
one.  The row's id is ``<saga>:<seq>:<kind>``, so the first write wins and
every re-run reads it back.  Rows have the outbox shape (see
:mod:`persistence.outbox`), with ``n`` counting the saga's commands in the
order they were queued.
"""
from __future__ import annotations

from typing import Any

from pymongo import ASCENDING, IndexModel
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from .documents import oid
from .outbox import utcnow

COLLECTION = "command_outbox"

INDEXES = [IndexModel([("saga", ASCENDING), ("n", ASCENDING)], name="saga_command_seq_unique", unique=True)]


def command_id(saga_id: str, seq: int, kind: str) -> str:
    return f"{saga_id}:{seq}:{kind}"


async def ensure_indexes(db: AsyncDatabase) -> None:
    await db[COLLECTION].create_indexes(INDEXES)


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
    for _ in range(10):
        existing = await commands.find_one({"_id": _id})
        if existing is not None:
            return existing
        n = await commands.count_documents({"saga": oid(saga_id)}) + 1
        row = {
            "_id": _id,
            "topic": topic,
            "key": saga_id,
            "saga": oid(saga_id),
            "n": n,
            "seq": seq,
            "kind": kind,
            "body": {**body, "id": _id, "n": n},
            "headers": {k: v for k, v in headers.items() if v},
            "createdAt": utcnow(),
            "sent_at": None,
        }
        try:
            await commands.insert_one(row)
            return row
        except DuplicateKeyError:
            continue  # the same command (first write wins) or a concurrent n: read again
    raise RuntimeError(f"could not queue command {_id}: its sequence number kept colliding")
