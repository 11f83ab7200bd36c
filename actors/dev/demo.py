"""``essential demo``: the example business transactions end to end on real servers.

Starts the local stack (embedded MongoDB and Kafka, a Ray head with dashboard),
seeds the example services, runs a mixed batch of every example job with
injected failures (a failing last step, a crash after an effect, an abort in
mid-saga, a TTL expiry, a declined payment retried by a durable timer), and the
flows beyond a chain (shipments booked in parallel, transfers that lock their
wallets, identity reviews approved or rejected by a signal the demo sends while
the saga waits without an actor, an order shipping through a child saga),
shows progress, prints a summary
and checks the data invariants itself: every compensated saga must leave stock
and money exactly as it found them.
"""
from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from essential.actors.dev.quiet import quiet_ray
from essential.actors.dev.stack import examples_importable
from essential.actors.formatting import human_ms
from essential.actors.settings import Settings, get_settings
from essential.actors.stack_record import ray_token_source
from essential.orchestration import IllegalTransition, Saga, SagaState
from essential.orchestration.states import ENDED_STATES, Action

console = Console(width=None if os.isatty(1) else 140)

# the step that fails on every attempt, late in each job, so that most steps are compensated
LATE_FAILURE = {
    "order:fulfillment": "mark_order_paid",
    "bank:transfer": "notify",
    "payment:subscription": "extend_access",
    "logistic:shipment": "dispatch",
    "user:onboarding": "send_welcome",
    "order:refund": "notify",
}
CRASH_AFTER = {
    "order:fulfillment": "charge_wallet",
    "bank:transfer": "credit",
    "payment:subscription": "charge",
    "logistic:shipment": "assign_vehicle",
    "user:onboarding": "provision_wallet",
    "order:refund": "refund_wallet",
}


@dataclass
class Planned:
    job: str
    payload: dict[str, Any]
    scenario: str
    ttl: float | None = None
    abort: bool = False
    saga_id: str = ""
    #: a signal the demo delivers once the saga waits for it: (name, payload)
    signal: tuple[str, dict[str, Any]] | None = None


@dataclass
class Outcome:
    sagas: dict[str, Saga] = field(default_factory=dict)
    compensations: Counter = field(default_factory=Counter)
    retries: Counter = field(default_factory=Counter)
    charged: dict[str, bool] = field(default_factory=dict)


def plan_batch(per_job: int) -> list[Planned]:
    examples_importable()
    from examples.data import DEMO_BROKE, DEMO_ROUTES, sample_payload

    batch: list[Planned] = []
    for job in LATE_FAILURE:
        for i in range(per_job):
            payload = sample_payload(job)
            item = Planned(job, payload, "happy path")
            if i == 0:
                item.payload["fail_at"] = LATE_FAILURE[job]
                item.scenario = f"{LATE_FAILURE[job]} fails"
                if job == "order:fulfillment":  # its shipment child saga is compensated with it
                    item.payload["ship"] = {"route": DEMO_ROUTES[0], "volume": 10}
                    item.scenario += " → shipment (child saga) compensated"
            elif i == 1:
                item.payload["crash_after"] = CRASH_AFTER[job]
                item.scenario = f"crash after {CRASH_AFTER[job]}"
            elif i == 2:
                item.payload["slow_ms"] = 1500  # long enough for the abort to land between two steps
                item.abort = True
                item.scenario = "aborted in mid-saga"
            elif i == 3 and job in ("order:fulfillment", "logistic:shipment"):
                item.payload["slow_ms"] = 1500
                item.ttl = 2.0
                item.scenario = "ttl expires"
            elif i == 3 and job == "payment:subscription":
                # declined; charged again twice, a second apart (durable timer), then billing retries
                item.payload.update(user_id=DEMO_BROKE, wallet=DEMO_BROKE, retries=2, retry_in_hours=1 / 3600)
                item.scenario = "card declined → 2 retries (durable timer) → retry scheduled"
            elif i in (3, 4) and job == "user:onboarding":
                item.payload["verify_identity"] = True
                approved = i == 3
                decision = {"approved": approved, "by": "demo-reviewer"}
                if not approved:
                    decision["reason"] = "document photo does not match"
                item.signal = ("identity.verified", decision)
                item.scenario = f"identity review (signal): {'approved' if approved else 'rejected'}"
            elif i == 4 and job == "order:fulfillment":
                item.payload["ship"] = {"route": DEMO_ROUTES[1], "volume": 10}
                item.scenario = "ships the goods (child saga)"
            elif i == 4 and job == "bank:transfer" and batch and batch[-1].job == job:
                # the same two wallets as the transfer before it: the two take turns (bucket lock)
                item.payload.update(source=batch[-1].payload["source"], target=batch[-1].payload["target"])
                item.scenario = "same wallets as the previous transfer (lock)"
            batch.append(item)
    return batch


def expected_change(plan: Planned, saga: Saga, charged: bool) -> dict[str, int]:
    """What a *completed* saga changes in the stock and money totals (aborted ones: nothing)."""
    if saga.state != SagaState.COMPLETED:
        return {}
    p = plan.payload
    units = sum(line["qty"] for line in p.get("items", []))
    if plan.job == "order:fulfillment":
        return {"stock": -units, "money": -p["amount"]}
    if plan.job == "payment:subscription":
        return {"money": -p["amount"] if charged else 0}
    if plan.job == "user:onboarding":
        return {"money": p.get("welcome_credit", 0)}
    if plan.job == "order:refund":
        return {"stock": units, "money": p["amount"]}
    return {}  # transfers move money between wallets; shipments touch neither


def run_demo(per_job: int = 6, keep: bool = False, settings: Settings | None = None, verbose: bool = False) -> int:
    from essential.actors.dev.stack import LocalStack

    settings = settings or get_settings()
    stack = LocalStack(settings)
    started = time.perf_counter()
    with console.status("starting embedded MongoDB, Kafka and a local Ray head…"):
        info = stack.up()
    os.environ.update(stack.env())
    get_settings.cache_clear()  # the example services read the servers' addresses through it
    settings = get_settings()  # now pointing at the stack
    if not verbose:
        quiet_ray()  # Ray's own lines go to <home>/logs/cli.log
    ok = False
    try:
        ok = _run(settings, info, per_job)
    except Exception:
        console.print_exception()
    finally:
        import ray

        ray.shutdown()  # leave the cluster before stopping it
        if keep:
            console.print(f"\n[bold]The stack keeps running.[/] Dashboard: {info['ray']['dashboard_url']} "
                          f"(it asks for Ray's token: {ray_token_source()})")
            console.print("Explore with `essential list`, `essential status ID`; stop with `essential down`.")
        else:
            with console.status("stopping what the demo started…"):
                stack.down()
    console.print(f"demo wall time: {time.perf_counter() - started:.1f}s")
    return 0 if ok else 1


def _run(settings: Settings, info: dict[str, Any], per_job: int) -> bool:
    from essential.actors.client.ray_client import EssentialClient
    examples_importable()
    from examples import data

    console.print(f"[bold]Ray dashboard:[/] {info['ray']['dashboard_url']}")
    client = EssentialClient(settings, address=settings.ray_address)
    _start_gateway(settings)
    asyncio.run(_seed(data))
    before = asyncio.run(_totals(data))
    batch = plan_batch(per_job)
    ids = client.start_many([{"job": p.job, "payload": p.payload, "ttl": p.ttl} for p in batch])
    for item, saga_id in zip(batch, ids):
        item.saga_id = saga_id
    _follow(client, batch)
    outcome = _collect(client, batch)
    after = asyncio.run(_totals(data))
    _summary(batch, outcome)
    return _check_invariants(batch, outcome, before, after)


async def _seed(data: Any) -> None:
    from essential.persistence.connection import close_shared_clients

    try:
        await data.seed_demo()
    finally:
        await close_shared_clients()


async def _totals(data: Any) -> dict[str, int]:
    from essential.persistence.connection import close_shared_clients

    try:
        return await data.totals()
    finally:
        await close_shared_clients()


def _start_gateway(settings: Settings) -> None:
    try:
        from essential.actors.kafka.gateway import ensure_gateway
    except ImportError:
        return
    ensure_gateway(settings)


def _follow(client: Any, batch: list[Planned]) -> None:
    """Progress bars per job; aborts the 'aborted in mid-saga' ones once they are running."""
    to_abort = {p.saga_id for p in batch if p.abort}
    to_signal = {p.saga_id: p.signal for p in batch if p.signal is not None}
    columns = (TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[note]}"), TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=console) as progress:
        tasks = {job: progress.add_task(job, total=sum(p.job == job for p in batch), note="") for job in LATE_FAILURE}
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            states = client.states([p.saga_id for p in batch])
            for saga_id in list(to_abort):
                if states.get(saga_id) == "running":
                    try:
                        client.abort(saga_id, "customer cancelled (demo)")
                    except IllegalTransition:  # it finished between our look and our abort: nothing to undo
                        console.print(f"saga {saga_id} completed before the demo's abort reached it")
                    to_abort.discard(saga_id)
            for saga_id, (name, data) in list(to_signal.items()):
                if states.get(saga_id) == "waiting":  # parked without an actor until the decision comes
                    client.signal(saga_id, name, data, key=f"demo-{saga_id}")
                    del to_signal[saga_id]
            done = Counter()
            notes: dict[str, Counter] = defaultdict(Counter)
            for p in batch:
                state = states.get(p.saga_id, "?")
                notes[p.job][state] += 1
                if state in ENDED_STATES:
                    done[p.job] += 1
            for job, task in tasks.items():
                note = " ".join(f"{k}:{v}" for k, v in sorted(notes[job].items()))
                progress.update(task, completed=done[job], note=note)
            if sum(done.values()) == len(batch):
                break
            time.sleep(0.3)


def _collect(client: Any, batch: list[Planned]) -> Outcome:
    outcome = Outcome()
    for p in batch:
        saga = client.wait(p.saga_id, timeout=60)
        outcome.sagas[p.saga_id] = saga
        for stage in client.stages(p.saga_id):
            if stage.action == Action.COMPENSATE:
                outcome.compensations[p.job] += 1
            outcome.retries[p.job] += stage.meta.retry_count
            if stage.step == "charge" and isinstance(stage.res, dict):
                outcome.charged[p.saga_id] = bool(stage.res.get("ok"))
    return outcome


def _summary(batch: list[Planned], outcome: Outcome) -> None:
    table = Table("job", "sagas", "completed", "aborted", "parked", "compensations", "retries", "p50 latency",
                  "happy path", title="Essential demo: example sagas",
                  caption="aborted: every completed step was compensated · parked: waits for an operator · "
                          "p50 latency: start to end, injected delays and retries included · happy path: the "
                          "sagas without injected faults")  # fmt: skip

    def latency_ms(saga: Saga) -> float:
        return (saga.updatedAt - saga.createdAt).total_seconds() * 1000

    for job in LATE_FAILURE:
        sagas = [outcome.sagas[p.saga_id] for p in batch if p.job == job]
        happy = [latency_ms(outcome.sagas[p.saga_id]) for p in batch if p.job == job and p.scenario == "happy path"]
        states = Counter(s.state for s in sagas)
        table.add_row(
            job, str(len(sagas)), str(states[SagaState.COMPLETED]), str(states[SagaState.ABORTED]),
            str(states[SagaState.PARKED]), str(outcome.compensations[job]), str(outcome.retries[job]),
            human_ms(statistics.median(latency_ms(s) for s in sagas)), human_ms(statistics.median(happy)) if happy else "-",
        )  # fmt: skip
    console.print(table)
    scenarios = Table("scenario", "job", "saga", "state", "why", title="Injected scenarios")
    for p in batch:
        if p.scenario != "happy path":
            s = outcome.sagas[p.saga_id]
            scenarios.add_row(p.scenario, p.job, p.saga_id, s.state.value, s.parked_reason or s.error or "")
    console.print(scenarios)


def _check_invariants(
    batch: list[Planned], outcome: Outcome, before: dict[str, int], after: dict[str, int]
) -> bool:
    expected = dict(before)
    for p in batch:
        change = expected_change(p, outcome.sagas[p.saga_id], outcome.charged.get(p.saga_id, False))
        for key, delta in change.items():
            expected[key] += delta
    problems = [f"{k}: expected {expected[k]}, found {after[k]}" for k in ("stock", "money") if after[k] != expected[k]]
    per_job = {job: Counter(outcome.sagas[p.saga_id].state for p in batch if p.job == job) for job in LATE_FAILURE}
    for job, states in per_job.items():
        if not states[SagaState.COMPLETED] or not states[SagaState.ABORTED]:
            problems.append(f"{job}: expected completed and compensated sagas, got {dict(states)}")
    if any(s.state == SagaState.PARKED for s in outcome.sagas.values()):
        problems.append("a saga was parked")
    if problems:
        console.print("[bold red]INVARIANTS VIOLATED[/]")
        for line in problems:
            console.print(f"  [red]✗[/] {line}")
        return False
    console.print(
        f"[bold green]✓ invariants hold[/]: stock {before['stock']} → {after['stock']}, money {before['money']} → "
        f"{after['money']}, exactly the completed sagas' effects; every compensated saga left no trace"
    )
    return True
