"""The embedded dev MongoDB: SecantusDB run as its own process.

Why a subprocess and not the in-process server: the in-process server shares the
caller's interpreter lock (measured: 30-40 % of throughput) and a process
boundary keeps this GPL-2.0 server at arm's length from Essential's own code.
Nothing here imports ``secantus``; it is only ever executed.

The process plumbing (:class:`ServerProcess`, :func:`free_port`,
:func:`stop_pid`) is shared with the embedded Kafka broker launcher in
``essential.actors.dev.kafka_broker`` and the local stack in ``essential.actors.dev.stack``.

Foreground use::

    python -m essential.actors.dev.mongodb --port 27117 --data .essential/mongo
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = [
    "EmbeddedMongo",
    "ServerProcess",
    "boot_id",
    "ServerStartError",
    "free_port",
    "kill_session",
    "pid_alive",
    "port_in_use",
    "process_start_time",
    "session_members",
    "stop_pid",
    "tail",
]

HOST = "127.0.0.1"
_POLL = 0.05  # seconds between liveness/readiness probes


class ServerStartError(RuntimeError):
    """An embedded server exited or did not become ready; the message carries its log tail."""


# --------------------------------------------------------------------------- helpers


def free_port(host: str = HOST) -> int:
    """A port that was free a moment ago (the OS picks it; a race is possible but rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int, host: str = HOST) -> bool:
    """True when something already listens on ``host:port``.

    Checked before spawning so a readiness probe can never be answered by a
    stranger's server that happens to own the port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def tail(path: Path | str, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file ('' if it does not exist)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            text = fh.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (Linux clock ticks), or None if unknown.

    Stored next to a PID in ``stack.json`` so a recycled PID is never mistaken
    for (and killed as) a server we started.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (comm) may contain spaces; everything after the last ')' is fixed.
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[19])  # field 22 overall: starttime


def boot_id() -> str | None:
    """This boot's id (Linux), so PIDs recorded before a reboot are never trusted."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def pid_alive(pid: int, start_time: int | None = None) -> bool:
    """True if ``pid`` runs (zombies count as dead) and, if given, started at ``start_time``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        return True  # no procfs (macOS): os.kill said it exists
    if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
        return False
    return start_time is None or process_start_time(pid) == start_time


def stop_pid(pid: int, timeout: float = 10.0, *, start_time: int | None = None) -> bool:
    """SIGTERM ``pid``, wait up to ``timeout`` for it to go, then SIGKILL it.

    For processes this process did not spawn (e.g. ``essential down`` stopping
    what ``essential up`` started). Returns True if it had to SIGKILL.
    """
    if not pid_alive(pid, start_time):
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    if _wait_gone(pid, timeout):
        return False
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    _wait_gone(pid, 5.0)
    return True


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL)
    try:  # reap it if it was our own child, so no zombie lingers
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    return True


def session_members(sid: int) -> list[int]:
    """Live PIDs whose session id is ``sid`` (Linux; [] without procfs).

    Every server here is started as the leader of a new session, so its
    session holds exactly the processes it spawned (Ray's raylet, workers,
    agents...), even after the leader itself died.
    """
    members: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return members
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            members.append(int(entry))
    return sorted(members)


def kill_session(
    sid: int, timeout: float = 5.0, *, grace: float = 0.0, leader_start_time: int | None = None
) -> list[int]:
    """End every process left in the session we started as ``sid``.

    Members get ``grace`` seconds to exit on their own (a stopped leader's
    children often follow it shortly), then SIGTERM, then SIGKILL after
    ``timeout``. Safe against PID reuse: the kernel never hands out a PID still
    used as a session id, so if no process ``sid`` exists every member is ours;
    if one exists it must be our leader (``leader_start_time``), else nothing is
    touched. Returns the PIDs that had to be signalled.
    """
    current = process_start_time(sid)
    if current is not None and leader_start_time is not None and current != leader_start_time:
        return []  # a stranger reuses the PID: not our session
    deadline = time.monotonic() + grace
    while session_members(sid) and time.monotonic() < deadline:
        time.sleep(_POLL)
    members = session_members(sid)
    for pid in members:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while session_members(sid) and time.monotonic() < deadline:
        time.sleep(_POLL)
    for pid in session_members(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return members


# --------------------------------------------------------------------------- base class


class ServerProcess:
    """A dev server run as a child process: start and wait for readiness, stop, kill, restart.

    Subclasses supply the command line and a single readiness probe. The child
    runs in its own session so a Ctrl-C in the launching terminal does not take
    it down and ``essential up`` can exit while the server keeps running.
    """

    name = "server"

    def __init__(self, *, port: int | None = None, log_dir: Path | str | None = None) -> None:
        self._port = port or free_port()
        self._log_dir = Path(log_dir) if log_dir else Path(tempfile.gettempdir()) / "essential-logs"
        self._proc: subprocess.Popen[bytes] | None = None

    # -- to override
    def command(self) -> list[str]:
        raise NotImplementedError

    def probe(self, timeout: float) -> None:
        """Raise unless the server answers a real protocol request within ``timeout``."""
        raise NotImplementedError

    def child_env(self) -> dict[str, str]:
        return dict(os.environ)

    # -- properties
    @property
    def port(self) -> int:
        return self._port

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path:
        return self._log_dir / f"{self.name}.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle
    def start(self, timeout: float = 30.0) -> Self:
        """Spawn the server and return once it answers a real request.

        Raises :class:`ServerStartError` (with the log tail) if the process
        exits first or ``timeout`` passes; a half-started process is killed.
        """
        if self.running:
            return self
        if port_in_use(self._port):
            raise ServerStartError(
                f"{self.name}: port {HOST}:{self._port} is already in use by another process; "
                "stop it or choose another port (port 0 picks a free one)"
            )
        self._log_dir.mkdir(parents=True, exist_ok=True)
        cmd = self.command()
        with open(self.log_path, "ab") as log:
            log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(cmd)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.child_env(),
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while True:
            code = self._proc.poll()
            if code is not None:
                self._proc = None
                raise ServerStartError(
                    f"{self.name} exited with code {code} while starting on {HOST}:{self._port}; "
                    f"log {self.log_path}:\n{tail(self.log_path)}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                raise ServerStartError(
                    f"{self.name} did not become ready on {HOST}:{self._port} within {timeout:.0f}s "
                    f"(last probe error: {last_error!r}); log {self.log_path}:\n{tail(self.log_path)}"
                )
            try:
                self.probe(min(1.0, max(remaining, 0.1)))
                return self
            except Exception as exc:  # noqa: BLE001 - any probe failure means "not yet"
                last_error = exc
                time.sleep(_POLL)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL. A no-op when not running."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        kill_session(proc.pid, timeout=1.0)  # anything it spawned and left behind

    def kill(self) -> None:
        """SIGKILL without a chance to flush: the crash that fault tests inject."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.kill()
        proc.wait()
        kill_session(proc.pid, timeout=0.0)

    def detach(self) -> int:
        """Forget the running child and return its PID; it keeps running.

        Why: ``essential up`` exits while the servers stay up; ``essential down``
        later stops them by PID (:func:`stop_pid`), from another process.
        """
        if not self.running:
            raise RuntimeError(f"{self.name} is not running")
        assert self._proc is not None
        pid, self._proc = self._proc.pid, None
        return pid

    def restart(self, timeout: float = 30.0) -> Self:
        """Stop (gracefully) if running, then start again on the same port and data."""
        self.stop()
        return self.start(timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(port={self._port}, pid={self.pid}, running={self.running})"


# --------------------------------------------------------------------------- MongoDB


class EmbeddedMongo(ServerProcess):
    """SecantusDB on ``127.0.0.1:port`` storing in ``data_dir``; a single-node replica set ``secantus``.

    The data directory survives stop, kill and restart, so a fault test can
    SIGKILL the server and start it again on the same data.

    ``sync_on_commit`` (on by default) passes ``--sync-on-commit``. Why:
    measured here, without it a SIGKILL loses *acknowledged* writes - up to all
    of the last 100 committed transactions, whatever the write concern
    (``w="majority"`` or ``j=True`` included) - which breaks Essential's "no
    acknowledged checkpoint is lost" contract. Its cost here was 15-40 %
    throughput; pass ``False`` only for benchmarks that never crash the server.
    """

    name = "mongodb"

    def __init__(
        self,
        data_dir: Path | str,
        *,
        port: int | None = None,
        log_dir: Path | str | None = None,
        log_level: str = "WARNING",
        sync_on_commit: bool = True,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(port=port, log_dir=log_dir)
        self._data_dir = Path(data_dir)
        self._log_level = log_level
        self._sync_on_commit = sync_on_commit
        self._extra_args = list(extra_args)

    @property
    def uri(self) -> str:
        return f"mongodb://{HOST}:{self._port}/?replicaSet=secantus"

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    def command(self) -> list[str]:
        self._data_dir.mkdir(parents=True, exist_ok=True)
        return [
            sys.executable, "-m", "secantus",
            "--host", HOST,
            "--port", str(self._port),
            "--storage-path", str(self._data_dir.resolve()),
            "--log-level", self._log_level,
            *(["--sync-on-commit"] if self._sync_on_commit else []),
            *self._extra_args,
        ]  # fmt: skip

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")  # log lines reach the file before a crash
        return env

    def probe(self, timeout: float) -> None:
        from pymongo import MongoClient  # sync client: this is start-up, not the hot path

        ms = int(timeout * 1000)
        client: MongoClient = MongoClient(
            self.uri, serverSelectionTimeoutMS=ms, connectTimeoutMS=ms, socketTimeoutMS=ms
        )
        try:
            client.admin.command("ping")
        finally:
            client.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the embedded MongoDB in the foreground until Ctrl-C / SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m essential.actors.dev.mongodb", description=main.__doc__)
    parser.add_argument("--port", type=int, default=27117, help="0 picks a free port")
    parser.add_argument("--data", type=Path, default=Path(".essential/mongo"), help="data directory")
    parser.add_argument("--log-dir", type=Path, default=None)
    parser.add_argument(
        "--no-sync-on-commit", action="store_true", help="faster, but a crash loses acknowledged writes"
    )
    args = parser.parse_args(argv)

    mongo = EmbeddedMongo(
        args.data, port=args.port, log_dir=args.log_dir, sync_on_commit=not args.no_sync_on_commit
    )
    stop_requested = False

    def _on_signal(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    mongo.start()
    print(f"{mongo.uri}  (pid {mongo.pid}, log {mongo.log_path})", flush=True)
    try:
        while not stop_requested and mongo.running:
            time.sleep(0.2)
    finally:
        mongo.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
