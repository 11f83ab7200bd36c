"""The soak's verdict: what passes, the table, the one-line verdict and the JSON record."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .soak_audit import Audit
from .soak_chaos import KINDS

RESULTS = Path(__file__).resolve().parent / "results"
#: kinds of kill every full run must land at least once, or it did not test what it claims
REQUIRED_KILLS = ("supervisor", "gateway", "mongodb")


def failures(audit: Audit, landed: dict[str, int], worker_kind: str, quiet_after: float | None,
             traffic_errors: list[str], duplicate_mismatch: list[str], delivered: dict[str, Any],
             skipped: list[str] = ()) -> list[str]:  # fmt: skip
    """Why the run fails; empty for a pass."""
    why: list[str] = []
    if delivered.get("missing"):
        why.append(f"{delivered['missing']} lifecycle event(s) marked sent but never seen on Kafka")
    if not delivered.get("sweep", {}).get("complete"):
        why.append(f"could not read the event topics to the end: {delivered.get('sweep')}")
    if audit.lost:
        why.append(f"{audit.lost} saga(s) lost an effect or never started")
    if audit.doubled:
        why.append(f"{audit.doubled} saga(s) with a doubled effect, or started twice")
    if audit.not_settled:
        why.append(f"{len(audit.not_settled)} saga(s) not terminal or parked")
    if audit.invariants.get("problems"):
        why.append("data invariants broken: " + "; ".join(audit.invariants["problems"]))
    if audit.invariants.get("outside_ledgers"):
        why.append("data moved outside the services' ledgers: " + "; ".join(audit.invariants["outside_ledgers"]))
    unsent = sum(v.get("unsent", 0) for k, v in audit.outbox.items() if isinstance(v, dict))
    if unsent:
        why.append(f"{unsent} outbox row(s) never sent")
    if quiet_after is None:
        why.append("the deployment did not quiesce in time")
    if duplicate_mismatch:
        why.append(f"repeated starts returned another saga: {duplicate_mismatch}")
    if traffic_errors:
        why.append(f"{len(traffic_errors)} start(s) refused or never sent")
    for kind in (worker_kind, *REQUIRED_KILLS):
        if not landed.get(kind) and kind not in skipped:
            why.append(f"no {kind} kill landed: the run did not test that")
    return why


def verdict_line(placement: str, kills: int, sagas: int, audit: Audit, quiet_after: float | None, why: list[str]) -> str:
    quiet = f"{quiet_after:.1f} s" if quiet_after is not None else "never"
    outcome = "PASS" if not why else f"FAIL ({'; '.join(w.split(':')[0] for w in why)})"
    return (f"soak {placement}: kills {kills}, sagas {sagas}, lost {audit.lost}, doubled {audit.doubled}, "
            f"not terminal {len(audit.not_settled)}, quiet after {quiet} — {outcome}")  # fmt: skip


def print_report(console: Console, record: dict[str, Any], audit: Audit) -> None:
    summary = Table("", "", title=f"soak {record['placement']} · seed {record['seed']}", show_header=False)
    landed = record["kills"]["landed"]
    summary.add_row("kills landed", ", ".join(f"{k} {landed[k]}" for k in KINDS if landed.get(k)) +
                    f"  (missed {record['kills']['missed']})")  # fmt: skip
    for restart in record["kills"]["restarts"]:
        summary.add_row(f"{restart['kind']} restart", f"down {restart.get('down_s', '?')} s, pid {restart.get('pid')}")
    origins = audit.origins
    summary.add_row("sagas started", f"{sum(origins.values())}: client {origins.get('client', 0)}, kafka "
                    f"{origins.get('kafka', 0)}, children {origins.get('child', 0)}"
                    + (f", unexpected {origins['unexpected']}" if origins.get("unexpected") else ""))  # fmt: skip
    traffic = record["traffic"]
    summary.add_row("starts", f"client retries {traffic['client_retries']}, kafka resent {traffic['kafka_resent']} "
                    f"(broker restart), repeated on purpose {traffic['duplicates_sent']}, signals {traffic['signals']}")  # fmt: skip
    latency = record.get("kafka_start_latency_s") or {}
    if latency:
        summary.add_row("Kafka start → saga stored", f"{latency['applied']} applied from their first send: median "
                        f"{latency['median']} s, max {latency['max']} s; {latency['unconsumed_when_broker_died']} still "
                        f"unconsumed when the broker was killed (longest {(latency['longest_unconsumed'] or [[0]])[-1][0]} s)")  # fmt: skip
    states = audit.states
    summary.add_row("outcomes", ", ".join(f"{k} {states.get(k, 0)}" for k in ("completed", "aborted", "parked"))
                    + f", not terminal {len(audit.not_settled)}")  # fmt: skip
    summary.add_row("compensations / retries", f"{audit.compensations} / {audit.retries}; max lease epoch "
                    f"{record['audit']['max_lease_epoch']}")  # fmt: skip
    summary.add_row("missing starts (lost)", str(len(audit.missing)))
    summary.add_row("lost effects (sagas)", str(len({f.saga for f in audit.of_kind('lost')})))
    summary.add_row("doubled effects (sagas)", str(len({f.saga for f in audit.of_kind('doubled')})))
    summary.add_row("anomalies", str(len(audit.of_kind("anomaly"))))
    inv = audit.invariants
    summary.add_row("data invariants", "hold" if not inv.get("problems") and not inv.get("outside_ledgers")
                    else "BROKEN")  # fmt: skip
    for key in inv.get("expected", {}):
        summary.add_row(f"  {key}", f"{inv['before'][key]} → {inv['after'][key]} (expected {inv['expected'][key]})")
    summary.add_row("outbox unsent", ", ".join(f"{k} {v['unsent']}" for k, v in audit.outbox.items() if isinstance(v, dict)))
    kafka = record["events_on_kafka"]
    summary.add_row("events on Kafka", f"{kafka['seen_events']} seen of {kafka['sent_rows']} sent rows, "
                    f"missing {kafka['missing']}")  # fmt: skip
    summary.add_row("quiet after last kill", f"{record['quiet_after_s']} s" if record["quiet_after_s"] is not None else "never")
    summary.add_row("wall time", f"{record['wall_s']} s")
    console.print(summary)
    if audit.parked:
        table = Table("saga", "job", "from", "reason", title="parked")
        for p in audit.parked:
            table.add_row(p["saga"], p["job"], str(p["from"]), str(p["reason"])[:160])
        console.print(table)
    if audit.not_settled:
        table = Table("saga", "job", "state", "waiting_for", "lease epoch", "restores", "last stage", title="not terminal")
        for s in audit.not_settled:
            table.add_row(s["saga"], s["job"], s["state"], str(s["waiting_for"]), str(s["lease_epoch"]),
                          str(s["restore_attempts"]), (s["last_stages"] or [""])[-1][:80])  # fmt: skip
        console.print(table)
    if audit.findings:
        table = Table("kind", "saga", "job", "what", title="findings")
        for f in audit.findings[:60]:
            table.add_row(f.kind, f.saga, f.job, f.what[:200])
        console.print(table)
    kafka = record["events_on_kafka"]
    if kafka.get("missing"):
        table = Table("event", "topic", "saga", "n", "created", "marked sent", title="events marked sent, never seen on Kafka")
        for row in kafka.get("missing_rows", [])[:15]:
            table.add_row(row["id"], row["topic"], row["saga"], str(row["n"]), row["createdAt"], row["sent_at"])
        console.print(table)
        console.print(f"event topics the final read could not reach the end of: {kafka['sweep'].get('not_reached')}")
    if audit.mismatched:
        table = Table("saga", "scenario", "expected", "ended", "why", "its process killed at",
                      title="outcomes other than planned")
        for m in audit.mismatched[:40]:
            killed = ", ".join(f"t={k['t']:g}s" for k in record["kills"]["log"] if m["saga"] in k["sagas"])
            table.add_row(m["saga"], f"{m['job']}: {m['scenario']}", m["expected"], m["state"], m["why"][:120], killed)
        console.print(table)


def write_record(record: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"soak-{record['placement']}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2, default=str))
    return path
