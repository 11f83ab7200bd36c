"""Transactional steps: the step's MongoDB writes and its checkpoint commit in one transaction.

``test:ledger``'s ``credit`` step increments a balance (not idempotent: a second application
shows), so exactly-once is visible in the balance itself.  The process that is killed runs the
saga in a runner of its own (``tests/fencing_peer.py``) and is SIGKILLed while its transaction
holds the step's write but has not committed; gates, not sleeps, say when.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from typing import Any, AsyncIterator

import pytest
from pymongo import AsyncMongoClient

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

from .conftest import JOBS_DB, REPO, poll

pytestmark = pytest.mark.asyncio
DB = "essential_transactional"


@pytest.fixture
async def store(essential_env: dict[str, str], mongo_uri: str) -> AsyncIterator[MongoSagaStore]:
    client: AsyncMongoClient = AsyncMongoClient(mongo_uri, tz_aware=True)
    saga_store = MongoSagaStore(client, DB)  # a database no supervisor sweeps: only these runners touch it
    await saga_store.ensure_indexes()
    yield saga_store
    await client.close()


@pytest.fixture(scope="module")
def registry() -> JobRegistry:
    return JobRegistry.from_modules(["tests.jobs"])


async def start(store: MongoSagaStore, registry: JobRegistry, **knobs: Any) -> str:
    saga, event = build_saga(StartRequest(job="test:ledger", payload=knobs), registry, SystemClock())
    await store.create(saga, event)
    return saga.id


async def run(store: MongoSagaStore, registry: JobRegistry, saga_id: str, owner: str = "test") -> Any:
    return await SagaRunner(saga_id, store=store, registry=registry, owner=owner).run()


async def credits(store: MongoSagaStore, saga_id: str) -> int:
    doc = await store.client[JOBS_DB].balances.find_one({"_id": saga_id})
    return int(doc["credits"]) if doc else 0


async def attempts_made(store: MongoSagaStore, saga_id: str) -> list[dict[str, Any]]:
    return [d async for d in store.client[JOBS_DB].reached.find({"saga": saga_id}).sort("_id", 1)]


async def test_killed_between_the_write_and_the_commit_the_effect_is_applied_once(
    store: MongoSagaStore, registry: JobRegistry
) -> None:
    gate = f"tx-{uuid.uuid4().hex}"
    saga_id = await start(store, registry, hold=gate)
    peer = subprocess.Popen(
        [sys.executable, "-m", "tests.fencing_peer", "run", DB, saga_id, "doomed"],
        cwd=REPO, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        reached = await poll(lambda: attempts_made(store, saga_id), timeout=60, what="the peer's write to be made")
        assert reached[0]["pid"] == peer.pid
        assert await credits(store, saga_id) == 0, "the write is not visible before its transaction commits"
        peer.send_signal(signal.SIGKILL)
        await asyncio.to_thread(peer.wait, 30)
    finally:
        if peer.poll() is None:
            peer.kill()
        peer.communicate()
    assert peer.returncode == -signal.SIGKILL

    await store.client[JOBS_DB].gates.insert_one({"_id": gate})
    done = await run(store, registry, saga_id, owner="restored")
    assert done.state == SagaState.COMPLETED
    assert await credits(store, saga_id) == 1, "applied exactly once: the killed run's write was rolled back"
    assert len(await attempts_made(store, saga_id)) == 2, "the step ran twice; only one run committed"
    stages = await store.stages(saga_id)
    assert [(s.step, s.status) for s in stages] == [("credit", StageStatus.SUCCEEDED), ("confirm", StageStatus.SUCCEEDED)]
    assert stages[0].res == {"credited": 1}


async def test_a_retried_attempt_leaves_only_the_committed_write(store: MongoSagaStore, registry: JobRegistry) -> None:
    saga_id = await start(store, registry, fail_after_write=2)
    done = await run(store, registry, saga_id)
    assert done.state == SagaState.COMPLETED
    assert len(await attempts_made(store, saga_id)) == 3
    assert await credits(store, saga_id) == 1, "the two failed attempts' writes were rolled back"
    credit = (await store.stages(saga_id))[0]
    assert credit.step == "credit" and credit.status == StageStatus.SUCCEEDED and credit.meta.retry_count == 2


async def test_a_timed_out_attempt_is_rolled_back_and_the_next_one_commits(
    store: MongoSagaStore, registry: JobRegistry
) -> None:
    saga_id = await start(store, registry, stall_after_write=30.0)  # past the step's 2 s timeout
    done = await run(store, registry, saga_id)
    assert done.state == SagaState.COMPLETED
    assert len(await attempts_made(store, saga_id)) == 2
    assert await credits(store, saga_id) == 1


async def test_a_failed_transactional_step_leaves_nothing_to_undo(store: MongoSagaStore, registry: JobRegistry) -> None:
    saga_id = await start(store, registry, fail_after_write=10)  # every attempt fails after its write
    done = await run(store, registry, saga_id)
    assert done.state == SagaState.ABORTED
    assert await credits(store, saga_id) == 0
    stages = await store.stages(saga_id)
    assert [(s.step, s.action == Action.COMPENSATE, s.status) for s in stages] == [("credit", False, StageStatus.FAILED)]
    assert stages[0].res["outcome"] == "failed", "rolled back: its outcome is known, so it is not compensated"


async def test_the_compensation_commits_with_its_record(store: MongoSagaStore, registry: JobRegistry) -> None:
    saga_id = await start(store, registry, amount=5, refuse_confirm=True)
    done = await run(store, registry, saga_id)
    assert done.state == SagaState.ABORTED
    assert await credits(store, saga_id) == 0, "credited 5, debited 5"
    stages = await store.stages(saga_id)
    assert [(s.step, s.action == Action.COMPENSATE, s.status) for s in stages] == [
        ("credit", False, StageStatus.SUCCEEDED),
        ("confirm", False, StageStatus.FAILED),
        ("credit", True, StageStatus.SUCCEEDED),
    ]
    assert stages[2].compensates == stages[0].seq and stages[2].res == {"debited": 5}


async def test_an_abort_during_the_step_refuses_its_commit(store: MongoSagaStore, registry: JobRegistry) -> None:
    gate = f"tx-{uuid.uuid4().hex}"
    saga_id = await start(store, registry, hold=gate)
    runner = asyncio.create_task(run(store, registry, saga_id))
    await poll(lambda: attempts_made(store, saga_id), timeout=30, what="the step's write to be made")
    await store.request_abort(saga_id, "customer cancelled")
    await store.client[JOBS_DB].gates.insert_one({"_id": gate})
    done = await asyncio.wait_for(runner, 60)
    assert done.state == SagaState.ABORTED
    assert await credits(store, saga_id) == 0, "the step's write never committed"
    assert [s.step for s in await store.stages(saga_id)] == [], "no stage: the step never happened"
