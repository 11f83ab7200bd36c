"""The supervisor's sweep: restore sagas whose actor died, expire TTLs, admit pending sagas, park, prune.

Ray-free: it asks a :class:`SweepPlacement` where sagas run (the supervisor's
:class:`~essential.actors.sagas.placement.Placement` on Ray; any placement that
launches runners elsewhere works), reads and writes MongoDB through the store, and
reports to a metrics object.  The supervisor actor only schedules it and shares its
state (which sagas it killed, the epoch floor of restored runs, whether pending
sagas wait for a slot) with its client API.
"""
from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol

from essential.actors.expiring import ExpiringMap
from essential.actors.settings import Settings
from essential.orchestration.clock import Clock
from essential.orchestration.lifecycle import check_transition, parking
from essential.orchestration.models import Event, Saga
from essential.orchestration.states import ACTIVE_STATES, HOLDING_AN_ACTOR, EventType, SagaState
from essential.persistence.store import MongoSagaStore

log = logging.getLogger("essential.supervisor")

#: most active sagas one sweep judges, and pending sagas it reads beyond the free slots
SWEEP_ACTIVE, SWEEP_PENDING = 5000, 500


class SweepPlacement(Protocol):
    """Where sagas run, as the sweep asks it (see :class:`~essential.actors.sagas.placement.Placement`)."""

    live: set[str]
    launch_seq: int

    def slots_free(self) -> int: ...
    def has_room(self, job: str) -> bool: ...
    def launch(self, saga_id: str, job: str, *, orchestrated: bool = False) -> None: ...
    def launched_since(self, seq: int) -> set[str]: ...
    def adopt(self, saga_id: str, job: str) -> None: ...
    def forget(self, saga_ids: set[str]) -> None: ...
    def lost_with_its_host(self, saga_id: str) -> bool: ...
    def replace(self, saga_id: str, job: str) -> None: ...
    async def let_go(self, unfinished: set[str]) -> set[str]: ...
    async def running(self, sagas: dict[str, str]) -> set[str]: ...
    async def notify_abort(self, saga_id: str, job: str, reason: str) -> None: ...
    async def responsive(self, saga_id: str, job: str) -> bool: ...


class SweepMetrics(Protocol):
    """What the sweep reports (:mod:`essential.actors.metrics` on Ray's metrics endpoint)."""

    def saga_restored(self, job: str) -> None: ...
    def saga_parked(self, job: str) -> None: ...
    def saga_expired(self, saga: Saga) -> None: ...
    async def observe_sweep(self, store: Any, placement: Any, pending: int) -> None: ...


class Sweep:
    def __init__(self, placement: SweepPlacement, settings: Settings, clock: Clock, metrics: SweepMetrics) -> None:
        self.placement = placement
        self.settings = settings
        self.clock = clock
        self.metrics = metrics
        self._store: MongoSagaStore | None = None
        self.sweeps = 0
        self.killed: dict[str, int] = {}  # saga id -> lease epoch of the actor this sweep killed
        self.backlog = False  # pending sagas wait for a slot
        # saga id -> the lowest lease epoch a run of it can now hold (set when the supervisor resumes,
        # aborts or restores it): an end notice from below is a late one of an earlier run
        self.epoch_floor: Any = ExpiringMap(max_entries=100_000, idle=3600.0)

    def bind(self, store: MongoSagaStore) -> None:
        """The store, once the process's runtime (its MongoDB client) exists."""
        self._store = store

    @property
    def store(self) -> MongoSagaStore:
        assert self._store is not None, "the supervisor binds the store before it sweeps"
        return self._store

    async def run(self) -> dict[str, int]:
        """One round: forget finished sagas, expire TTLs, restore orphans, admit pending, prune."""
        store, conf, place = self.store, self.settings, self.placement
        self.sweeps += 1
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
                and self.killed.get(saga.id) != saga.lease.epoch
            ):
                # the step ignores cancellation (blocking code): replace its actor, once per lease
                self.killed[saga.id] = saga.lease.epoch
                await asyncio.to_thread(place.replace, saga.id, saga.job)
                alive.discard(saga.id)
                counts["killed"] += 1

        for saga in active.values():
            if (
                saga.state == SagaState.COMPENSATING
                and saga.id in alive
                and (now - saga.updatedAt).total_seconds() > conf.hung_after
                and self.killed.get(saga.id) != saga.lease.epoch
                and not await place.responsive(saga.id, saga.job)
            ):
                # a compensation blocking its process (it has no TTL to cut it): replace it, once per
                # lease; the restored runner re-runs the open compensation under the same key
                self.killed[saga.id] = saga.lease.epoch
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
                await self.park(saga_id, f"restored {conf.max_restore_attempts} times without progress")
                counts["parked"] += 1
                continue
            self.epoch_floor[saga_id] = saga.lease.epoch + 1  # the restored run takes the next lease
            place.launch(saga_id, saga.job)
            counts["restored"] += 1
            self.metrics.saga_restored(saga.job)

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
                self.backlog = True
                continue
            place.launch(saga.id, saga.job)
            counts["admitted"] += 1

        # a safety net for wake-ups that never landed, then waiting sagas whose signal/timer/child/lock came
        settle = timedelta(seconds=max(10.0, 5 * conf.supervisor_interval))
        counts["stranded"] = await store.wake_stranded(now, settle)
        counts["woken"] = await self.wake_due(now)

        if self.sweeps % 30 == 1:
            counts["pruned"] = await store.prune(now - timedelta(seconds=conf.retention))
            if conf.history_retention > 0:
                counts["deleted"] = await store.delete_history(now - timedelta(seconds=conf.history_retention))
        counts["live"] = len(place.live)
        await self.metrics.observe_sweep(store, place, sum(1 for s in pending if s.id not in place.live))
        return counts

    async def _forget_finished(self, unfinished: set[str]) -> None:
        """Drop finished sagas from the live sets once nothing runs them any more."""
        gone = await self.placement.let_go(unfinished)
        for sid in gone:
            self.killed.pop(sid, None)

    async def _expire_pending(self, saga: Saga) -> int:
        """A pending saga past its TTL: aborted under a lease of its own (it has no stages to undo)."""
        leased = await self.store.acquire_lease(saga.id, "supervisor")
        if leased.state != SagaState.PENDING:  # a runner got there first
            await self.store.release(saga.id)
            return 0
        reason = f"ttl of {leased.ttl:g}s expired before the saga was admitted"
        now = self.clock.now()
        check_transition(leased.state, SagaState.ABORTED)
        event = Event.of(leased, EventType.ABORTED, at=now, state=SagaState.ABORTED, reason=reason)
        fields = {"state": SagaState.ABORTED, "error": reason, "aborted_at": now, "updatedAt": now}
        await self.store.transition(saga.id, leased.lease.epoch, fields, [event])
        self.metrics.saga_expired(leased.model_copy(update={"updatedAt": now}))
        log.warning("saga %s: %s", saga.id, reason)
        return 1

    async def park(self, saga_id: str, reason: str) -> None:
        """Needs a person: fenced like any writer, so a late actor cannot undo it."""
        saga = await self.store.acquire_lease(saga_id, "supervisor")
        if saga.state.terminal:  # it ended meanwhile: nothing to park
            await self.store.release(saga_id)
            return
        fields, event = parking(saga, reason, self.clock.now())
        await self.store.transition(saga_id, saga.lease.epoch, fields, [event])
        await self.store.release(saga_id)
        log.error("saga %s parked: %s", saga_id, reason)
        self.metrics.saga_parked(saga.job)

    async def wake_due(self, now: datetime) -> int:
        """Relaunch waiting sagas that are due (they hold no actor while they wait)."""
        woken = 0
        for saga in await self.store.list_due(now):
            if saga.id in self.placement.live or not self.placement.has_room(saga.job):
                continue
            self.placement.launch(saga.id, saga.job)
            woken += 1
        return woken
