"""The outbox relay: publishes outbox rows to Kafka, marking each sent only after Kafka acknowledged it.

Delivery is at least once: a row is published, acknowledged, then marked; a
crash between the last two publishes it again (consumers de-duplicate by the
event id in the body and the ``event_id`` header).

Per-saga order: a saga's rows are published in ``n`` order and keyed by saga
id (one partition per topic).  A batch is published in *waves*: each wave
holds at most one row of each saga, and the next wave is sent only once the
previous one is acknowledged.  So row ``n + 1`` of a saga is handed to Kafka
only after Kafka acknowledged row ``n`` (or refused it for good), whatever
topics they go to.  Why not a saga's consecutive rows for one topic at once:
without the idempotent producer (the dev broker rejects it) a batch that fails
is not retried by Kafka in place; the relay sends it again later, after the
row behind it may have landed - the saga's events out of order.

A round that gives up waiting (the lease's deadline) leaves its rows in the
producer; a saga with such a row still unresolved sends nothing more until
Kafka answers for it, so a late acknowledgement cannot overtake a resend.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidTopicError,
    MessageSizeTooLargeError,
    RecordTooLargeError,
)

from essential.actors.kafka.broker_watch import BrokerWatch
from essential.actors.kafka.consumer import backoff
from essential.persistence.outbox import OutboxQueue

log = logging.getLogger("essential.gateway.relay")

Row = dict[str, Any]
#: errors that mean Kafka will never take this message, however often it is sent
REFUSED = (MessageSizeTooLargeError, RecordTooLargeError, InvalidTopicError)
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
    """Split a batch so that no saga has two rows in flight at once: wave ``i`` is the ``i``-th row,
    in ``n`` order, of every saga."""
    by_saga: dict[Any, list[Row]] = {}
    for row in rows:
        by_saga.setdefault(row["saga"], []).append(row)
    ordered = [sorted(saga_rows, key=lambda r: r["n"]) for saga_rows in by_saga.values()]
    depth = max((len(saga_rows) for saga_rows in ordered), default=0)
    return [[saga_rows[i] for saga_rows in ordered if i < len(saga_rows)] for i in range(depth)]


InFlight = dict[Any, tuple[Any, "asyncio.Future[Any]"]]


async def publish_in_waves(
    producer: AIOKafkaProducer,
    rows: list[Row],
    acked: list[Any],
    refused: dict[Any, str],
    in_flight: InFlight | None = None,
) -> None:
    """Publish ``rows`` wave by wave, appending each acknowledged row id to ``acked``; raise on failure.

    A row Kafka can never take (:data:`REFUSED`) goes to ``refused`` instead of
    failing the batch: one bad row must not stop every saga's events.  While a
    row waits for Kafka it is in ``in_flight`` (saga -> row id, future); if this
    coroutine is cancelled, what is still there stays unresolved for the caller.
    """
    in_flight = {} if in_flight is None else in_flight
    for wave in plan_waves(rows):
        sent: list[tuple[Row, asyncio.Future[Any]]] = []
        error: BaseException | None = None
        for row in wave:
            try:
                key, value, headers = encode(row)
                future = await producer.send(row["topic"], value=value, key=key, headers=headers)
            except REFUSED as exc:
                refused[row["_id"]] = f"{type(exc).__name__}: {exc}"
                continue
            except Exception as exc:  # noqa: BLE001 - wait for what was sent, then report
                error = exc
                break
            in_flight[row["saga"]] = (row["_id"], future)
            sent.append((row, future))
        if sent:
            await asyncio.wait([future for _, future in sent])  # never cancels the futures themselves
        for row, future in sent:
            in_flight.pop(row["saga"], None)
            result = future.exception()
            if isinstance(result, REFUSED):
                refused[row["_id"]] = f"{type(result).__name__}: {result}"
            elif result is not None:
                error = error or result
            else:
                acked.append(row["_id"])
        if error is not None:
            raise error


class Relay:
    """Relays one outbox collection until cancelled, while it holds the collection's relay lease."""

    def __init__(
        self,
        queue: OutboxQueue,
        producer: AIOKafkaProducer,
        *,
        name: str,
        batch_size: int,
        lease: float,
        poll_interval: float,
        watch: BrokerWatch | None = None,
        before_resume: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.queue = queue
        self.watch = watch
        self.before_resume = before_resume
        self.producer = producer
        self.name = name
        self.batch_size = batch_size
        self.lease = lease
        self.poll_interval = poll_interval
        self.active = False  # holds the lease (another gateway relays otherwise)
        self.counts: Counter[str] = Counter()
        self.seconds: Counter[str] = Counter()  # time spent reading, publishing, marking: where a round goes
        self.last_error: str | None = None
        self._wake = asyncio.Event()
        #: rows handed to Kafka by a round that stopped waiting for them: saga -> (row id, future)
        self.in_flight: InFlight = {}
        self._flight_generation: dict[Any, int] = {}  # the broker generation each of those was sent in

    def wake(self) -> None:
        """Look at the outbox now instead of after the idle pause."""
        self._wake.set()

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                if failures and self.before_resume is not None:
                    # after an outage, publish nothing until the broker is known to have kept its log
                    # (or its loss was handled): rows sent to a restarted dev broker could vanish
                    await self.before_resume()
                self.active = await self.queue.hold(self.lease)
                published = await self.relay_once() if self.active else 0
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
                await self._pause(self.poll_interval if self.active else min(self.lease / 4, 5.0))

    async def _pause(self, seconds: float) -> None:
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def _settle(self) -> None:
        """Mark the late acknowledgements of earlier rounds; forget rows Kafka failed (they are sent again)."""
        late = [(saga, row_id, future) for saga, (row_id, future) in self.in_flight.items() if future.done()]
        current = self.watch.generation if self.watch else 0
        acked = []
        for saga, row_id, future in late:
            del self.in_flight[saga]
            same_log = self._flight_generation.pop(saga, current) == current  # else the broker lost it meanwhile
            if same_log and not future.cancelled() and future.exception() is None:
                acked.append(row_id)
        if acked:
            self.counts["published"] += await self.queue.mark_sent(acked)

    async def relay_once(self) -> int:
        """Publish the next batch and mark what Kafka acknowledged; returns the rows taken."""
        generation = self.watch.generation if self.watch else 0
        started = time.perf_counter()
        await self._settle()
        rows = await self.queue.next_batch(self.batch_size)
        read = time.perf_counter()
        self.seconds["read"] += read - started
        rows = [row for row in rows if row["saga"] not in self.in_flight]  # one row per saga in flight
        if not rows:
            return 0
        acked: list[Any] = []
        refused: dict[Any, str] = {}
        try:
            # bounded inside the lease, so no standby gateway takes over while this batch is in flight
            await asyncio.wait_for(
                publish_in_waves(self.producer, rows, acked, refused, self.in_flight), timeout=self.lease * 0.75
            )
        finally:
            for saga in self.in_flight:
                self._flight_generation.setdefault(saga, generation)
            if refused:
                log.error("%s: Kafka refused %d row(s) for good; set aside: %s", self.name, len(refused),
                          "; ".join(f"{k}: {v}" for k, v in list(refused.items())[:5]))  # fmt: skip
                await self.queue.mark_refused(refused)
                self.counts["refused"] += len(refused)
            published = time.perf_counter()
            if self.watch is not None and self.watch.generation != generation:
                acked = []  # the broker lost its log meanwhile: these acknowledgements prove nothing
            await self.queue.mark_sent(acked)
            self.counts["published"] += len(acked)
            self.seconds["publish"] += published - read
            self.seconds["mark"] += time.perf_counter() - published
        self.counts["batches"] += 1
        return len(rows)
