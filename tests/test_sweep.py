"""The supervisor's sweep without Ray: restore, TTL expiry, parking and admission, against the real store.

The sweep only asks a placement where sagas run, so here a placement of its own
drives each launched saga as an asyncio task in this process, with the real
runner on the real MongoDB store (no Ray, no actor): what the sweep decides is
seen directly in the stored sagas.
"""
from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from bson import ObjectId

from essential.actors.sagas.sweep import Sweep
from essential.actors.settings import Settings
from essential.orchestration import JobRegistry, ManualClock, Saga, SagaRunner, SagaState, StartRequest, build_saga
from essential.orchestration.states import EventType
from tests.conftest import empty_store, poll

DB = "essential_sweep"


class InProcessPlacement:
    """Runs each launched saga's runner as a task of this event loop (a placement, as the sweep sees one)."""

    def __init__(self, store: Any, registry: JobRegistry, slots: int) -> None:
        self.store, self.registry, self.slots = store, registry, slots
        self.live: set[str] = set()
        self.launch_seq = 0
        self.launched: dict[str, int] = {}
        self.tasks: dict[str, asyncio.Task[Saga]] = {}
        self.runners: dict[str, SagaRunner] = {}

    def slots_free(self) -> int:
        return self.slots - len(self.live)

    def has_room(self, job: str) -> bool:
        return self.slots_free() > 0

    def launch(self, saga_id: str, job: str, *, orchestrated: bool = False) -> None:
        self.launch_seq += 1
        self.launched[saga_id] = self.launch_seq
        self.live.add(saga_id)
        runner = self.runners[saga_id] = SagaRunner(saga_id, store=self.store, registry=self.registry, owner="in-process")
        self.tasks[saga_id] = asyncio.get_running_loop().create_task(self._drive(saga_id, runner))

    async def _drive(self, saga_id: str, runner: SagaRunner) -> Saga:
        try:
            return await runner.run()
        finally:
            await self.store.release(saga_id)

    def launched_since(self, seq: int) -> set[str]:
        return {sid for sid, n in self.launched.items() if n > seq}

    def adopt(self, saga_id: str, job: str) -> None:
        self.live.add(saga_id)

    def forget(self, saga_ids: set[str]) -> None:
        self.live -= saga_ids

    def lost_with_its_host(self, saga_id: str) -> bool:
        return False

    def replace(self, saga_id: str, job: str) -> None:
        task = self.tasks.get(saga_id)
        if task is not None:
            task.cancel()

    async def let_go(self, unfinished: set[str]) -> set[str]:
        gone = {sid for sid in self.live - unfinished if sid not in self.tasks or self.tasks[sid].done()}
        self.forget(gone)
        return gone

    async def running(self, sagas: dict[str, str]) -> set[str]:
        return {sid for sid in sagas if sid in self.tasks and not self.tasks[sid].done()}

    async def notify_abort(self, saga_id: str, job: str, reason: str) -> None:
        if saga_id in self.runners:
            self.runners[saga_id].request_abort(reason)

    async def responsive(self, saga_id: str, job: str) -> bool:
        return True


class Recorded:
    """What the sweep reported, by kind."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def saga_restored(self, job: str) -> None:
        self.seen.append(("restored", job))

    def saga_parked(self, job: str) -> None:
        self.seen.append(("parked", job))

    def saga_expired(self, saga: Saga) -> None:
        self.seen.append(("expired", saga.job))

    async def observe_sweep(self, store: Any, placement: Any, pending: int) -> None:
        self.seen.append(("swept", str(pending)))


@pytest.fixture
async def setup(mongo: Any, mongo_uri: str) -> Any:
    store = await empty_store(mongo, DB)
    registry = JobRegistry.from_modules(["tests.jobs"])
    return store, registry


def sweep_of(store: Any, registry: JobRegistry, **settings: Any) -> tuple[Sweep, InProcessPlacement, Recorded]:
    conf = Settings(database=DB, job_modules=["tests.jobs"], **settings)
    placement = InProcessPlacement(store, registry, conf.max_live_sagas)
    metrics = Recorded()
    sweep = Sweep(placement, conf, ManualClock(), metrics)
    sweep.bind(store)
    return sweep, placement, metrics


async def create(store: Any, registry: JobRegistry, *, ttl: float = 60.0, created_ago: float = 0.0) -> Saga:
    clock = ManualClock(datetime.now(timezone.utc) - timedelta(seconds=created_ago))
    saga, event = build_saga(StartRequest(job="test:chain", payload={}, ttl=ttl), registry, clock)
    stored, _ = await store.create(saga, event)
    return stored


async def ended(store: Any, saga_id: str) -> Saga:
    async def done() -> Saga | None:
        saga = await store.get(saga_id)
        return saga if saga.state.ended else None

    return await poll(done, timeout=60, what=f"saga {saga_id} to end")


async def test_the_sweep_admits_pending_sagas_into_free_slots_only(setup: Any) -> None:
    store, registry = setup
    sweep, placement, _ = sweep_of(store, registry, max_live_sagas=2)
    sagas = [await create(store, registry) for _ in range(3)]
    counts = await sweep.run()
    assert counts["admitted"] == 2 and sweep.backlog, "two slots: the third waits, and the sweep knows"
    assert placement.launched.keys() == {s.id for s in sagas[:2]}, "the oldest pending sagas go first"
    for saga in sagas[:2]:
        assert (await ended(store, saga.id)).state == SagaState.COMPLETED
    counts = await sweep.run()  # the finished sagas free their slots: the third is admitted
    assert counts["admitted"] == 1
    assert (await ended(store, sagas[2].id)).state == SagaState.COMPLETED


async def test_a_pending_saga_past_its_ttl_is_aborted_without_running(setup: Any) -> None:
    store, registry = setup
    sweep, placement, metrics = sweep_of(store, registry)
    late = await create(store, registry, ttl=1.0, created_ago=5.0)
    counts = await sweep.run()
    saga = await store.get(late.id)
    assert counts["expired"] == 1 and late.id not in placement.launched
    assert saga.state == SagaState.ABORTED and "expired before the saga was admitted" in (saga.error or "")
    assert await store.stages(late.id) == []
    events = [e["topic"] async for e in store.outbox.find({"saga": ObjectId(late.id)}).sort("n", 1)]
    assert events == [EventType.STARTED.value, EventType.ABORTED.value]
    assert ("expired", "test:chain") in metrics.seen


async def test_an_orphan_is_restored_and_parked_once_restores_keep_failing(setup: Any) -> None:
    """A running saga that nothing drives (its actor died) is relaunched from its checkpoint; with
    no restore attempts left it is parked instead, fenced under the sweep's own lease."""
    store, registry = setup
    sweep, placement, metrics = sweep_of(store, registry, max_restore_attempts=1)
    orphans = []
    for _ in range(2):
        saga = await create(store, registry)
        leased = await store.acquire_lease(saga.id, "a runner that died")
        await store.transition(saga.id, leased.lease.epoch, {"state": SagaState.RUNNING}, [])
        await store.release(saga.id)
        orphans.append(saga)
    await store.note_restore(orphans[1].id)  # one restore spent already: the next one is over the limit

    counts = await sweep.run()
    assert counts["restored"] == 1 and counts["parked"] == 1
    assert (await ended(store, orphans[0].id)).state == SagaState.COMPLETED
    parked = await store.get(orphans[1].id)
    assert parked.state == SagaState.PARKED and parked.parked_from == SagaState.RUNNING
    assert parked.parked_reason == "restored 1 times without progress"
    assert orphans[1].id not in placement.launched
    assert {("restored", "test:chain"), ("parked", "test:chain")} <= set(metrics.seen)
