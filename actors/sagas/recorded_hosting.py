"""Recorded sagas in a hosting process: which runners live here, and operations waiting for one to start."""
from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Any

from essential.actors.sagas.recorded_undo import RecordedUndoer
from essential.actors.sagas.runtime import Runtime
from essential.orchestration.recorded import (
    RECORDED,
)
from essential.orchestration.recorded_runner import RecordedPolicy, RecordedRunner
from essential.persistence.recorded_store import (
    RecordedStore,
)

#: seconds an operation waits for the saga's runner to appear in a freshly launched actor
ARRIVAL_TIMEOUT = 30.0

class _Arrival:
    """Operations waiting for a saga's runner to start in this process (a freshly launched actor)."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.waiters = 0


_live: dict[str, RecordedRunner] = {}
#: only while someone waits: an operation whose runner never arrives takes its entry with it
_arrived: dict[str, _Arrival] = {}
_ended: OrderedDict[str, None] = OrderedDict()
_ENDED_KEEP = 10_000


async def is_recorded(runtime: Runtime, saga_id: str) -> bool:
    return await RecordedStore(runtime.store).kind(saga_id) == RECORDED


async def drive_recorded(
    saga_id: str, runtime: Runtime, runners: dict[str, Any], pending_aborts: dict[str, str], owner: str,
    observer: Any = None,
) -> None:  # fmt: skip
    """Host the open saga until it ends (called by :func:`essential.actors.sagas.hosting.drive`; its caller handles errors)."""
    conf = runtime.settings
    store = RecordedStore(runtime.store)
    policy = RecordedPolicy(
        database=conf.database, buckets=conf.recorded_buckets, db_prefix=conf.recorded_db_prefix,
        databases=conf.recorded_databases, ttl_grace=conf.ttl_grace, undo_pause=conf.recorded_undo_pause,
    )  # fmt: skip
    runner = RecordedRunner(
        saga_id, store=store, undo=RecordedUndoer(store, conf), policy=policy, owner=owner, observer=observer
    )
    runners[saga_id] = runner  # the supervisor's abort notices (and TTL expiry) reach it from here on
    if saga_id in pending_aborts:
        runner.request_abort(pending_aborts.pop(saga_id))
    _live[saga_id] = runner
    _ended.pop(saga_id, None)
    arrival = _arrived.get(saga_id)
    if arrival is not None:
        arrival.event.set()
    try:
        await runner.run()
    finally:
        runner.finished.set()
        for _ in range(100):  # let operations in flight answer before the actor leaves
            if runner.inflight == 0:
                break
            await asyncio.sleep(0.01)
        if _live.get(saga_id) is runner:
            _live.pop(saga_id, None)
            _ended[saga_id] = None
            while len(_ended) > _ENDED_KEEP:
                _ended.popitem(last=False)
        await runtime.store.release(saga_id)


async def _await_arrival(saga_id: str) -> bool:
    """Wait (up to ARRIVAL_TIMEOUT) for the saga's runner to start here; the wait leaves no trace."""
    arrival = _arrived.get(saga_id)
    if arrival is None:
        arrival = _arrived[saga_id] = _Arrival()
    arrival.waiters += 1
    try:
        await asyncio.wait_for(arrival.event.wait(), ARRIVAL_TIMEOUT)
        return True
    except asyncio.TimeoutError:
        return False
    finally:
        arrival.waiters -= 1
        if arrival.waiters == 0 and _arrived.get(saga_id) is arrival:
            del _arrived[saga_id]


async def dispatch(saga_id: str, op: str, args: dict[str, Any], *, expect: bool) -> dict[str, Any]:
    """An operation for the saga's runner in this process; ``{"moved": True}`` when it is not here.

    ``expect``: this process was asked to drive the saga, so wait for its runner to appear.
    """
    runner = _live.get(saga_id)
    if runner is None:
        if not expect or saga_id in _ended or not await _await_arrival(saga_id):
            return {"moved": True}
        runner = _live.get(saga_id)
        if runner is None:
            return {"moved": True}
    return await runner.handle(op, args)
