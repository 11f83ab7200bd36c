"""Noticing that the broker lost acknowledged messages, so the relay can publish them again.

Why: the embedded dev broker keeps its log in memory.  After a restart it has
no topics, yet it acknowledges writes that a client sends with its old
metadata (measured here: a batch queued during the outage and sent on
reconnect is acknowledged with offsets 0, 1, ... and never readable).  Such
rows would be marked sent although Kafka does not have them.

How: the watch writes a small canary message to a topic of its own (one per
gateway, so it is the only writer) on every check.  Offsets only grow while
the broker keeps its log; a canary offset that does not exceed the previous
one means the log was lost.  Every row acknowledged since the last check that
proved continuity may be lost, and the relay re-publishes it (at least once:
consumers de-duplicate by event id).  A relay that failed (the broker went
away) runs a check before it publishes again, so after a restart the topics are
recreated and the loss handled before any new row goes out: a saga's events
then still reach Kafka in order.

The last good canary offset is kept in MongoDB (``broker_watch``, one document per
gateway), not only in memory: a gateway killed together with the broker (a machine
restart) would otherwise take the new log's first canary for its baseline and never
notice that the rows it had marked sent are gone.  A starting gateway checks before
its relays publish anything.
"""
from __future__ import annotations

import logging
import re
from datetime import datetime, timedelta

from aiokafka import AIOKafkaProducer
from pymongo.asynchronous.collection import AsyncCollection

from essential.persistence.outbox import utcnow

log = logging.getLogger("essential.gateway.watch")

#: rows marked sent this long before the last good check are re-published too (clock and marking slack)
SLACK = timedelta(seconds=2)


def canary_topic(owner: str) -> str:
    return "essential.canary." + re.sub(r"[^A-Za-z0-9._-]", "_", owner)


#: the collection holding each gateway's last good canary
COLLECTION = "broker_watch"


class BrokerWatch:
    def __init__(self, producer: AIOKafkaProducer, owner: str, marks: AsyncCollection | None = None) -> None:
        self.producer = producer
        self.owner = owner
        self.topic = canary_topic(owner)
        self.generation = 0  # increases whenever a loss is detected
        self.losses = 0
        self._marks = marks
        self._loaded = marks is None
        self._last_offset: int | None = None
        self._last_good: datetime | None = None

    async def check(self) -> datetime | None:
        """Write a canary; returns the time since which acknowledged writes may be lost, else None."""
        if not self._loaded:
            mark = await self._marks.find_one({"_id": self.owner})
            if mark is not None:
                self._last_offset, self._last_good = mark["offset"], mark["good_at"]
            self._loaded = True
        started = utcnow()
        meta = await self.producer.send_and_wait(self.topic, b"canary", key=self.owner.encode(), partition=0)
        previous, good = self._last_offset, self._last_good
        if previous is not None and meta.offset <= previous:
            self.generation += 1
            self.losses += 1
            self._last_offset, self._last_good = None, None  # the next canary sets a new baseline
            if self._marks is not None:
                await self._marks.delete_one({"_id": self.owner})
            since = (good or started) - SLACK
            log.warning("Kafka lost its log (canary offset %d after %d); re-publishing rows sent since %s",
                        meta.offset, previous, since.isoformat())  # fmt: skip
            return since
        self._last_offset, self._last_good = meta.offset, started
        if self._marks is not None:
            await self._marks.update_one({"_id": self.owner}, {"$set": {"offset": meta.offset, "good_at": started}},
                                         upsert=True)  # fmt: skip
        return None
