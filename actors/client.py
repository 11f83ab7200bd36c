"""The Python client: works from any Ray driver (local, ``ray://``, a Ray Job).

It needs only Ray: every operation goes through the supervisor actor, which it
creates if missing.  Errors come back typed (``UnknownJob``, ``InvalidPayload``,
``SagaNotFound`` ...) with a message that says what to fix.
"""
from __future__ import annotations

from typing import Any

import ray

from orchestration import Saga, Stage
from orchestration.errors import rebuild_error

from .loopback import LOOPBACK, bind_ray_to_loopback
from .settings import Settings, get_settings
from .supervisor import SUPERVISOR_NAME, Supervisor



def connect_ray(settings: Settings, address: str | None = None) -> None:
    """Join the configured cluster (or the local stack's head) unless already connected.

    The environment variable keeps Ray from replacing 127.0.0.1 with the
    machine's external address on Linux (Ray 2.60 resolves loopback away).
    """
    if ray.is_initialized():
        return
    target = address or settings.ray_address
    kwargs: dict[str, Any] = {"namespace": settings.namespace, "log_to_driver": False}
    if target is None or target.startswith(("127.", "localhost")):
        bind_ray_to_loopback()
        kwargs["_node_ip_address"] = LOOPBACK
    ray.init(address=target, **kwargs)


def get_supervisor(settings: Settings) -> Any:
    """The singleton supervisor, created if missing (idempotent across clients)."""
    handle = Supervisor.options(
        name=SUPERVISOR_NAME,
        namespace=settings.namespace,
        lifetime="detached",
        get_if_exists=True,
    ).remote(settings.model_dump(mode="json"))
    return handle


def _unwrap(reply: dict[str, Any]) -> dict[str, Any]:
    if "error" in reply:
        raise rebuild_error(reply["error"]["type"], reply["error"]["message"])
    return reply


class EssentialClient:
    """Start, watch and abort sagas.

    >>> client = EssentialClient()
    >>> saga_id = client.start("bank:transfer", {"source": "w1", "target": "w2", "amount": 5})
    >>> client.wait(saga_id).state
    <SagaState.COMPLETED: 'completed'>
    """

    def __init__(self, settings: Settings | None = None, *, address: str | None = None) -> None:
        self.settings = settings or get_settings()
        self.address = address
        self.reconnect()

    def reconnect(self) -> None:
        """(Re)join the cluster and find the supervisor, e.g. after the cluster restarted."""
        connect_ray(self.settings, self.address)
        self.supervisor = get_supervisor(self.settings)
        ray.get(self.supervisor.ready.remote())

    def start(
        self,
        job: str,
        payload: dict[str, Any] | None = None,
        *,
        ttl: float | None = None,
        idempotency_key: str | None = None,
        correlation_id: str | None = None,
        traceparent: str | None = None,
    ) -> str:
        """Validate, store and launch a saga; returns its id (the existing one for a known key)."""
        request = {
            "job": job,
            "payload": payload if payload is not None else {},
            "ttl": ttl,
            "idempotency_key": idempotency_key,
            "correlation_id": correlation_id,
            "traceparent": traceparent,
        }
        reply = _unwrap(ray.get(self.supervisor.start.remote(request)))
        return reply["saga"]["id"]

    def start_many(self, requests: list[dict[str, Any]]) -> list[str]:
        """Start a batch concurrently; each request has the keyword names of :meth:`start`."""
        refs = [self.supervisor.start.remote({"payload": {}, **r}) for r in requests]
        return [_unwrap(reply)["saga"]["id"] for reply in ray.get(refs)]

    def status(self, saga_id: str) -> Saga:
        return Saga.model_validate(_unwrap(ray.get(self.supervisor.status.remote(saga_id)))["saga"])

    def stages(self, saga_id: str) -> list[Stage]:
        reply = _unwrap(ray.get(self.supervisor.stages.remote(saga_id)))
        return [Stage.model_validate(s) for s in reply["stages"]]

    def wait(self, saga_id: str, timeout: float = 120.0) -> Saga:
        """Block until the saga is completed, aborted or parked; raises TimeoutError otherwise."""
        saga = Saga.model_validate(_unwrap(ray.get(self.supervisor.wait.remote(saga_id, timeout)))["saga"])
        if not (saga.state.terminal or saga.state.value == "parked"):
            raise TimeoutError(f"saga {saga_id} still {saga.state.value} after {timeout:g}s")
        return saga

    def abort(self, saga_id: str, reason: str = "aborted by client") -> Saga:
        """Ask for compensation; honoured between steps. Aborting a completed saga raises."""
        return Saga.model_validate(_unwrap(ray.get(self.supervisor.abort.remote(saga_id, reason)))["saga"])

    def list(self, *, state: str | None = None, job: str | None = None, limit: int = 50) -> list[Saga]:
        reply = _unwrap(ray.get(self.supervisor.list.remote(state, job, limit)))
        return [Saga.model_validate(s) for s in reply["sagas"]]

    def resume(self, saga_id: str) -> Saga:
        """Operator: resume a parked saga from its last checkpoint."""
        return Saga.model_validate(_unwrap(ray.get(self.supervisor.resume.remote(saga_id)))["saga"])

    def sweep(self) -> dict[str, int]:
        """Run one supervisor sweep now (restore, TTL, admission, prune) and return its counts."""
        return ray.get(self.supervisor.sweep.remote())

    def states(self, saga_ids: list[str]) -> dict[str, str]:
        """State of many sagas at once: ``{id: state}``."""
        return ray.get(self.supervisor.states.remote(saga_ids))
