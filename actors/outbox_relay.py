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
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import InvalidTopicError, MessageSizeTooLargeError, RecordTooLargeError

from persistence.outbox import OutboxQueue

from .broker_watch import BrokerWatch
from .kafka_consumer import backoff

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


async def publish_in_waves(
    producer: AIOKafkaProducer, rows: list[Row], acked: list[Any], refused: dict[Any, str]
) -> None:
    """Publish ``rows`` wave by wave, appending each acknowledged row id to ``acked``; raise on failure.

    A row Kafka can never take (:data:`REFUSED`) goes to ``refused`` instead of
    failing the batch: one bad row must not stop every saga's events.
    """
    for wave in plan_waves(rows):
        sent: list[tuple[Row, asyncio.Future[Any]]] = []
        error: BaseException | None = None
        for row in wave:
            try:
                key, value, headers = encode(row)
                sent.append((row, await producer.send(row["topic"], value=value, key=key, headers=headers)))
            except REFUSED as exc:
                refused[row["_id"]] = f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # noqa: BLE001 - gather what was sent, then report
                error = exc
                break
        results = await asyncio.gather(*(future for _, future in sent), return_exceptions=True)
        for (row, _), result in zip(sent, results):
            if isinstance(result, REFUSED):
                refused[row["_id"]] = f"{type(result).__name__}: {result}"
            elif isinstance(result, BaseException):
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

    async def relay_once(self) -> int:
        """Publish the next batch and mark what Kafka acknowledged; returns the rows taken."""
        generation = self.watch.generation if self.watch else 0
        started = time.perf_counter()
        rows = await self.queue.next_batch(self.batch_size)
        read = time.perf_counter()
        self.seconds["read"] += read - started
        if not rows:
            return 0
        acked: list[Any] = []
        refused: dict[Any, str] = {}
        try:
            # bounded inside the lease, so no standby gateway takes over while this batch is in flight
            await asyncio.wait_for(
                publish_in_waves(self.producer, rows, acked, refused), timeout=self.lease * 0.75
            )
        finally:
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
