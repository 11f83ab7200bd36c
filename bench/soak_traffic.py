"""The soak's traffic: starts the planned sagas through the Python client and as Kafka commands.

Why every start is retried until it is answered: the supervisor, the gateway, MongoDB
and the broker are being killed underneath.  A retried start carries the same
idempotency key, so the worst it can do is return the saga its first attempt created.

Kafka commands are fire-and-forget: whether one took effect shows in MongoDB (the saga
with its key).  The dev broker keeps its log in memory, so a command it acknowledged
before it was killed (or right after it came back, with stale metadata) may be gone;
such a start is sent again (:meth:`Traffic.resend_missing`) and the resend is reported.
Nothing else is ever re-sent.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer

from essential.actors.kafka.config import producer_kwargs
from essential.actors.settings import Settings

from .soak_plan import PlannedSaga

#: seconds one client call may take before it is tried again (a restarting supervisor answers later)
CALL_TIMEOUT = 90.0
#: a start sent this long after the broker restart is no longer at risk of the broker's memory loss
BROKER_LOSS_WINDOW = 15.0
#: a client call or a Kafka send slower than this is reported (with its time)
SLOW_CALL = 15.0
#: seconds one Kafka request (producer start, one send) may take before it is abandoned and retried
SEND_TIMEOUT = 5.0
#: seconds a Kafka start may take to show up in MongoDB before it is sent again
RESEND_AFTER = 15.0
#: duplicates of already-started sagas sent on purpose, per path: each must return the same saga
DUPLICATES = 5


@dataclass
class TrafficStats:
    client_started: int = 0
    kafka_sent: int = 0
    kafka_resent: int = 0
    signals: int = 0
    client_retries: int = 0
    kafka_retries: int = 0
    duplicates_sent: dict[str, int] = field(default_factory=lambda: {"client": 0, "kafka": 0})
    duplicate_mismatch: list[str] = field(default_factory=list)  # a repeated client start returned another saga
    slow_calls: list[str] = field(default_factory=list)  # client calls answered after SLOW_CALL seconds
    slow_sends: list[str] = field(default_factory=list)  # Kafka sends acknowledged after SLOW_CALL seconds
    errors: list[str] = field(default_factory=list)


class Traffic:
    """Sends the plan on its schedule (``t0`` is the soak's monotonic start)."""

    def __init__(self, client: Any, settings: Settings, plan: list[PlannedSaga], t0: float,
                 say: Callable[[str], None], concurrency: int = 8) -> None:  # fmt: skip
        self.client = client
        self.settings = settings
        self.plan = plan
        self.t0 = t0
        self.say = say
        self.stats = TrafficStats()
        self._calls = asyncio.Semaphore(concurrency)
        self._producer: AIOKafkaProducer | None = None
        self.done_at: float | None = None

    # -- the schedule ------------------------------------------------------------------
    async def run(self) -> None:
        tasks = []
        for item in self.plan:
            delay = self.t0 + item.at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            send = self._start_client if item.via == "client" else self._start_kafka
            tasks.append(asyncio.create_task(send(item)))
        await asyncio.gather(*tasks)
        await self._duplicates()
        self.done_at = time.monotonic()

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    # -- the client path ---------------------------------------------------------------
    async def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A client call, retried while the cluster is away; typed refusals are returned, not retried."""
        attempt = 0
        began = time.monotonic()
        while True:
            attempt += 1
            async with self._calls:
                try:
                    result = await asyncio.wait_for(asyncio.to_thread(fn, *args, **kwargs), CALL_TIMEOUT)
                    took = time.monotonic() - began
                    if took > SLOW_CALL:
                        self.stats.slow_calls.append(f"{what}: answered after {took:.1f}s ({attempt} attempt(s))")
                        self.say(f"{what}: answered after {took:.1f}s")
                    return result
                except (TimeoutError, ConnectionError, OSError) as exc:
                    error: Exception = exc
                except Exception as exc:
                    if type(exc).__module__.startswith("orchestration"):
                        raise  # a typed refusal from the supervisor: retrying would not change it
                    error = exc
            self.stats.client_retries += 1
            if attempt % 5 == 1:
                self.say(f"{what}: attempt {attempt} failed ({type(error).__name__}: {str(error)[:120]}); retrying")
            await asyncio.sleep(min(0.5 * attempt, 5.0))

    async def _start_client(self, item: PlannedSaga) -> None:
        try:
            item.saga_id = await self._call(
                f"start {item.key}", self.client.start, item.job, item.payload, ttl=item.ttl, idempotency_key=item.key
            )
        except Exception as exc:  # noqa: BLE001 - refused: the audit reports the saga as never started
            self.stats.errors.append(f"start {item.key} refused: {type(exc).__name__}: {exc}")
            return
        item.start_attempts += 1
        item.answered_after = round(time.monotonic() - self.t0 - item.at, 2)
        self.stats.client_started += 1
        if item.signal is not None:
            name, data = item.signal
            try:
                await self._call(f"signal {item.key}", self.client.signal, item.saga_id, name, data, key=f"{item.key}:signal")
                self.stats.signals += 1
            except Exception as exc:  # noqa: BLE001
                self.stats.errors.append(f"signal {item.key} refused: {type(exc).__name__}: {exc}")

    # -- the Kafka path ----------------------------------------------------------------
    async def _producer_ready(self) -> AIOKafkaProducer:
        while self._producer is None:
            producer = AIOKafkaProducer(**producer_kwargs(self.settings))
            if await _bounded(producer.start(), SEND_TIMEOUT):
                self._producer = producer
            else:  # the broker is down: wait for it
                await self._discard(producer)
                self.stats.kafka_retries += 1
                await asyncio.sleep(1.0)
        return self._producer

    async def _discard(self, producer: AIOKafkaProducer | None) -> None:
        """Drop a producer whose broker went away (its metadata would stay stale); never wait on it for long."""
        if producer is None:
            return
        if producer is self._producer:
            self._producer = None
        await _bounded(producer.stop(), 5.0)

    def command(self, item: PlannedSaga) -> bytes:
        return json.dumps({"schema": 1, "type": "start", "job": item.job, "payload": item.payload, "ttl": item.ttl,
                           "idempotency_key": item.key}).encode()  # fmt: skip

    async def _start_kafka(self, item: PlannedSaga) -> None:
        await self._send(item)
        self.stats.kafka_sent += 1

    async def _send(self, item: PlannedSaga) -> None:
        began = time.monotonic()
        deadline = began + 120
        while True:
            producer = await self._producer_ready()
            send = producer.send_and_wait(self.settings.kafka_command_topic, self.command(item), key=item.key.encode())
            if await _bounded(send, SEND_TIMEOUT):
                item.sent_at.append(time.monotonic())
                item.start_attempts += 1
                if item.sent_at[-1] - began > SLOW_CALL:
                    self.stats.slow_sends.append(f"{item.key}: acknowledged after {item.sent_at[-1] - began:.1f}s")
                    self.say(f"Kafka start {item.key}: acknowledged after {item.sent_at[-1] - began:.1f}s")
                return
            self.stats.kafka_retries += 1  # broker away, or the topic being recreated: a new producer
            await self._discard(producer)
            if time.monotonic() > deadline:
                self.stats.errors.append(f"kafka start {item.key} not sent within 120 s")
                return
            if self.stats.kafka_retries % 5 == 1:
                self.say(f"Kafka send of {item.key} failed; retrying with a new producer")
            await asyncio.sleep(0.5)

    async def resend_missing(self, found: set[str], broker_back_at: float | None) -> list[str]:
        """Send again the Kafka starts the broker may have lost: not applied, and sent before the broker
        came back (+ a margin for its stale-metadata acknowledgements).  Returns the keys re-sent."""
        if broker_back_at is None:
            return []
        resent = []
        for item in self.plan:
            if item.via != "kafka" or item.key in found or not item.sent_at:
                continue
            at_risk = item.sent_at[-1] < broker_back_at + BROKER_LOSS_WINDOW
            if at_risk and len(item.sent_at) < 4 and time.monotonic() - item.sent_at[-1] > RESEND_AFTER:
                await self._send(item)
                self.stats.kafka_resent += 1
                resent.append(item.key)
        if resent:
            self.say(f"re-sent {len(resent)} Kafka start(s) the restarted broker may have lost: {', '.join(resent)}")
        return resent

    # -- repeated starts on purpose --------------------------------------------------------
    async def _duplicates(self) -> None:
        """A few starts sent again with the same key and request: each must come back as the same saga."""
        client_done = [p for p in self.plan if p.via == "client" and p.saga_id][:DUPLICATES]
        for item in client_done:
            again = await self._call(f"repeat {item.key}", self.client.start, item.job, item.payload, ttl=item.ttl,
                                     idempotency_key=item.key)  # fmt: skip
            self.stats.duplicates_sent["client"] += 1
            if again != item.saga_id:
                self.stats.duplicate_mismatch.append(f"{item.key}: first {item.saga_id}, repeated start {again}")
        for item in [p for p in self.plan if p.via == "kafka" and p.sent_at][:DUPLICATES]:
            await self._send(item)
            self.stats.duplicates_sent["kafka"] += 1


async def _bounded(coro: Any, timeout: float) -> bool:
    """Run ``coro`` for at most ``timeout`` seconds: True if it finished without raising.

    Not ``asyncio.wait_for``: that waits for the cancelled call to unwind, and an aiokafka
    call whose broker vanished was seen to take a minute to do so."""
    task = asyncio.ensure_future(coro)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # never "exception was never retrieved"
        return False
    return task.exception() is None
