"""The outbound side of the Kafka boundary: command numbers, per-saga order, retention, stale commands.

The relay tests run the gateway's relay in this process (``GatewayService``
without consumers, as the benchmark does) against the real broker and MongoDB,
each in a database of its own; the stale-command test runs a saga on Ray.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from datetime import timedelta
from typing import Any, AsyncIterator

import pytest
from aiokafka import AIOKafkaProducer
from bson import ObjectId

from essential.actors.kafka.gateway import GatewayService, ensure_gateway
from essential.orchestration import SagaState
from essential.orchestration.models import Event, new_id
from essential.orchestration.states import EventType
from essential.persistence import command_outbox
from essential.persistence.documents import event_to_doc
from essential.persistence.outbox import OutboxQueue, utcnow

from .conftest import TEST_DB, poll
from .jobs import PAYMENTS_TOPIC
from .kafka_tools import Tap, body, headers, stop_gateway

pytestmark = pytest.mark.asyncio


async def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(fn, *args, **kwargs)


@pytest.fixture
async def fresh_db(mongo: Any) -> AsyncIterator[Any]:
    name = f"kafka_outbox_{uuid.uuid4().hex[:8]}"
    yield mongo[name]
    await mongo.drop_database(name)


def stage_row(saga: str, n: int, *, pad: int = 0) -> dict[str, Any]:
    event = Event(type=EventType.STAGE_COMPLETED, saga=saga, job="test:relay", state=SagaState.RUNNING,
                  at=utcnow(), data={"seq": n, "pad": "p" * pad})  # fmt: skip
    return event_to_doc(event, n)


# --------------------------------------------------------------------------- command numbers
async def test_command_numbers_are_never_reused_after_old_rows_are_pruned(fresh_db: Any) -> None:
    await command_outbox.ensure_indexes(fresh_db)
    queue = OutboxQueue(fresh_db[command_outbox.COLLECTION], "test")
    saga = new_id()

    async def queue_command(seq: int) -> int:
        row = await command_outbox.enqueue(fresh_db, saga_id=saga, seq=seq, kind="run", topic="t.commands",
                                           body={"seq": seq}, headers={})  # fmt: skip
        return row["n"]

    assert [await queue_command(s) for s in (1, 2, 3)] == [1, 2, 3]
    assert await queue_command(2) == 2, "a re-run finds the command it queued"
    long_ago = utcnow() - timedelta(days=30)
    rows = fresh_db[command_outbox.COLLECTION]
    await rows.update_one({"_id": command_outbox.command_id(saga, 1, "run")}, {"$set": {"sent_at": long_ago}})
    assert await queue.prune_sent(utcnow() - timedelta(days=1)) == 1
    assert await queue_command(4) == 4, "the next number after 3, though a row was pruned"
    await rows.update_many({}, {"$set": {"sent_at": long_ago}})
    await queue.prune_sent(utcnow() - timedelta(days=1))
    assert await rows.count_documents({}) == 0
    assert await queue_command(5) == 5, "never a number handed out before, though every row was pruned"
    concurrent = await asyncio.gather(*(queue_command(s) for s in range(6, 12)))
    assert sorted(concurrent) == list(range(6, 12)), "concurrent commands get distinct numbers"
    bodies = [d["body"]["n"] async for d in rows.find({"saga": ObjectId(saga)})]
    assert sorted(bodies) == list(range(5, 12)), "the body carries the row's number"


# --------------------------------------------------------------------------- one saga's rows, in order
async def test_a_sagas_next_row_goes_to_kafka_only_once_the_one_before_it_was_acknowledged(
    essential_env: dict[str, str], kafka: Any, mongo: Any, fresh_db: Any
) -> None:
    """With idempotence off (the dev broker), two rows of one saga in flight at once can land out of
    order when the first fails and is sent again.  Stall the broker (SIGSTOP) while the relay holds
    two rows of one saga: only the first may be handed to Kafka before the broker answers, so the
    second one's producer timestamp is later than the moment the broker resumed."""
    from essential.actors.settings import Settings

    conf = Settings(database=fresh_db.name, relay_lease_seconds=2.0, kafka_request_timeout=30.0,
                    kafka_watch_restarts=False, relay_poll_interval=0.05)  # fmt: skip
    service = GatewayService(conf, owner="test/relay-order", consumers=False)
    task = asyncio.create_task(service.run())
    try:
        await poll(service.ready.is_set, timeout=60, what="the relay to start")
        relay = service.relays["events"]
        outbox = fresh_db["outbox"]
        warm = stage_row(new_id(), 1)  # producer connected, metadata of the topic known
        await outbox.insert_one(warm)
        await poll(lambda: outbox.find_one({"_id": warm["_id"], "sent_at": {"$ne": None}}), timeout=60,
                   what="the warm-up row relayed")  # fmt: skip

        saga = new_id()
        first, second = stage_row(saga, 1, pad=10_000), stage_row(saga, 2, pad=10_000)
        failures = relay.counts["failures"]
        os.kill(kafka.pid, signal.SIGSTOP)
        try:
            await outbox.insert_many([first, second])
            await poll(lambda: relay.counts["failures"] > failures, timeout=60,
                       what="a relay round to give up on the stalled broker")  # fmt: skip
            resumed_ms = int(time.time() * 1000)
        finally:
            os.kill(kafka.pid, signal.SIGCONT)

        wanted = {str(first["_id"]), str(second["_id"])}
        async with Tap(kafka.bootstrap, "saga.stage.completed") as tap:
            await poll(lambda: wanted <= {headers(r)["event_id"] for r in tap.for_key(saga)}, timeout=90,
                       what="both rows on Kafka")  # fmt: skip
            records = sorted(tap.for_key(saga), key=lambda r: r.offset)
        firsts: dict[int, Any] = {}
        for record in records:
            firsts.setdefault(body(record)["n"], record)
        assert list(firsts) == [1, 2], "the first copy of each row, in the saga's order"
        assert firsts[2].timestamp >= resumed_ms, (
            "row 2 was handed to Kafka while row 1 was still unacknowledged (the broker was stalled)"
        )
        async def both_marked() -> bool:
            return await outbox.count_documents({"saga": ObjectId(saga), "sent_at": None}) == 0

        await poll(both_marked, timeout=60, what="both rows marked sent")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# --------------------------------------------------------------------------- retention
async def test_refused_rows_and_old_replies_are_pruned_after_the_retention(
    essential_env: dict[str, str], kafka: Any, fresh_db: Any
) -> None:
    from essential.actors.settings import Settings

    conf = Settings(database=fresh_db.name, retention=3600.0, kafka_prune_interval=1.0, kafka_watch_restarts=False)
    old, now = utcnow() - timedelta(hours=2), utcnow()

    def refused(at: Any) -> dict[str, Any]:
        row = stage_row(new_id(), 1)
        return {**row, "createdAt": at, "refused_at": at, "relay_error": "MessageSizeTooLargeError"}

    old_refused, new_refused = refused(old), refused(now)
    await fresh_db.outbox.insert_many([old_refused, new_refused])
    ended, live, unknown = ObjectId(), ObjectId(), ObjectId()
    await fresh_db.sagas.insert_many([{"_id": ended, "state": "completed"}, {"_id": live, "state": "compensating"}])

    def reply(saga: ObjectId, seq: int, at: Any) -> dict[str, Any]:
        return {"_id": f"{saga}:{seq}:run", "saga": str(saga), "seq": seq, "kind": "run", "ok": True, "received_at": at}

    replies = {"ended-old": reply(ended, 1, old), "ended-new": reply(ended, 2, now), "live-old": reply(live, 1, old),
               "unknown-old": reply(unknown, 1, old)}  # fmt: skip
    await fresh_db.inbox.insert_many(list(replies.values()))

    service = GatewayService(conf, owner="test/retention", consumers=False)
    task = asyncio.create_task(service.run())
    try:
        await poll(service.ready.is_set, timeout=60, what="the gateway to start")

        async def pruned() -> bool:
            gone = await fresh_db.outbox.find_one({"_id": old_refused["_id"]}) is None
            inbox = {d["_id"] async for d in fresh_db.inbox.find()}
            return gone and replies["ended-old"]["_id"] not in inbox and replies["unknown-old"]["_id"] not in inbox

        await poll(pruned, timeout=60, what="the refused row and the replies of ended sagas pruned")
        assert await fresh_db.outbox.find_one({"_id": new_refused["_id"]}) is not None, "kept until its retention"
        kept = {d["_id"] async for d in fresh_db.inbox.find()}
        assert replies["ended-new"]["_id"] in kept, "a recent reply stays"
        assert replies["live-old"]["_id"] in kept, "a saga still running may read its reply again"
        stats = await service.stats()
        assert stats["relay"]["events"]["refused_rows"] == 1, "refused rows are reported"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# --------------------------------------------------------------------------- a long outage: stale commands
@pytest.fixture
async def producer(kafka: Any) -> AsyncIterator[AIOKafkaProducer]:
    p = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
    await p.start()
    yield p
    await p.stop()


async def test_a_run_command_kafka_never_took_is_not_delivered_once_its_step_is_compensated(
    ray_session: Any, client: Any, settings: Any, store: Any, mongo: Any, kafka: Any, producer: AIOKafkaProducer
) -> None:
    """No gateway runs (Kafka is out of reach for the relay): the step's command stays queued, the step
    times out and is compensated.  When Kafka comes back, the participant must not get the stale
    ``run`` before (or after) the ``compensate``: it would apply an operation being undone."""
    await call(stop_gateway)
    saga_id = await call(client.start, "test:remote-timeout", {"customer": "bob", "amount": 1, "silent": True})
    rows = mongo[TEST_DB][command_outbox.COLLECTION]
    compensate = await poll(lambda: rows.find_one({"saga": ObjectId(saga_id), "kind": "compensate"}), timeout=90,
                            what="the compensation queued while nothing relays")  # fmt: skip
    try:
        async with Tap(kafka.bootstrap, PAYMENTS_TOPIC) as tap:
            gateway = await call(ensure_gateway, settings)
            assert await gateway.ready.remote(120)
            sent = await poll(lambda: [body(r) for r in tap.for_key(saga_id) if body(r)["kind"] == "compensate"],
                              timeout=90, what="the compensation on Kafka")  # fmt: skip
            command = sent[0]
            reply = {"schema": 1, "saga": saga_id, "seq": command["seq"], "kind": "compensate",
                     "idempotency_key": command["idempotency_key"], "ok": True, "result": {"undone": False}}  # fmt: skip
            await producer.send_and_wait(settings.kafka_reply_topic, json.dumps(reply).encode(), key=saga_id.encode())
            saga = await call(client.wait, saga_id, 120)
            kinds = [body(r)["kind"] for r in sorted(tap.for_key(saga_id), key=lambda r: r.offset)]
        assert saga.state == SagaState.ABORTED, saga.error
        assert "run" not in kinds, f"a stale run command reached the participant: {kinds}"
        run = await rows.find_one({"_id": command_outbox.command_id(saga_id, compensate["seq"], "run")})
        assert run["sent_at"] is None and run.get("withdrawn_at") is not None, run
    finally:
        await call(stop_gateway)
