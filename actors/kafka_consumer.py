"""A consumer loop with at-least-once handling: an offset is committed only after its message was handled.

Each partition's messages are handled in order (partitions concurrently) and
the partition's offset is committed after the last of them.  A handler failure
that looks transient (Kafka, MongoDB or Ray unavailable) is retried with
back-off, indefinitely: the message must not be skipped.  Any other exception
is retried a few times and then handed to ``on_poison`` (which dead-letters
it), so one bad message cannot stall its partition for ever.  If the consumer
itself fails (the broker went away for long), it is recreated.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord, TopicPartition
from pymongo.errors import PyMongoError
from ray.exceptions import RayError

from .kafka_config import consumer_kwargs
from .settings import Settings

log = logging.getLogger("essential.kafka")

Handler = Callable[[ConsumerRecord], Awaitable[None]]
PoisonHandler = Callable[[ConsumerRecord, BaseException], Awaitable[None]]

TRANSIENT: tuple[type[BaseException], ...] = (KafkaError, PyMongoError, RayError, TimeoutError, OSError)
POISON_AFTER = 5


def backoff(attempt: int, base: float = 0.1, cap: float = 5.0) -> float:
    return min(base * 2 ** max(attempt - 1, 0), cap)


class ConsumerLoop:
    def __init__(
        self,
        settings: Settings,
        *,
        topic: str,
        group: str,
        handler: Handler,
        on_poison: PoisonHandler,
        name: str,
    ) -> None:
        self.settings = settings
        self.topic = topic
        self.group = group
        self.handler = handler
        self.on_poison = on_poison
        self.name = name
        self.restarts = 0
        self.retries = 0
        self._consumer: AIOKafkaConsumer | None = None

    async def run(self) -> None:
        """Consume until cancelled, recreating the consumer after failures."""
        attempt = 0
        while True:
            consumer = AIOKafkaConsumer(self.topic, **consumer_kwargs(self.settings, self.group))
            self._consumer = consumer
            try:
                await consumer.start()
                attempt = 0
                while True:
                    batches = await consumer.getmany(timeout_ms=500, max_records=200)
                    if batches:
                        await asyncio.gather(*(self._partition(consumer, tp, msgs) for tp, msgs in batches.items()))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep consuming: recreate the consumer
                attempt += 1
                self.restarts += 1
                log.warning("%s: consumer of %s failed (%s: %s); recreating", self.name, self.topic,
                            type(exc).__name__, exc)  # fmt: skip
                await asyncio.sleep(backoff(attempt))
            finally:
                try:
                    await consumer.stop()
                except Exception:  # noqa: BLE001 - stopping a broken consumer
                    pass

    def assignment(self) -> list[int]:
        """Partitions this consumer holds now (empty while the group rebalances)."""
        consumer = self._consumer
        return sorted(tp.partition for tp in consumer.assignment()) if consumer is not None else []

    async def _partition(self, consumer: AIOKafkaConsumer, tp: TopicPartition, msgs: list[ConsumerRecord]) -> None:
        for msg in msgs:
            await self._handle(msg)
        try:
            await consumer.commit({tp: msgs[-1].offset + 1})
        except KafkaError as exc:
            # a rebalance or outage: the messages may come again, which handling tolerates
            log.warning("%s: commit of %s@%d failed: %s", self.name, tp, msgs[-1].offset + 1, exc)

    async def _handle(self, msg: ConsumerRecord) -> None:
        attempt, failures = 0, 0
        poison: BaseException | None = None
        while True:
            attempt += 1
            try:
                if poison is None:
                    await self.handler(msg)
                else:
                    await self.on_poison(msg, poison)
                return
            except asyncio.CancelledError:
                raise
            except TRANSIENT as exc:
                self.retries += 1
                log.warning("%s: %s@%d offset %d: %s: %s; retrying", self.name, msg.topic, msg.partition,
                            msg.offset, type(exc).__name__, exc)  # fmt: skip
            except Exception as exc:
                failures += 1
                log.exception("%s: handling %s@%d offset %d failed", self.name, msg.topic, msg.partition, msg.offset)
                if failures >= POISON_AFTER:
                    poison = exc
            await asyncio.sleep(backoff(attempt))
