"""Dead letters: a rejected message goes to a dead-letter topic unchanged, with headers saying why.

The original key, value and headers are kept, so an operator can fix the
sender or the job and replay the message as it was.  Headers added (all UTF-8):
``dlq.code`` (stable, e.g. ``unknown_job``), ``dlq.reason`` (readable),
``dlq.topic``, ``dlq.partition``, ``dlq.offset``, ``dlq.timestamp`` (where the
message came from), ``dlq.gateway`` and ``dlq.at``.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from . import metrics
from .kafka_commands import Rejection

MAX_REASON = 2000


def dead_letter_headers(msg: ConsumerRecord, rejection: Rejection, gateway: str) -> list[tuple[str, bytes]]:
    extra = {
        "dlq.code": rejection.code,
        "dlq.reason": rejection.reason[:MAX_REASON],
        "dlq.topic": msg.topic,
        "dlq.partition": str(msg.partition),
        "dlq.offset": str(msg.offset),
        "dlq.timestamp": str(msg.timestamp),
        "dlq.gateway": gateway,
        "dlq.at": datetime.now(timezone.utc).isoformat(),
    }
    original = [(k, v) for k, v in (msg.headers or ()) if not k.startswith("dlq.")]
    return original + [(k, v.encode()) for k, v in extra.items()]


async def dead_letter(
    producer: AIOKafkaProducer,
    topic: str,
    msg: ConsumerRecord,
    rejection: Rejection,
    gateway: str,
    max_value_bytes: int,
) -> Any:
    """Publish the dead letter and wait for Kafka's acknowledgement (raises if it fails: retry the message).

    A value beyond ``max_value_bytes`` (what the producer may send) is cut, and
    ``dlq.truncated`` says so: the dead letter must not fail for being large.
    """
    value = msg.value
    headers = dead_letter_headers(msg, rejection, gateway)
    if value is not None and len(value) > max_value_bytes:
        value = value[:max_value_bytes]
        headers.append(("dlq.truncated", f"{len(msg.value)} bytes cut to {max_value_bytes}".encode()))
    sent = await producer.send_and_wait(topic, value=value, key=msg.key, headers=headers)
    metrics.dead_lettered(msg.topic, rejection.code)
    return sent
