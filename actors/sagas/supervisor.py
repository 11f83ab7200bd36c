"""The supervisor: the control plane every client talks to, and the sweeper.

Clients only need Ray: start/abort/status/list go through this singleton actor,
which validates requests, writes the saga and creates its ``SagaActor``.  Its
periodic sweep restores sagas whose actor died, aborts sagas past their TTL,
and admits pending sagas while live saga actors are under the limit.
"""
from __future__ import annotations

import asyncio
import logging
import traceback
from datetime import datetime, timedelta, timezone
from typing import Any

import ray

from essential.actors import metrics, tracing
from essential.actors.expiring import ExpiringMap
from essential.actors.names import SUPERVISOR_NAME
from essential.actors.sagas.placement import Placement
from essential.actors.sagas.runtime import Runtime, get_runtime
from essential.actors.sagas.waiters import EndWatch
from essential.actors.settings import Settings, settings_from
from essential.orchestration import (
    EssentialError,
    Event,
    EventType,
    IdempotencyKeyReused,
    InvalidRequest,
    Saga,
    SagaState,
    StartRequest,
    SystemClock,
    build_saga,
)
from essential.orchestration.errors import envelope
from essential.orchestration.lifecycle import check_transition, parking
from essential.orchestration.requests import same_request
from essential.orchestration.signals import SignalRequest
from essential.orchestration.states import ACTIVE_STATES, HOLDING_AN_ACTOR, TERMINAL_STATES

log = logging.getLogger("essential.supervisor")

#: most active sagas one sweep judges, and pending sagas it reads beyond the free slots
SWEEP_ACTIVE, SWEEP_PENDING = 5000, 500


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class Supervisor:
    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        self.clock = SystemClock()
        self.placement = Placement(settings_from(settings), settings)
        self._loop_task: asyncio.Task | None = None
        self._runtime: Runtime | None = None
        self._sweeps = 0
        self._killed: dict[str, int] = {}  # saga id -> lease epoch of the actor we killed
        self._last_sweep_at: str | None = None
        self._last_error: str | None = None
        self._end_watch: EndWatch | None = None
        self._backlog = False  # pending sagas wait for a dedicated slot
        # saga id -> the lowest lease epoch a run of it can now hold (set when this supervisor resumes,
        # aborts or restores it): an end notice from below is a late one of an earlier run
        self._epoch_floor: Any = ExpiringMap(max_entries=100_000, idle=3600.0)
        # sweep from the start, also after Ray restarts this actor on another node:
        # recovery must not wait for a client to call
        self._boot = asyncio.get_running_loop().create_task(self._rt())

    def __repr__(self) -> str:
        return "Supervisor(essential)"

    async def _rt(self) -> Runtime:
        if self._runtime is None:
            self._runtime = await get_runtime(self.settings)
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
            self._backlog = True  # admitted when a slot frees
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
        if ran_at is not None and ran_at < self._epoch_floor.get(saga_id, 0):
            return
        self._epoch_floor.pop(saga_id, None)
        if ended is not None and self._end_watch is not None:
            if ended.state.ended:
                self._end_watch.resolve(saga_id, ended)
        held_a_slot = self.placement.holds_slot(saga_id)
        self.placement.forget({saga_id})
        recorded = getattr(self, "_recorded_service", None)
        if recorded is not None:  # its cached handle and job are of no use once the saga left its actor
            recorded.forget(saga_id)
        self._killed.pop(saga_id, None)
        if not (held_a_slot and self._backlog):
            return
        rt = await self._rt()
        free = self.placement.slots_free()
        if free <= 0:
            return
        waiting = await rt.store.list_by_states([SagaState.PENDING], oldest_first=True, limit=free)
        self._backlog = len(waiting) >= free  # maybe more behind them
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
        self._epoch_floor[saga.id] = saga.lease.epoch  # a parked saga aborted is a new run
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
            "sweeps": self._sweeps,
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
        """One round: forget finished sagas, expire TTLs, restore orphans, admit pending, prune."""
        rt = await self._rt()
        store, conf, place = rt.store, rt.settings, self.placement
        self._sweeps += 1
        counts = {"restored": 0, "expired": 0, "admitted": 0, "parked": 0, "killed": 0, "pruned": 0}
        seen_at = place.launch_seq  # sagas launched after this are not in what is read next
        # bounded reads: the least recently updated active sagas (orphans are among them), and the oldest
        # pending ones — enough to fill the free slots and to expire those past their TTL
        active = {s.id: s for s in await store.list_by_states(sorted(ACTIVE_STATES), stalest_first=True, limit=SWEEP_ACTIVE)}
        pending = await store.list_by_states(
            [SagaState.PENDING], oldest_first=True, limit=max(place.slots_free(), 0) + SWEEP_PENDING
        )
        held = await store.states(list(place.live)) if place.live else {}
        unfinished = {sid for sid, state in held.items() if state in HOLDING_AN_ACTOR}
        await self._forget_finished(unfinished | place.launched_since(seen_at))
        now = datetime.now(timezone.utc)
        alive = await place.running({sid: s.job for sid, s in active.items()})
        # orphans' open transactions would block every write below (abort, restore count, lease)
        await asyncio.gather(*(store.reclaim(sid) for sid in active if sid not in alive))

        for saga in active.values():
            if saga.deadline > now or saga.state != SagaState.RUNNING:
                continue
            if not saga.abort_requested:
                reason = f"ttl of {saga.ttl:g}s expired"
                await store.request_abort(saga.id, reason)
                await place.notify_abort(saga.id, saga.job, reason)
                counts["expired"] += 1
            elif (
                saga.id in alive
                and (now - saga.deadline).total_seconds() > conf.ttl_grace
                and (now - saga.updatedAt).total_seconds() > conf.ttl_grace
                and self._killed.get(saga.id) != saga.lease.epoch
            ):
                # the step ignores cancellation (blocking code): replace its actor, once per lease
                self._killed[saga.id] = saga.lease.epoch
                await asyncio.to_thread(place.replace, saga.id, saga.job)
                alive.discard(saga.id)
                counts["killed"] += 1

        for saga in active.values():
            if (
                saga.state == SagaState.COMPENSATING
                and saga.id in alive
                and (now - saga.updatedAt).total_seconds() > conf.hung_after
                and self._killed.get(saga.id) != saga.lease.epoch
                and not await place.responsive(saga.id, saga.job)
            ):
                # a compensation blocking its process (it has no TTL to cut it): replace it, once per
                # lease; the restored runner re-runs the open compensation under the same key
                self._killed[saga.id] = saga.lease.epoch
                await asyncio.to_thread(place.replace, saga.id, saga.job)
                alive.discard(saga.id)
                counts["killed"] += 1

        for saga_id, saga in active.items():
            if saga_id in alive:
                place.adopt(saga_id, saga.job)
                continue
            collateral = place.lost_with_its_host(saga_id)  # read before forget() drops what it knows
            place.forget({saga_id})
            if not place.has_room(saga.job):
                continue
            if not collateral and await store.note_restore(saga_id) > conf.max_restore_attempts:
                await self._park(saga_id, f"restored {conf.max_restore_attempts} times without progress")
                counts["parked"] += 1
                continue
            self._epoch_floor[saga_id] = saga.lease.epoch + 1  # the restored run takes the next lease
            place.launch(saga_id, saga.job)
            counts["restored"] += 1
            metrics.saga_restored(saga.job)

        waiting = {s.id: s.job for s in pending}
        running = await place.running(waiting)
        place.forget({sid for sid in waiting if sid not in running})  # launched, but died before starting
        for saga in pending:
            if saga.id in running:
                place.adopt(saga.id, saga.job)
                continue
            if saga.deadline <= now:  # its TTL ran out while it queued: it ends without running
                counts["expired"] += await self._expire_pending(saga)
                continue
            if not place.has_room(saga.job):
                self._backlog = True
                continue
            place.launch(saga.id, saga.job)
            counts["admitted"] += 1

        # a safety net for wake-ups that never landed, then waiting sagas whose signal/timer/child/lock came
        settle = timedelta(seconds=max(10.0, 5 * conf.supervisor_interval))
        counts["stranded"] = await store.wake_stranded(now, settle)
        counts["woken"] = await self._wake_due(now)

        if self._sweeps % 30 == 1:
            counts["pruned"] = await store.prune(now - timedelta(seconds=conf.retention))
            if conf.history_retention > 0:
                counts["deleted"] = await store.delete_history(now - timedelta(seconds=conf.history_retention))
        counts["live"] = len(place.live)
        await metrics.observe_sweep(store, place, sum(1 for s in pending if s.id not in place.live))
        return counts

    async def _forget_finished(self, unfinished: set[str]) -> None:
        """Drop finished sagas from the live sets once nothing runs them any more."""
        gone = await self.placement.let_go(unfinished)
        for sid in gone:
            self._killed.pop(sid, None)

    async def _expire_pending(self, saga: Saga) -> int:
        """A pending saga past its TTL: aborted under a lease of its own (it has no stages to undo)."""
        rt = await self._rt()
        leased = await rt.store.acquire_lease(saga.id, "supervisor")
        if leased.state != SagaState.PENDING:  # a runner got there first
            await rt.store.release(saga.id)
            return 0
        reason = f"ttl of {leased.ttl:g}s expired before the saga was admitted"
        now = self.clock.now()
        check_transition(leased.state, SagaState.ABORTED)
        event = Event.of(leased, EventType.ABORTED, at=now, state=SagaState.ABORTED, reason=reason)
        fields = {"state": SagaState.ABORTED, "error": reason, "aborted_at": now, "updatedAt": now}
        await rt.store.transition(saga.id, leased.lease.epoch, fields, [event])
        metrics.saga_expired(leased.model_copy(update={"updatedAt": now}))
        log.warning("saga %s: %s", saga.id, reason)
        return 1

    async def _park(self, saga_id: str, reason: str) -> None:
        """Needs a person: fenced like any writer, so a late actor cannot undo it."""
        rt = await self._rt()
        saga = await rt.store.acquire_lease(saga_id, "supervisor")
        if saga.state.terminal:  # it ended meanwhile: nothing to park
            await rt.store.release(saga_id)
            return
        fields, event = parking(saga, reason, self.clock.now())
        await rt.store.transition(saga_id, saga.lease.epoch, fields, [event])
        await rt.store.release(saga_id)
        log.error("saga %s parked: %s", saga_id, reason)
        metrics.saga_parked(saga.job)

    async def resume(self, saga_id: str) -> dict[str, Any]:
        """Operator: give a parked saga another go from its last checkpoint."""
        rt = await self._rt()
        try:
            saga = await rt.store.resume(saga_id)
        except EssentialError as exc:
            return envelope(exc)
        self._epoch_floor[saga.id] = saga.lease.epoch
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

    async def _wake_due(self, now: datetime) -> int:
        """Relaunch waiting sagas that are due (they hold no actor while they wait)."""
        rt = await self._rt()
        woken = 0
        for saga in await rt.store.list_due(now):
            if saga.id in self.placement.live or not self.placement.has_room(saga.job):
                continue
            self.placement.launch(saga.id, saga.job)
            woken += 1
        return woken

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
