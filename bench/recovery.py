"""Time from a saga actor's death (SIGKILL) to its saga resuming in a new actor.

    python -m bench.recovery [--kills 7] [--interval 2.0]

"Resumed" is the moment the new actor takes the saga's lease (epoch + 1), read
from MongoDB; the supervisor sweeps every ``--interval`` seconds (the default
setting), so the figure is about half an interval plus an actor start.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


async def measure(kills: int, interval: float, uri: str) -> list[float]:
    import ray

    from essential.actors.client.ray_client import EssentialClient
    from essential.actors.settings import Settings
    from essential.persistence.connection import new_client
    from essential.persistence.store import MongoSagaStore

    settings = Settings(
        mongodb_uri=uri, database="bench_recovery", namespace="bench_recovery",
        job_modules=["bench.jobs"], supervisor_interval=interval,
    )  # fmt: skip
    client = await asyncio.to_thread(EssentialClient, settings)
    store = MongoSagaStore(new_client(uri), "bench_recovery")
    delays: list[float] = []
    for _ in range(kills):
        saga_id = client.start("bench:hold", {"hold_s": 30})
        while (await store.get(saga_id)).lease.epoch < 1:
            await asyncio.sleep(0.02)
        handle = ray.get_actor(f"saga:{saga_id}", namespace="bench_recovery")
        pid = await handle.pid.remote()
        killed_at = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        while (await store.get(saga_id)).lease.epoch < 2:
            await asyncio.sleep(0.01)
        delays.append(time.perf_counter() - killed_at)
        client.abort(saga_id, "measured")
    return delays


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.recovery", description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=7)
    parser.add_argument("--interval", type=float, default=2.0, help="supervisor sweep interval (s)")
    args = parser.parse_args(argv)

    import ray

    from essential.actors.dev.mongodb import EmbeddedMongo
    from essential.actors.loopback import bind_ray_to_loopback

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="essential-recovery-") as tmp, EmbeddedMongo(Path(tmp) / "db", log_dir=tmp) as mongo:
        os.environ["ESSENTIAL_MONGODB_URI"] = mongo.uri
        bind_ray_to_loopback()
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
        try:
            delays = asyncio.run(measure(args.kills, args.interval, mongo.uri))
        finally:
            ray.shutdown()
    record = {
        "kills": len(delays),
        "supervisor_interval_s": args.interval,
        "median_s": round(statistics.median(delays), 3),
        "min_s": round(min(delays), 3),
        "max_s": round(max(delays), 3),
        "all_s": [round(d, 3) for d in delays],
    }
    print(f"actor death -> saga resumed: median {record['median_s']} s over {len(delays)} kills "
          f"(min {record['min_s']}, max {record['max_s']}; sweep interval {args.interval} s)")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
