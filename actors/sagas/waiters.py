"""Callers waiting for sagas to end: told by the saga's host, with one slow poll as a net.

``Supervisor.wait`` used to poll MongoDB per waiting caller (every 20–250 ms):
with 32 callers that is more queries than the sagas' own checkpoints, on the
server that is the bottleneck.  Here every waiter registers a future; the actor
or host that ran the saga reports its end with the saga as the runner left it
(:meth:`EndWatch.resolve`, no read at all), and one task asks MongoDB every
half second which of the awaited sagas have ended, for the ends nobody reported
(another process drove the saga, a notice was lost).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

log = logging.getLogger("essential.waiters")

#: ``ended(ids)`` → {id: saga} for those of the ids whose saga is terminal or parked
EndedQuery = Callable[[list[str]], Awaitable[Mapping[str, Any]]]


class EndWatch:
    def __init__(self, ended: EndedQuery, interval: float = 0.5) -> None:
        self._ended = ended
        self._interval = interval
        self._waiters: dict[str, list[asyncio.Future[Any]]] = {}
        self._task: asyncio.Task[None] | None = None

    async def wait(self, saga_id: str, timeout: float) -> Any | None:
        """The ended saga, or None when ``timeout`` seconds passed first."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(saga_id, []).append(future)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._poll())
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except asyncio.TimeoutError:
            return None
        finally:
            futures = self._waiters.get(saga_id, [])
            with contextlib.suppress(ValueError):
                futures.remove(future)
            if not futures:
                self._waiters.pop(saga_id, None)

    def resolve(self, saga_id: str, saga: Any) -> None:
        """The saga's host reported it ended (the fast path; the poll is the safety net)."""
        for future in self._waiters.pop(saga_id, []):
            if not future.done():
                future.set_result(saga)

    async def _poll(self) -> None:
        while self._waiters:
            try:
                for saga_id, saga in (await self._ended(list(self._waiters))).items():
                    self.resolve(saga_id, saga)
            except Exception:  # noqa: BLE001 - a failed round (MongoDB outage) is retried next tick
                log.warning("end watch: poll failed", exc_info=True)
            await asyncio.sleep(self._interval)
