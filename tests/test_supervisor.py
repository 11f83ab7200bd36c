"""Recovery proven by really killing actors, Ray and MongoDB."""
from __future__ import annotations

import asyncio
import os
import random
import signal
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import ray
from bson import ObjectId
from ray.util.state import list_actors

from essential.actors.settings import Settings
from essential.orchestration import LeaseLost, SagaRunner, SagaState, StartRequest, SystemClock, build_saga
from essential.orchestration.registry import JobRegistry
from essential.orchestration.states import Action, StageStatus
from essential.persistence.store import MongoSagaStore

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


async def _peer(mode: str, database: str, saga_id: str, owner: str) -> dict[str, Any]:
    """Run ``tests/fencing_peer.py``: a runner in another process, with its own MongoDB client."""
    import json
    import subprocess
    import sys

    from .conftest import REPO

    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "tests.fencing_peer", mode, database, saga_id, owner],
        cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, f"peer {mode} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


async def test_stale_runner_is_fenced_off_and_stops(settings: Settings, mongo: Any) -> None:
    """The newer runner lives in another process with its own MongoDB client (its own sessions and
    its own store's memory of the saga), so the stale runner is stopped by MongoDB alone."""
    # a database the supervisor does not sweep, so only this test's two runners compete
    store = MongoSagaStore(mongo, "essential_fencing")
    await store.ensure_indexes()
    registry = JobRegistry.from_modules(["tests.jobs"])
    gate = f"g-{uuid.uuid4().hex}"  # a is still running when the lease moves, however slow the machine
    saga, event = build_saga(StartRequest(job="test:chain", payload={"gate": {"a": gate}}), registry, SystemClock())
    await store.create(saga, event)
    stale = SagaRunner(saga.id, store=store, registry=registry, owner="stale")
    task = asyncio.create_task(stale.run())

    async def a_running() -> bool:
        return await mongo[JOBS_DB].calls.count_documents({"saga": saga.id, "step": "a"}) == 1

    await poll(a_running, timeout=30, what="stale runner to run a")
    assert await stage_started(store, saga.id, "a")
    newer = await _peer("lease", "essential_fencing", saga.id, "newer")  # what a restored actor does
    assert newer["pid"] != os.getpid()
    assert newer["epoch"] == stale.epoch + 1
    assert not task.done(), "the stale runner does not know yet: it is inside step a"
    await mongo[JOBS_DB].gates.insert_one({"_id": gate})  # a finishes in the stale runner
    with pytest.raises(LeaseLost):
        await asyncio.wait_for(task, 60)
    after = await store.get(saga.id)
    assert after.lease.owner == "newer"
    assert after.lease.epoch == newer["epoch"], "the stale runner moved nothing"
    stages = await store.stages(saga.id)
    assert [(s.step, s.status) for s in stages] == [("a", StageStatus.STARTED)], "the stale result was refused"
    assert after.cursor == 0 and after.state == SagaState.RUNNING
    resumed = await _peer("run", "essential_fencing", saga.id, "newer")
    assert resumed["state"] == SagaState.COMPLETED.value
    assert resumed["epoch"] == newer["epoch"] + 1
    runs = Counter([d["step"] async for d in mongo[JOBS_DB].calls.find({"saga": saga.id, "kind": "run"})])
    assert runs == Counter({"a": 2, "b": 1, "c": 1, "d": 1}), "a again under the new lease, the rest once"
    await assert_consistent(store, mongo, saga.id)


async def test_hung_step_past_ttl_is_aborted_by_the_supervisor(client: Any, store: Any, mongo: Any) -> None:
    """b blocks its actor's event loop (it ignores cancellation) until a gate that stays shut.

    The saga starts with a TTL no machine needs to reach b in; once b provably blocks, the test
    ends the stored TTL now (time passing, as a ManualClock makes it in process: the supervisor
    reads the TTL from MongoDB each sweep). The supervisor must then abort the saga, find the actor
    still holding it past the grace, and replace it; the new actor compensates b and a."""
    gate = f"g-{uuid.uuid4().hex}"
    saga_id = await call(client.start, "test:chain", {"block_gate": {"b": gate}}, ttl=600)

    async def b_blocking() -> bool:
        return await mongo[JOBS_DB].calls.count_documents({"saga": saga_id, "step": "b"}) == 1

    await poll(b_blocking, timeout=60, what="step b blocking its actor")
    blocked = await store.get(saga_id)
    ttl = round((datetime.now(timezone.utc) - blocked.createdAt).total_seconds(), 3)
    ended = await store.sagas.update_one(
        {"_id": ObjectId(saga_id), "state": "running"},
        {"$set": {"ttl": ttl, "expiresAt": blocked.createdAt + timedelta(seconds=ttl)}},
    )
    assert ended.modified_count == 1
    try:
        saga = await call(client.wait, saga_id, 90)
    finally:
        await mongo[JOBS_DB].gates.insert_one({"_id": gate})  # frees a blocked process, if one were left
    assert saga.state == SagaState.ABORTED
    assert "ttl" in (saga.error or saga.abort_requested or "")
    assert saga.abort_requested == f"ttl of {ttl:g}s expired", "the supervisor decided the abort"
    stages = await store.stages(saga_id)
    undone = [s.compensates for s in stages if s.action == Action.COMPENSATE]
    assert undone == [2, 1], "the hung step (outcome unknown) and the step before it are compensated"
    assert saga.lease.epoch >= 2 and str(blocked.lease.owner) != str(saga.lease.owner), "the hung actor was replaced"
    runs = [d["step"] async for d in mongo[JOBS_DB].calls.find({"saga": saga_id, "kind": "run"})]
    assert sorted(runs) == ["a", "b"], "the new actor compensated; it did not run b again"
    topics = [e["topic"] for e in await store.outbox_for(saga_id)]
    assert topics[-1] == "saga.aborted"
    await assert_consistent(store, mongo, saga_id)


def max_overlap(spans: list[tuple[Any, Any]]) -> int:
    """Most spans open at one instant; a span that ends when another starts does not overlap it."""
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])  # ends first on ties
    open_now = peak = 0
    for _, step in edges:
        open_now += step
        peak = max(peak, open_now)
    return peak


async def test_admission_keeps_live_saga_actors_under_the_limit(deployment: Any, mongo: Any) -> None:
    """Sampling live actors can miss a peak, so the bound is proven twice more: while the first
    admitted sagas are held at a gate, exactly the limit runs and the rest stay pending through
    several sweeps; and afterwards, from what MongoDB recorded, no more than the limit of sagas were
    ever between their first write-ahead and their end at the same instant."""
    small, store = await deployment("essential_admission", max_live_sagas=4)
    gate = f"g-{uuid.uuid4().hex}"
    # the TTL runs from creation, through admission: not what this test is about
    ids = await call(small.start_many, [{"job": "test:chain", "payload": {"gate": {"b": gate}}, "ttl": 900}] * 40)
    oids = [ObjectId(i) for i in ids]
    peak = 0

    def alive_sagas() -> int:
        actors = list_actors(
            address=ray.get_runtime_context().gcs_address,
            filters=[("state", "=", "ALIVE"), ("ray_namespace", "=", "essential_admission")],
            limit=1000,
        )
        return sum(1 for a in actors if (a.name or "").startswith("saga:"))

    loop = asyncio.get_running_loop()
    sampled = 0.0

    async def all_done() -> bool:
        nonlocal peak, sampled
        if loop.time() - sampled >= 1.0:  # the state API is heavy for Ray: a sample a second at most
            sampled = loop.time()
            peak = max(peak, await asyncio.to_thread(alive_sagas))
        finished = await store.sagas.count_documents({"_id": {"$in": oids}, "state": "completed"})
        return finished == 40

    async def at_gate() -> set[str]:
        return {d["saga"] async for d in mongo[JOBS_DB].calls.find({"saga": {"$in": ids}, "step": "b"}, {"saga": 1})}

    async def four_held() -> bool:
        return len(await at_gate()) == 4

    await poll(four_held, timeout=120, what="four sagas held at the gate")

    async def sweeps() -> int:
        return (await asyncio.wait_for(small.supervisor.health.remote(), 30))["sweeps"]

    seen = await sweeps()
    await poll(lambda: _more(sweeps, seen + 3), timeout=60, what="three more sweeps")  # none may admit a fifth
    assert Counter((await store.states(ids)).values()) == Counter({"running": 4, "pending": 36})
    assert len(await at_gate()) == 4
    assert await asyncio.to_thread(alive_sagas) == 4, "exactly the limit of saga actors, the rest wait without one"
    await mongo[JOBS_DB].gates.insert_one({"_id": gate})

    try:
        await poll(all_done, timeout=240, interval=0.2, what="40 admitted sagas to finish")
    except AssertionError as exc:
        health = await asyncio.wait_for(small.supervisor.health.remote(), 30)
        raise AssertionError(f"{exc}: {Counter((await store.states(ids)).values())}; supervisor {health}") from None
    assert 1 <= peak <= 4, f"saw {peak} live saga actors with a limit of 4"

    spans = []
    async for doc in store.sagas.find({"_id": {"$in": oids}}):
        first = await store.stages_col.find_one({"saga": doc["_id"], "seq": 1})
        assert doc["state"] == "completed" and doc["committed_at"] >= first["started_at"]
        spans.append((first["started_at"], doc["committed_at"]))
    assert len(spans) == 40
    assert max_overlap(spans) == 4, f"{max_overlap(spans)} sagas were running at once with a limit of 4"


async def _more(read: Any, at_least: int) -> bool:
    return await read() >= at_least


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


SOAK_SAGAS, SOAK_KILLS = 30, 8


@pytest.mark.timeout(600)
async def test_randomized_soak_with_actor_kills(client: Any, store: Any, mongo: Any) -> None:
    """A short in-suite soak: saga actors SIGKILLed at random while a batch waits for admission.
    The long one, killing every part of the stack, is `make soak` (bench/soak.py)."""
    rng = random.Random(7)
    requests = [
        {
            "job": "test:chain",
            "payload": {"fail_at": "d" if rng.random() < 0.2 else None, "sleep": {"b": 0.2}},
            "ttl": 900,  # the TTL runs from creation, through admission: not what this test is about
        }
        for _ in range(SOAK_SAGAS)
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
        # victims among the sagas running right now: most of the batch is waiting for admission or done
        running = [str(d["_id"]) async for d in store.sagas.find({"_id": {"$in": oids}, "state": "running"}, {"_id": 1})]
        if kills < SOAK_KILLS and running:
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
    assert sum(states.values()) == SOAK_SAGAS


async def test_whole_ray_cluster_restart_mid_run(client: Any, store: Any, mongo: Any, ray_session: Any) -> None:
    """Step b is held at a gate until the cluster is back, so the sagas in b when Ray goes down
    were surely interrupted there: each must be restored (lease epoch 2 or more, b run again)."""
    gate = f"g-{uuid.uuid4().hex}"
    requests = [
        {"job": "test:chain", "payload": {"fail_at": "d" if i % 4 == 0 else None, "gate": {"b": gate}}, "ttl": 900}
        for i in range(24)  # a TTL that outlasts the cluster's restart: expiry is not what this tests
    ]
    ids = await call(client.start_many, requests)

    async def enough_in_flight() -> bool:
        running_b = await mongo[JOBS_DB].calls.count_documents({"saga": {"$in": ids}, "step": "b"})
        return sum([await stage_started(store, i, "b") for i in ids]) >= 4 and running_b >= 4

    await poll(enough_in_flight, timeout=90, what="sagas in flight")
    ray.shutdown()  # every actor, the supervisor and the raylet are gone
    # nothing runs now: the sagas whose b had begun (its run recorded) were cut off in it
    in_b = {d["saga"] async for d in mongo[JOBS_DB].calls.find({"saga": {"$in": ids}, "step": "b"}, {"saga": 1})}
    assert len(in_b) >= 4
    for saga_id in in_b:
        b = next(s for s in await store.stages(saga_id) if s.step == "b")
        assert b.status == StageStatus.STARTED, "held at the gate: b cannot have finished"
    epochs_before = {i: (await store.get(i)).lease.epoch for i in in_b}
    init_ray()
    await call(client.reconnect)  # a fresh supervisor restores from MongoDB
    await mongo[JOBS_DB].gates.insert_one({"_id": gate})
    restored = 0
    for saga_id, request in zip(ids, requests):
        saga = await call(client.wait, saga_id, 240)
        expected = SagaState.ABORTED if request["payload"]["fail_at"] else SagaState.COMPLETED
        assert saga.state == expected, f"{saga_id}: {saga.state} ({saga.error})"
        await assert_consistent(store, mongo, saga_id)
        if saga_id in in_b:
            assert saga.lease.epoch >= 2 and saga.lease.epoch > epochs_before[saga_id], f"{saga_id} was not restored"
            b_runs = await mongo[JOBS_DB].calls.count_documents({"saga": saga_id, "step": "b", "kind": "run"})
            assert b_runs == 2, f"{saga_id}: the interrupted b ran {b_runs} times, not once more"
            restored += 1
    assert restored == len(in_b) >= 4, "sagas interrupted by the restart were restored and ended correctly"
