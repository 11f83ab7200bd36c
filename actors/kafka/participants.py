"""Kafka steps: a saga step carried out by a participant service over Kafka.

``kafka_step`` adds a step to a job whose run function

1. queues a :class:`~essential.actors.kafka.participant_protocol.ParticipantCommand` in the
   ``command_outbox`` (MongoDB) - the gateway relays it to the participant's
   topic - keyed by ``(saga, seq, "run")``, so a re-run after a crash finds
   the command it already queued and never sends a different one;
2. waits for the reply with the same ``(saga, seq)`` in the ``inbox``, where
   the gateway stores replies as they arrive - so a reply that came while the
   saga's actor was down is found when the saga resumes.

No reply by ``reply_timeout`` seconds after the command was queued fails the
step as *timed out*: its outcome is unknown (the participant may still apply
it), so the saga compensates it too, with a ``compensate`` command carrying the
same idempotency key.  A compensation waits ``compensate_timeout`` per attempt;
when every attempt goes unanswered the saga parks for an operator, the
command staying queued.  Queuing the compensation withdraws the step's command
if Kafka never took it (a long outage): the participant then gets only the
compensation, never an operation that is already being undone.  A reply with
``ok: false`` fails the step at once (a business failure: nothing was applied,
nothing to undo).

Step code reaches MongoDB like any service: ``essential.persistence.connection.shared_client``
with :func:`essential.actors.settings.get_settings`.
"""
from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from essential.actors.kafka.participant_protocol import Kind, ParticipantCommand
from essential.actors.settings import get_settings
from essential.actors.tracing import child as child_span
from essential.orchestration.dsl import Job, Predicate, RetryPolicy, Step, StepContext
from essential.orchestration.errors import StepFailed, StepTimeout
from essential.orchestration.states import Action
from essential.persistence import command_outbox
from essential.persistence.connection import shared_client
from essential.persistence.inbox import find_reply

#: extra seconds the runner allows a Kafka step beyond its reply timeout (queueing, a slow read)
STEP_MARGIN = 10.0
DEFAULT_RETRY = RetryPolicy(attempts=3, backoff=0.05, max_backoff=1.0)

Build = Callable[[StepContext[Any]], dict[str, Any]]
TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


def _db() -> AsyncDatabase:
    settings = get_settings()
    return shared_client(settings.mongodb_uri)[settings.database]


def _default_build(ctx: StepContext[Any]) -> dict[str, Any]:
    payload = ctx.payload
    return payload.model_dump(mode="json") if hasattr(payload, "model_dump") else dict(payload)


async def send_command(
    ctx: StepContext[Any], *, step: str, topic: str, kind: Kind, data: dict[str, Any], forward_result: Any = None
) -> dict[str, Any]:
    """Queue the command for ``(saga, seq, kind)`` (or find the one already queued); returns its row."""
    command = ParticipantCommand(
        id=command_outbox.command_id(ctx.saga_id, ctx.seq, kind),
        kind=kind,
        saga=ctx.saga_id,
        seq=ctx.seq,
        job=ctx.job,
        step=step,
        idempotency_key=ctx.idempotency_key,
        reply_topic=get_settings().kafka_reply_topic,
        data=data,
        forward_result=forward_result,
        correlation_id=ctx.correlation_id,
        # the saga's trace, a span of its own per command (stable across re-sends)
        traceparent=child_span(ctx.traceparent, f"{ctx.saga_id}:{ctx.seq}:{kind}"),
    )
    return await queue_command(command, topic)


async def queue_command(command: ParticipantCommand, topic: str, db: AsyncDatabase | None = None) -> dict[str, Any]:
    """Queue ``command`` for the gateway to relay to ``topic`` (once per ``(saga, seq, kind)``); returns its row.

    Shared by Kafka steps and by recorded sagas' remote undos, so both speak to participants the same way.
    """
    return await command_outbox.enqueue(
        db if db is not None else _db(),
        saga_id=command.saga,
        seq=command.seq,
        kind=command.kind,
        topic=topic,
        body=command.model_dump(mode="json", by_alias=True),
        headers={"correlation_id": command.correlation_id or "", "traceparent": command.traceparent or ""},
    )


async def wait_for_reply(
    saga_id: str, seq: int, kind: Kind, deadline: datetime, db: AsyncDatabase | None = None
) -> dict[str, Any] | None:
    """Poll the inbox until the reply is there (returned) or ``deadline`` passes (None)."""
    db = db if db is not None else _db()
    cap = get_settings().participant_poll_interval
    delay = 0.02
    while True:
        try:
            reply = await find_reply(db, saga_id, seq, kind)
        except PyMongoError:
            reply = None  # MongoDB away for a moment: keep waiting until the deadline
        if reply is not None:
            return reply
        remaining = (deadline - datetime.now(timezone.utc)).total_seconds()
        if remaining <= 0:
            return None
        await asyncio.sleep(min(delay, remaining))
        delay = min(delay * 1.5, cap)


def _outcome(reply: dict[str, Any], topic: str, what: str) -> dict[str, Any]:
    if not reply.get("ok"):
        raise StepFailed(f"{what} refused by the participant on {topic}: {reply.get('error') or 'no reason given'}")
    return reply.get("result") or {}


def kafka_step(
    job: Job[Any],
    *,
    name: str,
    bucket: str,
    topic: str,
    reply_timeout: float = 30.0,
    compensate_topic: str | None = None,
    compensable: bool = True,
    compensate_timeout: float | None = None,
    action: Action | str = Action.COMMAND,
    build: Build | None = None,
    retry: RetryPolicy | None = None,
    when: Predicate | None = None,
) -> Step:
    """Append to ``job`` a step carried out by the participant that consumes ``topic``.

    ``build(ctx)`` makes the command's ``data`` (default: the saga's payload).
    The compensation command goes to ``compensate_topic`` (default ``topic``);
    ``compensable=False`` declares a step with nothing to undo.
    """
    if reply_timeout <= 0:
        raise ValueError("reply_timeout must be positive")
    for t in (topic, compensate_topic):
        if t is not None and not TOPIC_NAME.match(t):
            raise ValueError(f"kafka_step {name!r}: {t!r} is not a valid Kafka topic name")
    undo_topic = compensate_topic or topic
    undo_timeout = compensate_timeout or reply_timeout
    make_data = build or _default_build

    async def run(ctx: StepContext[Any]) -> dict[str, Any]:
        row = await send_command(ctx, step=name, topic=topic, kind="run", data=make_data(ctx))
        # measured from when the command was first queued: a re-run does not extend it
        deadline = row["createdAt"].replace(tzinfo=timezone.utc) + timedelta(seconds=reply_timeout)
        reply = await wait_for_reply(ctx.saga_id, ctx.seq, "run", deadline)
        if reply is None:
            raise StepTimeout(f"no reply on {topic} within {reply_timeout:g}s")
        return _outcome(reply, topic, f"step {name}")

    step = job.step(
        bucket=bucket,
        action=action,
        name=name,
        retry=retry or DEFAULT_RETRY,
        timeout=max(reply_timeout, undo_timeout) + STEP_MARGIN,
        when=when,
    )(run)

    if compensable:

        async def compensate(ctx: StepContext[Any], result: Any) -> dict[str, Any]:
            await send_command(
                ctx, step=name, topic=undo_topic, kind="compensate", data=make_data(ctx), forward_result=result
            )
            deadline = datetime.now(timezone.utc) + timedelta(seconds=undo_timeout)
            reply = await wait_for_reply(ctx.saga_id, ctx.seq, "compensate", deadline)
            if reply is None:
                raise StepTimeout(f"no reply to the compensation on {undo_topic} within {undo_timeout:g}s")
            return _outcome(reply, undo_topic, f"compensation of step {name}")

        step.compensation(compensate)
    return step
