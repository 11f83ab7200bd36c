"""Retry back-off as configured, and whether ``committing`` is ever stored on its own.

The runner runs in this process against the real dev MongoDB, on a
:class:`ManualClock`: the clock stands still unless something sleeps on it, so
the time between two attempts of a step, as the step itself sees it
(``ctx.attempted_at``), is exactly the back-off the runner slept.  A zero or
wrong back-off changes those numbers, whatever the machine's speed.
"""
from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any, AsyncIterator

import pytest
from pydantic import BaseModel
from pymongo import AsyncMongoClient, MongoClient, monitoring

from essential.orchestration import (
    Job,
    JobRegistry,
    ManualClock,
    RetryPolicy,
    SagaRunner,
    SagaState,
    StageStatus,
    StartRequest,
    StepContext,
    build_saga,
)
from essential.orchestration.dsl import COMPENSATION_RETRY
from essential.orchestration.states import Action
from essential.persistence.store import MongoSagaStore

from .conftest import empty_store, poll

pytestmark = pytest.mark.asyncio

DB = "essential_retries"


class Flaky(BaseModel):
    fail_times: int = 0  # the first N attempts of "flaky" fail
    undo_fails: bool = False  # every attempt of "steady"'s compensation fails
    fail_last: bool = False  # "last" fails on every attempt


#: (saga, step, kind, attempt, attempted_at) of every attempt, as the steps saw them
SEEN: list[tuple[str, str, str, int, datetime]] = []

# delays 0.1, 0.3, 0.5 (0.9 capped), 0.5: all below the clock's skip_below, so they move the clock themselves
CAPPED = RetryPolicy(attempts=5, backoff=0.1, multiplier=3.0, max_backoff=0.5)
# delays 30, 45 (60 capped): the runner must really wait on the clock for them
LONG = RetryPolicy(attempts=3, backoff=30.0, multiplier=2.0, max_backoff=45.0)


def _seen(ctx: StepContext[Flaky], step: str, kind: str) -> None:
    assert ctx.attempted_at is not None
    SEEN.append((ctx.saga_id, step, kind, ctx.attempt, ctx.attempted_at))


def _job(name: str, policy: RetryPolicy) -> Job:
    job: Job[Flaky] = Job(name, payload=Flaky, ttl=86400)

    @job.step(bucket="t.steady", action="create", retry=RetryPolicy(attempts=1))
    async def steady(ctx: StepContext[Flaky]) -> dict:
        _seen(ctx, "steady", "run")
        return {"ok": True}

    @steady.compensation
    async def undo_steady(ctx: StepContext[Flaky], result: Any) -> dict:
        _seen(ctx, "steady", "undo")
        if ctx.payload.undo_fails:
            raise RuntimeError(f"compensation outage (attempt {ctx.attempt})")
        return {"undone": True}

    @job.step(bucket="t.flaky", action="create", retry=policy, timeout=30)
    async def flaky(ctx: StepContext[Flaky]) -> dict:
        _seen(ctx, "flaky", "run")
        if ctx.attempt <= ctx.payload.fail_times:
            raise RuntimeError(f"transient failure (attempt {ctx.attempt})")
        return {"attempt": ctx.attempt}

    @flaky.compensation
    async def undo_flaky(ctx: StepContext[Flaky], result: Any) -> dict:
        return {"undone": True}

    @job.step(bucket="t.last", action="create", retry=RetryPolicy(attempts=1))
    async def last(ctx: StepContext[Flaky]) -> dict:
        if ctx.payload.fail_last:
            raise RuntimeError("last step fails")
        return {"ok": True}

    return job


capped_job = _job("t:retry-capped", CAPPED)
long_job = _job("t:retry-long", LONG)
REGISTRY = JobRegistry([capped_job, long_job])


@pytest.fixture(scope="module")
async def store(mongo: Any) -> MongoSagaStore:
    return await empty_store(mongo, DB)


async def _create(store: MongoSagaStore, clock: ManualClock, job: str, payload: dict) -> str:
    saga, event = build_saga(StartRequest(job=job, payload=payload), REGISTRY, clock)
    await store.create(saga, event)
    return saga.id


def _gaps(saga_id: str, step: str, kind: str) -> list[float]:
    """Seconds of the runner's clock between consecutive attempts of ``step``."""
    times = [at for sid, s, k, _, at in SEEN if sid == saga_id and s == step and k == kind]
    return [(b - a).total_seconds() for a, b in zip(times, times[1:])]


def _attempts(saga_id: str, step: str, kind: str) -> list[int]:
    return [n for sid, s, k, n, _ in SEEN if sid == saga_id and s == step and k == kind]


# --------------------------------------------------------------------------- back-off
async def test_retry_policy_delays_grow_by_the_multiplier_up_to_the_cap() -> None:
    assert [CAPPED.delay(n) for n in range(1, 5)] == pytest.approx([0.1, 0.3, 0.5, 0.5])
    assert [LONG.delay(n) for n in range(1, 3)] == [30.0, 45.0]
    assert [RetryPolicy().delay(n) for n in range(1, 4)] == pytest.approx([0.05, 0.1, 0.2])
    assert [COMPENSATION_RETRY.delay(n) for n in range(1, 5)] == pytest.approx([0.1, 0.2, 0.4, 0.8])


async def test_retries_wait_the_configured_backoff_between_attempts(store: MongoSagaStore) -> None:
    """Four failures, then success: the step's attempts are 0.1, 0.3, 0.5 and 0.5 s apart on the
    runner's clock, and nothing else moved it (the whole run took exactly their sum)."""
    clock = ManualClock()
    saga_id = await _create(store, clock, "t:retry-capped", {"fail_times": 4})
    start = clock.now()
    done = await SagaRunner(saga_id, store=store, registry=REGISTRY, owner="t", clock=clock).run()
    assert done.state == SagaState.COMPLETED, done.error
    assert _attempts(saga_id, "flaky", "run") == [1, 2, 3, 4, 5]
    assert _gaps(saga_id, "flaky", "run") == pytest.approx([0.1, 0.3, 0.5, 0.5], abs=1e-6)
    assert (clock.now() - start).total_seconds() == pytest.approx(1.4, abs=1e-6), "only the back-off moved time"
    flaky = next(s for s in await store.stages(saga_id) if s.step == "flaky")
    assert flaky.status == StageStatus.SUCCEEDED and flaky.res == {"attempt": 5}
    assert flaky.meta.retry_count == 4 and len(flaky.meta.errors) == 4
    assert [e.rsplit("(", 1)[1] for e in flaky.meta.errors] == [f"attempt {n})" for n in range(1, 5)]


async def test_no_backoff_after_the_last_attempt(store: MongoSagaStore) -> None:
    """A step that fails all five attempts sleeps four times, then the saga compensates at once."""
    clock = ManualClock()
    saga_id = await _create(store, clock, "t:retry-capped", {"fail_times": 99})
    start = clock.now()
    done = await SagaRunner(saga_id, store=store, registry=REGISTRY, owner="t", clock=clock).run()
    assert done.state == SagaState.ABORTED and "step flaky failed after 5 attempt(s)" in (done.error or "")
    assert _gaps(saga_id, "flaky", "run") == pytest.approx([0.1, 0.3, 0.5, 0.5], abs=1e-6)
    undo = [at for sid, s, k, _, at in SEEN if sid == saga_id and s == "steady" and k == "undo"]
    assert len(undo) == 1
    last_try = max(at for sid, s, k, _, at in SEEN if sid == saga_id and s == "flaky")
    assert undo[0] == last_try, "no back-off was slept after the final attempt"
    assert (clock.now() - start).total_seconds() == pytest.approx(1.4, abs=1e-6)


async def test_a_long_backoff_holds_the_step_until_the_clock_reaches_it(store: MongoSagaStore) -> None:
    """Back-offs of 30 s and 45 s: the runner sleeps on its clock and the next attempt waits for it."""
    clock = ManualClock()
    saga_id = await _create(store, clock, "t:retry-long", {"fail_times": 2})
    task = asyncio.create_task(SagaRunner(saga_id, store=store, registry=REGISTRY, owner="t", clock=clock).run())
    await clock.until_sleeping()
    assert _attempts(saga_id, "flaky", "run") == [1]
    clock.advance(29.9)
    await asyncio.sleep(0)  # a sleep that is due is woken by a callback scheduled now: let it run
    assert _attempts(saga_id, "flaky", "run") == [1] and clock.sleepers == 1, "woken before its 30 s back-off"
    clock.advance(0.1)
    await poll(lambda: _attempts(saga_id, "flaky", "run") == [1, 2], timeout=30, what="attempt 2")
    await clock.until_sleeping()  # attempt 2 failed: now the 45 s back-off
    clock.advance(44.9)
    await asyncio.sleep(0)
    assert _attempts(saga_id, "flaky", "run") == [1, 2] and clock.sleepers == 1, "woken before its 45 s back-off"
    clock.advance(0.1)
    done = await asyncio.wait_for(task, 30)
    assert done.state == SagaState.COMPLETED, done.error
    assert _gaps(saga_id, "flaky", "run") == pytest.approx([30.0, 45.0], abs=1e-6)


async def test_a_failing_compensation_backs_off_as_its_policy_says_then_parks(store: MongoSagaStore) -> None:
    """Compensations retry under COMPENSATION_RETRY (5 attempts, 0.1 s doubling, capped at 2 s)."""
    clock = ManualClock()
    saga_id = await _create(store, clock, "t:retry-capped", {"fail_last": True, "undo_fails": True})
    done = await SagaRunner(saga_id, store=store, registry=REGISTRY, owner="t", clock=clock).run()
    assert done.state == SagaState.PARKED
    assert "compensation of step steady (stage 1) failed after 5 attempt(s)" in (done.parked_reason or "")
    assert _attempts(saga_id, "steady", "undo") == [1, 2, 3, 4, 5]
    assert _gaps(saga_id, "steady", "undo") == pytest.approx([0.1, 0.2, 0.4, 0.8], abs=1e-6)
    undo = next(s for s in await store.stages(saga_id) if s.action == Action.COMPENSATE and s.step == "steady")
    assert undo.status == StageStatus.FAILED and undo.meta.retry_count == 4


# --------------------------------------------------------------------------- committing
class SagaWrites(monitoring.CommandListener):
    """The ``state`` every update of the ``sagas`` collection sets, in the order they were sent."""

    def __init__(self) -> None:
        self.states: list[str] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        command = event.command
        if event.command_name == "update" and command.get("update") == "sagas":
            self._note(update.get("u") for update in command.get("updates", []))
        elif event.command_name == "bulkWrite":  # a checkpoint's writes in one command (MongoDB 8)
            sagas = {i for i, ns in enumerate(command.get("nsInfo", [])) if ns.get("ns", "").endswith(".sagas")}
            self._note(op.get("updateMods") for op in command.get("ops", []) if op.get("update") in sagas)

    def _note(self, updates: Any) -> None:
        for update in updates:
            state = (update or {}).get("$set", {}).get("state")
            if state is not None:
                self.states.append(state)

    def succeeded(self, event: Any) -> None: ...

    def failed(self, event: Any) -> None: ...


class StoredState:
    """A runner observer that reads the saga's *stored* state each time the runner reports a
    state change as durable (a separate, synchronous client: what any reader would see then)."""

    def __init__(self, uri: str) -> None:
        self.sync = MongoClient(uri)
        self.seen: list[tuple[str, str]] = []  # (state reported, state stored)

    def stage_finished(self, saga: Any, stage: Any) -> None: ...

    def state_changed(self, saga: Any, state: SagaState) -> None:
        from bson import ObjectId

        doc = self.sync[DB].sagas.find_one({"_id": ObjectId(saga.id)}, {"state": 1})
        self.seen.append((state.value, doc["state"]))


@pytest.fixture
async def listened(mongo_uri: str, essential_env: dict[str, str]) -> AsyncIterator[tuple[MongoSagaStore, SagaWrites]]:
    writes = SagaWrites()
    client: AsyncMongoClient = AsyncMongoClient(mongo_uri, tz_aware=True, event_listeners=[writes])
    store = MongoSagaStore(client, DB)
    await store.ensure_indexes()
    yield store, writes
    await client.close()


@pytest.mark.parametrize("fold", [False, True])
async def test_committing_is_stored_only_when_checkpoints_are_not_folded(
    listened: tuple[MongoSagaStore, SagaWrites], mongo_uri: str, fold: bool
) -> None:
    """Unfolded, ``committing`` is a checkpoint of its own: written, and the stored state for a
    moment (a reader sees it). Folded, it rides in the transaction that completes the saga: no
    write ever sets it and no reader can see it; only the observer hears of it."""
    store, writes = listened
    clock = ManualClock()
    saga_id = await _create(store, clock, "t:retry-capped", {})
    observer = StoredState(mongo_uri)
    try:
        writes.states.clear()
        done = await SagaRunner(
            saga_id, store=store, registry=REGISTRY, owner="t", clock=clock, observer=observer, fold_checkpoints=fold
        ).run()
    finally:
        observer.sync.close()
    assert done.state == SagaState.COMPLETED, done.error
    committing = [stored for reported, stored in observer.seen if reported == "committing"]
    assert len(committing) == 1, observer.seen
    if fold:
        assert "committing" not in writes.states, writes.states
        assert committing == ["completed"], "folded: when the runner reports committing, the saga is already completed"
        assert writes.states[-1] == "completed"
    else:
        assert writes.states[-2:] == ["committing", "completed"], writes.states
        assert committing == ["committing"], "unfolded: committing is the stored state between its two checkpoints"
    topics = [row["topic"] for row in await store.outbox_for(saga_id)]
    assert topics[-1] == "saga.completed" and "saga.committing" not in topics, "committing has no event of its own"
