"""Parallel booking, wallet locks, durable retries, identity review, child shipment.

The real runner drives the example jobs in this process against the real dev
MongoDB and the example services (prefix ``tadv_``); signals are delivered
through the store exactly as the supervisor does, and the subscription's
six-hour retry is fast-forwarded with a :class:`ManualClock`.
"""
from __future__ import annotations

import asyncio
import os
from typing import Any, AsyncIterator

import pytest

from essential.orchestration import (
    JobRegistry,
    ManualClock,
    SagaRunner,
    SagaState,
    StartRequest,
    SystemClock,
    build_saga,
)
from essential.orchestration.clock import Clock
from essential.orchestration.models import Saga, Stage
from essential.orchestration.states import Action, StageStatus
from examples import data
from examples.services import db, identity, logistics, notifications, wallet

pytestmark = pytest.mark.asyncio

PREFIX = "tadv_"
STORE_DB = "tadv_essential"
SEED: dict[str, Any] = {
    "stock": {"apple": 100},
    "wallets": {"alice": 100_000, "bob": 50_000, "carol": 100},
    "users": {"alice": "alice@example.com", "carol": "carol@example.com"},
    "routes": {"north": 1_000, "south": 1_000},
    "vehicles": {"truck-1": 20, "truck-2": 50},
    "drivers": ["dave", "erin"],
}


@pytest.fixture(scope="module")
def examples_env(essential_env: dict[str, str]) -> Any:
    previous = os.environ.get(db.PREFIX_ENV)
    os.environ[db.PREFIX_ENV] = PREFIX
    yield PREFIX
    if previous is None:
        os.environ.pop(db.PREFIX_ENV, None)
    else:
        os.environ[db.PREFIX_ENV] = previous


@pytest.fixture(scope="module")
async def store(examples_env: str, mongo_uri: str) -> Any:
    from essential.persistence.connection import shared_client
    from essential.persistence.store import MongoSagaStore

    client = shared_client(mongo_uri)
    await client.drop_database(STORE_DB)
    saga_store = MongoSagaStore(client, STORE_DB)
    await saga_store.ensure_indexes()
    return saga_store


@pytest.fixture(scope="module")
def registry() -> JobRegistry:
    return JobRegistry.from_modules(["examples.jobs"])


@pytest.fixture
async def world(examples_env: str, store: Any) -> AsyncIterator[dict[str, int]]:
    await data.reset()
    await data.seed(**SEED)
    yield await data.totals()


async def create(store: Any, registry: JobRegistry, job: str, payload: dict, clock: Clock | None = None,
                 **request: Any) -> str:  # fmt: skip
    saga, event = build_saga(StartRequest(job=job, payload=payload, **request), registry, clock or SystemClock())
    await store.create(saga, event)
    return saga.id


def runner(store: Any, registry: JobRegistry, saga_id: str, **kw: Any) -> SagaRunner:
    return SagaRunner(saga_id, store=store, registry=registry, owner="test", **kw)


def forward(stages: list[Stage]) -> dict[str, Stage]:
    return {s.step: s for s in stages if s.action != Action.COMPENSATE}


def compensated(stages: list[Stage]) -> list[str]:
    comps = [s for s in stages if s.action == Action.COMPENSATE]
    assert all(s.status == StageStatus.SUCCEEDED for s in comps), [(s.step, s.res) for s in comps]
    return [s.step for s in comps]


async def until_state(store: Any, saga_id: str, state: SagaState, timeout: float = 30) -> Saga:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        saga = await store.get(saga_id)
        if saga.state == state:
            return saga
        assert loop.time() < deadline, f"{saga_id} still {saga.state}, expected {state}"
        await asyncio.sleep(0.02)


# --------------------------------------------------------------------------- logistic:shipment
async def test_shipment_books_space_vehicle_and_driver_in_parallel(
    world: dict[str, int], store: Any, registry: JobRegistry
) -> None:
    saga_id = await create(store, registry, "logistic:shipment", {"shipment_id": "s-p", "route": "north", "volume": 30})
    saga = await runner(store, registry, saga_id).run()
    assert saga.state == SagaState.COMPLETED, saga.error
    stages = await store.stages(saga_id)
    assert [(s.seq, s.step, s.meta.group) for s in stages] == [
        (1, "reserve_cargo_space", "allocate"), (2, "assign_vehicle", "allocate"),
        (3, "assign_driver", "allocate"), (4, "dispatch", None),
    ]  # fmt: skip
    doc = await db.collection("logistic.shipments").find_one({"_id": "s-p"})
    assert doc["status"] == "dispatched" and doc["vehicle"] == "truck-2" and doc["driver"] in {"dave", "erin"}


async def test_no_vehicle_releases_the_space_and_driver_booked_alongside(
    world: dict[str, int], store: Any, registry: JobRegistry
) -> None:
    payload = {"shipment_id": "s-big", "route": "north", "volume": 60}  # no truck carries 60
    saga = await runner(store, registry, await create(store, registry, "logistic:shipment", payload)).run()
    assert saga.state == SagaState.ABORTED and "no vehicle" in (saga.error or "")
    assert compensated(await store.stages(saga.id)) == ["assign_driver", "reserve_cargo_space"]
    assert await data.totals() == world


# --------------------------------------------------------------------------- bank:transfer
async def test_transfers_on_the_same_wallets_take_turns(
    world: dict[str, int], store: Any, registry: JobRegistry
) -> None:
    first = await create(store, registry, "bank:transfer",
                         {"transfer_id": "t-1", "source": "alice", "target": "bob", "amount": 100, "slow_ms": 200})  # fmt: skip
    second = await create(store, registry, "bank:transfer",
                          {"transfer_id": "t-2", "source": "bob", "target": "alice", "amount": 300})  # fmt: skip
    one = asyncio.create_task(runner(store, registry, first).run())
    await until_state(store, first, SagaState.RUNNING)
    lock_holders = {d["key"]: str(d["saga"]) async for d in store.locks.find({"bucket": "financial.wallets"})}
    while len(lock_holders) < 2:
        await asyncio.sleep(0.01)
        lock_holders = {d["key"]: str(d["saga"]) async for d in store.locks.find({"bucket": "financial.wallets"})}
    assert lock_holders == {"alice": first, "bob": first}
    two = await runner(store, registry, second, linger=60).run()
    done = await one
    assert done.state == two.state == SagaState.COMPLETED, (done.error, two.error)
    debit_2 = forward(await store.stages(second))["debit"]
    assert debit_2.started_at >= done.committed_at, "the second transfer began after the first had ended"
    assert (await wallet.balance("alice"), await wallet.balance("bob")) == (100_200, 49_800)
    assert await store.locks.count_documents({}) == 0


# --------------------------------------------------------------------------- payment:subscription
async def test_declined_subscription_retries_six_hours_later_and_succeeds(
    world: dict[str, int], store: Any, registry: JobRegistry
) -> None:
    clock = ManualClock()
    payload = {"user_id": "carol", "wallet": "carol", "plan": "pro", "amount": 900, "retry_in_hours": 6, "retries": 2}
    saga_id = await create(store, registry, "payment:subscription", payload, clock=clock, ttl=2 * 86400)
    task = asyncio.create_task(runner(store, registry, saga_id, clock=clock, linger=float("inf")).run())
    await clock.until_sleeping()
    assert [m["template"] for m in await notifications.messages_to("carol")] == ["payment_retry"]
    await wallet.seed({"carol": 5_000})  # the user tops up meanwhile
    clock.advance(hours=6)
    saga = await asyncio.wait_for(task, 30)
    assert saga.state == SagaState.COMPLETED, saga.error
    charges = [s for s in await store.stages(saga_id) if s.step == "charge"]
    assert [s.res.get("outcome") for s in charges[:-1]] == ["deferred"] and charges[-1].res["ok"] is True
    assert list(forward(await store.stages(saga_id))) == ["charge", "extend_access"]
    assert await wallet.balance("carol") == 5_000 - 900
    assert await identity.paid_until("carol") is not None


async def test_a_subscription_that_stays_declined_falls_back_to_billing(
    world: dict[str, int], store: Any, registry: JobRegistry
) -> None:
    payload = {"user_id": "carol", "wallet": "carol", "plan": "pro", "amount": 900,
               "retry_in_hours": 0.5 / 3600, "retries": 2}  # fmt: skip
    saga = await runner(store, registry, await create(store, registry, "payment:subscription", payload), linger=30).run()
    assert saga.state == SagaState.COMPLETED, saga.error
    charges = [s for s in await store.stages(saga.id) if s.step == "charge"]
    assert len(charges) == 3 and charges[-1].res["ok"] is False
    assert [m["template"] for m in await notifications.messages_to("carol")] == [
        "payment_retry", "payment_retry", "payment_failed"
    ]  # fmt: skip
    assert await db.collection("billing.payment_retries").count_documents({"user": "carol"}) == 1


# --------------------------------------------------------------------------- user:onboarding
ZOE = {"user_id": "zoe", "email": "zoe@example.com", "name": "Zoe", "welcome_credit": 500, "verify_identity": True}


async def test_onboarding_waits_for_the_identity_review(world: dict[str, int], store: Any, registry: JobRegistry) -> None:
    approved = await create(store, registry, "user:onboarding", ZOE)
    parked = await runner(store, registry, approved, linger=0).run()
    assert parked.state == SagaState.WAITING and parked.waiting_for == "signal:identity.verified"
    assert await wallet.balance("zoe") is None, "no wallet before the review"
    woken, created = await store.deliver_signal(approved, "identity.verified", {"approved": True, "by": "rita"})
    assert created and woken.wake_at is not None and woken.wake_at < parked.wake_at, "the signal made it due"
    saga = await runner(store, registry, approved).run()
    assert saga.state == SagaState.COMPLETED, saga.error
    assert forward(await store.stages(approved))["identity_verification"].res["by"] == "rita"
    assert await wallet.balance("zoe") == 500


async def test_a_rejected_review_deletes_the_account_again(
    world: dict[str, int], store: Any, registry: JobRegistry
) -> None:
    saga_id = await create(store, registry, "user:onboarding", {**ZOE, "user_id": "yan", "email": "yan@example.com"})
    await store.deliver_signal(saga_id, "identity.verified", {"approved": False, "reason": "blurry passport"})
    saga = await runner(store, registry, saga_id).run()
    assert saga.state == SagaState.ABORTED and "blurry passport" in (saga.error or "")
    assert compensated(await store.stages(saga_id)) == ["create_account"]
    assert await db.collection("users.accounts").find_one({"_id": "yan"}) is None


async def test_no_review_within_review_hours_aborts(world: dict[str, int], store: Any, registry: JobRegistry) -> None:
    clock = ManualClock()
    saga_id = await create(store, registry, "user:onboarding", {**ZOE, "review_hours": 48}, clock=clock, ttl=7 * 86400)
    task = asyncio.create_task(runner(store, registry, saga_id, clock=clock, linger=float("inf")).run())
    await clock.until_sleeping()
    clock.advance(hours=48)
    saga = await asyncio.wait_for(task, 30)
    assert saga.state == SagaState.ABORTED and "no signal 'identity.verified' within 172800s" in (saga.error or "")
    assert await data.totals() == world


# --------------------------------------------------------------------------- order:fulfillment + child
ORDER = {"order_id": "o-1", "customer": "alice", "amount": 2_500, "items": [{"sku": "apple", "qty": 3}],
         "ship": {"route": "south", "volume": 10}}  # fmt: skip


async def _run_child_when_created(store: Any, registry: JobRegistry, parent_id: str) -> Saga:
    """What the supervisor does for a pending child: drive it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while (doc := await store.sagas.find_one({"parent": parent_id})) is None:
        assert loop.time() < deadline, "the child saga was not created"
        await asyncio.sleep(0.02)
    return await runner(store, registry, str(doc["_id"])).run()


async def test_an_order_ships_through_a_child_shipment(world: dict[str, int], store: Any, registry: JobRegistry) -> None:
    order_id = await create(store, registry, "order:fulfillment", ORDER)
    parent = asyncio.create_task(runner(store, registry, order_id, linger=60).run())
    child = await _run_child_when_created(store, registry, order_id)
    assert child.state == SagaState.COMPLETED and child.job == "logistic:shipment"
    saga = await parent
    assert saga.state == SagaState.COMPLETED, saga.error
    ship = forward(await store.stages(order_id))["ship"]
    assert ship.res["child"] == child.id and ship.res["results"]["dispatch"]["status"] == "dispatched"
    assert (await db.collection("logistic.shipments").find_one({"_id": "ship-o-1"}))["status"] == "dispatched"


async def test_a_failed_order_compensates_its_shipment_too(
    world: dict[str, int], store: Any, registry: JobRegistry
) -> None:
    order_id = await create(store, registry, "order:fulfillment", {**ORDER, "order_id": "o-2", "fail_at": "mark_order_paid"})
    parent = asyncio.create_task(runner(store, registry, order_id, linger=60).run())
    child = await _run_child_when_created(store, registry, order_id)
    assert child.state == SagaState.COMPLETED
    await until_state(store, child.id, SagaState.COMPENSATING)  # reopened by the parent's compensation
    undone_child = await runner(store, registry, child.id).run()
    assert undone_child.state == SagaState.ABORTED
    saga = await parent
    assert saga.state == SagaState.ABORTED
    assert compensated(await store.stages(order_id)) == [
        "send_confirmation", "ship", "create_invoice", "charge_wallet", "reserve_stock"
    ]  # fmt: skip
    assert compensated(await store.stages(child.id)) == [
        "dispatch", "assign_driver", "assign_vehicle", "reserve_cargo_space"
    ]  # fmt: skip
    assert await data.totals() == world, "stock, money, cargo space, vehicles and drivers as before"
    shipments = logistics.SHIPMENTS
    assert (await db.collection(shipments).find_one({"_id": "ship-o-2"}))["status"] == "cancelled"
