"""CPU time by role, read from /proc: what a batch cost the driver, the Ray workers, Ray itself and the server.

Ray workers come and go during a batch (a dedicated saga actor exits when its saga
ends), so a snapshot of the live ones is not enough: a worker that exited was reaped
by its raylet, whose ``cutime + cstime`` then grew by the worker's whole CPU time.
A worker's share of a batch is therefore its live growth, plus what the raylets
reaped, minus what reaped workers had already spent when the batch began.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float, float] | None:
    """(parent pid, own CPU seconds, reaped children's CPU seconds) of ``pid``; None once it has gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK, (int(fields[13]) + int(fields[14])) / TICK


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def cpu_of(pid: int) -> float:
    """CPU seconds (user + system) ``pid`` has spent so far; 0 once it has gone."""
    stat = _stat(pid)
    return stat[1] if stat else 0.0


@dataclass
class Snapshot:
    driver_s: float
    workers: dict[int, float] = field(default_factory=dict)
    reaped_by_raylets_s: float = 0.0
    ray_system_s: float = 0.0


def _descendants(root: int) -> dict[int, tuple[int, float, float]]:
    """The stat of every process below ``root``: the Ray this driver started, never another's."""
    stats = {int(e): st for e in os.listdir("/proc") if e.isdigit() and (st := _stat(int(e))) is not None}
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in stats.items():
        children.setdefault(parent, []).append(pid)
    found: dict[int, tuple[int, float, float]] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found[pid] = stats[pid]
        todo.extend(children.get(pid, []))
    return found


def snapshot() -> Snapshot:
    """This process's CPU, each live Ray worker's, what raylets reaped, and Ray's own processes'
    (among this process's descendants)."""
    times = os.times()
    snap = Snapshot(driver_s=times.user + times.system)
    for pid, stat in _descendants(os.getpid()).items():
        command = _command(pid)
        if not command:
            continue
        if command.startswith("ray::"):
            snap.workers[pid] = stat[1]
        elif "/site-packages/ray/" in command:  # Ray's own processes: GCS, raylet, dashboard, monitors
            snap.ray_system_s += stat[1]
            if command.split()[0].endswith("raylet"):
                snap.reaped_by_raylets_s += stat[2]
    return snap


def spent(before: Snapshot, after: Snapshot) -> dict[str, float]:
    """CPU seconds each role spent between two snapshots."""
    live = sum(cpu - before.workers.get(pid, 0.0) for pid, cpu in after.workers.items())
    gone = sum(cpu for pid, cpu in before.workers.items() if pid not in after.workers)
    workers = live + (after.reaped_by_raylets_s - before.reaped_by_raylets_s) - gone
    return {
        "driver_s": after.driver_s - before.driver_s,
        "workers_s": max(workers, 0.0),
        "ray_system_s": after.ray_system_s - before.ray_system_s,
    }
