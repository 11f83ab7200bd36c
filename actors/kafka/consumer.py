"""A consumer loop that no single message can stop: at-least-once handling, one lane per partition.

Each assigned partition has a *lane* of its own: its messages are handled in
order (a saga's commands are keyed to one partition), lanes run concurrently,
and the fetch loop keeps fetching for every lane while one is busy; a lane
that falls behind is paused (and resumed) so memory stays bounded.  An offset
is committed only after its message was handled.

A message whose handling fails:

* for a reason that retrying cannot cure (a value MongoDB refuses, a bug) is
  handed at once to ``on_poison``, which dead-letters it with the reason;
* transiently (MongoDB, Ray or Kafka away; an attempt past
  ``kafka_handler_timeout``) is retried with back-off for
  ``kafka_retry_seconds``, then handed to ``on_poison`` as given up.

A record the Kafka client cannot even decode (a header key that is not UTF-8)
makes the whole fetch fail; the loop then finds the partition and offset,
hands them to ``on_unreadable`` and skips the record, instead of failing on it
for ever.  Dead-lettering itself is retried while Kafka is away (the message
must not be skipped unrecorded).  If the consumer itself fails (the broker went
away for long), it is recreated.
"""
from __future__ import annotations

import asyncio
import functools
import logging
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord, TopicPartition

from essential.actors.kafka.config import consumer_kwargs
from essential.actors.kafka.failures import describe, is_transient
from essential.actors.settings import Settings

log = logging.getLogger("essential.kafka")


@dataclass(frozen=True)
class Failed:
    """What ``on_poison`` is told: the last error, and whether retries of a transient one ran out."""

    error: BaseException
    attempts: int
    seconds: float
    gave_up: bool


@dataclass(frozen=True)
class Unreadable:
    """A record the client could not decode: where it is, and why."""

    topic: str
    partition: int
    offset: int
    error: BaseException


Handler = Callable[[ConsumerRecord], Awaitable[None]]
PoisonHandler = Callable[[ConsumerRecord, Failed], Awaitable[None]]
UnreadableHandler = Callable[[Unreadable], Awaitable[None]]

MAX_RECORDS = 200  # records per fetch
LANE_RECORDS = 200  # a lane holding this many waiting records is paused
LANE_BYTES = 8 * 1024 * 1024  # ... or this many bytes
COMMIT_EVERY = 50  # a busy lane commits at least this often
PROBE_MS = 1000  # how long a probe for an undecodable record waits for a partition's records
POSITION_CHECK_S = 5.0  # how often positions are compared with the ends of the partitions' logs
STALL_CHECKS = 2  # checks in a row without progress, records waiting on the broker: the fetcher is wedged


def backoff(attempt: int, base: float = 0.1, cap: float = 5.0) -> float:
    return min(base * 2 ** max(attempt - 1, 0), cap)


def _size(item: ConsumerRecord | Unreadable) -> int:
    if isinstance(item, Unreadable):
        return 0
    return len(item.value or b"") + len(item.key or b"")


class StalledFetch(KafkaError):
    """The client stopped fetching a partition that has records: the consumer must be recreated."""


@dataclass(eq=False)
class _Lane:
    tp: TopicPartition
    queue: deque = field(default_factory=deque)
    bytes: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None
    next_offset: int | None = None  # after the last record handed to this lane
    done: int | None = None  # offset to commit: every record before it was handled
    committed: int | None = None
    since_commit: int = 0
    paused: bool = False


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, loop: "ConsumerLoop") -> None:
        self.loop = loop

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.loop._drop(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        pass


class ConsumerLoop:
    def __init__(
        self,
        settings: Settings,
        *,
        topic: str,
        group: str,
        handler: Handler,
        on_poison: PoisonHandler,
        on_unreadable: UnreadableHandler,
        name: str,
    ) -> None:
        self.settings = settings
        self.topic = topic
        self.group = group
        self.handler = handler
        self.on_poison = on_poison
        self.on_unreadable = on_unreadable
        self.name = name
        self.retry_seconds = settings.kafka_retry_seconds
        self.attempt_timeout = settings.kafka_handler_timeout
        self.restarts = 0
        self.retries = 0
        self.counts: Counter[str] = Counter()
        self._consumer: AIOKafkaConsumer | None = None
        self._lanes: dict[TopicPartition, _Lane] = {}

    # -- the fetch loop ---------------------------------------------------------------------
    async def run(self) -> None:
        """Consume until cancelled, recreating the consumer after failures."""
        attempt = 0
        while True:
            consumer = AIOKafkaConsumer(**consumer_kwargs(self.settings, self.group))
            consumer.subscribe([self.topic], listener=_Rebalance(self))
            self._consumer = consumer
            try:
                await consumer.start()
                attempt = 0
                await self._fetch(consumer)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep consuming: recreate the consumer
                attempt += 1
                self.restarts += 1
                log.warning("%s: consumer of %s failed (%s); recreating", self.name, self.topic, describe(exc))
                await asyncio.sleep(backoff(attempt))
            finally:
                await self._drop(set(self._lanes), commit=False)
                try:  # bounded: a consumer wedged after a broker restart may never finish stopping
                    await asyncio.wait_for(consumer.stop(), self.settings.kafka_request_timeout)
                except Exception as exc:  # noqa: BLE001 - stopping a broken consumer
                    log.warning("%s: the old consumer did not stop cleanly (%s)", self.name, describe(exc))

    async def _fetch(self, consumer: AIOKafkaConsumer) -> None:
        """Fetch records, with the positions watched beside (a check waiting for a broker must
        never hold up the records); whichever fails first ends both, and the consumer is recreated."""
        tasks = [asyncio.create_task(self._fetch_records(consumer), name=f"{self.name}-fetch"),
                 asyncio.create_task(self._watch_positions(consumer), name=f"{self.name}-positions")]  # fmt: skip
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _watch_positions(self, consumer: AIOKafkaConsumer) -> None:
        """Every few seconds, compare each partition's position with the end of its log.

        Past the end: the broker lost its log (the dev broker restarts empty) and answers a
        fetch there with nothing, taking the old position as a commit: every message sent
        after the restart would be skipped for ever, so the partition is read again from its
        start (repeats are applied once anyway: the command log, idempotency keys).
        Behind the end with no progress over two checks while its lane waits for nothing:
        the client's fetcher is wedged (seen after a broker restart), so the consumer is
        recreated (:class:`StalledFetch`)."""
        behind: dict[TopicPartition, tuple[int, int]] = {}  # partition -> (position, checks without progress)
        while True:
            await asyncio.sleep(POSITION_CHECK_S)
            for tp in list(consumer.assignment()):
                try:  # one partition at a time: one the broker does not know yet must not hide the others
                    position, end = await asyncio.wait_for(self._position_and_end(consumer, tp),
                                                           self.settings.kafka_request_timeout)  # fmt: skip
                except (KafkaError, asyncio.TimeoutError) as exc:  # the broker is away: the next round looks again
                    log.debug("%s: position check of %s failed: %s", self.name, tp, describe(exc))
                    continue
                if end is None:
                    continue
                if position > end:
                    log.warning("%s: %s is at offset %d past the log's end %d (the broker lost its log); "
                                "reading it again from the start", self.name, tp, position, end)  # fmt: skip
                    await consumer.seek_to_beginning(tp)
                    lane = self._lanes.get(tp)
                    if lane is not None:
                        lane.committed = None  # the next commit must go through, even if lower
                    behind.pop(tp, None)
                    continue
                lane = self._lanes.get(tp)
                if position == end or (lane is not None and (lane.paused or lane.queue)):
                    behind.pop(tp, None)
                    continue
                last, checks = behind.get(tp, (-1, 0))
                checks = checks + 1 if last == position else 0
                behind[tp] = (position, checks)
                if checks >= STALL_CHECKS:
                    raise StalledFetch(f"{tp} stayed at offset {position} below the log's end {end} "
                                       f"for {checks * POSITION_CHECK_S:g}s with nothing waiting")  # fmt: skip

    @staticmethod
    async def _position_and_end(consumer: AIOKafkaConsumer, tp: TopicPartition) -> tuple[int, int | None]:
        end = (await consumer.end_offsets([tp])).get(tp)
        return await consumer.position(tp), end

    async def _fetch_records(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=500, max_records=MAX_RECORDS)
            except KafkaError:
                raise
            except Exception as exc:  # a record the client cannot decode: find it, skip it
                await self._isolate(consumer, exc)
                continue
            for tp, msgs in batches.items():
                if msgs:
                    self._dispatch(consumer, tp, msgs)

    def assignment(self) -> list[int]:
        """Partitions this consumer holds now (empty while the group rebalances)."""
        consumer = self._consumer
        try:
            return sorted(tp.partition for tp in consumer.assignment()) if consumer is not None else []
        except Exception:  # noqa: BLE001 - a consumer being recreated
            return []

    def lanes(self) -> dict[int, int]:
        """Records waiting per partition (a lane retrying a message shows its backlog here)."""
        return {tp.partition: len(lane.queue) for tp, lane in self._lanes.items()}

    def offsets(self) -> dict[int, dict[str, int | None]]:
        """Per partition: the offset after the last record fetched, and the last one committed."""
        return {tp.partition: {"fetched": lane.next_offset, "committed": lane.committed}
                for tp, lane in self._lanes.items()}  # fmt: skip

    # -- lanes ------------------------------------------------------------------------------
    def _lane(self, consumer: AIOKafkaConsumer, tp: TopicPartition) -> _Lane:
        lane = self._lanes.get(tp)
        if lane is None:
            lane = self._lanes[tp] = _Lane(tp)
            lane.task = asyncio.create_task(self._work(consumer, lane), name=f"{self.name}:{tp.partition}")
        return lane

    def _dispatch(self, consumer: AIOKafkaConsumer, tp: TopicPartition, items: list) -> None:
        lane = self._lane(consumer, tp)
        for item in items:
            lane.queue.append(item)
            lane.bytes += _size(item)
        last = items[-1]
        lane.next_offset = last.offset + 1
        lane.wake.set()
        if not lane.paused and (len(lane.queue) >= LANE_RECORDS or lane.bytes >= LANE_BYTES):
            consumer.pause(tp)
            lane.paused = True

    async def _work(self, consumer: AIOKafkaConsumer, lane: _Lane) -> None:
        while True:
            while not lane.queue:
                await self._commit(consumer, lane)
                if not lane.queue:  # records may have come while committing: never wait past them
                    lane.wake.clear()
                    await lane.wake.wait()
            item = lane.queue[0]
            await self._process(consumer, lane, item)
            lane.queue.popleft()
            lane.bytes -= _size(item)
            lane.done = item.offset + 1
            lane.since_commit += 1
            if lane.since_commit >= COMMIT_EVERY:
                await self._commit(consumer, lane)
            if lane.paused and len(lane.queue) <= LANE_RECORDS // 2 and lane.bytes <= LANE_BYTES // 2:
                try:
                    consumer.resume(lane.tp)
                except Exception:  # noqa: BLE001 - revoked meanwhile: the lane is being dropped
                    pass
                lane.paused = False

    async def _commit(self, consumer: AIOKafkaConsumer, lane: _Lane) -> None:
        if lane.done is None or lane.done == lane.committed:
            return
        offset = lane.done
        try:
            await asyncio.wait_for(consumer.commit({lane.tp: offset}), self.settings.kafka_request_timeout)
        except (KafkaError, asyncio.TimeoutError) as exc:
            # a rebalance or outage: the messages may come again, which handling tolerates
            log.warning("%s: commit of %s@%d failed: %s", self.name, lane.tp, offset, describe(exc))
            return
        lane.committed = offset
        lane.since_commit = 0

    async def _drop(self, tps: set[TopicPartition], *, commit: bool = True) -> None:
        """Stop the lanes of partitions this consumer no longer holds (their unhandled records come again)."""
        lanes = [self._lanes.pop(tp) for tp in list(tps) if tp in self._lanes]
        for lane in lanes:
            if lane.task is not None:
                lane.task.cancel()
        await asyncio.gather(*(lane.task for lane in lanes if lane.task is not None), return_exceptions=True)
        if commit and self._consumer is not None:
            for lane in lanes:
                await self._commit(self._consumer, lane)

    # -- one message --------------------------------------------------------------------------
    async def _process(self, consumer: AIOKafkaConsumer, lane: _Lane, item: ConsumerRecord | Unreadable) -> None:
        """Handle ``item`` or dead-letter it; returns once its offset may be committed."""
        if isinstance(item, Unreadable):
            self.counts["unreadable"] += 1
            await self._dead_letter(item, functools.partial(self.on_unreadable, item))
            return
        loop = asyncio.get_running_loop()
        started = loop.time()
        attempt = 0
        while True:
            attempt += 1
            try:
                await asyncio.wait_for(self.handler(item), self.attempt_timeout)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - classified below
                error: BaseException = exc
                if isinstance(exc, TimeoutError) and not str(exc):
                    error = TimeoutError(f"no outcome within {self.attempt_timeout:g}s (ESSENTIAL_KAFKA_HANDLER_TIMEOUT)")
                elapsed = loop.time() - started
                transient = is_transient(error)
                if not transient or elapsed + backoff(attempt) > self.retry_seconds:
                    self.counts["gave_up" if transient else "poison"] += 1
                    failed = Failed(error, attempt, elapsed, gave_up=transient)
                    log.warning("%s: %s@%d offset %d: %s after %d attempt(s): %s", self.name, item.topic,
                                item.partition, item.offset, "giving up" if transient else "dead-lettering",
                                attempt, describe(error))  # fmt: skip
                    await self._dead_letter(item, functools.partial(self.on_poison, item, failed))
                    return
                self.retries += 1
                log.warning("%s: %s@%d offset %d: %s; retrying", self.name, item.topic, item.partition, item.offset,
                            describe(error))  # fmt: skip
                if attempt == 1:
                    await self._commit(consumer, lane)  # what came before is done: not handled again if we die
                await asyncio.sleep(backoff(attempt))

    async def _dead_letter(self, item: ConsumerRecord | Unreadable, send: Callable[[], Awaitable[None]]) -> None:
        """Dead-letter ``item``: retried while Kafka is away; a refusal for good is logged and skipped."""
        attempt = 0
        while True:
            attempt += 1
            try:
                await send()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                if not is_transient(exc):
                    self.counts["dead_letter_failed"] += 1
                    log.error("%s: %s@%d offset %d could not be dead-lettered, skipped: %s", self.name, item.topic,
                              item.partition, item.offset, describe(exc))  # fmt: skip
                    return
                log.warning("%s: dead letter of %s@%d offset %d not sent yet: %s", self.name, item.topic,
                            item.partition, item.offset, describe(exc))  # fmt: skip
                await asyncio.sleep(backoff(attempt))

    # -- records the client cannot decode ---------------------------------------------------------
    async def _isolate(self, consumer: AIOKafkaConsumer, exc: BaseException) -> None:
        """Find the record that made a fetch fail, queue it as unreadable, and fetch past it."""
        log.warning("%s: a fetch from %s failed while decoding (%s); looking for the record", self.name, self.topic,
                    describe(exc))  # fmt: skip
        assigned = sorted(consumer.assignment())
        # records the failed fetch had taken from other partitions were lost with it: fetch them again
        for tp in assigned:
            lane = self._lanes.get(tp)
            if lane is not None and lane.next_offset is not None:
                consumer.seek(tp, lane.next_offset)
            else:
                committed = await consumer.committed(tp)
                if committed is not None:
                    consumer.seek(tp, committed)
                else:
                    await consumer.seek_to_beginning(tp)
        for tp in assigned:
            lane = self._lanes.get(tp)
            if lane is not None and lane.paused:
                continue  # not fetched: not the culprit
            try:
                got = await consumer.getmany(tp, timeout_ms=PROBE_MS, max_records=MAX_RECORDS)
            except KafkaError:
                raise
            except Exception:  # noqa: BLE001 - this partition holds it
                await self._pinpoint(consumer, tp)
                return
            for part, msgs in got.items():
                if msgs:
                    self._dispatch(consumer, part, msgs)
        log.info("%s: the failed fetch could not be reproduced; carrying on", self.name)

    async def _pinpoint(self, consumer: AIOKafkaConsumer, tp: TopicPartition) -> None:
        """Fetch ``tp`` one record at a time up to the one that cannot be decoded; skip that one."""
        for _ in range(LANE_RECORDS + 1):
            try:
                got = await consumer.getmany(tp, timeout_ms=PROBE_MS, max_records=1)
            except KafkaError:
                raise
            except Exception as exc:  # noqa: BLE001 - the next record is the unreadable one
                offset = await consumer.position(tp)
                log.error("%s: %s@%d offset %d cannot be decoded (%s); dead-lettering its place", self.name,
                          tp.topic, tp.partition, offset, describe(exc))  # fmt: skip
                self._dispatch(consumer, tp, [Unreadable(tp.topic, tp.partition, offset, exc)])
                consumer.seek(tp, offset + 1)
                return
            if not got:
                return
            for part, msgs in got.items():
                if msgs:
                    self._dispatch(consumer, part, msgs)
