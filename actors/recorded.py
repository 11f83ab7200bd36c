"""Recorded sagas on Ray: the open saga lives in its actor until commit, abort or TTL.

Three parts:

* :class:`RecordedRunner` - hosted by a ``SagaActor`` (``saga:<id>``) or a shared
  host, through :func:`actors.hosting.drive`, which hands recorded sagas to
  :func:`drive_recorded`.  It takes the saga's lease and keeps the saga open:
  ``add``, ``commit`` and ``abort`` arrive as actor calls (:func:`dispatch`)
  and its state machine (:func:`orchestration.recorded.check`, under one lock)
  decides what is allowed.  An abort - asked for, or the TTL expiring (the
  supervisor's sweep notifies the actor like for any saga) - compensates the
  recorded stages latest first and ends ``aborted``.  A restored runner (actor
  killed, node lost) picks up where the last one stopped: each undo is recorded
  in the transaction that does it.
* :class:`RecordedService` - the supervisor's side: validation, creation,
  routing an operation to whatever drives the saga (launching it when nothing
  does), reads and listings.
* :class:`RecordedClient` - ``EssentialClient().recorded``.

A remote bucket's compensation is a participant command (``kind: compensate``)
queued in ``command_outbox``; the gateway relays it to the owning service's
topic and stores the reply in the ``inbox``, where the runner waits for it.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from datetime import datetime, timedelta, timezone
from typing import Any

import ray
from bson import json_util
from bson.errors import BSONError
from bson.json_util import CANONICAL_JSON_OPTIONS
from pydantic import ValidationError
from pymongo.errors import ConnectionFailure, PyMongoError

from orchestration import (
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
from orchestration.errors import AbortPending, IdempotencyKeyReused, rebuild_error
from orchestration.recorded import (
    RECORDED,
    AddStage,
    BucketRoute,
    CorruptDocument,
    Inverse,
    InvalidField,
    SagaIdReused,
    StartRecorded,
    StoreUnavailable,
    TooManyOpenSagas,
    action_of,
    build_recorded,
    check,
    check_database,
    expired_since,
    holds_a_deployment,
    inverse_of,
    key_reused,
    route_bucket,
    start_differs,
    undo_plan,
)
from orchestration.states import TERMINAL_STATES, Action, StageStatus
from persistence import command_outbox
from persistence.documents import saga_from_doc, stage_to_doc
from persistence.inbox import find_reply
from persistence.recorded_store import (
    RecordedStore,
    json_safe,
    saga_json,
    saga_query,
    stage_json,
    stage_query,
)

from .expiring import ExpiringMap
from .participant_protocol import ParticipantCommand
from .runtime import Runtime

log = logging.getLogger("essential.recorded")

#: seconds between the open saga's re-reads (a durable abort it was not told about, a lost lease, the TTL)
REFRESH_EVERY = 2.0
#: seconds an operation waits for the saga's runner to appear in a freshly launched actor
ARRIVAL_TIMEOUT = 30.0
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


def envelope(exc: EssentialError) -> dict[str, Any]:
    error: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    fields = getattr(exc, "fields", None)  # InvalidField, and the reused id/key errors
    if fields:
        error["fields"] = [{"field": f, "reason": r} for f, r in fields]
    return {"error": error}


def unstorable(exc: Exception, where: str = "<request>") -> InvalidField:
    """A value the database refused to encode, as the caller's mistake (400), not a server error."""
    return InvalidField(where, f"MongoDB cannot store it as given: {type(exc).__name__}: {str(exc)[:200]}")


def corrupt(what: str, exc: Exception) -> CorruptDocument:
    if isinstance(exc, ValidationError):
        reason = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:3])
    else:
        reason = f"{type(exc).__name__}: {exc}"
    return CorruptDocument(what, reason)


# =============================================================================== the runner
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
            if saga.state in TERMINAL_STATES or saga.state == SagaState.PARKED:
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
        await self._transition(
            {"state": SagaState.PARKED, "parked_reason": reason, "parked_from": self._saga.state},
            [self._event(EventType.PARKED, SagaState.PARKED, reason=reason)],
        )

    # -- helpers --------------------------------------------------------------------------------
    async def _transition(self, fields: dict[str, Any], events: list[Event], *, unless_abort: bool = False) -> None:
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
        saga = self._saga
        return Event(
            type=type_, saga=saga.id, job=saga.job, state=state or saga.state, at=_now(),
            correlation_id=saga.correlation_id, traceparent=saga.traceparent,
            data={"kind": RECORDED, **{k: v for k, v in data.items() if v is not None}},
        )  # fmt: skip

    def _json(self) -> dict[str, Any]:
        out = self._saga.model_dump(mode="json")
        out["kind"] = RECORDED
        return out


# ===================================================================== hosting (per process)
class _Arrival:
    """Operations waiting for a saga's runner to start in this process (a freshly launched actor)."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.waiters = 0


_live: dict[str, RecordedRunner] = {}
#: only while someone waits: an operation whose runner never arrives takes its entry with it
_arrived: dict[str, _Arrival] = {}
_ended: OrderedDict[str, None] = OrderedDict()
_ENDED_KEEP = 10_000


async def is_recorded(runtime: Runtime, saga_id: str) -> bool:
    return await RecordedStore(runtime.store).kind(saga_id) == RECORDED


async def drive_recorded(
    saga_id: str, runtime: Runtime, runners: dict[str, Any], pending_aborts: dict[str, str], owner: str,
    observer: Any = None,
) -> None:  # fmt: skip
    """Host the open saga until it ends (called by :func:`actors.hosting.drive`; its caller handles errors)."""
    runner = RecordedRunner(saga_id, runtime, owner, observer)
    runners[saga_id] = runner  # the supervisor's abort notices (and TTL expiry) reach it from here on
    if saga_id in pending_aborts:
        runner.request_abort(pending_aborts.pop(saga_id))
    _live[saga_id] = runner
    _ended.pop(saga_id, None)
    arrival = _arrived.get(saga_id)
    if arrival is not None:
        arrival.event.set()
    try:
        await runner.run()
    finally:
        runner.finished.set()
        for _ in range(100):  # let operations in flight answer before the actor leaves
            if runner.inflight == 0:
                break
            await asyncio.sleep(0.01)
        if _live.get(saga_id) is runner:
            _live.pop(saga_id, None)
            _ended[saga_id] = None
            while len(_ended) > _ENDED_KEEP:
                _ended.popitem(last=False)
        await runtime.store.release(saga_id)


async def _await_arrival(saga_id: str) -> bool:
    """Wait (up to ARRIVAL_TIMEOUT) for the saga's runner to start here; the wait leaves no trace."""
    arrival = _arrived.get(saga_id)
    if arrival is None:
        arrival = _arrived[saga_id] = _Arrival()
    arrival.waiters += 1
    try:
        await asyncio.wait_for(arrival.event.wait(), ARRIVAL_TIMEOUT)
        return True
    except asyncio.TimeoutError:
        return False
    finally:
        arrival.waiters -= 1
        if arrival.waiters == 0 and _arrived.get(saga_id) is arrival:
            del _arrived[saga_id]


async def dispatch(saga_id: str, op: str, args: dict[str, Any], *, expect: bool) -> dict[str, Any]:
    """An operation for the saga's runner in this process; ``{"moved": True}`` when it is not here.

    ``expect``: this process was asked to drive the saga, so wait for its runner to appear.
    """
    runner = _live.get(saga_id)
    if runner is None:
        if not expect or saga_id in _ended or not await _await_arrival(saga_id):
            return {"moved": True}
        runner = _live.get(saga_id)
        if runner is None:
            return {"moved": True}
    return await runner.handle(op, args)


# ============================================================= the supervisor's side
class RecordedService:
    """Start, route and read recorded sagas (runs in the supervisor actor).

    Its caches (actor handles, jobs of open sagas, what it learnt about databases) are
    bounded in size and idle time: a saga may end where the service never hears of it.
    """

    def __init__(self, runtime: Runtime, placement: Any) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.rstore = RecordedStore(runtime.store)
        self.placement = placement
        self.clock = SystemClock()
        size = self.settings.recorded_cache_size
        self._handles: ExpiringMap[str, Any] = ExpiringMap(max_entries=size, idle=CACHE_IDLE)
        self._open: ExpiringMap[str, str] = ExpiringMap(max_entries=size, idle=CACHE_IDLE)  # saga id -> job
        self._databases: ExpiringMap[str, InvalidField | None] = ExpiringMap(max_entries=1000, idle=DATABASE_CHECK_IDLE)

    async def call(self, op: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        method = {
            "start": self.start, "add": self.add, "commit": self.commit, "abort": self.abort, "get": self.get,
            "stages": self.stages, "list": self.list, "count": self.count, "stage_list": self.stage_list,
        }.get(op)  # fmt: skip
        if method is None:
            return envelope(EssentialError(f"unknown recorded-saga operation {op!r}"))
        try:
            return await method(*args, **kwargs)
        except EssentialError as exc:
            return envelope(exc)
        except UNSTORABLE as exc:
            return envelope(unstorable(exc))
        except ConnectionFailure as exc:  # resilient() rode out what it could: MongoDB is really away
            return envelope(StoreUnavailable(f"MongoDB is not reachable right now ({type(exc).__name__}); retry shortly"))
        except PyMongoError as exc:
            log.warning("recorded %s failed in MongoDB: %s", op, exc)
            return envelope(StoreUnavailable(f"MongoDB refused the operation ({type(exc).__name__}: {str(exc)[:200]})"))

    def forget(self, saga_id: str) -> None:
        """The saga ended (wherever it ended): drop what the caches hold for it."""
        self._forget(saga_id)

    # -- writes ---------------------------------------------------------------------------------
    async def start(self, body: Any) -> dict[str, Any]:
        request = StartRecorded.parse(body)
        default_job = self.settings.recorded_default_job
        job = request.job or default_job
        if not self.placement.has_room(job):
            raise TooManyOpenSagas(
                f"no room for another live saga ({self.settings.max_live_sagas} live); retry shortly, or raise "
                f"ESSENTIAL_MAX_LIVE_SAGAS / place recorded sagas shared (ESSENTIAL_SHARED_JOBS={job})"
            )
        saga, event = build_recorded(request, self.clock, default_job=default_job)
        stored, created, kind = await self.rstore.create(saga, event)
        if not created:
            differs = ["kind (an orchestrated saga)"] if kind != RECORDED else start_differs(stored, request, default_job=default_job)
            if differs:
                if request.id is not None and stored.id == request.id:
                    raise SagaIdReused(stored.id, differs)
                raise key_reused(request.idempotency_key or "", stored.id, differs)
        if created:
            self.placement.launch(stored.id, stored.job)
            self._remember(stored.id, stored.job)
        out = stored.model_dump(mode="json")
        out["kind"] = RECORDED
        return {"saga": out, "created": created}

    async def add(self, saga_id: str | None, body: Any, key: str | None = None) -> dict[str, Any]:
        request = AddStage.parse(body)
        target = saga_id or request.saga
        if not target:
            raise InvalidField("saga", "which saga the stage belongs to (its id)")
        if saga_id and request.saga and request.saga != saga_id:
            raise InvalidField("saga", f"{request.saga} differs from the saga addressed ({saga_id})")
        action, op = action_of(request.action)
        inverse_of(action, op, request.req, request.res, request.meta)  # refuse before routing
        await self._check_bucket(request.bucket)
        stage = request.model_dump(exclude={"saga", "key"})
        given = request.key or key
        return await self._route(target, "add", {"stage": stage, "key": given or uuid.uuid4().hex, "fresh_key": not given})

    async def _check_bucket(self, bucket: str) -> None:
        """Refuse a bucket whose undo would reach Essential's own, a system or a forbidden database."""
        conf = self.settings
        route = route_bucket(bucket, conf.recorded_buckets, conf.recorded_db_prefix)
        check_database(route, own=conf.database, allowed=conf.recorded_databases)
        if route.database is None:
            return
        if route.database not in self._databases:
            names = await self.rstore.collection_names(route.database)
            self._databases[route.database] = holds_a_deployment(route.database, names)
        refusal = self._databases.get(route.database)
        if refusal is not None:
            raise InvalidField("bucket", f"{bucket}: {refusal.fields[0][1]}")

    async def commit(self, saga_id: str) -> dict[str, Any]:
        return await self._route(saga_id, "commit", {})

    async def abort(self, saga_id: str, reason: str | None = None, wait: float | None = None) -> dict[str, Any]:
        wait = self.settings.recorded_abort_wait if wait is None else wait
        return await self._route(saga_id, "abort", {"reason": reason or "aborted by request", "wait": wait})

    async def _saga(self, saga_id: str) -> tuple[dict[str, Any], Saga]:
        doc = await self.rstore.doc(saga_id)
        try:
            saga = saga_from_doc(doc)
        except (ValidationError, KeyError, TypeError) as exc:
            raise corrupt(f"saga {saga_id}", exc) from None
        if doc.get("kind") != RECORDED:
            raise IllegalTransition(
                f"saga {saga_id} is an orchestrated saga (job {saga.job}); add/commit apply to recorded sagas"
            )
        return doc, saga

    async def _route(self, saga_id: str, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """Deliver ``op`` to whatever drives the saga, launching it when nothing does.

        Fast path: a saga this service saw open goes straight to its actor (whose state machine
        decides); any doubt - the actor gone, the saga elsewhere - falls back to reading the saga.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.recorded_call_timeout
        job = self._open.get(saga_id) if op in ("add", "commit") else None
        attempt = 0
        while True:
            attempt += 1
            fast = job is not None
            if not fast:
                doc, saga = await self._saga(saga_id)
                if attempt > 1 and op == "commit" and saga.state == SagaState.COMPLETED:
                    return {"saga": saga_json(doc)}  # our commit went through before its actor left
                if op == "abort":
                    if saga.state == SagaState.ABORTED:
                        return {"saga": saga_json(doc)}
                    if saga.state == SagaState.PARKED:  # back to compensating, on a fresh runner
                        resumed = await self.runtime.store.request_abort(saga_id, args["reason"])
                        self.placement.launch(saga_id, saga.job)
                        return {"saga": {**resumed.model_dump(mode="json"), "kind": RECORDED}}
                check(op, saga, self.clock.now())  # refuse at once what the saga's state forbids
                job = saga.job
            if op == "add":  # a key the service gave (or a retry of ours) may be known: look it up
                call_args = {**args, "check_key": not (args.get("fresh_key") and attempt == 1)}
            else:
                call_args = args
            reply = await self._call(saga_id, job, op, call_args, max(deadline - loop.time(), 1.0), launch=not fast)
            if "moved" not in reply:
                state = (reply.get("saga") or {}).get("state")
                if state in {s.value for s in TERMINAL_STATES}:
                    self._forget(saga_id)
                elif "error" in reply:
                    self._open.pop(saga_id, None)  # the next operation reads the saga first
                    if reply["error"]["type"] == IllegalTransition.__name__:  # it ended: its actor leaves
                        self._handles.pop(saga_id, None)
                else:
                    self._remember(saga_id, job)
                return reply
            self._open.pop(saga_id, None)
            job = None
            if loop.time() >= deadline:
                raise EssentialError(
                    f"saga {saga_id}: nothing answered for it within {self.settings.recorded_call_timeout:g}s; "
                    f"the supervisor restores it - retry shortly"
                )
            if attempt > 2:
                await asyncio.sleep(min(0.05 * attempt, 1.0))

    def _remember(self, saga_id: str, job: str) -> None:
        self._open[saga_id] = job

    def _forget(self, saga_id: str) -> None:
        self._handles.pop(saga_id, None)
        self._open.pop(saga_id, None)
        self.placement.forget({saga_id})

    async def _call(self, saga_id: str, job: str, op: str, args: dict[str, Any], timeout: float, *,
                    launch: bool) -> dict[str, Any]:  # fmt: skip
        place = self.placement
        try:
            if place.is_shared(job):
                reply = await asyncio.wait_for(place.host_for(saga_id).recorded.remote(saga_id, op, args), timeout)
                if "moved" in reply and launch:
                    place.launch(saga_id, job)  # runs it there unless it already runs
                return reply
            handle = self._handles.get(saga_id)
            if handle is None:
                if not launch:
                    return {"moved": True}
                handle = await asyncio.to_thread(place.dedicated_handle, saga_id)
                if handle is None:  # nothing drives it (crashed, or not yet restored): launch it now
                    place.launch(saga_id, job)
                    handle = await asyncio.to_thread(place.dedicated_handle, saga_id)
                    if handle is None:
                        return {"moved": True}
                self._handles[saga_id] = handle
            reply = await asyncio.wait_for(handle.recorded.remote(op, args), timeout)
            if "moved" in reply:
                self._handles.pop(saga_id, None)
            return reply
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            self._handles.pop(saga_id, None)
            return {"moved": True}
        except asyncio.TimeoutError:
            raise EssentialError(f"saga {saga_id}: its actor did not answer {op} within {timeout:.0f}s") from None

    # -- reads ----------------------------------------------------------------------------------
    async def get(self, saga_id: str) -> dict[str, Any]:
        doc = await self.rstore.doc(saga_id)
        try:
            return {"saga": saga_json(doc)}
        except (ValidationError, KeyError, TypeError) as exc:
            raise corrupt(f"saga {saga_id}", exc) from None

    async def stages(self, saga_id: str) -> dict[str, Any]:
        await self.rstore.doc(saga_id)
        stages, unreadable = _readable(await self.rstore.stage_docs(saga_id), stage_json, "stage")
        return {"stages": stages, **({"unreadable": unreadable} if unreadable else {})}

    async def list(self, filters: dict[str, Any] | None = None, limit: int = 50, skip: int = 0) -> dict[str, Any]:
        """A page of sagas; a stored document Essential cannot read is left out and named in ``unreadable``."""
        docs = await self.rstore.find_sagas(saga_query(filters or {}), limit=limit, skip=skip)
        sagas, unreadable = _readable(docs, saga_json, "saga")
        return {"sagas": sagas, **({"unreadable": unreadable} if unreadable else {})}

    async def count(self, filters: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"total": await self.rstore.count_sagas(saga_query(filters or {}))}

    async def stage_list(self, filters: dict[str, Any] | None = None, limit: int = 200, skip: int = 0) -> dict[str, Any]:
        try:
            query = stage_query(filters or {})
        except Exception:
            raise InvalidField("saga", "not a saga id (24 hex digits)") from None
        docs = await self.rstore.find_stages(query, limit=limit, skip=skip)
        stages, unreadable = _readable(docs, stage_json, "stage")
        return {"stages": stages, **({"unreadable": unreadable} if unreadable else {})}


def _readable(docs: list[dict[str, Any]], render: Any, what: str) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Render each document; one that cannot be read is reported (and logged), never fails the listing."""
    out, unreadable = [], []
    for doc in docs:
        try:
            out.append(render(doc))
        except (ValidationError, KeyError, TypeError, ValueError) as exc:
            ident = str(doc.get("_id")) if what == "saga" else f"{doc.get('saga')}:{doc.get('seq')}"
            reason = corrupt(f"{what} {ident}", exc).reason
            log.error("%s %s: stored document cannot be read (%s); left out of the listing", what, ident, reason)
            unreadable.append({"id": ident, "reason": reason})
    return out, unreadable


# ======================================================================= Kafka commands
_EJSON = json_util.RELAXED_JSON_OPTIONS.with_options(tz_aware=True, tzinfo=timezone.utc)


def from_extended_json(value: Any) -> Any:
    """``{"$oid": ...}``, ``{"$date": ...}`` and the rest of MongoDB Extended JSON as BSON values."""
    if value is None:
        return None
    return json_util.loads(json_util.dumps(value), json_options=_EJSON)


async def apply_kafka_command(
    supervisor: Any, command: Any, key: str, *, correlation_id: str | None = None, traceparent: str | None = None
) -> Any:
    """A ``commit`` / ``recorded.start`` / ``recorded.add`` command: the saga id, or a Rejection to dead-letter."""
    from .command_handler import COMMIT_UNSUPPORTED, ERROR_CODES
    from .kafka_commands import INVALID_COMMAND, REJECTED, UNSUPPORTED, Rejection

    if command.type == "commit":
        reply = await supervisor.recorded.remote("commit", command.saga)
        error = reply.get("error")
        if error and (error["type"] == "SagaNotFound" or "orchestrated" in error["message"]):
            return Rejection(UNSUPPORTED, f"{COMMIT_UNSUPPORTED.split(',')[0]} only: {error['message']}")
    elif command.type == "recorded.start":
        body = {
            "ttl": command.ttl, "job": command.job, "id": command.id,
            "idempotency_key": command.idempotency_key or (None if command.id else key),
            "correlation_id": command.correlation_id or correlation_id,
            "traceparent": command.traceparent or traceparent,
        }  # fmt: skip
        reply = await supervisor.recorded.remote("start", {k: v for k, v in body.items() if v is not None})
    else:
        body = {
            "bucket": command.bucket, "action": command.action, "req": from_extended_json(command.req),
            "res": from_extended_json(command.res), "meta": from_extended_json(command.meta) or {},
        }  # fmt: skip
        reply = await supervisor.recorded.remote("add", command.saga, body, command.key or key)
    if "error" in reply:
        error = reply["error"]
        if error["type"] == StoreUnavailable.__name__:
            unwrap(reply)  # raises: not the command's fault, so the gateway tries it again
        invalid = ("InvalidField", IdempotencyKeyReused.__name__, SagaIdReused.__name__)
        code = INVALID_COMMAND if error["type"] in invalid else ERROR_CODES.get(error["type"], REJECTED)
        return Rejection(code, error["message"])
    return reply["saga"]["id"] if "saga" in reply else command.saga


# ======================================================================= the Python client
_ERRORS: dict[str, type[EssentialError]] = {
    c.__name__: c for c in (InvalidField, TooManyOpenSagas, SagaIdReused, CorruptDocument, StoreUnavailable)
}


def unwrap(reply: dict[str, Any]) -> dict[str, Any]:
    """The reply, or its error raised as the typed exception it was."""
    if "error" not in reply:
        return reply
    error = reply["error"]
    fields = [(f["field"], f["reason"]) for f in error.get("fields") or []]
    if error["type"] == "InvalidField" and fields:
        (first, *rest) = fields
        raise InvalidField(first[0], first[1], more=rest)
    cls = _ERRORS.get(error["type"])
    exc = rebuild_error(error["type"], error["message"]) if cls is None else cls.__new__(cls)
    if cls is not None:
        Exception.__init__(exc, error["message"])
    if fields:
        exc.fields = fields  # type: ignore[attr-defined]
    raise exc


class RecordedClient:
    """Recorded sagas from Python: ``EssentialClient().recorded``.

    >>> saga = client.recorded.start(ttl=60, job="order:checkout")
    >>> client.recorded.add(saga.id, bucket="shop.orders", action="INSERT_MANY",
    ...                     req={"documents": docs}, res={"insertedIds": ids})
    >>> client.recorded.commit(saga.id)          # or .abort(saga.id): the stages are undone
    """

    def __init__(self, supervisor: Any) -> None:
        self.supervisor = supervisor

    def _call(self, op: str, *args: Any) -> dict[str, Any]:
        return unwrap(ray.get(self.supervisor.recorded.remote(op, *args)))

    def start(
        self, ttl: float, *, job: str | None = None, correlation_id: str | None = None,
        idempotency_key: str | None = None, id: str | None = None,
    ) -> Saga:  # fmt: skip
        body = {k: v for k, v in {"ttl": ttl, "job": job, "correlation_id": correlation_id,
                                  "idempotency_key": idempotency_key, "id": id}.items() if v is not None}  # fmt: skip
        return Saga.model_validate(self._call("start", body)["saga"])

    def add(
        self, saga_id: str, *, bucket: str, action: str, req: Any = None, res: Any = None,
        meta: dict[str, Any] | None = None, key: str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Record a stage; returns it (JSON-safe, with its ``seq`` and ``undo``).  ``key`` dedupes retries."""
        body = {"bucket": bucket, "action": action, "req": req, "res": res, "meta": meta or {}}
        if key is not None:
            body["key"] = key
        return self._call("add", saga_id, body)["stage"]

    def commit(self, saga_id: str) -> Saga:
        return Saga.model_validate(self._call("commit", saga_id)["saga"])

    def abort(self, saga_id: str, reason: str = "aborted by client", *, wait: float | None = None) -> Saga:
        """Compensate the recorded stages; waits up to ``wait`` s (default ESSENTIAL_RECORDED_ABORT_WAIT)."""
        return Saga.model_validate(self._call("abort", saga_id, reason, wait)["saga"])

    def get(self, saga_id: str) -> Saga:
        return Saga.model_validate(self._call("get", saga_id)["saga"])

    def stages(self, saga_id: str) -> list[dict[str, Any]]:
        return self._call("stages", saga_id)["stages"]

    def list(self, *, state: str | None = None, job: str | None = None, limit: int = 50) -> list[Saga]:
        filters = {"kind": RECORDED, "state": state, "job": job}
        return [Saga.model_validate(s) for s in self._call("list", filters, limit)["sagas"]]

    def count(self, *, state: str | None = None, job: str | None = None) -> int:
        return int(self._call("count", {"kind": RECORDED, "state": state, "job": job})["total"])


__all__ = [
    "RecordedClient", "RecordedRunner", "RecordedService", "dispatch", "drive_recorded", "is_recorded", "unwrap",
]
