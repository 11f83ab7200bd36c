"""Idempotency keys: a repeated start returns the saga the key started, a deleted saga frees its
key, and a database written by an earlier version (keys guarded by a unique index on the saga
collection) keeps its keys when that index is retired.

Against the real dev MongoDB, through the store the supervisor uses.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, AsyncIterator

import pytest
from pymongo import ASCENDING, AsyncMongoClient, IndexModel

from essential.orchestration import JobRegistry, SagaState, StartRequest, SystemClock, build_saga
from essential.persistence.store import MongoSagaStore

pytestmark = pytest.mark.asyncio


@pytest.fixture
async def client(essential_env: dict[str, str], mongo_uri: str) -> AsyncIterator[AsyncMongoClient]:
    mongo: AsyncMongoClient = AsyncMongoClient(mongo_uri, tz_aware=True)
    yield mongo
    await mongo.close()


@pytest.fixture(scope="module")
def registry() -> JobRegistry:
    return JobRegistry.from_modules(["tests.jobs"])


async def fresh_store(client: AsyncMongoClient, name: str) -> MongoSagaStore:
    await client.drop_database(name)
    store = MongoSagaStore(client, name)
    await store.ensure_indexes()
    return store


async def start(store: MongoSagaStore, registry: JobRegistry, key: str, payload: dict[str, Any] | None = None) -> tuple[str, bool]:
    saga, event = build_saga(
        StartRequest(job="test:chain", payload=payload or {}, idempotency_key=key), registry, SystemClock()
    )
    stored, created = await store.create(saga, event)
    return stored.id, created


async def test_a_repeated_start_returns_the_saga_its_key_started(client: AsyncMongoClient, registry: JobRegistry) -> None:
    store = await fresh_store(client, "keys_repeat")
    first, created = await start(store, registry, "order-42")
    again, created_again = await start(store, registry, "order-42")
    other, created_other = await start(store, registry, "order-43")
    assert created and not created_again and again == first
    assert created_other and other != first
    assert (await store.by_idempotency_key("order-42")).id == first
    assert await store.sagas.count_documents({}) == 2


async def test_deleting_a_saga_frees_its_key(client: AsyncMongoClient, registry: JobRegistry) -> None:
    store = await fresh_store(client, "keys_deleted")
    old, _ = await start(store, registry, "renewal-7")
    kept, _ = await start(store, registry, "renewal-8")
    long_ago = datetime.now(timezone.utc) - timedelta(days=30)
    await store.sagas.update_many({}, {"$set": {"state": SagaState.COMPLETED.value, "updatedAt": long_ago}})
    await store.sagas.update_one({"idempotency_key": "renewal-8"}, {"$set": {"updatedAt": datetime.now(timezone.utc)}})
    assert await store.delete_history(datetime.now(timezone.utc) - timedelta(days=1)) == 1
    assert await store.by_idempotency_key("renewal-7") is None
    new, created = await start(store, registry, "renewal-7")
    assert created and new != old
    again, created_again = await start(store, registry, "renewal-8")
    assert again == kept and not created_again  # the saga still stored keeps its key


async def test_keys_of_an_earlier_database_survive_the_retired_index(
    client: AsyncMongoClient, registry: JobRegistry
) -> None:
    store = await fresh_store(client, "keys_upgrade")
    first, _ = await start(store, registry, "transfer-1")
    # the database as an earlier version left it: no key collection, the key behind a unique index
    await store.keys.drop()
    await store.sagas.create_indexes([IndexModel(
        [("idempotency_key", ASCENDING)], name="idempotency_key_unique", unique=True,
        partialFilterExpression={"idempotency_key": {"$type": "string"}},
    )])  # fmt: skip
    upgraded = MongoSagaStore(client, "keys_upgrade")
    await upgraded.ensure_indexes()
    names = {ix["name"] async for ix in await upgraded.sagas.list_indexes()}
    assert "idempotency_key_unique" not in names
    again, created = await start(upgraded, registry, "transfer-1")
    assert again == first and not created
    assert await upgraded.sagas.count_documents({}) == 1
