"""The benchmark workloads: a 4-step order saga whose last step fails for every tenth order.

Two variants of one saga, so that the orchestration's own cost can be told from the steps':

* ``bench:order-pure`` – each step is pure computation (no I/O): what the saga costs is what
  the orchestrator costs;
* ``bench:order`` – each step is one MongoDB write keyed by the step's idempotency key (a
  ledger row plus a counter), like a real service; the steps are *transactional*: the write
  commits in the transaction that records the step (one transaction per step, not two).

10 % of the sagas fail at the last step, so three compensations run and are recorded.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from pydantic import BaseModel

from essential import NO_RETRY, Job, StepContext, StepFailed

BENCH_DB = "essential_bench_services"
COUNTERS = 64  # spread counters so sagas do not all conflict on one document
STEPS = ("reserve", "charge", "invoice", "confirm")
BUCKETS = {"reserve": "bench.stock", "charge": "bench.wallets", "invoice": "bench.invoices", "confirm": "bench.orders"}


class OrderLoad(BaseModel):
    fail_last: bool = False
    hold_s: float = 0.0  # keep the saga alive (memory probe)


async def write_ledger(db, saga_id: str, key: str, step: str, sign: int, session=None) -> dict:  # type: ignore[no-untyped-def]
    """The service's effect: a ledger row and a counter, in one transaction — its own, or the
    ``session``'s (a transactional step's checkpoint).  The hand-written log's steps do the same."""
    counter = int(saga_id, 16) % COUNTERS

    async def txn(session) -> None:  # type: ignore[no-untyped-def]
        await db.ledger.insert_one({"_id": key, "step": step}, session=session)
        await db.counters.update_one({"_id": counter}, {"$inc": {step: sign}}, upsert=True, session=session)

    if session is not None:
        await txn(session)
    else:
        async with db.client.start_session() as own:
            await own.with_transaction(txn)
    return {"step": step, "key": key}


async def _write(ctx: StepContext[OrderLoad], step: str, sign: int) -> dict:
    """The ledger write in the step's checkpoint transaction: applied exactly once, no replay check."""
    key = f"{'undo:' if sign < 0 else ''}{ctx.idempotency_key}"
    return await write_ledger(ctx.session.client[BENCH_DB], ctx.saga_id, key, step, sign, session=ctx.session)


async def _compute(ctx: StepContext[OrderLoad], step: str, sign: int) -> dict:
    """Pure computation: a result derived from the input, no I/O."""
    return {"step": step, "sign": sign, "key": ctx.idempotency_key}


Effect = Callable[[StepContext[OrderLoad], str, int], Awaitable[dict]]


def _order_job(name: str, effect: Effect, *, transactional: bool = False) -> Job[OrderLoad]:
    job: Job[OrderLoad] = Job(name, payload=OrderLoad, ttl=600)
    for step in STEPS:

        async def run(ctx: StepContext[OrderLoad], _step: str = step) -> dict:
            if _step == "reserve" and ctx.payload.hold_s:
                await asyncio.sleep(ctx.payload.hold_s)
            if _step == "confirm" and ctx.payload.fail_last:
                raise StepFailed("confirmation refused (injected: 10 % of the load)")
            return await effect(ctx, _step, 1)

        definition = job.step(
            bucket=BUCKETS[step], action="update", name=step, retry=NO_RETRY, transactional=transactional
        )(run)
        if step != "confirm":  # the last step either fails (nothing to undo) or ends the saga

            async def undo(ctx: StepContext[OrderLoad], _res: dict | None, _step: str = step) -> dict:
                return await effect(ctx, _step, -1)

            definition.compensation(undo)
    return job


order = _order_job("bench:order", _write, transactional=True)
order_pure = _order_job("bench:order-pure", _compute)

#: the workloads by name, as ``make bench`` and the hand-written log know them
WORKLOADS = {"pure": "bench:order-pure", "mongo": "bench:order"}


class Hold(BaseModel):
    hold_s: float = 5.0


hold = Job("bench:hold", payload=Hold, ttl=600)


@hold.step(bucket="bench.memory", action="read", retry=NO_RETRY)
async def wait_a_while(ctx: StepContext[Hold]) -> dict:
    """Keeps a saga alive without touching business data (the memory probe)."""
    await asyncio.sleep(ctx.payload.hold_s)
    return {"held_s": ctx.payload.hold_s}
