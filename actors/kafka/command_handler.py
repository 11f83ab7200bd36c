"""Applying one command message: validate, call the supervisor, or dead-letter it.

Order of effects, which is what makes redelivery harmless:

1. the command is applied durably through the supervisor (saga created, abort
   requested); a start without an idempotency key gets one derived from the
   message's identity, so a redelivered start returns the saga it created;
2. the outcome is written to the command log;
3. only then does the consumer loop commit the offset.

A gateway dying anywhere in between sees the message again and either finds it
in the log or applies it again to the same effect.  Everything that bad input
can fail is checked before the supervisor is called (:mod:`essential.actors.kafka.commands`,
and here the headers and a recorded stage's Extended JSON), so a bad message is
dead-lettered at once with its reason; failures while applying are classified by
the consumer loop (:mod:`essential.actors.kafka.failures`).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections import Counter
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord
from pymongo.asynchronous.database import AsyncDatabase
from ray.exceptions import RayActorError

from essential.actors.errors import dead_letter_code
from essential.actors.kafka import dlq
from essential.actors.kafka.commands import (
    GAVE_UP,
    INVALID_COMMAND,
    NOT_STORABLE,
    UNREADABLE,
    AbortCommand,
    AnyCommand,
    CommitCommand,
    RecordedAddCommand,
    Rejection,
    SignalCommand,
    parse_command,
)
from essential.actors.kafka.config import dead_letter_budget
from essential.actors.kafka.consumer import Failed, Unreadable
from essential.actors.kafka.failures import describe, permanent_code
from essential.actors.kafka.recorded_commands import apply_kafka_command, from_extended_json
from essential.actors.settings import Settings
from essential.orchestration import storable
from essential.persistence.inbox import CommandLog

log = logging.getLogger("essential.gateway.commands")

MAX_KEY = 200
#: headers read from a command, and their longest accepted value
READ_HEADERS = ("correlation_id", "traceparent")
MAX_HEADER = 200
#: fault tests only (ESSENTIAL_KAFKA_FAULT_GATES): ``<where>:<gate id>`` holds a command at ``where``
GATE_HEADER = "essential-gate"
GATES, GATE_WAITS = "gates", "gate_waits"


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


def header_problem(msg: ConsumerRecord) -> Rejection | None:
    """A header Essential reads (correlation id, trace context) that it cannot use as given."""
    for key, value in msg.headers or ():
        name = key.lower().replace("-", "_")
        if name not in READ_HEADERS or not value:
            continue
        try:
            text = value.decode()
        except UnicodeDecodeError:
            return Rejection(INVALID_COMMAND, f"header {key}: not UTF-8 text")
        if len(text) > MAX_HEADER:
            return Rejection(INVALID_COMMAND, f"header {key}: {len(text)} characters, at most {MAX_HEADER}")
    return None


def recorded_problem(command: RecordedAddCommand) -> Rejection | None:
    """``req``/``res``/``meta`` as they would be stored: valid Extended JSON, then storable."""
    for name in ("req", "res", "meta"):
        try:
            value = from_extended_json(getattr(command, name))
        except Exception as exc:  # noqa: BLE001 - whatever bson says about bad Extended JSON
            return Rejection(INVALID_COMMAND, f"{name}: not valid MongoDB Extended JSON: {describe(exc)}")
        found = storable.problems(value, name)
        if found:
            return Rejection(NOT_STORABLE, "; ".join(found))
    return None


class CommandHandler:
    def __init__(self, settings: Settings, owner: str, producer: AIOKafkaProducer, db: AsyncDatabase) -> None:
        self.settings = settings
        self.owner = owner
        self.producer = producer
        self.db = db
        self.log = CommandLog(db)
        self.counts: Counter[str] = Counter()
        self._supervisor: Any = None

    async def supervisor(self) -> Any:
        if self._supervisor is None:
            from essential.actors.client.ray_client import get_supervisor

            self._supervisor = await asyncio.to_thread(get_supervisor, self.settings)
        return self._supervisor

    async def handle(self, msg: ConsumerRecord) -> None:
        key = message_key(msg)
        if await self.log.seen(key) is not None:
            self.counts["duplicates"] += 1
            return
        parsed = parse_command(msg.value, self.settings.kafka_max_command_bytes)
        if isinstance(parsed, Rejection):
            await self._reject(dlq.Source.of(msg), key, parsed, attempts=1)
            return
        problem = header_problem(msg)
        if problem is None and isinstance(parsed, RecordedAddCommand):
            problem = recorded_problem(parsed)
        if problem is not None:
            await self._reject(dlq.Source.of(msg), key, problem, attempts=1)
            return
        try:
            outcome = await self._apply(parsed, msg, key)
        except RayActorError:
            self._supervisor = None  # it died: find (or start) the current one on the next attempt
            raise
        if isinstance(outcome, Rejection):
            await self._reject(dlq.Source.of(msg), key, outcome, attempts=1)
            return
        await self._hold(msg, "applied")
        await self.log.record(key, "applied", type=parsed.type, saga=outcome)
        self.counts[f"applied.{parsed.type}"] += 1
        await self._hold(msg, "logged")

    async def poison(self, msg: ConsumerRecord, failed: Failed) -> None:
        """A message whose handling failed for good, or kept failing transiently: dead-letter it."""
        await self._reject(dlq.Source.of(msg), message_key(msg), failure_rejection(failed), attempts=failed.attempts)

    async def unreadable(self, item: Unreadable) -> None:
        await self._reject(dlq.Source(item.topic, item.partition, item.offset), None, unreadable_rejection(item), 1)

    async def _reject(self, source: dlq.Source, key: str | None, rejection: Rejection, attempts: int) -> None:
        await dlq.publish(self.producer, self.settings.kafka_dlq_topic, source, rejection, self.owner,
                          attempts=attempts, budget=dead_letter_budget(self.settings))  # fmt: skip
        self.counts[f"dead_letter.{rejection.code}"] += 1
        log.info("command %s@%d offset %d dead-lettered (%s): %s", source.topic, source.partition, source.offset,
                 rejection.code, rejection.reason[:300])  # fmt: skip
        if key is None:
            return
        try:  # best effort: once the offset is committed the message does not come again anyway
            await self.log.record(key, "dead_letter", code=rejection.code, reason=rejection.reason[:500])
        except Exception as exc:  # noqa: BLE001
            log.warning("command %s: dead letter not written to the command log: %s", key, describe(exc))

    async def _hold(self, msg: ConsumerRecord, where: str) -> None:
        """Fault tests only: wait at ``where`` while the gate the message names is closed."""
        if not self.settings.kafka_fault_gates:
            return
        value = header(msg, GATE_HEADER) or ""
        at, _, gate = value.partition(":")
        if at != where or not gate:
            return
        await self.db[GATE_WAITS].update_one({"_id": gate}, {"$push": {"pids": os.getpid()}}, upsert=True)
        while await self.db[GATES].find_one({"_id": gate}) is None:
            await asyncio.sleep(0.05)

    async def _apply(self, command: AnyCommand, msg: ConsumerRecord, key: str) -> str | Rejection:
        """The saga id the command applied to, or why it was rejected."""
        supervisor = await self.supervisor()
        if isinstance(command, CommitCommand) or command.type.startswith("recorded."):
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
            return Rejection(dead_letter_code(error["type"]), error["message"])
        return reply["saga"]["id"]


def failure_rejection(failed: Failed) -> Rejection:
    """The dead-letter code and reason of a message whose handling failed (see :mod:`essential.actors.kafka.consumer`)."""
    if failed.gave_up:
        return Rejection(GAVE_UP, f"gave up after {failed.attempts} attempts over {failed.seconds:.1f}s "
                                  f"(ESSENTIAL_KAFKA_RETRY_SECONDS); last error {describe(failed.error)}")  # fmt: skip
    return Rejection(permanent_code(failed.error), describe(failed.error))


def unreadable_rejection(item: Unreadable) -> Rejection:
    return Rejection(UNREADABLE, f"the Kafka client cannot decode this record ({describe(item.error)}; e.g. a header "
                                 f"key that is not UTF-8), so its key, value and headers are not in this letter; the "
                                 f"record stays in {item.topic} partition {item.partition} at offset {item.offset} "
                                 "until the topic's retention removes it")  # fmt: skip
