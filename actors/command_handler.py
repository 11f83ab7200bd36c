"""Applying one command message: validate, call the supervisor, or dead-letter it.

Order of effects, which is what makes redelivery harmless:

1. the command is applied durably through the supervisor (saga created, abort
   requested); a start without an idempotency key gets one derived from the
   message's identity, so a redelivered start returns the saga it created;
2. the outcome is written to the command log;
3. only then does the consumer loop commit the offset.

A gateway dying anywhere in between sees the message again and either finds it
in the log or applies it again to the same effect.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import Counter
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from persistence.inbox import CommandLog

from .dead_letters import dead_letter
from .kafka_commands import (
    GATEWAY_ERROR,
    INVALID_COMMAND,
    INVALID_PAYLOAD,
    REJECTED,
    UNKNOWN_JOB,
    UNSUPPORTED,
    AbortCommand,
    CommitCommand,
    Rejection,
    SignalCommand,
    StartCommand,
    parse_command,
)
from .kafka_config import max_value_bytes
from .settings import Settings

log = logging.getLogger("essential.gateway.commands")

#: the supervisor's typed errors, as dead-letter codes
ERROR_CODES = {
    "UnknownJob": UNKNOWN_JOB,
    "InvalidPayload": INVALID_PAYLOAD,
    "InvalidRequest": INVALID_COMMAND,
    "SagaNotFound": "saga_not_found",
    "IllegalTransition": "illegal_transition",
}
COMMIT_UNSUPPORTED = (
    "commit applies to recorded sagas, which are not supported yet; "
    "an orchestrated saga commits by itself after its last step"
)
MAX_KEY = 200


def message_key(msg: ConsumerRecord) -> str:
    """The message's identity: topic, partition, offset and the producer's timestamp.

    The timestamp keeps two messages apart that got the same offset because the
    topic was recreated (the dev broker forgets topics when it restarts).
    """
    key = f"kafka:{msg.topic}:{msg.partition}:{msg.offset}:{msg.timestamp}"
    if len(key) > MAX_KEY:
        key = "kafka:" + hashlib.sha256(key.encode()).hexdigest()
    return key


def header(msg: ConsumerRecord, name: str) -> str | None:
    for key, value in msg.headers or ():
        if key.lower() in (name, name.replace("_", "-")) and value:
            try:
                return value.decode()
            except UnicodeDecodeError:
                return None
    return None


class CommandHandler:
    def __init__(self, settings: Settings, owner: str, producer: AIOKafkaProducer, command_log: CommandLog) -> None:
        self.settings = settings
        self.owner = owner
        self.producer = producer
        self.log = command_log
        self.counts: Counter[str] = Counter()
        self._supervisor: Any = None

    async def supervisor(self) -> Any:
        if self._supervisor is None:
            from .client import get_supervisor

            self._supervisor = await asyncio.to_thread(get_supervisor, self.settings)
        return self._supervisor

    async def handle(self, msg: ConsumerRecord) -> None:
        key = message_key(msg)
        if await self.log.seen(key) is not None:
            self.counts["duplicates"] += 1
            return
        parsed = parse_command(msg.value, self.settings.kafka_max_command_bytes)
        outcome = parsed if isinstance(parsed, Rejection) else await self._apply(parsed, msg, key)
        if isinstance(outcome, Rejection):
            await self._reject(msg, key, outcome)
            return
        await self.log.record(key, "applied", type=parsed.type, saga=outcome)  # type: ignore[union-attr]
        self.counts[f"applied.{parsed.type}"] += 1  # type: ignore[union-attr]

    async def poison(self, msg: ConsumerRecord, exc: BaseException) -> None:
        """A message the gateway could not handle after several tries: dead-letter it and move on."""
        await self._reject(msg, message_key(msg), Rejection(GATEWAY_ERROR, f"{type(exc).__name__}: {exc}"))

    async def _reject(self, msg: ConsumerRecord, key: str, rejection: Rejection) -> None:
        limit = max_value_bytes(self.settings)
        await dead_letter(self.producer, self.settings.kafka_dlq_topic, msg, rejection, self.owner, limit)
        await self.log.record(key, "dead_letter", code=rejection.code, reason=rejection.reason[:500])
        self.counts[f"dead_letter.{rejection.code}"] += 1
        log.info("command %s dead-lettered (%s): %s", key, rejection.code, rejection.reason)

    async def _apply(
        self, command: StartCommand | AbortCommand | CommitCommand | SignalCommand, msg: ConsumerRecord, key: str
    ) -> str | Rejection:
        """The saga id the command applied to, or why it was rejected."""
        supervisor = await self.supervisor()
        if isinstance(command, CommitCommand) or command.type.startswith("recorded."):  # issue 5: recorded sagas
            from .recorded import apply_kafka_command

            return await apply_kafka_command(
                supervisor, command, key, correlation_id=header(msg, "correlation_id"), traceparent=header(msg, "traceparent")
            )
        if isinstance(command, SignalCommand):  # stored durably by the supervisor; a redelivery is deduped by key
            reply = await supervisor.signal.remote(command.saga, command.name, command.payload, command.key or key)
        elif isinstance(command, AbortCommand):
            reply = await supervisor.abort.remote(command.saga, command.reason)
        else:
            request = {
                "job": command.job,
                "payload": command.payload,
                "ttl": command.ttl,
                "idempotency_key": command.idempotency_key or key,
                "correlation_id": command.correlation_id or header(msg, "correlation_id"),
                "traceparent": command.traceparent or header(msg, "traceparent"),
            }
            reply = await supervisor.start.remote(request)
        if "error" in reply:
            error = reply["error"]
            return Rejection(ERROR_CODES.get(error["type"], REJECTED), error["message"])
        return reply["saga"]["id"]
