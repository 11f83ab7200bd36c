"""Read-only views for operators (``essential list / inspect / stats / tail``), straight from MongoDB.

Why not through the supervisor: these views must answer when Ray is down or
busy - that is when an operator needs them - and they only read.  Writes
(start, abort, resume) still go through the supervisor.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any

from pymongo import ASCENDING, DESCENDING
from pymongo.asynchronous.database import AsyncDatabase

from essential.orchestration.errors import SagaNotFound
from essential.orchestration.models import Saga, Stage
from essential.orchestration.states import Action, SagaState
from essential.persistence.documents import oid, saga_from_doc, stage_from_doc, state_and_job

ACTIVE = [SagaState.RUNNING.value, SagaState.COMPENSATING.value, SagaState.COMMITTING.value]
ENDED = [SagaState.COMPLETED.value, SagaState.ABORTED.value, SagaState.PARKED.value]


def _utc(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


def _ms(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round((_utc(end) - _utc(start)).total_seconds() * 1000, 3)  # type: ignore[operator]


def timeline(saga: Saga, stages: list[Stage]) -> list[dict[str, Any]]:
    """Stages in order, each with its offset from the saga's start, duration, retries, errors and undo links."""
    undone_by = {s.compensates: s.seq for s in stages if s.action == Action.COMPENSATE and s.compensates}
    by_seq = {s.seq: s for s in stages}
    rows = []
    for s in stages:
        row = {
            "seq": s.seq,
            "step": s.step,
            "bucket": s.bucket,
            "action": s.action.value,
            "status": s.status.value,
            "started_at": _utc(s.started_at).isoformat() if s.started_at else None,
            "finished_at": _utc(s.finished_at).isoformat() if s.finished_at else None,
            "offset_ms": _ms(saga.createdAt, s.started_at),
            "duration_ms": s.meta.duration_ms,
            "retries": s.meta.retry_count,
            "errors": list(s.meta.errors),
            "compensates": s.compensates,
            "compensates_step": by_seq[s.compensates].step if s.compensates in by_seq else None,
            "compensated_by": undone_by.get(s.seq),
            "idempotency_key": s.meta.idempotency_key,
        }
        rows.append(row)
    return rows


class SagaViews:
    """Queries behind the CLI's read-only views, on one Essential database."""

    def __init__(self, db: AsyncDatabase) -> None:
        self.db = db
        self.sagas = db["sagas"]
        self.stages_col = db["stages"]
        self.outbox = db["outbox"]

    # -- sagas ----------------------------------------------------------------------------
    async def list(
        self,
        *,
        state: str | None = None,
        job: str | None = None,
        since: datetime | None = None,
        limit: int = 20,
    ) -> list[Saga]:
        """Newest first; ``since`` keeps sagas created at or after it."""
        query = state_and_job(state, job)
        if since is not None:
            query["createdAt"] = {"$gte": since}
        cursor = self.sagas.find(query).sort("createdAt", DESCENDING).limit(max(limit, 0))
        return [saga for saga in [_readable(d) async for d in cursor] if saga is not None]

    async def saga(self, saga_id: str) -> Saga:
        try:
            key = oid(saga_id)
        except Exception:
            raise SagaNotFound(str(saga_id)) from None
        doc = await self.sagas.find_one({"_id": key})
        if doc is None:
            raise SagaNotFound(saga_id)
        return saga_from_doc(doc)

    async def stages(self, saga_id: str) -> list[Stage]:
        cursor = self.stages_col.find({"saga": oid(saga_id)}).sort("seq", ASCENDING)
        return [stage_from_doc(d) async for d in cursor]

    async def inspect(self, saga_id: str) -> dict[str, Any]:
        """The saga, where it runs, its stages and their timeline (what ``essential inspect`` prints)."""
        saga = await self.saga(saga_id)
        stages = await self.stages(saga_id)
        end = saga.committed_at or saga.aborted_at or (saga.updatedAt if saga.state in (SagaState.PARKED,) else None)
        return {
            "saga": saga.model_dump(mode="json"),
            "where": saga.lease.owner,
            "epoch": saga.lease.epoch,
            "duration_ms": _ms(saga.createdAt, end),
            "stages": [s.model_dump(mode="json") for s in stages],
            "timeline": timeline(saga, stages),
            "events": await self.events(saga=saga_id, limit=1000),
        }

    # -- events (the outbox) -----------------------------------------------------------------
    async def events(
        self, *, saga: str | None = None, job: str | None = None, since: datetime | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Lifecycle events as published (the outbox rows' bodies), oldest first."""
        query: dict[str, Any] = {}
        if saga is not None:
            query["saga"] = oid(saga)
        if job is not None:
            query["body.job"] = job
        if since is not None:
            query["createdAt"] = {"$gte": since}
        if saga is not None:
            cursor = self.outbox.find(query).sort("n", ASCENDING).limit(limit)
            return [event_of(d) async for d in cursor]
        cursor = self.outbox.find(query).sort([("createdAt", DESCENDING), ("n", DESCENDING)]).limit(limit)
        return list(reversed([event_of(d) async for d in cursor]))

    async def follow(
        self,
        *,
        saga: str | None = None,
        job: str | None = None,
        since: datetime | None = None,
        poll: float = 0.5,
    ) -> AsyncIterator[dict[str, Any]]:
        """Events as they are written: a change stream on the outbox (history from ``since`` first).

        The stream is opened before the history is read, so nothing falls in
        between; events seen in both are given once.
        """
        pipeline = [{"$match": {"operationType": "insert"}}]
        stream = await self.outbox.watch(pipeline)
        seen: set[Any] = set()
        try:
            if since is not None:
                for event in await self.events(saga=saga, job=job, since=since, limit=10_000):
                    seen.add(event["id"])
                    yield event
            while True:
                change = await stream.try_next()
                if change is None:
                    await asyncio.sleep(poll)
                    continue
                event = event_of(change.get("fullDocument") or {})
                if event["id"] in seen:
                    continue
                if saga is not None and event.get("saga") != saga:
                    continue
                if job is not None and event.get("job") != job:
                    continue
                yield event
        finally:
            await stream.close()

    # -- stats ------------------------------------------------------------------------------
    async def stats(self, *, minutes: int = 15, now: datetime | None = None) -> dict[str, Any]:
        """Counts by job and state, throughput per minute, the oldest running saga, parked sagas."""
        now = now or datetime.now(timezone.utc)
        since = now - timedelta(minutes=minutes)
        by_job: dict[str, dict[str, int]] = {}
        grouped = await self.sagas.aggregate([{"$group": {"_id": {"job": "$job", "state": "$state"}, "n": {"$sum": 1}}}])
        async for row in grouped:
            by_job.setdefault(row["_id"]["job"], {})[row["_id"]["state"]] = int(row["n"])
        totals: dict[str, int] = {}
        for states in by_job.values():
            for state, n in states.items():
                totals[state] = totals.get(state, 0) + n

        per_minute = [{"minute": (since + timedelta(minutes=i)).isoformat(), "started": 0, "finished": 0}
                      for i in range(minutes)]  # fmt: skip
        for field, key, match in (
            ("createdAt", "started", {}),
            ("updatedAt", "finished", {"state": {"$in": ENDED}}),
        ):
            pipeline = [
                {"$match": {**match, field: {"$gte": since}}},
                {"$group": {"_id": {"$floor": {"$divide": [{"$subtract": [f"${field}", since]}, 60000]}},
                            "n": {"$sum": 1}}},
            ]  # fmt: skip
            async for row in await self.sagas.aggregate(pipeline):
                index = int(row["_id"])
                if 0 <= index < minutes:
                    per_minute[index][key] += int(row["n"])
        finished = sum(m["finished"] for m in per_minute)
        started = sum(m["started"] for m in per_minute)

        oldest_doc = await self.sagas.find_one({"state": {"$in": ACTIVE}}, sort=[("createdAt", ASCENDING)])
        oldest = None
        saga = _readable(oldest_doc) if oldest_doc is not None else None
        if saga is not None:
            oldest = {"id": saga.id, "job": saga.job, "state": saga.state.value,
                      "createdAt": saga.createdAt.isoformat(), "age_s": round((now - _utc(saga.createdAt)).total_seconds(), 1),
                      "where": saga.lease.owner}  # fmt: skip
        parked = [
            {"id": s.id, "job": s.job, "reason": s.parked_reason, "since": s.updatedAt.isoformat(),
             "parked_from": s.parked_from.value if s.parked_from else None}
            for s in [_readable(d) async for d in
                      self.sagas.find({"state": SagaState.PARKED.value}).sort("updatedAt", ASCENDING).limit(50)]
            if s is not None
        ]  # fmt: skip
        unsent = await self.outbox.count_documents({"sent_at": None, "refused_at": None, "withdrawn_at": None})
        return {
            "at": now.isoformat(),
            "by_job": dict(sorted(by_job.items())),
            "totals": totals,
            "window_minutes": minutes,
            "throughput": {
                "started": started,
                "finished": finished,
                "started_per_min": round(started / minutes, 2) if minutes else 0.0,
                "finished_per_min": round(finished / minutes, 2) if minutes else 0.0,
                "per_minute": per_minute,
            },
            "oldest_running": oldest,
            "parked": parked,
            "parked_count": totals.get(SagaState.PARKED.value, 0),
            "outbox_unsent": unsent,
            "quarantined": await self.db["quarantine"].count_documents({}),
        }


def _readable(doc: dict[str, Any]) -> Saga | None:
    """A view reads only: a document that does not validate is left out (the supervisor quarantines it)."""
    try:
        return saga_from_doc(doc)
    except Exception:  # noqa: BLE001 - any way a document fails to read
        return None


def event_of(row: dict[str, Any]) -> dict[str, Any]:
    """An outbox row as the event consumers receive (its JSON body), plus when it was sent."""
    body = dict(row.get("body") or {})
    body.setdefault("id", str(row.get("_id")))
    body.setdefault("type", row.get("topic"))
    body.setdefault("saga", str(row.get("saga")) if row.get("saga") is not None else None)
    sent = row.get("sent_at")
    body["sent_at"] = _utc(sent).isoformat() if isinstance(sent, datetime) else None
    return body
