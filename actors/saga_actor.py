"""One Ray actor per live saga (the default, "dedicated" placement).

The actor is a thin host: the state machine is :class:`orchestration.SagaRunner`
and the truth is in MongoDB.  Named ``saga:<id>`` in namespace ``essential`` so
operators find it in the dashboard, and so creating it twice is impossible.
"""
from __future__ import annotations

import os
from typing import Any

import ray

from orchestration import SagaRunner

from .hosting import EndNotice, drive


def actor_name(saga_id: str) -> str:
    return f"saga:{saga_id}"


@ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)
class SagaActor:
    def __init__(self, saga_id: str, job: str, settings: dict[str, Any], orchestrated: bool = False) -> None:
        self.saga_id = saga_id
        self.orchestrated = orchestrated
        self.job = job
        self.settings = settings
        self._runners: dict[str, SagaRunner] = {}
        self._pending_aborts: dict[str, str] = {}
        self._started = False

    def __repr__(self) -> str:
        # Ray captures this once: it is the dashboard label and the log prefix.
        return f"SagaActor(saga={self.saga_id}, job={self.job})"

    async def run(self) -> str:
        """Drive the saga to a terminal (or parked) state, then leave the cluster."""
        if self._started:
            return "already running"
        self._started = True
        # forward_metrics: this process lives for one saga; its points go to the long-lived metrics actor
        saga = await drive(
            self.saga_id, self.settings, self._runners, self._pending_aborts,
            where=actor_name(self.saga_id), forward_metrics=True, orchestrated=self.orchestrated,
        )  # fmt: skip
        EndNotice(self.settings.get("namespace", "essential")).send(self.saga_id, saga)
        ray.actor.exit_actor()
        return "exited"  # not reached: exit_actor raises

    async def abort(self, reason: str) -> None:
        runner = self._runners.get(self.saga_id)
        if runner is None:
            self._pending_aborts[self.saga_id] = reason
        else:
            runner.request_abort(reason)

    async def pid(self) -> int:
        return os.getpid()

    async def ping(self) -> bool:
        """Answers only while this process's event loop runs: how the supervisor tells a hung actor."""
        return True

    # -- issue 5: a recorded saga's add/commit/abort, decided by its runner in this actor --------
    async def recorded(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        from .recorded import dispatch

        return await dispatch(self.saga_id, op, args, expect=True)
