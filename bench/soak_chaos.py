"""The soak's fault injector: a seeded schedule of SIGKILLs, carried out against the soak's own stack only.

What is killed, by PID and never by name (other engineers' Ray clusters and servers share
the machine): saga processes (dedicated ``saga:<id>`` actors) or host actors (pooled and
shared placement), the supervisor and the gateway (Ray restarts both), the MongoDB server
(restarted here on its data directory and port) and the Kafka broker (restarted empty:
it keeps topics in memory, the gateway recreates them).

Every Ray victim is checked before the signal: alive, a Ray worker (``ray::`` process
title) and a member of the Ray keeper's session, which holds exactly the processes the
soak's head spawned.  The servers' PIDs come from the stack's record, with their start
times.  Every kill is logged with its time; whether it *landed* means the process was
gone afterwards.
"""
from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from essential.actors.dev.kafka_broker import EmbeddedKafka
from essential.actors.dev.mongodb import EmbeddedMongo, boot_id, pid_alive, process_start_time
from essential.actors.dev.stack import LocalStack

#: kinds of kills, in the order the report lists them
KINDS = ("saga", "host", "supervisor", "gateway", "mongodb", "kafka")
WORKER_INTERVAL = {"dedicated": (2.0, 4.0), "pooled": (2.5, 4.5), "shared": (5.0, 8.0)}


@dataclass(frozen=True)
class PlannedKill:
    at: float  # seconds into the kill window
    kind: str
    downtime: float = 0.0  # servers: seconds before the restart


@dataclass
class KillRecord:
    """One kill as it happened (``landed``: the process was gone afterwards)."""

    t: float
    at: str
    kind: str
    target: str
    pid: int | None
    landed: bool
    note: str = ""
    sagas: list[str] = field(default_factory=list)  # sagas whose lease the killed process held

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_kills(rng: random.Random, placement: str, window: float) -> list[PlannedKill]:
    """The schedule: worker kills every few seconds, 2-3 supervisor and gateway kills, MongoDB and Kafka once."""
    kills: list[PlannedKill] = []
    worker = "saga" if placement == "dedicated" else "host"
    low, high = WORKER_INTERVAL[placement]
    scale = min(1.0, window / 75.0)  # a short run kills as often, only for less time
    t = rng.uniform(2.0, 4.0) * scale + 1.0
    while t < window:
        kills.append(PlannedKill(round(t, 2), worker))
        t += rng.uniform(low, high)
    for kind in ("supervisor", "gateway"):
        kills += [PlannedKill(at, kind) for at in _spread(rng, rng.choice([2, 3]), 0.1 * window, 0.95 * window)]
    kills.append(PlannedKill(round(rng.uniform(0.35, 0.5) * window, 2), "mongodb", round(rng.uniform(2.0, 4.0), 1)))
    kills.append(PlannedKill(round(rng.uniform(0.6, 0.75) * window, 2), "kafka", round(rng.uniform(1.0, 2.0), 1)))
    return sorted(kills, key=lambda k: k.at)


def _spread(rng: random.Random, count: int, start: float, end: float) -> list[float]:
    """``count`` times in [start, end], one in each equal slice (so they never bunch up)."""
    width = (end - start) / count
    return [round(start + i * width + rng.uniform(0.1, 0.9) * width, 2) for i in range(count)]


# ---------------------------------------------------------------------------- processes


def session_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])
    except (OSError, IndexError, ValueError):
        return None


def title_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


async def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


class Chaos:
    """Carries out a kill schedule against one :class:`LocalStack` and its Ray namespace.

    ``busy()`` returns ``{pid: [saga ids]}`` of the processes holding a running saga's lease
    (read from MongoDB by the caller; empty while MongoDB is down), so kills prefer processes
    that are in the middle of a saga.
    """

    def __init__(
        self,
        stack: LocalStack,
        namespace: str,
        rng: random.Random,
        t0: float,
        busy: Callable[[], Any],
        say: Callable[[str], None],
    ) -> None:
        self.stack = stack
        self.namespace = namespace
        self.rng = rng
        self.t0 = t0
        self.busy = busy
        self.say = say
        state = stack.state() or {}
        self.gcs = state["ray"]["address"]
        self.ray_session = int(state["ray"]["pid"])
        self.log: list[KillRecord] = []
        self.restarts: list[dict[str, Any]] = []
        self.last_kill_at: float | None = None  # monotonic
        self._restarting: list[asyncio.Task] = []

    # -- the schedule ------------------------------------------------------------------
    async def run(self, schedule: list[PlannedKill]) -> None:
        for planned in schedule:
            delay = self.t0 + planned.at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                await self._one(planned)
            except Exception as exc:  # noqa: BLE001 - one failed kill must not stop the soak
                self._record(planned.kind, "?", None, False, f"kill failed: {type(exc).__name__}: {exc}")
        if self._restarting:
            await asyncio.gather(*self._restarting)

    async def _one(self, planned: PlannedKill) -> None:
        if planned.kind in ("saga", "host"):
            await self._kill_worker(planned.kind)
        elif planned.kind == "supervisor":
            await self._kill_actor("essential:supervisor", "supervisor")
        elif planned.kind == "gateway":
            await self._kill_actor("essential:gateway", "gateway")
        else:
            await self._kill_server(planned.kind, planned.downtime)

    # -- Ray processes -----------------------------------------------------------------
    def _ours(self, pid: int) -> bool:
        """A live Ray worker of the soak's own head (never anyone else's process)."""
        return pid_alive(pid) and session_of(pid) == self.ray_session and title_of(pid).startswith("ray::")

    async def _actors(self, **filters: str) -> list[Any]:
        from ray.util.state import list_actors

        wanted = [("state", "=", "ALIVE"), ("ray_namespace", "=", self.namespace)]
        wanted += [(k, "=", v) for k, v in filters.items()]
        return await asyncio.to_thread(list_actors, address=self.gcs, filters=wanted, limit=10_000, timeout=20)

    async def _kill_worker(self, kind: str) -> None:
        prefix = "saga:" if kind == "saga" else "essential:host:"
        try:
            busy: dict[int, list[str]] = await self.busy()
        except Exception:  # noqa: BLE001 - MongoDB down: pick among live actors instead
            busy = {}
        candidates = sorted(pid for pid in busy if self._ours(pid))
        names: dict[int, str] = {}
        try:
            actors = await self._actors()
            names = {int(a.pid): a.name for a in actors if a.pid and (a.name or "").startswith(prefix)}
        except Exception as exc:  # noqa: BLE001 - the state API is slow or away: busy pids still do
            self.say(f"list_actors failed: {exc}")
        candidates = [pid for pid in candidates if not names or pid in names]
        note = "mid-saga"
        if not candidates:
            candidates = sorted(pid for pid in names if self._ours(pid))
            note = "idle"
        if not candidates:
            self._record(kind, prefix + "*", None, False, "no victim alive")
            return
        pid = self.rng.choice(candidates)
        await self._signal(kind, names.get(pid, f"{prefix}? (pid {pid})"), pid, note, busy.get(pid, []))

    async def _kill_actor(self, name: str, kind: str) -> None:
        for _ in range(20):  # it may be restarting after the previous kill
            try:
                found = await self._actors(name=name)
            except Exception:  # noqa: BLE001
                found = []
            pids = [int(a.pid) for a in found if a.pid and self._ours(int(a.pid))]
            if pids:
                await self._signal(kind, name, pids[0], "")
                return
            await asyncio.sleep(0.5)
        self._record(kind, name, None, False, "not alive (still restarting?)")

    async def _signal(self, kind: str, target: str, pid: int, note: str, sagas: list[str] | None = None) -> None:
        os.kill(pid, signal.SIGKILL)
        landed = await wait_gone(pid)
        self._record(kind, target, pid, landed, note, sagas or [])

    # -- servers -----------------------------------------------------------------------
    async def _kill_server(self, kind: str, downtime: float) -> None:
        entry = (self.stack.state() or {}).get(kind)
        if entry is None or not pid_alive(int(entry["pid"]), entry.get("start_time")):
            self._record(kind, kind, None, False, "not running")
            return
        pid = int(entry["pid"])
        os.kill(pid, signal.SIGKILL)
        landed = await wait_gone(pid)
        self._record(kind, f"{kind} {entry['address']}", pid, landed, f"restart in {downtime:g}s")
        self._restarting.append(asyncio.create_task(self._restart(kind, entry, downtime)))

    async def _restart(self, kind: str, entry: dict[str, Any], downtime: float) -> None:
        await asyncio.sleep(downtime)
        began = time.monotonic()
        log_dir = self.stack.log_dir
        server: EmbeddedMongo | EmbeddedKafka
        if kind == "mongodb":
            server = EmbeddedMongo(Path(entry["data_dir"]), port=int(entry["port"]), log_dir=log_dir)
        else:
            server = EmbeddedKafka(port=int(entry["port"]), log_dir=log_dir)
        for attempt in range(1, 6):
            try:
                await asyncio.to_thread(server.start, 60.0)
                break
            except Exception as exc:  # noqa: BLE001 - e.g. the port not yet released: try again
                self.say(f"{kind} restart attempt {attempt} failed: {exc}")
                await asyncio.sleep(1.0)
        else:
            self.restarts.append({"kind": kind, "ok": False, "t": self._t()})
            return
        pid = server.detach()
        # the stack's record names the new process, so LocalStack.down() stops it
        self.stack.note(kind, {**entry, "pid": pid, "start_time": process_start_time(pid), "boot_id": boot_id()})
        record = {"kind": kind, "ok": True, "pid": pid, "t": self._t(), "took_s": round(time.monotonic() - began, 2),
                  "down_s": round(downtime + time.monotonic() - began, 2)}  # fmt: skip
        self.restarts.append(record)
        self.say(f"{kind} restarted: pid {pid} after {record['down_s']}s down")

    # -- the log -----------------------------------------------------------------------
    def _t(self) -> float:
        return round(time.monotonic() - self.t0, 2)

    def _record(self, kind: str, target: str, pid: int | None, landed: bool, note: str,
                sagas: list[str] | None = None) -> None:  # fmt: skip
        record = KillRecord(self._t(), datetime.now(UTC).isoformat(timespec="milliseconds"), kind, target,
                            pid, landed, note, sorted(sagas or []))  # fmt: skip
        self.log.append(record)
        if landed:
            self.last_kill_at = time.monotonic()
        held = f" holding {len(record.sagas)} saga(s)" if record.sagas else ""
        self.say(f"kill {kind:<10} {target} pid={pid} {'landed' if landed else 'MISSED'}{held} {note}".rstrip())

    def landed_by_kind(self) -> dict[str, int]:
        counts = {k: 0 for k in KINDS}
        for record in self.log:
            if record.landed:
                counts[record.kind] = counts.get(record.kind, 0) + 1
        return counts
