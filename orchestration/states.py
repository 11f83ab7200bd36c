"""Lifecycle vocabulary shared by every layer."""
from __future__ import annotations

from enum import StrEnum


class SagaState(StrEnum):
    """Saga lifecycle.

    The specification names pending, running, committing, aborted and completed.
    Two more say what an operator must know:

    * ``compensating`` – a failure, abort or TTL expiry was decided and the
      completed steps are being undone; the saga can no longer commit.
    * ``parked`` – the saga needs a person: a compensation kept failing or the
      saga could not be resumed.  Nothing touches it until an operator resumes
      or aborts it.
    """

    PENDING = "pending"
    RUNNING = "running"
    COMPENSATING = "compensating"
    COMMITTING = "committing"
    COMPLETED = "completed"
    ABORTED = "aborted"
    PARKED = "parked"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({SagaState.COMPLETED, SagaState.ABORTED})
LIVE_STATES = frozenset(
    {SagaState.PENDING, SagaState.RUNNING, SagaState.COMPENSATING, SagaState.COMMITTING}
)


class StageStatus(StrEnum):
    STARTED = "started"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class Action(StrEnum):
    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"
    COMPENSATE = "compensate"
    READ = "read"
    COMMAND = "command"


class EventType(StrEnum):
    STARTED = "saga.started"
    STAGE_COMPLETED = "saga.stage.completed"
    ABORTED = "saga.aborted"
    COMPLETED = "saga.completed"
    PARKED = "saga.parked"
