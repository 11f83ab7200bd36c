"""Did every lifecycle event the outbox marked sent really reach Kafka?  A consumer's view.

Why a consumer and not just the outbox: a row is marked sent when the broker acknowledged
it, but the dev broker keeps its log in memory, so a broker killed after acknowledging
loses what no consumer had read yet; the gateway is meant to notice (a canary offset that
went back) and publish those rows again.  Only a reader of the topics can tell.

Two readers: one follows the event topics for the whole soak (what it saw before the
broker was killed counts), and a final sweep reads every topic of the restarted broker
from the beginning to its end.  An event id neither of them saw is an acknowledged event
lost.
"""
from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from essential.actors.kafka.config import client_kwargs
from essential.actors.settings import Settings
from essential.orchestration.states import EventType

TOPICS = [e.value for e in EventType]
#: seconds without any partition moving after which the sweep gives up (records the broker cannot serve)
STALL = 10.0


class EventCollector:
    def __init__(self, settings: Settings, say: Callable[[str], None]) -> None:
        self.settings = settings
        self.say = say
        self.seen: Counter = Counter()  # event id -> times read (re-publication makes some 2)
        self.restarts = 0

    def _consumer(self) -> AIOKafkaConsumer:
        options = client_kwargs(self.settings)
        return AIOKafkaConsumer(**options, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
                                metadata_max_age_ms=2000)  # fmt: skip

    async def _assign_all(self, consumer: AIOKafkaConsumer) -> list[TopicPartition]:
        await consumer._client.force_metadata_update()
        partitions = [TopicPartition(t, p) for t in TOPICS for p in sorted(consumer.partitions_for_topic(t) or [])]
        if partitions:
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
        return partitions

    def _record(self, batches: dict[Any, list[Any]]) -> int:
        count = 0
        for records in batches.values():
            for record in records:
                try:
                    self.seen[str(json.loads(record.value)["id"])] += 1
                    count += 1
                except (ValueError, KeyError, TypeError):
                    continue
        return count

    async def follow(self) -> None:
        """Read the event topics until cancelled; a consumer that fails is replaced (and reads from the start)."""
        while True:
            consumer = self._consumer()
            try:
                await asyncio.wait_for(consumer.start(), 10)
                partitions: list[TopicPartition] = []
                while True:
                    if len(partitions) < len(TOPICS) * self.settings.kafka_partitions:
                        partitions = await self._assign_all(consumer)  # until the gateway has made every topic
                    if not partitions:
                        await asyncio.sleep(1.0)
                        continue
                    self._record(await consumer.getmany(timeout_ms=500, max_records=2000))
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the broker went away: start over on the new one
                self.restarts += 1
                await asyncio.sleep(1.0)
            finally:
                await _quietly(consumer.stop())

    async def sweep(self, timeout: float = 45.0) -> dict[str, Any]:
        """Read every event topic from the beginning to its current end, once; per partition, where it got."""
        consumer = self._consumer()
        read = 0
        try:
            await asyncio.wait_for(consumer.start(), 15)
            partitions = await self._assign_all(consumer)
            begins = await consumer.beginning_offsets(partitions)
            ends = await consumer.end_offsets(partitions)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            positions: dict[TopicPartition, int] = {}
            progress_at = loop.time()
            while loop.time() < deadline and loop.time() - progress_at < STALL:
                now = {tp: await consumer.position(tp) for tp in partitions}
                if now != positions:
                    positions, progress_at = now, loop.time()
                if all(positions[tp] >= ends[tp] for tp in partitions):
                    break
                read += self._record(await consumer.getmany(timeout_ms=500, max_records=5000))
            short = {f"{tp.topic}/{tp.partition}": {"begin": begins[tp], "end": ends[tp], "reached": positions.get(tp)}
                     for tp in partitions if positions.get(tp, 0) < ends[tp]}  # fmt: skip
            return {"partitions": len(partitions), "read": read, "complete": not short, "not_reached": short}
        except Exception as exc:  # noqa: BLE001 - reported: the check is then inconclusive
            return {"error": f"{type(exc).__name__}: {exc}", "read": read, "complete": False}
        finally:
            await _quietly(consumer.stop())


async def command_topic(settings: Settings, keys: set[str], timeout: float = 30.0) -> dict[str, Any]:
    """For Kafka starts that never became sagas: are they on the command topic, where, and has the
    gateway's consumer group committed past them?  Tells "the broker lost it" from "nobody consumed it"."""
    options = client_kwargs(settings)
    reader = AIOKafkaConsumer(**options, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest")
    group = AIOKafkaConsumer(**options, group_id=settings.kafka_consumer_group, enable_auto_commit=False)
    report: dict[str, Any] = {"found": {}, "partitions": {}}
    try:
        await asyncio.wait_for(reader.start(), 15)
        await asyncio.wait_for(group.start(), 15)
        topic = settings.kafka_command_topic
        await reader._client.force_metadata_update()
        partitions = [TopicPartition(topic, p) for p in sorted(reader.partitions_for_topic(topic) or [])]
        reader.assign(partitions)
        await reader.seek_to_beginning(*partitions)
        begins, ends = await reader.beginning_offsets(partitions), await reader.end_offsets(partitions)
        loop = asyncio.get_running_loop()
        deadline, progress_at, positions = loop.time() + timeout, loop.time(), {}
        while loop.time() < deadline and loop.time() - progress_at < STALL:
            now = {tp: await reader.position(tp) for tp in partitions}
            if now != positions:
                positions, progress_at = now, loop.time()
            if all(positions[tp] >= ends[tp] for tp in partitions):
                break
            for tp, records in (await reader.getmany(timeout_ms=500, max_records=5000)).items():
                for record in records:
                    key = (record.key or b"").decode(errors="replace")
                    if key in keys:
                        report["found"].setdefault(key, []).append({"partition": tp.partition, "offset": record.offset})
        for tp in partitions:
            committed = await group.committed(tp)
            report["partitions"][tp.partition] = {"begin": begins[tp], "end": ends[tp], "read_to": positions.get(tp),
                                                  "group_committed": committed}  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - a diagnostic: report what failed
        report["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        await _quietly(reader.stop())
        await _quietly(group.stop())
    return report


async def check(db: Any, collector: EventCollector, sweep: dict[str, Any]) -> dict[str, Any]:
    """Rows the outbox marked sent whose event no reader saw on Kafka."""
    rows = {str(r["_id"]): r async for r in db["outbox"].find({"sent_at": {"$ne": None}}, {"body": 0, "headers": 0})}
    missing = [rows[i] for i in rows if i not in collector.seen]
    by_topic = Counter(r["topic"] for r in missing)
    return {
        "sent_rows": len(rows), "seen_events": len(collector.seen), "missing": len(missing),
        "missing_by_topic": dict(by_topic), "follower_restarts": collector.restarts, "sweep": sweep,
        "missing_rows": [{"id": str(r["_id"]), "topic": r["topic"], "saga": str(r["saga"]), "n": r["n"],
                          "createdAt": _iso(r.get("createdAt")), "sent_at": _iso(r.get("sent_at"))}
                         for r in sorted(missing, key=lambda r: r["sent_at"])[:60]],
    }  # fmt: skip


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


async def _quietly(coro: Any) -> None:
    try:
        await asyncio.wait_for(coro, 5)
    except Exception:  # noqa: BLE001, S110 - closing a consumer of a dead broker
        pass
