"""A randomized fault soak: the example jobs under SIGKILLs of everything, then an audit of what MongoDB holds.

    python -m bench.soak --placement dedicated|pooled|shared [--seed N] [--sagas 150] [--kill-for 75]
    make soak                     # each placement in turn (PLACEMENT=pooled for one)

One run takes 1½–3 minutes when the deployment settles, at most about 10 (the wait for
quiescence is bounded by ``--settle``).  It starts its own local stack (embedded MongoDB,
the Kafka broker, a Ray head) under a fresh home on free ports, creates the supervisor
and the gateway, seeds the example data, then for ``--kill-for`` seconds starts a mixed
batch of the example jobs (most through the Python client, some as Kafka ``start``
commands; injected failures and crashes in a share of them, child sagas, signals,
durable timers, locks) while it kills, at random and by PID, saga processes or host
actors, the supervisor, the gateway, the MongoDB server (restarted on its data) and the
Kafka broker (restarted empty).  After the last kill it waits until every saga is
terminal or parked and the outbox is drained, audits sagas, stages, the services'
ledgers, the data invariants (:mod:`bench.soak_audit`) and what reached Kafka
(:mod:`bench.soak_events`), prints a table and a verdict line, writes
``bench/results/soak-<placement>-<time>.json`` and stops everything it started.  Exit
code 0 on a pass, 1 on a failure, 2 when the soak itself could not run.

The schedule is drawn from ``--seed`` (printed), so a failing run can be repeated; the
exact interleaving still depends on the machine's timing.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console

REPO = Path(__file__).resolve().parent.parent
console = Console(width=None if os.isatty(1) else 160, log_path=False)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--placement", choices=["dedicated", "pooled", "shared"], default="dedicated")
    parser.add_argument("--seed", type=int, default=None, help="seed of the workload and the kill schedule")
    parser.add_argument("--sagas", type=int, default=150, help="sagas started (children come on top)")
    parser.add_argument("--kafka", type=int, default=None, help="of them started by Kafka commands (default 20 %%)")
    parser.add_argument("--kill-for", type=float, default=75.0, help="seconds of random kills")
    parser.add_argument("--settle", type=float, default=360.0, help="seconds to wait for quiescence after the kills")
    parser.add_argument("--max-live", type=int, default=16, help="ESSENTIAL_MAX_LIVE_SAGAS (pooled: the pool)")
    parser.add_argument("--skip", action="append", default=[], choices=["saga", "host", "supervisor", "gateway",
                        "mongodb", "kafka"], help="leave this kind of kill out of the schedule (repeatable)")  # fmt: skip
    parser.add_argument("--keep-home", action="store_true", help="keep the stack's home directory after a pass")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 1_000_000)
    kafka = args.kafka if args.kafka is not None else round(args.sagas * 0.2)
    started = time.monotonic()
    home = Path(tempfile.mkdtemp(prefix=f"essential-soak-{args.placement}-"))
    console.print(f"[bold]soak {args.placement}[/]: seed {seed}, {args.sagas} sagas ({kafka} by Kafka), "
                  f"kills for {args.kill_for:g} s, home {home}")  # fmt: skip
    _environment(home, args.placement, args.max_live)

    from essential.actors.dev.quiet import quiet_logger, quiet_ray
    from essential.actors.dev.stack import LocalStack
    from essential.actors.settings import Settings, get_settings

    quiet_ray(home / "logs" / "driver.log")  # Ray's own chatter, not the soak's output
    quiet_logger("aiokafka")  # the producer's complaints while the broker is down, likewise
    get_settings.cache_clear()
    stack = LocalStack(Settings())
    record: dict[str, Any] | None = None
    try:
        with console.status("starting the soak's own MongoDB, Kafka and Ray head…"):
            stack.up()
        os.environ.update(stack.env())
        get_settings.cache_clear()
        record = asyncio.run(_soak(get_settings(), stack, args, seed, kafka, started))
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
    except Exception:  # noqa: BLE001 - any failure of the soak itself: reported, then the stack is stopped
        console.print_exception()
    finally:
        import ray

        ray.shutdown()  # leave the cluster before stopping it
        with console.status("stopping what the soak started…"):
            for line in stack.down():
                console.print(f"  {line}")
    if record is None:
        console.print(f"[red]soak {args.placement}: the soak could not run[/] (home kept: {home})")
        return 2
    if record["passed"] and not args.keep_home:
        shutil.rmtree(home, ignore_errors=True)
    else:
        console.print(f"stack home kept for inspection: {home}")
    return 0 if record["passed"] else 1


def _environment(home: Path, placement: str, max_live: int) -> None:
    """Everything the stack and every Ray worker it starts will read: a fresh home, free ports, the placement."""
    from essential.actors.dev.mongodb import free_port
    from essential.actors.dev.stack import DEMO_JOB_MODULES

    os.environ.update({
        "ESSENTIAL_HOME": str(home),
        "ESSENTIAL_JOB_MODULES": DEMO_JOB_MODULES,  # the traffic is the example jobs'

        "ESSENTIAL_PLACEMENT": placement,
        "ESSENTIAL_MAX_LIVE_SAGAS": str(max_live),
        "ESSENTIAL_MONGODB_PORT": str(free_port()),
        "ESSENTIAL_KAFKA_PORT": str(free_port()),
        "ESSENTIAL_RAY_PORT": str(free_port()),
        "ESSENTIAL_DASHBOARD_PORT": str(free_port()),
        "ESSENTIAL_HTTP_PORT": str(free_port()),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    })  # fmt: skip
    for name in ("ESSENTIAL_MONGODB_URI", "ESSENTIAL_KAFKA_BOOTSTRAP", "ESSENTIAL_RAY_ADDRESS", "RAY_ADDRESS"):
        os.environ.pop(name, None)  # the stack's own addresses come from its record


async def _soak(settings: Any, stack: Any, args: argparse.Namespace, seed: int, kafka: int, wall0: float) -> dict[str, Any]:
    import ray

    from essential.actors.client.ray_client import EssentialClient
    from essential.actors.kafka.gateway import ensure_gateway
    from essential.orchestration.registry import JobRegistry
    from essential.persistence.connection import close_shared_clients, new_client
    from examples import data

    from . import soak_audit, soak_events, soak_evidence, soak_report
    from .soak_chaos import Chaos, plan_kills
    from .soak_plan import build_plan
    from .soak_traffic import Traffic
    from .soak_watch import busy_pids, settle, state_counts

    asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor(64))
    window = args.kill_for
    plan = build_plan(random.Random(seed), seed, args.sagas, kafka, window * 0.8)
    schedule = [k for k in plan_kills(random.Random(seed + 1), args.placement, window) if k.kind not in args.skip]
    planned_kinds = Counter(k.kind for k in schedule)
    console.print(f"plan: {dict(Counter(p.job for p in plan))}; {dict(Counter(_category(p) for p in plan))}")
    console.print(f"kill schedule (seed {seed}): {dict(planned_kinds)} at "
                  + ", ".join(f"{k.at:g}s {k.kind}" for k in schedule if k.kind not in ("saga", "host")))  # fmt: skip

    client = await asyncio.to_thread(EssentialClient, settings, address=settings.ray_address)
    gateway = await asyncio.to_thread(ensure_gateway, settings)
    if not await gateway.ready.remote(120):
        raise RuntimeError("the gateway did not become ready")
    await data.seed_demo()
    before = await data.totals()
    registry = JobRegistry.from_modules(settings.job_modules)
    db = new_client(settings.mongodb_uri, serverSelectionTimeoutMS=3000)[settings.database]

    t0, t0_wall = time.monotonic(), time.time()

    def say(text: str) -> None:
        console.print(f"[dim]t={time.monotonic() - t0:6.1f}s[/] {text}", highlight=False)

    traffic = Traffic(client, settings, plan, t0, say)
    chaos = Chaos(stack, settings.namespace, random.Random(seed + 2), t0, lambda: busy_pids(db), say)

    async def progress() -> None:
        while True:
            await asyncio.sleep(5)
            try:
                counts = dict(await state_counts(db))
            except Exception as exc:  # noqa: BLE001 - MongoDB is down right now
                counts = {"unknown": type(exc).__name__}
            say(f"progress: {counts}; kills landed {sum(chaos.landed_by_kind().values())}")

    events = soak_events.EventCollector(settings, say)
    following = asyncio.create_task(events.follow())
    watcher = asyncio.create_task(progress())
    sending = asyncio.create_task(traffic.run())
    await chaos.run(schedule)
    kills_done = time.monotonic()
    last_kill = chaos.last_kill_at or kills_done
    say(f"kills over: {chaos.landed_by_kind()}; waiting for quiescence (at most {args.settle:g} s)")
    broker_back = next((t0 + r["t"] for r in chaos.restarts if r["kind"] == "kafka" and r.get("ok")), None)
    quiet = await settle(db, plan, sending.done, lambda found: traffic.resend_missing(found, broker_back), say,
                         args.settle)  # fmt: skip
    watcher.cancel()
    if not sending.done():
        sending.cancel()
    await asyncio.gather(watcher, sending, return_exceptions=True)
    await traffic.close()
    quiet_after = round(quiet.at - last_kill, 1) if quiet.at is not None else None
    say(f"quiet after {quiet_after} s" if quiet_after is not None else f"NOT quiet after {args.settle:g} s: {quiet.last}")

    sweep = await events.sweep()
    following.cancel()
    await asyncio.gather(following, return_exceptions=True)
    after = await data.totals()
    audit = await soak_audit.load(db, plan)
    soak_audit.check(audit, registry)
    soak_audit.check_invariants(audit, before, after)
    await soak_audit.check_outbox(db, audit)
    delivered = await soak_events.check(db, events, sweep)
    unapplied = {p.key for p in plan if p.via == "kafka" and p.key not in audit.by_key}
    if unapplied:  # where are they: lost by the broker, or on the topic and never consumed?
        delivered["unapplied_commands"] = await soak_events.command_topic(settings, unapplied)
        say(f"Kafka starts never applied: {sorted(unapplied)}; command topic: {delivered['unapplied_commands']}")
    health = await _ask(client.supervisor.health.remote())
    gateway_stats = await _ask(gateway.stats.remote())
    session_dir = (stack.state() or {}).get("ray", {}).get("session_dir")
    broker_killed = next((t0 + k.t for k in chaos.log if k.kind == "kafka" and k.landed), None)
    latency = _kafka_latency(plan, audit, t0, t0_wall, broker_killed)
    evidence = soak_evidence.gather(audit, chaos.log, session_dir)
    gateway_pids = [k.pid for k in chaos.log if k.kind == "gateway" and k.pid]
    if isinstance(gateway_stats, dict) and gateway_stats.get("pid"):
        gateway_pids.append(int(gateway_stats["pid"]))
    evidence["gateway_log"] = soak_evidence.gateway_log(session_dir, gateway_pids)
    await db.client.close()
    await close_shared_clients()

    landed = chaos.landed_by_kind()
    worker_kind = "saga" if args.placement == "dedicated" else "host"
    why = soak_report.failures(audit, landed, worker_kind, quiet_after, traffic.stats.errors,
                               traffic.stats.duplicate_mismatch, delivered, args.skip)  # fmt: skip
    kills = sum(landed.values())
    sagas = len(audit.sagas)
    verdict = soak_report.verdict_line(args.placement, kills, sagas, audit, quiet_after, why)
    record: dict[str, Any] = {
        "placement": args.placement, "seed": seed, "passed": not why, "verdict": verdict, "why": why,
        "settings": {"skipped_kills": args.skip, "sagas": args.sagas, "kafka": kafka, "kill_for_s": window, "settle_s": args.settle,
                     "max_live_sagas": settings.max_live_sagas, "supervisor_interval": settings.supervisor_interval,
                     "host_pool_size": settings.host_pool_size},
        "kills": {"landed": landed, "missed": sum(1 for k in chaos.log if not k.landed), "planned": dict(planned_kinds),
                  "log": [k.as_dict() for k in chaos.log], "restarts": chaos.restarts},
        "traffic": vars(traffic.stats),
        "quiet_after_s": quiet_after, "sagas_settled_after_s": _since(quiet.sagas_settled_at, last_kill),
        "outbox_drained_after_s": _since(quiet.outbox_drained_at, last_kill), "last_poll": quiet.last,
        "kafka_start_latency_s": latency, "traffic_done_after_last_kill_s": _since(traffic.done_at, last_kill), "events_on_kafka": delivered,
        "audit": audit.as_dict(), "evidence": evidence, "supervisor_health": health, "gateway_stats": gateway_stats,
        "plan": [{"key": p.key, "job": p.job, "via": p.via, "scenario": p.scenario, "expected": p.expected,
                  "saga": p.saga_id, "at": p.at, "answered_after": p.answered_after,
                  "sent_at": [round(t - t0, 2) for t in p.sent_at]} for p in plan],
        "wall_s": round(time.monotonic() - wall0, 1), "session_dir": session_dir, "home": str(stack.home),
    }  # fmt: skip
    soak_report.print_report(console, record, audit)
    path = soak_report.write_record(record)
    for reason in why:
        console.print(f"  [red]✗[/] {reason}")
    console.print(f"[bold {'green' if not why else 'red'}]{verdict}[/]")
    console.print(f"record: {path}")
    ray.shutdown()
    return record


def _kafka_latency(plan: list[Any], audit: Any, t0: float, t0_wall: float, broker_killed: float | None) -> dict[str, Any]:
    """How long Kafka starts waited: first send to saga stored, for those the gateway applied from that send;
    and, for those only a re-send started, how long they had sat unconsumed before the broker was killed."""
    applied, stranded = [], []
    for item in plan:
        saga = audit.sagas.get(item.saga_id)
        if item.via != "kafka" or not item.sent_at or saga is None:
            continue
        created = saga.createdAt.timestamp() - t0_wall + t0  # monotonic, like sent_at
        later = [t for t in item.sent_at[1:] if t < created]
        if not later:
            applied.append((round(created - item.sent_at[0], 2), item.key))
        elif broker_killed is not None and item.sent_at[0] < broker_killed:
            stranded.append((round(broker_killed - item.sent_at[0], 1), item.key))
    applied.sort()
    stranded.sort()
    return {
        "applied": len(applied), "median": applied[len(applied) // 2][0] if applied else None,
        "max": applied[-1][0] if applied else None, "over_10s": sum(1 for w, _ in applied if w > 10),
        "slowest": applied[-5:], "unconsumed_when_broker_died": len(stranded),
        "longest_unconsumed": stranded[-5:],
    }  # fmt: skip


def _category(item: Any) -> str:
    payload = item.payload
    if payload.get("fail_at"):
        return "fails"
    if payload.get("crash_after"):
        return "crashes"
    if item.signal is not None:
        return "signal"
    if payload.get("retries"):
        return "declined+timer"
    return "ships" if item.ships else "happy"


async def _ask(ref: Any, timeout: float = 20.0) -> Any:
    try:
        return await asyncio.wait_for(ref, timeout)
    except Exception as exc:  # noqa: BLE001 - evidence only
        return {"error": f"{type(exc).__name__}: {exc}"}


def _since(at: float | None, origin: float) -> float | None:
    return round(at - origin, 1) if at is not None else None


if __name__ == "__main__":
    sys.exit(main())
