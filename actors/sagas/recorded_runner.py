"""The runner of a recorded saga: the open saga lives in its actor until commit, abort or TTL.

Hosted by a ``SagaActor`` (``saga:<id>``) or a shared host through
:mod:`essential.actors.sagas.recorded_hosting`.  It takes the saga's lease and keeps
the saga open: ``add``, ``commit`` and ``abort`` arrive as actor calls and its state
machine (:func:`essential.orchestration.recorded.check`, under one lock) decides what
is allowed.  An abort - asked for, or the TTL expiring (the supervisor's sweep
notifies the actor like for any saga) - compensates the recorded stages latest
first and ends ``aborted``.  A restored runner (actor killed, node lost) picks up
where the last one stopped: each undo is recorded in the transaction that does it.

A remote bucket's compensation is a participant command (``kind: compensate``)
queued in ``command_outbox``; the gateway relays it to the owning service's
topic and stores the reply in the ``inbox``, where the runner waits for it.
"""
from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta, timezone
from typing import Any

from bson import json_util
from bson.errors import BSONError
from bson.json_util import CANONICAL_JSON_OPTIONS
from pydantic import ValidationError

from essential.actors.kafka.participant_protocol import ParticipantCommand
from essential.actors.sagas.runtime import Runtime
from essential.orchestration import (
    EssentialError,
    Event,
    EventType,
    IllegalTransition,
    LeaseLost,
    Saga,
    SagaState,
    Stage,
    StageMeta,
    SystemClock,
)
from essential.orchestration.errors import AbortPending, CorruptDocument, InvalidField, envelope, field_problems
from essential.orchestration.lifecycle import check_transition, parking
from essential.orchestration.recorded import (
    RECORDED,
    AddStage,
    BucketRoute,
    Inverse,
    action_of,
    check,
    check_database,
    expired_since,
    holds_a_deployment,
    inverse_of,
    route_bucket,
    undo_plan,
)
from essential.orchestration.states import Action, StageStatus
from essential.persistence import command_outbox
from essential.persistence.documents import stage_to_doc
from essential.persistence.inbox import find_reply
from essential.persistence.recorded_store import (
    RecordedStore,
    json_safe,
    stage_json,
)

log = logging.getLogger("essential.recorded")

#: seconds between the open saga's re-reads (a durable abort it was not told about, a lost lease, the TTL)
REFRESH_EVERY = 2.0
#: attempts at a local undo that fails (a MongoDB error that is not transient) before the saga parks
UNDO_ATTEMPTS = 3
#: seconds an unused entry of the supervisor's caches (actor handle, job of an open saga) is kept
CACHE_IDLE = 600.0
#: seconds the supervisor trusts what it learnt about a database (does it hold an Essential deployment?)
DATABASE_CHECK_IDLE = 60.0
#: what a value MongoDB cannot encode raises (an integer past 64 bits, a NUL in a key, a lone surrogate)
UNSTORABLE = (BSONError, OverflowError, UnicodeEncodeError)


def _now() -> datetime:
    return SystemClock().now()


def unstorable(exc: Exception, where: str = "<request>") -> InvalidField:
    """A value the database refused to encode, as the caller's mistake (400), not a server error."""
    return InvalidField(where, f"MongoDB cannot store it as given: {type(exc).__name__}: {str(exc)[:200]}")


def corrupt(what: str, exc: Exception) -> CorruptDocument:
    if isinstance(exc, ValidationError):
        reason = "; ".join(f"{field}: {why}" for field, why in field_problems(exc, "", limit=3))
    else:
        reason = f"{type(exc).__name__}: {exc}"
    return CorruptDocument(what, reason)


class RecordedRunner:
    """One open recorded saga, in the process that holds its lease."""

    def __init__(self, saga_id: str, runtime: Runtime, owner: str, observer: Any = None) -> None:
        self.saga_id = saga_id
        self.runtime = runtime
        self.settings = runtime.settings
        self.rstore = RecordedStore(runtime.store)
        self.owner = owner
        self.observer = observer
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
        saga = await self.runtime.store.acquire_lease(self.saga_id, self.owner)
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
        doc = await self.rstore.doc(self.saga_id)
        if doc.get("lease", {}).get("epoch") != self.epoch:
            raise LeaseLost(self.saga_id, self.epoch)
        if doc.get("abort_requested"):
            self.request_abort(doc["abort_requested"])
        elif expired_since(self._saga, _now(), self.settings.ttl_grace):
            # the supervisor's sweep normally expires it first; this covers a supervisor that is away
            self.request_abort(f"ttl of {self._saga.ttl:g}s expired")

    # -- operations (actor calls) ---------------------------------------------------------------
    async def handle(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
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
        except UNSTORABLE as exc:  # what validation let through still never reaches the caller as a crash
            return envelope(unstorable(exc, "<stage>"))
        finally:
            self.inflight -= 1

    async def add(self, body: dict[str, Any], key: str | None, *, check_key: bool = True) -> dict[str, Any]:
        """Record a stage; ``check_key=False`` when ``key`` is brand new (skips looking for it)."""
        request = AddStage.parse(body)
        action, op = action_of(request.action)
        inverse = inverse_of(action, op, request.req, request.res, request.meta)
        conf = self.settings
        route = route_bucket(request.bucket, conf.recorded_buckets, conf.recorded_db_prefix)
        check_database(route, own=conf.database, allowed=conf.recorded_databases)
        async with self._lock:
            saga = self._saga
            now = _now()
            check("add", saga, now)
            seq = saga.seq + 1
            meta = {**json_safe(request.meta)}
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
                status=StageStatus.SUCCEEDED, req=json_safe(request.req), res=json_safe(request.res),
                meta=known, started_at=now, finished_at=now,
            )  # fmt: skip
            doc = stage_to_doc(stage)
            doc["meta"] = {**meta, **doc["meta"]}
            doc.update(kind=RECORDED, op=op, undo=inverse.to_doc(), add_key=key)
            event = self._event(
                EventType.STAGE_COMPLETED, None, seq=seq, step=stage.step, bucket=stage.bucket,
                action=action.value, status=StageStatus.SUCCEEDED.value,
            )  # fmt: skip
            try:
                stored, created = await self.rstore.add_stage(saga.id, self.epoch, doc, event, key=key, check_key=check_key)
            except AbortPending as pending:
                self.request_abort(pending.reason)
                raise IllegalTransition(f"saga {saga.id} is being aborted ({pending.reason}); stages can no longer be added") from None
            if created:
                saga.seq, saga.updatedAt = seq, now
                self._observe_stage(stage)
            return stage_json(stored)

    async def commit(self) -> dict[str, Any]:
        async with self._lock:
            saga = self._saga
            check("commit", saga, _now())
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
            if check("abort", self._saga, _now()) == "go" and not self._abort_reason:
                # durable first: a runner that dies now is restored compensating, not open
                await self.runtime.store.request_abort(self.saga_id, reason)
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
            {"state": SagaState.COMPLETED, "committed_at": _now()}, [self._event(EventType.COMPLETED, SagaState.COMPLETED)]
        )

    async def _compensate(self) -> None:
        saga = self._saga
        reason = saga.error or self._abort_reason or "aborted"
        conf = self.settings
        for forward in undo_plan(await self.rstore.stage_docs(self.saga_id)):
            if conf.recorded_undo_pause:
                await asyncio.sleep(conf.recorded_undo_pause)
            route = route_bucket(forward["bucket"], conf.recorded_buckets, conf.recorded_db_prefix)
            inverse = Inverse.from_doc(forward.get("undo"))
            fseq = int(forward["seq"])
            seq = saga.seq + 1
            now = _now()
            stage = Stage(
                saga=saga.id, seq=seq, step=str(forward.get("step") or forward.get("op")), bucket=forward["bucket"],
                action=Action.COMPENSATE, status=StageStatus.SUCCEEDED,
                req=json_safe(inverse.to_doc()), res=None, compensates=fseq,
                meta=StageMeta(idempotency_key=f"{saga.id}:{fseq}", correlation_id=saga.correlation_id,
                               traceparent=saga.traceparent),
                started_at=now, finished_at=now,
            )  # fmt: skip
            doc = stage_to_doc(stage)
            doc.update(kind=RECORDED, op="compensate")
            if route.remote:
                doc["meta"]["remote"] = route.remote
            event = self._event(
                EventType.STAGE_COMPLETED, None, seq=seq, step=stage.step, bucket=stage.bucket,
                action=Action.COMPENSATE.value, status=StageStatus.SUCCEEDED.value, compensates=fseq,
            )  # fmt: skip
            refusal = await self._refused_route(route)
            if refusal is not None:  # recorded before this rule, or the settings changed: a person decides
                await self._park(f"compensation of stage {fseq} ({forward['bucket']}) refused: {refusal}")
                return
            if route.remote:
                ok, outcome = await self._remote_undo(forward, route.remote, inverse)
                if not ok:
                    await self._park(f"compensation of stage {fseq} ({forward['bucket']}): {outcome}")
                    return
                doc["res"] = json_safe(outcome)
                await self.rstore.record_compensation(saga.id, self.epoch, fseq, doc, event)
            else:
                error = await self._local_undo(fseq, doc, route, inverse, event)
                if error is not None:
                    await self._park(f"compensation of stage {fseq} ({forward['bucket']}) failed: {error}")
                    return
            saga.seq = seq
            stage.res = doc.get("res")
            self._observe_stage(stage)
        await self._transition(
            {"state": SagaState.ABORTED, "aborted_at": _now()},
            [self._event(EventType.ABORTED, SagaState.ABORTED, reason=reason)],
        )

    async def _refused_route(self, route: BucketRoute) -> str | None:
        """Why this stage's inverse must not run where its bucket resolves, or None."""
        conf = self.settings
        try:
            check_database(route, own=conf.database, allowed=conf.recorded_databases)
            if route.database:
                refusal = holds_a_deployment(route.database, await self.rstore.collection_names(route.database))
                if refusal is not None:
                    raise refusal
        except InvalidField as exc:
            return exc.fields[0][1]
        return None

    async def _local_undo(self, fseq: int, doc: dict[str, Any], route: Any, inverse: Inverse, event: Event) -> str | None:
        delay = 0.2
        for attempt in range(1, UNDO_ATTEMPTS + 1):
            try:
                result = await self.rstore.undo_local(self.saga_id, self.epoch, fseq, doc, route, inverse, event)
                doc["res"] = result
                return None
            except (EssentialError, asyncio.CancelledError):
                raise
            except Exception as exc:  # e.g. a unique index refusing a re-inserted document
                log.warning("saga %s: undo of stage %d failed (attempt %d): %s", self.saga_id, fseq, attempt, exc)
                if attempt == UNDO_ATTEMPTS:
                    return f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(delay)
                delay *= 2
        return None  # not reached

    async def _remote_undo(self, forward: dict[str, Any], topic: str, inverse: Inverse) -> tuple[bool, Any]:
        """Send the compensation to the bucket's owning service and wait for its confirmation."""
        saga, conf = self._saga, self.settings
        fseq = int(forward["seq"])
        db = self.runtime.store.db
        command = ParticipantCommand(
            id=command_outbox.command_id(saga.id, fseq, "compensate"),
            kind="compensate",
            saga=saga.id,
            seq=fseq,
            job=saga.job,
            step=str(forward.get("step") or forward.get("op")),
            idempotency_key=f"{saga.id}:{fseq}",
            reply_topic=conf.kafka_reply_topic,
            data={
                "bucket": forward["bucket"],
                "action": forward.get("action"),
                "op": forward.get("op"),
                "inverse": json_safe(inverse.to_doc(), dates=True),
                # the same inverse with exact BSON types: bson.json_util.loads(data["inverse_ejson"])
                "inverse_ejson": json_util.dumps(inverse.to_doc(), json_options=CANONICAL_JSON_OPTIONS),
            },
            forward_result=json_safe({"req": forward.get("req"), "res": forward.get("res")}, dates=True),
            correlation_id=saga.correlation_id,
            traceparent=saga.traceparent,
        )
        await command_outbox.enqueue(
            db, saga_id=saga.id, seq=fseq, kind="compensate", topic=topic,
            body=command.model_dump(mode="json", by_alias=True),
            headers={"correlation_id": saga.correlation_id or "", "traceparent": saga.traceparent or ""},
        )  # fmt: skip
        deadline = datetime.now(timezone.utc) + timedelta(seconds=conf.recorded_remote_timeout)
        delay = 0.02
        while True:
            reply = await find_reply(db, saga.id, fseq, "compensate")
            if reply is not None:
                break
            remaining = (deadline - datetime.now(timezone.utc)).total_seconds()
            if remaining <= 0:
                return False, (
                    f"no confirmation from the service on {topic} within {conf.recorded_remote_timeout:g}s; "
                    f"the command stays queued - resume the saga (essential resume {saga.id}) once the service is back"
                )
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 1.5, conf.participant_poll_interval)
        if not reply.get("ok"):
            return False, f"the service on {topic} refused it: {reply.get('error') or 'no reason given'}"
        return True, reply.get("result") or {"ok": True}

    async def _park(self, reason: str) -> None:
        log.error("saga %s parked: %s", self.saga_id, reason)
        fields, event = parking(self._saga, reason, _now())
        event.data["kind"] = RECORDED
        await self._transition(fields, [event])

    # -- helpers --------------------------------------------------------------------------------
    async def _transition(self, fields: dict[str, Any], events: list[Event], *, unless_abort: bool = False) -> None:
        if "state" in fields:
            check_transition(self._saga.state, fields["state"])
        fields = {**fields, "updatedAt": _now()}
        await self.rstore.transition(self.saga_id, self.epoch, fields, events, unless_abort=unless_abort)
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
        return Event.of(self._saga, type_, at=_now(), state=state, kind=RECORDED, **data)

    def _json(self) -> dict[str, Any]:
        out = self._saga.model_dump(mode="json")
        out["kind"] = RECORDED
        return out
