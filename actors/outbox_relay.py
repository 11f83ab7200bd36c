"""The outbox relay: publishes outbox rows to Kafka, marking each sent only after Kafka acknowledged it.

Delivery is at least once: a row is published, acknowledged, then marked; a
crash between the last two publishes it again (consumers de-duplicate by the
event id in the body and the ``event_id`` header).

Per-saga order: a saga's rows are published in ``n`` order and keyed by saga
id (one partition per topic).  Since one saga's events go to several topics,
a batch is published in *waves*: each wave holds, for every saga, its next run
of rows bound for one topic, and the next wave is sent only once the previous
one is acknowledged.  So event ``n + 1`` of a saga never reaches Kafka before
event ``n`` has, whatever topics they go to.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaProducer

from persistence.outbox import OutboxQueue

from .kafka_consumer import backoff

log = logging.getLogger("essential.gateway.relay")

Row = dict[str, Any]
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def traceparent_for(row: Row) -> str:
    """The row's W3C trace context: the saga's own when it has one, else one derived from the saga.

    Derived contexts share a trace id per saga (every event of a saga lands in
    one trace) and give each message its own span id.
    """
    given = (row.get("headers") or {}).get("traceparent")
    if given and _TRACEPARENT.match(given):
        return given
    trace_id = hashlib.sha256(f"saga:{row['key']}".encode()).hexdigest()[:32]
    span_id = hashlib.sha256(f"msg:{row['_id']}".encode()).hexdigest()[:16]
    return f"00-{trace_id}-{span_id}-01"


def encode(row: Row) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """Key, JSON value and headers of a row's Kafka message."""
    body = row["body"]
    value = json.dumps(body, separators=(",", ":"), default=_json_default).encode()
    headers = {
        "content-type": "application/json",
        "event_id": str(body.get("id") or row["_id"]),
        "event_type": str(body.get("type") or row["topic"]),
        "schema": str(body.get("schema", 1)),
        "correlation_id": (row.get("headers") or {}).get("correlation_id"),
        "traceparent": traceparent_for(row),
    }
    return str(row["key"]).encode(), value, [(k, v.encode()) for k, v in headers.items() if v]


def plan_waves(rows: Iterable[Row]) -> list[list[Row]]:
    """Split a batch so that no saga has rows for two different topics in flight at once.

    Each saga's rows, in ``n`` order, are cut into runs bound for one topic;
    wave ``i`` is the ``i``-th run of every saga.
    """
    by_saga: dict[Any, list[Row]] = {}
    for row in rows:
        by_saga.setdefault(row["saga"], []).append(row)
    runs: list[list[list[Row]]] = []
    for saga_rows in by_saga.values():
        saga_runs: list[list[Row]] = []
        for row in sorted(saga_rows, key=lambda r: r["n"]):
            if saga_runs and saga_runs[-1][-1]["topic"] == row["topic"]:
                saga_runs[-1].append(row)
            else:
                saga_runs.append([row])
        runs.append(saga_runs)
    depth = max((len(saga_runs) for saga_runs in runs), default=0)
    return [[row for saga_runs in runs if i < len(saga_runs) for row in saga_runs[i]] for i in range(depth)]


async def publish_in_waves(producer: AIOKafkaProducer, rows: list[Row], acked: list[Any]) -> None:
    """Publish ``rows`` wave by wave, appending each acknowledged row id to ``acked``; raise on failure."""
    for wave in plan_waves(rows):
        sent: list[tuple[Row, asyncio.Future[Any]]] = []
        error: BaseException | None = None
        try:
            for row in wave:
                key, value, headers = encode(row)
                sent.append((row, await producer.send(row["topic"], value=value, key=key, headers=headers)))
        except Exception as exc:  # noqa: BLE001 - gather what was sent, then report
            error = exc
        results = await asyncio.gather(*(future for _, future in sent), return_exceptions=True)
        for (row, _), result in zip(sent, results):
            if isinstance(result, BaseException):
                error = error or result
            else:
                acked.append(row["_id"])
        if error is not None:
            raise error


class Relay:
    """Relays one outbox collection until cancelled."""

    def __init__(
        self,
        queue: OutboxQueue,
        producer: AIOKafkaProducer,
        *,
        name: str,
        batch_size: int,
        lease: float,
        poll_interval: float,
    ) -> None:
        self.queue = queue
        self.producer = producer
        self.name = name
        self.batch_size = batch_size
        self.lease = lease
        self.poll_interval = poll_interval
        self.counts: Counter[str] = Counter()
        self.last_error: str | None = None
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Look at the outbox now instead of after the idle pause."""
        self._wake.set()

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                published = await self.relay_once()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Kafka or MongoDB away: back off, the rows stay unsent
                failures += 1
                self.counts["failures"] += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("%s: relay round failed (%s); retrying", self.name, self.last_error)
                await asyncio.sleep(backoff(failures, base=0.2))
                continue
            if published == 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self.poll_interval)
                except asyncio.TimeoutError:
                    pass

    async def relay_once(self) -> int:
        """Claim a batch, publish it, mark what Kafka acknowledged; returns the rows claimed."""
        rows = await self.queue.claim(self.batch_size, self.lease)
        if not rows:
            return 0
        acked: list[Any] = []
        try:
            # bounded well inside the lease, so no other gateway takes the batch over meanwhile
            await asyncio.wait_for(publish_in_waves(self.producer, rows, acked), timeout=self.lease * 0.75)
        finally:
            await self.queue.mark_sent(acked)
            self.counts["published"] += len(acked)
            done = set(acked)
            await self.queue.release(r["_id"] for r in rows if r["_id"] not in done)
        self.counts["batches"] += 1
        return len(rows)
