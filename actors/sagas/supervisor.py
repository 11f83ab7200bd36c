"""The supervisor: the control plane every client talks to, and the sweeper.

Clients only need Ray: start/abort/status/list go through this singleton actor,
which validates requests, writes the saga and places it.  Its periodic sweep
(:class:`~essential.actors.sagas.sweep.Sweep`, Ray-free) restores sagas whose actor
died, aborts sagas past their TTL, and admits pending sagas while live saga actors
are under the limit.
"""
from __future__ import annotations

import asyncio
import logging
import traceback
from datetime import datetime, timezone
from typing import Any

import ray

from essential.actors import metrics, tracing
from essential.actors.names import SUPERVISOR_NAME
from essential.actors.sagas.placement import Placement
from essential.actors.sagas.runtime import Runtime, get_runtime
from essential.actors.sagas.sweep import Sweep
from essential.actors.sagas.waiters import EndWatch
from essential.actors.settings import Settings, settings_from
from essential.orchestration import (
    EssentialError,
    IdempotencyKeyReused,
    InvalidRequest,
    Saga,
    SagaState,
    StartRequest,
    SystemClock,
    build_saga,
)
from essential.orchestration.errors import envelope
from essential.orchestration.requests import same_request
from essential.orchestration.signals import SignalRequest
from essential.orchestration.states import TERMINAL_STATES

log = logging.getLogger("essential.supervisor")

@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class Supervisor:
    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        self.clock = SystemClock()
        self.placement = Placement(settings_from(settings), settings)
        self._loop_task: asyncio.Task | None = None
        self._runtime: Runtime | None = None
        self._last_sweep_at: str | None = None
        self._last_error: str | None = None
        self._end_watch: EndWatch | None = None
        self.sweeper = Sweep(self.placement, settings_from(settings), self.clock, metrics)
        # sweep from the start, also after Ray restarts this actor on another node:
        # recovery must not wait for a client to call
        self._boot = asyncio.get_running_loop().create_task(self._rt())

    def __repr__(self) -> str:
        return "Supervisor(essential)"

    async def _rt(self) -> Runtime:
        if self._runtime is None:
            self._runtime = await get_runtime(self.settings)
            self.sweeper.bind(self._runtime.store)
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._sweep_forever())
        return self._runtime

    # -- client API --------------------------------------------------------------------
    async def ready(self) -> bool:
        await self._rt()
        return True

    async def start(self, request: dict[str, Any]) -> dict[str, Any]:
        rt = await self._rt()
        try:
            parsed = StartRequest.parse(tracing.ensure_traceparent(request))
            saga, event = build_saga(parsed, rt.registry, self.clock)
        except EssentialError as exc:
            return envelope(exc)
        stored, created = await rt.store.create(saga, event)
        if not created and not same_request(stored, saga):
            return envelope(IdempotencyKeyReused(saga.idempotency_key or "", stored.id))
        saga = stored
        if created:
            metrics.saga_started(saga.job)
        if created and self.placement.has_room(saga.job):
            self.placement.launch(saga.id, saga.job, orchestrated=True)
        elif created:
            self.sweeper.backlog = True  # admitted when a slot frees
        return {"saga": saga.model_dump(mode="json"), "created": created}

    @ray.method(max_task_retries=0)
    async def saga_ended(self, saga_id: str, saga: dict[str, Any] | None = None, epoch: int | None = None) -> None:
        """A saga left its actor or host: hand it to its waiting callers, free its slot, and
        admit the oldest pending sagas into free slots now (not at the next sweep).

        ``epoch``: the lease the run held. The notice is fire and forget, so it may arrive
        after the saga was resumed or restored into a new run: a notice of an earlier run
        (an epoch below what this supervisor handed on) is ignored whole — it must neither
        end a wait for the new run nor free the new run's slot.

        Not retried (the class default retries forever): a host would keep resending to a
        supervisor that is gone; a lost notice is covered by the sweep and the end watch's poll."""
        ended = Saga.model_validate(saga) if saga is not None else None
        ran_at = ended.lease.epoch if ended is not None else epoch
        if ran_at is not None and ran_at < self.sweeper.epoch_floor.get(saga_id, 0):
            return
        self.sweeper.epoch_floor.pop(saga_id, None)
        if ended is not None and self._end_watch is not None:
            if ended.state.ended:
                self._end_watch.resolve(saga_id, ended)
        held_a_slot = self.placement.holds_slot(saga_id)
        self.placement.forget({saga_id})
        recorded = getattr(self, "_recorded_service", None)
        if recorded is not None:  # its cached handle and job are of no use once the saga left its actor
            recorded.forget(saga_id)
        self.sweeper.killed.pop(saga_id, None)
        if not (held_a_slot and self.sweeper.backlog):
            return
        rt = await self._rt()
        free = self.placement.slots_free()
        if free <= 0:
            return
        waiting = await rt.store.list_by_states([SagaState.PENDING], oldest_first=True, limit=free)
        self.sweeper.backlog = len(waiting) >= free  # maybe more behind them
        for pending in waiting:
            if self.placement.has_room(pending.job) and pending.id not in self.placement.live:
                self.placement.launch(pending.id, pending.job)

    async def status(self, saga_id: str) -> dict[str, Any]:
        rt = await self._rt()
        try:
            return {"saga": (await rt.store.get(saga_id)).model_dump(mode="json")}
        except EssentialError as exc:
            return envelope(exc)

    async def stages(self, saga_id: str) -> dict[str, Any]:
        rt = await self._rt()
        try:
            await rt.store.get(saga_id)
            return {"stages": [s.model_dump(mode="json") for s in await rt.store.stages(saga_id)]}
        except EssentialError as exc:
            return envelope(exc)

    async def wait(self, saga_id: str, timeout: float) -> dict[str, Any]:
        """The saga once terminal or parked (or as it is when the timeout passes)."""
        rt = await self._rt()
        try:
            # a saga launched here exists and has not ended yet; any other is read first,
            # which also refuses an unknown id at once
            saga = None if saga_id in self.placement.live else await rt.store.get(saga_id)
            if saga is None or not saga.state.ended:
                if self._end_watch is None:
                    self._end_watch = EndWatch(rt.store.ended)
                # one poll serves every waiting caller, and hands over the ended saga
                saga = await self._end_watch.wait(saga_id, timeout) or await rt.store.get(saga_id)
        except EssentialError as exc:
            return envelope(exc)
        return {"saga": saga.model_dump(mode="json")}

    async def abort(self, saga_id: str, reason: str) -> dict[str, Any]:
        rt = await self._rt()
        try:
            saga = await rt.store.request_abort(saga_id, reason)
        except EssentialError as exc:
            return envelope(exc)
        self.sweeper.epoch_floor[saga.id] = saga.lease.epoch  # a parked saga aborted is a new run
        if saga.state not in TERMINAL_STATES:
            if saga_id in await self.placement.running({saga_id: saga.job}):
                await self.placement.notify_abort(saga_id, saga.job, reason)
            elif saga.state != SagaState.PENDING and self.placement.has_room(saga.job):
                # e.g. a parked saga resumed for compensation; with every slot taken, the sweep
                # restores it (it has no actor) as soon as one frees
                self.placement.launch(saga.id, saga.job)
        return {"saga": saga.model_dump(mode="json")}

    async def list(self, state: str | None, job: str | None, limit: int) -> dict[str, Any]:
        rt = await self._rt()
        if state is not None and state not in {s.value for s in SagaState}:
            known = ", ".join(s.value for s in SagaState)
            return envelope(InvalidRequest(f"unknown state {state!r}; use one of: {known}"))
        sagas = await rt.store.list(state=state, job=job, limit=limit)
        return {"sagas": [s.model_dump(mode="json") for s in sagas]}

    async def states(self, saga_ids: list[str]) -> dict[str, str]:
        """Current state of many sagas in one round trip (progress displays)."""
        rt = await self._rt()
        return await rt.store.states(saga_ids)

    async def health(self) -> dict[str, Any]:
        """Is the sweep alive, when did it last finish, what failed last, and where is it now."""
        await self._rt()
        task = self._loop_task
        where = ""
        if task is not None and not task.done():
            where = "".join(traceback.format_stack(task.get_stack()[-1])) if task.get_stack() else ""
        return {
            "sweeps": self.sweeper.sweeps,
            "last_sweep_at": self._last_sweep_at,
            "last_error": self._last_error,
            "live": len(self.placement.live),
            "live_dedicated": len(self.placement.dedicated),
            "live_shared": len(self.placement.shared),
            "sweeping_at": where,
        }

    async def hosts(self) -> list[dict[str, Any]]:
        """Shared-placement host actors and how many sagas each holds."""
        return await self.placement.host_stats()

    # -- the sweep ------------------------------------------------------------------------
    async def _sweep_forever(self) -> None:
        assert self._runtime is not None
        interval = self._runtime.settings.supervisor_interval
        while True:
            try:
                await asyncio.wait_for(self.sweep(), timeout=max(30.0, 10 * interval))
                self._last_sweep_at = datetime.now(timezone.utc).isoformat()
            except Exception as exc:  # keep sweeping: one bad round must not stop recovery
                self._last_error = f"{type(exc).__name__}: {exc}"
                log.exception("supervisor sweep failed")
            await asyncio.sleep(interval)

    async def sweep(self) -> dict[str, int]:
        """One round of the sweep (:class:`~essential.actors.sagas.sweep.Sweep`): forget finished sagas,
        expire TTLs, restore orphans, admit pending, prune; returns its counts."""
        await self._rt()
        return await self.sweeper.run()

    async def resume(self, saga_id: str) -> dict[str, Any]:
        """Operator: give a parked saga another go from its last checkpoint."""
        rt = await self._rt()
        try:
            saga = await rt.store.resume(saga_id)
        except EssentialError as exc:
            return envelope(exc)
        self.sweeper.epoch_floor[saga.id] = saga.lease.epoch
        if self.placement.has_room(saga.job):  # else the sweep restores it once a slot frees
            self.placement.launch(saga.id, saga.job)
        return {"saga": saga.model_dump(mode="json")}

    # -- signals and waiting sagas ---------------------------------------------------
    async def signal(
        self, saga_id: str, name: str, payload: Any = None, key: str | None = None
    ) -> dict[str, Any]:
        """Store a signal for the saga durably, then relaunch it if it was waiting for it."""
        rt = await self._rt()
        try:
            request = SignalRequest.parse({"saga": saga_id, "name": name, "payload": payload, "key": key})
            saga, created = await rt.store.deliver_signal(request.saga, request.name, request.payload, key=request.key)
        except EssentialError as exc:
            return envelope(exc)
        if saga.state == SagaState.WAITING and saga.wake_at is not None and saga.wake_at <= datetime.now(timezone.utc):
            if saga.id not in self.placement.live and self.placement.has_room(saga.job):
                self.placement.launch(saga.id, saga.job)
        return {"saga": saga.model_dump(mode="json"), "delivered": created}

    # -- recorded sagas: start / add / commit / abort and their reads ---------------------
    async def recorded(self, op: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """``op`` of :class:`~essential.actors.sagas.recorded_service.RecordedService` (start, add, commit, abort, get, stages,
        list, count, stage_list); returns ``{"saga"|"stage"|"sagas"|"stages"|"total": ...}`` or ``{"error": ...}``."""
        from essential.actors.sagas.recorded_service import RecordedService

        rt = await self._rt()
        service = getattr(self, "_recorded_service", None)
        if service is None:
            service = self._recorded_service = RecordedService(rt, self.placement)
        return await service.call(op, *args, **kwargs)


def ensure_supervisor(settings: Settings) -> Any:
    """Create the namespace's supervisor, or return the one that exists (a detached, named actor)."""
    return Supervisor.options(
        name=SUPERVISOR_NAME,
        namespace=settings.namespace,
        lifetime="detached",
        get_if_exists=True,
    ).remote(settings.model_dump(mode="json"))
