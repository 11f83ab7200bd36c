"""One checkpoint transaction per step (results folded into the next write-ahead),
with the durability contract unchanged: a step's result is durable before the next step runs.

The runner runs in this process against the real dev MongoDB; a command listener
counts the transactions it commits.
"""
from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any, AsyncIterator

import pytest
from pymongo import AsyncMongoClient, monitoring

from essential.orchestration import (
    JobRegistry,
    SagaRunner,
    SagaState,
    StageStatus,
    StartRequest,
    SystemClock,
    build_saga,
)
from essential.orchestration.states import Action
from essential.persistence.store import MongoSagaStore

from .conftest import JOBS_DB, poll

pytestmark = pytest.mark.asyncio
STEPS = 4  # test:chain runs a, b, c, d


class Commits(monitoring.CommandListener):
    def __init__(self) -> None:
        self.count = 0
        self.names: list[str] = []  # every command the store sent, in order

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.names.append(event.command_name)
        if event.command_name == "commitTransaction":
            self.count += 1

    def succeeded(self, event: Any) -> None: ...

    def failed(self, event: Any) -> None: ...


@pytest.fixture
async def counted(essential_env: dict[str, str], mongo_uri: str) -> AsyncIterator[tuple[MongoSagaStore, Commits]]:
    commits = Commits()
    client: AsyncMongoClient = AsyncMongoClient(mongo_uri, tz_aware=True, event_listeners=[commits])
    store = MongoSagaStore(client, "checkpoints_essential")
    await store.ensure_indexes()
    yield store, commits
    await client.close()


@pytest.fixture(scope="module")
def registry() -> JobRegistry:
    return JobRegistry.from_modules(["tests.jobs"])


async def start(store: MongoSagaStore, registry: JobRegistry, payload: dict[str, Any]) -> str:
    saga, event = build_saga(StartRequest(job="test:chain", payload=payload), registry, SystemClock())
    await store.create(saga, event)
    return saga.id


async def event_types(store: MongoSagaStore, saga_id: str) -> list[str]:
    rows = await store.outbox_for(saga_id)
    assert [r["n"] for r in rows] == list(range(1, len(rows) + 1)), "event numbers have gaps or repeats"
    return [r["topic"] for r in rows]


@pytest.mark.parametrize(("fold", "transactions"), [(True, STEPS + 1), (False, 2 * STEPS + 3)])
async def test_a_completed_saga_commits_one_transaction_per_step(
    counted: tuple[MongoSagaStore, Commits], registry: JobRegistry, fold: bool, transactions: int
) -> None:
    store, commits = counted
    saga_id = await start(store, registry, {})
    commits.count = 0
    done = await SagaRunner(saga_id, store=store, registry=registry, owner="t", fold_checkpoints=fold).run()
    assert done.state == SagaState.COMPLETED and done.cursor == STEPS
    assert commits.count == transactions  # folded: each step's write-ahead carries the previous result
    stages = await store.stages(saga_id)
    assert [(s.step, s.status) for s in stages] == [(n, StageStatus.SUCCEEDED) for n in "abcd"]
    assert all(s.res and s.res["step"] == s.step for s in stages), "a folded result was lost"
    assert await event_types(store, saga_id) == ["saga.started"] + ["saga.stage.completed"] * STEPS + ["saga.completed"]


async def test_each_transaction_sends_one_write_command_and_its_commit(
    counted: tuple[MongoSagaStore, Commits], registry: JobRegistry
) -> None:
    """The saga update, its outbox events and its stages go to the server as one bulkWrite
    (MongoDB 8's multi-collection command, which the dev server has), so a completed saga costs
    about what a hand-written log costs: a write and a commit per step."""
    store, commits = counted
    commits.names.clear()
    saga_id = await start(store, registry, {})
    done = await SagaRunner(saga_id, store=store, registry=registry, owner="t").run()
    assert done.state == SagaState.COMPLETED
    sent = [name for name in commits.names if name not in ("hello", "isMaster", "ismaster", "endSessions")]
    start_txn, lease, checkpoints = sent[:2], sent[2:4], sent[4:]
    assert start_txn == ["bulkWrite", "commitTransaction"], "the saga and its started event: one write"
    assert lease == ["find", "update"], "the lease: a read and its compare-and-set"
    assert checkpoints == ["bulkWrite", "commitTransaction"] * (STEPS + 1), sent
    assert await event_types(store, saga_id) == ["saga.started"] + ["saga.stage.completed"] * STEPS + ["saga.completed"]


async def test_a_server_without_bulk_write_gets_one_command_per_collection(
    counted: tuple[MongoSagaStore, Commits], registry: JobRegistry
) -> None:
    """Before MongoDB 8 there is no bulkWrite: the same checkpoints, collection by collection."""
    store, commits = counted
    store._one_command = False  # what the store concludes when the server refuses the command
    commits.names.clear()
    saga_id = await start(store, registry, {"fail_at": "d"})
    done = await SagaRunner(saga_id, store=store, registry=registry, owner="t").run()
    assert done.state == SagaState.ABORTED
    assert "bulkWrite" not in commits.names and {"insert", "update"} <= set(commits.names)
    stages = await store.stages(saga_id)
    assert [(s.step, s.action == Action.COMPENSATE) for s in stages] == [
        ("a", False), ("b", False), ("c", False), ("d", False), ("c", True), ("b", True), ("a", True)
    ]
    types = await event_types(store, saga_id)
    assert types[0] == "saga.started" and types.count("saga.stage.completed") == 7 and types[-1] == "saga.aborted"


async def test_compensation_is_folded_too_and_records_every_stage(
    counted: tuple[MongoSagaStore, Commits], registry: JobRegistry
) -> None:
    store, commits = counted
    saga_id = await start(store, registry, {"fail_at": "d"})
    done = await SagaRunner(saga_id, store=store, registry=registry, owner="t").run()
    assert done.state == SagaState.ABORTED
    stages = await store.stages(saga_id)
    assert [(s.step, s.action == Action.COMPENSATE, s.status) for s in stages] == [
        ("a", False, StageStatus.SUCCEEDED),
        ("b", False, StageStatus.SUCCEEDED),
        ("c", False, StageStatus.SUCCEEDED),
        ("d", False, StageStatus.FAILED),
        ("c", True, StageStatus.SUCCEEDED),
        ("b", True, StageStatus.SUCCEEDED),
        ("a", True, StageStatus.SUCCEEDED),
    ]
    assert all(s.res is not None for s in stages)
    types = await event_types(store, saga_id)
    assert types.count("saga.stage.completed") == len(stages) and types[-1] == "saga.aborted"


async def test_a_result_is_durable_before_the_next_step_runs(
    counted: tuple[MongoSagaStore, Commits], registry: JobRegistry, mongo: Any
) -> None:
    """The runner dies while step b runs: a's folded result is already in MongoDB, so a
    restored runner runs b again and never a."""
    store, _ = counted
    gate = f"g-{uuid.uuid4().hex}"  # b cannot finish before the runner is gone
    saga_id = await start(store, registry, {"gate": {"b": gate}})
    first = asyncio.create_task(SagaRunner(saga_id, store=store, registry=registry, owner="first").run())

    async def b_running() -> bool:
        return await mongo[JOBS_DB].calls.count_documents({"saga": saga_id, "step": "b"}) == 1

    await poll(b_running, timeout=30, what="step b running")
    first.cancel()  # the runner is gone mid-step, as if its process died
    with contextlib.suppress(asyncio.CancelledError):
        await first
    await mongo[JOBS_DB].gates.insert_one({"_id": gate})
    stages = {s.step: s for s in await store.stages(saga_id)}
    assert stages["a"].status == StageStatus.SUCCEEDED and stages["a"].res is not None
    assert stages["b"].status == StageStatus.STARTED

    resumed = await SagaRunner(saga_id, store=store, registry=registry, owner="second").run()
    assert resumed.state == SagaState.COMPLETED
    runs = [d["step"] async for d in mongo[JOBS_DB].calls.find({"saga": saga_id, "kind": "run"})]
    assert runs.count("a") == 1, "a's result was durable: it must not run again"
    assert runs.count("b") == 2, "b was cut off, so it ran again"
    effects = [d["step"] async for d in mongo[JOBS_DB].effects.find({"saga": saga_id})]
    assert sorted(effects) == list("abcd")


@pytest.mark.parametrize("fold", [True, False])
async def test_a_durable_abort_refuses_the_next_write_ahead(
    counted: tuple[MongoSagaStore, Commits], registry: JobRegistry, mongo: Any, fold: bool
) -> None:
    """Only MongoDB knows of the abort (as when a parent aborts its child saga): the step
    in flight finishes, the next one is never written ahead, the finished ones are undone."""
    store, _ = counted
    gate = f"g-{uuid.uuid4().hex}"  # b finishes only once the abort is on record
    saga_id = await start(store, registry, {"gate": {"b": gate}})
    runner = asyncio.create_task(SagaRunner(saga_id, store=store, registry=registry, owner="t", fold_checkpoints=fold).run())

    async def b_running() -> bool:
        return await mongo[JOBS_DB].calls.count_documents({"saga": saga_id, "step": "b"}) == 1

    await poll(b_running, timeout=30, what="step b running")
    await store.request_abort(saga_id, "cancelled in MongoDB only")
    await mongo[JOBS_DB].gates.insert_one({"_id": gate})
    done = await asyncio.wait_for(runner, 60)
    assert done.state == SagaState.ABORTED and "cancelled in MongoDB only" in (done.error or "")
    stages = await store.stages(saga_id)
    assert [(s.step, s.action == Action.COMPENSATE) for s in stages] == [
        ("a", False), ("b", False), ("b", True), ("a", True)
    ], "c must never be written ahead"
    assert await mongo[JOBS_DB].effects.count_documents({"saga": saga_id}) == 0
