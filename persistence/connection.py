"""One AsyncMongoClient per process and event loop.

Opening a client costs a server handshake and a connection pool; a saga actor,
host actor or example service must not pay that per saga.
"""
from __future__ import annotations

import asyncio
import threading

from pymongo import AsyncMongoClient

_clients: dict[tuple[str, int], tuple[asyncio.AbstractEventLoop, AsyncMongoClient]] = {}
_lock = threading.Lock()


def shared_client(uri: str) -> AsyncMongoClient:
    """The process's client for ``uri`` on the running loop (clients are loop-bound)."""
    loop = asyncio.get_running_loop()
    key = (uri, id(loop))
    with _lock:
        cached = _clients.get(key)
        if cached is None or cached[0] is not loop:  # a new loop may reuse a dead one's id
            cached = (loop, AsyncMongoClient(uri, tz_aware=True, serverSelectionTimeoutMS=30_000))
            _clients[key] = cached
        return cached[1]


async def close_shared_clients() -> None:
    loop = asyncio.get_running_loop()
    with _lock:
        mine = [k for k, (owner, _) in _clients.items() if owner is loop]
        clients = [_clients.pop(k)[1] for k in mine]
    for client in clients:
        await client.close()
