"""Ray-side halves of tests/test_cluster.py, each run as its own process.

A Ray driver can be connected to one cluster only, and the pytest process may
already be the driver of the session's local Ray; so everything that starts or
joins another cluster runs here, in a subprocess that the test starts (and
stops, by PID).  Each scenario writes a JSON report; the test then checks the
outcome independently, in MongoDB.

Every Ray process is bound to 127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``
comes from the test's environment, before ``import ray``), and token
authentication is on: the test passes ``RAY_AUTH_MODE=token`` and a fresh
``RAY_AUTH_TOKEN``.

    python -m tests.cluster_scenarios multinode --out R.json --count 9 --gate G
    python -m tests.cluster_scenarios head --info H.json --client-port P --dashboard-port D
    python -m tests.cluster_scenarios client-first --address ray://127.0.0.1:P --gate G --head-pid PID --out R.json
    python -m tests.cluster_scenarios client-again --address ray://127.0.0.1:P --ids ID,ID --out R.json
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"


# ------------------------------------------------------------------------------ helpers
def write_report(path: str, data: dict[str, Any]) -> None:
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def jobs_db() -> Any:
    from pymongo import MongoClient

    client = MongoClient(os.environ["ESSENTIAL_MONGODB_URI"], tz_aware=True)
    return client[os.environ.get("ESSENTIAL_CLUSTER_TEST_DB", "essential_cluster_jobs")]


def descendants(root: int) -> set[int]:
    """``root`` and every process below it (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


def _decode(hex_addr: str) -> str:
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    addr = ipaddress.IPv6Address(words)
    return str(addr.ipv4_mapped or addr)


def listening_sockets(root: int) -> list[dict[str, Any]]:
    """Every TCP socket in LISTEN state held by ``root`` or its descendants: pid, process, ip, port."""
    listen: dict[str, tuple[str, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                host, port = fields[1].split(":")
                listen[fields[9]] = (_decode(host), int(port, 16))
    found = []
    for pid in sorted(descendants(root)):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = target[8:-1]
                if inode in listen:
                    ip, port = listen[inode]
                    found.append({"pid": pid, "process": name, "ip": ip, "port": port})
    return found


def auth_mode() -> str:
    from ray._private.authentication.authentication_utils import get_authentication_mode_name
    from ray._raylet import get_authentication_mode

    return get_authentication_mode_name(get_authentication_mode())


def start_cluster(head_args: dict[str, Any], workers: int) -> tuple[Any, list[Any]]:
    """A head and ``workers`` worker nodes, each a full raylet of its own, all on 127.0.0.1."""
    from essential.actors.dev.mongodb import free_port
    from essential.actors.loopback import bind_ray_to_loopback

    bind_ray_to_loopback()
    from ray.cluster_utils import Cluster

    head_args = {
        "node_ip_address": LOOPBACK,
        "dashboard_host": LOOPBACK,
        # the head's dashboard agent (it runs Ray Jobs' entrypoints) has a fixed default port that
        # another Ray on this machine may hold; worker nodes already get a free one from Cluster
        "dashboard_agent_listen_port": free_port(),
        **head_args,
    }
    cluster = Cluster(initialize_head=True, head_node_args=head_args)
    nodes = [cluster.add_node(node_ip_address=LOOPBACK, num_cpus=1) for _ in range(workers)]
    cluster.wait_for_nodes()
    return cluster, nodes


def actor_node(handle: Any) -> tuple[str, str, int]:
    """(node id, state, restarts) of an actor, from the GCS actor table."""
    from ray._private import state

    info = state.actors(handle._actor_id.hex())
    return info["Address"]["NodeID"], info["State"], info["NumRestarts"]


def supervisor_on(node_id: str, settings: Any, attempts: int = 30) -> tuple[Any, int]:
    """Create the supervisor (as ``get_supervisor`` does) on the node ``node_id``; a test's arrangement.

    Its options are the real ones plus a *soft* node affinity, so that once its
    node is lost Ray may restart it anywhere.  Ray treats a soft affinity as a
    hint only (a node the local scheduler has not heard of yet counts as absent),
    so a supervisor that lands elsewhere is replaced, a second later, before it
    has done anything.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from essential.actors.names import SUPERVISOR_NAME
    from essential.actors.sagas.supervisor import Supervisor

    wait_for(lambda: any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()), 60, f"node {node_id} alive")
    for attempt in range(1, attempts + 1):
        handle = Supervisor.options(
            name=SUPERVISOR_NAME,
            namespace=settings.namespace,
            lifetime="detached",
            get_if_exists=True,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=True),
        ).remote(settings.model_dump(mode="json"))
        ray.get(handle.__ray_ready__.remote())
        if actor_node(handle)[0] == node_id:
            return handle, attempt
        ray.kill(handle, no_restart=True)

        def name_free() -> bool:
            try:
                ray.get_actor(SUPERVISOR_NAME, namespace=settings.namespace)
            except ValueError:
                return True
            return False

        wait_for(name_free, 30, "the misplaced supervisor to go")
        time.sleep(1.0)  # let the cluster's resource view reach the scheduler before the next try
    raise RuntimeError(f"the supervisor never landed on node {node_id} in {attempts} attempts")


# ------------------------------------------------------------------------------ scenarios
def multinode(args: argparse.Namespace) -> int:
    """A batch across three nodes; the worker node holding the supervisor and some sagas is killed mid-run."""
    import ray

    from essential.actors.client.ray_client import EssentialClient, connect_ray
    from essential.actors.settings import Settings

    report: dict[str, Any] = {"auth_mode": None}
    ids: list[str] = []
    cluster, workers = start_cluster(
        {
            "num_cpus": 1,
            "include_dashboard": False,
            # declare a killed node dead within seconds (Ray's defaults take ~30 s)
            "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
        },
        workers=2,
    )
    try:
        settings = Settings()
        connect_ray(settings, cluster.address)
        report["auth_mode"] = auth_mode()
        report["nodes"] = {
            "head": cluster.head_node.node_id,
            "workers": [n.node_id for n in workers],
        }
        report["node_ips"] = sorted({n["NodeManagerAddress"] for n in ray.nodes()})
        # every node in the scheduler's view before anything is placed
        wait_for(lambda: ray.cluster_resources().get("CPU") == 3, 60, "the scheduler to see all three nodes")
        victim = workers[0]
        supervisor, report["supervisor_attempts"] = supervisor_on(victim.node_id, settings)
        client = EssentialClient(settings, address=cluster.address)
        report["supervisor_before"] = actor_node(supervisor)

        db = jobs_db()
        request = {"job": "cluster:relay", "payload": {"gate": args.gate, "tag": args.gate}}

        def b_nodes() -> dict[str, str] | None:
            runs = {d["saga"]: d["node"] for d in db.calls.find({"saga": {"$in": ids}, "step": "b", "kind": "run"})}
            return runs if len(runs) == len(ids) else None

        # Ray's SPREAD is best effort (a burst can leave a node out); the test needs sagas on the
        # node it kills, so it adds a few more while that node has none
        began = time.monotonic()
        for wave in range(4):
            ids += client.start_many([request] * (args.count if wave == 0 else 3))
            first_b = wait_for(b_nodes, 180, "every saga to reach step b (held at the gate)")
            if victim.node_id in first_b.values():
                break
        report["ids"] = ids
        report["waves"] = wave + 1
        report["seconds_to_gate"] = round(time.monotonic() - began, 1)
        report["first_b_node"] = first_b
        report["listening"] = listening_sockets(os.getpid())
        on_victim = sorted(sid for sid, node in first_b.items() if node == victim.node_id)
        report["victim"] = victim.node_id
        report["on_victim"] = on_victim

        cluster.remove_node(victim, allow_graceful=False)  # SIGKILL: raylet, workers, saga actors
        report["removed_at"] = time.time()

        def restored() -> bool:
            again = db.calls.count_documents({"saga": {"$in": on_victim}, "step": "b", "kind": "run"})
            return again >= 2 * len(on_victim)

        wait_for(restored, 150, "the lost node's sagas to be restored on the remaining nodes", interval=0.5)
        report["supervisor_after"] = actor_node(supervisor)
        db.gates.insert_one({"_id": args.gate, "open": True})
        report["final"] = {sid: client.wait(sid, 120).state.value for sid in ids}
        report["alive_nodes"] = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    except BaseException:
        report["diagnosis"] = diagnose(ids)
        raise
    finally:
        write_report(args.out, report)
        ray.shutdown()
        cluster.shutdown()
    return 0


def diagnose(ids: list[str]) -> dict[str, Any]:
    """What a failed scenario saw: saga states and owners, the supervisor's health, live actors per node."""
    import ray
    from bson import ObjectId
    from pymongo import MongoClient

    from essential.actors.names import SUPERVISOR_NAME

    found: dict[str, Any] = {}
    try:
        sagas = MongoClient(os.environ["ESSENTIAL_MONGODB_URI"])[os.environ["ESSENTIAL_DATABASE"]].sagas
        found["sagas"] = {
            str(d["_id"]): {"state": d["state"], "lease": d.get("lease"), "restores": d.get("restore_attempts")}
            for d in sagas.find({"_id": {"$in": [ObjectId(i) for i in ids]}})
        }
    except Exception as exc:  # diagnosis must not hide the failure
        found["sagas"] = repr(exc)
    try:
        supervisor = ray.get_actor(SUPERVISOR_NAME, namespace=os.environ.get("ESSENTIAL_NAMESPACE", "essential"))
        found["supervisor"] = ray.get(supervisor.health.remote(), timeout=30)
    except Exception as exc:
        found["supervisor"] = repr(exc)
    try:
        from ray._private import state

        alive = state.actors(actor_state_name="ALIVE").values()
        found["alive_actors"] = sorted((a["Name"], a["Address"]["NodeID"][:8]) for a in alive)
        found["pending_actors"] = sorted(
            a["Name"] for a in state.actors().values() if a["State"] not in ("ALIVE", "DEAD")
        )
    except Exception as exc:
        found["alive_actors"] = repr(exc)
    return found


def head(args: argparse.Namespace) -> int:
    """A Ray head with a client server and the dashboard (Jobs REST API), both on 127.0.0.1; SIGTERM stops it."""
    import ray

    from essential.actors.client.ray_client import EssentialClient, connect_ray
    from essential.actors.settings import Settings

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    cluster, _ = start_cluster(
        {
            "num_cpus": 2,
            "include_dashboard": True,
            "dashboard_port": args.dashboard_port,
            "ray_client_server_port": args.client_port,
        },
        workers=0,
    )
    try:
        # the cluster side creates the supervisor with the cluster's settings (as cluster.yaml does)
        settings = Settings()
        connect_ray(settings, cluster.address)
        EssentialClient(settings, address=cluster.address)
        mode = auth_mode()
        ray.shutdown()  # only this driver leaves; the cluster and its detached actors stay
        write_report(
            args.info,
            {
                "pid": os.getpid(),
                "gcs_address": cluster.address,
                "client_address": f"ray://{LOOPBACK}:{args.client_port}",
                "dashboard_url": f"http://{LOOPBACK}:{args.dashboard_port}",
                "auth_mode": mode,
                "listening": listening_sockets(os.getpid()),
            },
        )
        stop.wait()
    finally:
        cluster.shutdown()
    return 0


def client_first(args: argparse.Namespace) -> int:
    """Over ray://: every client operation, then a gated batch left mid-run when the client disconnects."""
    import ray

    from essential.actors.client.ray_client import EssentialClient
    from essential.actors.settings import Settings
    from essential.orchestration import EssentialError

    report: dict[str, Any] = {}
    client = EssentialClient(Settings(), address=args.address)
    try:
        report["client_mode"] = ray.util.client.ray.is_connected()
        report["job_id"] = ray.get_runtime_context().get_job_id()
        quick = client.start("cluster:relay", {"tag": "quick"}, idempotency_key=f"{args.gate}-quick")
        report["quick"] = {
            "id": quick,
            "again": client.start("cluster:relay", {"tag": "quick"}, idempotency_key=f"{args.gate}-quick"),
            "waited": client.wait(quick, 120).state.value,
            "status": client.status(quick).state.value,
            "stages": [(s.step, s.status.value) for s in client.stages(quick)],
            "listed": quick in {s.id for s in client.list(job="cluster:relay", limit=200)},
        }
        try:
            client.abort(quick, "too late")
            report["quick"]["abort_completed"] = "no error"
        except EssentialError as exc:
            report["quick"]["abort_completed"] = type(exc).__name__
        try:
            client.start("no:such-job", {})
            report["unknown_job"] = "no error"
        except EssentialError as exc:
            report["unknown_job"] = type(exc).__name__

        # abort honoured between steps: hold b at its own gate, abort, then let b finish
        held = client.start("cluster:relay", {"gate": f"{args.gate}-abort", "tag": "abort"})
        wait_for(lambda: any(s.step == "b" for s in client.stages(held)), 120, "the saga to abort to reach b")
        client.abort(held, "customer cancelled")
        jobs_db().gates.insert_one({"_id": f"{args.gate}-abort", "open": True})
        aborted = client.wait(held, 120)
        report["aborted"] = {
            "id": held,
            "state": aborted.state.value,
            "stages": [(s.step, s.action.value, s.status.value) for s in client.stages(held)],
        }

        ids = client.start_many(
            [{"job": "cluster:relay", "payload": {"gate": args.gate, "tag": args.gate}}] * args.count
        )
        report["batch"] = ids
        wait_for(
            lambda: all(any(s.step == "b" for s in client.stages(i)) for i in ids), 120, "the batch to reach step b"
        )
        report["states_at_disconnect"] = client.states(ids)
        # the head's processes now include this client's session server: still loopback only
        report["head_listening"] = listening_sockets(args.head_pid)
    finally:
        write_report(args.out, report)
        ray.shutdown()  # the client leaves: its session on the cluster ends
    return 0


def client_again(args: argparse.Namespace) -> int:
    """Reconnect over ray:// and look at the batch the first client left behind."""
    import ray

    from essential.actors.client.ray_client import EssentialClient
    from essential.actors.settings import Settings

    ids = args.ids.split(",")
    mode_before = os.environ.get("RAY_AUTH_MODE")
    client = EssentialClient(Settings(), address=args.address)
    try:
        report = {
            "auth_mode_before": mode_before,
            "auth_mode": os.environ.get("RAY_AUTH_MODE"),
            "states": client.states(ids),
            "waited": {i: client.wait(i, 30).state.value for i in ids},
            "stages": {i: [(s.step, s.status.value) for s in client.stages(i)] for i in ids},
            "listed": sorted(s.id for s in client.list(state="completed", job="cluster:relay", limit=500)),
        }
        write_report(args.out, report)
    finally:
        ray.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster_scenarios")
    sub = parser.add_subparsers(dest="scenario", required=True)
    p = sub.add_parser("multinode")
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int, default=9)
    p.add_argument("--gate", required=True)
    p.set_defaults(fn=multinode)
    p = sub.add_parser("head")
    p.add_argument("--info", required=True)
    p.add_argument("--client-port", type=int, required=True)
    p.add_argument("--dashboard-port", type=int, required=True)
    p.set_defaults(fn=head)
    p = sub.add_parser("client-first")
    p.add_argument("--address", required=True)
    p.add_argument("--gate", required=True)
    p.add_argument("--count", type=int, default=4)
    p.add_argument("--head-pid", type=int, required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(fn=client_first)
    p = sub.add_parser("client-again")
    p.add_argument("--address", required=True)
    p.add_argument("--ids", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(fn=client_again)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
