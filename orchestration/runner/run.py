"""What one run of a saga shares between its driver and its step handlers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from essential.orchestration.clock import Clock
from essential.orchestration.dsl import RetryPolicy, Step, StepContext
from essential.orchestration.models import Stage
from essential.orchestration.ports import SagaStore
from essential.orchestration.registry import JobRegistry
from essential.orchestration.runner.attempts import Attempts, attempt, jsonable
from essential.orchestration.runner.checkpoints import Checkpoints
from essential.orchestration.runner.control import Control
from essential.orchestration.runner.waiting import Waits
from essential.orchestration.states import SagaState, StageStatus

#: seconds a waiting step keeps its actor before the saga is checkpointed ``waiting``
DEFAULT_LINGER = 2.0


@dataclass
class Run:
    store: SagaStore
    registry: JobRegistry
    clock: Clock
    control: Control
    cp: Checkpoints
    waits: Waits
    #: seconds every wait of this run lingers (None: each step's own, else DEFAULT_LINGER)
    linger: float | None = None

    def ctx(self, step: Step, seq: int, payload: Any, results: dict[str, Any], **extra: Any) -> StepContext[Any]:
        """What a step's code sees; ``seq`` makes its idempotency key ``<saga id>:<seq>``."""
        saga = self.cp.current
        return StepContext(
            saga_id=saga.id,
            job=saga.job,
            payload=payload,
            results=dict(results),
            idempotency_key=f"{saga.id}:{seq}",
            seq=seq,
            correlation_id=saga.correlation_id,
            traceparent=saga.traceparent,
            deadline=saga.deadline,
            attempted_at=self.clock.now(),
            **extra,
        )

    def enter(self, step: Step, payload: Any, results: dict[str, Any]) -> tuple[Stage | None, StepContext[Any]] | None:
        """The step's latest stage (open when a crash or a wait interrupted it) and its context;
        None when the step's ``when`` skips it."""
        stage = self.cp.latest(step.name)
        ctx = self.ctx(step, self.cp.resume_seq(stage), payload, results)
        if step.when is not None and not step.when(ctx):
            return None
        return stage, ctx

    async def attempt(
        self, fn: Any, ctx: StepContext[Any], policy: RetryPolicy, timeout: float, *, bounded_by_ttl: bool
    ) -> Attempts:
        return await attempt(
            fn, ctx, policy, timeout, saga=self.cp.current, control=self.control, bounded_by_ttl=bounded_by_ttl
        )

    def in_transactions(self, stage: Stage, fn: Any, fields: dict[str, Any]) -> Any:
        """A transactional step's (or undo's) attempt: ``fn(ctx)`` runs with ``ctx.session`` set to
        the transaction that also records ``stage`` succeeded (with ``fields`` of the saga)."""

        async def attempt(ctx: StepContext[Any]) -> Any:
            async def work(session: Any) -> Any:
                ctx.session = session
                try:
                    return await fn(ctx)
                finally:
                    ctx.session = None

            return await self.cp.commit_step(stage, work, fields, ctx.attempt)

        return attempt

    def linger_of(self, step: Step) -> float:
        if self.linger is not None:
            return self.linger
        return step.linger if step.linger is not None else DEFAULT_LINGER

    def failure_text(self, step: Step, outcome: Attempts) -> str:
        """Why the saga compensates after ``step`` failed: the last error, or the TTL or abort behind it."""
        saga = self.cp.current
        last = outcome.errors[-1] if outcome.errors else ""
        reason = "timed out" if outcome.timed_out and last.startswith("timed out") else "failed"
        error = f"step {step.name} {reason} after {outcome.attempts} attempt(s): {last}"
        if outcome.timed_out and reason == "failed":
            error += " (an earlier attempt timed out: its outcome is unknown, so it is compensated)"
        if self.clock.now() >= saga.deadline:
            error = f"ttl of {saga.ttl:g}s expired during step {step.name}"
        elif self.control.abort_reason:
            error = f"{self.control.abort_reason} (during step {step.name})"
        return error

    async def fail(self, stage: Stage, outcome: Attempts, error: str, **fields: Any) -> str:
        """Record the stage failed and the saga compensating, in one checkpoint; returns ``error``."""
        await self.cp.finish(stage, outcome, StageStatus.FAILED, {**fields, "state": SagaState.COMPENSATING, "error": error})
        return error

    async def succeed(self, stage: Stage, outcome: Attempts, results: dict[str, Any], name: str, cursor: int,
                      *, fold: bool = False) -> None:  # fmt: skip
        """Record the stage succeeded with the saga's cursor past it; later steps see its result."""
        results[name] = jsonable(outcome.result)
        await self.cp.finish(stage, outcome, StageStatus.SUCCEEDED, {"cursor": cursor}, fold=fold)

    async def begin_compensation(self, reason: str) -> str:
        await self.cp.transition({"state": SagaState.COMPENSATING, "error": reason}, [])
        return reason
