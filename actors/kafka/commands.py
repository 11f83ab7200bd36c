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
imported or executed.  Every check that bad input can fail is made here, before
anything is called or stored, and each failure is a :class:`Rejection` whose
``code`` says which kind of problem it is (stable, for dashboards) and whose
``reason`` names the field: values MongoDB could not store (integers past
64 bits, NUL or ``$`` in keys, lone surrogates) and nesting past
:data:`essential.orchestration.storable.MAX_DEPTH` never reach the supervisor.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, Strict, TypeAdapter, ValidationError

from essential.actors.errors import dead_letter_code
from essential.orchestration import storable
from essential.orchestration.errors import field_problems
from essential.orchestration.recorded import MAX_TTL as MAX_RECORDED_TTL
from essential.orchestration.requests import MAX_TTL_SECONDS

SagaId = Annotated[str, Field(pattern=r"^[0-9a-f]{24}$", description="the saga's id (24 hex digits)")]
Text = Annotated[str, Field(min_length=1, max_length=200)]
#: seconds, a JSON number (never a boolean or a string), finite
Seconds = Annotated[float, Strict()]


class _Command(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_version: Literal[1] = Field(1, alias="schema", description="wire format version")


class StartCommand(_Command):
    type: Literal["start"]
    job: Text
    payload: dict[str, Any] = Field(default_factory=dict)
    ttl: Seconds | None = Field(default=None, gt=0, le=MAX_TTL_SECONDS, allow_inf_nan=False)
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


class RecordedStartCommand(_Command):
    """Open a recorded saga; an ``id`` chosen by the service lets it add stages at once (a redelivery
    with the same id returns the same saga)."""

    type: Literal["recorded.start"]
    ttl: Seconds = Field(gt=0, le=MAX_RECORDED_TTL, allow_inf_nan=False)
    job: Text | None = None
    id: SagaId | None = None
    idempotency_key: Text | None = None
    correlation_id: Text | None = None
    traceparent: Text | None = None


class RecordedAddCommand(_Command):
    """Record a stage the service performed; ``key`` (default: the message's identity) dedupes.

    ``req``/``res``/``meta`` may be MongoDB Extended JSON, so ``$`` keys are checked only once
    they are converted (see :mod:`essential.actors.kafka.command_handler`)."""

    type: Literal["recorded.add"]
    saga: SagaId
    bucket: Text
    action: Text
    req: Any = None
    res: Any = None
    meta: dict[str, Any] = Field(default_factory=dict)
    key: Text | None = None
    correlation_id: Text | None = None


AnyCommand = Union[StartCommand, AbortCommand, CommitCommand, SignalCommand, RecordedStartCommand, RecordedAddCommand]
Command = Annotated[AnyCommand, Field(discriminator="type")]
_COMMAND: TypeAdapter[Command] = TypeAdapter(Command)


@dataclass(frozen=True)
class Rejection:
    """Why a message goes to the dead-letter topic: a stable ``code`` and a readable ``reason``."""

    code: str
    reason: str


# codes, stable for operators' dashboards and alerts (a typed error's code is the contract's)
TOO_LARGE = "too_large"  # the value exceeds ESSENTIAL_KAFKA_MAX_COMMAND_BYTES
NOT_JSON = "not_json"  # no value, not UTF-8, not JSON
TOO_DEEP = "too_deep"  # nested deeper than MongoDB documents may be
NOT_STORABLE = "not_storable"  # a value MongoDB cannot store as given
INVALID_COMMAND = dead_letter_code("InvalidRequest")  # the schema: type, fields, their types and ranges
UNKNOWN_JOB = dead_letter_code("UnknownJob")
INVALID_PAYLOAD = dead_letter_code("InvalidPayload")  # the job's payload model refused it
SAGA_NOT_FOUND = dead_letter_code("SagaNotFound")
ILLEGAL_TRANSITION = dead_letter_code("IllegalTransition")
IDEMPOTENCY_KEY_REUSED = dead_letter_code("IdempotencyKeyReused")  # a key already used with another request
UNKNOWN_COMMAND = "unknown_command"  # a reply to a command this deployment never sent
REJECTED = dead_letter_code("")  # refused by the supervisor for another reason
UNSUPPORTED = "unsupported"
UNREADABLE = "unreadable_record"  # the Kafka client cannot decode the record at all
GAVE_UP = "gave_up"  # transient failures past ESSENTIAL_KAFKA_RETRY_SECONDS
GATEWAY_ERROR = "gateway_error"  # an unexpected error: a bug to report, the message to replay once fixed

#: nesting a whole command may have: the payload sits one level below the command
MAX_COMMAND_DEPTH = storable.MAX_DEPTH + 1


def load_json(value: bytes | None, max_bytes: int, what: str = "command") -> Any:
    """The JSON document in ``value``, or a :class:`Rejection`; never raises for bad input."""
    if not value:
        return Rejection(NOT_JSON, f"the message has no value (empty or a tombstone); a {what} is a JSON object")
    if len(value) > max_bytes:
        return Rejection(TOO_LARGE, f"message of {len(value)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        data = json.loads(value)
    except RecursionError:
        return Rejection(TOO_DEEP, f"nested deeper than the JSON parser allows; a {what} may be nested at most "
                                   f"{MAX_COMMAND_DEPTH} levels")  # fmt: skip
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return Rejection(NOT_JSON, f"not a JSON document: {exc}")
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        return Rejection(NOT_STORABLE, f"a value that cannot be read: {exc}")
    if storable.depth_exceeds(data, MAX_COMMAND_DEPTH):
        return Rejection(TOO_DEEP, f"nested deeper than {MAX_COMMAND_DEPTH} levels (MongoDB documents are limited)")
    surrogate = lone_surrogate(data)
    if surrogate:
        return Rejection(NOT_STORABLE, f"{surrogate}: text with a lone surrogate cannot be stored as UTF-8")
    return data


def parse_command(value: bytes | None, max_bytes: int) -> AnyCommand | Rejection:
    """Size, JSON, depth, schema, then what MongoDB can store; never raises for bad input."""
    data = load_json(value, max_bytes)
    if isinstance(data, Rejection):
        return data
    if not isinstance(data, dict):
        return Rejection(INVALID_COMMAND, f"a command is a JSON object, not {type(data).__name__}")
    try:
        command = _COMMAND.validate_python(data)
    except ValidationError as exc:
        return Rejection(INVALID_COMMAND, "invalid command: " + "; ".join(validation_problems(exc, "<command>")))
    if isinstance(command, (StartCommand, SignalCommand)):
        found = storable.problems(command.payload)
        if found:
            return Rejection(NOT_STORABLE, "; ".join(found))
    return command


def validation_problems(exc: ValidationError, root: str) -> list[str]:
    return [f"{field}: {reason}" for field, reason in field_problems(exc, root, limit=10)]


def lone_surrogate(value: Any, where: str = "<command>") -> str | None:
    """The path of the first key or string holding a lone UTF-16 surrogate (iterative; None if none)."""
    stack: list[tuple[Any, str]] = [(value, where)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if not item.isascii() and _has_surrogate(item):
                return path
        elif isinstance(item, dict):
            for key, child in item.items():
                if isinstance(key, str) and not key.isascii() and _has_surrogate(key):
                    return f"{path}: key {key.encode('utf-8', 'backslashreplace').decode()!r}"
                stack.append((child, f"{path}.{key}"))
        elif isinstance(item, list):
            stack.extend((child, f"{path}.{i}") for i, child in enumerate(item))
    return None


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
