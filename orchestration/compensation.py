"""Which completed stages must be undone, and in what order.

Order is by stage ``seq``, latest first.  A parallel group's members get their
seqs together, after every step before the group and before every step after
it, so the group is undone after the later steps and before the earlier ones
(its members among themselves latest seq first).
"""
from __future__ import annotations

from essential.orchestration.models import Stage
from essential.orchestration.states import Action, StageStatus


def is_deferred(stage: Stage) -> bool:
    """A round of a step that raised ``RetryLater``: it had no effect and runs again later."""
    return (
        stage.action != Action.COMPENSATE
        and stage.status == StageStatus.FAILED
        and isinstance(stage.res, dict)
        and stage.res.get("outcome") == "deferred"
    )


def needs_compensation(stage: Stage) -> bool:
    """Succeeded forward stages, and forward stages whose outcome is unknown.

    A stage that failed by timeout (or was written ahead and never finished)
    may have taken effect at the participant, so its compensation runs too;
    compensations are keyed by the stage's idempotency key and must tolerate
    finding nothing to undo.
    """
    if stage.action == Action.COMPENSATE:
        return False
    if stage.status == StageStatus.SUCCEEDED:
        return True
    if stage.status == StageStatus.STARTED:
        return True
    return bool(stage.res and isinstance(stage.res, dict) and stage.res.get("outcome") == "unknown")


def compensation_plan(stages: list[Stage]) -> list[Stage]:
    """Forward stages still to undo, latest first, skipping ones already undone."""
    undone = {
        s.compensates
        for s in stages
        if s.action == Action.COMPENSATE and s.status == StageStatus.SUCCEEDED
    }
    todo = [s for s in stages if needs_compensation(s) and s.seq not in undone]
    return sorted(todo, key=lambda s: s.seq, reverse=True)


def open_compensation(stages: list[Stage], forward_seq: int) -> Stage | None:
    """A compensate stage written ahead for ``forward_seq`` but not finished (crash)."""
    for s in stages:
        if s.action == Action.COMPENSATE and s.compensates == forward_seq and s.status == StageStatus.STARTED:
            return s
    return None
