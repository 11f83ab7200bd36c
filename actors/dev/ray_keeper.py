"""Keeps a local Ray head alive for ``essential up``; SIGTERM shuts it down.

Why a keeper process instead of ``ray start``: we may never run ``ray stop``
(it kills every Ray on the machine), so the head must belong to one process we
can stop by PID. ``ray.init()`` in this process starts GCS, raylet, dashboard
and a reaper as its children; ``ray.shutdown()`` on SIGTERM stops all of them,
and if the keeper is SIGKILLed Ray's reaper kills the keeper's process group.
The launcher starts the keeper in a new session, so that group is only ours.

Dashboard agent: ``ray.init`` always gives the head's dashboard agent Ray's
default HTTP port (52365) and has no argument to change it; with another Ray
head on the machine (a second deployment, a test suite's own Ray) that port is
taken, the agent never registers and every ``ray job submit`` is refused ("No
available agent to submit job"). The keeper therefore hands Ray's parameters a
free port of its own (:func:`_own_agent_port`).

Current cluster: Ray Jobs start their entrypoint with the address of "the machine's
latest cluster", read from ``ray_current_cluster`` in Ray's temp directory, which
``ray start`` (and ``ray.cluster_utils``) write and ``ray.init`` does not. Left to
itself, a job submitted to this head joined whatever cluster was started there last
(seen: a dead one, the job hanging in GCS retries). Like ``ray start``, the keeper
records its own head there once it is up.

Binding: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` must be set before Ray is
imported, otherwise Linux Ray resolves ``127.0.0.1`` to the machine's external
address. ``RAY_GCS_SERVER_PORT`` fixes the GCS port (``ray.init`` has no
argument for it; Ray's head node reads that variable).

Usage::

    python -m essential.actors.dev.ray_keeper --info .essential/ray.json --gcs-port 6389 --dashboard-port 8265
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

HOST = "127.0.0.1"


def write_json_atomic(path: Path, data: dict[str, object]) -> None:
    """Readers polling ``path`` never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def _own_agent_port(port: int) -> None:
    """Make the head started by ``ray.init`` give its dashboard agent ``port`` (see the module docstring)."""
    from ray._private import parameter

    original = parameter.RayParams.__init__

    def init(self: object, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("dashboard_agent_listen_port", port)
        original(self, *args, **kwargs)

    parameter.RayParams.__init__ = init  # type: ignore[method-assign]


def _wait_for_job_agent(node_id: str, timeout: float = 120.0) -> None:
    """Until the job head can hand a submission to this node's agent: it needs the agent's
    address and the head node's id in GCS, both written asynchronously after ``ray.init``
    returns (the id by the dashboard's node module). Before both are there, and for longer
    than Ray's 10 s patience on a loaded machine, `ray job submit` is refused with
    "No available agent to submit job", so the head is not ready for its users."""
    import time

    from ray._private.ray_constants import (
        KV_HEAD_NODE_ID_KEY,
        KV_NAMESPACE_DASHBOARD,
        KV_NAMESPACE_JOB,
    )
    from ray.experimental.internal_kv import _internal_kv_get

    agent_key = f"DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX:{node_id}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        head = _internal_kv_get(KV_HEAD_NODE_ID_KEY, namespace=KV_NAMESPACE_JOB)
        value = _internal_kv_get(agent_key, namespace=KV_NAMESPACE_DASHBOARD)
        if head and value:
            ip, http_port = json.loads(value.decode())[:2]
            try:
                with socket.create_connection((ip, int(http_port)), timeout=1.0):
                    return
            except OSError:
                pass
        time.sleep(0.2)
    print(f"warning: the dashboard agent did not register within {timeout:g}s; Ray Jobs may be refused", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m essential.actors.dev.ray_keeper", description=__doc__.splitlines()[0])
    parser.add_argument("--info", type=Path, required=True, help="JSON file to write the head's addresses to")
    parser.add_argument("--gcs-port", type=int, default=0, help="GCS port (0: Ray picks one)")
    parser.add_argument("--dashboard-port", type=int, default=8265)
    parser.add_argument("--agent-port", type=int, default=0, help="the dashboard agent's HTTP port (0: a free one)")
    parser.add_argument("--no-dashboard", action="store_true")
    parser.add_argument("--namespace", default="essential")
    parser.add_argument("--num-cpus", type=int, default=None)
    args = parser.parse_args(argv)

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before `import ray`: read at import time
    if args.gcs_port:
        os.environ["RAY_GCS_SERVER_PORT"] = str(args.gcs_port)
    else:
        os.environ.pop("RAY_GCS_SERVER_PORT", None)
    os.environ.pop("RAY_ADDRESS", None)  # we start a head; never join whatever RAY_ADDRESS names

    import ray

    if not args.no_dashboard:
        _own_agent_port(args.agent_port or _free_port())
    stop = threading.Event()

    def _on_signal(signum: int, frame: object) -> None:
        stop.set()

    context = ray.init(
        address="local",  # always a new head, never an existing cluster
        _node_ip_address=HOST,
        include_dashboard=not args.no_dashboard,
        dashboard_host=HOST,
        dashboard_port=args.dashboard_port,
        namespace=args.namespace,
        num_cpus=args.num_cpus,
        log_to_driver=False,
    )
    # ray.init installed a SIGTERM handler that calls sys.exit; ours lets the
    # main loop shut Ray down deliberately instead.
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    node = ray._private.worker.global_worker.node
    from ray._private.utils import write_ray_address

    write_ray_address(ray.get_runtime_context().gcs_address, node.get_temp_dir_path())
    dashboard_url = context.dashboard_url or ""
    if not args.no_dashboard:
        _wait_for_job_agent(ray.get_runtime_context().get_node_id())
    write_json_atomic(
        args.info,
        {
            "pid": os.getpid(),
            "gcs_address": ray.get_runtime_context().gcs_address,
            "dashboard_url": f"http://{dashboard_url}" if dashboard_url else "",
            "node_ip": context.address_info.get("node_ip_address"),
            "session_dir": context.address_info.get("session_dir"),
            "metrics_export_port": context.address_info.get("metrics_export_port"),
            "namespace": args.namespace,
            "ray_pids": sorted(
                proc.process.pid
                for procs in node.all_processes.values()
                for proc in procs
                if proc.process is not None
            ),
        },
    )
    print(f"ray head up: gcs {ray.get_runtime_context().gcs_address} dashboard {dashboard_url}", flush=True)

    while not stop.wait(1.0):
        pass
    print("SIGTERM: shutting Ray down", flush=True)
    ray.shutdown()
    print("ray head down", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
