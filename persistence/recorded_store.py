"""Recorded sagas in MongoDB, beside the orchestrated ones.

Same collections as :class:`essential.persistence.store.MongoSagaStore` (``sagas``,
``stages``, ``outbox``), same rules: every write that changes a saga is one
transaction fenced by the saga's lease epoch, with its outbox events in it.
What is particular to recorded sagas:

* the saga document carries ``kind: "recorded"`` (orchestrated sagas have no kind);
* a stage document keeps, beside the JSON-safe ``req``/``res`` the service
  reported, its ``op`` (the action as named by the service, e.g.
  ``find_one_and_update``), its ``undo`` (the inverse with the exact BSON values
  needed: ids and whole documents) and the ``add_key`` that makes a repeated
  ``add`` record once;
* undoing a local stage writes to the bucket's collection *in the transaction
  that records the compensate stage*: a compensation is done and marked done
  together, so a runner that dies anywhere and is restored undoes nothing twice.
"""
from __future__ import annotations

import asyncio
import base64
import re
import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable

from bson import Binary, Code, DBRef, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp
from bson.errors import BSONError
from pymongo import ASCENDING, DESCENDING
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import DuplicateKeyError

from essential.orchestration.errors import InvalidField
from essential.orchestration.models import Event, Saga, Stage
from essential.orchestration.recorded import RECORDED, BucketRoute, Inverse
from essential.persistence.documents import oid, saga_from_doc, saga_to_doc, stage_to_doc
from essential.persistence.inverse import apply_inverse
from essential.persistence.store import MongoSagaStore, resilient

#: what a value MongoDB cannot encode raises (an integer past 64 bits, a NUL in a key, a lone surrogate)
UNSTORABLE = (BSONError, OverflowError, UnicodeEncodeError)


def unstorable(exc: Exception, where: str = "<request>") -> InvalidField:
    """A value the database refused to encode, as the caller's mistake (400), not a server error."""
    return InvalidField(where, f"MongoDB cannot store it as given: {type(exc).__name__}: {str(exc)[:200]}")


def json_safe(value: Any, *, dates: bool = False) -> Any:
    """BSON values as plain JSON ones: ObjectId and Decimal128 as strings, bytes as base64.

    ``dates=False`` keeps datetimes (MongoDB stores them as dates); ``True`` makes them ISO text.
    """
    if isinstance(value, Mapping):
        return {str(k): json_safe(v, dates=dates) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, dates=dates) for v in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return int(value) if isinstance(value, Int64) else value
    if isinstance(value, datetime):
        if not dates:
            return value
        return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).isoformat()
    if isinstance(value, (ObjectId, Decimal128, uuid.UUID, Code, MinKey, MaxKey)):
        return str(value)
    if isinstance(value, (bytes, Binary)):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, (Regex, re.Pattern)):
        return f"/{value.pattern}/"
    if isinstance(value, Timestamp):
        return {"t": value.time, "i": value.inc}
    if isinstance(value, DBRef):
        return json_safe(value.as_doc(), dates=dates)
    return str(value)


def saga_json(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A saga document as the API shows it: the domain model's JSON plus ``kind``."""
    out = saga_from_doc(dict(doc)).model_dump(mode="json")
    out["kind"] = doc.get("kind") or "orchestrated"
    return out


_STAGE_FIELDS = ("saga", "seq", "step", "bucket", "action", "op", "status", "req", "res", "meta", "compensates",
                 "started_at", "finished_at")  # fmt: skip


def stage_json(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A stage document as the API shows it (JSON-safe; ``undo`` included for recorded stages)."""
    out = {k: doc.get(k) for k in _STAGE_FIELDS if k in doc}
    out["saga"] = str(doc["saga"])
    out["id"] = f"{doc['saga']}:{doc['seq']}"
    if "undo" in doc:
        out["undo"] = doc["undo"]
    return json_safe(out, dates=True)


class RecordedStore:
    """The recorded-saga operations, on a :class:`MongoSagaStore`'s client and collections."""

    def __init__(self, store: MongoSagaStore) -> None:
        self.store = store
        self.client = store.client
        self.sagas = store.sagas
        self.stages = store.stages_col
        self.outbox = store.outbox

    # -- what a recorded saga's runner needs (essential.orchestration.ports.RecordedSagaStore) ---
    async def acquire_lease(self, saga_id: str, owner: str) -> Saga:
        return await self.store.acquire_lease(saga_id, owner)

    async def release(self, saga_id: str) -> None:
        await self.store.release(saga_id)

    async def request_abort(self, saga_id: str, reason: str) -> Saga:
        return await self.store.request_abort(saga_id, reason)

    async def lease_of(self, saga_id: str) -> tuple[int | None, str | None]:
        doc = await self.doc(saga_id)
        return doc.get("lease", {}).get("epoch"), doc.get("abort_requested")

    def json_safe(self, value: Any) -> Any:
        return json_safe(value)

    async def add_stage(
        self, saga_id: str, epoch: int, stage: Stage, event: Event, *, op: str, inverse: Inverse,
        meta: dict[str, Any], key: str | None, check_key: bool = True,
    ) -> tuple[dict[str, Any], bool]:  # fmt: skip
        """Record a reported stage (``stage.seq`` next) as the API shows it; a known ``key`` returns the
        stage it recorded.  ``check_key=False``: the caller knows the key is new (no look-up)."""
        doc = stage_to_doc(stage)
        doc["meta"] = {**meta, **doc["meta"]}
        doc.update(kind=RECORDED, op=op, undo=inverse.to_doc(), add_key=key)
        try:
            stored, created = await self._insert_stage(saga_id, epoch, doc, event, key=key, check_key=check_key)
        except UNSTORABLE as exc:  # what validation let through still never reaches the caller as a crash
            raise unstorable(exc, "<stage>") from None
        return stage_json(stored), created

    # -- transactions ------------------------------------------------------------------------
    async def _txn(self, saga_id: str, body: Callable[[AsyncClientSession], Awaitable[Any]]) -> Any:
        return await self.store.in_transaction(saga_id, body, "checkpoint of recorded saga")

    # -- sagas -------------------------------------------------------------------------------
    async def create(self, saga: Saga, event: Event) -> tuple[Saga, bool, str | None]:
        """Insert the open saga and its ``saga.started`` event: ``(saga, created, kind)``.

        A known id or idempotency key returns the saga stored under it (``created`` False,
        ``kind`` None for an orchestrated one): the caller decides whether the request repeats
        it.  A retry that collides with its own earlier, committed attempt counts as created;
        one that collides with someone else's saga never does.
        """
        doc = saga_to_doc(saga)
        doc["kind"] = RECORDED
        try:
            await self.store.insert_started(doc, event, "create recorded saga")
        except DuplicateKeyError:
            for _ in range(5):  # the colliding saga's transaction may not be visible yet
                existing = await self.sagas.find_one({"_id": doc["_id"]})
                if existing is None and saga.idempotency_key is not None:
                    existing = await self.store.doc_by_key(saga.idempotency_key)
                if existing is not None:
                    break
                await asyncio.sleep(0.05)
            else:
                raise
            if existing["_id"] == doc["_id"] and _same_insert(existing, doc):
                return saga, True, RECORDED  # our own attempt, committed before its acknowledgement was lost
            return saga_from_doc(existing), False, existing.get("kind")
        return saga, True, RECORDED

    async def doc(self, saga_id: str) -> dict[str, Any]:
        return await self.store.saga_doc(saga_id)

    async def collection_names(self, database: str) -> list[str]:
        """The collections of a service's database (to tell one that holds an Essential deployment)."""
        return await resilient(lambda: self.client[database].list_collection_names(), "list collections")

    async def kind(self, saga_id: str) -> str | None:
        """``"recorded"`` or None (orchestrated, or no such saga)."""
        try:
            key = oid(saga_id)
        except Exception:
            return None
        doc = await resilient(lambda: self.sagas.find_one({"_id": key}, {"kind": 1}), "read saga kind")
        return None if doc is None else doc.get("kind")

    async def transition(
        self, saga_id: str, epoch: int, fields: dict[str, Any], events: list[Event], *, unless_abort: bool = False
    ) -> dict[str, Any]:
        """Update the saga and append events; ``unless_abort`` raises :class:`AbortPending` if one was requested."""

        async def body(session: AsyncClientSession) -> dict[str, Any]:
            return await self.store.fenced_update(session, saga_id, epoch, fields, events, unless_abort=unless_abort)

        return await self._txn(saga_id, body)

    # -- stages ------------------------------------------------------------------------------
    async def _insert_stage(
        self, saga_id: str, epoch: int, stage: dict[str, Any], event: Event, *, key: str | None, check_key: bool
    ) -> tuple[dict[str, Any], bool]:

        async def body(session: AsyncClientSession) -> tuple[dict[str, Any], bool]:
            if key is not None and check_key:
                existing = await self.stages.find_one({"saga": oid(saga_id), "add_key": key}, session=session)
                if existing is not None:
                    return existing, False
            fields = {"seq": stage["seq"], "updatedAt": stage["finished_at"], "restore_attempts": 0}
            await self.store.fenced_update(session, saga_id, epoch, fields, [event], unless_abort=True)
            await self.stages.insert_one(dict(stage), session=session)
            return stage, True

        return await self._txn(saga_id, body)

    async def stage_docs(self, saga_id: str) -> list[dict[str, Any]]:
        async def read() -> list[dict[str, Any]]:
            return await self.stages.find({"saga": oid(saga_id)}).sort("seq", ASCENDING).to_list()

        return await resilient(read, "read stages")

    async def _undone(self, session: AsyncClientSession, saga_id: str, forward_seq: int) -> dict[str, Any] | None:
        return await self.stages.find_one(
            {"saga": oid(saga_id), "action": "compensate", "compensates": forward_seq, "status": "succeeded"},
            session=session,
        )

    async def undo_local(
        self,
        saga_id: str,
        epoch: int,
        forward_seq: int,
        stage: dict[str, Any],
        route: BucketRoute,
        inverse: Inverse,
        event: Event,
    ) -> dict[str, Any] | None:
        """Undo a stage in its bucket and record the compensate stage, in one transaction.

        Returns what the undo changed, or None when the stage was undone already.
        """
        assert route.database and route.collection
        collection = self.client[route.database][route.collection]

        async def body(session: AsyncClientSession) -> dict[str, Any] | None:
            if await self._undone(session, saga_id, forward_seq) is not None:
                return None
            await self.store.fenced_update(session, saga_id, epoch, {"seq": stage["seq"], "updatedAt": stage["finished_at"]}, [event])
            result = await apply_inverse(collection, inverse, session)
            await self.stages.insert_one({**stage, "res": result}, session=session)
            return result

        return await self._txn(saga_id, body)

    async def record_compensation(self, saga_id: str, epoch: int, forward_seq: int, stage: dict[str, Any],
                                  event: Event) -> bool:  # fmt: skip
        """Record a compensation done elsewhere (a remote bucket's service); False when recorded already."""

        async def body(session: AsyncClientSession) -> bool:
            if await self._undone(session, saga_id, forward_seq) is not None:
                return False
            await self.store.fenced_update(session, saga_id, epoch, {"seq": stage["seq"], "updatedAt": stage["finished_at"]}, [event])
            await self.stages.insert_one(dict(stage), session=session)
            return True

        return await self._txn(saga_id, body)

    # -- reading -----------------------------------------------------------------------------
    async def find_sagas(self, query: dict[str, Any], *, limit: int = 50, skip: int = 0) -> list[dict[str, Any]]:
        cursor = self.sagas.find(query).sort([("createdAt", DESCENDING), ("_id", DESCENDING)]).skip(skip).limit(limit)
        return await resilient(cursor.to_list, "list sagas")

    async def count_sagas(self, query: dict[str, Any]) -> int:
        return await resilient(lambda: self.sagas.count_documents(query), "count sagas")

    async def find_stages(self, query: dict[str, Any], *, limit: int = 200, skip: int = 0) -> list[dict[str, Any]]:
        cursor = self.stages.find(query).sort([("saga", ASCENDING), ("seq", ASCENDING)]).skip(skip).limit(limit)
        return await resilient(cursor.to_list, "list stages")


def _same_insert(stored: Mapping[str, Any], doc: Mapping[str, Any]) -> bool:
    """Is ``stored`` the document ``doc`` inserted (BSON keeps dates to the millisecond)?"""
    def ms(value: Any) -> Any:
        return value.replace(microsecond=value.microsecond // 1000 * 1000) if isinstance(value, datetime) else value

    return all(ms(stored.get(k)) == ms(doc.get(k)) for k in ("createdAt", "job", "ttl", "idempotency_key"))


def saga_query(filters: Mapping[str, Any]) -> dict[str, Any]:
    """MongoDB query of the listing filters: ``state`` (one or a list), ``job``, ``kind``, ``saga``/``id``,
    ``correlation_id``, and ranges ``createdAt``/``updatedAt`` as ``{"$gte": datetime, ...}``."""
    query: dict[str, Any] = {}
    states = filters.get("state")
    if states:
        query["state"] = {"$in": list(states)} if isinstance(states, (list, tuple)) else states
    for name in ("job", "correlation_id"):
        if filters.get(name):
            query[name] = filters[name]
    kind = filters.get("kind")
    if kind == RECORDED:
        query["kind"] = RECORDED
    elif kind == "orchestrated":
        query["kind"] = None
    for name in ("createdAt", "updatedAt"):
        if filters.get(name):
            query[name] = dict(filters[name])
    if filters.get("ids"):
        query["_id"] = {"$in": [oid(i) for i in filters["ids"]]}
    return query


def stage_query(filters: Mapping[str, Any]) -> dict[str, Any]:
    query: dict[str, Any] = {}
    if filters.get("saga"):
        query["saga"] = oid(filters["saga"])
    for name in ("bucket", "action", "status"):
        if filters.get(name):
            query[name] = filters[name]
    return query
