"""Mapping between domain models and BSON documents.

Ids are ObjectIds in MongoDB and 24-hex strings in the domain; enums are stored
as their string values so other tools (mongosh, BI) read plain strings.
"""
from __future__ import annotations

from enum import Enum
from typing import Any

from bson import ObjectId

from essential.orchestration.models import Event, Saga, Signal, Stage
from essential.orchestration.states import SagaState


def plain(value: Any) -> Any:
    """Enums to their values, recursively, leaving datetimes and the rest to BSON."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def oid(saga_id: str | ObjectId) -> ObjectId:
    return saga_id if isinstance(saga_id, ObjectId) else ObjectId(saga_id)


def saga_to_doc(saga: Saga) -> dict[str, Any]:
    doc = plain(saga.model_dump(exclude={"id"}))
    doc["_id"] = oid(saga.id)
    doc["expiresAt"] = saga.deadline
    doc["events"] = 0
    return doc


def saga_from_doc(doc: dict[str, Any]) -> Saga:
    data = {k: v for k, v in doc.items() if k not in ("_id", "expiresAt", "events", "locks_held")}
    return Saga(id=str(doc["_id"]), **data)


def stage_to_doc(stage: Stage) -> dict[str, Any]:
    doc = plain(stage.model_dump())
    doc["saga"] = oid(stage.saga)
    return doc


def stage_from_doc(doc: dict[str, Any]) -> Stage:
    data = {k: v for k, v in doc.items() if k != "_id"}
    data["saga"] = str(doc["saga"])
    return Stage(**data)


def signal_to_doc(signal: Signal) -> dict[str, Any]:
    doc = plain(signal.model_dump(exclude={"id"}))
    doc["_id"] = oid(signal.id)
    doc["saga"] = oid(signal.saga)
    if doc.get("key") is None:
        doc.pop("key", None)  # the unique (saga, name, key) index covers keyed signals only
    return doc


def signal_from_doc(doc: dict[str, Any]) -> Signal:
    data = {k: v for k, v in doc.items() if k != "_id"}
    data["saga"] = str(doc["saga"])
    return Signal(id=str(doc["_id"]), **data)


def event_to_doc(event: Event, n: int) -> dict[str, Any]:
    """An outbox row: the Kafka topic, key and JSON body, plus relay bookkeeping."""
    body = event.model_dump(mode="json")
    body["schema"] = 1
    body["n"] = n
    return {
        "_id": oid(event.id),
        "topic": event.type.value,
        "key": event.saga,
        "saga": oid(event.saga),
        "n": n,
        "body": body,
        "headers": {
            k: v
            for k, v in {"correlation_id": event.correlation_id, "traceparent": event.traceparent}.items()
            if v
        },
        "createdAt": event.at,
        "sent_at": None,
    }


def state_and_job(state: SagaState | str | None, job: str | None) -> dict[str, Any]:
    """The sagas filter of a listing: by state (checked against the lifecycle's names) and job, if given."""
    query: dict[str, Any] = {}
    if state is not None:
        query["state"] = SagaState(state).value
    if job is not None:
        query["job"] = job
    return query
