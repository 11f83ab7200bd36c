"""A map bounded in size and in idle time, for caches of long-lived actors.

Why: the supervisor caches, per open recorded saga, the actor handle and job that
let an ``add`` skip a look-up.  A saga may end where the cache never hears of it
(TTL expiry, an abort over Kafka or through the orchestrated API, a crash), so
"drop the entry when the saga ends" alone lets the cache grow with every saga
ever opened.  Here an entry goes when it has not been used for ``idle`` seconds,
and the least recently used go first when there are more than ``max_entries``;
losing one only costs the next operation a look-up.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable, Generic, Iterator, TypeVar

K = TypeVar("K")
V = TypeVar("V")
_MISSING = object()


class ExpiringMap(Generic[K, V]):
    """``get``/``[]=``/``pop``/``len``/``in`` of a dict; every use refreshes the entry."""

    def __init__(self, *, max_entries: int, idle: float, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1 or idle <= 0:
            raise ValueError("an ExpiringMap needs max_entries >= 1 and idle > 0")
        self.max_entries, self.idle, self._clock = max_entries, idle, clock
        self._data: OrderedDict[K, tuple[V, float]] = OrderedDict()  # least recently used first

    def _prune(self) -> float:
        now = self._clock()
        while self._data:
            _, (_, used) = next(iter(self._data.items()))
            if now - used < self.idle:
                break
            self._data.popitem(last=False)
        return now

    def __setitem__(self, key: K, value: V) -> None:
        now = self._prune()
        self._data[key] = (value, now)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def get(self, key: K, default: V | None = None) -> V | None:
        now = self._prune()
        item = self._data.get(key)
        if item is None:
            return default
        self._data[key] = (item[0], now)
        self._data.move_to_end(key)
        return item[0]

    def pop(self, key: K, default: object = _MISSING) -> V | None:
        item = self._data.pop(key, None)
        if item is None:
            if default is _MISSING:
                raise KeyError(key)
            return default  # type: ignore[return-value]
        return item[0]

    def __contains__(self, key: object) -> bool:
        self._prune()
        return key in self._data

    def __len__(self) -> int:
        self._prune()
        return len(self._data)

    def __iter__(self) -> Iterator[K]:
        self._prune()
        return iter(list(self._data))
