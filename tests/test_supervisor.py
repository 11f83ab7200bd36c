"""Issue 3 acceptance: recovery proven by really killing actors, Ray and MongoDB."""
from __future__ import annotations

import asyncio
import os
import random
import signal
import uuid
from collections import Counter
from typing import Any

import pytest
import ray
from bson import ObjectId
from ray.util.state import list_actors

from actors.settings import Settings
from orchestration import LeaseLost, SagaRunner, SagaState, StartRequest, SystemClock, build_saga
from orchestration.registry import JobRegistry
from orchestration.states import Action, StageStatus
from persistence.store import MongoSagaStore

from .conftest import JOBS_DB, init_ray, poll
from .test_saga_runtime import _actor, call

pytestmark = pytest.mark.asyncio


async def stage_started(store: Any, saga_id: str, step: str) -> bool:
    return any(s.step == step and s.action != Action.COMPENSATE for s in await store.stages(saga_id))


async def assert_consistent(store: Any, mongo: Any, saga_id: str) -> None:
    """Stage sequence 1..n without gaps; effects exist exactly for forward steps not undone."""
    saga = await store.get(saga_id)
    stages = await store.stages(saga_id)
    assert [s.seq for s in stages] == list(range(1, len(stages) + 1)), f"gaps in {saga_id}"
    assert saga.seq == len(stages)
    forward = [s for s in stages if s.action != Action.COMPENSATE]
    assert len({s.step for s in forward}) == len(forward), "a forward step recorded twice"
    effects = {d["_id"] async for d in mongo[JOBS_DB].effects.find({"saga": saga_id})}
    if saga.state == SagaState.COMPLETED:
        assert effects == {s.meta.idempotency_key for s in forward}
    elif saga.state == SagaState.ABORTED:
        assert effects == set(), f"{saga_id} aborted but effects remain: {effects}"


async def test_killed_actor_process_resumes_and_records_each_effect_once(
    client: Any, store: Any, mongo: Any
) -> None:
    gate = f"g-{uuid.uuid4().hex}"  # b cannot finish before the kill, however slow the machine
    saga_id = await call(client.start, "test:chain", {"gate": {"b": gate}})
    await poll(lambda: stage_started(store, saga_id, "b"), timeout=30, what="step b running")
    handle = _actor(saga_id)
    pid = await handle.pid.remote()
    os.kill(pid, signal.SIGKILL)
    await mongo[JOBS_DB].gates.insert_one({"_id": gate})  # the restored run of b goes through
    saga = await call(client.wait, saga_id, 90)
    assert saga.state == SagaState.COMPLETED
    assert saga.lease.epoch >= 2, "a new actor took the lease"
    runs = Counter([d["step"] async for d in mongo[JOBS_DB].calls.find({"saga": saga_id, "kind": "run"})])
    assert runs["b"] == 2, "the killed step ran again (same idempotency key), no more"
    assert runs["a"] == runs["c"] == runs["d"] == 1
    await assert_consistent(store, mongo, saga_id)


async def test_stale_runner_is_fenced_off_and_stops(settings: Settings, mongo: Any) -> None:
    # a database the supervisor does not sweep, so only this test's two runners compete
    store = MongoSagaStore(mongo, "essential_fencing")
    await store.ensure_indexes()
    registry = JobRegistry.from_modules(["tests.jobs"])
    saga, event = build_saga(StartRequest(job="test:chain", payload={"sleep": {"a": 1.0}}), registry, SystemClock())
    await store.create(saga, event)
    stale = SagaRunner(saga.id, store=store, registry=registry, owner="stale")
    task = asyncio.create_task(stale.run())
    await poll(lambda: stage_started(store, saga.id, "a"), timeout=10, what="stale runner to start a")
    newer = await store.acquire_lease(saga.id, "newer")  # what a restored actor does
    assert newer.lease.epoch == stale.epoch + 1
    with pytest.raises(LeaseLost):
        await task
    after = await store.get(saga.id)
    assert after.lease.owner == "newer"
    stages = await store.stages(saga.id)
    assert [(s.step, s.status) for s in stages] == [("a", StageStatus.STARTED)], "the stale result was refused"
    assert after.cursor == 0 and after.state == SagaState.RUNNING
    resumed = await SagaRunner(saga.id, store=store, registry=registry, owner="newer").run()
    assert resumed.state == SagaState.COMPLETED
    await assert_consistent(store, mongo, saga.id)


async def test_hung_step_past_ttl_is_aborted_by_the_supervisor(client: Any, store: Any, mongo: Any) -> None:
    saga_id = await call(client.start, "test:chain", {"block": {"b": 120}}, ttl=3)
    saga = await call(client.wait, saga_id, 90)
    assert saga.state == SagaState.ABORTED
    assert "ttl" in (saga.error or saga.abort_requested or "")
    stages = await store.stages(saga_id)
    undone = [s.compensates for s in stages if s.action == Action.COMPENSATE]
    assert undone == [2, 1], "the hung step (outcome unknown) and the step before it are compensated"
    topics = [e["topic"] for e in await store.outbox_for(saga_id)]
    assert topics[-1] == "saga.aborted"
    await assert_consistent(store, mongo, saga_id)


async def test_admission_keeps_live_saga_actors_under_the_limit(deployment: Any) -> None:
    small, store = await deployment("essential_admission", max_live_sagas=4)
    ids = await call(small.start_many, [{"job": "test:chain", "payload": {"sleep": {"b": 0.3}}}] * 40)
    peak = 0

    def alive_sagas() -> int:
        actors = list_actors(
            address=ray.get_runtime_context().gcs_address,
            filters=[("state", "=", "ALIVE"), ("ray_namespace", "=", "essential_admission")],
            limit=1000,
        )
        return sum(1 for a in actors if (a.name or "").startswith("saga:"))

    async def all_done() -> bool:
        nonlocal peak
        peak = max(peak, await asyncio.to_thread(alive_sagas))
        finished = await store.sagas.count_documents(
            {"_id": {"$in": [__import__("bson").ObjectId(i) for i in ids]}, "state": "completed"}
        )
        return finished == 40

    await poll(all_done, timeout=240, interval=0.2, what="40 admitted sagas to finish")
    assert 1 <= peak <= 4, f"saw {peak} live saga actors with a limit of 4"


async def test_mongodb_killed_and_restarted_in_mid_run(client: Any, store: Any, mongo: Any, mongo_server: Any) -> None:
    if mongo_server is None:
        pytest.skip("ESSENTIAL_MONGODB_URI names an external MongoDB this test cannot kill")
    ids = await call(client.start_many, [{"job": "test:patient", "payload": {"sleep": {"b": 1.0}}}] * 6)

    async def some_started() -> bool:
        return sum([await stage_started(store, i, "b") for i in ids]) >= 3

    await poll(some_started, timeout=60, what="sagas mid-run")
    mongo_server.kill()
    await asyncio.sleep(2)  # an outage of real length: the sagas must ride it out, not dodge it
    mongo_server.restart()
    for saga_id in ids:
        saga = await call(client.wait, saga_id, 180)
        assert saga.state == SagaState.COMPLETED, saga.error
        stages = await store.stages(saga_id)
        assert [(s.step, s.status) for s in stages] == [
            ("a", StageStatus.SUCCEEDED), ("b", StageStatus.SUCCEEDED), ("c", StageStatus.SUCCEEDED)
        ]  # fmt: skip
        await assert_consistent(store, mongo, saga_id)


async def test_parked_saga_waits_for_an_operator(client: Any, store: Any, mongo: Any) -> None:
    registry = JobRegistry.from_modules(["tests.jobs"])
    saga, event = build_saga(StartRequest(job="test:chain", payload={}), registry, SystemClock())
    saga.version = 99  # a definition that is not deployed
    await store.create(saga, event)
    await call(client.sweep)
    parked = await call(client.wait, saga.id, 60)
    assert parked.state == SagaState.PARKED and "version 99" in (parked.parked_reason or "")
    topics = [e["topic"] for e in await store.outbox_for(saga.id)]
    assert "saga.parked" in topics
    await store.sagas.update_one({"_id": __import__("bson").ObjectId(saga.id)}, {"$set": {"version": 1}})
    resumed = await call(client.resume, saga.id)
    assert resumed.state == SagaState.RUNNING
    assert (await call(client.wait, saga.id, 60)).state == SagaState.COMPLETED


@pytest.mark.timeout(600)
async def test_randomized_soak_with_actor_kills(client: Any, store: Any, mongo: Any) -> None:
    rng = random.Random(7)
    requests = [
        {
            "job": "test:chain",
            "payload": {"fail_at": "d" if rng.random() < 0.2 else None, "sleep": {"b": 0.2}},
            "ttl": 900,  # the TTL runs from creation, through admission: not what this test is about
        }
        for _ in range(200)
    ]
    ids = await call(client.start_many, requests)
    oids = [ObjectId(i) for i in ids]
    kills = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 480
    next_report = loop.time()
    while loop.time() < deadline:
        live = await store.sagas.count_documents({"_id": {"$in": oids}, "state": {"$nin": ["completed", "aborted"]}})
        if live == 0:
            break
        if loop.time() >= next_report:
            next_report = loop.time() + 10
            health = await asyncio.wait_for(client.supervisor.health.remote(), 30)
            print(f"soak: {live} unfinished, {kills} kills, supervisor {health}", flush=True)
        # victims among the sagas running right now: most of the 200 are waiting for admission or done
        running = [str(d["_id"]) async for d in store.sagas.find({"_id": {"$in": oids}, "state": "running"}, {"_id": 1})]
        if kills < 25 and running:
            victim = rng.choice(sorted(running))
            handle = _actor(victim)
            if handle is not None:
                try:
                    os.kill(await asyncio.wait_for(handle.pid.remote(), 5), signal.SIGKILL)
                    kills += 1
                except (ray.exceptions.RayActorError, ProcessLookupError, asyncio.TimeoutError):
                    pass
        await asyncio.sleep(0.3)
    assert kills >= 5, "the soak must really kill actors"
    states = Counter()
    for saga_id, request in zip(ids, requests):
        saga = await store.get(saga_id)
        states[saga.state] += 1
        expected = SagaState.ABORTED if request["payload"]["fail_at"] else SagaState.COMPLETED
        assert saga.state == expected, f"{saga_id}: {saga.state} ({saga.error})"
        await assert_consistent(store, mongo, saga_id)
    assert sum(states.values()) == 200


async def test_whole_ray_cluster_restart_mid_run(client: Any, store: Any, mongo: Any, ray_session: Any) -> None:
    requests = [
        {"job": "test:chain", "payload": {"fail_at": "d" if i % 4 == 0 else None, "sleep": {"b": 1.5}}}
        for i in range(24)
    ]
    ids = await call(client.start_many, requests)

    async def enough_in_flight() -> bool:
        return sum([await stage_started(store, i, "b") for i in ids]) >= 4

    await poll(enough_in_flight, timeout=90, what="sagas in flight")
    ray.shutdown()  # every actor, the supervisor and the raylet are gone
    init_ray()
    await call(client.reconnect)  # a fresh supervisor restores from MongoDB
    for saga_id, request in zip(ids, requests):
        saga = await call(client.wait, saga_id, 240)
        expected = SagaState.ABORTED if request["payload"]["fail_at"] else SagaState.COMPLETED
        assert saga.state == expected, f"{saga_id}: {saga.state} ({saga.error})"
        await assert_consistent(store, mongo, saga_id)
