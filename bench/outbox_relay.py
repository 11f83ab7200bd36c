"""Outbox relay throughput: events per second from MongoDB's outbox to acknowledged Kafka messages.

    python -m bench.outbox_relay [--events 10000] [--sagas 1000] [--batches 100,500,1000]

For each relay batch size: the ``outbox`` is filled with ``--events`` lifecycle
events (``--sagas`` sagas, events spread evenly, rows as the saga store writes
them), then the gateway's relay (:class:`essential.actors.kafka.gateway.GatewayService` without
its consumers, in this process) starts, and the clock runs until every row is
marked sent (Kafka acknowledged it) and until an independent consumer has read
every event.  Embedded MongoDB (``--sync-on-commit``, as in tests) and the
embedded broker run as their own processes; nothing else shares them.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TOPICS = ["saga.started", "saga.stage.completed", "saga.completed"]


@dataclass
class RelayRun:
    batch: int
    events: int
    sagas: int
    marked_s: float
    consumed_s: float
    events_per_s_marked: float
    events_per_s_consumed: float
    duplicates: int
    read_share: float
    publish_share: float
    mark_share: float


def outbox_rows(events: int, sagas: int) -> list[dict[str, Any]]:
    """Rows exactly as the saga store writes them: started, stage.completed ..., completed per saga."""
    from essential.orchestration.models import Event, new_id
    from essential.orchestration.states import EventType, SagaState
    from essential.persistence.documents import event_to_doc
    from essential.persistence.outbox import utcnow

    per_saga = max(events // sagas, 2)
    base = utcnow()
    rows: list[dict[str, Any]] = []
    for s in range(sagas):
        saga_id = new_id()
        for n in range(1, per_saga + 1):
            kind = EventType.STAGE_COMPLETED
            if n in (1, per_saga):
                kind = EventType.STARTED if n == 1 else EventType.COMPLETED
            event = Event(type=kind, saga=saga_id, job="bench:relay", state=SagaState.RUNNING,
                          at=base + timedelta(milliseconds=s * per_saga + n), correlation_id=f"bench-{s}",
                          data={"seq": n, "step": f"step{n}", "bucket": "bench.items", "status": "succeeded"})  # fmt: skip
            rows.append(event_to_doc(event, n))
    return rows


async def count_consumed(bootstrap: str, expected: set[str], done: asyncio.Event) -> int:
    """Read the event topics until every expected event id was seen; returns the duplicates read."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(*TOPICS, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                                metadata_max_age_ms=1000, max_partition_fetch_bytes=8 * 1024 * 1024)  # fmt: skip
    await consumer.start()
    seen: set[str] = set()
    duplicates = 0
    try:
        while not expected <= seen:
            for msgs in (await consumer.getmany(timeout_ms=200, max_records=5000)).values():
                for msg in msgs:
                    event_id = dict(msg.headers)["event_id"].decode()
                    if event_id in expected:
                        duplicates += event_id in seen
                        seen.add(event_id)
        done.set()
        return duplicates
    finally:
        await consumer.stop()


async def run_once(uri: str, bootstrap: str, events: int, sagas: int, batch: int) -> RelayRun:
    from essential.actors.kafka.gateway import GatewayService
    from essential.actors.settings import Settings
    from essential.persistence.connection import close_shared_clients, shared_client

    database = f"bench_relay_{batch}"
    settings = Settings(mongodb_uri=uri, kafka_bootstrap=bootstrap, database=database, relay_batch_size=batch,
                        kafka_partitions=4)  # fmt: skip
    db = shared_client(uri)[database]
    await db.drop_collection("outbox")
    rows = outbox_rows(events, sagas)
    for i in range(0, len(rows), 5000):
        await db.outbox.insert_many(rows[i : i + 5000])
    expected = {str(r["_id"]) for r in rows}

    service = GatewayService(settings, owner=f"bench-{batch}", consumers=False)
    consumed = asyncio.Event()
    consumer = asyncio.create_task(count_consumed(bootstrap, expected, consumed))
    worker = asyncio.create_task(service.run())
    await service.ready.wait()
    started = time.perf_counter()
    marked_s = None
    while marked_s is None or not consumed.is_set():
        if marked_s is None and await db.outbox.count_documents({"sent_at": None}) == 0:
            marked_s = time.perf_counter() - started
        await asyncio.sleep(0.02)
    consumed_s = time.perf_counter() - started
    duplicates = await consumer
    spent = service.relays["events"].seconds
    total = sum(spent.values()) or 1.0
    shares = [round(spent[k] / total, 3) for k in ("read", "publish", "mark")]
    worker.cancel()
    await asyncio.gather(worker, return_exceptions=True)
    await shared_client(uri).drop_database(database)
    await close_shared_clients()
    n = len(rows)
    return RelayRun(batch, n, sagas, round(marked_s, 3), round(consumed_s, 3), round(n / marked_s, 1),
                    round(n / consumed_s, 1), duplicates, *shares)  # fmt: skip


def report(runs: list[RelayRun], out_dir: Path) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    table = Table("batch", "events", "sagas", "all marked sent s", "events/s (marked)", "all consumed s",
                  "events/s (consumed)", "dup.", "read / publish / mark",
                  title="Outbox relay: MongoDB outbox -> Kafka (acks=all)")  # fmt: skip
    for r in runs:
        split = f"{r.read_share:.0%} / {r.publish_share:.0%} / {r.mark_share:.0%}"
        table.add_row(str(r.batch), str(r.events), str(r.sagas), f"{r.marked_s:.2f}", f"{r.events_per_s_marked:,.0f}",
                      f"{r.consumed_s:.2f}", f"{r.events_per_s_consumed:,.0f}", str(r.duplicates), split)  # fmt: skip
    Console(width=140).print(table)
    record = {
        "bench": "outbox_relay",
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "runs": [asdict(r) for r in runs],
        "best_events_per_s": max(r.events_per_s_marked for r in runs),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"outbox_relay_{time.strftime('%Y%m%d_%H%M%S')}.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record))
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.outbox_relay", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--sagas", type=int, default=1_000, help="events are spread evenly over this many sagas")
    parser.add_argument("--batches", default="100,500,1000", help="relay batch sizes to measure")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)

    from essential.actors.dev.kafka_broker import EmbeddedKafka
    from essential.actors.dev.mongodb import EmbeddedMongo

    runs: list[RelayRun] = []
    with tempfile.TemporaryDirectory(prefix="essential-relay-bench-") as tmp:
        with EmbeddedMongo(Path(tmp) / "db", log_dir=tmp) as mongo:
            for batch in (int(b) for b in args.batches.split(",")):
                with EmbeddedKafka(log_dir=tmp) as kafka:  # a fresh (empty) broker per run
                    runs.append(asyncio.run(run_once(mongo.uri, kafka.bootstrap, args.events, args.sagas, batch)))
    report(runs, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
