"""The interfaces the domain needs from the outside world.

``persistence`` implements :class:`SagaStore` on MongoDB; tests and other hosts
can provide their own.  Every write that takes an ``epoch`` is fenced: it must
raise :class:`~essential.orchestration.errors.LeaseLost` when the saga's lease epoch is no
longer ``epoch``, so a stale runner can never overwrite a newer one.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from essential.orchestration.models import Event, Saga, Signal, Stage
from essential.orchestration.recorded import BucketRoute, Inverse
from essential.orchestration.states import SagaState

#: a bucket lock: (bucket, key)
LockClaim = tuple[str, str]

#: A checkpoint the runner folded into its next write: (finished stage or None for a
#: bare state change, saga fields, events).  Every fenced write takes ``carried=`` and
#: commits them, in order, in that same transaction, so a step costs one transaction.
Carried = tuple[Stage | None, dict[str, Any], list[Event]]


class SagaStore(Protocol):
    async def create(self, saga: Saga, event: Event) -> tuple[Saga, bool]:
        """Insert saga + its ``saga.started`` event atomically.

        Returns ``(saga, created)``; with an idempotency key that is already
        taken, returns the existing saga and ``False``.
        """

    async def get(self, saga_id: str) -> Saga: ...

    async def stages(self, saga_id: str) -> list[Stage]: ...

    async def acquire_lease(self, saga_id: str, owner: str) -> Saga:
        """Raise the lease epoch and become its owner; returns the saga as leased."""

    async def write_ahead(
        self,
        saga_id: str,
        epoch: int,
        stage: Stage,
        fields: dict[str, Any],
        *,
        locks: Sequence[LockClaim] = (),
        carried: Sequence[Carried] = (),
        unless_abort: bool = False,
    ) -> str | None:
        """Insert a ``started`` stage and update the saga, in one transaction.

        With ``unless_abort``, raise :class:`~essential.orchestration.errors.AbortPending`
        (and write nothing) when the saga has a durable abort request.

        With ``locks``, also take those bucket locks for the saga in the same
        transaction, or raise :class:`~essential.orchestration.errors.LockBusy` (and write
        nothing) when another live saga holds one.  Like every fenced write it
        returns the saga's durable abort request, if any (so a runner learns of
        an abort it was not told about).
        """

    async def write_ahead_many(
        self,
        saga_id: str,
        epoch: int,
        stages: list[Stage],
        fields: dict[str, Any],
        *,
        carried: Sequence[Carried] = (),
        unless_abort: bool = False,
    ) -> str | None:
        """Insert several ``started`` stages (a parallel group) and update the saga, in one transaction."""

    async def commit_with(
        self,
        saga_id: str,
        epoch: int,
        work: Callable[[Any], Awaitable[Carried]],
        *,
        carried: Sequence[Carried] = (),
        unless_abort: bool = False,
    ) -> str | None:
        """One fenced transaction around ``work(session)``: the writes it makes with ``session``
        commit together with the checkpoint it returns (a transactional step), or not at all.
        ``unless_abort``: refused (AbortPending, nothing committed) after a durable abort request."""

    async def record_result(
        self,
        saga_id: str,
        epoch: int,
        stage: Stage,
        fields: dict[str, Any],
        events: list[Event],
        *,
        carried: Sequence[Carried] = (),
    ) -> str | None:
        """Finish a stage, update the saga and append events, in one transaction."""

    async def transition(
        self, saga_id: str, epoch: int, fields: dict[str, Any], events: list[Event], *, carried: Sequence[Carried] = ()
    ) -> str | None:
        """Update the saga (state and timestamps) and append events, in one transaction.

        A terminal state also releases the saga's bucket locks (waking sagas
        waiting for them) and wakes a parent waiting for this saga.
        """

    async def request_abort(self, saga_id: str, reason: str) -> Saga:
        """Durably mark a live saga for abort (unfenced: any caller may ask)."""

    async def list(
        self, *, state: SagaState | None = None, job: str | None = None, limit: int = 50
    ) -> list[Saga]: ...

    # -- waiting: signals, child sagas, locks ------------------------------------------
    async def signals(self, saga_id: str, name: str) -> list[Signal]:
        """Signals of that name delivered to the saga, oldest first."""

    async def wake(self, saga_id: str, waiting_for: str | None = None) -> bool:
        """If the saga is waiting (for ``waiting_for``, when given), make it due now."""

    async def by_idempotency_key(self, key: str) -> Saga | None: ...

    async def reopen_for_compensation(self, saga_id: str, reason: str) -> Saga:
        """A completed child saga whose parent compensates: back to ``compensating``."""

    async def lock_free(self, bucket: str, key: str, saga_id: str) -> bool:
        """Could ``saga_id`` take the lock now (free, its own, or held by a saga that ended)?"""

    async def add_lock_waiter(self, bucket: str, key: str, saga_id: str) -> bool:
        """Ask to be woken when the lock is released; False when it is not held by another saga."""

    async def remove_lock_waiter(self, bucket: str, key: str, saga_id: str) -> None:
        """No longer waiting for the lock (taken, given up, stopped)."""

    async def lock_cycle(self, bucket: str, key: str, saga_id: str) -> list[str] | None:
        """The sagas ``saga_id`` would wait for in a circle by waiting for this lock, else None."""


class RunnerObserver(Protocol):
    """Hooks for metrics and logs; called after the matching checkpoint is durable."""

    def stage_finished(self, saga: Saga, stage: Stage) -> None: ...

    def state_changed(self, saga: Saga, state: SagaState) -> None: ...


@dataclass(frozen=True)
class Undone:
    """How one recorded stage's undo went: done (with what the undo returned), or why it could not be."""

    ok: bool
    result: Any = None
    reason: str = ""


class RecordedSagaStore(Protocol):
    """What a recorded saga's runner needs from storage; the stored stages keep their inverse."""

    async def acquire_lease(self, saga_id: str, owner: str) -> Saga: ...

    async def release(self, saga_id: str) -> None: ...

    async def request_abort(self, saga_id: str, reason: str) -> Saga:
        """Durable first: a runner that dies after this is restored compensating, not open."""

    async def lease_of(self, saga_id: str) -> tuple[int | None, str | None]:
        """The saga's current lease epoch and durable abort request (what the open saga re-reads)."""

    async def transition(
        self, saga_id: str, epoch: int, fields: dict[str, Any], events: list[Event], *, unless_abort: bool = False
    ) -> None: ...

    async def add_stage(
        self, saga_id: str, epoch: int, stage: Stage, event: Event, *, op: str, inverse: Inverse,
        meta: dict[str, Any], key: str | None, check_key: bool,
    ) -> tuple[dict[str, Any], bool]:  # fmt: skip
        """Record a reported stage (fenced, refused with AbortPending after an abort): ``(the stored
        stage as JSON, created)``; a known ``key`` returns the stage it recorded."""

    async def stage_docs(self, saga_id: str) -> list[Mapping[str, Any]]:
        """Every stored stage of the saga, as :func:`~essential.orchestration.recorded.undo_plan` reads them."""

    def json_safe(self, value: Any) -> Any:
        """A stored value as plain JSON (what a stage's ``req``/``res``/``meta`` are shown as)."""


class RecordedUndo(Protocol):
    """Carries out a recorded stage's inverse where its bucket lives (a database, or a service over Kafka)."""

    async def refusal(self, route: BucketRoute) -> str | None:
        """Why the inverse must not run where the bucket resolves now, or None."""

    async def undo(
        self, saga: Saga, epoch: int, forward: Mapping[str, Any], stage: Stage, route: BucketRoute, inverse: Inverse,
        event: Event,
    ) -> Undone:  # fmt: skip
        """Undo ``forward`` and record ``stage`` (its compensation) with ``event``, fenced on ``epoch``."""
