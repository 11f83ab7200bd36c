"""Sagas run in Ray actors, checkpoint to MongoDB and compensate in reverse."""
from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import ray

from essential.orchestration import InvalidPayload, InvalidRequest, SagaState, UnknownJob
from essential.orchestration.states import Action, StageStatus

from .conftest import JOBS_DB, poll

pytestmark = pytest.mark.asyncio


async def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Blocking Ray client calls run off the event loop that the MongoDB client uses."""
    return await asyncio.to_thread(fn, *args, **kwargs)


async def run_saga(client: Any, job: str, payload: dict, **kw: Any) -> Any:
    saga_id = await call(client.start, job, payload, **kw)
    return await call(client.wait, saga_id, 60)


async def test_happy_path_records_every_stage_and_event(client: Any, store: Any, mongo: Any) -> None:
    saga = await run_saga(client, "test:chain", {})
    assert saga.state == SagaState.COMPLETED
    assert saga.committed_at is not None and saga.aborted_at is None
    stages = await store.stages(saga.id)
    assert [(s.seq, s.step, s.status) for s in stages] == [
        (1, "a", StageStatus.SUCCEEDED), (2, "b", StageStatus.SUCCEEDED),
        (3, "c", StageStatus.SUCCEEDED), (4, "d", StageStatus.SUCCEEDED),
    ]  # fmt: skip
    assert all(s.meta.idempotency_key == f"{saga.id}:{s.seq}" for s in stages)
    assert [s.res["key"] for s in stages] == [f"{saga.id}:{n}" for n in range(1, 5)]
    events = await store.outbox_for(saga.id)
    assert [e["topic"] for e in events] == ["saga.started"] + ["saga.stage.completed"] * 4 + ["saga.completed"]
    assert [e["n"] for e in events] == list(range(1, 7))
    assert saga.session, "the saga records the MongoDB session of its atomic writes"
    effects = await mongo[JOBS_DB].effects.count_documents({"saga": saga.id})
    assert effects == 4


async def test_failing_step_compensates_in_exact_reverse_order(client: Any, store: Any, mongo: Any) -> None:
    saga = await run_saga(client, "test:chain", {"fail_at": "d"})
    assert saga.state == SagaState.ABORTED
    assert saga.aborted_at is not None and "step d failed" in (saga.error or "")
    stages = await store.stages(saga.id)
    forward = [s for s in stages if s.action != Action.COMPENSATE]
    undo = [s for s in stages if s.action == Action.COMPENSATE]
    assert [(s.step, s.status) for s in forward] == [
        ("a", StageStatus.SUCCEEDED), ("b", StageStatus.SUCCEEDED),
        ("c", StageStatus.SUCCEEDED), ("d", StageStatus.FAILED),
    ]  # fmt: skip
    assert [s.compensates for s in undo] == [3, 2, 1]
    assert [s.step for s in undo] == ["c", "b", "a"]
    assert all(s.status == StageStatus.SUCCEEDED for s in undo)
    assert [s.seq for s in stages] == list(range(1, 8)), "compensations continue the stage sequence"
    assert await mongo[JOBS_DB].effects.count_documents({"saga": saga.id}) == 0
    topics = [e["topic"] for e in await store.outbox_for(saga.id)]
    assert topics[-1] == "saga.aborted" and "saga.completed" not in topics


async def test_retries_are_counted_in_stage_meta(client: Any, store: Any) -> None:
    saga = await run_saga(client, "test:chain", {"fail_at": "b", "fail_times": 2})
    assert saga.state == SagaState.COMPLETED
    b = next(s for s in await store.stages(saga.id) if s.step == "b")
    assert b.meta.retry_count == 2
    assert len(b.meta.errors) == 2 and "injected failure in b" in b.meta.errors[0]


async def test_step_timeout_fails_the_step_and_compensates(client: Any, store: Any) -> None:
    saga = await run_saga(client, "test:timeout", {"sleep": {"b": 5}})
    assert saga.state == SagaState.ABORTED
    stages = await store.stages(saga.id)
    b = next(s for s in stages if s.step == "b" and s.action != Action.COMPENSATE)
    assert b.status == StageStatus.FAILED and b.res["outcome"] == "unknown"
    assert b.meta.retry_count == 2 and all("timed out" in e for e in b.meta.errors)
    # outcome unknown: b's compensation runs too (it tolerates nothing to undo), then a's
    assert [s.compensates for s in stages if s.action == Action.COMPENSATE] == [2, 1]
    assert not any(s.step == "c" for s in stages)


async def test_abort_in_mid_saga_compensates_what_ran(client: Any, store: Any, mongo: Any) -> None:
    gate = f"g-{uuid.uuid4().hex}"  # b finishes only once the abort is on record, however slow the machine
    saga_id = await call(client.start, "test:chain", {"gate": {"b": gate}})

    async def b_started() -> bool:
        return any(s.step == "b" for s in await store.stages(saga_id))

    await poll(b_started, timeout=30, what="step b to start")
    aborted = await call(client.abort, saga_id, "customer cancelled")
    assert aborted.abort_requested == "customer cancelled"
    await mongo[JOBS_DB].gates.insert_one({"_id": gate})
    saga = await call(client.wait, saga_id, 60)
    assert saga.state == SagaState.ABORTED
    stages = await store.stages(saga_id)
    assert [s.step for s in stages if s.action != Action.COMPENSATE] == ["a", "b"]
    assert [s.compensates for s in stages if s.action == Action.COMPENSATE] == [2, 1]
    assert "customer cancelled" in (saga.error or "")


def _ttl_job(clock: Any) -> Any:
    """a, b, c, d like test:chain; c moves the runner's clock to the saga's deadline as it
    begins: the TTL runs out while c is in flight, whatever the machine's speed."""
    from essential.orchestration import Job, RetryPolicy

    from .jobs import Knobs, _behave, _undo

    job: Any = Job("t:ttl-in-flight", payload=Knobs, ttl=60)
    for name in "abcd":

        async def run(ctx: Any, _n: str = name) -> dict:
            if _n == "c":
                clock.set(ctx.deadline)
            return await _behave(ctx, _n)

        async def undo(ctx: Any, result: Any, _n: str = name) -> dict:
            return await _undo(ctx, _n, result)

        job.step(bucket=f"test.{name}", action="create", name=name, retry=RetryPolicy(attempts=3, backoff=0.01),
                 timeout=10)(run).compensation(undo)  # fmt: skip
    return job


async def test_ttl_expiry_is_handled_by_the_runner(mongo: Any) -> None:
    """The TTL runs out while step c runs: the runner cuts c at the deadline (outcome unknown, not
    retried), compensates everything that ran in reverse, and never starts d.

    In process on a ManualClock, in a database no supervisor sweeps: the clock stands still until c
    moves it, so how far the saga gets does not depend on how fast actors start; c's attempt is
    bounded by the TTL left when it began (2 s), after which the runner finds the TTL passed."""
    from essential.orchestration import JobRegistry, ManualClock, SagaRunner, StartRequest, build_saga
    from essential.persistence.store import MongoSagaStore

    await mongo.drop_database("essential_runtime_ttl")
    store = MongoSagaStore(mongo, "essential_runtime_ttl")
    await store.ensure_indexes()
    clock = ManualClock()
    registry = JobRegistry([_ttl_job(clock)])
    built, event = build_saga(
        StartRequest(job="t:ttl-in-flight", payload={"sleep": {"c": 30}}, ttl=2.0), registry, clock
    )
    await store.create(built, event)
    saga = await asyncio.wait_for(SagaRunner(built.id, store=store, registry=registry, owner="t", clock=clock).run(), 60)
    assert saga.state == SagaState.ABORTED
    assert "ttl" in (saga.error or saga.abort_requested or "")
    stages = await store.stages(saga.id)
    forward = [s.seq for s in stages if s.action != Action.COMPENSATE]
    # everything that ran is undone in reverse, and the step after the one in flight never ran
    assert [s.compensates for s in stages if s.action == Action.COMPENSATE] == forward[::-1]
    assert not any(s.step == "d" for s in stages)
    assert forward == [1, 2, 3], "a and b ran, c was in flight when the TTL passed"
    assert saga.error == "ttl of 2s expired during step c"
    c = next(s for s in stages if s.step == "c" and s.action != Action.COMPENSATE)
    assert c.status == StageStatus.FAILED and c.res["outcome"] == "unknown" and c.meta.retry_count == 0
    assert all(s.status == StageStatus.SUCCEEDED for s in stages if s.action == Action.COMPENSATE)
    runs = [d["step"] async for d in mongo[JOBS_DB].calls.find({"saga": saga.id, "kind": "run"})]
    assert sorted(runs) == ["a", "b", "c"], "c was not retried past the TTL"
    assert await mongo[JOBS_DB].effects.count_documents({"saga": saga.id}) == 0


async def test_same_idempotency_key_yields_one_saga(client: Any, store: Any) -> None:
    key = f"order-{uuid.uuid4()}"
    first = await call(client.start, "test:chain", {}, idempotency_key=key)
    second = await call(client.start, "test:chain", {}, idempotency_key=key)
    assert first == second
    # the same key with another payload is the caller's mistake: refused, never a second saga
    from essential.orchestration import IdempotencyKeyReused

    with pytest.raises(IdempotencyKeyReused):
        await call(client.start, "test:chain", {"tag": "different"}, idempotency_key=key)
    assert await store.sagas.count_documents({"idempotency_key": key}) == 1
    assert (await call(client.wait, first, 60)).state == SagaState.COMPLETED


async def test_saga_runs_in_a_named_actor_that_leaves_when_done(client: Any, store: Any) -> None:
    saga_id = await call(client.start, "test:chain", {"sleep": {"b": 1.0}})
    handle = await poll(lambda: _actor(saga_id), timeout=30, what="actor saga:<id>")
    pid = await handle.pid.remote()
    assert isinstance(pid, int)
    saga = await call(client.wait, saga_id, 60)
    assert saga.state == SagaState.COMPLETED
    assert saga.lease.owner and str(pid) in saga.lease.owner, "the named actor drove the saga"
    await poll(lambda: _actor(saga_id) is None, timeout=30, what="actor to exit")


def _actor(saga_id: str) -> Any:
    try:
        return ray.get_actor(f"saga:{saga_id}", namespace="essential")
    except ValueError:
        return None


@pytest.mark.parametrize(
    ("request_kw", "error", "says"),
    [
        ({"job": "no:such-job", "payload": {}}, UnknownJob, "unknown job 'no:such-job'"),
        ({"job": "bank:transfer", "payload": {"amount": "lots"}}, InvalidPayload, "amount"),
        ({"job": "test:chain", "payload": {}, "ttl": -5}, InvalidRequest, "ttl"),
    ],
)
async def test_bad_start_request_is_refused_and_creates_nothing(
    client: Any, store: Any, request_kw: dict, error: type, says: str
) -> None:
    before = await store.sagas.count_documents({})
    job, payload = request_kw.pop("job"), request_kw.pop("payload")
    with pytest.raises(error) as info:
        await call(client.start, job, payload, **request_kw)
    assert says in str(info.value)
    assert await store.sagas.count_documents({}) == before


async def test_job_code_is_told_the_deployment_whose_saga_it_runs(deployment: Any, mongo: Any, settings: Any) -> None:
    """A Ray worker's environment may name another deployment's database (or a server long gone):
    a step asks ``deployment_settings()`` and gets the settings the supervisor sent, never the environment's."""
    client, _ = await deployment("essential_where")
    assert settings.database != "essential_where", "the test's own environment names another database"
    saga = await run_saga(client, "test:where", {})
    assert saga.state == SagaState.COMPLETED, saga.error
    seen = await mongo[JOBS_DB].calls.find_one({"saga": saga.id, "step": "look"})
    assert (seen["database"], seen["namespace"]) == ("essential_where", "essential_where")
