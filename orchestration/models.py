"""Saga and Stage documents as the specification names them.

Ids are 24-hex strings here; the persistence layer maps them to ObjectId so
this layer stays free of BSON.
"""
from __future__ import annotations

import secrets
import time
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from essential.orchestration.states import Action, EventType, SagaState, StageStatus


def new_id() -> str:
    """An ObjectId-shaped id (4-byte time, 8 random bytes) without importing bson."""
    return f"{int(time.time()):08x}{secrets.token_hex(8)}"


class Lease(BaseModel):
    owner: str | None = None
    epoch: int = 0


class Saga(BaseModel):
    model_config = ConfigDict(use_enum_values=False, populate_by_name=True)

    id: str = Field(default_factory=new_id)
    ttl: float = Field(gt=0, description="seconds from createdAt until the saga is aborted")
    job: str
    version: int = 1
    state: SagaState = SagaState.PENDING
    session: str | None = Field(default=None, description="MongoDB session id of the atomic writes")
    pruned_at: datetime | None = None
    aborted_at: datetime | None = None
    committed_at: datetime | None = None
    createdAt: datetime
    updatedAt: datetime
    # -- beyond the specification's summary fields: what the runner needs to resume
    payload: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: str | None = None
    correlation_id: str | None = None
    traceparent: str | None = None
    cursor: int = 0
    seq: int = 0
    abort_requested: str | None = None
    error: str | None = None
    lease: Lease = Field(default_factory=Lease)
    restore_attempts: int = 0
    parked_reason: str | None = None
    parked_from: SagaState | None = None
    # -- waiting (signals, durable timers, child sagas, bucket locks)
    waiting_for: str | None = Field(
        default=None, description="what a waiting saga waits for: signal:<name>, timer:<step>, child:<id>, lock:<bucket>:<key>"
    )
    wake_at: datetime | None = Field(default=None, description="when the supervisor relaunches a waiting saga at the latest")
    # -- child sagas
    parent: str | None = Field(default=None, description="the saga whose step started this one")
    parent_seq: int | None = Field(default=None, description="seq of the parent's stage that started this one")

    @property
    def deadline(self) -> datetime:
        return self.createdAt + timedelta(seconds=self.ttl)


class StageMeta(BaseModel):
    idempotency_key: str
    correlation_id: str | None = None
    traceparent: str | None = None
    retry_count: int = 0
    errors: list[str] = Field(default_factory=list)
    duration_ms: float | None = None
    group: str | None = Field(default=None, description="parallel group the stage ran in")
    wake_at: datetime | None = Field(
        default=None, description="a waiting stage resumes by then at the latest (timer, retry later, signal timeout)"
    )
    signal_id: str | None = Field(default=None, description="the signal a wait consumed")
    child: str | None = Field(default=None, description="the child saga a step started")
    locks: list[str] = Field(default_factory=list, description="bucket locks taken with the stage, as bucket:key")


class Stage(BaseModel):
    saga: str
    seq: int
    step: str
    bucket: str
    action: Action
    status: StageStatus = StageStatus.STARTED
    req: Any = None
    res: Any = None
    meta: StageMeta
    compensates: int | None = Field(default=None, description="seq of the forward stage undone")
    started_at: datetime
    finished_at: datetime | None = None


class Signal(BaseModel):
    """Something that happened outside a saga, delivered to it by name (an approval, a callback)."""

    id: str = Field(default_factory=new_id)
    saga: str
    name: str
    payload: Any = None
    key: str | None = Field(default=None, description="deduplicates repeated deliveries of one signal")
    at: datetime


class Event(BaseModel):
    """A lifecycle event bound for the outbox, written in the same transaction."""

    id: str = Field(default_factory=new_id)
    type: EventType
    saga: str
    job: str
    state: SagaState
    at: datetime
    correlation_id: str | None = None
    traceparent: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def of(cls, saga: "Saga", type_: EventType, *, at: datetime, state: SagaState | None = None, **data: Any) -> "Event":
        """The event ``type_`` of ``saga`` (in ``state``, else its own), carrying its correlation and trace.

        Every writer builds its events here, so each one names the saga the same way
        whoever wrote it; ``data`` entries that are None are left out.
        """
        return cls(
            type=type_, saga=saga.id, job=saga.job, state=state or saga.state, at=at,
            correlation_id=saga.correlation_id, traceparent=saga.traceparent,
            data={k: v for k, v in data.items() if v is not None},
        )  # fmt: skip
