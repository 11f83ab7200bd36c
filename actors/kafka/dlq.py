"""Dead letters that always fit: a rejected message goes to a dead-letter topic with headers saying why.

The original key, value and headers are kept, so an operator can fix the
sender or the job and replay the message as it was, *as far as they fit one
Kafka request*: a dead letter that Kafka refuses would leave its message
nowhere, so the letter is cut to the producer's limit, and what was cut is
said in a header.  Headers added (all UTF-8): ``dlq.code`` (stable, e.g.
``unknown_job``), ``dlq.reason`` (readable), ``dlq.attempts`` (how often
handling was tried), ``dlq.topic``, ``dlq.partition``, ``dlq.offset``,
``dlq.timestamp`` (where the message came from), ``dlq.gateway``, ``dlq.at``;
and when needed ``dlq.truncated`` (value cut), ``dlq.key_truncated``,
``dlq.dropped_headers`` (original headers left out) and ``dlq.stripped`` (Kafka
refused the full letter: only the ``dlq.*`` headers were sent).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
)
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.structs import ConsumerRecord

from essential.actors import metrics
from essential.actors.kafka.commands import Rejection
from essential.orchestration.errors import DeadLetterRefused

MAX_REASON = 2000
#: a key longer than this is cut (keys only route the dead letter; the prefix identifies it)
MAX_KEY = 16 * 1024
#: the original headers kept, largest dropped first beyond this many bytes
MAX_ORIGINAL_HEADERS = 64 * 1024
#: room kept for the notes about what was cut
NOTES_ROOM = 1024
#: what Kafka refuses whatever the timing: the letter is sent again stripped to its dlq.* headers
REFUSED = (MessageSizeTooLargeError, RecordTooLargeError, InvalidTopicError, TopicAuthorizationFailedError)

Headers = list[tuple[str, bytes | None]]


@dataclass(frozen=True)
class Source:
    """The message a dead letter stands for (for an unreadable record, only where it is)."""

    topic: str
    partition: int
    offset: int
    timestamp: int | None = None
    key: bytes | None = None
    value: bytes | None = None
    headers: tuple[tuple[str, bytes | None], ...] = ()

    @classmethod
    def of(cls, msg: ConsumerRecord) -> "Source":
        return cls(msg.topic, msg.partition, msg.offset, msg.timestamp, msg.key, msg.value, tuple(msg.headers or ()))


@dataclass(frozen=True)
class Letter:
    key: bytes | None
    value: bytes | None
    headers: Headers

    def size(self) -> int:
        return DefaultRecordBatchBuilder.estimate_size_in_bytes(self.key, self.value, self.headers)


def _ours(source: Source, rejection: Rejection, gateway: str, attempts: int) -> dict[str, str]:
    return {
        "dlq.code": rejection.code,
        "dlq.reason": rejection.reason[:MAX_REASON],
        "dlq.attempts": str(attempts),
        "dlq.topic": source.topic,
        "dlq.partition": str(source.partition),
        "dlq.offset": str(source.offset),
        "dlq.timestamp": str(source.timestamp if source.timestamp is not None else ""),
        "dlq.gateway": gateway,
        "dlq.at": datetime.now(timezone.utc).isoformat(),
    }


def build(source: Source, rejection: Rejection, gateway: str, *, attempts: int, budget: int) -> Letter:
    """The dead letter of ``source``, at most ``budget`` bytes as Kafka counts a record."""
    ours = _ours(source, rejection, gateway, attempts)
    key = source.key
    if key is not None and len(key) > MAX_KEY:
        ours["dlq.key_truncated"] = f"{len(key)} bytes cut to {MAX_KEY}"
        key = key[:MAX_KEY]
    kept: Headers = []
    dropped: list[tuple[str, int]] = []
    room = MAX_ORIGINAL_HEADERS
    for name, value in source.headers:
        if name.startswith("dlq."):
            continue  # a replayed dead letter gets fresh ones
        size = len(name.encode()) + len(value or b"")
        if size <= room:
            kept.append((name, value))
            room -= size
        else:
            dropped.append((name, size))
    if dropped:
        listed = ", ".join(f"{name[:40]} ({size} bytes)" for name, size in dropped[:5])
        ours["dlq.dropped_headers"] = f"{len(dropped)} original header(s) left out: {listed}"
    headers: Headers = kept + [(k, v.encode()) for k, v in ours.items()]
    value = source.value
    if key is None and value is None:
        value = b""  # Kafka needs one of them
    if value:
        fixed = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, b"", headers) + NOTES_ROOM
        room_for_value = max(budget - fixed, 0)
        if len(value) > room_for_value:
            headers.append(("dlq.truncated", f"{len(value)} bytes cut to {room_for_value}".encode()))
            value = value[:room_for_value]
    return Letter(key, value, headers)


def stripped(source: Source, rejection: Rejection, gateway: str, *, attempts: int, why: str) -> Letter:
    """Only the ``dlq.*`` headers: what Kafka takes when it refused the full letter."""
    ours = _ours(source, rejection, gateway, attempts)
    ours["dlq.stripped"] = f"the full dead letter was refused ({why[:300]}); the original stays in {source.topic}"
    key = source.key[:MAX_KEY] if source.key else None
    return Letter(key, b"", [(k, v.encode()) for k, v in ours.items()])


async def publish(
    producer: AIOKafkaProducer, topic: str, source: Source, rejection: Rejection, gateway: str, *,
    attempts: int, budget: int,
) -> Letter:  # fmt: skip
    """Publish the dead letter and wait for Kafka's acknowledgement.

    Raises a transient Kafka error when Kafka is away (the caller retries: the
    message must not be skipped unrecorded) and :class:`DeadLetterRefused` when
    Kafka refuses even the stripped letter (the dead-letter topic is missing,
    forbidden or limited below a few KiB).
    """
    letter = build(source, rejection, gateway, attempts=attempts, budget=budget)
    try:
        await producer.send_and_wait(topic, value=letter.value, key=letter.key, headers=letter.headers)
    except REFUSED as exc:
        letter = stripped(source, rejection, gateway, attempts=attempts, why=f"{type(exc).__name__}: {exc}")
        try:
            await producer.send_and_wait(topic, value=letter.value, key=letter.key, headers=letter.headers)
        except KafkaError as again:
            if again.retriable:
                raise
            raise DeadLetterRefused(topic, f"{source.topic}[{source.partition}]@{source.offset}", str(again)) from None
    metrics.dead_lettered(source.topic, rejection.code)
    return letter
