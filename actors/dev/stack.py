"""The local stack behind ``essential up`` / ``essential down`` / ``essential demo``.

Why this shape: the three servers (SecantusDB, the Kafka-compatible broker and
a Ray head) must outlive the short CLI command that starts them, and must be
stopped later by a different process - by PID only, never by ``ray stop`` or
a name-based kill, because other Ray instances and servers may share the
machine. ``up()`` therefore records every PID it starts (with its kernel start
time, so a recycled PID is never mistaken for ours) in ``<home>/stack.json``,
and ``down()`` stops exactly those. Everything binds to 127.0.0.1.

The Ray head lives inside a small keeper process (``essential.actors.dev.ray_keeper``) that
calls ``ray.init()`` and shuts Ray down on SIGTERM; see that module for why.

Clients reach the stack through :meth:`LocalStack.env`: besides the
``ESSENTIAL_*`` addresses it carries two variables every Ray driver on this
machine needs before ``import ray``: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``
(else Ray rewrites 127.0.0.1 to the external address and cannot reach the
GCS) and ``RAY_AUTH_MODE=token`` (Ray 2.60 heads started by ``ray.init`` use
token auth; a connecting driver has it disabled unless told, and is rejected).
The token itself is the machine's ``~/.ray/auth_token``, which the head creates.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from essential.actors.dev.kafka_broker import EmbeddedKafka
from essential.actors.dev.mongodb import (
    HOST,
    EmbeddedMongo,
    ServerStartError,
    boot_id,
    kill_session,
    pid_alive,
    port_in_use,
    process_start_time,
    stop_pid,
    tail,
)
from essential.actors.dev.ray_keeper import write_json_atomic
from essential.actors.settings import Settings, get_settings
from essential.actors.stack_record import RECORD, env_of, read_json

__all__ = ["ComponentStatus", "LocalStack", "StackError", "StackNotRunning"]

_PROJECT_ROOT = Path(__file__).resolve().parents[2]
#: what the dev stack registers unless ESSENTIAL_JOB_MODULES says otherwise: the example jobs
DEMO_JOB_MODULES = "examples.jobs"


def examples_importable() -> None:
    """Let this process import the checkout's ``examples`` (not installed: the dev stack's demo jobs and data).

    The stack's Ray processes get the same through ``PYTHONPATH`` (see :meth:`LocalStack._start_ray`).
    """
    root = str(_PROJECT_ROOT)
    if root not in sys.path:
        sys.path.append(root)
_POLL = 0.1
COMPONENTS = ("ray", "kafka", "mongodb")  # the order down() stops them in


class StackError(RuntimeError):
    """The local stack could not be started or stopped; the message says why and where the log is."""


class StackNotRunning(StackError):
    """No local stack is recorded as running under this home directory."""


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    pid: int | None
    alive: bool
    listening: bool
    address: str

    def __str__(self) -> str:
        state = "up" if self.alive and self.listening else ("starting/stuck" if self.alive else "down")
        return f"{self.name:<8} {state:<14} pid={self.pid}  {self.address}"


class LocalStack:
    """Start, inspect and stop the embedded MongoDB, Kafka broker and Ray head under ``settings.home``."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self.home = Path(self.settings.home).expanduser().resolve()

    # ------------------------------------------------------------------ paths
    @property
    def state_path(self) -> Path:
        return self.home / RECORD

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    @property
    def mongo_dir(self) -> Path:
        return self.home / "mongo"

    # ------------------------------------------------------------------ public API
    def up(self, timeout: float = 180.0) -> dict[str, Any]:
        """Start whatever is not already running; return the recorded state.

        Idempotent: components that ``stack.json`` lists and that are still
        alive are reused. If a component fails to start, the ones this call
        started are stopped again and :class:`StackError` says why.
        """
        deadline = time.monotonic() + timeout
        with self._lock():
            state = self._read_state() or {}
            state = {name: state[name] for name in COMPONENTS if name in state and _alive(state[name])}
            started: list[str] = []
            try:
                if "mongodb" not in state:
                    state["mongodb"] = self._start_mongo(deadline)
                    started.append("mongodb")
                    self._write_state(state)
                if "kafka" not in state:
                    state["kafka"] = self._start_kafka(deadline)
                    started.append("kafka")
                    self._write_state(state)
                if "ray" not in state:
                    state["ray"] = self._start_ray(deadline, mongodb_uri=state["mongodb"]["address"])
                    started.append("ray")
                    self._write_state(state)
            except BaseException:
                for name in started:
                    _stop_component(state.pop(name), timeout=10.0)
                if state:
                    self._write_state(state)
                else:
                    self.state_path.unlink(missing_ok=True)
                raise
            return state

    def down(self, timeout: float = 30.0) -> list[str]:
        """Stop exactly the processes ``stack.json`` lists (Ray first); return a line per component."""
        with self._lock():
            state = self._read_state()
            if state is None:
                return []
            report: list[str] = []
            for name in COMPONENTS:
                entry = state.get(name)
                if entry is None:
                    continue
                how = _stop_component(entry, timeout=timeout)
                report.append(f"{name}: {how} (pid {entry['pid']})")
            self.state_path.unlink(missing_ok=True)
            (self.home / "ray.json").unlink(missing_ok=True)
            return report

    def note(self, key: str, value: Any) -> None:
        """Record what else ``up`` started inside the stack (the HTTP API's address, seeded data)."""
        with self._lock():
            state = self._read_state()
            if state is None:
                raise StackNotRunning(f"no local stack recorded in {self.state_path}; run `essential up` first")
            state[key] = value
            self._write_state(state)

    def status(self) -> list[ComponentStatus]:
        """One entry per recorded component: is its process alive, does its port accept connections."""
        state = self._read_state() or {}
        out: list[ComponentStatus] = []
        for name in reversed(COMPONENTS):
            entry = state.get(name)
            if entry is None:
                out.append(ComponentStatus(name, None, False, False, "not started"))
                continue
            alive = _alive(entry)
            out.append(
                ComponentStatus(
                    name,
                    entry["pid"],
                    alive,
                    alive and _listening(entry["port"]),
                    entry["address"],
                )
            )
        return out

    def env(self) -> dict[str, str]:
        """Environment for clients of the running stack (CLI, demo, tests, services).

        Raises :class:`StackNotRunning` when nothing is recorded: run ``essential up``.
        """
        state = self._read_state()
        if not state or not all(name in state for name in COMPONENTS):
            raise StackNotRunning(f"no local stack recorded in {self.state_path}; run `essential up` first")
        return self._env_of(state)

    def state(self) -> dict[str, Any] | None:
        """The recorded ``stack.json`` (None if the stack is not up)."""
        return self._read_state()

    # ------------------------------------------------------------------ starting
    def _start_mongo(self, deadline: float) -> dict[str, Any]:
        mongo = EmbeddedMongo(self.mongo_dir, port=self.settings.mongodb_port or None, log_dir=self.log_dir)
        with _hint("ESSENTIAL_MONGODB_PORT"):
            mongo.start(timeout=_remaining(deadline, "mongodb"))
        pid = mongo.detach()
        return _entry(pid, mongo.port, mongo.uri, mongo.log_path, data_dir=str(self.mongo_dir))

    def _start_kafka(self, deadline: float) -> dict[str, Any]:
        kafka = EmbeddedKafka(port=self.settings.kafka_port or None, log_dir=self.log_dir)
        with _hint("ESSENTIAL_KAFKA_PORT"):
            kafka.start(timeout=_remaining(deadline, "kafka"))
        pid = kafka.detach()
        return _entry(pid, kafka.port, kafka.bootstrap, kafka.log_path)

    def _start_ray(self, deadline: float, *, mongodb_uri: str) -> dict[str, Any]:
        for label, port in (("Ray GCS", self.settings.ray_port), ("Ray dashboard", self.settings.dashboard_port)):
            if port and port_in_use(port):
                raise StackError(
                    f"{label} port {HOST}:{port} is already in use; set ESSENTIAL_"
                    f"{'RAY_PORT' if label == 'Ray GCS' else 'DASHBOARD_PORT'} to a free port (0 picks one)"
                )
        info_path = self.home / "ray.json"
        info_path.unlink(missing_ok=True)
        log_path = self.log_dir / "ray-keeper.log"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        env.setdefault("RAY_AUTH_MODE", "token")
        env.pop("RAY_ADDRESS", None)
        # the demo jobs (examples/, not installed) and their services run in this cluster's workers: they
        # import from the checkout and reach MongoDB from the environment like any service
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PROJECT_ROOT), env.get("PYTHONPATH")]))
        env.setdefault("ESSENTIAL_MONGODB_URI", mongodb_uri)
        env.setdefault("ESSENTIAL_JOB_MODULES", DEMO_JOB_MODULES)
        # `python` in a Ray Job's entrypoint is looked up on the head's PATH: make it this Python (the
        # project's virtual environment), not whatever the shell that ran `essential up` finds first
        env["PATH"] = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), env.get("PATH")]))
        cmd = [
            sys.executable, "-m", "essential.actors.dev.ray_keeper",
            "--info", str(info_path),
            "--gcs-port", str(self.settings.ray_port or 0),
            "--dashboard-port", str(self.settings.dashboard_port or 0),
            "--namespace", self.settings.namespace,
        ]  # fmt: skip
        with open(log_path, "ab") as log:
            log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(cmd)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(self.home),
                start_new_session=True,
            )
        start_time = process_start_time(proc.pid)
        try:
            while True:
                info = read_json(info_path)
                if info is not None and info.get("pid") == proc.pid:
                    break
                code = proc.poll()
                if code is not None:
                    raise StackError(
                        f"the Ray keeper exited with code {code} while starting Ray; log {log_path}:\n{tail(log_path)}"
                    )
                if time.monotonic() >= deadline:
                    raise StackError(f"Ray did not start in time; log {log_path}:\n{tail(log_path)}")
                time.sleep(_POLL)
        except BaseException:
            _stop_component({"pid": proc.pid, "start_time": start_time, "boot_id": boot_id()}, timeout=10.0)
            raise
        entry = _entry(proc.pid, int(info["gcs_address"].rsplit(":", 1)[1]), info["gcs_address"], log_path)
        entry.update(
            start_time=start_time,
            dashboard_url=info["dashboard_url"],
            session_dir=info["session_dir"],
            metrics_url=f"http://{HOST}:{info['metrics_export_port']}/metrics" if info.get("metrics_export_port") else "",
            ray_pids=info["ray_pids"],
            auth_mode=env["RAY_AUTH_MODE"],
        )
        return entry

    # ------------------------------------------------------------------ state file
    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialise up/down of the same home (two terminals running `essential up`)."""
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.home / "stack.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _read_state(self) -> dict[str, Any] | None:
        return read_json(self.state_path)

    def _write_state(self, state: dict[str, Any]) -> None:
        ray = state.get("ray", {})
        write_json_atomic(
            self.state_path,
            {**state, "dashboard_url": ray.get("dashboard_url"), "env": self._env_of(state)},
        )

    @staticmethod
    def _env_of(state: dict[str, Any]) -> dict[str, str]:
        return env_of(state)


# ---------------------------------------------------------------------- helpers


def _entry(pid: int, port: int, address: str, log: Path, **extra: Any) -> dict[str, Any]:
    return {
        "pid": pid,
        "start_time": process_start_time(pid),
        "boot_id": boot_id(),
        "port": port,
        "address": address,
        "log": str(log),
        **extra,
    }


def _same_boot(entry: dict[str, Any]) -> bool:
    return entry.get("boot_id") == boot_id()


def _alive(entry: dict[str, Any]) -> bool:
    return _same_boot(entry) and pid_alive(int(entry["pid"]), entry.get("start_time"))


def _listening(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _stop_component(entry: dict[str, Any], timeout: float) -> str:
    """SIGTERM the recorded PID, SIGKILL after ``timeout``, then clear its session of leftovers."""
    pid, start_time = int(entry["pid"]), entry.get("start_time")
    if not _same_boot(entry):
        return "was not running (recorded before the machine rebooted)"
    if pid_alive(pid, start_time):
        how = "killed after timeout" if stop_pid(pid, timeout, start_time=start_time) else "stopped"
    else:
        how = "was not running"
    # Ray's workers and dashboard subprocesses may outlive ray.shutdown() by a
    # moment; give them that moment, then end whatever remains of the session.
    leftovers = kill_session(pid, timeout=5.0, grace=10.0, leader_start_time=start_time)
    if leftovers:
        how += f", then ended {len(leftovers)} leftover process(es) of its session"
    return how




@contextlib.contextmanager
def _hint(port_setting: str) -> Iterator[None]:
    """Turn a launcher error into a StackError that names the setting to change."""
    try:
        yield
    except ServerStartError as exc:
        hint = f"\n(set {port_setting} to another port, or 0 to pick a free one)" if "in use" in str(exc) else ""
        raise StackError(f"{exc}{hint}") from exc


def _remaining(deadline: float, what: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise ServerStartError(f"no time left to start {what}")
    return left
