"""The Kafka gateway: commands in, outbox out, participants' replies into the inbox.

A detached Ray actor named ``essential:gateway`` (namespace from the settings)
runs, on one event loop and one producer:

* the command consumer (:mod:`essential.actors.kafka.command_handler`): start/abort/commit
  commands applied through the supervisor, bad ones dead-lettered;
* the reply consumer (:mod:`essential.actors.kafka.reply_handler`): participants' replies
  stored in the ``inbox``;
* two relays (:mod:`essential.actors.kafka.relay`): lifecycle events from ``outbox`` and
  participant commands from ``command_outbox``;
* housekeeping: topics recreated when they vanish (the dev broker keeps them in
  memory only), a broker that lost acknowledged messages noticed and those
  re-published (:mod:`essential.actors.kafka.broker_watch`), and every ``kafka_prune_interval``
  what is older than the retention pruned: sent, refused and withdrawn outbox
  rows, command-log entries, and the replies and command counters of ended sagas.

It starts its work in ``__init__``, so a gateway that Ray restarts after a crash
(``max_restarts=-1``) resumes on its own.  Several gateways (distinct names)
may run: they share the command partitions through one consumer group; each
outbox collection is relayed by one of them at a time (a lease in MongoDB), the
others standing by.
"""
from __future__ import annotations

import asyncio
import logging
import os
from datetime import timedelta
from typing import Any

import ray
from aiokafka import AIOKafkaProducer
from pymongo.asynchronous.database import AsyncDatabase

from essential.actors.kafka import broker_watch
from essential.actors.kafka.broker_watch import BrokerWatch, canary_topic
from essential.actors.kafka.command_handler import CommandHandler
from essential.actors.kafka.config import admin_kwargs, gateway_topics, producer_kwargs, watch_restarts
from essential.actors.kafka.consumer import ConsumerLoop, backoff
from essential.actors.kafka.relay import Relay
from essential.actors.kafka.reply_handler import ReplyHandler
from essential.actors.kafka.topics import ensure_topics
from essential.actors.names import GATEWAY_NAME
from essential.actors.settings import Settings, settings_from
from essential.persistence import command_outbox, inbox, kafka_retention
from essential.persistence.connection import shared_client
from essential.persistence.inbox import CommandLog
from essential.persistence.outbox import OutboxQueue, utcnow

log = logging.getLogger("essential.gateway")

HOUSEKEEPING_INTERVAL = 5.0  # seconds between topic checks


class GatewayService:
    """Everything the gateway does, without Ray (the benchmark runs the relay part alone)."""

    def __init__(self, settings: Settings, owner: str, *, consumers: bool = True) -> None:
        self.settings = settings
        self.owner = owner
        self.with_consumers = consumers
        self.ready = asyncio.Event()
        self.producer: AIOKafkaProducer | None = None
        self.db: AsyncDatabase | None = None
        self.relays: dict[str, Relay] = {}
        self.commands: CommandHandler | None = None
        self.replies: ReplyHandler | None = None
        self.loops: list[ConsumerLoop] = []
        self.watch: BrokerWatch | None = None
        self.topic_errors = 0
        self.pruned: dict[str, int] = {}
        self._check_lock = asyncio.Lock()

    # -- life cycle ------------------------------------------------------------------------
    async def run(self) -> None:
        """Start (waiting for MongoDB and Kafka as long as it takes), then work until cancelled."""
        try:
            await self._start()
            tasks = [asyncio.create_task(relay.run(), name=f"relay:{n}") for n, relay in self.relays.items()]
            tasks += [asyncio.create_task(loop.run(), name=loop.name) for loop in self.loops]
            tasks.append(asyncio.create_task(self._housekeeping(), name="housekeeping"))
            self.ready.set()
            log.info("gateway %s ready (bootstrap %s)", self.owner, self.settings.kafka_bootstrap)
            try:
                await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await self._hand_over()
        finally:
            if self.producer is not None:
                await self.producer.stop()

    async def _hand_over(self) -> None:
        """On a clean stop, let a standby gateway take the relays over at once."""
        for relay in self.relays.values():
            try:
                await relay.queue.release_lease()
            except Exception:  # noqa: BLE001 - the lease then simply expires
                pass

    async def _start(self) -> None:
        attempt = 0
        while True:
            attempt += 1
            try:
                self.db = shared_client(self.settings.mongodb_uri)[self.settings.database]
                await self._prepare_database(self.db)
                await self._ensure_topics()
                self.producer = await self._start_producer()
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - not up yet: wait for it
                log.warning("gateway %s: start-up attempt %d failed (%s: %s); retrying", self.owner, attempt,
                            type(exc).__name__, exc)  # fmt: skip
                await asyncio.sleep(backoff(attempt, base=0.2))
        self._build(self.db, self.producer)
        attempt = 0
        while self.watch is not None:  # before the relays publish: a lost log is re-published first, in order
            attempt += 1
            try:
                await self._check_broker()
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Kafka away: wait for it
                log.warning("gateway %s: first broker check failed (%s: %s); retrying", self.owner,
                            type(exc).__name__, exc)  # fmt: skip
                await asyncio.sleep(backoff(attempt, base=0.2))

    async def _prepare_database(self, db: AsyncDatabase) -> None:
        events = OutboxQueue(db["outbox"], self.owner)
        commands = OutboxQueue(db[command_outbox.COLLECTION], self.owner)
        for queue in (events, commands):
            await queue.ensure_indexes()
        await command_outbox.ensure_indexes(db)
        await inbox.ensure_indexes(db)

    async def _start_producer(self) -> AIOKafkaProducer:
        producer = AIOKafkaProducer(**producer_kwargs(self.settings))
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        return producer

    def _build(self, db: AsyncDatabase, producer: AIOKafkaProducer) -> None:
        conf = self.settings
        if watch_restarts(conf):
            self.watch = BrokerWatch(producer, self.owner, db[broker_watch.COLLECTION])
        relay = {"batch_size": conf.relay_batch_size, "lease": conf.relay_lease_seconds,
                 "poll_interval": conf.relay_poll_interval, "watch": self.watch,
                 "before_resume": self._check_broker if self.watch else None}  # fmt: skip
        self.relays = {
            "events": Relay(OutboxQueue(db["outbox"], self.owner), producer, name="events", **relay),
            "commands": Relay(
                OutboxQueue(db[command_outbox.COLLECTION], self.owner), producer, name="commands", **relay
            ),
        }
        if not self.with_consumers:
            return
        self.commands = CommandHandler(conf, self.owner, producer, db)
        self.replies = ReplyHandler(conf, self.owner, producer, db)
        self.loops = [
            ConsumerLoop(conf, topic=conf.kafka_command_topic, group=conf.kafka_consumer_group,
                         handler=self.commands.handle, on_poison=self.commands.poison,
                         on_unreadable=self.commands.unreadable, name="commands"),
            ConsumerLoop(conf, topic=conf.kafka_reply_topic, group=f"{conf.kafka_consumer_group}.replies",
                         handler=self.replies.handle, on_poison=self.replies.poison,
                         on_unreadable=self.replies.unreadable, name="replies"),
        ]  # fmt: skip

    # -- housekeeping ------------------------------------------------------------------------
    async def _ensure_topics(self) -> None:
        if self.settings.kafka_create_topics:
            canary = [canary_topic(self.owner)] if watch_restarts(self.settings) else []
            await ensure_topics(
                self.settings.kafka_bootstrap,
                gateway_topics(self.settings) + canary,
                partitions=self.settings.kafka_partitions,
                timeout=self.settings.kafka_request_timeout,
                **admin_kwargs(self.settings),
            )

    async def _housekeeping(self) -> None:
        loop = asyncio.get_running_loop()
        pause = min(HOUSEKEEPING_INTERVAL, self.settings.kafka_prune_interval)
        last_check = last_prune = loop.time()
        while True:
            await asyncio.sleep(pause)
            if loop.time() - last_check >= HOUSEKEEPING_INTERVAL:
                last_check = loop.time()
                try:
                    await self._ensure_topics()
                    await self._check_broker()
                except Exception as exc:  # noqa: BLE001 - Kafka away: the relays report it too
                    self.topic_errors += 1
                    log.debug("gateway %s: topic check failed: %s", self.owner, exc)
            if loop.time() - last_prune >= self.settings.kafka_prune_interval:
                last_prune = loop.time()
                try:
                    await self._prune()
                except Exception:  # noqa: BLE001 - pruning is best effort: the next round tries again
                    log.exception("gateway %s: pruning failed", self.owner)

    async def _check_broker(self) -> None:
        """If the broker lost its log, recreate the topics and re-publish what may have been lost.

        Raises while Kafka is unreachable.  Called by housekeeping and by a relay
        before it resumes after a failure; one check at a time.
        """
        if self.watch is None:
            return
        async with self._check_lock:
            since = await self.watch.check()
            if since is None:
                return
            await self._ensure_topics()
            for relay in self.relays.values():
                rewound = await relay.queue.rewind(since)
                log.warning("gateway %s: re-publishing %d rows of %s", self.owner, rewound,
                            relay.queue.collection.name)  # fmt: skip
                relay.wake()

    async def _prune(self) -> None:
        """Delete what is older than the retention (``ESSENTIAL_RETENTION``); only the gateway holding a
        relay's lease prunes that outbox, so standbys do not repeat the work."""
        assert self.db is not None
        older = utcnow() - timedelta(seconds=self.settings.retention)
        pruned: dict[str, int] = {}
        for name, relay in self.relays.items():
            if relay.active:
                pruned[f"{name}.sent"] = await relay.queue.prune_sent(older)
                pruned[f"{name}.set_aside"] = await relay.queue.prune_set_aside(older)
        pruned["command_log"] = await CommandLog(self.db).prune(older)
        pruned["replies"] = await kafka_retention.prune_replies(self.db, older)
        pruned["command_counters"] = await kafka_retention.prune_counters(self.db, older)
        self.pruned = pruned
        if any(pruned.values()):
            log.info("gateway %s: pruned %s", self.owner, ", ".join(f"{k} {v}" for k, v in pruned.items() if v))

    # -- observation -------------------------------------------------------------------------
    async def stats(self) -> dict[str, Any]:
        relays: dict[str, Any] = {}
        for name, relay in self.relays.items():
            try:
                pending: int | None = await relay.queue.pending()
                refused: int | None = await relay.queue.refused()
                withdrawn: int | None = await relay.queue.withdrawn()
            except Exception:  # noqa: BLE001 - stats must answer while MongoDB is away
                pending = refused = withdrawn = None
            relays[name] = {
                **relay.counts, "active": relay.active, "pending": pending, "refused_rows": refused,
                "withdrawn_rows": withdrawn, "in_flight": len(relay.in_flight), "last_error": relay.last_error,
                "seconds": {k: round(v, 3) for k, v in relay.seconds.items()},
            }  # fmt: skip
        return {
            "owner": self.owner,
            "pid": os.getpid(),
            "ready": self.ready.is_set(),
            "relay": relays,
            "commands": dict(self.commands.counts) if self.commands else {},
            "replies": dict(self.replies.counts) if self.replies else {},
            "consumers": {
                loop.name: {"partitions": loop.assignment(), "waiting": loop.lanes(), "offsets": loop.offsets(),
                            "restarts": loop.restarts,
                            "retries": loop.retries, **loop.counts}
                for loop in self.loops
            },  # fmt: skip
            "pruned": self.pruned,
            "topic_errors": self.topic_errors,
            "broker_losses": self.watch.losses if self.watch else None,
        }


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class Gateway:
    def __init__(self, settings: dict[str, Any], name: str = GATEWAY_NAME) -> None:
        self.name = name
        resolved = settings_from(settings)
        self.service = GatewayService(resolved, owner=f"{resolved.namespace}/{name}")
        self._task = asyncio.get_running_loop().create_task(self._supervise())

    async def _supervise(self) -> None:
        """Crash-only: if the work ever stops on an error, end the process and let Ray restart the actor."""
        try:
            await self.service.run()
        except asyncio.CancelledError:
            raise
        except BaseException:
            log.exception("gateway %s failed; exiting for Ray to restart it", self.name)
            os._exit(1)

    def __repr__(self) -> str:
        return f"Gateway({self.name})"

    async def ready(self, timeout: float = 60.0) -> bool:
        """True once topics, producer and consumers are up (False if ``timeout`` passes first)."""
        try:
            await asyncio.wait_for(self.service.ready.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def stats(self) -> dict[str, Any]:
        return await self.service.stats()

    async def pid(self) -> int:
        return os.getpid()

    async def stop(self) -> bool:
        """Stop working cleanly: leave the consumer groups at once (no wait for a session timeout), close
        the producer.  The actor stays; end it with ``ray.kill(handle, no_restart=True)`` afterwards."""
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        return True


def ensure_gateway(settings: Settings, *, name: str = GATEWAY_NAME) -> Any:
    """The named gateway actor, created if missing (idempotent; call it from any Ray driver or actor).

    Blocking (a GCS round trip): from async code call it via ``asyncio.to_thread``.
    """
    return Gateway.options(
        name=name,
        namespace=settings.namespace,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        max_restarts=-1,
    ).remote(settings.model_dump(mode="json"), name)
