"""The payment service as a Kafka participant: ``python -m examples.participant_service``.

It consumes payment commands from its topic (default ``payments.commands``),
charges or refunds a wallet through :mod:`examples.services.wallet` - once per
idempotency key, so a redelivered or re-sent command changes nothing - and
replies on the command's ``reply_topic``.  Its offset is committed after the
reply is acknowledged, so a crash re-handles the command, to the same effect.

Command data (built by the saga's Kafka step)::

    {"customer": "alice", "amount": 1250, "memo": "order o-1",
     "silent": false, "reply_delay_ms": 0}

``silent`` and ``reply_delay_ms`` are demo/test knobs: the service drops the
charge without replying (a participant that never answers, so the saga's step
times out and compensates), or waits before charging.  A compensation
(``kind: compensate``) refunds what the charge with the same key took, or
records that there was nothing to refund.

Connection settings come from the usual ``ESSENTIAL_*`` variables.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pymongo.errors import PyMongoError

from essential import (
    ParticipantCommand,
    ParticipantReply,
    Settings,
    StepFailed,
    admin_kwargs,
    client_kwargs,
    consumer_kwargs,
    ensure_topics,
    get_settings,
)

from .services import wallet

log = logging.getLogger("examples.payments")

TOPIC = "payments.commands"
GROUP = "payments"
TRANSIENT_TRIES = 10


class PaymentData(BaseModel):
    model_config = ConfigDict(extra="ignore")

    customer: str = Field(min_length=1, description="the wallet charged")
    amount: int = Field(gt=0, description="cents")
    memo: str = ""
    silent: bool = Field(False, description="drop the charge without replying (the saga's step times out)")
    reply_delay_ms: int = Field(0, ge=0, le=600_000, description="wait before charging")


async def apply(command: ParticipantCommand) -> ParticipantReply | None:
    """Charge or refund once per idempotency key; None means: do not reply."""
    try:
        data = PaymentData.model_validate(command.data)
    except ValidationError as exc:
        return ParticipantReply.answering(command, ok=False, error=f"invalid payment command: {exc.errors()[:3]}")
    if command.kind == "compensate":
        result = await wallet.reverse(command.idempotency_key)
        return ParticipantReply.answering(command, ok=True, result=result)
    if data.silent:
        log.info("dropping %s without a reply (silent)", command.id)
        return None
    if data.reply_delay_ms:
        await asyncio.sleep(data.reply_delay_ms / 1000)
    try:
        result = await wallet.debit(command.idempotency_key, data.customer, data.amount, memo=data.memo)
    except StepFailed as exc:  # insufficient funds, unknown wallet: a business answer
        return ParticipantReply.answering(command, ok=False, error=str(exc))
    return ParticipantReply.answering(command, ok=True, result=result)


async def apply_with_retries(command: ParticipantCommand) -> ParticipantReply | None:
    """Transient failures (a write conflict, money spent meanwhile) are retried here, not by the saga."""
    for attempt in range(1, TRANSIENT_TRIES + 1):
        try:
            return await apply(command)
        except (wallet.FundsConflict, PyMongoError, OSError) as exc:
            if attempt == TRANSIENT_TRIES:
                return ParticipantReply.answering(command, ok=False, error=f"{type(exc).__name__}: {exc}")
            log.warning("%s: attempt %d failed (%s); retrying", command.id, attempt, exc)
            await asyncio.sleep(min(0.1 * 2**attempt, 5.0))
    return None  # not reached


async def handle(producer: AIOKafkaProducer, msg: ConsumerRecord) -> None:
    try:
        command = ParticipantCommand.model_validate_json(msg.value or b"")
    except ValidationError as exc:
        log.error("skipping unreadable command at offset %d: %s", msg.offset, exc.errors()[:3])
        return
    reply = await apply_with_retries(command)
    if reply is not None:
        await producer.send_and_wait(
            command.reply_topic, value=reply.to_bytes(), key=command.saga.encode(),
            headers=[(k, v) for k, v in (msg.headers or ()) if k in ("correlation_id", "traceparent")],
        )  # fmt: skip
    log.info("%s %s -> %s", command.kind, command.id, "no reply" if reply is None else reply.ok)


async def serve(settings: Settings, topic: str, group: str, ready: asyncio.Event | None = None) -> None:
    """Consume ``topic`` until cancelled."""
    await wallet.ensure_indexes()
    try:
        await ensure_topics(settings.kafka_bootstrap, [topic, settings.kafka_reply_topic],
                            partitions=settings.kafka_partitions, **admin_kwargs(settings))  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - the relay's first command creates it otherwise
        log.warning("could not create topics: %s", exc)
    consumer = AIOKafkaConsumer(topic, **consumer_kwargs(settings, group))
    producer = AIOKafkaProducer(**client_kwargs(settings), acks="all")
    await producer.start()
    await consumer.start()
    try:
        if ready is not None:
            ready.set()
        print(f"payment service ready: topic {topic}, group {group}", flush=True)
        while True:
            batches = await consumer.getmany(timeout_ms=500)
            for tp, msgs in batches.items():
                for msg in msgs:
                    await handle(producer, msg)
                await consumer.commit({tp: msgs[-1].offset + 1})
    finally:
        await consumer.stop()
        await producer.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.participant_service", description=__doc__.split("\n")[0])
    parser.add_argument("--topic", default=TOPIC, help=f"command topic (default {TOPIC})")
    parser.add_argument("--group", default=GROUP, help=f"consumer group (default {GROUP})")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stdout, format="%(asctime)s %(name)s %(message)s")

    async def run() -> None:
        task = asyncio.create_task(serve(get_settings(), args.topic, args.group))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            pass

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
