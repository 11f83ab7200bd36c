"""Parallel groups: the members' stages written ahead in one transaction, run concurrently, each recorded."""
from __future__ import annotations

import asyncio
from typing import Any

from essential.orchestration.dsl import Step, StepContext
from essential.orchestration.models import Stage
from essential.orchestration.runner.attempts import jsonable
from essential.orchestration.runner.run import Run
from essential.orchestration.states import Action, SagaState, StageStatus


async def run_group(run: Run, members: list[Step], start: int, end: int, payload: Any, results: dict[str, Any]) -> str | None:
    """Returns the first member's failure (the saga then compensates every member that succeeded), else None."""
    cp = run.cp
    saga = cp.current
    group = members[0].group
    seq = saga.seq
    # members see the results of the steps before the group, never each other's (also after a restore)
    before = {k: v for k, v in results.items() if k not in {m.name for m in members}}
    todo: list[tuple[Step, Stage, StepContext[Any]]] = []
    new: list[Stage] = []
    written_at = run.clock.now()
    for step in members:
        stage = cp.latest(step.name)
        if stage is not None and stage.status == StageStatus.SUCCEEDED:
            continue  # done before a crash; its result is in ``results``
        member_seq = stage.seq if stage is not None and stage.status == StageStatus.STARTED else seq + 1
        ctx = run.ctx(step, member_seq, payload, before)
        if step.when is not None and not step.when(ctx):
            continue
        if stage is None or stage.status != StageStatus.STARTED:
            seq = member_seq
            stage = cp.new_stage(step, seq, Action(step.action), req=saga.payload, at=written_at)
            stage.meta.group = group
            new.append(stage)
        todo.append((step, stage, ctx))
    if new:
        await cp.write_ahead(new, start)
    if not todo:
        return None

    failures: list[str] = []
    pending = len(todo)
    book = asyncio.Lock()

    async def member(step: Step, stage: Stage, ctx: StepContext[Any]) -> None:
        nonlocal pending
        outcome = await run.attempt(step.run, ctx, step.retry, step.timeout, bounded_by_ttl=True)
        if outcome.deferred is not None:
            outcome.ok = False
            outcome.errors.append("RetryLater is not supported inside a parallel group")
        async with book:
            pending -= 1
            if outcome.ok:
                results[step.name] = jsonable(outcome.result)
                fields = {"cursor": end} if pending == 0 and not failures else {}
                await cp.finish(stage, outcome, StageStatus.SUCCEEDED, fields)
                return
            error = run.failure_text(step, outcome)
            fields = {} if failures else {"state": SagaState.COMPENSATING, "error": f"{error} (parallel group {group})"}
            failures.append(error)
            await cp.finish(stage, outcome, StageStatus.FAILED, fields)

    await asyncio.gather(*(member(*item) for item in todo))
    return failures[0] if failures else None
