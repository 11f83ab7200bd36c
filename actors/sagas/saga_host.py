"""Shared placement: a pool of long-lived host actors, each running many sagas as asyncio tasks.

Pooled placement uses the same actor, one saga at a time (the placement routes so).

A dedicated actor costs a process (~0.25 s CPU to start, ~100 MB); a host pays
that once and then runs sagas for the cost of a coroutine.  Same runner, same
store, same supervisor recovery: a host that dies loses only tasks, and the
supervisor restores their sagas from MongoDB on the hosts that remain.
"""
from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any

import ray

from essential.actors.expiring import ExpiringMap
from essential.actors.names import host_name
from essential.actors.sagas.hosting import Ended, EndNotice, drive
from essential.orchestration import SagaRunner


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=100_000)
class SagaHost:
    def __init__(self, index: int, settings: dict[str, Any], *, exclusive: bool = False) -> None:
        """``exclusive``: one saga at a time (pooled placement, which the supervisor's placement decides)."""
        self.index = index
        self.settings = settings
        self._tasks: dict[str, asyncio.Task] = {}
        self._runners: dict[str, SagaRunner] = {}
        # aborts for sagas not (yet) running here; one that never arrives must not stay for ever
        self._pending_aborts: Any = ExpiringMap(max_entries=10_000, idle=600.0)
        self.completed = 0
        self.peak = 0  # most sagas at once (pooled placement: 1)
        self.refused = 0  # pooled: launches refused because a saga was running here
        self.exclusive = exclusive
        self.placement = "pooled" if exclusive else "shared"  # what its stats and name in the dashboard say
        self._end_notice = EndNotice(settings.get("namespace", "essential"))
        # new each time Ray (re)starts this host: tells the supervisor the host died in between
        self.incarnation = uuid.uuid4().hex

    def __repr__(self) -> str:
        # captured once at creation by Ray; the live count is in stats() and the metrics
        return f"SagaHost(#{self.index}, {self.placement} placement)"

    async def run_saga(self, saga_id: str, orchestrated: bool = False) -> bool:
        """Start driving ``saga_id`` here unless it already runs here; returns immediately."""
        task = self._tasks.get(saga_id)
        if task is not None and not task.done():
            return False
        if self.exclusive and any(not t.done() for t in self._tasks.values()):
            # one saga at a time, whatever the supervisor's view (it may lag a finished or a
            # restored saga): the saga stays unplaced and the next sweep gives it a free host
            self.refused += 1
            return False
        task = asyncio.get_running_loop().create_task(
            drive(
                saga_id, self.settings, self._runners, self._pending_aborts,
                where=host_name(self.index), orchestrated=orchestrated,
            )  # fmt: skip
        )
        self._tasks[saga_id] = task
        self.peak = max(self.peak, len(self._tasks))
        task.add_done_callback(lambda done, sid=saga_id: self._done(sid, done))
        return True

    def _done(self, saga_id: str, task: asyncio.Task) -> None:
        self._tasks.pop(saga_id, None)
        self.completed += 1
        ended = None if task.cancelled() or task.exception() is not None else task.result()
        self._end_notice.send(saga_id, ended or Ended(None, None))

    async def abort(self, saga_id: str, reason: str) -> bool:
        runner = self._runners.get(saga_id)
        if runner is None:
            self._pending_aborts[saga_id] = reason
            return False
        runner.request_abort(reason)
        return True

    async def sagas(self) -> list[str]:
        return [sid for sid, task in self._tasks.items() if not task.done()]

    async def report(self) -> dict[str, Any]:
        """The sagas running here and this process's incarnation (what the supervisor's sweep reads)."""
        return {"incarnation": self.incarnation, "sagas": await self.sagas()}

    async def stats(self) -> dict[str, Any]:
        return {
            "index": self.index, "pid": os.getpid(), "live": len(self._tasks), "finished": self.completed,
            "peak": self.peak, "refused": self.refused, "placement": self.placement,
        }  # fmt: skip

    async def pid(self) -> int:
        return os.getpid()

    # -- a recorded saga's add/commit/abort, decided by its runner in this host ------------------
    async def recorded(self, saga_id: str, op: str, args: dict[str, Any]) -> dict[str, Any]:
        from essential.actors.sagas.recorded_hosting import dispatch

        task = self._tasks.get(saga_id)
        return await dispatch(saga_id, op, args, expect=task is not None and not task.done())
