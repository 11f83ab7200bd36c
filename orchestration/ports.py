"""The interfaces the domain needs from the outside world.

``persistence`` implements :class:`SagaStore` on MongoDB; tests and other hosts
can provide their own.  Every write that takes an ``epoch`` is fenced: it must
raise :class:`~orchestration.errors.LeaseLost` when the saga's lease epoch is no
longer ``epoch``, so a stale runner can never overwrite a newer one.
"""
from __future__ import annotations

from typing import Any, Protocol

from .models import Event, Saga, Stage
from .states import SagaState


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

    async def write_ahead(self, saga_id: str, epoch: int, stage: Stage, fields: dict[str, Any]) -> None:
        """Insert a ``started`` stage and update the saga, in one transaction."""

    async def record_result(
        self, saga_id: str, epoch: int, stage: Stage, fields: dict[str, Any], events: list[Event]
    ) -> None:
        """Finish a stage, update the saga and append events, in one transaction."""

    async def transition(self, saga_id: str, epoch: int, fields: dict[str, Any], events: list[Event]) -> None:
        """Update the saga (state and timestamps) and append events, in one transaction."""

    async def request_abort(self, saga_id: str, reason: str) -> Saga:
        """Durably mark a live saga for abort (unfenced: any caller may ask)."""

    async def list(
        self, *, state: SagaState | None = None, job: str | None = None, limit: int = 50
    ) -> list[Saga]: ...


class RunnerObserver(Protocol):
    """Hooks for metrics and logs; called after the matching checkpoint is durable."""

    def stage_finished(self, saga: Saga, stage: Stage) -> None: ...

    def state_changed(self, saga: Saga, state: SagaState) -> None: ...
