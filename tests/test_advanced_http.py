"""``POST /essential/sagas/{id}/signal`` delivers a signal to a waiting saga."""
from __future__ import annotations

import asyncio
import secrets
from typing import Any, AsyncIterator, Iterator

import httpx
import pytest

from essential.orchestration import SagaState

from .conftest import poll

pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module")
def http_api(ray_session: Any, client: Any, settings: Any) -> Iterator[tuple[str, str]]:
    from ray import serve

    from essential.actors.dev.mongodb import free_port
    from essential.actors.http.api import start_http

    token = secrets.token_urlsafe(24)
    base = start_http(settings.model_copy(update={"http_port": free_port()}), token=token)
    yield base, token
    serve.shutdown()


@pytest.fixture
async def http(http_api: tuple[str, str]) -> AsyncIterator[httpx.AsyncClient]:
    base, token = http_api
    async with httpx.AsyncClient(base_url=base.removesuffix("/essential"), timeout=60,
                                 headers={"Authorization": f"Bearer {token}"}) as session:  # fmt: skip
        yield session


async def test_a_signal_over_http_wakes_the_waiting_saga(http: httpx.AsyncClient, client: Any, store: Any) -> None:
    saga_id = await asyncio.to_thread(client.start, "test:signal", {})

    async def waiting() -> bool:
        return (await store.get(saga_id)).state == SagaState.WAITING

    await poll(waiting, timeout=60, what="the saga to wait")
    sent = await http.post(f"/essential/sagas/{saga_id}/signal", json={"name": "go", "payload": {"via": "http"}, "key": "k1"})
    assert sent.status_code == 200, sent.text
    assert sent.json()["delivered"] is True and sent.json()["data"]["id"] == saga_id
    again = await http.post(f"/essential/sagas/{saga_id}/signal", json={"name": "go", "payload": {"via": "retry"}, "key": "k1"})
    assert again.status_code == 200 and again.json()["delivered"] is False, again.text
    saga = await asyncio.to_thread(client.wait, saga_id, 120)
    assert saga.state == SagaState.COMPLETED, saga.error
    assert next(s for s in await store.stages(saga_id) if s.step == "go").res == {"got": {"via": "http"}}

    ended = await http.post(f"/essential/sagas/{saga_id}/signal", json={"name": "go"})
    assert ended.status_code == 409 and "can no longer be delivered" in ended.json()["message"]
    missing = await http.post(f"/essential/sagas/{'f' * 24}/signal", json={"name": "go"})
    assert missing.status_code == 404
    nameless = await http.post(f"/essential/sagas/{saga_id}/signal", json={"payload": 1})
    assert nameless.status_code == 400 and "name" in nameless.text
