"""A job for the cluster tests (tests/test_cluster.py): every run records the Ray node it ran on.

``cluster:relay`` has three steps, ``a``, ``b`` and ``c``.  Each attempt of a
step inserts one document into ``calls`` (saga, step, node id, pid, attempt),
and each step's effect is one document in ``effects`` under its idempotency key
(a unique ``_id``, so an effect recorded twice would fail loudly).  Step ``b``
may wait at a *gate*: it polls ``gates`` until ``{_id: <gate>, open: true}``
exists, which lets a test hold a batch mid-run for as long as it needs (to kill
a node, or to disconnect a client) without guessing durations.

The database is ``ESSENTIAL_CLUSTER_TEST_DB`` (default ``essential_cluster_jobs``)
on ``ESSENTIAL_MONGODB_URI``.
"""
from __future__ import annotations

import asyncio
import os

import ray
from pydantic import BaseModel, Field
from pymongo.errors import DuplicateKeyError

from essential.orchestration import Job, RetryPolicy, StepContext
from essential.persistence.connection import shared_client

GATE_POLL = 0.1


class Relay(BaseModel):
    gate: str | None = Field(None, description="step b waits until this gate is opened")
    sleep: float = Field(0.0, ge=0, le=60, description="seconds step b sleeps (after the gate)")
    tag: str = ""


def database():
    uri = os.environ["ESSENTIAL_MONGODB_URI"]
    return shared_client(uri)[os.environ.get("ESSENTIAL_CLUSTER_TEST_DB", "essential_cluster_jobs")]


def _where() -> dict:
    try:
        node = ray.get_runtime_context().get_node_id()
    except Exception:  # not in a Ray worker (unit use)
        node = None
    return {"node": node, "pid": os.getpid()}


async def _run(ctx: StepContext[Relay], step: str) -> dict:
    db = database()
    await db.calls.insert_one(
        {"saga": ctx.saga_id, "step": step, "attempt": ctx.attempt, "kind": "run", "key": ctx.idempotency_key,
         "tag": ctx.payload.tag, **_where()}
    )  # fmt: skip
    if step == "b":
        if ctx.payload.gate:
            while await db.gates.find_one({"_id": ctx.payload.gate, "open": True}) is None:
                await asyncio.sleep(GATE_POLL)
        if ctx.payload.sleep:
            await asyncio.sleep(ctx.payload.sleep)
    try:
        await db.effects.insert_one({"_id": ctx.idempotency_key, "saga": ctx.saga_id, "step": step})
    except DuplicateKeyError:
        pass  # applied by an earlier run of this stage
    return {"step": step, "key": ctx.idempotency_key}


async def _undo(ctx: StepContext[Relay], step: str) -> dict:
    db = database()
    await db.calls.insert_one({"saga": ctx.saga_id, "step": step, "kind": "undo", **_where()})
    removed = await db.effects.delete_one({"_id": ctx.idempotency_key})
    return {"undone": step, "removed": removed.deleted_count}


relay: Job[Relay] = Job("cluster:relay", payload=Relay, ttl=900, description="three steps; b may wait at a gate")

for _name in ("a", "b", "c"):

    def _make(step: str):  # bind the step name per closure
        async def run(ctx: StepContext[Relay]) -> dict:
            return await _run(ctx, step)

        async def undo(ctx: StepContext[Relay], result: dict | None) -> dict:
            return await _undo(ctx, step)

        return run, undo

    _step_run, _step_undo = _make(_name)
    relay.step(
        bucket=f"cluster.{_name}", action="create", name=_name,
        retry=RetryPolicy(attempts=3, backoff=0.05), timeout=600.0,
    )(_step_run).compensation(_step_undo)  # fmt: skip
