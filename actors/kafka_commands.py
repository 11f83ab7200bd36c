"""The commands accepted on the command topic, and how raw Kafka bytes become one (or a dead letter).

Wire format: one JSON object per message, ``schema`` 1, discriminated by ``type``::

    {"schema": 1, "type": "start", "job": "order:fulfillment", "payload": {...},
     "ttl": 300, "idempotency_key": "order-42", "correlation_id": "c-1"}
    {"schema": 1, "type": "abort", "saga": "<24 hex>", "reason": "customer cancelled"}
    {"schema": 1, "type": "commit", "saga": "<24 hex>"}
    {"schema": 1, "type": "signal", "saga": "<24 hex>", "name": "identity.verified",
     "payload": {"approved": true}, "key": "review-7"}

Recorded sagas (the service does its own writes and reports them; Essential undoes
them on abort or TTL expiry), in order on one partition - key them by saga id::

    {"schema": 1, "type": "recorded.start", "ttl": 60, "id": "<24 hex, chosen by the service>",
     "job": "order:checkout", "correlation_id": "c-1"}
    {"schema": 1, "type": "recorded.add", "saga": "<24 hex>", "bucket": "shop.orders",
     "action": "INSERT_MANY", "req": {...}, "res": {"insertedIds": [{"$oid": "..."}]}, "key": "op-1"}
    {"schema": 1, "type": "commit", "saga": "<24 hex>"}      (or "abort")

``req``/``res``/``meta`` may use MongoDB Extended JSON (``{"$oid": ...}``, ``{"$date": ...}``)
so the documents Essential restores keep their BSON types.

``correlation_id`` and ``traceparent`` may also come as message headers.  The
content is only ever parsed as JSON and validated; nothing in it is unpickled,
imported or executed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

SagaId = Annotated[str, Field(pattern=r"^[0-9a-f]{24}$", description="the saga's id (24 hex digits)")]
Text = Annotated[str, Field(min_length=1, max_length=200)]


class _Command(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_version: Literal[1] = Field(1, alias="schema", description="wire format version")


class StartCommand(_Command):
    type: Literal["start"]
    job: Text
    payload: dict[str, Any] = Field(default_factory=dict)
    ttl: float | None = Field(default=None, gt=0)
    idempotency_key: Text | None = None
    correlation_id: Text | None = None
    traceparent: Text | None = None


class AbortCommand(_Command):
    type: Literal["abort"]
    saga: SagaId
    reason: str = Field("aborted by Kafka command", min_length=1, max_length=500)
    correlation_id: Text | None = None


class CommitCommand(_Command):
    type: Literal["commit"]
    saga: SagaId
    correlation_id: Text | None = None


class SignalCommand(_Command):
    """Deliver a signal to a saga (an approval, a callback); ``key`` (default: the message's identity) dedupes."""

    type: Literal["signal"]
    saga: SagaId
    name: Text
    payload: Any = None
    key: Text | None = None
    correlation_id: Text | None = None


# -- issue 5: recorded sagas ---------------------------------------------------------------------
class RecordedStartCommand(_Command):
    """Open a recorded saga; an ``id`` chosen by the service lets it add stages at once (a redelivery
    with the same id returns the same saga)."""

    type: Literal["recorded.start"]
    ttl: float = Field(gt=0)
    job: Text | None = None
    id: SagaId | None = None
    idempotency_key: Text | None = None
    correlation_id: Text | None = None
    traceparent: Text | None = None


class RecordedAddCommand(_Command):
    """Record a stage the service performed; ``key`` (default: the message's identity) dedupes."""

    type: Literal["recorded.add"]
    saga: SagaId
    bucket: Text
    action: Text
    req: Any = None
    res: Any = None
    meta: dict[str, Any] = Field(default_factory=dict)
    key: Text | None = None
    correlation_id: Text | None = None


Command = Annotated[
    Union[StartCommand, AbortCommand, CommitCommand, SignalCommand, RecordedStartCommand, RecordedAddCommand],
    Field(discriminator="type"),
]
_COMMAND: TypeAdapter[Command] = TypeAdapter(Command)


@dataclass(frozen=True)
class Rejection:
    """Why a message goes to the dead-letter topic: a stable ``code`` and a readable ``reason``."""

    code: str
    reason: str


# codes, stable for operators' dashboards and alerts
TOO_LARGE = "too_large"
NOT_JSON = "not_json"
INVALID_COMMAND = "invalid_command"
UNKNOWN_JOB = "unknown_job"
INVALID_PAYLOAD = "invalid_payload"
REJECTED = "rejected"
UNSUPPORTED = "unsupported"
GATEWAY_ERROR = "gateway_error"


def parse_command(
    value: bytes | None, max_bytes: int
) -> (
    StartCommand | AbortCommand | CommitCommand | SignalCommand | RecordedStartCommand | RecordedAddCommand | Rejection
):
    """Size check, then JSON, then the schema; never raises for bad input."""
    size = len(value or b"")
    if size > max_bytes:
        return Rejection(TOO_LARGE, f"message of {size} bytes exceeds the limit of {max_bytes} bytes")
    try:
        data = json.loads(value or b"")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return Rejection(NOT_JSON, f"not a JSON document: {exc}")
    if not isinstance(data, dict):
        return Rejection(INVALID_COMMAND, f"a command is a JSON object, not {type(data).__name__}")
    try:
        return _COMMAND.validate_python(data)
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in err['loc']) or '<command>'}: {err['msg']}" for err in exc.errors()[:10]
        ]
        return Rejection(INVALID_COMMAND, "invalid command: " + "; ".join(problems))
