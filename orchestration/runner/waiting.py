"""Waiting inside a run (a signal, a durable timer, a child saga, a bucket lock), then parking.

The run waits in process for up to ``linger`` seconds, then checkpoints the
saga ``waiting`` (what for, and ``wake_at``: when to look again at the latest —
the timer, the signal's timeout, the TTL), looks once more (so a wake-up that
raced the checkpoint is not lost) and raises :class:`Parked`; the hosting actor
exits.  The supervisor relaunches the saga when it is due (whatever it waited
for moves ``wake_at`` to now), and the next run picks up at the same stage.
Timers read the run's clock; the linger is real time (it is about holding an
actor, not about business time).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from essential.orchestration.errors import LeaseLost
from essential.orchestration.runner.checkpoints import Checkpoints
from essential.orchestration.runner.control import Control
from essential.orchestration.states import SagaState

log = logging.getLogger("essential.runner")

#: polling of the store while waiting in process (signals, child state, locks)
POLL_FIRST, POLL_CAP = 0.02, 0.25
#: seconds between re-reads of the saga while waiting in process (abort flag, lease)
REFRESH_EVERY = 1.0


@dataclass
class Waited:
    """How a wait ended: what it waited for is ``ready``, its deadline passed, or the saga must ``stop``."""

    kind: Literal["ready", "timeout", "stop"]
    value: Any = None


class Parked(Exception):
    """The saga was checkpointed ``waiting``; the run returns and leaves the rest to the supervisor."""


class Waits:
    def __init__(self, checkpoints: Checkpoints, control: Control) -> None:
        self.cp = checkpoints
        self.control = control

    async def until(
        self,
        label: str,
        *,
        check: Callable[[], Awaitable[Any]] | None,
        until: datetime | None,
        linger: float,
    ) -> Waited:
        """Wait until ``check()`` returns something (ready), ``until`` passes (timeout) or the saga must stop."""
        cp, control = self.cp, self.control
        await cp.flush()  # never wait with a result that is not yet durable
        loop = asyncio.get_running_loop()
        park_at = loop.time() + max(linger, 0.0)
        refresh_at = loop.time() + REFRESH_EVERY
        delay = POLL_FIRST
        while True:
            if check is not None:
                value = await check()
                if value is not None:
                    return Waited("ready", value)
            reason = control.stop_reason(cp.current)
            if reason:
                return Waited("stop", reason)
            now = control.clock.now()
            if until is not None and now >= until:
                return Waited("timeout")
            if loop.time() >= park_at:
                await self._park(label, until)
                # whatever came while we checkpointed is not missed: look once more
                value = await check() if check is not None else None
                reason = control.stop_reason(cp.current)  # e.g. an abort the checkpoint reported
                if value is not None or reason:
                    await cp.transition({"state": SagaState.RUNNING, "waiting_for": None, "wake_at": None}, [])
                    return Waited("ready", value) if value is not None else Waited("stop", reason)
                raise Parked(label)
            deadline = cp.current.deadline
            wake = min(until, deadline) if until is not None else deadline
            nap = park_at - loop.time()
            if check is not None:
                nap = min(nap, delay)
                delay = min(delay * 1.5, POLL_CAP)
            await self._nap((wake - now).total_seconds(), nap)
            if loop.time() >= refresh_at:
                await self._refresh()
                refresh_at = loop.time() + REFRESH_EVERY

    async def _nap(self, timer: float, nap: float) -> None:
        """Sleep until the timer (the run's clock), ``nap`` real seconds, or an abort, whichever comes first."""
        control = self.control
        tasks = {asyncio.ensure_future(control.clock.sleep(max(timer, 0.0))), asyncio.ensure_future(control.aborted.wait())}
        if nap != float("inf"):
            tasks.add(asyncio.ensure_future(asyncio.sleep(max(min(nap, REFRESH_EVERY), 0.0))))
        else:
            tasks.add(asyncio.ensure_future(asyncio.sleep(REFRESH_EVERY)))
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()

    async def _refresh(self) -> None:
        """While waiting in process: learn of a durable abort request, and stop if replaced."""
        cp = self.cp
        current = await cp.store.get(cp.current.id)
        if current.lease.epoch != cp.epoch:
            raise LeaseLost(cp.current.id, cp.epoch)
        if current.abort_requested:
            self.control.note(current.abort_requested, cp.saga)

    async def _park(self, label: str, until: datetime | None) -> None:
        deadline = self.cp.current.deadline
        wake_at = min(until, deadline) if until is not None else deadline
        log.info("saga %s waits for %s (wake at %s at the latest)", self.cp.current.id, label, wake_at.isoformat())
        await self.cp.transition({"state": SagaState.WAITING, "waiting_for": label, "wake_at": wake_at}, [])
