"""The runner of a recorded saga: the open saga lives in its actor until commit, abort or TTL.

It takes the saga's lease and keeps the saga open: ``add``, ``commit`` and ``abort``
arrive as calls (:meth:`RecordedRunner.handle`) and the state machine
(:func:`~essential.orchestration.recorded.check`, under one lock) decides what is
allowed.  An abort - asked for, or the TTL expiring (the supervisor's sweep notifies
the runner like for any saga) - compensates the recorded stages latest first and
ends ``aborted``; an undo that cannot be carried out parks the saga.  A restored
runner (actor killed, node lost) picks up where the last one stopped: each undo is
recorded in the transaction that does it.

It shares the lifecycle table, events and parking with the orchestrated runner;
storage and the undo itself are ports (:class:`~essential.orchestration.ports.RecordedSagaStore`,
:class:`~essential.orchestration.ports.RecordedUndo`), so no database or broker is named here.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from essential.orchestration.clock import Clock, SystemClock
from essential.orchestration.errors import (
    AbortPending,
    EssentialError,
    IllegalTransition,
    InvalidField,
    LeaseLost,
    envelope,
)
from essential.orchestration.lifecycle import check_transition, parking
from essential.orchestration.models import Event, Saga, Stage, StageMeta
from essential.orchestration.ports import RecordedSagaStore, RecordedUndo, RunnerObserver
from essential.orchestration.recorded import (
    RECORDED,
    AddStage,
    Inverse,
    action_of,
    check,
    check_database,
    expired_since,
    inverse_of,
    route_bucket,
    undo_plan,
)
from essential.orchestration.states import Action, EventType, SagaState, StageStatus

log = logging.getLogger("essential.recorded")

#: seconds between the open saga's re-reads (a durable abort it was not told about, a lost lease, the TTL)
REFRESH_EVERY = 2.0


@dataclass(frozen=True)
class RecordedPolicy:
    """The deployment's rules for recorded sagas (from its settings)."""

    database: str  # Essential's own database: never a bucket's
    buckets: dict[str, Any]  # bucket pattern -> database / remote topic
    db_prefix: str
    databases: str | Sequence[str]  # the databases an inverse may touch
    ttl_grace: float
    undo_pause: float = 0.0  # seconds between undos (fault tests widen the window)


class RecordedRunner:
    """One open recorded saga, in the process that holds its lease."""

    def __init__(
        self, saga_id: str, *, store: RecordedSagaStore, undo: RecordedUndo, policy: RecordedPolicy, owner: str,
        observer: RunnerObserver | None = None, clock: Clock | None = None,
    ) -> None:  # fmt: skip
        self.saga_id = saga_id
        self.store = store
        self.undoer = undo
        self.policy = policy
        self.owner = owner
        self.observer = observer
        self.clock = clock or SystemClock()
        self.saga: Saga | None = None
        self.epoch = 0
        self.ready = asyncio.Event()  # the lease is ours and the saga loaded
        self.finished = asyncio.Event()  # terminal, parked, or replaced
        self._lock = asyncio.Lock()  # one decision at a time: add, commit, abort
        self._wake = asyncio.Event()
        self._abort_reason: str | None = None
        self._lost = False
        self.inflight = 0

    # -- control ----------------------------------------------------------------------------
    def request_abort(self, reason: str = "aborted by request") -> None:
        """Also what the supervisor's abort notice (and TTL expiry) calls, through the hosting actor."""
        if self._abort_reason is None:
            self._abort_reason = reason
        self._wake.set()

    @property
    def _saga(self) -> Saga:
        assert self.saga is not None
        return self.saga

    # -- life -------------------------------------------------------------------------------
    async def run(self) -> None:
        saga = await self.store.acquire_lease(self.saga_id, self.owner)
        self.saga, self.epoch = saga, saga.lease.epoch
        try:
            if saga.state.ended:
                return
            if saga.abort_requested:
                self.request_abort(saga.abort_requested)
            self.ready.set()
            if saga.state in (SagaState.PENDING, SagaState.RUNNING):
                await self._stay_open()
            if self._saga.state == SagaState.COMMITTING:  # restored between committing and completed
                async with self._lock:
                    await self._complete()
            elif self._saga.state == SagaState.COMPENSATING:
                await self._compensate()
        finally:
            self.ready.set()
            self.finished.set()

    async def _stay_open(self) -> None:
        if self._saga.state == SagaState.PENDING:
            await self._transition({"state": SagaState.RUNNING}, [])
        while True:
            self._wake.clear()
            if self._lost:
                raise LeaseLost(self.saga_id, self.epoch)
            if self._abort_reason:
                async with self._lock:
                    if self._saga.state == SagaState.RUNNING:  # a commit that got the lock first wins
                        await self._transition({"state": SagaState.COMPENSATING, "error": self._abort_reason}, [])
                return
            if self._saga.state != SagaState.RUNNING:
                return
            try:
                await asyncio.wait_for(self._wake.wait(), REFRESH_EVERY)
            except asyncio.TimeoutError:
                await self._refresh()

    async def _refresh(self) -> None:
        epoch, abort_requested = await self.store.lease_of(self.saga_id)
        if epoch != self.epoch:
            raise LeaseLost(self.saga_id, self.epoch)
        if abort_requested:
            self.request_abort(abort_requested)
        elif expired_since(self._saga, self.clock.now(), self.policy.ttl_grace):
            # the supervisor's sweep normally expires it first; this covers a supervisor that is away
            self.request_abort(f"ttl of {self._saga.ttl:g}s expired")

    # -- operations (actor calls) ---------------------------------------------------------------
    async def handle(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """One operation; the reply is ``{"stage"|"saga": ...}``, an error envelope, or ``{"moved": True}``
        when this runner no longer holds the saga (the caller finds where it went)."""
        self.inflight += 1
        try:
            await self.ready.wait()
            if self._lost:
                return {"moved": True}
            if op == "add":
                return {"stage": await self.add(args["stage"], args.get("key"), check_key=args.get("check_key", True))}
            if op == "commit":
                return {"saga": await self.commit()}
            if op == "abort":
                return {"saga": await self.abort(args.get("reason") or "aborted by request", float(args.get("wait") or 0))}
            return envelope(EssentialError(f"unknown operation {op!r}"))
        except LeaseLost:
            self._lost = True
            self._wake.set()
            return {"moved": True}
        except EssentialError as exc:
            return envelope(exc)
        finally:
            self.inflight -= 1

    async def add(self, body: dict[str, Any], key: str | None, *, check_key: bool = True) -> dict[str, Any]:
        """Record a stage; ``check_key=False`` when ``key`` is brand new (skips looking for it)."""
        request = AddStage.parse(body)
        action, op = action_of(request.action)
        inverse = inverse_of(action, op, request.req, request.res, request.meta)
        policy, safe = self.policy, self.store.json_safe
        route = route_bucket(request.bucket, policy.buckets, policy.db_prefix)
        check_database(route, own=policy.database, allowed=policy.databases)
        async with self._lock:
            saga = self._saga
            now = self.clock.now()
            check("add", saga, now)
            seq = saga.seq + 1
            meta = {**safe(request.meta)}
            meta.setdefault("idempotency_key", f"{saga.id}:{seq}")
            meta.setdefault("correlation_id", saga.correlation_id)
            meta.setdefault("traceparent", saga.traceparent)
            try:
                known = StageMeta.model_validate(meta)
            except ValidationError as exc:  # a meta field Essential reads, of the wrong type
                err = exc.errors()[0]
                raise InvalidField("meta." + ".".join(str(p) for p in err["loc"]), err["msg"]) from None
            stage = Stage(
                saga=saga.id, seq=seq, step=request.action, bucket=request.bucket, action=action,
                status=StageStatus.SUCCEEDED, req=safe(request.req), res=safe(request.res),
                meta=known, started_at=now, finished_at=now,
            )  # fmt: skip
            event = self._event(
                EventType.STAGE_COMPLETED, None, seq=seq, step=stage.step, bucket=stage.bucket,
                action=action.value, status=StageStatus.SUCCEEDED.value,
            )  # fmt: skip
            try:
                stored, created = await self.store.add_stage(
                    saga.id, self.epoch, stage, event, op=op, inverse=inverse, meta=meta, key=key, check_key=check_key
                )
            except AbortPending as pending:
                self.request_abort(pending.reason)
                raise IllegalTransition(f"saga {saga.id} is being aborted ({pending.reason}); stages can no longer be added") from None
            if created:
                saga.seq, saga.updatedAt = seq, now
                self._observe_stage(stage)
            return stored

    async def commit(self) -> dict[str, Any]:
        async with self._lock:
            saga = self._saga
            check("commit", saga, self.clock.now())
            try:
                await self._transition({"state": SagaState.COMMITTING}, [], unless_abort=True)
            except AbortPending as pending:
                self.request_abort(pending.reason)
                raise IllegalTransition(f"saga {saga.id} is being aborted ({pending.reason}); it can no longer be committed") from None
            await self._complete()
        self._wake.set()
        return self._json()

    async def abort(self, reason: str, wait: float) -> dict[str, Any]:
        async with self._lock:
            if check("abort", self._saga, self.clock.now()) == "go" and not self._abort_reason:
                # durable first: a runner that dies now is restored compensating, not open
                await self.store.request_abort(self.saga_id, reason)
                self.request_abort(reason)
        if wait > 0:
            try:
                await asyncio.wait_for(self.finished.wait(), wait)
            except asyncio.TimeoutError:
                pass
        return self._json()

    # -- commit and compensation ----------------------------------------------------------------
    async def _complete(self) -> None:
        await self._transition(
            {"state": SagaState.COMPLETED, "committed_at": self.clock.now()},
            [self._event(EventType.COMPLETED, SagaState.COMPLETED)],
        )

    async def _compensate(self) -> None:
        saga, policy = self._saga, self.policy
        reason = saga.error or self._abort_reason or "aborted"
        for forward in undo_plan(await self.store.stage_docs(self.saga_id)):
            if policy.undo_pause:
                await asyncio.sleep(policy.undo_pause)
            route = route_bucket(forward["bucket"], policy.buckets, policy.db_prefix)
            inverse = Inverse.from_doc(forward.get("undo"))
            fseq = int(forward["seq"])
            seq = saga.seq + 1
            now = self.clock.now()
            stage = Stage(
                saga=saga.id, seq=seq, step=str(forward.get("step") or forward.get("op")), bucket=forward["bucket"],
                action=Action.COMPENSATE, status=StageStatus.SUCCEEDED,
                req=self.store.json_safe(inverse.to_doc()), res=None, compensates=fseq,
                meta=StageMeta(idempotency_key=f"{saga.id}:{fseq}", correlation_id=saga.correlation_id,
                               traceparent=saga.traceparent),
                started_at=now, finished_at=now,
            )  # fmt: skip
            event = self._event(
                EventType.STAGE_COMPLETED, None, seq=seq, step=stage.step, bucket=stage.bucket,
                action=Action.COMPENSATE.value, status=StageStatus.SUCCEEDED.value, compensates=fseq,
            )  # fmt: skip
            try:
                check_database(route, own=policy.database, allowed=policy.databases)
                refusal = await self.undoer.refusal(route)
            except InvalidField as exc:
                refusal = exc.fields[0][1]
            if refusal is not None:  # recorded before this rule, or the settings changed: a person decides
                await self._park(f"compensation of stage {fseq} ({forward['bucket']}) refused: {refusal}")
                return
            undone = await self.undoer.undo(saga, self.epoch, forward, stage, route, inverse, event)
            if not undone.ok:
                await self._park(f"compensation of stage {fseq} ({forward['bucket']}){undone.reason}")
                return
            saga.seq = seq
            stage.res = undone.result
            self._observe_stage(stage)
        await self._transition(
            {"state": SagaState.ABORTED, "aborted_at": self.clock.now()},
            [self._event(EventType.ABORTED, SagaState.ABORTED, reason=reason)],
        )

    async def _park(self, reason: str) -> None:
        log.error("saga %s parked: %s", self.saga_id, reason)
        fields, event = parking(self._saga, reason, self.clock.now())
        event.data["kind"] = RECORDED
        await self._transition(fields, [event])

    # -- helpers --------------------------------------------------------------------------------
    async def _transition(self, fields: dict[str, Any], events: list[Event], *, unless_abort: bool = False) -> None:
        if "state" in fields:
            check_transition(self._saga.state, fields["state"])
        fields = {**fields, "updatedAt": self.clock.now()}
        await self.store.transition(self.saga_id, self.epoch, fields, events, unless_abort=unless_abort)
        for name, value in fields.items():
            setattr(self._saga, name, value)
        if "state" in fields and self.observer is not None:
            try:
                self.observer.state_changed(self._saga, SagaState(fields["state"]))
            except Exception:  # noqa: BLE001 - metrics never fail a saga
                log.debug("observer failed", exc_info=True)

    def _observe_stage(self, stage: Stage) -> None:
        if self.observer is not None:
            try:
                self.observer.stage_finished(self._saga, stage)
            except Exception:  # noqa: BLE001
                log.debug("observer failed", exc_info=True)

    def _event(self, type_: EventType, state: SagaState | None, **data: Any) -> Event:
        return Event.of(self._saga, type_, at=self.clock.now(), state=state, kind=RECORDED, **data)

    def _json(self) -> dict[str, Any]:
        out = self._saga.model_dump(mode="json")
        out["kind"] = RECORDED
        return out
