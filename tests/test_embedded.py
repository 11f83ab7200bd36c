"""The embedded dev servers: real processes, real crashes, real wire protocols."""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from pymongo import AsyncMongoClient

from essential.actors.dev.kafka_broker import EmbeddedKafka
from essential.actors.dev.mongodb import EmbeddedMongo, ServerStartError, pid_alive
from essential.actors.kafka.topics import ensure_topics


@pytest.fixture
def mongo(tmp_path: Path) -> Iterator[EmbeddedMongo]:
    with EmbeddedMongo(tmp_path / "data", port=0, log_dir=tmp_path / "logs") as server:
        yield server


@pytest.fixture
def kafka(tmp_path: Path) -> Iterator[EmbeddedKafka]:
    with EmbeddedKafka(port=0, log_dir=tmp_path / "logs") as server:
        yield server


async def test_mongo_keeps_acknowledged_commits_across_sigkill(mongo: EmbeddedMongo) -> None:
    client: AsyncMongoClient = AsyncMongoClient(mongo.uri)
    try:
        coll = client.essential_test.sagas
        await coll.insert_one({"_id": "plain", "v": 1})
        for i in range(20):
            async with client.start_session() as session:

                async def write(s, i: int = i) -> None:  # type: ignore[no-untyped-def]
                    await coll.insert_one({"_id": f"txn-{i}"}, session=s)
                    await client.essential_test.outbox.insert_one({"_id": f"evt-{i}"}, session=s)

                await session.with_transaction(write)
    finally:
        await client.close()

    old_pid = mongo.pid
    assert old_pid is not None
    mongo.kill()  # no shutdown, no flush: a crash right after the last acknowledgement
    assert not pid_alive(old_pid)
    mongo.start()
    assert mongo.pid != old_pid

    client = AsyncMongoClient(mongo.uri)
    try:
        assert await client.essential_test.sagas.find_one({"_id": "plain"}) == {"_id": "plain", "v": 1}
        assert await client.essential_test.sagas.count_documents({}) == 21
        assert await client.essential_test.outbox.count_documents({}) == 20
    finally:
        await client.close()


async def test_mongo_graceful_restart_and_port_clash(mongo: EmbeddedMongo, tmp_path: Path) -> None:
    client: AsyncMongoClient = AsyncMongoClient(mongo.uri)
    await client.essential_test.sagas.insert_one({"_id": "kept"})
    await client.close()

    port = mongo.port
    mongo.restart()
    assert mongo.port == port

    client = AsyncMongoClient(mongo.uri)
    try:
        assert await client.essential_test.sagas.find_one({"_id": "kept"}) == {"_id": "kept"}
    finally:
        await client.close()

    # A second server on the same port fails fast instead of "passing" its readiness probe.
    with pytest.raises(ServerStartError, match="already in use"):
        EmbeddedMongo(tmp_path / "other", port=port, log_dir=tmp_path / "logs").start(timeout=5)


async def test_kafka_produce_consume_and_topic_loss_on_restart(kafka: EmbeddedKafka) -> None:
    topic = f"essential.test.{uuid.uuid4().hex[:8]}"
    assert await ensure_topics(kafka.bootstrap, [topic], partitions=2) == [topic]
    assert await ensure_topics(kafka.bootstrap, [topic], partitions=2) == []  # already there: fine

    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
    await producer.start()
    try:
        assert await producer.partitions_for(topic) == {0, 1}
        await producer.send_and_wait(topic, b"saga.started", key=b"saga-1", headers=[("trace", b"t1")])
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=kafka.bootstrap, group_id="essential-test", auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        message = await asyncio.wait_for(consumer.getone(), timeout=30)
    finally:
        await consumer.stop()
    assert (message.key, message.value, list(message.headers)) == (b"saga-1", b"saga.started", [("trace", b"t1")])

    # Memory-only storage: a restart forgets the topic, and ensure_topics recreates it.
    kafka.restart()
    assert await ensure_topics(kafka.bootstrap, [topic], partitions=2) == [topic]

    pid = kafka.pid
    assert pid is not None
    kafka.stop()
    assert kafka.pid is None and not pid_alive(pid)
