"""The operators' window - dashboard actors, metrics, CLI views, logs and traces.

Runs its own deployment (namespace and database ``essential_ops``, with a
gateway on topics of its own) and a job per test (``tests/ops_jobs.py``), so
what it asserts is exactly what its sagas did, whatever else shares the cluster.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import pytest
import ray
from bson import ObjectId
from prometheus_client.parser import text_string_to_metric_families

from essential.actors import metrics
from essential.actors.kafka.gateway import ensure_gateway
from essential.actors.names import GATEWAY_NAME
from essential.actors.tracing import TRACEPARENT, valid
from essential.orchestration import SagaState
from essential.orchestration.states import Action

from .conftest import JOBS_DB, REPO, poll

NS = "essential_ops"
JOB_MODULES = ["examples.jobs", "tests.jobs", "tests.ops_jobs"]
ESSENTIAL = str(Path(sys.executable).with_name("essential"))


async def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Blocking Ray calls run off the event loop that the MongoDB client uses."""
    return await asyncio.to_thread(fn, *args, **kwargs)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
async def ops(deployment: Any) -> AsyncIterator[tuple[Any, Any]]:
    client, store = await deployment(
        NS,
        job_modules=JOB_MODULES,
        max_live_sagas=3,
        kafka_command_topic="ops.commands",
        kafka_dlq_topic="ops.commands.dlq",
        kafka_reply_topic="ops.replies",
        kafka_reply_dlq_topic="ops.replies.dlq",
        kafka_consumer_group="essential-ops",
    )
    gateway = await call(ensure_gateway, client.settings)
    assert await gateway.ready.remote(120), "the gateway did not become ready"
    yield client, store
    for name in (GATEWAY_NAME, metrics.SINK_NAME):
        try:
            handle = ray.get_actor(name, namespace=NS)
        except ValueError:
            continue
        if name == GATEWAY_NAME:
            await call(lambda: ray.get(handle.stop.remote(), timeout=60))
        ray.kill(handle, no_restart=True)


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a fresh shell pointed at this deployment's database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESSENTIAL_")}
    env.update({
        "ESSENTIAL_MONGODB_URI": os.environ["ESSENTIAL_MONGODB_URI"],
        "ESSENTIAL_DATABASE": NS,
        "COLUMNS": "220",
        "PYTHONPATH": str(REPO),
    })  # fmt: skip
    env.update(extra)
    return env


async def essential(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """Run the installed ``essential`` command as an operator would."""
    return await asyncio.to_thread(
        subprocess.run, [ESSENTIAL, *args], env=cli_env(**env), capture_output=True, text=True, timeout=timeout,
        cwd=str(REPO),
    )  # fmt: skip


# --------------------------------------------------------------------------- the metrics endpoint
def scrape() -> str:
    """Every alive node's Prometheus endpoint (Ray's metrics agent), concatenated."""
    texts = []
    for node in ray.nodes():
        if node.get("Alive") and node.get("MetricsExportPort"):
            url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
            texts.append(httpx.get(url, timeout=10).text)
    return "\n".join(texts)


def series(text: str, sample: str, **labels: str) -> float:
    """Sum of ``sample`` over every series whose labels include ``labels`` (workers, nodes summed)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def snapshot(job: str) -> dict[str, float]:
    text = scrape()
    counts = {
        "started": series(text, "ray_essential_sagas_started_total", job=job),
        "completed": series(text, "ray_essential_sagas_completed_total", job=job),
        "aborted": series(text, "ray_essential_sagas_aborted_total", job=job),
        "parked": series(text, "ray_essential_sagas_parked_total", job=job),
        "restores": series(text, "ray_essential_restores_total", job=job),
        "retries": series(text, "ray_essential_step_retries_total", job=job),
        "retries_compensate": series(text, "ray_essential_step_retries_total", job=job, action="compensate"),
        "compensations_ok": series(text, "ray_essential_compensations_total", job=job, state="succeeded"),
        "compensations_failed": series(text, "ray_essential_compensations_total", job=job, state="failed"),
        "stages": series(text, "ray_essential_stage_duration_seconds_count", job=job),
        "stages_failed": series(text, "ray_essential_stage_duration_seconds_count", job=job, state="failed"),
        "sagas_timed": series(text, "ray_essential_saga_duration_seconds_count", job=job),
    }
    return counts


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: round(after[k] - before.get(k, 0.0), 6) for k in after}


async def counters_become(job: str, before: dict[str, float], expected: dict[str, float], timeout: float = 120) -> None:
    """Ray flushes metrics every few seconds: poll the endpoint until the deltas are what the batch did."""
    last: dict[str, float] = {}

    def check() -> bool:
        nonlocal last
        last = delta(snapshot(job), before)
        return all(last[k] == v for k, v in expected.items())

    try:
        await poll(lambda: asyncio.to_thread(check), timeout=timeout, interval=1.0, what="metric counters")
    except AssertionError:
        raise AssertionError(f"metrics of {job}: expected {expected}, endpoint says {last}") from None


# --------------------------------------------------------------------------- dashboard: actors
def alive_actors(namespace: str) -> list[Any]:
    from ray.util.state import list_actors

    # this cluster's API server: Ray lets RAY_API_SERVER_ADDRESS (then RAY_ADDRESS) override the argument
    dashboard = "http://" + ray._private.worker.get_dashboard_url()
    saved = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = dashboard
    try:
        actors = list_actors(address=dashboard, filters=[("state", "=", "ALIVE")], limit=10_000, detail=True,
                             raise_on_missing_output=False)  # fmt: skip
    finally:
        if saved is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = saved
    return [a for a in actors if a.ray_namespace == namespace]


async def test_state_api_shows_an_actor_for_exactly_the_live_sagas(ops: tuple[Any, Any], mongo: Any) -> None:
    client, store = ops
    # three run (max_live_sagas=3) and are held in step b; two wait as pending, without an actor
    gate = f"g-{uuid.uuid4().hex}"
    ids = await call(client.start_many, [{"job": "ops:actors", "payload": {"gate": {"b": gate}}}] * 5)
    live_states = {SagaState.RUNNING.value, SagaState.COMPENSATING.value, SagaState.COMMITTING.value}
    seen: dict[str, Any] = {}

    async def actors_match_live_sagas() -> bool:
        actors = await call(alive_actors, NS)
        states = await store.states(ids)
        live = {i for i, state in states.items() if state in live_states}
        pending = {i for i, state in states.items() if state == SagaState.PENDING.value}
        saga_actors = {a.name.removeprefix("saga:"): a for a in actors if (a.name or "").startswith("saga:")}
        seen.update(actors={a.name: a for a in actors}, saga_actors=saga_actors, live=live)
        return len(live) == 3 and len(pending) == 2 and set(saga_actors) == live

    await poll(actors_match_live_sagas, timeout=60, interval=0.2, what="saga:<id> actors == live sagas")
    for saga_id, actor in seen["saga_actors"].items():
        assert actor.repr_name == f"SagaActor(saga={saga_id}, job=ops:actors)", actor.repr_name
        assert actor.class_name == "SagaActor"
    named = seen["actors"]
    assert named["essential:supervisor"].repr_name == "Supervisor(essential)"
    assert named[GATEWAY_NAME].repr_name == f"Gateway({GATEWAY_NAME})"
    assert named[GATEWAY_NAME].class_name == "Gateway"

    await mongo[JOBS_DB].gates.insert_one({"_id": gate})
    for saga_id in ids:
        assert (await call(client.wait, saga_id, 120)).state == SagaState.COMPLETED

    async def no_saga_actor_left() -> bool:
        return not [a for a in await call(alive_actors, NS) if (a.name or "").startswith("saga:")]

    await poll(no_saga_actor_left, timeout=60, what="saga actors to leave")


# --------------------------------------------------------------------------- metrics
async def test_metrics_endpoint_counts_what_a_batch_with_failures_did(ops: tuple[Any, Any]) -> None:
    client, store = ops
    job = "ops:metrics"
    before = await call(snapshot, job)
    batch = (
        [{}] * 4  # completed, no retries
        + [{"fail_at": "d"}] * 2  # aborted: d tried 3 times, c b a compensated
        + [{"fail_at": "b", "fail_times": 1}]  # completed after one retry of b
        + [{"fail_at": "c", "fail_undo_at": "a"}]  # c fails, b undone, a's undo fails 5 times: parked
    )
    ids = await call(client.start_many, [{"job": job, "payload": p} for p in batch])
    ended = [await call(client.wait, i, 120) for i in ids]
    assert [s.state.value for s in ended] == ["completed"] * 4 + ["aborted"] * 2 + ["completed", "parked"]

    # what the batch did, from MongoDB: the expectation is not hand-counted only
    stages = [s for i in ids for s in await store.stages(i)]
    retries = sum(s.meta.retry_count for s in stages)
    compensations = [s for s in stages if s.action == Action.COMPENSATE]
    expected = {
        "started": 8, "completed": 5, "aborted": 2, "parked": 1, "restores": 0,
        "retries": retries, "retries_compensate": sum(s.meta.retry_count for s in compensations),
        "compensations_ok": sum(s.status.value == "succeeded" for s in compensations),
        "compensations_failed": sum(s.status.value == "failed" for s in compensations),
        "stages": len(stages), "stages_failed": sum(s.status.value == "failed" for s in stages),
        "sagas_timed": 8,
    }  # fmt: skip
    assert expected["retries"] == 2 * 2 + 1 + 2 + 4 and expected["compensations_ok"] == 7
    assert expected["compensations_failed"] == 1 and expected["stages"] == 20 + 14 + 5
    await counters_become(job, before, expected)

    # never a saga id in a label: the only per-series labels are Ray's own and the declared tags
    text = await call(scrape)
    allowed = {"Component", "NodeAddress", "SessionName", "Version", "WorkerId", "le", "otel_scope_name",
               "otel_scope_schema_url", "otel_scope_version", "job", "state", "bucket", "action", "placement",
               "outbox", "topic", "code", "deployment"}  # fmt: skip
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ray_essential_"):
                assert set(sample.labels) <= allowed, sample
                assert not any(saga_id in str(sample.labels) for saga_id in ids)
    # dedicated saga actors forward to one process: one series per tag set, not one per saga actor
    workers = {s.labels.get("WorkerId") for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "ray_essential_sagas_completed_total" and s.labels.get("job") == job}  # fmt: skip
    assert len(workers) == 1, workers


async def test_gauges_report_parked_pending_live_and_outbox(ops: tuple[Any, Any]) -> None:
    client, store = ops
    parked = await store.sagas.count_documents({"state": "parked"})

    def gauges() -> dict[str, float]:
        text = scrape()
        return {
            "parked": series(text, "ray_essential_parked_sagas", deployment=NS),
            "events_backlog": series(text, "ray_essential_outbox_backlog", deployment=NS, outbox="events"),
            "has_live": float("ray_essential_live_saga_actors" in text),
            "has_pending": float("ray_essential_pending_sagas" in text),
            "has_lag": float("ray_essential_outbox_relay_lag_seconds" in text),
        }

    last: dict[str, float] = {}

    def ready() -> bool:
        nonlocal last
        last = gauges()
        # the gateway relays everything: the backlog drains to zero
        return last == {"parked": float(parked), "events_backlog": 0.0, "has_live": 1.0, "has_pending": 1.0,
                        "has_lag": 1.0}  # fmt: skip

    assert parked >= 1, "the metrics test left a parked saga"
    try:
        await poll(lambda: asyncio.to_thread(ready), timeout=120, interval=1.0, what="gauges")
    except AssertionError:
        raise AssertionError(f"gauges: {last} (parked in MongoDB: {parked})") from None


async def test_restore_is_counted(ops: tuple[Any, Any], mongo: Any) -> None:
    client, store = ops
    job = "ops:restore"
    before = await call(snapshot, job)
    gate = f"g-{uuid.uuid4().hex}"  # b is still running when its actor is killed, however slow the machine
    saga_id = await call(client.start, job, {"gate": {"b": gate}})

    async def in_b() -> bool:
        running = await mongo[JOBS_DB].calls.count_documents({"saga": saga_id, "step": "b"}) == 1
        return running and any(s.step == "b" for s in await store.stages(saga_id))

    await poll(in_b, timeout=60, what="step b to start")
    actor = ray.get_actor(f"saga:{saga_id}", namespace=NS)
    os.kill(await actor.pid.remote(), signal.SIGKILL)
    await mongo[JOBS_DB].gates.insert_one({"_id": gate})  # the restored run of b goes through
    saga = await call(client.wait, saga_id, 120)
    assert saga.state == SagaState.COMPLETED and saga.lease.epoch >= 2
    b_runs = await mongo[JOBS_DB].calls.count_documents({"saga": saga_id, "step": "b", "kind": "run"})
    assert b_runs == 2, "the killed run of b was cut off and run again by the restored actor"
    await counters_become(job, before, {"started": 1, "completed": 1, "restores": 1})


async def test_dead_letters_are_counted(ops: tuple[Any, Any], kafka: Any) -> None:
    from aiokafka import AIOKafkaProducer

    def dead(text: str) -> float:
        return series(text, "ray_essential_dead_letters_total", topic="ops.commands", code="not_json")

    before = dead(await call(scrape))
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(2):
            await producer.send_and_wait("ops.commands", b"{not json", key=f"bad-{uuid.uuid4()}".encode())
    finally:
        await producer.stop()
    await poll(lambda: asyncio.to_thread(lambda: dead(scrape()) - before == 2), timeout=120, interval=1.0,
               what="two dead letters counted")  # fmt: skip


def test_grafana_dashboard_charts_every_metric_and_only_declared_ones() -> None:
    path = REPO / "monitoring" / "grafana" / "essential-dashboard.json"
    dashboard = json.loads(path.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = set(re.findall(r"ray_essential_[a-z_]+", " ".join(exprs)))
    exported = {n for name, spec in metrics.METRICS.items() for n in spec.exported(name)}
    assert used <= exported, used - exported
    charted = {name for name, spec in metrics.METRICS.items() if set(spec.exported(name)) & used}
    assert charted == set(metrics.METRICS), set(metrics.METRICS) - charted
    for name, spec in metrics.METRICS.items():
        assert "saga" not in spec.tags and "id" not in spec.tags, name


# --------------------------------------------------------------------------- CLI views
async def test_inspect_shows_forward_stages_and_compensations_in_order(ops: tuple[Any, Any], mongo: Any) -> None:
    client, store = ops
    saga_id = await call(client.start, "ops:cli", {"fail_at": "d"}, correlation_id="order-77")
    saga = await call(client.wait, saga_id, 120)
    assert saga.state == SagaState.ABORTED

    shown = await essential("inspect", saga_id)
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert f"saga {saga_id}" in out and "ops:cli" in out and "aborted" in out and "order-77" in out
    assert f"ran on: saga:{saga_id}@" in out, out
    rows = [line for line in out.splitlines() if re.match(r"^\W*\d+\W+[abcd]\W", line)]
    steps = [re.match(r"^\W*(\d+)\W+([abcd])\W", r).groups() for r in rows]  # type: ignore[union-attr]
    assert steps == [("1", "a"), ("2", "b"), ("3", "c"), ("4", "d"), ("5", "c"), ("6", "b"), ("7", "a")], out
    for row, undone in zip(rows[4:], ("#3 c", "#2 b", "#1 a")):
        assert f"undoes {undone}" in row, row
        assert re.search(r"\d+\.\d", row), f"no duration in {row!r}"
    assert "undone by #5" in rows[2] and "injected failure in d" in rows[3]
    assert "compensated in reverse: c (#3" in out

    as_json = await essential("inspect", saga_id, "--json")
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    db = mongo[NS]
    doc = await db.sagas.find_one({"_id": ObjectId(saga_id)})
    assert data["saga"]["id"] == saga_id and data["saga"]["state"] == doc["state"] == "aborted"
    assert data["saga"]["job"] == doc["job"] and data["where"] == doc["lease"]["owner"]
    assert data["saga"]["error"] == doc["error"] and data["saga"]["correlation_id"] == doc["correlation_id"]
    stage_docs = [d async for d in db.stages.find({"saga": doc["_id"]}).sort("seq", 1)]
    key = lambda s: (s["seq"], s["step"], s["bucket"], s["action"], s["status"], s["compensates"],  # noqa: E731
                     s["meta"]["duration_ms"], s["meta"]["retry_count"], s["meta"]["errors"])  # fmt: skip
    assert [key(s) for s in data["stages"]] == [key(d) for d in stage_docs]
    timeline = [(r["seq"], r["step"], r["action"], r["compensates"], r["duration_ms"]) for r in data["timeline"]]
    assert timeline == [(d["seq"], d["step"], d["action"], d["compensates"], d["meta"]["duration_ms"]) for d in stage_docs]
    assert [r["compensated_by"] for r in data["timeline"][:4]] == [7, 6, 5, None]
    assert [e["type"] for e in data["events"]][-1] == "saga.aborted"

    alias = await essential("status", saga_id, "--json")
    assert json.loads(alias.stdout)["saga"] == data["saga"]


async def test_list_filters_and_stats(ops: tuple[Any, Any]) -> None:
    client, store = ops
    ids = await call(client.start_many, [{"job": "ops:cli", "payload": p} for p in ({}, {}, {"fail_at": "b"})])
    for saga_id in ids:
        await call(client.wait, saga_id, 120)

    listed = await essential("list", "--job", "ops:cli", "--state", "aborted", "--since", "1h", "--json")
    assert listed.returncode == 0, listed.stderr
    aborted = [s["id"] for s in json.loads(listed.stdout)]
    assert ids[2] in aborted and ids[0] not in aborted
    assert all(s["state"] == "aborted" and s["job"] == "ops:cli" for s in json.loads(listed.stdout))
    one = json.loads((await essential("list", "--job", "ops:cli", "--limit", "1", "--json")).stdout)
    assert len(one) == 1
    future = json.loads((await essential("list", "--since", "2999-01-01T00:00:00Z", "--json")).stdout)
    assert future == []
    table = await essential("list", "--job", "ops:cli")
    assert table.returncode == 0 and ids[0] in table.stdout

    stats = await essential("stats", "--json")
    assert stats.returncode == 0, stats.stderr
    data = json.loads(stats.stdout)
    db_counts: dict[str, dict[str, int]] = defaultdict(dict)
    async for d in store.sagas.find({}, {"job": 1, "state": 1}):
        db_counts[d["job"]][d["state"]] = db_counts[d["job"]].get(d["state"], 0) + 1
    assert data["by_job"] == dict(db_counts)
    parked_ids = {str(d["_id"]) async for d in store.sagas.find({"state": "parked"}, {"_id": 1})}
    assert {p["id"] for p in data["parked"]} == parked_ids
    assert data["throughput"]["finished"] >= 3 and data["throughput"]["started"] >= 3
    rendered = await essential("stats")
    assert rendered.returncode == 0 and "sagas by job and state" in rendered.stdout and "ops:cli" in rendered.stdout

    bad = await essential("list", "--state", "nonsense")
    assert bad.returncode == 2 and "unknown state" in bad.stderr and "Traceback" not in bad.stderr
    bad_since = await essential("list", "--since", "yesterday-ish")
    assert bad_since.returncode == 2 and "--since" in bad_since.stderr
    missing = await essential("inspect", "0123456789abcdef01234567")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


async def test_tail_follows_lifecycle_events_as_json_lines(ops: tuple[Any, Any]) -> None:
    client, store = ops
    proc = subprocess.Popen(
        [ESSENTIAL, "tail", "--job", "ops:tail", "--json", "--since", "10m", "--count", "6", "--timeout", "120"],
        env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO),
    )  # fmt: skip
    try:
        saga_id = await call(client.start, "ops:tail", {})
        assert (await call(client.wait, saga_id, 120)).state == SagaState.COMPLETED
        out, err = await asyncio.to_thread(proc.communicate, timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["type"] for e in events] == ["saga.started"] + ["saga.stage.completed"] * 4 + ["saga.completed"]
    assert {e["saga"] for e in events} == {saga_id}
    assert [e["data"]["step"] for e in events[1:5]] == ["a", "b", "c", "d"]


async def test_cli_finds_the_stack_from_a_fresh_shell(ops: tuple[Any, Any], tmp_path: Path) -> None:
    """`essential up` records the stack; a new shell with no ESSENTIAL_* variables reads through it."""
    client, store = ops
    uri = os.environ["ESSENTIAL_MONGODB_URI"]
    entry = {"pid": 1, "port": 1, "address": "", "log": ""}
    state = {"mongodb": {**entry, "address": uri}, "kafka": {**entry, "address": "127.0.0.1:1"},
             "ray": {**entry, "address": "127.0.0.1:1"}}  # fmt: skip
    (tmp_path / "stack.json").write_text(json.dumps(state))
    env = cli_env(ESSENTIAL_HOME=str(tmp_path))
    del env["ESSENTIAL_MONGODB_URI"]
    result = await asyncio.to_thread(
        subprocess.run, [ESSENTIAL, "list", "--job", "ops:cli", "--json"], env=env, capture_output=True, text=True,
        timeout=120, cwd=str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout), "the recorded stack's MongoDB was read"


# --------------------------------------------------------------------------- logs and traces
async def test_trace_context_is_generated_and_travels_with_the_saga(ops: tuple[Any, Any]) -> None:
    client, store = ops
    saga_id = await call(client.start, "ops:logs", {})
    saga = await call(client.wait, saga_id, 60)
    assert valid(saga.traceparent), saga.traceparent
    trace = saga.traceparent.split("-")[1]
    assert all(s.meta.traceparent == saga.traceparent for s in await store.stages(saga_id))
    assert all(r["headers"]["traceparent"] == saga.traceparent for r in await store.outbox_for(saga_id))

    given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    kept = await call(client.wait, await call(client.start, "ops:logs", {}, traceparent=given), 60)
    assert kept.traceparent == given

    # with opentelemetry-api installed, the caller's active span becomes the saga's parent
    from opentelemetry import trace as otel

    span = otel.NonRecordingSpan(otel.SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C, span_id=0xB7AD6B7169203331, is_remote=False,
        trace_flags=otel.TraceFlags(1),
    ))  # fmt: skip

    def start_in_span() -> str:
        with otel.use_span(span):
            return client.start("ops:logs", {})

    joined = await call(client.wait, await call(start_in_span), 60)
    assert joined.traceparent == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert trace != "0af7651916cd43dd8448eb211c80319c"


async def test_saga_log_lines_carry_saga_job_stage_and_correlation(ops: tuple[Any, Any]) -> None:
    client, store = ops
    correlation = f"corr-{uuid.uuid4().hex[:8]}"
    saga_id = await call(client.start, "ops:logs", {}, correlation_id=correlation)
    saga = await call(client.wait, saga_id, 60)
    trace = saga.traceparent.split("-")[1]
    logs_dir = Path(ray._private.worker.global_worker.node.get_logs_dir_path())

    def lines() -> list[str]:
        found = []
        for path in logs_dir.glob("worker-*.err"):
            try:
                found += [line for line in path.read_text(errors="replace").splitlines() if f"saga={saga_id}" in line]
            except OSError:
                continue
        return found

    def complete() -> list[str] | None:
        found = lines()
        return found if any("saga completed" in line for line in found) else None

    found = await poll(lambda: asyncio.to_thread(complete), timeout=60, interval=0.5, what="the saga's log lines")
    stage_lines = [line for line in found if "essential.saga stage " in line]
    assert [re.search(r" stage=(\w+)", line).group(1) for line in stage_lines] == ["a", "b"]  # type: ignore[union-attr]
    for line in stage_lines:
        assert "job=ops:logs" in line and f"correlation_id={correlation}" in line and f"trace_id={trace}" in line
        assert re.search(r" duration_ms=[\d.]+", line) and " status=succeeded" in line
    assert any(f"where=saga:{saga_id}" in line for line in found)


def test_log_formats() -> None:
    import io
    import logging

    from essential.actors import logs

    stream = io.StringIO()
    root = logging.getLogger("essential")
    saved = (root.level, root.propagate)
    logs.configure("json", "INFO", stream=stream)
    try:
        token = logs.bind(saga="abc", job="j:x", correlation_id="c-1")
        logging.getLogger("essential.test").info("hello %s", "world", extra={"stage": "s1"})
        logs._context.reset(token)
        record = json.loads(stream.getvalue().splitlines()[-1])
        assert record["msg"] == "hello world" and record["saga"] == "abc" and record["stage"] == "s1"
        assert record["job"] == "j:x" and record["correlation_id"] == "c-1" and record["level"] == "INFO"
        logs.configure("kv", "INFO")
        handler = logs._configured["handler"]
        line = handler.format(logging.LogRecord("essential.x", logging.INFO, __file__, 1, "a b", None, None))
        assert " a b" in line and "saga=" not in line
    finally:
        root.removeHandler(logs._configured.pop("handler"))
        root.setLevel(saved[0])
        root.propagate = saved[1]


def test_traceparent_helpers() -> None:
    from essential.actors import tracing

    fresh = tracing.new_traceparent()
    assert TRACEPARENT.match(fresh) and tracing.valid(fresh)
    child = tracing.child(fresh, "saga:1:run")
    assert child.split("-")[1] == fresh.split("-")[1] and child.split("-")[2] != fresh.split("-")[2]
    assert tracing.child(fresh, "saga:1:run") == child, "stable per seed (a re-sent command keeps its span)"
    assert not tracing.valid("00-" + "0" * 32 + "-00f067aa0ba902b7-01")
    assert tracing.ensure_traceparent({"job": "x"})["traceparent"]
    assert tracing.ensure_traceparent({"job": "x", "traceparent": "garbage"})["traceparent"] != "garbage"
    given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert tracing.ensure_traceparent({"traceparent": given})["traceparent"] == given


async def test_batch_start_shows_progress_and_a_summary(client: Any, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """`essential start JOB --count N --wait`: progress bars on stderr, the outcome by state on stdout."""
    from essential.actors.cli.main import main
    from essential.actors.settings import get_settings

    monkeypatch.setenv("ESSENTIAL_RAY_ADDRESS", "127.0.0.1:1")  # already connected: only skips the stack lookup
    get_settings.cache_clear()
    try:
        code = await asyncio.to_thread(
            main, ["start", "test:chain", "--payload", '{"fail_at": "c"}', "--count", "4", "--wait", "--json"]
        )
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    out, err = capsys.readouterr()
    data = json.loads(out[out.find("{\n"):])  # this test process is a Ray driver: raylet warnings may come first
    assert code == 1, "not every saga completed"
    assert len(data["ids"]) == 4 and data["counts"] == {"aborted": 4}
    assert "started" in err and "finished" in err and "4/4" in err
