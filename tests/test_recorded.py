"""Recorded sagas (start / add / commit / abort) with automatic inverse compensation.

A simulated service does real writes across two databases and reports each one
as a stage, the way the platform's services do; Essential undoes them on abort,
TTL expiry and after its actor is killed mid-compensation, and leaves them on
commit.  Data is compared field by field (types and field order included) with
a snapshot taken before the saga.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from datetime import datetime, timezone
from typing import Any, AsyncIterator

import pytest
import ray
from bson import Decimal128, ObjectId, json_util
from pymongo import ReturnDocument

from essential.actors.client.recorded import RecordedClient
from essential.orchestration import IllegalTransition, SagaNotFound, SagaState
from essential.orchestration.errors import InvalidField
from essential.orchestration.models import Saga, new_id
from essential.orchestration.recorded import (
    AddStage,
    Inverse,
    StartRecorded,
    action_of,
    check,
    inverse_of,
    route_bucket,
    undo_plan,
)
from essential.orchestration.states import Action

from .conftest import poll
from .kafka_tools import stop_gateway

SHOP, BANK = "rtshop", "rtbank"  # the service's two databases: buckets rtshop.* and rtbank.*


async def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Blocking Ray calls run off the event loop that the MongoDB client uses."""
    return await asyncio.to_thread(fn, *args, **kwargs)


# =========================================================================== the pure part
def test_platform_action_names_are_aliases() -> None:
    assert action_of("INSERT_MANY") == (Action.CREATE, "insert_many")
    assert action_of("FIND_ONE_AND_UPDATE")[0] == Action.UPDATE
    assert action_of("UPDATE_MANY")[0] == Action.UPDATE
    assert action_of("FIND_ONE_AND_DELETE")[0] == Action.DELETE
    assert {action_of(a)[0] for a in ("FIND", "FIND_ONE", "COUNT_DOCUMENTS", "read")} == {Action.READ}
    assert action_of("create")[0] == Action.CREATE and action_of("delete")[0] == Action.DELETE
    with pytest.raises(InvalidField) as info:
        action_of("UPSERT_EVERYTHING")
    assert info.value.fields[0][0] == "action" and "INSERT_MANY" in str(info.value)


def test_inverse_of_each_action() -> None:
    a, b = ObjectId(), ObjectId()
    assert inverse_of(Action.CREATE, "insert_many", None, {"insertedIds": {"0": a, "1": b}}).delete == [a, b]
    assert inverse_of(Action.CREATE, "insert_many", {"documents": [{"_id": a}, {"_id": b}]}, {"acknowledged": True}).delete == [a, b]
    before = {"_id": a, "balance": 10}
    assert inverse_of(Action.UPDATE, "find_one_and_update", {}, before).put == [before]
    assert inverse_of(Action.UPDATE, "find_one_and_update", {}, None).empty  # nothing matched
    upd = inverse_of(Action.UPDATE, "update_many", {}, {"matchedCount": 1, "before": [before], "upsertedId": b})
    assert upd.put == [before] and upd.delete == [b]
    assert inverse_of(Action.UPDATE, "update_many", {}, {"matchedCount": 0}).empty
    assert inverse_of(Action.UPDATE, "find_one_and_update", {}, {"upsertedId": b}).delete == [b]
    assert inverse_of(Action.DELETE, "find_one_and_delete", {}, before).put == [before]
    assert inverse_of(Action.DELETE, "delete_many", {}, {"deletedCount": 1, "deleted": [before]}).put == [before]
    assert inverse_of(Action.READ, "find", {}, {"anything": 1}).empty
    for action, op, res, field in [
        (Action.CREATE, "insert_many", {"acknowledged": True}, "res.insertedIds"),
        (Action.UPDATE, "update_many", {"matchedCount": 2}, "res.before"),
        (Action.UPDATE, "update_many", {"before": [{"balance": 1}]}, "res.before"),
        (Action.DELETE, "delete_many", {"deletedCount": 2}, "res.deleted"),
    ]:
        with pytest.raises(InvalidField) as info:
            inverse_of(action, op, {}, res)
        assert info.value.fields[0][0] == field, info.value


def test_requests_name_the_bad_field() -> None:
    with pytest.raises(InvalidField) as info:
        StartRecorded.parse({"ttl": -1})
    assert info.value.fields[0][0] == "ttl"
    assert StartRecorded.parse({"ttl": 5, "correlation": "c-1"}).correlation_id == "c-1"
    with pytest.raises(InvalidField) as info:
        AddStage.parse({"bucket": "no-dot", "action": "create"})
    assert info.value.fields[0][0] == "bucket"
    with pytest.raises(InvalidField) as info:
        AddStage.parse({"bucket": "shop.system.users", "action": "create"})
    assert info.value.fields[0][0] == "bucket"
    with pytest.raises(InvalidField) as info:
        AddStage.parse({"bucket": "shop.orders", "action": "create", "surprise": 1})
    assert info.value.fields[0][0] == "surprise"


def test_state_machine_refusals() -> None:
    now = datetime.now(timezone.utc)

    def saga(state: SagaState, **kw: Any) -> Saga:
        return Saga(**{"ttl": 60, **kw}, job="recorded", state=state, createdAt=now, updatedAt=now)

    assert check("add", saga(SagaState.RUNNING), now) == "go"
    assert check("abort", saga(SagaState.ABORTED), now) == "already"
    for op, state, says in [
        ("add", SagaState.ABORTED, "was aborted"),
        ("commit", SagaState.ABORTED, "was aborted"),
        ("commit", SagaState.COMPLETED, "committed already"),
        ("abort", SagaState.COMPLETED, "can no longer be aborted"),
        ("add", SagaState.COMPENSATING, "was aborted"),
    ]:
        with pytest.raises(IllegalTransition, match=says):
            check(op, saga(state), now)  # type: ignore[arg-type]
    with pytest.raises(IllegalTransition, match="ttl"):
        check("commit", saga(SagaState.RUNNING, ttl=1), now.replace(year=now.year + 1))
    with pytest.raises(IllegalTransition, match="being aborted"):
        check("add", saga(SagaState.RUNNING, abort_requested="ttl"), now)


def test_undo_plan_is_latest_first_and_skips_what_was_undone() -> None:
    undo = Inverse(delete=[1]).to_doc()
    stages = [
        {"seq": 1, "action": "create", "undo": undo},
        {"seq": 2, "action": "read", "undo": Inverse().to_doc()},
        {"seq": 3, "action": "update", "undo": Inverse(put=[{"_id": 1}]).to_doc()},
        {"seq": 4, "action": "delete", "undo": Inverse(put=[{"_id": 2}]).to_doc()},
        {"seq": 5, "action": "compensate", "compensates": 4, "status": "succeeded"},
    ]
    assert [s["seq"] for s in undo_plan(stages)] == [3, 1]


def test_bucket_routes() -> None:
    assert route_bucket("shop.orders") == route_bucket("shop.orders", {}, "")
    plain = route_bucket("shop.orders", prefix="t_")
    assert (plain.database, plain.collection, plain.remote) == ("t_shop", "orders", None)
    mapped = route_bucket("shop.orders", {"shop.orders": {"database": "eu", "collection": "o"}})
    assert (mapped.database, mapped.collection) == ("eu", "o")
    assert route_bucket("pay.ledger", {"pay.*": {"remote": "pay.commands"}}).remote == "pay.commands"
    assert route_bucket("pay.ledger", {"pay.ledger": "remote:pay.cmd"}).remote == "pay.cmd"


# ======================================================================= a simulated service
class ShopService:
    """A service that does its own writes in two databases and reports each one as a stage."""

    def __init__(self, mongo: Any, recorded: RecordedClient, tag: str, shop: str = SHOP, bank: str = BANK) -> None:
        self.mongo, self.recorded, self.tag = mongo, recorded, tag
        self.shop, self.bank = mongo[shop], mongo[bank]
        self.collections = [self.shop.orders, self.shop.items, self.shop.carts, self.bank.accounts, self.bank.holds]
        self.prefix = {id(self.shop): shop, id(self.bank): bank}

    def bucket(self, collection: Any) -> str:
        return f"{collection.database.name}.{collection.name}"

    async def seed(self) -> None:
        t, at = self.tag, datetime(2024, 5, 1, 12, 30, tzinfo=timezone.utc)
        await self.bank.accounts.insert_one(
            {"_id": f"{t}-alice", "t": t, "balance": Decimal128("100.50"), "owner": {"name": "Alice", "tier": 2},
             "opened": at, "tags": ["vip", "eu"]}  # fmt: skip
        )
        await self.bank.holds.insert_one({"_id": ObjectId(), "t": t, "account": f"{t}-alice", "amount": 12})
        await self.shop.items.insert_many(
            [{"_id": f"{t}-sku{i}", "t": t, "stock": 10 + i, "reserved": False, "dims": {"w": i, "h": 2 * i}} for i in range(3)]
        )
        await self.shop.carts.insert_many([{"_id": ObjectId(), "t": t, "customer": "alice", "n": i} for i in range(2)])

    async def snapshot(self) -> dict[str, list[list[tuple[str, Any]]]]:
        """Every document of the test, by collection, as ordered (field, value) lists."""
        out = {}
        for coll in self.collections:
            docs = await coll.find({"t": self.tag}).to_list()
            out[self.bucket(coll)] = sorted((list(d.items()) for d in docs), key=lambda items: str(items[0][1]))
        return out

    async def add(self, saga_id: str, collection: Any, action: str, req: Any, res: Any, **kw: Any) -> dict:
        return await call(self.recorded.add, saga_id, bucket=self.bucket(collection), action=action, req=req, res=res, **kw)

    async def workload(self, saga_id: str) -> list[dict]:
        """Inserts, updates with before-images, deletes and a read, across both databases."""
        t, stages = self.tag, []
        orders = [{"_id": ObjectId(), "t": t, "customer": "alice", "total": Decimal128("30.00"),
                   "at": datetime.now(timezone.utc).replace(microsecond=0)} for _ in range(2)]  # fmt: skip
        result = await self.shop.orders.insert_many(orders)
        stages.append(await self.add(saga_id, self.shop.orders, "INSERT_MANY", {"documents": orders},
                                     {"insertedIds": {str(i): v for i, v in enumerate(result.inserted_ids)}}))  # fmt: skip
        query = {"_id": f"{t}-alice"}
        update = {"$set": {"balance": Decimal128("70.50"), "owner.tier": 1}, "$push": {"tags": "debited"}}
        before = await self.bank.accounts.find_one_and_update(query, update)  # MongoDB returns the document before
        stages.append(await self.add(saga_id, self.bank.accounts, "FIND_ONE_AND_UPDATE", {"filter": query, "update": update}, before))
        skus = {"t": t, "_id": {"$in": [f"{t}-sku0", f"{t}-sku1"]}}
        items_before = await self.shop.items.find(skus).to_list()
        changed = await self.shop.items.update_many(skus, {"$set": {"reserved": True}, "$inc": {"stock": -1}, "$unset": {"dims": ""}})
        stages.append(await self.add(saga_id, self.shop.items, "UPDATE_MANY", {"filter": skus},
                                     {"matchedCount": changed.matched_count, "before": items_before}))  # fmt: skip
        hold = await self.bank.holds.find_one_and_delete({"t": t})
        stages.append(await self.add(saga_id, self.bank.holds, "FIND_ONE_AND_DELETE", {"filter": {"t": t}}, hold))
        carts = await self.shop.carts.find({"t": t}).to_list()
        gone = await self.shop.carts.delete_many({"t": t})
        stages.append(await self.add(saga_id, self.shop.carts, "DELETE_MANY", {"filter": {"t": t}},
                                     {"deletedCount": gone.deleted_count, "deleted": carts}))  # fmt: skip
        count = await self.shop.items.count_documents({"t": t})
        stages.append(await self.add(saga_id, self.shop.items, "COUNT_DOCUMENTS", {"filter": {"t": t}}, {"count": count}))
        again = await self.bank.accounts.find_one_and_update(query, {"$set": {"balance": Decimal128("65.50")}},
                                                              return_document=ReturnDocument.BEFORE)  # fmt: skip
        stages.append(await self.add(saga_id, self.bank.accounts, "update", {"filter": query}, {"before": again}))
        return stages


def forward_and_undo(stages: list[dict]) -> tuple[list[dict], list[dict]]:
    return [s for s in stages if s["action"] != "compensate"], [s for s in stages if s["action"] == "compensate"]


def assert_undone_once_in_reverse(stages: list[dict]) -> None:
    forward, undo = forward_and_undo(stages)
    undoable = [s["seq"] for s in forward if s["action"] in ("create", "update", "delete")]
    assert [s["compensates"] for s in undo] == sorted(undoable, reverse=True), "each stage undone once, latest first"
    assert all(s["status"] == "succeeded" for s in undo)


@pytest.fixture
async def service(client: Any, mongo: Any) -> AsyncIterator[ShopService]:
    svc = ShopService(mongo, client.recorded, f"t{uuid.uuid4().hex[:10]}")
    await svc.seed()
    yield svc


# ===================================================================== through the client
async def test_abort_restores_every_document_exactly(client: Any, service: ShopService, store: Any) -> None:
    before = await service.snapshot()
    saga = await call(client.recorded.start, 120, job="shop:checkout", correlation_id=service.tag)
    assert saga.state == SagaState.RUNNING and saga.job == "shop:checkout"
    stages = await service.workload(saga.id)
    assert [s["seq"] for s in stages] == list(range(1, 8))
    assert [s["action"] for s in stages] == ["create", "update", "update", "delete", "delete", "read", "update"]
    assert await service.snapshot() != before
    aborted = await call(client.recorded.abort, saga.id, "customer cancelled")
    assert aborted.state == SagaState.ABORTED and aborted.aborted_at is not None
    assert await service.snapshot() == before, "every document is back exactly as it was"
    all_stages = await call(client.recorded.stages, saga.id)
    assert_undone_once_in_reverse(all_stages)
    topics = [e["topic"] for e in await store.outbox_for(saga.id)]
    assert topics[0] == "saga.started" and topics[-1] == "saga.aborted"
    assert topics.count("saga.stage.completed") == 7 + 6
    # the state machine refuses what an aborted saga can no longer do
    with pytest.raises(IllegalTransition, match="aborted"):
        await service.add(saga.id, service.shop.items, "FIND", {}, {})
    with pytest.raises(IllegalTransition, match="aborted"):
        await call(client.recorded.commit, saga.id)
    assert (await call(client.recorded.abort, saga.id)).state == SagaState.ABORTED  # aborting again: the same saga


async def test_commit_leaves_everything_in_place(client: Any, service: ShopService, store: Any) -> None:
    saga = await call(client.recorded.start, 120)
    assert saga.job == "recorded"
    await service.workload(saga.id)
    after = await service.snapshot()
    committed = await call(client.recorded.commit, saga.id)
    assert committed.state == SagaState.COMPLETED and committed.committed_at is not None
    assert await service.snapshot() == after
    assert not any(s["action"] == "compensate" for s in await call(client.recorded.stages, saga.id))
    topics = [e["topic"] for e in await store.outbox_for(saga.id)]
    assert topics[-1] == "saga.completed" and "saga.aborted" not in topics
    with pytest.raises(IllegalTransition, match="committed already"):
        await call(client.recorded.commit, saga.id)
    with pytest.raises(IllegalTransition, match="can no longer be aborted"):
        await call(client.recorded.abort, saga.id)
    with pytest.raises(IllegalTransition, match="committed"):
        await service.add(saga.id, service.shop.items, "FIND", {}, {})
    await poll(lambda: _actor(saga.id) is None, timeout=30, what="the saga's actor to leave")


async def test_ttl_expiry_aborts_and_restores(client: Any, service: ShopService) -> None:
    before = await service.snapshot()
    saga = await call(client.recorded.start, 15)
    await service.workload(saga.id)
    assert _actor(saga.id) is not None, "an open recorded saga lives in its actor"

    async def ended() -> Any:
        current = await call(client.recorded.get, saga.id)
        return current if current.state.terminal else None

    expired = await poll(ended, timeout=60, what="the TTL to abort the saga")
    assert expired.state == SagaState.ABORTED and "ttl" in (expired.error or "")
    assert await service.snapshot() == before
    assert_undone_once_in_reverse(await call(client.recorded.stages, saga.id))


async def test_refusals_and_repeated_adds(client: Any, service: ShopService) -> None:
    with pytest.raises(SagaNotFound):
        await call(client.recorded.commit, new_id())
    with pytest.raises(SagaNotFound):
        await call(client.recorded.get, "not-an-id")
    orchestrated = await call(client.start, "test:chain", {})
    with pytest.raises(IllegalTransition, match="orchestrated"):
        await call(client.recorded.commit, orchestrated)
    saga = await call(client.recorded.start, 120, idempotency_key=f"open-{service.tag}")
    assert (await call(client.recorded.start, 120, idempotency_key=f"open-{service.tag}")).id == saga.id
    with pytest.raises(InvalidField) as info:
        await call(client.recorded.add, saga.id, bucket="rtshop.orders", action="INSERT_MANY", res={"acknowledged": True})
    assert info.value.fields[0][0] == "res.insertedIds"
    oid = ObjectId()
    first = await call(client.recorded.add, saga.id, bucket="rtshop.orders", action="create",
                       req={"documents": [{"_id": oid}]}, res={"insertedId": oid}, key="k-1")  # fmt: skip
    again = await call(client.recorded.add, saga.id, bucket="rtshop.orders", action="create",
                       req={"documents": [{"_id": oid}]}, res={"insertedId": oid}, key="k-1")  # fmt: skip
    assert first["seq"] == again["seq"] == 1
    assert len(await call(client.recorded.stages, saga.id)) == 1
    assert (await call(client.recorded.commit, saga.id)).state == SagaState.COMPLETED
    assert saga.id in [s.id for s in await call(client.recorded.list, state="completed", limit=200)]
    await call(client.wait, orchestrated, 60)


def _actor(saga_id: str, namespace: str = "essential") -> Any:
    try:
        return ray.get_actor(f"saga:{saga_id}", namespace=namespace)
    except ValueError:
        return None


# ============================================================ faults: the actor killed while undoing
async def test_actor_killed_mid_compensation_resumes_and_undoes_each_stage_once(
    deployment: Any, mongo: Any
) -> None:
    client, store = await deployment("rec_crash", recorded_undo_pause=1.0)
    svc = ShopService(mongo, client.recorded, f"k{uuid.uuid4().hex[:10]}", shop="rcshop", bank="rcbank")
    await svc.seed()
    before = await svc.snapshot()
    saga = await call(client.recorded.start, 300)
    await svc.workload(saga.id)
    handle = _actor(saga.id, "rec_crash")
    pid = await handle.pid.remote()
    await call(client.recorded.abort, saga.id, "cancelled", wait=0)

    async def some_undone() -> bool:
        return any(s.action == Action.COMPENSATE for s in await store.stages(saga.id))

    await poll(some_undone, timeout=60, what="the first undo")
    os.kill(pid, signal.SIGKILL)
    undone_at_kill = [s.compensates for s in await store.stages(saga.id) if s.action == Action.COMPENSATE]
    assert 0 < len(undone_at_kill) < 5, "killed in the middle of compensating"

    async def aborted() -> bool:
        return (await store.get(saga.id)).state == SagaState.ABORTED

    await poll(aborted, timeout=120, what="the restored actor to finish compensating")
    final = await store.get(saga.id)
    assert str(pid) not in (final.lease.owner or ""), "another process finished it"
    assert await svc.snapshot() == before
    stages = [s.model_dump(mode="json") for s in await store.stages(saga.id)]
    assert_undone_once_in_reverse(stages)


# ========================================================== Kafka: remote buckets and commands
REMOTE_TOPIC = "rec_kafka.payments"


@pytest.fixture(scope="module")
async def kafka_deployment(deployment: Any, settings: Any, kafka: Any) -> AsyncIterator[tuple[Any, Any, Any]]:
    """A deployment whose bucket ``rtpay.ledger`` belongs to a remote service, with its own gateway and topics."""
    from essential.actors.kafka.gateway import ensure_gateway

    name = "rec_kafka"
    overrides = {
        "kafka_command_topic": f"{name}.commands", "kafka_dlq_topic": f"{name}.commands.dlq",
        "kafka_reply_topic": f"{name}.replies", "kafka_reply_dlq_topic": f"{name}.replies.dlq",
        "kafka_consumer_group": f"{name}-gateway", "recorded_buckets": {"rtpay.*": {"remote": REMOTE_TOPIC}},
    }  # fmt: skip
    client, store = await deployment(name, **overrides)
    conf = settings.model_copy(update={"namespace": name, "database": name, **overrides})
    gateway = await call(ensure_gateway, conf)
    assert await gateway.ready.remote(120), "the gateway did not become ready"
    yield client, store, conf
    await call(stop_gateway, name)


class PaymentsService:
    """The remote service that owns ``rtpay.*``: receives compensation commands, answers when told to."""

    def __init__(self, bootstrap: str) -> None:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

        self.consumer = AIOKafkaConsumer(
            REMOTE_TOPIC, bootstrap_servers=bootstrap, group_id=f"payments-{uuid.uuid4().hex[:6]}",
            auto_offset_reset="earliest", metadata_max_age_ms=1000,
        )  # fmt: skip
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        self.commands: asyncio.Queue[Any] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> "PaymentsService":
        from essential.actors.kafka.topics import ensure_topics

        await ensure_topics(self.consumer._client._bootstrap_servers, [REMOTE_TOPIC], partitions=1)
        await self.consumer.start()
        await self.producer.start()
        self._task = asyncio.create_task(self._consume())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self.consumer.stop()
        await self.producer.stop()

    async def _consume(self) -> None:
        from essential.actors.kafka.participant_protocol import ParticipantCommand

        while True:
            for msgs in (await self.consumer.getmany(timeout_ms=200)).values():
                for msg in msgs:
                    await self.commands.put(ParticipantCommand.model_validate_json(msg.value))

    async def next_command(self, timeout: float = 60.0) -> Any:
        return await asyncio.wait_for(self.commands.get(), timeout)

    async def reply(self, command: Any, *, ok: bool, result: dict | None = None) -> None:
        from essential.actors.kafka.participant_protocol import ParticipantReply

        reply = ParticipantReply.answering(command, ok=ok, result=result)
        await self.producer.send_and_wait(command.reply_topic, reply.to_bytes(), key=command.saga.encode())


async def test_remote_bucket_is_compensated_by_its_service_over_kafka(
    kafka_deployment: tuple[Any, Any, Any], kafka: Any, mongo: Any
) -> None:
    from essential.persistence.inverse import apply_inverse

    client, store, conf = kafka_deployment
    tag = f"r{uuid.uuid4().hex[:8]}"
    orders, ledger = mongo["rtkshop"].orders, mongo["rtpay"].ledger
    async with PaymentsService(kafka.bootstrap) as payments:
        saga = await call(client.recorded.start, 300, job="shop:checkout")
        order = {"_id": ObjectId(), "t": tag, "total": 12}
        await orders.insert_one(order)
        await call(client.recorded.add, saga.id, bucket="rtkshop.orders", action="INSERT_MANY",
                   req={"documents": [order]}, res={"insertedIds": [order["_id"]]})  # fmt: skip
        entry = {"_id": ObjectId(), "t": tag, "amount": -12}  # written by the payments service itself
        await ledger.insert_one(entry)
        remote = await call(client.recorded.add, saga.id, bucket="rtpay.ledger", action="create",
                            req={"document": entry}, res={"insertedId": entry["_id"]})  # fmt: skip
        await call(client.recorded.abort, saga.id, "payment declined", wait=0)

        command = await payments.next_command()
        assert command.kind == "compensate" and command.saga == saga.id and command.seq == remote["seq"]
        assert command.idempotency_key == f"{saga.id}:{remote['seq']}"
        assert command.data["bucket"] == "rtpay.ledger" and command.data["inverse"]["delete"] == [str(entry["_id"])]
        inverse = Inverse.from_doc(json_util.loads(command.data["inverse_ejson"]))
        assert inverse.delete == [entry["_id"]], "the exact BSON ids travel in inverse_ejson"
        # not confirmed yet: the saga waits, and has not moved on to the local stage
        current = await store.get(saga.id)
        assert current.state == SagaState.COMPENSATING
        assert await orders.find_one({"_id": order["_id"]}) is not None

        await apply_inverse(ledger, inverse)
        await payments.reply(command, ok=True, result={"deleted": 1})

        async def aborted() -> bool:
            return (await store.get(saga.id)).state == SagaState.ABORTED

        await poll(aborted, timeout=60, what="the saga to end aborted after the confirmation")
    assert await ledger.find_one({"_id": entry["_id"]}) is None
    assert await orders.find_one({"_id": order["_id"]}) is None
    stages = await call(client.recorded.stages, saga.id)
    undo_remote = next(s for s in stages if s["action"] == "compensate" and s["compensates"] == remote["seq"])
    assert undo_remote["res"] == {"deleted": 1} and undo_remote["meta"]["remote"] == REMOTE_TOPIC
    assert_undone_once_in_reverse(stages)


async def test_recorded_saga_over_kafka_commands(kafka_deployment: tuple[Any, Any, Any], kafka: Any, mongo: Any) -> None:
    from aiokafka import AIOKafkaProducer

    client, store, conf = kafka_deployment
    orders = mongo["rtkshop"].orders
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
    await producer.start()
    try:

        async def send(command: dict) -> None:
            key = command.get("saga") or command.get("id")
            await producer.send_and_wait(conf.kafka_command_topic, json.dumps({"schema": 1, **command}).encode(),
                                         key=key.encode())  # fmt: skip

        async def state_of(saga_id: str, want: SagaState) -> bool:
            try:
                return (await store.get(saga_id)).state == want
            except SagaNotFound:
                return False

        committed, aborted = str(ObjectId()), str(ObjectId())
        docs = {sid: {"_id": ObjectId(), "t": "kafka", "at": datetime.now(timezone.utc).replace(microsecond=0)}
                for sid in (committed, aborted)}  # fmt: skip
        for sid in (committed, aborted):
            await send({"type": "recorded.start", "id": sid, "ttl": 300, "job": "kafka:checkout"})
            await orders.insert_one(docs[sid])
            add = {"type": "recorded.add", "saga": sid, "bucket": "rtkshop.orders", "action": "INSERT_MANY",
                   "req": {"documents": [json.loads(json_util.dumps(docs[sid]))]},
                   "res": {"insertedIds": [{"$oid": str(docs[sid]["_id"])}]}, "key": f"add-{sid}"}  # fmt: skip
            await send(add)
            await send(add)  # redelivered: recorded once
        await send({"type": "commit", "saga": committed})
        await send({"type": "abort", "saga": aborted, "reason": "cancelled over Kafka"})
        await poll(lambda: state_of(committed, SagaState.COMPLETED), timeout=90, what="the commit over Kafka")
        await poll(lambda: state_of(aborted, SagaState.ABORTED), timeout=90, what="the abort over Kafka")
    finally:
        await producer.stop()
    assert await orders.find_one({"_id": docs[committed]["_id"]}) is not None
    assert await orders.find_one({"_id": docs[aborted]["_id"]}) is None, "the abort undid the insert"
    for sid in (committed, aborted):
        forward = [s for s in await call(client.recorded.stages, sid) if s["action"] != "compensate"]
        assert len(forward) == 1 and forward[0]["op"] == "insert_many"
    stage_docs = await store.stages_col.find({"saga": ObjectId(committed)}).to_list()
    assert stage_docs[0]["undo"]["delete"] == [docs[committed]["_id"]], "Extended JSON arrived as an ObjectId"
    assert (await store.get(committed)).job == "kafka:checkout"


# ============================================================== shared placement: sagas as host tasks
async def test_recorded_sagas_in_shared_host_actors(deployment: Any, mongo: Any) -> None:
    client, store = await deployment("rec_shared", placement="shared", host_pool_size=1)
    svc = ShopService(mongo, client.recorded, f"s{uuid.uuid4().hex[:10]}", shop="rsshop", bank="rsbank")
    await svc.seed()
    before = await svc.snapshot()
    aborted = await call(client.recorded.start, 120)
    await svc.workload(aborted.id)
    assert _actor(aborted.id, "rec_shared") is None, "no actor of its own: a task in the host"
    assert (await call(client.recorded.abort, aborted.id)).state == SagaState.ABORTED
    assert await svc.snapshot() == before
    committed = await call(client.recorded.start, 120)
    await svc.add(committed.id, svc.shop.items, "FIND", {}, {"n": 0})
    assert (await call(client.recorded.commit, committed.id)).state == SagaState.COMPLETED
    with pytest.raises(IllegalTransition):
        await call(client.recorded.commit, committed.id)
    owners = {(await store.get(sid)).lease.owner.split("@")[0] for sid in (aborted.id, committed.id)}
    assert owners == {"essential:host:0"}


# ============================================================== the boundary: what must never be accepted
def test_buckets_never_resolve_to_protected_databases() -> None:
    from essential.orchestration.recorded import check_database

    route = lambda bucket, **kw: route_bucket(bucket, kw.get("mapping"), kw.get("prefix", ""))  # noqa: E731
    for bucket, kw in [
        ("essential.sagas", {}), ("Essential.stages", {}), ("admin.users", {}), ("local.oplog", {}),
        ("config.chunks", {}), ("ADMIN.x", {}), ("ential.sagas", {"prefix": "ess"}),
        ("shop.orders", {"mapping": {"shop.*": {"database": "essential"}}}),
        ("shop.orders", {"mapping": {"shop.orders": "admin.orders"}}),
    ]:
        with pytest.raises(InvalidField) as info:
            check_database(route(bucket, **kw), own="essential", allowed="*")
        assert info.value.fields[0][0] == "bucket" and "never" in str(info.value), info.value
    check_database(route("shop.orders"), own="essential", allowed="*")
    check_database(route("shop.orders"), own="essential", allowed="shop,billing_*")
    check_database(route("billing_eu.ledger"), own="essential", allowed=["shop", "billing_*"])
    check_database(route("pay.ledger", mapping={"pay.*": {"remote": "pay.commands"}}), own="essential", allowed="")
    for bucket, allowed in [("other.orders", "shop,billing_*"), ("shop.orders", ""), ("shopping.x", "shop")]:
        with pytest.raises(InvalidField, match="ESSENTIAL_RECORDED_DATABASES"):
            check_database(route(bucket), own="essential", allowed=allowed)


async def test_a_stage_in_essentials_own_database_is_refused(client: Any, settings: Any, store: Any) -> None:
    """A stage whose inverse would run on Essential's own records is refused before it is recorded."""
    saga = await call(client.recorded.start, 60, job="rec:attacker")
    for collection in ("sagas", "stages", "outbox"):
        with pytest.raises(InvalidField) as info:
            await call(client.recorded.add, saga.id, bucket=f"{settings.database}.{collection}", action="INSERT_ONE",
                       res={"insertedId": ObjectId()})  # fmt: skip
        assert info.value.fields[0][0] == "bucket", info.value
    assert await call(client.recorded.stages, saga.id) == []
    assert (await call(client.recorded.abort, saga.id, "refused")).state == SagaState.ABORTED


def test_recorded_requests_are_strict() -> None:
    for bad in ({"ttl": True}, {"ttl": False}, {"ttl": "5"}, {"ttl": float("nan")}, {"ttl": float("inf")},
                {"ttl": 5, "job": 7}, {"ttl": 5, "idempotency_key": 1}):  # fmt: skip
        with pytest.raises(InvalidField) as info:
            StartRecorded.parse(bad)
        assert info.value.fields[0][0] in bad, info.value
    assert StartRecorded.parse({"ttl": 5}).ttl == 5.0
    assert StartRecorded.parse({"ttl": 5, "id": "AB" * 12}).id == "ab" * 12
    for bad, field in [({"bucket": "a.b", "action": "find", "req": {"n": 2**70}}, "req.n"),
                       ({"bucket": "a.b", "action": "find", "res": [{"k\x00": 1}]}, "res.0"),
                       ({"bucket": "a.b", "action": "find", "meta": {"$set": 1}}, "meta"),
                       ({"bucket": "a.b", "action": "find", "res": {"x": float("nan")}}, "res.x"),
                       ({"bucket": "a.b", "action": 5}, "action"), ({"bucket": "a.b", "action": "find", "key": 5}, "key")]:  # fmt: skip
        with pytest.raises(InvalidField) as info:
            AddStage.parse(bad)
        assert info.value.fields[0][0] == field, info.value
    ok = AddStage.parse({"bucket": "a.b", "action": "update", "req": {"filter": {"_id": {"$in": [1]}}, "update": {"$set": {"a": 1}}}})
    assert ok.req["update"] == {"$set": {"a": 1}}, "a recorded request holds MongoDB operators"


async def test_a_reused_recorded_key_or_id_with_other_parameters_is_refused(client: Any) -> None:
    from essential.orchestration import IdempotencyKeyReused

    with pytest.raises(InvalidField) as info:
        await call(client.recorded.start, True)
    assert info.value.fields[0][0] == "ttl"
    key = f"reuse-{uuid.uuid4().hex[:8]}"
    saga = await call(client.recorded.start, 60, job="rec:reuse", idempotency_key=key)
    assert (await call(client.recorded.start, 60, job="rec:reuse", idempotency_key=key)).id == saga.id
    for kwargs in ({"ttl": 61, "job": "rec:reuse"}, {"ttl": 60, "job": "rec:other"}, {"ttl": 60, "job": "rec:reuse", "correlation_id": "c"}):
        with pytest.raises(IdempotencyKeyReused) as refused:
            await call(client.recorded.start, kwargs.pop("ttl"), idempotency_key=key, **kwargs)
        assert saga.id in str(refused.value) and key in str(refused.value)
    chosen = new_id()
    assert (await call(client.recorded.start, 60, id=chosen)).id == chosen
    assert (await call(client.recorded.start, 60, id=chosen)).id == chosen
    with pytest.raises(IdempotencyKeyReused):
        await call(client.recorded.start, 30, id=chosen)
    for sid in (saga.id, chosen):
        assert (await call(client.recorded.commit, sid)).state == SagaState.COMPLETED


async def test_arrival_waits_leave_nothing_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    """An operation for a saga whose runner never arrives must not leave its wait behind, per saga, forever."""
    from essential.actors.sagas import recorded_hosting as recorded

    monkeypatch.setattr(recorded, "ARRIVAL_TIMEOUT", 0.01)
    before = len(recorded._arrived)
    replies = await asyncio.gather(*(recorded.dispatch(new_id(), "commit", {}, expect=True) for _ in range(200)))
    assert replies == [{"moved": True}] * 200
    assert len(recorded._arrived) == before, f"{len(recorded._arrived) - before} waits left behind"


def test_the_expiring_map_drops_idle_and_surplus_entries() -> None:
    from essential.actors.expiring import ExpiringMap

    now = [0.0]
    cache: ExpiringMap[str, int] = ExpiringMap(max_entries=3, idle=10.0, clock=lambda: now[0])
    for i in range(10):
        cache[f"s{i}"] = i
    assert len(cache) == 3 and list(cache) == ["s7", "s8", "s9"], "the least recently used go first"
    now[0] = 5.0
    assert cache.get("s7") == 7  # used: kept for another idle period
    now[0] = 12.0
    cache["s10"] = 10
    assert sorted(cache) == ["s10", "s7"] and cache.get("s8") is None, "idle entries expire"
    now[0] = 100.0
    assert len(cache) == 0 and cache.pop("s10", None) is None


async def test_the_services_caches_stay_bounded(deployment: Any) -> None:
    """Sagas that end elsewhere (here: aborted through the supervisor, not the recorded API) must not stay cached."""
    client, store = await deployment("rec_bounded", recorded_cache_size=3)
    sagas = [await call(client.recorded.start, 120, job="rec:bounded") for _ in range(6)]
    for saga in sagas:
        await call(client.recorded.add, saga.id, bucket="rtshop.items", action="FIND", res={"n": 0})
    for saga in sagas:
        await call(client.abort, saga.id, "ended elsewhere")

    async def all_aborted() -> bool:
        return all([(await store.get(s.id)).state == SagaState.ABORTED for s in sagas])

    await poll(all_aborted, timeout=120, what="the sagas to end")
    sizes = await client.supervisor.__ray_call__.remote(  # the actor handles are the placement's, the jobs the service's
        lambda sup: {"handles": len(sup.placement._recorded_handles), "open": len(sup._recorded_service._open)}
    )
    assert max(sizes.values()) <= 3, sizes


async def test_a_forbidden_stage_already_stored_is_never_undone(deployment: Any, mongo: Any) -> None:
    """Defense in depth: a stage stored before the rule (or by hand) parks the saga instead of undoing it."""
    client, store = await deployment("rec_forged")
    victim = await call(client.recorded.start, 120, job="rec:victim")
    assert (await call(client.recorded.commit, victim.id)).state == SagaState.COMPLETED
    saga = await call(client.recorded.start, 120, job="rec:forged")
    await call(client.recorded.add, saga.id, bucket="rtshop.items", action="FIND", res={"n": 0})
    await store.stages_col.insert_one({
        "saga": ObjectId(saga.id), "seq": 100, "step": "INSERT_ONE", "bucket": "rec_forged.sagas", "action": "create",
        "status": "succeeded", "kind": "recorded", "op": "insert_one", "undo": {"delete": [ObjectId(victim.id)], "put": []},
    })  # fmt: skip
    parked = await call(client.recorded.abort, saga.id, "undo the forged stage")
    assert parked.state == SagaState.PARKED, parked
    assert "refused" in (parked.parked_reason or "") and "never undone" in parked.parked_reason
    assert (await store.get(victim.id)).state == SagaState.COMPLETED, "the victim saga was left alone"
