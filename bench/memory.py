"""Memory per live saga and the cost of an empty actor: what each placement holds while sagas wait."""
from __future__ import annotations

import asyncio
import os
import statistics
import time
from pathlib import Path
from typing import Any


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
    title = "ray::SagaHost" if conf.get("placement") in ("shared", "pooled") else "ray::SagaActor"
    if conf.get("placement") == "shared":
        await sup.hosts.remote()  # start the pool, then measure it idle
        await asyncio.sleep(2)
    idle_procs, idle_rss = rss_of(title)
    hold = {"job": "bench:hold", "payload": {"hold_s": 12.0 if live > 100 else 15.0}}
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


