"""Billing service (database ``billing``): invoices, credit notes and payment retries.

Documents are voided or cancelled rather than deleted, as accounting requires:
a compensation shows up as a status change.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any

from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import DuplicateKeyError

from essential import StepFailed

from .db import collection, ensure_collections, now
from .ledger import apply_once, undo_once

INVOICES = "billing.invoices"
CREDIT_NOTES = "billing.credit_notes"
RETRIES = "billing.payment_retries"
LEDGER = "billing.operations"


async def _issue(session: AsyncClientSession, bucket: str, doc: dict[str, Any]) -> None:
    try:
        await collection(bucket).insert_one({**doc, "status": "issued", "issued_at": now()}, session=session)
    except DuplicateKeyError:
        raise StepFailed(f"{bucket} document {doc['_id']!r} already exists") from None


async def _set_status(session: AsyncClientSession, bucket: str, doc_id: str, status: str) -> dict[str, Any]:
    await collection(bucket).update_one(
        {"_id": doc_id}, {"$set": {"status": status, f"{status}_at": now()}}, session=session
    )
    return {"document": doc_id, "status": status}


async def create_invoice(key: str, order_id: str, customer: str, amount: int) -> dict[str, Any]:
    """Issue invoice ``INV-<order>``; one invoice per order."""
    number = f"INV-{order_id}"

    async def effect(session: AsyncClientSession) -> dict[str, Any]:
        await _issue(session, INVOICES, {"_id": number, "order": order_id, "customer": customer, "amount": amount})
        return {"document": number, "status": "issued", "amount": amount}

    return await apply_once(LEDGER, key, "invoice", effect)


async def void_invoice(key: str) -> dict[str, Any]:
    """Compensation of :func:`create_invoice`."""

    async def undo(session: AsyncClientSession, forward: dict[str, Any]) -> dict[str, Any]:
        return await _set_status(session, INVOICES, forward["document"], "void")

    return await undo_once(LEDGER, key, "void_invoice", undo)


async def issue_credit_note(key: str, refund_id: str, order_id: str, customer: str, amount: int) -> dict[str, Any]:
    """Issue credit note ``CN-<refund>`` for a refund."""
    number = f"CN-{refund_id}"

    async def effect(session: AsyncClientSession) -> dict[str, Any]:
        doc = {"_id": number, "order": order_id, "customer": customer, "amount": amount}
        await _issue(session, CREDIT_NOTES, doc)
        return {"document": number, "status": "issued", "amount": amount}

    return await apply_once(LEDGER, key, "credit_note", effect)


async def void_credit_note(key: str) -> dict[str, Any]:
    """Compensation of :func:`issue_credit_note`."""

    async def undo(session: AsyncClientSession, forward: dict[str, Any]) -> dict[str, Any]:
        return await _set_status(session, CREDIT_NOTES, forward["document"], "void")

    return await undo_once(LEDGER, key, "void_credit_note", undo)


async def schedule_retry(key: str, user_id: str, plan: str, amount: int, hours: float) -> dict[str, Any]:
    """Schedule another charge attempt ``hours`` from now (a dunning job picks up due retries)."""

    async def effect(session: AsyncClientSession) -> dict[str, Any]:
        due = now() + timedelta(hours=hours)
        await collection(RETRIES).insert_one(
            {"_id": key, "user": user_id, "plan": plan, "amount": amount, "due_at": due,
             "status": "scheduled", "created_at": now()},  # fmt: skip
            session=session,
        )
        return {"retry": key, "due_at": due.isoformat(), "status": "scheduled"}

    return await apply_once(LEDGER, key, "schedule_retry", effect)


async def cancel_retry(key: str) -> dict[str, Any]:
    """Compensation of :func:`schedule_retry`."""

    async def undo(session: AsyncClientSession, forward: dict[str, Any]) -> dict[str, Any]:
        return await _set_status(session, RETRIES, forward["retry"], "cancelled")

    return await undo_once(LEDGER, key, "cancel_retry", undo)


async def ensure_indexes() -> None:
    await ensure_collections(INVOICES, CREDIT_NOTES, RETRIES, LEDGER)
    await collection(INVOICES).create_index("order")
    await collection(RETRIES).create_index([("status", 1), ("due_at", 1)])
