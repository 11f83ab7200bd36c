"""The supervisor's side of recorded sagas: validation, creation, routing an operation to what drives the saga, reads."""
from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from pydantic import ValidationError
from pymongo.errors import ConnectionFailure, PyMongoError

from essential.actors.expiring import ExpiringMap
from essential.actors.sagas.runtime import Runtime
from essential.orchestration import (
    EssentialError,
    IllegalTransition,
    Saga,
    SagaState,
    SystemClock,
)
from essential.orchestration.errors import (
    CorruptDocument,
    InvalidField,
    SagaIdReused,
    StoreUnavailable,
    TooManyOpenSagas,
    envelope,
    field_problems,
)
from essential.orchestration.recorded import (
    RECORDED,
    AddStage,
    StartRecorded,
    action_of,
    build_recorded,
    check,
    check_database,
    holds_a_deployment,
    inverse_of,
    key_reused,
    route_bucket,
    start_differs,
)
from essential.orchestration.states import TERMINAL_STATES
from essential.persistence.documents import saga_from_doc
from essential.persistence.recorded_store import (
    UNSTORABLE,
    RecordedStore,
    saga_json,
    saga_query,
    stage_json,
    stage_query,
    unstorable,
)

log = logging.getLogger("essential.recorded")

#: seconds an unused entry of the service's caches (the job of an open saga) is kept
CACHE_IDLE = 600.0
#: seconds the service trusts what it learnt about a database (does it hold an Essential deployment?)
DATABASE_CHECK_IDLE = 60.0


def corrupt(what: str, exc: Exception) -> CorruptDocument:
    if isinstance(exc, ValidationError):
        reason = "; ".join(f"{field}: {why}" for field, why in field_problems(exc, "", limit=3))
    else:
        reason = f"{type(exc).__name__}: {exc}"
    return CorruptDocument(what, reason)

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
            reply = await self.placement.recorded_call(saga_id, job, op, call_args, max(deadline - loop.time(), 1.0), launch=not fast)
            if "moved" not in reply:
                state = (reply.get("saga") or {}).get("state")
                if state in {s.value for s in TERMINAL_STATES}:
                    self._forget(saga_id)
                elif "error" in reply:
                    self._open.pop(saga_id, None)  # the next operation reads the saga first
                    if reply["error"]["type"] == IllegalTransition.__name__:  # it ended: its actor leaves
                        self.placement.drop_handle(saga_id)
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
        self._open.pop(saga_id, None)
        self.placement.forget({saga_id})

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
