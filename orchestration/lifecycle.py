"""The saga lifecycle as one table: which state may follow which, and who moves it there.

Every writer of a saga's state checks its move here (the orchestrated and the
recorded runner, the supervisor's parking, restores and resumes), so a state
change that the table does not allow is a bug that fails loudly instead of a
saga left somewhere no code expects.  ``docs/lifecycle.md`` is checked against
this table by a test.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, NamedTuple

from essential.orchestration.errors import IllegalTransition
from essential.orchestration.models import Event, Saga
from essential.orchestration.states import ENDED_STATES, LIVE_STATES, TERMINAL_STATES, EventType, SagaState

S = SagaState


class Move(NamedTuple):
    source: SagaState
    target: SagaState
    why: str


#: every allowed move (a state may always be written again unchanged)
MOVES: tuple[Move, ...] = (
    Move(S.PENDING, S.RUNNING, "the saga's runner starts it"),
    Move(S.PENDING, S.ABORTED, "its TTL expired before it was admitted (nothing ran: nothing to undo)"),
    Move(S.RUNNING, S.WAITING, "a step waits (signal, timer, child, lock) longer than it lingers"),
    Move(S.WAITING, S.RUNNING, "what it waited for happened, or it is due: relaunched"),
    Move(S.RUNNING, S.COMMITTING, "the last step succeeded (orchestrated) or commit was asked (recorded)"),
    Move(S.COMMITTING, S.COMPLETED, "the commit is recorded"),
    Move(S.RUNNING, S.COMPENSATING, "a step failed, an abort was asked for or the TTL passed"),
    Move(S.WAITING, S.COMPENSATING, "aborted or expired while waiting"),
    Move(S.COMPLETED, S.COMPENSATING, "a child saga's parent compensates it (a child's completion is provisional)"),
    Move(S.COMPENSATING, S.ABORTED, "every completed step is undone"),
    *(Move(state, S.PARKED, "needs a person: a compensation kept failing, restores kept failing, "
           "or its job version is not deployed") for state in sorted(LIVE_STATES)),
    Move(S.PARKED, S.RUNNING, "an operator resumed it"),
    Move(S.PARKED, S.WAITING, "an operator resumed it while it waits"),
    Move(S.PARKED, S.COMMITTING, "an operator resumed it while it commits"),
    Move(S.PARKED, S.COMPENSATING, "an operator resumed its compensation, or aborted it"),
)  # fmt: skip

ALLOWED: dict[SagaState, frozenset[SagaState]] = {
    state: frozenset(m.target for m in MOVES if m.source == state) for state in SagaState
}


def parking(saga: Saga, reason: str, at: datetime) -> tuple[dict[str, Any], Event]:
    """The change that parks ``saga`` (and its ``saga.parked`` event), for whichever writer parks it."""
    check_transition(saga.state, SagaState.PARKED)
    fields = {"state": SagaState.PARKED, "parked_reason": reason, "parked_from": saga.state, "updatedAt": at}
    return fields, Event.of(saga, EventType.PARKED, at=at, state=SagaState.PARKED, reason=reason)


def resumed_state(saga: Saga) -> SagaState:
    """Where an operator's resume puts a parked saga back: the state it was parked from
    (a saga parked before it started resumes running)."""
    back = saga.parked_from or SagaState.RUNNING
    if back == SagaState.PENDING:
        back = SagaState.RUNNING
    check_transition(SagaState.PARKED, back)
    return back


def may_move(source: SagaState | str, target: SagaState | str) -> bool:
    source, target = SagaState(source), SagaState(target)
    return source == target or target in ALLOWED[source]


def check_transition(source: SagaState | str, target: SagaState | str) -> None:
    """Raise :class:`IllegalTransition` for a move the lifecycle does not allow."""
    if not may_move(source, target):
        allowed = ", ".join(sorted(ALLOWED[SagaState(source)])) or "nothing (it is final)"
        raise IllegalTransition(f"a saga cannot go from {source} to {target}; from {source} it may go to {allowed}")


__all__ = [
    "ALLOWED", "ENDED_STATES", "LIVE_STATES", "MOVES", "Move", "TERMINAL_STATES", "check_transition", "may_move",
    "parking", "resumed_state",
]  # fmt: skip
