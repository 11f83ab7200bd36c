"""The recorded-saga HTTP API served by Ray Serve, driven by an ordinary HTTP client.

The platform's routes on 127.0.0.1: start → add → commit and start → add → abort
(the data restored exactly), bearer-token authentication, 400 naming the
field, 404, 409, 413, and listings filtered the way the platform's clients send
filters (``query[state]=...``).
"""
from __future__ import annotations

import json
import secrets
from datetime import datetime, timedelta, timezone
from typing import Any, AsyncIterator, Iterator

import httpx
import pytest
from bson import Decimal128, ObjectId, json_util
from pymongo import ReturnDocument

from essential.orchestration.models import new_id

DB = "rthttp"
MAX_BODY = 64 * 1024


def ejson(value: Any) -> Any:
    """A document as the platform's clients send it: MongoDB Extended JSON."""
    return json.loads(json_util.dumps(value, json_options=json_util.RELAXED_JSON_OPTIONS))


@pytest.fixture(scope="module")
def http_api(ray_session: Any, client: Any, settings: Any) -> Iterator[tuple[str, str]]:
    """Ray Serve on a free 127.0.0.1 port with the API deployed; yields (base address, token)."""
    from ray import serve

    from essential.actors.dev.mongodb import free_port
    from essential.actors.http.api import start_http

    token = secrets.token_urlsafe(24)
    conf = settings.model_copy(update={"http_port": free_port(), "http_max_body_bytes": MAX_BODY})
    base = start_http(conf, token=token)
    assert base.startswith("http://127.0.0.1:"), base
    yield base, token
    serve.shutdown()


@pytest.fixture
async def http(http_api: tuple[str, str]) -> AsyncIterator[httpx.AsyncClient]:
    base, token = http_api
    async with httpx.AsyncClient(base_url=base.removesuffix("/essential"), timeout=60,
                                 headers={"Authorization": f"Bearer {token}"}) as session:  # fmt: skip
        yield session


async def test_start_add_commit(http: httpx.AsyncClient, mongo: Any) -> None:
    orders = mongo[DB].orders
    started = await http.post("/essential/sagas/start", json={"ttl": 120, "job": "http:checkout", "correlation": "c-1"})
    assert started.status_code == 201, started.text
    saga = started.json()["data"]
    assert saga["state"] == "running" and saga["_id"] == saga["id"] and saga["kind"] == "recorded"
    assert saga["correlation_id"] == "c-1" and saga["job"] == "http:checkout"

    order = {"_id": ObjectId(), "customer": "bob", "total": Decimal128("9.90"), "at": datetime(2025, 3, 1, tzinfo=timezone.utc)}
    await orders.insert_one(order)
    added = await http.post("/essential/sagas/add", json={
        "saga": saga["id"], "bucket": f"{DB}.orders", "action": "INSERT_MANY",
        "req": {"documents": ejson([order])}, "res": {"insertedIds": ejson([order["_id"]])},
        "meta": {"trace": "t-1"},
    })  # fmt: skip
    assert added.status_code == 201, added.text
    stage = added.json()["data"]
    assert stage["seq"] == 1 and stage["action"] == "create" and stage["op"] == "insert_many"
    assert stage["meta"]["trace"] == "t-1" and stage["undo"]["delete"] == [str(order["_id"])]

    committed = await http.get(f"/essential/sagas/{saga['id']}/commit")
    assert committed.status_code == 200, committed.text
    assert committed.json()["data"]["state"] == "completed"
    assert await orders.find_one({"_id": order["_id"]}) == order, "commit leaves the data in place"

    again = await http.get(f"/essential/sagas/{saga['id']}/commit")
    assert again.status_code == 409 and "committed already" in again.json()["message"]
    late = await http.get(f"/essential/sagas/{saga['id']}/abort")
    assert late.status_code == 409
    read = await http.get(f"/essential/sagas/{saga['id']}")
    assert read.status_code == 200 and read.json()["data"]["state"] == "completed"
    stages = await http.get("/essential/saga-stages", params={"query[saga]": saga["id"]})
    assert stages.status_code == 200 and [s["seq"] for s in stages.json()["items"]] == [1]


async def test_start_add_abort_restores_the_data(http: httpx.AsyncClient, mongo: Any) -> None:
    accounts = mongo[DB].accounts
    account = {"_id": ObjectId(), "owner": "carol", "balance": Decimal128("50.00"),
               "limits": {"daily": 100, "since": datetime(2024, 1, 2, tzinfo=timezone.utc)}}  # fmt: skip
    await accounts.insert_one(account)
    snapshot = list((await accounts.find_one({"_id": account["_id"]})).items())

    saga = (await http.post("/essential/sagas/start", json={"ttl": 120})).json()["data"]
    before = await accounts.find_one_and_update(
        {"_id": account["_id"]}, {"$set": {"balance": Decimal128("20.00")}, "$unset": {"limits": ""}},
        return_document=ReturnDocument.BEFORE,
    )
    added = await http.post("/essential/sagas/add", json={
        "saga": saga["id"], "bucket": f"{DB}.accounts", "action": "FIND_ONE_AND_UPDATE",
        "req": {"filter": ejson({"_id": account["_id"]})}, "res": ejson(before),
    })  # fmt: skip
    assert added.status_code == 201, added.text
    receipt = {"_id": ObjectId(), "owner": "carol", "amount": 30}
    await mongo[DB].receipts.insert_one(receipt)
    added = await http.post("/essential/sagas/add", json={
        "saga": saga["id"], "bucket": f"{DB}.receipts", "action": "create", "res": {"insertedId": ejson(receipt["_id"])},
    })  # fmt: skip
    assert added.status_code == 201, added.text

    aborted = await http.get(f"/essential/sagas/{saga['id']}/abort", params={"reason": "changed my mind"})
    assert aborted.status_code == 200, aborted.text
    assert aborted.json()["data"]["state"] == "aborted" and "changed my mind" in aborted.json()["data"]["error"]
    restored = await accounts.find_one({"_id": account["_id"]})
    assert list(restored.items()) == snapshot, "restored field by field, BSON types and order included"
    assert await mongo[DB].receipts.find_one({"_id": receipt["_id"]}) is None

    refused = await http.post("/essential/sagas/add", json={"saga": saga["id"], "bucket": f"{DB}.x", "action": "FIND"})
    assert refused.status_code == 409 and "aborted" in refused.json()["message"]
    refused = await http.get(f"/essential/sagas/{saga['id']}/commit")
    assert refused.status_code == 409
    stages = (await http.get("/essential/saga-stages", params={"saga": saga["id"]})).json()["items"]
    assert [(s["action"], s.get("compensates")) for s in stages] == [
        ("update", None), ("create", None), ("compensate", 2), ("compensate", 1),
    ]  # fmt: skip


async def test_requests_without_the_token_are_refused(http_api: tuple[str, str]) -> None:
    base, token = http_api
    root = base.removesuffix("/essential")
    async with httpx.AsyncClient(base_url=root, timeout=30) as anonymous:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {token}"}):
            response = await anonymous.post("/essential/sagas/start", json={"ttl": 10}, headers=headers)
            assert response.status_code == 401, response.text
            assert response.headers["www-authenticate"].startswith("Bearer")
        assert (await anonymous.get("/essential/sagas")).status_code == 401
        assert (await anonymous.get("/essential/health")).json() == {"ok": True}


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/essential/sagas/start", b"{not json", "<body>"),
        ("/essential/sagas/start", b"[1, 2]", "<body>"),
        ("/essential/sagas/start", {"ttl": -5}, "ttl"),
        ("/essential/sagas/start", {"job": "x"}, "ttl"),
        ("/essential/sagas/start", {"ttl": 5, "colour": "red"}, "colour"),
        ("/essential/sagas/add", {"bucket": "a.b", "action": "create"}, "saga"),
        ("/essential/sagas/add", {"saga": "a" * 24, "action": "create"}, "bucket"),
        ("/essential/sagas/add", {"saga": "a" * 24, "bucket": "a.b", "action": "MERGE"}, "action"),
        ("/essential/sagas/add", {"saga": "a" * 24, "bucket": "a.b", "action": "INSERT_MANY", "res": {}}, "res.insertedIds"),
        ("/essential/sagas/add", {"saga": "a" * 24, "bucket": "a.b", "action": "UPDATE_MANY", "res": {"matchedCount": 3}}, "res.before"),
    ],
)
async def test_malformed_requests_get_400_naming_the_field(
    http: httpx.AsyncClient, path: str, body: Any, field: str
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = await http.post(path, content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["fields"][0]["field"] == field and field in error["message"], error


async def test_unknown_sagas_get_404(http: httpx.AsyncClient) -> None:
    unknown = new_id()
    for path in (f"/essential/sagas/{unknown}", f"/essential/sagas/{unknown}/commit",
                 f"/essential/sagas/{unknown}/abort"):  # fmt: skip
        response = await http.get(path)
        assert response.status_code == 404, (path, response.text)
        assert response.json()["type"] == "SagaNotFound"
    malformed = await http.get("/essential/sagas/not-a-saga-id")
    assert malformed.status_code == 400 and malformed.json()["fields"][0]["field"] == "id", malformed.text
    added = await http.post("/essential/sagas/add", json={"saga": unknown, "bucket": "a.b", "action": "FIND"})
    assert added.status_code == 404


async def test_oversized_bodies_are_refused(http: httpx.AsyncClient) -> None:
    big = json.dumps({"ttl": 5, "job": "x" * (MAX_BODY + 10)}).encode()
    response = await http.post("/essential/sagas/start", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while reading
        for _ in range(4):
            yield b" " * (MAX_BODY // 2)

    response = await http.post("/essential/sagas/start", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text


async def test_listing_filters_as_the_platform_sends_them(http: httpx.AsyncClient) -> None:
    job = f"http:list-{secrets.token_hex(4)}"
    ids = []
    for _ in range(3):
        ids.append((await http.post("/essential/sagas/start", json={"ttl": 300, "job": job})).json()["data"]["id"])
    assert (await http.get(f"/essential/sagas/{ids[0]}/commit")).status_code == 200

    running = await http.get("/essential/sagas", params={"query[state]": "running", "query[job]": job})
    assert running.status_code == 200, running.text
    assert sorted(s["id"] for s in running.json()["items"]) == sorted(ids[1:])
    completed = await http.get("/essential/sagas", params={"state": "completed", "job": job})
    assert [s["id"] for s in completed.json()["items"]] == [ids[0]]
    both = await http.get("/essential/sagas", params=[("query[state][]", "running"), ("query[state][]", "completed"),
                                                       ("query[job]", job), ("limit", "2")])  # fmt: skip
    assert len(both.json()["items"]) == 2
    count = await http.get("/essential/sagas/count", params={"query[job]": job})
    assert count.json() == {"total": 3}
    since = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
    later = await http.get("/essential/sagas/count", params={"query[job]": job, "query[createdAt][$gte]": since})
    assert later.json() == {"total": 0}
    for params, field in (({"query[state]": "sleeping"}, "state"), ({"query[colour]": "red"}, "colour"),
                          ({"limit": "0"}, "limit"), ({"since": "yesterday"}, "since")):  # fmt: skip
        refused = await http.get("/essential/sagas", params=params)
        assert refused.status_code == 400 and refused.json()["fields"][0]["field"] == field, refused.text
    for saga_id in ids[1:]:
        assert (await http.get(f"/essential/sagas/{saga_id}/abort")).json()["data"]["state"] == "aborted"
