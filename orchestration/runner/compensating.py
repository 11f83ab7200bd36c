"""Compensating a saga: undo its completed steps latest first, then end it aborted (or park it).

Which stages to undo, and in what order, is :func:`~essential.orchestration.compensation.compensation_plan`;
an undo interrupted by a crash is resumed from its open stage (its idempotency key is the forward step's).
"""
from __future__ import annotations

from typing import Any

from essential.orchestration.compensation import compensation_plan, open_compensation
from essential.orchestration.dsl import Job, StepContext
from essential.orchestration.models import Stage
from essential.orchestration.runner.child import undo_child
from essential.orchestration.runner.run import Run
from essential.orchestration.states import Action, EventType, SagaState, StageStatus


async def compensate(run: Run, job: Job[Any], stages: list[Stage]) -> None:
    cp = run.cp
    saga = cp.current
    payload = job.validate_payload(saga.payload)
    results = {s.step: s.res for s in stages if s.action != Action.COMPENSATE and s.status == StageStatus.SUCCEEDED}
    steps = {s.name: s for s in job.steps}
    reason = saga.error or run.control.abort_reason or "compensating"
    for forward in compensation_plan(stages):
        step = steps.get(forward.step)
        if step is None or (step.compensate is None and step.kind != "child"):
            continue
        stage = open_compensation(stages, forward.seq)
        transactional = step.transactional and step.kind != "child"
        if stage is None:
            stage = cp.new_stage(step, saga.seq + 1, Action.COMPENSATE, req=forward.res)
            stage.compensates = forward.seq
            if not transactional:  # a transactional undo commits with its record: nothing to write ahead
                await cp.write_compensation(stage)
        # the undo's idempotency key is the forward step's: a service can match the two
        ctx = run.ctx(step, forward.seq, payload, results)
        if step.kind == "child":

            async def undo(c: StepContext[Any], _fwd: Stage = forward) -> Any:
                return await undo_child(run, _fwd, reason)

        else:
            compensate_fn = step.compensate
            forward_result = forward.res

            async def undo(c: StepContext[Any], _fn: Any = compensate_fn, _res: Any = forward_result) -> Any:
                return await _fn(c, _res)

        seq = {"seq": max(saga.seq, stage.seq)}
        if transactional:  # each attempt's writes commit with the compensation's record
            undo = run.in_transactions(stage, undo, seq)
        outcome = await run.attempt(undo, ctx, step.compensation_retry, step.timeout, bounded_by_ttl=False)
        if outcome.ok and transactional:
            continue  # recorded by the undo's own transaction
        if outcome.ok:
            await cp.finish(stage, outcome, StageStatus.SUCCEEDED, {}, fold=True)
            continue
        outcome.timed_out = outcome.timed_out and not transactional  # an aborted transaction left nothing
        await cp.finish(stage, outcome, StageStatus.FAILED, seq)
        await cp.park(
            f"compensation of step {step.name} (stage {forward.seq}) failed after "
            f"{outcome.attempts} attempt(s): {outcome.errors[-1] if outcome.errors else ''}"
        )
        return
    await cp.transition(
        {"state": SagaState.ABORTED, "aborted_at": run.clock.now()},
        [cp.event(EventType.ABORTED, SagaState.ABORTED, reason=saga.error or run.control.abort_reason)],
    )
