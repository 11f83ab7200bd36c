"""Per-process resources shared by every saga hosted in a worker process.

Built once per process and event loop: the MongoDB client, the store and the job
registry (importing job modules) are never paid per saga.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from essential.actors.settings import Settings, run_under, settings_from
from essential.orchestration import JobRegistry
from essential.persistence.connection import shared_client
from essential.persistence.store import MongoSagaStore


@dataclass
class Runtime:
    settings: Settings
    registry: JobRegistry
    store: MongoSagaStore


_runtimes: dict[tuple[str, int], Runtime] = {}
_indexes_done: set[str] = set()


#: settings dicts already resolved in this process: a host runs thousands of sagas with the same
#: dict, and building ``Settings`` (environment sources, validation) costs about a millisecond
_resolved: dict[str, tuple[Settings, str]] = {}


def _resolve(settings: dict[str, Any] | Settings | None) -> tuple[Settings, str]:
    if not isinstance(settings, dict) or not settings:  # None reads the environment: never cached
        resolved = settings_from(settings)
        return resolved, resolved.model_dump_json()
    raw = json.dumps(settings, sort_keys=True, default=str)
    found = _resolved.get(raw)
    if found is None:
        resolved = settings_from(settings)
        found = _resolved[raw] = (resolved, resolved.model_dump_json())
    return found


async def get_runtime(settings: dict[str, Any] | Settings | None = None, *, ensure_indexes: bool = True) -> Runtime:
    """The process's runtime; saga processes pass ``ensure_indexes=False`` (the supervisor made them)."""
    resolved, dumped = _resolve(settings)
    key = (dumped, id(asyncio.get_running_loop()))
    runtime = _runtimes.get(key)
    if runtime is None:
        store = MongoSagaStore(shared_client(resolved.mongodb_uri), resolved.database)
        run_under(resolved)  # job code reaches the deployment's MongoDB, not whatever the worker's environment names
        registry = JobRegistry.from_modules(resolved.job_modules)
        runtime = Runtime(settings=resolved, registry=registry, store=store)
        _runtimes[key] = runtime
    if ensure_indexes and key[0] not in _indexes_done:
        await runtime.store.ensure_indexes()
        _indexes_done.add(key[0])
    return runtime
