"""Job versions: an in-flight saga resumes on the definition it started with.

v1 and v2 of one job differ in their steps after a durable timer, so which
definition ran is visible in the stages.  A saga starts on v1 and is held at
the timer (the runner checkpoints it ``waiting`` and returns, as a saga actor
leaves); then v2 is "deployed" — a registry with both versions — and the
saga is resumed by a new runner, while a new saga starts on v2.  The runner
runs in this process on a :class:`ManualClock` against the real dev MongoDB,
in a database no supervisor sweeps.
"""
from __future__ import annotations

from typing import Any

import pytest

from essential.orchestration import (
    Job,
    JobRegistry,
    ManualClock,
    SagaRunner,
    SagaState,
    StageStatus,
    StartRequest,
    build_saga,
)
from essential.orchestration.states import Action
from essential.persistence.store import MongoSagaStore

from .conftest import JOBS_DB, empty_store
from .jobs import FlowKnobs, _behave, _undo

pytestmark = pytest.mark.asyncio

DB = "essential_versions"
NAME = "t:versioned"


def _step(job: Job, name: str) -> None:
    async def run(ctx: Any) -> dict:
        return {**await _behave(ctx, name), "version": job.version}

    async def undo(ctx: Any, result: Any) -> dict:
        return await _undo(ctx, name, result)

    job.step(bucket=f"t.{name}", action="create", name=name)(run).compensation(undo)


def _version(version: int, after_nap: list[str]) -> Job:
    job: Job[FlowKnobs] = Job(NAME, version=version, payload=FlowKnobs, ttl=86400)
    _step(job, "a")
    job.sleep("nap", seconds=lambda ctx: ctx.payload.nap, linger=0)  # checkpointed waiting at once
    for name in after_nap:
        _step(job, name)
    return job


V1 = _version(1, ["c"])
V2 = _version(2, ["c2", "d2"])


@pytest.fixture(scope="module")
async def store(mongo: Any) -> MongoSagaStore:
    return await empty_store(mongo, DB)


async def _start_waiting(store: MongoSagaStore, registry: JobRegistry, clock: ManualClock) -> str:
    """A saga on the registry's latest version, run until it waits at its one-hour timer."""
    saga, event = build_saga(StartRequest(job=NAME, payload={"nap": 3600}), registry, clock)
    await store.create(saga, event)
    held = await SagaRunner(saga.id, store=store, registry=registry, owner="first", clock=clock).run()
    assert held.state == SagaState.WAITING and held.waiting_for == "timer:nap", held
    return saga.id


async def _steps(store: MongoSagaStore, saga_id: str) -> list[tuple[str, str]]:
    return [(s.step, s.status.value) for s in await store.stages(saga_id) if s.action != Action.COMPENSATE]


async def _runs(mongo: Any, saga_id: str) -> list[str]:
    return [d["step"] async for d in mongo[JOBS_DB].calls.find({"saga": saga_id, "kind": "run"}).sort("_id", 1)]


async def test_registry_keeps_every_version_and_new_sagas_get_the_latest() -> None:
    registry = JobRegistry([V1, V2])
    assert registry.get(NAME) is V2 and registry.get(NAME, 1) is V1 and registry.get(NAME, 2) is V2
    assert registry.names() == [NAME]
    with pytest.raises(ValueError, match="registered twice"):
        registry.add(_version(2, ["other"]))


async def test_in_flight_saga_resumes_on_v1_while_new_sagas_run_v2(store: MongoSagaStore, mongo: Any) -> None:
    clock = ManualClock()
    old = await _start_waiting(store, JobRegistry([V1]), clock)
    assert (await store.get(old)).version == 1
    assert await _steps(store, old) == [("a", "succeeded"), ("nap", "started")]

    both = JobRegistry([V1, V2])  # v2 deployed next to v1
    new, event = build_saga(StartRequest(job=NAME, payload={"nap": 3600}), both, clock)
    assert new.version == 2 and event.data["version"] == 2
    await store.create(new, event)
    clock.advance(hours=1)  # both timers are due

    resumed = await SagaRunner(old, store=store, registry=both, owner="second", clock=clock).run()
    assert resumed.state == SagaState.COMPLETED, resumed.error
    assert resumed.version == 1 and (await store.get(old)).version == 1
    assert await _steps(store, old) == [("a", "succeeded"), ("nap", "succeeded"), ("c", "succeeded")]
    assert await _runs(mongo, old) == ["a", "c"], "v1's steps ran, and none of v2's"
    c = next(s for s in await store.stages(old) if s.step == "c")
    assert c.res["version"] == 1 and c.seq == 3

    fresh = await SagaRunner(new.id, store=store, registry=both, owner="t", clock=clock).run()
    assert fresh.state == SagaState.WAITING, "a new saga runs v2 from its first step (and waits at its timer)"
    clock.advance(hours=1)
    fresh = await SagaRunner(new.id, store=store, registry=both, owner="t", clock=clock).run()
    assert fresh.state == SagaState.COMPLETED, fresh.error
    assert fresh.version == 2
    assert await _steps(store, new.id) == [
        ("a", "succeeded"), ("nap", "succeeded"), ("c2", "succeeded"), ("d2", "succeeded")
    ]  # fmt: skip
    assert await _runs(mongo, new.id) == ["a", "c2", "d2"]
    assert {s.res["version"] for s in await store.stages(new.id) if s.step != "nap"} == {2}


async def test_a_saga_whose_version_is_gone_parks_with_the_reason_and_resumes_once_it_is_back(
    store: MongoSagaStore, mongo: Any
) -> None:
    clock = ManualClock()
    saga_id = await _start_waiting(store, JobRegistry([V1]), clock)
    clock.advance(hours=1)
    only_v2 = JobRegistry([V2])  # v1 was removed from the deployment while the saga waited
    parked = await SagaRunner(saga_id, store=store, registry=only_v2, owner="t", clock=clock).run()
    assert parked.state == SagaState.PARKED
    assert parked.parked_reason is not None
    assert f"job '{NAME}' version 1 is not registered (have [2])" in parked.parked_reason
    assert "deploy the module that defines it" in parked.parked_reason
    assert parked.parked_from == SagaState.WAITING
    assert await _steps(store, saga_id) == [("a", "succeeded"), ("nap", "started")], "nothing of v2 ran"
    assert await _runs(mongo, saga_id) == ["a"]
    topics = [r["topic"] for r in await store.outbox_for(saga_id)]
    assert topics[-1] == "saga.parked"
    again = await SagaRunner(saga_id, store=store, registry=only_v2, owner="t", clock=clock).run()
    assert again.state == SagaState.PARKED, "nothing touches a parked saga until an operator resumes it"

    # v1 deployed again: the operator resumes the saga, which finishes on v1
    await store.resume(saga_id)
    done = await SagaRunner(saga_id, store=store, registry=JobRegistry([V1, V2]), owner="t", clock=clock).run()
    assert done.state == SagaState.COMPLETED, done.error
    assert done.version == 1
    assert await _runs(mongo, saga_id) == ["a", "c"]


async def test_an_operator_abort_of_a_saga_parked_for_its_version_compensates_once_it_is_back(
    store: MongoSagaStore, mongo: Any
) -> None:
    """Without its definition nothing can be compensated: the abort is recorded and the saga stays
    parked, saying why; with v1 deployed again, the recorded abort undoes what v1's steps did."""
    clock = ManualClock()
    saga_id = await _start_waiting(store, JobRegistry([V1]), clock)
    only_v2 = JobRegistry([V2])
    parked = await SagaRunner(saga_id, store=store, registry=only_v2, owner="t", clock=clock).run()
    assert parked.state == SagaState.PARKED

    await store.request_abort(saga_id, "operator gave up")  # what the supervisor's abort does, then it relaunches
    still = await SagaRunner(saga_id, store=store, registry=only_v2, owner="t", clock=clock).run()
    assert still.state == SagaState.PARKED and "version 1 is not registered" in (still.parked_reason or "")
    assert still.abort_requested == "operator gave up", "the abort is kept until it can be carried out"

    await store.request_abort(saga_id, "operator gave up")  # v1 is back: the operator aborts again
    done = await SagaRunner(saga_id, store=store, registry=JobRegistry([V1, V2]), owner="t", clock=clock).run()
    assert done.state == SagaState.ABORTED, f"{done.state.value}: {done.error}"
    assert "operator gave up" in (done.error or "")
    stages = await store.stages(saga_id)
    undone = [s.compensates for s in stages if s.action == Action.COMPENSATE and s.status == StageStatus.SUCCEEDED]
    assert undone == [1], "a (stage 1) is compensated; the timer has nothing to undo"
    assert await _runs(mongo, saga_id) == ["a"], "c never ran"
    assert await mongo[JOBS_DB].effects.count_documents({"saga": saga_id}) == 0
