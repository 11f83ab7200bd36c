"""Participants' replies, stored in the ``inbox`` as they arrive (before their offset is committed).

The waiting Kafka step reads the inbox, not Kafka, so a reply that arrives
while the saga's actor is down is found when the saga resumes.  A reply that
cannot be parsed goes to the reply dead-letter topic.
"""
from __future__ import annotations

import json
import logging
from collections import Counter

from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord
from pydantic import ValidationError
from pymongo.asynchronous.database import AsyncDatabase

from persistence.inbox import store_reply

from .dead_letters import dead_letter
from .kafka_commands import GATEWAY_ERROR, INVALID_COMMAND, NOT_JSON, TOO_LARGE, Rejection
from .participant_protocol import ParticipantReply
from .kafka_config import max_value_bytes
from .settings import Settings

log = logging.getLogger("essential.gateway.replies")


def parse_reply(value: bytes | None, max_bytes: int) -> ParticipantReply | Rejection:
    size = len(value or b"")
    if size > max_bytes:
        return Rejection(TOO_LARGE, f"reply of {size} bytes exceeds the limit of {max_bytes} bytes")
    try:
        data = json.loads(value or b"")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return Rejection(NOT_JSON, f"not a JSON document: {exc}")
    try:
        return ParticipantReply.model_validate(data)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in e['loc']) or '<reply>'}: {e['msg']}" for e in exc.errors()[:10]]
        return Rejection(INVALID_COMMAND, "invalid reply: " + "; ".join(problems))


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
            await self._reject(msg, reply)
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

    async def poison(self, msg: ConsumerRecord, exc: BaseException) -> None:
        await self._reject(msg, Rejection(GATEWAY_ERROR, f"{type(exc).__name__}: {exc}"))

    async def _reject(self, msg: ConsumerRecord, rejection: Rejection) -> None:
        limit = max_value_bytes(self.settings)
        await dead_letter(self.producer, self.settings.kafka_reply_dlq_topic, msg, rejection, self.owner, limit)
        self.counts[f"dead_letter.{rejection.code}"] += 1
        log.warning("reply at %s@%d offset %d dead-lettered: %s", msg.topic, msg.partition, msg.offset,
                    rejection.reason)  # fmt: skip
