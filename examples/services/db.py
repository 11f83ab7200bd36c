"""Where the example services keep their data.

Every service owns one database; ``ESSENTIAL_EXAMPLES_DB_PREFIX`` is prepended
to its name (read on every call) so tests and benchmarks can use isolated
databases on a shared server.
"""
from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any, TypeVar

from pymongo import AsyncMongoClient
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import CollectionInvalid, OperationFailure

from essential import deployment_settings, shared_client

PREFIX_ENV = "ESSENTIAL_EXAMPLES_DB_PREFIX"
SERVICE_DATABASES = ("inventory", "financial", "billing", "notify", "logistic", "users", "sales")

T = TypeVar("T")

#: the checkpoint transaction a service call joined (a transactional step's ``ctx.session``):
#: while it runs, every collection comes from that session's client (a session works only with its own)
_joined: ContextVar[AsyncClientSession | None] = ContextVar("joined_transaction", default=None)


def prefix() -> str:
    return os.environ.get(PREFIX_ENV, "")


def client() -> AsyncMongoClient:
    """The process's shared client for the configured MongoDB (one pool per event loop)."""
    return shared_client(deployment_settings().mongodb_uri)


def database_name(service: str) -> str:
    return prefix() + service


def collection(bucket: str) -> AsyncCollection:
    """``collection("inventory.stocks")`` → collection ``stocks`` of database ``<prefix>inventory``."""
    service, _, name = bucket.partition(".")
    if not service or not name:
        raise ValueError(f"bucket {bucket!r} must look like 'service.collection'")
    joined = _joined.get()
    return (joined.client if joined is not None else client())[database_name(service)][name]


async def transaction(body: Callable[[AsyncClientSession], Awaitable[T]], session: AsyncClientSession | None = None) -> T:
    """Run ``body`` in one transaction: its own (``with_transaction`` retries transient write
    conflicts), or ``session``'s — a transactional step's checkpoint, which then commits the
    service's writes together with the step's record."""
    if session is not None:
        token = _joined.set(session)
        try:
            return await body(session)
        finally:
            _joined.reset(token)
    async with client().start_session() as own:
        return await own.with_transaction(body)


def now() -> datetime:
    """UTC, truncated to milliseconds (what MongoDB stores)."""
    t = datetime.now(timezone.utc)
    return t.replace(microsecond=t.microsecond // 1000 * 1000)


async def drop_all() -> None:
    """Drop every service database under the current prefix (tests, demo resets)."""
    for service in SERVICE_DATABASES:
        await client().drop_database(database_name(service))


async def ensure_collections(*buckets: str) -> None:
    """Create the collections up front: implicit creation inside concurrent transactions conflicts."""
    for bucket in buckets:
        coll = collection(bucket)
        if coll.name not in await coll.database.list_collection_names():
            try:
                await coll.database.create_collection(coll.name)
            except CollectionInvalid:  # created concurrently
                pass
            except OperationFailure as exc:
                if exc.code != 48:  # NamespaceExists
                    raise


def plain(doc: dict[str, Any]) -> dict[str, Any]:
    """A ledger document as a step result: no ``_id``/``at`` (results must be JSON-able)."""
    return {k: v for k, v in doc.items() if k not in ("_id", "at")}
