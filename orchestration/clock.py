"""Time as a dependency, so tests can move it and the runner never reads it directly."""
from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> datetime:
        # MongoDB stores milliseconds; truncating here keeps round trips equal.
        now = datetime.now(timezone.utc)
        return now.replace(microsecond=now.microsecond // 1000 * 1000)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(seconds, 0))
