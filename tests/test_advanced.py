"""Parallel groups, signals, durable timers, child sagas, bucket locks, time travel.

Each capability runs on real Ray actors and the real MongoDB store, including a
crash (SIGKILL of the actor) in the middle of it.  The time-travel tests run
the runner in process with a :class:`ManualClock`.
"""
from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections import Counter
from typing import Any

import pytest
import ray
from bson import ObjectId

from essential.orchestration import (
    IllegalTransition,
    InvalidRequest,
    JobRegistry,
    ManualClock,
    SagaRunner,
    SagaState,
    StartRequest,
    build_saga,
)
from essential.orchestration.dsl import Job, Lock
from essential.orchestration.models import Stage
from essential.orchestration.states import Action, StageStatus
from essential.persistence.store import MongoSagaStore

from .conftest import JOBS_DB, poll
from .test_saga_runtime import _actor, call

pytestmark = pytest.mark.asyncio


# --------------------------------------------------------------------------- helpers
def forward(stages: list[Stage]) -> list[Stage]:
    return [s for s in stages if s.action != Action.COMPENSATE]


def undone(stages: list[Stage]) -> list[int]:
    """Seqs of the forward stages compensated, in the order their compensations ran."""
    comps = [s for s in stages if s.action == Action.COMPENSATE]
    assert all(s.status == StageStatus.SUCCEEDED for s in comps), [(s.step, s.res) for s in comps]
    return [s.compensates for s in comps]  # type: ignore[misc]


async def stage_is(store: Any, saga_id: str, step: str, status: StageStatus) -> bool:
    return any(s.step == step and s.status == status for s in forward(await store.stages(saga_id)))


async def state_is(store: Any, saga_id: str, state: SagaState) -> bool:
    return (await store.get(saga_id)).state == state


async def effects_of(mongo: Any, saga_id: str) -> set[str]:
    return {d["step"] async for d in mongo[JOBS_DB].effects.find({"saga": saga_id})}


async def runs_of(mongo: Any, saga_id: str) -> Counter:
    return Counter([d["step"] async for d in mongo[JOBS_DB].calls.find({"saga": saga_id, "kind": "run"})])


async def kill_actor(saga_id: str, namespace: str = "essential") -> None:
    """SIGKILL the process of the saga's dedicated actor and wait until Ray knows it is gone.

    The supervisor may restore the saga at once, under the same name: a live actor with
    another pid counts as gone too (a restored step held at a gate would keep it forever)."""
    handle = await poll(lambda: _named(f"saga:{saga_id}", namespace), timeout=30, what=f"actor of {saga_id}")
    killed = await handle.pid.remote()
    os.kill(killed, signal.SIGKILL)

    async def gone_or_replaced() -> bool:
        current = _named(f"saga:{saga_id}", namespace)
        if current is None:
            return True
        try:
            return await asyncio.wait_for(current.pid.remote(), 5) != killed
        except Exception:  # noqa: BLE001 - still the killed actor, not yet known dead
            return False

    await poll(gone_or_replaced, timeout=30, what="the killed actor to be gone")


def _named(name: str, namespace: str) -> Any:
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


async def finished(client: Any, saga_id: str, timeout: float = 180) -> Any:
    return await call(client.wait, saga_id, timeout)


# --------------------------------------------------------------------------- parallel groups
async def test_parallel_group_runs_its_members_concurrently(client: Any, store: Any, mongo: Any) -> None:
    gate = f"g-{uuid.uuid4().hex}"  # every member holds at the gate: they can only all be there if they run at once
    saga_id = await call(client.start, "test:parallel", {"gate": {"b": gate, "c": gate, "d": gate}})

    async def all_members_running() -> bool:
        return await mongo[JOBS_DB].calls.count_documents({"saga": saga_id, "step": {"$in": ["b", "c", "d"]}}) == 3

    await poll(all_members_running, timeout=60, what="b, c and d running at the same time")
    await mongo[JOBS_DB].gates.insert_one({"_id": gate})
    saga = await finished(client, saga_id)
    assert saga.state == SagaState.COMPLETED, saga.error
    stages = await store.stages(saga_id)
    assert [(s.seq, s.step, s.meta.group) for s in stages] == [
        (1, "a", None), (2, "b", "fan"), (3, "c", "fan"), (4, "d", "fan"), (5, "e", None)
    ]  # fmt: skip
    group = [s for s in stages if s.meta.group == "fan"]
    assert len({s.started_at for s in group}) == 1, "the group's stages are written ahead in one checkpoint"
    calls = [d async for d in mongo[JOBS_DB].calls.find({"saga": saga_id, "step": {"$in": ["b", "c", "d"]}})]
    effects = [d async for d in mongo[JOBS_DB].effects.find({"saga": saga_id, "step": {"$in": ["b", "c", "d"]}})]
    assert max(c["at"] for c in calls) < min(e["at"] for e in effects), "every member started before any finished"
    assert await effects_of(mongo, saga_id) == {"a", "b", "c", "d", "e"}


async def test_a_failed_member_compensates_the_others_then_the_steps_before(
    client: Any, store: Any, mongo: Any
) -> None:
    saga_id = await call(client.start, "test:parallel", {"fail_at": "c", "sleep": {"b": 0.3, "d": 0.3}})
    saga = await finished(client, saga_id)
    assert saga.state == SagaState.ABORTED and "step c failed" in (saga.error or "")
    stages = await store.stages(saga_id)
    by_step = {s.step: s for s in forward(stages)}
    assert by_step["c"].status == StageStatus.FAILED
    assert by_step["b"].status == by_step["d"].status == StageStatus.SUCCEEDED, "siblings finish their attempt"
    assert "e" not in by_step
    assert undone(stages) == [4, 2, 1], "d and b (latest seq first), then a; c had no effect"
    assert await effects_of(mongo, saga_id) == set()


async def test_crash_with_the_group_half_done_reruns_only_the_unfinished_member(
    client: Any, store: Any, mongo: Any
) -> None:
    gate = f"g-{uuid.uuid4().hex}"  # c cannot finish before the kill, however slow the machine
    saga_id = await call(client.start, "test:parallel", {"gate": {"c": gate}})

    async def half_done() -> bool:
        return await stage_is(store, saga_id, "b", StageStatus.SUCCEEDED) and await stage_is(
            store, saga_id, "d", StageStatus.SUCCEEDED
        )

    await poll(half_done, timeout=30, what="b and d done, c running")
    assert await stage_is(store, saga_id, "c", StageStatus.STARTED)
    await kill_actor(saga_id)
    await mongo[JOBS_DB].gates.insert_one({"_id": gate})  # the restored run of c goes through
    saga = await finished(client, saga_id)
    assert saga.state == SagaState.COMPLETED, saga.error
    assert saga.lease.epoch >= 2
    runs = await runs_of(mongo, saga_id)
    assert runs["c"] == 2 and runs["b"] == runs["d"] == runs["a"] == runs["e"] == 1
    stages = await store.stages(saga_id)
    assert [(s.seq, s.step) for s in stages] == [(1, "a"), (2, "b"), (3, "c"), (4, "d"), (5, "e")]
    assert await effects_of(mongo, saga_id) == {"a", "b", "c", "d", "e"}


async def test_parallel_groups_hold_plain_steps_only() -> None:
    from pydantic import BaseModel

    class P(BaseModel):
        pass

    job: Job[P] = Job("t:bad", payload=P)

    async def noop(ctx: Any) -> None:
        return None

    with pytest.raises(ValueError, match="plain steps"):
        with job.parallel("g"):
            job.sleep("nap", seconds=1)
    with pytest.raises(ValueError, match="lock"):
        with job.parallel("h"):
            job.step(bucket="x.y", action="update", lock=Lock(keys=lambda c: "k"))(noop)


# --------------------------------------------------------------------------- signals
async def test_a_waiting_saga_holds_no_actor_and_a_signal_relaunches_it(client: Any, store: Any) -> None:
    saga_id = await call(client.start, "test:signal", {})
    await poll(lambda: state_is(store, saga_id, SagaState.WAITING), timeout=30, what="the saga to wait")
    waiting = await store.get(saga_id)
    assert waiting.waiting_for == "signal:go" and waiting.wake_at == waiting.deadline
    await poll(lambda: _actor(saga_id) is None, timeout=30, what="its actor to leave")
    delivered = await call(client.signal, saga_id, "go", {"approved": True})
    assert delivered.id == saga_id
    saga = await finished(client, saga_id)
    assert saga.state == SagaState.COMPLETED, saga.error
    go = next(s for s in await store.stages(saga_id) if s.step == "go")
    assert go.action == Action.WAIT and go.res == {"got": {"approved": True}} and go.meta.signal_id
    assert saga.waiting_for is None and saga.wake_at is None


async def test_crash_while_waiting_and_the_signal_sent_while_the_actor_is_dead(
    deployment: Any, mongo: Any
) -> None:
    # a supervisor that sweeps only when told: nothing restores the saga until the signal is stored
    client, store = await deployment("essential_adv_manual", supervisor_interval=3600)
    saga_id = await call(client.start, "test:signal-linger", {})
    await poll(lambda: stage_is(store, saga_id, "go", StageStatus.STARTED), timeout=30, what="the wait to begin")
    assert (await store.get(saga_id)).state == SagaState.RUNNING, "waits inside its actor (linger)"
    await kill_actor(saga_id, "essential_adv_manual")
    await call(client.signal, saga_id, "go", {"n": 1})  # stored while no actor runs the saga
    assert [s.name for s in await store.signals(saga_id, "go")] == ["go"]
    await call(client.sweep)  # the supervisor restores the orphan
    saga = await finished(client, saga_id)
    assert saga.state == SagaState.COMPLETED, saga.error
    assert saga.lease.epoch >= 2
    handled = await mongo[JOBS_DB].calls.count_documents({"saga": saga_id, "kind": "signal"})
    assert handled == 1
    assert next(s for s in await store.stages(saga_id) if s.step == "go").res == {"got": {"n": 1}}


async def test_a_signal_that_comes_before_the_wait_is_kept(client: Any, store: Any) -> None:
    saga_id = await call(client.start, "test:signal", {"sleep": {"a": 1.0}})
    await call(client.signal, saga_id, "go", {"early": True}, key="callback-1")
    again = await call(client.signal, saga_id, "go", {"early": "duplicate"}, key="callback-1")
    assert again.id == saga_id
    saga = await finished(client, saga_id)
    assert saga.state == SagaState.COMPLETED, saga.error
    assert len(await store.signals(saga_id, "go")) == 1, "a repeated key is stored once"
    assert next(s for s in await store.stages(saga_id) if s.step == "go").res == {"got": {"early": True}}


async def test_no_signal_within_the_timeout_compensates(client: Any, store: Any, mongo: Any) -> None:
    saga = await finished(client, await call(client.start, "test:signal", {"signal_timeout": 1.0}))
    assert saga.state == SagaState.ABORTED and "no signal 'go' within 1s" in (saga.error or "")
    stages = await store.stages(saga.id)
    assert undone(stages) == [1]
    assert await effects_of(mongo, saga.id) == set()


async def test_a_refused_signal_and_an_abort_while_waiting_both_compensate(client: Any, store: Any) -> None:
    refused = await call(client.start, "test:signal", {})
    aborted = await call(client.start, "test:signal", {})
    for saga_id in (refused, aborted):
        await poll(lambda sid=saga_id: state_is(store, sid, SagaState.WAITING), timeout=30, what="waiting")
    await call(client.signal, refused, "go", {"refuse": "documents do not match"})
    await call(client.abort, aborted, "customer cancelled")
    for saga_id, why in ((refused, "documents do not match"), (aborted, "customer cancelled")):
        saga = await finished(client, saga_id)
        assert saga.state == SagaState.ABORTED and why in (saga.error or ""), saga.error
        stages = await store.stages(saga_id)
        assert next(s for s in stages if s.step == "go").status == StageStatus.FAILED
        assert undone(stages) == [1]


async def test_signals_to_an_ended_or_unknown_saga_are_refused(client: Any) -> None:
    done = await finished(client, await call(client.start, "test:chain", {}))
    with pytest.raises(IllegalTransition, match="can no longer be delivered"):
        await call(client.signal, done.id, "go")
    with pytest.raises(InvalidRequest, match="saga"):
        await call(client.signal, "not-an-id", "go")


# --------------------------------------------------------------------------- durable timers
async def test_a_sleeping_saga_is_woken_by_the_supervisor(client: Any, store: Any, mongo: Any) -> None:
    saga_id = await call(client.start, "test:sleep", {"nap": 1.5})
    await poll(lambda: state_is(store, saga_id, SagaState.WAITING), timeout=30, what="the saga to sleep")
    assert (await store.get(saga_id)).waiting_for == "timer:nap"
    saga = await finished(client, saga_id)
    assert saga.state == SagaState.COMPLETED, saga.error
    nap = next(s for s in await store.stages(saga_id) if s.step == "nap")
    c_ran = await mongo[JOBS_DB].calls.find_one({"saga": saga_id, "step": "c"})
    assert nap.meta.wake_at is not None and c_ran["at"] >= nap.meta.wake_at, "c ran after the timer fired"


async def test_crash_while_sleeping_keeps_the_wake_up_time(client: Any, store: Any, mongo: Any) -> None:
    saga_id = await call(client.start, "test:sleep-linger", {"nap": 3.0})
    await poll(lambda: stage_is(store, saga_id, "nap", StageStatus.STARTED), timeout=30, what="the timer to start")
    before = next(s for s in await store.stages(saga_id) if s.step == "nap")
    await kill_actor(saga_id)
    saga = await finished(client, saga_id)
    assert saga.state == SagaState.COMPLETED, saga.error
    assert saga.lease.epoch >= 2
    nap = [s for s in await store.stages(saga_id) if s.step == "nap"]
    assert len(nap) == 1 and nap[0].meta.wake_at == before.meta.wake_at, "the restored timer is the same timer"
    c_ran = await mongo[JOBS_DB].calls.find_one({"saga": saga_id, "step": "c"})
    assert c_ran["at"] >= before.meta.wake_at


async def test_retry_later_defers_the_step_without_compensating_it(client: Any, store: Any, mongo: Any) -> None:
    saga = await finished(client, await call(client.start, "test:later", {"defer": 1.0, "defer_rounds": 2}))
    assert saga.state == SagaState.COMPLETED, saga.error
    polls = [s for s in await store.stages(saga.id) if s.step == "poll"]
    assert [(s.status, (s.res or {}).get("outcome")) for s in polls] == [
        (StageStatus.FAILED, "deferred"), (StageStatus.FAILED, "deferred"), (StageStatus.SUCCEEDED, None)
    ]  # fmt: skip
    assert len({s.meta.idempotency_key for s in polls}) == 3, "each round is a new stage with a new key"
    assert polls[-1].res == {"rounds": 2}
    assert not [s for s in await store.stages(saga.id) if s.action == Action.COMPENSATE]


# --------------------------------------------------------------------------- child sagas
async def _child_of(store: Any, parent_id: str) -> Any:
    doc = await store.sagas.find_one({"parent": parent_id})
    return None if doc is None else await store.get(str(doc["_id"]))


async def test_a_child_saga_runs_and_its_parent_waits_for_it(client: Any, store: Any) -> None:
    parent_id = await call(client.start, "test:parent", {"child": {"sleep": {"x": 0.3}}}, correlation_id="order-7")
    saga = await finished(client, parent_id)
    assert saga.state == SagaState.COMPLETED, saga.error
    child = await _child_of(store, parent_id)
    assert child.state == SagaState.COMPLETED and child.job == "test:child"
    assert child.parent == parent_id and child.parent_seq == 2 and child.correlation_id == "order-7"
    kid = next(s for s in await store.stages(parent_id) if s.step == "kid")
    assert kid.meta.child == child.id
    assert kid.res["child"] == child.id and set(kid.res["results"]) == {"x", "y"}


async def test_compensating_the_parent_compensates_its_completed_child(client: Any, store: Any, mongo: Any) -> None:
    saga = await finished(client, await call(client.start, "test:parent", {"fail_at": "c"}))
    assert saga.state == SagaState.ABORTED
    child = await _child_of(store, saga.id)
    assert child.state == SagaState.ABORTED, "the completed child was compensated"
    assert undone(await store.stages(saga.id)) == [2, 1], "the child (stage 2) before a"
    assert undone(await store.stages(child.id)) == [2, 1]
    assert await effects_of(mongo, saga.id) == set() and await effects_of(mongo, child.id) == set()


async def test_aborting_the_parent_aborts_its_running_child(client: Any, store: Any, mongo: Any) -> None:
    gate = f"g-{uuid.uuid4().hex}"  # the child's x finishes only once the child's abort is on record
    parent_id = await call(client.start, "test:parent", {"child": {"gate": {"x": gate}}})

    async def child_running() -> bool:
        child = await _child_of(store, parent_id)
        return child is not None and await stage_is(store, child.id, "x", StageStatus.STARTED)

    await poll(child_running, timeout=60, what="the child to run")
    await call(client.abort, parent_id, "order cancelled")

    async def child_told() -> bool:
        return bool((await _child_of(store, parent_id)).abort_requested)

    await poll(child_told, timeout=60, what="the parent's abort to reach its child")
    await mongo[JOBS_DB].gates.insert_one({"_id": gate})
    saga = await finished(client, parent_id)
    assert saga.state == SagaState.ABORTED and "order cancelled" in (saga.error or "")
    child = await _child_of(store, parent_id)
    assert child.state == SagaState.ABORTED and "order cancelled" in (child.error or "")
    assert "y" not in {s.step for s in await store.stages(child.id)}, "the child stopped at its next step"
    assert await effects_of(mongo, parent_id) == set() and await effects_of(mongo, child.id) == set()


async def test_crash_of_the_parent_while_its_child_runs(client: Any, store: Any, mongo: Any) -> None:
    parent_id = await call(client.start, "test:parent-linger", {"child": {"sleep": {"x": 2}}})
    await poll(lambda: _child_of(store, parent_id), timeout=60, what="the child to be created")
    await kill_actor(parent_id)
    saga = await finished(client, parent_id)
    assert saga.state == SagaState.COMPLETED, saga.error
    assert saga.lease.epoch >= 2
    child = await _child_of(store, parent_id)
    assert child.state == SagaState.COMPLETED
    assert await store.sagas.count_documents({"parent": parent_id}) == 1, "the restored parent found its child"
    assert await effects_of(mongo, parent_id) == {"a", "c"}


# --------------------------------------------------------------------------- bucket locks
def _span(calls: list[dict], effects: list[dict]) -> tuple[Any, Any]:
    return min(c["at"] for c in calls), max(e["at"] for e in effects)


async def test_two_sagas_on_one_wallet_never_interleave(client: Any, store: Any, mongo: Any) -> None:
    wallet = f"w-{uuid.uuid4().hex[:8]}"
    ids = await call(client.start_many, [{"job": "test:lock-wait", "payload": {"wallet": wallet, "sleep": {"b": 0.8}}}] * 2)
    spans = []
    for saga_id in ids:
        saga = await finished(client, saga_id)
        assert saga.state == SagaState.COMPLETED, saga.error
        calls = [d async for d in mongo[JOBS_DB].calls.find({"saga": saga_id})]
        effects = [d async for d in mongo[JOBS_DB].effects.find({"saga": saga_id})]
        assert {e["step"] for e in effects} == {"a", "b", "c"}
        spans.append(_span(calls, effects))
    first, second = sorted(spans)
    assert first[1] < second[0], f"the sagas' effects interleaved: {spans}"
    assert await store.locks.count_documents({"key": wallet}) == 0, "released when the sagas ended"


async def test_fail_fast_refuses_the_second_saga_and_it_undoes_only_its_own_steps(
    client: Any, store: Any, mongo: Any
) -> None:
    wallet = f"w-{uuid.uuid4().hex[:8]}"
    gate = f"g-{wallet}"
    holder = await call(client.start, "test:lock-wait", {"wallet": wallet, "gate": {"b": gate}})
    await poll(lambda: stage_is(store, holder, "a", StageStatus.SUCCEEDED), timeout=30, what="the lock taken")
    lock = await store.locks.find_one({"key": wallet})
    assert lock["bucket"] == "test.wallets" and str(lock["saga"]) == holder
    second = await finished(client, await call(client.start, "test:lock-fail", {"wallet": wallet}))
    await mongo[JOBS_DB].gates.insert_one({"_id": gate})
    assert second.state == SagaState.ABORTED
    assert f"'{wallet}' in test.wallets is locked by saga {holder} (test:lock-wait" in (second.error or "")
    stages = await store.stages(second.id)
    refused = next(s for s in stages if s.step == "a")
    assert refused.status == StageStatus.FAILED and refused.res["outcome"] == "failed" and not refused.meta.locks
    assert undone(stages) == [1], "only x, which it did, is compensated"
    assert (await runs_of(mongo, second.id))["a"] == 0, "the refused step never ran"
    assert await effects_of(mongo, second.id) == set()
    assert (await finished(client, holder)).state == SagaState.COMPLETED
    assert await store.locks.count_documents({"key": wallet}) == 0


async def test_a_lock_survives_its_holders_crash_but_never_its_end(client: Any, store: Any, mongo: Any) -> None:
    wallet = f"w-{uuid.uuid4().hex[:8]}"
    gate = f"g-{wallet}"
    # b waits for the gate, so the restored holder cannot end (and free the lock) before the test says so
    holder = await call(client.start, "test:lock-wait", {"wallet": wallet, "gate": {"b": gate}})
    await poll(lambda: stage_is(store, holder, "a", StageStatus.SUCCEEDED), timeout=30, what="the lock taken")
    await kill_actor(holder)
    refused = await finished(client, await call(client.start, "test:lock-fail", {"wallet": wallet}))
    assert refused.state == SagaState.ABORTED and f"locked by saga {holder}" in (refused.error or "")
    await mongo[JOBS_DB].gates.insert_one({"_id": gate})
    done = await finished(client, holder)
    assert done.state == SagaState.COMPLETED and done.lease.epoch >= 2, "restored with its lock"
    assert await effects_of(mongo, holder) == {"a", "b", "c"}
    # a lock left behind by a saga that has ended (here: put back by hand) is free
    await store.locks.insert_one({"bucket": "test.wallets", "key": wallet, "saga": ObjectId(holder), "waiters": []})
    after = await finished(client, await call(client.start, "test:lock-fail", {"wallet": wallet}))
    assert after.state == SagaState.COMPLETED, after.error
    assert await store.locks.count_documents({"key": wallet}) == 0


# --------------------------------------------------------------------------- time travel
@pytest.fixture(scope="module")
async def travel(mongo: Any) -> tuple[Any, JobRegistry]:
    """A database no supervisor sweeps: the runner runs in this process, on a ManualClock."""
    await mongo.drop_database("essential_travel")
    store = MongoSagaStore(mongo, "essential_travel")
    await store.ensure_indexes()
    return store, JobRegistry.from_modules(["tests.jobs"])


async def _create(store: Any, registry: JobRegistry, clock: ManualClock, job: str, payload: dict, ttl: float) -> str:
    saga, event = build_saga(StartRequest(job=job, payload=payload, ttl=ttl), registry, clock)
    await store.create(saga, event)
    return saga.id


async def test_time_travel_fast_forwards_a_one_hour_ttl_and_a_six_hour_retry_timer(
    travel: tuple[Any, JobRegistry], mongo: Any
) -> None:
    store, registry = travel
    clock = ManualClock()

    # a saga waiting for a signal that never comes, with a one-hour TTL
    waiting = await _create(store, registry, clock, "test:signal", {}, ttl=3600)
    runner = SagaRunner(waiting, store=store, registry=registry, owner="travel", clock=clock, linger=float("inf"))
    task = asyncio.create_task(runner.run())
    await clock.until_sleeping()
    clock.advance(minutes=59)
    await asyncio.sleep(0.05)
    assert not task.done(), "one minute of TTL left"
    clock.advance(minutes=1)
    expired = await asyncio.wait_for(task, 10)
    assert expired.state == SagaState.ABORTED and "ttl of 3600s expired" in (expired.error or "")
    assert undone(await store.stages(waiting)) == [1]

    # a step that asks to be retried in 6 hours (RetryLater), in a saga with a one-day TTL
    later = await _create(store, registry, clock, "test:later", {"defer": 6 * 3600}, ttl=86400)
    runner = SagaRunner(later, store=store, registry=registry, owner="travel", clock=clock, linger=float("inf"))
    task = asyncio.create_task(runner.run())
    await clock.until_sleeping()
    deferred = next(s for s in await store.stages(later) if s.step == "poll")
    assert (deferred.meta.wake_at - deferred.started_at).total_seconds() == pytest.approx(6 * 3600, abs=1)
    clock.advance(hours=6)
    done = await asyncio.wait_for(task, 10)
    assert done.state == SagaState.COMPLETED, done.error
    assert [s.step for s in forward(await store.stages(later))] == ["a", "poll", "poll", "c"]


async def test_time_travel_across_a_restart_of_the_runner(travel: tuple[Any, JobRegistry]) -> None:
    """The timer is in the store: a new runner (what the supervisor launches) picks it up."""
    store, registry = travel
    clock = ManualClock()
    saga_id = await _create(store, registry, clock, "test:sleep", {"nap": 6 * 3600}, ttl=86400)
    parked = await SagaRunner(saga_id, store=store, registry=registry, owner="r1", clock=clock).run()
    assert parked.state == SagaState.WAITING and parked.waiting_for == "timer:nap"
    assert parked.wake_at == clock.now() + __import__("datetime").timedelta(hours=6)
    clock.advance(hours=5)
    again = await SagaRunner(saga_id, store=store, registry=registry, owner="r2", clock=clock).run()
    assert again.state == SagaState.WAITING, "woken early, it goes back to waiting"
    clock.advance(hours=1)
    done = await SagaRunner(saga_id, store=store, registry=registry, owner="r3", clock=clock).run()
    assert done.state == SagaState.COMPLETED, done.error
    assert done.lease.epoch == 3


async def test_manual_clock_sleeps_until_advanced() -> None:
    clock = ManualClock(skip_below=1.0)
    start = clock.now()
    await clock.sleep(0.5)  # back-off sized: moves the clock by itself
    assert (clock.now() - start).total_seconds() == pytest.approx(0.5)
    sleeper = asyncio.create_task(clock.sleep(3600))
    await clock.until_sleeping()
    clock.advance(minutes=30)
    await asyncio.sleep(0.01)
    assert not sleeper.done()
    clock.advance(minutes=30)
    await asyncio.wait_for(sleeper, 1)
    with pytest.raises(ValueError):
        clock.advance(-1)


async def test_locks_are_released_by_ttl_expiry_and_dropped_by_prune(travel: tuple[Any, JobRegistry]) -> None:
    from datetime import datetime, timedelta, timezone

    from essential.orchestration import SystemClock

    store, registry = travel
    wallet = f"w-{uuid.uuid4().hex[:8]}"
    saga, event = build_saga(
        StartRequest(job="test:lock-wait", payload={"wallet": wallet, "sleep": {"b": 30}}, ttl=1.5), registry, SystemClock()
    )
    await store.create(saga, event)
    done = await SagaRunner(saga.id, store=store, registry=registry, owner="ttl").run()
    assert done.state == SagaState.ABORTED and "ttl" in (done.error or "")
    assert await store.locks.count_documents({"key": wallet}) == 0, "the TTL's abort released the lock"
    # a lock or signal left behind by an ended saga goes when the saga is pruned
    await store.locks.insert_one({"bucket": "test.wallets", "key": wallet, "saga": ObjectId(saga.id), "waiters": []})
    await store.signals_col.insert_one({"saga": ObjectId(saga.id), "name": "late", "at": datetime.now(timezone.utc)})
    summary = [(s.seq, s.step, s.status) for s in await store.stages(saga.id)]
    assert any(s.res is not None for s in await store.stages(saga.id)), "there were results to drop"
    assert await store.prune(datetime.now(timezone.utc) + timedelta(seconds=5)) >= 1
    assert await store.locks.count_documents({"key": wallet}) == 0
    assert await store.signals_col.count_documents({"saga": ObjectId(saga.id)}) == 0
    # *this* saga was pruned (the count above is over the whole database): payloads gone, summary kept
    pruned = await store.get(saga.id)
    assert pruned.pruned_at is not None and pruned.payload == {}
    assert pruned.state == SagaState.ABORTED and pruned.error == done.error
    stages = await store.stages(saga.id)
    assert [(s.seq, s.step, s.status) for s in stages] == summary, "the stage summaries stay"
    assert stages and all(s.req is None and s.res is None for s in stages)


# --------------------------------------------------------------------------- pruning
async def _raw_stages(store: Any, saga_id: str) -> list[dict]:
    return [d async for d in store.stages_col.find({"saga": ObjectId(saga_id)}).sort("seq", 1)]


async def test_prune_drops_the_payloads_of_old_terminal_sagas_only(mongo: Any) -> None:
    """Of old and young, terminal, waiting and parked sagas, only the old terminal ones lose their
    payloads (stage req/res, saga payload, signals, left-over locks); summaries stay, and a
    waiting or parked saga keeps everything however old, since it may still need it."""
    from datetime import datetime, timedelta, timezone

    from essential.orchestration import SystemClock

    await mongo.drop_database("essential_prune_direct")
    store = MongoSagaStore(mongo, "essential_prune_direct")
    await store.ensure_indexes()
    registry = JobRegistry.from_modules(["tests.jobs", "tests.ops_jobs"])
    long_ago = datetime.now(timezone.utc) - timedelta(days=2)

    async def run(job: str, payload: dict, clock: Any) -> Any:
        saga, event = build_saga(StartRequest(job=job, payload=payload, ttl=30 * 86400), registry, clock)
        await store.create(saga, event)
        return await SagaRunner(saga.id, store=store, registry=registry, owner="prune", clock=clock).run()

    old_done = await run("test:chain", {"tag": "old-done"}, ManualClock(long_ago))
    old_aborted = await run("test:chain", {"tag": "old-aborted", "fail_at": "d"}, ManualClock(long_ago))
    young_done = await run("test:chain", {"tag": "young-done"}, SystemClock())
    old_waiting = await run("test:signal", {"tag": "old-waiting"}, ManualClock(long_ago))
    old_parked = await run("ops:prune", {"tag": "old-parked", "fail_at": "b", "fail_undo_at": "a"}, ManualClock(long_ago))
    assert [s.state for s in (old_done, old_aborted, young_done, old_waiting, old_parked)] == [
        SagaState.COMPLETED, SagaState.ABORTED, SagaState.COMPLETED, SagaState.WAITING, SagaState.PARKED
    ]  # fmt: skip
    everyone = [old_done, old_aborted, young_done, old_waiting, old_parked]
    before = {s.id: await _raw_stages(store, s.id) for s in everyone}
    for saga in everyone:  # a signal each, and a lock each (a left-over one for the ended sagas)
        await store.signals_col.insert_one({"saga": ObjectId(saga.id), "name": "late", "at": datetime.now(timezone.utc)})
        await store.locks.insert_one({"bucket": "test.prune", "key": saga.id, "saga": ObjectId(saga.id), "waiters": []})

    cutoff = datetime.now(timezone.utc) - timedelta(days=1)
    assert await store.prune(cutoff) == 2, "exactly the two old terminal sagas"
    for saga in (old_done, old_aborted):
        after = await store.get(saga.id)
        assert after.pruned_at is not None and after.pruned_at > cutoff
        assert after.payload == {}
        assert (after.state, after.error, after.seq) == (saga.state, saga.error, saga.seq), "the summary stays"
        raw = await _raw_stages(store, saga.id)
        assert [(d["seq"], d["step"], d["status"]) for d in raw] == [
            (d["seq"], d["step"], d["status"]) for d in before[saga.id]
        ]  # fmt: skip
        assert all(d["req"] is None and d["res"] is None and d.get("pruned") is True for d in raw)
        assert await store.signals_col.count_documents({"saga": ObjectId(saga.id)}) == 0
        assert await store.locks.count_documents({"saga": ObjectId(saga.id)}) == 0
    for saga in (young_done, old_waiting, old_parked):
        after = await store.get(saga.id)
        assert after.pruned_at is None and after.payload == saga.payload and after.payload["tag"]
        assert await _raw_stages(store, saga.id) == before[saga.id], f"{saga.state.value} saga's stages touched"
        assert any(d["req"] is not None or d["res"] is not None for d in before[saga.id])
        assert await store.signals_col.count_documents({"saga": ObjectId(saga.id)}) == 1
        assert await store.locks.count_documents({"saga": ObjectId(saga.id)}) == 1
    assert await store.prune(cutoff) == 0, "a pruned saga is not pruned again"

    # the young saga goes once it is old enough; the waiting and the parked one never do
    assert await store.prune(datetime.now(timezone.utc) + timedelta(minutes=1)) == 1
    assert (await store.get(young_done.id)).pruned_at is not None
    for saga in (old_waiting, old_parked):
        assert (await store.get(saga.id)).pruned_at is None
        assert await _raw_stages(store, saga.id) == before[saga.id]


async def test_the_supervisor_prunes_old_terminal_sagas_by_itself(deployment: Any, mongo: Any) -> None:
    """A deployment with a one-second retention and a fast sweep: a completed saga's payloads are
    dropped by the supervisor's periodic prune (nobody calls prune here), while a live saga's stay."""
    client, store = await deployment("essential_adv_prune", retention=1.0, supervisor_interval=0.2)
    done = await finished(client, await call(client.start, "test:chain", {"tag": "to-prune"}))
    assert done.state == SagaState.COMPLETED, done.error
    assert all(s.req is not None and s.res is not None for s in await store.stages(done.id))
    gate = f"g-{uuid.uuid4().hex}"
    live = await call(client.start, "test:chain", {"tag": "live", "gate": {"b": gate}})
    await poll(lambda: stage_is(store, live, "b", StageStatus.STARTED), timeout=60, what="the live saga in b")

    async def pruned() -> bool:
        return (await store.get(done.id)).pruned_at is not None

    await poll(pruned, timeout=120, interval=0.2, what="the supervisor to prune the completed saga")
    health = await asyncio.wait_for(client.supervisor.health.remote(), 30)
    assert health["sweeps"] > 1 and health["last_error"] is None, health
    after = await store.get(done.id)
    assert after.payload == {} and after.state == SagaState.COMPLETED
    assert all(s.req is None and s.res is None for s in await store.stages(done.id))
    still = await store.get(live)
    assert still.state == SagaState.RUNNING and still.pruned_at is None and still.payload["tag"] == "live"
    assert (await store.stages(live))[0].res is not None, "a live saga keeps its results"
    await mongo[JOBS_DB].gates.insert_one({"_id": gate})
    assert (await finished(client, live)).state == SagaState.COMPLETED
