"""Jobs built for the tests: each step records every run and its effect in MongoDB.

``calls`` gets one document per attempt (to count runs across processes);
``effects`` gets one per idempotency key under a unique index, so an effect
recorded twice would fail loudly.
"""
from __future__ import annotations

import asyncio
import os
import time
from datetime import datetime, timezone

from pydantic import BaseModel, Field
from pymongo.errors import DuplicateKeyError

from essential.actors.kafka.participants import kafka_step
from essential.orchestration import Job, RetryPolicy, StepContext, StepFailed
from essential.persistence.connection import shared_client


class Knobs(BaseModel):
    fail_at: str | None = None
    fail_times: int = Field(0, ge=0, description="fail the first N attempts of fail_at, then succeed")
    sleep: dict[str, float] = Field(default_factory=dict, description="seconds a step sleeps")
    block: dict[str, float] = Field(default_factory=dict, description="seconds a step blocks its event loop")
    gate: dict[str, str] = Field(
        default_factory=dict, description="a step waits until the test inserts this _id into the gates collection"
    )
    block_gate: dict[str, str] = Field(
        default_factory=dict, description="a step blocks its event loop (ignores cancellation) until this gate _id exists"
    )
    fail_undo: list[str] = Field(default_factory=list, description="compensations that fail on every attempt (parks)")
    block_undo: dict[str, str] = Field(
        default_factory=dict,
        description="a compensation blocks its event loop (ignores cancellation) until this gate _id exists",
    )
    tag: str = ""


def _db():
    uri = os.environ["ESSENTIAL_MONGODB_URI"]
    return shared_client(uri)[os.environ.get("ESSENTIAL_TEST_DB", "essential_testjobs")]


async def _behave(ctx: StepContext[Knobs], step: str) -> dict:
    db = _db()
    await db.calls.insert_one(
        {"saga": ctx.saga_id, "step": step, "attempt": ctx.attempt, "kind": "run", "at": datetime.now(timezone.utc)}
    )
    delay = ctx.payload.sleep.get(step, 0)
    if delay:
        await asyncio.sleep(delay)
    gate = ctx.payload.gate.get(step)
    while gate and await db.gates.find_one({"_id": gate}) is None:
        await asyncio.sleep(0.1)  # the test opens the gate when it has seen what it needs
    if ctx.payload.block.get(step):
        time.sleep(ctx.payload.block[step])  # deliberately ignores cancellation
    if ctx.payload.block_gate.get(step):
        _block_until_gate(ctx.payload.block_gate[step])
    if ctx.payload.fail_at == step:
        if ctx.payload.fail_times == 0 or ctx.attempt <= ctx.payload.fail_times:
            raise RuntimeError(f"injected failure in {step} (attempt {ctx.attempt})")
    try:
        await db.effects.insert_one(
            {"_id": ctx.idempotency_key, "saga": ctx.saga_id, "step": step, "at": datetime.now(timezone.utc)}
        )
    except DuplicateKeyError:
        pass  # already applied by an earlier run of this stage
    return {"step": step, "key": ctx.idempotency_key}


def _block_until_gate(gate: str) -> None:
    """Hold the whole process (its event loop included) until the test opens ``gate``: a hung participant."""
    from pymongo import MongoClient

    with MongoClient(os.environ["ESSENTIAL_MONGODB_URI"]) as sync:
        gates = sync[os.environ.get("ESSENTIAL_TEST_DB", "essential_testjobs")].gates
        while gates.find_one({"_id": gate}) is None:
            time.sleep(0.1)


async def _undo(ctx: StepContext[Knobs], step: str, result: dict | None) -> dict:
    db = _db()
    await db.calls.insert_one({"saga": ctx.saga_id, "step": step, "attempt": ctx.attempt, "kind": "undo"})
    if ctx.payload.block_undo.get(step):
        _block_until_gate(ctx.payload.block_undo[step])
    if step in ctx.payload.fail_undo:
        raise RuntimeError(f"injected failure undoing {step} (attempt {ctx.attempt})")
    delay = ctx.payload.sleep.get(f"undo_{step}", 0)
    if delay:
        await asyncio.sleep(delay)
    removed = await db.effects.delete_one({"_id": ctx.idempotency_key})
    return {"undone": step, "removed": removed.deleted_count}


def _add_local(job: Job, step_name: str, *, timeout: float = 10.0, retry: RetryPolicy | None = None) -> None:
    """A step (and its compensation) that records its runs and effect in the test database."""

    async def run(ctx: StepContext[Knobs]) -> dict:
        return await _behave(ctx, step_name)

    async def undo(ctx: StepContext[Knobs], result: dict | None) -> dict:
        return await _undo(ctx, step_name, result)

    step = job.step(
        bucket=f"test.{step_name}",
        action="create",
        name=step_name,
        retry=retry or RetryPolicy(attempts=3, backoff=0.01),
        timeout=timeout,
    )(run)
    step.compensation(undo)


# a TTL longer than any test waits: expiry is tested with short explicit TTLs
def _chain(
    name: str, steps: list[str], *, timeout: float = 10.0, ttl: float = 600.0, retry: RetryPolicy | None = None
) -> Job:
    job: Job[Knobs] = Job(name, payload=Knobs, ttl=ttl)
    for step_name in steps:
        _add_local(job, step_name, timeout=timeout, retry=retry)
    return job


chain4 = _chain("test:chain", ["a", "b", "c", "d"])
short_timeout = _chain("test:timeout", ["a", "b", "c"], timeout=0.5)
# rides out a MongoDB outage: its steps keep retrying for about a minute
patient = _chain("test:patient", ["a", "b", "c"], retry=RetryPolicy(attempts=40, backoff=0.2, max_backoff=2.0))


# --------------------------------------------------------------------------- Kafka participants
class RemoteKnobs(Knobs):
    """What the example payment service (examples.participant_service) needs, plus its knobs."""

    customer: str = "alice"
    amount: int = Field(100, gt=0)
    silent: bool = False
    reply_delay_ms: int = 0


def _payment(ctx: StepContext[RemoteKnobs]) -> dict:
    p = ctx.payload
    return {"customer": p.customer, "amount": p.amount, "memo": f"saga {ctx.saga_id}",
            "silent": p.silent, "reply_delay_ms": p.reply_delay_ms}  # fmt: skip


def _remote(name: str, *, topic: str, reply_timeout: float, compensate_timeout: float | None = None) -> Job:
    """Local step a, the payment over Kafka, local step c."""
    job: Job[RemoteKnobs] = Job(name, payload=RemoteKnobs, ttl=300)
    _add_local(job, "a")
    kafka_step(job, name="pay", bucket="financial.wallets", topic=topic, reply_timeout=reply_timeout,
               compensate_timeout=compensate_timeout, build=_payment)  # fmt: skip
    _add_local(job, "c")
    return job


PAYMENTS_TOPIC = "payments.commands"
MANUAL_TOPIC = "test.manual.commands"  # nobody serves it: the test answers by hand
remote = _remote("test:remote", topic=PAYMENTS_TOPIC, reply_timeout=90)
remote_timeout = _remote("test:remote-timeout", topic=PAYMENTS_TOPIC, reply_timeout=2, compensate_timeout=60)
remote_manual = _remote("test:remote-manual", topic=MANUAL_TOPIC, reply_timeout=240)


# --------------------------------------------------------------------------- beyond a chain
class FlowKnobs(Knobs):
    """Knobs of the jobs below: what their waits, timers, children and locks use."""

    wallet: str = "w-1"
    signal_timeout: float | None = None
    nap: float = 1.0
    defer: float = Field(0.0, ge=0, description="seconds step 'poll' asks to be retried in (RetryLater)")
    defer_rounds: int = Field(1, ge=0)
    child: dict = Field(default_factory=dict, description="payload of the child saga")


def _flow(name: str, *, ttl: float = 120.0) -> Job:
    return Job(name, payload=FlowKnobs, ttl=ttl)


def _signal_job(name: str, linger: float) -> Job:
    job = _flow(name)
    _add_local(job, "a")
    go = job.wait_for("go", name="go", timeout=lambda ctx: ctx.payload.signal_timeout, linger=linger)

    @go.on_signal
    async def check(ctx: StepContext[FlowKnobs]) -> dict:
        await _db().calls.insert_one({"saga": ctx.saga_id, "step": "go", "kind": "signal", "payload": ctx.signal})
        if isinstance(ctx.signal, dict) and ctx.signal.get("refuse"):
            from essential.orchestration import StepFailed

            raise StepFailed(f"signal refused: {ctx.signal['refuse']}")
        return {"got": ctx.signal}

    _add_local(job, "c")
    return job


def _sleep_job(name: str, linger: float) -> Job:
    job = _flow(name)
    _add_local(job, "a")
    job.sleep("nap", seconds=lambda ctx: ctx.payload.nap, linger=linger)
    _add_local(job, "c")
    return job


# a, then b, c, d concurrently, then e
parallel = _flow("test:parallel")
_add_local(parallel, "a")
with parallel.parallel("fan"):
    for _name in ("b", "c", "d"):
        _add_local(parallel, _name)
_add_local(parallel, "e")

signal_parks = _signal_job("test:signal", linger=0)  # checkpointed waiting at once: no actor while it waits
signal_lingers = _signal_job("test:signal-linger", linger=120)  # waits inside its actor
sleep_parks = _sleep_job("test:sleep", linger=0)
sleep_lingers = _sleep_job("test:sleep-linger", linger=120)


# a step that asks to run again later (a durable timer), defer_rounds times
later = _flow("test:later", ttl=120)
_add_local(later, "a")


@later.step(bucket="test.poll", action="read", retry=RetryPolicy(attempts=2, backoff=0.01))
async def poll(ctx: StepContext[FlowKnobs]) -> dict:
    from essential.orchestration import RetryLater

    await _db().calls.insert_one({"saga": ctx.saga_id, "step": "poll", "kind": "run", "deferred": ctx.deferred})
    if ctx.deferred < ctx.payload.defer_rounds and ctx.payload.defer > 0:
        raise RetryLater(ctx.payload.defer, reason="not ready yet")
    return {"rounds": ctx.deferred}


_add_local(later, "c")


# a child job and parents that start it
child_job = _chain("test:child", ["x", "y"])


def _parent_job(name: str, linger: float) -> Job:
    job = _flow(name, ttl=180)
    _add_local(job, "a")
    job.child("kid", job="test:child", payload=lambda ctx: ctx.payload.child, linger=linger, compensation_timeout=120)
    _add_local(job, "c")
    return job


parent = _parent_job("test:parent", linger=0)
parent_lingers = _parent_job("test:parent-linger", linger=120)


# bucket locks on the payload's wallet: wait for it, or fail fast
def _lock_job(name: str, on_conflict: str, *, first: bool) -> Job:
    from essential.orchestration import Lock

    job = _flow(name)
    if not first:
        _add_local(job, "x")  # a step before the locked one: compensated when the lock is refused

    async def run(ctx: StepContext[FlowKnobs]) -> dict:
        return await _behave(ctx, "a")

    async def undo(ctx: StepContext[FlowKnobs], result: dict | None) -> dict:
        return await _undo(ctx, "a", result)

    lock = Lock(keys=lambda ctx: ctx.payload.wallet, on_conflict=on_conflict)  # type: ignore[arg-type]
    step = job.step(bucket="test.wallets", action="update", name="a", retry=RetryPolicy(attempts=3, backoff=0.01),
                    timeout=30, lock=lock)(run)  # fmt: skip
    step.compensation(undo)
    _add_local(job, "b", timeout=30)
    _add_local(job, "c")
    return job


lock_wait = _lock_job("test:lock-wait", "wait", first=True)
lock_fail = _lock_job("test:lock-fail", "fail", first=False)


# two locks in two steps, in the order the payload gives: two such sagas in opposite orders deadlock
class TwoLocks(FlowKnobs):
    first: str = "k-1"
    second: str = "k-2"


def _two_locks_job() -> Job:
    from essential.orchestration import Lock

    job: Job[TwoLocks] = Job("test:lock-two", payload=TwoLocks, ttl=120)
    for name, key in (("a", lambda ctx: ctx.payload.first), ("b", lambda ctx: ctx.payload.second)):

        async def run(ctx: StepContext[TwoLocks], _name: str = name) -> dict:
            return await _behave(ctx, _name)

        async def undo(ctx: StepContext[TwoLocks], result: dict | None, _name: str = name) -> dict:
            return await _undo(ctx, _name, result)

        step = job.step(bucket="test.accounts", action="update", name=name, retry=RetryPolicy(attempts=2, backoff=0.01),
                        timeout=30, lock=Lock(keys=key, on_conflict="wait"))(run)  # fmt: skip
        step.compensation(undo)
    return job


lock_two = _two_locks_job()


def _where_job() -> Job:
    """Records the deployment its step believes it runs under, to prove job code is told, not guessing."""
    from essential import deployment_settings

    job: Job[Knobs] = Job("test:where", payload=Knobs, ttl=600)

    @job.step(bucket="test.where", action="read")
    async def look(ctx: StepContext[Knobs]) -> dict:
        seen = deployment_settings()
        await _db().calls.insert_one(
            {"saga": ctx.saga_id, "step": "look", "database": seen.database, "namespace": seen.namespace}
        )
        return {"database": seen.database}

    return job


where = _where_job()


class LedgerKnobs(BaseModel):
    amount: int = 1
    hold: str | None = Field(None, description="after its write, credit waits (its transaction open) for this gate _id")
    fail_after_write: int = Field(0, ge=0, description="the first N attempts of credit raise after their write")
    stall_after_write: float = Field(0.0, ge=0, description="credit's first attempt sleeps this long after its write")
    refuse_confirm: bool = False


def _balances(ctx: StepContext[LedgerKnobs]):  # type: ignore[no-untyped-def]
    """The service's collection, reached through the checkpoint's own session (the same MongoDB)."""
    return ctx.session.client[os.environ.get("ESSENTIAL_TEST_DB", "essential_testjobs")].balances


def _ledger_job() -> Job[LedgerKnobs]:
    """A transactional step whose effect is not idempotent (an increment): only exactly-once keeps it right."""
    job: Job[LedgerKnobs] = Job("test:ledger", payload=LedgerKnobs, ttl=600)

    @job.step(bucket="test.balances", action="update", transactional=True, timeout=2.0,
              retry=RetryPolicy(attempts=4, backoff=0.01))  # fmt: skip
    async def credit(ctx: StepContext[LedgerKnobs]) -> dict:
        await _balances(ctx).update_one(
            {"_id": ctx.saga_id}, {"$inc": {"credits": ctx.payload.amount}}, upsert=True, session=ctx.session
        )
        # outside the transaction: the test sees the write made (not committed) and who made it
        await _db().reached.insert_one({"saga": ctx.saga_id, "attempt": ctx.attempt, "pid": os.getpid()})
        if ctx.attempt <= ctx.payload.fail_after_write:
            raise RuntimeError(f"injected failure after the write (attempt {ctx.attempt})")
        if ctx.attempt == 1 and ctx.payload.stall_after_write:
            await asyncio.sleep(ctx.payload.stall_after_write)
        while ctx.payload.hold and await _db().gates.find_one({"_id": ctx.payload.hold}) is None:
            await asyncio.sleep(0.05)
        return {"credited": ctx.payload.amount}

    @credit.compensation
    async def debit(ctx: StepContext[LedgerKnobs], result: dict | None) -> dict:
        await _balances(ctx).update_one(
            {"_id": ctx.saga_id}, {"$inc": {"credits": -ctx.payload.amount}}, upsert=True, session=ctx.session
        )
        return {"debited": ctx.payload.amount}

    @job.step(bucket="test.orders", action="update", retry=RetryPolicy(attempts=1))
    async def confirm(ctx: StepContext[LedgerKnobs]) -> dict:
        if ctx.payload.refuse_confirm:
            raise StepFailed("confirmation refused")
        return {"confirmed": True}

    return job


ledger = _ledger_job()
