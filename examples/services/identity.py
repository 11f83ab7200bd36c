"""Users service (database ``users``): accounts and subscription access.

``accounts``: ``{_id: user, email (unique), name, status}``.
``subscriptions``: ``{_id: user, plan, paid_until}`` – access runs until ``paid_until``.
"""
from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from pymongo import UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import DuplicateKeyError

from essential import StepFailed

from .db import collection, ensure_collections, now
from .ledger import apply_once, undo_once

ACCOUNTS = "users.accounts"
SUBSCRIPTIONS = "users.subscriptions"
LEDGER = "users.operations"


async def create_account(key: str, user_id: str, email: str, name: str) -> dict[str, Any]:
    """Register a user; a taken id or e-mail address is a business failure."""

    async def effect(session: AsyncClientSession) -> dict[str, Any]:
        accounts = collection(ACCOUNTS)
        taken = await accounts.find_one({"$or": [{"_id": user_id}, {"email": email}]}, {"_id": 1}, session=session)
        if taken is None:
            try:
                await accounts.insert_one(
                    {"_id": user_id, "email": email, "name": name, "status": "active", "created_at": now()},
                    session=session,
                )
                return {"user": user_id, "email": email}
            except DuplicateKeyError:
                pass  # registered concurrently
        raise StepFailed(f"user id {user_id!r} or e-mail {email!r} is already registered")

    return await apply_once(LEDGER, key, "create_account", effect)


async def delete_account(key: str) -> dict[str, Any]:
    """Compensation of :func:`create_account`: the half-onboarded account goes (its e-mail is free again)."""

    async def undo(session: AsyncClientSession, forward: dict[str, Any]) -> dict[str, Any]:
        await collection(ACCOUNTS).delete_one({"_id": forward["user"]}, session=session)
        return {"user": forward["user"]}

    return await undo_once(LEDGER, key, "delete_account", undo)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


async def extend_access(key: str, user_id: str, plan: str, days: int) -> dict[str, Any]:
    """Extend paid access by ``days`` from the later of now and the current end."""

    async def effect(session: AsyncClientSession) -> dict[str, Any]:
        subs = collection(SUBSCRIPTIONS)
        current = await subs.find_one({"_id": user_id}, session=session)
        previous: datetime | None = current["paid_until"] if current else None
        until = max(previous or now(), now()) + timedelta(days=days)
        await subs.update_one(
            {"_id": user_id}, {"$set": {"plan": plan, "paid_until": until}}, upsert=True, session=session
        )
        return {"user": user_id, "plan": plan, "previous": _iso(previous), "paid_until": until.isoformat()}

    return await apply_once(LEDGER, key, "extend_access", effect)


async def restore_access(key: str) -> dict[str, Any]:
    """Compensation of :func:`extend_access`: access ends where it ended before."""

    async def undo(session: AsyncClientSession, forward: dict[str, Any]) -> dict[str, Any]:
        subs = collection(SUBSCRIPTIONS)
        if forward["previous"] is None:
            await subs.delete_one({"_id": forward["user"]}, session=session)
        else:
            previous = datetime.fromisoformat(forward["previous"])
            await subs.update_one({"_id": forward["user"]}, {"$set": {"paid_until": previous}}, session=session)
        return {"user": forward["user"], "paid_until": forward["previous"]}

    return await undo_once(LEDGER, key, "restore_access", undo)


async def paid_until(user_id: str) -> datetime | None:
    doc = await collection(SUBSCRIPTIONS).find_one({"_id": user_id})
    return None if doc is None else doc["paid_until"]


async def seed(users: Mapping[str, str]) -> None:
    """Accounts ``{user id: e-mail}``, active."""
    if users:
        await collection(ACCOUNTS).bulk_write(
            [UpdateOne({"_id": u}, {"$set": {"email": e, "name": u, "status": "active"}}, upsert=True)
             for u, e in users.items()]  # fmt: skip
        )


async def ensure_indexes() -> None:
    await ensure_collections(ACCOUNTS, SUBSCRIPTIONS, LEDGER)
    await collection(ACCOUNTS).create_index("email", unique=True, name="email_unique")
