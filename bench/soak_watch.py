"""Watching the deployment from MongoDB during the soak: who is busy, how far it got, when it is quiet.

Read straight from the store (not through the supervisor, which is being killed), and
tolerant of MongoDB itself being down: a read that fails is reported as unknown.
"""
from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from .soak_plan import PlannedSaga

ACTIVE = ["running", "compensating", "committing"]
SETTLED = ["completed", "aborted", "parked"]
UNSENT = {"sent_at": None, "refused_at": None, "withdrawn_at": None}


async def busy_pids(db: AsyncDatabase) -> dict[int, list[str]]:
    """``{pid: [saga ids]}`` of the processes holding an active saga's lease (owner ``<where>@<node>:<pid>``)."""
    busy: dict[int, list[str]] = {}
    async for doc in db["sagas"].find({"state": {"$in": ACTIVE}}, {"lease.owner": 1}):
        owner = (doc.get("lease") or {}).get("owner") or ""
        tail = owner.rsplit(":", 1)[-1]
        if "@" in owner and tail.isdigit():
            busy.setdefault(int(tail), []).append(str(doc["_id"]))
    return busy


async def state_counts(db: AsyncDatabase) -> Counter:
    rows = await (await db["sagas"].aggregate([{"$group": {"_id": "$state", "n": {"$sum": 1}}}])).to_list()
    return Counter({row["_id"]: row["n"] for row in rows})


@dataclass
class Quiet:
    """When the deployment settled (monotonic), or None if it never did within the bound."""

    at: float | None
    sagas_settled_at: float | None
    outbox_drained_at: float | None
    last: dict[str, Any]


async def settle(
    db: AsyncDatabase,
    plan: list[PlannedSaga],
    traffic_done: Callable[[], bool],
    resend: Callable[[set[str]], Awaitable[list[str]]],
    say: Callable[[str], None],
    timeout: float,
) -> Quiet:
    """Poll until every planned saga exists, every saga is terminal or parked and both outboxes are drained."""
    deadline = time.monotonic() + timeout
    keys = {p.key for p in plan}
    settled_at = drained_at = None
    last: dict[str, Any] = {}
    next_note = 0.0
    while time.monotonic() < deadline:
        try:
            found = {d["idempotency_key"] async for d in db["sagas"].find({"idempotency_key": {"$in": list(keys)}},
                                                                          {"idempotency_key": 1})}  # fmt: skip
            counts = await state_counts(db)
            unsent = sum([await db[name].count_documents(UNSENT) for name in ("outbox", "command_outbox")])
        except PyMongoError as exc:
            say(f"settle: MongoDB read failed ({type(exc).__name__}); retrying")
            await asyncio.sleep(1.0)
            continue
        missing = keys - found
        if missing and traffic_done():
            await resend(found)
        open_ = sum(n for state, n in counts.items() if state not in SETTLED)
        now = time.monotonic()
        settled_at = (settled_at or now) if not missing and not open_ and traffic_done() else None
        drained_at = (drained_at or now) if not unsent else None
        last = {"missing": len(missing), "open": open_, "unsent": unsent, "states": dict(counts)}
        if settled_at is not None and drained_at is not None:
            return Quiet(max(settled_at, drained_at), settled_at, drained_at, last)
        if now >= next_note:
            next_note = now + 10
            shown = f" ({', '.join(sorted(missing)[:6])}{'…' if len(missing) > 6 else ''})" if missing else ""
            say(f"settling: {open_} saga(s) not terminal, {len(missing)} planned not started{shown}, {unsent} outbox "
                f"row(s) unsent · {dict(counts)}")  # fmt: skip
        await asyncio.sleep(1.0)
    return Quiet(None, settled_at, drained_at, last)
