"""Shared placement runs many sagas per host actor with the same recovery guarantees."""
from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from typing import Any

import pytest
import ray

from essential.orchestration import SagaState
from essential.orchestration.states import Action

from .conftest import JOBS_DB, poll
from .test_saga_runtime import call
from .test_supervisor import assert_consistent, stage_started

pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module")
async def shared(deployment: Any) -> tuple[Any, Any]:
    return await deployment("essential_shared", placement="shared", host_pool_size=2)


async def test_sagas_run_in_host_actors_not_their_own(shared: tuple[Any, Any]) -> None:
    client, store = shared
    ids = await call(client.start_many, [{"job": "test:chain", "payload": {"sleep": {"b": 0.5}}}] * 12)
    saga = await call(client.wait, ids[0], 60)
    for saga_id in ids:
        assert (await call(client.wait, saga_id, 60)).state == SagaState.COMPLETED
        assert _saga_actor(saga_id) is None, "shared placement creates no per-saga actor"
    owners = Counter([(await store.get(i)).lease.owner.split("@")[0] for i in ids])
    assert set(owners) <= {"essential:host:0", "essential:host:1"} and len(owners) == 2, owners
    hosts = await asyncio.wait_for(client.supervisor.hosts.remote(), 30)
    assert sorted(h["index"] for h in hosts) == [0, 1]
    assert sum(h["finished"] for h in hosts) >= 12
    assert saga.state == SagaState.COMPLETED


async def test_host_killed_in_mid_run_loses_nothing(shared: tuple[Any, Any], mongo: Any) -> None:
    client, store = shared
    requests = [
        {"job": "test:chain", "payload": {"fail_at": "d" if i % 5 == 0 else None, "sleep": {"b": 1.5}}}
        for i in range(20)
    ]
    ids = await call(client.start_many, requests)

    async def in_flight() -> bool:
        return sum([await stage_started(store, i, "b") for i in ids]) >= 6

    await poll(in_flight, timeout=60, what="sagas in flight on the hosts")
    victim = ray.get_actor("essential:host:0", namespace="essential_shared")
    os.kill(await victim.pid.remote(), signal.SIGKILL)
    for saga_id, request in zip(ids, requests):
        saga = await call(client.wait, saga_id, 120)
        expected = SagaState.ABORTED if request["payload"]["fail_at"] else SagaState.COMPLETED
        assert saga.state == expected, f"{saga_id}: {saga.state} ({saga.error})"
        await assert_consistent(store, mongo, saga_id)
    restored = [i for i in ids if (await store.get(i)).lease.epoch >= 2]
    assert restored, "the killed host's sagas were taken over by a new lease"
    runs = Counter([(d["saga"], d["step"]) async for d in mongo[JOBS_DB].calls.find({"saga": {"$in": ids}, "kind": "run"})])
    assert max(runs.values()) <= 2 + 2, "no step ran more than its retries plus one restore"


async def test_hung_step_in_a_host_is_cut_off_by_ttl(shared: tuple[Any, Any], mongo: Any) -> None:
    client, store = shared
    saga_id = await call(client.start, "test:chain", {"block": {"b": 60}}, ttl=3)
    saga = await call(client.wait, saga_id, 120)
    assert saga.state == SagaState.ABORTED and "ttl" in (saga.error or saga.abort_requested or "")
    stages = await store.stages(saga_id)
    assert [s.compensates for s in stages if s.action == Action.COMPENSATE] == [2, 1]
    await assert_consistent(store, mongo, saga_id)


def _saga_actor(saga_id: str) -> Any:
    try:
        return ray.get_actor(f"saga:{saga_id}", namespace="essential_shared")
    except ValueError:
        return None
