"""One Ray actor per live saga (the default, "dedicated" placement).

The actor is a thin host: the state machine is :class:`orchestration.SagaRunner`
and the truth is in MongoDB.  Named ``saga:<id>`` in namespace ``essential`` so
operators find it in the dashboard, and so creating it twice is impossible.
"""
from __future__ import annotations

import asyncio
import os
from typing import Any

import ray

from essential.actors.names import actor_name
from essential.actors.sagas.hosting import EndNotice, drive
from essential.orchestration import SagaRunner

#: after its saga ends, how long an actor waits for the supervisor's ``run()`` call before leaving by itself
LOST_RUN_CALL_GRACE = 5.0


@ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)
class SagaActor:
    """Drives its saga from the moment it exists.

    Why not on a ``run()`` call: the supervisor that creates the actor may die before
    its call is delivered, and an idle actor under the saga's name would count as a
    running saga for ever. The constructor starts the saga; ``run()`` (sent right
    after creation) waits for it and then ends the actor. If that call never came,
    the actor ends itself once its saga is done.
    """

    def __init__(self, saga_id: str, job: str, settings: dict[str, Any], orchestrated: bool = False) -> None:
        self.saga_id = saga_id
        self.orchestrated = orchestrated
        self.job = job
        self.settings = settings
        self._runners: dict[str, SagaRunner] = {}
        self._pending_aborts: dict[str, str] = {}
        self._run_called = False
        self._driving = asyncio.get_running_loop().create_task(self._drive())

    def __repr__(self) -> str:
        # Ray captures this once: it is the dashboard label and the log prefix.
        return f"SagaActor(saga={self.saga_id}, job={self.job})"

    async def _drive(self) -> None:
        # forward_metrics: this process lives for one saga; its points go to the long-lived metrics actor
        ended = await drive(
            self.saga_id, self.settings, self._runners, self._pending_aborts,
            where=actor_name(self.saga_id), forward_metrics=True, orchestrated=self.orchestrated,
        )  # fmt: skip
        EndNotice(self.settings.get("namespace", "essential")).send(self.saga_id, ended)
        if not self._run_called:
            await asyncio.sleep(LOST_RUN_CALL_GRACE)
            if not self._run_called:  # its launcher died before asking: nobody will end this actor
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    async def run(self) -> str:
        """Wait until the saga is terminal (or parked, or handed on), then leave the cluster."""
        self._run_called = True
        await asyncio.shield(self._driving)
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

    # -- a recorded saga's add/commit/abort, decided by its runner in this actor ----------------
    async def recorded(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        from essential.actors.sagas.recorded_hosting import dispatch

        return await dispatch(self.saga_id, op, args, expect=True)
