"""The gateway's pure parts, without servers: command parsing, publication waves, client options."""
from __future__ import annotations

import json

import pytest

from essential.actors.kafka.commands import AbortCommand, Rejection, StartCommand, parse_command
from essential.actors.kafka.config import bootstrap_is_loopback, producer_kwargs, use_idempotence, watch_restarts
from essential.actors.kafka.participant_protocol import ParticipantCommand, ParticipantReply
from essential.actors.kafka.relay import encode, plan_waves, traceparent_for
from essential.actors.settings import Settings

SAGA = "0123456789abcdef01234567"


@pytest.mark.parametrize(
    ("raw", "code", "says"),
    [
        (b"\xff\xfe", "not_json", "JSON"),
        (b"[1, 2]", "invalid_command", "JSON object"),
        (b'{"type": "launch"}', "invalid_command", "type"),
        (b'{"type": "start"}', "invalid_command", "job"),
        (b'{"type": "start", "job": "j", "schema": 2}', "invalid_command", "schema"),
        (b'{"type": "start", "job": "j", "ttl": -1}', "invalid_command", "ttl"),
        (b'{"type": "start", "job": "j", "extra": 1}', "invalid_command", "extra"),
        (b'{"type": "abort", "saga": "not-an-id"}', "invalid_command", "saga"),
        (b'{"type": "start", "job": "' + b"j" * 2000 + b'"}', "too_large", "2"),
        (b"", "not_json", "no value"),
        (None, "not_json", "no value"),
        (b'{"type": "start", "job": "j", "ttl": true}', "invalid_command", "ttl"),
        (b'{"type": "start", "job": "j", "ttl": NaN}', "invalid_command", "ttl"),
        (b'{"type": "start", "job": "j", "ttl": "60"}', "invalid_command", "ttl"),
        (b'{"type": "start", "job": "j", "ttl": 1e12}', "invalid_command", "ttl"),
        (b'{"type": "recorded.start", "ttl": true}', "invalid_command", "ttl"),
        (b'{"type": "start", "job": "j", "payload": ' + b"[" * 200 + b"]" * 200 + b"}", "too_deep", "nested"),
        (b'{"type": "start", "job": "j", "payload": {"a": ' + b"[" * 70 + b"]" * 70 + b"}}", "too_deep", "nested"),
        (b'{"type": "start", "job": "j", "payload": {"n": ' + b"1" * 5000 + b"}}", "not_storable", "digits"),
        (b'{"type": "start", "job": "j", "payload": {"n": 1180591620717411303424}}', "not_storable", "64 bits"),
        (b'{"type": "start", "job": "j", "payload": {"$where": "1"}}', "not_storable", "$where"),
        (b'{"type": "start", "job": "j", "payload": {"a\\u0000": 1}}', "not_storable", "NUL"),
        (b'{"type": "start", "job": "j", "payload": {"s": "\\udc80"}}', "not_storable", "surrogate"),
        (b'{"type": "signal", "saga": "0123456789abcdef01234567", "name": "n", "payload": {"$x": 1}}',
         "not_storable", "$x"),  # fmt: skip
    ],
)
def test_bad_commands_are_rejected_with_a_reason(raw: bytes | None, code: str, says: str) -> None:
    result = parse_command(raw, max_bytes=1024 if raw is None or len(raw) < 3000 else 64 * 1024)
    assert isinstance(result, Rejection) and result.code == code
    assert says in result.reason


def test_good_commands_parse() -> None:
    start = parse_command(json.dumps({"schema": 1, "type": "start", "job": "j", "payload": {"a": 1}}).encode(), 1024)
    assert isinstance(start, StartCommand) and start.payload == {"a": 1} and start.idempotency_key is None
    abort = parse_command(json.dumps({"type": "abort", "saga": SAGA}).encode(), 1024)
    assert isinstance(abort, AbortCommand) and abort.reason


def _row(saga: str, n: int, topic: str) -> dict:
    return {"_id": f"{saga}-{n}", "saga": saga, "key": saga, "n": n, "topic": topic,
            "body": {"id": f"{saga}-{n}", "type": topic, "schema": 1, "n": n}, "headers": {}}  # fmt: skip


def test_waves_never_put_two_topics_of_one_saga_in_flight() -> None:
    rows = [_row("A", 1, "started"), _row("B", 1, "started"), _row("A", 2, "stage"), _row("A", 3, "stage"),
            _row("B", 2, "stage"), _row("A", 4, "completed")]  # fmt: skip
    waves = plan_waves(reversed(rows))  # arrival order does not matter: n does
    # one row per saga per wave: not even two rows of one saga for the same topic are in flight at once
    # (without the idempotent producer a failed first one would be sent again after the second landed)
    assert [[(r["saga"], r["n"]) for r in w] for w in waves] == [
        [("A", 1), ("B", 1)], [("A", 2), ("B", 2)], [("A", 3)], [("A", 4)],
    ]  # fmt: skip
    for wave in waves:
        assert len({r["saga"] for r in wave}) == len(wave)


def test_messages_carry_event_id_and_trace_context() -> None:
    row = _row(SAGA, 1, "saga.started")
    row["headers"] = {"correlation_id": "c-1"}
    key, value, headers = encode(row)
    meta = {k: v.decode() for k, v in headers}
    assert key == SAGA.encode() and json.loads(value)["n"] == 1
    assert meta["event_id"] == f"{SAGA}-1" and meta["correlation_id"] == "c-1"
    assert meta["traceparent"] == traceparent_for(row)
    given = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    assert traceparent_for({**row, "headers": {"traceparent": given}}) == given
    other = traceparent_for({**row, "_id": "other"})
    assert other.split("-")[1] == meta["traceparent"].split("-")[1], "one trace per saga"
    assert other.split("-")[2] != meta["traceparent"].split("-")[2], "one span per message"


def test_idempotence_and_restart_watch_follow_the_broker() -> None:
    local = Settings(kafka_bootstrap="127.0.0.1:9092,localhost:9093")
    remote = Settings(kafka_bootstrap="kafka-1.prod:9092")
    assert bootstrap_is_loopback(local.kafka_bootstrap) and not bootstrap_is_loopback(remote.kafka_bootstrap)
    assert not use_idempotence(local) and use_idempotence(remote)
    assert use_idempotence(local.model_copy(update={"kafka_idempotence": True}))
    assert not use_idempotence(remote.model_copy(update={"kafka_acks": "1"})), "idempotence needs acks=all"
    assert watch_restarts(local) and not watch_restarts(remote)
    assert producer_kwargs(remote)["acks"] == "all" and producer_kwargs(Settings(kafka_acks=1))["acks"] == 1


def test_security_settings_pass_through() -> None:
    conf = Settings(kafka_bootstrap="k:9093", kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_mechanism="PLAIN",
                    kafka_sasl_plain_username="u", kafka_sasl_plain_password="p")  # fmt: skip
    kwargs = producer_kwargs(conf)
    assert kwargs["security_protocol"] == "SASL_PLAINTEXT"
    assert (kwargs["sasl_mechanism"], kwargs["sasl_plain_username"], kwargs["sasl_plain_password"]) == ("PLAIN", "u", "p")


def test_participant_reply_echoes_the_command() -> None:
    command = ParticipantCommand(id=f"{SAGA}:3:run", kind="run", saga=SAGA, seq=3, job="j", step="pay",
                                 idempotency_key=f"{SAGA}:3", reply_topic="saga.replies", data={"x": 1})  # fmt: skip
    reply = ParticipantReply.model_validate_json(ParticipantReply.answering(command, ok=True, result={}).to_bytes())
    assert (reply.saga, reply.seq, reply.kind, reply.idempotency_key) == (SAGA, 3, "run", f"{SAGA}:3")


def test_example_remote_job_registers() -> None:
    from essential.orchestration import JobRegistry

    job = JobRegistry.from_modules(["examples.remote_jobs"]).get("order:remote-fulfillment")
    assert [s.name for s in job.steps] == ["reserve_stock", "charge_wallet", "create_invoice", "send_confirmation"]


def test_deep_nesting_is_rejected_without_recursing() -> None:
    deep = b'{"type": "start", "job": "j", "payload": ' + b'{"a": ' * 10_000 + b"1" + b"}" * 10_000 + b"}"
    result = parse_command(deep, max_bytes=len(deep))
    assert isinstance(result, Rejection) and result.code == "too_deep", result


def test_failures_that_retrying_cannot_cure_are_told_apart_from_outages() -> None:
    from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError
    from bson.errors import InvalidDocument
    from pymongo.errors import (
        AutoReconnect,
        DuplicateKeyError,
        ServerSelectionTimeoutError,
    )
    from ray.exceptions import ActorDiedError, RayTaskError

    from essential.actors.kafka.failures import cause_of, describe, is_transient, permanent_code

    def remote(exc: BaseException) -> BaseException:  # how an actor's error reaches its caller
        return RayTaskError("Supervisor.start", "Traceback ...", exc).as_instanceof_cause()

    for transient in (AutoReconnect("down"), ServerSelectionTimeoutError("no primary"), KafkaConnectionError(),
                      ActorDiedError(), TimeoutError(), remote(AutoReconnect("down"))):  # fmt: skip
        assert is_transient(transient), transient
    for permanent in (remote(OverflowError("date value out of range")), remote(InvalidDocument("key 'a\x00'")),
                      MessageSizeTooLargeError(), DuplicateKeyError("dup"), RecursionError(), KeyError("x")):  # fmt: skip
        assert not is_transient(permanent), permanent
    assert isinstance(cause_of(remote(OverflowError("x"))), OverflowError)
    assert permanent_code(remote(OverflowError("date value out of range"))) == "not_storable"
    assert permanent_code(RecursionError()) == "too_deep"
    assert permanent_code(KeyError("x")) == "gateway_error"
    assert describe(remote(OverflowError("date value out of range"))) == "OverflowError: date value out of range"


def test_a_dead_letter_always_fits_the_producer_limit() -> None:
    from essential.actors.kafka.dlq import Source, build

    budget = 1024 * 1024 - 4096
    source = Source("saga.commands", 2, 17, 1, key=b"k" * 300_000, value=b"v" * 1_100_000,
                    headers=(("x-junk", b"h" * 100_000), ("correlation_id", b"c-1"), ("dlq.code", b"old")))  # fmt: skip
    letter = build(source, Rejection("too_large", "r" * 10_000), "gw", attempts=1, budget=budget)
    meta = dict(letter.headers)
    assert letter.size() <= budget
    assert meta["correlation_id"] == b"c-1", "small original headers are kept"
    assert "x-junk" not in meta and b"x-junk" in meta["dlq.dropped_headers"]
    assert b"1100000 bytes cut" in meta["dlq.truncated"] and letter.value == b"v" * len(letter.value)
    assert b"300000 bytes cut" in meta["dlq.key_truncated"]
    assert meta["dlq.code"] == b"too_large" and len(meta["dlq.reason"]) <= 2000, "the old dlq.* headers replaced"
    small = build(Source("t", 0, 1, 1, key=None, value=b"{}"), Rejection("x", "y"), "gw", attempts=3, budget=budget)
    assert small.value == b"{}" and dict(small.headers)["dlq.attempts"] == b"3"
