"""Notification service (database ``notify``): the outgoing messages, one per idempotency key.

A message that went out cannot be recalled, so the "compensation" of a
notification is a second message that corrects it (e.g. order cancelled).
"""
from __future__ import annotations

from typing import Any

from pymongo.asynchronous.client_session import AsyncClientSession

from .db import collection, ensure_collections, now
from .ledger import apply_once, undo_once

MESSAGES = "notify.messages"
LEDGER = "notify.operations"


async def _deliver(
    session: AsyncClientSession, message_id: str, to: str, template: str, data: dict[str, Any]
) -> dict[str, Any]:
    doc = {"_id": message_id, "to": to, "template": template, "data": data, "status": "sent", "sent_at": now()}
    await collection(MESSAGES).insert_one(doc, session=session)
    return {"message": message_id, "to": to, "template": template}


async def send(key: str, to: str, template: str, /, **data: Any) -> dict[str, Any]:
    """Send ``template`` to ``to`` once per key (the message id is the key)."""

    async def effect(session: AsyncClientSession) -> dict[str, Any]:
        return await _deliver(session, key, to, template, data)

    return await apply_once(LEDGER, key, "send", effect)


async def send_correction(key: str, template: str, /, **data: Any) -> dict[str, Any]:
    """Compensation of :func:`send`: tell the same recipient ``template`` (only if the first message went out)."""

    async def undo(session: AsyncClientSession, forward: dict[str, Any]) -> dict[str, Any]:
        return await _deliver(session, "undo:" + forward["message"], forward["to"], template,
                              {**data, "corrects": forward["message"]})  # fmt: skip

    return await undo_once(LEDGER, key, "correct", undo)


async def messages_to(recipient: str) -> list[dict[str, Any]]:
    return await collection(MESSAGES).find({"to": recipient}).sort("sent_at", 1).to_list()


async def ensure_indexes() -> None:
    await ensure_collections(MESSAGES, LEDGER)
    await collection(MESSAGES).create_index([("to", 1), ("sent_at", 1)])
