"""Validation of start requests, shared by every entry point (client, CLI, Kafka, HTTP)."""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import ConfigDict, Field, Strict, field_validator

from essential.orchestration import storable
from essential.orchestration.clock import Clock
from essential.orchestration.models import Event, Saga
from essential.orchestration.registry import JobRegistry
from essential.orchestration.states import EventType, SagaState
from essential.orchestration.validated import Validated

#: the longest time-to-live a saga may ask for (ten years): past it, deadlines leave the calendar
MAX_TTL_SECONDS = 10 * 366 * 24 * 3600.0


class StartRequest(Validated):
    WHAT = "start request"
    # strict where a wrong type is the caller's mistake: ``"ttl": true`` is refused, never read as 1 s
    model_config = ConfigDict(extra="forbid", strict=True)

    job: str = Field(min_length=1, max_length=200, description="registered job name, e.g. order:fulfillment")
    payload: dict[str, Any] = Field(default_factory=dict)
    ttl: Annotated[float, Strict()] | None = Field(
        default=None, gt=0, le=MAX_TTL_SECONDS, allow_inf_nan=False, description="seconds; the job's default when omitted"
    )
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)
    correlation_id: str | None = Field(default=None, max_length=200)
    traceparent: str | None = Field(default=None, max_length=200)

    @field_validator("payload")
    @classmethod
    def _storable(cls, value: dict[str, Any]) -> dict[str, Any]:
        found = storable.problems(value)
        if found:
            raise ValueError("; ".join(found))
        return value



def same_request(saga: Saga, request: Saga) -> bool:
    """Does ``request`` (a saga built from a repeated start) ask for what ``saga`` was started with?

    Used when an idempotency key is reused: the same key with other parameters is
    the caller's mistake and is refused (as payment APIs do), never answered with
    the first saga as if it were this one. A pruned saga no longer has its payload,
    so only its job can be compared."""
    if saga.job != request.job:
        return False
    if saga.pruned_at is not None:
        return True
    return saga.payload == request.payload and saga.ttl == request.ttl


def build_saga(request: StartRequest, registry: JobRegistry, clock: Clock) -> tuple[Saga, Event]:
    """Turn a valid request into a pending saga and its ``saga.started`` event.

    Raises :class:`UnknownJob` or :class:`InvalidPayload` before anything is stored.
    """
    job = registry.get(request.job)
    payload = job.validate_payload(request.payload)
    now = clock.now()
    saga = Saga(
        ttl=request.ttl or job.ttl,
        job=job.name,
        version=job.version,
        state=SagaState.PENDING,
        createdAt=now,
        updatedAt=now,
        payload=payload.model_dump(mode="json"),
        idempotency_key=request.idempotency_key,
        correlation_id=request.correlation_id,
        traceparent=request.traceparent,
    )
    event = Event.of(saga, EventType.STARTED, at=now, version=saga.version, ttl=saga.ttl)
    return saga, event
