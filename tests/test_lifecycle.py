"""The lifecycle table: what it allows, what it refuses, and the helpers every writer uses."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest

from essential.orchestration.errors import IllegalTransition
from essential.orchestration.lifecycle import ALLOWED, MOVES, check_transition, may_move, parking, resumed_state
from essential.orchestration.models import Saga
from essential.orchestration.states import ENDED_STATES, LIVE_STATES, TERMINAL_STATES, EventType, SagaState

NOW = datetime(2026, 12, 1, tzinfo=timezone.utc)


def saga(state: SagaState, **fields: object) -> Saga:
    return Saga(job="j", ttl=60, state=state, createdAt=NOW, updatedAt=NOW, **fields)


def test_every_state_is_reachable_from_pending_and_every_live_state_can_end() -> None:
    seen, frontier = {SagaState.PENDING}, [SagaState.PENDING]
    while frontier:
        for nxt in ALLOWED[frontier.pop()] - seen:
            seen.add(nxt)
            frontier.append(nxt)
    assert seen == set(SagaState)
    for state in LIVE_STATES:
        assert ALLOWED[state] & ENDED_STATES, f"{state} has no way to end"


def test_aborted_is_final_and_completed_reopens_only_for_compensation() -> None:
    assert ALLOWED[SagaState.ABORTED] == frozenset()
    assert ALLOWED[SagaState.COMPLETED] == {SagaState.COMPENSATING}
    assert all(m.why for m in MOVES)


@pytest.mark.parametrize(
    ("source", "target"),
    [(SagaState.COMPLETED, SagaState.RUNNING), (SagaState.ABORTED, SagaState.COMPENSATING),
     (SagaState.PENDING, SagaState.COMPLETED), (SagaState.COMPENSATING, SagaState.COMPLETED),
     (SagaState.COMMITTING, SagaState.RUNNING)],
)  # fmt: skip
def test_a_move_the_table_does_not_list_is_refused_with_what_is_allowed(source: SagaState, target: SagaState) -> None:
    assert not may_move(source, target)
    with pytest.raises(IllegalTransition, match=f"from {source.value} to {target.value}"):
        check_transition(source, target)


def test_writing_a_state_again_is_always_allowed() -> None:
    for state in SagaState:
        check_transition(state, state)
        check_transition(state.value, state.value)


def test_parking_records_where_the_saga_was_and_says_why() -> None:
    fields, event = parking(saga(SagaState.COMPENSATING), "undo failed", NOW)
    assert fields["state"] == SagaState.PARKED and fields["parked_from"] == SagaState.COMPENSATING
    assert event.type == EventType.PARKED and event.state == SagaState.PARKED and event.data == {"reason": "undo failed"}
    with pytest.raises(IllegalTransition):
        parking(saga(SagaState.COMPLETED), "too late", NOW)


@pytest.mark.parametrize(
    ("parked_from", "back"),
    [(None, SagaState.RUNNING), (SagaState.PENDING, SagaState.RUNNING), (SagaState.WAITING, SagaState.WAITING),
     (SagaState.COMPENSATING, SagaState.COMPENSATING)],
)  # fmt: skip
def test_resume_goes_back_where_the_saga_was_parked_from(parked_from: SagaState | None, back: SagaState) -> None:
    assert resumed_state(saga(SagaState.PARKED, parked_from=parked_from)) == back


def test_ended_is_terminal_or_parked() -> None:
    assert ENDED_STATES == TERMINAL_STATES | {SagaState.PARKED}
    assert [s for s in SagaState if s.ended] == [s for s in SagaState if s in ENDED_STATES]
