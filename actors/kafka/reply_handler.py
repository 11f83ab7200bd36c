"""Participants' replies, stored in the ``inbox`` as they arrive (before their offset is committed).

The waiting Kafka step reads the inbox, not Kafka, so a reply that arrives
while the saga's actor is down is found when the saga resumes.  A reply is
stored only if it answers a command this deployment sent (its row is in
``command_outbox``): the inbox cannot be filled with replies nothing waits for.
Anything else goes to the reply dead-letter topic with the reason.
"""
from __future__ import annotations

import logging
from collections import Counter

from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord
from pydantic import ValidationError
from pymongo.asynchronous.database import AsyncDatabase

from essential.actors.kafka import dlq
from essential.actors.kafka.command_handler import failure_rejection, unreadable_rejection
from essential.actors.kafka.commands import (
    INVALID_COMMAND,
    NOT_STORABLE,
    UNKNOWN_COMMAND,
    Rejection,
    load_json,
    validation_problems,
)
from essential.actors.kafka.config import dead_letter_budget
from essential.actors.kafka.consumer import Failed, Unreadable
from essential.actors.kafka.participant_protocol import ParticipantReply
from essential.actors.settings import Settings
from essential.orchestration import storable
from essential.persistence import command_outbox
from essential.persistence.inbox import reply_id, store_reply

log = logging.getLogger("essential.gateway.replies")


def parse_reply(value: bytes | None, max_bytes: int) -> ParticipantReply | Rejection:
    data = load_json(value, max_bytes, what="reply")
    if isinstance(data, Rejection):
        return data
    try:
        reply = ParticipantReply.model_validate(data)
    except ValidationError as exc:
        return Rejection(INVALID_COMMAND, "invalid reply: " + "; ".join(validation_problems(exc, "<reply>")))
    found = storable.problems(reply.result, "result")
    if found:
        return Rejection(NOT_STORABLE, "; ".join(found))
    return reply


class ReplyHandler:
    def __init__(self, settings: Settings, owner: str, producer: AIOKafkaProducer, db: AsyncDatabase) -> None:
        self.settings = settings
        self.owner = owner
        self.producer = producer
        self.db = db
        self.counts: Counter[str] = Counter()

    async def handle(self, msg: ConsumerRecord) -> None:
        reply = parse_reply(msg.value, self.settings.kafka_max_command_bytes)
        if isinstance(reply, Rejection):
            await self._reject(dlq.Source.of(msg), reply)
            return
        answered = reply_id(reply.saga, reply.seq, reply.kind)
        if await self.db[command_outbox.COLLECTION].find_one({"_id": answered}, {"_id": 1}) is None:
            await self._reject(dlq.Source.of(msg), Rejection(
                UNKNOWN_COMMAND, f"no command {answered} was sent by this deployment (or its row was pruned "
                                 "after the retention): nothing waits for this reply"))  # fmt: skip
            return
        stored = await store_reply(
            self.db,
            saga_id=reply.saga,
            seq=reply.seq,
            kind=reply.kind,
            reply={
                "ok": reply.ok, "result": reply.result, "error": reply.error,
                "idempotency_key": reply.idempotency_key,
                "source": {"topic": msg.topic, "partition": msg.partition, "offset": msg.offset},
            },
        )  # fmt: skip
        self.counts["stored" if stored else "duplicates"] += 1

    async def poison(self, msg: ConsumerRecord, failed: Failed) -> None:
        await self._reject(dlq.Source.of(msg), failure_rejection(failed), attempts=failed.attempts)

    async def unreadable(self, item: Unreadable) -> None:
        await self._reject(dlq.Source(item.topic, item.partition, item.offset), unreadable_rejection(item))

    async def _reject(self, source: dlq.Source, rejection: Rejection, attempts: int = 1) -> None:
        await dlq.publish(self.producer, self.settings.kafka_reply_dlq_topic, source, rejection, self.owner,
                          attempts=attempts, budget=dead_letter_budget(self.settings))  # fmt: skip
        self.counts[f"dead_letter.{rejection.code}"] += 1
        log.warning("reply at %s@%d offset %d dead-lettered (%s): %s", source.topic, source.partition, source.offset,
                    rejection.code, rejection.reason[:300])  # fmt: skip
