"""The Kafka gateway against the embedded broker, real Ray and MongoDB.

Commands in (applied once, bad ones dead-lettered), the outbox relayed out in
per-saga order (through a broker restart and a gateway crash), and steps
carried out by a participant service over Kafka.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import pytest
import ray
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from essential.actors.kafka.gateway import ensure_gateway
from essential.actors.names import actor_name
from essential.orchestration import SagaState
from essential.orchestration.states import Action, StageStatus

from .conftest import JOBS_DB, REPO, TEST_DB, poll
from .jobs import MANUAL_TOPIC, PAYMENTS_TOPIC
from .kafka_tools import Tap, stop_gateway

pytestmark = pytest.mark.asyncio

LIFECYCLE = ["saga.started", "saga.stage.completed", "saga.aborted", "saga.completed", "saga.parked"]
TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


# --------------------------------------------------------------------------- helpers
async def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Blocking Ray calls run off the event loop that the MongoDB client uses."""
    return await asyncio.to_thread(fn, *args, **kwargs)


def body(record: ConsumerRecord) -> dict[str, Any]:
    return json.loads(record.value)


def headers(record: ConsumerRecord) -> dict[str, str]:
    return {k: v.decode() for k, v in record.headers or ()}


def first_of_each(records: list[ConsumerRecord]) -> list[ConsumerRecord]:
    """De-duplicate by event id (delivery is at least once), keeping the first copy."""
    seen: set[str] = set()
    out = []
    for record in records:
        event_id = headers(record)["event_id"]
        if event_id not in seen:
            seen.add(event_id)
            out.append(record)
    return out


def assert_published_in_order(records: list[ConsumerRecord]) -> None:
    """One saga's events: n = 1..k, and each was handed to Kafka no earlier than the one before it."""
    events = sorted(first_of_each(records), key=lambda r: body(r)["n"])
    ns = [body(r)["n"] for r in events]
    assert ns == list(range(ns[0], ns[0] + len(ns))), f"gaps in {ns}"
    stamps = [r.timestamp for r in events]
    assert stamps == sorted(stamps), "an event reached Kafka before an earlier one of its saga"
    by_topic: dict[str, list[ConsumerRecord]] = {}
    for r in events:
        by_topic.setdefault(r.topic, []).append(r)
    for same_topic in by_topic.values():
        offsets = [(r.partition, r.offset) for r in same_topic]
        assert offsets == sorted(offsets) and len({p for p, _ in offsets}) == 1, "one partition, in order"


def start_command(job: str, payload: dict | None = None, **fields: Any) -> bytes:
    return json.dumps({"schema": 1, "type": "start", "job": job, "payload": payload or {}, **fields}).encode()


async def sagas_by_correlation(mongo: Any, correlation_id: str) -> list[dict[str, Any]]:
    return await mongo[TEST_DB].sagas.find({"correlation_id": correlation_id}).to_list()


async def wait_saga(client: Any, saga_id: str, timeout: float = 120) -> Any:
    return await call(client.wait, saga_id, timeout)


TERMINAL = ("saga.completed", "saga.aborted")


async def wait_relayed(tap: Tap, saga_ids: list[str], gateways: list[Any], mongo: Any, timeout: float = 180) -> None:
    """Every saga's terminal event seen on Kafka; on timeout, saga states and gateway stats say where it stuck."""

    def missing() -> list[str]:
        return [s for s in saga_ids if not any(r.topic in TERMINAL for r in tap.for_key(s))]

    try:
        await poll(lambda: not missing(), timeout=timeout, what="the terminal event of every saga")
    except AssertionError as exc:
        lost = missing()
        oids = [pay_saga(s) for s in lost]
        states = [(str(d["_id"]), d["state"], d.get("error"))
                  async for d in mongo[TEST_DB].sagas.find({"_id": {"$in": oids}})]  # fmt: skip
        unsent = await mongo[TEST_DB].outbox.count_documents({"saga": {"$in": oids}, "sent_at": None})
        stats = [await g.stats.remote() for g in gateways]
        raise AssertionError(f"{exc}; missing {lost[:5]} states {states[:5]} unsent {unsent}; stats {stats}") from None


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
async def gateway(ray_session: Any, client: Any, settings: Any, store: Any) -> AsyncIterator[Any]:
    # fault gates on: a test can hold a command between its application and its offset commit
    handle = await call(ensure_gateway, settings.model_copy(update={"kafka_fault_gates": True}))
    assert await handle.ready.remote(120), "the gateway did not become ready"
    yield handle
    await call(stop_gateway)


@pytest.fixture(scope="module")
async def producer(kafka: Any) -> AsyncIterator[AIOKafkaProducer]:
    p = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", max_request_size=4 * 1024 * 1024)
    await p.start()
    yield p
    await p.stop()


@pytest.fixture(scope="module")
async def wallets(essential_env: dict[str, str]) -> None:
    from examples.services import wallet

    await wallet.ensure_indexes()
    await wallet.seed({"alice": 10_000_000, "bob": 10_000_000})


@pytest.fixture(scope="module")
def payment_service(gateway: Any, wallets: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The example participant (payment service) as its own process, stopped by PID at the end."""
    log_path = Path(tmp_path_factory.mktemp("payments")) / "payments.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "examples.participant_service", "--topic", PAYMENTS_TOPIC],
            cwd=REPO, env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    yield proc
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


# --------------------------------------------------------------------------- commands in, events out
async def test_start_command_runs_saga_and_events_arrive_in_order(
    gateway: Any, producer: AIOKafkaProducer, kafka: Any, mongo: Any, client: Any, settings: Any
) -> None:
    correlation = f"c-{uuid.uuid4()}"
    key = f"order-{uuid.uuid4()}"
    command = start_command("test:chain", {"tag": "kafka"}, idempotency_key=key, correlation_id=correlation)
    async with Tap(kafka.bootstrap, *LIFECYCLE) as tap:
        for _ in range(2):  # the same command twice: one saga
            await producer.send_and_wait(settings.kafka_command_topic, command, key=key.encode())
        sagas = await poll(lambda: sagas_by_correlation(mongo, correlation), timeout=60, what="saga created")
        saga = await wait_saga(client, str(sagas[0]["_id"]))
        assert saga.state == SagaState.COMPLETED
        await poll(lambda: any(r.topic == "saga.completed" for r in tap.for_key(saga.id)), timeout=60,
                   what="saga.completed on Kafka")  # fmt: skip
        events = first_of_each(tap.for_key(saga.id))

    assert await mongo[TEST_DB].sagas.count_documents({"idempotency_key": key}) == 1
    assert [r.topic for r in sorted(events, key=lambda r: body(r)["n"])] == (
        ["saga.started"] + ["saga.stage.completed"] * 4 + ["saga.completed"]
    )
    assert_published_in_order(events)
    for record in events:
        data, meta = body(record), headers(record)
        assert data["schema"] == 1 and data["saga"] == saga.id and data["type"] == record.topic
        assert meta["event_id"] == data["id"], "consumers de-duplicate by the event id"
        assert meta["correlation_id"] == correlation
        assert TRACEPARENT.match(meta["traceparent"])
    assert len({headers(r)["traceparent"].split("-")[1] for r in events}) == 1, "one trace per saga"
    unsent = await mongo[TEST_DB].outbox.count_documents({"saga": sagas[0]["_id"], "sent_at": None})
    assert unsent == 0, "every event is marked sent once Kafka acknowledged it"


async def test_abort_command_compensates_a_running_saga(
    gateway: Any, producer: AIOKafkaProducer, kafka: Any, mongo: Any, client: Any, store: Any, settings: Any
) -> None:
    correlation = f"c-{uuid.uuid4()}"
    gate = f"g-{uuid.uuid4().hex}"  # b finishes only once the abort is on record, however slow the machine
    await producer.send_and_wait(
        settings.kafka_command_topic, start_command("test:chain", {"gate": {"b": gate}}, correlation_id=correlation)
    )
    sagas = await poll(lambda: sagas_by_correlation(mongo, correlation), timeout=60, what="saga created")
    saga_id = str(sagas[0]["_id"])

    async def b_started() -> bool:
        return any(s.step == "b" for s in await store.stages(saga_id))

    await poll(b_started, timeout=60, what="step b to start")
    abort = {"schema": 1, "type": "abort", "saga": saga_id, "reason": "cancelled over Kafka"}
    async with Tap(kafka.bootstrap, *LIFECYCLE) as tap:
        await producer.send_and_wait(settings.kafka_command_topic, json.dumps(abort).encode())

        async def abort_recorded() -> bool:
            return bool((await store.get(saga_id)).abort_requested)

        await poll(abort_recorded, timeout=60, what="the abort command applied")
        await mongo[JOBS_DB].gates.insert_one({"_id": gate})
        saga = await wait_saga(client, saga_id)
        assert saga.state == SagaState.ABORTED
        assert "cancelled over Kafka" in (saga.error or "")
        await poll(lambda: any(r.topic == "saga.aborted" for r in tap.for_key(saga_id)), timeout=60,
                   what="saga.aborted on Kafka")  # fmt: skip
        events = first_of_each(tap.for_key(saga_id))
    topics = [r.topic for r in sorted(events, key=lambda r: body(r)["n"])]
    assert topics[0] == "saga.started" and topics[-1] == "saga.aborted" and "saga.completed" not in topics
    assert_published_in_order(events)


async def test_bad_commands_are_dead_lettered_while_valid_ones_are_applied(
    gateway: Any, producer: AIOKafkaProducer, kafka: Any, mongo: Any, settings: Any
) -> None:
    run = uuid.uuid4().hex[:8]
    too_large = start_command("test:chain", {"tag": "x" * (settings.kafka_max_command_bytes + 10)})
    bad = {
        "not_json": b"\x80not json at all{",
        "invalid_command": json.dumps({"schema": 1, "type": "start", "jobb": "test:chain"}).encode(),
        "unknown_job": start_command("no:such-job"),
        "too_large": too_large,
        "invalid_payload": start_command("test:chain", {"fail_times": -1}),
        "unsupported": json.dumps({"schema": 1, "type": "commit", "saga": "0" * 24}).encode(),
        "saga_not_found": json.dumps({"schema": 1, "type": "abort", "saga": "f" * 24}).encode(),
    }
    valid = {f"{run}-ok-{i}": start_command("test:chain", {}, correlation_id=f"{run}-ok-{i}") for i in range(len(bad))}
    async with Tap(kafka.bootstrap, settings.kafka_dlq_topic) as dlq:
        for (code, value), (good_key, good) in zip(bad.items(), valid.items()):
            await producer.send_and_wait(settings.kafka_command_topic, value, key=f"{run}-bad-{code}".encode(),
                                         headers=[("origin", b"test")])  # fmt: skip
            await producer.send_and_wait(settings.kafka_command_topic, good, key=good_key.encode())
        letters = await poll(lambda: len(dlq.keyed(f"{run}-bad-")) >= len(bad) and dlq.keyed(f"{run}-bad-"),
                             timeout=90, what="every bad command dead-lettered")  # fmt: skip

    for correlation in valid:
        applied = await poll(lambda c=correlation: sagas_by_correlation(mongo, c), timeout=60, what=correlation)
        assert len(applied) == 1
    assert len(letters) == len(bad), "each bad command is dead-lettered once"
    for letter in letters:
        code = letter.key.decode().removeprefix(f"{run}-bad-")
        meta = headers(letter)
        assert meta["dlq.code"] == code, meta
        assert meta["dlq.reason"], "a reason a person can act on"
        assert meta["dlq.topic"] == settings.kafka_command_topic and meta["dlq.offset"].isdigit()
        assert meta["origin"] == "test", "original headers are kept"
        assert letter.value == bad[code], "the original bytes, unchanged"
    reasons = {letter.key.decode().removeprefix(f"{run}-bad-"): headers(letter)["dlq.reason"] for letter in letters}
    assert "no:such-job" in reasons["unknown_job"]
    assert "fail_times" in reasons["invalid_payload"]
    assert "jobb" in reasons["invalid_command"] or "job" in reasons["invalid_command"]
    assert "recorded sagas" in reasons["unsupported"]


async def test_a_row_kafka_can_never_take_is_set_aside_and_does_not_block_the_relay(
    gateway: Any, kafka: Any, mongo: Any
) -> None:
    from essential.orchestration.models import Event, new_id
    from essential.orchestration.states import EventType
    from essential.persistence.documents import event_to_doc
    from essential.persistence.outbox import utcnow

    def row(big: bool) -> dict[str, Any]:
        data = {"blob": "x" * (3 * 1024 * 1024)} if big else {}
        event = Event(type=EventType.STARTED, saga=new_id(), job="test:manual-row", state=SagaState.PENDING,
                      at=utcnow(), data=data)  # fmt: skip
        return event_to_doc(event, 1)

    huge, normal = row(big=True), row(big=False)
    async with Tap(kafka.bootstrap, "saga.started") as tap:
        await mongo[TEST_DB].outbox.insert_many([huge, normal])
        await poll(lambda: tap.for_key(normal["key"]), timeout=60, what="the row after the huge one")
    refused = await poll(lambda: mongo[TEST_DB].outbox.find_one({"_id": huge["_id"], "refused_at": {"$ne": None}}),
                         timeout=60, what="the huge row set aside")  # fmt: skip
    assert refused["sent_at"] is None
    assert "TooLarge" in refused["relay_error"]


# --------------------------------------------------------------------------- participants over Kafka
async def test_step_answered_by_participant_completes(
    gateway: Any, payment_service: Any, client: Any, store: Any, mongo: Any, kafka: Any
) -> None:
    from examples.services import wallet

    before = await wallet.balance("alice")
    async with Tap(kafka.bootstrap, PAYMENTS_TOPIC) as commands:
        saga_id = await call(client.start, "test:remote", {"customer": "alice", "amount": 250})
        saga = await wait_saga(client, saga_id, 180)
        sent = [body(r) for r in commands.for_key(saga_id)]
    assert saga.state == SagaState.COMPLETED, saga.error
    pay = next(s for s in await store.stages(saga_id) if s.step == "pay")
    assert pay.status == StageStatus.SUCCEEDED and pay.res["ok"] is True and pay.res["amount"] == -250
    assert await wallet.balance("alice") == before - 250
    assert [(c["kind"], c["seq"], c["idempotency_key"]) for c in sent] == [("run", pay.seq, f"{saga_id}:{pay.seq}")]
    reply = await mongo[TEST_DB].inbox.find_one({"_id": f"{saga_id}:{pay.seq}:run"})
    assert reply is not None and reply["ok"] is True


async def test_participant_that_never_replies_times_out_and_compensates(
    gateway: Any, payment_service: Any, client: Any, store: Any, mongo: Any
) -> None:
    from examples.services import wallet

    before = await wallet.balance("bob")
    saga_id = await call(client.start, "test:remote-timeout", {"customer": "bob", "amount": 300, "silent": True})
    saga = await wait_saga(client, saga_id, 180)
    assert saga.state == SagaState.ABORTED, saga.state
    assert "pay" in (saga.error or "")
    stages = await store.stages(saga_id)
    pay = next(s for s in stages if s.step == "pay" and s.action != Action.COMPENSATE)
    assert pay.status == StageStatus.FAILED and pay.res["outcome"] == "unknown"
    undo = [s for s in stages if s.action == Action.COMPENSATE]
    assert [(s.step, s.compensates, s.status) for s in undo] == [
        ("pay", pay.seq, StageStatus.SUCCEEDED), ("a", 1, StageStatus.SUCCEEDED),
    ]  # fmt: skip
    assert undo[0].res["undone"] is False, "the participant had nothing to refund"
    assert not any(s.step == "c" for s in stages)
    kinds = [d["kind"] async for d in mongo[TEST_DB].command_outbox.find({"saga": pay_saga(saga_id)}).sort("n", 1)]
    assert kinds == ["run", "compensate"], "the compensation is a command too"
    assert await wallet.balance("bob") == before


def pay_saga(saga_id: str) -> Any:
    from bson import ObjectId

    return ObjectId(saga_id)


@ray.remote(num_cpus=0)
class NameHolder:
    """Holds a saga actor's name so the supervisor believes the saga is being driven (it is not)."""

    def ping(self) -> bool:
        return True


async def _kill_and_hold(saga_id: str, timeout: float = 60) -> Any:
    """Kill the saga's actor and take its name, so no actor runs the saga until the holder goes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        try:
            ray.kill(ray.get_actor(actor_name(saga_id), namespace="essential"), no_restart=True)
        except ValueError:
            pass
        try:
            holder = NameHolder.options(name=actor_name(saga_id), namespace="essential", lifetime="detached").remote()
            await holder.ping.remote()
            return holder
        except ValueError:  # the old actor is not gone yet, or the supervisor restored it: again
            await asyncio.sleep(0.05)
    raise AssertionError(f"could not take the name of saga {saga_id}'s actor")


async def test_reply_that_arrives_while_the_actor_is_dead_is_used_on_resume(
    gateway: Any, client: Any, store: Any, mongo: Any, kafka: Any, producer: AIOKafkaProducer, settings: Any,
) -> None:
    async with Tap(kafka.bootstrap, MANUAL_TOPIC) as commands:
        saga_id = await call(client.start, "test:remote-manual", {"customer": "alice", "amount": 5})
        records = await poll(lambda: commands.for_key(saga_id), timeout=60, what="the command on Kafka")
    command = body(records[0])
    assert command["kind"] == "run" and command["reply_topic"] == settings.kafka_reply_topic

    holder = await _kill_and_hold(saga_id)
    pay = next(s for s in await store.stages(saga_id) if s.step == "pay")
    assert pay.status == StageStatus.STARTED
    reply = {"schema": 1, "saga": saga_id, "seq": command["seq"], "kind": "run",
             "idempotency_key": command["idempotency_key"], "ok": True, "result": {"charged": 5}}  # fmt: skip
    await producer.send_and_wait(settings.kafka_reply_topic, json.dumps(reply).encode(), key=saga_id.encode())
    stored = await poll(lambda: mongo[TEST_DB].inbox.find_one({"_id": f"{saga_id}:{command['seq']}:run"}),
                        timeout=60, what="the reply in the inbox")  # fmt: skip
    assert stored["result"] == {"charged": 5}
    assert (await store.get(saga_id)).state == SagaState.RUNNING, "nobody has used the reply yet"

    ray.kill(holder, no_restart=True)  # the supervisor's sweep now restores the saga
    saga = await wait_saga(client, saga_id, 180)
    assert saga.state == SagaState.COMPLETED, saga.error
    assert saga.lease.epoch >= 2, "a new actor resumed the saga"
    pay = next(s for s in await store.stages(saga_id) if s.step == "pay")
    assert pay.res == {"charged": 5}
    sent = await mongo[TEST_DB].command_outbox.count_documents({"saga": pay_saga(saga_id)})
    assert sent == 1, "the re-run found the command it had sent; it did not send another"


# --------------------------------------------------------------------------- several gateways, crashes
async def test_two_gateways_share_the_work_and_apply_each_command_once(
    gateway: Any, producer: AIOKafkaProducer, kafka: Any, mongo: Any, client: Any, settings: Any
) -> None:
    second = await call(ensure_gateway, settings, name="essential:gateway-2")
    try:
        assert await second.ready.remote(120)

        async def both_hold_partitions() -> bool:
            stats = [await g.stats.remote() for g in (gateway, second)]
            return all(s["consumers"]["commands"]["partitions"] for s in stats)

        await poll(both_hold_partitions, timeout=120, what="the group to share the command partitions")
        run = uuid.uuid4().hex[:8]
        correlations = [f"{run}-{i}" for i in range(24)]
        async with Tap(kafka.bootstrap, *LIFECYCLE) as tap:
            for c in correlations:
                command = start_command("test:chain", {}, correlation_id=c)
                await producer.send_and_wait(settings.kafka_command_topic, command, key=c.encode())
            ids = []
            for c in correlations:
                found = await poll(lambda c=c: sagas_by_correlation(mongo, c), timeout=90, what=c)
                ids.append(str(found[0]["_id"]))
            await wait_relayed(tap, ids, [gateway, second], mongo)
            for saga_id in ids:
                assert_published_in_order(tap.for_key(saga_id))
        for c in correlations:
            assert len(await sagas_by_correlation(mongo, c)) == 1
        stats = [await g.stats.remote() for g in (gateway, second)]
        assert all(sum(v for k, v in s["commands"].items() if k.startswith("applied")) for s in stats), (
            "both gateways applied commands", [s["commands"] for s in stats]
        )
    finally:
        await call(stop_gateway, "essential", "essential:gateway-2")


async def test_killed_gateway_comes_back_and_applies_no_command_twice(
    gateway: Any, producer: AIOKafkaProducer, kafka: Any, mongo: Any, client: Any, settings: Any
) -> None:
    run = uuid.uuid4().hex[:8]
    correlations = [f"{run}-{i}" for i in range(30)]

    async def send(batch: list[str]) -> None:
        for c in batch:  # no idempotency key: the gateway derives one from the message's identity
            command = start_command("test:chain", {}, correlation_id=c)
            await producer.send_and_wait(settings.kafka_command_topic, command)

    old_pid = await gateway.pid.remote()
    async with Tap(kafka.bootstrap, *TERMINAL) as tap:
        await send(correlations[:15])
        await poll(lambda: mongo[TEST_DB].sagas.count_documents({"correlation_id": {"$in": correlations}}),
                   timeout=60, what="the gateway applying the first commands")  # fmt: skip
        os.kill(old_pid, signal.SIGKILL)
        await send(correlations[15:])
        assert await gateway.ready.remote(120), "Ray restarts the gateway (max_restarts=-1)"
        assert await gateway.pid.remote() != old_pid
        ids = []
        for c in correlations:
            found = await poll(lambda c=c: sagas_by_correlation(mongo, c), timeout=120, what=c)
            ids.append(str(found[0]["_id"]))
        await wait_relayed(tap, ids, [gateway], mongo)
    applied = mongo[TEST_DB].sagas.find({"correlation_id": {"$in": correlations}})
    counts = Counter([d["correlation_id"] async for d in applied])
    assert counts == Counter({c: 1 for c in correlations}), "a command applied twice"


async def _committed(bootstrap: str, group: str, topic: str, partition: int) -> int | None:
    """The offset the consumer group committed for ``topic[partition]`` (read without joining the group)."""
    from aiokafka.structs import TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        return await consumer.committed(TopicPartition(topic, partition))
    finally:
        await consumer.stop()


@pytest.mark.parametrize("hold", ["applied", "logged"])
async def test_gateway_killed_between_applying_a_command_and_committing_its_offset_applies_it_once(
    gateway: Any, producer: AIOKafkaProducer, kafka: Any, mongo: Any, client: Any, settings: Any, hold: str
) -> None:
    """The gateway is held at a gate right after the supervisor applied a start (``applied``: before the
    command log knows it; ``logged``: after), then SIGKILLed.  The offset was never committed, so the
    restarted gateway gets the message again, and the saga still exists once."""
    gate = f"g-{uuid.uuid4().hex}"
    correlation = f"c-{uuid.uuid4()}"
    db = mongo[TEST_DB]
    from essential.persistence.outbox import utcnow

    since = utcnow()
    old_pid = await gateway.pid.remote()
    command = start_command("test:chain", {}, correlation_id=correlation)  # key derived from the message
    sent = await producer.send_and_wait(settings.kafka_command_topic, command,
                                        headers=[("essential-gate", f"{hold}:{gate}".encode())])  # fmt: skip
    held = await poll(lambda: db.gate_waits.find_one({"_id": gate}), timeout=60,
                      what="the gateway held after applying the command")  # fmt: skip
    assert held["pids"] == [old_pid]
    assert len(await sagas_by_correlation(mongo, correlation)) == 1, "applied before the kill"
    this_message = {"_id": {"$regex": f"^kafka:{re.escape(sent.topic)}:{sent.partition}:{sent.offset}:"},
                    "at": {"$gte": since}}  # fmt: skip
    logged = await db.command_log.count_documents(this_message)
    assert logged == (1 if hold == "logged" else 0)
    committed = await _committed(kafka.bootstrap, settings.kafka_consumer_group, sent.topic, sent.partition)
    assert committed is None or committed <= sent.offset, "held before its offset was committed"

    os.kill(old_pid, signal.SIGKILL)
    await db.gates.insert_one({"_id": gate})
    assert await gateway.ready.remote(120), "Ray restarts the gateway (max_restarts=-1)"
    assert await gateway.pid.remote() != old_pid

    async def past_it() -> bool:
        offset = await _committed(kafka.bootstrap, settings.kafka_consumer_group, sent.topic, sent.partition)
        return offset is not None and offset > sent.offset

    await poll(past_it, timeout=120, what="the restarted gateway committing the message's offset")
    waits = await db.gate_waits.find_one({"_id": gate})
    if hold == "applied":  # nothing but the saga knew it: the message was applied again, to the same saga
        assert len(waits["pids"]) == 2 and waits["pids"][0] == old_pid, waits
    else:  # the command log knew it: recognised, not applied again
        assert waits["pids"] == [old_pid], waits
        assert (await gateway.stats.remote())["commands"].get("duplicates", 0) >= 1
    sagas = await sagas_by_correlation(mongo, correlation)
    assert len(sagas) == 1, "a command applied twice"
    saga = await wait_saga(client, str(sagas[0]["_id"]))
    assert saga.state == SagaState.COMPLETED
    started = await db.outbox.count_documents({"saga": sagas[0]["_id"], "topic": "saga.started"})
    assert started == 1, "one saga.started event"
    assert await db.command_log.count_documents(this_message) == 1, "one outcome on record"


async def test_broker_restart_loses_nothing_committed_to_the_outbox(
    gateway: Any, kafka: Any, client: Any, mongo: Any, store: Any, settings: Any
) -> None:
    gate = f"g-{uuid.uuid4().hex}"  # step b of every saga waits here until Kafka is down
    saga_ids = [await call(client.start, "test:chain", {"gate": {"b": gate}}) for _ in range(6)]
    async with Tap(kafka.bootstrap, *LIFECYCLE) as before:
        for saga_id in saga_ids:
            await poll(lambda s=saga_id: before.for_key(s), timeout=60, what=f"saga.started of {saga_id}")
        failures = (await gateway.stats.remote())["relay"]["events"].get("failures", 0)

    async def all_at_the_gate() -> bool:
        stages = [await store.stages(s) for s in saga_ids]
        return all(any(st.step == "b" for st in saga_stages) for saga_stages in stages)

    await poll(all_at_the_gate, timeout=120, what="every saga running step b")
    kafka.kill()
    await mongo[JOBS_DB].gates.insert_one({"_id": gate})  # b, c, d and the end happen without Kafka
    for saga_id in saga_ids:  # sagas go on without Kafka: their events wait in the outbox
        assert (await wait_saga(client, saga_id)).state == SagaState.COMPLETED

    async def relay_failed() -> bool:
        return (await gateway.stats.remote())["relay"]["events"].get("failures", 0) > failures

    # the relay has tried and failed since the kill, so nothing acknowledged is still being marked
    await poll(relay_failed, timeout=120, what="the relay to notice the outage")
    oids = [pay_saga(s) for s in saga_ids]
    unsent = [d async for d in mongo[TEST_DB].outbox.find({"saga": {"$in": oids}, "sent_at": None})]
    assert unsent, "events were produced during the outage"

    kafka.start()  # empty: the gateway recreates its topics
    async with Tap(kafka.bootstrap, *LIFECYCLE) as after:
        wanted = {str(d["_id"]) for d in unsent}

        def published() -> bool:
            return wanted <= {headers(r)["event_id"] for r in after.records}

        await poll(published, timeout=180, what="every unsent outbox event published after the restart")

        async def all_marked() -> bool:
            return await mongo[TEST_DB].outbox.count_documents({"saga": {"$in": oids}, "sent_at": None}) == 0

        await poll(all_marked, timeout=60, what="every row marked sent")
        for saga_id in saga_ids:
            assert_published_in_order(after.for_key(saga_id))


async def test_commands_sent_after_the_broker_lost_its_log_are_not_skipped(
    gateway: Any, kafka: Any, mongo: Any, settings: Any
) -> None:
    """The dev broker restarts empty, yet the gateway's consumer kept its old position (and committed
    it to the new broker): offsets below it — every command sent after the restart — were never read.
    Run after another broker restart (as in this module), the client's fetcher could also stop
    fetching a partition that has records, and its consumer never finished stopping."""
    run = uuid.uuid4().hex[:8]
    before = [f"{run}-before-{i}" for i in range(4)]
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
    await producer.start()
    try:
        for correlation in before:
            await producer.send_and_wait(settings.kafka_command_topic, partition=0, value=start_command(
                "test:chain", idempotency_key=correlation, correlation_id=correlation))  # fmt: skip
        for correlation in before:
            await poll(lambda c=correlation: sagas_by_correlation(mongo, c), timeout=60, what=f"saga {correlation}")
    finally:
        await producer.stop()

    kafka.kill()
    kafka.start()  # empty: no topics, no committed offsets — the consumer still remembers offset 4
    after = f"{run}-after"
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
    await producer.start()
    try:
        async def sent() -> bool:
            try:
                await producer.send_and_wait(settings.kafka_command_topic, partition=0, value=start_command(
                    "test:chain", idempotency_key=after, correlation_id=after))  # fmt: skip
                return True
            except Exception:  # the topic is being recreated
                return False

        await poll(sent, timeout=60, interval=0.5, what="the command sent to the restarted broker")
        try:
            await poll(lambda: sagas_by_correlation(mongo, after), timeout=120, what="the command sent after the restart")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; gateway {await gateway.stats.remote()}") from None
    finally:
        await producer.stop()


async def test_events_lost_with_the_broker_while_the_gateway_died_too_are_published_again(
    gateway: Any, kafka: Any, client: Any, mongo: Any, settings: Any
) -> None:
    """The broker restarts empty while the gateway is dead (a machine restart): the gateway that
    comes back must still know its last good canary, or it takes the new log's first canary for
    its baseline and never re-publishes the rows it had marked sent that the broker lost."""
    saga_ids = [await call(client.start, "test:chain", {}) for _ in range(3)]
    for saga_id in saga_ids:
        await wait_saga(client, saga_id)
    oids = [pay_saga(s) for s in saga_ids]

    async def all_marked() -> bool:
        return await mongo[TEST_DB].outbox.count_documents({"saga": {"$in": oids}, "sent_at": None}) == 0

    await poll(all_marked, timeout=60, interval=0.1, what="every row of the sagas marked sent")
    pid = await gateway.pid.remote()
    kafka.kill()  # first the broker: the dying gateway cannot take a good canary from it any more
    os.kill(pid, signal.SIGKILL)
    kafka.start()  # empty
    assert await gateway.ready.remote(120), "Ray restarts the gateway (max_restarts=-1)"
    assert await gateway.pid.remote() != pid
    async with Tap(kafka.bootstrap, *LIFECYCLE) as after:
        await wait_relayed(after, saga_ids, [gateway], mongo, timeout=90)
        for saga_id in saga_ids:
            assert_published_in_order(after.for_key(saga_id))
