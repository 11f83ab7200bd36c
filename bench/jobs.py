"""The benchmark workload: a 4-step order saga whose last step fails for every tenth order.

Each step is one transactional MongoDB write keyed by the step's idempotency
key (a ledger row plus a counter), like a real service; 10 % of the sagas fail
at the last step, so three compensations run.
"""
from __future__ import annotations


from pydantic import BaseModel
from pymongo.errors import DuplicateKeyError

from essential.orchestration import NO_RETRY, Job, StepContext, StepFailed
from essential.actors.settings import deployment_settings
from essential.persistence.connection import shared_client

BENCH_DB = "essential_bench_services"
COUNTERS = 64  # spread counters so sagas do not all conflict on one document


class OrderLoad(BaseModel):
    fail_last: bool = False
    hold_s: float = 0.0  # keep the saga alive (memory probe)


def _db():
    return shared_client(deployment_settings().mongodb_uri)[BENCH_DB]


async def _apply(ctx: StepContext[OrderLoad], step: str, sign: int) -> dict:
    key = f"{'undo:' if sign < 0 else ''}{ctx.idempotency_key}"
    counter = int(ctx.saga_id, 16) % COUNTERS
    db = _db()

    async def txn(session) -> None:  # type: ignore[no-untyped-def]
        await db.ledger.insert_one({"_id": key, "step": step}, session=session)
        await db.counters.update_one({"_id": counter}, {"$inc": {step: sign}}, upsert=True, session=session)

    try:
        async with db.client.start_session() as session:
            await session.with_transaction(txn)
    except DuplicateKeyError:
        pass  # applied by an earlier run of this stage
    return {"step": step, "key": key}


order = Job("bench:order", payload=OrderLoad, ttl=600)


@order.step(bucket="bench.stock", action="update", retry=NO_RETRY)
async def reserve(ctx: StepContext[OrderLoad]) -> dict:
    if ctx.payload.hold_s:
        await __import__("asyncio").sleep(ctx.payload.hold_s)
    return await _apply(ctx, "reserve", 1)


@reserve.compensation
async def unreserve(ctx: StepContext[OrderLoad], _res: dict | None) -> dict:
    return await _apply(ctx, "reserve", -1)


@order.step(bucket="bench.wallets", action="update", retry=NO_RETRY)
async def charge(ctx: StepContext[OrderLoad]) -> dict:
    return await _apply(ctx, "charge", 1)


@charge.compensation
async def refund(ctx: StepContext[OrderLoad], _res: dict | None) -> dict:
    return await _apply(ctx, "charge", -1)


@order.step(bucket="bench.invoices", action="create", retry=NO_RETRY)
async def invoice(ctx: StepContext[OrderLoad]) -> dict:
    return await _apply(ctx, "invoice", 1)


@invoice.compensation
async def void(ctx: StepContext[OrderLoad], _res: dict | None) -> dict:
    return await _apply(ctx, "invoice", -1)


@order.step(bucket="bench.orders", action="update", retry=NO_RETRY)
async def confirm(ctx: StepContext[OrderLoad]) -> dict:
    if ctx.payload.fail_last:
        raise StepFailed("confirmation refused (injected: 10 % of the load)")
    return await _apply(ctx, "confirm", 1)


class Hold(BaseModel):
    hold_s: float = 5.0


hold = Job("bench:hold", payload=Hold, ttl=600)


@hold.step(bucket="bench.memory", action="read", retry=NO_RETRY)
async def wait_a_while(ctx: StepContext[Hold]) -> dict:
    """Keeps a saga alive without touching business data (the memory probe)."""
    await __import__("asyncio").sleep(ctx.payload.hold_s)
    return {"held_s": ctx.payload.hold_s}
