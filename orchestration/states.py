"""Lifecycle vocabulary shared by every layer."""
from __future__ import annotations

from enum import StrEnum


class SagaState(StrEnum):
    """Saga lifecycle.

    The specification names pending, running, committing, aborted and completed.
    Three more say what an operator must know:

    * ``compensating`` – a failure, abort or TTL expiry was decided and the
      completed steps are being undone; the saga can no longer commit.
    * ``parked`` – the saga needs a person: a compensation kept failing or the
      saga could not be resumed.  Nothing touches it until an operator resumes
      or aborts it.
    * ``waiting`` – the saga is blocked on something outside it (a signal, a
      durable timer, a child saga, a bucket lock) and holds no actor: its
      ``waiting_for`` says what, its ``wake_at`` when the supervisor relaunches
      it at the latest (signal timeout, timer, TTL).  Whatever it waits for
      moves ``wake_at`` to now when it happens.  It goes back to ``running``
      when relaunched.
    """

    PENDING = "pending"
    RUNNING = "running"
    COMPENSATING = "compensating"
    COMMITTING = "committing"
    COMPLETED = "completed"
    ABORTED = "aborted"
    PARKED = "parked"
    WAITING = "waiting"

    @property
    def terminal(self) -> bool:
        """Completed or aborted: final, nothing will ever change it."""
        return self in TERMINAL_STATES

    @property
    def ended(self) -> bool:
        """No longer driven by anything: terminal, or parked until an operator acts (what callers wait for)."""
        return self in ENDED_STATES


TERMINAL_STATES = frozenset({SagaState.COMPLETED, SagaState.ABORTED})
#: the saga will not move until an operator resumes or aborts it; with the terminal states, what "ended" means
ENDED_STATES = TERMINAL_STATES | {SagaState.PARKED}
LIVE_STATES = frozenset(
    {SagaState.PENDING, SagaState.RUNNING, SagaState.WAITING, SagaState.COMPENSATING, SagaState.COMMITTING}
)
#: driven by an actor or host task right now (a waiting saga holds none; a pending one is about to)
ACTIVE_STATES = frozenset({SagaState.RUNNING, SagaState.COMPENSATING, SagaState.COMMITTING})
HOLDING_AN_ACTOR = ACTIVE_STATES | {SagaState.PENDING}


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
    WAIT = "wait"  # a signal, a durable timer or a child saga: the saga waits for it


class EventType(StrEnum):
    STARTED = "saga.started"
    STAGE_COMPLETED = "saga.stage.completed"
    ABORTED = "saga.aborted"
    COMPLETED = "saga.completed"
    PARKED = "saga.parked"
