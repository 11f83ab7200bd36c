"""The example jobs, run by the real runner (no Ray) against the real dev MongoDB.

Each test reseeds the example services' databases (prefix ``tex_``) and checks
the data they hold: a completed saga leaves its effects, an aborted one leaves
the invariants (stock units, wallet cents, cargo space, fleet) exactly as they
were, and a step run twice with one idempotency key has its effect once.
"""
from __future__ import annotations

import asyncio
import os
from typing import Any, AsyncIterator

import pytest

from essential.orchestration import (
    InvalidPayload,
    JobRegistry,
    ManualClock,
    SagaRunner,
    SagaState,
    StageStatus,
    StartRequest,
    StepFailed,
    SystemClock,
    build_saga,
)
from essential.orchestration.models import Saga, Stage
from essential.orchestration.states import Action
from examples import data
from examples.services import db, identity, inventory, logistics, notifications, orders, wallet
from examples.services.ledger import AlreadyCompensated

from .conftest import poll

PREFIX = "tex_"
STORE_DB = "tex_essential"

SEED: dict[str, Any] = {
    "stock": {"apple": 100, "pear": 50, "scarce": 10},
    "wallets": {"alice": 100_000, "bob": 50_000, "carol": 100},
    "users": {"alice": "alice@example.com", "bob": "bob@example.com", "carol": "carol@example.com"},
    "routes": {"north": 1_000},
    "vehicles": {"truck-1": 20, "truck-2": 50},
    "drivers": ["dave", "erin"],
}


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def examples_env(essential_env: dict[str, str]) -> Any:
    """Point the example services at their own databases for this module."""
    previous = os.environ.get(db.PREFIX_ENV)
    os.environ[db.PREFIX_ENV] = PREFIX
    yield PREFIX
    if previous is None:
        os.environ.pop(db.PREFIX_ENV, None)
    else:
        os.environ[db.PREFIX_ENV] = previous


@pytest.fixture(scope="module")
async def saga_store(examples_env: str, mongo_uri: str) -> Any:
    from essential.persistence.connection import shared_client
    from essential.persistence.store import MongoSagaStore

    client = shared_client(mongo_uri)
    await client.drop_database(STORE_DB)
    store = MongoSagaStore(client, STORE_DB)
    await store.ensure_indexes()
    return store


@pytest.fixture(scope="module")
def registry() -> JobRegistry:
    return JobRegistry.from_modules(["examples.jobs"])


@pytest.fixture
async def world(examples_env: str, saga_store: Any) -> AsyncIterator[dict[str, int]]:
    """Fresh service databases seeded with SEED; yields the totals before the test."""
    await data.reset()
    await data.seed(**SEED)
    yield await data.totals()


async def run(
    store: Any, registry: JobRegistry, job: str, payload: dict[str, Any], **request: Any
) -> tuple[Saga, list[Stage]]:
    saga, event = build_saga(StartRequest(job=job, payload=payload, **request), registry, SystemClock())
    await store.create(saga, event)
    done = await SagaRunner(saga.id, store=store, registry=registry, owner="test").run()
    return done, await store.stages(saga.id)


def forward(stages: list[Stage]) -> dict[str, Stage]:
    return {s.step: s for s in stages if s.action != Action.COMPENSATE}


def compensated(stages: list[Stage]) -> list[str]:
    """Steps undone, in the order their compensations ran; each must have succeeded."""
    comps = [s for s in stages if s.action == Action.COMPENSATE]
    assert all(s.status == StageStatus.SUCCEEDED for s in comps), [(s.step, s.res) for s in comps]
    return [s.step for s in comps]


def order(order_id: str = "o-1", **extra: Any) -> dict[str, Any]:
    return {"order_id": order_id, "customer": "alice", "amount": 2_500,
            "items": [{"sku": "apple", "qty": 3}, {"sku": "pear", "qty": 2}], **extra}  # fmt: skip


# --------------------------------------------------------------------------- registry, payloads
def test_registry_holds_every_example_job(registry: JobRegistry) -> None:
    assert registry.names() == sorted(
        ["order:fulfillment", "bank:transfer", "payment:subscription", "logistic:shipment",
         "user:onboarding", "order:refund"]  # fmt: skip
    )


@pytest.mark.parametrize(
    "job,payload,problem",
    [
        ("order:fulfillment", order(amount=-5), "amount"),
        ("order:fulfillment", order(items=[]), "items"),
        ("order:fulfillment", order(fail_at="no_such_step"), "not a step of this job"),
        ("order:fulfillment", order(surprise=1), "surprise"),
        ("bank:transfer", {"transfer_id": "t", "source": "alice", "target": "alice", "amount": 1}, "different"),
        ("user:onboarding", {"user_id": "u", "email": "not-an-address", "name": "U"}, "email"),
        ("logistic:shipment", {"shipment_id": "s", "route": "north", "volume": 0}, "volume"),
    ],
)
def test_bad_payloads_are_rejected_before_anything_is_stored(
    registry: JobRegistry, job: str, payload: dict[str, Any], problem: str
) -> None:
    with pytest.raises(InvalidPayload, match=problem):
        build_saga(StartRequest(job=job, payload=payload), registry, SystemClock())


# --------------------------------------------------------------------------- happy paths
async def test_order_fulfillment_completes(world: dict[str, int], saga_store: Any, registry: JobRegistry) -> None:
    saga, stages = await run(saga_store, registry, "order:fulfillment", order())
    assert saga.state == SagaState.COMPLETED, saga.error
    assert list(forward(stages)) == [
        "reserve_stock", "charge_wallet", "create_invoice", "send_confirmation", "mark_order_paid"
    ]  # fmt: skip
    assert await inventory.level("apple") == 97 and await inventory.level("pear") == 48
    assert await wallet.balance("alice") == 100_000 - 2_500
    invoice = await db.collection("billing.invoices").find_one({"_id": "INV-o-1"})
    assert invoice["status"] == "issued" and invoice["amount"] == 2_500
    assert [m["template"] for m in await notifications.messages_to("alice")] == ["order_confirmed"]
    assert await orders.status("o-1") == "paid"


async def test_bank_transfer_completes(world: dict[str, int], saga_store: Any, registry: JobRegistry) -> None:
    payload = {"transfer_id": "t-1", "source": "alice", "target": "bob", "amount": 7_000}
    saga, _ = await run(saga_store, registry, "bank:transfer", payload)
    assert saga.state == SagaState.COMPLETED, saga.error
    assert (await wallet.balance("alice"), await wallet.balance("bob")) == (93_000, 57_000)
    assert (await data.totals())["money"] == world["money"]
    assert (await db.collection("financial.transfers").find_one({"_id": "t-1"}))["status"] == "completed"
    journal = await db.collection("financial.transactions").find({}, {"wallet": 1, "amount": 1, "_id": 0}).to_list()
    assert sorted((j["wallet"], j["amount"]) for j in journal) == [("alice", -7_000), ("bob", 7_000)]


async def test_a_transfer_crashed_after_its_debit_moves_the_money_once(
    world: dict[str, int], saga_store: Any, registry: JobRegistry
) -> None:
    """The debit is a transactional step: the attempt that 'crashed' after its effect was rolled
    back with its transaction, so the retry applies it (not replays it) and the journal has one entry."""
    payload = {"transfer_id": "t-9", "source": "alice", "target": "bob", "amount": 4_000, "crash_after": "debit"}
    saga, stages = await run(saga_store, registry, "bank:transfer", payload)
    assert saga.state == SagaState.COMPLETED, saga.error
    debit = forward(stages)["debit"]
    assert debit.meta.retry_count == 1 and "replayed" not in debit.res, debit.res
    assert (await wallet.balance("alice"), await wallet.balance("bob")) == (96_000, 54_000)
    journal = await db.collection("financial.transactions").find({}, {"wallet": 1, "amount": 1, "_id": 0}).to_list()
    assert sorted((j["wallet"], j["amount"]) for j in journal) == [("alice", -4_000), ("bob", 4_000)]


async def test_subscription_paid_extends_access(world: dict[str, int], saga_store: Any, registry: JobRegistry) -> None:
    payload = {"user_id": "alice", "wallet": "alice", "plan": "pro", "amount": 900, "days": 30}
    saga, stages = await run(saga_store, registry, "payment:subscription", payload)
    assert saga.state == SagaState.COMPLETED, saga.error
    assert list(forward(stages)) == ["charge", "extend_access"]
    assert await wallet.balance("alice") == 100_000 - 900
    assert await identity.paid_until("alice") is not None
    assert await db.collection("billing.payment_retries").count_documents({}) == 0


async def test_subscription_declined_notifies_and_schedules_a_retry(
    world: dict[str, int], saga_store: Any, registry: JobRegistry
) -> None:
    payload = {"user_id": "carol", "wallet": "carol", "plan": "pro", "amount": 900, "retry_in_hours": 6}
    saga, stages = await run(saga_store, registry, "payment:subscription", payload)
    assert saga.state == SagaState.COMPLETED, saga.error  # a declined card is a business outcome, not a failure
    steps = forward(stages)
    assert list(steps) == ["charge", "notify_failure", "schedule_retry"]
    assert steps["charge"].res["ok"] is False and steps["charge"].res["reason"] == "insufficient_funds"
    assert await wallet.balance("carol") == 100
    assert await identity.paid_until("carol") is None
    assert [m["template"] for m in await notifications.messages_to("carol")] == ["payment_failed"]
    retry = await db.collection("billing.payment_retries").find_one({"user": "carol"})
    hours = (retry["due_at"] - retry["created_at"]).total_seconds() / 3600
    assert retry["status"] == "scheduled" and 5.99 < hours < 6.01


async def test_shipment_is_dispatched(world: dict[str, int], saga_store: Any, registry: JobRegistry) -> None:
    payload = {"shipment_id": "s-1", "route": "north", "volume": 30}
    saga, _ = await run(saga_store, registry, "logistic:shipment", payload)
    assert saga.state == SagaState.COMPLETED, saga.error
    doc = await db.collection("logistic.shipments").find_one({"_id": "s-1"})
    assert doc["status"] == "dispatched" and doc["vehicle"] == "truck-2" and doc["driver"] in {"dave", "erin"}
    assert await data.totals() == {**world, "cargo_free": 970, "vehicles_available": 1, "drivers_available": 1}


async def test_onboarding_creates_account_wallet_and_welcome(
    world: dict[str, int], saga_store: Any, registry: JobRegistry
) -> None:
    payload = {"user_id": "zoe", "email": "zoe@example.com", "name": "Zoe", "welcome_credit": 500}
    saga, _ = await run(saga_store, registry, "user:onboarding", payload)
    assert saga.state == SagaState.COMPLETED, saga.error
    assert (await db.collection("users.accounts").find_one({"_id": "zoe"}))["email"] == "zoe@example.com"
    assert await wallet.balance("zoe") == 500
    assert [m["template"] for m in await notifications.messages_to("zoe")] == ["welcome"]


async def test_onboarding_with_a_taken_email_fails_without_retrying(
    world: dict[str, int], saga_store: Any, registry: JobRegistry
) -> None:
    payload = {"user_id": "alice2", "email": "alice@example.com", "name": "Alice again"}
    saga, stages = await run(saga_store, registry, "user:onboarding", payload)
    assert saga.state == SagaState.ABORTED
    assert forward(stages)["create_account"].meta.retry_count == 0
    assert await db.collection("users.accounts").count_documents({}) == 3


async def test_refund_restocks_refunds_and_issues_a_credit_note(
    world: dict[str, int], saga_store: Any, registry: JobRegistry
) -> None:
    payload = {"refund_id": "r-1", "order_id": "o-9", "customer": "bob", "amount": 1_200,
               "items": [{"sku": "pear", "qty": 4}]}  # fmt: skip
    saga, _ = await run(saga_store, registry, "order:refund", payload)
    assert saga.state == SagaState.COMPLETED, saga.error
    assert await inventory.level("pear") == 54
    assert await wallet.balance("bob") == 51_200
    assert (await db.collection("billing.credit_notes").find_one({"_id": "CN-r-1"}))["status"] == "issued"
    assert [m["template"] for m in await notifications.messages_to("bob")] == ["refund_issued"]


# --------------------------------------------------------------------------- compensation
LATE_FAILURES = [
    ("order:fulfillment", order(), "mark_order_paid",
     ["send_confirmation", "create_invoice", "charge_wallet", "reserve_stock"]),
    ("bank:transfer", {"transfer_id": "t-2", "source": "alice", "target": "bob", "amount": 3_000}, "notify",
     ["record_transaction", "credit", "debit"]),
    ("payment:subscription", {"user_id": "alice", "wallet": "alice", "plan": "pro", "amount": 900}, "extend_access",
     ["charge"]),
    ("payment:subscription", {"user_id": "carol", "wallet": "carol", "plan": "pro", "amount": 900}, "schedule_retry",
     ["charge"]),
    ("logistic:shipment", {"shipment_id": "s-2", "route": "north", "volume": 10}, "dispatch",
     ["assign_driver", "assign_vehicle", "reserve_cargo_space"]),
    ("user:onboarding", {"user_id": "yan", "email": "yan@example.com", "name": "Yan", "welcome_credit": 700},
     "send_welcome", ["provision_wallet", "create_account"]),
    ("order:refund", {"refund_id": "r-2", "order_id": "o-8", "customer": "bob", "amount": 800,
                      "items": [{"sku": "apple", "qty": 1}]}, "notify", ["credit_note", "refund_wallet", "restock"]),
]  # fmt: skip


@pytest.mark.parametrize("job,payload,fail_at,undone", LATE_FAILURES, ids=[f"{j}@{f}" for j, _, f, _ in LATE_FAILURES])
async def test_a_late_failure_compensates_and_restores_the_totals(
    world: dict[str, int], saga_store: Any, registry: JobRegistry,
    job: str, payload: dict[str, Any], fail_at: str, undone: list[str],
) -> None:  # fmt: skip
    saga, stages = await run(saga_store, registry, job, {**payload, "fail_at": fail_at})
    assert saga.state == SagaState.ABORTED, saga.error
    failed = forward(stages)[fail_at]
    assert failed.status == StageStatus.FAILED and failed.meta.retry_count == 2  # a retryable fault: 3 attempts
    assert compensated(stages) == undone
    assert await data.totals() == world


async def test_compensation_is_visible_in_the_data(
    world: dict[str, int], saga_store: Any, registry: JobRegistry
) -> None:
    saga, _ = await run(saga_store, registry, "order:fulfillment", order("o-2", fail_at="mark_order_paid"))
    assert saga.state == SagaState.ABORTED
    assert (await db.collection("billing.invoices").find_one({"_id": "INV-o-2"}))["status"] == "void"
    assert [m["template"] for m in await notifications.messages_to("alice")] == ["order_confirmed", "order_cancelled"]
    journal = await db.collection("financial.transactions").find({"wallet": "alice"}).to_list()
    assert sorted(j["amount"] for j in journal) == [-2_500, 2_500]
    assert await orders.status("o-2") is None  # never marked paid


async def test_insufficient_funds_is_a_business_failure_not_retried(
    world: dict[str, int], saga_store: Any, registry: JobRegistry
) -> None:
    saga, stages = await run(saga_store, registry, "order:fulfillment", order("o-3", customer="carol"))
    assert saga.state == SagaState.ABORTED
    charge = forward(stages)["charge_wallet"]
    assert charge.status == StageStatus.FAILED and charge.meta.retry_count == 0
    assert "insufficient funds" in charge.res["error"]
    assert compensated(stages) == ["reserve_stock"]
    assert await data.totals() == world


async def test_a_failing_compensation_parks_the_saga(
    world: dict[str, int], saga_store: Any, registry: JobRegistry
) -> None:
    payload = order("o-4", fail_at="create_invoice", fail_undo_at="charge_wallet")
    saga, stages = await run(saga_store, registry, "order:fulfillment", payload)
    assert saga.state == SagaState.PARKED and "charge_wallet" in (saga.parked_reason or "")
    assert await wallet.balance("alice") == 100_000 - 2_500  # left for the operator, not half-undone


async def test_ttl_expiry_compensates_even_a_step_that_timed_out(
    world: dict[str, int], saga_store: Any, registry: JobRegistry
) -> None:
    """The first step outlasts the TTL (every step waits ``slow_ms`` first), so the TTL cuts it
    with its outcome unknown. The runner's clock stands still while the saga is set up (so the
    step surely starts within the TTL, however slow the machine) and is moved past the deadline
    while the step runs; each attempt is cut after the TTL's length in real time."""
    clock = ManualClock()
    request = StartRequest(job="order:fulfillment", payload=order("o-5", slow_ms=600_000), ttl=2)
    built, event = build_saga(request, registry, clock)
    await saga_store.create(built, event)
    task = asyncio.create_task(SagaRunner(built.id, store=saga_store, registry=registry, owner="test", clock=clock).run())

    async def first_step_running() -> bool:
        return any(s.step == "reserve_stock" for s in await saga_store.stages(built.id))

    await poll(first_step_running, timeout=30, what="reserve_stock to start")
    clock.advance(request.ttl or 0)  # the TTL passes while the step is in flight
    saga = await asyncio.wait_for(task, 60)
    stages = await saga_store.stages(saga.id)
    assert saga.state == SagaState.ABORTED
    assert "ttl" in (saga.error or "") or "timed out" in (saga.error or ""), saga.error
    undone = compensated(stages)
    unknown = [
        s.step for s in forward(stages).values()
        if s.status != StageStatus.SUCCEEDED and s.res.get("outcome") == "unknown"
    ]  # fmt: skip
    assert set(unknown) <= set(undone)  # an outcome the runner could not know is compensated too
    assert unknown == ["reserve_stock"], [(s.step, s.status, s.res) for s in stages]
    assert list(forward(stages)) == ["reserve_stock"], "nothing ran after the step the TTL cut"
    cut = forward(stages)["reserve_stock"]
    assert cut.status == StageStatus.FAILED and "timed out" in cut.res["error"]
    assert [(s.compensates, s.status) for s in stages if s.action == Action.COMPENSATE] == [
        (cut.seq, StageStatus.SUCCEEDED)
    ], "the timed-out stage itself was compensated"  # fmt: skip
    assert await data.totals() == world
    assert await orders.status("o-5") is None


# --------------------------------------------------------------------------- exactly once
async def test_a_crash_after_the_effect_applies_it_once(
    world: dict[str, int], saga_store: Any, registry: JobRegistry
) -> None:
    saga, stages = await run(saga_store, registry, "order:fulfillment", order("o-6", crash_after="charge_wallet"))
    assert saga.state == SagaState.COMPLETED, saga.error
    charge = forward(stages)["charge_wallet"]
    assert charge.meta.retry_count == 1 and charge.res["replayed"] is True
    assert await wallet.balance("alice") == 100_000 - 2_500
    assert await db.collection("financial.transactions").count_documents({"wallet": "alice"}) == 1


async def test_a_forward_step_run_twice_with_one_key_applies_once(world: dict[str, int]) -> None:
    first = await inventory.reserve("saga-x:1", [{"sku": "apple", "qty": 5}])
    again = await inventory.reserve("saga-x:1", [{"sku": "apple", "qty": 5}])
    assert again == {**first, "replayed": True}
    assert await inventory.level("apple") == 95

    await asyncio.gather(*(wallet.debit("saga-x:2", "alice", 1_000) for _ in range(5)))
    assert await wallet.balance("alice") == 99_000

    await notifications.send("saga-x:3", "alice", "hello")
    await notifications.send("saga-x:3", "alice", "hello")
    assert len(await notifications.messages_to("alice")) == 1

    for _ in range(2):
        await inventory.release("saga-x:1")
        await wallet.reverse("saga-x:2")
    assert await data.totals() == world


async def test_an_undo_before_its_forward_is_a_no_op_and_blocks_the_forward(world: dict[str, int]) -> None:
    undo = await wallet.reverse("saga-y:1")
    assert undo["undone"] is False
    with pytest.raises(AlreadyCompensated):
        await wallet.debit("saga-y:1", "alice", 1_000)
    assert issubclass(AlreadyCompensated, StepFailed)
    assert await data.totals() == world


async def test_concurrent_orders_never_oversell(world: dict[str, int], saga_store: Any, registry: JobRegistry) -> None:
    payloads = [order(f"c-{i}", items=[{"sku": "scarce", "qty": 1}], amount=100) for i in range(16)]
    results = await asyncio.gather(*(run(saga_store, registry, "order:fulfillment", p) for p in payloads))
    states = [saga.state for saga, _ in results]
    assert states.count(SagaState.COMPLETED) == 10 and states.count(SagaState.ABORTED) == 6
    assert await inventory.level("scarce") == 0
    assert await wallet.balance("alice") == 100_000 - 10 * 100


async def test_services_reject_unknown_resources(world: dict[str, int]) -> None:
    with pytest.raises(StepFailed, match="unknown wallet"):
        await wallet.credit("saga-z:1", "nobody", 5)
    await logistics.reserve_space("saga-z:2", "s-big", "north", 100)
    with pytest.raises(StepFailed, match="no vehicle"):
        await logistics.assign_vehicle("saga-z:3", "s-big", 100)


async def test_sample_payloads_complete_against_the_demo_data(
    examples_env: str, saga_store: Any, registry: JobRegistry
) -> None:
    await data.reset()
    await data.seed_demo(fleet=2)
    before = await data.totals()
    for job in registry.names():
        saga, _ = await run(saga_store, registry, job, data.sample_payload(job))
        assert saga.state == SagaState.COMPLETED, (job, saga.error)
    broke = data.sample_payload("payment:subscription", user_id=data.DEMO_BROKE, wallet=data.DEMO_BROKE)
    saga, stages = await run(saga_store, registry, "payment:subscription", broke)
    assert saga.state == SagaState.COMPLETED and forward(stages)["charge"].res["ok"] is False
    after = await data.totals()
    assert after["vehicles_available"] == before["vehicles_available"] - 1
