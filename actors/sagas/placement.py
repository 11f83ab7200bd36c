"""Where a live saga runs: its own actor (dedicated, the default), a shared host actor, or
an actor of its own taken from a warm pool (pooled).

The supervisor asks this module to launch, find, abort and replace sagas; it
does not care which placement a job uses.  Shared placement is chosen globally
(``ESSENTIAL_PLACEMENT=shared``) or per job (``ESSENTIAL_SHARED_JOBS``); a saga
goes to host ``int(id) % pool``.  Pooled placement (``ESSENTIAL_PLACEMENT=pooled``)
uses the same host actors, ``max_live_sagas`` of them, but gives each live saga a
host to itself (a free one, remembered here and rebuilt from the hosts' own
answers), so a saga keeps the isolation of a dedicated actor without a process
start per saga.  A host that dies is restarted by Ray (or recreated here), and the
supervisor restores its sagas from their checkpoints.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray

from essential.actors.expiring import ExpiringMap
from essential.actors.names import actor_name, host_name
from essential.actors.sagas.saga_actor import SagaActor
from essential.actors.sagas.saga_host import SagaHost
from essential.actors.settings import Settings
from essential.orchestration.errors import EssentialError

log = logging.getLogger("essential.placement")

ABORT_NOTICE_TIMEOUT = 2.0
#: how long a saga's actor or host may take to answer before it counts as hung
PING_TIMEOUT = 10.0
#: seconds an unused recorded saga's actor handle is kept
HANDLE_IDLE = 600.0


class Placement:
    def __init__(self, settings: Settings, actor_settings: dict[str, Any]) -> None:
        self.settings = settings
        self.actor_settings = actor_settings
        self.dedicated: set[str] = set()
        self.shared: set[str] = set()  # in host actors: shared or pooled placement
        self._hosts: dict[int, Any] = {}
        self.pooled = settings.placement == "pooled"
        self._slots: dict[str, int] = {}  # pooled: saga id -> the host it has to itself
        self._found_hosts = False
        self._silent: set[int] = set()  # hosts that did not answer the last time they were asked
        self._launching: dict[str, Any] = {}  # host launches not yet answered (ObjectRefs of run_saga)
        self._launch_seq = 0  # counts launches: what a sweep read before a launch cannot judge it
        self._launched: dict[str, int] = {}
        # host index -> (incarnation, sagas it ran) at its last answer; saga -> (host, incarnation, sagas
        # there) when last seen or launched: a saga lost because its host died is not to blame for it
        self._host_seen: dict[int, tuple[str, int]] = {}
        self._saga_seen: dict[str, tuple[int, str | None, int]] = {}
        # recorded sagas: the dedicated actor of each open saga, looked up once (bounded, idle entries expire)
        self._recorded_handles: ExpiringMap[str, Any] = ExpiringMap(max_entries=settings.recorded_cache_size, idle=HANDLE_IDLE)

    # -- policy ----------------------------------------------------------------------
    def is_shared(self, job: str) -> bool:
        """Hosted by the host pool (shared or pooled placement) rather than an actor started for it."""
        return self.settings.placement != "dedicated" or job in self.settings.shared_jobs

    def has_room(self, job: str) -> bool:
        if self.is_shared(job) and not self.pooled:
            return len(self.shared) < self.settings.max_shared_sagas
        return self.slots_free() > 0

    def slots_free(self) -> int:
        """Free places among the ``max_live_sagas`` actors (dedicated, or the pooled hosts)."""
        return self.settings.max_live_sagas - len(self.shared if self.pooled else self.dedicated)

    @property
    def pool_size(self) -> int:
        return self.settings.max_live_sagas if self.pooled else self.settings.host_pool_size

    @property
    def live(self) -> set[str]:
        return self.dedicated | self.shared

    # -- actions ---------------------------------------------------------------------
    def launch(self, saga_id: str, job: str, *, orchestrated: bool = False) -> None:
        """``orchestrated``: the caller knows it is a job saga (not a recorded one), saving the host a read."""
        self._launch_seq += 1
        self._launched[saga_id] = self._launch_seq
        if self.is_shared(job):
            self._launching[saga_id] = self._host_for(saga_id).run_saga.remote(saga_id, orchestrated)
            self.shared.add(saga_id)
            index = self.index_of(saga_id)
            if index is not None:
                incarnation, reported = self._host_seen.get(index, (None, 0))
                placed = sum(1 for sid in self.shared if self.index_of(sid) == index)
                self._saga_seen[saga_id] = (index, incarnation, max(reported + 1, placed))
            return
        try:
            handle = SagaActor.options(
                name=actor_name(saga_id),
                namespace=self.settings.namespace,
                lifetime="detached",
                scheduling_strategy="SPREAD",
            ).remote(saga_id, job, self.actor_settings, orchestrated)
        except ValueError:  # the name is taken: an actor already drives this saga
            self.dedicated.add(saga_id)
            return
        handle.run.remote()
        self.dedicated.add(saga_id)

    async def notify_abort(self, saga_id: str, job: str, reason: str) -> None:
        """Tell the runner now; the durable abort flag covers a runner that is not there."""
        try:
            if self.is_shared(job):
                ref = self._host_for(saga_id).abort.remote(saga_id, reason)
            else:
                handle = await asyncio.to_thread(self._dedicated_handle, saga_id)
                if handle is None:
                    return
                ref = handle.abort.remote(reason)
            # a step that blocks its actor's event loop must not stall the caller
            await asyncio.wait_for(ref, timeout=ABORT_NOTICE_TIMEOUT)
        except (ray.exceptions.RayActorError, asyncio.TimeoutError):
            pass

    async def responsive(self, saga_id: str, job: str, timeout: float = PING_TIMEOUT) -> bool:
        """Does whatever runs the saga answer within ``timeout``? A blocked event loop does not."""
        try:
            if self.is_shared(job):
                index = self.index_of(saga_id)
                if index is None:
                    return True  # not placed by this supervisor yet: nothing to judge
                ref = self._host_for(saga_id).sagas.remote()
            else:
                handle = await asyncio.to_thread(self._dedicated_handle, saga_id)
                if handle is None:
                    return True  # gone: the orphan path restores it
                ref = handle.ping.remote()
            await asyncio.wait_for(ref, timeout=timeout)
            return True
        except asyncio.TimeoutError:
            return False
        except ray.exceptions.RayActorError:
            return True  # dead, not hung: the orphan path restores it

    def replace(self, saga_id: str, job: str) -> None:
        """Kill whatever runs the saga (a step that ignores cancellation); it is then restored."""
        if self.is_shared(job):
            index = self.index_of(saga_id)
            handle = self._hosts.pop(index, None) if index is not None else None
            if handle is not None:  # Ray restarts the host; its other sagas are restored
                ray.kill(handle, no_restart=False)
            return
        handle = self._dedicated_handle(saga_id)
        if handle is not None:
            ray.kill(handle, no_restart=True)

    def adopt(self, saga_id: str, job: str) -> None:
        """Something already drives the saga (found running, not launched by this supervisor): count it live."""
        (self.shared if self.is_shared(job) else self.dedicated).add(saga_id)

    def holds_slot(self, saga_id: str) -> bool:
        """Does the saga take one of the ``max_live_sagas`` places (a dedicated actor, or a pooled host)?"""
        return saga_id in self.dedicated or (self.pooled and saga_id in self.shared)

    async def let_go(self, unfinished: set[str]) -> set[str]:
        """Forget the live sagas not in ``unfinished`` once nothing runs them any more; returns them.

        A dedicated saga is gone when its actor is; a pooled one when its host has let go of it
        (its host is then free for the next saga); a shared one at once.
        """
        done = {sid for sid in self.live if sid not in unfinished}
        shared_done = done & self.shared
        dedicated_done = list(done - shared_done)
        if self.pooled and shared_done:
            since = self.launch_seq
            hosted, silent = await self.hosted()
            busy = hosted | self.launched_since(since)
            shared_done = {sid for sid in shared_done if sid not in busy and not self.may_run_on(sid, silent)}
        still = await self.dedicated_running(dedicated_done)
        gone = shared_done | {sid for sid in dedicated_done if sid not in still}
        self.forget(gone)
        return gone

    def forget(self, saga_ids: set[str]) -> None:
        self.dedicated -= saga_ids
        self.shared -= saga_ids
        for saga_id in saga_ids:
            self._recorded_handles.pop(saga_id, None)
            self._slots.pop(saga_id, None)
            self._launching.pop(saga_id, None)
            self._launched.pop(saga_id, None)
            self._saga_seen.pop(saga_id, None)

    @property
    def launch_seq(self) -> int:
        return self._launch_seq

    def launched_since(self, seq: int) -> set[str]:
        """Sagas launched after ``launch_seq`` was ``seq``: a view read before then knows nothing of them."""
        return {saga_id for saga_id, n in self._launched.items() if n > seq}

    # -- liveness --------------------------------------------------------------------
    async def running(self, sagas: dict[str, str]) -> set[str]:
        """Of ``{saga id: job}``, the ids that something is driving right now (or was launched
        while this looked, which the hosts' answers may predate)."""
        since = self._launch_seq
        shared = {sid for sid, job in sagas.items() if self.is_shared(job)}
        dedicated = [sid for sid in sagas if sid not in shared]
        alive: set[str] = set()
        if shared:
            hosted, silent = await self.hosted()
            # a host that does not answer (busy, restarting) may still run its sagas: count
            # them alive this round rather than start a second copy and burn restore attempts
            alive |= {sid for sid in shared if sid in hosted or self.may_run_on(sid, silent) or self._in_flight(sid)}
        alive |= await self.dedicated_running(dedicated)
        return alive | (self.launched_since(since) & set(sagas))

    def may_run_on(self, saga_id: str, silent: set[int]) -> bool:
        """Could a host that did not answer be running the saga? Pooled sagas whose host is not known
        (the map is rebuilt from answers after a restart) may be on any silent host."""
        index = self.index_of(saga_id)
        if index is None:
            return self.pooled and bool(silent)
        return index in silent

    def _in_flight(self, saga_id: str) -> bool:
        """Launched, but its host has not taken it yet (the saga is not in its answer): alive, so
        that a sweep does not launch it a second time (pooled: on another host)."""
        ref = self._launching.get(saga_id)
        if ref is None:
            return False
        ready, _ = ray.wait([ref], timeout=0)
        if ready:  # taken (or the host died): from now on the host's own answer counts
            del self._launching[saga_id]
            return False
        return True

    async def dedicated_running(self, saga_ids: list[str]) -> set[str]:
        checks = await asyncio.gather(*(asyncio.to_thread(self._dedicated_alive, sid) for sid in saga_ids))
        return {sid for sid, ok in zip(saga_ids, checks) if ok}

    async def hosted(self) -> tuple[set[str], set[int]]:
        """Every saga the hosts are running, and the indexes of hosts that did not answer."""
        self.ensure_hosts()
        indexes = list(self._hosts)
        replies = await asyncio.gather(
            *(asyncio.wait_for(self._hosts[i].report.remote(), 10) for i in indexes), return_exceptions=True
        )
        found: set[str] = set()
        silent: set[int] = set()
        for index, reply in zip(indexes, replies):
            if isinstance(reply, asyncio.TimeoutError):
                silent.add(index)
            elif isinstance(reply, BaseException):  # gone for good: recreated on next use
                log.warning("host %s failed (%s); recreating it", index, type(reply).__name__)
                self._hosts.pop(index, None)
                silent.add(index)
            else:
                hosted = reply["sagas"]
                found |= set(hosted)
                self._host_seen[index] = (reply["incarnation"], len(hosted))
                for sid in hosted:
                    self._saga_seen[sid] = (index, reply["incarnation"], len(hosted))
                if self.pooled:  # rebuilds the slot map after a supervisor restart
                    self._slots.update({sid: index for sid in hosted})
        self._silent = silent
        return found, silent

    def lost_with_its_host(self, saga_id: str) -> bool:
        """Was the saga lost because the host it shared with other sagas died (its restore says
        nothing about the saga)? A saga alone in its process answers for that process's death."""
        seen = self._saga_seen.get(saga_id)
        if seen is None:
            return False
        index, incarnation, load = seen
        now = self._host_seen.get(index)
        died = index in self._silent or (incarnation is not None and now is not None and now[0] != incarnation)
        return died and load > 1

    async def host_stats(self) -> list[dict[str, Any]]:
        self.ensure_hosts()
        replies = await asyncio.gather(*(h.stats.remote() for h in self._hosts.values()), return_exceptions=True)
        return [r for r in replies if isinstance(r, dict)]

    # -- recorded sagas: add/commit/abort reach the actor or host that drives the saga --
    async def recorded_call(self, saga_id: str, job: str, op: str, args: dict[str, Any], timeout: float, *,
                            launch: bool) -> dict[str, Any]:  # fmt: skip
        """Deliver a recorded saga's ``op`` to the actor or host that drives it; ``{"moved": True}`` when
        nothing there has it (``launch``: start driving it when nothing does)."""
        place = self
        try:
            if place.is_shared(job):
                reply = await asyncio.wait_for(place.host_for(saga_id).recorded.remote(saga_id, op, args), timeout)
                if "moved" in reply and launch:
                    place.launch(saga_id, job)  # runs it there unless it already runs
                return reply
            handle = self._recorded_handles.get(saga_id)
            if handle is None:
                if not launch:
                    return {"moved": True}
                handle = await asyncio.to_thread(place.dedicated_handle, saga_id)
                if handle is None:  # nothing drives it (crashed, or not yet restored): launch it now
                    place.launch(saga_id, job)
                    handle = await asyncio.to_thread(place.dedicated_handle, saga_id)
                    if handle is None:
                        return {"moved": True}
                self._recorded_handles[saga_id] = handle
            reply = await asyncio.wait_for(handle.recorded.remote(op, args), timeout)
            if "moved" in reply:
                self._recorded_handles.pop(saga_id, None)
            return reply
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            self._recorded_handles.pop(saga_id, None)
            return {"moved": True}
        except asyncio.TimeoutError:
            raise EssentialError(f"saga {saga_id}: its actor did not answer {op} within {timeout:.0f}s") from None

    def drop_handle(self, saga_id: str) -> None:
        """The saga's actor is of no use any more (it ended, or moved): look it up again next time."""
        self._recorded_handles.pop(saga_id, None)

    def dedicated_handle(self, saga_id: str) -> Any:
        """The saga's ``saga:<id>`` actor, or None (blocking: a GCS round trip)."""
        return self._dedicated_handle(saga_id)

    def host_for(self, saga_id: str) -> Any:
        """The shared host that runs (or would run) the saga."""
        return self._host_for(saga_id)

    def _dedicated_handle(self, saga_id: str) -> Any:
        try:
            return ray.get_actor(actor_name(saga_id), namespace=self.settings.namespace)
        except ValueError:
            return None

    def _dedicated_alive(self, saga_id: str) -> bool:
        return self._dedicated_handle(saga_id) is not None

    # -- the host pool ---------------------------------------------------------------
    def ensure_hosts(self) -> None:
        """Shared: the whole pool, at once. Pooled: the hosts that exist (found once, after a
        supervisor restart); more are started as sagas need them."""
        if not self.pooled:
            for index in range(self.pool_size):
                self._ensure_host(index)
        elif not self._found_hosts:
            self._found_hosts = True
            names = {host_name(i): i for i in range(self.pool_size)}
            for entry in ray.util.list_named_actors(all_namespaces=True):
                if entry.get("namespace") == self.settings.namespace and entry.get("name") in names:
                    self._ensure_host(names[entry["name"]])

    def _ensure_host(self, index: int) -> Any:
        if index not in self._hosts:
            self._hosts[index] = SagaHost.options(
                name=host_name(index),
                namespace=self.settings.namespace,
                lifetime="detached",
                get_if_exists=True,
                scheduling_strategy="SPREAD",
            ).remote(index, self.actor_settings, exclusive=self.pooled)
        return self._hosts[index]

    def index_of(self, saga_id: str) -> int | None:
        """The host that runs (or would run) the saga; pooled: None when it has none yet."""
        if self.pooled:
            return self._slots.get(saga_id)
        return int(saga_id, 16) % self.pool_size

    def _index_for(self, saga_id: str) -> int:
        """As :meth:`index_of`, giving a pooled saga a free host (the lowest, so warm hosts are reused)."""
        index = self.index_of(saga_id)
        if index is None:
            taken = set(self._slots.values())
            index = next((i for i in range(self.pool_size) if i not in taken), int(saga_id, 16) % self.pool_size)
            self._slots[saga_id] = index
        return index

    def _host_for(self, saga_id: str) -> Any:
        self.ensure_hosts()
        return self._ensure_host(self._index_for(saga_id))
