"""What a saga costs: a hand-written saga log on the same MongoDB vs Essential in every placement, in one run.

    python -m bench.saga_bench            # or: make bench

Two workloads (``bench/jobs.py``), the same 4-step order saga, 10 % failing at its last step
(three compensations, each recorded durably):

* ``pure``  – the steps are pure computation: the saga costs what the orchestrator costs;
* ``mongo`` – each step is its own MongoDB transaction (a ledger row and a counter).

Modes, each against a fresh dev server (``--sync-on-commit``: fsync per commit):

* saga-log  – the reference of every ratio (bench/saga_log.py): the minimal durable saga log a
              user writes without Essential, PyMongo async on the same server, one transaction per
              step (insert a stage, update the saga);
* runner    – Essential's runner and store in this asyncio process, no Ray: not something users
              run, it tells the orchestration's cost from Ray's;
* shared    – sagas as tasks in the host actors (``host_pool_size``);
* pooled    – an actor per live saga, taken from a warm pool and reused;
* dedicated – a fresh actor per saga, which exits when the saga ends.

Each mode runs 20 warm-up sagas at the measured concurrency (pooled: more than its pool, so that
every actor of it has started), then N with 32 in flight and N/4 one at a time (the runner N/2 and
N/8, pooled N/4 and N/8, dedicated 32 and 10: fewer where a row is slow or steady). Latency is what
the caller sees (start → terminal reply); CPU is measured per role from /proc (bench/cpu.py): this
driver, every Ray worker (the ones that exited included), Ray's own processes, and the server;
server commands are its ``opcounters`` (data operations plus commands such as commits).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import cpu
from bench.report import ModeResult, percentile

REPO = Path(__file__).resolve().parent.parent
FAIL_SHARE = 0.10
ALL_MODES = ("saga-log", "runner", "shared", "pooled", "dedicated")
WORKLOADS = ("pure", "mongo")


def payloads(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"fail_last": rng.random() < FAIL_SHARE} for _ in range(n)]


# -- the server's side of a batch ------------------------------------------------------------
@dataclass
class Server:
    uri: str
    pid: int

    def counters(self) -> dict[str, float]:
        """The server's operation counters (``serverStatus.opcounters``) and its CPU seconds: what a
        batch costs the storage, background work (sweeps, heartbeats, relays) included."""
        from pymongo import MongoClient

        with MongoClient(self.uri, directConnection=True) as client:
            counters: dict[str, float] = dict(client.admin.command("serverStatus")["opcounters"])
        counters["cpu_s"] = cpu.cpu_of(self.pid)
        return counters


def server_per_saga(before: dict[str, float], after: dict[str, float], sagas: int) -> dict[str, float]:
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    data = sum(delta.get(k, 0) for k in ("insert", "query", "update", "delete", "getmore"))
    return {
        "commands": round((data + delta.get("command", 0)) / sagas, 1),
        "data_ops": round(data / sagas, 1),
        "cpu_ms": round(delta["cpu_s"] * 1000 / sagas, 1),
    }


SagaCall = Callable[[dict[str, Any]], Awaitable[tuple[str, float, str]]]


async def measured(workload: str, mode: str, server: Server, one: SagaCall, n: int, concurrency: int,
                   warmup: int, seed: int) -> ModeResult:  # fmt: skip
    """Warm up, then run ``n`` sagas ``concurrency`` at a time; ``one`` runs a saga and returns
    (id, caller-observed ms, final state). The warm-up runs at the same concurrency, so that a pool
    of actors is started before the measured batch, not during it."""
    gate = asyncio.Semaphore(concurrency)

    async def gated(payload: dict[str, Any]) -> tuple[str, float, str]:
        async with gate:
            return await one(payload)

    await asyncio.gather(*(gated(p) for p in payloads(warmup, seed + 1)))

    ops_before, cpu_before = await asyncio.to_thread(server.counters), cpu.snapshot()
    started = time.perf_counter()
    outcomes = await asyncio.gather(*(gated(p) for p in payloads(n, seed)))
    wall = time.perf_counter() - started
    cpu_after, ops_after = cpu.snapshot(), await asyncio.to_thread(server.counters)
    used = cpu.spent(cpu_before, cpu_after)
    latencies = [ms for _, ms, _ in outcomes]
    states = [state for _, _, state in outcomes]
    own = used["driver_s"] + used["workers_s"]
    return ModeResult(
        workload, mode, n, concurrency, round(wall, 3), round(n / wall, 2),
        round(percentile(latencies, 0.5), 1), round(percentile(latencies, 0.95), 1), round(percentile(latencies, 0.99), 1),
        states.count("completed"), states.count("aborted"),
        cpu_ms_per_saga={
            "own": round(own * 1000 / n, 1), "driver": round(used["driver_s"] * 1000 / n, 1),
            "workers": round(used["workers_s"] * 1000 / n, 1), "ray_system": round(used["ray_system_s"] * 1000 / n, 1),
        },
        server=server_per_saga(ops_before, ops_after, n),
    )  # fmt: skip


# -- the modes ---------------------------------------------------------------------------------
async def run_saga_log(workload: str, server: Server, plan: list[tuple[int, int, int]], seed: int) -> list[ModeResult]:
    """The reference: what a saga costs on this storage without Essential."""
    from pymongo import AsyncMongoClient

    from bench import saga_log

    client: Any = AsyncMongoClient(server.uri, tz_aware=True)
    await saga_log.prepare(client)

    async def one(payload: dict[str, Any]) -> tuple[str, float, str]:
        return await saga_log.one_saga(client, payload["fail_last"], pure=workload == "pure")

    try:
        return [await measured(workload, "saga-log", server, one, n, c, w, seed) for n, c, w in plan]
    finally:
        await client.close()


async def run_runner(workload: str, server: Server, plan: list[tuple[int, int, int]], seed: int) -> list[ModeResult]:
    """Essential's runner and store in this process: the orchestration's cost without Ray."""
    from bench.jobs import WORKLOADS as JOBS
    from essential.actors.settings import Settings, run_under
    from essential.orchestration import JobRegistry, SagaRunner, StartRequest, SystemClock, build_saga
    from essential.persistence.connection import new_client
    from essential.persistence.store import MongoSagaStore

    database = f"bench_runner_{workload}"
    run_under(Settings(mongodb_uri=server.uri, database=database))
    client = new_client(server.uri)
    store = MongoSagaStore(client, database)
    await store.ensure_indexes()
    registry = JobRegistry.from_modules(["bench.jobs"])
    clock = SystemClock()

    async def one(payload: dict[str, Any]) -> tuple[str, float, str]:
        started = time.perf_counter()
        saga, event = build_saga(StartRequest(job=JOBS[workload], payload=payload), registry, clock)
        await store.create(saga, event)
        ended = await SagaRunner(saga.id, store=store, registry=registry, owner="bench").run()
        return saga.id, (time.perf_counter() - started) * 1000, ended.state.value

    try:
        return [await measured(workload, "runner", server, one, n, c, w, seed) for n, c, w in plan]
    finally:
        await client.close()


async def run_essential(workload: str, mode: str, server: Server, plan: list[tuple[int, int, int]], seed: int,
                        **conf: Any) -> list[ModeResult]:  # fmt: skip
    """One deployment of ``placement=mode`` on the bench's Ray, driven as a Ray client drives it."""
    from bench.jobs import WORKLOADS as JOBS
    from essential.actors.client.ray_client import EssentialClient, stop_deployment
    from essential.actors.settings import Settings

    name = f"bench_{mode}_{workload}"
    in_flight = max(c for _, c, _ in plan)
    settings = Settings(
        mongodb_uri=server.uri, database=name, namespace=name, job_modules=["bench.jobs"],
        max_live_sagas=in_flight, placement=mode, **conf,
    )  # fmt: skip
    essential = await asyncio.to_thread(EssentialClient, settings)
    supervisor = essential.supervisor

    async def one(payload: dict[str, Any]) -> tuple[str, float, str]:
        started = time.perf_counter()
        reply = await supervisor.start.remote({"job": JOBS[workload], "payload": payload})
        saga_id = reply["saga"]["id"]
        ended = await supervisor.wait.remote(saga_id, 300.0)
        return saga_id, (time.perf_counter() - started) * 1000, ended["saga"]["state"]

    try:
        return [await measured(workload, mode, server, one, n, c, w, seed) for n, c, w in plan]
    finally:
        await asyncio.to_thread(stop_deployment, name)  # its supervisor must not sweep while the next mode runs


def init_ray() -> None:
    import ray

    from essential.actors.loopback import bind_ray_to_loopback

    bind_ray_to_loopback()
    ray.init(address="local", _node_ip_address="127.0.0.1", namespace="essential_bench", include_dashboard=False,
             log_to_driver=False)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.saga_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--sagas", type=int, default=400, help="sagas at 32 in flight per fast mode (N/4 at 1 in flight)")
    parser.add_argument("--slow-sagas", type=int, default=32, help="sagas at 32 in flight for the dedicated placement")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--hosts", type=int, default=4, help="host actors of the shared placement")
    parser.add_argument("--modes", default=",".join(ALL_MODES), help=f"any of {','.join(ALL_MODES)}")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="pure, mongo or both")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory-per-live-saga probe")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument(
        "--no-sync-on-commit", action="store_true",
        help="run the dev server without --sync-on-commit (faster; a crash loses acknowledged writes)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    modes = [m for m in ALL_MODES if m in args.modes.split(",")]
    workloads = [w for w in WORKLOADS if w in args.workloads.split(",")]
    unknown = set(args.modes.split(",")) - set(ALL_MODES) | set(args.workloads.split(",")) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown mode or workload: {', '.join(sorted(unknown))}")

    from bench import memory, report
    from essential.actors.dev.mongodb import EmbeddedMongo

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    c, n = args.concurrency, args.sagas
    fast = [(n, c, 20), (max(n // 4, 10), 1, 5)]
    # the actor-per-saga placements are slower: fewer sagas keep `make bench` near five minutes
    plans = {"runner": [(max(n // 2, 10), c, 20), (max(n // 8, 10), 1, 5)],
             "pooled": [(max(n // 4, 10), c, c + 8), (max(n // 8, 10), 1, 5)],
             "dedicated": [(args.slow_sagas, c, 4), (max(args.slow_sagas // 4, 10), 1, 2)]}  # fmt: skip
    results: list[ModeResult] = []
    memory_rows: list[dict[str, Any]] = []
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="essential-bench-") as tmp:

        def fresh(label: str) -> tuple[EmbeddedMongo, Server]:
            """Each mode and workload gets a new server: what one leaves behind (documents, oplog)
            would slow the next, and the comparison must not depend on the order they run in."""
            mongo = EmbeddedMongo(Path(tmp) / label / "db", log_dir=Path(tmp) / label,
                                  sync_on_commit=not args.no_sync_on_commit)  # fmt: skip
            started = mongo.start()
            assert mongo.pid is not None
            return mongo, Server(started.uri, mongo.pid)

        def each_workload(mode: str, run: Callable[[str, Server], Awaitable[list[ModeResult]]]) -> Callable[[], Awaitable[None]]:
            async def go() -> None:
                for workload in workloads:
                    mongo, server = fresh(f"{mode}-{workload}")
                    with mongo:
                        results.extend(await run(workload, server))
            return go

        seed = args.seed
        # the modes without Ray run before Ray starts, so its processes do not share their core
        for mode in ("saga-log", "runner"):
            if mode in modes:
                runner = run_saga_log if mode == "saga-log" else run_runner
                plan = plans.get(mode, fast)
                asyncio.run(each_workload(mode, lambda w, s, _r=runner, _p=plan: _r(w, s, _p, seed))())
        ray_modes = [m for m in modes if m in ("shared", "pooled", "dedicated")]
        if ray_modes:
            import ray

            init_ray()
            try:

                async def on_ray() -> None:
                    figures["actor start, empty actor (median ms)"] = await memory.actor_start_ms()
                    for mode in ray_modes:
                        plan = plans.get(mode, fast)
                        conf: dict[str, Any] = {"host_pool_size": args.hosts} if mode == "shared" else {}
                        await each_workload(mode, lambda w, s, _m=mode, _p=plan, _c=conf: run_essential(w, _m, s, _p, seed, **_c))()
                    if not args.no_memory:
                        # pooled holds a process per live saga, as dedicated does: one probe tells both
                        for mode, live in (("shared", 200), ("dedicated", 8)):
                            if mode in ray_modes:
                                mongo, server = fresh(f"memory-{mode}")
                                with mongo:
                                    conf = {"host_pool_size": args.hosts} if mode == "shared" else {}
                                    memory_rows.append(await memory.memory_probe(mode, server.uri, live=live, placement=mode, **conf))

                asyncio.run(on_ray())
            finally:
                ray.shutdown()
    report.render(results, memory_rows, figures, args.out, command=" ".join(["python -m bench.saga_bench", *(argv or sys.argv[1:])]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
