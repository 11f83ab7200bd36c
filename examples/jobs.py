"""The specification's use cases as jobs (registered from ``ESSENTIAL_JOB_MODULES``, default this module).

Each step calls one small service in :mod:`examples.services` with the step's
idempotency key, so a step re-run after a crash has its effect once, and each
compensation undoes exactly what its step recorded (or nothing, if it never
happened).  Amounts are integer cents.  Every payload also accepts the fault
fields of :class:`examples.faults.FaultInjection` (``fail_at``, ``crash_after``,
``fail_undo_at``, ``slow_ms``).

Where the business process calls for more than a chain:

* ``logistic:shipment`` books cargo space, a vehicle and a driver **in parallel**;
* ``bank:transfer`` **locks** both wallets (bucket ``financial.wallets``) for the
  whole saga, so two transfers touching a wallet never interleave, and moves the money in
  **transactional steps** (the wallet's writes commit with the step's checkpoint: exactly once);
* ``payment:subscription`` with ``retries`` > 0 notifies the user of a declined
  charge and charges again ``retry_in_hours`` later (a **durable timer**, ``RetryLater``);
* ``user:onboarding`` with ``verify_identity`` **waits for the signal**
  ``identity.verified`` (a reviewer's decision) before opening the wallet;
* ``order:fulfillment`` with ``ship`` starts a ``logistic:shipment`` as a
  **child saga**: if the order is compensated, so is its shipment.
"""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from essential import Job, Lock, RetryLater, RetryPolicy, StepContext, StepFailed

from .faults import FaultInjection, inject_faults
from .services import identity, inventory, invoicing, logistics, notifications, orders, wallet

Id = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@-]*$")]
Cents = Annotated[int, Field(gt=0, le=10**12, description="amount in cents")]
Email = Annotated[str, StringConstraints(max_length=254, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")]

# Steps here are a few milliseconds of MongoDB work: retry quickly, give up after 10 s.
FAST: dict[str, Any] = {"retry": RetryPolicy(attempts=3, backoff=0.02, max_backoff=0.5), "timeout": 10.0}
Result = dict[str, Any]


class Line(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sku: Id
    qty: int = Field(gt=0, le=100_000)


# --------------------------------------------------------------------------- order:fulfillment
class Delivery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    route: Id
    volume: int = Field(gt=0, le=1_000_000, description="cargo units")


class OrderPayload(FaultInjection):
    order_id: Id
    customer: Id = Field(description="the customer's wallet id and message recipient")
    items: list[Line] = Field(min_length=1, max_length=100)
    amount: Cents
    ship: Delivery | None = Field(None, description="ship the goods: a logistic:shipment child saga")


order_fulfillment: Job[OrderPayload] = Job(
    "order:fulfillment", payload=OrderPayload, ttl=300,
    description="reserve stock, charge the wallet, invoice, confirm, mark the order paid",
)  # fmt: skip


@order_fulfillment.step(bucket="inventory.stocks", action="update", **FAST)
async def reserve_stock(ctx: StepContext[OrderPayload]) -> Result:
    return await inventory.reserve(ctx.idempotency_key, ctx.payload.items)


@reserve_stock.compensation
async def release_stock(ctx: StepContext[OrderPayload], _reserved: Any) -> Result:
    return await inventory.release(ctx.idempotency_key)


@order_fulfillment.step(bucket="financial.wallets", action="update", **FAST)
async def charge_wallet(ctx: StepContext[OrderPayload]) -> Result:
    p = ctx.payload
    return await wallet.debit(ctx.idempotency_key, p.customer, p.amount, memo=f"order {p.order_id}")


@charge_wallet.compensation
async def refund_wallet(ctx: StepContext[OrderPayload], _charged: Any) -> Result:
    return await wallet.reverse(ctx.idempotency_key)


@order_fulfillment.step(bucket="billing.invoices", action="create", **FAST)
async def create_invoice(ctx: StepContext[OrderPayload]) -> Result:
    p = ctx.payload
    return await invoicing.create_invoice(ctx.idempotency_key, p.order_id, p.customer, p.amount)


@create_invoice.compensation
async def void_invoice(ctx: StepContext[OrderPayload], _invoice: Any) -> Result:
    return await invoicing.void_invoice(ctx.idempotency_key)


def _ships(ctx: StepContext[OrderPayload]) -> bool:
    return ctx.payload.ship is not None


def _shipment_for(ctx: StepContext[OrderPayload]) -> dict[str, Any]:
    p = ctx.payload
    assert p.ship is not None
    return {"shipment_id": f"ship-{p.order_id}", "route": p.ship.route, "volume": p.ship.volume}


# a child saga: compensating the order compensates the shipment (cargo space, vehicle, driver)
order_fulfillment.child("ship", job="logistic:shipment", payload=_shipment_for, when=_ships)


@order_fulfillment.step(bucket="notify.messages", action="create", **FAST)
async def send_confirmation(ctx: StepContext[OrderPayload]) -> Result:
    p = ctx.payload
    return await notifications.send(
        ctx.idempotency_key, p.customer, "order_confirmed", order=p.order_id, amount=p.amount
    )


@send_confirmation.compensation
async def send_cancellation(ctx: StepContext[OrderPayload], _sent: Any) -> Result:
    return await notifications.send_correction(ctx.idempotency_key, "order_cancelled", order=ctx.payload.order_id)


@order_fulfillment.step(bucket="sales.orders", action="update", **FAST)
async def mark_order_paid(ctx: StepContext[OrderPayload]) -> Result:
    p = ctx.payload
    items = [line.model_dump() for line in p.items]
    return await orders.mark_paid(ctx.idempotency_key, p.order_id, p.customer, p.amount, items)


@mark_order_paid.compensation
async def cancel_order(ctx: StepContext[OrderPayload], _paid: Any) -> Result:
    return await orders.cancel(ctx.idempotency_key)


# --------------------------------------------------------------------------- bank:transfer
class TransferPayload(FaultInjection):
    transfer_id: Id
    source: Id
    target: Id
    amount: Cents

    @model_validator(mode="after")
    def _two_wallets(self) -> "TransferPayload":
        if self.source == self.target:
            raise ValueError("source and target must be different wallets")
        return self


bank_transfer: Job[TransferPayload] = Job(
    "bank:transfer", payload=TransferPayload, ttl=120,
    description="debit the source, credit the target, record the transfer, notify",
)  # fmt: skip


def _both_wallets(ctx: StepContext[TransferPayload]) -> list[str]:
    return [ctx.payload.source, ctx.payload.target]


# Both wallets are locked from the debit until the transfer ends (taken together, so two
# transfers in opposite directions cannot deadlock); another transfer on either waits.
# The money moves in transactional steps: the wallet service's writes commit in the transaction
# that records the step (ctx.session), so each is applied exactly once, and a failed attempt
# leaves nothing behind.
@bank_transfer.step(bucket="financial.wallets", action="update", lock=Lock(keys=_both_wallets), transactional=True,
                    **FAST)  # fmt: skip
async def debit(ctx: StepContext[TransferPayload]) -> Result:
    p = ctx.payload
    return await wallet.debit(ctx.idempotency_key, p.source, p.amount, memo=f"transfer {p.transfer_id} to {p.target}",
                              session=ctx.session)  # fmt: skip


@debit.compensation
async def undo_debit(ctx: StepContext[TransferPayload], _res: Any) -> Result:
    return await wallet.reverse(ctx.idempotency_key, session=ctx.session)


@bank_transfer.step(bucket="financial.wallets", action="update", transactional=True, **FAST)
async def credit(ctx: StepContext[TransferPayload]) -> Result:
    p = ctx.payload
    memo = f"transfer {p.transfer_id} from {p.source}"
    return await wallet.credit(ctx.idempotency_key, p.target, p.amount, memo=memo, session=ctx.session)


@credit.compensation
async def undo_credit(ctx: StepContext[TransferPayload], _res: Any) -> Result:
    return await wallet.reverse(ctx.idempotency_key, session=ctx.session)


@bank_transfer.step(bucket="financial.transfers", action="create", transactional=True, **FAST)
async def record_transaction(ctx: StepContext[TransferPayload]) -> Result:
    p = ctx.payload
    return await wallet.record_transfer(ctx.idempotency_key, p.transfer_id, p.source, p.target, p.amount,
                                        session=ctx.session)  # fmt: skip


@record_transaction.compensation
async def reverse_transaction(ctx: StepContext[TransferPayload], _res: Any) -> Result:
    return await wallet.void_transfer(ctx.idempotency_key, session=ctx.session)


@bank_transfer.step(bucket="notify.messages", action="create", name="notify", **FAST)
async def notify_transfer(ctx: StepContext[TransferPayload]) -> Result:
    p = ctx.payload
    return await notifications.send(ctx.idempotency_key, p.source, "transfer_sent",
                                    transfer=p.transfer_id, to=p.target, amount=p.amount)  # fmt: skip


# --------------------------------------------------------------------------- payment:subscription
class SubscriptionPayload(FaultInjection):
    user_id: Id
    wallet: Id
    plan: Id
    amount: Cents
    days: int = Field(30, gt=0, le=3660, description="access bought by the payment")
    retry_in_hours: float = Field(24.0, gt=0, le=24 * 90, description="when to charge again after a decline")
    retries: int = Field(
        0, ge=0, le=10,
        description="charge again this many times, retry_in_hours apart, inside the saga (a durable timer) "
        "before giving up; 0 leaves the retry to billing (schedule_retry)",
    )  # fmt: skip


subscription_payment: Job[SubscriptionPayload] = Job(
    "payment:subscription", payload=SubscriptionPayload, ttl=120,
    description="charge; extend access when paid, else notify and schedule a retry",
)  # fmt: skip


def _paid(ctx: StepContext[SubscriptionPayload]) -> bool:
    return bool(ctx.results["charge"]["ok"])


def _declined(ctx: StepContext[SubscriptionPayload]) -> bool:
    return not _paid(ctx)


@subscription_payment.step(bucket="financial.wallets", action="update", **FAST)
async def charge(ctx: StepContext[SubscriptionPayload]) -> Result:
    """A declined charge is a result (``ok: False``), not a failure: the process goes on differently.

    With ``retries`` left (and time left in the saga's TTL), the user is told and the
    charge runs again ``retry_in_hours`` later: ``RetryLater`` is a durable timer, so
    the saga holds no actor meanwhile and survives restarts; the new round gets a new
    idempotency key, so it is a new charge attempt.
    """
    p = ctx.payload
    result = await wallet.debit(
        ctx.idempotency_key, p.wallet, p.amount, memo=f"subscription {p.plan}", decline_as_result=True
    )
    delay = p.retry_in_hours * 3600
    if not result["ok"] and ctx.deferred < p.retries and delay < ctx.remaining:
        await notifications.send(
            f"{ctx.idempotency_key}:declined", p.user_id, "payment_retry", plan=p.plan, amount=p.amount,
            reason=result.get("reason"), retry_in_hours=p.retry_in_hours, attempt=ctx.deferred + 1,
        )  # fmt: skip
        raise RetryLater(delay, reason=f"card declined ({result.get('reason')}); charging again later")
    return result


@charge.compensation
async def refund_charge(ctx: StepContext[SubscriptionPayload], _res: Any) -> Result:
    return await wallet.reverse(ctx.idempotency_key)


@subscription_payment.step(bucket="users.subscriptions", action="update", when=_paid, **FAST)
async def extend_access(ctx: StepContext[SubscriptionPayload]) -> Result:
    p = ctx.payload
    return await identity.extend_access(ctx.idempotency_key, p.user_id, p.plan, p.days)


@extend_access.compensation
async def restore_access(ctx: StepContext[SubscriptionPayload], _res: Any) -> Result:
    return await identity.restore_access(ctx.idempotency_key)


@subscription_payment.step(bucket="notify.messages", action="create", when=_declined, **FAST)
async def notify_failure(ctx: StepContext[SubscriptionPayload]) -> Result:
    p = ctx.payload
    reason = ctx.results["charge"].get("reason")
    return await notifications.send(
        ctx.idempotency_key, p.user_id, "payment_failed", plan=p.plan, amount=p.amount, reason=reason
    )


@subscription_payment.step(bucket="billing.payment_retries", action="create", when=_declined, **FAST)
async def schedule_retry(ctx: StepContext[SubscriptionPayload]) -> Result:
    p = ctx.payload
    return await invoicing.schedule_retry(ctx.idempotency_key, p.user_id, p.plan, p.amount, p.retry_in_hours)


@schedule_retry.compensation
async def cancel_retry(ctx: StepContext[SubscriptionPayload], _res: Any) -> Result:
    return await invoicing.cancel_retry(ctx.idempotency_key)


# --------------------------------------------------------------------------- logistic:shipment
class ShipmentPayload(FaultInjection):
    shipment_id: Id
    route: Id
    volume: int = Field(gt=0, le=1_000_000, description="cargo units")


shipment: Job[ShipmentPayload] = Job(
    "logistic:shipment", payload=ShipmentPayload, ttl=300,
    description="reserve cargo space, assign a vehicle and a driver, dispatch",
)  # fmt: skip


# Cargo space, a vehicle and a driver are booked at the same time; if one cannot be had,
# the others that were booked are released (then nothing before the group: it is first).
with shipment.parallel("allocate"):

    @shipment.step(bucket="logistic.routes", action="update", **FAST)
    async def reserve_cargo_space(ctx: StepContext[ShipmentPayload]) -> Result:
        p = ctx.payload
        return await logistics.reserve_space(ctx.idempotency_key, p.shipment_id, p.route, p.volume)

    @reserve_cargo_space.compensation
    async def release_cargo_space(ctx: StepContext[ShipmentPayload], _res: Any) -> Result:
        return await logistics.release_space(ctx.idempotency_key)

    @shipment.step(bucket="logistic.vehicles", action="update", **FAST)
    async def assign_vehicle(ctx: StepContext[ShipmentPayload]) -> Result:
        return await logistics.assign_vehicle(ctx.idempotency_key, ctx.payload.shipment_id, ctx.payload.volume)

    @assign_vehicle.compensation
    async def release_vehicle(ctx: StepContext[ShipmentPayload], _res: Any) -> Result:
        return await logistics.release_vehicle(ctx.idempotency_key)

    @shipment.step(bucket="logistic.drivers", action="update", **FAST)
    async def assign_driver(ctx: StepContext[ShipmentPayload]) -> Result:
        return await logistics.assign_driver(ctx.idempotency_key, ctx.payload.shipment_id)

    @assign_driver.compensation
    async def release_driver(ctx: StepContext[ShipmentPayload], _res: Any) -> Result:
        return await logistics.release_driver(ctx.idempotency_key)


@shipment.step(bucket="logistic.shipments", action="update", **FAST)
async def dispatch(ctx: StepContext[ShipmentPayload]) -> Result:
    vehicle, driver = ctx.results["assign_vehicle"]["vehicle"], ctx.results["assign_driver"]["driver"]
    return await logistics.dispatch(ctx.idempotency_key, ctx.payload.shipment_id, vehicle=vehicle, driver=driver)


@dispatch.compensation
async def recall_shipment(ctx: StepContext[ShipmentPayload], _res: Any) -> Result:
    return await logistics.recall(ctx.idempotency_key)


# --------------------------------------------------------------------------- user:onboarding
class OnboardingPayload(FaultInjection):
    user_id: Id
    email: Email
    name: str = Field(min_length=1, max_length=200)
    welcome_credit: int = Field(0, ge=0, le=10**9, description="cents put in the new wallet")
    verify_identity: bool = Field(
        False, description="a reviewer must approve the identity documents (signal identity.verified) first"
    )
    review_hours: float = Field(72.0, gt=0, le=24 * 30, description="how long the review may take")


onboarding: Job[OnboardingPayload] = Job(
    "user:onboarding", payload=OnboardingPayload, ttl=300,
    description="create the account, provision its wallet, send the welcome message",
)  # fmt: skip


@onboarding.step(bucket="users.accounts", action="create", **FAST)
async def create_account(ctx: StepContext[OnboardingPayload]) -> Result:
    p = ctx.payload
    return await identity.create_account(ctx.idempotency_key, p.user_id, p.email, p.name)


@create_account.compensation
async def delete_account(ctx: StepContext[OnboardingPayload], _res: Any) -> Result:
    return await identity.delete_account(ctx.idempotency_key)


def _needs_review(ctx: StepContext[OnboardingPayload]) -> bool:
    return ctx.payload.verify_identity


# Waits (holding no actor) for the reviewer's decision: client.signal(saga_id, "identity.verified",
# {"approved": true, "by": "..."}) or the same over Kafka/HTTP.  No decision in time, or a
# rejection, fails the step and the account is deleted again.
identity_verification = onboarding.wait_for(
    "identity.verified", name="identity_verification", when=_needs_review,
    timeout=lambda ctx: ctx.payload.review_hours * 3600,
)  # fmt: skip


@identity_verification.on_signal
async def review_decision(ctx: StepContext[OnboardingPayload]) -> Result:
    decision = ctx.signal if isinstance(ctx.signal, dict) else {}
    if not decision.get("approved"):
        raise StepFailed(f"identity verification rejected: {decision.get('reason') or 'no reason given'}")
    return {"approved": True, "by": decision.get("by"), "user": ctx.payload.user_id}


@onboarding.step(bucket="financial.wallets", action="create", **FAST)
async def provision_wallet(ctx: StepContext[OnboardingPayload]) -> Result:
    p = ctx.payload
    return await wallet.open_wallet(ctx.idempotency_key, p.user_id, p.user_id, p.welcome_credit)


@provision_wallet.compensation
async def close_wallet(ctx: StepContext[OnboardingPayload], _res: Any) -> Result:
    return await wallet.close_wallet(ctx.idempotency_key)


@onboarding.step(bucket="notify.messages", action="create", **FAST)
async def send_welcome(ctx: StepContext[OnboardingPayload]) -> Result:
    p = ctx.payload
    return await notifications.send(ctx.idempotency_key, p.user_id, "welcome", name=p.name, email=p.email)


# --------------------------------------------------------------------------- order:refund
class RefundPayload(FaultInjection):
    refund_id: Id
    order_id: Id
    customer: Id
    items: list[Line] = Field(default_factory=list, max_length=100, description="returned goods (may be none)")
    amount: Cents


refund: Job[RefundPayload] = Job(
    "order:refund", payload=RefundPayload, ttl=300,
    description="restock returned goods, refund the wallet, issue a credit note, notify",
)  # fmt: skip


@refund.step(bucket="inventory.stocks", action="update", **FAST)
async def restock(ctx: StepContext[RefundPayload]) -> Result:
    return await inventory.restock(ctx.idempotency_key, ctx.payload.items)


@restock.compensation
async def unrestock(ctx: StepContext[RefundPayload], _res: Any) -> Result:
    return await inventory.unrestock(ctx.idempotency_key)


@refund.step(bucket="financial.wallets", action="update", name="refund_wallet", **FAST)
async def refund_to_wallet(ctx: StepContext[RefundPayload]) -> Result:
    p = ctx.payload
    memo = f"refund {p.refund_id} of order {p.order_id}"
    return await wallet.credit(ctx.idempotency_key, p.customer, p.amount, memo=memo)


@refund_to_wallet.compensation
async def take_back_refund(ctx: StepContext[RefundPayload], _res: Any) -> Result:
    return await wallet.reverse(ctx.idempotency_key)


@refund.step(bucket="billing.credit_notes", action="create", **FAST)
async def credit_note(ctx: StepContext[RefundPayload]) -> Result:
    p = ctx.payload
    return await invoicing.issue_credit_note(ctx.idempotency_key, p.refund_id, p.order_id, p.customer, p.amount)


@credit_note.compensation
async def void_credit_note(ctx: StepContext[RefundPayload], _res: Any) -> Result:
    return await invoicing.void_credit_note(ctx.idempotency_key)


@refund.step(bucket="notify.messages", action="create", name="notify", **FAST)
async def notify_refund(ctx: StepContext[RefundPayload]) -> Result:
    p = ctx.payload
    return await notifications.send(
        ctx.idempotency_key, p.customer, "refund_issued", refund=p.refund_id, amount=p.amount
    )


for _job in (order_fulfillment, bank_transfer, subscription_payment, shipment, onboarding, refund):
    inject_faults(_job)
del _job
