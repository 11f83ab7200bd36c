"""Saga throughput, latency and memory: a hand-written saga log vs Essential's runner and placements, in one run.

    python -m bench.saga_bench            # or: make bench

Workload: the 4-step order saga of ``bench/jobs.py``, one transactional
MongoDB write per step, 10 % failing at the last step (three compensations).
Modes, each against a fresh embedded MongoDB (``--sync-on-commit``) in the same run:

* saga-log  – a hand-written saga log on the same server (bench/saga_log.py): one transaction per
              step (stage insert + saga update), no Essential; what a saga costs on this storage,
              and the reference of every ratio;
* baseline  – Essential's runner and store in this asyncio process, no Ray (not a reference: it
              carries the same per-saga cost as Essential);
* baseline-unfolded – the same, with ``fold_checkpoints`` off (two transactions per step);
* naive     – a fresh Ray actor per saga that opens its own client, imports the jobs,
              runs the saga and is killed: what "actor per saga" costs done plainly;
* dedicated – Essential's default: supervisor + one ``SagaActor`` per live saga;
* shared    – Essential with ``placement=shared``: sagas as tasks in 8 host actors (``--hosts``);
* pooled    – Essential with ``placement=pooled``: an actor per live saga, as dedicated, but
              taken from a warm pool of ``max_live_sagas`` actors and reused (no process start per saga).

Latency is the saga's own createdAt → terminal updatedAt (server-side, so the
client's polling does not inflate it); throughput is wall clock for the batch.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Awaitable

REPO = Path(__file__).resolve().parent.parent
FAIL_SHARE = 0.10


@dataclass
class ModeResult:
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
    extra: dict[str, Any] = field(default_factory=dict)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


#: the pid of the server the current mode runs against (its CPU time is a figure of each mode)
SERVER_PID: int | None = None


def server_ops(uri: str) -> dict[str, float]:
    """The server's own operation counters (``serverStatus.opcounters``) and its CPU seconds: what
    a mode costs the storage, background work (sweeps, heartbeats, relays) included."""
    from pymongo import MongoClient

    with MongoClient(uri, directConnection=True) as client:
        counters: dict[str, float] = dict(client.admin.command("serverStatus")["opcounters"])
    if SERVER_PID is not None:
        fields = Path(f"/proc/{SERVER_PID}/stat").read_text().rsplit(")", 1)[1].split()
        counters["cpu_s"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return counters


def ops_per_saga(before: dict[str, float], after: dict[str, float], sagas: int) -> dict[str, float]:
    """Data operations (insert, query, update, delete, getmore), other commands (transaction
    commits, heartbeats, index checks) and server CPU milliseconds per saga."""
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    data = sum(delta.get(k, 0) for k in ("insert", "query", "update", "delete", "getmore"))
    figures = {"server_data_ops_per_saga": round(data / sagas, 1), "server_other_commands_per_saga": round(delta.get("command", 0) / sagas, 1)}
    if "cpu_s" in delta:
        figures["server_cpu_ms_per_saga"] = round(delta["cpu_s"] * 1000 / sagas, 1)
    return figures


async def measured_batch(uri: str, batch: list[Awaitable[str]]) -> tuple[list[str], float, dict[str, float]]:
    """Run the batch: its saga ids, wall seconds, and what it cost the server per saga."""
    before = await asyncio.to_thread(server_ops, uri)
    started = time.perf_counter()
    ids = await asyncio.gather(*batch)
    wall = time.perf_counter() - started
    return list(ids), wall, ops_per_saga(before, await asyncio.to_thread(server_ops, uri), len(batch))


def payloads(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"fail_last": rng.random() < FAIL_SHARE} for _ in range(n)]


async def summarize(mode: str, store: Any, ids: list[str], concurrency: int, wall: float, **extra: Any) -> ModeResult:
    sagas = [await store.get(i) for i in ids]
    lat = [(s.updatedAt - s.createdAt).total_seconds() * 1000 for s in sagas]
    states = [s.state.value for s in sagas]
    return ModeResult(
        mode, len(ids), concurrency, round(wall, 3), round(len(ids) / wall, 2),
        round(percentile(lat, 0.5), 1), round(percentile(lat, 0.95), 1), round(percentile(lat, 0.99), 1),
        states.count("completed"), states.count("aborted"), extra,
    )  # fmt: skip


# -- baseline: the same runner and store, one asyncio process ----------------------------
class CountingStore:
    """Wraps the store to count checkpoint transactions and the time spent in them."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.checkpoints = 0
        self.checkpoint_s = 0.0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in ("write_ahead", "record_result", "transition"):
            return attr

        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await attr(*args, **kwargs)
            finally:
                self.checkpoints += 1
                self.checkpoint_s += time.perf_counter() - started

        return timed


async def run_baseline(uri: str, n: int, concurrency: int, warmup: int, seed: int, fold: bool = True) -> ModeResult:
    from pymongo import monitoring

    from essential.orchestration import JobRegistry, SagaRunner, StartRequest, SystemClock, build_saga
    from essential.persistence.connection import new_client
    from essential.persistence.store import MongoSagaStore

    class Commands(monitoring.CommandListener):
        count = 0

        def started(self, event: monitoring.CommandStartedEvent) -> None:
            Commands.count += 1

        def succeeded(self, event: Any) -> None: ...

        def failed(self, event: Any) -> None: ...

    client = new_client(uri, event_listeners=[Commands()])
    os.environ["ESSENTIAL_MONGODB_URI"] = uri
    mode = "baseline" if fold else "baseline-unfolded"
    store = MongoSagaStore(client, f"bench_{mode}_c{concurrency}")
    await store.ensure_indexes()
    counting = CountingStore(store)
    registry = JobRegistry.from_modules(["bench.jobs"])
    clock = SystemClock()
    saga_time = 0.0

    async def one(payload: dict[str, Any]) -> str:
        nonlocal saga_time
        started = time.perf_counter()
        saga, event = build_saga(StartRequest(job="bench:order", payload=payload), registry, clock)
        await store.create(saga, event)
        await SagaRunner(saga.id, store=counting, registry=registry, owner=mode, fold_checkpoints=fold).run()
        saga_time += time.perf_counter() - started
        return saga.id

    for payload in payloads(warmup, seed + 1):
        await one(payload)
    counting.checkpoints, counting.checkpoint_s, saga_time, Commands.count = 0, 0.0, 0.0, 0
    gate = asyncio.Semaphore(concurrency)

    async def gated(payload: dict[str, Any]) -> str:
        async with gate:
            return await one(payload)

    work = payloads(n, seed)
    ids, wall, ops = await measured_batch(uri, [gated(p) for p in work])
    forward_steps = sum(3 if p["fail_last"] else 4 for p in work)  # succeeded + the failing one counts below
    steps = sum(4 for _ in work)
    result = await summarize(
        mode, store, ids, concurrency, wall,
        mongo_commands_per_saga=round(Commands.count / n, 1),
        checkpoint_transactions_per_step=round(counting.checkpoints / (steps + 3 * sum(p["fail_last"] for p in work)), 2),
        checkpoint_share=round(counting.checkpoint_s / saga_time, 3) if saga_time else None,
        forward_steps=forward_steps, **ops,
    )  # fmt: skip
    await client.close()
    return result


# -- the reference: a hand-written saga log on the same server ---------------------------
async def run_saga_log(uri: str, n: int, concurrency: int, warmup: int, seed: int) -> ModeResult:
    """What a saga costs on this storage without Essential (bench/saga_log.py): the ratios' reference."""
    from bench import saga_log

    before = await asyncio.to_thread(server_ops, uri)
    out = await saga_log.run(uri, payloads(n, seed), concurrency, payloads(warmup, seed + 1), pure=False)
    ops = ops_per_saga(before, await asyncio.to_thread(server_ops, uri), n + warmup)
    lat = out["latencies_ms"]
    return ModeResult(
        "saga-log", n, concurrency, round(out["wall_s"], 3), round(n / out["wall_s"], 2),
        round(percentile(lat, 0.5), 1), round(percentile(lat, 0.95), 1), round(percentile(lat, 0.99), 1),
        out["completed"], out["aborted"], ops,
    )  # fmt: skip


# -- Ray modes ------------------------------------------------------------------------------
def init_ray() -> None:
    import ray

    from essential.actors.loopback import bind_ray_to_loopback

    bind_ray_to_loopback()
    ray.init(address="local", _node_ip_address="127.0.0.1", namespace="essential_bench", include_dashboard=False, log_to_driver=False)


def naive_actor_class() -> Any:
    import ray

    @ray.remote(num_cpus=0)
    class NaiveSagaActor:
        """Everything per saga: a process, a client, the job import."""

        async def run(self, saga_id: str, uri: str, database: str) -> str:
            from essential.orchestration import JobRegistry, SagaRunner
            from essential.persistence.connection import new_client
            from essential.persistence.store import MongoSagaStore

            os.environ["ESSENTIAL_MONGODB_URI"] = uri
            client = new_client(uri)
            try:
                store = MongoSagaStore(client, database)
                registry = JobRegistry.from_modules(["bench.jobs"])
                saga = await SagaRunner(saga_id, store=store, registry=registry, owner="naive").run()
                return saga.state.value
            finally:
                await client.close()

    return NaiveSagaActor


async def run_naive(uri: str, n: int, concurrency: int, seed: int) -> ModeResult:
    import ray

    from essential.orchestration import JobRegistry, StartRequest, SystemClock, build_saga
    from essential.persistence.connection import new_client
    from essential.persistence.store import MongoSagaStore

    actor_cls = naive_actor_class()
    client = new_client(uri)
    database = "bench_naive"
    store = MongoSagaStore(client, database)
    await store.ensure_indexes()
    registry = JobRegistry.from_modules(["bench.jobs"])
    gate = asyncio.Semaphore(concurrency)

    async def one(payload: dict[str, Any]) -> str:
        async with gate:
            saga, event = build_saga(StartRequest(job="bench:order", payload=payload), registry, SystemClock())
            await store.create(saga, event)
            actor = actor_cls.remote()
            try:
                await actor.run.remote(saga.id, uri, database)
            finally:
                ray.kill(actor)
            return saga.id

    ids, wall, ops = await measured_batch(uri, [one(p) for p in payloads(n, seed)])
    result = await summarize("naive", store, ids, concurrency, wall, **ops)
    await client.close()
    return result


async def run_essential(mode: str, uri: str, n: int, concurrency: int, warmup: int, seed: int, **conf: Any) -> ModeResult:
    from essential.actors.client.ray_client import EssentialClient, stop_deployment
    from essential.actors.settings import Settings
    from essential.persistence.connection import new_client
    from essential.persistence.store import MongoSagaStore

    name = f"bench_{mode}_c{concurrency}"
    settings = Settings(
        mongodb_uri=uri, database=name, namespace=name, job_modules=["bench.jobs"],
        max_live_sagas=max(concurrency, 1), **conf,
    )  # fmt: skip
    essential = await asyncio.to_thread(EssentialClient, settings)
    sup = essential.supervisor
    gate = asyncio.Semaphore(concurrency)

    async def one(payload: dict[str, Any]) -> str:
        async with gate:
            reply = await sup.start.remote({"job": "bench:order", "payload": payload})
            saga_id = reply["saga"]["id"]
            await sup.wait.remote(saga_id, 300.0)
            return saga_id

    await asyncio.gather(*(one(p) for p in payloads(warmup, seed + 1)))
    ids, wall, ops = await measured_batch(uri, [one(p) for p in payloads(n, seed)])
    client = new_client(uri)
    result = await summarize(mode, MongoSagaStore(client, name), ids, concurrency, wall, **ops)
    await client.close()
    await asyncio.to_thread(stop_deployment, name)  # its supervisor must not sweep while the next mode runs
    return result


# -- memory and actor start ------------------------------------------------------------------
def rss_of(title_prefix: str) -> tuple[int, int]:
    """(processes, total RSS bytes) of processes whose title starts with ``title_prefix``."""
    count, total = 0, 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            if not cmd.startswith(title_prefix):
                continue
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    count += 1
        except OSError:
            continue
    return count, total


async def memory_probe(mode: str, uri: str, live: int, **conf: Any) -> dict[str, Any]:
    """Hold ``live`` sagas alive at once; RSS of the processes that host them / live sagas."""
    from essential.actors.client.ray_client import EssentialClient, stop_deployment
    from essential.actors.settings import Settings

    name = f"bench_mem_{mode}"
    settings = Settings(
        mongodb_uri=uri, database=name, namespace=name, job_modules=["bench.jobs"],
        max_live_sagas=live, max_shared_sagas=live, supervisor_interval=0.5, **conf,
    )  # fmt: skip
    essential = await asyncio.to_thread(EssentialClient, settings)
    sup = essential.supervisor
    title = "ray::SagaHost" if conf.get("placement") == "shared" else "ray::SagaActor"
    if conf.get("placement") == "shared":
        await sup.hosts.remote()  # start the pool, then measure it idle
        await asyncio.sleep(2)
    idle_procs, idle_rss = rss_of(title)
    hold = {"job": "bench:hold", "payload": {"hold_s": 30.0 if live > 100 else 15.0}}
    replies = await asyncio.gather(*(sup.start.remote(hold) for _ in range(live)))
    ids = [r["saga"]["id"] for r in replies]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 120
    peak = (0, 0, 0)
    while loop.time() < deadline:
        states = await sup.states.remote(ids)
        running = sum(1 for s in states.values() if s == "running")
        procs, rss = rss_of(title)
        if running > peak[0] or (running == peak[0] and rss > peak[2]):
            peak = (running, procs, rss)
        if running >= live:
            break
        await asyncio.sleep(0.5)
    running, procs, rss = peak
    await asyncio.gather(*(sup.wait.remote(i, 120.0) for i in ids))
    await asyncio.to_thread(stop_deployment, name)
    return {
        "mode": mode,
        "live_sagas": running,
        "processes": procs,
        "rss_mb": round(rss / 2**20, 1),
        "mb_per_live_saga": round(rss / 2**20 / max(running, 1), 2),
        "marginal_mb_per_saga": round((rss - idle_rss) / 2**20 / max(running, 1), 3) if idle_procs else None,
    }


async def actor_start_ms(samples: int = 5) -> float:
    import ray

    @ray.remote(num_cpus=0)
    class Probe:
        def pid(self) -> int:
            return os.getpid()

    times = []
    for _ in range(samples):
        started = time.perf_counter()
        actor = Probe.remote()
        await actor.pid.remote()
        times.append((time.perf_counter() - started) * 1000)
        ray.kill(actor)
    return round(statistics.median(times), 1)


# -- report ----------------------------------------------------------------------------------
def _ops_cell(extra: dict[str, Any]) -> str:
    """data operations + other commands per saga, as the server counted them"""
    if "server_data_ops_per_saga" not in extra:
        return "-"
    return f"{extra['server_data_ops_per_saga']:.0f} + {extra['server_other_commands_per_saga']:.0f}"


def _cpu_cell(extra: dict[str, Any]) -> str:
    return f"{extra['server_cpu_ms_per_saga']:.0f}" if "server_cpu_ms_per_saga" in extra else "-"


def report(results: list[ModeResult], memory: list[dict[str, Any]], figures: dict[str, Any], out_dir: Path) -> dict:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    reference = "saga-log" if any(r.mode == "saga-log" for r in results) else "baseline"
    base = {r.concurrency: r for r in results if r.mode == reference}
    table = Table("mode", "sagas", "conc.", "sagas/s", f"× {reference}", "p50 ms", "p95 ms", "p99 ms", "p50 ×", "p99 ×",
                  "done/aborted", "db ops/saga", "db CPU ms/saga", title="Essential saga benchmark (4-step order saga, 10 % compensating)")  # fmt: skip
    for r in results:
        b = base.get(r.concurrency)
        ratio = lambda a, c: f"{a / c:.2f}" if b and c else "-"  # noqa: E731
        table.add_row(
            r.mode, str(r.sagas), str(r.concurrency), f"{r.sagas_per_s:.1f}", ratio(r.sagas_per_s, b.sagas_per_s if b else 0),
            f"{r.p50_ms:.1f}", f"{r.p95_ms:.1f}", f"{r.p99_ms:.1f}", ratio(r.p50_ms, b.p50_ms if b else 0),
            ratio(r.p99_ms, b.p99_ms if b else 0), f"{r.completed}/{r.aborted}", _ops_cell(r.extra), _cpu_cell(r.extra),
        )  # fmt: skip
    console.print(table)
    mem = Table("placement", "live sagas", "processes", "RSS MB", "MB / live saga", "marginal MB / saga", title="Memory per live saga")
    for m in memory:
        mem.add_row(m["mode"], str(m["live_sagas"]), str(m["processes"]), str(m["rss_mb"]), str(m["mb_per_live_saga"]), str(m["marginal_mb_per_saga"]))
    console.print(mem)
    for key, value in figures.items():
        console.print(f"  {key}: {value}")
    naive = next((r for r in results if r.mode == "naive"), None)
    dedicated = next((r for r in results if r.mode == "dedicated"), None)
    if naive and dedicated:
        console.print(f"  dedicated / naive throughput: {dedicated.sagas_per_s / naive.sagas_per_s:.2f}×")
    pooled = next((r for r in results if r.mode == "pooled" and r.concurrency == (naive.concurrency if naive else 0)), None)
    if naive and pooled:
        console.print(f"  pooled (an actor per live saga, reused) / naive throughput: {pooled.sagas_per_s / naive.sagas_per_s:.2f}×")
    record = {
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "results": [asdict(r) for r in results],
        "memory": memory,
        "figures": figures,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"saga_bench_{time.strftime('%Y%m%d_%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2))
    print(json.dumps(record))
    console.print(f"record written to {path}")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.saga_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--sagas", type=int, default=400, help="sagas per fast mode (baseline, shared)")
    parser.add_argument("--slow-sagas", type=int, default=48, help="sagas per actor-per-saga mode (naive, dedicated)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--hosts", type=int, default=8,
        help="host actors of the shared placement (more hosts: fewer sagas per process, less server CPU per saga, ~100 MB each)",
    )  # fmt: skip
    parser.add_argument("--modes", default="saga-log,baseline,unfolded,naive,dedicated,shared,pooled")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument(
        "--no-sync-on-commit", action="store_true",
        help="run the dev server without --sync-on-commit (faster; a crash loses acknowledged writes)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    modes = set(args.modes.split(","))

    from essential.actors.dev.mongodb import EmbeddedMongo

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    results: list[ModeResult] = []
    memory: list[dict[str, Any]] = []
    figures: dict[str, Any] = {}
    sync = not args.no_sync_on_commit
    with tempfile.TemporaryDirectory(prefix="essential-bench-") as tmp:

        def fresh(label: str) -> EmbeddedMongo:
            """Each mode gets a new server: what one mode leaves behind (documents, oplog) would
            slow the next, and the comparison must not depend on the order the modes run in."""
            global SERVER_PID
            server = EmbeddedMongo(Path(tmp) / label / "db", log_dir=Path(tmp) / label, sync_on_commit=sync)
            os.environ["ESSENTIAL_MONGODB_URI"] = server.start().uri
            SERVER_PID = server.pid
            return server

        c = args.concurrency
        if "saga-log" in modes:  # the reference every ratio is taken against
            with fresh("saga-log") as mongo:
                results.append(asyncio.run(run_saga_log(mongo.uri, args.sagas, c, warmup=20, seed=args.seed)))
                results.append(asyncio.run(run_saga_log(mongo.uri, max(args.sagas // 4, 20), 1, warmup=5, seed=args.seed)))
        if "baseline" in modes:
            with fresh("baseline") as mongo:
                baseline = asyncio.run(run_baseline(mongo.uri, args.sagas, c, warmup=20, seed=args.seed))
                results.append(baseline)
                results.append(asyncio.run(run_baseline(mongo.uri, max(args.sagas // 4, 20), 1, warmup=5, seed=args.seed)))
            figures["MongoDB commands per saga (baseline)"] = baseline.extra["mongo_commands_per_saga"]
            figures["checkpoint transactions per step"] = baseline.extra["checkpoint_transactions_per_step"]
            figures["share of saga time in checkpoints (baseline)"] = baseline.extra["checkpoint_share"]
        if "unfolded" in modes:  # the same baseline with two transactions per step (fold_checkpoints off)
            with fresh("unfolded") as mongo:
                # half the sagas: its ratio is steady, and `make bench` must stay under 5 minutes
                unfolded = asyncio.run(run_baseline(mongo.uri, max(args.sagas // 2, 20), c, warmup=20, seed=args.seed, fold=False))
            results.append(unfolded)
            figures["checkpoint transactions per step (unfolded)"] = unfolded.extra["checkpoint_transactions_per_step"]
            figures["MongoDB commands per saga (unfolded)"] = unfolded.extra["mongo_commands_per_saga"]
        init_ray()

        async def ray_modes() -> None:
            # shared first: the actor-per-saga modes start ~150 worker processes, and the
            # churn they leave behind (dead workers, GCS records) should not be billed to it
            figures["actor start, empty actor (median ms)"] = await actor_start_ms()
            if "shared" in modes:
                shared = {"placement": "shared", "host_pool_size": args.hosts}
                with fresh("shared") as mongo:
                    results.append(await run_essential("shared", mongo.uri, args.sagas, c, warmup=20, seed=args.seed, **shared))
                    results.append(await run_essential("shared", mongo.uri, max(args.sagas // 4, 20), 1, warmup=5, seed=args.seed, **shared))
                    memory.append(await memory_probe("shared", mongo.uri, live=500, **shared))
            if "pooled" in modes:  # the warm-up starts the pool (one saga per actor); half the sagas keep `make bench` < 5 min
                with fresh("pooled") as mongo:
                    results.append(await run_essential("pooled", mongo.uri, max(args.sagas // 2, 20), c, warmup=max(c, 20), seed=args.seed, placement="pooled"))
            if "naive" in modes:
                with fresh("naive") as mongo:
                    results.append(await run_naive(mongo.uri, args.slow_sagas, c, seed=args.seed))
            if "dedicated" in modes:
                with fresh("dedicated") as mongo:
                    results.append(await run_essential("dedicated", mongo.uri, args.slow_sagas, c, warmup=4, seed=args.seed))
                    memory.append(await memory_probe("dedicated", mongo.uri, live=8))

        import ray

        try:
            asyncio.run(ray_modes())
        finally:
            ray.shutdown()
    report(results, memory, figures, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
