"""The soak's workload: a seeded, mixed batch of the example jobs and what each saga must end as.

Why seeded and not :func:`examples.data.sample_payload`: that helper draws its ids from
``uuid4``, so two runs with the same ``--seed`` would differ; a failing soak must be
repeatable.  The payloads have the same shape and run against :func:`examples.data.seed_demo`.

Every saga gets an idempotency key (``soak-<seed>-<n>``), so a start that is retried
(the supervisor was killed under the call, a Kafka command was redelivered) can never
start it twice, and the audit can tell the soak's sagas from anything else.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from examples.data import DEMO_BROKE, DEMO_CUSTOMERS, DEMO_ROUTES, DEMO_SKUS

#: relative weights of the jobs in the batch
JOB_WEIGHTS: dict[str, int] = {
    "order:fulfillment": 30,
    "bank:transfer": 18,
    "payment:subscription": 12,
    "logistic:shipment": 12,
    "user:onboarding": 14,
    "order:refund": 14,
}
#: steps that run in every saga of the job (no ``when``), where faults may be injected
ALWAYS_RUN: dict[str, list[str]] = {
    "order:fulfillment": ["reserve_stock", "charge_wallet", "create_invoice", "send_confirmation", "mark_order_paid"],
    "bank:transfer": ["debit", "credit", "record_transaction", "notify"],
    "payment:subscription": ["charge", "extend_access"],  # extend_access: only when the charge is paid
    "logistic:shipment": ["reserve_cargo_space", "assign_vehicle", "assign_driver", "dispatch"],
    "user:onboarding": ["create_account", "provision_wallet", "send_welcome"],
    "order:refund": ["restock", "refund_wallet", "credit_note", "notify"],
}
#: one saga in this many fails a step on every attempt (so it compensates), one in this many crashes after an effect
FAIL_SHARE = 0.12
CRASH_SHARE = 0.12
#: the TTL runs from creation, through admission; the soak is about crashes, not expiry
TTL = 900.0


@dataclass
class PlannedSaga:
    """One saga the soak starts, how, when, and the state it must end in."""

    n: int
    job: str
    payload: dict[str, Any]
    scenario: str
    expected: str  # "completed" | "aborted"
    via: str  # "client" | "kafka"
    key: str
    at: float  # seconds into the traffic window
    ttl: float = TTL
    #: a signal the soak delivers right after the start (stored durably even before the saga waits)
    signal: tuple[str, dict[str, Any]] | None = None
    saga_id: str = ""
    start_attempts: int = 0
    sent_at: list[float] = field(default_factory=list)  # Kafka: monotonic times of each send
    answered_after: float | None = None  # client: seconds from the scheduled start until the supervisor answered

    @property
    def ships(self) -> bool:
        return self.job == "order:fulfillment" and self.payload.get("ship") is not None


def build_plan(rng: random.Random, seed: int, sagas: int, kafka: int, window: float) -> list[PlannedSaga]:
    """``sagas`` sagas, ``kafka`` of them started by Kafka commands, spread over ``window`` seconds."""
    jobs = list(JOB_WEIGHTS)
    weights = [JOB_WEIGHTS[j] for j in jobs]
    plan: list[PlannedSaga] = []
    for n in range(sagas):
        job = rng.choices(jobs, weights)[0]
        payload, scenario, expected, signal = _payload(rng, seed, n, job)
        plan.append(PlannedSaga(n, job, payload, scenario, expected, "client", f"soak-{seed}-{n:03d}", 0.0,
                                signal=signal))  # fmt: skip
    # Kafka starts: any saga that needs no signal (the soak would have to look its id up first)
    eligible = [p for p in plan if p.signal is None]
    for item in rng.sample(eligible, min(kafka, len(eligible))):
        item.via = "kafka"
    times = sorted(rng.uniform(0.0, window) for _ in plan)
    order = list(plan)
    rng.shuffle(order)
    for item, at in zip(order, times):
        item.at = round(at, 3)
    return sorted(plan, key=lambda p: p.at)


def _payload(
    rng: random.Random, seed: int, n: int, job: str
) -> tuple[dict[str, Any], str, str, tuple[str, dict[str, Any]] | None]:
    uid = f"{seed}-{n:03d}"
    customer, other = rng.sample(DEMO_CUSTOMERS, 2)
    items = [{"sku": sku, "qty": rng.randint(1, 3)} for sku in rng.sample(DEMO_SKUS, rng.randint(1, 3))]
    amount = rng.randrange(500, 5000, 50)
    signal: tuple[str, dict[str, Any]] | None = None
    scenario, expected = "happy path", "completed"
    steps = list(ALWAYS_RUN[job])
    if job == "order:fulfillment":
        payload: dict[str, Any] = {"order_id": f"o-{uid}", "customer": customer, "amount": amount, "items": items}
        if rng.random() < 0.33:
            payload["ship"] = {"route": rng.choice(DEMO_ROUTES), "volume": rng.choice([5, 10, 20])}
            scenario = "ships (child saga)"
    elif job == "bank:transfer":
        payload = {"transfer_id": f"t-{uid}", "source": customer, "target": other, "amount": amount}
    elif job == "payment:subscription":
        payload = {"user_id": customer, "wallet": customer, "plan": rng.choice(["pro", "team"]), "amount": amount}
        if rng.random() < 0.25:  # declined, charged again a second later (durable timer), then billing retries
            payload.update(user_id=DEMO_BROKE, wallet=DEMO_BROKE, retries=1, retry_in_hours=1 / 3600)
            return payload, "declined → retry (durable timer)", "completed", None
    elif job == "logistic:shipment":
        payload = {"shipment_id": f"s-{uid}", "route": rng.choice(DEMO_ROUTES), "volume": rng.choice([5, 10, 20])}
    elif job == "user:onboarding":
        payload = {"user_id": f"u-{uid}", "email": f"u-{uid}@example.com", "name": f"Soak User {n}",
                   "welcome_credit": rng.choice([0, 500, 1000])}  # fmt: skip
        if rng.random() < 0.3:
            payload["verify_identity"] = True
            approved = rng.random() < 0.7
            decision: dict[str, Any] = {"approved": approved, "by": "soak-reviewer"}
            if not approved:
                decision["reason"] = "documents do not match"
            signal = ("identity.verified", decision)
            scenario = f"identity review (signal): {'approved' if approved else 'rejected'}"
            expected = "completed" if approved else "aborted"
    else:  # order:refund
        payload = {"refund_id": f"r-{uid}", "order_id": f"o-r-{uid}", "customer": customer, "amount": amount,
                   "items": items}  # fmt: skip
    roll = rng.random()
    if roll < FAIL_SHARE:
        step = rng.choice(steps)
        payload["fail_at"] = step
        scenario = f"{step} fails" + (" (child compensated)" if payload.get("ship") else "")
        expected = "aborted"
    elif roll < FAIL_SHARE + CRASH_SHARE:
        step = rng.choice(steps)
        payload["crash_after"] = step
        scenario = f"crash after {step}" + (" (ships)" if payload.get("ship") else "")
    if rng.random() < 0.3:  # keeps sagas in flight longer, so more kills land mid-step
        payload["slow_ms"] = rng.choice([100, 250, 500])
    return payload, scenario, expected, signal
