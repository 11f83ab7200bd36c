"""Hostile input at Essential's boundaries: the HTTP API first, then the Python client and the CLI.

Every class of bad input a client can send — no or wrong token, the token in the
query string, malformed JSON, wrong content types, oversize and deeply nested
bodies, operator injection in ``query[...]`` filters, huge or negative paging,
bad ids, out-of-range dates, values MongoDB cannot store, buckets that would
reach Essential's own (or any forbidden) database, and all of that at once with
good requests mixed in — must get a 4xx in Essential's JSON envelope that names
the field or the reason: never a 500, never a 503 that blames the supervisor,
never a request accepted twice, and the API keeps serving good requests.

The module runs its own deployment (namespace and database ``hostile``, shared
placement) whose recorded buckets may only reach ``hostile_shop*`` databases,
so nothing sent here can touch the sagas of other test modules.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import socket
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from http import HTTPStatus
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import httpx
import pytest
import ray
from bson import ObjectId

from essential.orchestration import IdempotencyKeyReused, InvalidRequest

from .conftest import REPO

NS = "hostile"
SHOP = "hostile_shop"  # the service's database; the deployment allows hostile_shop* only
TWIN = "hostile_shop_twin"  # allowed by name, but it holds another Essential deployment
MAX_BODY = 64 * 1024
ESSENTIAL = str(Path(sys.executable).with_name("essential"))


async def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Blocking Ray calls run off the event loop that the MongoDB client uses."""
    return await asyncio.to_thread(fn, *args, **kwargs)


@dataclass
class Api:
    base: str  # http://127.0.0.1:<port>
    token: str
    client: Any  # EssentialClient of the deployment
    store: Any  # MongoSagaStore of its database
    port: int


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
async def hostile(deployment: Any, mongo: Any) -> AsyncIterator[tuple[Any, Any]]:
    from essential.persistence.store import MongoSagaStore

    client, store = await deployment(NS, placement="shared", host_pool_size=1, recorded_databases="hostile_shop*")
    await MongoSagaStore(mongo, TWIN).ensure_indexes()  # an Essential deployment's collections, in an allowed name
    yield client, store
    from essential.actors.client.ray_client import stop_deployment

    await call(stop_deployment, NS, 2)


@pytest.fixture(scope="module")
def api(hostile: tuple[Any, Any]) -> Iterator[Api]:
    from ray import serve

    from essential.actors.dev.mongodb import free_port
    from essential.actors.http.api import start_http

    client, store = hostile
    token = secrets.token_urlsafe(24)
    port = free_port()
    conf = client.settings.model_copy(update={"http_port": port, "http_max_body_bytes": MAX_BODY})
    base = start_http(conf, token=token)
    assert base == f"http://127.0.0.1:{port}/essential", base
    yield Api(base.removesuffix("/essential"), token, client, store, port)
    serve.shutdown()


@pytest.fixture
async def http(api: Api) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=api.base, timeout=60, headers={"Authorization": f"Bearer {api.token}"}) as s:
        yield s


def refused(response: httpx.Response, status: int, field: str | None = None, says: str | None = None) -> dict:
    """Assert a refusal in Essential's envelope: the status, the JSON body, the field named."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    body = response.json()
    assert {"statusCode", "error", "type", "message", "fields"} <= set(body), body
    assert body["statusCode"] == status and body["error"] == HTTPStatus(status).phrase, body
    assert body["message"] and isinstance(body["fields"], list), body
    if field is not None:
        assert field in [f["field"] for f in body["fields"]], body
        assert all(f["reason"] for f in body["fields"]), body
    if says is not None:
        assert says in body["message"], body
    return body


async def start(http: httpx.AsyncClient, **body: Any) -> dict:
    response = await http.post("/essential/sagas/start", json={"ttl": 120, **body})
    assert response.status_code in (200, 201), response.text
    return response.json()["data"]


async def good_round(http: httpx.AsyncClient, mongo: Any) -> None:
    """A start, an add and a commit that must succeed: the API still serves."""
    saga = await start(http, job="hostile:good")
    order = {"_id": ObjectId(), "total": 3}
    await mongo[SHOP].orders.insert_one(order)
    added = await http.post("/essential/sagas/add", json={
        "saga": saga["id"], "bucket": f"{SHOP}.orders", "action": "INSERT_ONE", "res": {"insertedId": str(order["_id"])},
    })  # fmt: skip
    assert added.status_code == 201, added.text
    committed = await http.get(f"/essential/sagas/{saga['id']}/commit")
    assert committed.status_code == 200 and committed.json()["data"]["state"] == "completed", committed.text


def raw_request(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes no HTTP client library would send; the status, headers and body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


# --------------------------------------------------------------------------- authentication
async def test_the_token_counts_only_in_the_authorization_header(api: Api) -> None:
    async with httpx.AsyncClient(base_url=api.base, timeout=30) as anonymous:
        for headers, params in (
            ({}, {}),
            ({"Authorization": "Bearer wrong"}, {}),
            ({"Authorization": f"Basic {api.token}"}, {}),
            ({"Authorization": api.token}, {}),
            ({"Authorization": f"Bearer {api.token}x"}, {}),
            ({"Authorization": b"Bearer \xc3\xa9\xc3\xa9"}, {}),
            ({}, {"token": api.token}),
            ({}, {"access_token": api.token}),
            ({}, {"authorization": f"Bearer {api.token}"}),
            ({"Cookie": f"token={api.token}"}, {}),
        ):
            for method, path in (("GET", "/essential/sagas"), ("POST", "/essential/sagas/start")):
                response = await anonymous.request(method, path, headers=headers, params=params, json={"ttl": 5})
                body = refused(response, 401, field="Authorization")
                assert api.token not in response.text, "the token is never echoed"
                assert response.headers["www-authenticate"].startswith("Bearer"), body
        assert (await anonymous.get("/essential/health")).json() == {"ok": True}
    assert await api.store.sagas.count_documents({"ttl": 5}) == 0, "nothing was started without the token"


# --------------------------------------------------------------------------- bodies
@pytest.mark.parametrize(
    ("content", "content_type", "field"),
    [
        (b"{not json", "application/json", "<body>"),
        (b"", "application/json", "<body>"),
        (b"   ", "application/json", "<body>"),
        (b"null", "application/json", "<body>"),
        (b"[1, 2]", "application/json", "<body>"),
        (b'"ttl"', "application/json", "<body>"),
        (b"\xff\xfe{}", "application/json", "<body>"),
        (b'{"ttl": NaN}', "application/json", "<body>"),
        (b'{"ttl": Infinity}', "application/json", "<body>"),
        (b'{"ttl": 1e999}', "application/json", "<body>"),
        (b'{"ttl": 5, "ttl": 6}', "application/json", "<body>"),
        (b'{"ttl": 5, "id": {"$oid": "zz"}}', "application/json", "<body>"),
        (b'{"ttl": 5, "job": "\\ud800"}', "application/json", "<body>"),
        (b'{"ttl": 5}', "text/plain", "content-type"),
        (b"ttl=5", "application/x-www-form-urlencoded", "content-type"),
        (b'{"ttl": 5}', "multipart/form-data; boundary=x", "content-type"),
        (b'{"ttl": 5}', "application/json; charset=latin-1", "content-type"),
        (b'{"ttl": 5}', None, "content-type"),
    ],
)
async def test_malformed_json_and_wrong_content_types(
    http: httpx.AsyncClient, api: Api, content: bytes, content_type: str | None, field: str
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    request = http.build_request("POST", "/essential/sagas/start", content=content, headers=headers)
    if content_type is None:
        request.headers.pop("content-type", None)
    refused(await http.send(request), 400, field=field)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"ttl": True}, "ttl"),
        ({"ttl": False}, "ttl"),
        ({"ttl": "5"}, "ttl"),
        ({"ttl": [5]}, "ttl"),
        ({"ttl": 0}, "ttl"),
        ({"ttl": 10**30}, "ttl"),
        ({"ttl": 5, "job": 7}, "job"),
        ({"ttl": 5, "job": ""}, "job"),
        ({"ttl": 5, "id": "Z" * 24}, "id"),
        ({"ttl": 5, "idempotency_key": True}, "idempotency_key"),
        ({"ttl": 5, "$where": "sleep(1000)"}, "$where"),
        ({"ttl": 5, "job\u0000": "x"}, "job\u0000"),
    ],
)
async def test_start_is_strict(http: httpx.AsyncClient, api: Api, body: dict, field: str) -> None:
    refused(await http.post("/essential/sagas/start", json=body), 400, field=field)


async def test_oversize_and_deeply_nested_bodies(http: httpx.AsyncClient, api: Api) -> None:
    big = json.dumps({"ttl": 5, "job": "x" * (MAX_BODY + 10)}).encode()
    refused(await http.post("/essential/sagas/start", content=big, headers={"content-type": "application/json"}), 413)

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while reading
        for _ in range(4):
            yield b" " * (MAX_BODY // 2)

    response = await http.post("/essential/sagas/start", content=chunks(), headers={"content-type": "application/json"})
    refused(response, 413, field="<body>")
    status, _, _ = await call(raw_request, api.port, b"POST /essential/sagas/start HTTP/1.1\r\nHost: x\r\n"
                              b"Content-Type: application/json\r\nContent-Length: -1\r\nConnection: close\r\n\r\n"
                              b'{"ttl": 5}')  # fmt: skip
    assert status == 400, "a lying Content-Length is refused by the HTTP server itself"
    deep = b"[" * 30_000 + b"]" * 30_000  # under the size limit, deeper than any parser's stack
    refused(await http.post("/essential/sagas/start", content=deep, headers={"content-type": "application/json"}), 400,
            field="<body>")  # fmt: skip
    saga = await start(http)
    for levels in (70, 900, 5_000):
        nested = '{"a": ' * levels + "1" + "}" * levels  # as text: json.dumps itself would overflow the stack
        text = f'{{"saga": "{saga["id"]}", "bucket": "{SHOP}.orders", "action": "FIND", "req": {nested}}}'
        response = await http.post("/essential/sagas/add", content=text, headers={"content-type": "application/json"})
        refused(response, 400, says="nested deeper than")
        assert response.json()["fields"][0]["field"].startswith(("req", "<body>")), response.text
    assert (await http.get(f"/essential/sagas/{saga['id']}/abort")).json()["data"]["state"] == "aborted"


# --------------------------------------------------------------------------- query strings
@pytest.mark.parametrize("path", ["/essential/sagas", "/essential/sagas/count"])
@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"query[state][$where]": "sleep(1000)"}, "state.$where"),
        ({"query[$where]": "sleep(1000)"}, "$where"),
        ({"query[job][$ne]": "x"}, "job"),
        ({"query[job][$regex]": ".*"}, "job"),
        ({"query[kind][$exists]": "true"}, "kind"),
        ({"query[_id]": "x"}, "_id"),
        ({"query[createdAt][$where]": "1"}, "createdAt.$where"),
        ({"query[createdAt][$gte][$gt]": "1"}, "createdAt.$gte"),
        ({"filter[$or][0][state]": "running"}, "$or"),
        ({"query": "state=running"}, "query"),
        ({"query[createdAt]": "2025-01-01", "query[createdAt][$gte]": "2025-01-01"}, "query[createdAt][$gte]"),
        ({"query[[x]]": "1"}, "query[[x]]"),
        ({"query[state]": "running\u0000"}, "state"),
        ({"query[job]": "x" * 300}, "job"),
    ],
)
async def test_operator_injection_in_filters_is_refused(
    http: httpx.AsyncClient, path: str, params: dict, field: str
) -> None:
    refused(await http.get(path, params=params), 400, field=field)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"query[saga][$ne]": "1"}, "saga"),
        ({"query[saga]": "not-an-id"}, "saga"),
        ({"query[bucket][$regex]": "."}, "bucket"),
        ({"query[$where]": "1"}, "$where"),
        ({"limit": "-1"}, "limit"),
    ],
)
async def test_stage_filters_are_refused_too(http: httpx.AsyncClient, params: dict, field: str) -> None:
    refused(await http.get("/essential/saga-stages", params=params), 400, field=field)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": "-1"}, "limit"),
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": str(10**30)}, "limit"),
        ({"limit": "9" * 5000}, "limit"),
        ({"limit": "abc"}, "limit"),
        ({"limit": "1.5"}, "limit"),
        ({"limit": "1e3"}, "limit"),
        ({"limit": ""}, "limit"),
        ({"limit": "\u0663"}, "limit"),  # ARABIC-INDIC DIGIT THREE: int() would read it as 3
        ({"limit": ["1", "2"]}, "limit"),
        ({"skip": "-1"}, "skip"),
        ({"skip": str(10**30)}, "skip"),
        ({"skip": "x"}, "skip"),
        ({"offset": "-5"}, "skip"),
    ],
)
async def test_paging_must_be_a_sane_whole_number(http: httpx.AsyncClient, params: dict, field: str) -> None:
    refused(await http.get("/essential/sagas", params=params), 400, field=field)


async def test_sane_paging_is_served(http: httpx.AsyncClient) -> None:
    for params in ({"limit": "1000"}, {"limit": "1", "skip": "0"}, {"skip": "1000000"}):
        response = await http.get("/essential/sagas", params=params)
        assert response.status_code == 200 and isinstance(response.json()["items"], list), response.text


@pytest.mark.parametrize("path", ["/essential/sagas", "/essential/sagas/count"])
@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"since": "99999999999999999"}, "since"),
        ({"since": "10000000000000000000"}, "since"),
        ({"since": "-99999999999999999"}, "since"),
        ({"until": "9" * 400}, "until"),
        ({"since": "1e400"}, "since"),
        ({"since": "nan"}, "since"),
        ({"query[createdAt][$gte]": "99999999999999999"}, "createdAt.$gte"),
        ({"query[createdAt][$gte]": "9999-12-31T23:59:59-14:00"}, "createdAt.$gte"),
        ({"query[updatedAt][$lt]": "0001-01-01T00:00:00+14:00"}, "updatedAt.$lt"),
        ({"query[createdAt][$gte]": "2025-13-01"}, "createdAt.$gte"),
        ({"since": ["2025-01-01", "2025-01-02"]}, "since"),
    ],
)
async def test_dates_out_of_range_are_a_400(http: httpx.AsyncClient, path: str, params: dict, field: str) -> None:
    refused(await http.get(path, params=params), 400, field=field)


async def test_dates_in_range_are_served(http: httpx.AsyncClient) -> None:
    for params in ({"since": "0"}, {"since": "1700000000000"}, {"query[createdAt][$gte]": "2025-01-01"},
                   {"query[createdAt][$lte]": "9999-12-31T23:59:59+00:00"}, {"until": "2025-01-01T00:00:00Z"}):  # fmt: skip
        response = await http.get("/essential/sagas/count", params=params)
        assert response.status_code == 200 and isinstance(response.json()["total"], int), (params, response.text)


# --------------------------------------------------------------------------- ids, routes, methods
async def test_bad_ids_are_a_400_and_unknown_ones_a_404(http: httpx.AsyncClient) -> None:
    for bad in ("not-a-saga-id", "a" * 23, "a" * 25, "g" * 24, "%00" * 8, "%FF" * 8, "%E2%80%AE" + "a" * 23):
        for method, path in (("GET", f"/essential/sagas/{bad}"), ("GET", f"/essential/sagas/{bad}/commit"),
                             ("GET", f"/essential/sagas/{bad}/abort"), ("POST", f"/essential/sagas/{bad}/signal")):  # fmt: skip
            response = await http.request(method, path, json={"name": "go"} if method == "POST" else None)
            refused(response, 400, field="id")
    refused(await http.post("/essential/sagas/add", json={"saga": "x" * 24, "bucket": f"{SHOP}.o", "action": "FIND"}),
            400, field="saga")  # fmt: skip
    unknown = str(ObjectId())
    for method, path in (("GET", f"/essential/sagas/{unknown}"), ("GET", f"/essential/sagas/{unknown}/commit"),
                         ("GET", f"/essential/sagas/{unknown}/abort"), ("POST", f"/essential/sagas/{unknown}/signal")):  # fmt: skip
        response = await http.request(method, path, json={"name": "go"} if method == "POST" else None)
        assert refused(response, 404)["type"] == "SagaNotFound"
    response = await http.post("/essential/sagas/add", json={"saga": unknown, "bucket": f"{SHOP}.o", "action": "FIND"})
    refused(response, 404)


async def test_unknown_routes_and_wrong_methods_answer_in_the_envelope(http: httpx.AsyncClient) -> None:
    for path in ("/nope", "/essential", "/essential/nope", "/essential/sagas/start/x"):
        refused(await http.get(path), 404)
    for method, path in (("DELETE", "/essential/sagas/start"), ("PUT", "/essential/sagas/add"),
                         ("GET", "/essential/sagas/start"), ("GET", "/essential/sagas/add"),
                         ("POST", f"/essential/sagas/{ObjectId()}/commit"), ("PATCH", "/essential/sagas")):  # fmt: skip
        body = refused(await http.request(method, path), 405)
        assert body["type"] == "MethodNotAllowed", body


async def test_raw_bytes_in_the_path(api: Api, http: httpx.AsyncClient) -> None:
    """Non-ASCII bytes are refused by the HTTP server itself; percent-encoded ones reach the API as a bad id."""
    status, _, _ = await call(raw_request, api.port, b"GET /essential/sagas/\xff\xfe HTTP/1.1\r\nHost: x\r\n"
                              b"Authorization: Bearer " + api.token.encode() + b"\r\nConnection: close\r\n\r\n")  # fmt: skip
    assert 400 <= status < 500, status
    status, headers, body = await call(raw_request, api.port, b"GET /essential/sagas/%FF%FE HTTP/1.1\r\nHost: x\r\n"
                                       b"Authorization: Bearer " + api.token.encode() + b"\r\nConnection: close\r\n\r\n")  # fmt: skip
    assert status == 400 and headers["content-type"].startswith("application/json"), (status, body)
    assert json.loads(body)["fields"][0]["field"] == "id"
    assert (await http.get("/essential/health")).json() == {"ok": True}


# --------------------------------------------------------------------------- recorded stages
async def test_unstorable_values_in_add_are_refused_naming_the_field(http: httpx.AsyncClient, api: Api) -> None:
    saga = await start(http, job="hostile:unstorable")

    def add(**fields: Any) -> Any:
        body = {"saga": saga["id"], "bucket": f"{SHOP}.orders", "action": "FIND", **fields}
        return http.post("/essential/sagas/add", content=json.dumps(body), headers={"content-type": "application/json"})

    for fields, field, says in (
        ({"req": {"n": 2**70}}, "req.n", "64 bits"),
        ({"res": {"items": [1, -(2**63) - 1]}}, "res.items.1", "64 bits"),
        ({"req": {"a\u0000b": 1}}, "req", "NUL"),
        ({"meta": {"$where": "1"}}, "meta", "'$where'"),
        ({"meta": {"idempotency_key": 5}}, "meta.idempotency_key", None),
        ({"meta": "x"}, "meta", None),
        ({"res": {"$oid": "zz"}}, "<body>", None),
        ({"key": ""}, "key", None),
        ({"key": 5}, "key", None),
        ({"action": "DROP_DATABASE"}, "action", None),
        ({"bucket": "hostile_shop"}, "bucket", None),
        ({"bucket": "hostile_shop.system.users"}, "bucket", None),
    ):
        refused(await add(**fields), 400, field=field, says=says)
    stages = await http.get("/essential/saga-stages", params={"query[saga]": saga["id"]})
    assert stages.status_code == 200 and stages.json()["items"] == [], "nothing refused was recorded"
    fine = await add(req={"filter": {"_id": {"$in": [1, 2]}}, "update": {"$set": {"n": 2**63 - 1}}})
    assert fine.status_code == 201, "operators in req are what a recorded MongoDB call looks like: " + fine.text
    assert (await http.get(f"/essential/sagas/{saga['id']}/commit")).status_code == 200


async def test_buckets_never_reach_essentials_own_or_forbidden_databases(
    http: httpx.AsyncClient, api: Api, mongo: Any
) -> None:
    victim = await start(http, job="hostile:victim")
    assert (await http.get(f"/essential/sagas/{victim['id']}/commit")).status_code == 200
    saga = await start(http, job="hostile:attacker")
    victim_id = {"$oid": victim["id"]}
    attacks = [
        (f"{NS}.sagas", "INSERT_MANY", {"res": {"insertedIds": [victim_id]}}),  # its undo would delete the victim
        (f"{NS}.sagas", "FIND_ONE_AND_UPDATE",
         {"res": {"_id": victim_id, "job": "hijacked", "state": "running", "ttl": 1}}),  # put back "as it was"
        (f"{NS}.sagas", "FIND_ONE_AND_DELETE", {"res": {"_id": {"$oid": str(ObjectId())}, "ttl": "not a number"}}),
        (f"{NS}.stages", "INSERT_ONE", {"res": {"insertedId": 1}}),
        (f"{NS}.outbox", "INSERT_ONE", {"res": {"insertedId": 1}}),
        ("admin.users", "INSERT_ONE", {"res": {"insertedId": 1}}),
        ("local.oplog", "INSERT_ONE", {"res": {"insertedId": 1}}),
        ("config.chunks", "INSERT_ONE", {"res": {"insertedId": 1}}),
        ("ADMIN.users", "INSERT_ONE", {"res": {"insertedId": 1}}),
        ("Hostile.sagas", "INSERT_ONE", {"res": {"insertedId": 1}}),
        ("essential_test.sagas", "INSERT_ONE", {"res": {"insertedId": 1}}),  # not in the allow-list
        ("someone_else.orders", "INSERT_ONE", {"res": {"insertedId": 1}}),
        (f"{TWIN}.sagas", "INSERT_ONE", {"res": {"insertedId": 1}}),  # allowed name, but Essential's collections
    ]
    for bucket, action, fields in attacks:
        response = await http.post("/essential/sagas/add", json={"saga": saga["id"], "bucket": bucket, "action": action,
                                                                 **fields})  # fmt: skip
        refused(response, 400, field="bucket")
    aborted = await http.get(f"/essential/sagas/{saga['id']}/abort")
    assert aborted.status_code == 200 and aborted.json()["data"]["state"] == "aborted", aborted.text
    after = await http.get(f"/essential/sagas/{victim['id']}")
    assert after.status_code == 200, after.text
    assert (after.json()["data"]["state"], after.json()["data"]["job"]) == ("completed", "hostile:victim")
    assert await api.store.stages_col.count_documents({"saga": ObjectId(saga["id"])}) == 0
    listed = await http.get("/essential/sagas", params={"limit": "1000"})
    assert listed.status_code == 200, listed.text


@pytest.mark.parametrize("state", ["completed", "running"])
async def test_a_malformed_saga_document_does_not_break_listings(
    http: httpx.AsyncClient, api: Api, mongo: Any, state: str
) -> None:
    """A stored document Essential cannot read is left out and reported; the listing still answers 200.

    ``running``: the kind the supervisor's sweep reads too (its own robustness is another module's test)."""
    job = f"hostile:listed-{state}"
    good = await start(http, job=job)
    broken = ObjectId()
    now = datetime.now(timezone.utc)
    await mongo[NS].sagas.insert_one({
        "_id": broken, "job": job, "state": state, "ttl": "not a number", "kind": "recorded",
        "createdAt": now, "updatedAt": now, "events": 0,
    })  # fmt: skip

    async def still_stored() -> bool:  # a quarantine may move it away meanwhile: then it is simply not listed
        return await mongo[NS].sagas.find_one({"_id": broken}, {"_id": 1}) is not None

    try:
        for params in ({}, {"query[job]": job}, {"limit": "1000"}):
            response = await http.get("/essential/sagas", params=params)
            assert response.status_code == 200, response.text
            ids = [s["id"] for s in response.json()["items"]]
            assert good["id"] in ids and str(broken) not in ids, ids
            if await still_stored():
                assert str(broken) in [u["id"] for u in response.json().get("unreadable", [])], response.text
        count = await http.get("/essential/sagas/count", params={"query[job]": job})
        assert count.status_code == 200 and count.json()["total"] in (1, 2), count.text
        one = await http.get(f"/essential/sagas/{broken}")
        if await still_stored():
            body = refused(one, 500)
            assert body["type"] == "CorruptDocument" and "ttl" in body["message"] and str(broken) in body["message"]
        else:
            refused(one, 404)
        assert (await http.get(f"/essential/sagas/{good['id']}")).status_code == 200
    finally:
        await mongo[NS].sagas.delete_one({"_id": broken})
    assert (await http.get(f"/essential/sagas/{good['id']}/commit")).status_code == 200


async def test_a_reused_key_or_id_with_other_parameters_is_a_422(http: httpx.AsyncClient) -> None:
    key = f"hostile-{secrets.token_hex(4)}"
    first = await http.post("/essential/sagas/start", json={"ttl": 60, "job": "hostile:key", "idempotency_key": key})
    assert first.status_code == 201, first.text
    again = await http.post("/essential/sagas/start", json={"ttl": 60, "job": "hostile:key", "idempotency_key": key})
    assert again.status_code == 200 and again.json()["data"]["id"] == first.json()["data"]["id"], again.text
    saga_id = first.json()["data"]["id"]
    for other in ({"ttl": 61, "job": "hostile:key"}, {"ttl": 60, "job": "hostile:other"},
                  {"ttl": 60, "job": "hostile:key", "correlation_id": "c-2"},
                  {"ttl": 60, "job": "hostile:key", "id": str(ObjectId())}):  # fmt: skip
        body = refused(await http.post("/essential/sagas/start", json={**other, "idempotency_key": key}), 422)
        assert body["type"] == "IdempotencyKeyReused" and saga_id in body["message"] and key in body["message"], body
        assert body["fields"][0]["field"] == "idempotency_key", body
    chosen = str(ObjectId())
    assert (await http.post("/essential/sagas/start", json={"ttl": 60, "id": chosen})).status_code == 201
    assert (await http.post("/essential/sagas/start", json={"ttl": 60, "id": chosen})).status_code == 200
    body = refused(await http.post("/essential/sagas/start", json={"ttl": 30, "id": chosen}), 422, field="id")
    assert body["type"] == "SagaIdReused" and chosen in body["message"], body
    for sid in (saga_id, chosen):
        assert (await http.get(f"/essential/sagas/{sid}/commit")).status_code == 200


async def test_a_signal_body_is_checked_field_by_field(http: httpx.AsyncClient) -> None:
    saga = await start(http, job="hostile:signal")
    for body, field in (({"payload": 1}, "name"), ({"name": ""}, "name"), ({"name": 5}, "name"),
                        ({"name": "go", "colour": "red"}, "colour"), ({"name": "go", "payload": {"$where": 1}}, "payload"),
                        ({"name": "go", "payload": {"n": 2**70}}, "payload"), ({"name": "go", "key": ""}, "key")):  # fmt: skip
        refused(await http.post(f"/essential/sagas/{saga['id']}/signal", json=body), 400, field=field)
    assert (await http.get(f"/essential/sagas/{saga['id']}/commit")).status_code == 200


# --------------------------------------------------------------------------- all at once
async def test_concurrent_mixed_good_and_bad_requests(http: httpx.AsyncClient, api: Api, mongo: Any) -> None:
    tag = secrets.token_hex(4)
    keys = [f"mix-{tag}-{i}" for i in range(6)]
    requests: list[tuple[str, str, dict]] = []
    for key in keys:
        requests += [("start", key, {"ttl": 120, "job": "hostile:mix", "idempotency_key": key})] * 3
    contested = f"mix-{tag}-contested"
    requests += [("contested", contested, {"ttl": ttl, "job": "hostile:mix", "idempotency_key": contested})
                 for ttl in (100, 100, 200, 200)]  # fmt: skip
    requests += [("bad", "", {"ttl": True}), ("bad", "", {"ttl": "x"}), ("bad", "", {"job": "no ttl"})] * 3

    async def send(kind: str, key: str, body: dict) -> tuple[str, str, dict, httpx.Response]:
        return kind, key, body, await http.post("/essential/sagas/start", json=body)

    async def injected(i: int) -> httpx.Response:
        params = ({"query[$where]": "1"}, {"limit": "-1"}, {"since": "99999999999999999"})[i % 3]
        return await http.get("/essential/sagas", params=params)

    answers = await asyncio.gather(*(send(*r) for r in requests), *(injected(i) for i in range(9)))
    starts, reads = answers[: len(requests)], answers[len(requests):]
    assert all(400 <= r.status_code < 500 for r in reads), [r.text for r in reads]
    by_key: dict[str, list[httpx.Response]] = {}
    for kind, key, body, response in starts:
        assert response.status_code < 500, response.text
        if kind == "bad":
            refused(response, 400, field="ttl")
        else:
            by_key.setdefault(key, []).append(response)
    for key in keys:
        answered = by_key[key]
        assert sorted(r.status_code for r in answered) == [200, 200, 201], [r.text for r in answered]
        assert len({r.json()["data"]["id"] for r in answered}) == 1, "one saga per key"
    won = [r for r in by_key[contested] if r.status_code in (200, 201)]
    lost = [r for r in by_key[contested] if r.status_code not in (200, 201)]
    assert len(won) == 2 and len(lost) == 2 and {r.json()["data"]["ttl"] for r in won} in ({100}, {200}), won
    assert all(r.status_code == 422 for r in lost), [r.text for r in lost]
    assert await api.store.sagas.count_documents({"idempotency_key": {"$in": [*keys, contested]}}) == len(keys) + 1

    # the same add, repeated concurrently with one key, is recorded once; bad adds beside it change nothing
    saga_id = by_key[keys[0]][0].json()["data"]["id"]
    order = {"_id": ObjectId(), "tag": tag}
    await mongo[SHOP].orders.insert_one(order)
    add = {"saga": saga_id, "bucket": f"{SHOP}.orders", "action": "INSERT_ONE", "key": "once",
           "res": {"insertedId": {"$oid": str(order["_id"])}}}  # fmt: skip
    bad_adds = [{**add, "key": None, "bucket": f"{NS}.sagas"}, {**add, "key": None, "req": {"n": 2**70}}]
    answers = await asyncio.gather(*(http.post("/essential/sagas/add", json=add) for _ in range(4)),
                                   *(http.post("/essential/sagas/add", json=b) for b in bad_adds))  # fmt: skip
    assert [r.status_code for r in answers[:4]] == [201] * 4, [r.text for r in answers]
    assert len({r.json()["data"]["seq"] for r in answers[:4]}) == 1
    assert all(r.status_code == 400 for r in answers[4:]), [r.text for r in answers[4:]]
    assert await api.store.stages_col.count_documents({"saga": ObjectId(saga_id)}) == 1
    aborted = await http.get(f"/essential/sagas/{saga_id}/abort")
    assert aborted.json()["data"]["state"] == "aborted" and await mongo[SHOP].orders.find_one(order) is None
    for key in keys[1:]:
        assert (await http.get(f"/essential/sagas/{by_key[key][0].json()['data']['id']}/commit")).status_code == 200
    assert (await http.get(f"/essential/sagas/{won[0].json()['data']['id']}/commit")).status_code == 200

    await good_round(http, mongo)  # and the API still serves good requests


# --------------------------------------------------------------------------- Python client and CLI
async def test_the_python_client_refuses_hostile_input_typed(hostile: tuple[Any, Any], mongo: Any) -> None:
    from essential.orchestration.errors import InvalidField

    client, _ = hostile
    for payload, kwargs in (({"a\x00b": 1}, {}), ({"$where": "1"}, {}), ({"n": 2**70}, {}), ({}, {"ttl": True}),
                            ({}, {"ttl": float("nan")}), ({}, {"idempotency_key": ""})):  # fmt: skip
        with pytest.raises(InvalidRequest):
            await call(client.start, "test:chain", payload, **kwargs)
    for ttl in (True, "60", float("inf"), -1):
        with pytest.raises(InvalidRequest) as info:
            await call(client.recorded.start, ttl)
        assert "ttl" in str(info.value)
    key = f"client-{secrets.token_hex(4)}"
    saga = await call(client.recorded.start, 60, idempotency_key=key)
    assert (await call(client.recorded.start, 60, idempotency_key=key)).id == saga.id
    with pytest.raises(IdempotencyKeyReused):
        await call(client.recorded.start, 61, idempotency_key=key)
    for bucket in (f"{NS}.sagas", "admin.system", f"{TWIN}.stages", "elsewhere.orders"):
        with pytest.raises(InvalidField) as info:
            await call(client.recorded.add, saga.id, bucket=bucket, action="INSERT_ONE", res={"insertedId": 1})
        assert info.value.fields[0][0] == "bucket", info.value
    with pytest.raises(InvalidField) as info:
        await call(client.recorded.add, saga.id, bucket=f"{SHOP}.orders", action="FIND", req={"n": 2**70})
    assert info.value.fields[0][0] == "req.n"
    nested: Any = 1
    for _ in range(80):
        nested = [nested]
    with pytest.raises(InvalidField, match="nested deeper"):
        await call(client.recorded.add, saga.id, bucket=f"{SHOP}.orders", action="FIND", res=nested)
    assert (await call(client.recorded.commit, saga.id)).state.value == "completed"


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("ESSENTIAL_")}
    env.update({
        "ESSENTIAL_RAY_ADDRESS": ray.get_runtime_context().gcs_address, "ESSENTIAL_NAMESPACE": NS,
        "ESSENTIAL_DATABASE": NS, "ESSENTIAL_MONGODB_URI": __import__("os").environ["ESSENTIAL_MONGODB_URI"],
        "PYTHONPATH": str(REPO), "COLUMNS": "200",
    })  # fmt: skip
    return subprocess.run([ESSENTIAL, *args], env=env, capture_output=True, text=True, timeout=180, cwd=str(REPO))


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["start", "test:chain", "--payload", '{"$where": 1}'], "$where"),
        (["start", "test:chain", "--payload", '{"a": 1'], "--payload"),
        (["start", "test:chain", "--payload", "[1]"], "payload"),
        (["start", "test:chain", "--payload", '{"n": 1180591620717411303424}'], "64 bits"),
        (["start", "test:chain", "--ttl", "nan"], "ttl"),
        (["start", "no:such-job"], "unknown job"),
        (["list", "--state", "sleeping"], "sleeping"),
    ],
)
async def test_the_cli_refuses_hostile_input_with_one_line(hostile: tuple[Any, Any], argv: list[str], says: str) -> None:
    done = await call(cli, *argv)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], done.stderr
    assert "Traceback" not in done.stderr + done.stdout


async def test_still_serving_after_everything(http: httpx.AsyncClient, api: Api, mongo: Any) -> None:
    await good_round(http, mongo)
    health = await api.client.supervisor.health.remote()
    assert health["sweeps"] > 0, health
