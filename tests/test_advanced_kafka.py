"""A ``signal`` command delivers a signal to a waiting saga (deduplicated by key)."""
from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

import pytest
from aiokafka import AIOKafkaProducer

from essential.actors.kafka.commands import Rejection, SignalCommand, parse_command
from essential.actors.kafka.gateway import ensure_gateway
from essential.orchestration import SagaState

from .conftest import poll
from .kafka_tools import stop_gateway

pytestmark = pytest.mark.asyncio


async def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(fn, *args, **kwargs)


@pytest.fixture(scope="module")
async def gateway(ray_session: Any, client: Any, settings: Any, store: Any) -> AsyncIterator[Any]:
    handle = await call(ensure_gateway, settings)
    assert await handle.ready.remote(120), "the gateway did not become ready"
    yield handle
    await call(stop_gateway)


@pytest.fixture(scope="module")
async def producer(kafka: Any) -> AsyncIterator[AIOKafkaProducer]:
    p = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
    await p.start()
    yield p
    await p.stop()


async def test_signal_command_parses_and_rejects_bad_input() -> None:
    good = {"schema": 1, "type": "signal", "saga": "a" * 24, "name": "identity.verified",
            "payload": {"approved": True}, "key": "review-1"}  # fmt: skip
    parsed = parse_command(json.dumps(good).encode(), 10_000)
    assert isinstance(parsed, SignalCommand) and parsed.payload == {"approved": True}
    bad = parse_command(json.dumps({**good, "saga": "nope"}).encode(), 10_000)
    assert isinstance(bad, Rejection) and "saga" in bad.reason


async def test_a_signal_over_kafka_wakes_the_waiting_saga_once(
    gateway: Any, producer: AIOKafkaProducer, client: Any, store: Any, settings: Any
) -> None:
    saga_id = await call(client.start, "test:signal", {})
    await poll(lambda: _waiting(store, saga_id), timeout=60, what="the saga to wait")
    command = {"schema": 1, "type": "signal", "saga": saga_id, "name": "go", "payload": {"via": "kafka"},
               "key": f"callback-{saga_id}"}  # fmt: skip
    for _ in range(2):  # redelivered: stored once
        await producer.send_and_wait(settings.kafka_command_topic, json.dumps(command).encode(), key=saga_id.encode())
    saga = await call(client.wait, saga_id, 120)
    assert saga.state == SagaState.COMPLETED, saga.error
    assert len(await store.signals(saga_id, "go")) == 1
    go = next(s for s in await store.stages(saga_id) if s.step == "go")
    assert go.res == {"got": {"via": "kafka"}}


async def _waiting(store: Any, saga_id: str) -> bool:
    return (await store.get(saga_id)).state == SagaState.WAITING
