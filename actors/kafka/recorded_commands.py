"""Recorded-saga commands from Kafka (``commit``, ``recorded.start``, ``recorded.add``) applied through the supervisor."""
from __future__ import annotations

from datetime import timezone
from typing import Any

from bson import json_util

from essential.actors.errors import dead_letter_code
from essential.actors.kafka.commands import INVALID_COMMAND, UNSUPPORTED, Rejection
from essential.orchestration.errors import IdempotencyKeyReused, SagaIdReused, StoreUnavailable, raise_for_error

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
    if command.type == "commit":
        reply = await supervisor.recorded.remote("commit", command.saga)
        error = reply.get("error")
        if error and (error["type"] == "SagaNotFound" or "orchestrated" in error["message"]):
            return Rejection(UNSUPPORTED, f"commit applies to recorded sagas only: {error['message']}")
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
            raise_for_error(reply)  # raises: not the command's fault, so the gateway tries it again
        invalid = ("InvalidField", IdempotencyKeyReused.__name__, SagaIdReused.__name__)
        code = INVALID_COMMAND if error["type"] in invalid else dead_letter_code(error["type"])
        return Rejection(code, error["message"])
    return reply["saga"]["id"] if "saga" in reply else command.saga
