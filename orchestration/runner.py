"""The saga state machine: drives one saga from its last checkpoint to a terminal state.

Protocol per step (the README's "How it works"):

1. write-ahead: a ``started`` stage with ``req`` and the saga cursor, one transaction
   (a parallel group writes all its members' stages in one; a step with a
   bucket lock takes the lock in it);
2. run the step (retries, timeout, TTL) with the key ``<saga id>:<seq>``;
3. result: the stage's ``res``/status, the saga cursor and a ``saga.stage.completed``
   event, one transaction.

Every write carries the lease epoch; :class:`LeaseLost` stops the runner at once.
The runner holds no state that is not also in the store, so a new runner on
another process resumes exactly where a dead one left off.

Waiting (a signal, a durable timer, a child saga, a bucket lock): the runner
waits in process for up to ``linger`` seconds, then checkpoints the saga
``waiting`` (what for, and ``wake_at``: when to look again at the latest — the
timer, the signal's timeout, the TTL), looks once more (so a wake-up that
raced the checkpoint is not lost) and returns; the hosting actor exits.  The
supervisor relaunches the saga when it is due (whatever it waited for moves
``wake_at`` to now), and the runner picks up at the same stage.  Deadlines of
waits are stored in the stage (``meta.wake_at``), so they survive restarts.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Awaitable, Callable, Literal

from essential.orchestration.clock import Clock, SystemClock
from essential.orchestration.compensation import compensation_plan, is_deferred, open_compensation
from essential.orchestration.dsl import Job, RetryPolicy, Step, StepContext, seconds_of
from essential.orchestration.errors import (
    AbortPending,
    InvalidRequest,
    JobVersionMissing,
    LeaseLost,
    LockBusy,
    RetryLater,
    StepFailed,
    StepTimeout,
)
from essential.orchestration.models import Event, Saga, Stage, StageMeta
from essential.orchestration.ports import Carried, RunnerObserver, SagaStore
from essential.orchestration.registry import JobRegistry
from essential.orchestration.requests import StartRequest, build_saga
from essential.orchestration.states import TERMINAL_STATES, Action, EventType, SagaState, StageStatus

log = logging.getLogger("essential.runner")

MAX_RECORDED_ERRORS = 5
#: seconds a waiting step keeps its actor before the saga is checkpointed ``waiting``
DEFAULT_LINGER = 2.0
#: polling of the store while waiting in process (signals, child state, locks)
POLL_FIRST, POLL_CAP = 0.02, 0.25
#: seconds between re-reads of the saga while waiting in process (abort flag, lease)
REFRESH_EVERY = 1.0


def child_key(parent_id: str, seq: int) -> str:
    """Idempotency key of the child saga started by the parent's stage ``seq``."""
    return f"child:{parent_id}:{seq}"


@dataclass
class Attempts:
    """Outcome of running one step or compensation under its retry policy."""

    ok: bool
    result: Any = None
    attempts: int = 0
    errors: list[str] = field(default_factory=list)
    timed_out: bool = False
    duration_ms: float = 0.0
    deferred: RetryLater | None = None


@dataclass
class Waited:
    """How a wait ended: what it waited for is ``ready``, its deadline passed, or the saga must ``stop``."""

    kind: Literal["ready", "timeout", "stop"]
    value: Any = None


class Parked(Exception):
    """The saga was checkpointed ``waiting``; the runner returns and leaves the rest to the supervisor."""


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
        linger: float | None = None,
        fold_checkpoints: bool = True,
    ) -> None:
        """``linger``: seconds every wait of this runner keeps waiting in process before the
        saga is checkpointed ``waiting`` (default: each step's own, else :data:`DEFAULT_LINGER`).
        ``float("inf")`` never parks (in-process tests with a :class:`ManualClock`).

        ``fold_checkpoints``: a succeeded step's result checkpoint rides in the transaction
        of the runner's next write (the next step's write-ahead, the next state change),
        which is made before anything else happens, so a step costs one transaction.  The
        durability contract is unchanged: the result is durable before the next step
        runs, and a crash in between re-runs the step with the same idempotency key,
        exactly as a crash before a separate result checkpoint would."""
        self.saga_id = saga_id
        self.observer = observer
        self.store = store
        self.registry = registry
        self.owner = owner
        self.clock = clock or SystemClock()
        self.linger = linger
        self._abort_reason: str | None = None
        self._abort_event = asyncio.Event()
        self._io = asyncio.Lock()  # one checkpoint at a time (parallel members share the saga's session)
        self.saga: Saga | None = None
        self.epoch = 0
        self._stages: dict[int, Stage] = {}
        self.fold_checkpoints = fold_checkpoints
        self._carry: list[Carried] = []  # folded result checkpoints not yet written

    # -- control from the hosting actor -------------------------------------------------
    def request_abort(self, reason: str = "aborted by request") -> None:
        """Honoured between steps, during retry back-off and while waiting; the step in flight finishes."""
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
        # a pending saga has no stages: the runner writes its first one in the same
        # transaction that moves it to running (one read saved per saga)
        stages = [] if saga.state == SagaState.PENDING else await self.store.stages(self.saga_id)
        self._stages = {s.seq: s for s in stages}

        try:
            if saga.state == SagaState.PENDING:
                await self._transition({"state": SagaState.RUNNING}, [], fold=True)
            elif saga.state == SagaState.WAITING:
                await self._transition({"state": SagaState.RUNNING, "waiting_for": None, "wake_at": None}, [])
            if saga.state == SagaState.RUNNING:
                failure = await self._forward(job)
                if failure is None:
                    await self._transition({"state": SagaState.COMMITTING}, [], fold=True)
        except Parked:
            return await self.store.get(self.saga_id)
        if saga.state == SagaState.COMMITTING:
            now = self.clock.now()
            await self._transition(
                {"state": SagaState.COMPLETED, "committed_at": now},
                [self._event(EventType.COMPLETED, SagaState.COMPLETED)],
            )
        elif saga.state == SagaState.COMPENSATING:
            await self._flush()  # the stages read back must include the folded results
            await self._compensate(job, await self.store.stages(self.saga_id))
        await self._flush()
        # every write since the lease was fenced on what this runner knew, so its copy is the
        # stored saga (no read back); a copy, so the caller's value cannot change under it
        return self._saga.model_copy(deep=True)

    # -- forward path ------------------------------------------------------------------
    async def _forward(self, job: Job) -> str | None:
        """Run the remaining steps; returns the reason when compensation was decided."""
        saga = self._saga
        payload = job.validate_payload(saga.payload)
        results = {
            s.step: s.res
            for s in sorted(self._stages.values(), key=lambda s: s.seq)
            if s.action != Action.COMPENSATE and s.status == StageStatus.SUCCEEDED
        }
        index = saga.cursor
        while index < len(job.steps):
            step = job.steps[index]
            reason = self._stop_reason()
            if reason:
                await self._stop(step, reason)
                return reason
            try:
                if step.group is not None:
                    end = job.group_end(index)
                    failure = await self._run_group(job.steps[index:end], index, end, payload, results)
                    index = end
                else:
                    runner = {
                        "task": self._run_task, "wait": self._run_wait, "sleep": self._run_sleep, "child": self._run_child,
                    }[step.kind]  # fmt: skip
                    failure = await runner(step, index, payload, results)
                    index += 1
            except AbortPending as pending:  # a durable abort refused the step's write-ahead
                self._note(pending.reason)
                await self._stop(step, pending.reason)
                return pending.reason
            if failure is not None:
                return failure
        return None

    def _stop_reason(self) -> str | None:
        if self._abort_reason:
            return self._abort_reason
        if self.clock.now() >= self._saga.deadline:
            return f"ttl of {self._saga.ttl:g}s expired"
        return None

    async def _begin_compensation(self, reason: str) -> None:
        await self._transition({"state": SagaState.COMPENSATING, "error": reason}, [])

    async def _stop(self, step: Step, reason: str) -> None:
        """Abort or TTL before ``step``: a wait left open (the saga was waiting) is closed as failed."""
        stage = self._latest(step.name) if step.group is None else None
        if stage is not None and stage.status == StageStatus.STARTED and step.kind in ("wait", "sleep", "child"):
            # a child may have done things: its outcome is unknown, so it is compensated (aborted)
            outcome = Attempts(ok=False, timed_out=step.kind == "child", errors=[f"stopped while waiting: {reason}"])
            await self._fail(stage, outcome, reason)
            return
        await self._begin_compensation(reason)

    def _ctx(self, step: Step, seq: int, payload: Any, results: dict[str, Any], **extra: Any) -> StepContext:
        saga = self._saga
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

    def _latest(self, step_name: str) -> Stage | None:
        """The step's latest forward stage (a deferred step has one per attempt round)."""
        mine = [s for s in self._stages.values() if s.step == step_name and s.action != Action.COMPENSATE]
        return max(mine, key=lambda s: s.seq) if mine else None

    def _resume_seq(self, stage: Stage | None) -> int:
        if stage is not None and stage.status == StageStatus.STARTED:
            return stage.seq
        return self._saga.seq + 1

    def _failure_text(self, step: Step, outcome: Attempts) -> str:
        saga = self._saga
        last = outcome.errors[-1] if outcome.errors else ""
        reason = "timed out" if outcome.timed_out and last.startswith("timed out") else "failed"
        error = f"step {step.name} {reason} after {outcome.attempts} attempt(s): {last}"
        if outcome.timed_out and reason == "failed":
            error += " (an earlier attempt timed out: its outcome is unknown, so it is compensated)"
        if self.clock.now() >= saga.deadline:
            error = f"ttl of {saga.ttl:g}s expired during step {step.name}"
        elif self._abort_reason:
            error = f"{self._abort_reason} (during step {step.name})"
        return error

    async def _fail(self, stage: Stage, outcome: Attempts, error: str, **fields: Any) -> str:
        """Record the stage failed and the saga compensating, in one checkpoint."""
        await self._finish(stage, outcome, StageStatus.FAILED, {**fields, "state": SagaState.COMPENSATING, "error": error})
        return error

    # -- plain steps (with bucket locks and RetryLater) --------------------------------------
    async def _run_task(self, step: Step, index: int, payload: Any, results: dict[str, Any]) -> str | None:
        saga = self._saga
        while True:
            stage = self._latest(step.name)
            deferred = sum(1 for s in self._stages.values() if s.step == step.name and is_deferred(s))
            seq = self._resume_seq(stage)
            ctx = self._ctx(step, seq, payload, results, deferred=deferred)
            if step.when is not None and not step.when(ctx):
                return None
            if stage is not None and is_deferred(stage):
                # an earlier round asked to run again later: the timer is in the stage
                waited = await self._await(
                    f"timer:{step.name}", check=None, until=stage.meta.wake_at, linger=self._linger(step)
                )
                if waited.kind == "stop":
                    await self._begin_compensation(waited.value)
                    return waited.value
                stage = None
                ctx = self._ctx(step, self._resume_seq(None), payload, results, deferred=deferred)
            if stage is None or stage.status != StageStatus.STARTED:
                stage = self._new_stage(step, ctx.seq, Action(step.action), req=saga.payload)
                refused = await self._write_ahead_locked(step, stage, index, ctx)
                if refused is not None:
                    return refused

            outcome = await self._attempt(step.run, ctx, step.retry, step.timeout, bounded_by_ttl=True)
            if outcome.deferred is not None:
                failure = await self._defer(step, stage, outcome)
                if failure is not None:
                    return failure
                continue  # wait for the timer, then run the step again as a new stage
            if outcome.ok:
                results[step.name] = _jsonable(outcome.result)
                await self._finish(stage, outcome, StageStatus.SUCCEEDED, {"cursor": index + 1}, fold=True)
                return None
            return await self._fail(stage, outcome, self._failure_text(step, outcome))

    async def _defer(self, step: Step, stage: Stage, outcome: Attempts) -> str | None:
        """Record a RetryLater round (no effect, nothing to compensate); fail when it cannot fit the TTL."""
        later = outcome.deferred
        assert later is not None
        retry_at = self.clock.now() + timedelta(seconds=later.delay)
        if retry_at >= self._saga.deadline:
            outcome.errors.append(
                f"RetryLater: step {step.name} asked to run again in {later.delay:g}s, after the saga's TTL"
            )
            error = f"step {step.name} cannot be retried within the ttl of {self._saga.ttl:g}s ({later.reason or 'retry later'})"
            return await self._fail(stage, outcome, error)
        stage.meta.wake_at = retry_at
        outcome.result = {"outcome": "deferred", "error": later.reason or "retry later", "retry_at": retry_at.isoformat()}
        await self._finish(stage, outcome, StageStatus.FAILED, {})
        return None

    async def _write_ahead_locked(self, step: Step, stage: Stage, index: int, ctx: StepContext) -> str | None:
        """Write the stage ahead, taking the step's bucket locks in the same transaction.

        Returns the error when the step was refused (fail fast, lock wait timed
        out, or the saga must stop while waiting); the saga is then compensating.
        """
        claims = step.lock.claims(ctx, step.bucket) if step.lock is not None else []
        if not claims:
            await self._write_ahead([stage], index)
            return None
        assert step.lock is not None
        stage.meta.locks = [f"{bucket}:{key}" for bucket, key in claims]
        until = (
            self.clock.now() + timedelta(seconds=step.lock.timeout) if step.lock.timeout is not None else None
        )
        while True:
            stage.started_at = self.clock.now()
            try:
                await self._write_ahead([stage], index, locks=claims)
                return None
            except LockBusy as busy:
                if step.lock.on_conflict == "fail":
                    return await self._refuse(step, stage, index, f"step {step.name} refused: {busy}")
                if not await self.store.add_lock_waiter(busy.bucket, busy.key, self._saga.id):
                    continue  # released meanwhile
                bucket, key = busy.bucket, busy.key
                cycle = await self.store.lock_cycle(bucket, key, self._saga.id)
                if cycle is not None:  # the holder waits (through others) for a lock this saga holds
                    await self.store.remove_lock_waiter(bucket, key, self._saga.id)
                    chain = " → ".join(f"saga {holder}" for holder in cycle)
                    return await self._refuse(
                        step, stage, index,
                        f"step {step.name} refused: deadlock: {busy}, and {chain} waits for a lock this saga holds",
                    )  # fmt: skip

                async def free(_b: str = bucket, _k: str = key) -> bool | None:
                    return True if await self.store.lock_free(_b, _k, self._saga.id) else None

                # parked (raises Parked): still a waiter, woken by the holder's release
                waited = await self._await(f"lock:{bucket}:{key}", check=free, until=until, linger=self._linger(step))
                if waited.kind != "ready":
                    await self.store.remove_lock_waiter(bucket, key, self._saga.id)
                if waited.kind == "stop":
                    await self._begin_compensation(waited.value)
                    return waited.value
                if waited.kind == "timeout":
                    return await self._refuse(
                        step, stage, index, f"step {step.name} gave up after waiting {step.lock.timeout:g}s: {busy}"
                    )

    async def _refuse(self, step: Step, stage: Stage, index: int, error: str) -> str:
        """The step never started (no effect, no lock): record it failed and compensate the steps before it."""
        outcome = Attempts(ok=False, attempts=0, errors=[error])
        stage.meta.locks = []
        fields = {"seq": stage.seq, "cursor": index}
        await self._fail(stage, outcome, error, **fields)
        self._saga.seq = max(self._saga.seq, stage.seq)
        return error

    # -- parallel groups -------------------------------------------------------------------
    async def _run_group(
        self, members: list[Step], start: int, end: int, payload: Any, results: dict[str, Any]
    ) -> str | None:
        saga = self._saga
        group = members[0].group
        seq = saga.seq
        # members see the results of the steps before the group, never each other's (also after a restore)
        before = {k: v for k, v in results.items() if k not in {m.name for m in members}}
        todo: list[tuple[Step, Stage, StepContext]] = []
        new: list[Stage] = []
        written_at = self.clock.now()
        for step in members:
            stage = self._latest(step.name)
            if stage is not None and stage.status == StageStatus.SUCCEEDED:
                continue  # done before a crash; its result is in ``results``
            member_seq = stage.seq if stage is not None and stage.status == StageStatus.STARTED else seq + 1
            ctx = self._ctx(step, member_seq, payload, before)
            if step.when is not None and not step.when(ctx):
                continue
            if stage is None or stage.status != StageStatus.STARTED:
                seq = member_seq
                stage = self._new_stage(step, seq, Action(step.action), req=saga.payload, at=written_at)
                stage.meta.group = group
                new.append(stage)
            todo.append((step, stage, ctx))
        if new:
            await self._write_ahead(new, start)
        if not todo:
            return None

        failures: list[str] = []
        pending = len(todo)
        book = asyncio.Lock()

        async def member(step: Step, stage: Stage, ctx: StepContext) -> None:
            nonlocal pending
            outcome = await self._attempt(step.run, ctx, step.retry, step.timeout, bounded_by_ttl=True)
            if outcome.deferred is not None:
                outcome.ok = False
                outcome.errors.append("RetryLater is not supported inside a parallel group")
            async with book:
                pending -= 1
                if outcome.ok:
                    results[step.name] = _jsonable(outcome.result)
                    fields = {"cursor": end} if pending == 0 and not failures else {}
                    await self._finish(stage, outcome, StageStatus.SUCCEEDED, fields)
                    return
                error = self._failure_text(step, outcome)
                fields = {} if failures else {"state": SagaState.COMPENSATING, "error": f"{error} (parallel group {group})"}
                failures.append(error)
                await self._finish(stage, outcome, StageStatus.FAILED, fields)

        await asyncio.gather(*(member(*item) for item in todo))
        return failures[0] if failures else None

    # -- waiting for a signal ----------------------------------------------------------------
    async def _run_wait(self, step: Step, index: int, payload: Any, results: dict[str, Any]) -> str | None:
        saga = self._saga
        stage = self._latest(step.name)
        ctx = self._ctx(step, self._resume_seq(stage), payload, results)
        if step.when is not None and not step.when(ctx):
            return None
        if stage is None or stage.status != StageStatus.STARTED:
            stage = self._new_stage(step, ctx.seq, Action.WAIT, req={"signal": step.signal})
            timeout = seconds_of(step.wait_timeout, ctx)
            if timeout is not None:
                stage.meta.wake_at = stage.started_at + timedelta(seconds=timeout)
            await self._write_ahead([stage], index)
        consumed = {s.meta.signal_id for s in self._stages.values() if s.meta.signal_id and s.seq != stage.seq}
        assert step.signal is not None
        name = step.signal

        async def arrived() -> Any:
            for signal in await self.store.signals(saga.id, name):
                if signal.id not in consumed:
                    return signal
            return None

        waited = await self._await(f"signal:{name}", check=arrived, until=stage.meta.wake_at, linger=self._linger(step))
        if waited.kind == "stop":
            outcome = Attempts(ok=False, errors=[f"stopped while waiting for signal {name!r}: {waited.value}"])
            return await self._fail(stage, outcome, waited.value)
        if waited.kind == "timeout":
            waited_s = (stage.meta.wake_at - stage.started_at).total_seconds() if stage.meta.wake_at else 0.0
            if step.on_timeout == "continue":
                done = Attempts(ok=True, result={"signal": name, "timed_out": True}, attempts=0)
                results[step.name] = done.result
                await self._finish(stage, done, StageStatus.SUCCEEDED, {"cursor": index + 1})
                return None
            error = f"no signal {name!r} within {waited_s:g}s (step {step.name})"
            return await self._fail(stage, Attempts(ok=False, errors=[error]), error)
        signal = waited.value
        stage.meta.signal_id = signal.id
        ctx.signal = signal.payload
        outcome = await self._attempt(step.run, ctx, step.retry, step.timeout, bounded_by_ttl=True)
        if outcome.ok:
            results[step.name] = _jsonable(outcome.result)
            await self._finish(stage, outcome, StageStatus.SUCCEEDED, {"cursor": index + 1})
            return None
        if outcome.deferred is not None:
            outcome.errors.append("RetryLater is not supported in a signal handler")
        return await self._fail(stage, outcome, self._failure_text(step, outcome))

    # -- durable timers ----------------------------------------------------------------------
    async def _run_sleep(self, step: Step, index: int, payload: Any, results: dict[str, Any]) -> str | None:
        stage = self._latest(step.name)
        ctx = self._ctx(step, self._resume_seq(stage), payload, results)
        if step.when is not None and not step.when(ctx):
            return None
        if stage is None or stage.status != StageStatus.STARTED:
            stage = self._new_stage(step, ctx.seq, Action.WAIT, req=None)
            seconds = seconds_of(step.duration, ctx) or 0.0
            stage.meta.wake_at = stage.started_at + timedelta(seconds=seconds)
            stage.req = {"seconds": seconds, "until": stage.meta.wake_at.isoformat()}
            await self._write_ahead([stage], index)
        waited = await self._await(f"timer:{step.name}", check=None, until=stage.meta.wake_at, linger=self._linger(step))
        if waited.kind == "stop":
            return await self._fail(stage, Attempts(ok=False, errors=[f"stopped while sleeping: {waited.value}"]), waited.value)
        assert stage.meta.wake_at is not None
        done = Attempts(ok=True, result={"slept_until": stage.meta.wake_at.isoformat()})
        results[step.name] = done.result
        await self._finish(stage, done, StageStatus.SUCCEEDED, {"cursor": index + 1})
        return None

    # -- child sagas --------------------------------------------------------------------------
    async def _run_child(self, step: Step, index: int, payload: Any, results: dict[str, Any]) -> str | None:
        stage = self._latest(step.name)
        ctx = self._ctx(step, self._resume_seq(stage), payload, results)
        if step.when is not None and not step.when(ctx):
            return None
        if stage is None or stage.status != StageStatus.STARTED:
            assert step.child_payload is not None
            req = {"job": step.child_job, "payload": _jsonable(step.child_payload(ctx))}
            stage = self._new_stage(step, ctx.seq, Action.CREATE, req=req)
            await self._write_ahead([stage], index)
        try:
            child = await self._ensure_child(step, stage)
        except InvalidRequest as exc:  # unknown job, bad payload: nothing was created
            error = f"step {step.name} could not start child saga: {exc}"
            return await self._fail(stage, Attempts(ok=False, errors=[str(exc)]), error)
        stage.meta.child = child.id

        async def ended() -> Saga | None:
            current = await self.store.get(child.id)
            return current if current.state in TERMINAL_STATES else None

        waited = await self._await(f"child:{child.id}", check=ended, until=None, linger=self._linger(step))
        if waited.kind == "stop":
            # the child may have done things: outcome unknown, so the compensation aborts or undoes it
            outcome = Attempts(ok=False, timed_out=True, errors=[f"stopped while child saga {child.id} ran: {waited.value}"])
            return await self._fail(stage, outcome, waited.value)
        final: Saga = waited.value
        if final.state == SagaState.COMPLETED:
            child_results = {
                s.step: s.res
                for s in await self.store.stages(final.id)
                if s.action != Action.COMPENSATE and s.status == StageStatus.SUCCEEDED
            }
            done = Attempts(ok=True, result={"child": final.id, "job": final.job, "state": final.state.value,
                                             "results": child_results})  # fmt: skip
            results[step.name] = done.result
            await self._finish(stage, done, StageStatus.SUCCEEDED, {"cursor": index + 1})
            return None
        error = f"child saga {final.id} ({final.job}) {final.state.value}: {final.error or 'no reason recorded'}"
        return await self._fail(stage, Attempts(ok=False, errors=[error]), f"step {step.name}: {error}")

    async def _ensure_child(self, step: Step, stage: Stage) -> Saga:
        """Create the child saga once (idempotency key from this stage), or find it."""
        saga = self._saga
        key = child_key(saga.id, stage.seq)
        existing = await self.store.by_idempotency_key(key)
        if existing is not None:
            return existing
        remaining = max((saga.deadline - self.clock.now()).total_seconds(), 1.0)
        job = self.registry.get(step.child_job or "")
        ttl = min(step.child_ttl or job.ttl, remaining)
        request = StartRequest(
            job=step.child_job or "",
            payload=stage.req["payload"],
            ttl=ttl,
            idempotency_key=key,
            correlation_id=saga.correlation_id or saga.id,
            traceparent=saga.traceparent,
        )
        child, event = build_saga(request, self.registry, self.clock)
        child.parent, child.parent_seq = saga.id, stage.seq
        await self._flush()
        child, _ = await self.store.create(child, event)
        return child

    async def _undo_child(self, forward: Stage, reason: str) -> dict[str, Any]:
        """Compensation of a child step: abort the child, or compensate it if it completed; wait for the end."""
        child = await self.store.by_idempotency_key(child_key(self._saga.id, forward.seq))
        if child is None:
            return {"child": None, "undone": False, "reason": "the child saga was never created"}
        delay = POLL_FIRST
        while True:
            current = await self.store.get(child.id)
            if current.state == SagaState.ABORTED:
                return {"child": current.id, "state": current.state.value}
            if current.state == SagaState.PARKED:
                raise RuntimeError(
                    f"child saga {current.id} is parked ({current.parked_reason}); resolve it "
                    f"(essential resume/abort {current.id}), then resume this saga"
                )
            if current.state == SagaState.COMPLETED:
                await self.store.reopen_for_compensation(current.id, f"parent saga {self._saga.id}: {reason}")
            elif current.state != SagaState.COMPENSATING and not current.abort_requested:
                await self.store.request_abort(current.id, f"parent saga {self._saga.id}: {reason}")
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, POLL_CAP * 2)

    # -- waiting -----------------------------------------------------------------------------
    def _linger(self, step: Step) -> float:
        if self.linger is not None:
            return self.linger
        return step.linger if step.linger is not None else DEFAULT_LINGER

    async def _await(
        self,
        label: str,
        *,
        check: Callable[[], Awaitable[Any]] | None,
        until: datetime | None,
        linger: float,
    ) -> Waited:
        """Wait until ``check()`` returns something (ready), ``until`` passes (timeout) or the saga must stop.

        After ``linger`` seconds the saga is checkpointed ``waiting`` and
        :class:`Parked` is raised.  Timers read the runner's clock; the linger
        is real time (it is about holding an actor, not about business time).
        """
        await self._flush()  # never wait with a result that is not yet durable
        loop = asyncio.get_running_loop()
        park_at = loop.time() + max(linger, 0.0)
        refresh_at = loop.time() + REFRESH_EVERY
        delay = POLL_FIRST
        while True:
            if check is not None:
                value = await check()
                if value is not None:
                    return Waited("ready", value)
            reason = self._stop_reason()
            if reason:
                return Waited("stop", reason)
            now = self.clock.now()
            if until is not None and now >= until:
                return Waited("timeout")
            if loop.time() >= park_at:
                await self._park_waiting(label, until)
                # whatever came while we checkpointed is not missed: look once more
                value = await check() if check is not None else None
                reason = self._stop_reason()  # e.g. an abort the checkpoint reported
                if value is not None or reason:
                    await self._transition({"state": SagaState.RUNNING, "waiting_for": None, "wake_at": None}, [])
                    return Waited("ready", value) if value is not None else Waited("stop", reason)
                raise Parked(label)
            wake = min(until, self._saga.deadline) if until is not None else self._saga.deadline
            nap = park_at - loop.time()
            if check is not None:
                nap = min(nap, delay)
                delay = min(delay * 1.5, POLL_CAP)
            await self._nap((wake - now).total_seconds(), nap)
            if loop.time() >= refresh_at:
                await self._refresh()
                refresh_at = loop.time() + REFRESH_EVERY

    async def _nap(self, timer: float, nap: float) -> None:
        """Sleep until the timer (runner's clock), ``nap`` real seconds, or an abort, whichever comes first."""
        tasks = {asyncio.ensure_future(self.clock.sleep(max(timer, 0.0))), asyncio.ensure_future(self._abort_event.wait())}
        if nap != float("inf"):
            tasks.add(asyncio.ensure_future(asyncio.sleep(max(min(nap, REFRESH_EVERY), 0.0))))
        else:
            tasks.add(asyncio.ensure_future(asyncio.sleep(REFRESH_EVERY)))
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()

    async def _refresh(self) -> None:
        """While waiting in process: learn of a durable abort request, and stop if replaced."""
        current = await self.store.get(self.saga_id)
        if current.lease.epoch != self.epoch:
            raise LeaseLost(self.saga_id, self.epoch)
        if current.abort_requested:
            self._note(current.abort_requested)

    async def _park_waiting(self, label: str, until: datetime | None) -> None:
        deadline = self._saga.deadline
        wake_at = min(until, deadline) if until is not None else deadline
        log.info("saga %s waits for %s (wake at %s at the latest)", self.saga_id, label, wake_at.isoformat())
        await self._transition({"state": SagaState.WAITING, "waiting_for": label, "wake_at": wake_at}, [])

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
        reason = saga.error or self._abort_reason or "compensating"
        for forward in compensation_plan(stages):
            step = steps.get(forward.step)
            if step is None or (step.compensate is None and step.kind != "child"):
                continue
            stage = open_compensation(stages, forward.seq)
            if stage is None:
                seq = saga.seq + 1
                stage = self._new_stage(step, seq, Action.COMPENSATE, req=forward.res)
                stage.compensates = forward.seq
                fields = {"seq": seq, "updatedAt": stage.started_at}
                flag = await self._fenced(
                    lambda carried, _s=stage, _f=fields: self.store.write_ahead(
                        saga.id, self.epoch, _s, _f, carried=carried
                    )
                )
                self._note(flag)
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
                deadline=saga.deadline,
                attempted_at=self.clock.now(),
            )
            if step.kind == "child":

                async def undo(c: StepContext, _fwd: Stage = forward) -> Any:
                    return await self._undo_child(_fwd, reason)

            else:
                compensate = step.compensate
                forward_result = forward.res

                async def undo(c: StepContext, _fn: Any = compensate, _res: Any = forward_result) -> Any:
                    return await _fn(c, _res)

            outcome = await self._attempt(undo, ctx, step.compensation_retry, step.timeout, bounded_by_ttl=False)
            if outcome.ok:
                await self._finish(stage, outcome, StageStatus.SUCCEEDED, {}, fold=True)
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
            ctx.attempted_at = self.clock.now()
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
                # sticky: an attempt that timed out may have taken effect, whatever later ones say
                outcome.timed_out = True
                outcome.errors.append(str(StepTimeout(f"timed out after {limit:.3g}s")))
            except RetryLater as later:
                if outcome.timed_out:  # "no effect, run me later" cannot speak for the attempt that timed out
                    outcome.errors.append(f"RetryLater after an attempt timed out (its outcome is unknown): {later}")
                    break
                outcome.deferred = later
                break
            except StepFailed as exc:
                retryable = False
                outcome.errors.append(f"{type(exc).__name__}: {exc}")
            except LeaseLost:
                raise  # this runner was replaced: it must stop, not count an attempt
            except Exception as exc:  # a step's own failure (Essential's own errors too): retried by policy
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

    def _new_stage(self, step: Step, seq: int, action: Action, req: Any, *, at: datetime | None = None) -> Stage:
        """``at``: stages written ahead together (a parallel group) share one start time."""
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
            started_at=at or self.clock.now(),
        )

    def _note(self, abort_requested: Any) -> None:
        """A fenced write returned the saga's durable abort request: honour it like a notice."""
        if isinstance(abort_requested, str) and abort_requested:
            if self.saga is not None and self.saga.abort_requested is None:
                self.saga.abort_requested = abort_requested  # as stored: run() returns this copy
            self.request_abort(abort_requested)

    async def _write_ahead(self, stages: list[Stage], index: int, *, locks: list[tuple[str, str]] | None = None) -> None:
        saga = self._saga
        seq = max(max(s.seq for s in stages), saga.seq)
        fields = {"seq": seq, "cursor": index, "updatedAt": stages[0].started_at}

        async def write(carried: list[Carried]) -> str | None:
            if len(stages) > 1:
                return await self.store.write_ahead_many(
                    saga.id, self.epoch, stages, fields, carried=carried, unless_abort=True
                )
            return await self.store.write_ahead(
                saga.id, self.epoch, stages[0], fields, locks=locks or (), carried=carried, unless_abort=True
            )

        flag = await self._fenced(write)  # AbortPending: nothing was written, the step never starts
        saga.seq, saga.cursor = seq, index
        for stage in stages:
            self._stages[stage.seq] = stage
        self._note(flag)

    async def _finish(
        self, stage: Stage, outcome: Attempts, status: StageStatus, fields: dict[str, Any], *, fold: bool = False
    ) -> None:
        now = self.clock.now()
        stage.status = status
        stage.finished_at = now
        if outcome.ok or (outcome.deferred is not None and status == StageStatus.FAILED and outcome.result):
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
        if fold and self.fold_checkpoints:
            # written by the next checkpoint, which the runner makes before anything else
            self._carry.append((stage, fields, [event]))
            self._stages[stage.seq] = stage
            self._apply(fields)
            return
        flag = await self._fenced(
            lambda carried: self.store.record_result(self._saga.id, self.epoch, stage, fields, [event], carried=carried)
        )
        self._stages[stage.seq] = stage
        self._apply(fields)
        self._note(flag)
        if self.observer is not None:
            self.observer.stage_finished(self._saga, stage)

    async def _fenced(self, write: Callable[[list[Carried]], Awaitable[str | None]]) -> str | None:
        """Make one fenced write, carrying the folded results; they count as durable only once it commits."""
        async with self._io:
            carried = list(self._carry)
            flag = await write(carried)
            del self._carry[: len(carried)]
        if self.observer is not None:
            for stage, fields, _ in carried:
                if stage is not None:
                    self.observer.stage_finished(self._saga, stage)
                elif "state" in fields:
                    self.observer.state_changed(self._saga, SagaState(fields["state"]))
        return flag

    async def _flush(self) -> None:
        """Write folded results now: before waiting, reading our own stages or touching another saga."""
        if self._carry:
            fields = {"updatedAt": self.clock.now()}
            self._note(await self._fenced(
                lambda carried: self.store.transition(self._saga.id, self.epoch, fields, [], carried=carried)
            ))

    async def _transition(self, fields: dict[str, Any], events: list[Event], *, fold: bool = False) -> None:
        """``fold``: a state change with nothing to wait for (pending → running before the
        first write-ahead, committing before completed) rides in the next checkpoint."""
        fields = {**fields, "updatedAt": self.clock.now()}
        if fold and self.fold_checkpoints:
            self._carry.append((None, fields, events))
            self._apply(fields)
            return
        flag = await self._fenced(
            lambda carried: self.store.transition(self._saga.id, self.epoch, fields, events, carried=carried)
        )
        self._apply(fields)
        if fields.get("state") not in TERMINAL_STATES:
            self._note(flag)
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
