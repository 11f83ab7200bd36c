"""Parked sagas: parked after restores without progress, aborted and resumed by an operator.

Runs its own deployment (namespace and database ``essential_parking``) with
``max_restore_attempts=2``, so a saga whose actor process is killed (SIGKILL by
PID) three times in a row without finishing a stage is parked.  Steps are held
at gates (``tests.jobs`` knobs), so every kill lands while the step provably
runs; a compensation's outage (``undo_outage`` in ``tests.ops_jobs``) lasts
until the test inserts its gate.
"""
from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from typing import Any

import pytest
from bson import ObjectId

from essential.orchestration import SagaState
from essential.orchestration.states import Action, StageStatus

from .conftest import JOBS_DB, poll
from .test_advanced import kill_actor
from .test_saga_runtime import call

pytestmark = pytest.mark.asyncio

NS = "essential_parking"
MAX_RESTORES = 2


@pytest.fixture(scope="module")
async def parking(deployment: Any) -> tuple[Any, Any]:
    return await deployment(NS, job_modules=["tests.jobs", "tests.ops_jobs"], max_restore_attempts=MAX_RESTORES)


async def runs(mongo: Any, saga_id: str) -> Counter:
    return Counter([d["step"] async for d in mongo[JOBS_DB].calls.find({"saga": saga_id, "kind": "run"})])


async def effects(mongo: Any, saga_id: str) -> set[str]:
    return {d["step"] async for d in mongo[JOBS_DB].effects.find({"saga": saga_id})}


async def restore_attempts(store: Any, saga_id: str) -> int:
    doc = await store.sagas.find_one({"_id": ObjectId(saga_id)}, {"restore_attempts": 1})
    return int(doc.get("restore_attempts", 0))


async def kill_and_await_rerun(store: Any, mongo: Any, saga_id: str, step: str) -> None:
    """SIGKILL the saga's actor while ``step`` is held at its gate; wait until a restored actor runs it again."""
    before = (await runs(mongo, saga_id))[step]
    await kill_actor(saga_id, NS)

    async def rerun() -> bool:
        return (await runs(mongo, saga_id))[step] == before + 1

    await poll(rerun, timeout=90, what=f"a restored actor to run {step} again")


def undone(stages: list[Any]) -> list[tuple[int | None, str]]:
    return [(s.compensates, s.status.value) for s in stages if s.action == Action.COMPENSATE]


async def topics(store: Any, saga_id: str) -> list[str]:
    return [r["topic"] for r in await store.outbox_for(saga_id)]


async def test_restores_without_progress_park_the_saga_and_progress_resets_the_count(
    parking: tuple[Any, Any], mongo: Any
) -> None:
    """Two kills in b count two restores; b then succeeds, which resets the count, so the saga
    survives two more kills in c (without the reset it would park at the first) and parks at
    the third, with the reason, its effects kept for an operator."""
    client, store = parking
    gate_b, gate_c = f"g-{uuid.uuid4().hex}", f"g-{uuid.uuid4().hex}"
    saga_id = await call(client.start, "ops:park-restores", {"gate": {"b": gate_b, "c": gate_c}})
    await poll(lambda: _ran(mongo, saga_id, "b", 1), timeout=60, what="b held at its gate")

    for restored in range(1, MAX_RESTORES + 1):
        await kill_and_await_rerun(store, mongo, saga_id, "b")
        assert await restore_attempts(store, saga_id) == restored
        assert (await store.get(saga_id)).state == SagaState.RUNNING

    await mongo[JOBS_DB].gates.insert_one({"_id": gate_b})  # progress: b succeeds, c is held
    await poll(lambda: _ran(mongo, saga_id, "c", 1), timeout=60, what="c held at its gate")
    assert await restore_attempts(store, saga_id) == 0, "a finished stage resets the count"

    for restored in range(1, MAX_RESTORES + 1):
        await kill_and_await_rerun(store, mongo, saga_id, "c")
        assert await restore_attempts(store, saga_id) == restored
    await kill_actor(saga_id, NS)  # the third restore without progress is one too many

    parked = await call(client.wait, saga_id, 90)
    assert parked.state == SagaState.PARKED
    assert parked.parked_reason == f"restored {MAX_RESTORES} times without progress"
    assert parked.parked_from == SagaState.RUNNING
    assert (await runs(mongo, saga_id)) == Counter({"a": 1, "b": MAX_RESTORES + 1, "c": MAX_RESTORES + 1})
    stages = await store.stages(saga_id)
    assert [(s.step, s.status) for s in stages] == [
        ("a", StageStatus.SUCCEEDED), ("b", StageStatus.SUCCEEDED), ("c", StageStatus.STARTED)
    ], "parked where it stood, nothing compensated"  # fmt: skip
    assert await effects(mongo, saga_id) == {"a", "b"}
    assert (await topics(store, saga_id))[-1] == "saga.parked"
    await mongo[JOBS_DB].gates.insert_one({"_id": gate_c})
    # parked means nothing touches it: a sweep neither restores it nor counts it
    await call(client.sweep)
    assert (await store.get(saga_id)).state == SagaState.PARKED
    assert (await runs(mongo, saga_id))["c"] == MAX_RESTORES + 1

    resumed = await call(client.resume, saga_id)  # the operator resumes it: it finishes from c
    assert resumed.state == SagaState.RUNNING and resumed.restore_attempts == 0
    done = await call(client.wait, saga_id, 90)
    assert done.state == SagaState.COMPLETED, done.error
    assert await effects(mongo, saga_id) == {"a", "b", "c"}


async def test_operator_abort_of_a_saga_parked_mid_run_compensates_what_ran(
    parking: tuple[Any, Any], mongo: Any
) -> None:
    client, store = parking
    gate = f"g-{uuid.uuid4().hex}"
    saga_id = await call(client.start, "ops:park-abort", {"gate": {"b": gate}})
    await poll(lambda: _ran(mongo, saga_id, "b", 1), timeout=60, what="b held at its gate")
    for _ in range(MAX_RESTORES):
        await kill_and_await_rerun(store, mongo, saga_id, "b")
    await kill_actor(saga_id, NS)
    parked = await call(client.wait, saga_id, 90)
    assert parked.state == SagaState.PARKED and parked.parked_from == SagaState.RUNNING
    assert await effects(mongo, saga_id) == {"a"}
    await mongo[JOBS_DB].gates.insert_one({"_id": gate})  # no process holds b any more

    aborted = await call(client.abort, saga_id, "operator: give up")
    assert aborted.abort_requested == "operator: give up"
    done = await call(client.wait, saga_id, 90)
    assert done.state == SagaState.ABORTED, f"{done.state.value}: {done.error or done.parked_reason}"
    assert "operator: give up" in (done.error or "")
    stages = await store.stages(saga_id)
    assert [(s.step, s.status) for s in stages if s.action != Action.COMPENSATE] == [
        ("a", StageStatus.SUCCEEDED), ("b", StageStatus.STARTED)
    ], "c never started"  # fmt: skip
    assert undone(stages) == [(2, "succeeded"), (1, "succeeded")], "b (outcome unknown), then a"
    assert await effects(mongo, saga_id) == set()
    assert (await runs(mongo, saga_id))["b"] == MAX_RESTORES + 1, "the abort did not run b again"
    assert (await topics(store, saga_id))[-1] == "saga.aborted"


async def test_a_saga_parked_in_compensation_is_aborted_once_the_cause_is_gone(
    parking: tuple[Any, Any], mongo: Any
) -> None:
    """c fails, b is undone, a's compensation meets an outage: parked. An operator abort while the
    outage lasts runs the compensation again and parks again, saying why; once the outage is over,
    a resume finishes the compensation and the saga ends aborted."""
    client, store = parking
    outage = f"outage-{uuid.uuid4().hex}"
    saga_id = await call(client.start, "ops:park-undo", {"fail_at": "c", "undo_outage": {"a": outage}})
    parked = await call(client.wait, saga_id, 90)
    assert parked.state == SagaState.PARKED and parked.parked_from == SagaState.COMPENSATING
    reason = "compensation of step a (stage 1) failed after 5 attempt(s)"
    assert reason in (parked.parked_reason or "") and "service unavailable" in (parked.parked_reason or "")
    assert "step c failed" in (parked.error or "")
    assert undone(await store.stages(saga_id)) == [(2, "succeeded"), (1, "failed")]
    assert await effects(mongo, saga_id) == {"a"}, "b undone, a's effect left for the operator"

    again = await call(client.abort, saga_id, "operator: abort")
    assert again.state == SagaState.COMPENSATING

    async def parked_twice() -> bool:
        compensations = undone(await store.stages(saga_id))
        return (await store.get(saga_id)).state == SagaState.PARKED and len(compensations) == 3

    await poll(parked_twice, timeout=90, what="the compensation to be tried again and park again")
    still = await store.get(saga_id)
    assert undone(await store.stages(saga_id)) == [(2, "succeeded"), (1, "failed"), (1, "failed")]
    assert reason in (still.parked_reason or ""), "it says why it cannot finish"
    assert await effects(mongo, saga_id) == {"a"}

    await mongo[JOBS_DB].gates.insert_one({"_id": outage})  # the outage is over
    resumed = await call(client.resume, saga_id)
    assert resumed.state == SagaState.COMPENSATING

    async def ended() -> Any:
        saga = await store.get(saga_id)
        return saga if saga.state in (SagaState.ABORTED, SagaState.PARKED) else None

    # read from MongoDB, not client.wait: the previous run's end notice may still be on its way
    # (see test_a_late_end_notice_does_not_end_the_wait_for_the_next_run)
    done = await poll(ended, timeout=90, what="the resumed compensation to end")
    assert done.state == SagaState.ABORTED, f"{done.state.value}: {done.parked_reason}"
    assert done.parked_reason is None and done.aborted_at is not None
    assert undone(await store.stages(saga_id)) == [(2, "succeeded"), (1, "failed"), (1, "failed"), (1, "succeeded")]
    assert await effects(mongo, saga_id) == set()
    assert (await runs(mongo, saga_id)) == Counter({"a": 1, "b": 1, "c": 3}), "no forward step ran again"
    events = await topics(store, saga_id)
    assert events.count("saga.parked") == 2 and events[-1] == "saga.aborted"


async def test_a_late_end_notice_does_not_end_the_wait_for_the_next_run(parking: tuple[Any, Any], mongo: Any) -> None:
    """A run's actor reports the saga's end to the supervisor fire-and-forget, so after a resume
    that notice may arrive after the next run began (seen in about one of four tries when an
    operator resumes a saga the moment MongoDB shows it parked). Here the notice is delivered
    late on purpose: a caller waiting for the resumed run must get that run's end, not the
    previous one's."""
    client, store = parking
    outage = f"outage-{uuid.uuid4().hex}"  # lasts until the end: every run of the compensation parks
    saga_id = await call(client.start, "ops:park-undo", {"fail_at": "c", "undo_outage": {"a": outage}})
    first = await call(client.wait, saga_id, 90)
    assert first.state == SagaState.PARKED
    resumed = await call(client.resume, saga_id)
    assert resumed.state == SagaState.COMPENSATING and resumed.lease.epoch > first.lease.epoch
    # one caller, in this order: the wait (registered at once), then the first run's notice, late
    waiting = client.supervisor.wait.remote(saga_id, 90)
    client.supervisor.saga_ended.remote(saga_id, first.model_dump(mode="json"))
    got = (await asyncio.wait_for(asyncio.wrap_future(waiting.future()), 120))["saga"]
    now = await store.get(saga_id)
    assert got["lease"]["epoch"] > first.lease.epoch, (
        f"the wait for the resumed run ended with the previous run's saga (epoch {got['lease']['epoch']}, "
        f"{got['state']}) while the resumed run was {now.state.value} (epoch {now.lease.epoch})"
    )

    async def parked_again() -> bool:
        return (await store.get(saga_id)).state == SagaState.PARKED and len(undone(await store.stages(saga_id))) == 3

    await poll(parked_again, timeout=90, what="the resumed compensation to park again")
    await mongo[JOBS_DB].gates.insert_one({"_id": outage})
    await call(client.resume, saga_id)

    async def aborted() -> bool:
        return (await store.get(saga_id)).state == SagaState.ABORTED

    await poll(aborted, timeout=90, what="the saga to end aborted")


async def _ran(mongo: Any, saga_id: str, step: str, times: int) -> bool:
    return (await runs(mongo, saga_id))[step] == times
