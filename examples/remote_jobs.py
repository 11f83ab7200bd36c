"""Example jobs with a step carried out by a participant service over Kafka.

``order:remote-fulfillment`` is ``order:fulfillment`` with the wallet charge
done by the payment service (:mod:`examples.participant_service`) instead of
in-process: the step sends a command to ``payments.commands`` and completes on
the service's reply.  Register it with
``ESSENTIAL_JOB_MODULES=examples.jobs,examples.remote_jobs`` and run the
service next to the gateway.
"""
from __future__ import annotations

from typing import Any

from pydantic import Field

from essential import Job, StepContext, kafka_step

from .faults import inject_faults
from .jobs import FAST, OrderPayload, Result
from .participant_service import TOPIC as PAYMENTS
from .services import inventory, invoicing, notifications


class RemoteOrderPayload(OrderPayload):
    silent: bool = Field(False, description="the payment service drops the charge: the step times out")
    reply_delay_ms: int = Field(0, ge=0, le=600_000, description="the payment service waits before charging")


def _charge(ctx: StepContext[RemoteOrderPayload]) -> dict[str, Any]:
    p = ctx.payload
    return {"customer": p.customer, "amount": p.amount, "memo": f"order {p.order_id}",
            "silent": p.silent, "reply_delay_ms": p.reply_delay_ms}  # fmt: skip


remote_order: Job[RemoteOrderPayload] = Job(
    "order:remote-fulfillment", payload=RemoteOrderPayload, ttl=300,
    description="reserve stock, charge through the payment service over Kafka, invoice, confirm",
)  # fmt: skip


@remote_order.step(bucket="inventory.stocks", action="update", **FAST)
async def reserve_stock(ctx: StepContext[RemoteOrderPayload]) -> Result:
    return await inventory.reserve(ctx.idempotency_key, ctx.payload.items)


@reserve_stock.compensation
async def release_stock(ctx: StepContext[RemoteOrderPayload], _reserved: Any) -> Result:
    return await inventory.release(ctx.idempotency_key)


kafka_step(remote_order, name="charge_wallet", bucket="financial.wallets", topic=PAYMENTS, reply_timeout=30,
           build=_charge)  # fmt: skip


@remote_order.step(bucket="billing.invoices", action="create", **FAST)
async def create_invoice(ctx: StepContext[RemoteOrderPayload]) -> Result:
    p = ctx.payload
    return await invoicing.create_invoice(ctx.idempotency_key, p.order_id, p.customer, p.amount)


@create_invoice.compensation
async def void_invoice(ctx: StepContext[RemoteOrderPayload], _invoice: Any) -> Result:
    return await invoicing.void_invoice(ctx.idempotency_key)


@remote_order.step(bucket="notify.messages", action="create", **FAST)
async def send_confirmation(ctx: StepContext[RemoteOrderPayload]) -> Result:
    p = ctx.payload
    return await notifications.send(
        ctx.idempotency_key, p.customer, "order_confirmed", order=p.order_id, amount=p.amount
    )


inject_faults(remote_order)
