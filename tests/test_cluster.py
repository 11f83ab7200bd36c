"""Beyond one machine.

``cluster.yaml`` against Ray's own schema; a three-node cluster that loses a
worker node mid-batch; a Ray Client that disconnects mid-batch and comes back;
a batch submitted as a Ray Job.  Every Ray process binds to 127.0.0.1 and token
authentication is on (``RAY_AUTH_MODE=token`` with a token made for this module).

The Ray clusters here are not the session's Ray: each runs in a process of its
own (``tests/cluster_scenarios.py``) that this module starts and stops by PID,
so the pytest process's Ray session is never touched.  Outcomes are checked in
MongoDB, not taken from the scenarios' word.
"""
from __future__ import annotations

import asyncio
import copy
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from .conftest import REPO, poll

CLUSTER_YAML = REPO / "cluster.yaml"
JOBS_DB = "essential_cluster_jobs"  # calls, effects and gates of tests.cluster_jobs
MULTINODE_DB = "essential_cluster_multinode"
HEAD_DB = "essential_cluster_head"
LOOPBACK = {"127.0.0.1"}


# ---------------------------------------------------------------------------- plumbing
@pytest.fixture(scope="module")
def ray_token() -> str:
    """A token only this module's clusters and clients know."""
    return secrets.token_hex(32)


def cluster_env(essential_env: dict[str, str], token: str, database: str) -> dict[str, str]:
    env = {**os.environ, **essential_env}
    env.pop("RAY_ADDRESS", None)
    env.update(
        ESSENTIAL_DATABASE=database,
        ESSENTIAL_CLUSTER_TEST_DB=JOBS_DB,
        ESSENTIAL_JOB_MODULES="examples.jobs,tests.jobs,tests.cluster_jobs",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        # `python` in a Ray Job's entrypoint is this interpreter, as on a cluster node
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    )
    return env


def drop_databases(uri: str, *names: str) -> None:
    """A clean slate: a supervisor would otherwise restore sagas a crashed earlier run left at a gate."""
    from pymongo import MongoClient

    with MongoClient(uri) as client:
        for name in names:
            client.drop_database(name)


def tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def run_scenario(args: list[str], env: dict[str, str], log: Path, timeout: float) -> None:
    """Run one scenario process to its end; its log (and what it diagnosed) is shown if it fails."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.cluster_scenarios", *args],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_process(proc)
            raise AssertionError(f"scenario {args[0]} ran over {timeout:g}s; log:\n{tail(log)}") from None
    if code != 0:
        report = Path(args[args.index("--out") + 1]) if "--out" in args else None
        seen = json.loads(report.read_text()).get("diagnosis") if report is not None and report.exists() else None
        raise AssertionError(f"scenario {args[0]} exited {code}; diagnosis: {seen}\nlog:\n{tail(log)}")


def stop_process(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """SIGTERM the scenario we started, SIGKILL its own process group if it does not finish."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: start_new_session=True
        proc.wait(timeout=30)


async def sagas_in(mongo: Any, database: str, ids: list[str]) -> dict[str, dict[str, Any]]:
    from bson import ObjectId

    return {str(d["_id"]): d async for d in mongo[database].sagas.find({"_id": {"$in": [ObjectId(i) for i in ids]}})}


async def assert_relay_consistent(mongo: Any, database: str, saga_id: str) -> None:
    """Completed, stages a, b, c recorded once each (seq 1..3), exactly one effect per stage."""
    from essential.persistence.store import MongoSagaStore

    store = MongoSagaStore(mongo, database)
    saga = await store.get(saga_id)
    assert saga.state.value == "completed", f"{saga_id}: {saga.state.value} ({saga.error})"
    stages = await store.stages(saga_id)
    assert [(s.seq, s.step, s.action.value, s.status.value) for s in stages] == [
        (1, "a", "create", "succeeded"), (2, "b", "create", "succeeded"), (3, "c", "create", "succeeded"),
    ], f"{saga_id}: a stage doubled or missing"  # fmt: skip
    effects = {d["_id"] async for d in mongo[JOBS_DB].effects.find({"saga": saga_id})}
    assert effects == {s.meta.idempotency_key for s in stages}


async def runs_by_saga(mongo: Any, ids: list[str]) -> dict[str, dict[str, list[str]]]:
    """saga -> step -> nodes of its forward runs, in the order they started."""
    runs: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    async for d in mongo[JOBS_DB].calls.find({"saga": {"$in": ids}, "kind": "run"}).sort("_id", 1):
        runs[d["saga"]][d["step"]].append(d["node"])
    return runs


def assert_loopback_only(listening: list[dict[str, Any]]) -> None:
    processes = {s["process"] for s in listening}
    assert {"gcs_server", "raylet"} <= processes, f"found no Ray listeners to check: {listening}"
    outside = [s for s in listening if s["ip"] not in LOOPBACK]
    assert not outside, f"Ray processes listening beyond 127.0.0.1: {outside}"


# ---------------------------------------------------------------------------- cluster.yaml
def _validate(config: dict[str, Any]) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(copy.deepcopy(config))  # the file as written, against ray-schema.json
    validate_config(prepare_config(copy.deepcopy(config)))  # as `ray up` sees it, merged with provider defaults


def test_cluster_yaml_passes_rays_schema_and_a_broken_copy_fails() -> None:
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load(CLUSTER_YAML.read_text())
    _validate(config)

    broken = copy.deepcopy(config)
    broken["available_node_types"]["essential.worker"]["resources"]["CPU"] = "eight"  # must be an integer
    with pytest.raises(jsonschema.ValidationError):
        _validate(broken)
    misspelt = copy.deepcopy(config)
    misspelt["head_start_ray_command"] = misspelt.pop("head_start_ray_commands")  # unknown top-level key
    with pytest.raises(jsonschema.ValidationError):
        _validate(misspelt)
    no_provider = {k: v for k, v in config.items() if k != "provider"}  # a required field
    with pytest.raises(jsonschema.ValidationError):
        validate_config(no_provider)

    # what the documentation promises is really in it
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--ray-client-server-port=10001" in head_start and "--dashboard-port=8265" in head_start
    assert "--port=6379" in head_start
    opened = {rule["FromPort"] for rule in config["provider"]["security_group"]["IpPermissions"]}
    assert {10001, 8265} <= opened
    env_file = next(c for c in config["setup_commands"] if "essential.env" in c)
    assigned = dict(line.split("=", 1) for line in env_file.splitlines() if "=" in line and "<<" not in line)
    for variable in ("ESSENTIAL_MONGODB_URI", "ESSENTIAL_KAFKA_BOOTSTRAP", "ESSENTIAL_JOB_MODULES"):
        assert variable in assigned
    assert assigned["RAY_AUTH_MODE"] == "'token'"
    for start in config["head_start_ray_commands"][1:2] + config["worker_start_ray_commands"][1:]:
        assert start.startswith("set -a && . ~/essential.env && set +a"), "every Ray process gets the settings"
    assert "~/.ray/auth_token" in config["file_mounts"], "every node gets the cluster's token"
    assert config["available_node_types"][config["head_node_type"]].get("max_workers", 0) == 0
    worker = config["available_node_types"]["essential.worker"]
    assert worker["max_workers"] > worker["min_workers"] >= 1, "workers autoscale"


# ---------------------------------------------------------------------------- connect_ray
def test_connect_ray_keeps_loopback_only_for_loopback_addresses() -> None:
    from essential.actors.client.ray_client import _is_loopback

    for address in ("127.0.0.1:6379", "ray://127.0.0.1:10001", "localhost:6379", "ray://localhost:10001", "[::1]:6379"):
        assert _is_loopback(address), address
    for address in ("10.0.0.5:6379", "ray://head.internal:10001", "auto", "ray://192.168.1.10:10001"):
        assert not _is_loopback(address), address


# ---------------------------------------------------------------------------- multi-node
@pytest.mark.timeout(420)
async def test_losing_a_worker_node_mid_batch_loses_nothing(
    essential_env: dict[str, str], mongo_uri: str, mongo: Any, ray_token: str, tmp_path: Path
) -> None:
    await asyncio.to_thread(drop_databases, mongo_uri, MULTINODE_DB)
    gate = f"multinode-{uuid.uuid4().hex[:8]}"
    report_path = tmp_path / "multinode.json"
    env = cluster_env(essential_env, ray_token, MULTINODE_DB)
    args = ["multinode", "--out", str(report_path), "--count", "9", "--gate", gate]
    await asyncio.to_thread(run_scenario, args, env, tmp_path / "multinode.log", 400)
    report = json.loads(report_path.read_text())

    assert report["auth_mode"] == "token"
    assert report["node_ips"] == ["127.0.0.1"]
    assert_loopback_only(report["listening"])
    head, workers = report["nodes"]["head"], report["nodes"]["workers"]
    victim = report["victim"]
    survivors = {head, *workers} - {victim}
    assert victim in workers and len(survivors) == 2

    ids: list[str] = report["ids"]
    runs = await runs_by_saga(mongo, ids)
    first_nodes = {runs[i]["a"][0] for i in ids}
    assert len(first_nodes) >= 2 and first_nodes <= {head, *workers}, "saga actors spread over the nodes"

    lost = set(report["on_victim"])
    assert lost, "the removed node was running sagas"
    assert lost == {i for i in ids if runs[i]["b"][0] == victim}
    for saga_id in ids:
        steps = runs[saga_id]
        assert steps["a"] == [steps["a"][0]] and len(steps["c"]) == 1, "steps checkpointed before or after ran once"
        if saga_id in lost:
            assert steps["b"][0] == victim and len(steps["b"]) == 2, f"{saga_id}: b re-run once after the loss"
            assert steps["b"][1] in survivors and steps["c"][0] in survivors, "restored on a remaining node"
        else:
            assert len(steps["b"]) == 1 and victim not in steps["b"] + steps["c"]
        await assert_relay_consistent(mongo, MULTINODE_DB, saga_id)

    # the supervisor was on the lost node too: Ray restarted it elsewhere, and it restored the sagas
    node_before, _, _ = report["supervisor_before"]
    node_after, state_after, restarts = report["supervisor_after"]
    assert node_before == victim and node_after in survivors and state_after == "ALIVE" and restarts >= 1
    assert victim not in report["alive_nodes"]
    assert set(report["final"].values()) == {"completed"}


# ---------------------------------------------------------------------------- a head with a client server
@pytest.fixture(scope="module")
def ray_head(essential_env: dict[str, str], mongo_uri: str, ray_token: str, tmp_path_factory: Any) -> Iterator[dict]:
    """A Ray head whose client server (ray://) and dashboard (Jobs API) listen on 127.0.0.1."""
    from essential.actors.dev.mongodb import free_port

    drop_databases(mongo_uri, HEAD_DB)
    work = tmp_path_factory.mktemp("ray-head")
    info_path, log = work / "head.json", work / "head.log"
    env = cluster_env(essential_env, ray_token, HEAD_DB)
    args = ["--info", str(info_path), "--client-port", str(free_port()), "--dashboard-port", str(free_port())]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.cluster_scenarios", "head", *args],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not info_path.exists():
            assert proc.poll() is None, f"the head exited with {proc.returncode}; log:\n{tail(log)}"
            assert time.monotonic() < deadline, f"the head did not come up; log:\n{tail(log)}"
            time.sleep(0.2)  # polling for the file the head writes once it is up
        info = json.loads(info_path.read_text())
        info.update(env=env, token=ray_token, log=log)
        yield info
    finally:
        stop_process(proc)


def job_client(ray_head: dict) -> Any:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(ray_head["dashboard_url"], headers={"Authorization": f"Bearer {ray_head['token']}"})


@pytest.mark.timeout(420)
async def test_ray_client_disconnect_leaves_sagas_running(ray_head: dict, mongo: Any, tmp_path: Path) -> None:
    assert ray_head["auth_mode"] == "token"
    assert_loopback_only(ray_head["listening"])
    assert any(s["port"] == int(ray_head["client_address"].rsplit(":", 1)[1]) for s in ray_head["listening"])
    gate = f"client-{uuid.uuid4().hex[:8]}"
    first = tmp_path / "first.json"
    args = ["client-first", "--address", ray_head["client_address"], "--gate", gate, "--count", "4",
            "--head-pid", str(ray_head["pid"]), "--out", str(first)]  # fmt: skip
    await asyncio.to_thread(run_scenario, args, ray_head["env"], tmp_path / "first.log", 300)
    report = json.loads(first.read_text())

    # every client operation over ray://
    assert report["client_mode"] is True
    assert_loopback_only(report["head_listening"])
    quick = report["quick"]
    assert quick["again"] == quick["id"], "an idempotency key returns the same saga"
    assert quick["waited"] == quick["status"] == "completed" and quick["listed"]
    assert quick["stages"] == [["a", "succeeded"], ["b", "succeeded"], ["c", "succeeded"]]
    assert quick["abort_completed"] == "IllegalTransition" and report["unknown_job"] == "UnknownJob"
    aborted = report["aborted"]
    assert aborted["state"] == "aborted"
    undo = [step for step, action, _ in aborted["stages"] if action == "compensate"]
    assert undo == ["b", "a"], "the abort compensated what ran, in reverse"
    await assert_relay_consistent(mongo, HEAD_DB, quick["id"])

    # the client left with its batch mid-run
    ids: list[str] = report["batch"]
    assert set(report["states_at_disconnect"].values()) == {"running"}
    jobs = job_client(ray_head)

    def session_over() -> bool:
        return jobs.get_job_info(report["job_id"]).status.value == "SUCCEEDED"  # a DRIVER job: ended

    await poll(lambda: asyncio.to_thread(session_over), timeout=60, interval=0.5, what="the client's session to end")
    sagas = await sagas_in(mongo, HEAD_DB, ids)
    assert {s["state"] for s in sagas.values()} == {"running"}, "the sagas outlived their client's session"

    await mongo[JOBS_DB].gates.insert_one({"_id": gate, "open": True})  # no client is connected now

    async def batch_done() -> bool:
        return {s["state"] for s in (await sagas_in(mongo, HEAD_DB, ids)).values()} == {"completed"}

    await poll(batch_done, timeout=120, interval=0.3, what="the batch to finish with no client connected")
    runs = await runs_by_saga(mongo, ids)
    for saga_id in ids:
        assert len(runs[saga_id]["b"]) == 1, "the same actors went on: nothing died with the client session"
        await assert_relay_consistent(mongo, HEAD_DB, saga_id)

    # a new client sees the batch finished; it has the token but no RAY_AUTH_MODE: connect_ray turns it on
    again = tmp_path / "again.json"
    args = ["client-again", "--address", ray_head["client_address"], "--ids", ",".join(ids), "--out", str(again)]
    env = {k: v for k, v in ray_head["env"].items() if k != "RAY_AUTH_MODE"}
    await asyncio.to_thread(run_scenario, args, env, tmp_path / "again.log", 180)
    seen = json.loads(again.read_text())
    assert seen["auth_mode_before"] is None and seen["auth_mode"] == "token"
    assert set(seen["states"].values()) == set(seen["waited"].values()) == {"completed"}
    assert all(len(stages) == 3 for stages in seen["stages"].values())
    assert set(ids) <= set(seen["listed"])


@pytest.mark.timeout(420)
async def test_ray_job_runs_a_batch_of_sagas(ray_head: dict, mongo: Any, tmp_path: Path) -> None:
    import httpx

    # token authentication guards the Jobs API: no token is refused, a wrong one too
    async with httpx.AsyncClient(base_url=ray_head["dashboard_url"], timeout=30) as http:
        assert (await http.get("/api/jobs/")).status_code == 401
        wrong = {"Authorization": f"Bearer {secrets.token_hex(32)}"}
        assert (await http.get("/api/jobs/", headers=wrong)).status_code == 403

    batch = f"job-{uuid.uuid4().hex[:8]}"
    payload = json.dumps({"tag": batch, "sleep": 0.2})
    cli = str(Path(sys.executable).parent / "ray")
    command = [
        cli, "job", "submit", "--address", ray_head["dashboard_url"], "--submission-id", batch, "--",
        "python", "-m", "examples.ray_job_batch", "--job", "cluster:relay", "--count", "5", "--batch", batch,
        "--payload", payload, "--timeout", "240",
    ]  # fmt: skip
    # the CLI finds the token like any client: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or ~/.ray/auth_token)
    done = await asyncio.to_thread(
        subprocess.run, command, env=ray_head["env"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"ray job submit failed ({done.returncode}):\n{output[-4000:]}"

    info = await asyncio.to_thread(job_client(ray_head).get_job_info, batch)
    assert info.status.value == "SUCCEEDED"
    logs = await asyncio.to_thread(job_client(ray_head).get_job_logs, batch)
    summary = json.loads(next(line for line in logs.splitlines() if line.startswith("essential-batch: "))[17:])
    assert summary["states"] == {"completed": 5}

    keys = [f"{batch}:{n}" for n in range(5)]
    docs = [d async for d in mongo[HEAD_DB].sagas.find({"idempotency_key": {"$in": keys}})]
    assert sorted(d["idempotency_key"] for d in docs) == keys, "one saga per key, none twice"
    assert sorted(str(d["_id"]) for d in docs) == sorted(summary["ids"])
    for doc in docs:
        assert doc["job"] == "cluster:relay" and doc["payload"]["tag"] == batch
        await assert_relay_consistent(mongo, HEAD_DB, str(doc["_id"]))
