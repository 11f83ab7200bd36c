"""Jobs of the operator tests (tests/test_operators.py, tests/test_parking.py), each name used by one test only.

A job of its own per test keeps the metric deltas and the CLI's filtered views
exact whatever else runs on the cluster.  Steps behave like ``tests.jobs``
(effects recorded under their idempotency key), plus ``fail_undo_at``: that
step's compensation fails on every attempt, so the saga parks; and
``undo_outage``: that step's compensation fails until the test inserts the
gate ``_id`` into ``gates`` (an outage an operator waits out, then resumes).
"""
from __future__ import annotations

from pydantic import Field

from essential.orchestration import Job, RetryPolicy, StepContext

from .jobs import Knobs, _behave, _db, _undo


class OpsKnobs(Knobs):
    fail_undo_at: str | None = None
    undo_outage: dict[str, str] = Field(
        default_factory=dict, description="a compensation fails while this gate _id is not in the gates collection"
    )


def _chain(name: str, steps: list[str], *, ttl: float = 120) -> Job:
    job: Job[OpsKnobs] = Job(name, payload=OpsKnobs, ttl=ttl)
    for step_name in steps:

        async def run(ctx: StepContext[OpsKnobs], _s: str = step_name) -> dict:
            return await _behave(ctx, _s)

        async def undo(ctx: StepContext[OpsKnobs], result: dict | None, _s: str = step_name) -> dict:
            if ctx.payload.fail_undo_at == _s:
                raise RuntimeError(f"injected compensation failure in {_s} (attempt {ctx.attempt})")
            outage = ctx.payload.undo_outage.get(_s)
            if outage and await _db().gates.find_one({"_id": outage}) is None:
                raise RuntimeError(f"compensation of {_s}: service unavailable (attempt {ctx.attempt})")
            return await _undo(ctx, _s, result)

        step = job.step(bucket=f"ops.{step_name}", action="create", name=step_name,
                        retry=RetryPolicy(attempts=3, backoff=0.01), timeout=30)(run)  # fmt: skip
        step.compensation(undo)
    return job


actors_view = _chain("ops:actors", ["a", "b", "c", "d"])
metrics_batch = _chain("ops:metrics", ["a", "b", "c", "d"])
restore = _chain("ops:restore", ["a", "b", "c"])
cli_view = _chain("ops:cli", ["a", "b", "c", "d"])
tail_view = _chain("ops:tail", ["a", "b", "c", "d"])
logs_view = _chain("ops:logs", ["a", "b"])
# tests/test_parking.py: restores without progress, operator abort and resume of parked sagas
park_restores = _chain("ops:park-restores", ["a", "b", "c"], ttl=600)
park_abort = _chain("ops:park-abort", ["a", "b", "c"], ttl=600)
park_undo = _chain("ops:park-undo", ["a", "b", "c"], ttl=600)
prune_parked = _chain("ops:prune", ["a", "b"])  # tests/test_advanced.py: a parked saga is never pruned
