"""After the soak: does what MongoDB holds add up?  Sagas, stages, the services' ledgers, the data.

Three independent views are compared:

* the sagas and their stages (what Essential believes happened);
* the example services' ledgers: one document per idempotency key ``<saga>:<seq>`` for a
  forward effect and ``undo:<saga>:<seq>`` for its compensation, each written in the
  effect's own transaction (:mod:`examples.services.ledger`), so a ledger entry *is* the
  effect;
* the data totals (:func:`examples.data.totals`): stock, money, cargo space, vehicles, drivers.

A finding is **lost** when there is less effect than the sagas say (a planned saga that
never started, a succeeded stage of a completed saga whose effect is missing or was undone)
and **doubled** when there is more (a step applied under two keys, an effect no stage
accounts for, an aborted saga's effect left in place).  Anything else odd is an anomaly.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from essential.actors.dev.demo import Planned, expected_change
from essential.orchestration import Saga, Stage
from essential.orchestration.compensation import is_deferred
from essential.orchestration.registry import JobRegistry
from essential.orchestration.states import Action, SagaState, StageStatus
from essential.persistence.documents import saga_from_doc, stage_from_doc
from examples.services.db import collection

from .soak_plan import PlannedSaga

#: every ledger of the example services (see examples/services/*: LEDGER, JOURNAL)
LEDGERS = (
    "inventory.operations", "financial.transactions", "financial.operations", "billing.operations",
    "notify.operations", "logistic.operations", "users.operations", "sales.operations",
)  # fmt: skip
INVARIANTS = ("stock", "money", "cargo_free", "vehicles_available", "drivers_available")
SETTLED = ("completed", "aborted", "parked")
_KEY = re.compile(r"^(undo:)?([0-9a-f]{24}):(\d+)(:.+)?$")
TOMBSTONE = "tombstone"


@dataclass
class Finding:
    kind: str  # "lost" | "doubled" | "anomaly"
    saga: str
    job: str
    what: str


@dataclass
class Entry:
    ledger: str
    doc: dict[str, Any]

    @property
    def op(self) -> str:
        return str(self.doc.get("op"))

    @property
    def applied(self) -> bool:
        return self.op != TOMBSTONE

    @property
    def real(self) -> bool:
        """Applied with an effect (a declined charge is recorded with ``ok: false`` and moves nothing)."""
        return self.applied and self.doc.get("ok") is not False

    @property
    def undone(self) -> bool:
        return bool(self.doc.get("undone"))


@dataclass
class SagaLedger:
    forward: dict[int, Entry] = field(default_factory=dict)
    undo: dict[int, Entry] = field(default_factory=dict)
    extra: list[tuple[int, str, Entry]] = field(default_factory=list)  # e.g. "<key>:declined" notices


@dataclass
class Audit:
    sagas: dict[str, Saga]
    stages: dict[str, list[Stage]]
    ledgers: dict[str, SagaLedger]
    plan: list[PlannedSaga]
    by_key: dict[str, str]  # idempotency key -> saga id
    findings: list[Finding] = field(default_factory=list)
    states: Counter = field(default_factory=Counter)
    origins: Counter = field(default_factory=Counter)
    missing: list[dict[str, Any]] = field(default_factory=list)
    unexpected: list[dict[str, Any]] = field(default_factory=list)
    not_settled: list[dict[str, Any]] = field(default_factory=list)
    parked: list[dict[str, Any]] = field(default_factory=list)
    mismatched: list[dict[str, Any]] = field(default_factory=list)
    invariants: dict[str, Any] = field(default_factory=dict)
    outbox: dict[str, Any] = field(default_factory=dict)
    foreign_ledger: int = 0
    retries: int = 0
    compensations: int = 0
    restores: int = 0

    def of_kind(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    @property
    def lost(self) -> int:
        """Sagas with less effect than they say, plus planned sagas that never started."""
        return len({f.saga for f in self.of_kind("lost")}) + len(self.missing)

    @property
    def doubled(self) -> int:
        """Sagas with more effect than they say, plus sagas started that nobody planned."""
        return len({f.saga for f in self.of_kind("doubled")}) + len(self.unexpected)

    def suspects(self) -> list[str]:
        """Sagas whose evidence the report should carry."""
        ids = [f.saga for f in self.findings] + [s["saga"] for s in self.not_settled + self.parked + self.mismatched]
        return list(dict.fromkeys(i for i in ids if i))

    def as_dict(self) -> dict[str, Any]:
        return {
            "states": dict(self.states), "origins": dict(self.origins), "missing": self.missing,
            "unexpected": self.unexpected, "not_settled": self.not_settled, "parked": self.parked,
            "outcome_mismatches": self.mismatched, "findings": [asdict(f) for f in self.findings],
            "invariants": self.invariants, "outbox": self.outbox, "foreign_ledger_entries": self.foreign_ledger,
            "lost": self.lost, "doubled": self.doubled, "retries": self.retries,
            "compensations": self.compensations, "max_lease_epoch": max((s.lease.epoch for s in self.sagas.values()), default=0),
        }  # fmt: skip


# ---------------------------------------------------------------------------- reading


async def load(db: AsyncDatabase, plan: list[PlannedSaga]) -> Audit:
    sagas = {str(d["_id"]): saga_from_doc(d) async for d in db["sagas"].find({})}
    stages: dict[str, list[Stage]] = defaultdict(list)
    async for doc in db["stages"].find({}).sort([("saga", 1), ("seq", 1)]):
        stage = stage_from_doc(doc)
        stages[stage.saga].append(stage)
    ledgers: dict[str, SagaLedger] = defaultdict(SagaLedger)
    foreign = 0
    for name in LEDGERS:
        async for doc in collection(name).find({}):
            match = _KEY.match(str(doc["_id"]))
            if match is None:
                foreign += 1
                continue
            undo, saga_id, seq, suffix = match.group(1), match.group(2), int(match.group(3)), match.group(4)
            entry = Entry(name, doc)
            book = ledgers[saga_id]
            if suffix:
                book.extra.append((seq, suffix, entry))
            elif undo:
                book.undo[seq] = entry
            else:
                book.forward[seq] = entry
    by_key = {s.idempotency_key: sid for sid, s in sagas.items() if s.idempotency_key}
    audit = Audit(sagas, dict(stages), dict(ledgers), plan, by_key)
    audit.foreign_ledger = foreign
    return audit


# ---------------------------------------------------------------------------- checks


def check(audit: Audit, registry: JobRegistry) -> None:
    """Every check that needs no server: fills ``audit`` in place."""
    planned = {p.key: p for p in audit.plan}
    for item in audit.plan:
        item.saga_id = audit.by_key.get(item.key, item.saga_id if item.saga_id in audit.sagas else "")
        if not item.saga_id:
            audit.missing.append({"key": item.key, "job": item.job, "via": item.via, "scenario": item.scenario,
                                  "attempts": item.start_attempts})  # fmt: skip
    for saga_id, saga in audit.sagas.items():
        audit.states[saga.state.value] += 1
        key = saga.idempotency_key or ""
        if saga.parent:
            audit.origins["child"] += 1
        elif key in planned:
            audit.origins[planned[key].via] += 1
        else:
            audit.origins["unexpected"] += 1
            audit.unexpected.append({"saga": saga_id, "job": saga.job, "key": key, "state": saga.state.value})
        stages = audit.stages.get(saga_id, [])
        audit.retries += sum(s.meta.retry_count for s in stages)
        audit.compensations += sum(1 for s in stages if s.action == Action.COMPENSATE)
        if saga.state.value not in SETTLED:
            audit.not_settled.append(_describe(saga, stages))
        elif saga.state == SagaState.PARKED:
            audit.parked.append({"saga": saga_id, "job": saga.job, "reason": saga.parked_reason,
                                 "from": saga.parked_from.value if saga.parked_from else None})  # fmt: skip
        if saga.state in (SagaState.COMPLETED, SagaState.ABORTED):
            audit.findings += check_saga(saga, stages, audit.ledgers.get(saga_id, SagaLedger()), registry)
    check_children(audit)
    for item in audit.plan:
        saga = audit.sagas.get(item.saga_id)
        if saga is not None and saga.state.value in SETTLED and saga.state.value != item.expected:
            audit.mismatched.append({"saga": saga.id, "key": item.key, "job": item.job, "scenario": item.scenario,
                                     "expected": item.expected, "state": saga.state.value,
                                     "why": saga.parked_reason or saga.error or ""})  # fmt: skip
    for saga_id in audit.ledgers:
        if saga_id not in audit.sagas:
            audit.findings.append(Finding("doubled", saga_id, "?", "ledger entries for a saga that does not exist"))


def check_saga(saga: Saga, stages: list[Stage], book: SagaLedger, registry: JobRegistry) -> list[Finding]:
    """A terminal saga's stages against its ledger entries (see the module docstring for lost/doubled)."""
    out: list[Finding] = []

    def add(kind: str, what: str) -> None:
        out.append(Finding(kind, saga.id, saga.job, what))

    job = registry.get(saga.job, saga.version)
    kinds = {s.name: s.kind for s in job.steps}
    completed = saga.state == SagaState.COMPLETED
    forward = [s for s in stages if s.action != Action.COMPENSATE and kinds.get(s.step) == "task"]
    compensations = {s.compensates: s for s in stages if s.action == Action.COMPENSATE}
    by_seq = {s.seq: s for s in stages}
    seqs = [s.seq for s in stages]
    if seqs != list(range(1, len(seqs) + 1)) or saga.seq != len(seqs):
        add("anomaly", f"stage seqs {seqs} (saga.seq {saga.seq}): gaps or duplicates")
    applied_by_step: dict[str, list[int]] = defaultdict(list)
    rounds_by_step: Counter = Counter()
    for stage in forward:
        entry, undo = book.forward.get(stage.seq), book.undo.get(stage.seq)
        where = f"#{stage.seq} {stage.step} ({stage.status.value})"
        deferred = is_deferred(stage)
        if not deferred:
            rounds_by_step[stage.step] += 1
        if entry is not None and entry.real and not deferred:
            applied_by_step[stage.step].append(stage.seq)
        left_in_place = entry is not None and entry.real and not (undo is not None and undo.undone)
        if completed:
            if stage.status == StageStatus.SUCCEEDED:
                if entry is None or not entry.applied:
                    add("lost", f"{where}: recorded succeeded, but no effect under key {stage.meta.idempotency_key}")
                elif undo is not None and undo.undone:
                    add("lost", f"{where}: its effect was undone ({undo.ledger}), yet the saga completed")
            elif left_in_place:
                add("doubled", f"{where}: an effect in {entry.ledger} that the completed saga does not count")
        elif left_in_place:
            add("doubled", f"{where}: effect in {entry.ledger} left in place although the saga was aborted")
        if undo is not None and stage.seq not in compensations:
            add("anomaly", f"{where}: undone in {undo.ledger} without a compensate stage")
    for step, seqs_applied in applied_by_step.items():
        if len(seqs_applied) > 1:
            add("doubled", f"step {step} applied {len(seqs_applied)} times, under stages {seqs_applied}")
    for step, rounds in rounds_by_step.items():
        if rounds > 1 and len(applied_by_step.get(step, [])) <= 1:
            add("anomaly", f"step {step} has {rounds} forward stages (one per step expected)")
    for target, comp in compensations.items():
        forward_stage = by_seq.get(target) if target is not None else None
        if forward_stage is None:
            add("anomaly", f"compensate stage #{comp.seq} undoes #{target}, which does not exist")
        elif (
            comp.status == StageStatus.SUCCEEDED
            and kinds.get(forward_stage.step) == "task"
            and target not in book.undo
        ):
            add("anomaly", f"compensate stage #{comp.seq} of #{target} {forward_stage.step} succeeded without an undo entry")
    for seq, entry in book.forward.items():
        if seq not in by_seq and entry.real:
            add("doubled", f"effect {saga.id}:{seq} ({entry.op} in {entry.ledger}) without its stage")
    for seq, entry in book.undo.items():
        if seq not in by_seq:
            add("anomaly", f"undo {saga.id}:{seq} ({entry.op} in {entry.ledger}) of a stage that does not exist")
    for seq, suffix, entry in book.extra:
        if seq not in by_seq:
            add("anomaly", f"entry {saga.id}:{seq}{suffix} in {entry.ledger} without its stage")
    return out


def check_children(audit: Audit) -> None:
    """Child sagas: one per parent stage and step, and each ended as its parent did (a compensated
    parent aborts or compensates its child)."""
    per_step: Counter = Counter()
    for child in audit.sagas.values():
        if not child.parent:
            continue
        parent = audit.sagas.get(child.parent)
        if parent is None:
            audit.findings.append(Finding("doubled", child.id, child.job, f"child of {child.parent}, which is not stored"))
            continue
        stage = next((s for s in audit.stages.get(parent.id, []) if s.seq == child.parent_seq), None)
        per_step[(parent.id, stage.step if stage else f"#{child.parent_seq}")] += 1
        if parent.state == SagaState.COMPLETED and child.state != SagaState.COMPLETED:
            audit.findings.append(Finding("lost", parent.id, parent.job, f"completed, but its child {child.id} is {child.state.value}"))
        elif parent.state == SagaState.ABORTED and child.state != SagaState.ABORTED:
            kind = "doubled" if child.state == SagaState.COMPLETED else "anomaly"
            audit.findings.append(Finding(kind, parent.id, parent.job, f"aborted, but its child {child.id} is {child.state.value}"))
    for (parent_id, step), count in per_step.items():
        if count > 1:
            parent = audit.sagas[parent_id]
            audit.findings.append(Finding("doubled", parent_id, parent.job, f"step {step} started {count} child sagas"))


def _describe(saga: Saga, stages: list[Stage]) -> dict[str, Any]:
    return {
        "saga": saga.id, "job": saga.job, "state": saga.state.value, "waiting_for": saga.waiting_for,
        "wake_at": saga.wake_at.isoformat() if saga.wake_at else None, "lease_owner": saga.lease.owner,
        "lease_epoch": saga.lease.epoch, "updatedAt": saga.updatedAt.isoformat(),
        "restore_attempts": saga.restore_attempts, "abort_requested": saga.abort_requested, "error": saga.error,
        "cursor": saga.cursor, "last_stages": [stage_line(s) for s in stages[-4:]],
    }  # fmt: skip


def stage_line(stage: Stage) -> str:
    undoes = f" undoes #{stage.compensates}" if stage.compensates is not None else ""
    error = f" · {stage.meta.errors[-1][:100]}" if stage.meta.errors else ""
    return f"#{stage.seq} {stage.step} {stage.action.value} {stage.status.value}{undoes} retries={stage.meta.retry_count}{error}"


# ---------------------------------------------------------------------------- the data


def ledger_net(book: SagaLedger) -> Counter:
    """What a saga's ledger entries moved in the invariant totals (forward effects and their undos)."""
    net: Counter = Counter()
    for entry in [*book.forward.values(), *book.undo.values()]:
        doc, op, undo = entry.doc, entry.op, "undoes" in entry.doc
        if not entry.applied or (undo and not entry.undone):
            continue
        if entry.ledger == "inventory.operations":
            units = sum(int(line["qty"]) for line in doc.get("items", []))
            net["stock"] += {"reserve": -units, "restock": units, "release": units, "unrestock": -units}.get(op, 0)
        elif entry.ledger == "financial.transactions":
            net["money"] += int(doc.get("amount", 0))
        elif entry.ledger == "logistic.operations":
            if op == "reserve_space":
                net["cargo_free"] -= int(doc["volume"])
            elif op == "release_space":
                net["cargo_free"] += int(doc["volume"])
            elif op in ("assign_vehicle", "assign_driver"):
                net[f"{op.removeprefix('assign_')}s_available"] -= 1
            elif op == "unassign":
                for role in ("vehicle", "driver"):
                    if role in doc:
                        net[f"{role}s_available"] += 1
    return net


def outcome_change(saga: Saga, stages: list[Stage]) -> Counter:
    """What the saga's outcome says it changed: the demo's rule for stock and money, plus a shipment's fleet."""
    charged = False
    for stage in stages:
        if stage.step == "charge" and stage.status == StageStatus.SUCCEEDED and isinstance(stage.res, dict):
            charged = bool(stage.res.get("ok"))
    change = Counter(expected_change(Planned(saga.job, saga.payload, ""), saga, charged))
    if saga.job == "logistic:shipment" and saga.state == SagaState.COMPLETED:
        change.update({"cargo_free": -int(saga.payload["volume"]), "vehicles_available": -1, "drivers_available": -1})
    return change


def check_invariants(audit: Audit, before: dict[str, int], after: dict[str, int]) -> None:
    """Totals must move by exactly the completed sagas' effects (plus what parked or unsettled sagas still hold)."""
    expected, ledger = Counter(before), Counter()
    per_saga: list[dict[str, Any]] = []
    for saga_id, saga in audit.sagas.items():
        stages = audit.stages.get(saga_id, [])
        net = ledger_net(audit.ledgers.get(saga_id, SagaLedger()))
        ledger.update(net)
        if saga.state in (SagaState.COMPLETED, SagaState.ABORTED):
            change = outcome_change(saga, stages)
            expected.update(change)
            diff = {k: net.get(k, 0) - change.get(k, 0) for k in INVARIANTS if net.get(k, 0) != change.get(k, 0)}
            if diff:
                per_saga.append({"saga": saga_id, "job": saga.job, "state": saga.state.value, "ledger_minus_outcome": diff})
                # more moved than the outcome says is a doubled effect, less a lost one
                more = any(abs(net.get(k, 0)) > abs(change.get(k, 0)) for k in diff)
                kind = "doubled" if more else "lost"
                audit.findings.append(Finding(kind, saga_id, saga.job, f"its ledger moved {dict(net)}, its outcome says {dict(change)}"))
        else:  # parked, or never settled: effects in limbo, counted as the ledger has them
            expected.update(net)
    problems = [f"{k}: expected {expected[k]}, found {after[k]} ({after[k] - expected[k]:+d})"
                for k in INVARIANTS if after[k] != expected[k]]  # fmt: skip
    outside = [f"{k}: data moved {after[k] - before[k]:+d}, ledgers {ledger[k]:+d}"
               for k in INVARIANTS if after[k] - before[k] != ledger[k]]  # fmt: skip
    audit.invariants = {
        "before": before, "after": after, "expected": {k: expected[k] for k in INVARIANTS},
        "ledger_delta": {k: ledger[k] for k in INVARIANTS}, "problems": problems,
        "outside_ledgers": outside, "sagas_off": per_saga,
    }  # fmt: skip


async def check_outbox(db: AsyncDatabase, audit: Audit) -> None:
    """No unsent rows in either outbox; every saga's lifecycle events numbered 1..events without a gap."""
    unsent = {"sent_at": None, "refused_at": None, "withdrawn_at": None}
    result: dict[str, Any] = {}
    for name in ("outbox", "command_outbox"):
        coll = db[name]
        result[name] = {
            "rows": await coll.count_documents({}),
            "unsent": await coll.count_documents(unsent),
            "refused": await coll.count_documents({"refused_at": {"$ne": None}}),
        }
    numbers: dict[str, list[int]] = defaultdict(list)
    topics: dict[str, list[str]] = defaultdict(list)
    async for row in db["outbox"].find({}, {"saga": 1, "n": 1, "topic": 1}):
        numbers[str(row["saga"])].append(int(row["n"]))
        topics[str(row["saga"])].append(row["topic"])
    counters = {str(d["_id"]): int(d.get("events", 0)) async for d in db["sagas"].find({}, {"events": 1})}
    gaps = []
    for saga_id, count in counters.items():
        got = sorted(numbers.get(saga_id, []))
        if got != list(range(1, count + 1)):
            gaps.append({"saga": saga_id, "events": count, "rows": got[:50]})
        saga = audit.sagas.get(saga_id)
        end = {"completed": "saga.completed", "aborted": "saga.aborted", "parked": "saga.parked"}.get(
            saga.state.value if saga else "", None
        )
        if end and end not in topics.get(saga_id, []):
            gaps.append({"saga": saga_id, "missing_event": end})
    result["event_gaps"] = gaps
    audit.outbox = result
    for gap in gaps:
        saga = audit.sagas.get(gap["saga"])
        audit.findings.append(Finding("lost", gap["saga"], saga.job if saga else "?", f"lifecycle events: {gap}"))
