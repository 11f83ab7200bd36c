"""One AsyncMongoClient per process and event loop, configured the same everywhere.

Opening a client costs a server handshake and a connection pool; a saga actor,
host actor or example service must not pay that per saga.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any

from pymongo import AsyncMongoClient

_clients: dict[tuple[str, int], tuple[asyncio.AbstractEventLoop, AsyncMongoClient]] = {}
_lock = threading.Lock()


#: what every Essential client uses (the bench's baseline too, so its modes compare like for like)
CLIENT_OPTIONS: dict[str, Any] = {"tz_aware": True}


def new_client(uri: str, **overrides: Any) -> AsyncMongoClient:
    """A client with :data:`CLIENT_OPTIONS` (for callers that own and close their client)."""
    return AsyncMongoClient(uri, **{**CLIENT_OPTIONS, **overrides})


def shared_client(uri: str) -> AsyncMongoClient:
    """The process's client for ``uri`` on the running loop (clients are loop-bound)."""
    loop = asyncio.get_running_loop()
    key = (uri, id(loop))
    with _lock:
        cached = _clients.get(key)
        if cached is None or cached[0] is not loop:  # a new loop may reuse a dead one's id
            cached = (loop, new_client(uri, serverSelectionTimeoutMS=30_000))
            _clients[key] = cached
        return cached[1]


async def close_shared_clients() -> None:
    loop = asyncio.get_running_loop()
    with _lock:
        mine = [k for k, (owner, _) in _clients.items() if owner is loop]
        clients = [_clients.pop(k)[1] for k in mine]
    for client in clients:
        await client.close()
