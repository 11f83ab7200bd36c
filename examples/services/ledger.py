"""Exactly-once effects: one ledger document per idempotency key, written in the effect's transaction.

A step runs at least once (retries; a crash between the effect and the saga's
checkpoint), so each service records the step's idempotency key together with
its effect, atomically:

* forward – ledger document ``_id = key``; a re-run finds it and returns the
  recorded result instead of applying the effect again;
* undo – ledger document ``_id = "undo:" + key``; the compensation receives the
  forward step's key (``<saga>:<forward seq>``), so it looks the forward up by
  that key.  When the forward never happened it writes a *tombstone* at ``key``:
  a forward still in flight (timed out at the orchestrator, not yet applied here)
  then fails instead of applying after its own compensation.

The ledger, not the result the orchestrator passes to a compensation, is the
authority on what happened: after a timeout that result is only an error.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import DuplicateKeyError

from essential import StepFailed

from .db import collection, now, plain, transaction

Effect = Callable[[AsyncClientSession], Awaitable[dict[str, Any]]]
Reverse = Callable[[AsyncClientSession, dict[str, Any]], Awaitable[dict[str, Any]]]

TOMBSTONE = "tombstone"


class AlreadyCompensated(StepFailed):
    """The operation's compensation ran first; applying it now would leak an effect."""


def undo_key(key: str) -> str:
    return "undo:" + key


def _replayed(doc: dict[str, Any]) -> dict[str, Any]:
    if doc.get("op") == TOMBSTONE:
        raise AlreadyCompensated(
            f"operation {doc['_id']} was compensated before it ran; it will not be applied"
        )
    return {**plain(doc), "replayed": True}


async def apply_once(
    ledger: str, key: str, op: str, effect: Effect, session: AsyncClientSession | None = None
) -> dict[str, Any]:
    """Run ``effect`` and record its result under ``key`` in one transaction, unless already recorded.

    ``effect`` gets the session, does its writes with it and returns the result
    document (JSON-able); raising aborts the writes.

    The effect runs *first* and the ledger insert second: the hot write (a stock
    or balance shared by many sagas) is then the transaction's first operation,
    which keeps its write-conflict window short.  A key already recorded makes
    the insert fail (or the effect's guard, if the state moved on meanwhile);
    either way the transaction rolls back and the recorded result is returned.

    ``session``: a transactional step's checkpoint transaction (``ctx.session``): the effect and
    its ledger entry commit with the step's record, so there is never a replay to find.
    """

    async def body(s: AsyncClientSession) -> dict[str, Any]:
        result = await effect(s)
        await collection(ledger).insert_one({"_id": key, "op": op, "at": now(), **result}, session=s)
        return {"op": op, **result}

    if session is not None:
        return await transaction(body, session)
    ops = collection(ledger)
    try:
        return await transaction(body)
    except (DuplicateKeyError, StepFailed):
        done = await ops.find_one({"_id": key})
        if done is None:
            raise  # a real failure of a first run
        return _replayed(done)


async def undo_once(
    ledger: str, key: str, op: str, reverse: Reverse, session: AsyncClientSession | None = None
) -> dict[str, Any]:
    """Undo the operation recorded under ``key`` once; a no-op (plus tombstone) when it never happened.

    ``reverse`` gets the session and the forward ledger document and returns the
    undo's result; it may return ``{"undone": False, ...}`` when the forward had
    nothing to undo (e.g. a declined charge).  ``session``: as for :func:`apply_once`.
    """
    ukey = undo_key(key)

    async def body(s: AsyncClientSession) -> dict[str, Any]:
        ops = collection(ledger)
        docs = {d["_id"]: d async for d in ops.find({"_id": {"$in": [key, ukey]}}, session=s)}
        if ukey in docs:
            return {**plain(docs[ukey]), "replayed": True}
        forward = docs.get(key)
        if forward is None:
            await ops.insert_one({"_id": key, "op": TOMBSTONE, "at": now()}, session=s)
            result: dict[str, Any] = {"undone": False, "reason": "nothing to undo: the operation never happened"}
        else:
            result = {"undone": True, **await reverse(s, plain(forward))}
        await ops.insert_one({"_id": ukey, "op": op, "undoes": key, "at": now(), **result}, session=s)
        return {"op": op, "undoes": key, **result}

    if session is not None:
        return await transaction(body, session)
    ops = collection(ledger)
    try:
        return await transaction(body)
    except DuplicateKeyError:
        done = await ops.find_one({"_id": ukey})
        if done is None:
            raise
        return {**plain(done), "replayed": True}
