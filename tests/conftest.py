"""Real servers for the tests: SecantusDB (or ESSENTIAL_MONGODB_URI), the Kafka broker, local Ray."""
from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import pytest

REPO = Path(__file__).resolve().parent.parent
TEST_DB = "essential_test"
JOBS_DB = "essential_testjobs"


@pytest.fixture(scope="session")
def mongo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The embedded SecantusDB process (None when ESSENTIAL_MONGODB_URI names a real MongoDB)."""
    if os.environ.get("ESSENTIAL_MONGODB_URI"):
        yield None
        return
    from essential.actors.dev.mongodb import EmbeddedMongo

    server = EmbeddedMongo(data_dir=tmp_path_factory.mktemp("mongo"), log_dir=tmp_path_factory.mktemp("logs"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mongo_uri(mongo_server: Any) -> str:
    return mongo_server.uri if mongo_server is not None else os.environ["ESSENTIAL_MONGODB_URI"]


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The embedded Kafka broker (memory storage); tests may kill and restart it on the same port."""
    from essential.actors.dev.kafka_broker import EmbeddedKafka

    broker = EmbeddedKafka(log_dir=tmp_path_factory.mktemp("kafka-logs"))
    broker.start()
    os.environ["ESSENTIAL_KAFKA_BOOTSTRAP"] = broker.bootstrap
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def essential_env(mongo_uri: str, kafka: Any) -> dict[str, str]:
    env = {
        "ESSENTIAL_MONGODB_URI": mongo_uri,
        "ESSENTIAL_KAFKA_BOOTSTRAP": kafka.bootstrap,
        "ESSENTIAL_DATABASE": TEST_DB,
        "ESSENTIAL_TEST_DB": JOBS_DB,
        "ESSENTIAL_JOB_MODULES": os.environ.get("ESSENTIAL_TEST_JOB_MODULES", "examples.jobs,tests.jobs"),
        "ESSENTIAL_SUPERVISOR_INTERVAL": "0.5",
        "ESSENTIAL_TTL_GRACE": "1",
        "ESSENTIAL_MAX_LIVE_SAGAS": "16",
        # the in-process tests kill a saga's own actor (saga:<id>); shared and pooled placement have
        # their modules, and the README and CLI tests run the default (shared)
        "ESSENTIAL_PLACEMENT": "dedicated",
        "ESSENTIAL_EXAMPLES_DB_PREFIX": "t_",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    os.environ.update(env)
    from essential.actors.settings import get_settings

    get_settings.cache_clear()
    return env


def init_ray() -> None:
    """A local Ray whose every process listens on and advertises 127.0.0.1 only."""
    import ray

    from essential.actors.dev.mongodb import free_port
    from essential.actors.loopback import bind_ray_to_loopback

    bind_ray_to_loopback()
    ray.init(
        address="local",  # a new cluster, never one that /tmp/ray/ray_current_cluster names
        _node_ip_address="127.0.0.1",
        namespace="essential",
        num_cpus=2,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=free_port(),
        log_to_driver=False,
    )


@pytest.fixture(scope="session")
def ray_session(essential_env: dict[str, str]) -> Iterator[Any]:
    import ray

    init_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def settings(essential_env: dict[str, str]) -> Any:
    from essential.actors.settings import Settings

    return Settings()


@pytest.fixture(scope="session")
def client(ray_session: Any, settings: Any) -> Any:
    from essential.actors.client.ray_client import EssentialClient

    return EssentialClient(settings)


@pytest.fixture(scope="session")
async def mongo(mongo_uri: str, essential_env: dict[str, str]) -> AsyncIterator[Any]:
    from pymongo import AsyncMongoClient

    client = AsyncMongoClient(mongo_uri, tz_aware=True)
    yield client
    await client.close()


async def empty_store(mongo: Any, database: str) -> Any:
    """A saga store on a database of its own, emptied first: for modules that count what they write."""
    from essential.persistence.store import MongoSagaStore

    await mongo.drop_database(database)
    store = MongoSagaStore(mongo, database)
    await store.ensure_indexes()
    return store


@pytest.fixture(scope="session")
async def store(mongo: Any) -> Any:
    from essential.persistence.store import MongoSagaStore

    store = MongoSagaStore(mongo, TEST_DB)
    await store.ensure_indexes()
    await mongo[JOBS_DB].effects.create_index("saga")
    return store


@pytest.fixture(scope="session")
def deployment(ray_session: Any, settings: Any, mongo: Any) -> Iterator[Callable[..., Any]]:
    """Another Essential deployment on the same Ray: its own namespace *and* database.

    Two supervisors must never sweep one database: each would take the other's
    sagas for orphans.  Returns ``make(name, **settings) -> (client, store)``.
    """
    from essential.actors.client.ray_client import EssentialClient, stop_deployment
    from essential.persistence.store import MongoSagaStore

    made: list[str] = []

    async def make(name: str, **overrides: Any) -> tuple[Any, Any]:
        conf = settings.model_copy(update={"namespace": name, "database": name, **overrides})
        client = await asyncio.to_thread(EssentialClient, conf)
        store = MongoSagaStore(mongo, name)
        await store.ensure_indexes()
        made.append(name)
        return client, store

    yield make
    for name in made:  # the deployment's long-lived actors; saga actors have exited
        stop_deployment(name, max_hosts=8)


async def poll(check: Callable[[], Any], *, timeout: float = 30.0, interval: float = 0.05, what: str = "") -> Any:
    """Await ``check()`` (sync or async) until truthy or the deadline passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or check}")
        await asyncio.sleep(interval)


# Test modules of issues whose work is still in progress: collected and reported as
# skipped (never silently dropped), so the suite stays a truthful gate for what landed.
IN_PROGRESS: dict[str, str] = {}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("ESSENTIAL_RUN_IN_PROGRESS") == "1":
        return
    for item in items:
        name = Path(str(item.fspath)).name
        reason = IN_PROGRESS.get(f"{name}::{item.name}") or IN_PROGRESS.get(name)
        if reason:
            item.add_marker(pytest.mark.skip(reason=f"in progress, not yet verified green: {reason}"))
