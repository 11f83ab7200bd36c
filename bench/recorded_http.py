"""Recorded-saga throughput through the HTTP API (Ray Serve): start + 3 adds + commit per saga.

    python -m bench.recorded_http                      # dedicated and shared placement
    python -m bench.recorded_http --modes shared --sagas 500 --concurrency 32

Everything real and on this machine: the embedded MongoDB (``--sync-on-commit``),
a local Ray, the supervisor, Ray Serve bound to 127.0.0.1 and an ordinary HTTP
client (httpx) with ``--concurrency`` sagas in flight.  Each saga is five
requests: ``POST /essential/sagas/start``, three ``POST /essential/sagas/add``
(create stages, each one fenced transaction with its outbox event) and
``GET /essential/sagas/{id}/commit`` (``committing`` → ``completed``).

* dedicated – the default: every open recorded saga is its own ``SagaActor`` process;
* shared    – ``placement=shared``: open sagas are tasks in ``--hosts`` host actors.

Prints a table and one JSON record (also written to ``bench/results/``).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.report import percentile

REPO = Path(__file__).resolve().parent.parent
ADDS = 3


@dataclass
class Result:
    mode: str
    sagas: int
    concurrency: int
    wall_s: float
    sagas_per_s: float
    requests_per_s: float
    saga_p50_ms: float
    saga_p95_ms: float
    request_p50_ms: float
    request_p95_ms: float
    completed: int
    errors: int


async def one_saga(http: Any, requests: list[float]) -> tuple[float, bool]:
    """start, 3 adds, commit; returns (seconds, completed)."""
    from bson import ObjectId

    began = time.perf_counter()

    async def timed(method: str, path: str, **kw: Any) -> Any:
        t = time.perf_counter()
        response = await http.request(method, path, **kw)
        requests.append(time.perf_counter() - t)
        if response.status_code >= 400:
            raise RuntimeError(f"{method} {path}: {response.status_code} {response.text[:200]}")
        return response.json()["data"]

    saga = await timed("POST", "/essential/sagas/start", json={"ttl": 300, "job": "bench:recorded"})
    for n in range(ADDS):
        oid = str(ObjectId())
        await timed("POST", "/essential/sagas/add", json={
            "saga": saga["id"], "bucket": "benchshop.orders", "action": "INSERT_MANY",
            "req": {"documents": [{"_id": {"$oid": oid}, "n": n}]}, "res": {"insertedIds": [{"$oid": oid}]},
        })  # fmt: skip
    done = await timed("GET", f"/essential/sagas/{saga['id']}/commit")
    return time.perf_counter() - began, done["state"] == "completed"


async def drive(base: str, token: str, n: int, concurrency: int) -> tuple[float, list[float], list[float], int, int]:
    import httpx

    gate = asyncio.Semaphore(concurrency)
    requests: list[float] = []
    latencies: list[float] = []
    completed = errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=120,
                                 limits=limits) as http:  # fmt: skip

        async def gated() -> None:
            nonlocal completed, errors
            async with gate:
                try:
                    seconds, ok = await one_saga(http, requests)
                except Exception as exc:  # noqa: BLE001 - counted, reported
                    errors += 1
                    print(f"  saga failed: {exc}", file=sys.stderr)
                    return
                latencies.append(seconds)
                completed += ok

        started = time.perf_counter()
        await asyncio.gather(*(gated() for _ in range(n)))
        wall = time.perf_counter() - started
    return wall, latencies, requests, completed, errors


def run_mode(mode: str, uri: str, n: int, warmup: int, concurrency: int, hosts: int) -> Result:
    from essential.actors.client.ray_client import EssentialClient
    from essential.actors.dev.mongodb import free_port
    from essential.actors.http.api import start_http, stop_http
    from essential.actors.settings import Settings

    name = f"bench_rec_{mode}"
    token = secrets.token_urlsafe(16)
    settings = Settings(
        mongodb_uri=uri, database=name, namespace=name, placement=mode, host_pool_size=hosts,
        max_live_sagas=max(4 * concurrency, 32), supervisor_interval=0.5, http_port=free_port(), http_token=token,
    )  # fmt: skip
    EssentialClient(settings)  # the supervisor
    base = start_http(settings, token=token).removesuffix("/essential")
    try:
        asyncio.run(drive(base, token, warmup, concurrency))
        wall, latencies, requests, completed, errors = asyncio.run(drive(base, token, n, concurrency))
    finally:
        stop_http(settings)
    return Result(
        mode, n, concurrency, round(wall, 3), round(n / wall, 2), round(len(requests) / wall, 1),
        round(percentile(latencies, 0.5) * 1000, 1), round(percentile(latencies, 0.95) * 1000, 1),
        round(percentile(requests, 0.5) * 1000, 1), round(percentile(requests, 0.95) * 1000, 1), completed, errors,
    )  # fmt: skip


def report(results: list[Result], out_dir: Path, machine: dict[str, Any]) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table("placement", "sagas", "conc.", "sagas/s", "HTTP req/s", "saga p50 ms", "saga p95 ms",
                  "request p50 ms", "request p95 ms", "completed", "errors",
                  title=f"Recorded sagas through the HTTP API (start + {ADDS} adds + commit)")  # fmt: skip
    for r in results:
        table.add_row(r.mode, str(r.sagas), str(r.concurrency), f"{r.sagas_per_s:.1f}", f"{r.requests_per_s:.0f}",
                      f"{r.saga_p50_ms:.0f}", f"{r.saga_p95_ms:.0f}", f"{r.request_p50_ms:.1f}",
                      f"{r.request_p95_ms:.1f}", str(r.completed), str(r.errors))  # fmt: skip
    console.print(table)
    record = {"bench": "recorded_http", "at": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine,
              "results": [asdict(r) for r in results]}  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"recorded_http_{time.strftime('%Y%m%d_%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2))
    print(json.dumps(record))
    console.print(f"record written to {path}")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.recorded_http", description=__doc__.splitlines()[0])
    parser.add_argument("--sagas", type=int, default=300, help="sagas measured in shared placement")
    parser.add_argument("--slow-sagas", type=int, default=60, help="sagas measured in dedicated placement")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--hosts", type=int, default=4, help="host actors of the shared placement")
    parser.add_argument("--modes", default="dedicated,shared")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from essential.actors.dev.mongodb import EmbeddedMongo
    from essential.actors.loopback import bind_ray_to_loopback

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    load_start = list(os.getloadavg())
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="essential-bench-") as tmp, EmbeddedMongo(Path(tmp) / "db", log_dir=tmp) as mongo:
        os.environ["ESSENTIAL_MONGODB_URI"] = mongo.uri
        bind_ray_to_loopback()
        ray.init(address="local", _node_ip_address="127.0.0.1", namespace="essential_bench", include_dashboard=False,
                 log_to_driver=False)  # fmt: skip
        try:
            for mode in args.modes.split(","):
                n = args.slow_sagas if mode == "dedicated" else args.sagas
                warmup = max(args.concurrency // 2, 4)
                results.append(run_mode(mode, mongo.uri, n, warmup, args.concurrency, args.hosts))
                print(f"{mode}: {results[-1].sagas_per_s} sagas/s", file=sys.stderr)
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
    machine = {"cpus": os.cpu_count(), "python": sys.version.split()[0], "ray": ray.__version__,
               "load average at start / end": [load_start, list(os.getloadavg())]}  # other work on the machine
    report(results, args.out, machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
