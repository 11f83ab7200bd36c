"""The saga state machine: drives one saga from its last checkpoint to a terminal state.

Protocol per step (DESIGN.md, "How a saga runs"):

1. write-ahead: a ``started`` stage with ``req`` and the saga cursor, one transaction;
2. run the step (retries, timeout, TTL) with the key ``<saga id>:<seq>``;
3. result: the stage's ``res``/status, the saga cursor and a ``saga.stage.completed``
   event, one transaction.

Every write carries the lease epoch; :class:`LeaseLost` stops the runner at once.
The runner holds no state that is not also in the store, so a new runner on
another process resumes exactly where a dead one left off.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from .clock import Clock, SystemClock
from .compensation import compensation_plan, open_compensation
from .dsl import Job, RetryPolicy, Step, StepContext
from .errors import EssentialError, JobVersionMissing, StepFailed, StepTimeout
from .models import Event, Saga, Stage, StageMeta
from .ports import RunnerObserver, SagaStore
from .registry import JobRegistry
from .states import TERMINAL_STATES, Action, EventType, SagaState, StageStatus

log = logging.getLogger("essential.runner")

MAX_RECORDED_ERRORS = 5


@dataclass
class Attempts:
    """Outcome of running one step or compensation under its retry policy."""

    ok: bool
    result: Any = None
    attempts: int = 0
    errors: list[str] = field(default_factory=list)
    timed_out: bool = False
    duration_ms: float = 0.0


def _jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return value


class SagaRunner:
    def __init__(
        self,
        saga_id: str,
        *,
        store: SagaStore,
        registry: JobRegistry,
        owner: str,
        clock: Clock | None = None,
        observer: RunnerObserver | None = None,
    ) -> None:
        self.saga_id = saga_id
        self.observer = observer
        self.store = store
        self.registry = registry
        self.owner = owner
        self.clock = clock or SystemClock()
        self._abort_reason: str | None = None
        self._abort_event = asyncio.Event()
        self.saga: Saga | None = None
        self.epoch = 0

    # -- control from the hosting actor -------------------------------------------------
    def request_abort(self, reason: str = "aborted by request") -> None:
        """Honoured between steps (and during retry back-off); the step in flight finishes."""
        if self._abort_reason is None:
            self._abort_reason = reason
        self._abort_event.set()

    # -- main entry ----------------------------------------------------------------------
    async def run(self) -> Saga:
        saga = await self.store.acquire_lease(self.saga_id, self.owner)
        self.saga, self.epoch = saga, saga.lease.epoch
        if saga.state in TERMINAL_STATES or saga.state == SagaState.PARKED:
            return saga
        if saga.abort_requested and self._abort_reason is None:
            self._abort_reason = saga.abort_requested
        try:
            job = self.registry.get(saga.job, saga.version)
        except JobVersionMissing as exc:
            await self._park(str(exc))
            return await self.store.get(self.saga_id)
        stages = await self.store.stages(self.saga_id)

        if saga.state == SagaState.PENDING:
            await self._transition({"state": SagaState.RUNNING}, [])
        if saga.state == SagaState.RUNNING:
            failure = await self._forward(job, stages)
            stages = await self.store.stages(self.saga_id)
            if failure is None:
                await self._transition({"state": SagaState.COMMITTING}, [])
        if saga.state == SagaState.COMMITTING:
            now = self.clock.now()
            await self._transition(
                {"state": SagaState.COMPLETED, "committed_at": now},
                [self._event(EventType.COMPLETED, SagaState.COMPLETED)],
            )
        elif saga.state == SagaState.COMPENSATING:
            await self._compensate(job, stages)
        return await self.store.get(self.saga_id)

    # -- forward path ------------------------------------------------------------------
    async def _forward(self, job: Job, stages: list[Stage]) -> str | None:
        """Run the remaining steps; returns the reason when compensation was decided."""
        saga = self._saga
        payload = job.validate_payload(saga.payload)
        forward = {s.step: s for s in stages if s.action != Action.COMPENSATE}
        results = {s.step: s.res for s in forward.values() if s.status == StageStatus.SUCCEEDED}

        for index in range(saga.cursor, len(job.steps)):
            step = job.steps[index]
            reason = self._stop_reason()
            if reason:
                await self._begin_compensation(reason)
                return reason
            seq = self._next_seq(forward.get(step.name))
            ctx = StepContext(
                saga_id=saga.id,
                job=saga.job,
                payload=payload,
                results=dict(results),
                idempotency_key=f"{saga.id}:{seq}",
                seq=seq,
                correlation_id=saga.correlation_id,
                traceparent=saga.traceparent,
            )
            if step.when is not None and not step.when(ctx):
                continue
            stage = forward.get(step.name)
            if stage is None or stage.status != StageStatus.STARTED:
                stage = self._new_stage(step, seq, Action(step.action), req=saga.payload)
                await self.store.write_ahead(
                    saga.id, self.epoch, stage, {"seq": seq, "cursor": index, "updatedAt": stage.started_at}
                )
                saga.seq, saga.cursor = seq, index

            outcome = await self._attempt(step.run, ctx, step.retry, step.timeout, bounded_by_ttl=True)
            if outcome.ok:
                results[step.name] = _jsonable(outcome.result)
                fields: dict[str, Any] = {"cursor": index + 1}
                await self._finish(stage, outcome, StageStatus.SUCCEEDED, fields)
                saga.cursor = index + 1
                continue
            reason = "timed out" if outcome.timed_out else "failed"
            error = f"step {step.name} {reason} after {outcome.attempts} attempt(s): {outcome.errors[-1] if outcome.errors else ''}"
            if self.clock.now() >= saga.deadline:
                error = f"ttl of {saga.ttl:g}s expired during step {step.name}"
            elif self._abort_reason:
                error = f"{self._abort_reason} (during step {step.name})"
            await self._finish(
                stage,
                outcome,
                StageStatus.FAILED,
                {"state": SagaState.COMPENSATING, "error": error},
            )
            saga.state = SagaState.COMPENSATING
            return error
        return None

    def _stop_reason(self) -> str | None:
        if self._abort_reason:
            return self._abort_reason
        if self.clock.now() >= self._saga.deadline:
            return f"ttl of {self._saga.ttl:g}s expired"
        return None

    async def _begin_compensation(self, reason: str) -> None:
        await self._transition({"state": SagaState.COMPENSATING, "error": reason}, [])

    # -- compensation ------------------------------------------------------------------
    async def _compensate(self, job: Job, stages: list[Stage]) -> None:
        saga = self._saga
        payload = job.validate_payload(saga.payload)
        results = {
            s.step: s.res
            for s in stages
            if s.action != Action.COMPENSATE and s.status == StageStatus.SUCCEEDED
        }
        steps = {s.name: s for s in job.steps}
        for forward in compensation_plan(stages):
            step = steps.get(forward.step)
            if step is None or step.compensate is None:
                continue
            stage = open_compensation(stages, forward.seq)
            if stage is None:
                seq = saga.seq + 1
                stage = self._new_stage(step, seq, Action.COMPENSATE, req=forward.res)
                stage.compensates = forward.seq
                await self.store.write_ahead(saga.id, self.epoch, stage, {"seq": seq, "updatedAt": stage.started_at})
                saga.seq = seq
            ctx = StepContext(
                saga_id=saga.id,
                job=saga.job,
                payload=payload,
                results=dict(results),
                idempotency_key=f"{saga.id}:{forward.seq}",
                seq=forward.seq,
                correlation_id=saga.correlation_id,
                traceparent=saga.traceparent,
            )
            compensate = step.compensate
            forward_result = forward.res

            async def undo(c: StepContext, _fn=compensate, _res=forward_result) -> Any:
                return await _fn(c, _res)

            outcome = await self._attempt(undo, ctx, step.compensation_retry, step.timeout, bounded_by_ttl=False)
            if outcome.ok:
                await self._finish(stage, outcome, StageStatus.SUCCEEDED, {})
                continue
            await self._finish(stage, outcome, StageStatus.FAILED, {})
            await self._park(
                f"compensation of step {step.name} (stage {forward.seq}) failed after "
                f"{outcome.attempts} attempt(s): {outcome.errors[-1] if outcome.errors else ''}"
            )
            return
        now = self.clock.now()
        await self._transition(
            {"state": SagaState.ABORTED, "aborted_at": now},
            [self._event(EventType.ABORTED, SagaState.ABORTED, reason=saga.error or self._abort_reason)],
        )

    # -- running user code ---------------------------------------------------------------
    async def _attempt(
        self, fn: Any, ctx: StepContext, policy: RetryPolicy, timeout: float, *, bounded_by_ttl: bool
    ) -> Attempts:
        outcome = Attempts(ok=False)
        started = time.perf_counter()
        while True:
            outcome.attempts += 1
            ctx.attempt = outcome.attempts
            limit = timeout
            if bounded_by_ttl:
                remaining = (self._saga.deadline - self.clock.now()).total_seconds()
                limit = max(min(timeout, remaining), 0.0)
            retryable = True
            try:
                outcome.result = await asyncio.wait_for(fn(ctx), timeout=limit)
                outcome.ok = True
                outcome.timed_out = False
                break
            except asyncio.TimeoutError:
                outcome.timed_out = True
                outcome.errors.append(str(StepTimeout(f"timed out after {limit:.3g}s")))
            except StepFailed as exc:
                retryable = False
                outcome.errors.append(f"{type(exc).__name__}: {exc}")
            except EssentialError:
                raise
            except Exception as exc:  # a step's own failure: recorded, retried by policy
                outcome.timed_out = False
                outcome.errors.append(f"{type(exc).__name__}: {exc}")
            if not retryable or outcome.attempts >= policy.attempts:
                break
            if bounded_by_ttl and (self._stop_reason() and not self._abort_reason):
                break  # the TTL has passed: no point retrying
            await self._backoff(policy.delay(outcome.attempts))
            if bounded_by_ttl and self._abort_reason:
                break
        outcome.errors = outcome.errors[-MAX_RECORDED_ERRORS:]
        outcome.duration_ms = (time.perf_counter() - started) * 1000
        return outcome

    async def _backoff(self, delay: float) -> None:
        """Sleep, but wake early when an abort arrives."""
        sleeper = asyncio.ensure_future(self.clock.sleep(delay))
        waiter = asyncio.ensure_future(self._abort_event.wait())
        try:
            await asyncio.wait({sleeper, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, waiter):
                task.cancel()

    # -- checkpoint helpers ------------------------------------------------------------
    @property
    def _saga(self) -> Saga:
        assert self.saga is not None, "run() acquires the saga first"
        return self.saga

    def _next_seq(self, existing: Stage | None) -> int:
        if existing is not None and existing.status == StageStatus.STARTED:
            return existing.seq
        return self._saga.seq + 1

    def _new_stage(self, step: Step, seq: int, action: Action, req: Any) -> Stage:
        saga = self._saga
        return Stage(
            saga=saga.id,
            seq=seq,
            step=step.name,
            bucket=step.bucket,
            action=action,
            req=req,
            meta=StageMeta(
                idempotency_key=f"{saga.id}:{seq}",
                correlation_id=saga.correlation_id,
                traceparent=saga.traceparent,
            ),
            started_at=self.clock.now(),
        )

    async def _finish(self, stage: Stage, outcome: Attempts, status: StageStatus, fields: dict[str, Any]) -> None:
        now = self.clock.now()
        stage.status = status
        stage.finished_at = now
        if outcome.ok:
            stage.res = _jsonable(outcome.result)
        else:
            stage.res = {
                "error": outcome.errors[-1] if outcome.errors else "failed",
                "outcome": "unknown" if outcome.timed_out else "failed",
            }
        stage.meta.retry_count = max(outcome.attempts - 1, 0)
        stage.meta.errors = outcome.errors
        stage.meta.duration_ms = round(outcome.duration_ms, 3)
        fields = {**fields, "updatedAt": now}
        if status == StageStatus.SUCCEEDED:
            fields["restore_attempts"] = 0  # progress: earlier restores were not in vain
        event = self._event(
            EventType.STAGE_COMPLETED,
            None,
            seq=stage.seq,
            step=stage.step,
            bucket=stage.bucket,
            action=stage.action.value,
            status=status.value,
            compensates=stage.compensates,
        )
        await self.store.record_result(self._saga.id, self.epoch, stage, fields, [event])
        self._apply(fields)
        if self.observer is not None:
            self.observer.stage_finished(self._saga, stage)

    async def _transition(self, fields: dict[str, Any], events: list[Event]) -> None:
        fields = {**fields, "updatedAt": self.clock.now()}
        await self.store.transition(self._saga.id, self.epoch, fields, events)
        self._apply(fields)
        if self.observer is not None and "state" in fields:
            self.observer.state_changed(self._saga, SagaState(fields["state"]))

    async def _park(self, reason: str) -> None:
        log.error("saga %s parked: %s", self.saga_id, reason)
        await self._transition(
            {"state": SagaState.PARKED, "parked_reason": reason, "parked_from": self._saga.state},
            [self._event(EventType.PARKED, SagaState.PARKED, reason=reason)],
        )

    def _apply(self, fields: dict[str, Any]) -> None:
        saga = self._saga
        for key, value in fields.items():
            setattr(saga, key, value)

    def _event(self, type_: EventType, state: SagaState | None, **data: Any) -> Event:
        saga = self._saga
        return Event(
            type=type_,
            saga=saga.id,
            job=saga.job,
            state=state or saga.state,
            at=self.clock.now(),
            correlation_id=saga.correlation_id,
            traceparent=saga.traceparent,
            data={k: v for k, v in data.items() if v is not None},
        )
