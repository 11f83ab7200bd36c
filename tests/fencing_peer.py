"""The other side of tests/test_supervisor.py's stale-runner test: a second runner in a process of its own.

It has its own MongoDB client, so its sessions, its connection pool and its store's
memory of the saga are its own: whatever fences the first runner off has to go
through MongoDB.  It prints one JSON line.

    python -m tests.fencing_peer lease DATABASE SAGA_ID OWNER   # take the lease, as a restored actor does
    python -m tests.fencing_peer run DATABASE SAGA_ID OWNER     # take it and drive the saga to its end
"""
from __future__ import annotations

import asyncio
import json
import os
import sys


async def main(mode: str, database: str, saga_id: str, owner: str) -> dict:
    from pymongo import AsyncMongoClient

    from essential.orchestration import JobRegistry, SagaRunner
    from essential.persistence.store import MongoSagaStore

    client: AsyncMongoClient = AsyncMongoClient(os.environ["ESSENTIAL_MONGODB_URI"], tz_aware=True)
    try:
        store = MongoSagaStore(client, database)
        if mode == "lease":
            saga = await store.acquire_lease(saga_id, owner)
        else:
            registry = JobRegistry.from_modules(["tests.jobs"])
            saga = await SagaRunner(saga_id, store=store, registry=registry, owner=owner).run()
        return {"pid": os.getpid(), "state": saga.state.value, "epoch": saga.lease.epoch, "owner": saga.lease.owner}
    finally:
        await client.close()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(*sys.argv[1:5]))), flush=True)
