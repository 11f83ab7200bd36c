"""Financial service (database ``financial``): wallets and their transaction journal.

``wallets``: ``{_id: wallet, owner, balance}`` in integer cents (no float drift).
``transactions``: the journal and this service's ledger – one entry per
idempotency key with the signed ``amount`` it moved, so a wallet's balance is
its opening balance plus the sum of its entries.  ``transfers``: one record per
completed bank transfer.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pymongo import ReturnDocument, UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import DuplicateKeyError

from essential import StepFailed

from .db import collection, ensure_collections, now
from .ledger import apply_once, undo_once

WALLETS = "financial.wallets"
JOURNAL = "financial.transactions"
TRANSFERS = "financial.transfers"
LEDGER = "financial.operations"  # non-money operations (transfer records)


class FundsConflict(RuntimeError):
    """Retryable: money an undo must take back has been spent meanwhile."""


async def _move(session: AsyncClientSession, wallet: str, amount: int) -> int | None:
    """Add ``amount`` (negative takes) unless the balance would go negative; the new balance or None."""
    query: dict[str, Any] = {"_id": wallet}
    if amount < 0:
        query["balance"] = {"$gte": -amount}
    doc = await collection(WALLETS).find_one_and_update(
        query, {"$inc": {"balance": amount}}, return_document=ReturnDocument.AFTER, session=session
    )
    return None if doc is None else int(doc["balance"])


async def _require(session: AsyncClientSession, wallet: str) -> None:
    if await collection(WALLETS).find_one({"_id": wallet}, {"_id": 1}, session=session) is None:
        raise StepFailed(f"unknown wallet {wallet!r}")


async def debit(
    key: str, wallet: str, amount: int, memo: str = "", *, decline_as_result: bool = False,
    session: AsyncClientSession | None = None,
) -> dict[str, Any]:
    """Take ``amount`` cents.  Insufficient funds is a business failure: raised as
    :class:`StepFailed`, or returned as ``{"ok": False}`` with ``decline_as_result``
    (for processes that go on differently after a declined payment)."""

    async def effect(session: AsyncClientSession) -> dict[str, Any]:
        balance = await _move(session, wallet, -amount)
        if balance is not None:
            return {"ok": True, "wallet": wallet, "amount": -amount, "balance": balance, "memo": memo}
        await _require(session, wallet)
        if not decline_as_result:
            raise StepFailed(f"insufficient funds in wallet {wallet!r}: {amount} cents needed")
        return {"ok": False, "wallet": wallet, "amount": 0, "requested": amount,
                "reason": "insufficient_funds", "memo": memo}  # fmt: skip

    return await apply_once(JOURNAL, key, "debit", effect, session)


async def credit(
    key: str, wallet: str, amount: int, memo: str = "", *, session: AsyncClientSession | None = None
) -> dict[str, Any]:
    """Add ``amount`` cents to an existing wallet (``session``: in a transactional step's checkpoint)."""

    async def effect(session: AsyncClientSession) -> dict[str, Any]:
        balance = await _move(session, wallet, amount)
        if balance is None:
            raise StepFailed(f"unknown wallet {wallet!r}")
        return {"ok": True, "wallet": wallet, "amount": amount, "balance": balance, "memo": memo}

    return await apply_once(JOURNAL, key, "credit", effect, session)


async def reverse(key: str, *, session: AsyncClientSession | None = None) -> dict[str, Any]:
    """Compensation of :func:`debit` or :func:`credit`: move the recorded amount back."""

    async def undo(session: AsyncClientSession, forward: dict[str, Any]) -> dict[str, Any]:
        moved = int(forward.get("amount", 0))
        if moved == 0:
            return {"undone": False, "reason": "no money was moved", "wallet": forward.get("wallet"), "amount": 0}
        balance = await _move(session, forward["wallet"], -moved)
        if balance is None:
            raise FundsConflict(f"wallet {forward['wallet']!r} no longer holds the {moved} cents to take back")
        return {"wallet": forward["wallet"], "amount": -moved, "balance": balance}

    return await undo_once(JOURNAL, key, "reverse", undo, session)


async def open_wallet(key: str, wallet: str, owner: str, opening: int = 0) -> dict[str, Any]:
    """Create a wallet with an opening balance (journaled as a credit); an existing id is a business failure."""

    async def effect(session: AsyncClientSession) -> dict[str, Any]:
        try:
            await collection(WALLETS).insert_one(
                {"_id": wallet, "owner": owner, "balance": opening, "opened_at": now()}, session=session
            )
        except DuplicateKeyError:
            raise StepFailed(f"wallet {wallet!r} already exists") from None
        return {"wallet": wallet, "owner": owner, "amount": opening, "balance": opening}

    return await apply_once(JOURNAL, key, "open", effect)


async def close_wallet(key: str) -> dict[str, Any]:
    """Compensation of :func:`open_wallet`: delete it, unless it has been used meanwhile (retried)."""

    async def undo(session: AsyncClientSession, forward: dict[str, Any]) -> dict[str, Any]:
        wallets = collection(WALLETS)
        gone = await wallets.delete_one({"_id": forward["wallet"], "balance": forward["amount"]}, session=session)
        if gone.deleted_count == 0 and await wallets.find_one({"_id": forward["wallet"]}, session=session):
            raise FundsConflict(f"wallet {forward['wallet']!r} was used after opening; settle it before closing")
        return {"wallet": forward["wallet"], "amount": -int(forward["amount"])}

    return await undo_once(JOURNAL, key, "close", undo)


async def record_transfer(
    key: str, transfer_id: str, source: str, target: str, amount: int, *, session: AsyncClientSession | None = None
) -> dict[str, Any]:
    """The transfer's own record (statement line); a reused transfer id is a business failure."""

    async def effect(session: AsyncClientSession) -> dict[str, Any]:
        doc = {"_id": transfer_id, "source": source, "target": target, "amount": amount,
               "status": "completed", "at": now()}  # fmt: skip
        try:
            await collection(TRANSFERS).insert_one(doc, session=session)
        except DuplicateKeyError:
            raise StepFailed(f"transfer {transfer_id!r} was already recorded") from None
        return {"transfer": transfer_id, "status": "completed"}

    return await apply_once(LEDGER, key, "record_transfer", effect, session)


async def void_transfer(key: str, *, session: AsyncClientSession | None = None) -> dict[str, Any]:
    """Compensation of :func:`record_transfer`: the record stays, marked reversed."""

    async def undo(session: AsyncClientSession, forward: dict[str, Any]) -> dict[str, Any]:
        await collection(TRANSFERS).update_one(
            {"_id": forward["transfer"]}, {"$set": {"status": "reversed", "reversed_at": now()}}, session=session
        )
        return {"transfer": forward["transfer"], "status": "reversed"}

    return await undo_once(LEDGER, key, "void_transfer", undo, session)


async def seed(wallets: Mapping[str, int]) -> None:
    """Set each wallet's balance in cents (creating it; the owner is the wallet id)."""
    if wallets:
        await collection(WALLETS).bulk_write(
            [UpdateOne({"_id": w}, {"$set": {"balance": int(b)}, "$setOnInsert": {"owner": w}}, upsert=True)
             for w, b in wallets.items()]  # fmt: skip
        )


async def balance(wallet: str) -> int | None:
    doc = await collection(WALLETS).find_one({"_id": wallet})
    return None if doc is None else int(doc["balance"])


async def total() -> int:
    rows = await (await collection(WALLETS).aggregate([{"$group": {"_id": None, "n": {"$sum": "$balance"}}}])).to_list()
    return int(rows[0]["n"]) if rows else 0


async def ensure_indexes() -> None:
    await ensure_collections(WALLETS, JOURNAL, TRANSFERS, LEDGER)
    await collection(JOURNAL).create_index([("wallet", 1), ("at", 1)])
