"""The reference a saga costs: a hand-written saga log on the same MongoDB, what a user writes without Essential.

One saga document and one stage document per step, written together in one
transaction after the step ran (insert the stage, advance the saga); the
compensations of a failed saga are logged the same way, latest first.  It has
what a minimal durable log needs and nothing more: no leases, no outbox, no
events, no placement.  The steps are those of ``bench/jobs.py``'s order saga
(each its own MongoDB transaction), or pure computation (``pure=True``).
"""
from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from bson import ObjectId

from bench.jobs import BENCH_DB, STEPS, write_ledger

DB = "bench_saga_log"


async def _step(db_services: Any, saga_id: str, seq: int, step: str, sign: int, pure: bool) -> dict[str, Any]:
    """The business effect (the bench's ledger write, or nothing for pure computation)."""
    if pure:
        return {"step": step, "sign": sign}
    return await write_ledger(db_services, saga_id, f"{'undo:' if sign < 0 else ''}{saga_id}:{seq}", step, sign)


async def one_saga(client: Any, fail_last: bool, *, pure: bool) -> tuple[str, float, str]:
    """Run one order saga with its log; returns its id, its latency in ms and its final state."""
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
        return sid, (time.perf_counter() - started) * 1000, "completed"
    seq = len(STEPS)
    for forward_seq, step in reversed(done):
        seq += 1
        res = await _step(services, sid, forward_seq, step, -1, pure)
        last = forward_seq == done[0][0]
        await record(seq, step, "compensate", "succeeded", res, {"step": seq, **({"state": "aborted"} if last else {})})
    return sid, (time.perf_counter() - started) * 1000, "aborted"


async def prepare(client: Any) -> None:
    """A fresh log: its collections and the one index it needs (a saga's stages in order)."""
    await client.drop_database(DB)
    await client[DB].stages.create_index([("saga", 1), ("seq", 1)], unique=True)
