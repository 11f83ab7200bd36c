"""Why a run must stop: an abort that was asked for, or the saga's TTL passing.

Shared by every part of one run (the driver, the step handlers, the retry
executor, the waits), so an abort notice reaches whatever is in progress:
honoured between steps, during a retry's back-off and while waiting.
"""
from __future__ import annotations

import asyncio

from essential.orchestration.clock import Clock
from essential.orchestration.models import Saga


class Control:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.abort_reason: str | None = None
        self.aborted = asyncio.Event()

    def request_abort(self, reason: str) -> None:
        """The first reason wins; every waiter wakes."""
        if self.abort_reason is None:
            self.abort_reason = reason
        self.aborted.set()

    def note(self, abort_requested: object, saga: Saga | None) -> None:
        """A fenced write returned the saga's durable abort request: honour it like a notice."""
        if isinstance(abort_requested, str) and abort_requested:
            if saga is not None and saga.abort_requested is None:
                saga.abort_requested = abort_requested  # as stored: run() returns this copy
            self.request_abort(abort_requested)

    def stop_reason(self, saga: Saga) -> str | None:
        if self.abort_reason:
            return self.abort_reason
        if self.clock.now() >= saga.deadline:
            return f"ttl of {saga.ttl:g}s expired"
        return None

    def ttl_passed(self, saga: Saga) -> bool:
        return self.abort_reason is None and self.clock.now() >= saga.deadline

    async def sleep(self, delay: float) -> None:
        """Sleep on the run's clock, but wake early when an abort arrives."""
        sleeper = asyncio.ensure_future(self.clock.sleep(delay))
        waiter = asyncio.ensure_future(self.aborted.wait())
        try:
            await asyncio.wait({sleeper, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, waiter):
                task.cancel()
