"""Time as a dependency, so tests can move it and the runner never reads it directly.

:class:`SystemClock` is real time.  :class:`ManualClock` is time travel for
tests: it stands still until the test moves it, and a ``sleep`` longer than
``skip_below`` seconds returns only once the clock has been advanced past its
end, so a test fast-forwards TTLs, durable timers and signal timeouts of hours
in no real time::

    clock = ManualClock()
    runner = SagaRunner(saga_id, store=store, registry=registry, owner="test", clock=clock)
    task = asyncio.create_task(runner.run())
    await clock.until_sleeping()          # the runner waits on a timer
    clock.advance(hours=6)                # ... which fires now
    saga = await task
"""
from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime: ...

    async def sleep(self, seconds: float) -> None: ...


def _ms(value: datetime) -> datetime:
    # MongoDB stores milliseconds; truncating here keeps round trips equal.
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


class SystemClock:
    def now(self) -> datetime:
        return _ms(datetime.now(timezone.utc))

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(seconds, 0))


class ManualClock:
    """A clock that moves only when told to (or by short sleeps, see ``skip_below``).

    ``skip_below``: a sleep shorter than this many seconds (retry back-off, not a
    business timer) moves the clock forward by itself and returns at once, so
    steps' retries do not wait for the test.  Longer sleeps wait for
    :meth:`advance`.  Usable from the event loop that sleeps on it, or from any
    thread.
    """

    def __init__(self, start: datetime | None = None, *, skip_below: float = 1.0) -> None:
        self._now = _ms(start or datetime.now(timezone.utc))
        self.skip_below = skip_below
        self._sleepers: list[tuple[datetime, asyncio.Future[None]]] = []

    def now(self) -> datetime:
        return self._now

    @property
    def sleepers(self) -> int:
        """How many sleeps are waiting for the clock to move."""
        return sum(1 for _, fut in self._sleepers if not fut.done())

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        if seconds < self.skip_below:
            self.advance(seconds)
            await asyncio.sleep(0)
            return
        until = self._now + timedelta(seconds=seconds)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (until, future)
        self._sleepers.append(entry)
        try:
            await future
        finally:
            if entry in self._sleepers:
                self._sleepers.remove(entry)

    def advance(self, seconds: float = 0.0, *, minutes: float = 0.0, hours: float = 0.0, days: float = 0.0) -> datetime:
        """Move time forward; every sleep that ends by the new time returns."""
        delta = timedelta(seconds=seconds, minutes=minutes, hours=hours, days=days)
        if delta < timedelta(0):
            raise ValueError("time only moves forward")
        return self.set(self._now + delta)

    def set(self, when: datetime) -> datetime:
        """Jump to ``when`` (not earlier than now)."""
        when = _ms(when)
        if when < self._now:
            raise ValueError("time only moves forward")
        self._now = when
        for until, future in list(self._sleepers):
            if until <= when and not future.done():
                future.get_loop().call_soon_threadsafe(_wake, future)
        return when

    async def until_sleeping(self, count: int = 1, timeout: float = 30.0) -> None:
        """Wait (in real time) until ``count`` sleeps are waiting for the clock to move."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.sleepers < count:
            if loop.time() >= deadline:
                raise TimeoutError(f"{self.sleepers} sleeper(s) after {timeout:g}s, expected {count}")
            await asyncio.sleep(0.01)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
