"""The Kafka boundary under hostile input: every bad message is dead-lettered at once with its reason,
nothing is accepted twice, and good input keeps flowing on every partition.

One deployment of its own (namespace, database, topics, consumer group), so what
is sent here never reaches another module's gateway.  Each bad message is
identified in the dead-letter topic by the ``dlq.partition`` / ``dlq.offset``
headers that point back at it; a probe start sent on every partition *after*
the bad ones is applied only once each bad message before it on its partition
was handled (a partition is consumed in order).
"""
from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import pytest
from aiokafka import AIOKafkaProducer

from essential.actors.kafka.gateway import ensure_gateway

from .conftest import poll
from .kafka_tools import Tap, headers, send_with_raw_header_key, stop_gateway

pytestmark = pytest.mark.asyncio

NAME = "hostile"
PARTITIONS = 4
MIB = 1024 * 1024
GATE_HEADER = "essential-gate"


async def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(fn, *args, **kwargs)


async def open_recorded(client: Any) -> Any:
    """A recorded saga, once a live-saga slot is free (the probes' sagas may hold them for a moment)."""
    from essential.orchestration.errors import TooManyOpenSagas

    async def opened() -> Any:
        try:
            return await call(client.recorded.start, 120)
        except TooManyOpenSagas:
            return None

    return await poll(opened, timeout=120, interval=0.5, what="a free slot for a recorded saga")


def command(**fields: Any) -> bytes:
    return json.dumps({"schema": 1, **fields}).encode()


def start(run: str, case: str, payload: Any = None, **fields: Any) -> bytes:
    return command(type="start", job="test:chain", payload={} if payload is None else payload,
                   correlation_id=f"{run}-{case}", **fields)  # fmt: skip


def nested(depth: int) -> bytes:
    return b'{"schema": 1, "type": "start", "job": "test:chain", "payload": ' + b'{"a": ' * depth + b"1" + b"}" * depth + b"}"


@dataclass
class Boundary:
    client: Any
    store: Any
    conf: Any
    gateway: Any
    producer: AIOKafkaProducer
    mongo: Any

    @property
    def db(self) -> Any:
        return self.mongo[self.conf.database]


@dataclass
class Bad:
    """A hostile message and what its dead letter must say."""

    case: str
    value: bytes | None
    code: str
    says: str
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    key: bytes | None = None
    raw_header_key: bytes | None = None  # sent with a header key that is not UTF-8


@pytest.fixture(scope="module")
async def producer(kafka: Any) -> AsyncIterator[AIOKafkaProducer]:
    p = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", max_request_size=4 * MIB)
    await p.start()
    yield p
    await p.stop()


@pytest.fixture(scope="module")
async def boundary(deployment: Any, settings: Any, producer: AIOKafkaProducer, mongo: Any) -> AsyncIterator[Boundary]:
    overrides = {
        "kafka_command_topic": f"{NAME}.commands", "kafka_dlq_topic": f"{NAME}.commands.dlq",
        "kafka_reply_topic": f"{NAME}.replies", "kafka_reply_dlq_topic": f"{NAME}.replies.dlq",
        "kafka_consumer_group": f"{NAME}-gateway", "kafka_partitions": PARTITIONS,
    }  # fmt: skip
    client, store = await deployment(NAME, **overrides)
    conf = settings.model_copy(update={"namespace": NAME, "database": NAME, **overrides})
    gateway = await call(ensure_gateway, conf)
    assert await gateway.ready.remote(120), "the gateway did not become ready"

    async def holds_every_partition() -> bool:
        return len((await gateway.stats.remote())["consumers"]["commands"]["partitions"]) == PARTITIONS

    await poll(holds_every_partition, timeout=120, what="the gateway to hold every command partition")
    yield Boundary(client, store, conf, gateway, producer, mongo)
    await call(stop_gateway, NAME)


async def send(b: Boundary, bad: Bad, partition: int) -> tuple[int, int]:
    """Send ``bad`` to ``partition``; returns where it landed (partition, offset)."""
    topic = b.conf.kafka_command_topic
    if bad.raw_header_key is not None:
        meta = await send_with_raw_header_key(b.producer, topic, partition, bad.value or b"", bad.raw_header_key,
                                              key=bad.key)  # fmt: skip
    else:
        meta = await b.producer.send_and_wait(topic, bad.value, key=bad.key, headers=bad.headers or None,
                                              partition=partition)  # fmt: skip
    return meta.partition, meta.offset


async def probe_every_partition(b: Boundary, run: str) -> None:
    """A good start on every partition, each applied exactly once (so every message before it was handled)."""
    for partition in range(PARTITIONS):
        await b.producer.send_and_wait(b.conf.kafka_command_topic, start(run, f"probe-{partition}"),
                                       partition=partition)  # fmt: skip

    async def applied() -> bool:
        found = [await b.db.sagas.count_documents({"correlation_id": f"{run}-probe-{p}"}) for p in range(PARTITIONS)]
        return all(n >= 1 for n in found)

    try:
        await poll(applied, timeout=90, what="a probe start applied on every partition after the bad messages")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; gateway stats {await b.gateway.stats.remote()}") from None
    for p in range(PARTITIONS):
        assert await b.db.sagas.count_documents({"correlation_id": f"{run}-probe-{p}"}) == 1, "a probe applied twice"


def assert_letter(letters: list[Any], bad: Bad, limit: int = MIB) -> dict[str, str]:
    """Exactly one dead letter, at once, that names the problem and fits a default Kafka request."""
    assert len(letters) == 1, f"{bad.case}: {len(letters)} dead letters, expected exactly one"
    letter = letters[0]
    meta = headers(letter)
    assert meta.get("dlq.code") == bad.code, f"{bad.case}: code {meta.get('dlq.code')!r}, reason {meta.get('dlq.reason')!r}"
    assert bad.says.lower() in meta["dlq.reason"].lower(), f"{bad.case}: reason {meta['dlq.reason']!r}"
    assert meta.get("dlq.attempts") == "1", f"{bad.case}: dead-lettered after {meta.get('dlq.attempts')} attempts"
    size = len(letter.key or b"") + len(letter.value or b"") + sum(len(k) + len(v or b"") for k, v in letter.headers)
    assert size < limit, f"{bad.case}: a dead letter of {size} bytes"
    if "dlq.truncated" not in meta and bad.raw_header_key is None:
        assert letter.value == bad.value, f"{bad.case}: the original bytes, unchanged"
    return meta


# --------------------------------------------------------------------------- one poison, all partitions
POISONS = ["ttl-1e12", "ttl-infinity", "ttl-inf-text", "nul-key-signal", "int-2**70-recorded-add",
           "huge-value-and-header", "non-utf8-header-key", "10000-deep"]  # fmt: skip


async def poison(b: Boundary, run: str, case: str) -> Bad:
    if case == "ttl-1e12":
        return Bad(case, start(run, case, ttl=1e12), "invalid_command", "ttl")
    if case == "ttl-infinity":
        return Bad(case, b'{"type": "start", "job": "test:chain", "ttl": Infinity}', "invalid_command", "ttl")
    if case == "ttl-inf-text":
        return Bad(case, start(run, case, ttl="inf"), "invalid_command", "ttl")
    if case == "nul-key-signal":
        value = command(type="signal", saga="a" * 24, name="go", payload={"a\u0000b": 1})
        return Bad(case, value, "not_storable", "NUL")
    if case == "int-2**70-recorded-add":
        saga = await open_recorded(b.client)
        value = command(type="recorded.add", saga=saga.id, bucket="shop.orders", action="FIND", res={"n": 2**70})
        return Bad(case, value, "not_storable", "64 bits")
    if case == "huge-value-and-header":
        return Bad(case, b"x" * 1_000_000, "too_large", "exceeds", headers=[("x-junk", b"h" * 100_000)])
    if case == "non-utf8-header-key":
        return Bad(case, start(run, case), "unreadable_record", "UTF-8", raw_header_key=b"\xff\xfe\xfd")
    assert case == "10000-deep"
    return Bad(case, nested(10_000), "too_deep", "nested")


@pytest.mark.parametrize("case", POISONS)
async def test_one_poison_message_is_dead_lettered_at_once_and_every_partition_keeps_flowing(
    boundary: Boundary, kafka: Any, case: str
) -> None:
    run = uuid.uuid4().hex[:8]
    bad = await poison(boundary, run, case)
    async with Tap(kafka.bootstrap, boundary.conf.kafka_dlq_topic) as dlq:
        partition, offset = await send(boundary, bad, partition=0)
        await probe_every_partition(boundary, run)
        letters = await poll(lambda: dlq.from_source(boundary.conf.kafka_command_topic, partition, offset),
                             timeout=60, what=f"the dead letter of {case}")  # fmt: skip
        assert_letter(letters, bad)
    assert await boundary.db.sagas.count_documents({"correlation_id": f"{run}-{case}"}) == 0, "a bad start accepted"


# --------------------------------------------------------------------------- every class of bad input
def every_bad_command(run: str, recorded_saga: str) -> list[Bad]:
    deep = nested(10_000)
    return [
        Bad("not-json", b"\x80not json at all{", "not_json", "JSON"),
        Bad("invalid-utf8", b'{"type": "start", "job": "\xff\xfe"}', "not_json", "JSON"),
        Bad("empty", b"", "not_json", "no value"),
        Bad("tombstone", None, "not_json", "no value", key=f"{run}-tombstone".encode()),
        Bad("array", b"[1, 2, 3]", "invalid_command", "JSON object"),
        Bad("number", b"42", "invalid_command", "JSON object"),
        Bad("missing-type", command(job="test:chain", correlation_id=f"{run}-missing-type"), "invalid_command", "type"),
        Bad("unknown-type", command(type="launch", job="test:chain"), "invalid_command", "type"),
        Bad("unknown-job", command(type="start", job="no:such-job", correlation_id=f"{run}-unknown-job"),
            "unknown_job", "no:such-job"),  # fmt: skip
        Bad("schema-2", start(run, "schema-2", schema=2), "invalid_command", "schema"),
        Bad("job-wrong-type", command(type="start", job=5), "invalid_command", "job"),
        Bad("payload-wrong-type", command(type="start", job="test:chain", payload="x"), "invalid_command", "payload"),
        Bad("payload-schema", start(run, "payload-schema", {"fail_times": -1}), "invalid_payload", "fail_times"),
        Bad("extra-field", start(run, "extra-field", debug=True), "invalid_command", "debug"),
        Bad("ttl-huge", start(run, "ttl-huge", ttl=1e12), "invalid_command", "ttl"),
        Bad("ttl-negative", start(run, "ttl-negative", ttl=-5), "invalid_command", "ttl"),
        Bad("ttl-boolean", start(run, "ttl-boolean", ttl=True), "invalid_command", "ttl"),
        Bad("ttl-infinity", b'{"type": "start", "job": "test:chain", "ttl": Infinity}', "invalid_command", "ttl"),
        Bad("ttl-nan", b'{"type": "start", "job": "test:chain", "ttl": NaN}', "invalid_command", "ttl"),
        Bad("ttl-inf-text", start(run, "ttl-inf-text", ttl="inf"), "invalid_command", "ttl"),
        Bad("recorded-ttl-boolean", command(type="recorded.start", ttl=True), "invalid_command", "ttl"),
        Bad("900kb", start(run, "900kb", {"tag": "x" * 900_000}), "too_large", "exceeds"),
        Bad("10000-deep", deep, "too_deep", "nested"),
        Bad("100-deep", start(run, "100-deep", json.loads(b'{"a": ' * 100 + b"1" + b"}" * 100)), "too_deep",
            "nested deeper"),  # fmt: skip
        Bad("5000-digits", b'{"type": "start", "job": "test:chain", "payload": {"n": ' + b"9" * 5000 + b"}}",
            "not_storable", "digits"),  # fmt: skip
        Bad("int-2**70", start(run, "int-2**70", {"n": 2**70}), "not_storable", "64 bits"),
        Bad("nul-key", start(run, "nul-key", {"a\u0000": 1}), "not_storable", "NUL"),
        Bad("lone-surrogate", b'{"type": "start", "job": "test:chain", "payload": {"s": "\\ud800"}}', "not_storable",
            "surrogate"),  # fmt: skip
        Bad("where-injection", start(run, "where-injection", {"$where": "sleep(100000)"}), "not_storable", "$where"),
        Bad("saga-operator", command(type="abort", saga={"$ne": None}), "invalid_command", "saga"),
        Bad("job-operator", command(type="start", job={"$gt": ""}), "invalid_command", "job"),
        Bad("recorded-where", command(type="recorded.add", saga=recorded_saga, bucket="shop.orders", action="FIND",
                                      req={"filter": {"$where": "sleep(100000)"}}), "not_storable", "$where"),  # fmt: skip
        Bad("recorded-bad-ejson", command(type="recorded.add", saga=recorded_saga, bucket="shop.orders",
                                          action="FIND", req={"_id": {"$oid": "not-an-object-id"}}),
            "invalid_command", "Extended JSON"),  # fmt: skip
        Bad("invalid-id", command(type="abort", saga="xyz"), "invalid_command", "saga"),
        Bad("invalid-recorded-id", command(type="recorded.start", ttl=60, id="ZZ"), "invalid_command", "id"),
        Bad("abort-unknown-saga", command(type="abort", saga="f" * 24), "saga_not_found", "f" * 24),
        Bad("signal-unknown-saga", command(type="signal", saga="e" * 24, name="go"), "saga_not_found", "e" * 24),
        Bad("add-unknown-saga", command(type="recorded.add", saga="d" * 24, bucket="shop.orders", action="FIND"),
            "saga_not_found", "d" * 24),  # fmt: skip
        Bad("commit-unknown-saga", command(type="commit", saga="c" * 24), "unsupported", "recorded sagas"),
        Bad("huge-correlation-header", command(type="start", job="test:chain"), "invalid_command", "correlation_id",
            headers=[("correlation_id", b"c" * 100_000)]),  # fmt: skip
        Bad("non-utf8-header-key", start(run, "non-utf8-header-key"), "unreadable_record", "UTF-8",
            raw_header_key=b"\xc3\x28"),  # fmt: skip
        Bad("huge-value-and-header", b"x" * 1_000_000, "too_large", "exceeds", headers=[("x-junk", b"h" * 100_000)]),
        Bad("huge-key", b"\x80bad", "not_json", "JSON", key=f"{run}-".encode() + b"k" * 300_000),
    ]


async def test_every_class_of_bad_command_is_dead_lettered_with_its_reason_and_good_ones_still_flow(
    boundary: Boundary, kafka: Any
) -> None:
    b = boundary
    run = uuid.uuid4().hex[:8]
    recorded = await open_recorded(b.client)
    bad = every_bad_command(run, recorded.id)
    key = f"{run}-dup"
    first = start(run, "dup", {"tag": "first"}, idempotency_key=key)
    same_again = start(run, "dup", {"tag": "first"}, idempotency_key=key)
    reused = Bad("key-reused", start(run, "dup", {"tag": "other"}, idempotency_key=key), "idempotency_key_reused", key)
    topic = b.conf.kafka_command_topic
    async with Tap(kafka.bootstrap, b.conf.kafka_dlq_topic) as dlq:
        where: dict[str, tuple[int, int]] = {}
        for i, item in enumerate(bad):
            where[item.case] = await send(b, item, partition=i % PARTITIONS)
        # the same key: the first start, a repeat of it (the same saga), another payload under it (refused)
        await b.producer.send_and_wait(topic, first, key=key.encode())
        repeat = await b.producer.send_and_wait(topic, same_again, key=key.encode())
        where[reused.case] = await send(b, reused, partition=repeat.partition)
        await probe_every_partition(b, run)

        cases = [*bad, reused]
        await poll(lambda: all(dlq.from_source(topic, *where[c.case]) for c in cases), timeout=90,
                   what="a dead letter for every bad command")  # fmt: skip
        problems = []
        for item in cases:
            try:
                assert_letter(dlq.from_source(topic, *where[item.case]), item)
            except AssertionError as exc:
                problems.append(str(exc))
        assert not problems, "\n".join(problems)
        repeats = dlq.from_source(topic, repeat.partition, repeat.offset)
        assert repeats == [], "a repeated start with the same key and payload is not an error"
        huge_key = dlq.from_source(topic, *where["huge-key"])[0]
        assert huge_key.key.startswith(f"{run}-".encode()) and len(huge_key.key) < 300_000
        assert "dlq.key_truncated" in headers(huge_key)
        huge = headers(dlq.from_source(topic, *where["huge-value-and-header"])[0])
        assert "dlq.truncated" in huge or "dlq.dropped_headers" in huge, huge

    sagas = [d async for d in b.db.sagas.find({"correlation_id": {"$regex": f"^{run}-"}})]
    by_correlation = sorted(d["correlation_id"] for d in sagas)
    assert by_correlation == sorted([f"{run}-dup", *(f"{run}-probe-{p}" for p in range(PARTITIONS))]), (
        "only the good starts were accepted, each once"
    )
    dup = next(d for d in sagas if d["correlation_id"] == f"{run}-dup")
    assert dup["payload"]["tag"] == "first"


async def test_bad_replies_are_dead_lettered_and_good_ones_are_stored(boundary: Boundary, kafka: Any) -> None:
    from bson import ObjectId

    from essential.persistence.outbox import utcnow

    b = boundary
    saga = str(ObjectId())
    # a command the relay already sent (as if a Kafka step had queued it): its reply is expected
    await b.db.command_outbox.insert_one({
        "_id": f"{saga}:1:run", "topic": f"{NAME}.participant", "key": saga, "saga": ObjectId(saga), "n": 1,
        "seq": 1, "kind": "run", "body": {}, "headers": {}, "createdAt": utcnow(), "sent_at": utcnow(),
    })  # fmt: skip

    def reply(**fields: Any) -> bytes:
        return json.dumps({"schema": 1, "saga": saga, "seq": 1, "kind": "run", "ok": True, **fields}).encode()

    bad = [
        Bad("reply-not-json", b"\x80{", "not_json", "JSON"),
        Bad("reply-invalid", reply(seq=0), "invalid_command", "seq"),
        Bad("reply-unknown-command", reply(seq=7), "unknown_command", f"{saga}:7:run"),
        Bad("reply-deep", b'{"saga": "' + saga.encode() + b'", "result": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
            "too_deep", "nested"),  # fmt: skip
        Bad("reply-result-not-storable", reply(result={"n": 2**70}), "not_storable", "64 bits"),
        Bad("reply-non-utf8-header-key", reply(), "unreadable_record", "UTF-8", raw_header_key=b"\xff"),
    ]
    topic = b.conf.kafka_reply_topic
    async with Tap(kafka.bootstrap, b.conf.kafka_reply_dlq_topic) as dlq:
        where = {}
        for i, item in enumerate(bad):
            if item.raw_header_key is not None:
                meta = await send_with_raw_header_key(b.producer, topic, i % PARTITIONS, item.value or b"",
                                                      item.raw_header_key)  # fmt: skip
            else:
                meta = await b.producer.send_and_wait(topic, item.value, partition=i % PARTITIONS)
            where[item.case] = (meta.partition, meta.offset)
        await b.producer.send_and_wait(topic, reply(result={"charged": 1}), partition=0)
        stored = await poll(lambda: b.db.inbox.find_one({"_id": f"{saga}:1:run"}), timeout=60,
                            what="the good reply stored")  # fmt: skip
        assert stored["result"] == {"charged": 1}
        await poll(lambda: all(dlq.from_source(topic, *where[c.case]) for c in bad), timeout=60,
                   what="a dead letter for every bad reply")  # fmt: skip
        for item in bad:
            assert_letter(dlq.from_source(topic, *where[item.case]), item)
    assert await b.db.inbox.count_documents({"saga": saga}) == 1, "only the reply to a command that was sent"


# --------------------------------------------------------------------------- transient failures: bounded
async def test_a_transient_failure_is_retried_for_a_bounded_time_then_dead_lettered_as_given_up(
    ray_session: Any, settings: Any, kafka: Any, producer: AIOKafkaProducer
) -> None:
    """The supervisor cannot reach its database (a port where nothing listens): every start fails
    transiently.  Each command is retried for ``kafka_retry_seconds``, then dead-lettered saying why,
    and the partition moves on to the next one."""
    from essential.actors.client.ray_client import get_supervisor, stop_deployment
    from essential.actors.dev.mongodb import free_port

    name = "hostile_outage"
    overrides = {
        "namespace": name, "database": name,
        "kafka_command_topic": f"{name}.commands", "kafka_dlq_topic": f"{name}.commands.dlq",
        "kafka_reply_topic": f"{name}.replies", "kafka_reply_dlq_topic": f"{name}.replies.dlq",
        "kafka_consumer_group": f"{name}-gateway", "kafka_retry_seconds": 4.0, "kafka_handler_timeout": 2.0,
    }  # fmt: skip
    conf = settings.model_copy(update=overrides)
    cut_off = conf.model_copy(update={"mongodb_uri": f"mongodb://127.0.0.1:{free_port()}/?serverSelectionTimeoutMS=60000"})
    await call(get_supervisor, cut_off)  # the gateway finds this supervisor by name and calls it
    try:
        gateway = await call(ensure_gateway, conf)
        assert await gateway.ready.remote(120), "the gateway did not become ready"
        run = uuid.uuid4().hex[:8]
        async with Tap(kafka.bootstrap, conf.kafka_dlq_topic) as dlq:
            sent = [await producer.send_and_wait(conf.kafka_command_topic, start(run, f"c{i}"), partition=0)
                    for i in range(2)]  # fmt: skip
            for meta in sent:
                letters = await poll(lambda m=meta: dlq.from_source(conf.kafka_command_topic, 0, m.offset),
                                     timeout=90, what="the command given up and dead-lettered")  # fmt: skip
                assert len(letters) == 1
                meta_headers = headers(letters[0])
                assert meta_headers["dlq.code"] == "gave_up", meta_headers
                assert "gave up after" in meta_headers["dlq.reason"], meta_headers["dlq.reason"]
                assert "Timeout" in meta_headers["dlq.reason"], "the last error says why"
                assert int(meta_headers["dlq.attempts"]) >= 2, "retried before giving up"
                assert letters[0].value == start(run, f"c{sent.index(meta)}"), "the command as sent, to replay"
    finally:
        await call(stop_deployment, name)
