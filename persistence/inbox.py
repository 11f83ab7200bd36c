"""What arrives from Kafka, stored as it arrives: participants' replies and the log of applied commands.

Why replies are stored rather than handed to the saga's actor: the actor may be
down when the reply comes; the Kafka step reads the ``inbox`` when it
(re)runs, so a reply is never lost.  Replies are keyed by ``(saga, seq, kind)``
and the first one wins, so a participant that replies twice changes nothing.

Why a command log: a command is applied before its offset is committed, so a
gateway that dies in between sees it again.  The log, keyed by the message's
topic, partition, offset and timestamp, lets the gateway recognise it and move
on (the timestamp tells apart two messages that got the same offset because the
topic was recreated).
"""
from __future__ import annotations

from datetime import datetime
from typing import Any

from pymongo import ASCENDING, IndexModel
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from essential.persistence.outbox import utcnow

INBOX = "inbox"
COMMAND_LOG = "command_log"

INBOX_INDEXES = [IndexModel([("received_at", ASCENDING)], name="received_at")]
COMMAND_LOG_INDEXES = [IndexModel([("at", ASCENDING)], name="at")]


def reply_id(saga_id: str, seq: int, kind: str) -> str:
    return f"{saga_id}:{seq}:{kind}"


async def ensure_indexes(db: AsyncDatabase) -> None:
    await db[INBOX].create_indexes(INBOX_INDEXES)
    await db[COMMAND_LOG].create_indexes(COMMAND_LOG_INDEXES)


async def store_reply(db: AsyncDatabase, *, saga_id: str, seq: int, kind: str, reply: dict[str, Any]) -> bool:
    """Keep the first reply for ``(saga_id, seq, kind)``; True when this one was stored."""
    _id = reply_id(saga_id, seq, kind)
    doc = {**reply, "saga": saga_id, "seq": seq, "kind": kind, "received_at": utcnow()}
    try:
        result = await db[INBOX].update_one({"_id": _id}, {"$setOnInsert": doc}, upsert=True)
    except DuplicateKeyError:  # a concurrent upsert of the same reply won
        return False
    return result.upserted_id is not None


async def find_reply(db: AsyncDatabase, saga_id: str, seq: int, kind: str) -> dict[str, Any] | None:
    return await db[INBOX].find_one({"_id": reply_id(saga_id, seq, kind)})


class CommandLog:
    """Commands already handled (applied or dead-lettered), by Kafka message identity."""

    def __init__(self, db: AsyncDatabase) -> None:
        self.collection = db[COMMAND_LOG]

    async def seen(self, key: str) -> dict[str, Any] | None:
        return await self.collection.find_one({"_id": key})

    async def record(self, key: str, outcome: str, **fields: Any) -> None:
        try:
            await self.collection.insert_one({"_id": key, "outcome": outcome, "at": utcnow(), **fields})
        except DuplicateKeyError:
            pass  # handled twice concurrently (rebalance): the first record stands

    async def prune(self, older_than: datetime) -> int:
        return (await self.collection.delete_many({"at": {"$lt": older_than}})).deleted_count
