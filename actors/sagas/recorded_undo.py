"""Undoing a recorded stage where its bucket lives: in a database, or by its owning service over Kafka.

A local bucket's inverse is applied in the transaction that records the compensate
stage (done and marked done together).  A remote bucket's compensation is a
participant command (``kind: compensate``) queued in ``command_outbox``; the gateway
relays it to the owning service's topic and stores the reply in the ``inbox``, where
this waits for it.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

from bson import json_util
from bson.json_util import CANONICAL_JSON_OPTIONS

from essential.actors.kafka.participant_protocol import ParticipantCommand
from essential.actors.kafka.participants import queue_command, wait_for_reply
from essential.actors.settings import Settings
from essential.orchestration.errors import EssentialError
from essential.orchestration.models import Event, Saga, Stage
from essential.orchestration.ports import Undone
from essential.orchestration.recorded import RECORDED, BucketRoute, Inverse, holds_a_deployment
from essential.persistence import command_outbox
from essential.persistence.documents import stage_to_doc
from essential.persistence.recorded_store import RecordedStore, json_safe

log = logging.getLogger("essential.recorded")

#: attempts at a local undo that fails (a MongoDB error that is not transient) before the saga parks
UNDO_ATTEMPTS = 3


class RecordedUndoer:
    """Implements :class:`~essential.orchestration.ports.RecordedUndo` on MongoDB and Kafka."""

    def __init__(self, store: RecordedStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings

    async def refusal(self, route: BucketRoute) -> str | None:
        if not route.database:
            return None
        refused = holds_a_deployment(route.database, await self.store.collection_names(route.database))
        return refused.fields[0][1] if refused is not None else None

    async def undo(
        self, saga: Saga, epoch: int, forward: Mapping[str, Any], stage: Stage, route: BucketRoute, inverse: Inverse,
        event: Event,
    ) -> Undone:  # fmt: skip
        doc = stage_to_doc(stage)
        doc.update(kind=RECORDED, op="compensate")
        fseq = int(forward["seq"])
        if route.remote:
            doc["meta"]["remote"] = route.remote
            ok, outcome = await self._remote(saga, forward, route.remote, inverse)
            if not ok:
                return Undone(False, reason=f": {outcome}")
            doc["res"] = json_safe(outcome)
            await self.store.record_compensation(saga.id, epoch, fseq, doc, event)
            return Undone(True, doc["res"])
        delay = 0.2
        for attempt in range(1, UNDO_ATTEMPTS + 1):
            try:
                return Undone(True, await self.store.undo_local(saga.id, epoch, fseq, doc, route, inverse, event))
            except (EssentialError, asyncio.CancelledError):
                raise
            except Exception as exc:  # e.g. a unique index refusing a re-inserted document
                log.warning("saga %s: undo of stage %d failed (attempt %d): %s", saga.id, fseq, attempt, exc)
                if attempt == UNDO_ATTEMPTS:
                    return Undone(False, reason=f" failed: {type(exc).__name__}: {exc}")
                await asyncio.sleep(delay)
                delay *= 2
        raise AssertionError("not reached")

    async def _remote(self, saga: Saga, forward: Mapping[str, Any], topic: str, inverse: Inverse) -> tuple[bool, Any]:
        """Send the compensation to the bucket's owning service and wait for its confirmation."""
        conf = self.settings
        fseq = int(forward["seq"])
        db = self.store.store.db
        command = ParticipantCommand(
            id=command_outbox.command_id(saga.id, fseq, "compensate"),
            kind="compensate",
            saga=saga.id,
            seq=fseq,
            job=saga.job,
            step=str(forward.get("step") or forward.get("op")),
            idempotency_key=f"{saga.id}:{fseq}",
            reply_topic=conf.kafka_reply_topic,
            data={
                "bucket": forward["bucket"],
                "action": forward.get("action"),
                "op": forward.get("op"),
                "inverse": json_safe(inverse.to_doc(), dates=True),
                # the same inverse with exact BSON types: bson.json_util.loads(data["inverse_ejson"])
                "inverse_ejson": json_util.dumps(inverse.to_doc(), json_options=CANONICAL_JSON_OPTIONS),
            },
            forward_result=json_safe({"req": forward.get("req"), "res": forward.get("res")}, dates=True),
            correlation_id=saga.correlation_id,
            traceparent=saga.traceparent,
        )
        await queue_command(command, topic, db)
        deadline = datetime.now(timezone.utc) + timedelta(seconds=conf.recorded_remote_timeout)
        reply = await wait_for_reply(saga.id, fseq, "compensate", deadline, db)
        if reply is None:
            return False, (
                f"no confirmation from the service on {topic} within {conf.recorded_remote_timeout:g}s; "
                f"the command stays queued - resume the saga (essential resume {saga.id}) once the service is back"
            )
        if not reply.get("ok"):
            return False, f"the service on {topic} refused it: {reply.get('error') or 'no reason given'}"
        return True, reply.get("result") or {"ok": True}
