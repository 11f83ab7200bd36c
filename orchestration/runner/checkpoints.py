"""The run's durable writes: write-ahead stages, results, state changes, and folding.

Every write is fenced on the lease epoch the run holds (the store raises
:class:`~essential.orchestration.errors.LeaseLost` when another run took over) and
returns the saga's durable abort request, which :class:`Control` honours.

Folding: a succeeded step's result (and a state change with nothing to wait
for) rides in the transaction of the run's next write, which is made before
anything else happens, so a step costs one transaction.  The durability
contract is unchanged: the result is durable before the next step runs, and a
crash in between re-runs the step with the same idempotency key.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from essential.orchestration.clock import Clock
from essential.orchestration.dsl import Step
from essential.orchestration.lifecycle import check_transition, parking
from essential.orchestration.models import Event, Saga, Stage, StageMeta
from essential.orchestration.ports import Carried, RunnerObserver, SagaStore
from essential.orchestration.runner.attempts import Attempts, jsonable
from essential.orchestration.runner.control import Control
from essential.orchestration.states import TERMINAL_STATES, Action, EventType, SagaState, StageStatus

log = logging.getLogger("essential.runner")


class Checkpoints:
    def __init__(
        self, store: SagaStore, clock: Clock, control: Control, observer: RunnerObserver | None, *, fold: bool
    ) -> None:
        self.store = store
        self.clock = clock
        self.control = control
        self.observer = observer
        self.fold = fold
        self.saga: Saga | None = None
        self.epoch = 0
        self.stages: dict[int, Stage] = {}
        self._io = asyncio.Lock()  # one checkpoint at a time (parallel members share the saga's session)
        self._carry: list[Carried] = []  # folded checkpoints not yet written

    @property
    def current(self) -> Saga:
        assert self.saga is not None, "run() acquires the saga first"
        return self.saga

    # -- reading the run's own stages -------------------------------------------------------
    def latest(self, step_name: str) -> Stage | None:
        """The step's latest forward stage (a deferred step has one per attempt round)."""
        mine = [s for s in self.stages.values() if s.step == step_name and s.action != Action.COMPENSATE]
        return max(mine, key=lambda s: s.seq) if mine else None

    def resume_seq(self, stage: Stage | None) -> int:
        """The seq a step runs as: its open stage's (a crash left it started), else the next one."""
        if stage is not None and stage.status == StageStatus.STARTED:
            return stage.seq
        return self.current.seq + 1

    def new_stage(self, step: Step, seq: int, action: Action, req: Any, *, at: datetime | None = None) -> Stage:
        """``at``: stages written ahead together (a parallel group) share one start time."""
        saga = self.current
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

    def event(self, type_: EventType, state: SagaState | None, **data: Any) -> Event:
        return Event.of(self.current, type_, at=self.clock.now(), state=state, **data)

    # -- writes ---------------------------------------------------------------------------------
    async def write_ahead(self, stages: list[Stage], index: int, *, locks: list[tuple[str, str]] | None = None) -> None:
        """Write ``stages`` started, with the saga's cursor at ``index``; refused (AbortPending) after an abort."""
        saga = self.current
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

        flag = await self.fenced(write)  # AbortPending: nothing was written, the step never starts
        saga.seq, saga.cursor = seq, index
        for stage in stages:
            self.stages[stage.seq] = stage
        self.control.note(flag, self.saga)

    async def write_compensation(self, stage: Stage) -> None:
        """Write a compensation stage started (compensations run whatever an abort says)."""
        saga = self.current
        fields = {"seq": stage.seq, "updatedAt": stage.started_at}
        flag = await self.fenced(
            lambda carried: self.store.write_ahead(saga.id, self.epoch, stage, fields, carried=carried)
        )
        self.control.note(flag, self.saga)
        saga.seq = stage.seq

    def finished(self, stage: Stage, outcome: Attempts, status: StageStatus, fields: dict[str, Any]) -> Carried:
        """The checkpoint recording the stage's outcome (and ``fields`` of the saga) with its
        ``saga.stage.completed`` event; ``stage`` is updated to match."""
        now = self.clock.now()
        stage.status = status
        stage.finished_at = now
        if outcome.ok or (outcome.deferred is not None and status == StageStatus.FAILED and outcome.result):
            stage.res = jsonable(outcome.result)
        else:
            stage.res = {
                "error": outcome.errors[-1] if outcome.errors else "failed",
                "outcome": "unknown" if outcome.timed_out else "failed",
            }
        stage.meta.retry_count = max(outcome.attempts - 1, 0)
        stage.meta.errors = outcome.errors
        stage.meta.duration_ms = round(outcome.duration_ms, 3)
        fields = {**fields, "updatedAt": now}
        if "state" in fields:
            check_transition(self.current.state, fields["state"])
        if status == StageStatus.SUCCEEDED:
            fields["restore_attempts"] = 0  # progress: earlier restores were not in vain
        event = self.event(
            EventType.STAGE_COMPLETED,
            None,
            seq=stage.seq,
            step=stage.step,
            bucket=stage.bucket,
            action=stage.action.value,
            status=status.value,
            compensates=stage.compensates,
        )
        return stage, fields, [event]

    async def finish(
        self, stage: Stage, outcome: Attempts, status: StageStatus, fields: dict[str, Any], *, fold: bool = False
    ) -> None:
        """Record the stage's outcome (and ``fields`` of the saga) with its ``saga.stage.completed`` event."""
        _, fields, events = self.finished(stage, outcome, status, fields)
        if fold and self.fold:
            # written by the next checkpoint, which the runner makes before anything else
            self._carry.append((stage, fields, events))
            self.stages[stage.seq] = stage
            self._apply(fields)
            return
        flag = await self.fenced(
            lambda carried: self.store.record_result(self.current.id, self.epoch, stage, fields, events, carried=carried)
        )
        self._recorded(stage, fields, flag)

    async def commit_step(
        self, stage: Stage, work: Callable[[Any], Awaitable[Any]], fields: dict[str, Any], attempt: int
    ) -> Any:
        """A transactional step's attempt: ``work(session)`` and the stage recorded succeeded with its
        result commit in one transaction, or neither does; returns what ``work`` returned.  A forward
        step's commit is refused by a durable abort (AbortPending: the step never happened)."""
        unless_abort = stage.action != Action.COMPENSATE
        started = time.perf_counter()
        outcome = Attempts(ok=True, attempts=attempt)
        recorded: list[Carried] = []

        async def in_transaction(session: Any) -> Carried:
            outcome.result = await work(session)
            outcome.duration_ms = (time.perf_counter() - started) * 1000
            recorded[:] = [self.finished(stage, outcome, StageStatus.SUCCEEDED, fields)]
            return recorded[0]

        flag = await self.fenced(
            lambda carried: self.store.commit_with(
                self.current.id, self.epoch, in_transaction, carried=carried, unless_abort=unless_abort
            )
        )
        self._recorded(stage, recorded[0][1], flag)
        return outcome.result

    def _recorded(self, stage: Stage, fields: dict[str, Any], flag: str | None) -> None:
        self.stages[stage.seq] = stage
        self._apply(fields)
        self.control.note(flag, self.saga)
        if self.observer is not None:
            self.observer.stage_finished(self.current, stage)

    async def transition(self, fields: dict[str, Any], events: list[Event], *, fold: bool = False) -> None:
        """Change the saga (its state through the lifecycle table); ``fold``: a change with nothing
        to wait for (pending → running before the first write-ahead, committing before completed)
        rides in the next checkpoint."""
        if "state" in fields:
            check_transition(self.current.state, fields["state"])
        fields = {**fields, "updatedAt": self.clock.now()}
        if fold and self.fold:
            self._carry.append((None, fields, events))
            self._apply(fields)
            return
        flag = await self.fenced(
            lambda carried: self.store.transition(self.current.id, self.epoch, fields, events, carried=carried)
        )
        self._apply(fields)
        if fields.get("state") not in TERMINAL_STATES:
            self.control.note(flag, self.saga)
        if self.observer is not None and "state" in fields:
            self.observer.state_changed(self.current, SagaState(fields["state"]))

    async def park(self, reason: str) -> None:
        """The saga needs a person: nothing touches it until an operator resumes or aborts it."""
        log.error("saga %s parked: %s", self.current.id, reason)
        fields, event = parking(self.current, reason, self.clock.now())
        await self.transition(fields, [event])

    async def fenced(self, write: Callable[[list[Carried]], Awaitable[str | None]]) -> str | None:
        """Make one fenced write, carrying the folded checkpoints; they count as durable only once it commits."""
        async with self._io:
            carried = list(self._carry)
            flag = await write(carried)
            del self._carry[: len(carried)]
        if self.observer is not None:
            for stage, fields, _ in carried:
                if stage is not None:
                    self.observer.stage_finished(self.current, stage)
                elif "state" in fields:
                    self.observer.state_changed(self.current, SagaState(fields["state"]))
        return flag

    async def flush(self) -> None:
        """Write folded checkpoints now: before waiting, reading the run's own stages or touching another saga."""
        if self._carry:
            fields = {"updatedAt": self.clock.now()}
            self.control.note(
                await self.fenced(
                    lambda carried: self.store.transition(self.current.id, self.epoch, fields, [], carried=carried)
                ),
                self.saga,
            )

    def _apply(self, fields: dict[str, Any]) -> None:
        saga = self.current
        for key, value in fields.items():
            setattr(saga, key, value)
