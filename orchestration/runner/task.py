"""Plain steps: write ahead (taking bucket locks in the same transaction), run, record; ``RetryLater`` rounds."""
from __future__ import annotations

from datetime import timedelta
from typing import Any

from essential.orchestration.compensation import is_deferred
from essential.orchestration.dsl import Step, StepContext
from essential.orchestration.errors import LockBusy
from essential.orchestration.models import Stage
from essential.orchestration.runner.attempts import Attempts, jsonable
from essential.orchestration.runner.run import Run
from essential.orchestration.states import Action, StageStatus


async def run_task(run: Run, step: Step, index: int, payload: Any, results: dict[str, Any]) -> str | None:
    """Returns the reason when the saga compensates after this step, else None."""
    cp = run.cp
    saga = cp.current
    while True:
        stage = cp.latest(step.name)
        deferred = sum(1 for s in cp.stages.values() if s.step == step.name and is_deferred(s))
        ctx = run.ctx(step, cp.resume_seq(stage), payload, results, deferred=deferred)
        if step.when is not None and not step.when(ctx):
            return None
        if stage is not None and is_deferred(stage):
            # an earlier round asked to run again later: the timer is in the stage
            waited = await run.waits.until(f"timer:{step.name}", check=None, until=stage.meta.wake_at,
                                           linger=run.linger_of(step))  # fmt: skip
            if waited.kind == "stop":
                return await run.begin_compensation(waited.value)
            stage = None
            ctx = run.ctx(step, cp.resume_seq(None), payload, results, deferred=deferred)
        if stage is None or stage.status != StageStatus.STARTED:
            stage = cp.new_stage(step, ctx.seq, Action(step.action), req=saga.payload)
            # a transactional step has nothing to write ahead (its writes and its record commit
            # together, or not at all) unless it takes locks, which a write-ahead takes
            if not step.transactional or step.lock is not None:
                refused = await _write_ahead_locked(run, step, stage, index, ctx)
                if refused is not None:
                    return refused
        if step.transactional:
            outcome = await _attempt_in_transactions(run, step, stage, index, ctx)
        else:
            outcome = await run.attempt(step.run, ctx, step.retry, step.timeout, bounded_by_ttl=True)
        if outcome.deferred is not None:
            failure = await _defer(run, step, stage, outcome)
            if failure is not None:
                return failure
            continue  # wait for the timer, then run the step again as a new stage
        if outcome.ok and step.transactional:
            results[step.name] = jsonable(outcome.result)  # recorded by the step's own transaction
            return None
        if outcome.ok:
            await run.succeed(stage, outcome, results, step.name, index + 1, fold=True)
            return None
        # the saga's seq covers the stage (a transactional step's was not written ahead)
        return await run.fail(stage, outcome, run.failure_text(step, outcome), seq=max(saga.seq, stage.seq))


async def _attempt_in_transactions(run: Run, step: Step, stage: Stage, index: int, ctx: StepContext[Any]) -> Attempts:
    """Each attempt is one transaction: the step's writes (``ctx.session``) and its stage recorded
    succeeded with the saga's cursor past it.  A failed, timed-out or interrupted attempt rolled
    everything back, so a failure leaves nothing to compensate and a re-run applies it once."""
    fields = {"seq": max(run.cp.current.seq, stage.seq), "cursor": index + 1}
    outcome = await run.attempt(run.in_transactions(stage, step.run, fields), ctx, step.retry, step.timeout,
                                bounded_by_ttl=True)  # fmt: skip
    outcome.timed_out = False  # a timed-out attempt's transaction was aborted: its outcome is known
    return outcome


async def _defer(run: Run, step: Step, stage: Stage, outcome: Attempts) -> str | None:
    """Record a RetryLater round (no effect, nothing to compensate); fail when it cannot fit the TTL."""
    saga = run.cp.current
    later = outcome.deferred
    assert later is not None
    retry_at = run.clock.now() + timedelta(seconds=later.delay)
    if retry_at >= saga.deadline:
        outcome.errors.append(f"RetryLater: step {step.name} asked to run again in {later.delay:g}s, after the saga's TTL")
        error = f"step {step.name} cannot be retried within the ttl of {saga.ttl:g}s ({later.reason or 'retry later'})"
        return await run.fail(stage, outcome, error)
    stage.meta.wake_at = retry_at
    outcome.result = {"outcome": "deferred", "error": later.reason or "retry later", "retry_at": retry_at.isoformat()}
    # the saga's seq covers the round (a transactional step's round was not written ahead)
    await run.cp.finish(stage, outcome, StageStatus.FAILED, {"seq": max(saga.seq, stage.seq)})
    return None


async def _write_ahead_locked(run: Run, step: Step, stage: Stage, index: int, ctx: StepContext[Any]) -> str | None:
    """Write the stage ahead, taking the step's bucket locks in the same transaction.

    Returns the error when the step was refused (fail fast, lock wait timed
    out, or the saga must stop while waiting); the saga is then compensating.
    """
    cp, store = run.cp, run.store
    claims = step.lock.claims(ctx, step.bucket) if step.lock is not None else []
    if not claims:
        await cp.write_ahead([stage], index)
        return None
    assert step.lock is not None
    saga_id = cp.current.id
    stage.meta.locks = [f"{bucket}:{key}" for bucket, key in claims]
    until = run.clock.now() + timedelta(seconds=step.lock.timeout) if step.lock.timeout is not None else None
    while True:
        stage.started_at = run.clock.now()
        try:
            await cp.write_ahead([stage], index, locks=claims)
            return None
        except LockBusy as busy:
            if step.lock.on_conflict == "fail":
                return await _refuse(run, stage, index, f"step {step.name} refused: {busy}")
            if not await store.add_lock_waiter(busy.bucket, busy.key, saga_id):
                continue  # released meanwhile
            bucket, key = busy.bucket, busy.key
            cycle = await store.lock_cycle(bucket, key, saga_id)
            if cycle is not None:  # the holder waits (through others) for a lock this saga holds
                await store.remove_lock_waiter(bucket, key, saga_id)
                chain = " → ".join(f"saga {holder}" for holder in cycle)
                return await _refuse(
                    run, stage, index,
                    f"step {step.name} refused: deadlock: {busy}, and {chain} waits for a lock this saga holds",
                )  # fmt: skip

            async def free(_b: str = bucket, _k: str = key) -> bool | None:
                return True if await store.lock_free(_b, _k, saga_id) else None

            # parked (raises Parked): still a waiter, woken by the holder's release
            waited = await run.waits.until(f"lock:{bucket}:{key}", check=free, until=until, linger=run.linger_of(step))
            if waited.kind != "ready":
                await store.remove_lock_waiter(bucket, key, saga_id)
            if waited.kind == "stop":
                return await run.begin_compensation(waited.value)
            if waited.kind == "timeout":
                return await _refuse(run, stage, index, f"step {step.name} gave up after waiting {step.lock.timeout:g}s: {busy}")


async def _refuse(run: Run, stage: Stage, index: int, error: str) -> str:
    """The step never started (no effect, no lock): record it failed and compensate the steps before it."""
    outcome = Attempts(ok=False, attempts=0, errors=[error])
    stage.meta.locks = []
    await run.fail(stage, outcome, error, seq=stage.seq, cursor=index)
    saga = run.cp.current
    saga.seq = max(saga.seq, stage.seq)
    return error
