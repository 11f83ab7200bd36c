"""The benchmark's record: one table per workload with every ratio to the hand-written saga log, and a JSON log."""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REFERENCE = "saga-log"


@dataclass
class ModeResult:
    workload: str
    mode: str
    sagas: int
    concurrency: int
    wall_s: float
    sagas_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    completed: int
    aborted: int
    #: own (driver + Ray workers), driver, workers, ray_system
    cpu_ms_per_saga: dict[str, float] = field(default_factory=dict)
    #: commands, data_ops, cpu_ms: the database server's, per saga
    server: dict[str, float] = field(default_factory=dict)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def ratios(result: ModeResult, reference: ModeResult | None) -> dict[str, float | None]:
    """The figures the targets are stated in, relative to the hand-written log at the same load."""
    if reference is None:
        return {}

    def over(a: float, b: float) -> float | None:
        return round(a / b, 2) if b else None

    return {
        "throughput": over(result.sagas_per_s, reference.sagas_per_s),
        "p50": over(result.p50_ms, reference.p50_ms),
        "own_cpu": over(result.cpu_ms_per_saga["own"], reference.cpu_ms_per_saga["own"]),
        "server_cpu": over(result.server["cpu_ms"], reference.server["cpu_ms"]),
        "server_commands": over(result.server["commands"], reference.server["commands"]),
    }


def render(results: list[ModeResult], memory: list[dict[str, Any]], figures: dict[str, Any], out_dir: Path,
           *, command: str) -> dict[str, Any]:  # fmt: skip
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200, record=True)
    references = {(r.workload, r.concurrency): r for r in results if r.mode == REFERENCE}
    for workload in dict.fromkeys(r.workload for r in results):
        table = Table(
            "mode", "in flight", "sagas", "sagas/s", "× log", "p50 ms", "× log", "p95 ms", "p99 ms",
            "own CPU ms/saga", "× log", "(driver + workers)", "Ray system ms/saga", "server CPU ms/saga", "× log",
            "server cmds/saga", "× log", "completed/aborted",
            title=f"workload {workload!r}: 4-step order saga, 10 % compensating — ratios to the hand-written saga log",
        )  # fmt: skip
        for r in (r for r in results if r.workload == workload):
            x = ratios(r, references.get((workload, r.concurrency)))

            def times(key: str, _x: dict[str, float | None] = x) -> str:
                return f"{_x[key]:.2f}×" if _x.get(key) is not None else "-"

            own = r.cpu_ms_per_saga
            table.add_row(
                r.mode, str(r.concurrency), str(r.sagas), f"{r.sagas_per_s:.1f}", times("throughput"),
                f"{r.p50_ms:.1f}", times("p50"), f"{r.p95_ms:.1f}", f"{r.p99_ms:.1f}",
                f"{own['own']:.1f}", times("own_cpu"), f"{own['driver']:.1f} + {own['workers']:.1f}", f"{own['ray_system']:.1f}",
                f"{r.server['cpu_ms']:.1f}", times("server_cpu"), f"{r.server['commands']:.1f}", times("server_commands"),
                f"{r.completed}/{r.aborted}",
            )  # fmt: skip
        console.print(table)
    if memory:
        mem = Table("placement", "live sagas", "processes", "RSS MB", "MB / live saga", "marginal MB / saga",
                    title="Memory per live saga")  # fmt: skip
        for m in memory:
            mem.add_row(m["mode"], str(m["live_sagas"]), str(m["processes"]), str(m["rss_mb"]), str(m["mb_per_live_saga"]),
                        str(m["marginal_mb_per_saga"]))  # fmt: skip
        console.print(mem)
    for key, value in figures.items():
        console.print(f"  {key}: {value}")
    record = {
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "results": [
            {**asdict(r), "ratios_to_saga_log": ratios(r, references.get((r.workload, r.concurrency)))} for r in results
        ],
        "memory": memory,
        "figures": figures,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"saga_bench_{time.strftime('%Y%m%d_%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2))
    console.print(f"command: {command}\nrecord written to {path} (the tables: {path.with_suffix('.txt').name})")
    path.with_suffix(".txt").write_text(console.export_text())
    return record
