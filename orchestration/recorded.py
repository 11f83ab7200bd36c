"""Recorded sagas: the platform's start / add / commit / abort model, without Ray or MongoDB.

A service that does its own writes opens a saga (``start``, with a ttl), reports
each operation it performed as a stage (``add``: bucket, action, req, res, meta),
then ``commit``s or ``abort``s it.  On abort or TTL expiry Essential undoes the
recorded stages itself, latest first, by the inverse operation:

=========== ============================================ ===================================
action      what the stage must carry                    inverse
=========== ============================================ ===================================
``create``  the created documents' ``_id``               delete those documents
``update``  the documents as they were before            put the previous documents back
``delete``  the deleted documents                        re-insert them
``read``    nothing                                      nothing
=========== ============================================ ===================================

This module decides *what* to undo (:func:`inverse_of`, :func:`undo_plan`),
*where* an undo may run (:func:`check_database`: never Essential's own database
nor ``admin``/``local``/``config``, only databases the deployment allows) and
*whether an operation is allowed now* (:func:`check`); applying the inverse on
MongoDB lives in ``essential.persistence.inverse``, its runner in :mod:`essential.orchestration.recorded_runner`, hosting in ``essential.actors.sagas.recorded_hosting``.
Values (ids, documents) pass through untouched, so BSON types survive.
"""
from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator

from essential.orchestration import storable
from essential.orchestration.clock import Clock
from essential.orchestration.errors import IdempotencyKeyReused, IllegalTransition, InvalidField, field_problems
from essential.orchestration.models import Event, Saga
from essential.orchestration.states import Action, EventType, SagaState

#: ``kind`` of a recorded saga's document (orchestrated sagas have none)
RECORDED = "recorded"
#: ``job`` of a recorded saga started without a label
DEFAULT_JOB = "recorded"
#: the actions whose stages are undone (reads need nothing; compensate stages are Essential's own)
UNDOABLE = (Action.CREATE, Action.UPDATE, Action.DELETE)

# -- actions -----------------------------------------------------------------------------------
_ACTIONS: dict[str, Action] = {
    # canonical names
    "create": Action.CREATE, "update": Action.UPDATE, "delete": Action.DELETE, "read": Action.READ,
    # the platform's own action names (and their obvious siblings)
    "insert_one": Action.CREATE, "insert_many": Action.CREATE, "insert": Action.CREATE,
    "find_one_and_update": Action.UPDATE, "update_one": Action.UPDATE, "update_many": Action.UPDATE,
    "find_one_and_replace": Action.UPDATE, "replace_one": Action.UPDATE,
    "find_one_and_delete": Action.DELETE, "delete_one": Action.DELETE, "delete_many": Action.DELETE,
    "find": Action.READ, "find_one": Action.READ, "count_documents": Action.READ, "count": Action.READ,
    "aggregate": Action.READ, "distinct": Action.READ,
}  # fmt: skip
#: actions whose ``res`` is the single document MongoDB returned (before the change, by default)
_RETURNS_DOCUMENT = {"find_one_and_update", "find_one_and_replace", "find_one_and_delete"}


def action_of(name: str) -> tuple[Action, str]:
    """``(canonical action, normalised name)``; ``INSERT_MANY`` → ``(create, "insert_many")``."""
    key = re.sub(r"[\s-]+", "_", str(name).strip()).lower()
    if key not in _ACTIONS:
        known = ", ".join(sorted({a.value for a in _ACTIONS.values()}) + sorted(k.upper() for k in _ACTIONS if "_" in k))
        raise InvalidField("action", f"unknown action {name!r}; use one of: {known}")
    return _ACTIONS[key], key


def key_reused(key: str, saga_id: str, differs: Sequence[str]) -> IdempotencyKeyReused:
    """:class:`IdempotencyKeyReused` saying which parameters of the recorded start differ."""
    exc = IdempotencyKeyReused(key, saga_id)
    reason = f"already used by saga {saga_id}, started with a different {', '.join(differs)}"
    exc.fields = [("idempotency_key", reason)]  # type: ignore[attr-defined]
    Exception.__init__(
        exc, f"idempotency key {key!r} was {reason}; repeat the original request to get that saga, or use a new key"
    )
    return exc


def _problems(exc: ValidationError) -> list[tuple[str, str]]:
    return field_problems(exc, "<body>")


def _parse(model: type[BaseModel], data: Any) -> Any:
    if isinstance(data, model):
        return data
    if not isinstance(data, Mapping):
        raise InvalidField("<body>", f"expected a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        (first, *rest) = _problems(exc)
        raise InvalidField(first[0], first[1], more=rest) from None


# -- requests ----------------------------------------------------------------------------------
SAGA_ID = r"^[0-9a-f]{24}$"
#: ``service.collection``: a MongoDB database name and a collection name
BUCKET = r"^[A-Za-z0-9_-]{1,63}\.[A-Za-z0-9_][A-Za-z0-9_.-]{0,119}$"
MAX_TTL = 30 * 24 * 3600.0


def _lower_id(value: Any) -> Any:
    """Saga ids are stored in lower case; an upper-case spelling names the same saga."""
    return value.lower() if isinstance(value, str) else value


def _storable(found: list[str]) -> list[tuple[str, str]]:
    """``storable.problems`` lines (``"req.n: integer … does not fit"``) as ``(field, reason)`` pairs."""
    pairs = []
    for line in found:
        where, _, reason = line.partition(": ")
        pairs.append((where, reason or line))
    return pairs


def _refuse(pairs: list[tuple[str, str]]) -> None:
    if pairs:
        (first, *rest) = pairs
        raise InvalidField(first[0], first[1], more=rest)


class StartRecorded(BaseModel):
    """``start``: open a recorded saga.

    Strict: a wrong type is the caller's mistake (``"ttl": true`` is refused, never read as 1 s).
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)

    ttl: float = Field(
        gt=0, le=MAX_TTL, allow_inf_nan=False, description="seconds until the saga is aborted unless committed"
    )
    job: str | None = Field(None, min_length=1, max_length=200, description="label, e.g. order:checkout")
    correlation_id: str | None = Field(
        None, max_length=200, validation_alias=AliasChoices("correlation_id", "correlation", "correlationId")
    )
    idempotency_key: str | None = Field(
        None, min_length=1, max_length=200, validation_alias=AliasChoices("idempotency_key", "idempotencyKey")
    )
    traceparent: str | None = Field(None, max_length=200)
    id: str | None = Field(None, pattern=SAGA_ID, description="a saga id chosen by the caller (24 hex digits)")

    @field_validator("id", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return _lower_id(value)

    @classmethod
    def parse(cls, data: Any) -> "StartRecorded":
        return _parse(cls, data)


def start_differs(saga: Saga, request: StartRecorded, *, default_job: str = DEFAULT_JOB) -> list[str]:
    """What a repeated start asks differently from the saga already stored under its id or key.

    A true repeat (same parameters) returns that saga; anything else reusing the id or key
    is refused, as payment APIs do.  The traceparent is not compared: a retry may come from
    another span of the same trace."""
    differs = []
    if saga.job != (request.job or default_job):
        differs.append("job")
    if saga.ttl != request.ttl:
        differs.append("ttl")
    if (saga.correlation_id or None) != (request.correlation_id or None):
        differs.append("correlation_id")
    if request.id is not None and request.id != saga.id:
        differs.append("id")
    if request.idempotency_key is not None and request.idempotency_key != saga.idempotency_key:
        differs.append("idempotency_key")
    return differs


class AddStage(BaseModel):
    """``add``: a stage the service performed (or read) inside the saga.

    ``req``/``res``/``meta`` must be storable as MongoDB stores them (``storable.problems``);
    operator keys (``$set``, ``$in``) are what a recorded call's ``req`` looks like, so only
    ``meta`` refuses them.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)

    saga: str | None = Field(None, pattern=SAGA_ID, description="the saga (in the HTTP and Kafka bodies)")
    bucket: str = Field(pattern=BUCKET, description="service.collection the operation touched")
    action: str = Field(min_length=1, max_length=40)
    req: Any = None
    res: Any = None
    meta: dict[str, Any] = Field(default_factory=dict)
    key: str | None = Field(None, min_length=1, max_length=200, description="repeated adds with one key record once")

    @field_validator("saga", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return _lower_id(value)

    @field_validator("bucket")
    @classmethod
    def _not_system(cls, value: str) -> str:
        if value.split(".", 1)[1].startswith("system."):
            raise ValueError("system collections cannot be a bucket")
        return value

    @classmethod
    def parse(cls, data: Any) -> "AddStage":
        request = _parse(cls, data)
        if isinstance(data, cls):
            return request
        found = storable.problems(request.req, "req", operators=True) + storable.problems(request.res, "res", operators=True)
        _refuse(_storable(found + storable.problems(request.meta, "meta")))
        return request


# -- inverse operations ------------------------------------------------------------------------
@dataclass
class Inverse:
    """What undoing one stage does: delete documents by ``_id``, then put documents back by ``_id``."""

    delete: list[Any] = field(default_factory=list)
    put: list[dict[str, Any]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.delete and not self.put

    def to_doc(self) -> dict[str, Any]:
        return {"delete": list(self.delete), "put": [dict(d) for d in self.put]}

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any] | None) -> "Inverse":
        doc = doc or {}
        return cls(delete=list(doc.get("delete") or []), put=[dict(d) for d in doc.get("put") or []])


def _first(where: Any, *keys: str) -> tuple[bool, Any]:
    if isinstance(where, Mapping):
        for key in keys:
            if key in where:
                return True, where[key]
    return False, None


def _ids(value: Any) -> list[Any]:
    """Ids as drivers report them: a list, a single id, or Node's ``{"0": id, "1": id}``."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        try:
            return [value[k] for k in sorted(value, key=lambda k: int(k))]
        except (TypeError, ValueError):
            return list(value.values())
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _documents(value: Any, where: str, *, need_id: bool = True) -> list[dict[str, Any]]:
    """A document or a list of documents, each with its ``_id``."""
    if value is None:
        return []
    docs = [value] if isinstance(value, Mapping) else value
    if not isinstance(docs, (list, tuple)) or not all(isinstance(d, Mapping) for d in docs):
        raise InvalidField(where, "expected a document or a list of documents")
    for i, doc in enumerate(docs):
        here = f"{where}[{i}]" if len(docs) > 1 else where
        if need_id and "_id" not in doc:
            raise InvalidField(here, "the document has no _id")
        operator = next((k for k in doc if isinstance(k, str) and k.startswith("$")), None)
        if operator is not None:
            raise InvalidField(here, f"a document cannot have the top-level field {operator!r}; it could not be put back")
    return [dict(d) for d in docs]


def _is_document(value: Any) -> bool:
    return isinstance(value, Mapping) and "_id" in value


def inverse_of(action: Action, op: str, req: Any, res: Any, meta: Mapping[str, Any] | None = None) -> Inverse:
    """The inverse of a recorded stage, or :class:`InvalidField` naming what is missing to build it."""
    meta = meta or {}
    if action == Action.READ:
        return Inverse()
    if action == Action.CREATE:
        found, ids = _first(res, "insertedIds", "inserted_ids", "insertedId", "inserted_id", "ids")
        if found and ids is not None:
            return Inverse(delete=_ids(ids))
        if _is_document(res) or (isinstance(res, list) and res and all(_is_document(d) for d in res)):
            return Inverse(delete=[d["_id"] for d in _documents(res, "res")])
        found, docs = _first(req, "documents", "docs", "document", "doc")
        candidates = docs if found else req
        if candidates is not None and (
            _is_document(candidates) or (isinstance(candidates, list) and candidates and all(_is_document(d) for d in candidates))
        ):
            return Inverse(delete=[d["_id"] for d in _documents(candidates, "req")])
        raise InvalidField(
            "res.insertedIds",
            "a create stage needs the created documents' _id: res.insertedIds (or insertedId), "
            "or the inserted documents with their _id in req.documents",
        )
    if action == Action.UPDATE:
        found, upserted = _first(res, "upsertedId", "upserted_id", "upsertedIds", "upserted_ids")
        delete = _ids(upserted) if found else []
        for where, container in (("res", res), ("meta", meta)):
            found, before = _first(container, "before", "previous")
            if found:
                return Inverse(delete=delete, put=_documents(before, f"{where}.before"))
        if op in _RETURNS_DOCUMENT:
            if res is None:
                return Inverse(delete=delete)  # nothing matched
            if _is_document(res):
                return Inverse(delete=delete, put=_documents(res, "res"))  # MongoDB returns the document as it was
        if delete:
            return Inverse(delete=delete)  # an upsert that created the document
        found, matched = _first(res, "matchedCount", "matched_count", "n")
        if found and matched == 0:
            return Inverse(delete=delete)
        raise InvalidField(
            "res.before",
            "an update stage needs the previous state: res.before (the documents as they were, with their _id), "
            "or, for FIND_ONE_AND_UPDATE, res = the document MongoDB returned before the update",
        )
    if action == Action.DELETE:
        for where, container in (("res", res), ("meta", meta)):
            found, deleted = _first(container, "deleted", "before", "previous", "documents")
            if found:
                return Inverse(put=_documents(deleted, f"{where}.deleted"))
        if res is None and op in _RETURNS_DOCUMENT:
            return Inverse()  # nothing matched
        if _is_document(res) or (isinstance(res, list) and all(_is_document(d) for d in res)):
            return Inverse(put=_documents(res, "res"))
        found, count = _first(res, "deletedCount", "deleted_count", "n")
        if found and count == 0:
            return Inverse()
        raise InvalidField(
            "res.deleted",
            "a delete stage needs the deleted documents to re-insert them: res.deleted, "
            "or, for FIND_ONE_AND_DELETE, res = the document MongoDB returned",
        )
    raise InvalidField("action", f"{action.value!r} stages are Essential's own and cannot be added")


# -- the state machine -------------------------------------------------------------------------
Op = Literal["add", "commit", "abort"]


def check(op: Op, saga: Saga, now: datetime) -> Literal["go", "already"]:
    """May ``op`` happen to ``saga`` now?  ``already``: an abort of a saga already aborting/aborted.

    Raises :class:`IllegalTransition` with what happened to the saga and what is left to do.
    """
    state, sid = saga.state, saga.id
    expired = now >= saga.deadline
    if op == "abort":
        if state in (SagaState.RUNNING, SagaState.PENDING, SagaState.PARKED):
            return "go"
        if state in (SagaState.COMPENSATING, SagaState.ABORTED):
            return "already"
        raise IllegalTransition(f"saga {sid} was committed ({state.value}); it can no longer be aborted")
    verb = "stages can no longer be added" if op == "add" else "it can no longer be committed"
    if state in (SagaState.RUNNING, SagaState.PENDING):
        if saga.abort_requested:
            raise IllegalTransition(f"saga {sid} is being aborted ({saga.abort_requested}); {verb}")
        if expired:
            raise IllegalTransition(f"saga {sid}: its ttl of {saga.ttl:g}s has passed and it is being aborted; {verb}")
        return "go"
    if state in (SagaState.COMPENSATING, SagaState.ABORTED):
        why = f" ({saga.error})" if saga.error else ""
        raise IllegalTransition(f"saga {sid} was aborted{why}; {verb}")
    if state == SagaState.COMPLETED:
        again = "it was committed already" if op == "commit" else "it was committed"
        raise IllegalTransition(f"saga {sid}: {again}; {verb}")
    if state == SagaState.COMMITTING:
        raise IllegalTransition(f"saga {sid} is committing; {verb}")
    raise IllegalTransition(f"saga {sid} is {state.value}; {verb} (resume or abort it first)")


def undo_plan(stages: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Forward stages still to undo, latest first: each has an inverse and no succeeded compensation."""
    undone = {
        s.get("compensates")
        for s in stages
        if s.get("action") == Action.COMPENSATE.value and s.get("status") == "succeeded"
    }
    todo = [
        s
        for s in stages
        if s.get("action") in {a.value for a in UNDOABLE}
        and s.get("seq") not in undone
        and not Inverse.from_doc(s.get("undo")).empty
    ]
    return sorted(todo, key=lambda s: s["seq"], reverse=True)


# -- buckets -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class BucketRoute:
    """Where a bucket's documents live: a MongoDB database and collection, or a remote owning service."""

    bucket: str
    database: str | None = None
    collection: str | None = None
    remote: str | None = None  # the Kafka topic of the service that owns the bucket


def route_bucket(bucket: str, mapping: Mapping[str, Any] | None = None, prefix: str = "") -> BucketRoute:
    """``service.collection`` → database ``prefix + service``, collection ``collection``, unless mapped.

    ``mapping`` entries (by bucket, or ``service.*`` for a whole service):
    ``{"database": d, "collection": c}``, ``{"remote": "<topic>"}``, ``"db.collection"`` or ``"remote:<topic>"``.
    """
    service, _, collection = bucket.partition(".")
    mapping = mapping or {}
    entry = mapping.get(bucket, mapping.get(f"{service}.*"))
    if isinstance(entry, str):
        if entry.startswith("remote:"):
            entry = {"remote": entry[len("remote:"):]}
        else:
            db, _, coll = entry.partition(".")
            entry = {"database": db, "collection": coll or collection}
    if isinstance(entry, Mapping):
        if entry.get("remote"):
            return BucketRoute(bucket, remote=str(entry["remote"]))
        return BucketRoute(
            bucket, database=str(entry.get("database") or prefix + service),
            collection=str(entry.get("collection") or collection),
        )  # fmt: skip
    return BucketRoute(bucket, database=prefix + service, collection=collection)


#: databases no recorded stage is ever undone in, whatever the deployment allows
SYSTEM_DATABASES = ("admin", "local", "config")


def allowed_databases(setting: str | Sequence[str]) -> list[str]:
    """ESSENTIAL_RECORDED_DATABASES as patterns: ``"shop,billing_*"``, ``'["shop"]'`` or a list."""
    if isinstance(setting, str):
        text = setting.strip()
        if text.startswith("["):
            try:
                setting = [str(p) for p in json.loads(text)]
            except (ValueError, TypeError):
                raise InvalidField("ESSENTIAL_RECORDED_DATABASES", f"not a JSON list of names: {text[:80]!r}") from None
        else:
            setting = text.split(",")
    return [p.strip() for p in setting if p and p.strip()]


def check_database(route: BucketRoute, *, own: str, allowed: str | Sequence[str]) -> None:
    """Refuse a bucket whose inverse would run where it must not.

    Never Essential's own database (an undo there deletes or rewrites other sagas), nor
    ``admin``/``local``/``config``; and only databases the deployment allows.  Names are
    compared case-blind: MongoDB refuses two databases that differ only in case."""
    if route.remote:
        return
    database, collection = route.database or "", route.collection or ""
    name = database.casefold()
    never = None
    if name == own.casefold():
        never = f"Essential's own database {database!r} (ESSENTIAL_DATABASE)"
    elif name in SYSTEM_DATABASES:
        never = f"the MongoDB system database {database!r}"
    elif collection.startswith("system."):
        never = f"the system collection {database}.{collection}"
    if never is not None:
        raise InvalidField("bucket", f"{route.bucket} resolves to {never}; a recorded stage is never undone there")
    patterns = allowed_databases(allowed)
    if not any(fnmatch.fnmatchcase(name, p.casefold()) for p in patterns):
        raise InvalidField(
            "bucket",
            f"{route.bucket} resolves to database {database!r}, which this deployment does not allow "
            f"(ESSENTIAL_RECORDED_DATABASES={','.join(patterns) or 'empty'}); allow it there or use another bucket",
        )


def holds_a_deployment(database: str, collections: Sequence[str]) -> InvalidField | None:
    """The refusal for a bucket whose database has an Essential deployment's collections, else None."""
    if {"sagas", "stages", "outbox"} <= set(collections):
        return InvalidField(
            "bucket", f"database {database!r} holds an Essential deployment's sagas; a recorded stage is never undone there"
        )
    return None


# -- a new saga --------------------------------------------------------------------------------
def build_recorded(request: StartRecorded, clock: Clock, *, default_job: str = DEFAULT_JOB) -> tuple[Saga, Event]:
    """An open (``running``) recorded saga and its ``saga.started`` event."""
    now = clock.now()
    fields: dict[str, Any] = {"id": request.id} if request.id else {}
    saga = Saga(
        ttl=request.ttl,
        job=request.job or default_job,
        state=SagaState.RUNNING,
        createdAt=now,
        updatedAt=now,
        idempotency_key=request.idempotency_key,
        correlation_id=request.correlation_id,
        traceparent=request.traceparent,
        **fields,
    )
    event = Event.of(saga, EventType.STARTED, at=now, kind=RECORDED, ttl=saga.ttl)
    return saga, event


def expired_since(saga: Saga, now: datetime, grace: float = 0.0) -> bool:
    return now >= saga.deadline + timedelta(seconds=grace)
