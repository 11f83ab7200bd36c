"""One Ray actor per live saga.

The actor is a thin host: the state machine is :class:`orchestration.SagaRunner`
and the truth is in MongoDB.  Named ``saga:<id>`` in namespace ``essential`` so
operators find it in the dashboard, and so creating it twice is impossible.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import ray

from orchestration import LeaseLost, SagaRunner

from .runtime import get_runtime

log = logging.getLogger("essential.saga_actor")


def actor_name(saga_id: str) -> str:
    return f"saga:{saga_id}"


@ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)
class SagaActor:
    def __init__(self, saga_id: str, job: str, settings: dict[str, Any]) -> None:
        self.saga_id = saga_id
        self.job = job
        self.settings = settings
        self.runner: SagaRunner | None = None
        self._pending_abort: str | None = None
        self._started = False

    def __repr__(self) -> str:
        # Ray captures this once: it is the dashboard label and the log prefix.
        return f"SagaActor(saga={self.saga_id}, job={self.job})"

    async def run(self) -> str:
        """Drive the saga to a terminal (or parked) state, then leave the cluster."""
        if self._started:
            return "already running"
        self._started = True
        try:
            runtime = await get_runtime(self.settings)
            ctx = ray.get_runtime_context()
            owner = f"{ctx.get_node_id()[:12]}:{os.getpid()}:{ctx.get_actor_id()}"
            self.runner = SagaRunner(self.saga_id, store=runtime.store, registry=runtime.registry, owner=owner)
            if self._pending_abort:
                self.runner.request_abort(self._pending_abort)
            try:
                await self.runner.run()
            finally:
                await runtime.store.release(self.saga_id)
        except LeaseLost as exc:
            log.warning("%s", exc)
        except Exception:
            # Leave rather than linger: the supervisor restores the saga from its
            # last checkpoint in a fresh actor (and parks it if that keeps failing).
            log.exception("saga %s: runner failed; exiting for the supervisor to restore", self.saga_id)
        ray.actor.exit_actor()
        return "exited"  # not reached: exit_actor raises

    async def abort(self, reason: str) -> None:
        if self.runner is None:
            self._pending_abort = reason
        else:
            self.runner.request_abort(reason)

    async def pid(self) -> int:
        return os.getpid()
