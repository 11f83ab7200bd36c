"""``sleep`` steps: a durable timer whose wake-up time is fixed in the stage when it starts."""
from __future__ import annotations

from datetime import timedelta
from typing import Any

from essential.orchestration.dsl import SleepStep, seconds_of
from essential.orchestration.runner.attempts import Attempts
from essential.orchestration.runner.run import Run
from essential.orchestration.states import Action, StageStatus


async def run_sleep(run: Run, step: SleepStep, index: int, payload: Any, results: dict[str, Any]) -> str | None:
    cp = run.cp
    entered = run.enter(step, payload, results)
    if entered is None:
        return None
    stage, ctx = entered
    if stage is None or stage.status != StageStatus.STARTED:
        stage = cp.new_stage(step, ctx.seq, Action.WAIT, req=None)
        seconds = seconds_of(step.duration, ctx) or 0.0
        stage.meta.wake_at = stage.started_at + timedelta(seconds=seconds)
        stage.req = {"seconds": seconds, "until": stage.meta.wake_at.isoformat()}
        await cp.write_ahead([stage], index)
    waited = await run.waits.until(f"timer:{step.name}", check=None, until=stage.meta.wake_at, linger=run.linger_of(step))
    if waited.kind == "stop":
        return await run.fail(stage, Attempts(ok=False, errors=[f"stopped while sleeping: {waited.value}"]), waited.value)
    assert stage.meta.wake_at is not None
    done = Attempts(ok=True, result={"slept_until": stage.meta.wake_at.isoformat()})
    await run.succeed(stage, done, results, step.name, index + 1)
    return None
