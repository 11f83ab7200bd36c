"""``wait_for`` steps: wait for a named signal (stored even if it came first), then run its handler."""
from __future__ import annotations

from datetime import timedelta
from typing import Any

from essential.orchestration.dsl import WaitStep, seconds_of
from essential.orchestration.runner.attempts import Attempts
from essential.orchestration.runner.run import Run
from essential.orchestration.states import Action, StageStatus


async def run_wait(run: Run, step: WaitStep, index: int, payload: Any, results: dict[str, Any]) -> str | None:
    cp = run.cp
    saga = cp.current
    entered = run.enter(step, payload, results)
    if entered is None:
        return None
    stage, ctx = entered
    if stage is None or stage.status != StageStatus.STARTED:
        stage = cp.new_stage(step, ctx.seq, Action.WAIT, req={"signal": step.signal})
        timeout = seconds_of(step.wait_timeout, ctx)
        if timeout is not None:
            stage.meta.wake_at = stage.started_at + timedelta(seconds=timeout)
        await cp.write_ahead([stage], index)
    consumed = {s.meta.signal_id for s in cp.stages.values() if s.meta.signal_id and s.seq != stage.seq}
    name = step.signal

    async def arrived() -> Any:
        for signal in await run.store.signals(saga.id, name):
            if signal.id not in consumed:
                return signal
        return None

    waited = await run.waits.until(f"signal:{name}", check=arrived, until=stage.meta.wake_at, linger=run.linger_of(step))
    if waited.kind == "stop":
        outcome = Attempts(ok=False, errors=[f"stopped while waiting for signal {name!r}: {waited.value}"])
        return await run.fail(stage, outcome, waited.value)
    if waited.kind == "timeout":
        waited_s = (stage.meta.wake_at - stage.started_at).total_seconds() if stage.meta.wake_at else 0.0
        if step.on_timeout == "continue":
            done = Attempts(ok=True, result={"signal": name, "timed_out": True}, attempts=0)
            await run.succeed(stage, done, results, step.name, index + 1)
            return None
        error = f"no signal {name!r} within {waited_s:g}s (step {step.name})"
        return await run.fail(stage, Attempts(ok=False, errors=[error]), error)
    signal = waited.value
    stage.meta.signal_id = signal.id
    ctx.signal = signal.payload
    outcome = await run.attempt(step.run, ctx, step.retry, step.timeout, bounded_by_ttl=True)
    if outcome.ok:
        await run.succeed(stage, outcome, results, step.name, index + 1)
        return None
    if outcome.deferred is not None:
        outcome.errors.append("RetryLater is not supported in a signal handler")
    return await run.fail(stage, outcome, run.failure_text(step, outcome))
