"""The reference a saga costs: a hand-written saga log on the same MongoDB, what a user writes without Essential.

One saga document and one stage document per step, written together in one
transaction after the step ran (insert the stage, advance the saga); the
compensations of a failed saga are logged the same way, latest first.  It has
what a minimal durable log needs and nothing more: no leases, no outbox, no
events, no placement.  The steps are those of ``bench/jobs.py``'s order saga
(each its own MongoDB transaction), or pure computation (``pure=True``).
"""
from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone
from typing import Any

from bson import ObjectId

STEPS = ("reserve", "charge", "invoice", "confirm")
DB = "bench_saga_log"


async def _step(db_services: Any, saga_id: str, seq: int, step: str, sign: int, pure: bool) -> dict[str, Any]:
    """The business effect (the bench's ledger write, or nothing for pure computation)."""
    if pure:
        return {"step": step, "sign": sign}
    from bench.jobs import COUNTERS

    key = f"{'undo:' if sign < 0 else ''}{saga_id}:{seq}"
    counter = int(saga_id, 16) % COUNTERS

    async def txn(session: Any) -> None:
        await db_services.ledger.insert_one({"_id": key, "step": step}, session=session)
        await db_services.counters.update_one({"_id": counter}, {"$inc": {step: sign}}, upsert=True, session=session)

    async with db_services.client.start_session() as session:
        await session.with_transaction(txn)
    return {"step": step, "key": key}


async def one_saga(client: Any, fail_last: bool, *, pure: bool) -> tuple[str, float]:
    """Run one order saga with its log; returns its id and its latency in ms."""
    from bench.jobs import BENCH_DB

    log, services = client[DB], client[BENCH_DB]
    started = time.perf_counter()
    saga_id = ObjectId()
    now = datetime.now(timezone.utc)
    await log.sagas.insert_one({"_id": saga_id, "state": "running", "step": 0, "createdAt": now, "updatedAt": now})
    sid = str(saga_id)

    async def record(seq: int, step: str, action: str, status: str, res: Any, saga: dict[str, Any]) -> None:
        async def txn(session: Any) -> None:
            at = datetime.now(timezone.utc)
            await log.stages.insert_one(
                {"saga": saga_id, "seq": seq, "step": step, "action": action, "status": status, "res": res, "at": at},
                session=session,
            )
            await log.sagas.update_one({"_id": saga_id}, {"$set": {**saga, "updatedAt": at}}, session=session)

        async with client.start_session() as session:
            await session.with_transaction(txn)

    done: list[tuple[int, str]] = []
    for seq, step in enumerate(STEPS, start=1):
        if step == "confirm" and fail_last:
            await record(seq, step, "run", "failed", {"error": "refused"}, {"state": "compensating", "step": seq})
            break
        res = await _step(services, sid, seq, step, 1, pure)
        final = seq == len(STEPS)
        await record(seq, step, "run", "succeeded", res, {"step": seq, **({"state": "completed"} if final else {})})
        done.append((seq, step))
    else:
        return sid, (time.perf_counter() - started) * 1000
    seq = len(STEPS)
    for forward_seq, step in reversed(done):
        seq += 1
        res = await _step(services, sid, forward_seq, step, -1, pure)
        last = forward_seq == done[0][0]
        await record(seq, step, "compensate", "succeeded", res, {"step": seq, **({"state": "aborted"} if last else {})})
    return sid, (time.perf_counter() - started) * 1000


async def run(uri: str, payloads: list[dict[str, Any]], concurrency: int, warmup: list[dict[str, Any]], *,
              pure: bool) -> dict[str, Any]:  # fmt: skip
    """The batch's wall time, latencies and outcomes (completed, aborted) at ``concurrency`` in flight."""
    from pymongo import AsyncMongoClient

    client: Any = AsyncMongoClient(uri, tz_aware=True)
    await client.drop_database(DB)
    await client[DB].stages.create_index([("saga", 1), ("seq", 1)], unique=True)
    for payload in warmup:
        await one_saga(client, payload["fail_last"], pure=pure)
    gate = asyncio.Semaphore(concurrency)

    async def gated(payload: dict[str, Any]) -> tuple[str, float]:
        async with gate:
            return await one_saga(client, payload["fail_last"], pure=pure)

    started = time.perf_counter()
    outcomes = await asyncio.gather(*(gated(p) for p in payloads))
    wall = time.perf_counter() - started
    states = [d["state"] async for d in client[DB].sagas.find({"_id": {"$in": [ObjectId(i) for i, _ in outcomes]}})]
    await client.close()
    return {
        "wall_s": wall, "latencies_ms": [ms for _, ms in outcomes], "ids": [i for i, _ in outcomes],
        "completed": states.count("completed"), "aborted": states.count("aborted"),
    }  # fmt: skip
