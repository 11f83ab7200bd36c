"""Pooled placement gives each live saga an actor of its own, from a warm pool that is reused."""
from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections import Counter
from typing import Any

import pytest
import ray

from essential.orchestration import SagaState

from .conftest import JOBS_DB, poll
from .test_saga_runtime import call
from .test_supervisor import assert_consistent, stage_started

pytestmark = pytest.mark.asyncio

NAMESPACE = "essential_pooled"
POOL = 3


@pytest.fixture(scope="module")
async def pooled(deployment: Any) -> tuple[Any, Any]:
    return await deployment(NAMESPACE, placement="pooled", max_live_sagas=POOL)


async def test_each_live_saga_has_an_actor_to_itself_and_the_actors_are_reused(pooled: tuple[Any, Any]) -> None:
    client, store = pooled
    ids = await call(client.start_many, [{"job": "test:chain", "payload": {"sleep": {"b": 0.3}}}] * (3 * POOL))
    for saga_id in ids:  # three times more sagas than actors: the rest wait as pending, then take a freed one
        assert (await call(client.wait, saga_id, 120)).state == SagaState.COMPLETED
    owners = Counter([(await store.get(i)).lease.owner.split("@")[0] for i in ids])
    assert set(owners) <= {f"essential:host:{i}" for i in range(POOL)}, owners
    hosts = await asyncio.wait_for(client.supervisor.hosts.remote(), 30)
    assert {h["placement"] for h in hosts} == {"pooled"}
    assert all(h["peak"] <= 1 for h in hosts), f"an actor ran two sagas at once: {hosts}"
    assert sum(h["finished"] for h in hosts) >= len(ids)
    assert len({h["pid"] for h in hosts}) <= POOL < len(ids), "processes were reused, not started per saga"
    for saga_id in ids:
        with pytest.raises(ValueError):
            ray.get_actor(f"saga:{saga_id}", namespace=NAMESPACE)


async def test_a_killed_pooled_actor_loses_nothing(pooled: tuple[Any, Any], mongo: Any) -> None:
    client, store = pooled
    gate = f"g-{uuid.uuid4().hex}"  # b cannot finish before the kill
    saga_id = await call(client.start, "test:chain", {"gate": {"b": gate}})
    await poll(lambda: stage_started(store, saga_id, "b"), timeout=60, what="step b running")
    owner = (await store.get(saga_id)).lease.owner
    host, killed = owner.split("@")[0], int(owner.rsplit(":", 1)[1])
    victim = ray.get_actor(host, namespace=NAMESPACE)
    assert await victim.pid.remote() == killed
    os.kill(killed, signal.SIGKILL)
    await mongo[JOBS_DB].gates.insert_one({"_id": gate})  # the restored run of b goes through
    saga = await call(client.wait, saga_id, 120)
    assert saga.state == SagaState.COMPLETED
    assert saga.lease.epoch >= 2 and int(saga.lease.owner.rsplit(":", 1)[1]) != killed, saga.lease
    runs = Counter([d["step"] async for d in mongo[JOBS_DB].calls.find({"saga": saga_id, "kind": "run"})])
    assert runs["b"] == 2, "the killed step ran again (same idempotency key), no more"
    assert runs["a"] == runs["c"] == runs["d"] == 1
    await assert_consistent(store, mongo, saga_id)
