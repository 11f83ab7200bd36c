"""Evidence for a suspect saga, so a failing soak can be diagnosed without running it again.

For each saga the audit flags: the saga as stored (state, lease, waiting_for, error),
its stage timeline, its ledger entries, the kills that could have touched it (those that
named it, and every server/control-plane kill while it was live) and the Ray worker log
lines that mention it (from the soak's own Ray session directory).
"""
from __future__ import annotations

import re
from collections import defaultdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from .soak_audit import Audit, stage_line
from .soak_chaos import KillRecord

LINES_PER_SAGA = 40
_ID = re.compile(r"[0-9a-f]{24}")


def gather(audit: Audit, kills: list[KillRecord], session_dir: str | None, limit: int = 25) -> dict[str, Any]:
    suspects = audit.suspects()[:limit]
    logs = _log_lines(Path(session_dir) / "logs" if session_dir else None, set(suspects))
    out: dict[str, Any] = {}
    for saga_id in suspects:
        saga = audit.sagas.get(saga_id)
        if saga is None:
            out[saga_id] = {"stored": False, "log": logs.get(saga_id, [])}
            continue
        book = audit.ledgers.get(saga_id)
        entries = []
        if book is not None:
            for seq, entry in sorted(book.forward.items()):
                entries.append(f"{saga_id}:{seq} {entry.ledger} op={entry.op}")
            for seq, entry in sorted(book.undo.items()):
                entries.append(f"undo:{saga_id}:{seq} {entry.ledger} op={entry.op} undone={entry.undone}")
        out[saga_id] = {
            "job": saga.job, "state": saga.state.value, "parent": saga.parent, "error": saga.error,
            "parked_reason": saga.parked_reason, "waiting_for": saga.waiting_for,
            "lease": {"owner": saga.lease.owner, "epoch": saga.lease.epoch},
            "restore_attempts": saga.restore_attempts, "createdAt": saga.createdAt.isoformat(),
            "updatedAt": saga.updatedAt.isoformat(),
            "stages": [stage_line(s) for s in audit.stages.get(saga_id, [])],
            "ledger": entries,
            "kills": [_kill_line(k) for k in _kills_touching(saga_id, saga.createdAt, saga.updatedAt, kills)],
            "log": logs.get(saga_id, []),
        }  # fmt: skip
    return out


def _kills_touching(saga_id: str, created: datetime, updated: datetime, kills: list[KillRecord]) -> list[KillRecord]:
    """Kills that named the saga, and those of shared components while it was live (± 2 s)."""
    low, high = created - timedelta(seconds=2), updated + timedelta(seconds=2)
    touching = []
    for kill in kills:
        at = datetime.fromisoformat(kill.at)
        if saga_id in kill.sagas or (kill.kind in ("supervisor", "gateway", "mongodb", "kafka") and low <= at <= high):
            touching.append(kill)
    return touching


def _kill_line(kill: KillRecord) -> str:
    return f"t={kill.t:.2f}s {kill.at} {kill.kind} {kill.target} pid={kill.pid} landed={kill.landed} {kill.note}".rstrip()


def _log_lines(logs_dir: Path | None, ids: set[str]) -> dict[str, list[str]]:
    """The last lines of the Ray workers' stdout/stderr that mention each saga id."""
    found: dict[str, list[str]] = defaultdict(list)
    if logs_dir is None or not logs_dir.is_dir() or not ids:
        return found
    for path in sorted(logs_dir.glob("worker-*")):
        if path.suffix not in (".out", ".err"):
            continue
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    for token in set(_ID.findall(line)) & ids:
                        found[token].append(f"{path.name}: {line.rstrip()[:400]}")
        except OSError:
            continue
    return {k: v[-LINES_PER_SAGA:] for k, v in found.items()}


#: what the gateway logs about the broker and its relays (the loss check, re-publishing, failures)
GATEWAY_LINES = re.compile(r"lost its log|re-publish|relay|canary|broker|WARNING|ERROR|Traceback", re.IGNORECASE)


def gateway_log(session_dir: str | None, pids: list[int], limit: int = 80) -> list[str]:
    """The gateway processes' own log lines about Kafka (every pid the gateway ran as)."""
    if not session_dir:
        return []
    logs_dir = Path(session_dir) / "logs"
    lines: list[str] = []
    for pid in pids:
        for path in sorted(logs_dir.glob(f"worker-*-{pid}.err")) + sorted(logs_dir.glob(f"worker-*-{pid}.out")):
            try:
                with open(path, encoding="utf-8", errors="replace") as fh:
                    lines += [f"pid {pid}: {line.rstrip()[:300]}" for line in fh if GATEWAY_LINES.search(line)]
            except OSError:
                continue
    return lines[-limit:]
