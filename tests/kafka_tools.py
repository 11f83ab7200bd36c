"""Kafka helpers for the boundary tests: a tap that records every message, a hostile producer, and
the clean stop of a gateway actor.

The hostile producer writes what a well-behaved client library refuses to: a
record whose header key is not UTF-8 (built with aiokafka's own batch builder,
the bytes patched, the CRC recomputed), so the gateway meets it exactly as a
broken or malicious producer would send it.
"""
from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.record.util import calc_crc32c
from aiokafka.structs import ConsumerRecord, RecordMetadata

from essential.actors.names import GATEWAY_NAME

#: where the CRC of a v2 record batch sits, and where the bytes it covers start
_CRC_AT, _CRC_FROM, _BATCH_HEADER = 17, 21, 61


class Tap:
    """Every message of ``topics`` from the beginning, collected in the background (no consumer group)."""

    def __init__(self, bootstrap: str, *topics: str) -> None:
        self.consumer = AIOKafkaConsumer(
            *topics, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
            metadata_max_age_ms=1000, max_partition_fetch_bytes=4 * 1024 * 1024,
        )  # fmt: skip
        self.records: list[ConsumerRecord] = []
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> "Tap":
        await self.consumer.start()
        self._task = asyncio.create_task(self._collect())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self.consumer.stop()

    async def _collect(self) -> None:
        while True:
            for msgs in (await self.consumer.getmany(timeout_ms=200)).values():
                self.records.extend(msgs)

    def for_key(self, key: str) -> list[ConsumerRecord]:
        return [r for r in self.records if r.key == key.encode()]

    def keyed(self, prefix: str) -> list[ConsumerRecord]:
        return [r for r in self.records if r.key and r.key.decode(errors="replace").startswith(prefix)]

    def from_source(self, topic: str, partition: int, offset: int) -> list[ConsumerRecord]:
        """Dead letters of the message at ``topic[partition]@offset`` (by their ``dlq.*`` headers)."""
        want = {"dlq.topic": topic, "dlq.partition": str(partition), "dlq.offset": str(offset)}
        return [r for r in self.records if all(headers(r).get(k) == v for k, v in want.items())]


def headers(record: ConsumerRecord) -> dict[str, str]:
    return {k: (v or b"").decode(errors="replace") for k, v in record.headers or ()}


def body(record: ConsumerRecord) -> dict[str, Any]:
    return json.loads(record.value)


async def send_with_raw_header_key(
    producer: AIOKafkaProducer, topic: str, partition: int, value: bytes, header_key: bytes, *, key: bytes | None = None
) -> RecordMetadata:
    """Produce one record whose header key is the raw ``header_key`` bytes (e.g. not UTF-8)."""
    placeholder = "K" * len(header_key)
    batch = producer.create_batch()
    assert batch.append(timestamp=None, key=key, value=value, headers=[(placeholder, b"x")]) is not None
    buffer = batch._build()  # the builder keeps this buffer and sends it as it is
    at = bytes(buffer).find(placeholder.encode(), _BATCH_HEADER)
    assert at > 0, "placeholder header key not found in the batch"
    buffer[at : at + len(header_key)] = header_key
    struct.pack_into(">I", buffer, _CRC_AT, calc_crc32c(bytes(buffer[_CRC_FROM:])))
    return await (await producer.send_batch(batch, topic, partition=partition))


def stop_gateway(namespace: str = "essential", name: str = GATEWAY_NAME) -> None:
    """Stop a gateway as a deployment would (it leaves its consumer groups at once), then end its actor."""
    import ray

    try:
        handle = ray.get_actor(name, namespace=namespace)
    except ValueError:
        return
    try:
        ray.get(handle.stop.remote(), timeout=60)
    finally:
        ray.kill(handle, no_restart=True)
