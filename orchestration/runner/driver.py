"""The saga runner: drives one saga from its last checkpoint to completed, aborted, parked or waiting.

Per step (see docs/architecture.md, "The checkpoint protocol"):

1. write-ahead: a ``started`` stage with ``req`` and the saga cursor, one transaction
   (a parallel group writes all its members' stages in one; a step with a
   bucket lock takes the lock in it);
2. run the step (retries, timeout, TTL) with the key ``<saga id>:<seq>``;
3. result: the stage's ``res``/status, the saga cursor and a ``saga.stage.completed``
   event, one transaction (folded into the next step's write-ahead).

Every write carries the lease epoch; :class:`LeaseLost` stops the runner at once.
The runner holds no state that is not also in the store, so a new runner on
another process resumes exactly where a dead one left off.

The parts: :mod:`.checkpoints` (writes and folding), :mod:`.attempts` (retries),
:mod:`.waiting` (waits and parking), one handler per step kind (:mod:`.task`,
:mod:`.group`, :mod:`.signal`, :mod:`.sleep`, :mod:`.child`) and :mod:`.compensating`.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from essential.orchestration.clock import Clock, SystemClock
from essential.orchestration.dsl import ChildStep, Job, SleepStep, Step, WaitStep
from essential.orchestration.errors import AbortPending, JobVersionMissing
from essential.orchestration.models import Saga
from essential.orchestration.ports import RunnerObserver, SagaStore
from essential.orchestration.registry import JobRegistry
from essential.orchestration.runner.attempts import Attempts
from essential.orchestration.runner.checkpoints import Checkpoints
from essential.orchestration.runner.child import run_child
from essential.orchestration.runner.compensating import compensate
from essential.orchestration.runner.control import Control
from essential.orchestration.runner.group import run_group
from essential.orchestration.runner.run import Run
from essential.orchestration.runner.signal import run_wait
from essential.orchestration.runner.sleep import run_sleep
from essential.orchestration.runner.task import run_task
from essential.orchestration.runner.waiting import Parked, Waits
from essential.orchestration.states import Action, EventType, SagaState, StageStatus

Handler = Callable[[Run, Any, int, Any, dict[str, Any]], Awaitable[str | None]]
#: one handler per kind of step (a parallel group's members are plain steps, run by :func:`run_group`)
HANDLERS: dict[type[Step], Handler] = {Step: run_task, WaitStep: run_wait, SleepStep: run_sleep, ChildStep: run_child}


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
        saga is checkpointed ``waiting`` (default: each step's own, else ``DEFAULT_LINGER``).
        ``float("inf")`` never parks (in-process tests with a :class:`ManualClock`).

        ``fold_checkpoints``: a succeeded step's result checkpoint rides in the transaction
        of the runner's next write (see :mod:`.checkpoints`)."""
        self.saga_id = saga_id
        self.owner = owner
        clock = clock or SystemClock()
        self.control = Control(clock)
        self.cp = Checkpoints(store, clock, self.control, observer, fold=fold_checkpoints)
        self.run_state = Run(store, registry, clock, self.control, self.cp, Waits(self.cp, self.control), linger)

    @property
    def saga(self) -> Saga | None:
        return self.cp.saga

    @property
    def epoch(self) -> int:
        return self.cp.epoch

    def request_abort(self, reason: str = "aborted by request") -> None:
        """Honoured between steps, during retry back-off and while waiting; the step in flight finishes."""
        self.control.request_abort(reason)

    async def run(self) -> Saga:
        run, cp = self.run_state, self.cp
        store = run.store
        saga = await store.acquire_lease(self.saga_id, self.owner)
        cp.saga, cp.epoch = saga, saga.lease.epoch
        if saga.state.ended:
            return saga
        if saga.abort_requested and self.control.abort_reason is None:
            self.control.abort_reason = saga.abort_requested
        try:
            job = run.registry.get(saga.job, saga.version)
        except JobVersionMissing as exc:
            await cp.park(str(exc))
            return await store.get(self.saga_id)
        # a pending saga has no stages: the runner writes its first one in the same
        # transaction that moves it to running (one read saved per saga)
        stages = [] if saga.state == SagaState.PENDING else await store.stages(self.saga_id)
        cp.stages = {s.seq: s for s in stages}

        try:
            if saga.state == SagaState.PENDING:
                await cp.transition({"state": SagaState.RUNNING}, [], fold=True)
            elif saga.state == SagaState.WAITING:
                await cp.transition({"state": SagaState.RUNNING, "waiting_for": None, "wake_at": None}, [])
            if saga.state == SagaState.RUNNING:
                failure = await self._forward(job)
                if failure is None:
                    await cp.transition({"state": SagaState.COMMITTING}, [], fold=True)
        except Parked:
            return await store.get(self.saga_id)
        if saga.state == SagaState.COMMITTING:
            await cp.transition(
                {"state": SagaState.COMPLETED, "committed_at": run.clock.now()},
                [cp.event(EventType.COMPLETED, SagaState.COMPLETED)],
            )
        elif saga.state == SagaState.COMPENSATING:
            await cp.flush()  # the stages read back must include the folded results
            await compensate(run, job, await store.stages(self.saga_id))
        await cp.flush()
        # every write since the lease was fenced on what this runner knew, so its copy is the
        # stored saga (no read back); a copy, so the caller's value cannot change under it
        return cp.current.model_copy(deep=True)

    async def _forward(self, job: Job[Any]) -> str | None:
        """Run the remaining steps; returns the reason when compensation was decided."""
        run, cp = self.run_state, self.cp
        saga = cp.current
        payload = job.validate_payload(saga.payload)
        results = {
            s.step: s.res
            for s in sorted(cp.stages.values(), key=lambda s: s.seq)
            if s.action != Action.COMPENSATE and s.status == StageStatus.SUCCEEDED
        }
        index = saga.cursor
        while index < len(job.steps):
            step = job.steps[index]
            reason = self.control.stop_reason(saga)
            if reason:
                await self._stop(step, reason)
                return reason
            try:
                if step.group is not None:
                    end = job.group_end(index)
                    failure = await run_group(run, job.steps[index:end], index, end, payload, results)
                    index = end
                else:
                    failure = await HANDLERS[type(step)](run, step, index, payload, results)
                    index += 1
            except AbortPending as pending:  # a durable abort refused the step's write-ahead
                self.control.note(pending.reason, cp.saga)
                await self._stop(step, pending.reason)
                return pending.reason
            if failure is not None:
                return failure
        return None

    async def _stop(self, step: Step, reason: str) -> None:
        """Abort or TTL before ``step``: a wait left open (the saga was waiting) is closed as failed."""
        run = self.run_state
        stage = self.cp.latest(step.name) if step.group is None else None
        if stage is not None and stage.status == StageStatus.STARTED and step.waits:
            # a child may have done things: its outcome is unknown, so it is compensated (aborted)
            outcome = Attempts(ok=False, timed_out=step.kind == "child", errors=[f"stopped while waiting: {reason}"])
            await run.fail(stage, outcome, reason)
            return
        await run.begin_compensation(reason)
