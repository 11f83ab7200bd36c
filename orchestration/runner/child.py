"""Child steps: start another job as a child saga once, wait for it to end; undo it when the parent compensates."""
from __future__ import annotations

import asyncio
from typing import Any

from essential.orchestration.dsl import ChildStep
from essential.orchestration.errors import InvalidRequest
from essential.orchestration.models import Saga, Stage
from essential.orchestration.requests import StartRequest, build_saga
from essential.orchestration.runner.attempts import Attempts, jsonable
from essential.orchestration.runner.run import Run
from essential.orchestration.runner.waiting import POLL_CAP, POLL_FIRST
from essential.orchestration.states import TERMINAL_STATES, Action, SagaState, StageStatus


def child_key(parent_id: str, seq: int) -> str:
    """Idempotency key of the child saga started by the parent's stage ``seq``."""
    return f"child:{parent_id}:{seq}"


async def run_child(run: Run, step: ChildStep, index: int, payload: Any, results: dict[str, Any]) -> str | None:
    cp = run.cp
    entered = run.enter(step, payload, results)
    if entered is None:
        return None
    stage, ctx = entered
    if stage is None or stage.status != StageStatus.STARTED:
        assert step.child_payload is not None
        req = {"job": step.child_job, "payload": jsonable(step.child_payload(ctx))}
        stage = cp.new_stage(step, ctx.seq, Action.CREATE, req=req)
        await cp.write_ahead([stage], index)
    try:
        child = await _ensure_child(run, step, stage)
    except InvalidRequest as exc:  # unknown job, bad payload: nothing was created
        error = f"step {step.name} could not start child saga: {exc}"
        return await run.fail(stage, Attempts(ok=False, errors=[str(exc)]), error)
    stage.meta.child = child.id

    async def ended() -> Saga | None:
        current = await run.store.get(child.id)
        return current if current.state in TERMINAL_STATES else None

    waited = await run.waits.until(f"child:{child.id}", check=ended, until=None, linger=run.linger_of(step))
    if waited.kind == "stop":
        # the child may have done things: outcome unknown, so the compensation aborts or undoes it
        outcome = Attempts(ok=False, timed_out=True, errors=[f"stopped while child saga {child.id} ran: {waited.value}"])
        return await run.fail(stage, outcome, waited.value)
    final: Saga = waited.value
    if final.state == SagaState.COMPLETED:
        child_results = {
            s.step: s.res
            for s in await run.store.stages(final.id)
            if s.action != Action.COMPENSATE and s.status == StageStatus.SUCCEEDED
        }
        done = Attempts(ok=True, result={"child": final.id, "job": final.job, "state": final.state.value,
                                         "results": child_results})  # fmt: skip
        await run.succeed(stage, done, results, step.name, index + 1)
        return None
    error = f"child saga {final.id} ({final.job}) {final.state.value}: {final.error or 'no reason recorded'}"
    return await run.fail(stage, Attempts(ok=False, errors=[error]), f"step {step.name}: {error}")


async def _ensure_child(run: Run, step: ChildStep, stage: Stage) -> Saga:
    """Create the child saga once (idempotency key from this stage), or find it."""
    saga = run.cp.current
    key = child_key(saga.id, stage.seq)
    existing = await run.store.by_idempotency_key(key)
    if existing is not None:
        return existing
    remaining = max((saga.deadline - run.clock.now()).total_seconds(), 1.0)
    job = run.registry.get(step.child_job)
    ttl = min(step.child_ttl or job.ttl, remaining)
    request = StartRequest(
        job=step.child_job,
        payload=stage.req["payload"],
        ttl=ttl,
        idempotency_key=key,
        correlation_id=saga.correlation_id or saga.id,
        traceparent=saga.traceparent,
    )
    child, event = build_saga(request, run.registry, run.clock)
    child.parent, child.parent_seq = saga.id, stage.seq
    await run.cp.flush()
    child, _ = await run.store.create(child, event)
    return child


async def undo_child(run: Run, forward: Stage, reason: str) -> dict[str, Any]:
    """Compensation of a child step: abort the child, or compensate it if it completed; wait for the end."""
    parent = run.cp.current.id
    child = await run.store.by_idempotency_key(child_key(parent, forward.seq))
    if child is None:
        return {"child": None, "undone": False, "reason": "the child saga was never created"}
    delay = POLL_FIRST
    while True:
        current = await run.store.get(child.id)
        if current.state == SagaState.ABORTED:
            return {"child": current.id, "state": current.state.value}
        if current.state == SagaState.PARKED:
            raise RuntimeError(
                f"child saga {current.id} is parked ({current.parked_reason}); resolve it "
                f"(essential resume/abort {current.id}), then resume this saga"
            )
        if current.state == SagaState.COMPLETED:
            await run.store.reopen_for_compensation(current.id, f"parent saga {parent}: {reason}")
        elif current.state != SagaState.COMPENSATING and not current.abort_requested:
            await run.store.request_abort(current.id, f"parent saga {parent}: {reason}")
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, POLL_CAP * 2)
